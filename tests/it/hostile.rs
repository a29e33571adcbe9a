//! What an attacker (or a broken client, or a broken log pipe) found: one
//! regression test per finding of the attack report in issue 11. Each sends
//! exactly the input that once crashed, confused or leaked, to a started
//! server over a real socket, and checks the server is still up and right.

use crate::common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The server still answers a fresh connection (the process did not abort).
fn alive(s: &Server) {
    let r = s.get("/health");
    assert_eq!(r.status, 200, "{}", s.stderr());
}

fn read_answers(c: &mut Conn, n: usize) -> Vec<Response> {
    (0..n)
        .map(|i| {
            c.read_response()
                .unwrap_or_else(|| panic!("connection closed before answer {i}"))
        })
        .collect()
}

/// 1. Pipelined requests, the last one's body arriving in a later read: the
///    connection loop once kept an offset into its output buffer across the
///    flush that emptied it, and panicked (aborting every tenant).
#[test]
fn pipelined_requests_with_a_late_body_do_not_crash() {
    let dir = TempDir::new("late-body");
    let s = Server::start(dir.path(), &[]);

    // GET ×2, then a GET announcing a 1-byte body that comes 0.3 s later.
    let mut c = s.conn();
    let mut raw = build_request("GET", "/health", &[], b"");
    raw.extend(build_request("GET", "/health", &[], b""));
    raw.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n");
    c.send_raw(&raw);
    std::thread::sleep(Duration::from_millis(300));
    c.send_raw(b"x");
    for r in read_answers(&mut c, 3) {
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "healthy");
    }

    // Three GET /position and a 200 KB batch, in one write.
    let events: Vec<Value> = (0..1000)
        .map(|i| json!({"type":"bulk","id":format!("b-{i}"),"data":{"pad":"p".repeat(150)}}))
        .collect();
    let body = Value::Array(events).to_string();
    assert!(body.len() > 190_000, "{}", body.len());
    let mut c = s.conn();
    let mut raw = Vec::new();
    for _ in 0..3 {
        raw.extend(build_request("GET", "/position", &[], b""));
    }
    raw.extend(build_request(
        "POST",
        "/events/batch",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    ));
    c.send_raw(&raw);
    let answers = read_answers(&mut c, 4);
    for r in &answers[..3] {
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["position"], 0);
    }
    assert_eq!(answers[3].status, 200, "{}", answers[3].text());
    assert_eq!(answers[3].json()["saved"], 1000);

    // The same with CORS on: its lines once went in at a stale offset too.
    drop(s);
    let dir = TempDir::new("late-body-cors");
    let s = Server::start(
        dir.path(),
        &[("SHARDCAST_SERVER_CORS_ORIGINS", "https://app.example")],
    );
    let mut c = s.conn();
    let origin = [("Origin", "https://app.example")];
    let mut raw = build_request("GET", "/health", &origin, b"");
    raw.extend(build_request("GET", "/position", &origin, b""));
    raw.extend_from_slice(
        b"POST /events HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"type\":",
    );
    c.send_raw(&raw);
    std::thread::sleep(Duration::from_millis(300));
    c.send_raw(b"\"a\"}");
    let answers = read_answers(&mut c, 3);
    for r in &answers {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.example")
        );
    }
    assert_eq!(answers[2].json()["position"], 1);
    alive(&s);
}

fn wait_connectable(port: u16, child: &mut std::process::Child) {
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited at start: {status}");
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tenants file with one tenant (`tiny`, key `tiny-secret-key-0001`)
/// whose database fills at once: every commit after the first few fails.
fn tiny_tenant(dir: &Path) -> String {
    let yaml = format!(
        "data_dir: \"{}\"\ntenants:\n  - name: tiny\n    api_key: tiny-secret-key-0001\n    max_database_bytes: 65536\n",
        dir.join("tenants").display()
    );
    std::fs::create_dir_all(dir.join("tenants")).unwrap();
    std::fs::write(dir.join("t.yaml"), yaml).unwrap();
    dir.join("t.yaml").display().to_string()
}

/// 2. stderr on a full disk (/dev/full) and stdout a pipe whose reader has
///    gone: the start line, every log line (warnings at start, errors on
///    every commit of a full database) and the shutdown are written into the
///    void, and the server starts, serves and exits 0 on SIGTERM.
#[test]
fn a_full_or_closed_log_does_not_take_the_server_down() {
    let dir = TempDir::new("dead-logs");
    let tenants = tiny_tenant(dir.path());
    let port = fixed_port();
    let env: Vec<(String, String)> = vec![
        ("PORT".into(), port.to_string()),
        ("SHARDCAST_AUTH_TENANTS_FILE".into(), tenants),
        ("RUST_LOG".into(), "debug".into()),
    ];
    let mut cmd = Server::command(dir.path(), &env);
    let devfull = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(devfull).spawn().unwrap();
    // The reader of stdout goes away before the server says a word.
    drop(child.stdout.take());
    wait_connectable(port, &mut child);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Conn::open(addr);
    let mut full = 0;
    for i in 0..60 {
        let body = json!([{"type":"fill","id":format!("f-{i}"),"data":{"pad":"x".repeat(8000)}}]);
        let r = c.post_json("/events/batch", "tiny-secret-key-0001", &body);
        assert!(r.status == 200 || r.status == 507, "{}", r.status);
        if r.status == 507 {
            full += 1;
        }
    }
    assert!(full > 10, "the database never filled ({full} refusals)");
    assert_eq!(
        c.request("GET", "/health", &[], b"").status,
        200,
        "still serving"
    );
    let st = sigterm_exit(&mut child);
    assert_eq!(st.code(), Some(0), "{st:?}");
}

/// 2b. A failure that repeats on every commit is logged once, then at most
///     once per interval with a count (a full disk is not filled faster by
///     the server's own complaints).
#[test]
fn a_failing_commit_is_logged_once_not_per_commit() {
    let dir = TempDir::new("log-throttle");
    let f = tiny_tenant(dir.path());
    let s = Server::start(dir.path(), &[("SHARDCAST_AUTH_TENANTS_FILE", &f)]);
    let mut c = s.conn();
    let mut refused = 0;
    for i in 0..100 {
        let body = json!([{"type":"fill","id":format!("f-{i}"),"data":{"pad":"x".repeat(8000)}}]);
        if c.post_json("/events/batch", "tiny-secret-key-0001", &body)
            .status
            == 507
        {
            refused += 1;
        }
    }
    assert!(refused >= 50, "{refused}");
    let logged = s.stderr().matches("group commit failed").count();
    assert!(
        (1..=2).contains(&logged),
        "{refused} failed commits logged {logged} times:\n{}",
        s.stderr()
    );
}

/// 3. A raw CR in `data` (JSON whitespace) must not end an SSE line early:
///    EventSource ends lines at CR, LF and CRLF alike.
#[test]
fn raw_carriage_returns_in_data_reach_subscribers_whole() {
    let dir = TempDir::new("sse-cr");
    let s = Server::start(dir.path(), &[]);
    let mut sub = SseClient::open(s.addr, "/events/subscribe", &[]);
    assert_eq!(sub.status, 200);
    let bodies = [
        "{\"type\":\"cr\",\"data\":{\"a\":\r1}}",
        "{\"type\":\"cr\",\"data\":\r{\"a\":\r\n2\n}\r}",
        "{\"type\":\"cr\",\"data\":{\"a\":\r\r\r3}}",
    ];
    for b in bodies {
        let r = s.post("/events", b);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for want in 1..=3 {
        let m = sub.next().expect("a message");
        let v: Value = serde_json::from_str(&m.data)
            .unwrap_or_else(|e| panic!("event {want} arrives cut: {e}: {:?}", m.data));
        assert_eq!(v["data"]["a"], want);
        assert_eq!(v["position"], want);
    }
    // The same through catch-up from SQLite.
    let mut late = SseClient::open(s.addr, "/events/subscribe?from=1", &[]);
    for want in 1..=3 {
        let m = late.next().expect("a message");
        let v: Value = serde_json::from_str(&m.data).unwrap();
        assert_eq!(v["data"]["a"], want);
    }
}

const ALICE: &str = "alice-secret-key-123";
const BOB: &str = "bob-secret-key-456";
const ADMIN: &str = "the-admin-key-0123456789";

fn start_tenants(dir: &Path, extra_tenant: &str) -> Server {
    let data = dir.join("tdata");
    std::fs::create_dir_all(&data).unwrap();
    let yaml = format!(
        "data_dir: \"{}\"\nadmin_api_key: \"{ADMIN}\"\ntenants:\n  - name: alice\n    api_key: {ALICE}\n  - name: bob\n    api_key: {BOB}\n{extra_tenant}",
        data.display()
    );
    std::fs::write(dir.join("t.yaml"), yaml).unwrap();
    let f = dir.join("t.yaml").display().to_string();
    Server::start(dir, &[("SHARDCAST_AUTH_TENANTS_FILE", &f)])
}

/// 4. Readiness is unauthenticated: it says how many tenants are not ready,
///    and only the admin key learns which and why (names, file paths).
#[test]
fn readiness_names_tenants_only_to_the_admin_key() {
    let dir = TempDir::new("ready-leak");
    std::fs::create_dir_all(dir.path().join("tdata")).unwrap();
    std::fs::write(dir.path().join("tdata/carol.db"), vec![0x5a; 8192]).unwrap();
    let s = start_tenants(
        dir.path(),
        "  - name: carol\n    api_key: carol-secret-key-789\n",
    );
    for key in ["", ALICE, "wrong-key-wrong-key"] {
        let mut headers = vec![];
        if !key.is_empty() {
            headers.push(("X-API-Key", key));
        }
        let r = s
            .conn()
            .request("GET", "/health?mode=readiness", &headers, b"");
        assert_eq!((r.status, r.error_code().as_str()), (503, "not_ready"));
        let text = r.text();
        for secret in ["carol", "tdata", ".db", "alice", "bob"] {
            assert!(
                !text.contains(secret),
                "key {key:?} learns {secret:?}: {text}"
            );
        }
        assert!(text.contains("1 tenant"), "{text}");
    }
    let r = s.conn().request(
        "GET",
        "/health?mode=readiness",
        &[("X-API-Key", ADMIN)],
        b"",
    );
    assert_eq!(r.status, 503);
    assert!(r.text().contains("carol"), "{}", r.text());
}

fn raw_exchange(s: &Server, raw: &[u8]) -> String {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// 5. HTTP/1.1 conformance (RFC 9110/9112) where leniency is a smuggling or
///    routing hazard.
#[test]
fn framing_and_host_rules_are_enforced() {
    let dir = TempDir::new("conformance");
    let s = Server::start(dir.path(), &[]);
    let ev = "{\"type\":\"a\",\"x\":1}";
    for cl in ["+18", "-18", "018", "1 8", "18,18", "0x12"] {
        let raw = format!(
            "POST /events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {cl}\r\nConnection: close\r\n\r\n{ev}"
        );
        let answer = raw_exchange(&s, raw.as_bytes());
        assert!(
            answer.starts_with("HTTP/1.1 400 ") && answer.contains("bad_content_length"),
            "Content-Length {cl:?}: {answer}"
        );
    }
    let answer = raw_exchange(&s, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400 ") && answer.contains("bad_host"),
        "{answer}"
    );
    let answer = raw_exchange(
        &s,
        b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert!(
        answer.starts_with("HTTP/1.1 400 ") && answer.contains("bad_host"),
        "{answer}"
    );
    let answer = raw_exchange(
        &s,
        b"GET http://elsewhere.example:9/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("healthy"), "{answer}");
    // Nothing of the refused appends was stored.
    assert_eq!(s.get("/position").json()["position"], 0);
    // An absolute-form append works like any other.
    let answer = raw_exchange(
        &s,
        format!("POST http://x/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ev}", ev.len()).as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(s.get("/position").json()["position"], 1);
}

/// 6. Two different credentials on one request are refused, in either
///    order and in any pair of places; nothing is stored for either tenant.
#[test]
fn ambiguous_credentials_are_refused_whatever_the_order() {
    let dir = TempDir::new("ambiguous");
    let s = start_tenants(dir.path(), "");
    let ev = br#"{"type":"who"}"#;
    let pairs = [
        (("X-API-Key", ALICE), ("X-API-Key", BOB)),
        (
            ("X-API-Key", ALICE),
            ("Authorization", "Bearer bob-secret-key-456"),
        ),
    ];
    for (a, b) in pairs {
        for (first, second) in [(a, b), (b, a)] {
            let r = s.conn().request(
                "POST",
                "/events",
                &[("Content-Type", "application/json"), first, second],
                ev,
            );
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (400, "ambiguous_credentials"),
                "{first:?} then {second:?}"
            );
        }
    }
    // The query's api_key (for EventSource) and a header that differ.
    let mut sub = SseClient::open(
        s.addr,
        &format!("/events/subscribe?api_key={BOB}"),
        &[("X-API-Key", ALICE)],
    );
    assert_eq!(sub.status, 400);
    assert!(sub.rest().contains("ambiguous_credentials"));
    // The same key twice is one credential.
    let r = s.conn().request(
        "POST",
        "/events",
        &[
            ("Content-Type", "application/json"),
            ("X-API-Key", ALICE),
            ("Authorization", "Bearer alice-secret-key-123"),
        ],
        ev,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.get_with_key("/position", ALICE)["position"],
        1,
        "only the unambiguous append"
    );
    assert_eq!(s.get_with_key("/position", BOB)["position"], 0);
}

/// Tenants whose names differ only in case would share files on a
/// case-insensitive file system: the file is refused at start.
#[test]
fn tenant_names_equal_ignoring_case_are_refused() {
    let dir = TempDir::new("case-names");
    let yaml = format!(
        "data_dir: \"{}\"\ntenants:\n  - name: alice\n    api_key: {ALICE}\n  - name: ALICE\n    api_key: {BOB}\n",
        dir.path().join("tdata").display()
    );
    std::fs::write(dir.path().join("t.yaml"), yaml).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--tenants"])
        .arg(dir.path().join("t.yaml"))
        .env("PORT", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("differing only in case"), "{err}");
}

/// A body on the streaming endpoints (which answer outside the handlers) is
/// refused and skipped, never read as the next request.
#[test]
fn a_body_on_a_streaming_endpoint_is_not_read_as_the_next_request() {
    let dir = TempDir::new("stream-body");
    let s = Server::start(dir.path(), &[]);
    for path in ["/events/stream?from=1", "/events/subscribe"] {
        let mut c = s.conn();
        let smuggled = build_request("DELETE", "/position", &[], b"");
        let mut raw = build_request(
            "GET",
            path,
            &[("Content-Length", &smuggled.len().to_string())],
            b"",
        );
        raw.extend(&smuggled);
        raw.extend(build_request("GET", "/health", &[], b""));
        c.send_raw(&raw);
        let r = c.read_response().unwrap();
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "unexpected_body"),
            "{path}"
        );
        let next = c.read_response().unwrap();
        assert_eq!(
            next.status, 200,
            "{path}: the body was skipped, not answered as a request"
        );
        assert_eq!(next.json()["status"], "healthy");
    }
}

/// A refused request's body is read and dropped as it arrives, never held:
/// clients without a key cannot make the server buffer their bodies.
#[test]
fn refused_bodies_are_skipped_not_buffered() {
    let dir = TempDir::new("refused-bodies");
    let s = Server::start(dir.path(), &[("API_KEY", "the-one-key-0123456789")]);
    let before = proc_status_kib(s.pid(), "VmRSS:");
    const CONNS: usize = 40;
    const SENT: usize = 4 << 20;
    let chunk = vec![b' '; 64 << 10];
    let mut conns: Vec<Conn> = (0..CONNS)
        .map(|_| {
            let mut c = s.conn();
            // No key: refused from the head, 8 MiB announced (under max_body_bytes).
            c.send_raw(
                format!(
                    "POST /events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    8 << 20
                )
                .as_bytes(),
            );
            c
        })
        .collect();
    for c in conns.iter_mut() {
        for _ in 0..SENT / chunk.len() {
            c.send_raw(&chunk);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let grown = proc_status_kib(s.pid(), "VmRSS:").saturating_sub(before);
    assert!(
        grown < 40 * 1024,
        "{CONNS} refused 4 MiB bodies grew the server by {grown} KiB"
    );
    // The rest of each body, then a request that is answered on the same connection.
    for c in conns.iter_mut() {
        for _ in 0..(8 << 20) / chunk.len() - SENT / chunk.len() {
            c.send_raw(&chunk);
        }
        let r = c.read_response().unwrap();
        assert_eq!((r.status, r.error_code().as_str()), (401, "unauthorized"));
        let r = c.request("GET", "/health", &[], b"");
        assert_eq!(r.status, 200);
    }
}
