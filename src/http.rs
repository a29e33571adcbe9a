//! HTTP/1.1 on one connection: read, parse heads with httparse, read bodies by
//! Content-Length, hand each request to `route`, and write every answer that is
//! ready in one write. Keep-alive is the default; pipelined requests are
//! answered in order; errors are JSON (`{"error":{"code","message"}}`).
//!
//! Rate limit: each request but `/health`, SSE subscriptions and CORS
//! preflights takes one token from its client's bucket (`ratelimit`) before it
//! is routed or authenticated; an empty bucket gets `429 rate_limited` with
//! `Retry-After`, and the connection stays open when its body (if any) is here.
//!
//! Timeouts: `server.idle_timeout` while waiting for a request to start,
//! `server.read_timeout` for a started request to arrive whole (a deadline, not
//! per read, so a trickling client is cut off), `server.write_timeout` per write.

pub mod chunked;

use crate::accept::Permit;
use crate::limits::{CONN_BUFFER_KEEP_BYTES, CONN_READ_BUFFER_BYTES, REQUEST_HEADERS_MAX};
use crate::ratelimit::Limiter;
use crate::route;
use crate::shard::Shard;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::io;
use std::net::IpAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

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

/// An error answer. `close` ends the connection after it is written.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub allow: Option<&'static str>,
    pub retry_after_secs: Option<u32>,
    pub close: bool,
    /// Extra members of the `error` object (already JSON-encoded `"k":v` pairs).
    pub extra_json: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
            retry_after_secs: None,
            close: false,
            extra_json: None,
        }
    }
    pub fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }
    /// The answer this error is: a JSON body, its status and headers.
    pub fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(64 + self.message.len());
        body.extend_from_slice(b"{\"error\":{\"code\":");
        crate::event::push_json_str(&mut body, self.code);
        body.extend_from_slice(b",\"message\":");
        crate::event::push_json_str(&mut body, &self.message);
        if let Some(extra) = &self.extra_json {
            body.push(b',');
            body.extend_from_slice(extra.as_bytes());
        }
        body.extend_from_slice(b"}}");
        let mut r = Response::json(self.status, body);
        if let Some(a) = self.allow {
            r.headers.push(("Allow", a.to_string()));
        }
        if let Some(s) = self.retry_after_secs {
            r.headers.push(("Retry-After", s.to_string()));
        }
        if self.status == 401 {
            r.headers.push(("WWW-Authenticate", "Bearer".to_string()));
        }
        r.close = self.close;
        r
    }

    /// Append this error's whole answer to `out`.
    pub fn write(self, out: &mut Vec<u8>, keep_alive: bool, cors: Option<&str>) {
        self.into_response().write(out, keep_alive, false, cors);
    }
}

/// An answer's body.
pub enum Body {
    Empty,
    Static(&'static [u8]),
    Bytes(Vec<u8>),
    /// A read's answer (JSON array parts joined as they are written).
    Read(crate::reader::Answer),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Empty => 0,
            Body::Static(b) => b.len(),
            Body::Bytes(b) => b.len(),
            Body::Read(a) => a.len(),
        }
    }
}

/// An answer as a value: handlers return it, the connection loop writes it
/// once (with the CORS lines and `Connection: close` it decides), and reads
/// its status from here, never back from written bytes.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
    /// The connection ends after this answer.
    pub close: bool,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Body) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
            close: false,
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response::new(status, JSON, Body::Bytes(body))
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Append the whole answer to `out`: status line, headers (the CORS
    /// `lines` among them), and the body unless it answers a HEAD request.
    pub fn write(&self, out: &mut Vec<u8>, keep_alive: bool, is_head: bool, cors: Option<&str>) {
        write_head(
            out,
            self.status,
            self.content_type,
            &self.headers,
            cors,
            self.body.len(),
            keep_alive && !self.close,
        );
        if is_head {
            return;
        }
        match &self.body {
            Body::Empty => {}
            Body::Static(b) => out.extend_from_slice(b),
            Body::Bytes(b) => out.extend_from_slice(b),
            Body::Read(a) => a.write_to(out),
        }
    }
}

pub const JSON: &str = "application/json";

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// The status line and headers of an answer whose body (of `body_len`
/// bytes) the caller appends. `cors` holds whole header lines (each ending
/// in CRLF).
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra: &[(&str, String)],
    cors: Option<&str>,
    body_len: usize,
    keep_alive: bool,
) {
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(n.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: shardcast\r\n");
    // A 204 has no body, and says nothing about one (RFC 9110 §8.6).
    if status != 204 {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(n.format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (k, v) in extra {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(lines) = cors {
        out.extend_from_slice(lines.as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
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

/// The connection's read side: a buffer, how much of it holds data, and where
/// the current request starts.
struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    /// Make room for at least `want` more bytes past `end`.
    fn reserve(&mut self, want: usize) {
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            let new_len = (self.end + want)
                .max(self.buf.len() * 2)
                .max(CONN_READ_BUFFER_BYTES);
            self.buf.resize(new_len, 0);
        }
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > CONN_BUFFER_KEEP_BYTES {
                self.buf = vec![0; CONN_READ_BUFFER_BYTES];
            }
        }
    }
}

enum ReadErr {
    Closed,
    TimedOut,
    Io,
}

/// Whom a request counts against for the rate limit: the TCP peer, or for a
/// peer in `server.trusted_proxies` the client its `X-Forwarded-For` names.
struct Client {
    peer: IpAddr,
    peer_is_proxy: bool,
}

impl Client {
    fn of(shard: &Shard, stream: &TcpStream) -> Client {
        let peer = stream
            .peer_addr()
            .map(|a| a.ip())
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
        Client {
            peer,
            peer_is_proxy: crate::ratelimit::is_trusted(&shard.cfg.server.trusted_proxies, peer),
        }
    }

    fn ip(&self, shard: &Shard, head: &RequestHead, buf: &[u8]) -> IpAddr {
        if self.peer_is_proxy && head.forwarded_for {
            crate::ratelimit::forwarded_client(
                &buf[..head.head_len],
                self.peer,
                &shard.cfg.server.trusted_proxies,
            )
        } else {
            self.peer
        }
    }
}

/// Requests that do not count against the rate limit: liveness checks and
/// SSE subscriptions (held open, capped by `sse.*` instead). CORS preflights
/// are answered before this is asked.
fn rate_exempt(head: &RequestHead, path: &str) -> bool {
    path == "/health" || (path == "/events/subscribe" && head.method == Method::Get)
}

/// Take one request from the client's bucket, or the 429 to answer with.
fn rate_limit(
    limiter: Option<&Limiter>,
    shard: &Shard,
    client: &Client,
    head: &RequestHead,
    path: &str,
    buf: &[u8],
) -> Result<(), ApiError> {
    let Some(limiter) = limiter else {
        return Ok(());
    };
    if rate_exempt(head, path) {
        return Ok(());
    }
    let ip = client.ip(shard, head, buf);
    limiter.check(ip).map_err(|secs| {
        let mut e = ApiError::new(
            429,
            "rate_limited",
            format!(
                "too many requests from {}: at most {} per second with bursts of {}; retry after {secs} s",
                crate::ratelimit::describe(ip),
                limiter.per_second,
                limiter.burst
            ),
        );
        e.retry_after_secs = Some(secs);
        e
    })
}

/// Serve one connection until it closes, errs, times out or the shard drains.
/// `permit` holds the connection's place under `server.max_connections`.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, permit: Permit) {
    let registration = shard.conns.register(stream.as_raw_fd());
    let client = Client::of(&shard, &stream);
    let cfg = &shard.cfg.server;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(cfg.write_timeout));
    let mut rb = ReadBuf {
        buf: vec![0; CONN_READ_BUFFER_BYTES],
        start: 0,
        end: 0,
    };
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // 1. A whole head.
        let mut started: Option<Instant> = if rb.start < rb.end {
            Some(Instant::now())
        } else {
            None
        };
        let head = loop {
            match parse_head(rb.pending(), cfg.max_header_bytes) {
                Parsed::Complete(h) => break h,
                Parsed::Invalid(e) => {
                    e.write(&mut out, false, None);
                    let _ = flush(&mut stream, &mut out).await;
                    return;
                }
                Parsed::Partial => {}
            }
            if flush(&mut stream, &mut out).await.is_err() {
                return;
            }
            let (deadline_from, limit) = match started {
                Some(t) => (t, cfg.read_timeout),
                None => {
                    if shard.draining.get() {
                        return;
                    }
                    registration.set_idle(true);
                    (Instant::now(), cfg.idle_timeout)
                }
            };
            let r = read_more(
                &mut stream,
                &mut rb,
                CONN_READ_BUFFER_BYTES,
                deadline_from + limit,
            )
            .await;
            registration.set_idle(false);
            match r {
                Ok(()) => {
                    started.get_or_insert_with(Instant::now);
                }
                Err(ReadErr::TimedOut) if started.is_some() => {
                    ApiError::new(
                        408,
                        "request_timeout",
                        "request did not arrive within server.read_timeout",
                    )
                    .closing()
                    .write(&mut out, false, None);
                    let _ = flush(&mut stream, &mut out).await;
                    return;
                }
                Err(_) => return,
            }
        };
        let request_started = started.unwrap_or_else(Instant::now);

        // 2. Route, authenticate and size-check before reading any body.
        let keep_alive = head.keep_alive && !shard.draining.get();
        let pending = rb.pending();
        let path = std::str::from_utf8(&pending[head.path.clone()]).unwrap_or("");
        let cors = head
            .origin
            .clone()
            .and_then(|r| cors_lines(&shard.cfg.server, &pending[r]));
        // Answered without a handler: a CORS preflight, or a refusal
        // (rate limit, route, auth, size) decided from the head alone.
        let resolved = if head.method == Method::Options && route::is_endpoint(path) {
            Err(preflight(cors.is_some()))
        } else {
            rate_limit(
                permit.admission().limiter.as_ref(),
                &shard,
                &client,
                &head,
                path,
                pending,
            )
            .and_then(|()| route::resolve(&shard, &head, path, pending))
            .map_err(|e| {
                if e.status == 429 {
                    shard.metrics.rate_limited();
                }
                e.into_response()
            })
        };
        let body_len = head.content_length.unwrap_or(0);
        let resolved = match resolved {
            Ok(r) => r,
            Err(answer) => {
                // Its body is read and dropped, so the next request on the
                // connection is found however the bytes were split across
                // reads; unless the body is unbounded (chunked), too large,
                // or awaited behind `Expect: 100-continue` (the client may
                // never send it after a final answer). `Connection: close`
                // (or HTTP/1.0) is honoured here too.
                let here = rb.pending().len() >= head.head_len + body_len;
                let close = answer.close
                    || !keep_alive
                    || head.chunked
                    || body_len > cfg.max_body_bytes
                    || (head.expect_continue && !here);
                if !close {
                    let deadline = request_started + cfg.read_timeout;
                    let cors = cors.as_deref();
                    if !receive_body(
                        &mut stream,
                        &mut rb,
                        &mut out,
                        &head,
                        Keep::Nothing,
                        deadline,
                        cors,
                    )
                    .await
                    {
                        return;
                    }
                }
                shard.metrics.request(
                    crate::metrics::OTHER,
                    answer.status,
                    request_started.elapsed().as_micros() as u64,
                );
                answer.write(&mut out, !close, false, cors.as_deref());
                if close {
                    let _ = flush(&mut stream, &mut out).await;
                    return;
                }
                if rb.start == rb.end && flush(&mut stream, &mut out).await.is_err() {
                    return;
                }
                continue;
            }
        };

        // 3. The body.
        if head.expect_continue
            && (body_len > 0 || head.chunked)
            && rb.pending().len() < head.head_len + body_len.max(1)
        {
            out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let deadline = request_started + cfg.read_timeout;
        let body_len = if head.chunked {
            let max = cfg.max_body_bytes;
            let cors = cors.as_deref();
            let decoded =
                receive_chunked(&mut stream, &mut rb, &mut out, &head, max, deadline, cors);
            match decoded.await {
                Some(n) => n,
                None => return,
            }
        } else if receive_body(
            &mut stream,
            &mut rb,
            &mut out,
            &head,
            Keep::Body,
            deadline,
            cors.as_deref(),
        )
        .await
        {
            body_len
        } else {
            return;
        };

        // 4. Answer: a response, or the connection handed on.
        let route = resolved.route;
        let req = &rb.buf[rb.start..rb.start + head.head_len + body_len];
        let reply = route::handle(&shard, resolved, &head, req).await;
        let micros = request_started.elapsed().as_micros() as u64;
        let is_head = head.method == Method::Head;
        let answer = match reply {
            route::Reply::Answer(a) => a,
            route::Reply::Replay {
                tenant,
                query,
                grant,
            } => {
                // A replay of any length, streamed; the connection stays
                // usable after it.
                shard.metrics.request(route.metric_index(), 200, micros);
                rb.consume(head.head_len + body_len);
                if flush(&mut stream, &mut out).await.is_err() {
                    return;
                }
                // Boxed: its state would otherwise enlarge every
                // connection's task (see `route::handle`).
                let replay = Box::pin(crate::replay::serve(
                    &tenant,
                    &mut stream,
                    &query,
                    grant.as_ref(),
                    keep_alive,
                    cors.as_deref(),
                    is_head,
                ));
                match replay.await {
                    Ok(true) if keep_alive => continue,
                    Ok(_) | Err(_) => return,
                }
            }
            route::Reply::Subscribe {
                tenant,
                mut subscription,
            } => {
                // The connection becomes a subscription; the request buffer goes.
                shard.metrics.request(route.metric_index(), 200, micros);
                subscription.cors = cors;
                if flush(&mut stream, &mut out).await.is_err() {
                    return;
                }
                drop(rb);
                drop(out);
                drop(registration);
                // A task of its own: this request's state (buffers, the
                // request future) is freed now, not held for the
                // subscription's lifetime. The permit goes into its task, as
                // an argument (an `async { fut.await; drop(permit) }` wrapper
                // would hold the subscription's state twice: measured 1,744
                // bytes instead of 864 per subscriber). It runs in the
                // shard's SSE task queue, so a fan-out round never holds up
                // the connections' requests for longer than a poll interval.
                let fut = crate::sse::serve(shard.clone(), tenant, stream, subscription, permit);
                tracing::trace!(
                    bytes = std::mem::size_of_val(&fut),
                    stream = std::mem::size_of::<TcpStream>(),
                    "SSE task state"
                );
                if let Ok(task) = glommio::spawn_local_into(fut, shard.sse_tasks) {
                    task.detach();
                }
                return;
            }
        };
        shard
            .metrics
            .request(route.metric_index(), answer.status, micros);
        answer.write(&mut out, keep_alive, is_head, cors.as_deref());
        rb.consume(head.head_len + body_len);
        if answer.close || !keep_alive {
            let _ = flush(&mut stream, &mut out).await;
            return;
        }
        // Pipelined requests already buffered are answered before anything is written.
        if (rb.start == rb.end || out.len() >= CONN_BUFFER_KEEP_BYTES)
            && flush(&mut stream, &mut out).await.is_err()
        {
            return;
        }
    }
}

/// The CORS header lines for a request from `origin`, when it is allowed.
pub fn cors_lines(cfg: &crate::config::ServerConfig, origin: &[u8]) -> Option<String> {
    if cfg.cors_origins.is_empty() {
        return None;
    }
    let origin = std::str::from_utf8(origin).ok()?;
    let any = cfg.cors_origins.iter().any(|o| o == "*");
    let listed = cfg
        .cors_origins
        .iter()
        .any(|o| o.eq_ignore_ascii_case(origin));
    if !any && !listed {
        return None;
    }
    // A header value must not smuggle a line break into the answer.
    if origin.bytes().any(|c| c < 0x20) {
        return None;
    }
    let mut s = String::with_capacity(96 + origin.len());
    if listed {
        s.push_str("Access-Control-Allow-Origin: ");
        s.push_str(origin);
        s.push_str("\r\nVary: Origin\r\n");
        if cfg.cors_allow_credentials {
            s.push_str("Access-Control-Allow-Credentials: true\r\n");
        }
    } else {
        s.push_str("Access-Control-Allow-Origin: *\r\n");
    }
    s.push_str("Access-Control-Expose-Headers: Retry-After\r\n");
    Some(s)
}

/// An OPTIONS request to an endpoint: the CORS preflight (or plain OPTIONS).
/// `allowed`: the origin may have it (its CORS lines go out beside these).
fn preflight(allowed: bool) -> Response {
    const METHODS: &str = "GET, HEAD, POST, PUT, OPTIONS";
    let r = Response::new(204, JSON, Body::Empty).header("Allow", METHODS);
    if !allowed {
        return r;
    }
    r.header("Access-Control-Allow-Methods", METHODS)
        .header(
            "Access-Control-Allow-Headers",
            "Content-Type, X-API-Key, Authorization, Last-Event-ID",
        )
        .header("Access-Control-Max-Age", "600")
}

async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = stream.write_all(out).await;
    out.clear();
    if out.capacity() > CONN_BUFFER_KEEP_BYTES {
        out.shrink_to(1024);
    }
    r
}

/// The body did not arrive in time: 408, and the connection ends.
async fn body_timed_out(stream: &mut TcpStream, out: &mut Vec<u8>, cors: Option<&str>) {
    ApiError::new(
        408,
        "request_timeout",
        "request body did not arrive within server.read_timeout",
    )
    .closing()
    .write(out, false, cors);
    let _ = flush(stream, out).await;
}

/// Read and decode a chunked body (`chunked`) in place: afterwards the
/// request is head + decoded body, as if it had a Content-Length of the
/// returned size. None when the connection is done: closed, failed, cut at
/// `deadline` (408), or the body malformed (400) or too large (413).
async fn receive_chunked(
    stream: &mut TcpStream,
    rb: &mut ReadBuf,
    out: &mut Vec<u8>,
    head: &RequestHead,
    max_body_bytes: usize,
    deadline: Instant,
    cors: Option<&str>,
) -> Option<usize> {
    let mut body = chunked::Dechunk::new(max_body_bytes);
    loop {
        let at = rb.start + head.head_len;
        match body.advance(&mut rb.buf[at..rb.end]) {
            Ok((shrank, done)) => {
                rb.end -= shrank;
                if done {
                    return Some(body.decoded());
                }
            }
            Err(e) => {
                e.write(out, false, cors);
                let _ = flush(stream, out).await;
                return None;
            }
        }
        if !more_of_body(stream, rb, out, CONN_READ_BUFFER_BYTES, deadline, cors).await {
            return None;
        }
    }
}

/// What `receive_body` does with the body as it arrives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Buffer it whole, for the handler.
    Body,
    /// Drop it (and the head) as it arrives: a refused request. A client
    /// without a key can make the server read `server.max_body_bytes`,
    /// never hold it.
    Nothing,
}

/// Read the request's body, writing what `out` holds first (answers to
/// earlier requests, or `100 Continue`). False when the connection is done:
/// closed, failed, or cut at `deadline` with a 408.
async fn receive_body(
    stream: &mut TcpStream,
    rb: &mut ReadBuf,
    out: &mut Vec<u8>,
    head: &RequestHead,
    keep: Keep,
    deadline: Instant,
    cors: Option<&str>,
) -> bool {
    let need = head.head_len + head.content_length.unwrap_or(0);
    let mut dropped = 0;
    loop {
        if keep == Keep::Nothing {
            let here = (need - dropped).min(rb.pending().len());
            rb.consume(here);
            dropped += here;
        }
        let missing = need - dropped - rb.pending().len().min(need - dropped);
        if missing == 0 {
            return true;
        }
        if !more_of_body(stream, rb, out, missing, deadline, cors).await {
            return false;
        }
    }
}

/// Write what `out` holds, then read more of a body. False when the
/// connection is done: closed, failed, or cut at `deadline` with a 408.
async fn more_of_body(
    stream: &mut TcpStream,
    rb: &mut ReadBuf,
    out: &mut Vec<u8>,
    want: usize,
    deadline: Instant,
    cors: Option<&str>,
) -> bool {
    if flush(stream, out).await.is_err() {
        return false;
    }
    match read_more(stream, rb, want, deadline).await {
        Ok(()) => true,
        Err(ReadErr::TimedOut) => {
            body_timed_out(stream, out, cors).await;
            false
        }
        Err(_) => false,
    }
}

/// What a read for a body may add to the buffer before any of it arrived.
const READ_GROW_BYTES: usize = 64 * 1024;

async fn read_more(
    stream: &mut TcpStream,
    rb: &mut ReadBuf,
    want: usize,
    deadline: Instant,
) -> Result<(), ReadErr> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(ReadErr::TimedOut);
    }
    let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
    // Grow with what has arrived (at most doubling per read), never to a
    // body's announced size at once: a client that announces 10 MiB and
    // stalls holds 64 KiB here until the read timeout, not megabytes.
    rb.reserve(want.min(READ_GROW_BYTES.max(rb.end - rb.start)));
    match stream.read(&mut rb.buf[rb.end..]).await {
        Ok(0) => Err(ReadErr::Closed),
        Ok(n) => {
            rb.end += n;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            Err(ReadErr::TimedOut)
        }
        Err(_) => Err(ReadErr::Io),
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
