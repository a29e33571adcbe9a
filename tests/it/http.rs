//! HTTP/1.1 behaviour of a started server: keep-alive, pipelining,
//! `Connection: close`, every protocol-level error status, and timeouts.

use crate::common::*;
use std::time::Duration;

const EVENT: &str = r#"{"type":"t","data":{"k":1}}"#;

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let dir = TempDir::new("keepalive");
    let s = Server::start(dir.path(), &[]);
    let mut c = s.conn();
    for i in 1..=5u64 {
        let r = c.request(
            "POST",
            "/events",
            &[("Content-Type", "application/json")],
            EVENT.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["position"], i);
        assert_eq!(r.header("connection"), None, "keep-alive is the default");
    }
    assert_eq!(
        c.request("GET", "/position", &[], b"").json()["position"],
        5
    );
}

#[test]
fn pipelined_requests_are_all_answered_in_order() {
    let dir = TempDir::new("pipeline");
    let s = Server::start(dir.path(), &[]);
    let mut c = s.conn();
    let mut raw = Vec::new();
    for i in 0..10 {
        let body = format!(r#"{{"type":"p","data":{i},"id":"pipe-{i}"}}"#);
        raw.extend(build_request(
            "POST",
            "/events",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        ));
        raw.extend(build_request("GET", "/health", &[], b""));
    }
    raw.extend(build_request("GET", "/position", &[], b""));
    c.send_raw(&raw); // one write: the server reads them together
    for i in 0..10u64 {
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["id"], format!("pipe-{i}"));
        assert_eq!(v["data"], i);
        assert_eq!(v["position"], i + 1, "answers come back in request order");
        assert_eq!(c.read_response().unwrap().json()["status"], "healthy");
    }
    assert_eq!(c.read_response().unwrap().json()["position"], 10);
}

#[test]
fn connection_close_is_honoured() {
    let dir = TempDir::new("close");
    let s = Server::start(dir.path(), &[]);
    let mut c = s.conn();
    let r = c.request("GET", "/health", &[("Connection", "close")], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.is_closed_by_server(Duration::from_secs(5)));
    // HTTP/1.0 without keep-alive closes too.
    let mut c = s.conn();
    c.send_raw(b"GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    assert!(c.is_closed_by_server(Duration::from_secs(5)));
    // Error answers and preflights close too (they used to wait for the idle timeout).
    for (method, path) in [
        ("GET", "/nowhere"),
        ("DELETE", "/position"),
        ("OPTIONS", "/events"),
    ] {
        let mut c = s.conn();
        let r = c.request(method, path, &[("Connection", "close")], b"");
        assert!(
            r.status == 404 || r.status == 405 || r.status == 204,
            "{}",
            r.status
        );
        assert!(
            c.is_closed_by_server(Duration::from_secs(5)),
            "{method} {path}"
        );
    }
}

#[test]
fn protocol_errors_have_the_right_status_and_a_json_body() {
    let dir = TempDir::new("errors");
    let s = Server::start(dir.path(), &[("SHARDCAST_SERVER_MAX_BODY_BYTES", "65536")]);

    // 404 and 405 (with Allow); the connection stays usable.
    let mut c = s.conn();
    let r = c.request("GET", "/nowhere", &[], b"");
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    let r = c.request("GET", "/events/batch", &[], b"");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(r.header("allow"), Some("POST"));
    let r = c.request("DELETE", "/position", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(c.request("GET", "/health", &[], b"").status, 200);

    // 411: a POST without a length.
    let mut c = s.conn();
    c.send_raw(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (411, "length_required")
    );

    // 413 before the body is read: only the head is sent.
    let mut c = s.conn();
    c.send_raw(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"));
    assert!(c.is_closed_by_server(Duration::from_secs(5)));

    // 431: a head larger than server.max_header_bytes.
    let mut c = s.conn();
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    c.send_raw(big.as_bytes());
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 431);
    r.error_code();
    assert!(c.is_closed_by_server(Duration::from_secs(5)));

    // 400 for a malformed request, and the connection is closed.
    let mut c = s.conn();
    c.send_raw(b"THIS IS NOT HTTP\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "malformed_request")
    );
    assert!(c.is_closed_by_server(Duration::from_secs(5)));

    // Any Content-Type, as ebuse takes any (`curl -d` says form-urlencoded):
    // the body must be JSON whatever the header says.
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = s
            .conn()
            .request("POST", "/events", &[("Content-Type", ct)], EVENT.as_bytes());
        assert_eq!(r.status, 200, "{ct}: {}", r.text());
    }
    let r = s.conn().request(
        "POST",
        "/events",
        &[("Content-Type", "text/plain")],
        b"type=a",
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_json"));
    let r = s.conn().request("POST", "/events", &[], EVENT.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.conn().request(
        "POST",
        "/events",
        &[("Content-Type", "application/json; charset=utf-8")],
        EVENT.as_bytes(),
    );
    assert_eq!(r.status, 200);

    // Nothing above stored anything it should not have.
    assert_eq!(s.get("/position").json()["position"], 4);
}

/// A chunked head for `path`.
fn chunked_head(path: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n{extra}\r\n")
}

/// `body` as chunks of at most `size` bytes, with an extension now and then.
fn chunk(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, piece) in body.chunks(size).enumerate() {
        let ext = if i % 2 == 1 { ";x=y" } else { "" };
        out.extend_from_slice(format!("{:X}{ext}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[test]
fn chunked_request_bodies_are_decoded_however_they_arrive() {
    let dir = TempDir::new("chunked");
    let s = Server::start(dir.path(), &[("SHARDCAST_SERVER_MAX_BODY_BYTES", "4096")]);

    // As Go's client sends a body of unknown length: chunked, here also
    // split across writes at awkward places, with a request pipelined behind.
    let body = br#"{"type":"chunked.one","data":{"text":"hello, chunks"}}"#;
    let mut raw = chunked_head("/events", "").into_bytes();
    raw.extend_from_slice(&chunk(body, 7));
    raw.extend_from_slice(b"GET /position HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut c = s.conn();
    for piece in raw.chunks(5) {
        c.send_raw(piece);
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["position"], 1);
    assert_eq!(c.read_response().unwrap().json()["position"], 1);
    // A batch, one byte per chunk, with a trailer field.
    let batch = br#"[{"type":"chunked.two"},{"type":"chunked.three","data":[1,2]}]"#;
    let mut raw = chunked_head("/events/batch", "").into_bytes();
    let mut chunks = chunk(batch, 1);
    chunks.truncate(chunks.len() - 2);
    chunks.extend_from_slice(b"X-Checksum: none\r\n\r\n");
    raw.extend_from_slice(&chunks);
    c.send_raw(&raw);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let events = s.get("/events?from=1").json();
    assert_eq!(
        events[0]["data"],
        serde_json::json!({"text": "hello, chunks"})
    );
    assert_eq!(events[2]["data"], serde_json::json!([1, 2]));

    // `Expect: 100-continue` with a chunked body gets its interim answer.
    let mut c = s.conn();
    c.send_raw(chunked_head("/events", "Expect: 100-continue\r\n").as_bytes());
    let mut first = [0u8; 25];
    std::io::Read::read_exact(&mut c.stream, &mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.send_raw(&chunk(EVENT.as_bytes(), 10));
    assert_eq!(c.read_response().unwrap().status, 200);

    // Malformed chunking: 400, and the connection ends (its framing is lost).
    for bad in [
        &b"5\r\nhelloX\r\n0\r\n\r\n"[..],
        b"zz\r\n",
        b"5\nhello\r\n0\r\n\r\n",
    ] {
        let mut c = s.conn();
        c.send_raw(chunked_head("/events", "").as_bytes());
        c.send_raw(bad);
        let r = c.read_response().unwrap();
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "bad_chunked_body"),
            "{bad:?}"
        );
        assert!(c.is_closed_by_server(Duration::from_secs(5)));
    }
    // The limit is on the decoded body: 413 once it passes max_body_bytes.
    let mut c = s.conn();
    c.send_raw(chunked_head("/events", "").as_bytes());
    c.send_raw(&chunk(&vec![b' '; 5000], 1000));
    let r = c.read_response().unwrap();
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"));
    // Another transfer coding is not understood: 501.
    let mut c = s.conn();
    c.send_raw(b"POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (501, "unsupported_transfer_coding")
    );
    // A chunked body where no endpoint takes one.
    let mut c = s.conn();
    c.send_raw(b"GET /position HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "unexpected_body")
    );

    // Nothing refused was stored.
    assert_eq!(s.get("/position").json()["position"], 4);
}

#[test]
fn expect_100_continue_gets_an_interim_response() {
    let dir = TempDir::new("continue");
    let s = Server::start(dir.path(), &[]);
    let mut c = s.conn();
    c.send_raw(format!("POST /events HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n", EVENT.len()).as_bytes());
    let mut first = [0u8; 25];
    std::io::Read::read_exact(&mut c.stream, &mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.send_raw(EVENT.as_bytes());
    assert_eq!(c.read_response().unwrap().status, 200);
}

#[test]
fn idle_and_read_timeouts_close_connections() {
    let dir = TempDir::new("timeouts");
    let s = Server::start(
        dir.path(),
        &[("IDLE_TIMEOUT", "1s"), ("READ_TIMEOUT", "1s")],
    );
    // Idle: no request at all.
    let mut idle = s.conn();
    // Slow: a head that never finishes (slowloris).
    let mut slow = s.conn();
    slow.send_raw(b"GET /health HTTP/1.1\r\nHost: x\r\n");
    // Meanwhile, others are served normally.
    assert_eq!(s.get("/health").status, 200);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        idle.is_closed_by_server(Duration::from_secs(5)),
        "idle connection closed after server.idle_timeout"
    );
    let r = slow.read_response().unwrap();
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (408, "request_timeout")
    );
    assert!(slow.is_closed_by_server(Duration::from_secs(5)));
    // A client that trickles its head a byte at a time is cut off by the same
    // deadline: the read timeout bounds the whole request, not each read.
    let mut trickle = s.conn();
    let start = std::time::Instant::now();
    for b in b"GET /health HTTP/1.1\r\nHost: trickle-trickle-trickle-trickle\r\n".iter() {
        if std::io::Write::write_all(&mut trickle.stream, &[*b]).is_err()
            || start.elapsed() > Duration::from_secs(2)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Either the 408 is read, or the reset from writing to the closed socket
    // discarded it; a server that never closes makes this read time out and fail.
    let answer = trickle.read_response();
    assert!(
        answer.as_ref().is_none_or(|r| r.status == 408),
        "{answer:?}"
    );
}

#[test]
fn cors_headers_and_preflight_on_every_endpoint() {
    let dir = TempDir::new("cors");
    let key = "cors-key-0123456789";
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", key),
            (
                "SHARDCAST_SERVER_CORS_ORIGINS",
                "https://app.example.com, https://admin.example.com",
            ),
            ("SHARDCAST_SERVER_CORS_ALLOW_CREDENTIALS", "true"),
        ],
    );
    let app = "https://app.example.com";
    // Preflight: no key needed, 204 with what the browser asks about.
    for path in [
        "/events",
        "/events/batch",
        "/position",
        "/events/subscribe",
        "/health",
    ] {
        let r = s.conn().request(
            "OPTIONS",
            path,
            &[
                ("Origin", app),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type,x-api-key"),
            ],
            b"",
        );
        assert_eq!(r.status, 204, "{path}");
        assert_eq!(r.header("access-control-allow-origin"), Some(app), "{path}");
        assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
        let allowed = r
            .header("access-control-allow-headers")
            .unwrap()
            .to_ascii_lowercase();
        assert!(allowed.contains("x-api-key") && allowed.contains("content-type"));
        assert!(r
            .header("access-control-allow-methods")
            .unwrap()
            .contains("POST"));
    }
    // Real answers carry the origin too, errors included.
    let r = s.conn().request(
        "POST",
        "/events",
        &[
            ("Origin", app),
            ("X-API-Key", key),
            ("Content-Type", "application/json"),
        ],
        br#"{"type":"a"}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    assert_eq!(r.header("vary"), Some("Origin"));
    let r = s
        .conn()
        .request("GET", "/position", &[("Origin", app)], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    // The SSE response head.
    let c = SseClient::open(
        s.addr,
        &format!("/events/subscribe?api_key={key}"),
        &[("Origin", app)],
    );
    assert_eq!(c.status, 200);
    assert!(
        c.head
            .contains(&format!("Access-Control-Allow-Origin: {app}")),
        "{}",
        c.head
    );
    // Another origin gets no CORS headers (the browser then refuses the answer).
    let r = s
        .conn()
        .request("GET", "/health", &[("Origin", "https://evil.example")], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
}

/// Clients that announce a large body and then stall cost the server what
/// they sent, not what they announced: the buffer grows with arrivals.
#[test]
fn announced_but_unsent_bodies_reserve_little_memory() {
    use std::io::Write;
    let dir = TempDir::new("stalled-bodies");
    let s = Server::start(dir.path(), &[("READ_TIMEOUT", "30s")]);
    // Warm up allocator pools with one ordinary request.
    assert_eq!(s.post("/events", EVENT).status, 200);
    let before = proc_status_kib(s.pid(), "VmRSS:");
    let conns: Vec<_> = (0..300)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(s.addr).unwrap();
            c.write_all(
                b"POST /events/batch HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n[",
            )
            .unwrap();
            c
        })
        .collect();
    // Every connection has been read up to its stall.
    std::thread::sleep(Duration::from_millis(500));
    let grown_kib = proc_status_kib(s.pid(), "VmRSS:").saturating_sub(before);
    // 300 × 10 MB announced = 3 GB; at 64 KiB each it would be ~19 MiB.
    assert!(
        grown_kib < 48 * 1024,
        "300 stalled 10 MB bodies grew RSS by {grown_kib} KiB"
    );
    // The server still answers others meanwhile.
    assert_eq!(s.post("/events", EVENT).status, 200);
    drop(conns);
}
