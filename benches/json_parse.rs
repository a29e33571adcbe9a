//! Request-body parsing: serde_json with `RawValue` spans (the one parser;
//! a simd-json path was measured slower at every size, docs/benchmarks.md,
//! and removed).
//!
//! What is timed is the whole of `event::parse_one` / `event::parse_batch` as
//! the route calls them: JSON parsing, field
//! validation, and building the owned `NewEvent`s (including the per-request
//! timestamp, since the events carry none). Bodies are realistic
//! `order.placed` events with a client-chosen UUID, a stream name, nested
//! `data` (strings, numbers, arrays of objects) and `metadata`.
//!
//! Groups (throughput is bytes of body per second):
//!
//! * `one/<parser>/<size>`: single-event bodies (`POST /events`): the typical
//!   ~200-byte event, then bodies of exactly 512 B .. 64 KiB made by growing
//!   `data` (more line items with names and tags, and a note string holding
//!   escapes and non-ASCII text).
//! * `batch/<parser>/<n>ev`: `POST /events/batch` bodies of `n` typical events,
//!   from 5 events (~1 KiB) through 100 (~20 KiB) to 1,000 (~200 KiB).
//!
//! Before anything is timed, every input is parsed and checked against
//! `serde_json::Value`, so
//! a benchmark cannot quietly time a parser that gives a wrong answer.
//!
//! Run (release build, full measurement; about four minutes):
//!
//! ```text
//! cargo bench --bench json_parse
//! cargo bench --bench json_parse -- one/      # only the single-event bodies
//! ```
//!
//! Criterion prints a confidence interval of the mean; the median of each
//! benchmark is in `target/criterion/<group>/<parser>/<input>/new/estimates.json`.
//!
//! Smoke mode: `cargo test --benches` builds this unoptimised and runs the
//! correctness check and every benchmark exactly once, untimed (a second or
//! two once built; it also runs the library's unit tests, as the lib target
//! is a bench target too). `cargo test --bench json_parse` runs only this
//! file; `cargo bench --bench json_parse -- --test` does the same in release.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardcast::event::{self, NewEvent, Stamp};
use shardcast::ids::IdGen;
use std::fmt::Write as _;
use std::hint::black_box;

/// Most events per batch; the shipped `api.batch_events_max`.
const BATCH_MAX: usize = 1000;

/// Exact sizes, in bytes, of the grown single-event bodies.
const ONE_SIZES: &[usize] = &[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];

/// Events per batch body.
const BATCH_LENS: &[usize] = &[5, 10, 20, 40, 80, 100, 1000];

/// The benchmark ids' parser part (kept so criterion's history lines up).
const PARSER: &str = "serde";

/// A deterministic UUID-shaped id (v4 layout) for event `n`.
fn uuid(n: u64) -> String {
    let x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D;
    let y = x.rotate_left(29).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        x >> 32,
        (x >> 16) & 0xffff,
        x & 0xfff,
        y >> 52,
        y & 0xffff_ffff_ffff
    )
}

/// One line item; `rich` items (used to grow a body) carry a name and tags.
fn item(out: &mut String, n: u64, rich: bool) {
    let _ = write!(
        out,
        r#"{{"sku":"SKU-{:05}","qty":{},"price":{}.{:02}"#,
        (n * 7919) % 100_000,
        1 + n % 4,
        5 + (n * 13) % 90,
        (n * 37) % 100
    );
    if rich {
        let _ = write!(
            out,
            r#","name":"Widget {} (blue, {} cm)","tags":["gift","fragile",{}]"#,
            n % 997,
            10 + n % 50,
            n % 3
        );
    }
    out.push('}');
}

/// One `order.placed` event.
///
/// With `items == 1`, `rich == false`, `note == None` it is ~210 bytes, the
/// typical event. Bodies are grown with more (rich) line items and a `note`
/// string (which holds escapes and non-ASCII text) of `note` more bytes.
fn event_json(n: u64, items: usize, rich: bool, note: Option<usize>) -> String {
    let mut s = String::with_capacity(256 + items * 100 + note.unwrap_or(0));
    let _ = write!(
        s,
        r#"{{"type":"order.placed","data":{{"order_id":{},"items":["#,
        100_000 + n
    );
    for i in 0..items {
        if i > 0 {
            s.push(',');
        }
        item(&mut s, n + i as u64, rich);
    }
    let _ = write!(s, r#"],"total":{}.{:02}"#, 20 + n % 500, n % 100);
    if let Some(len) = note {
        s.push_str(r#","note":"ring \"B\"\n"#);
        let text = " leave at the back door, \u{e9}tage 2; ";
        let mut left = len;
        while left > 0 {
            // Cut on a char boundary; pad a cut-off character with '.'.
            let mut take = left.min(text.len());
            while !text.is_char_boundary(take) {
                take -= 1;
            }
            if take == 0 {
                take = 1;
                s.push('.');
            } else {
                s.push_str(&text[..take]);
            }
            left -= take;
        }
        s.push('"');
    }
    let _ = write!(
        s,
        r#"}},"id":"{}","stream":"order-{}","metadata":{{"src":"web"}}}}"#,
        uuid(n),
        n % 1000
    );
    s
}

/// A single-event body of exactly `size` bytes: as many rich line items as
/// fit, the rest made up by the note.
fn one_of_size(size: usize) -> Vec<u8> {
    let len = |items| event_json(1, items, true, Some(0)).len();
    let mut items = 1;
    while len(items * 2) <= size {
        items *= 2;
    }
    while len(items + 1) <= size {
        items += 1;
    }
    let body = event_json(1, items, true, Some(size - len(items))).into_bytes();
    assert_eq!(body.len(), size);
    body
}

fn batch_of(n: usize) -> Vec<u8> {
    let mut s = String::from("[");
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&event_json(i as u64, 1, false, None));
    }
    s.push(']');
    s.into_bytes()
}

fn parse(body: &[u8], batch: bool, stamp: &mut Stamp) -> Vec<NewEvent> {
    if batch {
        event::parse_batch(body, BATCH_MAX, stamp).expect("batch parses")
    } else {
        vec![event::parse_one(body, stamp).expect("event parses")]
    }
}

/// Check the parsed content once against serde_json's own reading.
fn check(name: &str, body: &[u8], batch: bool, expect_events: usize) {
    let mut stamp = Stamp::new(IdGen::new());
    let events = parse(body, batch, &mut stamp);
    // The events carry no timestamp: each request takes one from the clock.
    for e in &events {
        assert!(e.timestamp.ends_with('Z'), "{name}: {}", e.timestamp);
    }
    assert_eq!(events.len(), expect_events, "{name}");
    let doc: serde_json::Value = serde_json::from_slice(body).unwrap();
    let docs = if batch {
        doc.as_array().unwrap().clone()
    } else {
        vec![doc]
    };
    for (e, d) in events.iter().zip(&docs) {
        assert_eq!(e.event_type, "order.placed");
        assert_eq!(e.id, d["id"].as_str().unwrap());
        assert_eq!(e.stream.as_deref(), d["stream"].as_str());
        let data: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
        assert_eq!(data, d["data"], "{name}: data");
        let meta: serde_json::Value = serde_json::from_slice(e.metadata.as_ref().unwrap()).unwrap();
        assert_eq!(meta, d["metadata"], "{name}: metadata");
    }
}

fn size_label(n: usize) -> String {
    if n >= 1024 && n % 1024 == 0 {
        format!("{}KiB", n / 1024)
    } else {
        format!("{n}B")
    }
}

fn json_parse(c: &mut Criterion) {
    let mut ones: Vec<(String, Vec<u8>)> = vec![];
    let typical = event_json(42, 1, false, None).into_bytes();
    ones.push((format!("{}B_typical", typical.len()), typical));
    for &size in ONE_SIZES {
        ones.push((size_label(size), one_of_size(size)));
    }
    let batches: Vec<(String, Vec<u8>)> = BATCH_LENS
        .iter()
        .map(|&n| (format!("{n}ev"), batch_of(n)))
        .collect();

    for (label, body) in &ones {
        check(label, body, false, 1);
    }
    for ((label, body), &n) in batches.iter().zip(BATCH_LENS) {
        check(label, body, true, n);
    }
    eprintln!("json_parse: every input parses as serde_json reads it; body sizes:");
    for (label, body) in ones.iter().chain(&batches) {
        eprintln!("  {label:>14}: {:>7} bytes", body.len());
    }

    let mut stamp = Stamp::new(IdGen::new());
    for (group, inputs, batch) in [("one", &ones, false), ("batch", &batches, true)] {
        let mut g = c.benchmark_group(group);
        for (label, body) in inputs {
            g.throughput(Throughput::Bytes(body.len() as u64));
            let id = BenchmarkId::new(PARSER, label);
            if batch {
                g.bench_with_input(id, body, |b, body| {
                    b.iter(|| event::parse_batch(black_box(body), BATCH_MAX, &mut stamp))
                });
            } else {
                g.bench_with_input(id, body, |b, body| {
                    b.iter(|| event::parse_one(black_box(body), &mut stamp))
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, json_parse);
criterion_main!(benches);
