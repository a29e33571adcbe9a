//! Live fan-out over Server-Sent Events, per shard.
//!
//! After each commit the writer sends the committed events once to every
//! shard (in the same message as that shard's answers). The shard encodes
//! each event into its SSE frame once and keeps the newest `sse.ring_events`
//! frames in a ring (`Fanout`), indexed by type and stream (`index`). Each
//! subscriber is a task with a cursor (the last position it was sent); it
//! waits in an index keyed by what it follows, so a commit wakes only the
//! subscribers with a new matching event. A woken subscriber gathers its
//! frames (found by key) into one buffer and writes it in one write. A
//! subscriber whose cursor is older than the ring is served from SQLite
//! through the reader pool, a page at a time, until the ring covers it
//! again: the cursor is a position, so the switch has no gap and no repeat.
//!
//! Nothing here is shared with another core: `Rc`, `Cell`, `RefCell`.

use crate::config::SlowClient;
use crate::event::Event;
use crate::http::query::query_param;
use crate::http::ApiError;
use crate::shard::{Shard, Tenant};
use crate::tenant::TenantId;
use crate::token::Grant;
pub use index::{Filter, Frame, Pattern};
use index::{Ring, Waiters};

mod index;
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;

/// Encode one event as an SSE message: `id:` its position, `event:` its type,
/// `data:` the stored event as JSON. The JSON is one line unless `data` held
/// raw line breaks between tokens (JSON strings cannot hold them), in which
/// case each line becomes its own `data:` line, as the WHATWG spec joins them
/// back with `\n`. A line ends, for an EventSource, at CRLF, a lone LF or a
/// lone CR alike, so all three split here (the JSON comes back with `\n`
/// where a CR stood: whitespace either way).
pub fn encode_frame(out: &mut Vec<u8>, e: &Event) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(itoa::Buffer::new().format(e.position).as_bytes());
    out.extend_from_slice(b"\nevent: ");
    // A type is free text: a line break in it would end the field early.
    for c in e.new.event_type.bytes() {
        out.push(if c == b'\n' || c == b'\r' { b' ' } else { c });
    }
    let mut json = Vec::with_capacity(96 + e.new.data.len());
    crate::event::encode_event(&mut json, e, false);
    let mut rest = &json[..];
    loop {
        let end = rest
            .iter()
            .position(|c| *c == b'\n' || *c == b'\r')
            .unwrap_or(rest.len());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(&rest[..end]);
        if end == rest.len() {
            break;
        }
        let brk = if rest[end..].starts_with(b"\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + brk..];
    }
    out.extend_from_slice(b"\n\n");
}

/// The shard's ring of frames (one tenant's) and the subscribers waiting
/// on it, both indexed by what subscribers follow (`index`).
pub struct Fanout {
    ring: RefCell<Ring>,
    /// Position of the newest event this shard has seen (its start head when none).
    last: Cell<u64>,
    waiting: RefCell<Waiters>,
    next_sub: Cell<u64>,
    heartbeat: Cell<u64>,
    pub subscribers: Cell<usize>,
    per_key: RefCell<HashMap<Box<[u8]>, usize>>,
    pub slow_clients: Cell<u64>,
    pub delivered: Cell<u64>,
    /// The tenant was removed: every subscriber ends.
    closed: Cell<bool>,
    /// Token subscribers by expiry (Unix seconds, subscriber id): the
    /// expiry check wakes those whose token has run out.
    expiring: RefCell<std::collections::BTreeSet<(u64, u64)>>,
    /// Where a woken subscriber gathers its frames. One per shard: a
    /// subscriber uses it only between two awaits, so no allocation per
    /// delivery and none held by idle subscribers.
    scratch: RefCell<Vec<u8>>,
}

impl Fanout {
    pub fn new(start_head: u64, ring_max: usize) -> Fanout {
        Fanout {
            ring: RefCell::new(Ring::new(ring_max)),
            last: Cell::new(start_head),
            waiting: RefCell::new(Waiters::default()),
            next_sub: Cell::new(0),
            heartbeat: Cell::new(0),
            subscribers: Cell::new(0),
            per_key: RefCell::new(HashMap::new()),
            slow_clients: Cell::new(0),
            delivered: Cell::new(0),
            closed: Cell::new(false),
            expiring: RefCell::new(std::collections::BTreeSet::new()),
            scratch: RefCell::new(Vec::new()),
        }
    }

    pub fn last(&self) -> u64 {
        self.last.get()
    }

    /// The oldest position the ring still holds (`last + 1` when empty).
    fn first(&self) -> u64 {
        self.ring.borrow().first().unwrap_or(self.last.get() + 1)
    }

    /// Add a commit's events and wake the subscribers that want one of them.
    pub fn publish(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if self.subscribers.get() == 0 {
            // Nobody to encode for: an empty ring makes a later subscriber
            // catch up from SQLite instead, so ingestion pays nothing here.
            let newest = events[events.len() - 1].position;
            if newest > self.last.get() {
                assert!(
                    events[0].position <= self.last.get() + 1,
                    "fan-out positions must be contiguous"
                );
                self.ring.borrow_mut().clear();
                self.last.set(newest);
            }
            return;
        }
        let mut ring = self.ring.borrow_mut();
        let mut waiting = self.waiting.borrow_mut();
        for e in events {
            // A commit that landed before this shard read its start head.
            if e.position <= self.last.get() {
                continue;
            }
            // Cursors skip nothing only if the ring has no holes.
            assert_eq!(
                e.position,
                self.last.get() + 1,
                "fan-out positions must be contiguous"
            );
            let mut bytes = Vec::with_capacity(128 + e.new.data.len());
            encode_frame(&mut bytes, e);
            let frame = Frame {
                position: e.position,
                event_type: e.new.event_type.as_str().into(),
                stream: e.new.stream.as_deref().map(Into::into),
                bytes: bytes.into_boxed_slice(),
            };
            waiting.publish(&frame);
            ring.push(frame);
            self.last.set(e.position);
        }
    }

    /// The tenant is gone (reload): end every subscription.
    pub fn close(&self) {
        self.closed.set(true);
        self.waiting.borrow().wake_all();
    }

    /// Wake the subscribers whose token expired by `now` (each ends its
    /// stream with `event: token_expired` when it runs).
    pub fn expire(&self, now: u64) {
        let mut expiring = self.expiring.borrow_mut();
        while let Some(&(at, id)) = expiring.first() {
            if at > now {
                break;
            }
            expiring.pop_first();
            self.waiting.borrow().wake(id);
        }
    }

    /// The heartbeat: every idle subscriber writes a comment line.
    pub fn beat(&self) {
        self.heartbeat.set(self.heartbeat.get() + 1);
        self.waiting.borrow().wake_all();
    }
}

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
    /// The token's user, when it came with a subscription token.
    pub user: Option<User>,
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
    user: Option<(&'a Shard, TenantId, &'a User)>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.fanout.waiting.borrow_mut().unregister(self.id);
        self.fanout.ring.borrow_mut().remove_reader(self.filter);
        let n = self.fanout.subscribers.get();
        debug_assert!(n > 0, "a shard's subscriber count went negative");
        self.fanout.subscribers.set(n - 1);
        if let Some((shard, tenant, user)) = self.user {
            self.fanout
                .expiring
                .borrow_mut()
                .remove(&(user.expires, self.id));
            shard.release_user(tenant, &user.sub);
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
        let user = sub.user.as_ref();
        // A token's user: a place under `sse.max_per_user` first (its
        // owning shard may be another), then the shard's own caps.
        let counted = match user {
            None => Ok(()),
            Some(u) => match shard.acquire_user(tenant.id(), &u.sub).await {
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
                if let Some(u) = user {
                    shard.release_user(tenant.id(), &u.sub);
                }
            })
        });
        let slot = match admitted {
            Ok(mut s) => {
                if let Some(u) = user {
                    s.user = Some((&*shard, tenant.id(), u));
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
            if let Some(u) = user {
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
                if user.is_some_and(|u| crate::token::now_secs() >= u.expires) {
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
            if let Err(side) = filter.within(&g.scope) {
                return Err(crate::token::outside_scope(side, &g.scope));
            }
            (
                filter.narrowed(&g.scope),
                Some(User {
                    sub: g.sub,
                    expires: g.expires,
                }),
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
    use crate::event::NewEvent;

    fn ev(position: u64, t: &str, data: &str) -> Event {
        Event {
            position,
            stream_version: None,
            new: NewEvent {
                id: format!("id-{position}"),
                event_type: t.into(),
                data: data.as_bytes().to_vec(),
                timestamp: "2026-01-01T00:00:00Z".into(),
                stream: None,
                expected_version: None,
                metadata: None,
            },
        }
    }

    #[test]
    fn frames_have_id_event_and_data_lines() {
        let mut out = Vec::new();
        encode_frame(&mut out, &ev(7, "order.placed", r#"{"a":1}"#));
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("id: 7\nevent: order.placed\ndata: {\"position\":7,"));
        assert!(s.ends_with("}\n\n"));
        assert_eq!(s.matches("\ndata: ").count(), 1);
    }

    #[test]
    fn line_breaks_in_data_become_several_data_lines() {
        let mut out = Vec::new();
        encode_frame(&mut out, &ev(1, "t\nx", "{\n  \"a\": 1\r\n}"));
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("event: t x\n"), "{s}");
        assert_eq!(s.matches("\ndata: ").count(), 3, "{s}");
        assert!(!s.contains('\r'));
        // Joined back as the spec does, the data lines are the JSON again.
        let joined: Vec<&str> = s.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let v: serde_json::Value = serde_json::from_str(&joined.join("\n")).unwrap();
        assert_eq!(v["data"]["a"], 1);
    }

    /// The WHATWG event-stream parser's line and field rules (§9.2.6):
    /// lines end at CRLF, LF or CR; `data` fields join with LF.
    fn whatwg_data(stream: &[u8]) -> Vec<String> {
        let text = String::from_utf8(stream.to_vec()).unwrap();
        let mut events = Vec::new();
        let mut data: Option<String> = None;
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
            let line = &rest[..end];
            let brk = if rest[end..].starts_with("\r\n") {
                2
            } else {
                1.min(rest.len() - end)
            };
            rest = &rest[end + brk..];
            if line.is_empty() {
                events.extend(data.take());
            } else if let Some(v) = line.strip_prefix("data") {
                let v = v.strip_prefix(':').unwrap_or("");
                let v = v.strip_prefix(' ').unwrap_or(v);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(v);
                    }
                    None => data = Some(v.to_string()),
                }
            }
        }
        events
    }

    #[test]
    fn every_kind_of_line_break_in_data_is_split() {
        for data in [
            "{\"a\":\r1}",
            "{\r\"a\":1\r}",
            "{\"a\":\r\n1\n}",
            "\r\r\n\n{\"a\":1}\r",
        ] {
            let mut out = Vec::new();
            encode_frame(&mut out, &ev(3, "t", data));
            let got = whatwg_data(&out);
            assert_eq!(
                got.len(),
                1,
                "{data:?} → {:?}",
                String::from_utf8_lossy(&out)
            );
            let v: serde_json::Value = serde_json::from_str(&got[0])
                .unwrap_or_else(|e| panic!("{data:?}: {e}: {:?}", got[0]));
            assert_eq!(v["data"]["a"], 1);
            assert_eq!(v["position"], 3);
        }
        // The oracle itself: a lone CR inside one data line would cut it.
        let cut = whatwg_data(b"data: {\"a\":\r1}\n\n");
        assert!(serde_json::from_str::<serde_json::Value>(&cut[0]).is_err());
    }

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

    #[test]
    fn the_ring_keeps_the_newest_and_stays_contiguous() {
        let f = Fanout::new(10, 16);
        assert_eq!(f.first(), 11);
        f.subscribers.set(1); // with none, nothing is encoded at all
        let evs: Vec<Event> = (8..=40).map(|p| ev(p, "t", "1")).collect();
        f.publish(&evs); // 8..=10 were before the start head: skipped
        assert_eq!(f.last(), 40);
        assert_eq!(f.first(), 25);
    }
}
