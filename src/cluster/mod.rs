//! Cluster mode: NATS JetStream is the log, and this node one deterministic
//! replica of it (docs/cluster.md).
//!
//! ```text
//!  shards ──ToWriter──▶ publish   a wakeup's requests, one JetStream message
//!                        │         per tenant (split at max_payload), with a
//!                        │         Nats-Msg-Id; retried until publish_timeout,
//!                        │         then 503 to the requests' shards
//!                     JetStream   one stream per tenant, R3, orders every
//!                        │         node's messages
//!                     consume     an ordered consumer per tenant from the last
//!                        │         applied sequence + 1; this node's own
//!                        │         requests get their tickets back
//!  writer ◀──FromLog─────┘        applies each message with the single-node
//!                                  rules, the sequence in the same commit;
//!                                  answers and fans out as ever
//! ```
//!
//! Everything here runs on one thread (`shardcast-nats`) with a tokio
//! current-thread runtime, as `async-nats` needs tokio; it talks to the
//! shards and the writer over the same flume channels as single-node mode,
//! so neither knows which mode it is in, beyond the writer's input.
//! `link` holds the connection, the streams and the health probe, `health`
//! what readiness and metrics see; the messages' bytes are
//! `writer::codec`'s (the writer decodes a message again should its store
//! fail to apply it).

mod consume;
pub mod health;
mod link;
mod publish;

pub use health::Health;

use crate::config::ClusterConfig;
use crate::tenant::TenantId;
use crate::writer::{AppendKind, FromLog, FromWriter, Reply, ToWriter};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

/// One tenant this node replicates, and how far its store applied it.
#[derive(Debug, Clone)]
pub struct Replica {
    pub tenant: TenantId,
    pub name: String,
    pub applied: u64,
}

/// The channels the cluster thread sits between.
pub struct Channels {
    /// What the shards queue for "the writer" (single-node mode's message).
    pub from_shards: flume::Receiver<ToWriter>,
    /// The log, in order, to the writer.
    pub to_writer: flume::Sender<FromLog>,
    /// Each shard's answer channel: a failed publish is answered here.
    pub shards: Vec<flume::Sender<FromWriter>>,
}

/// The running cluster thread.
pub struct Cluster {
    thread: std::thread::JoinHandle<()>,
    pub health: Arc<Health>,
}

impl Cluster {
    /// Wait for the thread: it ends once every shard has hung up and the
    /// publishes in flight are settled, closing the writer's input.
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// The JetStream stream that is `tenant`'s log.
pub fn stream_name(cfg: &ClusterConfig, tenant: &str) -> String {
    format!("{}_{tenant}", cfg.stream_prefix)
}

/// The subject `tenant`'s appends are published on.
pub fn subject(cfg: &ClusterConfig, tenant: &str) -> String {
    format!("{}.{tenant}", cfg.stream_prefix)
}

/// Start the cluster thread. It connects in the background (the node
/// serves reads meanwhile; readiness says why appends wait).
pub fn start(
    cfg: ClusterConfig,
    replicas: Vec<Replica>,
    channels: Channels,
) -> std::io::Result<Cluster> {
    let health = Arc::new(Health::default());
    let h = health.clone();
    let thread = std::thread::Builder::new()
        .name("shardcast-nats".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the cluster thread's runtime");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(cfg, replicas, channels, h));
        })?;
    Ok(Cluster { thread, health })
}

/// A request this node published, waiting for its message to come back
/// from the log (or for the publish to fail).
#[derive(Debug, Clone, Copy)]
struct Origin {
    shard: usize,
    ticket: u64,
    kind: AppendKind,
}

/// A message published by this node and not yet back from the log.
struct Published {
    /// Each request's origin, in the message's order.
    origins: Vec<Origin>,
    /// When JetStream acknowledged it, with its sequence.
    acked: Option<(tokio::time::Instant, u64)>,
}

/// What the cluster thread's tasks share (one thread: `Rc`, `RefCell`).
struct Ctx {
    cfg: ClusterConfig,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    health: Arc<Health>,
    /// Published, not yet consumed: by `Nats-Msg-Id`, the origin of each of
    /// the message's requests, in order. Taken by whichever comes first:
    /// the message from the log (answered once applied) or the publish's
    /// failure (answered 503).
    pending: RefCell<HashMap<String, Published>>,
    shards: Vec<flume::Sender<FromWriter>>,
    /// The replicated tenants by id: (name, subject).
    logs: HashMap<TenantId, (String, String)>,
    /// Message ids: `<node>.<boot>.<n>`, unique across restarts.
    boot: String,
    next_id: Cell<u64>,
}

impl Ctx {
    fn message_id(&self) -> String {
        let n = self.next_id.get();
        self.next_id.set(n + 1);
        format!("{}.{}.{n}", self.cfg.node_name, self.boot)
    }

    /// Answer requests that never reached the log.
    fn refuse(&self, origins: &[Origin], message: &str, cause: crate::writer::Failure) {
        let mut by_shard: HashMap<usize, Vec<(u64, Reply)>> = HashMap::new();
        for o in origins {
            by_shard
                .entry(o.shard)
                .or_default()
                .push((o.ticket, Reply::failed(o.kind, message.to_string(), cause)));
        }
        for (shard, replies) in by_shard {
            if let Some(tx) = self.shards.get(shard) {
                let _ = tx.send(FromWriter {
                    replies,
                    events: Arc::new(Vec::new()),
                });
            }
        }
    }
}

async fn run(cfg: ClusterConfig, replicas: Vec<Replica>, ch: Channels, health: Arc<Health>) {
    let client = link::connect(&cfg).await;
    let js = async_nats::jetstream::context::ContextBuilder::new()
        .timeout(cfg.publish_timeout)
        .max_ack_inflight(crate::limits::LOG_PUBLISHES_IN_FLIGHT_MAX)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let ctx = Rc::new(Ctx {
        logs: replicas
            .iter()
            .map(|r| (r.tenant, (r.name.clone(), subject(&cfg, &r.name))))
            .collect(),
        cfg,
        client,
        js,
        health,
        pending: RefCell::new(HashMap::new()),
        shards: ch.shards,
        boot: format!("{boot:x}.{}", std::process::id()),
        next_id: Cell::new(0),
    });
    let mut tasks = vec![tokio::task::spawn_local(unapplied(ctx.clone()))];
    tasks.push(tokio::task::spawn_local(link::probe(
        ctx.clone(),
        replicas.iter().map(|r| r.name.clone()).collect(),
    )));
    for r in replicas {
        tasks.push(tokio::task::spawn_local(consume::run(
            ctx.clone(),
            r,
            ch.to_writer.clone(),
        )));
    }
    drop(ch.to_writer);
    publish::run(ctx.clone(), ch.from_shards).await;
    // Every shard has hung up: nobody waits for the log any more.
    for t in tasks {
        t.abort();
    }
    tracing::info!("cluster thread stopped");
}

/// Requests JetStream acknowledged but this node's replica has not applied
/// within `cluster.publish_timeout` (its consumer is being made again after
/// a NATS server died, or its store is failing) are answered 503 rather
/// than left waiting: the event is in the log and will be applied here; a
/// retry with the same ids answers `duplicate` with its position.
async fn unapplied(ctx: Rc<Ctx>) {
    loop {
        tokio::time::sleep(crate::limits::LOG_UNAPPLIED_SWEEP_INTERVAL).await;
        let now = tokio::time::Instant::now();
        let late: Vec<(String, u64, Vec<Origin>)> = {
            let mut pending = ctx.pending.borrow_mut();
            let ids: Vec<String> = pending
                .iter()
                .filter(|(_, p)| {
                    p.acked
                        .is_some_and(|(at, _)| now.duration_since(at) >= ctx.cfg.publish_timeout)
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| {
                    let p = pending.remove(&id)?;
                    Some((id, p.acked.map_or(0, |(_, seq)| seq), p.origins))
                })
                .collect()
        };
        for (id, seq, origins) in late {
            tracing::warn!(message_id = %id, seq, requests = origins.len(), "JetStream took an append this node has not applied within cluster.publish_timeout; answered 503");
            ctx.refuse(
                &origins,
                &format!(
                    "JetStream took it (sequence {seq}) but this node has not applied it within \
                     cluster.publish_timeout; it will be: retrying with the same event ids answers \
                     duplicate with the positions"
                ),
                crate::writer::Failure::LogUnavailable,
            );
        }
    }
}

/// A stream's state as `shardcast check` reports it.
#[derive(Debug, Clone)]
pub struct StreamState {
    pub first: u64,
    pub last: u64,
    pub replicas: usize,
    /// Replicas current with the leader, the leader included.
    pub current: usize,
}

impl StreamState {
    /// Whether a replica that applied up to `applied` can follow the
    /// stream: Ok with how far behind it is, or Err with why not.
    pub fn verdict(&self, applied: u64) -> Result<String, String> {
        if applied > self.last {
            return Err(format!(
                "AHEAD of the stream by {}: it was recreated or purged; start this node from an empty data directory",
                applied - self.last
            ));
        }
        if self.last > applied && self.first > applied + 1 {
            return Err(format!(
                "CANNOT FOLLOW: the stream starts at {}, the replica needs {}; start from `shardcast backup` of another node",
                self.first,
                applied + 1
            ));
        }
        Ok(format!("can follow, {} behind", self.last - applied))
    }
}

/// Ask JetStream for `tenant`'s stream (for `shardcast check`): one
/// connection, on a runtime of its own, within 10 s.
pub fn stream_state(cfg: &ClusterConfig, tenant: &str) -> Result<StreamState, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let client = link::connect_once(cfg).await?;
            let js = async_nats::jetstream::new(client);
            let name = stream_name(cfg, tenant);
            let mut s = js
                .get_stream(&name)
                .await
                .map_err(|e| format!("JetStream stream {name}: {e}"))?;
            let info = s.info().await.map_err(|e| e.to_string())?;
            let current = info.cluster.as_ref().map_or(1, |c| {
                usize::from(c.leader.is_some())
                    + c.replicas
                        .iter()
                        .filter(|p| p.current && !p.offline)
                        .count()
            });
            Ok(StreamState {
                first: info.state.first_sequence,
                last: info.state.last_sequence,
                replicas: info.config.num_replicas,
                current,
            })
        })
        .await
        .map_err(|_| "NATS did not answer within 10 s".to_string())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_follows_only_a_stream_that_holds_what_it_needs() {
        let st = |first, last| StreamState {
            first,
            last,
            replicas: 3,
            current: 3,
        };
        assert_eq!(st(1, 10).verdict(10), Ok("can follow, 0 behind".into()));
        assert_eq!(st(1, 10).verdict(0), Ok("can follow, 10 behind".into()));
        assert!(st(1, 10).verdict(11).unwrap_err().contains("AHEAD"));
        // Limits removed 1..=4: an empty node cannot start, one at 4 can.
        assert!(st(5, 10).verdict(0).unwrap_err().contains("CANNOT FOLLOW"));
        assert!(st(5, 10).verdict(4).is_ok());
        // An empty stream (first = last + 1) and an empty replica agree.
        assert!(st(1, 0).verdict(0).is_ok());
    }
}
