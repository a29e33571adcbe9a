//! Starting the server: embedded defaults, config file and environment, and the
//! clear one-line refusals for bad configuration.

use crate::common::*;
use std::process::Stdio;

fn run_expecting_failure(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String) {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut cmd = Server::command(dir, &env);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn refuses_a_public_address_without_an_api_key() {
    let dir = TempDir::new("public");
    let (code, err) =
        run_expecting_failure(dir.path(), &[], &[("SHARDCAST_SERVER_LISTEN", "0.0.0.0:0")]);
    assert_ne!(code, 0);
    assert!(
        err.contains("auth.api_key") && err.contains("loopback"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
}

#[test]
fn bad_config_names_the_key_and_exits_non_zero() {
    let dir = TempDir::new("badcfg");
    let (code, err) = run_expecting_failure(dir.path(), &[], &[("READ_TIMEOUT", "soon")]);
    assert_eq!(code, 2);
    assert!(err.contains("READ_TIMEOUT"), "{err}");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[database]\nsynchronous = \"off\"\n").unwrap();
    let (code, err) = run_expecting_failure(dir.path(), &["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("database.synchronous"), "{err}");
    std::fs::write(&file, "[server]\nlisten_address = \"x\"\n").unwrap();
    let (code, err) = run_expecting_failure(dir.path(), &["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("listen_address"), "{err}");
}

#[test]
fn a_config_file_and_env_overrides_are_applied() {
    let dir = TempDir::new("cfgfile");
    let file = dir.path().join("shardcast.toml");
    std::fs::write(
        &file,
        format!(
            "[database]\npath = \"{}\"\n[api]\nbatch_events_max = 3\n",
            dir.path().join("file.db").display()
        ),
    )
    .unwrap();
    // The file sets the database path and a batch limit of 3; the
    // environment lowers the limit to 2 (env wins over the file).
    let s = Server::start_with_args(
        dir.path(),
        &["--config", file.to_str().unwrap()],
        &[("DB_PATH", ""), ("SHARDCAST_API_BATCH_EVENTS_MAX", "2")],
    );
    let r = s.post("/events/batch", r#"[{"type":"a"},{"type":"b"}]"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.post(
        "/events/batch",
        r#"[{"type":"a"},{"type":"b"},{"type":"c"}]"#,
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "batch_too_large"),
        "env override of api.batch_events_max: {}",
        r.text()
    );
    // The file's database path was used, not the harness's default.
    assert!(dir.path().join("file.db").exists());
    assert!(!dir.path().join("events.db").exists());
    drop(s);
    let (code, _) = run_expecting_failure(
        dir.path(),
        &["--config", "/nonexistent/shardcast.toml"],
        &[],
    );
    assert_eq!(code, 2);
}

#[test]
fn the_data_directory_is_created_and_in_wal_mode() {
    let dir = TempDir::new("wal");
    let db = dir.path().join("nested/deeper/events.db");
    let s = Server::start(dir.path(), &[("DB_PATH", db.to_str().unwrap())]);
    assert_eq!(s.post("/events", r#"{"type":"a"}"#).status, 200);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert!(dir.path().join("nested/deeper/index/data.mdb").exists());
}

#[test]
fn a_second_server_on_the_same_database_or_port_is_refused() {
    let dir = TempDir::new("twice");
    let s = Server::start(dir.path(), &[]);
    // Same database, another port.
    let (code, err) = run_expecting_failure(dir.path(), &[], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("in use by another shardcast"), "{err}");
    // Same port, another database: SO_REUSEPORT must not let it share the port.
    let other = TempDir::new("twice-other");
    let port = s.addr.port().to_string();
    let (code, err) = run_expecting_failure(other.path(), &[], &[("PORT", &port)]);
    assert_eq!(code, 1);
    assert!(err.contains("already on"), "{err}");
    assert_eq!(s.get("/health").status, 200);
}

/// `log.format = json`: every line is a JSON object, and one line at start
/// says what the server runs with (shards, CPUs, address, data paths).
#[test]
fn json_logs_and_one_start_line_with_the_effective_layout() {
    let dir = TempDir::new("json-logs");
    let mut s = Server::start(
        dir.path(),
        &[
            ("SHARDCAST_LOG_FORMAT", "json"),
            ("SHARDCAST_SERVER_SHARDS", "2"),
            ("RUST_LOG", "info"),
        ],
    );
    s.terminate(std::time::Duration::from_secs(10));
    let log = s.stderr();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let start: Vec<_> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "shardcast listening")
        .collect();
    assert_eq!(start.len(), 1, "{log}");
    let f = &start[0]["fields"];
    assert_eq!(f["shards"], 2);
    assert!(f["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(f["addr"], s.addr.to_string());
    assert!(
        f["databases"].as_str().unwrap().contains("events.db"),
        "{f}"
    );
    assert_eq!(f["multi_tenant"], false);
}
