//! Live fan-out over SSE against the real binary: framing, resume from the
//! header and the query, filters, the catch-up → live handoff under concurrent
//! publishing, slow clients, caps, heartbeats and auth.

use crate::common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "sse-test-key-0123456789";

fn post(s: &Server, body: &Value) -> Value {
    let path = if body.is_array() {
        "/events/batch"
    } else {
        "/events"
    };
    let r = s.conn().post_json(path, KEY, body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn id_of(m: &SseMessage) -> u64 {
    m.id.as_deref().unwrap().parse().unwrap()
}

#[test]
fn framing_resume_and_filters() {
    let dir = TempDir::new("sse-frame");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    for i in 1..=3 {
        post(&s, &json!({"type": format!("t{i}"), "data": {"i": i}}));
    }
    // Resume from the header: everything after 1.
    let mut c = SseClient::open(
        s.addr,
        "/events/subscribe",
        &[("X-API-Key", KEY), ("Last-Event-ID", "1")],
    );
    assert_eq!(c.status, 200);
    let head = c.head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("cache-control: no-cache"), "{head}");
    assert!(head.contains("x-accel-buffering: no"), "{head}");
    let got = c.until_id(3);
    assert_eq!(c.retry, Some(3000), "retry: on connect");
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(got[0].event.as_deref(), Some("t2"));
    let v: Value = serde_json::from_str(&got[0].data).unwrap();
    assert_eq!(v["position"], 2);
    assert_eq!(v["data"], json!({"i": 2}));

    // Live, with a value whose JSON holds raw line breaks: several data: lines,
    // joined back by the client into the JSON.
    let raw = "{\"type\":\"multi\",\"data\":{\n\"a\": \"x\\ny\"\n}}";
    let r = s.conn().request(
        "POST",
        "/events",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        raw.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let m = c.until_id(4).pop().unwrap();
    assert_eq!(m.event.as_deref(), Some("multi"));
    assert!(m.data.contains('\n'), "split over data lines: {m:?}");
    let v: Value = serde_json::from_str(&m.data).unwrap();
    assert_eq!(v["data"]["a"], "x\ny");

    // From the query, as a browser's EventSource must (no headers): api_key,
    // from= (inclusive) and last_event_id= (exclusive), and filters.
    let mut q = SseClient::open(
        s.addr,
        &format!("/events/subscribe?api_key={KEY}&from=2&types=t3,multi"),
        &[],
    );
    assert_eq!(q.status, 200);
    let got = q.until_id(4);
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), vec![3, 4]);
    let mut q = SseClient::open(
        s.addr,
        &format!("/events/subscribe?api_key={KEY}&last_event_id=3"),
        &[],
    );
    assert_eq!(id_of(&q.next().unwrap()), 4);

    // Stream filter, live.
    let mut st = SseClient::open(
        s.addr,
        &format!("/events/subscribe?api_key={KEY}&stream=order-1"),
        &[],
    );
    post(&s, &json!({"type":"x","stream":"order-2"}));
    post(&s, &json!({"type":"x","stream":"order-1"}));
    let m = st.next().unwrap();
    assert_eq!(id_of(&m), 6, "only order-1's event: {m:?}");

    // Auth and bad parameters.
    let mut no = SseClient::open(s.addr, "/events/subscribe", &[]);
    assert_eq!(no.status, 401);
    assert!(no.rest().contains("unauthorized"));
    let mut bad = SseClient::open(s.addr, "/events/subscribe?from=abc", &[("X-API-Key", KEY)]);
    assert_eq!(bad.status, 400);
    assert!(bad.rest().contains("invalid_parameter"));

    // A position beyond the head: told so, then live.
    let mut ahead = SseClient::open(
        s.addr,
        "/events/subscribe",
        &[("X-API-Key", KEY), ("Last-Event-ID", "999")],
    );
    let m = ahead.next().unwrap();
    assert_eq!(m.event.as_deref(), Some("reset"));
    assert!(m.data.contains("\"head\":6"), "{m:?}");
    post(&s, &json!({"type":"after-reset"}));
    assert_eq!(id_of(&ahead.next().unwrap()), 7);
}

#[test]
fn reconnecting_at_random_moments_receives_every_position_once_in_order() {
    let dir = TempDir::new("sse-handoff");
    // A small ring, so resumes land in SQLite, on the ring, and between.
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", KEY),
            ("SHARDCAST_SSE_RING_EVENTS", "64"),
            ("SHARDCAST_SSE_CLIENT_BUFFER_EVENTS", "32"),
            ("SHARDCAST_SSE_CATCH_UP_BATCH_EVENTS", "50"),
        ],
    );
    let total: u64 = 3000;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let addr = s.addr;
        std::thread::spawn(move || {
            let mut conn = Conn::open(addr);
            let mut sent = 0u64;
            while sent < total {
                let n = 1 + (sent % 7);
                let evs: Vec<Value> = (0..n).map(|k| json!({"type":"p","data":{"k":k}})).collect();
                let r = conn.post_json("/events/batch", KEY, &Value::Array(evs));
                assert_eq!(r.status, 200);
                sent += n;
                if sent % 200 < 7 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            sent
        })
    };
    // Subscribers that drop and resume from their last id at random moments.
    let readers: Vec<_> = (0..4u64)
        .map(|r| {
            let addr = s.addr;
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9u64 * (r + 1);
                let mut rand = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut got: Vec<u64> = Vec::new();
                let mut reconnects = 0;
                while !stop.load(Ordering::Relaxed) || got.last().copied().unwrap_or(0) < total {
                    let last = got.last().copied().unwrap_or(0).to_string();
                    let mut c = SseClient::open(
                        addr,
                        "/events/subscribe",
                        &[("X-API-Key", KEY), ("Last-Event-ID", &last)],
                    );
                    assert_eq!(c.status, 200);
                    let take = 1 + rand() % 400;
                    for _ in 0..take {
                        match c.next() {
                            Some(m) => got.push(id_of(&m)),
                            None => break,
                        }
                        if got.last() == Some(&total) {
                            break;
                        }
                    }
                    reconnects += 1;
                    if got.last() == Some(&total) {
                        break;
                    }
                }
                (got, reconnects)
            })
        })
        .collect();
    let sent = publisher.join().unwrap();
    assert!(sent >= total);
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (got, reconnects) = r.join().unwrap();
        assert!(reconnects > 3, "the test must actually reconnect");
        let want: Vec<u64> = (1..=total).collect();
        assert_eq!(got.len(), want.len(), "every position exactly once");
        assert_eq!(got, want, "in order, no gap, no repeat");
    }
}

#[test]
fn slow_clients_catch_up_or_are_disconnected_without_slowing_others() {
    for policy in ["catch_up", "disconnect"] {
        let dir = TempDir::new("sse-slow");
        let s = Server::start(
            dir.path(),
            &[
                ("API_KEY", KEY),
                ("SHARDCAST_SSE_RING_EVENTS", "128"),
                ("SHARDCAST_SSE_CLIENT_BUFFER_EVENTS", "64"),
                ("SHARDCAST_SSE_SLOW_CLIENT", policy),
            ],
        );
        // A subscriber that does not read, with a small receive buffer.
        let slow = SseClient::open(s.addr, "/events/subscribe?from=1", &[("X-API-Key", KEY)]);
        // A subscriber that reads as fast as it can, concurrently.
        let mut fast = SseClient::open(s.addr, "/events/subscribe?from=1", &[("X-API-Key", KEY)]);
        let batches = 20u64;
        let total = batches * 100;
        let fast = std::thread::spawn(move || fast.until_id(total).len() as u64);
        // ~8 MB of events: far more than the socket buffers hold.
        let pad = "y".repeat(4000);
        for _ in 0..batches {
            let evs: Vec<Value> = (0..100)
                .map(|_| json!({"type":"big","data":{"pad":pad}}))
                .collect();
            post(&s, &Value::Array(evs));
        }
        // The reading subscriber gets everything, unhindered by the slow one.
        assert_eq!(fast.join().unwrap(), total, "{policy}");
        // The slow one now reads.
        let mut slow = slow;
        let mut ids = Vec::new();
        let started = Instant::now();
        while let Some(m) = slow.next() {
            ids.push(id_of(&m));
            if ids.last() == Some(&total) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30));
        }
        match policy {
            "catch_up" => assert_eq!(ids, (1..=total).collect::<Vec<_>>(), "caught up in order"),
            _ => {
                assert!(
                    (ids.len() as u64) < total,
                    "a slow client is disconnected under 'disconnect'"
                );
                // What it did get is a gap-free prefix: it resumes with Last-Event-ID.
                assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
            }
        }
    }
}

#[test]
fn connection_caps_heartbeats_and_prompt_reclaim() {
    let dir = TempDir::new("sse-caps");
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", KEY),
            ("SHARDCAST_SERVER_SHARDS", "1"),
            ("SHARDCAST_SSE_MAX_CONNECTIONS", "3"),
            ("SHARDCAST_SSE_MAX_PER_KEY", "2"),
            ("SHARDCAST_SSE_HEARTBEAT_INTERVAL", "200ms"),
        ],
    );
    let mut a = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    let b = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    assert_eq!((a.status, b.status), (200, 200));
    let mut c = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    assert_eq!(c.status, 429, "max_per_key");
    assert!(c.rest().contains("too_many_subscriptions"));
    // Heartbeats reach an idle subscriber.
    a.stream
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 256];
    let mut seen = String::new();
    let until = Instant::now() + Duration::from_secs(3);
    while !seen.contains(":\n\n") && Instant::now() < until {
        if let Ok(n) = std::io::Read::read(&mut a.stream, &mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(seen.contains(":\n\n"), "a heartbeat comment: {seen:?}");
    // A closed subscriber frees its slot promptly, without waiting for a write.
    drop(b);
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let d = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
        if d.status == 200 {
            break;
        }
        assert!(Instant::now() < until, "slot not reclaimed: {}", d.status);
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(a);

    // The process cap, with no per-key cap: 503 with Retry-After beyond it.
    let dir2 = TempDir::new("sse-caps2");
    let s2 = Server::start(
        dir2.path(),
        &[
            ("API_KEY", KEY),
            ("SHARDCAST_SERVER_SHARDS", "1"),
            ("SHARDCAST_SSE_MAX_CONNECTIONS", "2"),
            ("SHARDCAST_SSE_MAX_PER_KEY", "0"),
        ],
    );
    let _x = SseClient::open(s2.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    let _y = SseClient::open(s2.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    let mut z = SseClient::open(s2.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    assert_eq!(z.status, 503);
    assert!(
        z.head.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        z.head
    );
    assert!(z.rest().contains("too_many_subscribers"));
    // Other endpoints are not affected by the SSE cap.
    assert_eq!(s2.get("/health").status, 200);
}

#[test]
fn retention_prunes_old_events_and_catch_up_below_it_is_told() {
    let dir = TempDir::new("sse-retain");
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", KEY),
            ("SHARDCAST_STORAGE_RETAIN_EVENTS", "100"),
            ("SHARDCAST_SSE_RING_EVENTS", "16"),
            ("SHARDCAST_SSE_CLIENT_BUFFER_EVENTS", "16"),
        ],
    );
    for b in 0..3 {
        let evs: Vec<Value> = (0..100)
            .map(|k| json!({"type":"r","id":format!("r-{b}-{k}")}))
            .collect();
        post(&s, &Value::Array(evs));
    }
    // Only the newest 100 stay, in SQLite.
    let stored = stored_ids(&dir.path().join("events.db"));
    assert_eq!(stored.len(), 100);
    assert_eq!(stored[0].0, 201);
    assert_eq!(s.get_with_key("/position", KEY)["position"], 300);
    // A subscriber from below the retained range is told, then gets the rest.
    let mut c = SseClient::open(s.addr, "/events/subscribe?from=1", &[("X-API-Key", KEY)]);
    let reset = c.next().unwrap();
    assert_eq!(reset.event.as_deref(), Some("reset"));
    let v: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(v["reason"], "pruned");
    assert_eq!(v["first_retained"], 201);
    let got = c.until_id(300);
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        (201..=300).collect::<Vec<_>>()
    );
    // A pruned event's id is no longer a duplicate (the idempotency window is
    // the retention); a retained one still is.
    let r = post(&s, &json!({"type":"r","id":"r-2-99"}));
    assert_eq!(r["duplicate"], true);
    let r = post(&s, &json!({"type":"r","id":"r-0-0"}));
    assert!(r.get("duplicate").is_none());
    assert_eq!(r["position"], 301);
}

#[test]
fn sigterm_closes_subscribers_and_exits_promptly() {
    let dir = TempDir::new("sse-term");
    let mut s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    let mut live = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    let mut catching_up =
        SseClient::open(s.addr, "/events/subscribe?from=1", &[("X-API-Key", KEY)]);
    post(&s, &json!({"type":"t"}));
    assert_eq!(id_of(&live.next().unwrap()), 1);
    assert_eq!(id_of(&catching_up.next().unwrap()), 1);
    let started = Instant::now();
    assert!(s.terminate(Duration::from_secs(10)).success());
    // Far sooner than the shutdown timeout (10 s in tests): idle subscribers
    // are closed, not waited for.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(live.next().is_none(), "the stream ends");
    assert!(catching_up.next().is_none());
}
