//! Reading back, as ebuse's Go client does it: `Load` (GET /events),
//! `SaveSubscriptionPosition` and `LoadSubscriptionPosition`.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const KEY: &str = "reads-key-0123456789";

fn get(s: &Server, path: &str) -> Response {
    s.conn().request("GET", path, &[("X-API-Key", KEY)], b"")
}

fn seed(s: &Server, n: usize) {
    let evs: Vec<Value> = (0..n)
        .map(|i| json!({"type": if i % 3 == 0 { "fizz" } else { "plain" }, "data": {"i": i + 1}}))
        .collect();
    let r = s.conn().request(
        "POST",
        "/events/batch",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        serde_json::to_vec(&evs).unwrap().as_slice(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn load_pages_filters_and_refuses_bad_parameters() {
    let dir = TempDir::new("load");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    seed(&s, 250);
    // client.Load(from, -1): GET /events?from=N, decoded as []StoredEvent.
    let r = get(&s, "/events?from=1");
    assert_eq!(r.status, 200);
    let all = r.json();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 250);
    assert_eq!(all[0]["position"], 1);
    assert_eq!(all[0]["data"], json!({"i": 1}));
    assert!(all[0]["timestamp"].is_string() && all[0]["type"].is_string());
    // client.Load(from, to): both inclusive.
    let page = get(&s, "/events?from=10&to=12").json();
    let ids: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![10, 11, 12]);
    // Paging with from and limit covers every event exactly once.
    let mut seen = Vec::new();
    let mut from = 1;
    loop {
        let page = get(&s, &format!("/events?from={from}&limit=64")).json();
        let page = page.as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        for e in &page {
            seen.push(e["position"].as_u64().unwrap());
        }
        from = seen.last().unwrap() + 1;
    }
    assert_eq!(seen, (1..=250).collect::<Vec<_>>());
    // Type filter.
    let fizz = get(&s, "/events?from=1&type=fizz").json();
    let fizz = fizz.as_array().unwrap();
    assert_eq!(fizz.len(), 84);
    assert!(fizz.iter().all(|e| e["type"] == "fizz"));
    // Empty ranges are empty arrays.
    assert_eq!(get(&s, "/events?from=251").json(), json!([]));
    assert_eq!(get(&s, "/events?from=20&to=10").json(), json!([]));
    // Bad parameters.
    for q in ["from=x", "to=1.5", "limit=0", "limit=10001", "from=-3"] {
        let r = get(&s, &format!("/events?{q}"));
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_parameter"),
            "{q}"
        );
    }
    // Auth as everywhere.
    assert_eq!(s.get("/events?from=1").status, 401);
}

#[test]
fn consumer_positions_as_ebuse_client_saves_and_loads_them() {
    let dir = TempDir::new("consumers");
    let mut s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    seed(&s, 10);
    // LoadSubscriptionPosition for an unknown id: 200 {"position":0}.
    assert_eq!(
        get(&s, "/subscriptions/projector-1/position").json(),
        json!({"position": 0})
    );
    // SaveSubscriptionPosition: POST {"position":N} → 204 (PUT works too).
    for (method, p) in [("POST", 7), ("PUT", 9)] {
        let r = s.conn().request(
            method,
            "/subscriptions/projector-1/position",
            &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
            json!({"position": p}).to_string().as_bytes(),
        );
        assert_eq!(r.status, 204, "{}", r.text());
        assert!(r.body.is_empty());
        assert!(r.header("content-length").is_none());
        assert_eq!(
            get(&s, "/subscriptions/projector-1/position").json(),
            json!({"position": p})
        );
    }
    // Beyond the head: 400, nothing stored.
    let r = s.conn().request(
        "POST",
        "/subscriptions/projector-1/position",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        br#"{"position":11}"#,
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "position_beyond_head")
    );
    let r = s.conn().request(
        "POST",
        "/subscriptions/projector-1/position",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        br#"{"pos":1}"#,
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "invalid_json"));
    // Ids are percent-decoded; another id is independent.
    let r = s.conn().request(
        "POST",
        "/subscriptions/billing%20worker/position",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        br#"{"position":3}"#,
    );
    assert_eq!(r.status, 204);
    // Survive restart, SIGTERM and kill -9 alike (durable through the writer).
    assert!(s.terminate(Duration::from_secs(10)).success());
    s.restart();
    assert_eq!(
        get(&s, "/subscriptions/projector-1/position").json(),
        json!({"position": 9})
    );
    let r = s.conn().request(
        "PUT",
        "/subscriptions/projector-1/position",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        br#"{"position":10}"#,
    );
    assert_eq!(r.status, 204);
    s.kill9();
    s.restart();
    assert_eq!(
        get(&s, "/subscriptions/projector-1/position").json(),
        json!({"position": 10})
    );
    assert_eq!(
        get(&s, "/subscriptions/billing%20worker/position").json(),
        json!({"position": 3})
    );
    // Methods.
    let r = s.conn().request(
        "DELETE",
        "/subscriptions/projector-1/position",
        &[("X-API-Key", KEY)],
        b"",
    );
    assert_eq!(r.status, 405);
}
