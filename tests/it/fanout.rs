//! Fan-out to many subscribers following a few types each, against the
//! real binary: each gets exactly its events, gap-free across reconnects
//! while publishing; prefix filters live and in catch-up; a subscriber of a
//! quiet type stays connected through heavy traffic of other types and gets
//! its next event promptly; bad patterns are refused.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Room for many client sockets in this test process.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

fn batch(s: &Server, evs: Vec<Value>) -> (u64, u64) {
    let r = s.conn().post_json("/events/batch", "", &Value::Array(evs));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    (
        v["first_position"].as_u64().unwrap(),
        v["last_position"].as_u64().unwrap(),
    )
}

fn id_of(m: &SseMessage) -> u64 {
    m.id.as_deref().unwrap().parse().unwrap()
}

#[test]
fn a_thousand_subscribers_on_a_hundred_types_get_exactly_their_events() {
    raise_nofile();
    let dir = TempDir::new("fanout-1000");
    let s = Server::start(
        dir.path(),
        &[
            ("SHARDCAST_SSE_MAX_PER_KEY", "0"),
            ("SHARDCAST_SSE_CLIENT_BUFFER_EVENTS", "4096"),
        ],
    );
    const SUBS: usize = 1000;
    const TYPES: usize = 100;
    let mut subs: Vec<(usize, SseClient)> = (0..SUBS)
        .map(|i| {
            let c = SseClient::open(
                s.addr,
                &format!("/events/subscribe?types=t{}", i % TYPES),
                &[],
            );
            assert_eq!(c.status, 200);
            (i % TYPES, c)
        })
        .collect();
    // Positions of each type, as acknowledged.
    let mut of_type: HashMap<usize, Vec<u64>> = HashMap::new();
    let publish = |of_type: &mut HashMap<usize, Vec<u64>>, round: usize| {
        let evs: Vec<Value> = (0..500)
            .map(|n| json!({"type": format!("t{}", (n * 7 + round) % TYPES), "data": {"r": round, "n": n}}))
            .collect();
        let types: Vec<usize> = (0..500).map(|n| (n * 7 + round) % TYPES).collect();
        let (first, _) = batch(&s, evs);
        for (k, t) in types.into_iter().enumerate() {
            of_type.entry(t).or_default().push(first + k as u64);
        }
    };
    publish(&mut of_type, 0);
    publish(&mut of_type, 1);
    // Every tenth subscriber leaves in the middle of the traffic and comes
    // back with Last-Event-ID.
    let mut received: Vec<Vec<u64>> = vec![Vec::new(); SUBS];
    for (i, (t, c)) in subs.iter_mut().enumerate() {
        if i % 10 == 0 {
            let want = of_type[t].len().min(3);
            for _ in 0..want {
                received[i].push(id_of(&c.next().unwrap()));
            }
        }
    }
    for (i, (t, c)) in subs.iter_mut().enumerate() {
        if i % 10 == 0 {
            let last = *received[i].last().unwrap();
            *c = SseClient::open(
                s.addr,
                &format!("/events/subscribe?types=t{t}"),
                &[("Last-Event-ID", &last.to_string())],
            );
        }
    }
    publish(&mut of_type, 2);
    publish(&mut of_type, 3);
    for (i, (t, c)) in subs.iter_mut().enumerate() {
        let want = &of_type[t];
        while received[i].len() < want.len() {
            let m = c.next().expect("a message");
            assert_eq!(
                m.event.as_deref(),
                Some(format!("t{t}").as_str()),
                "subscriber {i}"
            );
            received[i].push(id_of(&m));
        }
        assert_eq!(
            &received[i], want,
            "subscriber {i} (t{t}): every position once, in order"
        );
    }
}

#[test]
fn prefix_filters_live_and_in_catch_up() {
    let dir = TempDir::new("fanout-prefix");
    let s = Server::start(dir.path(), &[]);
    let evs = |tag: &str| {
        vec![
            json!({"type":"order.placed","stream":"cart-1","data":tag}),
            json!({"type":"user.created","stream":"user-1","data":tag}),
            json!({"type":"order.paid","stream":"cart-2","data":tag}),
            json!({"type":"orders","stream":"x","data":tag}),
        ]
    };
    batch(&s, evs("old")); // positions 1..=4
    let mut live = SseClient::open(s.addr, "/events/subscribe?types=order.*", &[]);
    let mut mixed = SseClient::open(s.addr, "/events/subscribe?types=order.*,user.created", &[]);
    let mut by_stream = SseClient::open(s.addr, "/events/subscribe?stream=cart-*", &[]);
    let mut both = SseClient::open(
        s.addr,
        "/events/subscribe?types=order.paid&stream=cart-*",
        &[],
    );
    batch(&s, evs("new")); // 5..=8
    assert_eq!(
        live.until_id(7).iter().map(id_of).collect::<Vec<_>>(),
        vec![5, 7]
    );
    assert_eq!(
        mixed.until_id(7).iter().map(id_of).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert_eq!(
        by_stream.until_id(7).iter().map(id_of).collect::<Vec<_>>(),
        vec![5, 7]
    );
    assert_eq!(
        both.until_id(7).iter().map(id_of).collect::<Vec<_>>(),
        vec![7]
    );
    // From the start: the catch-up (from SQLite) filters the same way.
    let mut from = SseClient::open(s.addr, "/events/subscribe?types=order.*&from=1", &[]);
    assert_eq!(
        from.until_id(7).iter().map(id_of).collect::<Vec<_>>(),
        vec![1, 3, 5, 7]
    );
    // A '*' anywhere but the end is refused.
    for q in ["types=or*der", "types=a,*b", "stream=**"] {
        let mut bad = SseClient::open(s.addr, &format!("/events/subscribe?{q}"), &[]);
        assert_eq!(bad.status, 400, "{q}");
        assert!(bad.rest().contains("invalid_parameter"), "{q}");
    }
}

#[test]
fn a_quiet_subscriber_stays_through_heavy_traffic_and_gets_its_event_promptly() {
    let dir = TempDir::new("fanout-quiet");
    let s = Server::start(
        dir.path(),
        &[
            ("SHARDCAST_SSE_RING_EVENTS", "1000"),
            ("SHARDCAST_SSE_MAX_PER_KEY", "0"),
        ],
    );
    let mut quiet = SseClient::open(s.addr, "/events/subscribe?types=rare", &[]);
    let mut busy = SseClient::open(s.addr, "/events/subscribe?types=noise", &[]);
    // 20,000 events of other types: twenty times the ring.
    let mut last_noise = 0;
    for r in 0..20 {
        let evs: Vec<Value> = (0..1000)
            .map(|n| json!({"type":"noise","data":{"r":r,"n":n}}))
            .collect();
        last_noise = batch(&s, evs).1;
    }
    busy.until_id(last_noise);
    let t0 = Instant::now();
    let (rare, _) = batch(&s, vec![json!({"type":"rare","data":1})]);
    quiet
        .stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let m = quiet
        .next()
        .expect("the quiet subscriber is still connected");
    let took = t0.elapsed();
    assert_eq!(id_of(&m), rare);
    assert_eq!(m.event.as_deref(), Some("rare"));
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Not one noise event reached it.
    let mut again = SseClient::open(s.addr, "/events/subscribe?types=rare&from=1", &[]);
    assert_eq!(again.until_id(rare).len(), 1);
}
