//! SQLite, the source of truth. The events table is append-only by
//! `position INTEGER PRIMARY KEY` (the rowid): no index on random keys sits on
//! the write path, so an append is one B-tree append. Ids, stream versions and
//! other lookups by key live in the LMDB index (`index.rs`), which can always
//! be rebuilt from this table.
//!
//! Only the writer thread opens this read-write.

pub mod checkpoint;
pub mod index;
pub mod reader;

use crate::config::DatabaseConfig;
use crate::event::{Event, NewEvent};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// Bumped when the table layout changes; stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// `PRAGMA application_id` of every shardcast database ("SHCS"): what tells
/// our file from another program's before anything is written to it.
pub const APPLICATION_ID: i32 = 0x5348_4353;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY,  -- assigned by the writer, contiguous from 1
    id             TEXT    NOT NULL,     -- idempotency key; looked up through LMDB, not here
    type           TEXT    NOT NULL,
    data           BLOB    NOT NULL,     -- the client's JSON, byte for byte
    timestamp      TEXT    NOT NULL,     -- RFC 3339, UTC
    stream         TEXT,
    stream_version INTEGER,
    metadata       BLOB
);
-- One stream in version order is served from the LMDB index: an index here
-- on (stream, stream_version) cost 41% of batch ingestion of stream events.
DROP INDEX IF EXISTS events_stream_version;
-- Consumer positions (ebuse's /subscriptions/{id}/position): few rows, rare
-- writes; served from the LMDB index, kept here so the index can be rebuilt.
CREATE TABLE IF NOT EXISTS subscriptions (
    id       TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
-- Cluster mode: the JetStream stream this database replicates and the last
-- sequence of it applied, written in the same transaction as the events
-- that sequence produced (so a restart applies each message exactly once).
CREATE TABLE IF NOT EXISTS cluster_log (
    stream  TEXT PRIMARY KEY,
    applied INTEGER NOT NULL
);
";

pub const INSERT_EVENT: &str = "INSERT INTO events (position, id, type, data, timestamp, stream, stream_version, metadata) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// An exclusive lock on `<database>.lock`, held for the life of the process:
/// two servers on one database would both think they own the next position.
pub struct DbLock(#[allow(dead_code)] std::fs::File);

pub fn lock_database(cfg: &DatabaseConfig) -> std::io::Result<DbLock> {
    use std::os::fd::AsRawFd;
    if let Some(dir) = cfg.path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let mut name = cfg.path.as_os_str().to_owned();
    name.push(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&name)?;
    // SAFETY: flock on an fd we own; the lock is released when the file closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!(
                "{} is in use by another shardcast process ({e})",
                cfg.path.display()
            ),
        ));
    }
    Ok(DbLock(f))
}

/// Refuse, before writing a byte, a file at the database path that is not a
/// shardcast database: another program's data must stay as it is (an ebuse
/// database opened in place once had its `user_version` rewritten before
/// the first query failed). Accepted: no file, an empty file, a database
/// without tables, one marked with our `application_id`, and one made by a
/// shardcast from before that mark (our schema, `user_version` 1).
pub fn check_not_foreign(path: &std::path::Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() > 0 => {}
        _ => return Ok(()),
    }
    let shown = path.display();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("{shown} cannot be opened read-only to check what it is: {e}"))?;
    let read = |e: rusqlite::Error| {
        format!("{shown} is not a database shardcast can read ({e}); nothing was written to it")
    };
    let app: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(read)?;
    if app == APPLICATION_ID {
        return Ok(());
    }
    let columns = |table: &str| -> rusqlite::Result<Vec<String>> {
        let mut st = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = st.query_map([], |r| r.get::<_, String>(1))?;
        names.collect()
    };
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .map_err(read)?;
    if app == 0 && tables.is_empty() {
        return Ok(());
    }
    let events = columns("events").map_err(read)?;
    let has = |c: &str| events.iter().any(|e| e == c);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(read)?;
    if app == 0 && version == 1 && has("id") && has("stream_version") && has("metadata") {
        return Ok(());
    }
    if app == 0 && has("position") && has("type") && has("timestamp") && !has("id") {
        let subs = columns("subscriptions").map_err(read)?;
        if subs.is_empty() || subs.iter().any(|c| c == "subscription_id") {
            return Err(format!(
                "{shown} is an ebuse database: shardcast does not serve it in place and wrote nothing to it; \
                 point database.path (DB_PATH) at a new file and bring the events and consumer \
                 positions across with `shardcast import --from-ebuse-sqlite {shown}`"
            ));
        }
    }
    Err(format!(
        "{shown} is not a shardcast database (application_id {app:#x}, tables: {}); \
         shardcast wrote nothing to it: point database.path at a new file",
        if tables.is_empty() {
            "none".to_string()
        } else {
            tables.join(", ")
        }
    ))
}

/// Open (creating if needed) the database read-write and apply the pragmas.
/// A file that is not ours is refused first, untouched (`check_not_foreign`).
pub fn open_writer(cfg: &DatabaseConfig) -> rusqlite::Result<Connection> {
    check_not_foreign(&cfg.path).map_err(|message| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
            Some(message),
        )
    })?;
    if let Some(dir) = cfg.path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some(format!("cannot create {}: {e}", dir.display())),
                )
            })?;
        }
    }
    let conn = Connection::open_with_flags(
        &cfg.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(cfg.busy_timeout)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!(
                "could not switch {} to WAL (got {mode})",
                cfg.path.display()
            )),
        ));
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous={};
         PRAGMA cache_size={};
         PRAGMA mmap_size={};
         PRAGMA wal_autocheckpoint={};
         PRAGMA journal_size_limit={};
         PRAGMA temp_store=MEMORY;",
        cfg.synchronous.pragma(),
        cfg.cache_size,
        cfg.mmap_size_bytes,
        cfg.wal_autocheckpoint_pages,
        cfg.journal_size_limit_bytes,
    ))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!(
                "{} has schema version {version}; this shardcast knows {SCHEMA_VERSION}: upgrade shardcast",
                cfg.path.display()
            )),
        ));
    }
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(&format!(
        "PRAGMA user_version={SCHEMA_VERSION}; PRAGMA application_id={APPLICATION_ID};"
    ))?;
    if let Some(bytes) = cfg.max_database_bytes {
        // SQLite answers SQLITE_FULL past this, as on a full disk: the
        // writer turns it into a 507 for that database's appends only.
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = (bytes as i64 / page.max(512)).max(1);
        conn.query_row(&format!("PRAGMA max_page_count={pages}"), [], |_| Ok(()))?;
    }
    Ok(conn)
}

/// A second read-write connection for the checkpoint thread: same durability
/// setting, so its checkpoints fsync as the writer's would have.
pub fn open_checkpointer(cfg: &DatabaseConfig) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        &cfg.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(cfg.busy_timeout)?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous={}; PRAGMA journal_size_limit={};",
        cfg.synchronous.pragma(),
        cfg.journal_size_limit_bytes
    ))?;
    Ok(conn)
}

/// Open read-only (for checks and, later, readers).
pub fn open_reader(cfg: &DatabaseConfig) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        &cfg.path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(cfg.busy_timeout)?;
    conn.execute_batch(&format!("PRAGMA mmap_size={};", cfg.mmap_size_bytes))?;
    Ok(conn)
}

/// Highest stored position, 0 when empty.
pub fn head(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|p| p as u64)
}

/// Lowest stored position (pruning removes from the bottom); `head + 1`
/// when nothing is stored.
pub fn low(conn: &Connection) -> rusqlite::Result<u64> {
    let min: Option<i64> = conn.query_row("SELECT MIN(position) FROM events", [], |r| r.get(0))?;
    match min {
        Some(p) => Ok(p as u64),
        None => Ok(head(conn)? + 1),
    }
}

/// The id stored at `position`, if any.
pub fn id_at(conn: &Connection, position: u64) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT id FROM events WHERE position = ?1")?
        .query_row([position as i64], |r| r.get(0))
        .optional()
}

const EVENT_COLUMNS: &str = "position, id, type, data, timestamp, stream, stream_version, metadata";

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        position: r.get::<_, i64>(0)? as u64,
        stream_version: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        new: NewEvent {
            id: r.get(1)?,
            event_type: r.get(2)?,
            data: json_bytes(r.get_ref(3)?).unwrap_or_else(|| b"null".to_vec()),
            timestamp: r.get(4)?,
            stream: r.get(5)?,
            expected_version: None,
            metadata: json_bytes(r.get_ref(7)?),
        },
    })
}

/// The whole event stored at `position`.
pub fn event_at(conn: &Connection, position: u64) -> rusqlite::Result<Option<Event>> {
    conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE position = ?1"
    ))?
    .query_row([position as i64], event_row)
    .optional()
}

/// Most rows a scoped read (a subscription token's) looks at for one page:
/// a narrow scope over a long history answers a short page that says where
/// to go on (`Page::scan_cut`) rather than scanning it all in one request.
pub const SCOPED_SCAN_ROWS_MAX: usize = 100_000;

/// Up to `limit` events with `from <= position <= to`, optionally of one
/// type, in position order (a rowid range scan; the type is checked per row),
/// encoded straight from the rows into a JSON array (no owned events in
/// between). Returns the array and the last position. With a `scope` (a
/// token's), rows outside it are skipped, and at most
/// `SCOPED_SCAN_ROWS_MAX` rows are looked at.
pub fn events_range_json(
    conn: &Connection,
    from: u64,
    to: u64,
    event_type: Option<&str>,
    limit: usize,
    scope: Option<&crate::filter::Filter>,
) -> rusqlite::Result<Page> {
    let clamp = |p: u64| p.min(i64::MAX as u64) as i64;
    let sql = match event_type {
        None => format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position BETWEEN ?1 AND ?2 AND ?3 IS NULL ORDER BY position LIMIT ?4"
        ),
        Some(_) => format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position BETWEEN ?1 AND ?2 AND type = ?3 ORDER BY position LIMIT ?4"
        ),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let scan = match scope {
        Some(_) => SCOPED_SCAN_ROWS_MAX.max(limit),
        None => limit,
    };
    let mut rows = stmt.query(rusqlite::params![
        clamp(from),
        clamp(to),
        event_type,
        scan as i64
    ])?;
    let mut out = Vec::with_capacity(limit.min(64) * 256);
    out.push(b'[');
    let mut last = None;
    let mut rows_seen = 0usize;
    let mut scanned = None;
    let mut rows_scanned = 0usize;
    while let Some(r) = rows.next()? {
        if rows_seen == limit {
            break;
        }
        rows_scanned += 1;
        if let Some(scope) = scope {
            scanned = Some(r.get::<_, i64>(0)? as u64);
            let t = match r.get_ref(2)? {
                rusqlite::types::ValueRef::Text(t) => std::str::from_utf8(t).unwrap_or(""),
                _ => "",
            };
            let st = match r.get_ref(5)? {
                rusqlite::types::ValueRef::Text(t) => std::str::from_utf8(t).ok(),
                _ => None,
            };
            if !scope.matches(t, st) {
                continue;
            }
        }
        if last.is_some() {
            out.push(b',');
        }
        // Text columns were validated as UTF-8 on the way in; they are
        // escaped as bytes here rather than validated again per read.
        let text = |i: usize| -> rusqlite::Result<&[u8]> {
            match r.get_ref(i)? {
                rusqlite::types::ValueRef::Text(t) => Ok(t),
                other => Err(rusqlite::Error::InvalidColumnType(
                    i,
                    "text".into(),
                    other.data_type(),
                )),
            }
        };
        let position = r.get::<_, i64>(0)? as u64;
        let e = crate::event::EventRef {
            position,
            id: text(1)?,
            event_type: text(2)?,
            data: json_ref(r.get_ref(3)?).unwrap_or(b"null"),
            timestamp: text(4)?,
            stream: match r.get_ref(5)? {
                rusqlite::types::ValueRef::Null => None,
                _ => Some(text(5)?),
            },
            stream_version: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            metadata: json_ref(r.get_ref(7)?),
        };
        crate::event::encode_fields(&mut out, &e, false);
        last = Some(position);
        rows_seen += 1;
        if rows_seen == 1 {
            // Size the page from its first event rather than doubling up
            // to ~2 MB (the regrowth copies were 4% of a 10,000-event page).
            // A quarter over, as later events may be a little longer.
            let each = out.len() + out.len() / 4 + 1;
            out.reserve(each * (limit - 1).min(16_384));
        }
    }
    out.push(b']');
    Ok(Page {
        json: out,
        last,
        count: rows_seen,
        scanned: scanned.or(last),
        scan_cut: scope.is_some() && rows_scanned == scan && rows_seen < limit,
    })
}

/// A page of events encoded as a JSON array.
#[derive(Debug)]
pub struct Page {
    pub json: Vec<u8>,
    /// Position of the last event in it.
    pub last: Option<u64>,
    /// Events in it.
    pub count: usize,
    /// The last position the scan looked at (beyond `last` when a scope
    /// skipped rows after it): the next page starts after it.
    pub scanned: Option<u64>,
    /// A scoped read stopped at `SCOPED_SCAN_ROWS_MAX` rows, before `limit`
    /// events and maybe before the range's end.
    pub scan_cut: bool,
}

impl Page {
    /// Where the next page starts, if this one stopped before `end` (the
    /// range's last position, at most the head): cut by `limit` events, or
    /// a scoped read by its row budget.
    pub fn next_from(&self, limit: usize, end: u64) -> Option<u64> {
        let stopped = if self.count >= limit {
            self.last
        } else if self.scan_cut {
            self.scanned
        } else {
            None
        };
        stopped.filter(|p| *p < end).map(|p| p + 1)
    }
}

fn json_ref(v: rusqlite::types::ValueRef<'_>) -> Option<&[u8]> {
    match v {
        rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => Some(b),
        _ => None,
    }
}

/// The events at these positions, in the order given (missing ones skipped).
pub fn events_at(conn: &Connection, positions: &[u64]) -> rusqlite::Result<Vec<Event>> {
    let mut out = Vec::with_capacity(positions.len());
    for p in positions {
        if let Some(e) = event_at(conn, *p)? {
            out.push(e);
        }
    }
    Ok(out)
}

/// Up to `limit` events from `from` on, in position order (a rowid range scan).
pub fn events_from(conn: &Connection, from: u64, limit: usize) -> rusqlite::Result<Vec<Event>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE position >= ?1 ORDER BY position LIMIT ?2"
    ))?;
    let rows = stmt.query_map(
        rusqlite::params![from.min(i64::MAX as u64) as i64, limit as i64],
        event_row,
    )?;
    rows.collect()
}

/// JSON stored as BLOB (as shardcast writes it) or TEXT (as other tools may).
fn json_bytes(v: rusqlite::types::ValueRef<'_>) -> Option<Vec<u8>> {
    match v {
        rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => Some(b.to_vec()),
        _ => None,
    }
}

/// Set a consumer's position (inside the writer's transaction).
pub fn set_consumer(conn: &Connection, id: &str, position: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO subscriptions (id, position) VALUES (?1, ?2) \
         ON CONFLICT(id) DO UPDATE SET position = excluded.position",
    )?
    .execute(params![id, position as i64])?;
    Ok(())
}

/// Cluster mode: the stream this database replicates and the last sequence
/// of it applied (None: never a replica).
pub fn log_applied(conn: &Connection) -> rusqlite::Result<Option<(String, u64)>> {
    conn.query_row(
        "SELECT stream, applied FROM cluster_log ORDER BY applied DESC LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
    )
    .optional()
}

/// Inside a commit: this replica has applied `stream` up to `seq`.
pub fn set_log_applied(conn: &Connection, stream: &str, seq: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO cluster_log (stream, applied) VALUES (?1, ?2) \
         ON CONFLICT(stream) DO UPDATE SET applied = excluded.applied",
    )?
    .execute(params![stream, seq as i64])?;
    Ok(())
}

/// Every consumer position, for rebuilding the index.
pub fn consumers(conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare("SELECT id, position FROM subscriptions")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
    rows.collect()
}

/// Insert one positioned event (inside the writer's transaction).
pub fn insert(stmt: &mut rusqlite::CachedStatement<'_>, e: &Event) -> rusqlite::Result<()> {
    stmt.execute(params![
        e.position as i64,
        e.new.id,
        e.new.event_type,
        e.new.data,
        e.new.timestamp,
        e.new.stream,
        e.stream_version.map(|v| v as i64),
        e.new.metadata,
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use crate::filter::{Filter, Pattern};

    fn db(name: &str) -> (std::path::PathBuf, Connection) {
        let (dir, cfg) = crate::config::for_tests(&format!("storage-{name}"), &[]);
        let conn = open_writer(&cfg.database).unwrap();
        (dir, conn)
    }

    /// Events 1..=n, in stream `other` except those `mine` picks (`user-1`).
    fn fill(conn: &Connection, n: u64, mine: impl Fn(u64) -> bool) {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut stmt = tx.prepare_cached(INSERT_EVENT).unwrap();
            for p in 1..=n {
                let e = Event {
                    position: p,
                    stream_version: None,
                    new: NewEvent {
                        id: format!("e{p}"),
                        event_type: if p % 2 == 0 { "even" } else { "odd" }.into(),
                        data: b"{}".to_vec(),
                        timestamp: "2026-01-01T00:00:00Z".into(),
                        stream: Some(if mine(p) { "user-1" } else { "other" }.into()),
                        expected_version: None,
                        metadata: None,
                    },
                };
                insert(&mut stmt, &e).unwrap();
            }
        }
        tx.commit().unwrap();
    }

    fn positions(page: &Page) -> Vec<u64> {
        let v: serde_json::Value = serde_json::from_slice(&page.json).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn a_scoped_page_skips_what_is_outside_and_says_where_it_stopped() {
        let (dir, conn) = db("scoped");
        let n = SCOPED_SCAN_ROWS_MAX as u64 + 10;
        // Mine: 3, 4, 5, then only the last three rows.
        fill(&conn, n, |p| (3..=5).contains(&p) || p > n - 3);
        let scope = Filter {
            types: Vec::new(),
            streams: vec![Pattern::Prefix("user-1".into())],
        };
        // Cut by the limit: the next page starts after its last event.
        let p = events_range_json(&conn, 1, u64::MAX, None, 2, Some(&scope)).unwrap();
        assert_eq!(positions(&p), vec![3, 4]);
        assert_eq!(p.next_from(2, n), Some(5));
        // Cut by the row budget, with nothing of its own in it.
        let p = events_range_json(&conn, 6, u64::MAX, None, 10, Some(&scope)).unwrap();
        assert_eq!(positions(&p), Vec::<u64>::new());
        assert!(p.scan_cut);
        let next = p.next_from(10, n).unwrap();
        assert_eq!(next, 6 + SCOPED_SCAN_ROWS_MAX as u64);
        // Followed, the rest.
        let p = events_range_json(&conn, next, u64::MAX, None, 10, Some(&scope)).unwrap();
        assert_eq!(positions(&p), vec![n - 2, n - 1, n]);
        assert_eq!(p.next_from(10, n), None, "the end of the range");
        // A type filter and a scope together; unscoped reads are unchanged.
        let p = events_range_json(&conn, 1, 10, Some("odd"), 10, Some(&scope)).unwrap();
        assert_eq!(positions(&p), vec![3, 5]);
        let p = events_range_json(&conn, 1, 10, Some("odd"), 10, None).unwrap();
        assert_eq!(positions(&p), vec![1, 3, 5, 7, 9]);
        assert!(!p.scan_cut);
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
    }
}
