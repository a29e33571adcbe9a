//! The deployment profiles in tuning/ (small, medium, large): each loads and
//! validates exactly as `shardcast serve --config tuning/X.toml` would, carries
//! every configuration key, holds the values docs/tuning.md describes, fits its
//! box by the memory formula of docs/tuning.md, and one of them really starts
//! the server.

use crate::common::*;
use shardcast::config::{Config, SlowClient, Synchronous, KEYS};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

fn profile_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tuning/{name}.toml"))
}

fn load(name: &str) -> Config {
    Config::load(Some(&profile_path(name)), &HashMap::new())
        .unwrap_or_else(|e| panic!("tuning/{name}.toml does not load: {e}"))
}

/// The memory formula of docs/tuning.md ("Memory"), in bytes: anonymous
/// memory at the bounded peak, under the assumptions written there.
fn peak_anon_bytes(c: &Config) -> u64 {
    let s = c.server.shards as u64;
    // Measured: 15 MiB RssAnon idle with 1 shard, 38 MiB with 4.
    let base = 7 * MIB + MIB / 2 + s * (7 * MIB + MIB / 2);
    let writer_cache = if c.database.cache_size < 0 {
        (-c.database.cache_size) as u64 * 1024
    } else {
        c.database.cache_size as u64 * 4096
    };
    // The checkpoint thread and each reader use SQLite's default cache (-2000 KiB).
    let default_cache = 2_048_000;
    let sqlite = writer_cache + default_cache + c.database.read_connections as u64 * default_cache;
    let frame = 340; // ~300 B stored event + SSE framing
    let ring = s * c.sse.ring_events as u64 * (frame + 120);
    let sse = c.sse.max_connections as u64 * 1889;
    let other = c
        .server
        .max_connections
        .saturating_sub(c.sse.max_connections) as u64
        * 6
        * 1024;
    let rate = s * c.rate_limit.max_tracked_addresses as u64 * 57;
    let steady = base + sqlite + ring + sse + other + rate;
    let queue = s * 2 * c.writer.queue_bytes_max as u64;
    let scratch = s * MIB;
    let tenth = c.sse.max_connections as u64 / 10;
    let slow = tenth * c.sse.client_buffer_events as u64 * frame;
    let catch_up = tenth * c.sse.catch_up_batch_events as u64 * frame;
    let bodies = 100 * c.server.max_body_bytes as u64;
    let commit = c.writer.batch_events_max as u64 * 300 * 2;
    steady + queue + scratch + slow + catch_up + bodies + commit
}

#[test]
fn every_profile_loads_has_every_key_and_fits_its_box() {
    for (name, ram, cpus) in [
        ("small", 2_000_000_000u64, 1usize),
        ("medium", 8_000_000_000, 4),
        ("large", 32_000_000_000, 8),
    ] {
        let c = load(name);
        let text = std::fs::read_to_string(profile_path(name)).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        for (section, key) in KEYS {
            assert!(
                table.get(*section).and_then(|t| t.get(*key)).is_some(),
                "tuning/{name}.toml lacks {section}.{key}: decide its value for this box"
            );
        }
        // Shards: cores minus the writer's, at least one.
        assert_eq!(c.server.shards, (cpus - 1).max(1), "{name}: shards");
        // Behind the local proxy, whose X-Forwarded-For is trusted.
        assert!(c.server.listen.ip().is_loopback(), "{name}: listen");
        assert!(
            c.server
                .trusted_proxies
                .iter()
                .any(|p| p.contains("127.0.0.1".parse().unwrap())),
            "{name}: the local proxy must be trusted"
        );
        assert_eq!(
            c.database.path,
            PathBuf::from("/var/lib/shardcast/events.db"),
            "{name}: StateDirectory"
        );
        assert_eq!(c.database.synchronous, Synchronous::Full);
        assert_eq!(c.sse.slow_client, SlowClient::CatchUp);
        assert_eq!(c.api.batch_events_max, 1000, "{name}: ebuse's batch limit");
        // Fits LimitNOFILE=65536 in tuning/shardcast.service with the
        // ~1,024 descriptors the server itself wants beside connections.
        assert!(c.server.max_connections + 1024 <= 65536, "{name}: nofile");
        assert!(c.server.max_connections > c.sse.max_connections);
        // The unit's TimeoutStopSec (45s) must exceed the drain.
        assert!(c.server.shutdown_timeout < Duration::from_secs(45));
        // Above the proxies' upstream keepalive (60s): the proxy closes first.
        assert!(c.server.idle_timeout > Duration::from_secs(60));
        // Proxies' SSE read timeout (120s) spans several heartbeats.
        assert!(c.sse.heartbeat_interval * 3 <= Duration::from_secs(120));
        // Kernel caps listen(2) at net.core.somaxconn = 8192 (tuning/sysctl.conf).
        assert!(c.server.backlog <= 8192, "{name}: backlog above somaxconn");
        // SQLite clamps mmap_size to its compiled-in maximum.
        assert!(c.database.mmap_size_bytes <= 0x7fff_0000);
        let peak = peak_anon_bytes(&c);
        assert!(
            peak <= ram / 2,
            "{name}: bounded peak {} MiB exceeds half of the box's RAM",
            peak / MIB
        );
    }

    let small = load("small");
    assert_eq!(small.sse.max_connections, 2000);
    assert_eq!(small.server.max_connections, 3000);
    assert_eq!(small.server.max_body_bytes, 2 * MIB as usize);
    assert_eq!(small.writer.queue_bytes_max, 32 * MIB as usize);
    assert_eq!(small.database.cache_size, -16384);
    assert_eq!(small.sse.ring_events, 1024);

    let medium = load("medium");
    assert_eq!(medium.sse.max_connections, 10_000);
    assert_eq!(medium.server.max_connections, 15_000);
    assert_eq!(medium.database.read_connections, 3);
    assert_eq!(medium.database.mmap_size_bytes, 1 << 30);
    assert_eq!(medium.writer.queue_bytes_max, 64 * MIB as usize);

    let large = load("large");
    assert_eq!(large.sse.max_connections, 40_000);
    assert_eq!(large.server.max_connections, 50_000);
    assert_eq!(large.sse.ring_events, 16384);
    assert_eq!(large.database.cache_size, -262144);
    assert_eq!(large.database.mmap_size_bytes, 0x7fff_0000);
    assert_eq!(large.rate_limit.max_tracked_addresses, 200_000);
}

/// The formula's worked examples in docs/tuning.md are these numbers.
#[test]
fn worked_examples_in_the_docs_match_the_formula() {
    let docs = include_str!("../../docs/tuning.md");
    for name in ["small", "medium", "large"] {
        let mib = peak_anon_bytes(&load(name)) / MIB;
        assert!(
            docs.contains(&format!("{name}: bounded peak ≈ {mib} MiB")),
            "docs/tuning.md should say \"{name}: bounded peak ≈ {mib} MiB\""
        );
    }
}

/// The small profile, as shipped, starts the real binary (with only the
/// harness's port and data directory overriding it) and serves.
#[test]
fn the_small_profile_starts_the_server() {
    let dir = TempDir::new("profile-small");
    let s = Server::start_with_args(
        dir.path(),
        &["--config", profile_path("small").to_str().unwrap()],
        &[],
    );
    assert_eq!(s.post("/events", r#"{"type":"profile.check"}"#).status, 200);
    assert_eq!(s.get("/position").json()["position"], 1);
    // DB_PATH (the harness's) overrode the profile's /var/lib path.
    assert!(dir.path().join("events.db").exists());
}
