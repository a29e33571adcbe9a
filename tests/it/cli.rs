//! The operator's commands, run as the operator runs them: `backup` under
//! write load and a restore from it, `check` on good, stale and damaged
//! files, `config` showing where values come from, `--version`.

use crate::common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "cli-key-0123456789";

/// Run a shardcast command the way the server harness does: a clean
/// environment, the database in `dir`.
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DB_PATH", dir.join("events.db"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run shardcast")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn backup_under_write_load_restores_every_acknowledged_event() {
    let dir = TempDir::new("cli-backup");
    let mut s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    let addr = s.addr;
    // Writers keep appending through the whole backup.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut c = Conn::open(addr);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let evs: Vec<Value> = (0..50)
                        .map(|i| json!({"type":"load","id":format!("w{w}-{n}-{i}"),"data":{"pad":"x".repeat(200)}}))
                        .collect();
                    let r = c.post_json("/events/batch", KEY, &Value::Array(evs));
                    assert_eq!(r.status, 200, "{}", r.text());
                    acked.fetch_max(r.json()["last_position"].as_u64().unwrap(), Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    while acked.load(Ordering::Relaxed) < 20_000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = acked.load(Ordering::Relaxed);
    let copy = dir.path().join("backup.db");
    let out = run(
        dir.path(),
        &["backup", "--out", copy.to_str().unwrap()],
        &[("API_KEY", KEY)],
    );
    let during = acked.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("100%"), "a progress bar: {said}");
    assert!(
        during > before,
        "the writers kept writing during the backup"
    );

    // Refusing to overwrite.
    let again = run(
        dir.path(),
        &["backup", "--out", copy.to_str().unwrap()],
        &[],
    );
    assert!(!again.status.success());
    assert!(text(&again).contains("exists"));

    // Restore (docs/operations.md): the copy becomes a fresh server's database.
    s.terminate(Duration::from_secs(10));
    let restored = TempDir::new("cli-restored");
    std::fs::copy(&copy, restored.path().join("events.db")).unwrap();
    let ids = stored_ids(&restored.path().join("events.db"));
    let head = ids.last().map(|(p, _)| *p).unwrap_or(0);
    assert!(
        head >= before,
        "backup head {head} < {before} acknowledged before it began"
    );
    assert_eq!(
        ids.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        (1..=head).collect::<Vec<_>>(),
        "positions contiguous from 1"
    );
    let mut r = Server::start(restored.path(), &[("API_KEY", KEY)]);
    assert_eq!(r.get_with_key("/position", KEY)["position"], head);
    // The index was built from the copy; idempotency holds for old ids.
    let dup = r
        .conn()
        .post_json("/events", KEY, &json!({"type":"load","id":"w0-0-0"}));
    assert_eq!(dup.json()["duplicate"], true);
    r.terminate(Duration::from_secs(10));
    let check = run(restored.path(), &["check"], &[]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
    assert!(text(&check).contains("in step"));
}

#[test]
fn check_reports_in_step_stale_and_damaged_with_distinct_exit_codes() {
    let dir = TempDir::new("cli-check");
    let mut s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    let evs: Vec<Value> = (0..300)
        .map(|i| json!({"type":"t","stream":format!("s{}", i % 7)}))
        .collect();
    assert_eq!(
        s.conn()
            .post_json("/events/batch", KEY, &Value::Array(evs))
            .status,
        200
    );
    assert_eq!(
        s.conn()
            .post_json("/subscriptions/c1/position", KEY, &json!({"position": 10}))
            .status,
        204
    );
    // On a running server's files: in step.
    let ok = run(dir.path(), &["check"], &[]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("300 events"), "{}", text(&ok));
    s.terminate(Duration::from_secs(10));

    // SQLite gains an event the index never saw (as after a crash between
    // the two commits): out of step, exit 1, and the difference named.
    {
        let c = rusqlite::Connection::open(dir.path().join("events.db")).unwrap();
        c.execute(
            "INSERT INTO events (position, id, type, data, timestamp) VALUES (301, 'sneaky', 't', '{}', '2026-11-23T00:00:00Z')",
            [],
        )
        .unwrap();
    }
    let stale = run(dir.path(), &["check"], &[]);
    assert_eq!(stale.status.code(), Some(1), "{}", text(&stale));
    assert!(text(&stale).contains("sneaky"), "{}", text(&stale));
    // A start repairs it.
    let mut s = Server::start(dir.path(), &[("API_KEY", KEY)]);
    s.terminate(Duration::from_secs(10));
    assert_eq!(run(dir.path(), &["check"], &[]).status.code(), Some(0));

    // A damaged database: exit 3.
    let bad = TempDir::new("cli-check-bad");
    std::fs::write(bad.path().join("events.db"), vec![0x42; 16384]).unwrap();
    let damaged = run(bad.path(), &["check"], &[]);
    assert_eq!(damaged.status.code(), Some(3), "{}", text(&damaged));
    // A configuration that does not load: exit 2.
    let usage = run(
        dir.path(),
        &["check"],
        &[("SHARDCAST_SERVER_BACKLOG", "lots")],
    );
    assert_eq!(usage.status.code(), Some(2), "{}", text(&usage));
}

#[test]
fn config_shows_values_and_where_they_came_from() {
    let dir = TempDir::new("cli-config");
    let file = dir.path().join("shardcast.toml");
    std::fs::write(&file, "[writer]\nbatch_events_max = 2000\n").unwrap();
    let out = run(
        dir.path(),
        &["config", "--config", file.to_str().unwrap()],
        &[
            ("SHARDCAST_SSE_RETRY_MS", "7000"),
            ("RATE_LIMIT", "5"),
            ("API_KEY", "do-not-print-this-key"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    let line = |k: &str| {
        t.lines()
            .find(|l| l.starts_with(&format!("{k} = ")))
            .unwrap_or_else(|| panic!("no {k} in:\n{t}"))
            .to_string()
    };
    assert!(
        line("retry_ms").contains("\"7000\"")
            && line("retry_ms").contains("# env SHARDCAST_SSE_RETRY_MS")
    );
    assert!(line("per_second").contains("# env RATE_LIMIT"));
    assert!(
        line("batch_events_max").contains("2000") && line("batch_events_max").contains("# file ")
    );
    assert!(line("backlog").contains("# default"));
    assert!(line("path").contains("# env DB_PATH"));
    assert!(!t.contains("do-not-print-this-key"));
    assert!(line("api_key").contains("not shown"));
    assert!(t.contains("single-tenant"));
    // A bad value is refused with its name.
    let bad = run(dir.path(), &["config"], &[("RATE_LIMIT", "fast")]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("RATE_LIMIT"));
}

#[test]
fn version_and_help() {
    let dir = TempDir::new("cli-version");
    let v = run(dir.path(), &["--version"], &[]);
    assert!(v.status.success());
    assert_eq!(
        String::from_utf8_lossy(&v.stdout).trim(),
        format!("shardcast {}", env!("CARGO_PKG_VERSION"))
    );
    for cmd in ["serve", "check", "backup", "config", "bench"] {
        let h = run(dir.path(), &[cmd, "--help"], &[]);
        assert!(h.status.success(), "{cmd} --help");
        assert!(String::from_utf8_lossy(&h.stdout).contains("Usage: shardcast"));
    }
}
