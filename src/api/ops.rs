//! The operator's endpoints: `/health` (liveness, readiness), `/metrics`
//! (Prometheus text or ebuse's JSON, summed from every shard and the writer
//! when scraped) and `/tenants`.

use super::*;

/// How long a scrape or a readiness check waits for a shard or the writer.
pub(crate) const ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ask a shard or the writer, waiting at most `ASK_TIMEOUT`.
async fn ask<T, M>(tx: &flume::Sender<M>, make: impl FnOnce(flume::Sender<T>) -> M) -> Option<T> {
    crate::shard::ask(tx, make, ASK_TIMEOUT).await
}

/// `GET /health`: liveness (this shard answers). `?mode=readiness`: the
/// writer answers, and every tenant's storage can take appends (the last
/// commit did not fail, the write lock can be taken, the index is at the
/// head, the disk has room); else 503 with the reasons.
pub(crate) async fn health(r: &Req<'_>) -> Result<Response, ApiError> {
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

pub(crate) fn not_ready(shard: &Shard, why: String) -> ApiError {
    retry_later(shard, "not_ready", format!("not ready: {why}"))
}

/// `GET /metrics`: every shard's and the writer's counters, summed now.
/// Prometheus text; ebuse's JSON with `Accept: application/json` or
/// `?format=json`. A tenant's key sees its tenant's series only.
pub(crate) async fn metrics(r: &Req<'_>, tenant: Option<&Tenant>) -> Result<Response, ApiError> {
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
        let now = crate::token::now_secs();
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
pub(crate) fn tenants(r: &Req<'_>) -> Result<Response, ApiError> {
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
