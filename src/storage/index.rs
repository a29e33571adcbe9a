//! The hot index in LMDB (heed): event id → position (idempotency), stream →
//! last version (optimistic concurrency) and the head position. Only the
//! writer writes it, after each SQLite commit; shards read it directly.
//!
//! It is opened without `fsync` (`NO_SYNC`): SQLite is the source of truth, and
//! at start `open_checked` compares the index with SQLite and repairs it when it
//! is missing, behind, ahead, from another history, or unreadable.
//!
//! Readers use LMDB's per-thread reader slot (the default TLS mode): a shard
//! opens a read transaction, reads, and drops it before any `.await`, so one
//! executor thread never holds two at once, and no read takes LMDB's
//! reader-table mutex after the thread's first. The `Reader` API makes holding a
//! transaction across an await impossible: every method opens and closes its own.

use crate::config::IndexConfig;
use crate::limits::INDEX_REBUILD_ROWS_PER_TXN;
use heed::byteorder::BigEndian;
use heed::types::{Bytes, Str, U64};
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RwTxn};
use rusqlite::Connection;
use std::path::Path;

/// Bumped when the index layout changes; a different one is rebuilt.
const INDEX_FORMAT: u64 = 2;
const META_HEAD: &str = "head";
const META_FORMAT: &str = "format";

pub type Pos = U64<BigEndian>;

/// The index's databases. Only this module knows their keys: the writer
/// writes through `put_event`, `forget_event`, `put_consumer`, `set_head`.
#[derive(Clone)]
pub struct Index {
    env: Env,
    ids: Database<'static, Bytes, Pos>,
    streams: Database<'static, Bytes, Pos>,
    meta: Database<'static, Str, Pos>,
    /// Consumer id → the position it last saved.
    consumers: Database<'static, Bytes, Pos>,
    /// (stream, version) → position: one stream in version order without an
    /// index on random keys in SQLite (measured: such an index cost 41% of
    /// batch ingestion of stream events).
    stream_events: Database<'static, Bytes, Pos>,
}

/// `stream_events` key: u16 length, the stream, the version big-endian, so a
/// stream's keys are contiguous and in version order whatever bytes it holds.
fn stream_key(stream: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + stream.len() + 8);
    k.extend_from_slice(&(stream.len() as u16).to_be_bytes());
    k.extend_from_slice(stream.as_bytes());
    k.extend_from_slice(&version.to_be_bytes());
    k
}

#[derive(Debug)]
pub enum IndexError {
    Lmdb(heed::Error),
    Sqlite(rusqlite::Error),
    Io(std::io::Error),
}

impl std::fmt::Display for IndexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexError::Lmdb(e) => write!(f, "LMDB: {e}"),
            IndexError::Sqlite(e) => write!(f, "SQLite: {e}"),
            IndexError::Io(e) => write!(f, "{e}"),
        }
    }
}
impl std::error::Error for IndexError {}
impl From<heed::Error> for IndexError {
    fn from(e: heed::Error) -> Self {
        IndexError::Lmdb(e)
    }
}
impl From<rusqlite::Error> for IndexError {
    fn from(e: rusqlite::Error) -> Self {
        IndexError::Sqlite(e)
    }
}
impl From<std::io::Error> for IndexError {
    fn from(e: std::io::Error) -> Self {
        IndexError::Io(e)
    }
}

/// What `open_checked` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// Index and SQLite agree.
    InStep,
    /// The index lacked the newest events; they were indexed from SQLite.
    CaughtUp { from: u64, to: u64 },
    /// The index was rebuilt from SQLite, for the reason given.
    Rebuilt { reason: String, events: u64 },
}

impl Index {
    fn open(cfg: &IndexConfig) -> Result<Index, IndexError> {
        std::fs::create_dir_all(&cfg.path)?;
        let mut opts = EnvOpenOptions::new();
        opts.map_size(cfg.map_size_bytes).max_dbs(8);
        // SAFETY: NO_SYNC only weakens durability of the index, which is rebuilt
        // from SQLite at start whenever it is behind or inconsistent; the path is
        // opened once per process (heed refuses a second open).
        let env = unsafe {
            opts.flags(EnvFlags::NO_SYNC);
            opts.open(&cfg.path)?
        };
        let wtxn = env.write_txn()?;
        let (ids, streams, meta, consumers, stream_events) = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
                let ids = opener.create_database::<Bytes, Pos>(wtxn, Some("ids"))?;
                let streams = opener.create_database::<Bytes, Pos>(wtxn, Some("streams"))?;
                let meta = opener.create_database::<Str, Pos>(wtxn, Some("meta"))?;
                let consumers = opener.create_database::<Bytes, Pos>(wtxn, Some("consumers"))?;
                let stream_events =
                    opener.create_database::<Bytes, Pos>(wtxn, Some("stream_events"))?;
                Ok(heed::CommitOrAbort::<_, ()>::Commit((
                    ids,
                    streams,
                    meta,
                    consumers,
                    stream_events,
                )))
            })?
            .unwrap_commit();
        Ok(Index {
            env,
            ids,
            streams,
            meta,
            consumers,
            stream_events,
        })
    }

    /// Close the environment fully, so its directory may be removed or reopened.
    fn close(self) {
        let Index { env, .. } = self;
        env.prepare_for_closing().wait();
    }

    /// Open the index at `cfg.path` and bring it in step with `conn`'s events
    /// and consumer positions.
    pub fn open_checked(
        cfg: &IndexConfig,
        conn: &Connection,
    ) -> Result<(Index, Recovery), IndexError> {
        let (index, recovery) = Index::open_events_checked(cfg, conn)?;
        index.load_consumers(conn)?;
        Ok((index, recovery))
    }

    /// Consumer positions are few: copy them from SQLite at every start, so an
    /// index written without fsync never serves a stale one.
    fn load_consumers(&self, conn: &Connection) -> Result<(), IndexError> {
        let all = crate::storage::consumers(conn)?;
        let mut w = self.env.write_txn()?;
        self.consumers.clear(&mut w)?;
        for (id, p) in all {
            self.consumers.put(&mut w, id.as_bytes(), &p)?;
        }
        w.commit()?;
        Ok(())
    }

    fn open_events_checked(
        cfg: &IndexConfig,
        conn: &Connection,
    ) -> Result<(Index, Recovery), IndexError> {
        let sqlite_head = crate::storage::head(conn)?;
        let index = match Index::open(cfg) {
            Ok(i) => i,
            // Open elsewhere in this process (a tenant removed a moment ago,
            // its handles not yet dropped): not damage, so nothing is wiped.
            Err(e @ IndexError::Lmdb(heed::Error::EnvAlreadyOpened)) => return Err(e),
            Err(e) => {
                tracing::warn!(path = %cfg.path.display(), error = %e, "index unreadable; rebuilding it from SQLite");
                wipe(&cfg.path)?;
                let index = Index::open(cfg)?;
                let n = index.rebuild(conn)?;
                return Ok((
                    index,
                    Recovery::Rebuilt {
                        reason: format!("unreadable: {e}"),
                        events: n,
                    },
                ));
            }
        };
        let reason = match index.diagnose(conn, sqlite_head) {
            Ok(None) => return Ok((index, Recovery::InStep)),
            Ok(Some(Diagnosis::Behind(from))) => {
                index.index_range(conn, from + 1)?;
                return Ok((
                    index,
                    Recovery::CaughtUp {
                        from: from + 1,
                        to: sqlite_head,
                    },
                ));
            }
            Ok(Some(Diagnosis::Rebuild(reason))) => reason,
            Err(e) => format!("unreadable: {e}"),
        };
        tracing::warn!(path = %cfg.path.display(), %reason, "rebuilding index from SQLite");
        // Start from an empty directory: a damaged file must not survive the rebuild.
        index.close();
        wipe(&cfg.path)?;
        let index = Index::open(cfg)?;
        let n = index.rebuild(conn)?;
        Ok((index, Recovery::Rebuilt { reason, events: n }))
    }

    fn diagnose(
        &self,
        conn: &Connection,
        sqlite_head: u64,
    ) -> Result<Option<Diagnosis>, IndexError> {
        let rtxn = self.env.read_txn()?;
        let format = self.meta.get(&rtxn, META_FORMAT)?;
        let head = self.meta.get(&rtxn, META_HEAD)?.unwrap_or(0);
        if format.is_none() && head == 0 && sqlite_head == 0 {
            drop(rtxn);
            self.set_format()?;
            return Ok(None);
        }
        if format != Some(INDEX_FORMAT) {
            return Ok(Some(Diagnosis::Rebuild(format!(
                "index format {format:?}, expected {INDEX_FORMAT}"
            ))));
        }
        if head > sqlite_head {
            return Ok(Some(Diagnosis::Rebuild(format!(
                "index is ahead of SQLite (index head {head}, SQLite head {sqlite_head}): SQLite lost a tail"
            ))));
        }
        // The newest event both know must be the same event in both.
        if head > 0 {
            let id = crate::storage::id_at(conn, head)?;
            let indexed = match &id {
                Some(id) => self.ids.get(&rtxn, id.as_bytes())?,
                None => None,
            };
            if indexed != Some(head) {
                return Ok(Some(Diagnosis::Rebuild(format!(
                    "event at position {head} is not the one the index knows (another history)"
                ))));
            }
        }
        if head < sqlite_head {
            return Ok(Some(Diagnosis::Behind(head)));
        }
        Ok(None)
    }

    fn set_format(&self) -> Result<(), IndexError> {
        let mut w = self.env.write_txn()?;
        self.meta.put(&mut w, META_FORMAT, &INDEX_FORMAT)?;
        w.commit()?;
        Ok(())
    }

    /// Empty the index and index every event in SQLite.
    fn rebuild(&self, conn: &Connection) -> Result<u64, IndexError> {
        let mut w = self.env.write_txn()?;
        self.ids.clear(&mut w)?;
        self.streams.clear(&mut w)?;
        self.stream_events.clear(&mut w)?;
        self.meta.clear(&mut w)?;
        self.meta.put(&mut w, META_FORMAT, &INDEX_FORMAT)?;
        self.meta.put(&mut w, META_HEAD, &0)?;
        w.commit()?;
        self.index_range(conn, 1)
    }

    /// Index SQLite's events from `from` to its head, in bounded transactions.
    /// A write transaction, for the writer (one per group commit).
    pub fn write_txn(&self) -> heed::Result<RwTxn<'_>> {
        self.env.write_txn()
    }

    /// The position of an event id, as this write transaction sees it.
    pub fn position_in(&self, w: &RwTxn, id: &str) -> heed::Result<Option<u64>> {
        self.ids.get(w, id.as_bytes())
    }

    /// A stream's version, as this write transaction sees it (0: none yet).
    pub fn stream_version_in(&self, w: &RwTxn, stream: &str) -> heed::Result<u64> {
        Ok(self.streams.get(w, stream.as_bytes())?.unwrap_or(0))
    }

    /// Index a stored event: its id, and its stream's version and position.
    pub fn put_event(
        &self,
        w: &mut RwTxn,
        id: &str,
        position: u64,
        stream: Option<(&str, u64)>,
    ) -> heed::Result<()> {
        self.ids.put(w, id.as_bytes(), &position)?;
        if let Some((s, v)) = stream {
            self.streams.put(w, s.as_bytes(), &v)?;
            self.stream_events.put(w, &stream_key(s, v), &position)?;
        }
        Ok(())
    }

    /// Forget a pruned event: its id (a later append of it is new) and its
    /// place in its stream (the stream's version stays: versions go on).
    pub fn forget_event(
        &self,
        w: &mut RwTxn,
        id: &str,
        stream: Option<(&str, u64)>,
    ) -> heed::Result<()> {
        self.ids.delete(w, id.as_bytes())?;
        if let Some((s, v)) = stream {
            self.stream_events.delete(w, &stream_key(s, v))?;
        }
        Ok(())
    }

    /// A consumer's saved position.
    pub fn put_consumer(&self, w: &mut RwTxn, id: &str, position: u64) -> heed::Result<()> {
        self.consumers.put(w, id.as_bytes(), &position)
    }

    pub(crate) fn index_range(&self, conn: &Connection, from: u64) -> Result<u64, IndexError> {
        let mut stmt = conn.prepare(
            "SELECT position, id, stream, stream_version FROM events WHERE position >= ?1 ORDER BY position LIMIT ?2",
        )?;
        let mut next = from;
        let mut total = 0u64;
        loop {
            let mut w = self.env.write_txn()?;
            let mut rows = stmt.query(rusqlite::params![
                next as i64,
                INDEX_REBUILD_ROWS_PER_TXN as i64
            ])?;
            let mut n = 0usize;
            let mut last = None;
            while let Some(r) = rows.next()? {
                let pos = r.get::<_, i64>(0)? as u64;
                let id: String = r.get(1)?;
                let stream: Option<String> = r.get(2)?;
                let version: Option<i64> = r.get(3)?;
                self.put_event(
                    &mut w,
                    &id,
                    pos,
                    stream.as_deref().zip(version.map(|v| v as u64)),
                )?;
                last = Some(pos);
                n += 1;
            }
            drop(rows);
            if let Some(last) = last {
                self.meta.put(&mut w, META_HEAD, &last)?;
                next = last + 1;
            }
            w.commit()?;
            total += n as u64;
            if n < INDEX_REBUILD_ROWS_PER_TXN {
                return Ok(total);
            }
        }
    }

    // --- writer side -------------------------------------------------------

    pub(crate) fn set_head(&self, w: &mut RwTxn, head: u64) -> heed::Result<()> {
        self.meta.put(w, META_HEAD, &head)
    }

    // --- reader side: each call opens and closes its own transaction --------

    /// Position of the newest committed event (0 when empty).
    pub fn head(&self) -> heed::Result<u64> {
        let r = self.env.read_txn()?;
        Ok(self.meta.get(&r, META_HEAD)?.unwrap_or(0))
    }

    /// Where the event with this id was stored, if it was.
    pub fn position_of(&self, id: &str) -> heed::Result<Option<u64>> {
        let r = self.env.read_txn()?;
        self.ids.get(&r, id.as_bytes())
    }

    /// The position a consumer saved (0 when it never did).
    pub fn consumer_position(&self, id: &str) -> heed::Result<u64> {
        let r = self.env.read_txn()?;
        Ok(self.consumers.get(&r, id.as_bytes())?.unwrap_or(0))
    }

    /// Positions of up to `limit` of a stream's events from `from_version` on,
    /// in version order.
    pub fn stream_positions(
        &self,
        stream: &str,
        from_version: u64,
        limit: usize,
    ) -> heed::Result<Vec<u64>> {
        let r = self.env.read_txn()?;
        let start = stream_key(stream, from_version);
        let end = stream_key(stream, u64::MAX);
        let range = (
            std::ops::Bound::Included(start.as_slice()),
            std::ops::Bound::Included(end.as_slice()),
        );
        let mut out = Vec::new();
        for item in self.stream_events.range(&r, &range)?.take(limit) {
            out.push(item?.1);
        }
        Ok(out)
    }

    /// The last version of a stream (0 when it has no events).
    pub fn stream_version(&self, stream: &str) -> heed::Result<u64> {
        let r = self.env.read_txn()?;
        Ok(self.streams.get(&r, stream.as_bytes())?.unwrap_or(0))
    }
}

/// What `shardcast check` found.
#[derive(Debug, Default)]
pub struct Verification {
    pub sqlite_head: u64,
    pub index_head: u64,
    pub events: u64,
    /// Each way the index differs from SQLite (the first `VERIFY_REPORT_MAX`).
    pub problems: Vec<String>,
    /// How many differences in all.
    pub differences: u64,
}

/// Differences `verify` describes one by one; beyond, it only counts.
const VERIFY_REPORT_MAX: usize = 20;

impl Verification {
    fn note(&mut self, what: String) {
        self.differences += 1;
        if self.problems.len() < VERIFY_REPORT_MAX {
            self.problems.push(what);
        }
    }

    pub fn in_step(&self) -> bool {
        self.differences == 0
    }
}

impl Index {
    /// Open an existing index to check it: nothing is created, repaired or
    /// rebuilt (a running server may have it open: LMDB allows that).
    pub fn open_for_check(cfg: &IndexConfig) -> Result<Index, IndexError> {
        if !cfg.path.join("data.mdb").exists() {
            return Err(IndexError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no index at {} (shardcast builds it at start)",
                    cfg.path.display()
                ),
            )));
        }
        Index::open(cfg)
    }

    /// Compare every entry with SQLite: each event's id and (stream,
    /// version), each stream's last version, the head, the consumer
    /// positions, and nothing indexed that SQLite does not hold.
    pub fn verify(&self, conn: &Connection) -> Result<Verification, IndexError> {
        let mut v = Verification::default();
        // One read snapshot of each, so a running server's commits do not
        // show up as differences half-way.
        conn.execute_batch("BEGIN")?;
        let r = self.env.read_txn()?;
        v.sqlite_head = crate::storage::head(conn)?;
        v.index_head = self.meta.get(&r, META_HEAD)?.unwrap_or(0);
        let format = self.meta.get(&r, META_FORMAT)?;
        if format != Some(INDEX_FORMAT) {
            v.note(format!("index format {format:?}, expected {INDEX_FORMAT}"));
        }
        if v.index_head != v.sqlite_head {
            v.note(format!(
                    "index head {} but SQLite head {} (a running server may be a commit ahead in SQLite)",
                    v.index_head, v.sqlite_head
                ),
            );
        }
        let low = crate::storage::low(conn)?;
        let mut stream_rows = 0u64;
        let mut last_version: std::collections::HashMap<String, u64> = Default::default();
        {
            let mut stmt = conn.prepare(
                "SELECT position, id, stream, stream_version FROM events ORDER BY position",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let pos = row.get::<_, i64>(0)? as u64;
                let id: String = row.get(1)?;
                v.events += 1;
                match self.ids.get(&r, id.as_bytes())? {
                    Some(p) if p == pos => {}
                    other => v.note(format!(
                        "id {id:?} at position {pos} is indexed as {other:?}"
                    )),
                }
                if let (Some(s), Some(ver)) = (
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, Option<i64>>(3)?,
                ) {
                    let ver = ver as u64;
                    stream_rows += 1;
                    match self.stream_events.get(&r, &stream_key(&s, ver))? {
                        Some(p) if p == pos => {}
                        other => v.note(format!(
                            "stream {s:?} version {ver} (position {pos}) is indexed as {other:?}"
                        )),
                    }
                    let e = last_version.entry(s).or_insert(0);
                    *e = (*e).max(ver);
                }
            }
        }
        let ids = self.ids.len(&r)?;
        if ids != v.events {
            v.note(format!("{ids} ids indexed for {} stored events", v.events));
        }
        let indexed_stream_events = self.stream_events.len(&r)?;
        if indexed_stream_events != stream_rows {
            v.note(format!("{indexed_stream_events} stream entries indexed for {stream_rows} stored stream events"),
            );
        }
        for (s, ver) in &last_version {
            let indexed = self.streams.get(&r, s.as_bytes())?.unwrap_or(0);
            // Pruning keeps a stream's version counting; without it they are equal.
            if indexed < *ver || (indexed != *ver && low <= 1) {
                v.note(format!(
                    "stream {s:?} is at version {ver} in SQLite, {indexed} in the index"
                ));
            }
        }
        let consumers = crate::storage::consumers(conn)?;
        for (id, p) in &consumers {
            match self.consumers.get(&r, id.as_bytes())? {
                Some(q) if q == *p => {}
                other => v.note(format!(
                    "consumer {id:?} is at {p} in SQLite, {other:?} in the index"
                )),
            }
        }
        let indexed_consumers = self.consumers.len(&r)?;
        if indexed_consumers != consumers.len() as u64 {
            v.note(format!(
                "{indexed_consumers} consumers indexed, {} stored",
                consumers.len()
            ));
        }
        drop(r);
        conn.execute_batch("COMMIT")?;
        Ok(v)
    }
}

enum Diagnosis {
    Behind(u64),
    Rebuild(String),
}

fn wipe(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(path)
}

#[cfg(test)]
mod tests {
    //! `open_checked` against real SQLite and LMDB files: each way an index
    //! can disagree with SQLite, and that it agrees afterwards.
    use super::*;
    use crate::event::{Event, NewEvent};

    struct Files {
        dir: std::path::PathBuf,
        cfg: crate::config::Config,
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn files(name: &str) -> Files {
        let (dir, cfg) = crate::config::for_tests(&format!("index-{name}"), &[]);
        Files { dir, cfg }
    }

    fn insert(conn: &Connection, from: u64, to: u64, tag: &str) {
        let mut stmt = conn.prepare_cached(crate::storage::INSERT_EVENT).unwrap();
        for p in from..=to {
            let e = Event {
                position: p,
                stream_version: Some(p),
                new: NewEvent {
                    id: format!("{tag}-{p}"),
                    event_type: "t".into(),
                    data: b"{}".to_vec(),
                    timestamp: "2026-01-01T00:00:00Z".into(),
                    stream: Some("s".into()),
                    expected_version: None,
                    metadata: None,
                },
            };
            crate::storage::insert(&mut stmt, &e).unwrap();
        }
    }

    /// Open, check what was done, and that the index now answers as SQLite.
    fn check(f: &Files, conn: &Connection, want: &str) -> Index {
        let (index, recovery) = Index::open_checked(&f.cfg.index, conn).unwrap();
        let got = match &recovery {
            Recovery::InStep => "in step".to_string(),
            Recovery::CaughtUp { from, to } => format!("caught up {from}..{to}"),
            Recovery::Rebuilt { reason, events } => format!("rebuilt {events}: {reason}"),
        };
        assert!(got.starts_with(want), "{got:?} is not {want:?}");
        let head = crate::storage::head(conn).unwrap();
        assert_eq!(index.head().unwrap(), head);
        for p in crate::storage::low(conn).unwrap().max(1)..=head {
            let id = crate::storage::id_at(conn, p).unwrap().unwrap();
            assert_eq!(index.position_of(&id).unwrap(), Some(p), "{id}");
        }
        assert_eq!(index.stream_version("s").unwrap(), head);
        index
    }

    #[test]
    fn every_disagreement_is_repaired_at_open() {
        let f = files("recovery");
        let conn = crate::storage::open_writer(&f.cfg.database).unwrap();
        // New: nothing to do.
        check(&f, &conn, "in step").close();
        // Behind: what SQLite gained while the index did not see it.
        insert(&conn, 1, 5, "a");
        check(&f, &conn, "caught up 1..5").close();
        check(&f, &conn, "in step").close();
        // Ahead: SQLite lost a tail (a restored backup).
        conn.execute("DELETE FROM events WHERE position > 3", [])
            .unwrap();
        check(&f, &conn, "rebuilt 3: index is ahead").close();
        // Another history at the same positions.
        conn.execute("DELETE FROM events", []).unwrap();
        insert(&conn, 1, 3, "b");
        let index = check(&f, &conn, "rebuilt 3: event at position 3");
        assert_eq!(
            index.position_of("a-1").unwrap(),
            None,
            "nothing of the old history"
        );
        index.close();
        // Damaged files.
        std::fs::write(f.cfg.index.path.join("data.mdb"), b"not an LMDB file").unwrap();
        check(&f, &conn, "rebuilt 3: unreadable").close();
    }
}
