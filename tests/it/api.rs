//! The ingestion API as ebuse's users and Go client see it, plus shardcast's
//! additions: idempotent ids, stream versions, batch atomicity, auth.

use crate::common::*;
use serde_json::{json, Value};

const KEY: &str = "test-key-0123456789";

fn post_json(s: &Server, path: &str, body: &Value) -> Response {
    s.post(path, &body.to_string())
}

#[test]
fn ebuse_go_client_calls_work_unchanged() {
    let dir = TempDir::new("ebuse");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    // client.Save: json.Marshal(StoredEvent{Type, Data}) → zero Position and Go's zero
    // time, POST /events with Content-Type and X-API-Key; expects 200 and decodes
    // the body back into the same struct.
    let body = r#"{"position":0,"type":"user.created","data":{"name":"Ada","tags":["a","b"]},"timestamp":"0001-01-01T00:00:00Z"}"#;
    let r = s.conn().request(
        "POST",
        "/events",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["position"], 1);
    assert_eq!(v["type"], "user.created");
    assert_eq!(v["data"], json!({"name":"Ada","tags":["a","b"]}));
    // time.Time decodes RFC 3339; the zero time was replaced by the server's clock.
    let ts = v["timestamp"].as_str().unwrap();
    let parsed =
        time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(parsed.year() >= 2024, "{ts}");
    assert!(v["id"].as_str().unwrap().len() == 36, "a generated UUIDv7");

    // client.GetPosition: GET /position with X-API-Key, decodes {"position"}.
    let r = s
        .conn()
        .request("GET", "/position", &[("X-API-Key", KEY)], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"position":1}));
    // A non-200 is an error to the client; a wrong key must be one.
    let r = s.conn().request(
        "GET",
        "/position",
        &[("X-API-Key", "wrong-key-0123456789")],
        b"",
    );
    assert_eq!(r.status, 401);
}

#[test]
fn stored_event_shape_and_data_byte_for_byte() {
    let dir = TempDir::new("shape");
    let s = Server::start(dir.path(), &[]);
    let data = r#"{ "b" : [1, 2.50, 1e3, "x\"y\u00e9"], "a":null }"#;
    let body = format!(
        r#"{{"type":"order.placed","data":{data},"timestamp":"2024-05-06T07:08:09.5+02:00","id":"order-1","stream":"order-1","metadata":{{"by":"test"}}}}"#
    );
    let r = s.post("/events", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains(&format!(r#""data":{data},"#)),
        "data returned byte for byte: {}",
        r.text()
    );
    let v = r.json();
    assert_eq!(v["position"], 1);
    assert_eq!(v["timestamp"], "2024-05-06T05:08:09.5Z");
    assert_eq!(v["id"], "order-1");
    assert_eq!(v["stream"], "order-1");
    assert_eq!(v["stream_version"], 1);
    assert_eq!(v["metadata"], json!({"by":"test"}));
    assert!(v.get("duplicate").is_none());
    // Scalars and arrays are valid data too, and absent data is null.
    for (d, n) in [("42", 2), ("\"text\"", 3), ("[1,[2]]", 4)] {
        let r = s.post("/events", &format!(r#"{{"type":"t","data":{d}}}"#));
        assert!(r.text().contains(&format!(r#""data":{d},"#)));
        assert_eq!(r.json()["position"], n);
    }
    assert_eq!(
        s.post("/events", r#"{"type":"t"}"#).json()["data"],
        Value::Null
    );
    // Large bodies keep their bytes too.
    let big: String = (0..2000)
        .map(|i| format!(r#"{{"i": {i}, "s": "v\n{i}"}}"#))
        .collect::<Vec<_>>()
        .join(" ,");
    let r = s.post("/events", &format!(r#"{{"type":"big","data":[{big}]}}"#));
    assert_eq!(r.status, 200);
    assert!(r.text().contains(&format!("[{big}]")));
}

#[test]
fn reposting_an_id_returns_the_original_and_writes_nothing() {
    let dir = TempDir::new("idem");
    let s = Server::start(dir.path(), &[]);
    let first = post_json(
        &s,
        "/events",
        &json!({"type":"pay","id":"pay-1","data":{"amount":10}}),
    );
    assert_eq!(first.status, 200);
    post_json(&s, "/events", &json!({"type":"other","data":1}));
    // A retry, even with a different body, is answered with the stored original.
    let again = post_json(
        &s,
        "/events",
        &json!({"type":"pay","id":"pay-1","data":{"amount":99}}),
    );
    assert_eq!(again.status, 200);
    let v = again.json();
    assert_eq!(v["duplicate"], true);
    assert_eq!(v["position"], 1);
    assert_eq!(v["data"], json!({"amount":10}));
    assert_eq!(v["timestamp"], first.json()["timestamp"]);
    assert_eq!(s.get("/position").json()["position"], 2);
    // In a batch, known ids and repeats within the batch are skipped, not rewritten.
    let r = post_json(
        &s,
        "/events/batch",
        &json!([
            {"type":"pay","id":"pay-1"}, {"type":"pay","id":"pay-2"}, {"type":"pay","id":"pay-2"}, {"type":"pay","id":"pay-3"}
        ]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"saved":2,"first_position":1,"last_position":4,"duplicates":2})
    );
    // The whole batch again: nothing new.
    let r = post_json(
        &s,
        "/events/batch",
        &json!([{"type":"pay","id":"pay-2"},{"type":"pay","id":"pay-3"}]),
    );
    assert_eq!(
        r.json(),
        json!({"saved":0,"first_position":3,"last_position":4,"duplicates":2})
    );
    assert_eq!(s.get("/position").json()["position"], 4);
    let ids: Vec<String> = stored_ids(&dir.path().join("events.db"))
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids.iter().filter(|i| *i == "pay-2").count(), 1);
}

#[test]
fn expected_version_conflicts_get_409_with_the_current_version() {
    let dir = TempDir::new("versions");
    let s = Server::start(dir.path(), &[]);
    let r = post_json(
        &s,
        "/events",
        &json!({"type":"opened","stream":"acct-1","expected_version":0}),
    );
    assert_eq!(r.json()["stream_version"], 1);
    let r = post_json(
        &s,
        "/events",
        &json!({"type":"deposit","stream":"acct-1","expected_version":1}),
    );
    assert_eq!(r.json()["stream_version"], 2);
    // A stale writer loses.
    let r = post_json(
        &s,
        "/events",
        &json!({"type":"deposit","stream":"acct-1","expected_version":1}),
    );
    assert_eq!(r.status, 409);
    assert_eq!(r.error_code(), "version_conflict");
    let e = &r.json()["error"];
    assert_eq!(e["current_version"], 2);
    assert_eq!(e["expected_version"], 1);
    assert_eq!(e["stream"], "acct-1");
    // Without expected_version an append to a stream always succeeds and counts on.
    let r = post_json(&s, "/events", &json!({"type":"deposit","stream":"acct-1"}));
    assert_eq!(r.json()["stream_version"], 3);
    // Streams are independent.
    let r = post_json(
        &s,
        "/events",
        &json!({"type":"opened","stream":"acct-2","expected_version":0}),
    );
    assert_eq!(r.json()["stream_version"], 1);
    assert_eq!(s.get("/position").json()["position"], 4);
    // Versions within one batch build on each other.
    let r = post_json(
        &s,
        "/events/batch",
        &json!([
            {"type":"a","stream":"acct-3","expected_version":0},
            {"type":"b","stream":"acct-3","expected_version":1}
        ]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn batches_are_all_or_nothing() {
    let dir = TempDir::new("batch");
    let s = Server::start(dir.path(), &[]);
    let r = post_json(
        &s,
        "/events/batch",
        &json!([{"type":"a","data":1},{"type":"b","data":2}]),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"saved":2,"first_position":1,"last_position":2,"duplicates":0})
    );
    // One invalid event: 400 naming it, nothing stored.
    let r = post_json(
        &s,
        "/events/batch",
        &json!([{"type":"a","id":"x1"},{"data":2},{"type":"c"}]),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "missing_type"));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("event 1"));
    // A version conflict in the middle: 409, nothing stored, not even the events before it.
    post_json(&s, "/events", &json!({"type":"s","stream":"st"}));
    let r = post_json(
        &s,
        "/events/batch",
        &json!([
            {"type":"a","id":"y1"},{"type":"b","stream":"st","expected_version":0},{"type":"c"}
        ]),
    );
    assert_eq!(r.status, 409);
    assert_eq!(s.get("/position").json()["position"], 3);
    // The ids of the refused batches were not taken.
    let r = post_json(&s, "/events", &json!({"type":"a","id":"x1"}));
    assert!(r.json().get("duplicate").is_none());
    let r = post_json(&s, "/events", &json!({"type":"a","id":"y1"}));
    assert!(r.json().get("duplicate").is_none());
    // The size limits.
    let r = post_json(&s, "/events/batch", &json!([]));
    assert_eq!((r.status, r.error_code().as_str()), (400, "empty_batch"));
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"type":"t","data":i})).collect();
    let r = post_json(&s, "/events/batch", &Value::Array(too_many));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "batch_too_large")
    );
    let max: Vec<Value> = (0..1000).map(|i| json!({"type":"t","data":i})).collect();
    let r = post_json(&s, "/events/batch", &Value::Array(max));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["saved"], 1000);
    assert_eq!(r.json()["last_position"], 1005);
}

#[test]
fn bad_events_get_clear_400s() {
    let dir = TempDir::new("bad");
    let s = Server::start(dir.path(), &[]);
    for (body, code) in [
        ("{not json", "invalid_json"),
        ("", "invalid_json"),
        (r#"{"data":1}"#, "missing_type"),
        (r#"{"type":""}"#, "empty_type"),
        (
            r#"{"type":"a","timestamp":"yesterday"}"#,
            "invalid_timestamp",
        ),
        (
            r#"{"type":"a","timestamp":"2024-13-01T00:00:00Z"}"#,
            "invalid_timestamp",
        ),
        (
            r#"{"type":"a","expected_version":"x","stream":"s"}"#,
            "invalid_json",
        ),
        (r#"[{"type":"a"}]"#, "invalid_json"),
    ] {
        let r = s.post("/events", body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.error_code(), code, "{body}");
    }
    let r = s.post("/events/batch", r#"{"type":"a"}"#);
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_json"));
    assert_eq!(s.get("/position").json()["position"], 0);
}

#[test]
fn auth_is_required_on_every_endpoint_but_health() {
    let dir = TempDir::new("auth");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    let endpoints: [(&str, &str, &[u8]); 3] = [
        ("GET", "/position", b""),
        ("POST", "/events", br#"{"type":"a"}"#),
        ("POST", "/events/batch", br#"[{"type":"a"}]"#),
    ];
    for (m, p, body) in endpoints {
        let ct = ("Content-Type", "application/json");
        let r = s.conn().request(m, p, &[ct], body);
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (401, "unauthorized"),
            "{m} {p} without a key"
        );
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = s
            .conn()
            .request(m, p, &[ct, ("X-API-Key", "test-key-0123456780")], body);
        assert_eq!(r.status, 401, "{m} {p} with a wrong key");
        let r = s
            .conn()
            .request(m, p, &[ct, ("Authorization", "Bearer test-key")], body);
        assert_eq!(r.status, 401, "{m} {p} with a prefix of the key");
        let r = s.conn().request(m, p, &[ct, ("X-API-Key", KEY)], body);
        assert_eq!(r.status, 200, "{m} {p} with X-API-Key");
        let bearer = format!("Bearer {KEY}");
        let r = s
            .conn()
            .request(m, p, &[ct, ("Authorization", &bearer)], body);
        assert_eq!(r.status, 200, "{m} {p} with Authorization: Bearer");
        // The bare key, as ebuse also reads it; another scheme is no key.
        let r = s.conn().request(m, p, &[ct, ("Authorization", KEY)], body);
        assert_eq!(r.status, 200, "{m} {p} with Authorization: KEY");
        let basic = format!("Basic {KEY}");
        let r = s
            .conn()
            .request(m, p, &[ct, ("Authorization", &basic)], body);
        assert_eq!(r.status, 401, "{m} {p} with Authorization: Basic");
    }
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(
        s.conn()
            .request("GET", "/position", &[("X-API-Key", KEY)], b"")
            .json()["position"],
        6
    );
}

#[test]
fn overload_sheds_with_503_and_retry_after_and_loses_nothing_acknowledged() {
    let dir = TempDir::new("shed");
    let s = Server::start(
        dir.path(),
        &[
            ("SHARDCAST_WRITER_QUEUE_REQUESTS_MAX", "1"),
            ("SHARDCAST_SERVER_SHARDS", "1"),
        ],
    );
    let mut shed = 0;
    let mut acked = Vec::new();
    for round in 0..20 {
        // Many connections each send a request before any answer is read, so the
        // shard sees them in one wakeup while the first is still at the writer.
        let mut conns: Vec<Conn> = (0..32).map(|_| s.conn()).collect();
        for (i, c) in conns.iter_mut().enumerate() {
            let body = format!(r#"{{"type":"load","id":"r{round}-c{i}"}}"#);
            c.send_raw(&build_request(
                "POST",
                "/events",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            ));
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let r = c.read_response().unwrap();
            match r.status {
                200 => acked.push(format!("r{round}-c{i}")),
                503 => {
                    assert_eq!(r.error_code(), "overloaded");
                    assert_eq!(r.header("retry-after"), Some("1"));
                    shed += 1;
                }
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
        if shed > 0 && round >= 2 {
            break;
        }
    }
    assert!(
        shed > 0,
        "a queue of one request must shed concurrent appends"
    );
    let stored: std::collections::HashSet<String> = stored_ids(&dir.path().join("events.db"))
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    for id in &acked {
        assert!(stored.contains(id), "acknowledged {id} is stored");
    }
    assert_eq!(stored.len(), acked.len(), "shed requests stored nothing");
}
