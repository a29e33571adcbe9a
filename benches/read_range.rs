//! `GET /events` without HTTP: the reader job that scans a page of events
//! out of SQLite and encodes it as the JSON array ebuse's client decodes
//! (`storage::events_range_json`), on a database laid out as the server
//! writes it (same pragmas, WAL, rows inserted by position in 1,000-row
//! transactions, then checkpointed as the checkpoint thread would).
//!
//! Groups (throughput is events per second):
//!
//! * `range/<n>`: pages of 100, 1,000 and 10,000 typical `order.placed`
//!   events (~190 B of JSON each) from a 100,000-event database: the 10,000
//!   page is the `GET /events` figure in docs/benchmarks.md ("Reads").
//! * `range_type/10000`: the same page with a `type=` filter that every
//!   other event matches (the scan reads 20,000 rows).
//!
//! Before timing, each page is decoded with serde_json and checked (count,
//! first and last position), so the benchmark cannot time a wrong answer.
//!
//! ```text
//! cargo bench --bench read_range
//! cargo test --bench read_range        # smoke: every benchmark once, untimed
//! ```

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardcast::config::Config;
use shardcast::event::{Event, NewEvent};
use shardcast::storage;
use std::hint::black_box;

const EVENTS: u64 = 100_000;
const PAGES: &[usize] = &[100, 1_000, 10_000];

struct Db {
    dir: std::path::PathBuf,
    conn: rusqlite::Connection,
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn build() -> Db {
    let dir = std::env::temp_dir().join(format!("shardcast-bench-read-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = Config::default_config().database;
    cfg.path = dir.join("events.db");
    let mut w = storage::open_writer(&cfg).expect("open writer");
    for chunk in 0..EVENTS / 1000 {
        let tx = w.transaction().expect("begin");
        {
            let mut stmt = tx.prepare_cached(storage::INSERT_EVENT).expect("prepare");
            for i in 0..1000 {
                let p = chunk * 1000 + i + 1;
                let e = Event {
                    position: p,
                    stream_version: None,
                    new: NewEvent {
                        id: format!("{:08x}-7c1e-4b8e-9f2a-{:012x}", p * 2654435761 % (1 << 32), p),
                        event_type: if p % 2 == 0 { "order.placed" } else { "order.paid" }
                            .to_string(),
                        data: format!(
                            r#"{{"order_id":{p},"customer":"c-{}","total":39.98,"currency":"EUR"}}"#,
                            p % 977
                        )
                        .into_bytes(),
                        timestamp: "2026-11-23T14:21:59.123456Z".to_string(),
                        stream: None,
                        expected_version: None,
                        metadata: None,
                    },
                };
                storage::insert(&mut stmt, &e).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    w.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .expect("checkpoint");
    drop(w);
    let conn = storage::open_reader(&cfg).expect("open reader");
    Db { dir, conn }
}

fn check(body: &[u8], n: usize, first: u64, step: u64) {
    let v: Vec<serde_json::Value> = serde_json::from_slice(body).expect("page is a JSON array");
    assert_eq!(v.len(), n, "page size");
    assert_eq!(v[0]["position"], first);
    assert_eq!(v[n - 1]["position"], first + (n as u64 - 1) * step);
}

fn read_range(c: &mut Criterion) {
    let db = build();
    let from = 20_001;
    for &n in PAGES {
        let body = storage::events_range_json(&db.conn, from, u64::MAX, None, n, None)
            .unwrap()
            .json;
        check(&body, n, from, 1);
    }
    let body =
        storage::events_range_json(&db.conn, from, u64::MAX, Some("order.placed"), 10_000, None)
            .unwrap()
            .json;
    check(&body, 10_000, from + 1, 2);
    // A token's scope of that one type: the same page, filtered per row in Rust.
    let scope = shardcast::filter::Filter {
        types: vec![shardcast::filter::Pattern::Exact("order.placed".into())],
        streams: Vec::new(),
    };
    let scoped = storage::events_range_json(&db.conn, from, u64::MAX, None, 10_000, Some(&scope))
        .unwrap()
        .json;
    assert_eq!(scoped, body, "a scope of one type reads what type= reads");

    let mut g = c.benchmark_group("range");
    for &n in PAGES {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                storage::events_range_json(&db.conn, black_box(from), u64::MAX, None, n, None)
                    .unwrap()
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("range_type");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("10000", |b| {
        b.iter(|| {
            storage::events_range_json(
                &db.conn,
                black_box(from),
                u64::MAX,
                Some("order.placed"),
                10_000,
                None,
            )
            .unwrap()
        })
    });
    g.bench_function("10000_scoped", |b| {
        b.iter(|| {
            storage::events_range_json(
                &db.conn,
                black_box(from),
                u64::MAX,
                None,
                10_000,
                Some(&scope),
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, read_range);
criterion_main!(benches);
