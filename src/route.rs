//! Routing and handlers: which endpoint a request is for, whether it may have
//! it (auth, method, size, content type: all decided before the body is
//! read), and the answer. Appends go to the writer through the shard's
//! `WriterClient` and are answered only after their commit.

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
/// None when the server has no key configured. More than one distinct key
/// (in any order, in any of those places) is 400 `ambiguous_credentials`:
/// picking one would decide the tenant by header order.
pub fn presented_key<'a>(
    shard: &Shard,
    head: &RequestHead,
    query: &str,
    buf: &'a [u8],
) -> Result<Option<std::borrow::Cow<'a, [u8]>>, ApiError> {
    use std::borrow::Cow;
    let in_query = (buf[head.path.clone()] == *b"/events/subscribe")
        .then(|| crate::http::query::query_param(query, "api_key"))
        .flatten();
    let differ = match (&head.api_key, &in_query) {
        (Some(r), Some(q)) => buf[r.clone()] != *q.as_bytes(),
        _ => false,
    };
    if head.ambiguous_credentials || differ {
        return Err(ApiError::new(
            400,
            "ambiguous_credentials",
            "the request presents more than one API key; send exactly one",
        ));
    }
    if !shard.auth_required() {
        return Ok(None);
    }
    Ok(match &head.api_key {
        // Borrowed from the request: no allocation per request.
        Some(r) => Some(Cow::Borrowed(&buf[r.clone()])),
        None => in_query.map(|k| Cow::Owned(k.into_bytes())),
    })
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

/// The routes a subscription token may use: subscribing and reading.
fn token_may(route: Route) -> bool {
    matches!(
        route,
        Route::On(TenantRoute::Subscribe | TenantRoute::Load)
            | Route::On(TenantRoute::Stream | TenantRoute::StreamRead)
    )
}

/// The subscription token a request presents, if any: `token=` in the
/// query, or a Bearer value that is a JWT and no API key. A token beside
/// an API key is 400 `ambiguous_credentials`, like two keys.
fn presented_token(
    shard: &Shard,
    head: &RequestHead,
    query: &str,
    buf: &[u8],
) -> Result<Option<String>, ApiError> {
    let in_query = if query.contains("token=") {
        crate::http::query::query_param(query, "token").filter(|t| !t.is_empty())
    } else {
        None
    };
    let header = head.api_key.as_ref().map(|r| &buf[r.clone()]);
    let bearer = header.filter(|h| shard.is_token(h));
    let key_in_query = query.contains("api_key=")
        && crate::http::query::query_param(query, "api_key").is_some_and(|k| !k.is_empty());
    let ambiguous = match (&in_query, header) {
        (Some(q), Some(h)) => q.as_bytes() != h,
        _ => false,
    } || ((in_query.is_some() || bearer.is_some())
        && (key_in_query || head.ambiguous_credentials));
    if ambiguous {
        return Err(ApiError::new(
            400,
            "ambiguous_credentials",
            "the request presents a subscription token and another credential; send exactly one",
        ));
    }
    Ok(in_query.or_else(|| bearer.map(|b| String::from_utf8_lossy(b).into_owned())))
}

pub fn resolve(
    shard: &Shard,
    head: &RequestHead,
    path: &str,
    buf: &[u8],
) -> Result<Resolved, ApiError> {
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
    };
    let mut grant = None;
    let mut subscriber_key = None;
    let query = std::str::from_utf8(&buf[head.query.clone()]).unwrap_or("");
    let token = if route == Route::Health {
        None
    } else {
        presented_token(shard, head, query, buf)?
    };
    let tenant = if route == Route::Health {
        None
    } else if let Some(token) = token {
        // Verified once here; the token itself goes no further (never logged).
        let (caller, g) = shard.token_caller(&token).map_err(|e| e.into_api())?;
        if !token_may(route) {
            return Err(ApiError::new(
                403,
                "forbidden",
                "a subscription token may only subscribe and read (GET /events/subscribe, /events, /events/stream, /streams/{stream}); this needs an API key",
            ));
        }
        grant = Some(g);
        match caller {
            Caller::Tenant(t, _) => Some(t),
            Caller::Unavailable(why) => return Err(unavailable(shard, &why)),
            Caller::Admin | Caller::Unknown => {
                return Err(ApiError::new(401, "unauthorized", "unknown tenant"))
            }
        }
    } else if route == Route::Tenants && shard.tenant_names().is_none() {
        return Err(ApiError::new(
            404,
            "not_found",
            "single-tenant mode: there are no tenants to list",
        ));
    } else {
        let given = presented_key(shard, head, query, buf)?.unwrap_or_default();
        if route == Route::On(TenantRoute::Subscribe) && !given.is_empty() {
            subscriber_key = Some(given.as_ref().into());
        }
        let forbidden = |msg: &str| ApiError::new(403, "forbidden", msg);
        match shard.caller(&given) {
            Caller::Tenant(_, _) if route == Route::Tenants => {
                // Unlike ebuse: a tenant's key never learns other tenants' names.
                return Err(forbidden("listing tenants takes the admin key"));
            }
            Caller::Tenant(t, access) => {
                if !access.allows(route.needs()) {
                    return Err(forbidden(if route.needs() == Access::WRITE {
                        "this key may only read: appends and consumer positions need a key with the write role"
                    } else {
                        "this key may only write: reading needs a key with the read role"
                    }));
                }
                Some(t)
            }
            Caller::Admin if matches!(route, Route::Tenants | Route::Metrics) => None,
            Caller::Admin => {
                return Err(forbidden(
                    "the admin key holds no tenant's events: use a tenant's key",
                ))
            }
            Caller::Unavailable(why) => return Err(unavailable(shard, &why)),
            Caller::Unknown => {
                let msg = if given.is_empty() {
                    "missing API key: send X-API-Key or Authorization: Bearer"
                } else {
                    "invalid API key"
                };
                return Err(ApiError::new(401, "unauthorized", msg));
            }
        }
    };
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
        // streaming endpoints (they answer with a stream, not through
        // `handle`): it would be left in the buffer and read as the next
        // request. (The refusal closes a chunked connection.)
        return Err(ApiError::new(
            400,
            "unexpected_body",
            "this endpoint takes no request body",
        ));
    }
    let target = match (route, tenant) {
        (Route::Health, _) => Target::Health,
        (Route::Tenants, _) => Target::Tenants,
        (Route::Metrics, t) => Target::Metrics(t),
        (Route::On(route), Some(tenant)) => Target::Tenant(On {
            route,
            tenant,
            grant,
            subscriber_key,
        }),
        // Every caller but the admin key has a tenant, and the admin key
        // was refused above on anything but /tenants and /metrics.
        (Route::On(_), None) => {
            return Err(ApiError::new(
                403,
                "forbidden",
                "the admin key holds no tenant's events: use a tenant's key",
            ))
        }
    };
    Ok(Resolved { route, target })
}

fn unavailable(shard: &Shard, why: &str) -> ApiError {
    let mut e = ApiError::new(
        503,
        "tenant_unavailable",
        format!("this tenant's storage is unavailable: {why}"),
    );
    e.retry_after_secs = Some(shard.cfg.writer.retry_after_lasting_secs());
    e
}

/// A `type` filter of a read, checked against a token's scope: 403 when
/// the scope does not cover it.
pub fn type_within(event_type: Option<&str>, grant: Option<&Grant>) -> Result<(), ApiError> {
    let (Some(g), Some(t)) = (grant, event_type) else {
        return Ok(());
    };
    let asked = crate::filter::Filter {
        types: vec![crate::filter::Pattern::Exact(t.into())],
        streams: Vec::new(),
    };
    asked
        .within(&g.scope)
        .map_err(|side| crate::token::outside_scope(side, &g.scope))
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

/// How long a scrape or a readiness check waits for a shard or the writer.
const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ask over a control channel and wait (bounded) for the answer.
async fn ask<T, M>(tx: &flume::Sender<M>, make: impl FnOnce(flume::Sender<T>) -> M) -> Option<T> {
    let (reply, answer) = flume::bounded(1);
    tx.try_send(make(reply)).ok()?;
    let timeout = glommio::timer::Timer::new(ASK_TIMEOUT);
    futures_lite::future::or(async { answer.recv_async().await.ok() }, async {
        timeout.await;
        None
    })
    .await
}

/// `GET /health`: liveness (this shard answers). `?mode=readiness`: the
/// writer answers, and every tenant's storage can take appends (the last
/// commit did not fail, the write lock can be taken, the index is at the
/// head, the disk has room); else 503 with the reasons.
async fn health(r: &Req<'_>) -> Result<Response, ApiError> {
    let Req {
        shard,
        head,
        raw: req,
        ..
    } = *r;
    let q = r.query();
    match q.get("mode").as_deref() {
        None | Some("liveness") => Ok(Response::new(
            200,
            crate::http::JSON,
            Body::Static(br#"{"status":"healthy"}"#),
        )),
        Some("readiness") => {
            let checks = ask(&shard.writer_control, crate::writer::WriterControl::Ready).await;
            let Some(checks) = checks else {
                return Err(not_ready(shard, "the writer does not answer".into()));
            };
            // Unauthenticated: tenants' names only to the admin key.
            let query = std::str::from_utf8(&req[head.query.clone()]).unwrap_or("");
            // An ambiguous key is nobody's: no names.
            let key = presented_key(shard, head, query, req)
                .ok()
                .flatten()
                .unwrap_or_default();
            // Reasons name tenants and file paths: the details go to whoever
            // may administer (the admin key; the server's key in
            // single-tenant mode; anyone on an open loopback server).
            let named = !shard.auth_required()
                || match shard.caller(&key) {
                    Caller::Admin => true,
                    Caller::Tenant(_, access) => {
                        shard.tenant_names().is_none() && access.allows(Access::ADMIN)
                    }
                    _ => false,
                };
            let unavailable = shard.tenant_unavailable();
            let failing: Vec<String> = checks
                .iter()
                .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
                .chain(
                    unavailable
                        .into_iter()
                        .map(|(n, why)| format!("{n}: {why}")),
                )
                .collect();
            if !failing.is_empty() {
                let why = if named {
                    failing.join("; ")
                } else {
                    format!(
                        "{} tenant(s) cannot take appends (an admin key sees which and why)",
                        failing.len()
                    )
                };
                return Err(not_ready(shard, why));
            }
            json_ok(serde_json::json!({"status": "ready", "tenants": checks.len()}).to_string())
        }
        Some(other) => Err(invalid("mode", other, "liveness or readiness")),
    }
}

fn not_ready(shard: &Shard, why: String) -> ApiError {
    retry_later(shard, "not_ready", format!("not ready: {why}"))
}

/// `GET /metrics`: every shard's and the writer's counters, summed now.
/// Prometheus text; ebuse's JSON with `Accept: application/json` or
/// `?format=json`. A tenant's key sees its tenant's series only.
async fn metrics(r: &Req<'_>, tenant: Option<&Tenant>) -> Result<Response, ApiError> {
    let Req { shard, head, .. } = *r;
    let q = r.query();
    // Prometheus text when the scraper asks for it; ebuse's JSON otherwise
    // (no `Accept`, `*/*`, `application/json`), as ebuse's clients expect.
    let json = match q.get("format").as_deref() {
        Some("json") => true,
        Some("prometheus") => false,
        _ => !head.accept_prometheus,
    };
    let mut shards = Vec::with_capacity(shard.peers.len());
    for peer in &shard.peers {
        // A shard that is draining does not answer: its counters are left out.
        if let Some(s) = ask(peer, crate::shard::Control::Metrics).await {
            shards.push(s);
        }
    }
    let writer = ask(&shard.writer_control, crate::writer::WriterControl::Metrics).await;
    // In single-tenant mode the one tenant's key (admin or read) sees everything.
    let only = tenant
        .filter(|_| shard.tenant_names().is_some())
        .map(|t| t.id());
    if json {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let tenants = writer
            .as_ref()
            .map(|w| w.tenants.clone())
            .unwrap_or_default();
        let per = |t: &crate::metrics::WriterTenant| {
            let sse: u64 = shards
                .iter()
                .flat_map(|s| s.tenants.iter())
                .filter(|s| s.id == t.id)
                .map(|s| s.sse_connections)
                .sum();
            serde_json::json!({
                "tenant": t.name,
                "total_events": t.head,
                "events_appended": t.events_appended,
                "sse_connections": sse,
            })
        };
        let body = match (tenant, shard.tenant_names().is_some()) {
            // ebuse: the tenant's own figures, named in multi-tenant mode.
            (Some(t), multi) => {
                let mut v = tenants
                    .iter()
                    .find(|w| w.id == t.id())
                    .map(per)
                    .unwrap_or_else(
                        || serde_json::json!({"total_events": t.index.head().unwrap_or(0)}),
                    );
                v["timestamp"] = now.into();
                if !multi {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("tenant");
                    }
                }
                v
            }
            (None, _) => serde_json::json!({
                "timestamp": now,
                "total_events": tenants.iter().map(|t| t.head).sum::<u64>(),
                "tenants": tenants.iter().map(per).collect::<Vec<_>>(),
            }),
        };
        return json_ok(body.to_string());
    }
    let process = crate::metrics::ProcessSnapshot::read(shard.started);
    let text = crate::metrics::render(&shards, writer.as_ref(), &process, only);
    Ok(Response::new(
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        Body::Bytes(text.into_bytes()),
    ))
}

/// `GET /tenants`, as ebuse answers it: `{"tenants": [...], "count": n}`.
fn tenants(r: &Req<'_>) -> Result<Response, ApiError> {
    let shard = r.shard;
    let names = shard.tenant_names().ok_or_else(|| {
        ApiError::new(
            404,
            "not_found",
            "single-tenant mode: there are no tenants to list",
        )
    })?;
    json_ok(serde_json::json!({ "count": names.len(), "tenants": names }).to_string())
}

fn position(tenant: &Tenant) -> Result<Response, ApiError> {
    let head = tenant.index.head().map_err(|e| {
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
    json_ok(body)
}

async fn append(r: &Req<'_>, tenant: &Tenant, kind: AppendKind) -> Result<Response, ApiError> {
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
        Outcome::PositionSaved => Err(ApiError::new(
            500,
            "internal",
            "a position answer to an append",
        )),
        Outcome::Failed { message, full } => Err(storage_failed(
            shard,
            full,
            format!("events were not stored: {message}"),
        )),
    }
}

fn path_of<'a>(head: &RequestHead, req: &'a [u8]) -> &'a str {
    std::str::from_utf8(&req[head.path.clone()]).unwrap_or("")
}

/// Most events one `GET /events` returns (ebuse's limit).
const LOAD_EVENTS_MAX: usize = 10_000;

/// `GET /events`: a JSON array of stored events, as ebuse's `Load` decodes it.
/// `from` and `to` are inclusive positions.
async fn load(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
    let Req { shard, head, .. } = *r;
    let q = r.query();
    // ebuse's client sends `to=-1` for "no upper bound" only by omitting it;
    // a literal -1 is accepted as the same.
    let from = q.number("from", 0)?;
    let to = match q.get("to").as_deref() {
        Some("-1") => u64::MAX,
        _ => q.number("to", u64::MAX)?,
    };
    let limit = q.count("limit", LOAD_EVENTS_MAX, LOAD_EVENTS_MAX)?;
    let event_type = q.get("type");
    type_within(event_type.as_deref(), r.grant)?;
    // Encoded (and gzipped) on the reader threads: the shard only copies it
    // out. The committed head lets a large page be read in parallel parts;
    // without it (index unreadable) the page is read in one piece.
    let committed = tenant.index.head().unwrap_or(0);
    let body = tenant
        .readers
        .page_json(
            from,
            to,
            event_type.clone(),
            limit,
            committed,
            gzip_min(shard, head),
            shard.cfg.server.gzip_level,
            r.grant.map(|g| g.scope.clone()),
        )
        .await
        .map_err(|e| read_failed(shard, e))?;
    let gzipped = body.gzipped;
    let next = body.next_from;
    let answer = json_read(Body::Read(body), gzipped);
    Ok(match next {
        // Cut by `limit` (at most 10,000) before the range's end: say where
        // the rest starts, as a header and as a `Link` a client can follow.
        Some(n) => {
            let mut link = format!("</events?from={n}");
            if to != u64::MAX {
                link.push_str(&format!("&to={to}"));
            }
            if let Some(t) = &event_type {
                link.push_str("&type=");
                link.push_str(&percent_encode(t));
            }
            link.push_str(&format!("&limit={limit}>; rel=\"next\""));
            answer
                .header("X-Next-From", n.to_string())
                .header("Link", link)
        }
        None => answer,
    })
}

/// The gzip threshold for this request: None when the client or the config
/// says no.
fn gzip_min(shard: &Shard, head: &RequestHead) -> Option<usize> {
    shard.cfg.server.gzip_min_bytes.filter(|_| head.accept_gzip)
}

/// A 200 JSON answer of a read, which may be gzipped: caches must key on
/// the encoding.
fn json_read(body: Body, gzipped: bool) -> Response {
    let r = Response::new(200, crate::http::JSON, body).header("Vary", "Accept-Encoding");
    if gzipped {
        r.header("Content-Encoding", "gzip")
    } else {
        r
    }
}

fn read_failed(shard: &Shard, e: String) -> ApiError {
    retry_later(
        shard,
        "storage_unavailable",
        format!("cannot read events: {e}"),
    )
}

/// `GET /streams/{stream}`: one stream's events in version order.
async fn stream_read(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
    let Req {
        shard,
        head,
        raw: req,
        ..
    } = *r;
    let stream = stream_name(path_of(head, req)).unwrap_or_default();
    if let Some(g) = r.grant {
        let asked = crate::filter::Filter {
            types: Vec::new(),
            streams: vec![crate::filter::Pattern::Exact(stream.as_str().into())],
        };
        asked
            .within(&g.scope)
            .map_err(|side| crate::token::outside_scope(side, &g.scope))?;
    }
    let q = r.query();
    let from_version = q.number("from_version", 1)?;
    let limit = q.count("limit", LOAD_EVENTS_MAX, LOAD_EVENTS_MAX)?;
    // Which positions: the LMDB index (no await while its read txn is open);
    // the events themselves: SQLite, on the reader pool.
    let positions = tenant
        .index
        .stream_positions(&stream, from_version, limit)
        .map_err(|e| {
            ApiError::new(
                503,
                "index_unavailable",
                format!("cannot read the index: {e}"),
            )
        })?;
    let (body, gz) = tenant
        .readers
        .at_json(
            positions,
            gzip_min(shard, head),
            shard.cfg.server.gzip_level,
            r.grant.map(|g| g.scope.clone()),
        )
        .await
        .map_err(|e| read_failed(shard, e))?;
    Ok(json_read(Body::Bytes(body), gz))
}

fn consumer_get(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
    let Req { head, raw: req, .. } = *r;
    let id = consumer_id(path_of(head, req)).unwrap_or_default();
    let p = tenant.index.consumer_position(&id).map_err(|e| {
        ApiError::new(
            503,
            "index_unavailable",
            format!("cannot read the index: {e}"),
        )
    })?;
    json_ok(format!("{{\"position\":{p}}}"))
}

/// `POST|PUT /subscriptions/{id}/position` `{"position": N}` → 204 once stored.
async fn consumer_set(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
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
        Outcome::PositionSaved => Ok(Response::new(
            204,
            crate::http::JSON,
            crate::http::Body::Empty,
        )),
        Outcome::Failed { message, full } => Err(storage_failed(
            shard,
            full,
            format!("position was not stored: {message}"),
        )),
        other => Err(ApiError::new(
            500,
            "internal",
            format!("unexpected writer answer {other:?}"),
        )),
    }
}

/// A 503 the client should retry after `writer.retry_after_secs`.
/// Storage refused a write: 507 when it is full (nothing to retry until an
/// operator makes room), else 503 with a delay.
fn storage_failed(shard: &Shard, full: bool, message: String) -> ApiError {
    if full {
        ApiError::new(507, "insufficient_storage", message)
    } else {
        retry_later(shard, "storage_unavailable", message)
    }
}

fn retry_later(shard: &Shard, code: &'static str, message: String) -> ApiError {
    let mut e = ApiError::new(503, code, message);
    e.retry_after_secs = Some(shard.cfg.writer.retry_after_secs);
    e
}

/// Wait for a queued write to commit, or say why it was not queued.
async fn committed(shard: &Shard, submitted: Submit) -> Result<Outcome, ApiError> {
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
