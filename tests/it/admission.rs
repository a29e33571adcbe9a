//! Admission under abuse, against the real binary over real sockets: the
//! per-client rate limit (429 + Retry-After, recovery, exemptions, trusted
//! proxies, memory under 50,000 distinct addresses), the connection cap (503),
//! running out of file descriptors, and slow-header (slowloris) clients.

use crate::common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn rate_env<'a>(per_second: &'a str, burst: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("RATE_LIMIT", per_second),
        ("RATE_BURST", burst),
        ("SHARDCAST_SERVER_SHARDS", "1"),
    ]
}

fn assert_rate_limited(r: &Response) -> u64 {
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.error_code(), "rate_limited");
    let secs: u64 = r
        .header("retry-after")
        .expect("a Retry-After header")
        .parse()
        .unwrap();
    assert!(secs >= 1);
    secs
}

#[test]
fn rate_limit_answers_429_with_retry_after_and_recovers() {
    let dir = TempDir::new("ratelimit");
    // One request per 2 s, bursts of 3 (ebuse's variable names).
    let s = Server::start(dir.path(), &rate_env("0.5", "3"));
    let mut c = s.conn();
    for _ in 0..3 {
        assert_eq!(c.request("GET", "/position", &[], b"").status, 200);
    }
    let r = c.request("GET", "/position", &[], b"");
    // The next request's worth refills in 2 s.
    assert_eq!(assert_rate_limited(&r), 2);
    assert!(r.text().contains("127.0.0.1"), "{}", r.text());
    // A limited POST whose body has arrived leaves the connection usable, and
    // nothing is stored.
    let r = c.request(
        "POST",
        "/events",
        &[("Content-Type", "application/json")],
        br#"{"type":"t"}"#,
    );
    assert_rate_limited(&r);
    // Exempt: /health, CORS preflight, SSE subscriptions (on the same address).
    for _ in 0..10 {
        assert_eq!(c.request("GET", "/health", &[], b"").status, 200);
        assert_eq!(c.request("OPTIONS", "/events", &[], b"").status, 204);
    }
    let sub = SseClient::open(s.addr, "/events/subscribe", &[]);
    assert_eq!(sub.status, 200, "{}", sub.head);
    // The bucket is per address, not per connection.
    assert_rate_limited(&s.get("/position"));
    // 404s count too: probing does not get around the limit.
    assert_rate_limited(&s.get("/nowhere"));
    // Recovery after the refill: one request's worth after 2 s, not two.
    std::thread::sleep(Duration::from_millis(2100));
    let r = c.request("GET", "/position", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["position"], 0, "the limited POST stored nothing");
    assert_rate_limited(&c.request("GET", "/position", &[], b""));
}

#[test]
fn rate_limit_off_with_per_second_zero() {
    let dir = TempDir::new("ratelimit-off");
    // SHARDCAST_RATE_LIMIT_PER_SECOND wins over ebuse's RATE_LIMIT.
    let mut env = rate_env("1", "1");
    env.push(("SHARDCAST_RATE_LIMIT_PER_SECOND", "0"));
    let s = Server::start(dir.path(), &env);
    let mut c = s.conn();
    for _ in 0..300 {
        assert_eq!(c.request("GET", "/position", &[], b"").status, 200);
    }
    // And the same settings with the limit on do limit (the control).
    let dir = TempDir::new("ratelimit-on");
    let s = Server::start(dir.path(), &rate_env("1", "1"));
    let mut c = s.conn();
    assert_eq!(c.request("GET", "/position", &[], b"").status, 200);
    assert_rate_limited(&c.request("GET", "/position", &[], b""));
}

fn get_from(c: &mut Conn, xff: Option<&str>) -> Response {
    match xff {
        Some(v) => c.request("GET", "/position", &[("X-Forwarded-For", v)], b""),
        None => c.request("GET", "/position", &[], b""),
    }
}

#[test]
fn forwarded_for_is_honoured_only_from_trusted_proxies() {
    let dir = TempDir::new("ratelimit-proxy");
    let mut env = rate_env("0.1", "2");
    env.push(("SHARDCAST_SERVER_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"));
    let s = Server::start(dir.path(), &env);
    let mut c = s.conn();
    let a = Some("203.0.113.1");
    assert_eq!(get_from(&mut c, a).status, 200);
    assert_eq!(get_from(&mut c, a).status, 200);
    let r = get_from(&mut c, a);
    assert_rate_limited(&r);
    assert!(r.text().contains("203.0.113.1"), "{}", r.text());
    // Another client behind the proxy has its own bucket.
    assert_eq!(get_from(&mut c, Some("203.0.113.2")).status, 200);
    // A forged left part does not help: the right-most untrusted address counts,
    // after skipping trusted hops.
    assert_rate_limited(&get_from(&mut c, Some("198.51.100.9, 203.0.113.1")));
    assert_rate_limited(&get_from(&mut c, Some("203.0.113.1, 10.9.9.9")));
    // The proxy's own requests (no header) count against the proxy.
    assert_eq!(get_from(&mut c, None).status, 200);

    // Without trusted proxies the header is ignored: everyone is the peer.
    let dir = TempDir::new("ratelimit-noproxy");
    let s = Server::start(dir.path(), &rate_env("0.1", "2"));
    let mut c = s.conn();
    assert_eq!(get_from(&mut c, Some("203.0.113.1")).status, 200);
    assert_eq!(get_from(&mut c, Some("203.0.113.2")).status, 200);
    let r = get_from(&mut c, Some("203.0.113.3"));
    assert_rate_limited(&r);
    assert!(r.text().contains("127.0.0.1"), "{}", r.text());
}

/// The i-th distinct loopback address, 127.1.0.1 onwards (never 127.0.0.1).
fn loopback(i: u32) -> Ipv4Addr {
    let host = i % 254 + 1;
    let rest = i / 254;
    Ipv4Addr::new(127, 1 + (rest / 256) as u8, (rest % 256) as u8, host as u8)
}

/// One `GET path` with `Connection: close` from `from`; the status.
fn get_once_from(server: SocketAddr, from: Ipv4Addr, path: &str) -> u16 {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    sock.bind(&SockAddr::from(SocketAddr::from((from, 0))))
        .unwrap();
    sock.connect(&SockAddr::from(server)).unwrap();
    let mut stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::with_capacity(256);
    // The server closes first (Connection: close), so the TIME_WAIT is its
    // kernel's, and this side's address and port are free again at once.
    stream.read_to_end(&mut answer).unwrap();
    std::str::from_utf8(&answer[9..12])
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn fifty_thousand_client_addresses_keep_memory_bounded() {
    const ADDRESSES: u32 = 50_000;
    const THREADS: u32 = 4;
    let dir = TempDir::new("ratelimit-flood");
    // One request per 100 s and a burst of 1: every address's bucket stays
    // tracked (not yet refilled) for the whole test, and a second request
    // from any of them would be refused.
    let s = Server::start(dir.path(), &rate_env("0.01", "1"));
    // Warm up the server's buffers and allocator before the baseline.
    for i in 0..200 {
        assert_eq!(
            get_once_from(s.addr, loopback(ADDRESSES + i), "/position"),
            200
        );
    }
    let pid = s.pid();
    let before = proc_status_kib(pid, "VmRSS:");
    let start = Instant::now();
    let addr = s.addr;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut refused = 0;
                for i in (t..ADDRESSES).step_by(THREADS as usize) {
                    if get_once_from(addr, loopback(i), "/position") != 200 {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let refused: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let elapsed = start.elapsed();
    let after = proc_status_kib(pid, "VmRSS:");
    let anon = proc_status_kib(pid, "RssAnon:");
    let growth_kib = after.saturating_sub(before);
    eprintln!(
        "{ADDRESSES} addresses in {elapsed:.1?}: VmRSS {before} KiB → {after} KiB (+{growth_kib} KiB, {:.0} B per address), RssAnon {anon} KiB",
        growth_kib as f64 * 1024.0 / ADDRESSES as f64
    );
    assert_eq!(refused, 0, "each address's first request fits its burst");
    // 50,000 entries are at most 50,000 × 57 B ≈ 2.7 MiB; allow for the
    // allocator's slack, never for one allocation per connection kept.
    assert!(
        growth_kib < 32 * 1024,
        "RSS grew by {growth_kib} KiB for {ADDRESSES} addresses"
    );
    // Every address is still tracked: a second request from the first and the
    // last is refused. A fresh address is served, and so is /health.
    assert_eq!(get_once_from(addr, loopback(0), "/position"), 429);
    assert_eq!(
        get_once_from(addr, loopback(ADDRESSES - 1), "/position"),
        429
    );
    assert_eq!(
        get_once_from(addr, loopback(ADDRESSES + 300), "/position"),
        200
    );
    assert_eq!(get_once_from(addr, loopback(0), "/health"), 200);
}

#[test]
fn connections_beyond_the_cap_get_503_and_the_cap_frees_up() {
    let dir = TempDir::new("conncap");
    let s = Server::start(
        dir.path(),
        &[
            ("SHARDCAST_SERVER_MAX_CONNECTIONS", "3"),
            ("SHARDCAST_SERVER_SHARDS", "1"),
        ],
    );
    // Three connections: two plain, one SSE subscription (they all count).
    let mut a = s.conn();
    assert_eq!(a.request("GET", "/health", &[], b"").status, 200);
    let mut b = s.conn();
    assert_eq!(b.request("GET", "/health", &[], b"").status, 200);
    let sub = SseClient::open(s.addr, "/events/subscribe", &[]);
    assert_eq!(sub.status, 200);

    // The fourth is answered 503 and closed, whether or not it has sent its
    // request yet.
    for send_first in [false, true] {
        let mut d = s.conn();
        if send_first {
            d.send_raw(&build_request("GET", "/health", &[], b""));
        }
        let r = d.read_response().expect("a 503 before the close");
        assert_eq!(r.status, 503);
        assert_eq!(r.error_code(), "too_many_connections");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("connection"), Some("close"));
        assert!(d.is_closed_by_server(Duration::from_secs(5)));
    }
    // The admitted ones are unaffected.
    assert_eq!(a.request("GET", "/position", &[], b"").status, 200);

    // Closing one (here the subscription) frees its place.
    drop(sub);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut e = s.conn();
        let r = e.request("GET", "/health", &[], b"");
        if r.status == 200 {
            // Held open: now the cap is reached again.
            let mut f = s.conn();
            assert_eq!(f.read_response().unwrap().status, 503);
            break;
        }
        assert_eq!(r.status, 503);
        assert!(Instant::now() < deadline, "the cap never freed up");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(b);
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), 1-based from 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap() // utime + stime
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn out_of_file_descriptors_neither_crashes_nor_spins_and_recovers() {
    const NOFILE: u64 = 64;
    let dir = TempDir::new("emfile");
    let mut s = Server::start_with_nofile(
        dir.path(),
        &[("SHARDCAST_SERVER_SHARDS", "1")],
        Some(NOFILE),
    );
    let pid = s.pid();
    let base = open_fds(pid);
    assert!(base < NOFILE as usize - 10, "{base} fds at start");
    // More connections than descriptors are left: the kernel completes them
    // all (the backlog is large), the server accepts until EMFILE.
    let mut conns: Vec<TcpStream> = (0..NOFILE as usize)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.stderr().contains("out_of_fds") {
        assert!(
            Instant::now() < deadline,
            "no out-of-fds warning; {} fds open; stderr:\n{}",
            open_fds(pid),
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(open_fds(pid) + 2 >= NOFILE as usize, "the table is full");
    // Out of descriptors for a second: the process lives and sleeps.
    let hz = 100.0; // USER_HZ on Linux
    let t0 = cpu_ticks(pid);
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let cpu = (cpu_ticks(pid) - t0) as f64 / hz;
    let share = cpu / wall.elapsed().as_secs_f64();
    eprintln!("out of fds: {:.1}% of a CPU", share * 100.0);
    assert!(
        share < 0.10,
        "the accept loop spins: {:.0}% CPU",
        share * 100.0
    );
    assert!(s.child.as_mut().unwrap().try_wait().unwrap().is_none());
    // A new client is not served while the table is full ...
    let mut waiting = s.conn();
    waiting
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    waiting.send_raw(&build_request("GET", "/health", &[], b""));
    let mut one = [0u8; 1];
    assert!(
        waiting.stream.read(&mut one).is_err(),
        "served without an fd?"
    );
    // ... and is, once descriptors are free again.
    conns.clear();
    waiting
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = waiting.read_response().expect("served after recovery");
    assert_eq!(r.status, 200);
    assert_eq!(s.get("/position").status, 200);
    let mut c = s.conn();
    for _ in 0..5 {
        assert_eq!(c.request("GET", "/health", &[], b"").status, 200);
    }
    drop(c);
    assert!(s.terminate(Duration::from_secs(10)).success());
}

#[test]
fn slowloris_is_cut_at_the_read_timeout_while_others_are_served() {
    let dir = TempDir::new("slowloris");
    let s = Server::start(dir.path(), &[("READ_TIMEOUT", "1s")]);
    let addr = s.addr;
    // Trickle a head that never ends, a byte every 50 ms.
    let slow = std::thread::spawn(move || {
        let mut t = TcpStream::connect(addr).unwrap();
        t.set_nodelay(true).unwrap();
        let start = Instant::now();
        let head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: ";
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if t.write_all(&[*b]).is_err() {
                break;
            }
            // The server closes its side (after a 408): reading shows it.
            t.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            match t.read(&mut [0u8; 512]) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
            if start.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        start.elapsed()
    });
    // Meanwhile other clients are served promptly.
    let mut worst = Duration::ZERO;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let t = Instant::now();
        let mut c = s.conn();
        assert_eq!(c.request("GET", "/position", &[], b"").status, 200);
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let cut_after = slow.join().unwrap();
    eprintln!("slowloris cut after {cut_after:.2?}; slowest other request {worst:.2?}");
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(3),
        "the trickling client was cut after {cut_after:?}, not at the 1 s read timeout"
    );
    assert!(worst < Duration::from_millis(500), "{worst:?}");
}
