//! Shards → JetStream: group publish. Each wakeup takes everything the
//! shards queued, and publishes one message per tenant (more only where
//! the server's `max_payload` splits it), each with its own `Nats-Msg-Id`.
//! A publish is retried with the same id (JetStream keeps one copy) until
//! `cluster.publish_timeout`; then its requests get 503. Success needs no
//! answer here: the message comes back through the log (`consume`) and is
//! answered once this node's replica applied it.

use super::{Ctx, Origin};
use crate::limits::{LOG_MESSAGE_OVERHEAD_BYTES, LOG_PUBLISH_RETRY_INTERVAL};
use crate::tenant::TenantId;
use crate::writer::codec;
use crate::writer::{AppendRequest, Failure, ToWriter};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use std::rc::Rc;
use tokio::time::Instant;

/// A server that has not said its `max_payload` yet is assumed to take
/// NATS's default.
const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Until every shard hangs up; then wait for the publishes in flight.
pub(super) async fn run(ctx: Rc<Ctx>, from_shards: flume::Receiver<ToWriter>) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok(first) = from_shards.recv_async().await {
        let mut msgs = vec![first];
        while let Ok(m) = from_shards.try_recv() {
            msgs.push(m);
        }
        for (tenant, requests) in by_tenant(msgs) {
            for (subject, id, payload) in messages(&ctx, tenant, requests) {
                tasks.spawn_local(publish(ctx.clone(), subject, id, payload));
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Requests by tenant, tenants in the order their first request came.
fn by_tenant(msgs: Vec<ToWriter>) -> Vec<(TenantId, Vec<(usize, AppendRequest)>)> {
    let mut out: Vec<(TenantId, Vec<(usize, AppendRequest)>)> = Vec::new();
    for m in msgs {
        for r in m.requests {
            match out.iter_mut().find(|(t, _)| *t == r.tenant) {
                Some((_, v)) => v.push((m.shard, r)),
                None => out.push((r.tenant, vec![(m.shard, r)])),
            }
        }
    }
    out
}

/// One tenant's requests as messages no larger than the server takes, each
/// registered in `pending`: (subject, message id, payload). A request that
/// alone exceeds it is answered 413; one for a tenant not replicated here,
/// 503.
fn messages(
    ctx: &Ctx,
    tenant: TenantId,
    requests: Vec<(usize, AppendRequest)>,
) -> Vec<(String, String, bytes::Bytes)> {
    let origin = |shard: usize, r: &AppendRequest| Origin {
        shard,
        ticket: r.ticket,
        kind: r.kind,
    };
    let Some((_, subject)) = ctx.logs.get(&tenant) else {
        let origins: Vec<Origin> = requests.iter().map(|(s, r)| origin(*s, r)).collect();
        ctx.refuse(
            &origins,
            "this tenant is not replicated by this node (restart it to add tenants in cluster mode)",
            Failure::Storage,
        );
        return Vec::new();
    };
    let max_payload = match ctx.client.server_info().max_payload {
        0 => DEFAULT_MAX_PAYLOAD_BYTES,
        n => n,
    };
    let limit = max_payload.saturating_sub(LOG_MESSAGE_OVERHEAD_BYTES);
    let mut out = Vec::new();
    let mut chunk: Vec<(usize, AppendRequest)> = Vec::new();
    let mut size = codec::HEADER_BYTES;
    let flush = |chunk: &mut Vec<(usize, AppendRequest)>, size: usize, out: &mut Vec<_>| {
        if chunk.is_empty() {
            return;
        }
        let mut payload = Vec::with_capacity(size);
        codec::encode(chunk.iter().map(|(_, r)| r), &mut payload);
        let id = ctx.message_id();
        let origins = chunk.drain(..).map(|(s, r)| origin(s, &r)).collect();
        ctx.pending.borrow_mut().insert(
            id.clone(),
            super::Published {
                origins,
                acked: None,
            },
        );
        out.push((subject.clone(), id, bytes::Bytes::from(payload)));
    };
    for (shard, r) in requests {
        let n = codec::encoded_len(&r);
        if codec::HEADER_BYTES + n > limit {
            ctx.refuse(
                &[origin(shard, &r)],
                &format!(
                    "this append takes {} bytes in the log, more than one JetStream message may ({limit} bytes \
                     under the server's max_payload of {max_payload})",
                    codec::HEADER_BYTES + n
                ),
                Failure::TooLarge { limit_bytes: limit },
            );
            continue;
        }
        if size + n > limit {
            flush(&mut chunk, size, &mut out);
            size = codec::HEADER_BYTES;
        }
        size += n;
        chunk.push((shard, r));
    }
    flush(&mut chunk, size, &mut out);
    out
}

/// Publish one message until JetStream acknowledges it or the time is up.
async fn publish(ctx: Rc<Ctx>, subject: String, id: String, payload: bytes::Bytes) {
    let deadline = Instant::now() + ctx.cfg.publish_timeout;
    let why = loop {
        let attempt = async {
            let ack = ctx
                .js
                .send_publish(
                    subject.clone(),
                    PublishMessage::build()
                        .payload(payload.clone())
                        .message_id(&id),
                )
                .await?;
            ack.await
        };
        let why = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(ack)) => {
                ctx.health.published();
                // Answered once applied here; `unapplied` bounds the wait.
                if let Some(p) = ctx.pending.borrow_mut().get_mut(&id) {
                    p.acked = Some((Instant::now(), ack.sequence));
                }
                return;
            }
            Ok(Err(e)) if e.kind() == PublishErrorKind::StreamNotFound => {
                "no JetStream server answered for the tenant's stream (no quorum, or the stream is not created yet)"
                    .to_string()
            }
            Ok(Err(e)) => format!("JetStream: {e}"),
            Err(_) => "JetStream did not acknowledge in time (no quorum, or NATS unreachable)"
                .to_string(),
        };
        if Instant::now() + LOG_PUBLISH_RETRY_INTERVAL >= deadline {
            break why;
        }
        tokio::time::sleep(LOG_PUBLISH_RETRY_INTERVAL).await;
    };
    ctx.health.publish_failed(why.clone());
    let origins = ctx.pending.borrow_mut().remove(&id).map(|p| p.origins);
    if let Some(origins) = origins {
        tracing::warn!(message_id = %id, requests = origins.len(), reason = %why, "append not taken by JetStream within cluster.publish_timeout; answered 503");
        ctx.refuse(
            &origins,
            &format!(
                "{why}; nothing was acknowledged within cluster.publish_timeout ({:?}). If JetStream took it late, \
                 retrying with the same event ids answers duplicate with the original positions",
                ctx.cfg.publish_timeout
            ),
            Failure::LogUnavailable,
        );
    }
}
