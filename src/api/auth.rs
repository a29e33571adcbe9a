//! Who a request is, decided once from its head: the API key it presents
//! (header, or `api_key` in a subscription's query) or its subscription
//! token (`token=`, or a Bearer value with a JWT's shape), resolved to a
//! tenant and a role or a scope; and the scope's checks on a read's filters.

use super::*;

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

/// The routes a subscription token may use: subscribing and reading.
pub(crate) fn token_may(route: Route) -> bool {
    matches!(
        route,
        Route::On(TenantRoute::Subscribe | TenantRoute::Load)
            | Route::On(TenantRoute::Stream | TenantRoute::StreamRead)
    )
}

/// The subscription token a request presents, if any: `token=` in the
/// query, or a Bearer value that is a JWT and no API key. A token beside
/// an API key is 400 `ambiguous_credentials`, like two keys.
pub(crate) fn presented_token(
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
    if in_query.is_none() && bearer.is_none() {
        return Ok(None);
    }
    let key_in_query = || {
        query.contains("api_key=")
            && crate::http::query::query_param(query, "api_key").is_some_and(|k| !k.is_empty())
    };
    let ambiguous = match (&in_query, header) {
        (Some(q), Some(h)) => q.as_bytes() != h,
        _ => false,
    } || head.ambiguous_credentials
        || key_in_query();
    if ambiguous {
        return Err(ApiError::new(
            400,
            "ambiguous_credentials",
            "the request presents a subscription token and another credential; send exactly one",
        ));
    }
    Ok(in_query.or_else(|| bearer.map(|b| String::from_utf8_lossy(b).into_owned())))
}

pub(crate) fn unavailable(shard: &Shard, why: &str) -> ApiError {
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
    g.check(&asked, "type", "type")
}

/// Who the request is and whether it may have `route`: its target (the
/// server's own endpoints, or one tenant's data with how it was authorized).
pub(crate) fn authorize(
    shard: &Shard,
    head: &RequestHead,
    buf: &[u8],
    route: Route,
) -> Result<Target, ApiError> {
    if route == Route::Health {
        return Ok(Target::Health);
    }
    let query = std::str::from_utf8(&buf[head.query.clone()]).unwrap_or("");
    if let Some(token) = presented_token(shard, head, query, buf)? {
        return by_token(shard, route, &token);
    }
    if route == Route::Tenants && shard.tenant_names().is_none() {
        return Err(ApiError::new(
            404,
            "not_found",
            "single-tenant mode: there are no tenants to list",
        ));
    }
    by_key(shard, head, buf, query, route)
}

/// A subscription token: verified once, here (the token itself goes no
/// further, and is never logged); subscribing and reading only.
fn by_token(shard: &Shard, route: Route, token: &str) -> Result<Target, ApiError> {
    let (caller, grant) = shard.token_caller(token).map_err(|e| e.into_api())?;
    let route = match route {
        Route::On(r) if token_may(route) => r,
        _ => {
            return Err(ApiError::new(
                403,
                "forbidden",
                "a subscription token may only subscribe and read (GET /events/subscribe, /events, /events/stream, /streams/{stream}); this needs an API key",
            ))
        }
    };
    match caller {
        Caller::Tenant(tenant, _) => Ok(Target::Tenant(On {
            route,
            tenant,
            grant: Some(grant),
            subscriber_key: None,
        })),
        Caller::Unavailable(why) => Err(unavailable(shard, &why)),
        Caller::Admin | Caller::Unknown => {
            Err(ApiError::new(401, "unauthorized", "unknown tenant"))
        }
    }
}

/// An API key (or none, on an open server): its tenant and role.
fn by_key(
    shard: &Shard,
    head: &RequestHead,
    buf: &[u8],
    query: &str,
    route: Route,
) -> Result<Target, ApiError> {
    let given = presented_key(shard, head, query, buf)?.unwrap_or_default();
    let forbidden = |msg: &str| ApiError::new(403, "forbidden", msg);
    match (shard.caller(&given), route) {
        (Caller::Tenant(..), Route::Tenants) => {
            // Unlike ebuse: a tenant's key never learns other tenants' names.
            Err(forbidden("listing tenants takes the admin key"))
        }
        (Caller::Tenant(_, access), _) if !access.allows(route.needs()) => {
            Err(forbidden(if route.needs() == Access::WRITE {
                "this key may only read: appends and consumer positions need a key with the write role"
            } else {
                "this key may only write: reading needs a key with the read role"
            }))
        }
        (Caller::Tenant(tenant, _), Route::Metrics) => Ok(Target::Metrics(Some(tenant))),
        (Caller::Tenant(tenant, _), Route::On(r)) => Ok(Target::Tenant(On {
            route: r,
            tenant,
            grant: None,
            subscriber_key: (r == TenantRoute::Subscribe && !given.is_empty())
                .then(|| given.as_ref().into()),
        })),
        // Not reached: `authorize` answers /health before any key is read.
        (_, Route::Health) => Ok(Target::Health),
        (Caller::Admin, Route::Tenants) => Ok(Target::Tenants),
        (Caller::Admin, Route::Metrics) => Ok(Target::Metrics(None)),
        (Caller::Admin, Route::On(_)) => Err(forbidden(
            "the admin key holds no tenant's events: use a tenant's key",
        )),
        (Caller::Unavailable(why), _) => Err(unavailable(shard, &why)),
        (Caller::Unknown, _) => {
            let msg = if given.is_empty() {
                "missing API key: send X-API-Key or Authorization: Bearer"
            } else {
                "invalid API key"
            };
            Err(ApiError::new(401, "unauthorized", msg))
        }
    }
}
