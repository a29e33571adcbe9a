//! Subscription tokens: JWTs an app's backend signs for one of its users,
//! so a browser may subscribe to (and read) only what is that user's.
//!
//! A token is verified once, when a request presents it (never per event),
//! with the `jsonwebtoken` crate: HS256/384/512 with a shared secret
//! (`token_secret`, and `token_secret_previous` during a rotation), or
//! RS*/PS*/ES*/EdDSA with public keys (`token_public_key`, one or more PEM
//! blocks). `alg: none` and algorithms the tenant has no key for are refused
//! before any verification.
//!
//! Claims: `sub` (the user; per-user connection caps count by it), `exp`
//! (required), optional `nbf` and `iat`, the scope `types` and `streams`
//! (lists of names and `prefix*` patterns, `filter`'s language; at least one
//! of the two, `["*"]` for everything), and in multi-tenant mode `tenant`
//! (which tenant's keys verify it). A verified token becomes a `Grant`.

use crate::filter::{Filter, Pattern};
use crate::http::ApiError;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

/// How far ahead of this server's clock a backend's `nbf` or `iat` may be
/// (clock skew between the two machines).
pub const CLOCK_LEEWAY_SECS: u64 = 30;
/// Longest `sub` claim, in bytes: per-user counts are keyed by it.
pub const SUB_BYTES_MAX: usize = 256;
/// Most patterns on one side (`types` or `streams`) of a token's scope: a
/// scope is checked per event in catch-up and reads.
pub const SCOPE_PATTERNS_MAX: usize = 64;

/// What a verified token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The user (`sub`).
    pub sub: Box<str>,
    /// The events it may see.
    pub scope: Filter,
    /// When it stops being valid, in Unix seconds (`exp`).
    pub expires: u64,
}

impl Grant {
    /// Whether a request's filter lies within the scope; else 403
    /// `outside_token_scope` naming the request's parameter for the side
    /// that is outside (`types_param`, `streams_param`).
    pub fn check(
        &self,
        asked: &Filter,
        types_param: &str,
        streams_param: &str,
    ) -> Result<(), ApiError> {
        asked.within(&self.scope).map_err(|side| {
            let (param, what, allowed) = match side {
                crate::filter::Outside::Types => (types_param, "types", &self.scope.types),
                crate::filter::Outside::Streams => (streams_param, "streams", &self.scope.streams),
            };
            ApiError::new(
                403,
                "outside_token_scope",
                format!(
                    "{param}: outside this token's scope ({what} {})",
                    Filter::describe(allowed)
                ),
            )
        })
    }
}

/// Why a token was refused; each answers 401 with its own code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not a JWT, unreadable claims, a claim missing or of the wrong kind.
    Malformed(String),
    Expired {
        exp: u64,
    },
    NotYetValid(String),
    BadSignature,
    /// `alg: none`, an unknown algorithm, or one this tenant has no key for.
    Algorithm(String),
    /// Nobody here verifies tokens (for this tenant).
    NotAccepted(String),
}

impl TokenError {
    /// The 401 answer. Never echoes the token.
    pub fn into_api(self) -> ApiError {
        let (code, message) = match self {
            TokenError::Malformed(m) => ("invalid_token", m),
            TokenError::Expired { exp } => (
                "token_expired",
                format!(
                    "the token expired at {} (exp {exp}): fetch a new one",
                    rfc3339(exp)
                ),
            ),
            TokenError::NotYetValid(m) => ("token_not_yet_valid", m),
            TokenError::BadSignature => (
                "invalid_token_signature",
                "the token's signature does not verify with this tenant's keys".to_string(),
            ),
            TokenError::Algorithm(m) => ("unsupported_token_algorithm", m),
            TokenError::NotAccepted(m) => ("tokens_not_accepted", m),
        };
        ApiError::new(401, code, message)
    }
}

fn rfc3339(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs.min(i64::MAX as u64 / 2) as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// The claims shardcast reads; others are ignored. Times are JSON numbers
/// (NumericDate may have a fraction).
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streams: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// One verifying key and the algorithms it can verify (its family).
struct Key {
    key: DecodingKey,
    family: AlgorithmFamily,
}

/// A tenant's verifying keys: current and previous secrets, public keys.
pub struct TokenKeys {
    keys: Vec<Key>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        let families: Vec<_> = self.keys.iter().map(|k| k.family).collect();
        f.debug_struct("TokenKeys")
            .field("families", &families)
            .finish()
    }
}

/// Secrets shorter than this are accepted with a warning: HS256 wants 256 bits.
pub const SECRET_BYTES_MIN: usize = 32;

impl TokenKeys {
    /// From configured values (`owner` names them in errors). `public_key`
    /// is PEM text or the path of a PEM file, and may hold several keys.
    /// None when nothing is configured.
    pub fn from_config(
        owner: &str,
        secret: Option<&str>,
        previous: Option<&str>,
        public_key: Option<&str>,
    ) -> Result<Option<TokenKeys>, String> {
        let mut keys = Vec::new();
        for (name, s) in [
            ("token_secret", secret),
            ("token_secret_previous", previous),
        ] {
            let Some(s) = s.filter(|s| !s.is_empty()) else {
                continue;
            };
            if s.len() < SECRET_BYTES_MIN {
                tracing::warn!(
                    key = %format!("{owner}.{name}"),
                    bytes = s.len(),
                    "token secret is shorter than {SECRET_BYTES_MIN} bytes; HS256 wants at least 256 bits"
                );
            }
            let key = DecodingKey::from_secret(s.as_bytes())
                .map_err(|e| format!("{owner}.{name}: {e}"))?;
            keys.push(Key {
                key,
                family: AlgorithmFamily::Hmac,
            });
        }
        if previous.is_some_and(|p| !p.is_empty()) && secret.is_none_or(str::is_empty) {
            return Err(format!(
                "{owner}.token_secret_previous is only accepted beside token_secret (a rotation)"
            ));
        }
        if let Some(pk) = public_key.filter(|p| !p.trim().is_empty()) {
            let text = if pk.contains("-----BEGIN") {
                pk.to_string()
            } else {
                std::fs::read_to_string(pk)
                    .map_err(|e| format!("{owner}.token_public_key: {pk}: {e}"))?
            };
            let blocks = pem_blocks(&text);
            if blocks.is_empty() {
                return Err(format!(
                    "{owner}.token_public_key: no PEM block (-----BEGIN PUBLIC KEY-----) found"
                ));
            }
            for (i, b) in blocks.iter().enumerate() {
                let key = DecodingKey::from_rsa_pem(b.as_bytes())
                    .or_else(|_| DecodingKey::from_ec_pem(b.as_bytes()))
                    .or_else(|_| DecodingKey::from_ed_pem(b.as_bytes()))
                    .map_err(|e| {
                        format!(
                            "{owner}.token_public_key: PEM block {} is not an RSA, EC or Ed25519 public key: {e}",
                            i + 1
                        )
                    })?;
                let family = key.family();
                keys.push(Key { key, family });
            }
        }
        Ok((!keys.is_empty()).then_some(TokenKeys { keys }))
    }

    /// The algorithms these keys verify, for messages.
    fn accepted(&self) -> String {
        let mut names: Vec<String> = Vec::new();
        for k in &self.keys {
            for a in k.family.algorithms() {
                let n = format!("{a:?}");
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        names.join(", ")
    }

    /// Verify a token at `now` (Unix seconds) and read its grant.
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match header_alg(token) {
            Some(alg) if alg.eq_ignore_ascii_case("none") => {
                TokenError::Algorithm("alg none (an unsigned token) is never accepted".into())
            }
            Some(alg) => TokenError::Algorithm(format!(
                "alg {:?} is not supported; this tenant accepts {}",
                truncate(&alg, 32),
                self.accepted()
            )),
            None => TokenError::Malformed(format!("not a JWT ({})", error_text(&e))),
        })?;
        let alg = header.alg;
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.family.algorithms().contains(&alg))
            .collect();
        if candidates.is_empty() {
            return Err(TokenError::Algorithm(format!(
                "alg {alg:?}: this tenant has no key for it; it accepts {}",
                self.accepted()
            )));
        }
        let mut validation = Validation::new(alg);
        // Times are checked below, with this server's leeway and messages.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let mut claims = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => match e.kind() {
                    // Another key (the previous secret) may verify it.
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => continue,
                    _ => return Err(TokenError::Malformed(error_text(&e))),
                },
            }
        }
        let claims = claims.ok_or(TokenError::BadSignature)?;
        grant(claims, now)
    }
}

/// The checks on verified claims: required ones, times, the scope.
fn grant(c: Claims, now: u64) -> Result<Grant, TokenError> {
    let missing = |name: &str| TokenError::Malformed(format!("the token has no {name} claim"));
    let sub = c.sub.ok_or_else(|| missing("sub"))?;
    if sub.is_empty() || sub.len() > SUB_BYTES_MAX {
        return Err(TokenError::Malformed(format!(
            "sub must be 1..={SUB_BYTES_MAX} bytes"
        )));
    }
    let exp = c.exp.ok_or_else(|| missing("exp"))?;
    let secs = |v: f64, name: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(v as u64)
        } else {
            Err(TokenError::Malformed(format!(
                "{name} must be seconds since 1970"
            )))
        }
    };
    let exp = secs(exp, "exp")?;
    if now >= exp {
        return Err(TokenError::Expired { exp });
    }
    if let Some(nbf) = c.nbf {
        let nbf = secs(nbf, "nbf")?;
        if nbf > now + CLOCK_LEEWAY_SECS {
            return Err(TokenError::NotYetValid(format!(
                "the token is valid from {} (nbf {nbf})",
                rfc3339(nbf)
            )));
        }
    }
    if let Some(iat) = c.iat {
        let iat = secs(iat, "iat")?;
        if iat > now + CLOCK_LEEWAY_SECS {
            return Err(TokenError::NotYetValid(format!(
                "the token was issued in the future ({}); check the clocks",
                rfc3339(iat)
            )));
        }
    }
    let side = |name: &str, v: Option<Vec<String>>| -> Result<Vec<Pattern>, TokenError> {
        let v = v.unwrap_or_default();
        if v.len() > SCOPE_PATTERNS_MAX {
            return Err(TokenError::Malformed(format!(
                "{name}: at most {SCOPE_PATTERNS_MAX} patterns"
            )));
        }
        v.iter()
            .map(|p| {
                if p.is_empty() {
                    return Err(TokenError::Malformed(format!("{name}: an empty pattern")));
                }
                Pattern::parse(p).map_err(|why| TokenError::Malformed(format!("{name}: {why}")))
            })
            .collect()
    };
    let scope = Filter {
        types: side("types", c.types)?,
        streams: side("streams", c.streams)?,
    };
    if scope.types.is_empty() && scope.streams.is_empty() {
        return Err(TokenError::Malformed(
            "the token's scope is empty: give types or streams (\"types\": [\"*\"] for every event)"
                .into(),
        ));
    }
    Ok(Grant {
        sub: sub.into(),
        scope,
        expires: exp,
    })
}

/// The `tenant` claim, read before verification to choose the keys (a
/// forged one fails verification with that tenant's keys).
pub fn tenant_claim(token: &str) -> Result<Option<String>, TokenError> {
    #[derive(Deserialize)]
    struct T {
        tenant: Option<String>,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<T>(token)
        .map(|t| t.tenant)
        .map_err(|e| TokenError::Malformed(format!("not a JWT ({})", error_text(&e))))
}

/// Whether a presented credential has a JWT's shape (three base64url parts,
/// a JSON header): how a Bearer token is told from an API key.
pub fn looks_like_jwt(v: &[u8]) -> bool {
    v.starts_with(b"eyJ")
        && v.iter().filter(|c| **c == b'.').count() == 2
        && v.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'='))
}

/// The header's `alg`, read by hand only to say why `decode_header`
/// refused it (`none`, an unknown name).
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let part = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_string)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A crate error as text, without anything of the token in it.
fn error_text(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidToken => "not three base64url parts".into(),
        K::Base64(_) => "a part is not base64url".into(),
        K::Json(j) => format!("its JSON does not fit: {}", truncate(&j.to_string(), 160)),
        K::Utf8(_) => "a part is not UTF-8".into(),
        K::InvalidClaimFormat(c) => format!("claim {c} has the wrong type"),
        other => truncate(&format!("{other:?}"), 160).to_string(),
    }
}

/// What to put in a token (`shardcast token`, tests, the benchmark).
#[derive(Debug, Clone, Default)]
pub struct Mint {
    pub sub: String,
    pub types: Vec<String>,
    pub streams: Vec<String>,
    pub ttl_secs: u64,
    pub tenant: Option<String>,
}

/// Sign a token: HS256 with a secret, or the algorithm `key` is for.
pub fn mint(m: &Mint, key: &EncodingKey, alg: Algorithm, now: u64) -> Result<String, String> {
    let claims = Claims {
        sub: Some(m.sub.clone()),
        exp: Some((now + m.ttl_secs) as f64),
        nbf: None,
        iat: Some(now as f64),
        types: (!m.types.is_empty()).then(|| m.types.clone()),
        streams: (!m.streams.is_empty()).then(|| m.streams.clone()),
        tenant: m.tenant.clone(),
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).map_err(|e| e.to_string())
}

/// A signing key from a private-key PEM (RSA → RS256, EC P-256 → ES256,
/// Ed25519 → EdDSA) or, without one, the secret (HS256).
pub fn signing_key(
    secret: Option<&str>,
    private_pem: Option<&[u8]>,
) -> Result<(EncodingKey, Algorithm), String> {
    if let Some(pem) = private_pem {
        if let Ok(k) = EncodingKey::from_rsa_pem(pem) {
            return Ok((k, Algorithm::RS256));
        }
        if let Ok(k) = EncodingKey::from_ec_pem(pem) {
            return Ok((k, Algorithm::ES256));
        }
        return EncodingKey::from_ed_pem(pem)
            .map(|k| (k, Algorithm::EdDSA))
            .map_err(|e| format!("not an RSA, EC or Ed25519 private key: {e}"));
    }
    match secret.filter(|s| !s.is_empty()) {
        Some(s) => EncodingKey::from_secret(s.as_bytes())
            .map(|k| (k, Algorithm::HS256))
            .map_err(|e| e.to_string()),
        None => Err("no token secret configured (auth.token_secret, or the tenant's token_secret); give --private-key for RS256/ES256".into()),
    }
}

/// Now, in Unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The PEM blocks in a text, each from its BEGIN line to its END line.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("-----BEGIN ") {
            cur = Some(String::new());
        }
        if let Some(c) = &mut cur {
            c.push_str(l);
            c.push('\n');
            if l.starts_with("-----END ") {
                out.extend(cur.take());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;

    fn keys() -> TokenKeys {
        TokenKeys::from_config("auth", Some(SECRET), None, None)
            .unwrap()
            .unwrap()
    }

    fn hs(claims: &serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn code(r: Result<Grant, TokenError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(e) => {
                let a = e.into_api();
                assert_eq!(a.status, 401);
                a.code
            }
        }
    }

    #[test]
    fn a_good_token_grants_its_scope() {
        let t = hs(
            &serde_json::json!({"sub": "u42", "exp": NOW + 60, "iat": NOW,
                "types": ["order.*"], "streams": ["user-42:*", "team-1"]}),
            SECRET,
        );
        let g = keys().verify(&t, NOW).unwrap();
        assert_eq!(&*g.sub, "u42");
        assert_eq!(g.expires, NOW + 60);
        assert_eq!(g.scope.types, vec![Pattern::Prefix("order.".into())]);
        assert_eq!(g.scope.streams.len(), 2);
        assert!(looks_like_jwt(t.as_bytes()));
        assert!(!looks_like_jwt(b"my-api-key"));
    }

    #[test]
    fn every_refusal_says_which() {
        let k = keys();
        let base = serde_json::json!({"sub": "u", "exp": NOW + 60, "types": ["*"]});
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = base.clone();
            f(&mut c);
            hs(&c, SECRET)
        };
        assert_eq!(code(k.verify(&with(&|_| {}), NOW)), "ok");
        assert_eq!(
            code(k.verify(&with(&|c| c["exp"] = (NOW - 1).into()), NOW)),
            "token_expired"
        );
        assert_eq!(
            code(k.verify(&with(&|c| c["exp"] = NOW.into()), NOW)),
            "token_expired"
        );
        assert_eq!(
            code(k.verify(&with(&|c| c["nbf"] = (NOW + 120).into()), NOW)),
            "token_not_yet_valid"
        );
        // Within the leeway: accepted.
        assert_eq!(
            code(k.verify(&with(&|c| c["nbf"] = (NOW + 10).into()), NOW)),
            "ok"
        );
        assert_eq!(
            code(k.verify(&with(&|c| c["iat"] = (NOW + 3600).into()), NOW)),
            "token_not_yet_valid"
        );
        let no = |name: &'static str| {
            with(&move |c: &mut serde_json::Value| {
                c.as_object_mut().unwrap().remove(name);
            })
        };
        assert_eq!(code(k.verify(&no("exp"), NOW)), "invalid_token");
        assert_eq!(code(k.verify(&no("sub"), NOW)), "invalid_token");
        assert_eq!(code(k.verify(&no("types"), NOW)), "invalid_token");
        assert_eq!(
            code(k.verify(&with(&|c| c["types"] = serde_json::json!(["a*b"])), NOW)),
            "invalid_token"
        );
        assert_eq!(
            code(k.verify(&with(&|c| c["exp"] = "tomorrow".into()), NOW)),
            "invalid_token"
        );
        // Wrong secret.
        assert_eq!(
            code(k.verify(&hs(&base, "another secret, also 32 bytes long"), NOW)),
            "invalid_token_signature"
        );
        // Not a JWT at all; a tampered payload.
        assert_eq!(code(k.verify("abc", NOW)), "invalid_token");
        assert_eq!(code(k.verify("eyJ.eyJ.x", NOW)), "invalid_token");
        let good = with(&|_| {});
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = hs(
            &serde_json::json!({"sub": "admin", "exp": NOW + 60, "types": ["*"]}),
            "x",
        );
        parts[1] = other.split('.').nth(1).unwrap();
        assert_eq!(
            code(k.verify(&parts.join("."), NOW)),
            "invalid_token_signature"
        );
    }

    #[test]
    fn alg_none_and_unknown_algorithms_are_refused() {
        use base64::Engine;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let payload = b64(serde_json::json!({"sub": "u", "exp": NOW + 60, "types": ["*"]}));
        let none = format!(
            "{}.{payload}.",
            b64(serde_json::json!({"alg": "none", "typ": "JWT"}))
        );
        let e = keys().verify(&none, NOW).unwrap_err();
        assert!(
            matches!(&e, TokenError::Algorithm(m) if m.contains("none")),
            "{e:?}"
        );
        let odd = format!(
            "{}.{payload}.c2ln",
            b64(serde_json::json!({"alg": "XS999"}))
        );
        assert_eq!(
            code(keys().verify(&odd, NOW)),
            "unsupported_token_algorithm"
        );
        // A real algorithm with no key here: RS256 against a secret only.
        let rs = format!(
            "{}.{payload}.c2ln",
            b64(serde_json::json!({"alg": "RS256"}))
        );
        let e = keys().verify(&rs, NOW).unwrap_err();
        assert!(
            matches!(&e, TokenError::Algorithm(m) if m.contains("HS256")),
            "{e:?}"
        );
    }

    #[test]
    fn the_previous_secret_verifies_during_a_rotation() {
        let old = "the old secret, thirty-two bytes!";
        let k = TokenKeys::from_config("auth", Some(SECRET), Some(old), None)
            .unwrap()
            .unwrap();
        let c = serde_json::json!({"sub": "u", "exp": NOW + 60, "streams": ["s"]});
        assert_eq!(code(k.verify(&hs(&c, old), NOW)), "ok");
        assert_eq!(code(k.verify(&hs(&c, SECRET), NOW)), "ok");
        assert_eq!(
            code(k.verify(&hs(&c, "a third secret, thirty-two bytes"), NOW)),
            "invalid_token_signature"
        );
        assert!(TokenKeys::from_config("auth", None, Some(old), None).is_err());
        assert!(TokenKeys::from_config("auth", None, None, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn mint_round_trips() {
        let (key, alg) = signing_key(Some(SECRET), None).unwrap();
        let m = Mint {
            sub: "u7".into(),
            types: vec!["a".into()],
            streams: vec![],
            ttl_secs: 600,
            tenant: Some("acme".into()),
        };
        let t = mint(&m, &key, alg, NOW).unwrap();
        let g = keys().verify(&t, NOW).unwrap();
        assert_eq!(g.expires, NOW + 600);
        assert_eq!(tenant_claim(&t).unwrap().as_deref(), Some("acme"));
        assert!(signing_key(None, None).is_err());
        assert_eq!(
            pem_blocks(
                "x\n-----BEGIN A-----\nabc\n-----END A-----\n-----BEGIN B-----\nd\n-----END B-----"
            )
            .len(),
            2
        );
    }
}
