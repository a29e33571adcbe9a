//! The ingestion benchmark in its small mode, so it cannot rot: the same
//! `scripts/bench-ingest.sh` users run, against this build's binary, for one
//! short run. It asserts what the script measures is sane (requests answered,
//! no errors, every acknowledged event stored); the speed targets themselves
//! live in docs/benchmarks.md, never in a timed test.
//!
//! A test whose tool (wrk, curl) is missing is reported as ignored, with the
//! reason (`build.rs` sets a `tool_*` cfg per installed tool); under
//! `CI=true` it runs and fails instead (`.ci/run` installs them all). The
//! nginx and nchan comparisons likewise: printed and checked when those are
//! installed (always under CI), the script's "not installed" note otherwise.

use std::collections::HashMap;
use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `name k=v k=v …` → the values of one result line.
fn fields(line: &str) -> HashMap<String, f64> {
    line.split_whitespace()
        .skip(if line.starts_with("MEDIAN") { 2 } else { 1 })
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// Run `scripts/<script>` against this build with `env`, asserting it
/// succeeded; its stdout. The tools in `needs` must be there (the test is
/// ignored by its cfg where they are not, unless under CI).
fn run_script(needs: &[&str], script: &str, env: &[(&str, &str)]) -> String {
    if let Some(missing) = needs.iter().find(|t| !have(t)) {
        panic!("{missing} is not installed (apt-get install {missing}); CI must install it");
    }
    let out = Command::new("bash")
        .arg(format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR")))
        .env("SHARDCAST_BIN", crate::common::BIN)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

#[test]
#[cfg_attr(not(tool_wrk), ignore = "needs wrk (apt-get install wrk)")]
fn bench_ingest_runs_in_small_mode() {
    let stdout = run_script(
        &["wrk"],
        "bench-ingest.sh",
        &[
            ("DURATION", "1s"),
            ("RUNS", "1"),
            ("CONNECTIONS", "8"),
            ("THREADS", "1"),
            ("BATCH_SIZE", "20"),
        ],
    );
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("MEDIAN {name} ")))
            .map(fields)
            .unwrap_or_else(|| panic!("no MEDIAN {name} line in:\n{stdout}"))
    };
    for name in ["single", "batch"] {
        let m = line(name);
        assert!(m["req_s"] > 0.0, "{name}: {stdout}");
        assert_eq!(m["errors"], 0.0, "{name}: {stdout}");
        assert_eq!(m["non2xx"], 0.0, "{name}: {stdout}");
        assert!(m["p99_us"] >= m["p50_us"], "{name}: {stdout}");
    }
    let batch = line("batch");
    assert!(
        (batch["events_s"] / batch["req_s"] - 20.0).abs() < 0.5,
        "events/s counts the batch size: {stdout}"
    );
    if cfg!(tool_nginx) {
        assert!(line("nginx")["req_s"] > 0.0, "{stdout}");
        assert!(stdout.contains("RATIO single/nginx"), "{stdout}");
    } else {
        assert!(stdout.contains("nginx is not installed"), "{stdout}");
    }
    // The script compares acknowledged with stored and fails on a shortfall;
    // check it printed both.
    assert!(stdout.contains("acknowledged events: "), "{stdout}");
}

#[test]
fn bench_sse_runs_in_small_mode() {
    // Needs only the binary; nchan is compared when installed.
    let stdout = run_script(
        &[],
        "bench-sse.sh",
        &[
            ("SUBSCRIBERS", "50"),
            ("EVENTS", "20"),
            ("RUNS", "1"),
            ("DRAIN_SECS", "20"),
        ],
    );
    let sc = stdout
        .lines()
        .find(|l| l.starts_with("MEDIAN shardcast n=50 "))
        .map(|l| fields(&l.replacen("MEDIAN shardcast n=50", "MEDIAN x", 1)))
        .unwrap_or_else(|| panic!("no shardcast median in:\n{stdout}"));
    assert_eq!(sc["connections"], 50.0, "{stdout}");
    assert_eq!(
        sc["delivery_ratio"], 1.0,
        "every event to every subscriber: {stdout}"
    );
    assert!(sc["deliveries_s"] > 0.0, "{stdout}");
    assert!(sc["p99_us"] >= sc["p50_us"], "{stdout}");
    if cfg!(all(tool_nginx, tool_nchan)) {
        assert!(stdout.contains("RATIO n=50 "), "{stdout}");
    } else {
        assert!(stdout.contains("nchan is not installed"), "{stdout}");
    }
}

#[test]
#[cfg_attr(
    not(all(tool_wrk, tool_curl)),
    ignore = "needs wrk and curl (apt-get install wrk curl)"
)]
fn bench_reads_runs_in_small_mode() {
    let stdout = run_script(
        &["wrk", "curl"],
        "bench-reads.sh",
        &[
            ("EVENTS", "5000"),
            ("DURATION", "1s"),
            ("RUNS", "1"),
            ("CONNECTIONS", "8"),
            ("THREADS", "1"),
        ],
    );
    for name in ["position", "consumer", "load10k"] {
        let m = stdout
            .lines()
            .find(|l| l.starts_with(&format!("MEDIAN {name} ")))
            .map(fields)
            .unwrap_or_else(|| panic!("no MEDIAN {name} in:\n{stdout}"));
        assert!(m["req_s"] > 0.0, "{name}: {stdout}");
        assert_eq!(m["non2xx"] + m["errors"], 0.0, "{name}: {stdout}");
    }
    let stream = stdout
        .lines()
        .find(|l| l.starts_with("STREAM "))
        .unwrap_or_else(|| panic!("no STREAM line in:\n{stdout}"));
    let s = fields(stream);
    assert_eq!(s["events"], 5000.0);
    assert!(s["bytes"] > 5000.0 * 50.0, "{stream}");
}

#[test]
#[cfg_attr(not(tool_wrk), ignore = "needs wrk (apt-get install wrk)")]
fn bench_tenants_runs_in_small_mode() {
    // The script exits non-zero when a tenant stored fewer events than acknowledged.
    let stdout = run_script(
        &["wrk"],
        "bench-tenants.sh",
        &[
            ("TENANTS", "1 3"),
            ("DURATION", "1s"),
            ("RUNS", "1"),
            ("CONNECTIONS", "6"),
            ("THREADS", "1"),
            ("BATCH_SIZE", "20"),
        ],
    );
    for t in ["1", "3"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("MEDIAN tenants={t} ")))
            .unwrap_or_else(|| panic!("no median for {t} tenants:\n{stdout}"));
        let f = fields(&format!("x {}", line.trim_start_matches("MEDIAN ")));
        assert!(f["events_s"] > 0.0, "{line}");
        assert_eq!(f["non2xx"], 0.0, "{line}");
    }
    assert!(!stdout.contains("LOST"), "{stdout}");
}

#[test]
fn soak_runs_in_small_mode() {
    // The script exits non-zero on any lost, repeated or out-of-order
    // position, dropped subscriber, failed request or growth past its bounds.
    let stdout = run_script(
        &[],
        "soak.sh",
        &[
            ("SUBSCRIBERS", "100"),
            ("SECONDS_RUN", "6"),
            ("SAMPLE_SECS", "2"),
        ],
    );
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT in:\n{stdout}"));
    let f = fields(result);
    assert_eq!(f["subscribers"], 100.0, "{result}");
    assert!(f["events"] > 0.0, "{result}");
    assert_eq!(f["deliveries"], f["expected"], "{result}");
    assert!(result.ends_with(" PASS"), "{result}");
    assert!(stdout.matches("SAMPLE ").count() >= 2, "{stdout}");
}

#[test]
fn bench_sse_many_topics_and_one_at_a_time_run_in_small_mode() {
    for (mode, env) in [
        (
            "many topics",
            vec![("TYPES", "5"), ("RATE", "500"), ("PUBLISHERS", "2")],
        ),
        ("one at a time", vec![("PUBLISHERS", "1"), ("SERIAL", "1")]),
    ] {
        let mut env = env;
        env.extend([
            ("SUBSCRIBERS", "50"),
            ("EVENTS", "50"),
            ("RUNS", "1"),
            ("DRAIN_SECS", "20"),
        ]);
        let stdout = run_script(&[], "bench-sse.sh", &env);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("MEDIAN shardcast n=50 "))
            .unwrap_or_else(|| panic!("{mode}: no shardcast median in:\n{stdout}"));
        let f = fields(&line.replacen("MEDIAN shardcast n=50", "MEDIAN x", 1));
        // Every event to exactly its followers (10 per topic, or all 50).
        assert_eq!(f["delivery_ratio"], 1.0, "{mode}: {stdout}");
        assert!(f["events_s"] > 0.0, "{mode}: {stdout}");
        if cfg!(all(tool_nginx, tool_nchan)) {
            assert!(stdout.contains("RATIO n=50 "), "{mode}: {stdout}");
        }
    }
}

/// `scripts/bench-cluster.sh` in its small mode: three NATS servers, three
/// nodes and one single node, one short run of each row, the lag
/// measurement, and the script's own check that every node holds every
/// acknowledged event.
#[test]
#[cfg_attr(
    not(all(tool_wrk, tool_nats)),
    ignore = "needs wrk and nats-server (apt-get install wrk nats-server)"
)]
fn bench_cluster_runs_in_small_mode() {
    let _serial = crate::cluster::SERIAL
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let stdout = run_script(
        &["wrk"],
        "bench-cluster.sh",
        &[
            ("DURATION", "1s"),
            ("RUNS", "1"),
            ("CONNECTIONS", "6"),
            ("BATCH_SIZE", "20"),
            ("SUBSCRIBERS", "10"),
            ("LAG_EVENTS", "100"),
        ],
    );
    for name in [
        "single_1node",
        "single_cluster",
        "batch_1node",
        "batch_cluster",
    ] {
        let m = stdout
            .lines()
            .find(|l| l.starts_with(&format!("MEDIAN {name} ")))
            .map(fields)
            .unwrap_or_else(|| panic!("no MEDIAN {name} line in:\n{stdout}"));
        assert!(m["events_s"] > 0.0, "{name}: {stdout}");
        assert_eq!(m["errors"], 0.0, "{name}: {stdout}");
        assert_eq!(m["non2xx"], 0.0, "{name}: {stdout}");
    }
    let lag = stdout
        .lines()
        .find(|l| l.starts_with("LAG "))
        .map(fields)
        .unwrap_or_else(|| panic!("no LAG line in:\n{stdout}"));
    assert_eq!(lag["delivery_ratio"], 1.0, "{stdout}");
    assert!(lag["p99_us"] >= lag["p50_us"], "{stdout}");
    assert!(stdout.contains("GET /position on each node"), "{stdout}");
}
