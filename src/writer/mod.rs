//! The writer: one OS thread, pinned to its own CPU, that owns the SQLite
//! connection and is the only writer of the LMDB index.
//!
//! Each wakeup it takes everything the shards have queued (up to
//! `writer.batch_events_max` events), checks it (idempotency, stream versions),
//! writes it in one SQLite transaction, commits, updates the index, and only
//! then answers: one message per shard per commit. A client's 2xx therefore
//! always follows the commit of its events (group commit).

mod protocol;
mod store;

pub use protocol::{
    AppendKind, AppendRequest, FromWriter, Outcome, PositionOutcome, Published, Reply, ToWriter,
    WriterControl,
};
pub use store::{OpenError, Retention, Store};

use crate::tenant::TenantId;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

pub struct Writer {
    stores: HashMap<TenantId, Store>,
    wakeups: u64,
    batch_events: crate::metrics::Histogram,
    commit_micros: crate::metrics::Histogram,
    rx: flume::Receiver<ToWriter>,
    control: Option<flume::Receiver<WriterControl>>,
    shards: Vec<flume::Sender<FromWriter>>,
    batch_events_max: usize,
    carry: Option<ToWriter>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub commits: u64,
    pub events: u64,
}

impl Writer {
    pub fn new(
        stores: HashMap<TenantId, Store>,
        rx: flume::Receiver<ToWriter>,
        control: flume::Receiver<WriterControl>,
        shards: Vec<flume::Sender<FromWriter>>,
        cfg: &crate::config::Config,
    ) -> Writer {
        Writer {
            stores,
            wakeups: 0,
            batch_events: Default::default(),
            commit_micros: Default::default(),
            rx,
            control: Some(control),
            shards,
            batch_events_max: cfg.writer.batch_events_max,
            carry: None,
        }
    }

    /// Run until every shard has hung up, committing everything they sent.
    pub fn run(mut self) -> WriterStats {
        let mut stats = WriterStats::default();
        while let Some(group) = self.next_group() {
            let started = Instant::now();
            let n = self.commit_group(group);
            stats.commits += 1;
            stats.events += n as u64;
            tracing::trace!(
                events = n,
                micros = started.elapsed().as_micros() as u64,
                "group commit"
            );
        }
        for (_, store) in std::mem::take(&mut self.stores) {
            tracing::info!(tenant = %store.name, head = store.head, "store closed");
            store.close();
        }
        tracing::info!(
            commits = stats.commits,
            events = stats.events,
            "writer stopped"
        );
        stats
    }

    fn on_control(&mut self, c: WriterControl) {
        match c {
            WriterControl::Metrics(reply) => {
                let mut tenants: Vec<_> = self
                    .stores
                    .iter()
                    .map(|(id, s)| crate::metrics::WriterTenant {
                        id: *id,
                        name: s.name.clone(),
                        head: s.head,
                        events_appended: s.events_appended,
                        commits: s.commits,
                        commit_failures: s.commit_failures,
                    })
                    .collect();
                tenants.sort_by_key(|t| t.id);
                let _ = reply.send(crate::metrics::WriterSnapshot {
                    wakeups: self.wakeups,
                    batch_events: self.batch_events.clone(),
                    commit_micros: self.commit_micros.clone(),
                    busy_retries: crate::storage::checkpoint::busy_retries(),
                    queued_messages: self.rx.len() as u64,
                    tenants,
                });
            }
            WriterControl::Ready(reply) => {
                let mut out: Vec<_> = self
                    .stores
                    .values()
                    .map(|s| (s.name.clone(), s.ready()))
                    .collect();
                out.sort_by(|a, b| a.0.cmp(&b.0));
                let _ = reply.send(out);
            }
            WriterControl::Add { id, store, done } => {
                tracing::info!(tenant = %store.name, head = store.head, "tenant added");
                if let Some(old) = self.stores.insert(id, *store) {
                    old.close();
                }
                let _ = done.send(());
            }
            WriterControl::Remove { id, done } => {
                if let Some(store) = self.stores.remove(&id) {
                    tracing::info!(tenant = %store.name, head = store.head, "tenant removed");
                    store.close();
                }
                let _ = done.send(());
            }
        }
    }

    /// Age-based retention on stores with nothing to commit.
    fn prune_idle_stores(&mut self) {
        for store in self.stores.values_mut() {
            if store.retention.age.is_none() {
                continue;
            }
            match store.prune_idle(crate::limits::RETAIN_AGE_SWEEP_SLICES_MAX) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(tenant = %store.name, events = n, low = store.low, "pruned by age")
                }
                Err(e) => {
                    if let Some(n) = store.failure_log.occur(std::time::Instant::now()) {
                        tracing::warn!(tenant = %store.name, error = %e.message, failures_not_logged = n, "pruning by age failed; retried at the next sweep");
                    }
                }
            }
        }
    }

    /// Block for the first message (serving tenant changes meanwhile), then
    /// take whatever else is queued without waiting, up to
    /// `batch_events_max` events. None when all shards are gone.
    fn next_group(&mut self) -> Option<Vec<ToWriter>> {
        let first = match self.carry.take() {
            Some(m) => m,
            None => loop {
                // With age-based retention, an idle writer still wakes to prune.
                let sweep = self
                    .stores
                    .values()
                    .any(|s| s.retention.age.is_some())
                    .then_some(crate::limits::RETAIN_AGE_SWEEP_INTERVAL);
                let mut select = flume::Selector::new()
                    .recv(&self.rx, |m| m.map(Next::Requests).unwrap_or(Next::Stopped));
                if let Some(control) = &self.control {
                    select = select.recv(control, |c| {
                        c.map(Next::Control).unwrap_or(Next::ControlGone)
                    });
                }
                let next = match sweep {
                    Some(every) => select.wait_timeout(every).unwrap_or(Next::Idle),
                    None => select.wait(),
                };
                match next {
                    Next::Requests(m) => break m,
                    Next::Stopped => return None,
                    Next::Control(c) => self.on_control(c),
                    // The process side hung up: requests only from now on.
                    Next::ControlGone => self.control = None,
                    Next::Idle => self.prune_idle_stores(),
                }
            },
        };
        let mut events = count_events(&first);
        let mut group = vec![first];
        while events < self.batch_events_max {
            match self.rx.try_recv() {
                Ok(m) => {
                    let n = count_events(&m);
                    if events + n > self.batch_events_max {
                        self.carry = Some(m);
                        break;
                    }
                    events += n;
                    group.push(m);
                }
                Err(_) => break,
            }
        }
        Some(group)
    }

    /// One transaction per tenant touched, then one message per shard with
    /// every answer and every tenant's committed events. Returns the number
    /// of events written.
    fn commit_group(&mut self, group: Vec<ToWriter>) -> usize {
        let mut answers: Vec<Vec<(u64, Reply)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        // Tenants in the order their first request came, requests in order.
        let mut by_tenant: Vec<(TenantId, Vec<(usize, AppendRequest)>)> = Vec::new();
        for msg in group {
            for req in msg.requests {
                match by_tenant.iter_mut().find(|(t, _)| *t == req.tenant) {
                    Some((_, reqs)) => reqs.push((msg.shard, req)),
                    None => by_tenant.push((req.tenant, vec![(msg.shard, req)])),
                }
            }
        }
        self.wakeups += 1;
        let mut published = Vec::new();
        let mut written = 0;
        for (tenant, requests) in by_tenant {
            match self.stores.get_mut(&tenant) {
                Some(store) => {
                    // One tenant's failure answers only its own requests.
                    let t0 = Instant::now();
                    let events = store.commit(requests, &mut answers);
                    self.commit_micros.observe(
                        crate::metrics::LATENCY_BUCKETS_US,
                        t0.elapsed().as_micros() as u64,
                    );
                    self.batch_events
                        .observe(crate::metrics::BATCH_BUCKETS, events.len() as u64);
                    if !events.is_empty() {
                        written += events.len();
                        published.push(Published { tenant, events });
                    }
                }
                None => {
                    for (shard, req) in requests {
                        answers[shard].push((
                            req.ticket,
                            Reply::failed(req.kind, "this tenant has been removed".into(), false),
                        ));
                    }
                }
            }
        }
        let events = Arc::new(published);
        for (shard, replies) in answers.into_iter().enumerate() {
            if !replies.is_empty() || !events.is_empty() {
                // A shard that already stopped has no one left to answer.
                let _ = self.shards[shard].send(FromWriter {
                    replies,
                    events: events.clone(),
                });
            }
        }
        written
    }
}

/// What woke the idle writer.
enum Next {
    Requests(ToWriter),
    Control(WriterControl),
    /// Nothing came within the retention sweep interval.
    Idle,
    /// Every shard hung up.
    Stopped,
    ControlGone,
}

fn count_events(m: &ToWriter) -> usize {
    m.requests.iter().map(|r| r.events.len()).sum()
}
