//! Cluster mode with real processes on loopback: three `nats-server -js`
//! (routes between them, streams R3) and three shardcast nodes, each
//! given every NATS URL. Replicas agree on every position, duplicates and
//! conflicts are decided once for the cluster, SSE resumes across nodes,
//! and the cluster survives `kill -9` of a NATS server and of a node, loss
//! of quorum (503 within `cluster.publish_timeout`, then recovery), and a
//! node joining with an empty data directory.
//!
//! The cluster tests run one at a time (`SERIAL`): each holds six
//! processes, on a 2-core box.

use crate::common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub static SERIAL: Mutex<()> = Mutex::new(());

const NATS_BIN: &str = "nats-server";

/// One `nats-server -js` of a three-server cluster.
struct Nats {
    child: Option<Child>,
    name: String,
    port: u16,
    cluster_port: u16,
    routes: String,
    dir: PathBuf,
}

impl Nats {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.name))
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new(NATS_BIN)
            .args(["-js", "-a", "127.0.0.1", "-n", &self.name])
            .args(["-p", &self.port.to_string()])
            .args(["-sd", &self.dir.join(&self.name).display().to_string()])
            .args(["--cluster_name", "shardcast-test"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", self.cluster_port),
            ])
            .args(["--routes", &self.routes])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server (apt-get install nats-server)");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct NatsCluster {
    servers: Vec<Nats>,
}

impl NatsCluster {
    fn start(dir: &Path) -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (fixed_port(), fixed_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers: Vec<Nats> = ports
            .iter()
            .enumerate()
            .map(|(i, (p, c))| Nats {
                child: None,
                name: format!("n{}", i + 1),
                port: *p,
                cluster_port: *c,
                routes: routes.clone(),
                dir: dir.to_path_buf(),
            })
            .collect();
        for s in &mut servers {
            s.spawn();
        }
        let nc = NatsCluster { servers };
        nc.wait_leader(Duration::from_secs(30));
        nc
    }

    /// Until the JetStream meta group has a leader (streams can be made).
    fn wait_leader(&self, within: Duration) {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.servers.iter().any(|s| {
                std::fs::read_to_string(s.log())
                    .unwrap_or_default()
                    .contains("metadata leader")
            }) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no JetStream metadata leader within {within:?}");
    }

    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A shardcast node of the cluster, data in `dir/<name>`.
fn node(dir: &Path, name: &str, urls: &str, extra: &[(&str, &str)]) -> Server {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut env = vec![
        ("SHARDCAST_CLUSTER_NATS_URLS", urls),
        ("SHARDCAST_CLUSTER_NODE_NAME", name),
        ("SHARDCAST_CLUSTER_PUBLISH_TIMEOUT", "3s"),
        ("SHARDCAST_SERVER_SHARDS", "1"),
    ];
    env.extend_from_slice(extra);
    Server::start(&d, &env)
}

/// Until the node says it can take appends (its stream answers).
fn wait_ready(s: &Server, within: Duration) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < within {
        let r = s.get("/health?mode=readiness");
        if r.status == 200 {
            return;
        }
        last = r.text();
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("node not ready within {within:?}: {last}\n{}", s.stderr());
}

/// Every stored event of a node: (position, id).
fn events(s: &Server) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let r = s.get(&format!("/events?from={from}&limit=1000"));
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        let page = page.as_array().unwrap();
        if page.is_empty() {
            return out;
        }
        for e in page {
            out.push((
                e["position"].as_u64().unwrap(),
                e["id"].as_str().unwrap().to_string(),
            ));
        }
        from = out.last().unwrap().0 + 1;
    }
}

/// Until every node holds `n` events; returns them, checked identical on
/// all and contiguous from 1.
fn converge(nodes: &[&Server], n: usize, within: Duration) -> Vec<(u64, String)> {
    let start = Instant::now();
    loop {
        let all: Vec<Vec<(u64, String)>> = nodes.iter().map(|s| events(s)).collect();
        if all.iter().all(|e| e.len() >= n) || start.elapsed() > within {
            for (i, e) in all.iter().enumerate() {
                assert_eq!(e.len(), n, "node {i} holds {} events, not {n}", e.len());
                assert_eq!(e, &all[0], "node {i} differs from node 0");
            }
            for (i, (p, _)) in all[0].iter().enumerate() {
                assert_eq!(*p, i as u64 + 1, "positions contiguous from 1");
            }
            return all.into_iter().next().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Positions received until `until`, or until the stream ends.
fn positions_until(sub: &mut SseClient, until: Instant, hop: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while Instant::now() < until {
        let Some(m) = sub.next_within(Duration::from_millis(500)) else {
            continue;
        };
        assert_ne!(m.event.as_deref(), Some("reset"), "hop {hop}: {m:?}");
        out.extend(m.id.as_deref().and_then(|i| i.parse::<u64>().ok()));
    }
    out
}

fn post(s: &Server, path: &str, body: serde_json::Value) -> Response {
    s.post(path, &body.to_string())
}

fn json_post(conn: &mut Conn, path: &str, body: serde_json::Value) -> Response {
    conn.request(
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// Appenders spreading single events and batches of 10 over `addrs`
/// until stopped; each returns the ids that were acknowledged (2xx).
fn load(
    addrs: Vec<std::net::SocketAddr>,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|c| {
            let addrs = addrs.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut conns: std::collections::HashMap<std::net::SocketAddr, Conn> =
                    std::collections::HashMap::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let addr = addrs[(n as usize + c) % addrs.len()];
                    let batch = n % 2 == 0;
                    let ids: Vec<String> = if batch {
                        (0..10).map(|k| format!("c{c}-{n}-{k}")).collect()
                    } else {
                        vec![format!("c{c}-{n}")]
                    };
                    let body = if batch {
                        serde_json::to_vec(
                            &ids.iter()
                                .map(|id| json!({"type":"b","id":id}))
                                .collect::<Vec<_>>(),
                        )
                        .unwrap()
                    } else {
                        serde_json::to_vec(&json!({"type":"s","id":ids[0]})).unwrap()
                    };
                    let path = if batch { "/events/batch" } else { "/events" };
                    // One kept-alive connection per node (a new one per
                    // request would run the box out of ports).
                    let conn = conns.entry(addr).or_insert_with(|| Conn::open(addr));
                    conn.send_raw(&build_request(
                        "POST",
                        path,
                        &[("Content-Type", "application/json")],
                        &body,
                    ));
                    match conn.read_response() {
                        Some(r) if r.status == 200 || r.status == 201 => acked.extend(ids),
                        Some(r) if r.status == 503 => {
                            std::thread::sleep(Duration::from_millis(100))
                        }
                        Some(r) => panic!("unexpected answer {}: {}", r.status, r.text()),
                        None => {
                            conns.remove(&addr);
                            std::thread::sleep(Duration::from_millis(50))
                        }
                    }
                }
                acked
            })
        })
        .collect()
}

fn stop_load(stop: &AtomicBool, handles: Vec<std::thread::JoinHandle<Vec<String>>>) -> Vec<String> {
    stop.store(true, Ordering::Relaxed);
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// Append one event, retrying (same id) while the node answers 503, for up
/// to a minute.
fn until_taken(s: &Server, id: &str) {
    let start = Instant::now();
    loop {
        let r = post(s, "/events", json!({"type":"t","id":id}));
        if r.status == 200 {
            return;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "appends did not resume: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every acknowledged id is stored once on the node.
fn holds_all(stored: &[(u64, String)], acked: &[String]) {
    let ids: std::collections::HashSet<&str> = stored.iter().map(|(_, i)| i.as_str()).collect();
    assert_eq!(ids.len(), stored.len(), "an id stored twice");
    let missing: Vec<&String> = acked.iter().filter(|a| !ids.contains(a.as_str())).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Three nodes, appends and batches concurrently on all three: one history,
/// the same on every node; an id seen on one node is a duplicate on
/// another (with the first position); two nodes racing `expected_version:
/// 0` on one stream get one 200 and one 409; an append larger than one
/// JetStream message gets 413.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn replicas_agree_on_positions_duplicates_and_conflicts() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("cluster-agree");
    let nats = NatsCluster::start(dir.path());
    let big = [("SHARDCAST_SERVER_MAX_BODY_BYTES", "4194304")];
    let a = node(dir.path(), "a", &nats.urls(), &big);
    let b = node(dir.path(), "b", &nats.urls(), &big);
    let c = node(dir.path(), "c", &nats.urls(), &big);
    for s in [&a, &b, &c] {
        wait_ready(s, Duration::from_secs(30));
    }

    let threads: Vec<_> = [&a, &b, &c]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut conn = Conn::open(addr);
                for n in 0..30 {
                    let r = if i == 0 {
                        json_post(
                            &mut conn,
                            "/events",
                            json!({"type":"one","id":format!("a-{n}")}),
                        )
                    } else {
                        let batch: Vec<_> = (0..10)
                            .map(|k| json!({"type":"many","id":format!("{i}-{n}-{k}")}))
                            .collect();
                        json_post(&mut conn, "/events/batch", json!(batch))
                    };
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let history = converge(&[&a, &b, &c], 30 + 2 * 300, Duration::from_secs(20));
    assert_eq!(
        history
            .iter()
            .filter(|(_, id)| id.starts_with("a-"))
            .count(),
        30
    );

    // The same id on A, then on B: B answers duplicate with A's position.
    let first = post(&a, "/events", json!({"type":"x","id":"once"}));
    assert_eq!(first.status, 200, "{}", first.text());
    let again = post(&b, "/events", json!({"type":"x","id":"once"}));
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(again.json()["position"], first.json()["position"]);

    // Two nodes race to open one stream at version 0: exactly one wins.
    for round in 0..5 {
        let stream = format!("order-{round}");
        let racers: Vec<_> = [a.addr, b.addr]
            .into_iter()
            .enumerate()
            .map(|(i, addr)| {
                let stream = stream.clone();
                std::thread::spawn(move || {
                    json_post(
                        &mut Conn::open(addr),
                        "/events",
                        json!({"type":"opened","stream":stream,"expected_version":0,"id":format!("{stream}-{i}")}),
                    )
                    .status
                })
            })
            .collect();
        let mut statuses: Vec<u16> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        statuses.sort();
        assert_eq!(statuses, vec![200, 409], "round {round}");
    }
    let history = converge(&[&a, &b, &c], 630 + 1 + 5, Duration::from_secs(20));
    // The stream's one event per round is the same on every node (converge
    // compared them): version 1 everywhere.
    let s0 = c.get("/streams/order-0");
    assert_eq!(s0.status, 200, "{}", s0.text());
    assert_eq!(
        s0.json().as_array().map(|e| e.len()),
        Some(1),
        "{}",
        s0.text()
    );

    // One batch larger than a JetStream message (1 MiB by default): 413.
    let data = "x".repeat(200_000);
    let batch: Vec<_> = (0..8)
        .map(|k| json!({"type":"big","id":format!("big-{k}"),"data":{"s":data}}))
        .collect();
    let r = post(&a, "/events/batch", json!(batch));
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.error_code(), "payload_too_large");
    assert!(r.text().contains("bytes"), "{}", r.text());
    assert_eq!(events(&a).len(), history.len(), "nothing of it was stored");
}

/// A subscriber on C receives what A and B append, in position order; a
/// subscriber that moves from node to node with `Last-Event-ID` while
/// appends continue sees every position exactly once.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn sse_follows_the_cluster_and_resumes_on_any_node() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("cluster-sse");
    let nats = NatsCluster::start(dir.path());
    let a = node(dir.path(), "a", &nats.urls(), &[]);
    let b = node(dir.path(), "b", &nats.urls(), &[]);
    let c = node(dir.path(), "c", &nats.urls(), &[]);
    for s in [&a, &b, &c] {
        wait_ready(s, Duration::from_secs(30));
    }
    let mut on_c = SseClient::open(c.addr, "/events/subscribe", &[]);
    assert_eq!(on_c.status, 200);
    for n in 0..20 {
        let s = if n % 2 == 0 { &a } else { &b };
        assert_eq!(
            post(s, "/events", json!({"type":"t","id":format!("e{n}")})).status,
            200
        );
    }
    let got = on_c.until_id(20);
    let ids: Vec<u64> = got
        .iter()
        .filter_map(|m| m.id.as_deref()?.parse().ok())
        .collect();
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());

    // A Last-Event-ID this node has not reached (from a node further
    // along): no reset, it waits, and goes on after that position.
    converge(&[&c], 20, Duration::from_secs(10));
    let mut ahead = SseClient::open(c.addr, "/events/subscribe", &[("Last-Event-ID", "25")]);
    assert_eq!(ahead.status, 200);
    for n in 20..30 {
        assert_eq!(
            post(&a, "/events", json!({"type":"t","id":format!("e{n}")})).status,
            200
        );
    }
    let got = ahead.until_id(30);
    assert!(
        got.iter().all(|m| m.event.as_deref() != Some("reset")),
        "{got:?}"
    );
    let ids: Vec<u64> = got
        .iter()
        .filter_map(|m| m.id.as_deref()?.parse().ok())
        .collect();
    assert_eq!(ids, (26..=30).collect::<Vec<_>>());
    assert_eq!(c.get("/health").status, 200, "the node is still up");

    // The mover: 1.5 s on each node in turn, resuming by Last-Event-ID.
    let stop = Arc::new(AtomicBool::new(false));
    let appenders = load(vec![a.addr, b.addr, c.addr], 2, stop.clone());
    let mut seen: Vec<u64> = Vec::new();
    let mut last = 30u64;
    for (hop, s) in [&a, &b, &c, &a, &c].iter().enumerate() {
        let id = last.to_string();
        let mut sub = SseClient::open(s.addr, "/events/subscribe", &[("Last-Event-ID", &id)]);
        assert_eq!(sub.status, 200, "hop {hop}");
        let got = positions_until(&mut sub, Instant::now() + Duration::from_millis(1500), hop);
        if let Some(p) = got.last() {
            last = *p;
        }
        seen.extend(got);
    }
    let acked = stop_load(&stop, appenders);
    assert!(
        acked.len() > 20,
        "the appenders got through: {}",
        acked.len()
    );
    assert!(!seen.is_empty());
    assert_eq!(
        seen,
        (31..=last).collect::<Vec<_>>(),
        "every position once, in order, across five nodes hops"
    );
}

/// `kill -9` of one NATS server under load: appends continue (clients of
/// the lost server reconnect, JetStream elects leaders), and every
/// acknowledged event ends up on every node.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn a_nats_server_killed_under_load_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("cluster-kill-nats");
    let mut nats = NatsCluster::start(dir.path());
    let a = node(dir.path(), "a", &nats.urls(), &[]);
    let b = node(dir.path(), "b", &nats.urls(), &[]);
    let c = node(dir.path(), "c", &nats.urls(), &[]);
    for s in [&a, &b, &c] {
        wait_ready(s, Duration::from_secs(30));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let appenders = load(vec![a.addr, b.addr, c.addr], 3, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    nats.servers[0].kill9();
    let killed_at = Instant::now();
    // Appends go on after the election.
    let before = events(&b).len();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if events(&b).len() > before + 100 {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "appends did not resume after a NATS server was killed"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let acked = stop_load(&stop, appenders);
    let n = events(&a).len().max(events(&b).len()).max(events(&c).len());
    let stored = converge(&[&a, &b, &c], n, Duration::from_secs(30));
    holds_all(&stored, &acked);
}

/// Two of three NATS servers down: appends get 503 + Retry-After within
/// `cluster.publish_timeout`, reads and SSE keep working, readiness says
/// why; back up, appends resume by themselves and nothing is lost.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn without_quorum_appends_get_503_and_resume_after() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("cluster-quorum");
    let mut nats = NatsCluster::start(dir.path());
    let fast = [
        ("SHARDCAST_CLUSTER_PUBLISH_TIMEOUT", "1s"),
        ("SHARDCAST_SSE_HEARTBEAT_INTERVAL", "1s"),
    ];
    let a = node(dir.path(), "a", &nats.urls(), &fast);
    let b = node(dir.path(), "b", &nats.urls(), &fast);
    for s in [&a, &b] {
        wait_ready(s, Duration::from_secs(30));
    }
    // (Publish timeout 1 s on a busy 2-core box: an append may be refused
    // before the stream settles; a retry with its id is the client's answer.)
    for n in 0..10 {
        until_taken(&a, &format!("k{n}"));
    }
    converge(&[&a, &b], 10, Duration::from_secs(10));
    let mut sub = SseClient::open(b.addr, "/events/subscribe", &[("Last-Event-ID", "5")]);
    assert_eq!(sub.status, 200);
    assert_eq!(sub.until_id(10).len(), 5);

    nats.servers[1].kill9();
    nats.servers[2].kill9();
    let t0 = Instant::now();
    let r = post(&a, "/events", json!({"type":"t","id":"no-quorum"}));
    let took = t0.elapsed();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.error_code(), "log_unavailable");
    assert!(took < Duration::from_millis(2500), "answered in {took:?}");
    // Reads, catch-up and the live stream keep serving what the replica holds.
    assert_eq!(events(&b).len(), 10);
    let mut late = SseClient::open(b.addr, "/events/subscribe", &[("Last-Event-ID", "0")]);
    assert_eq!(late.until_id(10).len(), 10);
    // Readiness says so: A from its refused append, B from its probe of
    // the stream (no leader, or too few replicas current).
    let ready = a.get("/health?mode=readiness");
    assert_eq!(ready.status, 503, "{}", ready.text());
    let probe = Instant::now();
    loop {
        let r = b.get("/health?mode=readiness");
        if r.status == 503 {
            assert!(
                r.text().contains("JetStream") || r.text().contains("NATS"),
                "{}",
                r.text()
            );
            break;
        }
        assert!(
            probe.elapsed() < Duration::from_secs(15),
            "B still ready: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The subscriber is still connected: heartbeats (comment lines) keep coming.
    use std::io::Read;
    sub.stream
        .set_read_timeout(Some(Duration::from_millis(3000)))
        .unwrap();
    let mut raw = [0u8; 256];
    let n = sub.stream.read(&mut raw).expect("a heartbeat within 3 s");
    assert!(
        raw[..n].starts_with(b":"),
        "{:?}",
        String::from_utf8_lossy(&raw[..n])
    );

    nats.servers[1].spawn();
    nats.servers[2].spawn();
    // Each node resumes by itself (its connection, its consumer): the same
    // append retried until taken, then more.
    until_taken(&a, "after");
    for n in 0..5 {
        until_taken(&b, &format!("m{n}"));
    }
    // The refused append may have been taken late by JetStream (a 503 says
    // "not known to be stored"): 16 events, or 17 with it once.
    std::thread::sleep(Duration::from_secs(1));
    let n = events(&a).len().max(events(&b).len());
    assert!(n == 16 || n == 17, "{n} events");
    let stored = converge(&[&a, &b], n, Duration::from_secs(20));
    assert_eq!(
        stored.iter().filter(|(_, id)| id == "no-quorum").count(),
        n - 16
    );
    let acked: Vec<String> = (0..10)
        .map(|n| format!("k{n}"))
        .chain(["after".to_string()])
        .chain((0..5).map(|n| format!("m{n}")))
        .collect();
    holds_all(&stored, &acked);
    wait_ready(&b, Duration::from_secs(20));
}

/// `kill -9` of a node under load: its subscriber resumes on another node
/// with no gap; the node restarts and catches up (each message applied
/// once); a fourth node with an empty data directory joins and converges.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn a_killed_node_catches_up_and_a_new_node_joins() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("cluster-kill-node");
    let nats = NatsCluster::start(dir.path());
    let a = node(dir.path(), "a", &nats.urls(), &[]);
    let b = node(dir.path(), "b", &nats.urls(), &[]);
    let mut c = node(dir.path(), "c", &nats.urls(), &[]);
    for s in [&a, &b, &c] {
        wait_ready(s, Duration::from_secs(30));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let appenders = load(vec![a.addr, b.addr], 2, stop.clone());
    let mut sub = SseClient::open(c.addr, "/events/subscribe", &[("Last-Event-ID", "0")]);
    let mut seen = positions_until(&mut sub, Instant::now() + Duration::from_secs(2), 0);
    c.kill9();
    // The stream ends with the node; the client resumes on A.
    seen.extend(positions_until(
        &mut sub,
        Instant::now() + Duration::from_secs(1),
        0,
    ));
    let last = *seen.last().expect("events before the kill");
    let mut moved = SseClient::open(
        a.addr,
        "/events/subscribe",
        &[("Last-Event-ID", &last.to_string())],
    );
    seen.extend(positions_until(
        &mut moved,
        Instant::now() + Duration::from_secs(2),
        1,
    ));
    assert_eq!(
        seen,
        (1..=*seen.last().unwrap()).collect::<Vec<_>>(),
        "no gap, no repeat"
    );

    c.restart();
    std::thread::sleep(Duration::from_secs(2));
    let acked = stop_load(&stop, appenders);
    let n = events(&a).len().max(events(&b).len());
    let stored = converge(&[&a, &b, &c], n, Duration::from_secs(30));
    holds_all(&stored, &acked);
    assert!(c.stderr().contains("following the JetStream stream"));

    let d = node(dir.path(), "d", &nats.urls(), &[]);
    wait_ready(&d, Duration::from_secs(30));
    converge(&[&a, &d], n, Duration::from_secs(30));
    // And D takes appends like the others.
    assert_eq!(
        post(&d, "/events", json!({"type":"t","id":"from-d"})).status,
        200
    );
    converge(&[&a, &b, &c, &d], n + 1, Duration::from_secs(20));
}

/// Settings a node refuses before it starts: retention (replicas would
/// prune differently), a bad URL, a bad stream prefix.
#[test]
fn cluster_settings_are_checked_at_start() {
    let dir = TempDir::new("cluster-config");
    for (env, needle) in [
        (
            vec![
                ("SHARDCAST_CLUSTER_NATS_URLS", "nats://127.0.0.1:4222"),
                ("SHARDCAST_STORAGE_RETAIN_EVENTS", "1000"),
            ],
            "retention is not available in cluster mode",
        ),
        (
            vec![("SHARDCAST_CLUSTER_NATS_URLS", "nats://127.0.0.1:notaport")],
            "is not a NATS server address",
        ),
        (
            vec![
                ("SHARDCAST_CLUSTER_NATS_URLS", "nats://127.0.0.1:4222"),
                ("SHARDCAST_CLUSTER_STREAM_PREFIX", "a.b"),
            ],
            "cluster.stream_prefix",
        ),
    ] {
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let out = Server::command(dir.path(), &env).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
}

/// A log without its colours (ANSI escapes).
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `shardcast` run as a command on node `name`'s data, in cluster mode.
fn cli(dir: &Path, name: &str, urls: &str, args: &[&str]) -> (Option<i32>, String) {
    cli_with(dir, name, urls, args, &[])
}

/// `cli` with more environment.
fn cli_with(
    dir: &Path,
    name: &str,
    urls: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DB_PATH", dir.join(name).join("events.db"))
        .env("SHARDCAST_CLUSTER_NATS_URLS", urls)
        .envs(env.iter().copied())
        .output()
        .expect("run shardcast");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `shardcast backup` of a node records the sequence it applied; a new node
/// started from the copy resumes after it (what it applies after the copy
/// is only what came later: every event once). `shardcast check` compares
/// a replica with its stream, and refuses one that cannot follow it.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn a_node_joins_from_a_backup_and_check_compares_with_the_stream() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("cluster-backup");
    let nats = NatsCluster::start(dir.path());
    let urls = nats.urls();
    let a = node(dir.path(), "a", &urls, &[]);
    wait_ready(&a, Duration::from_secs(30));
    for n in 0..20 {
        assert_eq!(
            post(&a, "/events", json!({"type":"t","id":format!("b{n}")})).status,
            200
        );
    }
    // A consumer position travels through the log too.
    let r = post(
        &a,
        "/subscriptions/billing/position",
        json!({"position": 7}),
    );
    assert!(r.status == 200 || r.status == 204, "{}", r.text());

    let (code, said) = cli(dir.path(), "a", &urls, &["check"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("applied 21 of stream shardcast_default")
            && said.contains("can follow, 0 behind"),
        "{said}"
    );

    std::fs::create_dir_all(dir.path().join("e")).unwrap();
    let copy = dir.path().join("e").join("events.db");
    let (code, said) = cli(
        dir.path(),
        "a",
        &urls,
        &["backup", "--out", copy.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("up to sequence 21"), "{said}");

    // More happens after the copy; the new node gets it from the stream.
    for n in 20..30 {
        assert_eq!(
            post(&a, "/events", json!({"type":"t","id":format!("b{n}")})).status,
            200
        );
    }
    let e = node(dir.path(), "e", &urls, &[]);
    wait_ready(&e, Duration::from_secs(30));
    let log = plain(&e.stderr());
    assert!(log.contains("from=22"), "{log}");
    converge(&[&a, &e], 30, Duration::from_secs(20));
    let pos = e.get("/subscriptions/billing/position");
    assert_eq!(pos.status, 200, "{}", pos.text());
    assert_eq!(pos.json()["position"], 7);

    // A replica ahead of its stream (here: one that replicated another
    // stream prefix's history) cannot follow it: check says so, exit 4.
    let (code, said) = cli_with(
        dir.path(),
        "a",
        &urls,
        &["check"],
        &[("SHARDCAST_CLUSTER_STREAM_PREFIX", "other")],
    );
    assert_eq!(code, Some(4), "{said}");
    assert!(said.contains("not other_default"), "{said}");

    // A node configured for another replica count than the stream has is
    // refused the stream (it is checked, never changed): readiness says why.
    let w = node(
        dir.path(),
        "w",
        &urls,
        &[("SHARDCAST_CLUSTER_REPLICAS", "1")],
    );
    let start = Instant::now();
    loop {
        let r = w.get("/health?mode=readiness");
        if r.status == 503 && r.text().contains("has 3 replicas, cluster.replicas says 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{} {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // `shardcast import` would write one node's files behind the log's back.
    let (code, said) = cli(
        dir.path(),
        "a",
        &urls,
        &["import", "--from-ebuse-sqlite", "/nonexistent.db"],
    );
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("cluster mode is on"), "{said}");

    // A single-node database cannot become a replica: refused at start.
    let solo = TempDir::new("cluster-solo");
    let mut s = Server::start(solo.path(), &[]);
    assert_eq!(post(&s, "/events", json!({"type":"t"})).status, 200);
    s.terminate(Duration::from_secs(10));
    let env = vec![("SHARDCAST_CLUSTER_NATS_URLS".to_string(), urls.clone())];
    let out = Server::command(solo.path(), &env).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("single-node database cannot become a replica"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shipped three-server NATS configuration is one nats-server accepts.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn the_shipped_nats_configuration_is_valid() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tuning/cluster/nats-server.conf");
    let out = Command::new(NATS_BIN)
        .args(["-t", "-c", conf.to_str().unwrap()])
        .env("NATS_NAME", "n1")
        .output()
        .expect("run nats-server");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Multi-tenant mode: one JetStream stream per tenant. Two nodes with the
/// same tenants file: each tenant's history is its own, the same on both
/// nodes, with its own positions from 1.
#[test]
#[cfg_attr(not(tool_nats), ignore = "needs nats-server")]
fn each_tenant_is_its_own_stream() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new("cluster-tenants");
    let nats = NatsCluster::start(dir.path());
    let urls = nats.urls();
    let start = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let yaml = format!(
            "data_dir: \"{}\"\ntenants:\n  - name: shop\n    api_key: shop-key-0123456789\n  - name: blog\n    api_key: blog-key-0123456789\n",
            d.join("tenants").display()
        );
        std::fs::write(d.join("tenants.yaml"), yaml).unwrap();
        let f = d.join("tenants.yaml").display().to_string();
        node(
            dir.path(),
            name,
            &urls,
            &[("SHARDCAST_AUTH_TENANTS_FILE", &f)],
        )
    };
    let a = start("a");
    let b = start("b");
    for s in [&a, &b] {
        wait_ready(s, Duration::from_secs(30));
    }
    let append = |s: &Server, key: &str, id: &str| {
        let r = s.conn().request(
            "POST",
            "/events",
            &[("Content-Type", "application/json"), ("X-API-Key", key)],
            json!({"type":"t","id":id}).to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["position"].as_u64().unwrap()
    };
    assert_eq!(append(&a, "shop-key-0123456789", "s1"), 1);
    assert_eq!(append(&b, "blog-key-0123456789", "b1"), 1);
    assert_eq!(append(&b, "shop-key-0123456789", "s2"), 2);
    for s in [&a, &b] {
        let start = Instant::now();
        loop {
            let shop = s.get_with_key("/events?from=1", "shop-key-0123456789");
            let blog = s.get_with_key("/events?from=1", "blog-key-0123456789");
            let ids = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["id"].as_str().unwrap().to_string())
                    .collect()
            };
            if ids(&shop) == ["s1", "s2"] && ids(&blog) == ["b1"] {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "shop {shop}, blog {blog}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let log = plain(&a.stderr());
    assert!(
        log.contains("stream=shardcast_shop") && log.contains("stream=shardcast_blog"),
        "{log}"
    );
}
