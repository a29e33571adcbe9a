//! `GET /events/stream`: a replay of any number of events (millions) as one
//! chunked JSON array, with bounded memory. One page of
//! `batch_size` events is read on the reader pool, encoded, and written as
//! one chunk; the next page is read only once the client has taken the last,
//! so a slow reader slows the replay instead of filling memory.
//!
//! `GET /events` with `to` and no `limit` is served here too, ending at `to`
//! (ebuse answers such a range whole, however long).
//!
//! The replay ends at the head as it was when the request arrived, so it
//! terminates under continuous appends; a client continues with
//! `from` = the last position + 1 (or subscribes over SSE).

use crate::http::ApiError;
use crate::shard::Tenant;
use crate::token::Grant;
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;

/// Events per page unless `batch_size` says otherwise (ebuse's default).
const BATCH_EVENTS_DEFAULT: usize = 1000;
/// Largest `batch_size` (ebuse's limit): bounds one page's memory.
const BATCH_EVENTS_MAX: usize = 5000;

/// Serve one replay. Ok(true): the answer is complete and the connection may
/// serve another request; Ok(false): the answer was an error, already written.
/// With a subscription token's `grant`, only events in its scope are
/// replayed (and a `type` outside it is 403).
pub async fn serve(
    tenant: &Tenant,
    stream: &mut TcpStream,
    query: &str,
    grant: Option<&Grant>,
    keep_alive: bool,
    cors: Option<&str>,
    is_head: bool,
) -> std::io::Result<bool> {
    let params = parse(query).and_then(|p| {
        crate::api::type_within(p.event_type.as_deref(), grant)?;
        Ok(p)
    });
    let scope = grant.map(|g| g.scope.clone());
    let params = match params {
        Ok(p) => p,
        Err(e) => {
            let mut out = Vec::new();
            e.write(&mut out, keep_alive, cors);
            stream.write_all(&out).await?;
            return Ok(true);
        }
    };
    let head = tenant.index.head().unwrap_or(0).min(params.to);
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        b"HTTP/1.1 200 OK\r\nServer: shardcast\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
    );
    if let Some(c) = cors {
        out.extend_from_slice(c.as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if is_head {
        stream.write_all(&out).await?;
        return Ok(true);
    }
    // What goes before the next page: `[` first, then `,`.
    let mut body = Vec::with_capacity(8);
    body.push(b'[');
    let mut from = params.from;
    let mut first = true;
    loop {
        if from > head {
            break;
        }
        let crate::storage::Page {
            json: page,
            count,
            scanned,
            ..
        } = match tenant
            .readers
            .range_json(
                from,
                head,
                params.event_type.clone(),
                params.batch,
                scope.clone(),
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                // The status line is gone: end the body unfinished, so the
                // client sees a truncated array rather than a short one.
                tracing::warn!(tenant = %tenant.info.name, error = %e, "replay read failed; closing");
                return Ok(false);
            }
        };
        // Through `scanned`: a scoped page may skip rows after its last event.
        let Some(last) = scanned else {
            break;
        };
        from = last + 1;
        if count == 0 {
            continue;
        }
        // The page arrives as `[e,…]`, encoded on the reader thread: it joins
        // the replay's one array without its brackets.
        let inner = &page[1..page.len() - 1];
        if !first {
            body.push(b',');
        }
        first = false;
        out.extend_from_slice(format!("{:x}\r\n", body.len() + inner.len()).as_bytes());
        out.extend_from_slice(&body);
        stream.write_all(&out).await?;
        out.clear();
        body.clear();
        stream.write_all(inner).await?;
        stream.write_all(b"\r\n").await?;
        drop(page);
    }
    body.push(b']');
    chunk(&mut out, &body);
    out.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&out).await?;
    Ok(true)
}

fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

struct Params {
    from: u64,
    /// The last position wanted (`GET /events?from=&to=`); the head otherwise.
    to: u64,
    batch: usize,
    event_type: Option<String>,
}

fn parse(query: &str) -> Result<Params, ApiError> {
    let q = crate::http::query::Query(query);
    Ok(Params {
        from: q.number("from", 0)?,
        to: match q.get("to").as_deref() {
            Some("-1") => u64::MAX,
            _ => q.number("to", u64::MAX)?,
        },
        batch: q.count("batch_size", BATCH_EVENTS_DEFAULT, BATCH_EVENTS_MAX)?,
        event_type: q.get("type"),
    })
}
