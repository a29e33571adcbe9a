//! Durability and recovery with real processes and files: acknowledged events
//! survive `kill -9`; the LMDB index is repaired or rebuilt from SQLite when it
//! is missing or disagrees; SIGTERM drains and exits 0.

use crate::common::*;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Several clients append (single and batch) until told to stop; returns
/// every acknowledged id with the position the server gave it.
fn load(
    s: &Server,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<(String, u64)>>> {
    (0..clients)
        .map(|c| {
            let addr = s.addr;
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut conn = Conn::open(addr);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let batch = n % 3 == 0;
                    let body = if batch {
                        let evs: Vec<_> = (0..10)
                            .map(
                                |k| json!({"type":"b","id":format!("c{c}-{n}-{k}"),"data":{"k":k}}),
                            )
                            .collect();
                        serde_json::to_vec(&evs).unwrap()
                    } else {
                        serde_json::to_vec(
                            &json!({"type":"s","id":format!("c{c}-{n}"),"data":{"n":n}}),
                        )
                        .unwrap()
                    };
                    let req = build_request(
                        "POST",
                        if batch { "/events/batch" } else { "/events" },
                        &[("Content-Type", "application/json")],
                        &body,
                    );
                    if std::io::Write::write_all(&mut conn.stream, &req).is_err() {
                        break;
                    }
                    let Some(r) = conn.read_response() else { break };
                    assert_eq!(r.status, 200, "{}", r.text());
                    let v = r.json();
                    if batch {
                        let first = v["first_position"].as_u64().unwrap();
                        assert_eq!(
                            v["last_position"].as_u64().unwrap(),
                            first + 9,
                            "a batch's positions are contiguous"
                        );
                        for k in 0..10 {
                            acked.push((format!("c{c}-{n}-{k}"), first + k));
                        }
                    } else {
                        acked.push((format!("c{c}-{n}"), v["position"].as_u64().unwrap()));
                    }
                }
                acked
            })
        })
        .collect()
}

#[test]
fn acknowledged_events_survive_kill_9() {
    let dir = TempDir::new("kill9");
    let mut s = Server::start(dir.path(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&s, 8, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    // Kill while the clients are mid-flight: some requests are unanswered.
    s.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<(String, u64)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        acked.len() > 100,
        "the load made progress ({} acked)",
        acked.len()
    );

    // On disk: every acknowledged event at the position it was acknowledged with,
    // and positions contiguous from 1.
    let stored = stored_ids(&dir.path().join("events.db"));
    for (i, (pos, _)) in stored.iter().enumerate() {
        assert_eq!(*pos, i as u64 + 1, "positions are contiguous with no gap");
    }
    let by_id: HashMap<&str, u64> = stored.iter().map(|(p, id)| (id.as_str(), *p)).collect();
    for (id, pos) in &acked {
        assert_eq!(
            by_id.get(id.as_str()),
            Some(pos),
            "acknowledged {id} survives kill -9 at position {pos}"
        );
    }

    // After restart the server agrees, and appends continue after the head.
    s.restart();
    let head = stored.len() as u64;
    assert_eq!(s.get("/position").json()["position"], head);
    let (id, pos) = &acked[acked.len() / 2];
    let r = s.post("/events", &json!({"type":"retry","id":id}).to_string());
    assert_eq!(r.json()["duplicate"], true);
    assert_eq!(r.json()["position"], *pos);
    assert_eq!(
        s.post("/events", r#"{"type":"after"}"#).json()["position"],
        head + 1
    );
}

#[test]
fn sigterm_drains_in_flight_work_and_exits_zero() {
    let dir = TempDir::new("sigterm");
    let mut s = Server::start(dir.path(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&s, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    let status = s.terminate(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    assert!(status.success(), "exit status {status:?}");
    let acked: Vec<(String, u64)> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let stored: HashMap<String, u64> = stored_ids(&dir.path().join("events.db"))
        .into_iter()
        .map(|(p, id)| (id, p))
        .collect();
    for (id, pos) in &acked {
        assert_eq!(stored.get(id), Some(pos));
    }
    assert!(s.stderr().contains("shutdown complete"), "{}", s.stderr());
    // An idle keep-alive connection does not hold shutdown up.
    s.restart();
    let _idle = s.conn();
    let started = std::time::Instant::now();
    assert!(s.terminate(Duration::from_secs(10)).success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connections are closed at once"
    );
}

fn seed(s: &Server) -> (Vec<(String, u64)>, u64) {
    let mut acked = Vec::new();
    for i in 0..50 {
        let r = s.post(
            "/events",
            &json!({"type":"t","id":format!("seed-{i}"),"stream":format!("s{}", i % 5)})
                .to_string(),
        );
        acked.push((format!("seed-{i}"), r.json()["position"].as_u64().unwrap()));
    }
    let r = s.post(
        "/events/batch",
        &serde_json::to_string(
            &(0..100)
                .map(|i| json!({"type":"b","id":format!("bulk-{i}")}))
                .collect::<Vec<_>>(),
        )
        .unwrap(),
    );
    let first = r.json()["first_position"].as_u64().unwrap();
    for i in 0..100 {
        acked.push((format!("bulk-{i}"), first + i));
    }
    (acked, 150)
}

#[test]
fn index_is_rebuilt_when_its_directory_is_deleted() {
    let dir = TempDir::new("rebuild");
    let mut s = Server::start(dir.path(), &[]);
    let (acked, head) = seed(&s);
    assert!(s.terminate(Duration::from_secs(10)).success());
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    s.restart();
    assert_eq!(s.get("/position").json()["position"], head);
    // Idempotency answers come from the rebuilt index.
    for (id, pos) in acked.iter().step_by(7) {
        let r = s.post("/events", &json!({"type":"t","id":id}).to_string());
        assert_eq!(r.json()["duplicate"], true, "{id}");
        assert_eq!(r.json()["position"], *pos);
    }
    // So do stream versions: s0 got events 0,5,10,…,45 → version 10.
    let r = s.post(
        "/events",
        &json!({"type":"t","stream":"s0","expected_version":10}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["stream_version"], 11);
}

#[test]
fn index_ahead_of_sqlite_is_rebuilt_after_sqlite_loses_a_tail() {
    let dir = TempDir::new("tail");
    let mut s = Server::start(dir.path(), &[]);
    let (acked, _) = seed(&s);
    assert!(s.terminate(Duration::from_secs(10)).success());
    // SQLite loses its last 60 events (say, restored from an older backup); the index still has them.
    {
        let db = rusqlite::Connection::open(dir.path().join("events.db")).unwrap();
        db.execute("DELETE FROM events WHERE position > 90", [])
            .unwrap();
    }
    s.restart();
    assert!(s.stderr().contains("ahead of SQLite"), "{}", s.stderr());
    assert_eq!(s.get("/position").json()["position"], 90);
    // An id from the lost tail is new again and takes the next position…
    let lost = &acked.iter().find(|(_, p)| *p == 120).unwrap().0;
    let r = s.post("/events", &json!({"type":"t","id":lost}).to_string());
    assert!(r.json().get("duplicate").is_none(), "{}", r.text());
    assert_eq!(r.json()["position"], 91);
    // …while a kept one is still a duplicate.
    let kept = &acked.iter().find(|(_, p)| *p == 10).unwrap().0;
    assert_eq!(
        s.post("/events", &json!({"type":"t","id":kept}).to_string())
            .json()["position"],
        10
    );
}

#[test]
fn index_behind_sqlite_is_caught_up() {
    let dir = TempDir::new("behind");
    let mut s = Server::start(dir.path(), &[]);
    seed(&s);
    assert!(s.terminate(Duration::from_secs(10)).success());
    // Events committed to SQLite that the index never saw (a crash between the two commits).
    {
        let db = rusqlite::Connection::open(dir.path().join("events.db")).unwrap();
        for p in 151..=160 {
            db.execute(
                "INSERT INTO events (position, id, type, data, timestamp) VALUES (?1, ?2, 't', 'null', '2024-01-01T00:00:00Z')",
                rusqlite::params![p, format!("late-{p}")],
            )
            .unwrap();
        }
    }
    s.restart();
    assert!(s.stderr().contains("index caught up"), "{}", s.stderr());
    assert_eq!(s.get("/position").json()["position"], 160);
    assert_eq!(
        s.post("/events", r#"{"type":"t","id":"late-155"}"#).json()["position"],
        155
    );
}

#[test]
fn a_corrupt_index_is_rebuilt() {
    let dir = TempDir::new("corrupt");
    let mut s = Server::start(dir.path(), &[]);
    seed(&s);
    assert!(s.terminate(Duration::from_secs(10)).success());
    std::fs::write(
        dir.path().join("index").join("data.mdb"),
        vec![0xA5u8; 64 * 1024],
    )
    .unwrap();
    s.restart();
    assert!(s.stderr().contains("rebuil"), "{}", s.stderr());
    assert_eq!(s.get("/position").json()["position"], 150);
    assert_eq!(
        s.post("/events", r#"{"type":"t","id":"seed-3"}"#).json()["position"],
        4
    );
}

#[test]
fn concurrent_writers_get_unique_contiguous_positions() {
    let dir = TempDir::new("contig");
    let s = Server::start(dir.path(), &[]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = s.addr;
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(addr);
                for i in 0..100 {
                    let r = c.request(
                        "POST",
                        "/events",
                        &[],
                        format!(r#"{{"type":"t","data":"{t}-{i}"}}"#).as_bytes(),
                    );
                    seen.lock()
                        .unwrap()
                        .push(r.json()["position"].as_u64().unwrap());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut v = seen.lock().unwrap().clone();
    v.sort();
    assert_eq!(v, (1..=800).collect::<Vec<u64>>());
}

#[test]
fn the_wal_stays_bounded_under_sustained_writes() {
    // SQLite's inline autocheckpoint is off on the writer; the checkpoint
    // thread must keep the WAL near journal_size_limit on its own, under
    // continuous writes. (How short the writer's pauses are is a latency
    // matter, measured by scripts/bench-ingest.sh, not asserted here.)
    let dir = TempDir::new("wal");
    let limit: u64 = 1 << 20;
    let s = Server::start(
        dir.path(),
        &[
            ("SHARDCAST_DATABASE_WAL_AUTOCHECKPOINT", "64"),
            ("SHARDCAST_DATABASE_JOURNAL_SIZE_LIMIT", &limit.to_string()),
        ],
    );
    let wal = dir.path().join("events.db-wal");
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&s, 4, stop.clone());
    let pad = "x".repeat(2000);
    let mut conn = s.conn();
    let mut largest = 0u64;
    let mut written = 0usize;
    // ~40 MiB through a WAL allowed to hold ~1 MiB (plus what one round adds).
    for i in 0..200 {
        let evs: Vec<_> = (0..100)
            .map(|k| json!({"type":"pad","id":format!("p{i}-{k}"),"data":{"pad":pad}}))
            .collect();
        let r = conn.request(
            "POST",
            "/events/batch",
            &[("Content-Type", "application/json")],
            &serde_json::to_vec(&evs).unwrap(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        written += 100;
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
    }
    stop.store(true, Ordering::Relaxed);
    let acked: usize = clients.into_iter().map(|c| c.join().unwrap().len()).sum();
    assert!(
        largest < 16 * limit,
        "WAL reached {largest} bytes with journal_size_limit {limit}"
    );
    let head = s.get("/position").json()["position"].as_u64().unwrap() as usize;
    assert_eq!(head, written + acked, "every acknowledged event is stored");
    assert_eq!(stored_ids(&dir.path().join("events.db")).len(), head);
}
