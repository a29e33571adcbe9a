//! One SSE subscriber, as a task of its own in the shard's SSE task queue:
//! admitted against the caps (`sse.max_connections` per shard's share,
//! `sse.max_per_key`, and for a token `sse.max_per_user` on the user's
//! owning shard), then a loop: catch up from SQLite while behind the ring,
//! take its frames from the ring in one write, or wait in the index for a
//! matching commit, the heartbeat, a closed peer or its token's expiry.
//! Also: parsing a subscription from its request, and the shard's heartbeat
//! and token-expiry timers.

use super::{encode_frame, Fanout, Filter, Pattern};
use crate::config::SlowClient;
use crate::http::query::query_param;
use crate::http::ApiError;
use crate::shard::{Shard, Tenant};
use crate::token::Grant;
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only events committed from now on.
    Live,
    /// Every event after this position (`Last-Event-ID`, or `from` − 1).
    After(u64),
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub filter: Filter,
    pub start: Start,
    /// The key it authenticated with, for `sse.max_per_key`.
    pub key: Option<Box<[u8]>>,
    /// The token's user, when it came with a subscription token (boxed: a
    /// pointer in every subscriber's task, the rest only in token ones').
    pub user: Option<Box<User>>,
    /// CORS header lines for the response, when the origin is allowed.
    pub cors: Option<String>,
}

/// A token subscriber's user: counted by `sub` under `sse.max_per_user`;
/// its stream ends at `expires` (Unix seconds) with `event: token_expired`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub sub: Box<str>,
    pub expires: u64,
}

/// Counts a subscriber against the shard's caps while it lives, and keeps
/// the ring's position lists for its prefixes.
struct Slot<'a> {
    fanout: &'a Fanout,
    id: u64,
    key: Option<Box<[u8]>>,
    filter: &'a Filter,
    /// A token subscriber: its place under `sse.max_per_user`, given back
    /// through its shard, and its entry in `expiring`.
    user: Option<(&'a Shard, &'a User)>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.fanout.waiting.borrow_mut().leave(self.id);
        self.fanout.ring.borrow_mut().remove_reader(self.filter);
        let n = self.fanout.subscribers.get();
        debug_assert!(n > 0, "a shard's subscriber count went negative");
        self.fanout.subscribers.set(n - 1);
        if let Some((shard, user)) = self.user {
            self.fanout
                .expiring
                .borrow_mut()
                .remove(&(user.expires, self.id));
            shard.release_user(self.fanout.tenant, &user.sub);
        }
        if let Some(k) = &self.key {
            let mut per_key = self.fanout.per_key.borrow_mut();
            if let Some(n) = per_key.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    per_key.remove(k);
                }
            }
        }
    }
}

fn admit<'a>(
    shard: &Shard,
    f: &'a Fanout,
    key: Option<Box<[u8]>>,
    filter: &'a Filter,
) -> Result<Slot<'a>, ApiError> {
    let cfg = &shard.cfg.sse;
    // The process cap, split evenly: each shard enforces its share alone.
    let per_shard = cfg.max_connections.div_ceil(shard.cfg.server.shards);
    if shard.sse_subscribers() >= per_shard {
        let mut e = ApiError::new(
            503,
            "too_many_subscribers",
            format!(
                "this server holds its maximum of {} SSE connections",
                cfg.max_connections
            ),
        );
        e.retry_after_secs = Some(shard.cfg.writer.retry_after_lasting_secs());
        return Err(e);
    }
    if let Some(k) = &key {
        if cfg.max_per_key > 0 && f.per_key.borrow().get(k).copied().unwrap_or(0) >= cfg.max_per_key
        {
            let mut e = ApiError::new(
                429,
                "too_many_subscriptions",
                format!(
                    "this API key already holds {} SSE connections",
                    cfg.max_per_key
                ),
            );
            e.retry_after_secs = Some(shard.cfg.writer.retry_after_lasting_secs());
            return Err(e);
        }
        *f.per_key.borrow_mut().entry(k.clone()).or_insert(0) += 1;
    }
    f.subscribers.set(f.subscribers.get() + 1);
    f.ring.borrow_mut().add_reader(filter);
    let id = f.next_sub.get();
    f.next_sub.set(id + 1);
    Ok(Slot {
        fanout: f,
        id,
        key,
        filter,
        user: None,
    })
}

/// 429 for a user (token `sub`) at `sse.max_per_user`.
fn user_full(shard: &Shard) -> ApiError {
    let mut e = ApiError::new(
        429,
        "too_many_subscriptions",
        format!(
            "this user already holds {} SSE connections (sse.max_per_user)",
            shard.cfg.sse.max_per_user
        ),
    );
    e.retry_after_secs = Some(shard.cfg.writer.retry_after_lasting_secs());
    e
}

/// What woke a waiting subscriber.
enum Wake {
    Events,
    Heartbeat,
    Closed,
    Expired,
}

/// Serve one subscriber until it goes away (or the shard drains).
/// (A plain fn returning an `async move` block, not an `async fn`: an async
/// fn moves each argument into a local of its state machine and keeps the
/// argument's slot too, which cost every subscriber ~230 bytes twice over.)
///
/// Long: the subscriber's one state machine (admit, catch up, deliver from the
/// ring, wait): its locals live in the subscriber's task for its whole life, so
/// the loop is kept as one async block whose size is measured (see the notes
/// inside), with the I/O in small helpers.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    shard: Rc<Shard>,
    tenant: Rc<Tenant>,
    mut stream: TcpStream,
    mut sub: Subscription,
    // Holds the connection's place under `server.max_connections` until the
    // subscription ends.
    permit: crate::shard::admission::Permit,
) -> impl std::future::Future<Output = ()> {
    async move {
        let _permit = permit;
        let registration = shard.conns.register(stream.as_raw_fd());
        // Needed only for the head: not kept for the subscription's lifetime.
        let cors = sub.cors.take();
        let filter = &sub.filter;
        // A token's user: a place under `sse.max_per_user` first (its
        // owning shard may be another), then the shard's own caps.
        let counted = match sub.user.as_deref() {
            None => Ok(()),
            // Boxed: the ask's state (a channel and a timer) would otherwise
            // sit in every subscriber's task for its whole life.
            Some(u) => match Box::pin(shard.acquire_user(tenant.id(), &u.sub)).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(user_full(&shard)),
                Err(()) => {
                    let mut e =
                        ApiError::new(503, "shutting_down", "the server is stopping; reconnect");
                    e.retry_after_secs = Some(shard.cfg.writer.retry_after_lasting_secs());
                    Err(e)
                }
            },
        };
        let admitted = counted.and_then(|()| {
            admit(&shard, &tenant.fanout, sub.key.take(), filter).inspect_err(|_| {
                if let Some(u) = sub.user.as_deref() {
                    shard.release_user(tenant.id(), &u.sub);
                }
            })
        });
        let slot = match admitted {
            Ok(mut s) => {
                if let Some(u) = sub.user.as_deref() {
                    s.user = Some((&*shard, u));
                    tenant
                        .fanout
                        .expiring
                        .borrow_mut()
                        .insert((u.expires, s.id));
                }
                s
            }
            Err(e) => {
                let mut out = Vec::new();
                e.write(&mut out, false, cors.as_deref());
                let _ = stream.write_all(&out).await;
                return;
            }
        };
        // An SSE response is written for as long as the client stays.
        let _ = stream.set_write_timeout(None);
        let _ = stream.set_read_timeout(None);
        let fanout = &tenant.fanout;
        let cfg = &shard.cfg.sse;

        let head = tenant.index.head().unwrap_or_else(|_| fanout.last());
        let mut out: Vec<u8> = Vec::with_capacity(256);
        out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nServer: shardcast\r\nContent-Type: text/event-stream\r\n\
Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: keep-alive\r\n",
        );
        if let Some(lines) = cors {
            out.extend_from_slice(lines.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(b"retry: ");
        out.extend_from_slice(itoa::Buffer::new().format(cfg.retry_ms).as_bytes());
        out.extend_from_slice(b"\n\n");
        let mut cursor = match sub.start {
            Start::Live => fanout.last().max(head),
            // Cluster mode: positions are the cluster's, so an id from another
            // node that this replica has not applied yet is waited for.
            Start::After(p) if p > head && shard.cfg.cluster.is_some() => p,
            Start::After(p) if p > head => {
                // From another history (a restored backup, another server):
                // say so and go live rather than wait for positions that may never come.
                out.extend_from_slice(
                b"event: reset\ndata: {\"reason\":\"last_event_id_beyond_head\",\"last_event_id\":",
            );
                out.extend_from_slice(itoa::Buffer::new().format(p).as_bytes());
                out.extend_from_slice(b",\"head\":");
                out.extend_from_slice(itoa::Buffer::new().format(head).as_bytes());
                out.extend_from_slice(b"}\n\n");
                head
            }
            Start::After(p) => p,
        };
        if write(&mut stream, &mut out).await.is_err() {
            return;
        }

        let mut seen_beat = fanout.heartbeat.get();
        let mut lagging = false;
        let mut probe = [0u8; 8];
        loop {
            if fanout.closed.get() {
                return;
            }
            // 0. The token ran out: say so (with where to resume) and end.
            if let Some(u) = sub.user.as_deref() {
                if crate::token::now_secs() >= u.expires {
                    out.extend_from_slice(
                        b"event: token_expired\ndata: {\"reason\":\"token_expired\",\"expired_at\":",
                    );
                    out.extend_from_slice(itoa::Buffer::new().format(u.expires).as_bytes());
                    out.extend_from_slice(b",\"last_event_id\":");
                    out.extend_from_slice(itoa::Buffer::new().format(cursor).as_bytes());
                    out.extend_from_slice(b"}\n\n");
                    let _ = write(&mut stream, &mut out).await;
                    return;
                }
            }
            // 1. Behind the ring: a page from SQLite.
            if cursor + 1 < fanout.first() {
                // Boxed: the read's channel futures would otherwise sit in every
                // idle subscriber's task state.
                let read = Box::pin(
                    tenant
                        .readers
                        .events_from(cursor + 1, cfg.catch_up_batch_events),
                );
                match read.await {
                    Ok(events) => {
                        // Retention pruned what the client wants: say so, then
                        // go on from the oldest event kept.
                        let next = events.first().map(|e| e.position).unwrap_or(fanout.first());
                        if next > cursor + 1 {
                            out.extend_from_slice(
                                b"event: reset\ndata: {\"reason\":\"pruned\",\"last_event_id\":",
                            );
                            out.extend_from_slice(itoa::Buffer::new().format(cursor).as_bytes());
                            out.extend_from_slice(b",\"first_retained\":");
                            out.extend_from_slice(itoa::Buffer::new().format(next).as_bytes());
                            out.extend_from_slice(b"}\n\n");
                        }
                        for e in &events {
                            if filter.matches(&e.new.event_type, e.new.stream.as_deref()) {
                                encode_frame(&mut out, e);
                                fanout.delivered.set(fanout.delivered.get() + 1);
                            }
                        }
                        match events.last() {
                            Some(e) => cursor = e.position,
                            // Nothing stored after the cursor yet the ring starts
                            // later: pruned; resume at the ring.
                            None => cursor = fanout.first() - 1,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(shard = shard.id, error = %e, "SSE catch-up read failed; closing the subscriber");
                        return;
                    }
                }
                if write(&mut stream, &mut out).await.is_err() {
                    return;
                }
                continue;
            }

            // 2. From the ring: the frames it wants after its cursor, at most
            //    a client buffer's worth, found by key (not by scanning).
            if fanout.last() > cursor {
                let mut wrote = false;
                {
                    let ring = fanout.ring.borrow();
                    let mut scratch = fanout.scratch.borrow_mut();
                    scratch.clear();
                    let mut n = 0;
                    let looked = ring.each_match(filter, cursor, cfg.client_buffer_events, |f| {
                        scratch.extend_from_slice(&f.bytes);
                        n += 1;
                    });
                    // Fewer than a buffer's worth: everything up to `last`
                    // was looked at; else go on after the last one sent.
                    cursor = if n < cfg.client_buffer_events {
                        fanout.last()
                    } else {
                        looked
                    };
                    fanout.delivered.set(fanout.delivered.get() + n as u64);
                    if n > 0 {
                        wrote = true;
                        // Usually the socket takes it all at once; only what it
                        // does not take is copied out to wait for the client.
                        match send_now(stream.as_raw_fd(), &scratch) {
                            Ok(sent) => out.extend_from_slice(&scratch[sent..]),
                            Err(()) => return,
                        }
                    }
                    if scratch.capacity() > SCRATCH_KEEP_BYTES {
                        *scratch = Vec::new();
                    }
                }
                if !wrote {
                    continue;
                }
                seen_beat = fanout.heartbeat.get();
                if write(&mut stream, &mut out).await.is_err() {
                    return;
                }
                // What piled up while that write waited on the client: more than
                // its buffer means the client reads slower than events arrive.
                let mut lag = 0;
                fanout.ring.borrow().each_match(
                    filter,
                    cursor,
                    cfg.client_buffer_events + 1,
                    |_| lag += 1,
                );
                if lag > cfg.client_buffer_events {
                    if !lagging {
                        lagging = true;
                        fanout.slow_clients.set(fanout.slow_clients.get() + 1);
                        tracing::debug!(shard = shard.id, lag, "slow SSE subscriber");
                    }
                    if cfg.slow_client == SlowClient::Disconnect {
                        return;
                    }
                } else {
                    lagging = false;
                }
                continue;
            }

            // 3. Nothing wanted is pending: wait in the index for a matching
            //    commit, the heartbeat, or the peer leaving.
            registration.set_idle(true);
            let mut registered = false;
            let woke = std::future::poll_fn(|cx| {
                // Keeps one read armed with the reactor: a closed or half-closed
                // peer ends the subscription now, not at the next write.
                loop {
                    match Pin::new(&mut stream).poll_read(cx, &mut probe) {
                        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                            return Poll::Ready(Wake::Closed)
                        }
                        // Anything a client sends on an SSE stream is ignored.
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Pending => break,
                    }
                }
                if fanout.closed.get() {
                    return Poll::Ready(Wake::Closed);
                }
                // Told by the shard's expiry timer (`Fanout::expire`): no
                // clock read per poll, nothing more kept per subscriber.
                if fanout.waiting.borrow().expired(slot.id) {
                    return Poll::Ready(Wake::Expired);
                }
                if registered {
                    if fanout.waiting.borrow().woken(slot.id) {
                        return Poll::Ready(Wake::Events);
                    }
                } else if cursor + 1 < fanout.first()
                    || fanout.ring.borrow().has_match(filter, cursor)
                {
                    return Poll::Ready(Wake::Events);
                }
                if fanout.heartbeat.get() != seen_beat {
                    return Poll::Ready(Wake::Heartbeat);
                }
                fanout
                    .waiting
                    .borrow_mut()
                    .register(slot.id, filter, cx.waker());
                registered = true;
                Poll::Pending
            })
            .await;
            registration.set_idle(false);
            if registered {
                // Out of the index. While in it, every matching commit was
                // noted: nothing it wants came before the first one noted,
                // and with none noted, nothing up to now (index.rs).
                let from = fanout.waiting.borrow_mut().unregister(slot.id);
                cursor = match from {
                    Some(p) => cursor.max(p - 1),
                    None => cursor.max(fanout.last()),
                };
            }
            match woke {
                Wake::Closed => return,
                // Said and ended at the top of the loop.
                Wake::Events | Wake::Expired => {}
                Wake::Heartbeat => {
                    seen_beat = fanout.heartbeat.get();
                    match send_now(stream.as_raw_fd(), b":\n\n") {
                        Ok(sent) => out.extend_from_slice(&b":\n\n"[sent..]),
                        Err(()) => return,
                    }
                    if write(&mut stream, &mut out).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// The shard's scratch buffer is released above this size.
const SCRATCH_KEEP_BYTES: usize = 1 << 20;

/// Send without waiting; returns how much the socket took (0 when full).
fn send_now(fd: std::os::fd::RawFd, buf: &[u8]) -> Result<usize, ()> {
    if buf.is_empty() {
        return Ok(0);
    }
    // SAFETY: send(2) reads `buf` for its length on a socket we own.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
        _ => Err(()),
    }
}

/// Write and release the buffer: an idle subscriber holds no write memory.
async fn write(stream: &mut TcpStream, out: &mut Vec<u8>) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = stream.write_all(out).await;
    *out = Vec::new();
    r
}

/// The shard's heartbeat: one timer for all its subscribers.
pub async fn heartbeat_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(shard.cfg.sse.heartbeat_interval).await;
        for t in shard.each_tenant() {
            t.fanout.beat();
        }
    }
}

/// The shard's token expiry check: one timer for all its subscribers.
pub async fn expiry_loop(shard: Rc<Shard>) {
    loop {
        glommio::timer::sleep(crate::limits::TOKEN_EXPIRY_CHECK_INTERVAL).await;
        let now = crate::token::now_secs();
        for t in shard.each_tenant() {
            t.fanout.expire(now);
        }
    }
}

/// Build a subscription from the request: filters and start point.
/// `Last-Event-ID` wins over `last_event_id`, which wins over `from`.
pub fn subscription(
    query: &str,
    last_event_id: Option<&str>,
    key: Option<Box<[u8]>>,
    grant: Option<Grant>,
) -> Result<Subscription, ApiError> {
    let position = |name: &str, v: &str| -> Result<u64, ApiError> {
        v.trim().parse::<u64>().map_err(|_| {
            ApiError::new(
                400,
                "invalid_parameter",
                format!("{name} must be a position (a whole number ≥ 0), not {v:?}"),
            )
        })
    };
    let start = if let Some(id) = last_event_id.filter(|s| !s.trim().is_empty()) {
        Start::After(position("Last-Event-ID", id)?)
    } else if let Some(id) = query_param(query, "last_event_id").filter(|s| !s.is_empty()) {
        Start::After(position("last_event_id", &id)?)
    } else if let Some(from) = query_param(query, "from").filter(|s| !s.is_empty()) {
        Start::After(position("from", &from)?.saturating_sub(1))
    } else {
        Start::Live
    };
    let bad =
        |name: &str, why: String| ApiError::new(400, "invalid_parameter", format!("{name}: {why}"));
    let types = query_param(query, "types")
        .or_else(|| query_param(query, "type"))
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Pattern::parse(s).map_err(|why| bad("types", why)))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    let stream = query_param(query, "stream")
        .filter(|s| !s.is_empty())
        .map(|s| Pattern::parse(&s).map_err(|why| bad("stream", why)))
        .transpose()?;
    let filter = Filter {
        types,
        streams: stream.into_iter().collect(),
    };
    let (filter, user) = match grant {
        None => (filter, None),
        Some(g) => {
            // Within the token's scope, or refused: a page asking for more
            // than its user may see is a bug worth a clear answer.
            g.check(&filter, "types", "stream")?;
            (
                filter.narrowed(&g.scope),
                Some(Box::new(User {
                    sub: g.sub,
                    expires: g.expires,
                })),
            )
        }
    };
    Ok(Subscription {
        filter,
        start,
        key,
        user,
        cors: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_points_and_filters() {
        let s = subscription("from=5&types=a,b&stream=s%201", None, None, None).unwrap();
        assert_eq!(s.start, Start::After(4));
        assert_eq!(
            s.filter.types,
            vec![Pattern::Exact("a".into()), Pattern::Exact("b".into())]
        );
        assert_eq!(s.filter.streams, vec![Pattern::Exact("s 1".into())]);
        assert!(s.filter.matches("a", Some("s 1")));
        assert!(!s.filter.matches("c", Some("s 1")));
        assert!(!s.filter.matches("a", None));
        let s = subscription("last_event_id=9&from=2", Some("12"), None, None).unwrap();
        assert_eq!(s.start, Start::After(12));
        let s = subscription("last_event_id=9&from=2", None, None, None).unwrap();
        assert_eq!(s.start, Start::After(9));
        assert_eq!(
            subscription("", None, None, None).unwrap().start,
            Start::Live
        );
        assert_eq!(
            subscription("from=x", None, None, None).unwrap_err().status,
            400
        );
    }
}
