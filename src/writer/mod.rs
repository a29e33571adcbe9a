//! The writer: one OS thread, pinned to its own CPU, that owns the SQLite
//! connection and is the only writer of the LMDB index.
//!
//! Each wakeup it takes everything the shards have queued (up to
//! `writer.batch_events_max` events), checks it (idempotency, stream versions),
//! writes it in one SQLite transaction, commits, updates the index, and only
//! then answers: one message per shard per commit. A client's 2xx therefore
//! always follows the commit of its events (group commit).

pub mod codec;
mod protocol;
mod store;

pub use protocol::{
    with_origins, AppendKind, AppendRequest, Failure, FromLog, FromWriter, LogEntry, Outcome,
    PositionOutcome, Published, Reply, ToWriter, WriterControl, FOREIGN,
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
    /// Where the requests come from: the shards (single node), or the
    /// cluster's log (cluster mode; the shards then publish to it instead).
    input: Input,
    control: Option<flume::Receiver<WriterControl>>,
    shards: Vec<flume::Sender<FromWriter>>,
    batch_events_max: usize,
    carry: Option<Group>,
    /// Cluster mode: a group a tenant's store failed to apply, retried
    /// every `LOG_APPLY_RETRY_INTERVAL` before anything else of the log
    /// (a replica may not skip a message; meanwhile the log waits).
    stalled: Option<Vec<FromLog>>,
    /// Cluster mode: whether a tenant's log takes appends now (readiness).
    log_health: Option<LogHealth>,
}

/// Cluster mode: what the cluster thread knows of each tenant's log, for
/// readiness and scrapes (the writer does not know the cluster otherwise).
pub trait LogStatus: Send + Sync {
    /// Whether `tenant`'s log can take appends now, or why not.
    fn ready(&self, tenant: &str) -> Result<(), String>;
    /// The last sequence of `tenant`'s stream, as last probed.
    fn stream_last(&self, tenant: &str) -> Option<u64>;
}

pub type LogHealth = Arc<dyn LogStatus>;

/// The writer's source of requests.
pub enum Input {
    Shards(flume::Receiver<ToWriter>),
    Log(flume::Receiver<FromLog>),
}

/// What one wakeup commits.
enum Group {
    Shards(Vec<ToWriter>),
    Log(Vec<FromLog>),
}

impl Group {
    fn events(&self) -> usize {
        match self {
            Group::Shards(m) => m.iter().map(count_events).sum(),
            Group::Log(m) => m
                .iter()
                .flat_map(|l| &l.entries)
                .flat_map(|e| &e.requests)
                .map(|(_, r)| r.events.len())
                .sum(),
        }
    }
}

/// One tenant's requests of a group, and the stream sequence they end at.
type TenantShare = (TenantId, Option<u64>, Vec<(usize, AppendRequest)>);

#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub commits: u64,
    pub events: u64,
}

impl Writer {
    pub fn new(
        stores: HashMap<TenantId, Store>,
        input: Input,
        control: flume::Receiver<WriterControl>,
        shards: Vec<flume::Sender<FromWriter>>,
        cfg: &crate::config::Config,
    ) -> Writer {
        Writer {
            stores,
            wakeups: 0,
            batch_events: Default::default(),
            commit_micros: Default::default(),
            input,
            control: Some(control),
            shards,
            batch_events_max: cfg.writer.batch_events_max,
            carry: None,
            stalled: None,
            log_health: None,
        }
    }

    /// Cluster mode: readiness also asks the log.
    pub fn log_health(&mut self, health: LogHealth) {
        self.log_health = Some(health);
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
                        log: s.log_applied().map(|applied| crate::metrics::LogPosition {
                            applied,
                            stream_last: self
                                .log_health
                                .as_ref()
                                .and_then(|h| h.stream_last(&s.name))
                                .unwrap_or(applied),
                        }),
                    })
                    .collect();
                tenants.sort_by_key(|t| t.id);
                let _ = reply.send(crate::metrics::WriterSnapshot {
                    wakeups: self.wakeups,
                    batch_events: self.batch_events.clone(),
                    commit_micros: self.commit_micros.clone(),
                    busy_retries: crate::storage::checkpoint::busy_retries(),
                    queued_messages: match &self.input {
                        Input::Shards(rx) => rx.len() as u64,
                        Input::Log(rx) => rx.len() as u64,
                    },
                    tenants,
                });
            }
            WriterControl::Ready(reply) => {
                let mut out: Vec<_> = self
                    .stores
                    .values()
                    .map(|s| {
                        let log = |_| match &self.log_health {
                            Some(h) => h.ready(&s.name),
                            None => Ok(()),
                        };
                        (s.name.clone(), s.ready().and_then(log))
                    })
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
    /// `batch_events_max` events. None when its input is gone.
    fn next_group(&mut self) -> Option<Group> {
        if let Some(stalled) = self.stalled.take() {
            // Serve control messages while the store recovers, then try again.
            self.wait_control(crate::limits::LOG_APPLY_RETRY_INTERVAL);
            return Some(Group::Log(stalled));
        }
        let first = match self.carry.take() {
            Some(m) => m,
            None => loop {
                // With age-based retention, an idle writer still wakes to prune.
                let sweep = self
                    .stores
                    .values()
                    .any(|s| s.retention.age.is_some())
                    .then_some(crate::limits::RETAIN_AGE_SWEEP_INTERVAL);
                let mut select = match &self.input {
                    Input::Shards(rx) => flume::Selector::new().recv(rx, |m| {
                        m.map(|m| Next::Requests(Group::Shards(vec![m])))
                            .unwrap_or(Next::Stopped)
                    }),
                    Input::Log(rx) => flume::Selector::new().recv(rx, |m| {
                        m.map(|m| Next::Requests(Group::Log(vec![m])))
                            .unwrap_or(Next::Stopped)
                    }),
                };
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
        let mut events = first.events();
        let mut group = first;
        while events < self.batch_events_max {
            let more = match &self.input {
                Input::Shards(rx) => rx.try_recv().ok().map(|m| Group::Shards(vec![m])),
                Input::Log(rx) => rx.try_recv().ok().map(|m| Group::Log(vec![m])),
            };
            let Some(more) = more else { break };
            let n = more.events();
            if events + n > self.batch_events_max {
                self.carry = Some(more);
                break;
            }
            events += n;
            match (&mut group, more) {
                (Group::Shards(g), Group::Shards(m)) => g.extend(m),
                (Group::Log(g), Group::Log(m)) => g.extend(m),
                _ => unreachable!("a writer has one input"),
            }
        }
        Some(group)
    }

    /// Serve control messages for up to `wait`.
    fn wait_control(&mut self, wait: std::time::Duration) {
        let until = Instant::now() + wait;
        while let Some(control) = &self.control {
            match control.recv_deadline(until) {
                Ok(c) => self.on_control(c),
                Err(flume::RecvTimeoutError::Timeout) => return,
                Err(flume::RecvTimeoutError::Disconnected) => self.control = None,
            }
        }
        if self.control.is_none() {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
    }

    /// One transaction per tenant touched, then one message per shard with
    /// every answer and every tenant's committed events. Returns the number
    /// of events written.
    fn commit_group(&mut self, group: Group) -> usize {
        let mut answers: Vec<Vec<(u64, Reply)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        let (shares, log) = match group {
            Group::Shards(msgs) => (by_tenant(msgs), None),
            Group::Log(msgs) => {
                // What a retry needs, should a store fail: the messages'
                // shared payloads, not copies of their events.
                let skeleton: Vec<FromLog> = msgs
                    .iter()
                    .map(|m| FromLog {
                        tenant: m.tenant,
                        entries: m.entries.iter().map(LogEntry::skeleton).collect(),
                    })
                    .collect();
                (self.log_by_tenant(msgs), Some(skeleton))
            }
        };
        self.wakeups += 1;
        let mut published = Vec::new();
        let mut written = 0;
        for (tenant, log_seq, requests) in shares {
            let Some(store) = self.stores.get_mut(&tenant) else {
                for (shard, req) in requests {
                    if let Some(a) = answers.get_mut(shard) {
                        a.push((
                            req.ticket,
                            Reply::failed(
                                req.kind,
                                "this tenant has been removed".into(),
                                Failure::Storage,
                            ),
                        ));
                    }
                }
                continue;
            };
            // One tenant's failure answers only its own requests.
            let t0 = Instant::now();
            let mut own: Vec<Vec<(u64, Reply)>> =
                (0..self.shards.len()).map(|_| Vec::new()).collect();
            let result = store.commit(requests, &mut own, log_seq);
            self.commit_micros.observe(
                crate::metrics::LATENCY_BUCKETS_US,
                t0.elapsed().as_micros() as u64,
            );
            match result {
                Err(_) if log.is_some() => {
                    // A replica may not skip a message of the log: its waiting
                    // requests stay unanswered until it applies (tenants that
                    // succeeded skip what they applied when this is retried).
                    self.stalled = log.clone();
                    continue;
                }
                Err(_) => {}
                Ok(ref events) => {
                    self.batch_events
                        .observe(crate::metrics::BATCH_BUCKETS, events.len() as u64);
                }
            }
            for (shard, a) in own.into_iter().enumerate() {
                answers[shard].extend(a);
            }
            if let Ok(events) = result {
                if !events.is_empty() {
                    written += events.len();
                    published.push(Published { tenant, events });
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

    /// The log's messages by tenant, leaving out those a store already
    /// applied (redelivered after a reconnect, or retried after a stall).
    fn log_by_tenant(&self, msgs: Vec<FromLog>) -> Vec<TenantShare> {
        let mut out: Vec<TenantShare> = Vec::new();
        for m in msgs {
            let applied = self
                .stores
                .get(&m.tenant)
                .and_then(|s| s.log_applied())
                .unwrap_or(0);
            for mut entry in m.entries {
                if entry.seq <= applied {
                    continue;
                }
                // A retried group comes as skeletons: decode them again.
                entry.rebuild(m.tenant);
                match out.iter_mut().find(|(t, _, _)| *t == m.tenant) {
                    Some((_, seq, reqs)) => {
                        // Stream order within a tenant, as the log delivered it.
                        assert!(Some(entry.seq) > *seq, "log entries out of order");
                        *seq = Some(entry.seq);
                        reqs.extend(entry.requests);
                    }
                    None => out.push((m.tenant, Some(entry.seq), entry.requests)),
                }
            }
        }
        out
    }
}

/// Requests by tenant, tenants in the order their first request came,
/// requests in order.
fn by_tenant(group: Vec<ToWriter>) -> Vec<TenantShare> {
    let mut out: Vec<TenantShare> = Vec::new();
    for msg in group {
        for req in msg.requests {
            match out.iter_mut().find(|(t, _, _)| *t == req.tenant) {
                Some((_, _, reqs)) => reqs.push((msg.shard, req)),
                None => out.push((req.tenant, None, vec![(msg.shard, req)])),
            }
        }
    }
    out
}

/// What woke the idle writer.
enum Next {
    Requests(Group),
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

#[cfg(test)]
mod tests {
    //! The writer fed by the log (cluster mode), on a real SQLite file and
    //! LMDB environment, without NATS.
    use super::*;
    use crate::event::NewEvent;
    use std::time::Duration;

    /// A replica may not skip a message: while its store cannot commit (the
    /// write lock held from outside), the message waits and its request is
    /// not answered; once the store recovers it is applied once, answered,
    /// and the next message follows it.
    #[test]
    fn a_replica_retries_a_message_its_store_failed_and_applies_it_once() {
        let (dir, cfg) = crate::config::for_tests(
            "writer-stall",
            &[("SHARDCAST_DATABASE_BUSY_TIMEOUT", "50ms")],
        );
        let (mut store, _) = Store::open("t", &cfg.database, &cfg.index, &cfg).unwrap();
        store.replicate("s_t").unwrap();
        let (log_tx, log_rx) = flume::bounded(4);
        let (control_tx, control_rx) = flume::unbounded();
        let (shard_tx, shard_rx) = flume::unbounded();
        let writer = Writer::new(
            HashMap::from([(0, store)]),
            Input::Log(log_rx),
            control_rx,
            vec![shard_tx],
            &cfg,
        );
        let entry = |seq: u64, id: &str, ticket: u64| {
            let req = AppendRequest {
                ticket: 0,
                tenant: 0,
                kind: AppendKind::One,
                events: vec![NewEvent {
                    id: id.into(),
                    event_type: "t".into(),
                    data: b"{}".to_vec(),
                    timestamp: "2026-01-01T00:00:00Z".into(),
                    stream: None,
                    expected_version: None,
                    metadata: None,
                }],
                consumer: None,
            };
            let mut payload = Vec::new();
            codec::encode(std::iter::once(&req), &mut payload);
            let origins = vec![(0, ticket)];
            LogEntry {
                seq,
                requests: with_origins(vec![req], &origins),
                payload: payload.into(),
                origins,
            }
        };
        let blocker = rusqlite::Connection::open(&cfg.database.path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let running = std::thread::spawn(move || writer.run());
        log_tx
            .send(FromLog {
                tenant: 0,
                entries: vec![entry(1, "a", 5)],
            })
            .unwrap();
        assert!(
            shard_rx.recv_timeout(Duration::from_millis(700)).is_err(),
            "no answer while the store cannot commit"
        );
        // Readiness says why meanwhile (the writer serves it while stalled).
        let (ready_tx, ready_rx) = flume::bounded(1);
        control_tx.send(WriterControl::Ready(ready_tx)).unwrap();
        let ready = ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(ready[0].1.is_err(), "{ready:?}");
        blocker.execute_batch("ROLLBACK").unwrap();
        log_tx
            .send(FromLog {
                tenant: 0,
                entries: vec![entry(2, "b", 6)],
            })
            .unwrap();
        let mut answered = Vec::new();
        let mut committed = Vec::new();
        while answered.len() < 2 {
            let m = shard_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            for (ticket, reply) in m.replies {
                match reply {
                    Reply::Append(Outcome::One { event, duplicate }) => {
                        assert!(!duplicate);
                        answered.push((ticket, event.position));
                    }
                    other => panic!("{other:?}"),
                }
            }
            for p in m.events.iter() {
                committed.extend(p.events.iter().map(|e| (e.position, e.new.id.clone())));
            }
        }
        assert_eq!(answered, vec![(5, 1), (6, 2)]);
        assert_eq!(committed, vec![(1, "a".to_string()), (2, "b".to_string())]);
        drop(log_tx);
        drop(control_tx);
        let stats = running.join().unwrap();
        assert_eq!(stats.events, 2, "each message applied once");
        let _ = std::fs::remove_dir_all(dir);
    }
}
