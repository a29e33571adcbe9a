//! Coming from ebuse: the requests ebuse's client and curl send get ebuse's
//! answers; an ebuse database is refused untouched, then imported
//! (`shardcast import`) with its positions, timestamps and consumer
//! positions; an import from a running server over HTTP; an import
//! interrupted (kill -9) and resumed; a target that is not a prefix refused.
//!
//! ebuse itself needs Go 1.24 (this box has 1.19), so its database is made
//! here from its published schema (internal/store/sqlite.go), as its SQLite
//! drivers write it.

use crate::common::*;
use serde_json::{json, Value};
use sha2::Digest;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const KEY: &str = "ebuse-key-0123456789";

/// ebuse's schema, as `createTables` in its internal/store/sqlite.go makes it.
const EBUSE_SCHEMA: &str = "
PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS events (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    data BLOB NOT NULL,
    timestamp DATETIME NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_events_type_position ON events(type, position);
CREATE INDEX IF NOT EXISTS idx_events_timestamp ON events(timestamp);
CREATE INDEX IF NOT EXISTS idx_events_position_type ON events(position, type) WHERE position > 0;
CREATE TABLE IF NOT EXISTS subscriptions (
    subscription_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
ANALYZE;
";

/// The timestamp ebuse's drivers store for event `n`, and what shardcast
/// serves for it: the driver's text form and `time.Time.String()` alternate.
fn ebuse_time(n: u64) -> (String, String) {
    let (s, ns) = (n % 60, n * 1000 % 1_000_000_000);
    if n % 2 == 0 {
        (
            format!("2025-06-01 12:00:{s:02}.{ns:09}+02:00"),
            format!("2025-06-01T10:00:{s:02}.{}Z", frac(ns)),
        )
    } else {
        (
            format!("2025-06-01 10:00:{s:02}.{ns:09} +0000 UTC m=+{n}.5"),
            format!("2025-06-01T10:00:{s:02}.{}Z", frac(ns)),
        )
    }
}

/// RFC 3339 fraction as shardcast writes it (trailing zeros dropped).
fn frac(ns: u64) -> String {
    let f = format!("{ns:09}");
    let f = f.trim_end_matches('0');
    if f.is_empty() {
        "0".into()
    } else {
        f.into()
    }
}

/// An ebuse database with `n` events and two consumer positions, written
/// and closed (checkpointed) as ebuse leaves it.
fn make_ebuse_db(path: &Path, from: u64, n: u64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(EBUSE_SCHEMA).unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for i in from..from + n {
        let (ts, _) = ebuse_time(i);
        tx.execute(
            "INSERT INTO events (type, data, timestamp) VALUES (?1, ?2, ?3)",
            rusqlite::params![
                format!("order.{}", ["placed", "paid", "shipped"][i as usize % 3]),
                format!(r#"{{"n":{i},"note":"caf\u00e9 \n ok"}}"#).into_bytes(),
                ts
            ],
        )
        .unwrap();
    }
    tx.execute(
        "INSERT OR REPLACE INTO subscriptions (subscription_id, position) VALUES ('projector', ?1), ('far-ahead', 999999)",
        [((from + n) / 2) as i64],
    )
    .unwrap();
    tx.commit().unwrap();
    drop(conn);
}

fn sha(path: &Path) -> Vec<u8> {
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// `shardcast import …` with the target at `db`.
fn import(db: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("import")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DB_PATH", db)
        .output()
        .expect("run shardcast import")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// All events of a server as ebuse's client loads them: `Load(1, head)`.
fn load_all(s: &Server, key: Option<&str>) -> Vec<Value> {
    let headers: Vec<(&str, &str)> = key.map(|k| ("X-API-Key", k)).into_iter().collect();
    let head = s.conn().request("GET", "/position", &headers, b"").json()["position"]
        .as_u64()
        .unwrap();
    let r = s
        .conn()
        .request("GET", &format!("/events?from=1&to={head}"), &headers, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().as_array().unwrap().clone()
}

#[test]
fn an_ebuse_database_is_refused_untouched_then_imported_whole() {
    let dir = TempDir::new("ebuse-import");
    let source = dir.path().join("ebuse.db");
    make_ebuse_db(&source, 1, 2500);
    let before = sha(&source);

    // Served in place? Never: a clear error naming the import, the file as it was.
    let log = dir.path().join("refused.log");
    let mut child = Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("DB_PATH", &source)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            child.try_wait().unwrap()
        })
        .unwrap_or_else(|| {
            let _ = child.kill();
            panic!("shardcast served an ebuse database")
        });
    assert!(!status.success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("is an ebuse database"), "{said}");
    assert!(
        said.contains("shardcast import --from-ebuse-sqlite"),
        "{said}"
    );
    assert_eq!(sha(&source), before, "the ebuse file was written to");

    // Imported into a new store: positions, types, data, timestamps and
    // consumer positions as ebuse has them.
    let target = dir.path().join("data").join("events.db");
    let out = import(
        &target,
        &[
            "--from-ebuse-sqlite",
            source.to_str().unwrap(),
            "--batch",
            "700",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("2500 events imported (0 were already there), head 2500, 2 consumer positions; verified"),
        "{}",
        text(&out)
    );
    assert_eq!(sha(&source), before, "the import wrote to its source");

    let s = Server::start(
        dir.path(),
        &[("DB_PATH", target.to_str().unwrap()), ("API_KEY", KEY)],
    );
    let events = load_all(&s, Some(KEY));
    assert_eq!(events.len(), 2500);
    for (i, e) in events.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(e["position"], n);
        assert_eq!(
            e["type"],
            format!("order.{}", ["placed", "paid", "shipped"][n as usize % 3])
        );
        assert_eq!(e["data"], json!({"n": n, "note": "café \n ok"}));
        assert_eq!(e["timestamp"], ebuse_time(n).1, "event {n}");
    }
    let pos = |id: &str| {
        s.get_with_key(&format!("/subscriptions/{id}/position"), KEY)["position"].clone()
    };
    assert_eq!(pos("projector"), 1250);
    assert_eq!(pos("far-ahead"), 999999);
    // Appends go on from the imported head; SSE catch-up serves imported events.
    let r = s
        .conn()
        .post_json("/events", KEY, &json!({"type":"after.import"}));
    assert_eq!(r.json()["position"], 2501);
    let mut sse = SseClient::open(
        s.addr,
        "/events/subscribe?from=2499&types=order.*",
        &[("X-API-Key", KEY)],
    );
    let m = sse.next().unwrap();
    assert_eq!(m.id.as_deref(), Some("2499"));
}

#[test]
fn an_import_resumes_after_kill_9_and_refuses_a_target_it_did_not_make() {
    let dir = TempDir::new("ebuse-resume");
    let source = dir.path().join("ebuse.db");
    make_ebuse_db(&source, 1, 30_000);
    let target = dir.path().join("t").join("events.db");

    // One event per transaction, killed partway.
    let mut child = Command::new(BIN)
        .args([
            "import",
            "--from-ebuse-sqlite",
            source.to_str().unwrap(),
            "--batch",
            "1",
        ])
        .env_clear()
        .env("DB_PATH", &target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let count = |db: &Path| -> u64 {
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0)))
            .map_or(0, |n| n as u64)
    };
    let mut waited = 0;
    while count(&target) < 100 && waited < 600 {
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    child.kill().unwrap(); // SIGKILL, mid-import
    let _ = child.wait();
    let before = count(&target);
    assert!((100..30_000).contains(&before), "killed at {before}");
    let out = import(&target, &["--from-ebuse-sqlite", source.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "{} events imported ({before} were already there), head 30000",
            30_000 - before
        )),
        "{said}"
    );

    // The source grew: a second run takes only the new events.
    {
        let conn = rusqlite::Connection::open(&source).unwrap();
        for i in 30_001..=30_500u64 {
            conn.execute(
                "INSERT INTO events (type, data, timestamp) VALUES ('late', '{}', ?1)",
                [ebuse_time(i).0],
            )
            .unwrap();
        }
    }
    let out = import(&target, &["--from-ebuse-sqlite", source.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("500 events imported (30000 were already there), head 30500"),
        "{}",
        text(&out)
    );
    let stored = stored_ids(&target);
    assert_eq!(stored.len(), 30_500);
    assert!(stored
        .iter()
        .enumerate()
        .all(|(i, (p, _))| *p == i as u64 + 1));

    // A store with other events is not a prefix of this source: refused, untouched.
    let other = TempDir::new("ebuse-other");
    let mut s = Server::start(other.path(), &[]);
    for _ in 0..3 {
        assert_eq!(s.post("/events", r#"{"type":"mine"}"#).status, 200);
    }
    assert!(s.terminate(Duration::from_secs(10)).success());
    let theirs = other.path().join("events.db");
    let out = import(&theirs, &["--from-ebuse-sqlite", source.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not a prefix"), "{}", text(&out));
    assert_eq!(stored_ids(&theirs).len(), 3);
}

#[test]
fn import_over_http_from_a_running_server_keeps_ids_streams_and_consumers() {
    let dir = TempDir::new("import-http");
    let s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    let mut c = s.conn();
    for b in 0..3 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| json!({"type":"t","id":format!("e-{b}-{i}"),"stream":format!("s-{}", i % 7),"data":{"i":i},"metadata":{"b":b}}))
            .collect();
        assert_eq!(
            c.post_json("/events/batch", KEY, &Value::Array(batch))
                .status,
            200
        );
    }
    let r = c.post_json(
        "/subscriptions/worker/position",
        KEY,
        &json!({"position": 1234}),
    );
    assert_eq!(r.status, 204);

    let target = dir.path().join("copy").join("events.db");
    let url = format!("http://{}", s.addr);
    let out = import(
        &target,
        &[
            "--from-url",
            &url,
            "--api-key",
            KEY,
            "--subscription",
            "worker",
            "--batch",
            "400",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("3000 events imported"),
        "{}",
        text(&out)
    );

    let copy_dir = dir.path().join("copy");
    let copy = Server::start(
        &copy_dir,
        &[("DB_PATH", target.to_str().unwrap()), ("API_KEY", KEY)],
    );
    assert_eq!(load_all(&copy, Some(KEY)), load_all(&s, Some(KEY)));
    assert_eq!(
        copy.get_with_key("/subscriptions/worker/position", KEY)["position"],
        1234
    );
    // Streams came along with their versions: a stream read and an
    // expected_version check see the same history.
    assert_eq!(
        copy.get_with_key("/streams/s-3", KEY),
        s.get_with_key("/streams/s-3", KEY)
    );
    let r = copy.conn().post_json(
        "/events",
        KEY,
        &json!({"type":"t","stream":"s-3","expected_version":429}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn ebuse_clients_requests_get_ebuse_answers() {
    let dir = TempDir::new("ebuse-wire");
    // ebuse's own test keys are short; ebuse's RATE_LIMIT=0 RATE_BURST=0 starts.
    let s = Server::start(dir.path(), &[("API_KEY", "abc"), ("RATE_BURST", "0")]);
    assert!(
        s.stderr().contains("API key shorter than 8 bytes"),
        "{}",
        s.stderr()
    );
    assert!(!s.stderr().contains("abc"), "the key itself was logged");
    let mut c = s.conn();
    for b in 0..15 {
        let batch: Vec<Value> = (0..1000)
            .map(|i| json!({"type":"bulk","data":{"b":b,"i":i}}))
            .collect();
        assert_eq!(
            c.post_json("/events/batch", "abc", &Value::Array(batch))
                .status,
            200
        );
    }
    // Load(1, 15000): the whole range, not 10,000 of it.
    let r = c.request(
        "GET",
        "/events?from=1&to=15000",
        &[("X-API-Key", "abc")],
        b"",
    );
    assert_eq!(r.status, 200);
    let all = r.json();
    assert_eq!(all.as_array().unwrap().len(), 15000);
    assert_eq!(all[14999]["position"], 15000);
    // Without `to`: ebuse's cap of 10,000, and the answer says where the rest starts.
    let r = c.request("GET", "/events?from=1", &[("X-API-Key", "abc")], b"");
    assert_eq!(r.json().as_array().unwrap().len(), 10000);
    assert_eq!(r.header("X-Next-From"), Some("10001"));
    assert!(
        r.header("Link").unwrap().contains("from=10001"),
        "{:?}",
        r.header("Link")
    );
    let r = c.request(
        "GET",
        "/events?from=14991&limit=10",
        &[("X-API-Key", "abc")],
        b"",
    );
    assert_eq!(r.header("X-Next-From"), None, "nothing after the last page");
    let r = c.request(
        "GET",
        "/events?from=1&to=30&limit=10&type=bulk",
        &[("X-API-Key", "abc")],
        b"",
    );
    assert_eq!(r.header("X-Next-From"), Some("11"));
    // A bare key in Authorization, and curl's form content type.
    let r = c.request(
        "POST",
        "/events",
        &[
            ("Authorization", "abc"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        br#"{"type":"curl","timestamp":"0001-01-01T00:00:00.000000001Z"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["timestamp"], "0001-01-01T00:00:00.000000001Z");
    // ebuse's TestSubscriptionPosition on a store: any position ≥ 0.
    let r = c.request(
        "POST",
        "/subscriptions/x/position",
        &[("X-API-Key", "abc")],
        br#"{"position":42}"#,
    );
    assert_eq!(r.status, 204);
    // /metrics as ebuse documents it: a key, no Accept → JSON.
    let m = c
        .request("GET", "/metrics", &[("X-API-Key", "abc")], b"")
        .json();
    assert_eq!(m["total_events"], 15001);

    // ebuse's tenants.yaml with fields shardcast does not use, and short keys.
    let f = dir.path().join("tenants.yaml");
    std::fs::write(
        &f,
        format!(
            "version: 1\nstore_backend: pebble\ndata_dir: {}\ntenants:\n  - name: tenant1\n    api_key: key1\n    email: ops@example.com\n",
            dir.path().join("tenants").display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("mt")).unwrap();
    let t = Server::start(
        &dir.path().join("mt"),
        &[("SHARDCAST_AUTH_TENANTS_FILE", f.to_str().unwrap())],
    );
    let log = t.stderr();
    assert!(log.contains("version") && log.contains("ignored"), "{log}");
    assert!(log.contains("tenants.0.email"), "{log}");
    let r = t.conn().post_json("/events", "key1", &json!({"type":"x"}));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Enzyme's `sse.event_retention`: events older than `storage.retain_age` go,
/// oldest first, riding on commits and, on an idle store, on a sweep.
#[test]
fn retention_by_age_prunes_the_oldest_events_and_keeps_the_head() {
    let dir = TempDir::new("retain-age");
    let s = Server::start(dir.path(), &[("SHARDCAST_STORAGE_RETAIN_AGE", "3s")]);
    let at = |ts: &str| json!({"type":"t","timestamp":ts});
    let mut c = s.conn();
    // Five from long ago, one fresh, then one from long ago again.
    let old: Vec<Value> = (0..5)
        .map(|_| at("2020-01-01T00:00:00.123456789Z"))
        .collect();
    assert_eq!(
        c.post_json("/events/batch", "", &Value::Array(old)).status,
        200
    );
    assert_eq!(
        c.post_json("/events", "", &json!({"type":"fresh"})).status,
        200
    );
    assert_eq!(
        c.post_json("/events", "", &at("2020-01-02T00:00:00Z"))
            .status,
        200
    );
    // That commit pruned the five at the bottom; the old one above a fresh
    // one stays (positions stay contiguous).
    let positions = |s: &Server| -> Vec<u64> {
        s.get("/events?from=1")
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(positions(&s), vec![6, 7]);
    // Idle: the sweep prunes what aged, but never the newest event (the head).
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(positions(&s), vec![7]);
    assert_eq!(s.get("/position").json()["position"], 7);
    // The next append takes the next position; its commit prunes 7, old and
    // no longer the head.
    let r = c.post_json("/events", "", &json!({"type":"next"}));
    assert_eq!(r.json()["position"], 8);
    assert_eq!(positions(&s), vec![8]);
    // A subscriber from before what is kept is told so, then gets the rest.
    let mut sse = SseClient::open(s.addr, "/events/subscribe?from=1", &[]);
    let reset = sse.next().unwrap();
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert_eq!(sse.next().unwrap().id.as_deref(), Some("8"));
}
