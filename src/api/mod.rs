//! The API: which endpoint a request is for and whether it may have it
//! (auth, method, size: all decided from the head, before any body is read;
//! `auth`), then its handler's answer as a value (`Reply`). One file per
//! group of handlers: `reads`, `writes`, `ops`, and `replay` for a range of
//! any length.

mod auth;
mod ops;
mod reads;
pub mod replay;
mod writes;

use auth::*;
pub use auth::{key_matches, presented_key, type_within};
use ops::*;
use reads::*;
use writes::*;

use crate::event::{self, encode_event};
use crate::http::query::{invalid, percent_encode, Query};
use crate::http::{ApiError, Body, Method, RequestHead, Response};
use crate::shard::{Caller, Shard, Submit, Tenant};
use crate::tenant::Access;
use crate::token::Grant;
use crate::writer::{AppendKind, Outcome};
use std::rc::Rc;

/// Which endpoint a request is for, decided from its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    /// `GET /tenants`: the admin key only.
    Tenants,
    /// `GET /metrics`: Prometheus text, or ebuse's JSON.
    Metrics,
    /// Everything else: one tenant's data.
    On(TenantRoute),
}

/// The endpoints on a tenant's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantRoute {
    Position,
    AppendOne,
    AppendBatch,
    /// `GET /events/subscribe`: handed to `sse` by `http`, never to `handle`.
    Subscribe,
    /// `GET /events?from=&to=&type=&limit=`
    Load,
    /// `GET /events/stream?from=&batch_size=&type=`, and `GET /events`
    /// with `to` and no `limit` (a whole range): written by `replay`.
    Stream,
    /// `GET /streams/{stream}?from_version=&limit=`
    StreamRead,
    /// `GET /subscriptions/{id}/position`
    ConsumerGet,
    /// `POST|PUT /subscriptions/{id}/position`
    ConsumerSet,
}

impl Route {
    /// Index of this route's label in `metrics::ENDPOINTS`.
    pub fn metric_index(self) -> usize {
        match self {
            Route::Health => 0,
            Route::On(TenantRoute::Position) => 1,
            Route::On(TenantRoute::AppendOne) => 2,
            Route::On(TenantRoute::AppendBatch) => 3,
            Route::On(TenantRoute::Subscribe) => 4,
            Route::On(TenantRoute::Load) => 5,
            Route::On(TenantRoute::Stream) => 6,
            Route::On(TenantRoute::StreamRead) => 7,
            Route::On(TenantRoute::ConsumerGet) => 8,
            Route::On(TenantRoute::ConsumerSet) => 9,
            Route::Tenants => 10,
            Route::Metrics => 11,
        }
    }

    /// What the caller's key must allow.
    fn needs(self) -> Access {
        match self {
            Route::On(TenantRoute::AppendOne | TenantRoute::AppendBatch)
            | Route::On(TenantRoute::ConsumerSet) => Access::WRITE,
            Route::Tenants => Access::ADMIN,
            Route::Metrics => Access::READ,
            _ => Access::READ,
        }
    }

    fn needs_body(self) -> bool {
        matches!(
            self,
            Route::On(TenantRoute::AppendOne | TenantRoute::AppendBatch)
                | Route::On(TenantRoute::ConsumerSet)
        )
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

/// Whether a path is one of ours (for OPTIONS).
pub fn is_endpoint(path: &str) -> bool {
    matches!(
        path,
        "/health"
            | "/tenants"
            | "/metrics"
            | "/position"
            | "/events"
            | "/events/batch"
            | "/events/stream"
            | "/events/subscribe"
    ) || consumer_id(path).is_some()
        || stream_name(path).is_some()
}

/// The stream in `/streams/{stream}`, percent-decoded.
pub fn stream_name(path: &str) -> Option<String> {
    let raw = path.strip_prefix("/streams/")?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    let name = crate::http::query::decode_query_value(&raw.replace('+', "%2B"));
    (!name.is_empty() && name.len() <= crate::limits::STREAM_NAME_BYTES_MAX).then_some(name)
}

/// Longest consumer id, in bytes (an LMDB key).
const CONSUMER_ID_BYTES_MAX: usize = 256;

/// The id in `/subscriptions/{id}/position`, percent-decoded.
pub fn consumer_id(path: &str) -> Option<String> {
    let raw = path
        .strip_prefix("/subscriptions/")?
        .strip_suffix("/position")?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    let id = crate::http::query::decode_query_value(&raw.replace('+', "%2B"));
    (!id.is_empty() && id.len() <= CONSUMER_ID_BYTES_MAX).then_some(id)
}

/// Decide the route and the caller's tenant, and check everything that can
/// be checked from the head.
/// A `GET /events` that asks for a whole range: `to` (other than ebuse's
/// -1, "no bound") and no `limit`.
fn whole_range(query: &[u8]) -> bool {
    let q = Query(std::str::from_utf8(query).unwrap_or(""));
    q.get("limit").is_none() && q.get("to").is_some_and(|t| t != "-1")
}

/// A request's route and who it is, decided once from its head.
pub struct Resolved {
    /// For metrics and the body checks.
    pub route: Route,
    pub target: Target,
}

/// What a resolved request is for: the server's own endpoints, or one
/// tenant's data (every route but these three), so a handler of a tenant's
/// route always has its tenant.
pub enum Target {
    Health,
    /// The admin key listing tenants.
    Tenants,
    /// All tenants' series (the admin key, an open server), or one tenant's.
    Metrics(Option<Rc<Tenant>>),
    Tenant(On),
}

/// A request on one tenant's data, and how it was authorized.
pub struct On {
    pub route: TenantRoute,
    pub tenant: Rc<Tenant>,
    /// When it came with a subscription token: what the token allows.
    pub grant: Option<Grant>,
    /// A subscription's API key, for `sse.max_per_key`.
    pub subscriber_key: Option<Box<[u8]>>,
}

/// What a handler answers: a response the connection loop writes, or the
/// connection handed on to an answer of its own.
pub enum Reply {
    Answer(Response),
    /// A replay of any length, a page at a time (`replay`); the connection
    /// serves further requests after it.
    Replay {
        tenant: Rc<Tenant>,
        query: String,
        grant: Option<Grant>,
    },
    /// The connection becomes a live subscription (`sse`).
    Subscribe {
        tenant: Rc<Tenant>,
        subscription: crate::shard::fanout::Subscription,
    },
}

pub fn resolve(
    shard: &Shard,
    head: &RequestHead,
    path: &str,
    buf: &[u8],
) -> Result<Resolved, ApiError> {
    let route = route_of(head, path, buf)?;
    let target = authorize(shard, head, buf, route)?;
    check_body(shard, head, route)?;
    Ok(Resolved { route, target })
}

/// The route table: which endpoint a method and path are (404, 405 else).
fn route_of(head: &RequestHead, path: &str, buf: &[u8]) -> Result<Route, ApiError> {
    let m = head.method;
    let get = |r| match m {
        Method::Get | Method::Head => Ok(r),
        _ => Err(method_not_allowed("GET, HEAD")),
    };
    let post = |r| match m {
        Method::Post => Ok(r),
        _ => Err(method_not_allowed("POST")),
    };
    Ok(match path {
        "/health" => get(Route::Health)?,
        "/tenants" => get(Route::Tenants)?,
        "/metrics" => get(Route::Metrics)?,
        "/position" => get(Route::On(TenantRoute::Position))?,
        "/events" => match m {
            Method::Post => Route::On(TenantRoute::AppendOne),
            // ebuse answers a range (`to`, no `limit`) whole, however long
            // (its client's `Load(1, 15000)`): streamed, as `/events/stream`.
            Method::Get | Method::Head if whole_range(&buf[head.query.clone()]) => {
                Route::On(TenantRoute::Stream)
            }
            Method::Get | Method::Head => Route::On(TenantRoute::Load),
            _ => return Err(method_not_allowed("GET, HEAD, POST")),
        },
        "/events/batch" => post(Route::On(TenantRoute::AppendBatch))?,
        "/events/stream" => get(Route::On(TenantRoute::Stream))?,
        "/events/subscribe" => match m {
            Method::Get => Route::On(TenantRoute::Subscribe),
            _ => return Err(method_not_allowed("GET")),
        },
        p if stream_name(p).is_some() => get(Route::On(TenantRoute::StreamRead))?,
        p if consumer_id(p).is_some() => match m {
            Method::Get | Method::Head => Route::On(TenantRoute::ConsumerGet),
            Method::Post | Method::Put => Route::On(TenantRoute::ConsumerSet),
            _ => return Err(method_not_allowed("GET, HEAD, POST, PUT")),
        },
        _ => {
            return Err(ApiError::new(
                404,
                "not_found",
                format!("no endpoint at {path}"),
            ))
        }
    })
}

/// The body rules, from the head: a length (or chunked) and a size within
/// `server.max_body_bytes` where a body is read; none where it is not.
fn check_body(shard: &Shard, head: &RequestHead, route: Route) -> Result<(), ApiError> {
    if route.needs_body() {
        let max = shard.cfg.server.max_body_bytes;
        match head.content_length {
            // Chunked: decoded as it arrives, limited to `max` decoded bytes.
            None if head.chunked => {}
            None => {
                return Err(ApiError::new(
                    411,
                    "length_required",
                    "send the body with a Content-Length header or chunked",
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
        // Any Content-Type (`curl -d` sends a form type): the body must be
        // JSON whatever it says, and is refused with 400 when it is not.
    } else if head.chunked
        || (matches!(
            route,
            Route::On(TenantRoute::Subscribe | TenantRoute::Stream)
        ) && head.content_length.unwrap_or(0) > 0)
    {
        // A chunked body where no endpoint reads one, or any body on the
        // streaming endpoints (they hand the connection on): it would be
        // left in the buffer and read as the next request. (The refusal
        // closes a chunked connection.)
        return Err(ApiError::new(
            400,
            "unexpected_body",
            "this endpoint takes no request body",
        ));
    }
    Ok(())
}

/// One request as its handler sees it.
#[derive(Clone, Copy)]
struct Req<'a> {
    shard: &'a Rc<Shard>,
    head: &'a RequestHead,
    /// The whole request: head, then body.
    raw: &'a [u8],
    /// A subscription token's grant: reads stay within its scope.
    grant: Option<&'a Grant>,
}

impl Req<'_> {
    /// The query string's parameters.
    fn query(&self) -> Query<'_> {
        Query(std::str::from_utf8(&self.raw[self.head.query.clone()]).unwrap_or(""))
    }
}

/// The answer to one request (`http` writes it, HEAD or not).
pub async fn handle(
    shard: &Rc<Shard>,
    resolved: Resolved,
    head: &RequestHead,
    raw: &[u8],
) -> Reply {
    let on = match resolved.target {
        Target::Tenant(on) => on,
        // Boxed (as the reads below): the state of their awaits (scrapes,
        // the writer's readiness) would otherwise sit in every connection's task.
        Target::Health => return answer(Box::pin(health(&req(shard, head, raw, None))).await),
        Target::Tenants => return answer(tenants(&req(shard, head, raw, None))),
        Target::Metrics(t) => {
            let r = req(shard, head, raw, None);
            return answer(Box::pin(metrics(&r, t.as_deref())).await);
        }
    };
    let On {
        route,
        tenant,
        grant,
        subscriber_key,
    } = on;
    let t = &*tenant;
    let r = &req(shard, head, raw, grant.as_ref());
    // Reads are boxed: the state of their awaits (reader jobs) would
    // otherwise sit in every connection's task whatever it is doing
    // (handler state 592 → 216 bytes). Appends and LMDB lookups, the hot
    // path, stay unboxed.
    let result = match route {
        TenantRoute::Position => position(t),
        TenantRoute::Load => Box::pin(load(r, t)).await,
        TenantRoute::StreamRead => Box::pin(stream_read(r, t)).await,
        TenantRoute::ConsumerGet => consumer_get(r, t),
        TenantRoute::ConsumerSet => consumer_set(r, t).await,
        TenantRoute::AppendOne => append(r, t, AppendKind::One).await,
        TenantRoute::AppendBatch => append(r, t, AppendKind::Batch).await,
        // The two that hand the connection on (the grant is copied: once per
        // replay or subscription, a few small allocations).
        TenantRoute::Stream => {
            return Reply::Replay {
                tenant: tenant.clone(),
                query: r.query().0.to_string(),
                grant: grant.clone(),
            }
        }
        TenantRoute::Subscribe => {
            let last_id = head
                .last_event_id
                .clone()
                .map(|range| String::from_utf8_lossy(&raw[range]).into_owned());
            let sub = crate::shard::fanout::subscription(
                r.query().0,
                last_id.as_deref(),
                subscriber_key,
                grant.clone(),
            );
            return match sub {
                Ok(subscription) => Reply::Subscribe {
                    tenant: tenant.clone(),
                    subscription,
                },
                Err(e) => Reply::Answer(e.into_response()),
            };
        }
    };
    answer(result)
}

fn answer(result: Result<Response, ApiError>) -> Reply {
    Reply::Answer(result.unwrap_or_else(ApiError::into_response))
}

fn req<'a>(
    shard: &'a Rc<Shard>,
    head: &'a RequestHead,
    raw: &'a [u8],
    grant: Option<&'a Grant>,
) -> Req<'a> {
    Req {
        shard,
        head,
        raw,
        grant,
    }
}

/// A 200 with a JSON body.
fn json_ok(body: impl Into<Vec<u8>>) -> Result<Response, ApiError> {
    Ok(Response::json(200, body.into()))
}

fn retry_later(shard: &Shard, code: &'static str, message: String) -> ApiError {
    let mut e = ApiError::new(503, code, message);
    e.retry_after_secs = Some(shard.cfg.writer.retry_after_secs);
    e
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
