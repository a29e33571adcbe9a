//! Tenants and keys: who a request is, and what it may do.
//!
//! Every request resolves its API key to a tenant and a set of rights
//! (`Access`) before anything else is looked at, so no handler can reach
//! another tenant's storage. Keys are kept only as SHA-256 digests and
//! looked up by the digest of the presented key, so the comparison leaks
//! nothing useful through its timing, and a tenants file may carry digests
//! (`api_key_sha256`) instead of keys.
//!
//! Single-tenant mode (the default) is one tenant, `default`, stored at
//! `database.path` and `index.path`: `auth.api_key` may do everything and
//! `auth.read_api_keys` may only read. Multi-tenant mode comes from a
//! tenants file (`--tenants FILE`, ebuse's `tenants.yaml` as it is) or
//! `[[tenants]]` in the config; each tenant gets `<data_dir>/<name>.db` and
//! the LMDB index `<data_dir>/<name>.index`, created on first start.
//!
//! The set is immutable once built (`TenantSet`, shared by `Arc`); a reload
//! (SIGHUP) builds a new one and hands it to the writer and the shards.

use crate::config::{Config, ConfigError, DatabaseConfig, IndexConfig, RawTenant};
use crate::token::{Grant, TokenError, TokenKeys};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::ids::TenantId;

/// SHA-256 of a key.
pub type KeyDigest = [u8; 32];

/// Longest tenant name (it becomes a file name).
pub const TENANT_NAME_BYTES_MAX: usize = 100;

/// What a key may do. A tenant's ebuse `api_key` is `ADMIN` of its tenant
/// (everything on the tenant's own data); listing tenants takes the
/// server's `admin_api_key`, which holds no tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u8);

impl Access {
    /// GET endpoints and `/events/subscribe`: what a browser page may hold.
    pub const READ: Access = Access(1);
    /// Appends and consumer positions.
    pub const WRITE: Access = Access(2);
    /// Everything on the tenant.
    pub const ADMIN: Access = Access(1 | 2 | 4);

    pub fn allows(self, need: Access) -> bool {
        self.0 & need.0 == need.0
    }

    fn parse(role: &str) -> Option<Access> {
        match role {
            "read" => Some(Access::READ),
            "write" => Some(Access::WRITE),
            "read_write" => Some(Access(1 | 2)),
            "admin" => Some(Access::ADMIN),
            _ => None,
        }
    }
}

pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// ebuse's `tenants.yaml`, plus shardcast's additions.
#[derive(Debug, Default, Deserialize)]
pub struct TenantsFile {
    pub data_dir: Option<String>,
    pub admin_api_key: Option<String>,
    pub admin_api_key_sha256: Option<String>,
    /// ebuse chooses pebble or sqlite; shardcast always stores in SQLite.
    pub store_backend: Option<String>,
    #[serde(default)]
    pub tenants: Vec<RawTenant>,
}

/// A validated tenant: where it lives and who may use it.
#[derive(Debug, Clone)]
pub struct TenantSpec {
    pub name: String,
    pub database: DatabaseConfig,
    pub index: IndexConfig,
    pub keys: Vec<(KeyDigest, Access)>,
    /// Keys that verify its subscription tokens, when it accepts them.
    pub tokens: Option<Arc<TokenKeys>>,
}

/// What the configuration says about tenants and keys.
#[derive(Debug, Clone)]
pub struct Tenancy {
    pub multi: bool,
    pub tenants: Vec<TenantSpec>,
    /// Keys that may list tenants (`GET /tenants`).
    pub admin_keys: Vec<KeyDigest>,
    /// Single-tenant mode without any key: every request is the tenant's admin.
    pub open: bool,
}

fn bad(what: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError {
        key: what.to_string(),
        message: msg.into(),
    }
}

fn hex_digest(s: &str, what: &str) -> Result<KeyDigest, ConfigError> {
    let s = s.trim();
    if s.len() != 64 {
        return Err(bad(what, "a SHA-256 digest is 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).unwrap_or("zz");
        out[i] = u8::from_str_radix(hex, 16).map_err(|_| bad(what, format!("'{s}' is not hex")))?;
    }
    Ok(out)
}

/// ebuse takes any key (its own tests use `key1`, `API_KEY=abc`): such a
/// key starts, with a warning naming whose it is, never the key.
fn warn_if_short(owner: &str, key: &str) {
    if key.len() < crate::limits::API_KEY_BYTES_MIN {
        tracing::warn!(
            owner,
            bytes = key.len(),
            "API key shorter than {} bytes: easy to guess; use a long random key",
            crate::limits::API_KEY_BYTES_MIN
        );
    }
}

fn one_key(
    key: Option<&str>,
    sha: Option<&str>,
    what: &str,
) -> Result<Option<KeyDigest>, ConfigError> {
    match (key, sha) {
        (Some(_), Some(_)) => Err(bad(what, "give the key or its sha256, not both")),
        (Some(k), None) => {
            warn_if_short(what, k);
            if k.is_empty() {
                return Err(bad(what, "an API key must not be empty"));
            }
            Ok(Some(digest(k.as_bytes())))
        }
        (None, Some(h)) => Ok(Some(hex_digest(h, what)?)),
        (None, None) => Ok(None),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TENANT_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Tenancy {
    /// From the validated config: the tenants file if one is named, else
    /// `[[tenants]]`, else single-tenant mode.
    ///
    /// Long: each tenant's checks in turn (name, keys with roles, token keys,
    /// files), each a few lines with the error that names what is wrong.
    pub fn from_config(cfg: &Config) -> Result<Tenancy, ConfigError> {
        let mut admin_keys = Vec::new();
        if let Some(d) = one_key(
            cfg.auth.admin_api_key.as_deref(),
            cfg.auth.admin_api_key_sha256.as_deref(),
            "auth.admin_api_key",
        )? {
            admin_keys.push(d);
        }
        let (data_dir, raw) = match &cfg.auth.tenants_file {
            Some(path) => {
                let file = read_tenants_file(path)?;
                let where_ = path.display().to_string();
                if let Some(d) = one_key(
                    file.admin_api_key.as_deref(),
                    file.admin_api_key_sha256.as_deref(),
                    &format!("{where_}: admin_api_key"),
                )? {
                    admin_keys.push(d);
                }
                if let Some(b) = file.store_backend.as_deref() {
                    if b != "sqlite" {
                        tracing::info!(store_backend = b, "tenants file asks for another store backend; shardcast stores every tenant in SQLite");
                    }
                }
                if file.tenants.is_empty() {
                    return Err(bad(&where_, "no tenants configured"));
                }
                // ebuse resolves data_dir against the working directory.
                let dir = PathBuf::from(file.data_dir.as_deref().unwrap_or("data"));
                (dir, file.tenants)
            }
            None if !cfg.tenants.is_empty() => {
                (cfg.database.tenants_dir.clone(), cfg.tenants.clone())
            }
            None => return Self::single(cfg, admin_keys),
        };
        let mut tenants = Vec::new();
        let mut seen_keys: HashMap<KeyDigest, String> = HashMap::new();
        for t in raw {
            let what = format!("tenants.{}", t.name);
            if !valid_name(&t.name) {
                return Err(bad(
                    &what,
                    format!("tenant names are 1..={TENANT_NAME_BYTES_MAX} of A-Z a-z 0-9 - _"),
                ));
            }
            // Names become file names: on a case-insensitive file system
            // `alice` and `ALICE` would share one database.
            if let Some(s) = tenants
                .iter()
                .find(|s: &&TenantSpec| s.name.eq_ignore_ascii_case(&t.name))
            {
                return Err(bad(
                    &what,
                    if s.name == t.name {
                        "named twice".to_string()
                    } else {
                        format!("names differing only in case ({} and {}) would share files on a case-insensitive file system", s.name, t.name)
                    },
                ));
            }
            let mut keys = Vec::new();
            if let Some(d) = one_key(t.api_key.as_deref(), t.api_key_sha256.as_deref(), &what)? {
                keys.push((d, Access::ADMIN));
            }
            for k in &t.keys {
                let role = k.role.as_deref().unwrap_or("admin");
                let access = Access::parse(role).ok_or_else(|| {
                    bad(
                        &what,
                        format!("role '{role}' is not one of read, write, read_write, admin"),
                    )
                })?;
                match one_key(k.key.as_deref(), k.key_sha256.as_deref(), &what)? {
                    Some(d) => keys.push((d, access)),
                    None => return Err(bad(&what, "a key entry needs key or key_sha256")),
                }
            }
            let tokens = TokenKeys::from_config(
                &what,
                t.token_secret.as_deref(),
                t.token_secret_previous.as_deref(),
                t.token_public_key.as_deref(),
            )
            .map_err(|m| bad(&what, m))?
            .map(Arc::new);
            if keys.is_empty() {
                return Err(bad(&what, "API key cannot be empty"));
            }
            for (d, _) in &keys {
                if let Some(other) = seen_keys.insert(*d, t.name.clone()) {
                    return Err(bad(
                        &what,
                        format!("duplicate API key (also used by tenant {other})"),
                    ));
                }
            }
            let mut database = cfg.database.clone();
            database.path = data_dir.join(format!("{}.db", t.name));
            if let Some(b) = t.max_database_bytes.filter(|b| *b > 0) {
                database.max_database_bytes = Some(b);
            }
            let mut index = cfg.index.clone();
            index.path = data_dir.join(format!("{}.index", t.name));
            tenants.push(TenantSpec {
                name: t.name,
                database,
                index,
                keys,
                tokens,
            });
        }
        if admin_keys.iter().any(|a| seen_keys.contains_key(a)) {
            return Err(bad(
                "admin_api_key",
                "the admin key is also a tenant's key; give it its own",
            ));
        }
        Ok(Tenancy {
            multi: true,
            tenants,
            admin_keys,
            open: false,
        })
    }

    fn single(cfg: &Config, admin_keys: Vec<KeyDigest>) -> Result<Tenancy, ConfigError> {
        let mut keys = Vec::new();
        if let Some(k) = &cfg.auth.api_key {
            warn_if_short("auth.api_key (API_KEY)", k);
            keys.push((digest(k.as_bytes()), Access::ADMIN));
        }
        for k in &cfg.auth.read_api_keys {
            warn_if_short("auth.read_api_keys", k);
            keys.push((digest(k.as_bytes()), Access::READ));
        }
        let a = &cfg.auth;
        let tokens = TokenKeys::from_config(
            "auth",
            a.token_secret.as_deref(),
            a.token_secret_previous.as_deref(),
            a.token_public_key.as_deref(),
        )
        .map_err(|m| bad("auth", m))?
        .map(Arc::new);
        let open = cfg.auth.api_key.is_none();
        if open && !keys.is_empty() {
            return Err(bad(
                "auth.read_api_keys",
                "read-only keys need auth.api_key too (without it every request may write)",
            ));
        }
        Ok(Tenancy {
            multi: false,
            tenants: vec![TenantSpec {
                name: "default".into(),
                database: cfg.database.clone(),
                index: cfg.index.clone(),
                keys,
                tokens,
            }],
            admin_keys,
            open,
        })
    }
}

pub fn read_tenants_file(path: &Path) -> Result<TenantsFile, ConfigError> {
    let where_ = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| bad(&where_, e.to_string()))?;
    let (file, ignored) = parse_tenants_yaml(&text).map_err(|e| bad(&where_, e))?;
    for field in ignored {
        tracing::warn!(file = %where_, %field, "field not used by shardcast; ignored");
    }
    Ok(file)
}

/// A tenants.yaml and the fields in it shardcast does not use (ebuse's
/// `version:`, a tenant's `email:`…): ebuse ignores them, so must we.
pub fn parse_tenants_yaml(text: &str) -> Result<(TenantsFile, Vec<String>), String> {
    let mut ignored = Vec::new();
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let file = serde_ignored::deserialize(de, |path| ignored.push(path.to_string()))
        .map_err(|e| e.to_string())?;
    Ok((file, ignored))
}

/// A tenant as every thread sees it. `index` is None when its storage could
/// not be opened: its keys still resolve, so its clients get a 503 that says
/// so instead of a 401 that would send them looking for a new key.
pub struct TenantInfo {
    pub id: TenantId,
    pub name: String,
    pub database: Arc<DatabaseConfig>,
    pub index: Option<crate::storage::index::Index>,
    pub unavailable: Option<String>,
}

/// The tenants and keys in force; replaced whole on reload.
pub struct TenantSet {
    pub multi: bool,
    pub open: bool,
    pub tenants: Vec<Arc<TenantInfo>>,
    keys: HashMap<KeyDigest, (TenantId, Access)>,
    admin: Vec<KeyDigest>,
    /// Each tenant's token keys, by name (a token names its tenant in
    /// multi-tenant mode).
    token_keys: HashMap<String, (TenantId, Arc<TokenKeys>)>,
}

/// Who a request is.
pub enum Who {
    Tenant(TenantId, Access),
    /// The server's admin key: may list tenants, holds no tenant.
    Admin,
    Unknown,
}

impl TenantSet {
    pub fn new(tenancy: &Tenancy, tenants: Vec<Arc<TenantInfo>>) -> TenantSet {
        let mut keys = HashMap::new();
        let mut token_keys = HashMap::new();
        for (spec, info) in tenancy.tenants.iter().zip(&tenants) {
            debug_assert_eq!(spec.name, info.name);
            for (d, a) in &spec.keys {
                keys.insert(*d, (info.id, *a));
            }
            if let Some(t) = &spec.tokens {
                token_keys.insert(spec.name.clone(), (info.id, t.clone()));
            }
        }
        TenantSet {
            multi: tenancy.multi,
            open: tenancy.open,
            tenants,
            keys,
            admin: tenancy.admin_keys.clone(),
            token_keys,
        }
    }

    /// Whether `key` is one of the configured API keys (any tenant's, or
    /// the admin key).
    pub fn is_key(&self, key: &[u8]) -> bool {
        let d = digest(key);
        self.keys.contains_key(&d) || self.admin.contains(&d)
    }

    /// Whether any tenant accepts subscription tokens.
    pub fn accepts_tokens(&self) -> bool {
        !self.token_keys.is_empty()
    }

    /// Verify a subscription token at `now`: the tenant it is for (the
    /// `tenant` claim in multi-tenant mode; the one tenant otherwise) and
    /// what it grants.
    pub fn who_token(&self, token: &str, now: u64) -> Result<(TenantId, Grant), TokenError> {
        let (id, keys) = if self.multi {
            let name = crate::token::tenant_claim(token)?.ok_or_else(|| {
                TokenError::Malformed(
                    "the token names no tenant: a multi-tenant server needs the tenant claim"
                        .into(),
                )
            })?;
            // One answer for "no such tenant" and "takes no tokens": a
            // token's bearer learns nothing about other tenants.
            self.token_keys.get(&name).ok_or_else(|| {
                TokenError::NotAccepted("the token's tenant accepts no subscription tokens".into())
            })?
        } else {
            self.token_keys.values().next().ok_or_else(|| {
                TokenError::NotAccepted(
                    "this server accepts no subscription tokens (auth.token_secret or auth.token_public_key is not set)".into(),
                )
            })?
        };
        keys.verify(token, now).map(|g| (*id, g))
    }

    /// Resolve a presented key (empty: none presented).
    pub fn who(&self, key: &[u8]) -> Who {
        if self.open {
            return match self.tenants.first() {
                Some(t) => Who::Tenant(t.id, Access::ADMIN),
                None => Who::Unknown,
            };
        }
        if key.is_empty() {
            return Who::Unknown;
        }
        let d = digest(key);
        if let Some((id, a)) = self.keys.get(&d) {
            return Who::Tenant(*id, *a);
        }
        if self.admin.contains(&d) {
            return Who::Admin;
        }
        Who::Unknown
    }

    pub fn get(&self, id: TenantId) -> Option<&Arc<TenantInfo>> {
        self.tenants.iter().find(|t| t.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_with(env: &[(&str, &str)]) -> Config {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(None, &env).unwrap()
    }

    #[test]
    fn ebuse_tenants_yaml_is_accepted_as_it_is() {
        let dir = std::env::temp_dir().join(format!("sc-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tenants.yaml");
        std::fs::write(
            &f,
            "# Directory for all tenant databases\ndata_dir: \"/srv/t\"\ntenants:\n  - name: \"alice\"\n    api_key: \"alice-secret-key-123\"\n  - name: bob\n    api_key_sha256: \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n    keys:\n      - key: bob-browser-key-1234\n        role: read\n",
        )
        .unwrap();
        let mut cfg = cfg_with(&[]);
        cfg.auth.tenants_file = Some(f);
        let t = Tenancy::from_config(&cfg).unwrap();
        assert!(t.multi);
        assert_eq!(t.tenants.len(), 2);
        assert_eq!(t.tenants[0].database.path, PathBuf::from("/srv/t/alice.db"));
        assert_eq!(t.tenants[1].index.path, PathBuf::from("/srv/t/bob.index"));
        // "test" hashes to the digest given for bob.
        let set = TenantSet::new(
            &t,
            t.tenants
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Arc::new(TenantInfo {
                        id: i as u32 + 1,
                        name: s.name.clone(),
                        database: Arc::new(s.database.clone()),
                        index: None,
                        unavailable: None,
                    })
                })
                .collect(),
        );
        assert!(matches!(set.who(b"test"), Who::Tenant(2, a) if a == Access::ADMIN));
        assert!(matches!(set.who(b"bob-browser-key-1234"), Who::Tenant(2, a) if a == Access::READ));
        assert!(matches!(
            set.who(b"alice-secret-key-123"),
            Who::Tenant(1, _)
        ));
        assert!(matches!(set.who(b"alice-secret-key-12"), Who::Unknown));
        assert!(matches!(set.who(b""), Who::Unknown));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tenants_in_the_toml_config_use_tenants_dir() {
        let dir = std::env::temp_dir().join(format!("sc-tenants-toml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("shardcast.toml");
        std::fs::write(
            &f,
            "[server]\nlisten = \"0.0.0.0:8080\"\n[database]\ntenants_dir = \"/srv/sc\"\n\n[[tenants]]\nname = \"a\"\napi_key = \"a-key-0123456789\"\n\n[[tenants]]\nname = \"b\"\nkeys = [{ key = \"b-key-0123456789\", role = \"write\" }]\n",
        )
        .unwrap();
        // Public listen without API_KEY is fine: tenants carry their keys.
        let cfg = Config::load(Some(&f), &HashMap::<String, String>::new()).unwrap();
        let t = Tenancy::from_config(&cfg).unwrap();
        assert!(t.multi && !t.open);
        assert_eq!(t.tenants[1].database.path, PathBuf::from("/srv/sc/b.db"));
        assert_eq!(t.tenants[1].keys[0].1, Access::WRITE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fields_ebuse_ignores_are_ignored_and_named() {
        let yaml = "version: 2\nstore_backend: pebble\ntenants:\n - name: a\n   api_key: key1\n   email: a@example.com\n   keys: [{key: k0123456789abcdef, role: read, note: ci}]\n";
        let (file, ignored) = parse_tenants_yaml(yaml).unwrap();
        assert_eq!(file.tenants[0].api_key.as_deref(), Some("key1"));
        assert_eq!(file.store_backend.as_deref(), Some("pebble"));
        assert_eq!(
            ignored,
            ["version", "tenants.0.email", "tenants.0.keys.0.note"]
        );
        // A short key starts (with a warning).
        assert_eq!(
            one_key(Some("key1"), None, "t").unwrap(),
            Some(digest(b"key1"))
        );
    }

    #[test]
    fn bad_tenants_are_refused() {
        for (yaml, says) in [
            ("tenants: []", "no tenants"),
            ("tenants:\n - name: ../x\n   api_key: k0123456789abcdef", "tenant names"),
            ("tenants:\n - name: a\n", "cannot be empty"),
            (
                "tenants:\n - name: a\n   api_key: k0123456789abcdef\n - name: b\n   api_key: k0123456789abcdef",
                "duplicate",
            ),
            (
                "tenants:\n - name: a\n   api_key: k0123456789abcdef\n   keys: [{key: k0123456789abcdeg, role: root}]",
                "role",
            ),
            // A misspelt field is ignored (as ebuse does), so no key remains.
            ("tenants:\n - name: a\n   apikey: x", "cannot be empty"),
            (
                "tenants:\n - name: alice\n   api_key: k0123456789abcdef\n - name: ALICE\n   api_key: k0123456789abcdeg",
                "differing only in case",
            ),
            (
                "tenants:\n - name: a\n   api_key: k0123456789abcdef\n - name: a\n   api_key: k0123456789abcdeg",
                "named twice",
            ),
        ] {
            let dir = std::env::temp_dir().join(format!(
                "sc-tenants-bad-{}-{}",
                std::process::id(),
                says.len()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let f = dir.join("t.yaml");
            std::fs::write(&f, yaml).unwrap();
            let mut cfg = cfg_with(&[]);
            cfg.auth.tenants_file = Some(f);
            let e = Tenancy::from_config(&cfg).unwrap_err();
            assert!(e.message.contains(says), "{yaml}: {}", e.message);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn single_tenant_keys_and_roles() {
        let cfg = cfg_with(&[
            ("API_KEY", "main-key-0123456789"),
            (
                "SHARDCAST_AUTH_READ_API_KEYS",
                "page-key-0123456789,other-0123456789",
            ),
        ]);
        let t = Tenancy::from_config(&cfg).unwrap();
        assert!(!t.multi && !t.open);
        let set = TenantSet::new(
            &t,
            vec![Arc::new(TenantInfo {
                id: 0,
                name: "default".into(),
                database: Arc::new(cfg.database.clone()),
                index: None,
                unavailable: None,
            })],
        );
        assert!(matches!(set.who(b"main-key-0123456789"), Who::Tenant(0, a) if a == Access::ADMIN));
        assert!(
            matches!(set.who(b"other-0123456789"), Who::Tenant(0, a) if a.allows(Access::READ) && !a.allows(Access::WRITE))
        );
        assert!(Access::ADMIN.allows(Access::WRITE));
        assert!(!Access::WRITE.allows(Access::READ));
    }
}
