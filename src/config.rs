//! Configuration: one raw TOML shape (`RawConfig`, every key optional with a
//! documented default) and one validated shape (`Config`) that the rest of the
//! server reads. Environment variables override the file: ebuse's names (`PORT`,
//! `API_KEY`, `DB_PATH`, `READ_TIMEOUT`, …) and `SHARDCAST_<SECTION>_<KEY>` for
//! every key. Validation happens once at start; a bad value is one line naming
//! the key.
//!
//! `tuning/default.toml` mirrors `Config::default()`; a test keeps them equal.
//!
//! Long: every key appears in the raw shape, the environment overlay, the
//! validation and the merge, one block each; declaring each key once in a
//! table and deriving these from it (issue 15) is the step still to take.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The embedded default configuration, also shipped as `tuning/default.toml`.
pub const DEFAULT_TOML: &str = include_str!("../tuning/default.toml");

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

/// One key of a tenant, as written in a tenants file. (Unknown fields: a
/// tenants.yaml may carry ebuse's and others' freely, a warning each; a TOML
/// config refuses them, `config::raw_from_toml`.)
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RawKey {
    pub key: Option<String>,
    pub key_sha256: Option<String>,
    /// read, write, read_write or admin (default admin).
    pub role: Option<String>,
}

/// One tenant, as written in `tenants.yaml` or `[[tenants]]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RawTenant {
    pub name: String,
    /// ebuse's field: this tenant's all-powerful key.
    pub api_key: Option<String>,
    /// The same key given as its SHA-256 digest (hex), so the file holds no secret.
    pub api_key_sha256: Option<String>,
    /// More keys, each with a role.
    #[serde(default)]
    pub keys: Vec<RawKey>,
    /// Size cap of this tenant's database (0: `storage.max_database_bytes`).
    pub max_database_bytes: Option<u64>,
    /// HS256 secret that verifies this tenant's subscription tokens.
    pub token_secret: Option<String>,
    /// The secret before a rotation, accepted beside `token_secret`.
    pub token_secret_previous: Option<String>,
    /// PEM public key(s), or a PEM file's path, for RS256/ES256 tokens.
    pub token_public_key: Option<String>,
}

// ---------------------------------------------------------------------------
// Raw shape: what the TOML file and the environment may say.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub writer: RawWriter,
    #[serde(default)]
    pub api: RawApi,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub index: RawIndex,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub sse: RawSse,
    #[serde(default)]
    pub storage: RawStorage,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
}

/// How a key's value is read from the environment (its TOML type follows
/// from it), and whether it is a secret (`shardcast config` shows it only as
/// set or not).
pub trait Kind {
    type T;
    const SECRET: bool = false;
    fn parse(name: &str, v: &str) -> Result<Self::T, ConfigError>;
}

/// Free text.
pub struct Text;
/// An integer; its range is `Config::validate`'s.
pub struct Int;
/// A number with a fraction.
pub struct Float;
/// `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
pub struct Flag;
/// Comma-separated in the environment, an array in TOML.
pub struct List;
/// A duration (`30s`, `1m30s`, `250ms`, `2h`, or bare seconds).
pub struct Dur;
/// Text never printed.
pub struct Secret;
/// A list never printed.
pub struct SecretList;

impl Kind for Text {
    type T = String;
    fn parse(_: &str, v: &str) -> Result<String, ConfigError> {
        Ok(v.to_string())
    }
}
impl Kind for Secret {
    type T = String;
    const SECRET: bool = true;
    fn parse(_: &str, v: &str) -> Result<String, ConfigError> {
        Ok(v.to_string())
    }
}
impl Kind for Int {
    type T = i64;
    fn parse(name: &str, v: &str) -> Result<i64, ConfigError> {
        v.trim()
            .parse::<i64>()
            .map_err(|_| err(name, format!("'{v}' is not an integer")))
    }
}
impl Kind for Float {
    type T = f64;
    fn parse(name: &str, v: &str) -> Result<f64, ConfigError> {
        v.trim()
            .parse::<f64>()
            .map_err(|_| err(name, format!("'{v}' is not a number")))
    }
}
impl Kind for Flag {
    type T = bool;
    fn parse(name: &str, v: &str) -> Result<bool, ConfigError> {
        match v.trim() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(err(name, format!("'{v}' is not a boolean"))),
        }
    }
}
impl Kind for List {
    type T = Vec<String>;
    fn parse(_: &str, v: &str) -> Result<Vec<String>, ConfigError> {
        Ok(v.split(',')
            .map(|o| o.trim().to_string())
            .filter(|o| !o.is_empty())
            .collect())
    }
}
impl Kind for SecretList {
    type T = Vec<String>;
    const SECRET: bool = true;
    fn parse(name: &str, v: &str) -> Result<Vec<String>, ConfigError> {
        List::parse(name, v)
    }
}
impl Kind for Dur {
    type T = String;
    fn parse(name: &str, v: &str) -> Result<String, ConfigError> {
        parse_duration(v).map_err(|m| err(name, m))?;
        Ok(v.to_string())
    }
}

/// Every key, declared once: its section, name, kind, and for integers the
/// range its value must lie in. From this come the
/// raw sections (what the file and the environment may say, each key
/// optional), `KEYS` (the `SHARDCAST_<SECTION>_<KEY>` names, `shardcast
/// config`, the docs and profile checks), the environment's parsing
/// (`set_raw`), which keys are secret, and the overlay of one raw config on
/// another, and the range checks of `Config::validate`; defaults
/// (tuning/default.toml) and the relations between keys are its own.
macro_rules! config_keys {
    (@range) => { None };
    (@range $lo:expr, $hi:expr) => { Some(($lo, $hi)) };
    ($( $section:ident : $Raw:ident { $( $key:ident : $kind:ident $( ( $lo:expr, $hi:expr ) )? ),* $(,)? } )*) => {
        $(
            #[derive(Debug, Default, Deserialize)]
            #[serde(deny_unknown_fields)]
            pub struct $Raw {
                $( pub $key: Option<<$kind as Kind>::T>, )*
            }
        )*

        /// Every key, as (section, key), in the default file's order; the
        /// environment name is `SHARDCAST_SECTION_KEY`.
        pub const KEYS: &[(&str, &str)] = &[ $( $( (stringify!($section), stringify!($key)), )* )* ];

        /// Set one key from a string (an environment variable).
        fn set_raw(raw: &mut RawConfig, section: &str, key: &str, v: String) -> Result<(), ConfigError> {
            let name = format!("{section}.{key}");
            match (section, key) {
                $( $( (stringify!($section), stringify!($key)) => {
                    raw.$section.$key = Some(<$kind as Kind>::parse(&name, &v)?)
                } )* )*
                _ => return Err(err(&name, "unknown key")),
            }
            Ok(())
        }

        /// The range an integer key's value must lie in, where the table
        /// gives one (`Config::validate` checks it with the key's name).
        fn int_range(section: &str, key: &str) -> Option<(i64, i64)> {
            match (section, key) {
                $( $( (stringify!($section), stringify!($key)) => config_keys!(@range $( $lo, $hi )?), )* )*
                _ => None,
            }
        }

        /// Keys whose values are never printed.
        fn is_secret(section: &str, key: &str) -> bool {
            match (section, key) {
                $( $( (stringify!($section), stringify!($key)) => <$kind as Kind>::SECRET, )* )*
                _ => false,
            }
        }

        impl RawConfig {
            /// `other`'s set keys win over `self`'s.
            fn overlay(mut self, mut other: RawConfig) -> RawConfig {
                $( $( self.$section.$key = other.$section.$key.take().or(self.$section.$key.take()); )* )*
                if !other.tenants.is_empty() {
                    self.tenants = other.tenants;
                }
                self
            }
        }
    };
}

config_keys! {
    server: RawServer {
        listen: Text,
        shards: Int(0, 1024),
        backlog: Int(1, 1 << 20),
        max_body_bytes: Int(1024, 1 << 30),
        max_header_bytes: Int(1024, 1 << 20),
        read_timeout: Dur,
        write_timeout: Dur,
        idle_timeout: Dur,
        shutdown_timeout: Dur,
        io_memory_bytes: Int(64 * 1024, 64 << 20),
        pin_cpus: Flag,
        cors_origins: List,
        cors_allow_credentials: Flag,
        gzip: Flag,
        gzip_min_bytes: Int(0, i64::MAX),
        gzip_level: Int(1, 9),
        max_connections: Int(0, 100_000_000),
        trusted_proxies: List,
    }
    writer: RawWriter {
        batch_events_max: Int(1, 1_000_000),
        queue_requests_max: Int(1, 10_000_000),
        queue_bytes_max: Int(1 << 20, i64::MAX),
        retry_after_secs: Int(1, 3600),
    }
    api: RawApi {
        batch_events_max: Int(1, 100_000),
    }
    auth: RawAuth {
        api_key: Secret,
        read_api_keys: SecretList,
        admin_api_key: Secret,
        admin_api_key_sha256: Text,
        tenants_file: Text,
        token_secret: Secret,
        token_secret_previous: Secret,
        token_public_key: Text,
    }
    database: RawDatabase {
        path: Text,
        synchronous: Text,
        cache_size: Int,
        mmap_size: Int(0, i64::MAX),
        busy_timeout: Dur,
        wal_autocheckpoint: Int(0, i32::MAX as i64),
        journal_size_limit: Int(-1, i64::MAX),
        read_connections: Int(1, 256),
        tenants_dir: Text,
    }
    index: RawIndex {
        path: Text,
        map_size: Int(1 << 20, 1 << 44),
    }
    log: RawLog {
        level: Text,
        format: Text,
    }
    sse: RawSse {
        ring_events: Int(16, 1 << 24),
        client_buffer_events: Int(1, 1 << 24),
        slow_client: Text,
        max_connections: Int(0, 10_000_000),
        max_per_key: Int(0, 10_000_000),
        max_per_user: Int(0, 10_000_000),
        heartbeat_interval: Dur,
        retry_ms: Int(0, 3_600_000),
        catch_up_batch_events: Int(1, 100_000),
    }
    storage: RawStorage {
        retain_events: Int(0, i64::MAX),
        retain_age: Dur,
        max_database_bytes: Int(0, i64::MAX),
    }
    rate_limit: RawRateLimit {
        per_second: Float,
        burst: Int(1, 1_000_000),
        max_tracked_addresses: Int(1, 100_000_000),
    }
}

/// Parse a duration the way ebuse's Go flags do (`30s`, `1m30s`, `500ms`, `2h`),
/// plus a bare integer meaning seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("'{s}' lacks a unit (ns, us, ms, s, m, h)"))?;
        if num_end == 0 {
            return Err(format!("'{s}' is not a duration like 30s or 1m30s"));
        }
        let value: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("'{s}' has a bad number"))?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            u => return Err(format!("'{s}' has an unknown unit '{u}'")),
        };
        total += Duration::from_nanos((value * nanos_per) as u64);
        rest = &rest[unit_end..];
    }
    Ok(total)
}

/// Where a value was set, for messages.
/// A config file is strict: a key nobody reads is a typo to report, also
/// inside `[[tenants]]` (whose fields a tenants.yaml may carry freely).
fn raw_from_toml(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    let mut unknown = Vec::new();
    let de = toml::Deserializer::new(text);
    let raw = serde_ignored::deserialize(de, |path| unknown.push(path.to_string())).map_err(
        |e: toml::de::Error| {
            let msg = e.message().to_string();
            // toml reports the failing key path in its message for unknown fields;
            // name the file so the operator knows where to look.
            err(origin, msg.trim().to_string())
        },
    )?;
    match unknown.first() {
        Some(key) => Err(err(origin, format!("unknown field `{key}`"))),
        None => Ok(raw),
    }
}

/// The environment lookup, injectable for tests.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for std::collections::HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        std::collections::HashMap::get(self, name).cloned()
    }
}

/// ebuse's environment names and the key each one sets.
pub const EBUSE_ENV: &[(&str, &str, &str)] = &[
    ("ENABLE_GZIP", "server", "gzip"),
    ("API_KEY", "auth", "api_key"),
    ("DB_PATH", "database", "path"),
    ("READ_TIMEOUT", "server", "read_timeout"),
    ("WRITE_TIMEOUT", "server", "write_timeout"),
    ("IDLE_TIMEOUT", "server", "idle_timeout"),
    ("SHUTDOWN_TIMEOUT", "server", "shutdown_timeout"),
    ("RATE_LIMIT", "rate_limit", "per_second"),
    ("RATE_BURST", "rate_limit", "burst"),
];

/// Apply the environment on top of the file: ebuse's names first, then the
/// `SHARDCAST_*` names, which are more specific and win.
pub fn apply_env(raw: &mut RawConfig, env: &dyn Env) -> Result<(), ConfigError> {
    for (var, section, key) in EBUSE_ENV {
        if let Some(v) = env.get(var) {
            set_raw(raw, section, key, v).map_err(|e| err(var, e.message))?;
        }
    }
    if let Some(port) = env.get("PORT") {
        let port: u16 = port
            .trim()
            .parse()
            .map_err(|_| err("PORT", format!("'{port}' is not a port number")))?;
        let host = raw
            .server
            .listen
            .as_deref()
            .and_then(|l| l.rsplit_once(':').map(|(h, _)| h.to_string()))
            .unwrap_or_else(|| "127.0.0.1".to_string());
        raw.server.listen = Some(format!("{host}:{port}"));
    }
    for (section, key) in KEYS {
        let var = format!(
            "SHARDCAST_{}_{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        );
        if let Some(v) = env.get(&var) {
            set_raw(raw, section, key, v).map_err(|e| err(&var, e.message))?;
        }
    }
    Ok(())
}

/// One key's effective value and where it came from (`shardcast config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Explained {
    pub key: String,
    /// As TOML would write it; secrets are shown only as set or not.
    pub value: String,
    /// `default`, `file PATH` or `env NAME`.
    pub origin: String,
}

/// Every key's effective value and its origin, for the same inputs as
/// `Config::load` (which must accept them: an invalid setting is an error
/// here too). Later sources win as in `load`: default, file, ebuse's
/// environment names, `SHARDCAST_*`.
pub fn explain(
    file: Option<&std::path::Path>,
    env: &dyn Env,
) -> Result<Vec<Explained>, ConfigError> {
    Config::load(file, env)?;
    let default: toml::Table = toml::from_str(DEFAULT_TOML).expect("embedded default is TOML");
    let from_file: Option<(toml::Table, String)> = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
            let t: toml::Table = toml::from_str(&text)
                .map_err(|e| err(&path.display().to_string(), e.to_string()))?;
            Some((t, path.display().to_string()))
        }
        None => None,
    };
    let mut out = Vec::new();
    for (section, key) in KEYS {
        let get = |t: &toml::Table| t.get(*section).and_then(|s| s.get(*key)).cloned();
        let mut value = get(&default).map(|v| v.to_string()).unwrap_or_default();
        let mut origin = "default".to_string();
        if let Some((t, path)) = &from_file {
            if let Some(v) = get(t) {
                value = v.to_string();
                origin = format!("file {path}");
            }
        }
        let as_env = |v: String| toml::Value::String(v).to_string();
        for (var, s, k) in EBUSE_ENV {
            if (s, k) == (section, key) {
                if let Some(v) = env.get(var) {
                    value = as_env(v);
                    origin = format!("env {var}");
                }
            }
        }
        if (*section, *key) == ("server", "listen") {
            if let Some(port) = env.get("PORT") {
                let host = value
                    .trim_matches('"')
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_string())
                    .unwrap_or_else(|| "127.0.0.1".into());
                value = as_env(format!("{host}:{}", port.trim()));
                origin = "env PORT".into();
            }
        }
        let var = format!(
            "SHARDCAST_{}_{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        );
        if let Some(v) = env.get(&var) {
            value = as_env(v);
            origin = format!("env {var}");
        }
        if is_secret(section, key) {
            let set = !matches!(value.as_str(), "\"\"" | "[]" | "");
            value = if set {
                "<set, not shown>".into()
            } else {
                "\"\"".into()
            };
        }
        out.push(Explained {
            key: format!("{section}.{key}"),
            value,
            origin,
        });
    }
    Ok(out)
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

    /// Long: one block per key, each checked and converted in turn, in the
    /// file's order. Declaring each key once in a table, with its range and
    /// default, and deriving this from it is the step still to take (issue 15).
    pub fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
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
        // A key's integer, within the range the key table declares for it.
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
        let s = raw.server;
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
        let w = raw.writer;
        let writer = WriterConfig {
            batch_events_max: int(w.batch_events_max, "writer.batch_events_max")? as usize,
            queue_requests_max: int(w.queue_requests_max, "writer.queue_requests_max")? as usize,
            queue_bytes_max: int(w.queue_bytes_max, "writer.queue_bytes_max")? as usize,
            cpu: writer_cpu,
            retry_after_secs: int(w.retry_after_secs, "writer.retry_after_secs")? as u32,
        };
        let a = raw.api;
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
        let nonempty = |v: Option<String>| v.filter(|k| !k.trim().is_empty());
        let auth = AuthConfig {
            api_key: nonempty(raw.auth.api_key),
            read_api_keys: raw.auth.read_api_keys.unwrap_or_default(),
            admin_api_key: nonempty(raw.auth.admin_api_key),
            admin_api_key_sha256: nonempty(raw.auth.admin_api_key_sha256),
            tenants_file: nonempty(raw.auth.tenants_file).map(PathBuf::from),
            token_secret: nonempty(raw.auth.token_secret),
            token_secret_previous: nonempty(raw.auth.token_secret_previous),
            token_public_key: nonempty(raw.auth.token_public_key),
        };
        // Short keys start (ebuse takes any, `API_KEY=abc`): `tenant` warns
        // about each once logging is up, naming its owner, never the key.
        // Tenants carry their own keys: multi-tenant mode is never open.
        let multi = auth.tenants_file.is_some() || !raw.tenants.is_empty();
        if auth.api_key.is_none() && !multi && !listen.ip().is_loopback() {
            return Err(err(
                "auth.api_key",
                format!("no API key is set, so shardcast only listens on loopback; set API_KEY (or auth.api_key) to listen on {listen}"),
            ));
        }
        let d = raw.database;
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
            wal_autocheckpoint_pages: int(d.wal_autocheckpoint, "database.wal_autocheckpoint")?
                as u32,
            journal_size_limit_bytes: int(d.journal_size_limit, "database.journal_size_limit")?,
            read_connections: int(d.read_connections, "database.read_connections")? as usize,
            path,
            max_database_bytes: match int(
                raw.storage.max_database_bytes,
                "storage.max_database_bytes",
            )? {
                0 => None,
                b => Some(b as u64),
            },
            tenants_dir: PathBuf::from(need(d.tenants_dir, "database.tenants_dir")?),
        };
        let i = raw.index;
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
        let l = raw.log;
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
        let storage = StorageConfig {
            retain_events: int(raw.storage.retain_events, "storage.retain_events")? as u64,
            retain_age: Some(dur(raw.storage.retain_age, "storage.retain_age")?)
                .filter(|d| !d.is_zero()),
        };
        let e = raw.sse;
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
            catch_up_batch_events: int(e.catch_up_batch_events, "sse.catch_up_batch_events")?
                as usize,
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
        let mut server = server;
        if server.max_connections == 0 {
            server.max_connections = DEFAULT_NON_SSE_CONNECTIONS + sse.max_connections;
        }
        let r = raw.rate_limit;
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
                format!(
                    "{per_second} is below 0.001 (one request in 1000 s); 0 turns the limit off"
                ),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&log.level)
            .map_err(|e| err("log.level", format!("'{}': {e}", log.level)))?;
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
        })
    }
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
        assert!(is_secret("auth", "token_secret") && !is_secret("auth", "tenants_file"));
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
            set_raw(&mut raw, section, key, v.to_string()).unwrap();
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
        let docs = include_str!("../docs/configuration.md");
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
