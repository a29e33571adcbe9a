//! Query strings and path segments: percent-decoding and -encoding, and
//! `Query`, the one way every endpoint reads its parameters (decoded, empty
//! values as absent, 400 `invalid_parameter` for a value that is not what
//! the name needs).

use super::ApiError;

/// Percent-decode one query value (`+` is a space).
pub fn decode_query_value(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first value of `name` in a query string, decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode_query_value(k) == name).then(|| decode_query_value(v))
        })
        .next()
}

/// 400 `invalid_parameter`: `name` is `v`, which is not `what` it must be.
pub fn invalid(name: &str, v: &str, what: &str) -> ApiError {
    ApiError::new(
        400,
        "invalid_parameter",
        format!("'{name}' must be {what}, not {v:?}"),
    )
}

/// A request's query string, read the way every read endpoint reads it:
/// percent-decoded, empty values as absent, 400 `invalid_parameter` for a
/// value that is not what the name needs.
pub struct Query<'a>(pub &'a str);

impl Query<'_> {
    pub fn get(&self, name: &str) -> Option<String> {
        query_param(self.0, name).filter(|v| !v.is_empty())
    }

    /// A whole number ≥ 0 (a position or a version), or `default`.
    pub fn number(&self, name: &str, default: u64) -> Result<u64, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| invalid(name, &v, "a whole number ≥ 0")),
        }
    }

    /// A count in `1..=max`, or `default`.
    pub fn count(&self, name: &str, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(invalid(name, &v, &format!("between 1 and {max}"))),
            },
        }
    }
}

/// Percent-encode a query value or path segment (everything but RFC 3986's
/// unreserved characters).
pub fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
