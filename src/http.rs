//! HTTP/1.1 as shardcast speaks it: request heads parsed with httparse
//! (`parse_head`, with the framing rules of RFC 9112 that keep requests
//! from being smuggled), chunked bodies (`chunked`), query strings
//! (`query`), and answers as values (`response`), written once. The
//! connection loop that uses these is `server::connection`.

pub mod chunked;
pub mod query;
pub mod response;

pub use response::{reason, write_head, ApiError, Body, Response, JSON};

use crate::limits::REQUEST_HEADERS_MAX;
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Other,
}

impl Method {
    fn parse(m: &str) -> Method {
        match m {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

/// What the router needs of a request head; ranges point into the read buffer.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub path: Range<usize>,
    pub query: Range<usize>,
    pub head_len: usize,
    pub content_length: Option<usize>,
    pub chunked: bool,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// `X-API-Key`, or the key in `Authorization` (`Bearer <key>` or bare).
    pub api_key: Option<Range<usize>>,
    /// `Last-Event-ID` (an SSE client resuming).
    pub last_event_id: Option<Range<usize>>,
    /// `Origin` (a browser on some page).
    pub origin: Option<Range<usize>>,
    /// `Accept-Encoding` allows gzip.
    pub accept_gzip: bool,
    /// `Accept` names `text/plain` or `application/openmetrics-text`, as
    /// Prometheus sends: `GET /metrics` answers Prometheus text then, else
    /// ebuse's JSON.
    pub accept_prometheus: bool,
    /// An `X-Forwarded-For` header is present (read only from trusted proxies).
    pub forwarded_for: bool,
    /// More than one distinct credential (two `X-API-Key`s, or a key and a
    /// bearer token that differ): the request is refused, not guessed at.
    pub ambiguous_credentials: bool,
}

pub enum Parsed {
    Complete(RequestHead),
    Partial,
    Invalid(ApiError),
}

fn trim(b: &[u8]) -> &[u8] {
    let s = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let e = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map(|i| i + 1)
        .unwrap_or(s);
    &b[s..e.max(s)]
}

/// Where `part`, a subslice of `base`, sits in it.
fn range_of(base: &[u8], part: &[u8]) -> Range<usize> {
    if part.is_empty() {
        return 0..0;
    }
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    debug_assert!(start + part.len() <= base.len());
    start..start + part.len()
}

/// Parse one request head at the start of `buf`.
///
/// Long: one pass over the headers, a few lines of framing rules per header
/// (RFC 9112), kept together so every rule that decides where a request ends is
/// read in one place; fuzzed (`fuzz/` target `http_head`).
pub fn parse_head(buf: &[u8], max_header_bytes: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_header_bytes {
                return Parsed::Invalid(
                    ApiError::new(
                        431,
                        "headers_too_large",
                        format!("request head exceeds {max_header_bytes} bytes"),
                    )
                    .closing(),
                );
            }
            return Parsed::Partial;
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(
                ApiError::new(
                    431,
                    "too_many_headers",
                    format!("more than {REQUEST_HEADERS_MAX} headers"),
                )
                .closing(),
            )
        }
        Err(e) => {
            return Parsed::Invalid(
                ApiError::new(
                    400,
                    "malformed_request",
                    format!("malformed HTTP request: {e}"),
                )
                .closing(),
            )
        }
    };
    if head_len > max_header_bytes {
        return Parsed::Invalid(
            ApiError::new(
                431,
                "headers_too_large",
                format!("request head exceeds {max_header_bytes} bytes"),
            )
            .closing(),
        );
    }
    let version = req.version.unwrap_or(1);
    // Absolute-form (`GET http://host/path`), which servers must accept
    // (RFC 9112 §3.2.2): the path is what follows the authority.
    let target = origin_form(req.path.unwrap_or("/"));
    let target_range = range_of(buf, target.as_bytes());
    let (path, query) = match target.find('?') {
        Some(q) => (
            target_range.start..target_range.start + q,
            target_range.start + q + 1..target_range.end,
        ),
        None => (target_range.clone(), target_range.end..target_range.end),
    };
    let mut head = RequestHead {
        method: Method::parse(req.method.unwrap_or("")),
        path,
        query,
        head_len,
        content_length: None,
        chunked: false,
        keep_alive: version == 1,
        expect_continue: false,
        api_key: None,
        last_event_id: None,
        origin: None,
        accept_gzip: false,
        accept_prometheus: false,
        forwarded_for: false,
        ambiguous_credentials: false,
    };
    let mut hosts = 0;
    for h in req.headers.iter() {
        let name = h.name;
        let value = trim(h.value);
        if name.eq_ignore_ascii_case("content-length") {
            match (content_length(value), head.content_length) {
                (None, _) => {
                    return Parsed::Invalid(
                        ApiError::new(
                            400,
                            "bad_content_length",
                            "Content-Length must be a decimal number of digits only (no sign, no leading zero)",
                        )
                        .closing(),
                    )
                }
                (Some(a), Some(b)) if a != b => {
                    return Parsed::Invalid(
                        ApiError::new(
                            400,
                            "bad_content_length",
                            "conflicting Content-Length headers",
                        )
                        .closing(),
                    )
                }
                (Some(a), _) => head.content_length = Some(a),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only `chunked` alone is understood; a request with another
            // transfer coding (gzip, chunked) is refused (RFC 9112 §6.1: 501).
            for coding in value
                .split(|c| *c == b',')
                .map(trim)
                .filter(|c| !c.is_empty())
            {
                if coding.eq_ignore_ascii_case(b"chunked") && !head.chunked {
                    head.chunked = true;
                } else {
                    return Parsed::Invalid(
                        ApiError::new(
                            501,
                            "unsupported_transfer_coding",
                            "only Transfer-Encoding: chunked is accepted",
                        )
                        .closing(),
                    );
                }
            }
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|c| *c == b',') {
                let t = trim(token);
                if t.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    head.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("x-api-key") {
            head.credential(buf, value);
        } else if name.eq_ignore_ascii_case("authorization") {
            // `Bearer <key>`, or the bare key as ebuse also takes it; another
            // scheme (`Basic …`, for a proxy in front) is not a key here.
            if value.len() > 7 && value[..7].eq_ignore_ascii_case(b"bearer ") {
                head.credential(buf, trim(&value[7..]));
            } else if !value.is_empty() && !value.contains(&b' ') {
                head.credential(buf, value);
            }
        } else if name.eq_ignore_ascii_case("accept-encoding") {
            head.accept_gzip = value.split(|c| *c == b',').any(|coding| {
                let mut parts = coding.split(|c| *c == b';');
                let name = trim(parts.next().unwrap_or(b""));
                let refused = parts.any(|p| {
                    let p = trim(p);
                    p.eq_ignore_ascii_case(b"q=0") || p.eq_ignore_ascii_case(b"q=0.0")
                });
                (name.eq_ignore_ascii_case(b"gzip") || name == b"*") && !refused
            });
        } else if name.eq_ignore_ascii_case("accept") {
            let names = |t: &[u8]| value.windows(t.len()).any(|w| w.eq_ignore_ascii_case(t));
            head.accept_prometheus |=
                names(b"text/plain") || names(b"application/openmetrics-text");
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = Some(range_of(buf, value));
        } else if name.eq_ignore_ascii_case("last-event-id") {
            head.last_event_id = Some(range_of(buf, value));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            head.forwarded_for = true;
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in 1.0.
    if hosts > 1 || (hosts == 0 && version == 1) {
        return Parsed::Invalid(
            ApiError::new(
                400,
                "bad_host",
                if hosts > 1 {
                    "more than one Host header"
                } else {
                    "an HTTP/1.1 request needs a Host header"
                },
            )
            .closing(),
        );
    }
    if head.chunked && head.content_length.is_some() {
        // Request smuggling territory: refuse rather than pick one.
        return Parsed::Invalid(
            ApiError::new(
                400,
                "bad_framing",
                "both Transfer-Encoding and Content-Length",
            )
            .closing(),
        );
    }
    Parsed::Complete(head)
}

impl RequestHead {
    /// A presented key: the first is kept; another that differs makes the
    /// request ambiguous (whichever came first).
    fn credential(&mut self, buf: &[u8], value: &[u8]) {
        match &self.api_key {
            None => self.api_key = Some(range_of(buf, value)),
            Some(r) if buf[r.clone()] != *value => self.ambiguous_credentials = true,
            Some(_) => {}
        }
    }
}

/// A Content-Length value: `1*DIGIT` (RFC 9110 §8.6), refusing a sign,
/// inner spaces and leading zeros, which parsers elsewhere read differently
/// (a request smuggling vector), and values that overflow.
fn content_length(value: &[u8]) -> Option<usize> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if value.len() > 1 && value[0] == b'0' {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The origin-form of a request target: an absolute-form target
/// (`http://host:port/path?q`) without its scheme and authority.
fn origin_form(target: &str) -> &str {
    let starts = |p: &str| {
        target
            .as_bytes()
            .get(..p.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(p.as_bytes()))
    };
    let after = if starts("http://") {
        7
    } else if starts("https://") {
        8
    } else {
        return target;
    };
    let rest = &target[after..];
    match rest.find(['/', '?']) {
        Some(i) => &rest[i..],
        // `http://host` alone asks for the root.
        None => &rest[rest.len()..],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> RequestHead {
        match parse_head(raw.as_bytes(), 16384) {
            Parsed::Complete(h) => h,
            _ => panic!("not complete"),
        }
    }

    #[test]
    fn parses_what_routing_needs() {
        let raw = "POST /events?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nContent-Type: application/json; charset=utf-8\r\nAuthorization: Bearer  k3y \r\n\r\n";
        let h = head(raw);
        assert_eq!(h.method, Method::Post);
        assert_eq!(&raw[h.path.clone()], "/events");
        assert_eq!(&raw[h.query.clone()], "x=1");
        assert_eq!(h.content_length, Some(12));
        assert_eq!(&raw[h.api_key.clone().unwrap()], "k3y");
        assert!(h.keep_alive);
        assert_eq!(h.head_len, raw.len());
    }

    #[test]
    fn connection_semantics() {
        assert!(!head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn bad_heads() {
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 16384),
            Parsed::Partial
        ));
        match parse_head(b"GARBAGE\x01\r\n\r\n", 16384) {
            Parsed::Invalid(e) => assert_eq!(e.status, 400),
            _ => panic!(),
        }
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(2000));
        match parse_head(big.as_bytes(), 1024) {
            Parsed::Invalid(e) => assert_eq!(e.status, 431),
            _ => panic!(),
        }
        match parse_head(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
            16384,
        ) {
            Parsed::Invalid(e) => assert_eq!(e.status, 400),
            _ => panic!(),
        }
    }

    fn refused(raw: &str) -> ApiError {
        match parse_head(raw.as_bytes(), 16384) {
            Parsed::Invalid(e) => e,
            Parsed::Complete(_) => panic!("accepted: {raw:?}"),
            Parsed::Partial => panic!("partial: {raw:?}"),
        }
    }

    #[test]
    fn content_length_is_digits_only() {
        for v in [
            "+15",
            "-1",
            "015",
            "00",
            "1 5",
            "0x10",
            "15,15",
            "",
            "99999999999999999999999",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {v}\r\n\r\n");
            let e = refused(&raw);
            assert_eq!((e.status, e.code), (400, "bad_content_length"), "{v:?}");
            assert!(e.close, "a framing error ends the connection");
        }
        // Optional whitespace around a field value is not part of it (RFC 9112 §5).
        for (v, n) in [("0", 0), ("15", 15), (" 15 ", 15), ("\t7", 7)] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {v}\r\n\r\n");
            assert_eq!(head(&raw).content_length, Some(n), "{v:?}");
        }
        let e =
            refused("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(e.code, "bad_content_length");
        let h =
            head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(h.content_length, Some(2));
    }

    #[test]
    fn exactly_one_host() {
        let e = refused("GET / HTTP/1.1\r\n\r\n");
        assert_eq!((e.status, e.code), (400, "bad_host"));
        let e = refused("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n");
        assert_eq!((e.status, e.code), (400, "bad_host"));
        let e = refused("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n");
        assert_eq!(e.code, "bad_host");
        // HTTP/1.0 had no Host requirement.
        head("GET / HTTP/1.0\r\n\r\n");
    }

    #[test]
    fn absolute_form_targets_are_served_by_path() {
        for (target, path, query) in [
            ("http://example.com/health", "/health", ""),
            (
                "HTTPS://example.com:8443/events?from=3",
                "/events",
                "from=3",
            ),
            ("http://example.com?x=1", "", "x=1"),
            ("http://example.com", "", ""),
            ("/plain?y", "/plain", "y"),
            ("*", "*", ""),
        ] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            let h = head(&raw);
            assert_eq!(&raw[h.path.clone()], path, "{target}");
            assert_eq!(&raw[h.query.clone()], query, "{target}");
        }
    }

    #[test]
    fn distinct_credentials_are_ambiguous_in_any_order() {
        let two =
            |a: &str, b: &str| head(&format!("GET / HTTP/1.1\r\nHost: a\r\n{a}\r\n{b}\r\n\r\n"));
        for (a, b) in [
            ("X-API-Key: one", "X-API-Key: two"),
            ("X-API-Key: one", "Authorization: Bearer two"),
            ("Authorization: Bearer one", "X-API-Key: two"),
            ("Authorization: Bearer one", "Authorization: bearer two"),
        ] {
            assert!(two(a, b).ambiguous_credentials, "{a} / {b}");
            assert!(two(b, a).ambiguous_credentials, "{b} / {a}");
        }
        // The same key twice is one credential.
        let raw =
            "GET / HTTP/1.1\r\nHost: a\r\nX-API-Key: one\r\nAuthorization: Bearer one\r\n\r\n";
        let h = head(raw);
        assert!(!h.ambiguous_credentials);
        assert_eq!(&raw[h.api_key.clone().unwrap()], "one");
        // Another scheme is no API key at all.
        let h = two("Authorization: Basic Zm9vOmJhcg==", "X-API-Key: one");
        assert!(!h.ambiguous_credentials);
    }

    #[test]
    fn error_bodies_are_json() {
        let mut out = Vec::new();
        let mut e = ApiError::new(405, "method_not_allowed", "use \"POST\"");
        e.allow = Some("POST");
        e.write(&mut out, true, None);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(s.contains("\r\nAllow: POST\r\n"));
        let body = s.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "method_not_allowed");
        assert_eq!(v["error"]["message"], "use \"POST\"");
    }
}
