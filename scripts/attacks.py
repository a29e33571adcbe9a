#!/usr/bin/env python3
"""Attacks on a running shardcast, re-run for docs/reliability.md.

Each attack starts the real binary on a scratch directory, does what an
attacker or a bad day would, and checks the promise that matters: every
acknowledged event is stored, at contiguous positions, and the server
answers again afterwards. Standard library only; loopback only; every loop
is bounded in count and time.

    scripts/attacks.py all                 # every attack below
    scripts/attacks.py kill9 --cycles 13   # kill -9 under load, 13 times
    scripts/attacks.py sigstop             # frozen 5 s under load, then resumed
    scripts/attacks.py idle --connections 19000
    scripts/attacks.py diskfull            # the data directory's disk fills up

SHARDCAST_BIN names the binary (default: target/release/shardcast, built
if missing). Prints one RESULT line per attack; exits 1 if any failed.
"""
import argparse
import http.client
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def binary():
    b = os.environ.get("SHARDCAST_BIN")
    if b:
        return b
    b = os.path.join(ROOT, "target/release/shardcast")
    if not os.path.exists(b):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    return b


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Server:
    def __init__(self, data, env=None):
        self.data = data
        self.port = free_port()
        self.env = dict(os.environ, PORT=str(self.port), DB_PATH=os.path.join(data, "events.db"),
                        RATE_LIMIT="0", RUST_LOG="warn", **(env or {}))
        self.proc = None
        self.log = open(os.path.join(data, "server.log"), "ab")

    def start(self):
        self.proc = subprocess.Popen([binary(), "serve"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("server exited at start: see " + self.log.name)
                time.sleep(0.02)
        raise RuntimeError("server did not listen")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return -9
        return self.proc.returncode if self.proc else None

    def request(self, method, path, body=None, timeout=30):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()


class Load:
    """Writer threads posting single events and batches with unique ids; the
    ids of every acknowledged event are kept."""

    def __init__(self, server, threads=8, tag="l"):
        self.server, self.threads, self.tag = server, threads, tag
        self.acked = set()
        self.statuses = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.workers = []
        self.round = 0  # ids stay unique across start/end cycles

    def _run(self, k):
        n = 0
        conn = None
        while not self.stop.is_set():
            n += 1
            batch = n % 4 == 0
            ids = [f"{self.tag}-{self.round}-{k}-{n}-{i}" for i in range(10 if batch else 1)]
            evs = [{"type": "attack", "id": i, "data": {"k": k, "n": n}} for i in ids]
            body = json.dumps(evs if batch else evs[0])
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
                conn.request("POST", "/events/batch" if batch else "/events", body=body,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                with self.lock:
                    self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        self.acked.update(ids)
                if r.status != 200:
                    time.sleep(0.01)
            except (OSError, http.client.HTTPException):
                conn = None
                time.sleep(0.01)

    def start(self):
        self.round += 1
        self.stop.clear()
        self.workers = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(self.threads)]
        for w in self.workers:
            w.start()

    def end(self):
        self.stop.set()
        for w in self.workers:
            w.join(timeout=40)


def stored(data):
    db = sqlite3.connect(os.path.join(data, "events.db"))
    rows = db.execute("SELECT position, id FROM events ORDER BY position").fetchall()
    db.close()
    return rows


def check_store(data, acked):
    """Every acknowledged id stored; positions 1..n without a gap."""
    rows = stored(data)
    positions = [p for p, _ in rows]
    ids = {i for _, i in rows}
    lost = acked - ids
    contiguous = positions == list(range(1, len(positions) + 1))
    return len(rows), len(lost), contiguous


def result(name, ok, **kv):
    fields = " ".join(f"{k}={v}" for k, v in kv.items())
    print(f"RESULT {name} {'PASS' if ok else 'FAIL'} {fields}", flush=True)
    return ok


def attack_kill9(cycles):
    data = tempfile.mkdtemp(prefix="sc-attack-kill9-")
    s = Server(data)
    load = Load(s)
    rng = random.Random(11)
    for c in range(cycles):
        s.start()
        load.start()
        time.sleep(rng.uniform(0.5, 2.0))
        s.kill9()
        load.end()
    s.start()
    up = s.request("GET", "/health")[0] == 200
    s.stop()
    n, lost, contiguous = check_store(data, load.acked)
    return result("kill9", up and lost == 0 and contiguous and len(load.acked) > 0, cycles=cycles,
                  acknowledged=len(load.acked), stored=n, lost=lost, contiguous=contiguous,
                  statuses=json.dumps(load.statuses).replace(" ", ""))


def attack_sigstop(seconds):
    data = tempfile.mkdtemp(prefix="sc-attack-stop-")
    s = Server(data)
    s.start()
    load = Load(s)
    load.start()
    time.sleep(1)
    before = len(load.acked)
    s.proc.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    frozen = len(load.acked) - before
    s.proc.send_signal(signal.SIGCONT)
    t0 = time.time()
    status = 0
    while time.time() - t0 < 10:
        try:
            status = s.request("GET", "/health", timeout=2)[0]
            if status == 200:
                break
        except OSError:
            pass
    resumed = time.time() - t0
    time.sleep(2)
    load.end()
    code = s.stop()
    n, lost, contiguous = check_store(data, load.acked)
    ok = status == 200 and lost == 0 and contiguous and code == 0 and frozen <= 8
    return result("sigstop", ok, frozen_s=seconds, acked_while_frozen=frozen,
                  health_after_s=f"{resumed:.2f}", acknowledged=len(load.acked), lost=lost,
                  contiguous=contiguous, sigterm_exit=code,
                  statuses=json.dumps(load.statuses).replace(" ", ""))


def rss_fds(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def attack_idle(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n = min(n, hard - 200)
    data = tempfile.mkdtemp(prefix="sc-attack-idle-")
    s = Server(data, {"SHARDCAST_SERVER_IDLE_TIMEOUT": "120s"})
    s.start()
    rss0, _ = rss_fds(s.proc.pid)
    socks, refused = [], 0
    for _ in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", s.port), timeout=5))
        except OSError:
            refused += 1
    time.sleep(1)
    rss1, fds1 = rss_fds(s.proc.pid)
    t0 = time.time()
    try:
        status = s.request("GET", "/health", timeout=5)[0]
    except OSError as e:
        status = str(e)
    took = time.time() - t0
    # The server answers the connections beyond its cap with 503 and closes them.
    closed = 0
    for c in socks:
        c.setblocking(False)
        try:
            if c.recv(1, socket.MSG_PEEK) is not None:
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    for c in socks:
        c.close()
    time.sleep(1)
    post = s.request("POST", "/events", json.dumps({"type": "after"}))[0]
    code = s.stop()
    ok = status == 200 and post == 200 and code == 0
    return result("idle", ok, connections=len(socks), refused_by_kernel=refused,
                  answered_or_closed_by_server=closed, server_fds=fds1,
                  rss_per_conn_bytes=(rss1 - rss0) // max(1, len(socks)),
                  health=status, health_s=f"{took:.3f}", post_after=post, sigterm_exit=code)


def attack_diskfull():
    if os.geteuid() != 0:
        return result("diskfull", True, skipped="needs root to mount a small tmpfs")
    mnt = tempfile.mkdtemp(prefix="sc-attack-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt], check=True)
    try:
        # Room to give back later: a filler file, deleted after the disk is full.
        with open(os.path.join(mnt, "filler"), "wb") as f:
            f.write(b"\0" * (8 << 20))
        s = Server(mnt)
        s.start()
        load = Load(s, threads=4, tag="full")
        load.start()
        t0 = time.time()
        while time.time() - t0 < 120 and load.statuses.get(507, 0) < 50:
            time.sleep(0.2)
        load.end()
        full = load.statuses.get(507, 0)
        health = s.request("GET", "/health")[0]
        ready = s.request("GET", "/health?mode=readiness")[0]
        reads = s.request("GET", "/events?from=1&limit=5")[0]
        os.unlink(os.path.join(mnt, "filler"))
        time.sleep(0.5)
        after = s.request("POST", "/events", json.dumps({"type": "after", "id": "after-room"}))[0]
        if after == 200:
            load.acked.add("after-room")
        code = s.stop()
        n, lost, contiguous = check_store(mnt, load.acked)
        ok = full > 0 and health == 200 and ready == 503 and reads == 200 and after == 200 \
            and lost == 0 and contiguous and code == 0
        return result("diskfull", ok, refused_507=full, acknowledged=len(load.acked), stored=n,
                      lost=lost, contiguous=contiguous, liveness=health, readiness=ready,
                      reads=reads, append_after_room=after, sigterm_exit=code,
                      statuses=json.dumps(load.statuses).replace(" ", ""))
    finally:
        subprocess.run(["umount", "-l", mnt])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack", choices=["all", "kill9", "sigstop", "idle", "diskfull"])
    p.add_argument("--cycles", type=int, default=13)
    p.add_argument("--stop-seconds", type=float, default=5)
    p.add_argument("--connections", type=int, default=19000)
    a = p.parse_args()
    print(f"attacks: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} binary={binary()}", flush=True)
    oks = []
    if a.attack in ("all", "kill9"):
        oks.append(attack_kill9(a.cycles))
    if a.attack in ("all", "sigstop"):
        oks.append(attack_sigstop(a.stop_seconds))
    if a.attack in ("all", "idle"):
        oks.append(attack_idle(a.connections))
    if a.attack in ("all", "diskfull"):
        oks.append(attack_diskfull())
    sys.exit(0 if all(oks) else 1)


if __name__ == "__main__":
    main()
