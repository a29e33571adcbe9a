//! The raw shape: what the TOML file and the environment may say, every key
//! optional, declared once in the key table below; and reading it (TOML,
//! with unknown keys refused; the environment, ebuse's names then
//! `SHARDCAST_<SECTION>_<KEY>`).

use super::{err, ConfigError};
use serde::Deserialize;
use std::time::Duration;

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
    #[serde(default)]
    pub cluster: RawCluster,
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
        pub(super) fn set_raw(raw: &mut RawConfig, section: &str, key: &str, v: String) -> Result<(), ConfigError> {
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
        pub(super) fn int_range(section: &str, key: &str) -> Option<(i64, i64)> {
            match (section, key) {
                $( $( (stringify!($section), stringify!($key)) => config_keys!(@range $( $lo, $hi )?), )* )*
                _ => None,
            }
        }

        /// Keys whose values are never printed.
        pub(super) fn is_secret(section: &str, key: &str) -> bool {
            match (section, key) {
                $( $( (stringify!($section), stringify!($key)) => <$kind as Kind>::SECRET, )* )*
                _ => false,
            }
        }

        impl RawConfig {
            /// `other`'s set keys win over `self`'s.
            pub(super) fn overlay(mut self, mut other: RawConfig) -> RawConfig {
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
    cluster: RawCluster {
        nats_urls: List,
        stream_prefix: Text,
        replicas: Int(1, 5),
        publish_timeout: Dur,
        node_name: Text,
        nats_creds: Text,
        nats_token: Secret,
        nats_tls_ca: Text,
        nats_tls_cert: Text,
        nats_tls_key: Text,
        nats_tls_required: Flag,
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
pub(super) fn raw_from_toml(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
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
