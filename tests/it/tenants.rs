//! Tenants and key roles: ebuse's tenants.yaml, isolation on every endpoint,
//! roles on every endpoint, reload on SIGHUP, and one tenant's storage
//! failing while the others keep working.

use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const ALICE: &str = "alice-secret-key-123";
const BOB: &str = "bob-secret-key-456";
const CAROL: &str = "carol-secret-key-789";
const DAVE: &str = "dave-secret-key-000";
const ADMIN: &str = "the-admin-key-0123456789";

fn write_tenants(dir: &Path, body: &str) -> String {
    let f = dir.join("tenants.yaml");
    std::fs::write(&f, body).unwrap();
    f.display().to_string()
}

fn start_multi(dir: &Path, yaml: &str, extra: &[(&str, &str)]) -> Server {
    let f = write_tenants(dir, yaml);
    let mut env = vec![("SHARDCAST_AUTH_TENANTS_FILE", f.as_str())];
    env.extend_from_slice(extra);
    Server::start(dir, &env)
}

fn req(s: &Server, method: &str, path: &str, key: &str, body: &str) -> Response {
    let mut headers = vec![("Content-Type", "application/json")];
    if !key.is_empty() {
        headers.push(("X-API-Key", key));
    }
    s.conn().request(method, path, &headers, body.as_bytes())
}

fn get(s: &Server, path: &str, key: &str) -> Response {
    req(s, "GET", path, key, "")
}

fn post(s: &Server, path: &str, key: &str, body: Value) -> Response {
    req(s, "POST", path, key, &body.to_string())
}

/// Rewrite the tenants file, send SIGHUP, and wait until `key` gets `status`
/// on `/position` (the reload has taken effect).
fn reload_until(s: &Server, dir: &Path, yaml: &str, key: &str, status: u16) {
    write_tenants(dir, yaml);
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(s.pid(), libc::SIGHUP) };
    let t0 = Instant::now();
    while get(s, "/position", key).status != status {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{key} never got {status} after a reload: {}",
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ebuse_yaml(dir: &Path, names: &[(&str, &str)]) -> String {
    let mut y = format!(
        "# ebuse's format\ndata_dir: \"{}\"\nadmin_api_key: \"{ADMIN}\"\ntenants:\n",
        dir.join("tenants").display()
    );
    for (name, key) in names {
        y.push_str(&format!("  - name: \"{name}\"\n    api_key: \"{key}\"\n"));
    }
    y
}

/// Every endpoint with one tenant's key sees only that tenant: counts,
/// positions, streams, ids, consumers, replays, live events, and the
/// tenant list.
#[test]
fn tenants_are_isolated_on_every_endpoint() {
    let dir = TempDir::new("tenants-isolation");
    let s = start_multi(
        dir.path(),
        &ebuse_yaml(dir.path(), &[("alice", ALICE), ("bob", BOB)]),
        &[],
    );
    // Each tenant got its own database and index, created on first start.
    assert!(dir.path().join("tenants/alice.db").exists());
    assert!(dir.path().join("tenants/bob.index").is_dir());

    let mut bob_live = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", BOB)]);
    assert_eq!(bob_live.status, 200);

    let evs: Vec<Value> = (0..20)
        .map(|i| json!({"type":"order.placed","id":format!("a-{i}"),"stream":"orders","data":{"i":i}}))
        .collect();
    assert_eq!(
        post(&s, "/events/batch", ALICE, Value::Array(evs)).status,
        200
    );
    assert_eq!(
        post(
            &s,
            "/subscriptions/worker/position",
            ALICE,
            json!({"position": 15})
        )
        .status,
        204
    );

    // Bob sees none of it.
    assert_eq!(get(&s, "/position", BOB).json(), json!({"position": 0}));
    assert_eq!(get(&s, "/events?from=1", BOB).json(), json!([]));
    assert_eq!(
        get(&s, "/events?from=1&type=order.placed", BOB).json(),
        json!([])
    );
    assert_eq!(get(&s, "/streams/orders", BOB).json(), json!([]));
    assert_eq!(
        get(&s, "/subscriptions/worker/position", BOB).json(),
        json!({"position": 0})
    );
    assert_eq!(replay_body(&s, "/events/stream?from=1", BOB), "[]");
    assert!(replay_body(&s, "/events/stream?from=1", ALICE).contains("\"id\":\"a-19\""));
    // Bob's consumer of the same name is his own: setting it leaves Alice's.
    let r = post(
        &s,
        "/subscriptions/worker/position",
        BOB,
        json!({"position": 7}),
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        get(&s, "/subscriptions/worker/position", BOB).json(),
        json!({"position": 7})
    );
    assert_eq!(
        get(&s, "/subscriptions/worker/position", ALICE).json(),
        json!({"position": 15})
    );
    // Alice's ids are not Bob's: the same id is a new event for Bob, at his position 1.
    let r = post(
        &s,
        "/events",
        BOB,
        json!({"type":"x","id":"a-3","stream":"orders"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json();
    assert_eq!(e["position"], 1);
    assert_eq!(e["stream_version"], 1);
    assert!(e.get("duplicate").is_none());
    // Bob's live stream carries only Bob's event, though Alice's came first.
    let m = bob_live.next().unwrap();
    assert_eq!(m.id.as_deref(), Some("1"));
    let data: Value = serde_json::from_str(&m.data).unwrap();
    assert_eq!(data["id"], "a-3");
    // And a catch-up from 1 for Bob holds one event; Alice's holds her 20.
    let mut c = SseClient::open(s.addr, "/events/subscribe?from=1", &[("X-API-Key", BOB)]);
    assert_eq!(c.next().unwrap().id.as_deref(), Some("1"));
    let mut c = SseClient::open(
        s.addr,
        &format!("/events/subscribe?from=1&api_key={ALICE}"),
        &[],
    );
    assert_eq!(c.until_id(20).len(), 20);
    // Alice still sees exactly her own.
    assert_eq!(get(&s, "/position", ALICE).json(), json!({"position": 20}));
    assert_eq!(
        get(&s, "/subscriptions/worker/position", ALICE).json(),
        json!({"position": 15})
    );
    assert_eq!(
        get(&s, "/streams/orders?from_version=20", ALICE).json()[0]["id"],
        "a-19"
    );

    // The tenant list: the admin key only; a tenant's key learns nothing.
    let r = get(&s, "/tenants", ALICE);
    assert_eq!((r.status, r.error_code().as_str()), (403, "forbidden"));
    assert!(!r.text().contains("bob"));
    assert_eq!(get(&s, "/tenants", "").status, 401);
    assert_eq!(get(&s, "/tenants", "not-a-key-at-all").status, 401);
    assert_eq!(
        get(&s, "/tenants", ADMIN).json(),
        json!({"tenants": ["alice", "bob"], "count": 2})
    );
    // The admin key holds no tenant's events.
    let r = get(&s, "/position", ADMIN);
    assert_eq!((r.status, r.error_code().as_str()), (403, "forbidden"));
    // No key, or a wrong one: 401 everywhere but /health.
    assert_eq!(get(&s, "/position", "").status, 401);
    assert_eq!(get(&s, "/events?from=1", "alice-secret-key-12").status, 401);
    assert_eq!(get(&s, "/health", "").status, 200);
}

/// Each role is checked on every endpoint: read (GET and subscribe), write
/// (appends and consumer positions), admin (everything on the tenant).
#[test]
fn roles_on_every_endpoint() {
    let dir = TempDir::new("tenants-roles");
    let yaml = format!(
        "data_dir: \"{}\"\ntenants:\n  - name: shop\n    api_key_sha256: \"{}\"\n    keys:\n      - {{key: shop-reader-key-01, role: read}}\n      - {{key: shop-writer-key-01, role: write}}\n      - {{key: shop-worker-key-01, role: read_write}}\n",
        dir.path().join("t").display(),
        // sha256("shop-admin-key-01")
        sha256_hex("shop-admin-key-01")
    );
    let s = start_multi(dir.path(), &yaml, &[]);
    let reads = [
        "/position",
        "/events?from=1",
        "/events/stream?from=1",
        "/streams/s1",
        "/subscriptions/c/position",
    ];
    let one = || json!({"type":"t","stream":"s1"});
    type Check<'a> = (&'a str, bool, bool); // key, may read, may write
    let checks: [Check; 4] = [
        ("shop-admin-key-01", true, true),
        ("shop-reader-key-01", true, false),
        ("shop-writer-key-01", false, true),
        ("shop-worker-key-01", true, true),
    ];
    for (key, may_read, may_write) in checks {
        for path in reads {
            let r = get(&s, path, key);
            let want = if may_read { 200 } else { 403 };
            assert_eq!(r.status, want, "{key} GET {path}: {}", r.text());
            if !may_read {
                assert_eq!(r.error_code(), "forbidden");
            }
        }
        let sub = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", key)]);
        assert_eq!(
            sub.status,
            if may_read { 200 } else { 403 },
            "{key} subscribe"
        );
        let want = if may_write { 200 } else { 403 };
        assert_eq!(
            post(&s, "/events", key, one()).status,
            want,
            "{key} POST /events"
        );
        assert_eq!(
            post(&s, "/events/batch", key, json!([one()])).status,
            want,
            "{key} batch"
        );
        let want = if may_write { 204 } else { 403 };
        let r = req(
            &s,
            "PUT",
            "/subscriptions/c/position",
            key,
            r#"{"position":1}"#,
        );
        assert_eq!(r.status, want, "{key} PUT position");
        assert_eq!(get(&s, "/tenants", key).status, 403, "{key} /tenants");
    }
    // Nothing a refused key sent was stored: 3 allowed writers × 2 events.
    assert_eq!(
        get(&s, "/position", "shop-admin-key-01").json(),
        json!({"position": 6})
    );
}

/// Single-tenant mode: `API_KEY` may do everything; `read_api_keys` only read.
#[test]
fn single_tenant_read_only_keys() {
    let dir = TempDir::new("tenants-single-roles");
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", "main-key-0123456789"),
            (
                "SHARDCAST_AUTH_READ_API_KEYS",
                "page-key-0123456789,other-page-key-01",
            ),
        ],
    );
    let ev = || json!({"type":"t"});
    assert_eq!(post(&s, "/events", "main-key-0123456789", ev()).status, 200);
    let r = post(&s, "/events", "page-key-0123456789", ev());
    assert_eq!((r.status, r.error_code().as_str()), (403, "forbidden"));
    assert!(r.text().contains("read"), "{}", r.text());
    assert_eq!(
        req(
            &s,
            "POST",
            "/subscriptions/x/position",
            "other-page-key-01",
            r#"{"position":1}"#
        )
        .status,
        403
    );
    assert_eq!(
        get(&s, "/events?from=1", "other-page-key-01").json()[0]["position"],
        1
    );
    let mut sub = SseClient::open(
        s.addr,
        "/events/subscribe?from=1&api_key=page-key-0123456789",
        &[],
    );
    assert_eq!(sub.status, 200);
    assert_eq!(sub.next().unwrap().id.as_deref(), Some("1"));
    // /tenants does not exist in single-tenant mode.
    assert_eq!(get(&s, "/tenants", "main-key-0123456789").status, 404);
    assert_eq!(get(&s, "/position", "nope-nope-nope").status, 401);
}

/// SIGHUP: a tenant added and one removed while a third's subscribers stay
/// connected and keep receiving; the removed tenant's subscribers are closed
/// and its key stops working; its data stays on disk.
#[test]
fn reload_adds_and_removes_tenants_without_touching_the_others() {
    let dir = TempDir::new("tenants-reload");
    let s = start_multi(
        dir.path(),
        &ebuse_yaml(
            dir.path(),
            &[("alice", ALICE), ("bob", BOB), ("carol", CAROL)],
        ),
        &[],
    );
    assert_eq!(post(&s, "/events", CAROL, json!({"type":"c"})).status, 200);
    assert_eq!(post(&s, "/events", BOB, json!({"type":"b"})).status, 200);
    let mut carol = SseClient::open(s.addr, "/events/subscribe?from=1", &[("X-API-Key", CAROL)]);
    assert_eq!(carol.next().unwrap().id.as_deref(), Some("1"));
    let mut bob = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", BOB)]);
    assert_eq!(bob.status, 200);
    assert_eq!(get(&s, "/position", DAVE).status, 401);

    let with = ebuse_yaml(
        dir.path(),
        &[
            ("alice", ALICE),
            ("carol", CAROL),
            ("dave", DAVE),
            ("bob", BOB),
        ],
    );
    let without = ebuse_yaml(
        dir.path(),
        &[("alice", ALICE), ("carol", CAROL), ("dave", DAVE)],
    );
    reload_until(&s, dir.path(), &without, DAVE, 200);
    assert_eq!(get(&s, "/position", BOB).status, 401);
    // Bob's open subscription was closed by the server.
    bob.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(
        bob.next().is_none(),
        "a removed tenant's subscriber is closed"
    );
    // Carol's subscriber never noticed, and gets what comes next.
    assert_eq!(post(&s, "/events", CAROL, json!({"type":"c2"})).status, 200);
    let m = carol.next().unwrap();
    assert_eq!(
        (m.id.as_deref(), m.event.as_deref()),
        (Some("2"), Some("c2"))
    );
    // Dave starts empty and works; the list shows the new set.
    assert_eq!(
        post(&s, "/events", DAVE, json!({"type":"d"})).json()["position"],
        1
    );
    assert_eq!(
        get(&s, "/tenants", ADMIN).json(),
        json!({"tenants": ["alice", "carol", "dave"], "count": 3})
    );
    // Bob's data is still on disk: adding him back finds his event.
    assert!(dir.path().join("tenants/bob.db").exists());
    reload_until(&s, dir.path(), &with, BOB, 200);
    assert_eq!(get(&s, "/position", BOB).json(), json!({"position": 1}));
    // Removed and added straight back (two reloads back to back): bob's
    // storage reopens once the shards let go of it, and nothing is rebuilt.
    reload_until(&s, dir.path(), &without, BOB, 401);
    reload_until(&s, dir.path(), &with, BOB, 200);
    assert_eq!(get(&s, "/position", BOB).json(), json!({"position": 1}));
    assert!(!s.stderr().contains("index unreadable"), "{}", s.stderr());
    // A tenants file that does not load changes nothing.
    write_tenants(dir.path(), "tenants: [");
    // SAFETY: as above.
    unsafe { libc::kill(s.pid(), libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(get(&s, "/position", ALICE).status, 200);
    assert!(s.stderr().contains("reload refused"), "{}", s.stderr());
}

/// One tenant's database full (its size cap) or unopenable: its requests get
/// 507 / 503 with a clear error and nothing half-written, while another
/// tenant keeps ingesting.
#[test]
fn one_tenants_storage_failing_leaves_the_others_working() {
    let dir = TempDir::new("tenants-failure");
    let data = dir.path().join("tenants");
    std::fs::create_dir_all(&data).unwrap();
    // Carol's database is not a database.
    std::fs::write(data.join("carol.db"), vec![0x5a; 8192]).unwrap();
    let yaml = format!(
        "data_dir: \"{}\"\ntenants:\n  - name: alice\n    api_key: {ALICE}\n    max_database_bytes: 131072\n  - name: bob\n    api_key: {BOB}\n  - name: carol\n    api_key: {CAROL}\n",
        data.display()
    );
    let s = start_multi(dir.path(), &yaml, &[]);

    let r = get(&s, "/position", CAROL);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "tenant_unavailable")
    );
    assert!(r.header("Retry-After").is_some());

    let batch = |tag: &str, n: usize| {
        Value::Array(
            (0..n)
                .map(|i| json!({"type":"fill","id":format!("{tag}-{i}"),"data":{"pad":"x".repeat(400)}}))
                .collect(),
        )
    };
    let mut acked = 0u64;
    let mut full = None;
    for b in 0..200 {
        let r = post(&s, "/events/batch", ALICE, batch(&format!("a{b}"), 20));
        match r.status {
            200 => acked = r.json()["last_position"].as_u64().unwrap(),
            _ => {
                full = Some(r);
                break;
            }
        }
        // Bob ingests throughout.
        assert_eq!(post(&s, "/events", BOB, json!({"type":"b"})).status, 200);
    }
    let full = full.expect("alice's cap was never reached");
    assert_eq!(
        (full.status, full.error_code().as_str()),
        (507, "insufficient_storage"),
        "{}",
        full.text()
    );
    assert!(acked > 0);
    // Nothing of the refused batch was written, and the head is what was acknowledged.
    assert_eq!(get(&s, "/position", ALICE).json()["position"], acked);
    let stored = stored_ids(&data.join("alice.db"));
    assert_eq!(stored.len() as u64, acked);
    // Bob keeps going, and reads still work for Alice.
    for _ in 0..20 {
        assert_eq!(post(&s, "/events", BOB, json!({"type":"b"})).status, 200);
    }
    assert_eq!(
        get(&s, &format!("/events?from={acked}"), ALICE).json()[0]["position"],
        acked
    );
    // Still full on the next try, with the same clear answer.
    assert_eq!(
        post(
            &s,
            "/events",
            ALICE,
            json!({"type":"more","data":{"pad":"y".repeat(4000)}})
        )
        .status,
        507
    );
    assert_eq!(post(&s, "/events", BOB, json!({"type":"b"})).status, 200);
}

/// A chunked replay, read to the end and de-chunked.
fn replay_body(s: &Server, path: &str, key: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, mut rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = String::new();
    loop {
        let (len, after) = rest.split_once("\r\n").unwrap();
        let len = usize::from_str_radix(len.trim(), 16).unwrap();
        if len == 0 {
            break;
        }
        body.push_str(&after[..len]);
        rest = &after[len + 2..];
    }
    body
}

fn sha256_hex(s: &str) -> String {
    // The test computes the digest the way an operator would: `sha256sum`.
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Durability holds per tenant: writers on three tenants at once, `kill -9`
/// mid-flight; every acknowledged event is in its own tenant's database at
/// the position it was acknowledged with, positions contiguous per tenant,
/// and after a restart each tenant continues after its own head.
#[test]
fn acknowledged_events_of_every_tenant_survive_kill_9() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = TempDir::new("tenants-kill9");
    let tenants = [("alice", ALICE), ("bob", BOB), ("carol", CAROL)];
    let mut s = start_multi(dir.path(), &ebuse_yaml(dir.path(), &tenants), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let addr = s.addr;
    let workers: Vec<_> = tenants
        .iter()
        .enumerate()
        .map(|(t, (_, key))| {
            let (stop, key) = (stop.clone(), key.to_string());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut c = Conn::open(addr);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("t{t}-{n}");
                    n += 1;
                    let body = json!({"type":"k","id":id}).to_string();
                    // The server dies mid-request: a failed send or read ends the worker.
                    let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        c.send_raw(&build_request(
                            "POST",
                            "/events",
                            &[("Content-Type", "application/json"), ("X-API-Key", &key)],
                            body.as_bytes(),
                        ));
                        c.read_response()
                    }));
                    match answered {
                        Ok(Some(r)) if r.status == 200 => {
                            acked.push((id, r.json()["position"].as_u64().unwrap()))
                        }
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1200));
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<Vec<(String, u64)>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    for (t, (name, _)) in tenants.iter().enumerate() {
        assert!(
            acked[t].len() > 20,
            "{name} made progress: {}",
            acked[t].len()
        );
        let stored = stored_ids(&dir.path().join(format!("tenants/{name}.db")));
        for (i, (pos, _)) in stored.iter().enumerate() {
            assert_eq!(*pos, i as u64 + 1, "{name}: contiguous positions");
        }
        let by_id: std::collections::HashMap<&str, u64> =
            stored.iter().map(|(p, id)| (id.as_str(), *p)).collect();
        for (id, pos) in &acked[t] {
            assert_eq!(
                by_id.get(id.as_str()),
                Some(pos),
                "{name}: {id} survives at {pos}"
            );
        }
        // No tenant holds another's events.
        assert!(stored
            .iter()
            .all(|(_, id)| id.starts_with(&format!("t{t}-"))));
    }
    s.restart();
    for (t, (name, key)) in tenants.iter().enumerate() {
        let head = stored_ids(&dir.path().join(format!("tenants/{name}.db"))).len() as u64;
        assert_eq!(get(&s, "/position", key).json()["position"], head, "{name}");
        let (id, pos) = &acked[t][acked[t].len() / 2];
        let r = post(&s, "/events", key, json!({"type":"retry","id":id}));
        assert_eq!(
            (r.json()["duplicate"].clone(), r.json()["position"].as_u64()),
            (json!(true), Some(*pos))
        );
        assert_eq!(
            post(&s, "/events", key, json!({"type":"after"})).json()["position"],
            head + 1
        );
    }
}
