//! JetStream → writer: one ordered consumer per tenant, from the sequence
//! after the last this node applied, handing the writer a batch of
//! messages at a time (what arrived together, up to
//! `LOG_BATCH_MESSAGES_MAX`). A message this node published gets its
//! requests' shards and tickets back from `pending`, so they are answered
//! once applied; another node's are `FOREIGN`.
//!
//! A consumer that fails (NATS restarted, leader moved) is made again from
//! the last sequence handed over: the writer skips what it already applied,
//! so each message is applied once. The stream must hold every message
//! after that sequence: one that starts later (limits removed the
//! beginning) or ends earlier (recreated) is reported, never skipped over.

use super::{stream_name, Ctx, Replica};
use crate::limits::{LOG_BATCH_MESSAGES_MAX, LOG_SETUP_RETRY_INTERVAL, LOG_STALL_CHECK_INTERVAL};
use crate::writer::codec;
use crate::writer::{with_origins, FromLog, LogEntry};
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures_util::{FutureExt, StreamExt};
use std::rc::Rc;

/// Follow `r`'s stream until the writer is gone.
pub(super) async fn run(ctx: Rc<Ctx>, r: Replica, to_writer: flume::Sender<FromLog>) {
    let mut delivered = r.applied;
    let mut failures = crate::log::Repeated::default();
    loop {
        match follow(&ctx, &r, &to_writer, &mut delivered).await {
            Ok(()) => return,
            Err(why) => {
                if let Some(unlogged) = failures.occur(std::time::Instant::now()) {
                    tracing::warn!(tenant = %r.name, delivered, error = %why, not_logged = unlogged, "following the JetStream stream failed; retrying");
                }
                ctx.health.tenant(&r.name, |t| {
                    t.problem = Some(why);
                    t.following = false;
                });
                tokio::time::sleep(LOG_SETUP_RETRY_INTERVAL).await;
            }
        }
    }
}

/// Ok when the writer hung up; Err with why the consumer must be made again.
async fn follow(
    ctx: &Ctx,
    r: &Replica,
    to_writer: &flume::Sender<FromLog>,
    delivered: &mut u64,
) -> Result<(), String> {
    let mut stream = super::link::stream(ctx, &r.name).await?;
    let name = stream_name(&ctx.cfg, &r.name);
    let state = stream
        .info()
        .await
        .map_err(|e| format!("JetStream stream {name}: {e}"))?
        .state
        .clone();
    // The stream must hold every message after the last one delivered.
    super::StreamState {
        first: state.first_sequence,
        last: state.last_sequence,
        replicas: ctx.cfg.replicas,
        current: ctx.cfg.replicas,
    }
    .verdict(*delivered)
    .map_err(|why| format!("JetStream stream {name}: {why}"))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: *delivered + 1,
            },
            // Pulls expire (and heartbeats come) this often: a consumer
            // lost with its NATS server is noticed and made again within
            // about this, not the client's default 30 s.
            max_expires: crate::limits::LOG_PULL_EXPIRES,
            // Messages one pull asks for: what NATS may have on its way to
            // this node at once stays near LOG_PULL_BYTES_MAX, far below
            // the server's 64 MiB per client, past which it cuts a client
            // that waits for the writer ("slow consumer").
            max_batch: pull_batch(ctx.client.server_info().max_payload),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot create a consumer on {name}: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("cannot consume {name}: {e}"))?;
    ctx.health.tenant(&r.name, |t| {
        t.problem = None;
        t.following = true;
    });
    tracing::info!(tenant = %r.name, stream = %name, from = *delivered + 1, last = state.last_sequence, "following the JetStream stream");
    loop {
        let first = match tokio::time::timeout(LOG_STALL_CHECK_INTERVAL, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(format!("consuming {name}: {e}")),
            Ok(None) => return Err(format!("the consumer of {name} ended")),
            Err(_) => {
                // Nothing came: fine if the stream has nothing more. If the
                // probe saw more, the consumer is stuck (its server cut the
                // connection, say): make it again rather than wait for the
                // client library to notice.
                let behind = stalled(ctx, &r.name, *delivered);
                if behind {
                    return Err(format!(
                        "the consumer of {name} delivered nothing for {LOG_STALL_CHECK_INTERVAL:?} while the stream holds more"
                    ));
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < LOG_BATCH_MESSAGES_MAX {
            match messages.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        let mut entries = Vec::with_capacity(batch.len());
        for m in batch {
            let seq = m
                .info()
                .map_err(|e| format!("a message of {name} without its sequence: {e}"))?
                .stream_sequence;
            if seq <= *delivered {
                continue;
            }
            if seq != *delivered + 1 {
                return Err(format!(
                    "JetStream stream {name} skipped from {delivered} to {seq}: messages were deleted from it"
                ));
            }
            let (requests, origins) = requests(ctx, r, &name, seq, &m);
            entries.push(LogEntry {
                seq,
                requests,
                payload: m.payload.clone(),
                origins,
            });
            *delivered = seq;
        }
        if entries.is_empty() {
            continue;
        }
        if to_writer
            .send_async(FromLog {
                tenant: r.tenant,
                entries,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        ctx.health.tenant(&r.name, |t| t.stalled_checks = 0);
    }
}

/// Whether the probe saw the stream hold more than was delivered (twice in
/// a row: once could be a message on its way).
fn stalled(ctx: &Ctx, tenant: &str, delivered: u64) -> bool {
    let mut behind = false;
    ctx.health.tenant(tenant, |t| {
        behind = t.stream_last > delivered && t.stalled_checks >= 1;
        t.stalled_checks = if t.stream_last > delivered {
            t.stalled_checks + 1
        } else {
            0
        };
    });
    behind
}

/// Messages per pull request for a server whose messages may be up to
/// `max_payload` bytes.
fn pull_batch(max_payload: usize) -> i64 {
    (crate::limits::LOG_PULL_BYTES_MAX / max_payload.max(1)).clamp(2, 500) as i64
}

/// Requests with the shard each is answered on (`FOREIGN`: none here).
type Requests = Vec<(usize, crate::writer::AppendRequest)>;

/// A message's requests, this node's own with their tickets, and those
/// origins. A message that does not decode is applied as no requests on
/// every node alike.
fn requests(
    ctx: &Ctx,
    r: &Replica,
    stream: &str,
    seq: u64,
    m: &async_nats::jetstream::Message,
) -> (Requests, Vec<(usize, u64)>) {
    let decoded = match codec::decode(&m.payload, r.tenant) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(stream, seq, error = %e.0, "a message of the log is not a shardcast append; skipped (on every node alike)");
            return (Vec::new(), Vec::new());
        }
    };
    let origins: Vec<(usize, u64)> = m
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .and_then(|id| ctx.pending.borrow_mut().remove(id.as_str()))
        .map(|p| p.origins.iter().map(|o| (o.shard, o.ticket)).collect())
        .unwrap_or_default();
    (with_origins(decoded, &origins), origins)
}
