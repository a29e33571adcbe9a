//! One connection's loop: read a head, route and authenticate it before any
//! body is read (`api`), read the body (by Content-Length or chunked), answer
//! it; keep-alive is the default, pipelined requests are answered in order,
//! and every answer that is ready goes out in one write. A reply may also
//! hand the connection on: to a replay, after which it serves requests
//! again, or to an SSE subscription's task.
//!
//! Rate limit: each request but `/health`, SSE subscriptions and CORS
//! preflights takes one token from its client's bucket (`ratelimit`) before it
//! is routed or authenticated; an empty bucket gets `429 rate_limited` with
//! `Retry-After`, and the connection stays open when its body (if any) is here.
//!
//! Timeouts: `server.idle_timeout` while waiting for a request to start,
//! `server.read_timeout` for a started request to arrive whole (a deadline, not
//! per read, so a trickling client is cut off), `server.write_timeout` per write.

use crate::api;
use crate::http::{
    chunked, parse_head, ApiError, Body, Method, Parsed, RequestHead, Response, JSON,
};
use crate::limits::{CONN_BUFFER_KEEP_BYTES, CONN_READ_BUFFER_BYTES};
use crate::ratelimit::Limiter;
use crate::shard::admission::Permit;
use crate::shard::Shard;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

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
///
/// Long: the connection's one state machine (head, route, body, answer or
/// hand-over): every local lives in the connection's task, and each piece of it
/// is named and commented where it is; helpers take the I/O steps out.
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
        let resolved = if head.method == Method::Options && api::is_endpoint(path) {
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
            .and_then(|()| api::resolve(&shard, &head, path, pending))
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
        let reply = api::handle(&shard, resolved, &head, req).await;
        let micros = request_started.elapsed().as_micros() as u64;
        let is_head = head.method == Method::Head;
        let answer = match reply {
            api::Reply::Answer(a) => a,
            api::Reply::Replay {
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
                // connection's task (see `api::handle`).
                let replay = Box::pin(crate::api::replay::serve(
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
            api::Reply::Subscribe {
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
                let fut = crate::shard::fanout::serve(
                    shard.clone(),
                    tenant,
                    stream,
                    subscription,
                    permit,
                );
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
