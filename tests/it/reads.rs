//! Reading back, as ebuse's Go client does it: `Load` (GET /events),
//! `SaveSubscriptionPosition` and `LoadSubscriptionPosition`.

use crate::common::*;
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
    let r = s.conn().post_json("/events/batch", KEY, &Value::Array(evs));
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

fn positions(page: &Value) -> Vec<u64> {
    page.as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect()
}

/// Pages of 2,000+ events are read as parallel parts on the reader pool
/// (`reader::PAGE_SPLIT_MIN_EVENTS`); the joined answer must be exactly the
/// single scan's, including when retention has pruned part of the range.
#[test]
fn large_pages_read_in_parts_equal_one_scan_even_after_pruning() {
    let dir = TempDir::new("load-parts");
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", KEY),
            ("SHARDCAST_DATABASE_READ_CONNECTIONS", "3"),
            ("SHARDCAST_STORAGE_RETAIN_EVENTS", "9000"),
        ],
    );
    for _ in 0..7 {
        seed(&s, 1000);
    }
    // 7,000 events, a default page: three parts of 2,334/2,333/2,333.
    let all = get(&s, "/events?from=1").json();
    assert_eq!(positions(&all), (1..=7000).collect::<Vec<_>>());
    assert_eq!(all[6999]["data"], json!({"i": 1000}));
    // An odd window inside the range, and one that ends past the head.
    assert_eq!(
        positions(&get(&s, "/events?from=1234&limit=4321").json()),
        (1234..=5554).collect::<Vec<_>>()
    );
    assert_eq!(
        positions(&get(&s, "/events?from=3001&to=99999").json()),
        (3001..=7000).collect::<Vec<_>>()
    );
    // The split must not change what a filter or gzip gives either.
    let fizz = get(&s, "/events?from=1&type=fizz").json();
    assert_eq!(fizz.as_array().unwrap().len(), 7 * 334);
    // Prune: 12,000 stored with 9,000 retained leaves 3,001..=12,000. A page
    // from 1 would split at the positions 1.. whose first part is gone: the
    // answer is still the next 10,000 that exist.
    for _ in 0..5 {
        seed(&s, 1000);
    }
    let after = get(&s, "/events?from=1").json();
    let got = positions(&after);
    let low = got[0];
    assert!(low > 1 && low <= 3001, "pruned from the bottom: {low}");
    assert_eq!(got, (low..=12000).collect::<Vec<_>>());
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
    // A consumer's position is its own: beyond the head is stored (as ebuse
    // does), negative is refused, and `{}` stores 0.
    let set_pos = |id: &str, body: &[u8]| {
        s.conn().request(
            "POST",
            &format!("/subscriptions/{id}/position"),
            &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
            body,
        )
    };
    let get_pos = |id: &str| {
        s.conn()
            .request(
                "GET",
                &format!("/subscriptions/{id}/position"),
                &[("X-API-Key", KEY)],
                b"",
            )
            .json()
    };
    assert_eq!(set_pos("ahead", br#"{"position":10000}"#).status, 204);
    assert_eq!(get_pos("ahead"), serde_json::json!({"position": 10000}));
    let r = set_pos("ahead", br#"{"position":-5}"#);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_parameter")
    );
    assert_eq!(get_pos("ahead"), serde_json::json!({"position": 10000}));
    assert_eq!(set_pos("ahead", b"{}").status, 204);
    assert_eq!(get_pos("ahead"), serde_json::json!({"position": 0}));
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

/// RssAnon of a process: heap and stacks, not the mmap'd database pages.
fn rss_anon_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// Read a chunked answer's body as it comes, handing each chunk to `each`;
/// `pause` between reads simulates a slow client.
fn read_chunked(conn: &mut Conn, pause: Duration, mut each: impl FnMut(&[u8])) -> String {
    use std::io::Read;
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 64 * 1024];
    let mut fill = |buf: &mut Vec<u8>| {
        std::thread::sleep(pause);
        let n = conn.stream.read(&mut tmp).unwrap();
        assert!(n > 0, "closed mid-answer");
        buf.extend_from_slice(&tmp[..n]);
    };
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        fill(&mut buf);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end + 4);
    loop {
        let line_end = loop {
            if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
                break p;
            }
            fill(&mut buf);
        };
        let len =
            usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap(), 16).unwrap();
        buf.drain(..line_end + 2);
        while buf.len() < len + 2 {
            fill(&mut buf);
        }
        if len == 0 {
            buf.drain(..2);
            return head;
        }
        each(&buf[..len]);
        buf.drain(..len + 2);
    }
}

#[test]
fn a_million_event_replay_keeps_memory_flat_and_a_slow_reader_blocks_no_one() {
    let dir = TempDir::new("stream");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    let total = 1_000_000usize;
    let pad = "p".repeat(40);
    let mut conn = s.conn();
    for b in 0..total / 1000 {
        let evs: Vec<Value> = (0..1000)
            .map(|i| json!({"type":"s","data":{"n": b * 1000 + i, "pad": pad}}))
            .collect();
        let r = conn.post_json("/events/batch", KEY, &Value::Array(evs));
        assert_eq!(r.status, 200);
    }
    // The server's heap is sampled through the replay; what is allocated once
    // (reader threads' caches, allocator pools) is there after the first
    // pages, and from then on it must not grow with what is streamed.
    conn.send_raw(&build_request(
        "GET",
        "/events/stream?from=1&batch_size=5000",
        &[("X-API-Key", KEY)],
        b"",
    ));
    let mut bytes = 0usize;
    let mut count = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    let mut chunks = 0;
    let mut warm: Option<u64> = None;
    let mut peak = 0;
    let head = read_chunked(&mut conn, Duration::ZERO, |c| {
        bytes += c.len();
        count += count_positions(c);
        tail.extend_from_slice(c);
        let cut = tail.len().saturating_sub(200);
        tail.drain(..cut);
        chunks += 1;
        if chunks % 10 == 0 {
            let now = rss_anon_kib(s.pid());
            match warm {
                None if count >= total / 10 => warm = Some(now),
                Some(_) => peak = peak.max(now),
                None => {}
            }
        }
    });
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert_eq!(count, total, "every event, once");
    assert!(String::from_utf8_lossy(&tail).ends_with("}]"));
    let warm = warm.unwrap();
    // ~130 MB went through after the warm-up point; the heap may hold a page or two.
    assert!(bytes > 100 << 20, "{bytes}");
    assert!(
        peak.saturating_sub(warm) < 16 * 1024,
        "server heap grew {} KiB over the replay of {} KiB",
        peak.saturating_sub(warm),
        bytes / 1024
    );
    // The connection is reusable after a replay.
    let r = conn.request("GET", "/position", &[("X-API-Key", KEY)], b"");
    assert_eq!(r.json()["position"], total as u64);

    // A reader that barely reads does not hold up a POST (1 shard: same shard).
    let mut slow = s.conn();
    slow.send_raw(&build_request(
        "GET",
        "/events/stream?from=1",
        &[("X-API-Key", KEY)],
        b"",
    ));
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let r = s.conn().request(
        "POST",
        "/events",
        &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
        br#"{"type":"while-streaming"}"#,
    );
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // It still gets everything, in its own time (only up to the head when it asked).
    let mut n = 0usize;
    read_chunked(&mut slow, Duration::from_micros(200), |c| {
        n += count_positions(c);
    });
    assert_eq!(n, total);
    // Bad parameters.
    for q in ["from=x", "batch_size=0", "batch_size=5001"] {
        let r = s.conn().request(
            "GET",
            &format!("/events/stream?{q}"),
            &[("X-API-Key", KEY)],
            b"",
        );
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (400, "invalid_parameter"),
            "{q}"
        );
    }
}

fn count_positions(c: &[u8]) -> usize {
    let needle = b"\"position\":";
    c.windows(needle.len()).filter(|w| w == needle).count()
}

#[test]
fn one_stream_in_version_order() {
    let dir = TempDir::new("streams");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    // Two interleaved streams and events with none.
    for i in 0..30 {
        let stream = if i % 2 == 0 { "order 7" } else { "order-8" };
        let r = s.conn().request(
            "POST",
            "/events",
            &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
            json!({"type":"step","stream":stream,"data":{"i":i}})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(r.status, 200);
        seed(&s, 1);
    }
    let v = get(&s, "/streams/order%207").json();
    let v = v.as_array().unwrap();
    assert_eq!(v.len(), 15);
    let versions: Vec<u64> = v
        .iter()
        .map(|e| e["stream_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, (1..=15).collect::<Vec<_>>());
    assert!(v.iter().all(|e| e["stream"] == "order 7"));
    let page = get(&s, "/streams/order-8?from_version=14&limit=5").json();
    let versions: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream_version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, vec![14, 15]);
    assert_eq!(get(&s, "/streams/nobody").json(), json!([]));
    // The (stream, version) index lives in LMDB: rebuilt from SQLite when lost.
    let mut s = s;
    assert!(s.terminate(Duration::from_secs(10)).success());
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    s.restart();
    let again = get(&s, "/streams/order-8?from_version=14&limit=5").json();
    assert_eq!(again, page);
    let r = get(&s, "/streams/order-8?limit=0");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_parameter")
    );
    assert_eq!(s.get("/streams/order-8").status, 401);
}

#[test]
fn gzip_round_trip_when_accepted_and_large_enough() {
    use std::io::Read;
    let dir = TempDir::new("gzip");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    seed(&s, 500);
    let plain = get(&s, "/events?from=1");
    assert!(plain.header("content-encoding").is_none());
    let r = s.conn().request(
        "GET",
        "/events?from=1",
        &[
            ("X-API-Key", KEY),
            ("Accept-Encoding", "br;q=1.0, gzip;q=0.8"),
        ],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert!(
        r.body.len() * 3 < plain.body.len(),
        "{} vs {}",
        r.body.len(),
        plain.body.len()
    );
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&r.body[..])
        .read_to_end(&mut unzipped)
        .unwrap();
    assert_eq!(unzipped, plain.body, "the same JSON");
    // Small answers and refusing clients get it plain.
    let small = s.conn().request(
        "GET",
        "/events?from=1&limit=1",
        &[("X-API-Key", KEY), ("Accept-Encoding", "gzip")],
        b"",
    );
    assert!(small.header("content-encoding").is_none());
    let refused = s.conn().request(
        "GET",
        "/events?from=1",
        &[("X-API-Key", KEY), ("Accept-Encoding", "gzip;q=0")],
        b"",
    );
    assert!(refused.header("content-encoding").is_none());
    // ebuse's ENABLE_GZIP=false turns it off.
    let dir2 = TempDir::new("gzip-off");
    let s2 = Server::start(dir2.path(), &[("API_KEY", KEY), ("ENABLE_GZIP", "false")]);
    seed(&s2, 500);
    let r = s2.conn().request(
        "GET",
        "/events?from=1",
        &[("X-API-Key", KEY), ("Accept-Encoding", "gzip")],
        b"",
    );
    assert!(r.header("content-encoding").is_none());
}
