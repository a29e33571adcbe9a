//! Routing and handlers: which endpoint a request is for, whether it may have
//! it (auth, method, size, content type: all decided before the body is
//! read), and the answer. Appends go to the writer through the shard's
//! `WriterClient` and are answered only after their commit.

use crate::event::{self, encode_event, Parser};
use crate::http::{write_response, ApiError, ContentType, Method, RequestHead, JSON};
use crate::shard::{Shard, Submit};
use crate::writer::{AppendKind, Outcome};
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Position,
    AppendOne,
    AppendBatch,
    /// `GET /events/subscribe`: handed to `sse` by `http`, never to `handle`.
    Subscribe,
}

impl Route {
    fn needs_body(self) -> bool {
        matches!(self, Route::AppendOne | Route::AppendBatch)
    }
}

fn method_not_allowed(allow: &'static str) -> ApiError {
    let mut e = ApiError::new(
        405,
        "method_not_allowed",
        format!("this endpoint allows {allow}"),
    );
    e.allow = Some(allow);
    e
}

/// Constant-time comparison: the time taken depends on the configured key's
/// length only, never on where a guess first differs.
pub fn key_matches(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = (expected.len() ^ given.len()) as u64;
    for (i, e) in expected.iter().enumerate() {
        let g = if given.is_empty() {
            0
        } else {
            given[i % given.len()]
        };
        diff |= (e ^ g) as u64;
    }
    std::hint::black_box(diff) == 0
}

/// The API key the request presents: a header, or (for `/events/subscribe`,
/// since a browser's EventSource cannot set headers) `api_key` in the query.
/// None when the server has no key configured.
pub fn presented_key(
    shard: &Shard,
    head: &RequestHead,
    query: &str,
    buf: &[u8],
) -> Option<Vec<u8>> {
    shard.cfg.auth.api_key.as_ref()?;
    match &head.api_key {
        Some(r) => Some(buf[r.clone()].to_vec()),
        None => {
            let path = &buf[head.path.clone()];
            (path == b"/events/subscribe")
                .then(|| crate::sse::query_param(query, "api_key"))
                .flatten()
                .map(String::into_bytes)
        }
    }
}

/// Whether a path is one of ours (for OPTIONS).
pub fn is_endpoint(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/position" | "/events" | "/events/batch" | "/events/subscribe"
    )
}

/// Decide the route and check everything that can be checked from the head.
pub fn resolve(
    shard: &Shard,
    head: &RequestHead,
    path: &str,
    buf: &[u8],
) -> Result<Route, ApiError> {
    let m = head.method;
    let get = |r| match m {
        Method::Get | Method::Head => Ok(r),
        _ => Err(method_not_allowed("GET, HEAD")),
    };
    let post = |r| match m {
        Method::Post => Ok(r),
        _ => Err(method_not_allowed("POST")),
    };
    let route = match path {
        "/health" => get(Route::Health)?,
        "/position" => get(Route::Position)?,
        "/events" => post(Route::AppendOne)?,
        "/events/batch" => post(Route::AppendBatch)?,
        "/events/subscribe" => match m {
            Method::Get => Route::Subscribe,
            _ => return Err(method_not_allowed("GET")),
        },
        _ => {
            return Err(ApiError::new(
                404,
                "not_found",
                format!("no endpoint at {path}"),
            ))
        }
    };
    if route != Route::Health {
        if let Some(key) = &shard.cfg.auth.api_key {
            let query = std::str::from_utf8(&buf[head.query.clone()]).unwrap_or("");
            let given = presented_key(shard, head, query, buf).unwrap_or_default();
            if !key_matches(key.as_bytes(), &given) {
                let msg = if given.is_empty() {
                    "missing API key: send X-API-Key or Authorization: Bearer"
                } else {
                    "invalid API key"
                };
                return Err(ApiError::new(401, "unauthorized", msg));
            }
        }
    }
    if route.needs_body() {
        let max = shard.cfg.server.max_body_bytes;
        match head.content_length {
            None => {
                return Err(ApiError::new(
                    411,
                    "length_required",
                    "send the body with a Content-Length header",
                )
                .closing());
            }
            Some(n) if n > max => {
                return Err(ApiError::new(
                    413,
                    "body_too_large",
                    format!("body is {n} bytes; at most {max} are accepted"),
                )
                .closing());
            }
            Some(_) => {}
        }
        if head.content_type == ContentType::Other {
            return Err(ApiError::new(
                415,
                "unsupported_media_type",
                "send Content-Type: application/json",
            ));
        }
    } else if head.chunked {
        return Err(ApiError::new(
            411,
            "length_required",
            "chunked request bodies are not accepted",
        )
        .closing());
    }
    Ok(route)
}

/// Answer one request into `out`. Returns true when the connection must close.
pub async fn handle(
    shard: &Rc<Shard>,
    route: Route,
    head: &RequestHead,
    req: &[u8],
    out: &mut Vec<u8>,
    keep_alive: bool,
) -> bool {
    let body = &req[head.head_len..];
    let is_head = head.method == Method::Head;
    let result = match route {
        Route::Health => {
            json_ok(out, br#"{"status":"healthy"}"#, keep_alive, is_head);
            Ok(())
        }
        Route::Position => position(shard, out, keep_alive, is_head),
        Route::AppendOne | Route::AppendBatch => append(shard, route, body, out, keep_alive).await,
        Route::Subscribe => Err(ApiError::new(
            500,
            "internal",
            "subscriptions are served by the SSE stage",
        )),
    };
    match result {
        Ok(()) => false,
        Err(e) => {
            e.write(out, keep_alive);
            e.close
        }
    }
}

fn json_ok(out: &mut Vec<u8>, body: &[u8], keep_alive: bool, is_head: bool) {
    if is_head {
        let start = out.len();
        write_response(out, 200, JSON, &[], body, keep_alive);
        out.truncate(start + (out.len() - start - body.len()));
    } else {
        write_response(out, 200, JSON, &[], body, keep_alive);
    }
}

fn position(
    shard: &Shard,
    out: &mut Vec<u8>,
    keep_alive: bool,
    is_head: bool,
) -> Result<(), ApiError> {
    let head = shard.index.head().map_err(|e| {
        ApiError::new(
            503,
            "index_unavailable",
            format!("cannot read the index: {e}"),
        )
    })?;
    let mut body = Vec::with_capacity(32);
    body.extend_from_slice(b"{\"position\":");
    body.extend_from_slice(itoa::Buffer::new().format(head).as_bytes());
    body.push(b'}');
    json_ok(out, &body, keep_alive, is_head);
    Ok(())
}

async fn append(
    shard: &Rc<Shard>,
    route: Route,
    body: &[u8],
    out: &mut Vec<u8>,
    keep_alive: bool,
) -> Result<(), ApiError> {
    let parser = Parser::for_len(body.len(), shard.cfg.api.simd_json_min_bytes);
    let (kind, parsed) = {
        let mut stamp = shard.stamp.borrow_mut();
        match route {
            Route::AppendOne => (
                AppendKind::One,
                event::parse_one(body, parser, &mut stamp).map(|e| vec![e]),
            ),
            _ => (
                AppendKind::Batch,
                event::parse_batch(body, parser, shard.cfg.api.batch_events_max, &mut stamp),
            ),
        }
    };
    let events = parsed.map_err(bad_request)?;
    let outcome = match shard.writer.submit(kind, events, body.len()) {
        Submit::Queued(pending) => pending.await,
        Submit::Shed => {
            let mut e = ApiError::new(
                503,
                "overloaded",
                "the writer's queue is full; retry after the delay given",
            );
            e.retry_after_secs = Some(shard.cfg.writer.retry_after_secs);
            return Err(e);
        }
        Submit::Stopped => {
            let mut e = ApiError::new(503, "shutting_down", "the server is shutting down");
            e.retry_after_secs = Some(shard.cfg.writer.retry_after_secs);
            return Err(e);
        }
    };
    match outcome {
        Outcome::One { event, duplicate } => {
            let mut b = Vec::with_capacity(128 + event.new.data.len());
            encode_event(&mut b, &event, duplicate);
            write_response(out, 200, JSON, &[], &b, keep_alive);
            Ok(())
        }
        Outcome::Batch {
            saved,
            duplicates,
            first_position,
            last_position,
        } => {
            let b = format!(
                "{{\"saved\":{saved},\"first_position\":{first_position},\"last_position\":{last_position},\"duplicates\":{duplicates}}}"
            );
            write_response(out, 200, JSON, &[], b.as_bytes(), keep_alive);
            Ok(())
        }
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
        Outcome::Failed { message } => {
            let mut e = ApiError::new(
                503,
                "storage_unavailable",
                format!("events were not stored: {message}"),
            );
            e.retry_after_secs = Some(shard.cfg.writer.retry_after_secs);
            Err(e)
        }
    }
}

fn bad_request(e: event::EventError) -> ApiError {
    ApiError::new(400, e.code, e.message)
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    #[test]
    fn keys() {
        assert!(key_matches(b"secret-key", b"secret-key"));
        assert!(!key_matches(b"secret-key", b"secret-kez"));
        assert!(!key_matches(b"secret-key", b"secret-key2"));
        assert!(!key_matches(b"secret-key", b"secret"));
        assert!(!key_matches(b"secret-key", b""));
    }
}
