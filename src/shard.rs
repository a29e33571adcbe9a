//! A shard: one glommio executor pinned to one CPU, with its own listening
//! socket (SO_REUSEPORT), its own connections, and its own queue to the writer.
//! Everything here is single-threaded: `Rc`, `Cell` and `RefCell`, no locks and
//! no atomics shared with another core. The only cross-core traffic is flume
//! messages, one per batch in each direction.

pub mod admission;
pub mod fanout;
mod writer_client;

pub use writer_client::{Pending, Submit, WriterClient};

use crate::config::Config;
use crate::event::Stamp;
use crate::storage::index::Index;
use crate::storage::reader::ReaderHandle;
use crate::tenant::{Access, TenantId, TenantInfo, TenantSet, Who};
use crate::writer::{FromWriter, ToWriter};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Everything one shard's tasks share.
pub struct Shard {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub writer: WriterClient,
    pub stamp: RefCell<Stamp>,
    /// Set on SIGTERM/SIGINT: answer what is in flight, then close.
    pub draining: Cell<bool>,
    pub conns: Conns,
    /// The tenants in force and this shard's state for each.
    tenants: RefCell<ShardTenants>,
    /// Where tenants' read handles come from.
    reader_pool: ReaderHandle,
    /// This shard's request counters (summed with the others' when scraped).
    pub metrics: crate::metrics::ShardMetrics,
    /// Connection cap and rate limiter.
    pub admission: Rc<admission::Admission>,
    /// Every shard's control channel (this one's included), for scrapes.
    pub peers: Vec<flume::Sender<Control>>,
    pub writer_control: flume::Sender<crate::writer::WriterControl>,
    pub started: std::time::SystemTime,
    /// The task queue SSE subscribers run in, beside the default one that
    /// runs connections and the writer's answers (limits::SSE_TASK_SHARES).
    pub sse_tasks: glommio::TaskQueueHandle,
    /// SSE connections per token user, for the users this shard counts
    /// (`user_owner`): every shard asks the owner, so the count is exact.
    users: RefCell<HashMap<(TenantId, Box<str>), usize>>,
}

/// A tenant as one shard holds it: a handle on its index and reads, and
/// this shard's SSE ring and subscribers for it.
pub struct Tenant {
    pub info: Arc<TenantInfo>,
    pub index: Index,
    pub fanout: crate::shard::fanout::Fanout,
    /// Reads off the executor (SSE catch-up, pages, replays).
    pub readers: crate::storage::reader::Readers,
}

impl Tenant {
    pub fn id(&self) -> TenantId {
        self.info.id
    }
}

struct ShardTenants {
    set: Arc<TenantSet>,
    local: HashMap<TenantId, Rc<Tenant>>,
}

/// Who a request is, resolved on its shard.
pub enum Caller {
    Tenant(Rc<Tenant>, Access),
    /// The tenant's keys are valid but its storage could not be opened.
    Unavailable(String),
    Admin,
    Unknown,
}

/// Ask over a control channel (a shard's, the writer's) and wait at most
/// `timeout` for the answer; None when it cannot be asked or does not answer.
pub async fn ask<T, M>(
    tx: &flume::Sender<M>,
    make: impl FnOnce(flume::Sender<T>) -> M,
    timeout: std::time::Duration,
) -> Option<T> {
    let (reply, answer) = flume::bounded(1);
    tx.try_send(make(reply)).ok()?;
    let timer = glommio::timer::Timer::new(timeout);
    futures_lite::future::or(async { answer.recv_async().await.ok() }, async {
        timer.await;
        None
    })
    .await
}

/// What a shard is made of (the executor builds it on its own thread).
pub struct ShardInit {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub to_writer: flume::Sender<ToWriter>,
    pub tenants: Arc<TenantSet>,
    pub readers: ReaderHandle,
    pub peers: Vec<flume::Sender<Control>>,
    pub writer_control: flume::Sender<crate::writer::WriterControl>,
    pub started: std::time::SystemTime,
}

impl Shard {
    /// Build the shard's state, on its executor (its SSE task queue is the
    /// executor's), with these tenants installed.
    pub fn new(init: ShardInit) -> Rc<Shard> {
        let ShardInit {
            id,
            cfg,
            to_writer,
            tenants,
            readers,
            peers,
            writer_control,
            started,
        } = init;
        let shard = Rc::new(Shard {
            id,
            writer: WriterClient::new(id, to_writer, &cfg),
            admission: Rc::new(admission::Admission::new(&cfg)),
            cfg,
            stamp: RefCell::new(Stamp::new(crate::ids::IdGen::new())),
            draining: Cell::new(false),
            conns: Conns::default(),
            tenants: RefCell::new(ShardTenants {
                set: tenants.clone(),
                local: HashMap::new(),
            }),
            reader_pool: readers,
            metrics: Default::default(),
            peers,
            writer_control,
            started,
            sse_tasks: glommio::executor().create_task_queue(
                glommio::Shares::Static(crate::limits::SSE_TASK_SHARES),
                glommio::Latency::Matters(crate::limits::SSE_POLL_INTERVAL),
                "sse",
            ),
            users: RefCell::new(HashMap::new()),
        });
        shard.install(tenants);
        shard
    }

    /// The writer's message after a group commit: the committed events into
    /// the rings first (a client that reads its 200 and then subscribes from
    /// its position finds the event there), then the answers.
    pub fn committed(&self, msg: FromWriter) {
        for p in msg.events.iter() {
            let tenant = self.tenants.borrow().local.get(&p.tenant).cloned();
            if let Some(t) = tenant {
                t.fanout.publish(&p.events);
            }
        }
        for (ticket, outcome) in msg.replies {
            self.writer.answer(ticket, outcome);
        }
    }

    /// One message from the process or another shard; the drain deadline
    /// when it says to stop.
    pub fn on_control(&self, msg: Control) -> Option<Instant> {
        match msg {
            Control::Tenants(set) => self.install(set),
            Control::Metrics(reply) => {
                let _ = reply.try_send(self.snapshot());
            }
            Control::UserAcquire {
                tenant,
                sub,
                max,
                reply,
            } => {
                let _ = reply.try_send(self.count_user(tenant, &sub, max));
            }
            Control::UserRelease { tenant, sub } => self.uncount_user(tenant, &sub),
            Control::Shutdown { deadline } => return Some(deadline),
        }
        None
    }

    /// Stop taking work: close idle connections as they become idle, wait
    /// (until `deadline`) for the open ones and the writer's answers, then
    /// for the queue to the writer to be sent.
    pub async fn drain(&self, deadline: Instant) {
        self.draining.set(true);
        loop {
            self.conns.close_idle();
            if self.conns.is_empty() && self.writer.in_flight() == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    shard = self.id,
                    open = self.conns.len(),
                    in_flight = self.writer.in_flight(),
                    "shutdown deadline reached with work open"
                );
                break;
            }
            glommio::timer::sleep(crate::limits::DRAIN_CONNECTIONS_POLL).await;
        }
        // Everything queued has been sent; the writer finishes once all shards hang up.
        while !self.writer.queue_is_empty() && Instant::now() < deadline {
            glommio::timer::sleep(crate::limits::DRAIN_QUEUE_POLL).await;
        }
    }

    /// Resolve a presented API key (empty: none).
    pub fn caller(&self, key: &[u8]) -> Caller {
        let t = self.tenants.borrow();
        match t.set.who(key) {
            Who::Tenant(id, access) => match t.local.get(&id) {
                Some(tenant) => Caller::Tenant(tenant.clone(), access),
                None => Caller::Unavailable(
                    t.set
                        .get(id)
                        .and_then(|i| i.unavailable.clone())
                        .unwrap_or_else(|| "this tenant's storage is not open".into()),
                ),
            },
            Who::Admin => Caller::Admin,
            Who::Unknown => Caller::Unknown,
        }
    }

    /// Resolve a presented subscription token (verified here, once per
    /// request): its tenant, with read access only, and what it grants.
    pub fn token_caller(
        &self,
        token: &str,
    ) -> Result<(Caller, crate::token::Grant), crate::token::TokenError> {
        let t = self.tenants.borrow();
        let (id, grant) = t.set.who_token(token, crate::token::now_secs())?;
        let caller = match t.local.get(&id) {
            Some(tenant) => Caller::Tenant(tenant.clone(), Access::READ),
            None => Caller::Unavailable(
                t.set
                    .get(id)
                    .and_then(|i| i.unavailable.clone())
                    .unwrap_or_else(|| "this tenant's storage is not open".into()),
            ),
        };
        Ok((caller, grant))
    }

    /// Whether a Bearer value may be a subscription token: some tenant
    /// takes tokens, it has a JWT's shape, and it is no configured API key.
    pub fn is_token(&self, presented: &[u8]) -> bool {
        let t = self.tenants.borrow();
        t.set.accepts_tokens()
            && crate::token::looks_like_jwt(presented)
            && !t.set.is_key(presented)
    }

    /// Whether requests must present a key at all.
    pub fn auth_required(&self) -> bool {
        !self.tenants.borrow().set.open
    }

    /// Tenant names, for `GET /tenants`; None in single-tenant mode.
    pub fn tenant_names(&self) -> Option<Vec<String>> {
        let t = self.tenants.borrow();
        t.set
            .multi
            .then(|| t.set.tenants.iter().map(|i| i.name.clone()).collect())
    }

    /// Put a (new) tenant set in force: tenants kept keep their rings and
    /// subscribers; new ones start at their head; removed ones have their
    /// subscribers closed.
    fn install(&self, set: Arc<TenantSet>) {
        let mut t = self.tenants.borrow_mut();
        let mut local = HashMap::new();
        for info in &set.tenants {
            let Some(index) = &info.index else { continue };
            let tenant = match t.local.remove(&info.id) {
                Some(kept) => kept,
                None => Rc::new(Tenant {
                    info: info.clone(),
                    index: index.clone(),
                    // Events committed before this head come from SQLite;
                    // the writer's messages carry every one after it.
                    fanout: crate::shard::fanout::Fanout::new(
                        info.id,
                        index.head().unwrap_or(0),
                        self.cfg.sse.ring_events,
                    ),
                    readers: self.reader_pool.readers(info.id, info.database.clone()),
                }),
            };
            local.insert(info.id, tenant);
        }
        for (_, gone) in t.local.drain() {
            gone.fanout.close();
        }
        *t = ShardTenants { set, local };
    }

    /// This shard's counters, for a scrape.
    fn snapshot(&self) -> crate::metrics::ShardSnapshot {
        let mut tenants: Vec<_> = self
            .each_tenant()
            .iter()
            .map(|t| crate::metrics::ShardTenant {
                id: t.id(),
                sse_connections: t.fanout.subscribers.get() as u64,
                delivered: t.fanout.delivered.get(),
                slow_clients: t.fanout.slow_clients.get(),
            })
            .collect();
        tenants.sort_by_key(|t| t.id);
        crate::metrics::ShardSnapshot {
            shard: self.id,
            requests: self.metrics.snapshot(),
            open_connections: self.admission.open() as u64,
            connections_refused: self.admission.refused(),
            tracked_addresses: self
                .admission
                .limiter
                .as_ref()
                .map_or(0, |l| l.tracked() as u64),
            writer_in_flight: self.writer.in_flight() as u64,
            tenants,
        }
    }

    /// Tenants whose storage could not be opened, and why.
    pub fn tenant_unavailable(&self) -> Vec<(String, String)> {
        self.tenants
            .borrow()
            .set
            .tenants
            .iter()
            .filter_map(|t| Some((t.name.clone(), t.unavailable.clone()?)))
            .collect()
    }

    /// SSE subscribers on this shard, all tenants together (the caps count
    /// them so).
    pub fn sse_subscribers(&self) -> usize {
        self.tenants
            .borrow()
            .local
            .values()
            .map(|t| t.fanout.subscribers.get())
            .sum()
    }

    /// The shard that counts a token user's SSE connections
    /// (`sse.max_per_user`): one per user, chosen by hash, so the count is
    /// exact across shards without a shared lock.
    pub fn user_owner(&self, tenant: TenantId, sub: &str) -> usize {
        use std::hash::{Hash, Hasher};
        // Fixed keys: the same owner on every shard of the process.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (tenant, sub).hash(&mut h);
        (h.finish() % self.peers.len().max(1) as u64) as usize
    }

    /// Count one more connection for a user, if it has fewer than `max`
    /// (on the owning shard).
    pub fn count_user(&self, tenant: TenantId, sub: &str, max: usize) -> bool {
        let mut users = self.users.borrow_mut();
        let key = (tenant, Box::<str>::from(sub));
        let n = users.entry(key).or_insert(0);
        if max > 0 && *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// One connection of a user ended (on the owning shard).
    pub fn uncount_user(&self, tenant: TenantId, sub: &str) {
        let mut users = self.users.borrow_mut();
        let key = (tenant, Box::<str>::from(sub));
        if let Some(n) = users.get_mut(&key) {
            // Each release follows its own acquire: never below zero.
            debug_assert!(*n > 0, "a user's connection count went negative");
            *n = n.saturating_sub(1);
            if *n == 0 {
                users.remove(&key);
            }
        }
    }

    /// Take a place under `sse.max_per_user` for a new subscription: here
    /// when this shard owns the user, else by asking its owner (one
    /// message each way, once per connection). false: the user is full.
    pub async fn acquire_user(&self, tenant: TenantId, sub: &str) -> Result<bool, ()> {
        let max = self.cfg.sse.max_per_user;
        let owner = self.user_owner(tenant, sub);
        if owner == self.id {
            return Ok(self.count_user(tenant, sub, max));
        }
        let make = |reply| Control::UserAcquire {
            tenant,
            sub: sub.into(),
            max,
            reply,
        };
        ask(
            &self.peers[owner],
            make,
            crate::limits::USER_COUNT_ASK_TIMEOUT,
        )
        .await
        .ok_or(())
    }

    /// Give back a place taken by `acquire_user`. Sent before the
    /// connection closes, so a client that reconnects at once is counted
    /// after it (the owner reads one queue in order).
    pub fn release_user(&self, tenant: TenantId, sub: &str) {
        let owner = self.user_owner(tenant, sub);
        if owner == self.id {
            self.uncount_user(tenant, sub);
        } else {
            let _ = self.peers[owner].try_send(Control::UserRelease {
                tenant,
                sub: sub.into(),
            });
        }
    }

    /// Every tenant this shard holds (for the heartbeat).
    pub fn each_tenant(&self) -> Vec<Rc<Tenant>> {
        self.tenants.borrow().local.values().cloned().collect()
    }
}

// ---------------------------------------------------------------------------
// Connections: who is open, and who is idle (safe to close when draining).

#[derive(Default)]
pub struct Conns {
    next: Cell<u64>,
    open: RefCell<HashMap<u64, (RawFd, bool)>>,
}

impl Conns {
    pub fn register(&self, fd: RawFd) -> ConnGuard<'_> {
        let id = self.next.get();
        self.next.set(id + 1);
        self.open.borrow_mut().insert(id, (fd, false));
        ConnGuard { conns: self, id }
    }
    pub fn len(&self) -> usize {
        self.open.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Wake every idle connection's pending read with end-of-file, so it closes.
    fn close_idle(&self) {
        for (fd, idle) in self.open.borrow().values() {
            if *idle {
                // SAFETY: the fd belongs to a live connection registered here; shutdown
                // only ends its reading side, and its task closes the fd itself.
                unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
            }
        }
    }
}

pub struct ConnGuard<'a> {
    conns: &'a Conns,
    id: u64,
}

impl ConnGuard<'_> {
    pub fn set_idle(&self, idle: bool) {
        if let Some(e) = self.conns.open.borrow_mut().get_mut(&self.id) {
            e.1 = idle;
        }
    }
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.conns.open.borrow_mut().remove(&self.id);
    }
}

// ---------------------------------------------------------------------------

/// Messages from the process to a shard.
#[derive(Clone)]
pub enum Control {
    Shutdown {
        deadline: Instant,
    },
    /// A reload: these tenants and keys from now on.
    Tenants(Arc<TenantSet>),
    /// A scrape: this shard's counters.
    Metrics(flume::Sender<crate::metrics::ShardSnapshot>),
    /// Count a token user's new SSE connection on its owning shard; the
    /// answer says whether it is under `max` (`Shard::acquire_user`).
    UserAcquire {
        tenant: TenantId,
        sub: Box<str>,
        max: usize,
        reply: flume::Sender<bool>,
    },
    /// A token user's SSE connection ended.
    UserRelease {
        tenant: TenantId,
        sub: Box<str>,
    },
}
