//! `shardcast config`: every key's effective value and where it came from.

use super::raw::is_secret;
use super::{err, Config, ConfigError, Env, DEFAULT_TOML, EBUSE_ENV, KEYS};

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
