//! The write endpoints: appends (one event, a batch) and consumer positions,
//! handed to the writer through the shard's `WriterClient` and answered
//! only after their commit.

use super::*;
use crate::writer::{Failure, PositionOutcome};

pub(crate) async fn append(
    r: &Req<'_>,
    tenant: &Tenant,
    kind: AppendKind,
) -> Result<Response, ApiError> {
    let Req {
        shard, raw, head, ..
    } = *r;
    let body = &raw[head.head_len..];
    let parsed = {
        let mut stamp = shard.stamp.borrow_mut();
        match kind {
            AppendKind::One => event::parse_one(body, &mut stamp).map(|e| vec![e]),
            _ => event::parse_batch(body, shard.cfg.api.batch_events_max, &mut stamp),
        }
    };
    let events = parsed.map_err(bad_request)?;
    let outcome = committed(
        shard,
        shard.writer.submit(tenant.id(), kind, events, body.len()),
    )
    .await?;
    match outcome {
        Outcome::One { event, duplicate } => {
            let mut b = Vec::with_capacity(128 + event.new.data.len());
            encode_event(&mut b, &event, duplicate);
            json_ok(b)
        }
        Outcome::Batch {
            saved,
            duplicates,
            first_position,
            last_position,
        } => json_ok(format!(
            "{{\"saved\":{saved},\"first_position\":{first_position},\"last_position\":{last_position},\"duplicates\":{duplicates}}}"
        )),
        Outcome::Conflict {
            stream,
            expected,
            current,
        } => {
            let mut e = ApiError::new(
                409,
                "version_conflict",
                format!("stream {stream:?} is at version {current}, not the expected {expected}"),
            );
            let mut extra = String::from("\"stream\":");
            extra.push_str(&serde_json::to_string(&stream).unwrap_or_default());
            extra.push_str(&format!(
                ",\"expected_version\":{expected},\"current_version\":{current}"
            ));
            e.extra_json = Some(extra);
            Err(e)
        }
        Outcome::Failed { message, cause } => Err(write_failed(
            shard,
            cause,
            format!("events were not stored: {message}"),
        )),
    }
}

/// `POST|PUT /subscriptions/{id}/position` `{"position": N}` → 204 once stored.
pub(crate) async fn consumer_set(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
    let Req {
        shard,
        head,
        raw: req,
        ..
    } = *r;
    let body = &req[head.head_len..];
    let id = consumer_id(path_of(head, req)).unwrap_or_default();
    // `{}` stores 0, as ebuse's decoder leaves a missing field zero; other
    // fields without `position` are refused (a typo, not a reset to 0).
    let not_json = |why: String| {
        ApiError::new(
            400,
            "invalid_json",
            format!("body must be {{\"position\": N}}: {why}"),
        )
    };
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| not_json(e.to_string()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| not_json("not an object".into()))?;
    let position = match obj.get("position") {
        None if obj.is_empty() => 0,
        None => return Err(not_json("no \"position\" field".into())),
        Some(p) => p
            .as_i64()
            .ok_or_else(|| not_json(format!("position {p} is not an integer")))?,
    };
    if position < 0 {
        return Err(invalid("position", &position.to_string(), "a position ≥ 0"));
    }
    match committed(
        shard,
        shard
            .writer
            .submit_consumer(tenant.id(), id, position as u64),
    )
    .await?
    {
        PositionOutcome::Saved => Ok(Response::new(
            204,
            crate::http::JSON,
            crate::http::Body::Empty,
        )),
        PositionOutcome::Failed { message, cause } => Err(write_failed(
            shard,
            cause,
            format!("position was not stored: {message}"),
        )),
    }
}

/// A 503 the client should retry after `writer.retry_after_secs`.
/// A write was not made: 507 when storage is full (nothing to retry until
/// an operator makes room), 413 when it can never fit in one log message,
/// else 503 with a delay.
pub(crate) fn write_failed(shard: &Shard, cause: Failure, message: String) -> ApiError {
    match cause {
        Failure::Full => ApiError::new(507, "insufficient_storage", message),
        Failure::Storage => retry_later(shard, "storage_unavailable", message),
        Failure::LogUnavailable => retry_later(shard, "log_unavailable", message),
        Failure::TooLarge { limit_bytes } => ApiError::new(
            413,
            "payload_too_large",
            format!("{message} (one append may take at most {limit_bytes} bytes in cluster mode)"),
        ),
    }
}

/// Wait for a queued write to commit, or say why it was not queued.
pub(crate) async fn committed<T>(shard: &Shard, submitted: Submit<T>) -> Result<T, ApiError> {
    match submitted {
        Submit::Queued(pending) => Ok(pending.await),
        Submit::Shed => Err(retry_later(
            shard,
            "overloaded",
            "the writer's queue is full; retry after the delay given".into(),
        )),
        Submit::Stopped => Err(retry_later(
            shard,
            "shutting_down",
            "the server is shutting down".into(),
        )),
    }
}

pub(crate) fn bad_request(e: event::EventError) -> ApiError {
    ApiError::new(400, e.code, e.message)
}
