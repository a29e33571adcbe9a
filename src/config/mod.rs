//! Configuration: one raw TOML shape (`RawConfig`, every key optional with a
//! documented default) and one validated shape (`Config`) that the rest of the
//! server reads. Environment variables override the file: ebuse's names (`PORT`,
//! `API_KEY`, `DB_PATH`, `READ_TIMEOUT`, …) and `SHARDCAST_<SECTION>_<KEY>` for
//! every key. Validation happens once at start; a bad value is one line naming
//! the key.
//!
//! `tuning/default.toml` mirrors `Config::default()`; a test keeps them equal.
//!
//! Every key is declared once, in `raw.rs`'s key table (section, name, kind,
//! range, secret); the raw shape, the environment's parsing, the overlay,
//! the range checks, `shardcast config` (`explain.rs`) and the docs check
//! follow from it. This file holds the validated shape and what only it
//! knows: defaults' meaning, units, and the relations between keys.

mod explain;
mod raw;

pub use explain::{explain, Explained};
pub use raw::{
    apply_env, parse_duration, Dur, Env, Flag, Float, Int, Kind, List, ProcessEnv, RawApi, RawAuth,
    RawCluster, RawConfig, RawDatabase, RawIndex, RawKey, RawLog, RawRateLimit, RawServer, RawSse,
    RawStorage, RawTenant, RawWriter, Secret, SecretList, Text, EBUSE_ENV, KEYS,
};
use raw::{int_range, raw_from_toml};

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The embedded default configuration, also shipped as `tuning/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../../tuning/default.toml");

/// A config error: the key it concerns and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config error: {}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// `SQLite`'s `synchronous` setting, restricted to the two durable choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// An acknowledged event survives a process crash (WAL fsynced at checkpoint).
    Normal,
    /// An acknowledged event also survives power loss (WAL fsynced every commit).
    Full,
}

impl Synchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated configuration: every limit has its unit in its name or type.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub writer: WriterConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
    pub index: IndexConfig,
    pub log: LogConfig,
    pub sse: SseConfig,
    pub storage: StorageConfig,
    /// `[[tenants]]` from the config file (a tenants file, if named, wins).
    pub tenants: Vec<RawTenant>,
    pub rate_limit: RateLimitConfig,
    /// Cluster mode on NATS JetStream (None: a single node).
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: NATS JetStream is the log, this process one replica of it
/// (docs/cluster.md). Present only when `cluster.nats_urls` names a server.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub nats_urls: Vec<String>,
    /// Streams are `<prefix>_<tenant>`, subjects `<prefix>.<tenant>`.
    pub stream_prefix: String,
    /// JetStream replicas of each stream (created so; checked when present).
    pub replicas: usize,
    /// An append not acknowledged by JetStream within this gets 503.
    pub publish_timeout: Duration,
    /// This node's name in logs, message ids and `/health/ready`.
    pub node_name: String,
    pub nats_creds: Option<PathBuf>,
    pub nats_token: Option<String>,
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (both or neither).
    pub nats_tls_client: Option<(PathBuf, PathBuf)>,
    pub nats_tls_required: bool,
}

/// Per-client request rate limit, declared by the limiter it configures.
pub use crate::ratelimit::RateLimitConfig;

#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// Keep the newest this many events; older ones are pruned (0: forever).
    pub retain_events: u64,
    /// Keep events younger than this (by their timestamp); older ones are
    /// pruned from the oldest on (None: forever).
    pub retain_age: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Number of shard executors; resolved from the CPU count when 0 in the file.
    pub shards: usize,
    /// CPUs the shards are pinned to, one each (empty: no pinning).
    pub shard_cpus: Vec<usize>,
    pub backlog: i32,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// io_uring registered-buffer memory per shard; this box's memlock is 8 MiB.
    pub io_memory_bytes: usize,
    /// Origins answered with CORS headers (`*`: any); empty: no CORS.
    pub cors_origins: Vec<String>,
    /// Send `Access-Control-Allow-Credentials: true` (never with `*`).
    pub cors_allow_credentials: bool,
    /// Read answers at least this large are gzipped for clients that accept it
    /// (None: never; ebuse's `ENABLE_GZIP=false`).
    pub gzip_min_bytes: Option<usize>,
    /// zlib level, 1 (fastest) to 9 (smallest).
    pub gzip_level: u32,
    /// Open connections per process (SSE included), split evenly across
    /// shards; a connection beyond its shard's share gets 503 and is closed.
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-For` names the client (for the rate limit).
    pub trusted_proxies: Vec<crate::ratelimit::IpNet>,
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most events one group commit takes.
    pub batch_events_max: usize,
    /// Append requests a shard may have queued for the writer before it sheds with 503.
    pub queue_requests_max: usize,
    /// Body bytes a shard may hold in queued append requests before it sheds with 503.
    pub queue_bytes_max: usize,
    /// CPU the writer thread is pinned to (None: not pinned).
    pub cpu: Option<usize>,
    /// Seconds a client is told to wait in `Retry-After` when shed.
    pub retry_after_secs: u32,
}

impl WriterConfig {
    /// `Retry-After` for conditions that last (an unavailable tenant, an SSE
    /// cap, a shard stopping): at least `limits::RETRY_AFTER_LASTING_SECS_MIN`.
    pub fn retry_after_lasting_secs(&self) -> u32 {
        self.retry_after_secs
            .max(crate::limits::RETRY_AFTER_LASTING_SECS_MIN)
    }
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub batch_events_max: usize,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The key every request but `/health` must carry; None: no auth, loopback only.
    pub api_key: Option<String>,
    /// Single-tenant keys that may only read and subscribe.
    pub read_api_keys: Vec<String>,
    /// May list tenants (`GET /tenants`); holds no tenant's data.
    pub admin_api_key: Option<String>,
    pub admin_api_key_sha256: Option<String>,
    /// ebuse's `tenants.yaml` (`--tenants`): multi-tenant mode.
    pub tenants_file: Option<PathBuf>,
    /// HS256 secret that verifies subscription tokens (single-tenant mode).
    pub token_secret: Option<String>,
    /// The secret before a rotation, accepted beside `token_secret`.
    pub token_secret_previous: Option<String>,
    /// PEM public key(s), or a PEM file's path, for RS256/ES256 tokens.
    pub token_public_key: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// `PRAGMA cache_size` as SQLite reads it: negative is KiB, positive is pages.
    pub cache_size: i64,
    pub mmap_size_bytes: u64,
    pub busy_timeout: Duration,
    pub wal_autocheckpoint_pages: u32,
    pub journal_size_limit_bytes: i64,
    /// Read-only connections (one thread each) serving catch-up and reads.
    pub read_connections: usize,
    /// Size cap (`PRAGMA max_page_count`); appends beyond it get 507.
    pub max_database_bytes: Option<u64>,
    /// Where `[[tenants]]` from the config keep their databases.
    pub tenants_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// LMDB environment directory; empty in the file means `<database dir>/index`.
    pub path: PathBuf,
    pub map_size_bytes: usize,
}

/// What to do with an SSE client that falls `client_buffer_events` behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowClient {
    /// Serve it from SQLite until it catches up with the ring again.
    CatchUp,
    /// Close it; it reconnects with `Last-Event-ID` and catches up then.
    Disconnect,
}

#[derive(Debug, Clone)]
pub struct SseConfig {
    /// Encoded frames each shard keeps for its connections' cursors.
    pub ring_events: usize,
    /// How far behind the ring's newest event a connection may fall.
    pub client_buffer_events: usize,
    pub slow_client: SlowClient,
    /// SSE connections per process (split evenly across shards); 503 beyond.
    pub max_connections: usize,
    /// SSE connections per API key (per shard); 429 beyond.
    pub max_per_key: usize,
    /// SSE connections per token user (`sub`, per tenant, whole process); 429 beyond.
    pub max_per_user: usize,
    pub heartbeat_interval: Duration,
    /// `retry:` sent on connect, in milliseconds.
    pub retry_ms: u64,
    /// Events read from SQLite per catch-up query.
    pub catch_up_batch_events: usize,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Config {
    /// The embedded default, with no environment applied.
    pub fn default_config() -> Config {
        Config::load(None, &std::collections::HashMap::new())
            .expect("embedded default config is valid")
    }

    /// Load: embedded defaults, then the file (if any), then the environment.
    pub fn load(file: Option<&std::path::Path>, env: &dyn Env) -> Result<Config, ConfigError> {
        let mut raw = raw_from_toml(DEFAULT_TOML, "embedded default")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
            let file_raw = raw_from_toml(&text, &path.display().to_string())?;
            raw = raw.overlay(file_raw);
        }
        apply_env(&mut raw, env)?;
        Config::validate(raw)
    }

    /// Check and convert every key, section by section (each section's
    /// function below), then the relations between sections.
    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let (mut server, writer_cpu) = server_section(raw.server)?;
        let (writer, api) = writer_and_api(raw.writer, raw.api, writer_cpu)?;
        let multi = raw
            .auth
            .tenants_file
            .as_deref()
            .is_some_and(|f| !f.trim().is_empty())
            || !raw.tenants.is_empty();
        let auth = auth_section(raw.auth, multi, server.listen)?;
        let mut st = raw.storage;
        let database = database_section(raw.database, st.max_database_bytes.take())?;
        let index = index_section(raw.index, &database)?;
        let log = log_section(raw.log)?;
        let storage = storage_section(st)?;
        let sse = sse_section(raw.sse)?;
        if server.max_connections == 0 {
            server.max_connections = DEFAULT_NON_SSE_CONNECTIONS + sse.max_connections;
        }
        let rate_limit = rate_limit_section(raw.rate_limit)?;
        let cluster = cluster_section(raw.cluster, &storage)?;
        Ok(Config {
            server,
            writer,
            api,
            auth,
            database,
            index,
            log,
            sse,
            storage,
            tenants: raw.tenants,
            rate_limit,
            cluster,
        })
    }
}

fn need<T>(v: Option<T>, key: &str) -> Result<T, ConfigError> {
    v.ok_or_else(|| err(key, "missing (no default)"))
}

fn range(v: i64, key: &str, lo: i64, hi: i64) -> Result<i64, ConfigError> {
    if v < lo || v > hi {
        Err(err(key, format!("{v} is out of range {lo}..={hi}")))
    } else {
        Ok(v)
    }
}

/// A key's integer, within the range the key table declares for it.
fn int(v: Option<i64>, key: &str) -> Result<i64, ConfigError> {
    let v = need(v, key)?;
    let (section, name) = key.split_once('.').unwrap_or(("", key));
    match int_range(section, name) {
        Some((lo, hi)) => range(v, key, lo, hi),
        None => Ok(v),
    }
}

fn dur(v: Option<String>, key: &str) -> Result<Duration, ConfigError> {
    let v = need(v, key)?;
    parse_duration(&v).map_err(|m| err(key, m))
}

/// `[server]`, and where the shards and the writer run.
fn server_section(s: RawServer) -> Result<(ServerConfig, Option<usize>), ConfigError> {
    let listen_s = need(s.listen, "server.listen")?;
    let listen: SocketAddr = listen_s.parse().map_err(|_| {
        err(
            "server.listen",
            format!("'{listen_s}' is not an address like 127.0.0.1:8080"),
        )
    })?;
    let online = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let shards_raw = int(s.shards, "server.shards")? as usize;
    // The writer takes the last CPU; shards get the rest, at least one.
    let shards = if shards_raw == 0 {
        online.saturating_sub(1).max(1)
    } else {
        shards_raw
    };
    let pin = s.pin_cpus.unwrap_or(true);
    let (shard_cpus, writer_cpu) = if pin && online > 1 {
        let writer_cpu = online - 1;
        // Shards keep off the writer's CPU while they fit beside it; more
        // shards than that spread over every CPU, the writer's included,
        // rather than piling onto the first ones.
        let spread = if shards < online { writer_cpu } else { online };
        let cpus = (0..shards).map(|i| i % spread).collect();
        (cpus, Some(writer_cpu))
    } else if pin {
        (vec![0; shards], Some(0))
    } else {
        (Vec::new(), None)
    };
    let server = ServerConfig {
        listen,
        shards,
        shard_cpus,
        backlog: int(s.backlog, "server.backlog")? as i32,
        max_body_bytes: int(s.max_body_bytes, "server.max_body_bytes")? as usize,
        max_header_bytes: int(s.max_header_bytes, "server.max_header_bytes")? as usize,
        read_timeout: dur(s.read_timeout, "server.read_timeout")?,
        write_timeout: dur(s.write_timeout, "server.write_timeout")?,
        idle_timeout: dur(s.idle_timeout, "server.idle_timeout")?,
        shutdown_timeout: dur(s.shutdown_timeout, "server.shutdown_timeout")?,
        io_memory_bytes: int(s.io_memory_bytes, "server.io_memory_bytes")? as usize,
        cors_origins: s.cors_origins.unwrap_or_default(),
        cors_allow_credentials: s.cors_allow_credentials.unwrap_or(false),
        gzip_min_bytes: if need(s.gzip, "server.gzip")? {
            Some(int(s.gzip_min_bytes, "server.gzip_min_bytes")? as usize)
        } else {
            None
        },
        gzip_level: int(s.gzip_level, "server.gzip_level")? as u32,
        // Resolved below, once the SSE cap is known.
        max_connections: int(s.max_connections, "server.max_connections")? as usize,
        trusted_proxies: s
            .trusted_proxies
            .unwrap_or_default()
            .iter()
            .map(|p| {
                p.parse::<crate::ratelimit::IpNet>()
                    .map_err(|m| err("server.trusted_proxies", m))
            })
            .collect::<Result<_, _>>()?,
    };
    for o in &server.cors_origins {
        if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
            return Err(err(
                "server.cors_origins",
                format!("'{o}' is not an origin like https://app.example.com (or *)"),
            ));
        }
    }
    if server.cors_allow_credentials && server.cors_origins.iter().any(|o| o == "*") {
        return Err(err(
            "server.cors_allow_credentials",
            "browsers refuse credentials with a wildcard origin: list the origins",
        ));
    }
    for (key, d) in [
        ("server.read_timeout", server.read_timeout),
        ("server.write_timeout", server.write_timeout),
        ("server.idle_timeout", server.idle_timeout),
    ] {
        if d.is_zero() {
            return Err(err(key, "must be greater than zero"));
        }
    }
    Ok((server, writer_cpu))
}

/// `[writer]` and `[api]`: one request must fit one commit.
fn writer_and_api(
    w: RawWriter,
    a: RawApi,
    writer_cpu: Option<usize>,
) -> Result<(WriterConfig, ApiConfig), ConfigError> {
    let writer = WriterConfig {
        batch_events_max: int(w.batch_events_max, "writer.batch_events_max")? as usize,
        queue_requests_max: int(w.queue_requests_max, "writer.queue_requests_max")? as usize,
        queue_bytes_max: int(w.queue_bytes_max, "writer.queue_bytes_max")? as usize,
        cpu: writer_cpu,
        retry_after_secs: int(w.retry_after_secs, "writer.retry_after_secs")? as u32,
    };
    let api = ApiConfig {
        batch_events_max: int(a.batch_events_max, "api.batch_events_max")? as usize,
    };
    if api.batch_events_max > writer.batch_events_max {
        return Err(err(
            "api.batch_events_max",
            format!(
                "{} exceeds writer.batch_events_max {}: one request must fit one commit",
                api.batch_events_max, writer.batch_events_max
            ),
        ));
    }
    Ok((writer, api))
}

/// `[auth]`. Without a key the server listens on loopback only (a tenants
/// file makes every request carry a tenant's key).
fn auth_section(a: RawAuth, multi: bool, listen: SocketAddr) -> Result<AuthConfig, ConfigError> {
    let nonempty = |v: Option<String>| v.filter(|k| !k.trim().is_empty());
    let auth = AuthConfig {
        api_key: nonempty(a.api_key),
        read_api_keys: a.read_api_keys.unwrap_or_default(),
        admin_api_key: nonempty(a.admin_api_key),
        admin_api_key_sha256: nonempty(a.admin_api_key_sha256),
        tenants_file: nonempty(a.tenants_file).map(PathBuf::from),
        token_secret: nonempty(a.token_secret),
        token_secret_previous: nonempty(a.token_secret_previous),
        token_public_key: nonempty(a.token_public_key),
    };
    // Short keys start (ebuse takes any, `API_KEY=abc`): `tenant` warns
    // about each once logging is up, naming its owner, never the key.
    // Tenants carry their own keys: multi-tenant mode is never open.
    if auth.api_key.is_none() && !multi && !listen.ip().is_loopback() {
        return Err(err(
            "auth.api_key",
            format!("no API key is set, so shardcast only listens on loopback; set API_KEY (or auth.api_key) to listen on {listen}"),
        ));
    }
    Ok(auth)
}

/// `[database]`, with the size cap `storage.max_database_bytes`.
fn database_section(
    d: RawDatabase,
    max_database_bytes: Option<i64>,
) -> Result<DatabaseConfig, ConfigError> {
    let path = PathBuf::from(need(d.path, "database.path")?);
    if path.as_os_str().is_empty() {
        return Err(err("database.path", "empty"));
    }
    let synchronous = match need(d.synchronous, "database.synchronous")?
        .to_ascii_lowercase()
        .as_str()
    {
        "normal" => Synchronous::Normal,
        "full" => Synchronous::Full,
        other => {
            return Err(err(
                "database.synchronous",
                format!(
                    "'{other}' is not one of normal, full (off would break the durability promise)"
                ),
            ))
        }
    };
    let database = DatabaseConfig {
        synchronous,
        cache_size: need(d.cache_size, "database.cache_size")?,
        mmap_size_bytes: int(d.mmap_size, "database.mmap_size")? as u64,
        busy_timeout: dur(d.busy_timeout, "database.busy_timeout")?,
        wal_autocheckpoint_pages: int(d.wal_autocheckpoint, "database.wal_autocheckpoint")? as u32,
        journal_size_limit_bytes: int(d.journal_size_limit, "database.journal_size_limit")?,
        read_connections: int(d.read_connections, "database.read_connections")? as usize,
        path,
        max_database_bytes: match int(max_database_bytes, "storage.max_database_bytes")? {
            0 => None,
            b => Some(b as u64),
        },
        tenants_dir: PathBuf::from(need(d.tenants_dir, "database.tenants_dir")?),
    };
    Ok(database)
}

/// `[index]`: by default beside the database.
fn index_section(i: RawIndex, database: &DatabaseConfig) -> Result<IndexConfig, ConfigError> {
    let index_path = match i.path.filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => database
            .path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    std::path::Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(std::path::Path::new("."))
            .join("index"),
    };
    let index = IndexConfig {
        path: index_path,
        map_size_bytes: int(i.map_size, "index.map_size")? as usize,
    };
    Ok(index)
}

/// `[log]`.
fn log_section(l: RawLog) -> Result<LogConfig, ConfigError> {
    let log = LogConfig {
        level: need(l.level, "log.level")?,
        format: match need(l.format, "log.format")?.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log.format",
                    format!("'{other}' is not one of text, json"),
                ))
            }
        },
    };
    tracing_subscriber::EnvFilter::try_new(&log.level)
        .map_err(|e| err("log.level", format!("'{}': {e}", log.level)))?;
    Ok(log)
}

/// `[storage]`'s retention (its size cap goes with the database).
fn storage_section(st: RawStorage) -> Result<StorageConfig, ConfigError> {
    let storage = StorageConfig {
        retain_events: int(st.retain_events, "storage.retain_events")? as u64,
        retain_age: Some(dur(st.retain_age, "storage.retain_age")?).filter(|d| !d.is_zero()),
    };
    Ok(storage)
}

/// `[cluster]`: off unless `nats_urls` names a server. Every node must
/// apply the log to the same result, so retention (which depends on when
/// each node commits, and on its clock) is refused in cluster mode.
fn cluster_section(
    c: RawCluster,
    storage: &StorageConfig,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let nonempty = |v: Option<String>| v.filter(|k| !k.trim().is_empty());
    let urls: Vec<String> = c.nats_urls.unwrap_or_default();
    let replicas = int(c.replicas, "cluster.replicas")? as usize;
    let publish_timeout = dur(c.publish_timeout, "cluster.publish_timeout")?;
    let prefix = need(c.stream_prefix, "cluster.stream_prefix")?;
    if urls.is_empty() {
        return Ok(None);
    }
    for u in &urls {
        if let Err(e) = u.parse::<async_nats::ServerAddr>() {
            return Err(err(
                "cluster.nats_urls",
                format!("'{u}' is not a NATS server address such as nats://10.0.0.1:4222 ({e})"),
            ));
        }
    }
    if prefix.is_empty()
        || !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(err(
            "cluster.stream_prefix",
            format!("'{prefix}' must be letters, digits, '-' or '_' (it names JetStream streams and subjects)"),
        ));
    }
    if publish_timeout < Duration::from_millis(100) {
        return Err(err("cluster.publish_timeout", "must be at least 100ms"));
    }
    if storage.retain_events > 0 || storage.retain_age.is_some() {
        return Err(err(
            "storage.retain_events",
            "retention is not available in cluster mode: every node must apply the log to the same \
             result, and pruning depends on each node's commits and clock; set storage.retain_events = 0 \
             and storage.retain_age = \"0s\" (bound the JetStream stream instead, docs/cluster.md)",
        ));
    }
    let node_name = match nonempty(c.node_name) {
        Some(n) => n,
        None => host_name(),
    };
    if !node_name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(err(
            "cluster.node_name",
            format!("'{node_name}' must be letters, digits, '-', '_' or '.'"),
        ));
    }
    let cert = nonempty(c.nats_tls_cert).map(PathBuf::from);
    let key = nonempty(c.nats_tls_key).map(PathBuf::from);
    let nats_tls_client = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            return Err(err(
                "cluster.nats_tls_cert",
                "a client certificate needs its key (cluster.nats_tls_key), and the key its certificate",
            ))
        }
    };
    Ok(Some(ClusterConfig {
        nats_urls: urls,
        stream_prefix: prefix,
        replicas,
        publish_timeout,
        node_name,
        nats_creds: nonempty(c.nats_creds).map(PathBuf::from),
        nats_token: nonempty(c.nats_token),
        nats_tls_ca: nonempty(c.nats_tls_ca).map(PathBuf::from),
        nats_tls_client,
        nats_tls_required: c.nats_tls_required.unwrap_or(false),
    }))
}

/// The machine's host name (`cluster.node_name`'s default).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_string(),
        _ => "node".to_string(),
    }
}

/// `[sse]`: a client may not lag further than the ring reaches.
fn sse_section(e: RawSse) -> Result<SseConfig, ConfigError> {
    let sse = SseConfig {
        ring_events: int(e.ring_events, "sse.ring_events")? as usize,
        client_buffer_events: int(e.client_buffer_events, "sse.client_buffer_events")? as usize,
        slow_client: match need(e.slow_client, "sse.slow_client")?.as_str() {
            "catch_up" => SlowClient::CatchUp,
            "disconnect" => SlowClient::Disconnect,
            other => {
                return Err(err(
                    "sse.slow_client",
                    format!("'{other}' is not one of catch_up, disconnect"),
                ))
            }
        },
        max_connections: int(e.max_connections, "sse.max_connections")? as usize,
        max_per_key: int(e.max_per_key, "sse.max_per_key")? as usize,
        max_per_user: int(e.max_per_user, "sse.max_per_user")? as usize,
        heartbeat_interval: dur(e.heartbeat_interval, "sse.heartbeat_interval")?,
        retry_ms: int(e.retry_ms, "sse.retry_ms")? as u64,
        catch_up_batch_events: int(e.catch_up_batch_events, "sse.catch_up_batch_events")? as usize,
    };
    if sse.client_buffer_events > sse.ring_events {
        return Err(err(
            "sse.client_buffer_events",
            format!(
                "{} exceeds sse.ring_events {}: a client may not lag further than the ring reaches",
                sse.client_buffer_events, sse.ring_events
            ),
        ));
    }
    if sse.heartbeat_interval.is_zero() {
        return Err(err("sse.heartbeat_interval", "must be greater than zero"));
    }
    Ok(sse)
}

/// `[rate_limit]`.
fn rate_limit_section(r: RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
    let per_second = need(r.per_second, "rate_limit.per_second")?;
    if !(0.0..=1_000_000.0).contains(&per_second) {
        return Err(err(
            "rate_limit.per_second",
            format!("{per_second} is out of range 0..=1000000"),
        ));
    }
    // With the limit off (per_second 0) the burst means nothing: any
    // value starts, as `RATE_LIMIT=0 RATE_BURST=0` does with ebuse.
    let burst = need(r.burst, "rate_limit.burst")?;
    let rate_limit = RateLimitConfig {
        per_second,
        burst: if per_second == 0.0 {
            burst.clamp(1, 1_000_000)
        } else {
            {
                let (lo, hi) = int_range("rate_limit", "burst").unwrap_or((1, i64::MAX));
                range(burst, "rate_limit.burst", lo, hi)?
            }
        } as u32,
        max_tracked_addresses: int(r.max_tracked_addresses, "rate_limit.max_tracked_addresses")?
            as usize,
    };
    if rate_limit.enabled() && rate_limit.per_second < 1e-3 {
        return Err(err(
            "rate_limit.per_second",
            format!("{per_second} is below 0.001 (one request in 1000 s); 0 turns the limit off"),
        ));
    }
    Ok(rate_limit)
}

/// For in-process tests: the default configuration (with `env` on top) with
/// its database (and so its index) in a fresh directory of this name under the system's
/// temporary directory, which it returns; the caller removes it.
#[cfg(test)]
pub(crate) fn for_tests(name: &str, env: &[(&str, &str)]) -> (PathBuf, Config) {
    let dir = std::env::temp_dir().join(format!("shardcast-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let mut env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    env.insert(
        "SHARDCAST_DATABASE_PATH".to_string(),
        dir.join("events.db").display().to_string(),
    );
    let cfg = Config::load(None, &env).expect("the default configuration loads");
    (dir, cfg)
}

/// `server.max_connections = 0` means this many plus `sse.max_connections`.
pub const DEFAULT_NON_SSE_CONNECTIONS: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_keys_declare_their_ranges_and_are_held_to_them() {
        for (section, key) in KEYS {
            if let Some((lo, hi)) = int_range(section, key) {
                assert!(lo <= hi, "{section}.{key}");
            }
        }
        assert_eq!(int_range("sse", "max_per_user"), Some((0, 10_000_000)));
        // Negative KiB or positive pages: any integer.
        assert_eq!(int_range("database", "cache_size"), None);
        assert_eq!(int_range("server", "listen"), None);
        let env: std::collections::HashMap<String, String> =
            [("SHARDCAST_SERVER_GZIP_LEVEL".to_string(), "10".to_string())].into();
        let e = Config::load(None, &env).unwrap_err();
        assert_eq!(e.key, "server.gzip_level");
        assert!(e.message.contains("1..=9"), "{e}");
        assert!(raw::is_secret("auth", "token_secret") && !raw::is_secret("auth", "tenants_file"));
    }
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn embedded_default_is_what_the_docs_say() {
        let c = Config::default_config();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.server.read_timeout, Duration::from_secs(30));
        assert_eq!(c.server.write_timeout, Duration::from_secs(60));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.api.batch_events_max, 1000);
        assert_eq!(c.database.synchronous, Synchronous::Full);
        assert_eq!(c.database.path, PathBuf::from("./data/events.db"));
        assert_eq!(c.index.path, PathBuf::from("./data/index"));
        assert!(c.auth.api_key.is_none());
        assert!(c.server.shards >= 1);
    }

    #[test]
    fn ebuse_env_names_override() {
        let c = Config::load(
            None,
            &env(&[
                ("PORT", "9999"),
                ("API_KEY", "0123456789abcdef"),
                ("DB_PATH", "/tmp/x/events.db"),
                ("READ_TIMEOUT", "5s"),
                ("SHUTDOWN_TIMEOUT", "1m"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.auth.api_key.as_deref(), Some("0123456789abcdef"));
        assert_eq!(c.database.path, PathBuf::from("/tmp/x/events.db"));
        assert_eq!(c.index.path, PathBuf::from("/tmp/x/index"));
        assert_eq!(c.server.read_timeout, Duration::from_secs(5));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(60));
    }

    #[test]
    fn shardcast_env_names_cover_every_key_and_win() {
        let c = Config::load(
            None,
            &env(&[
                ("DB_PATH", "/a/events.db"),
                ("SHARDCAST_DATABASE_PATH", "/b/events.db"),
                ("SHARDCAST_WRITER_BATCH_EVENTS_MAX", "5000"),
            ]),
        )
        .unwrap();
        assert_eq!(c.database.path, PathBuf::from("/b/events.db"));
        assert_eq!(c.writer.batch_events_max, 5000);
        // Every documented key is settable from the environment.
        for (section, key) in KEYS {
            let mut raw = RawConfig::default();
            let v = match *key {
                "pin_cpus" | "cors_allow_credentials" | "gzip" => "true",
                "listen" => "127.0.0.1:1",
                "synchronous" => "normal",
                "format" => "json",
                k if k.ends_with("timeout") => "1s",
                "path" | "api_key" | "level" => "x",
                _ => "1",
            };
            raw::set_raw(&mut raw, section, key, v.to_string()).unwrap();
        }
    }

    #[test]
    fn explain_says_where_each_value_came_from() {
        let dir = std::env::temp_dir().join(format!("sc-explain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "[writer]\nbatch_events_max = 2000\n[sse]\nretry_ms = 5000\n",
        )
        .unwrap();
        let e = explain(
            Some(&f),
            &env(&[
                ("PORT", "9999"),
                ("SHARDCAST_SSE_RETRY_MS", "7000"),
                ("API_KEY", "secret-key-0123456789"),
            ]),
        )
        .unwrap();
        let find = |k: &str| e.iter().find(|x| x.key == k).unwrap().clone();
        assert_eq!(find("server.listen").value, "\"127.0.0.1:9999\"");
        assert_eq!(find("server.listen").origin, "env PORT");
        assert_eq!(find("writer.batch_events_max").value, "2000");
        assert!(find("writer.batch_events_max").origin.starts_with("file "));
        assert_eq!(find("sse.retry_ms").origin, "env SHARDCAST_SSE_RETRY_MS");
        assert_eq!(find("sse.retry_ms").value, "\"7000\"");
        assert_eq!(find("server.backlog").origin, "default");
        let key = find("auth.api_key");
        assert_eq!(
            (key.value.as_str(), key.origin.as_str()),
            ("<set, not shown>", "env API_KEY")
        );
        assert_eq!(e.len(), KEYS.len());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::load(None, &env(&[("SHARDCAST_SERVER_BACKLOG", "lots")])).unwrap_err();
        assert_eq!(e.key, "SHARDCAST_SERVER_BACKLOG");
        let e = Config::load(None, &env(&[("SHARDCAST_DATABASE_SYNCHRONOUS", "off")])).unwrap_err();
        assert_eq!(e.key, "database.synchronous");
        let e = Config::load(None, &env(&[("READ_TIMEOUT", "soon")])).unwrap_err();
        assert_eq!(e.key, "READ_TIMEOUT");
        let e =
            Config::load(None, &env(&[("SHARDCAST_SERVER_LISTEN", "0.0.0.0:8080")])).unwrap_err();
        assert_eq!(e.key, "auth.api_key");
        assert!(e.to_string().contains("loopback"));
        let e = raw_from_toml("[server]\nlisten_on = 1\n", "f.toml").unwrap_err();
        assert!(e.message.contains("listen_on"), "{e}");
    }

    #[test]
    fn every_key_is_in_the_default_file_and_documented() {
        let docs = include_str!("../../docs/configuration.md");
        for (section, key) in KEYS {
            assert!(
                docs.contains(&format!("`{section}.{key}`")),
                "docs/configuration.md lacks {section}.{key}"
            );
            let table: toml::Table = toml::from_str(DEFAULT_TOML).unwrap();
            assert!(
                table[*section].get(*key).is_some(),
                "tuning/default.toml lacks {section}.{key}"
            );
        }
    }

    #[test]
    fn rate_limit_and_admission_keys() {
        let c = Config::default_config();
        assert_eq!(c.rate_limit.per_second, 100.0);
        assert_eq!(c.rate_limit.burst, 200);
        assert_eq!(c.rate_limit.max_tracked_addresses, 100_000);
        assert!(c.server.trusted_proxies.is_empty());
        // 0 in the file: 10,000 plus the SSE cap.
        assert_eq!(c.server.max_connections, 20_000);
        let c = Config::load(
            None,
            &env(&[
                ("RATE_LIMIT", "0.5"),
                ("RATE_BURST", "7"),
                ("SHARDCAST_SSE_MAX_CONNECTIONS", "50000"),
                (
                    "SHARDCAST_SERVER_TRUSTED_PROXIES",
                    "127.0.0.1, 10.0.0.0/8,::1",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(c.rate_limit.per_second, 0.5);
        assert_eq!(c.rate_limit.burst, 7);
        assert_eq!(c.server.max_connections, 60_000);
        assert_eq!(c.server.trusted_proxies.len(), 3);
        let c = Config::load(
            None,
            &env(&[
                ("RATE_LIMIT", "5"),
                ("SHARDCAST_RATE_LIMIT_PER_SECOND", "0"),
                ("SHARDCAST_SERVER_MAX_CONNECTIONS", "3"),
            ]),
        )
        .unwrap();
        assert!(!c.rate_limit.enabled());
        assert_eq!(c.server.max_connections, 3);
        let e = Config::load(None, &env(&[("RATE_LIMIT", "fast")])).unwrap_err();
        assert_eq!(e.key, "RATE_LIMIT");
        let e = Config::load(None, &env(&[("RATE_LIMIT", "-1")])).unwrap_err();
        assert_eq!(e.key, "rate_limit.per_second");
        let e = Config::load(None, &env(&[("RATE_BURST", "0")])).unwrap_err();
        assert_eq!(e.key, "rate_limit.burst");
        // With the limit off, the burst is moot: ebuse's `RATE_LIMIT=0 RATE_BURST=0` starts.
        let c = Config::load(None, &env(&[("RATE_LIMIT", "0"), ("RATE_BURST", "0")])).unwrap();
        assert!(!c.rate_limit.enabled());
        // A short key starts (with a warning), as ebuse's `API_KEY=abc` does.
        let c = Config::load(None, &env(&[("API_KEY", "abc")])).unwrap();
        assert_eq!(c.auth.api_key.as_deref(), Some("abc"));
        let e = Config::load(
            None,
            &env(&[("SHARDCAST_SERVER_TRUSTED_PROXIES", "10.0.0.1/8")]),
        )
        .unwrap_err();
        assert_eq!(e.key, "server.trusted_proxies");
        let toml = "[rate_limit]\nper_second = 2.5\nburst = 3\n[server]\ntrusted_proxies = [\"192.168.0.0/16\"]\n";
        let raw = raw_from_toml(DEFAULT_TOML, "d")
            .unwrap()
            .overlay(raw_from_toml(toml, "f").unwrap());
        let c = Config::validate(raw).unwrap();
        assert_eq!(c.rate_limit.per_second, 2.5);
        assert_eq!(c.rate_limit.burst, 3);
        assert!(c.server.trusted_proxies[0].contains("192.168.7.7".parse().unwrap()));
    }

    #[test]
    fn public_bind_with_key_is_allowed() {
        let c = Config::load(
            None,
            &env(&[
                ("SHARDCAST_SERVER_LISTEN", "0.0.0.0:8080"),
                ("API_KEY", "a-long-enough-key"),
            ]),
        )
        .unwrap();
        assert!(!c.server.listen.ip().is_loopback());
    }
}
