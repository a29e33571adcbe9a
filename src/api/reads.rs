//! The read endpoints answered as one response: `GET /position`, `GET
//! /events` pages, `GET /streams/{stream}`, consumer positions. Lookups read
//! LMDB directly; events come from SQLite on the reader pool. A token's
//! scope narrows every one of them.

use super::*;

pub(crate) fn position(tenant: &Tenant) -> Result<Response, ApiError> {
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

pub(crate) fn path_of<'a>(head: &RequestHead, req: &'a [u8]) -> &'a str {
    std::str::from_utf8(&req[head.path.clone()]).unwrap_or("")
}

/// Most events one `GET /events` returns (ebuse's limit).
pub(crate) const LOAD_EVENTS_MAX: usize = 10_000;

/// `GET /events`: a JSON array of stored events, as ebuse's `Load` decodes it.
/// `from` and `to` are inclusive positions.
pub(crate) async fn load(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
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
pub(crate) fn gzip_min(shard: &Shard, head: &RequestHead) -> Option<usize> {
    shard.cfg.server.gzip_min_bytes.filter(|_| head.accept_gzip)
}

/// A 200 JSON answer of a read, which may be gzipped: caches must key on
/// the encoding.
pub(crate) fn json_read(body: Body, gzipped: bool) -> Response {
    let r = Response::new(200, crate::http::JSON, body).header("Vary", "Accept-Encoding");
    if gzipped {
        r.header("Content-Encoding", "gzip")
    } else {
        r
    }
}

pub(crate) fn read_failed(shard: &Shard, e: String) -> ApiError {
    retry_later(
        shard,
        "storage_unavailable",
        format!("cannot read events: {e}"),
    )
}

/// `GET /streams/{stream}`: one stream's events in version order.
pub(crate) async fn stream_read(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
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
        g.check(&asked, "stream", "stream")?;
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

pub(crate) fn consumer_get(r: &Req<'_>, tenant: &Tenant) -> Result<Response, ApiError> {
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
