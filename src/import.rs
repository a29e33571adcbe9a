//! `shardcast import`: bring an ebuse installation across, events and
//! consumer positions, with their positions, types, data and timestamps.
//!
//! Two sources:
//! * **ebuse's SQLite file** (`--from-ebuse-sqlite`), read directly and
//!   read-only (`events(position, type, data, timestamp)`,
//!   `subscriptions(subscription_id, position)`);
//! * **a running server's HTTP API** (`--from-url`): `GET /position`, then
//!   `GET /events?from=&to=` a page at a time, which ebuse answers for either
//!   of its backends (Pebble included) and shardcast too (ids, streams and
//!   metadata then come along). Consumer positions cannot be listed over
//!   HTTP: each is named with `--subscription`.
//!
//! The target is the configured store (single-tenant, or `--tenant`), locked
//! as the server locks it, so an import never runs beside a server on the
//! same files. Each page is one transaction; an interrupted import resumes
//! where it stopped, after checking that what the target holds is a prefix
//! of the source (first and last event compared; positions contiguous). A
//! target holding anything else is refused untouched. At the end the LMDB
//! index is brought in step and the counts and the head are verified.

use crate::config::{DatabaseConfig, IndexConfig};
use crate::event::{Event, NewEvent};
use crate::limits::EVENT_TYPE_BYTES_MAX;
use crate::storage;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Events per page (one read, one transaction) unless `--batch` says otherwise.
pub const PAGE_EVENTS_DEFAULT: usize = 1000;
/// Largest page: bounds the memory one page holds.
pub const PAGE_EVENTS_MAX: usize = 10_000;
/// How often the progress line is redrawn on a terminal.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// How long one HTTP request to the source may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the events come from.
pub enum Source {
    EbuseSqlite(PathBuf),
    Url {
        base: String,
        api_key: Option<String>,
        subscriptions: Vec<String>,
    },
}

/// What an import did.
#[derive(Debug)]
pub struct Report {
    /// Events written by this run.
    pub imported: u64,
    /// Events the target held before (a resumed import).
    pub already: u64,
    /// The target's head afterwards (= the source's head when it started).
    pub head: u64,
    pub consumers: usize,
}

/// One event as the source has it.
#[derive(Debug, Clone)]
struct SourceEvent {
    position: u64,
    event_type: String,
    data: Vec<u8>,
    timestamp: String,
    id: Option<String>,
    stream: Option<String>,
    stream_version: Option<u64>,
    metadata: Option<Vec<u8>>,
}

trait Reader {
    /// The newest position (0: empty).
    fn head(&mut self) -> Result<u64, String>;
    /// The oldest stored position at or after `from`, if any.
    fn first_from(&mut self, from: u64) -> Result<Option<u64>, String>;
    /// The events with positions in `from..=to`, in order.
    fn page(&mut self, from: u64, to: u64) -> Result<Vec<SourceEvent>, String>;
    /// Consumer positions to carry over.
    fn consumers(&mut self) -> Result<Vec<(String, i64)>, String>;
}

// ---------------------------------------------------------------------------
// Timestamps as ebuse's drivers store them.

/// A stored ebuse timestamp in shardcast's form (RFC 3339, UTC). ebuse's
/// SQLite drivers write Go's `time.Time` as text: `2006-01-02
/// 15:04:05.999999999-07:00`, or as `time.Time.String()` gives it
/// (`2006-01-02 15:04:05.999999999 +0000 UTC`, perhaps with a monotonic
/// `m=+0.1` suffix); over HTTP it is RFC 3339. A number is Unix seconds.
pub fn normalize_timestamp(raw: &str) -> Option<String> {
    use time::format_description::well_known::Rfc3339;
    use time::OffsetDateTime;
    let raw = raw.trim();
    let utc = |t: OffsetDateTime| crate::event::format_timestamp(t.to_offset(time::UtcOffset::UTC));
    if let Ok(t) = OffsetDateTime::parse(raw, &Rfc3339) {
        return Some(utc(t));
    }
    let mut parts = raw.split_whitespace();
    let (date, clock) = (parts.next()?, parts.next()?);
    let offset = parts.next();
    let text = match offset {
        // `time.Time.String()`: `+0000` then a zone name (and maybe `m=…`).
        Some(o) if (o.starts_with('+') || o.starts_with('-')) && o.len() == 5 => {
            format!("{date}T{clock}{}:{}", &o[..3], &o[3..])
        }
        Some(_) => return None,
        // The driver's format: the offset (or Z) joined to the clock.
        None => format!("{date}T{clock}"),
    };
    OffsetDateTime::parse(&text, &Rfc3339).ok().map(utc)
}

// ---------------------------------------------------------------------------
// ebuse's SQLite file.

struct EbuseSqlite {
    conn: Connection,
}

impl EbuseSqlite {
    fn open(path: &std::path::Path) -> Result<EbuseSqlite, String> {
        if !path.exists() {
            return Err(format!("{} does not exist", path.display()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("cannot open {} read-only: {e}", path.display()))?;
        let _ = conn.busy_timeout(Duration::from_secs(5));
        let columns: Vec<String> = conn
            .prepare("PRAGMA table_info(events)")
            .and_then(|mut st| st.query_map([], |r| r.get(1))?.collect())
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for want in ["position", "type", "data", "timestamp"] {
            if !columns.iter().any(|c| c == want) {
                return Err(format!(
                    "{} is not an ebuse database: its events table has no {want} column (columns: {})",
                    path.display(),
                    columns.join(", ")
                ));
            }
        }
        Ok(EbuseSqlite { conn })
    }
}

impl Reader for EbuseSqlite {
    fn head(&mut self) -> Result<u64, String> {
        storage::head(&self.conn).map_err(|e| e.to_string())
    }

    fn first_from(&mut self, from: u64) -> Result<Option<u64>, String> {
        self.conn
            .query_row(
                "SELECT MIN(position) FROM events WHERE position >= ?1",
                [from as i64],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|p| p.map(|p| p as u64))
            .map_err(|e| e.to_string())
    }

    fn page(&mut self, from: u64, to: u64) -> Result<Vec<SourceEvent>, String> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT position, type, data, timestamp FROM events \
                 WHERE position BETWEEN ?1 AND ?2 ORDER BY position",
            )
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map([from as i64, to as i64], |r| {
                use rusqlite::types::ValueRef;
                let timestamp = match r.get_ref(3)? {
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        String::from_utf8_lossy(t).into_owned()
                    }
                    ValueRef::Integer(s) => format!("@{s}"),
                    ValueRef::Real(s) => format!("@{}", s as i64),
                    ValueRef::Null => String::new(),
                };
                let data = match r.get_ref(2)? {
                    ValueRef::Text(b) | ValueRef::Blob(b) => b.to_vec(),
                    ValueRef::Null => b"null".to_vec(),
                    other => other
                        .as_i64()
                        .map(|i| i.to_string().into_bytes())
                        .unwrap_or_default(),
                };
                Ok(SourceEvent {
                    position: r.get::<_, i64>(0)? as u64,
                    event_type: r.get(1)?,
                    data,
                    timestamp,
                    id: None,
                    stream: None,
                    stream_version: None,
                    metadata: None,
                })
            })
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }

    fn consumers(&mut self) -> Result<Vec<(String, i64)>, String> {
        let exists: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'subscriptions'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| e.to_string())?;
        if exists.is_none() {
            return Ok(Vec::new());
        }
        let mut st = self
            .conn
            .prepare("SELECT subscription_id, position FROM subscriptions ORDER BY subscription_id")
            .map_err(|e| e.to_string())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------
// A running server, over HTTP.

struct Http {
    agent: ureq::Agent,
    base: String,
    api_key: Option<String>,
    subscriptions: Vec<String>,
}

/// An event as ebuse (or shardcast) answers it.
#[derive(serde::Deserialize)]
struct WireEvent {
    position: u64,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    stream_version: Option<u64>,
    #[serde(default)]
    metadata: Option<Box<serde_json::value::RawValue>>,
}

impl Http {
    fn new(base: &str, api_key: Option<String>, subscriptions: Vec<String>) -> Http {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(HTTP_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Http {
            agent,
            base: base.trim_end_matches('/').to_string(),
            api_key,
            subscriptions,
        }
    }

    fn get(&self, path: &str) -> Result<Vec<u8>, String> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url);
        if let Some(k) = &self.api_key {
            req = req.header("X-API-Key", k);
        }
        let mut res = req.call().map_err(|e| format!("GET {url}: {e}"))?;
        let status = res.status().as_u16();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut res.body_mut().as_reader(), &mut body)
            .map_err(|e| format!("GET {url}: reading the answer: {e}"))?;
        if status != 200 {
            return Err(format!(
                "GET {url}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            ));
        }
        Ok(body)
    }

    fn position(&self, path: &str) -> Result<i64, String> {
        #[derive(serde::Deserialize)]
        struct P {
            position: i64,
        }
        let body = self.get(path)?;
        serde_json::from_slice::<P>(&body)
            .map(|p| p.position)
            .map_err(|e| format!("GET {path}: not {{\"position\": N}}: {e}"))
    }

    fn events(&self, path: &str) -> Result<Vec<SourceEvent>, String> {
        let body = self.get(path)?;
        let events: Vec<WireEvent> = serde_json::from_slice(&body)
            .map_err(|e| format!("GET {path}: not an array of events: {e}"))?;
        Ok(events
            .into_iter()
            .map(|e| SourceEvent {
                position: e.position,
                event_type: e.event_type,
                data: e
                    .data
                    .map_or_else(|| b"null".to_vec(), |d| d.get().as_bytes().to_vec()),
                timestamp: e.timestamp.unwrap_or_default(),
                id: e.id,
                stream: e.stream,
                stream_version: e.stream_version,
                metadata: e.metadata.map(|m| m.get().as_bytes().to_vec()),
            })
            .collect())
    }
}

impl Reader for Http {
    fn head(&mut self) -> Result<u64, String> {
        self.position("/position").map(|p| p.max(0) as u64)
    }

    fn first_from(&mut self, from: u64) -> Result<Option<u64>, String> {
        // ebuse has no `limit`: without `to` it answers up to 10,000 events.
        Ok(self
            .events(&format!("/events?from={from}&limit=1"))?
            .first()
            .map(|e| e.position))
    }

    fn page(&mut self, from: u64, to: u64) -> Result<Vec<SourceEvent>, String> {
        self.events(&format!("/events?from={from}&to={to}"))
    }

    fn consumers(&mut self) -> Result<Vec<(String, i64)>, String> {
        let mut out = Vec::new();
        for id in &self.subscriptions {
            let path = format!(
                "/subscriptions/{}/position",
                crate::http::query::percent_encode(id)
            );
            out.push((id.clone(), self.position(&path)?));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// The import.

/// Check one source event and make it a stored event at its position.
fn convert(e: SourceEvent, ids: &mut crate::ids::IdGen) -> Result<Event, String> {
    let at = e.position;
    if e.event_type.trim().is_empty() || e.event_type.len() > EVENT_TYPE_BYTES_MAX {
        return Err(format!(
            "event {at} has a type shardcast does not store (empty, or over {EVENT_TYPE_BYTES_MAX} bytes): {:?}",
            e.event_type.chars().take(60).collect::<String>()
        ));
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(&e.data).is_err() {
        return Err(format!("event {at}: its data is not JSON"));
    }
    let timestamp = match e.timestamp.strip_prefix('@') {
        Some(secs) => secs
            .parse::<i64>()
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .map(crate::event::format_timestamp),
        None => normalize_timestamp(&e.timestamp),
    }
    .ok_or_else(|| {
        format!(
            "event {at}: timestamp {:?} is not one ebuse writes",
            e.timestamp
        )
    })?;
    Ok(Event {
        position: at,
        stream_version: e.stream_version.filter(|_| e.stream.is_some()),
        new: NewEvent {
            id: e
                .id
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| ids.next_string()),
            event_type: e.event_type,
            data: e.data,
            timestamp,
            stream: e.stream,
            expected_version: None,
            metadata: e.metadata,
        },
    })
}

/// The target's event at `position`, as the source would have it.
fn stored_at(conn: &Connection, position: u64) -> Result<Option<Event>, String> {
    storage::events_from(conn, position, 1)
        .map(|v| v.into_iter().next().filter(|e| e.position == position))
        .map_err(|e| e.to_string())
}

fn same(a: &Event, b: &Event) -> bool {
    let json = |d: &[u8]| serde_json::from_slice::<serde_json::Value>(d).ok();
    a.position == b.position
        && a.new.event_type == b.new.event_type
        && a.new.timestamp == b.new.timestamp
        && (a.new.data == b.new.data || json(&a.new.data) == json(&b.new.data))
}

/// Progress on stderr: a redrawn line on a terminal, a line per tenth otherwise.
struct Progress<'a> {
    out: &'a mut dyn Write,
    tty: bool,
    total: u64,
    started: Instant,
    last_drawn: Instant,
    last_tenth: u64,
}

impl Progress<'_> {
    fn update(&mut self, done: u64) {
        let now = Instant::now();
        let tenth = (done * 10).checked_div(self.total).unwrap_or(10);
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let pct = (done * 100).checked_div(self.total).unwrap_or(100);
        if self.tty {
            if now.duration_since(self.last_drawn) >= PROGRESS_INTERVAL || done == self.total {
                let _ = write!(
                    self.out,
                    "\r  {done} / {} events ({pct}%), {rate:.0} events/s   ",
                    self.total
                );
                let _ = self.out.flush();
                self.last_drawn = now;
            }
        } else if tenth > self.last_tenth {
            let _ = writeln!(
                self.out,
                "  {done} / {} events ({pct}%), {rate:.0} events/s",
                self.total
            );
            self.last_tenth = tenth;
        }
    }

    fn finish(&mut self) {
        if self.tty {
            let _ = writeln!(self.out);
        }
    }
}

/// Import from `source` into the store at `database` (its index at `index`).
///
/// Long: the import's steps in order (open, check the prefix, copy pages,
/// verify, bring the index in step), each short; splitting them would scatter
/// one resumable procedure.
pub fn run(
    source: Source,
    database: &DatabaseConfig,
    index: &IndexConfig,
    page_events: usize,
    progress: &mut dyn Write,
    tty: bool,
) -> Result<Report, String> {
    let page_events = page_events.clamp(1, PAGE_EVENTS_MAX);
    let mut reader: Box<dyn Reader> = match source {
        Source::EbuseSqlite(path) => {
            if path == database.path {
                return Err("the source and the target are the same file".into());
            }
            Box::new(EbuseSqlite::open(&path)?)
        }
        Source::Url {
            base,
            api_key,
            subscriptions,
        } => Box::new(Http::new(&base, api_key, subscriptions)),
    };
    // Locked as a server locks it: never beside one on the same files.
    let _lock =
        storage::lock_database(database).map_err(|e| format!("cannot lock the target: {e}"))?;
    let mut conn = storage::open_writer(database)
        .map_err(|e| format!("cannot open the target {}: {e}", database.path.display()))?;

    let source_head = reader.head()?;
    let target_head = storage::head(&conn).map_err(|e| e.to_string())?;
    let target_low = storage::low(&conn).map_err(|e| e.to_string())?;
    let mut ids = crate::ids::IdGen::new();

    // Resume only onto a prefix of the source.
    let mut next = if target_head == 0 {
        match reader.first_from(1)? {
            Some(p) => p,
            None => source_head + 1,
        }
    } else {
        if target_head > source_head {
            return Err(format!(
                "the target holds events up to {target_head}, beyond the source's head {source_head}: it is not a copy of this source; nothing was written"
            ));
        }
        let count: i64 = conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        if count as u64 != target_head - target_low + 1 {
            return Err("the target's positions are not contiguous: it was not made by an import; nothing was written".into());
        }
        for at in [target_low, target_head] {
            let theirs = reader.page(at, at)?.into_iter().next();
            let ours = stored_at(&conn, at)?;
            let matches = match (theirs, ours) {
                (Some(t), Some(o)) => same(&convert(t, &mut ids)?, &o),
                _ => false,
            };
            if !matches {
                return Err(format!(
                    "the target's event {at} differs from the source's: the target is not a prefix of this source; nothing was written"
                ));
            }
        }
        target_head + 1
    };
    let already = if target_head == 0 {
        0
    } else {
        target_head - target_low + 1
    };

    let total = source_head.saturating_sub(next.saturating_sub(1));
    let _ = writeln!(
        progress,
        "importing {total} events ({} to {source_head}); {already} already in the target",
        next.min(source_head + 1)
    );
    let mut bar = Progress {
        out: progress,
        tty,
        total,
        started: Instant::now(),
        last_drawn: Instant::now()
            .checked_sub(PROGRESS_INTERVAL)
            .unwrap_or_else(Instant::now),
        last_tenth: 0,
    };
    let mut imported = 0u64;
    while next <= source_head {
        let to = (next + page_events as u64 - 1).min(source_head);
        let page = reader.page(next, to)?;
        if page.is_empty() {
            return Err(format!(
                "the source has no events from {next} to {to} below its head {source_head}: positions must be contiguous"
            ));
        }
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        {
            let mut stmt = tx
                .prepare_cached(storage::INSERT_EVENT)
                .map_err(|e| e.to_string())?;
            for e in page {
                // The invariant every reader relies on: positions contiguous.
                if e.position != next {
                    return Err(format!(
                        "the source skips from {} to {}: shardcast's positions are contiguous",
                        next - 1,
                        e.position
                    ));
                }
                let event = convert(e, &mut ids)?;
                storage::insert(&mut stmt, &event)
                    .map_err(|e| format!("writing event {next}: {e}"))?;
                next += 1;
                imported += 1;
            }
        }
        tx.commit().map_err(|e| format!("commit: {e}"))?;
        bar.update(imported);
    }
    bar.finish();

    // Consumer positions last: they may point at any event.
    let consumers = reader.consumers()?;
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    let mut kept = 0;
    for (id, position) in &consumers {
        if *position < 0 {
            let _ = writeln!(
                bar.out,
                "  consumer {id:?}: position {position} is negative; skipped"
            );
            continue;
        }
        storage::set_consumer(&tx, id, *position as u64).map_err(|e| e.to_string())?;
        kept += 1;
    }
    tx.commit().map_err(|e| format!("commit: {e}"))?;

    // Verify, then bring the index in step now rather than at the next start.
    let head = storage::head(&conn).map_err(|e| e.to_string())?;
    let low = storage::low(&conn).map_err(|e| e.to_string())?;
    let count: i64 = conn
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if head != source_head || (head > 0 && count as u64 != head - low + 1) {
        return Err(format!(
            "verification failed: the target ends at {head} with {count} events; the source's head was {source_head}"
        ));
    }
    let (ix, _) = crate::storage::index::Index::open_checked(index, &conn).map_err(|e| {
        format!(
            "cannot bring the index {} in step: {e}",
            index.path.display()
        )
    })?;
    let ix_head = ix.head().map_err(|e| e.to_string())?;
    if ix_head != head {
        return Err(format!(
            "the index ends at {ix_head}, the database at {head}"
        ));
    }
    Ok(Report {
        imported,
        already,
        head,
        consumers: kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_every_form_ebuse_writes() {
        for (raw, want) in [
            (
                "2025-03-04T05:06:07.123456789Z",
                "2025-03-04T05:06:07.123456789Z",
            ),
            ("2025-03-04T07:06:07+02:00", "2025-03-04T05:06:07Z"),
            // The SQLite driver's text form.
            ("2025-03-04 05:06:07.5-01:00", "2025-03-04T06:06:07.5Z"),
            ("2025-03-04 05:06:07+00:00", "2025-03-04T05:06:07Z"),
            // time.Time.String(), with and without the monotonic reading.
            (
                "2025-03-04 05:06:07.25 +0000 UTC",
                "2025-03-04T05:06:07.25Z",
            ),
            (
                "2025-03-04 06:06:07.000000001 +0100 CET m=+0.004",
                "2025-03-04T05:06:07.000000001Z",
            ),
        ] {
            assert_eq!(normalize_timestamp(raw).as_deref(), Some(want), "{raw}");
        }
        for bad in ["", "yesterday", "2025-03-04", "2025-03-04 05:06:07 UTC"] {
            assert_eq!(normalize_timestamp(bad), None, "{bad}");
        }
    }
}
