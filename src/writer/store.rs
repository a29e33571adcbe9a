//! One tenant's storage as the writer owns it: its SQLite connection, the
//! only write access to its LMDB index, and its checkpointer. `commit`
//! writes one tenant's share of a group in one transaction, checking ids
//! (duplicates answer with the original position) and stream versions
//! (`expected_version`), prunes what retention no longer keeps, commits,
//! then updates the index; answers are given only after the commit.

use super::protocol::{AppendKind, AppendRequest, Failure, Outcome, PositionOutcome, Reply};
use crate::config::{Config, DatabaseConfig, IndexConfig};
use crate::event::Event;
use crate::storage;
use crate::storage::checkpoint::{Checkpointer, WalWatch};
use crate::storage::index::{Index, Recovery};
use rusqlite::{Connection, TransactionBehavior};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// A group commit slower than this is logged with where its time went.
const SLOW_COMMIT_WARN: Duration = Duration::from_millis(100);

/// One tenant's storage, owned by the writer thread: its SQLite connection
/// and the only write access to its LMDB index.
pub struct Store {
    pub name: String,
    pub(super) conn: Connection,
    pub(super) index: Index,
    /// Position of the last committed event; the next gets `head + 1`.
    pub(super) head: u64,
    /// The index missed a commit (its own commit failed); bring it up to date first.
    pub(super) index_behind: bool,
    /// Nudges the checkpoint thread as the WAL grows.
    pub(super) wal: WalWatch,
    pub(super) checkpointer: Option<Checkpointer>,
    /// `storage.retain_events` and `storage.retain_age`.
    pub(super) retention: Retention,
    /// Lowest stored position: where pruning continues.
    pub(super) low: u64,
    pub(super) _lock: storage::DbLock,
    pub(super) events_appended: u64,
    pub(super) commits: u64,
    pub(super) commit_failures: u64,
    /// Why the last commit failed, until one succeeds (readiness says so).
    pub(super) last_failure: Option<String>,
    /// Failing commits are logged once, then once per interval with a count
    /// (a full disk fails every commit: one line each would fill it faster).
    pub(super) failure_log: crate::log::Repeated,
    /// Likewise for an index that stays behind SQLite.
    pub(super) index_log: crate::log::Repeated,
    /// Cluster mode: the stream this store replicates and how far it applied it.
    pub(super) log: Option<LogState>,
}

/// Cluster mode: where this replica stands in its JetStream stream.
#[derive(Debug, Clone)]
pub struct LogState {
    pub stream: String,
    /// The last stream sequence applied. Only commits that write persist it
    /// (with their events); a message that wrote nothing (only duplicates or
    /// conflicts) moves it in memory alone, as applying it again after a
    /// restart writes nothing again.
    pub applied: u64,
}

/// Why a store did not open.
#[derive(Debug)]
pub enum OpenError {
    /// Its LMDB environment is still open in this process: a shard has not
    /// yet let go of a tenant removed moments ago (a reload waits for it).
    IndexHeld(String),
    Failed(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::IndexHeld(m) | OpenError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<String> for OpenError {
    fn from(m: String) -> OpenError {
        OpenError::Failed(m)
    }
}

impl Store {
    /// Lock, open (creating on first start), bring the index in step, start
    /// the checkpoint thread. Runs on any thread; the store then moves to
    /// the writer. Returns the store and a handle on its index for readers.
    pub fn open(
        name: &str,
        database: &DatabaseConfig,
        index_cfg: &IndexConfig,
        cfg: &Config,
    ) -> Result<(Store, Index), OpenError> {
        let lock =
            storage::lock_database(database).map_err(|e| format!("cannot lock database: {e}"))?;
        let conn = storage::open_writer(database)
            .map_err(|e| format!("cannot open database {}: {e}", database.path.display()))?;
        let (index, recovery) = Index::open_checked(index_cfg, &conn).map_err(|e| {
            let m = format!("cannot open index {}: {e}", index_cfg.path.display());
            match e {
                crate::storage::index::IndexError::Lmdb(heed::Error::EnvAlreadyOpened) => {
                    OpenError::IndexHeld(m)
                }
                _ => OpenError::Failed(m),
            }
        })?;
        match &recovery {
            Recovery::InStep => tracing::info!(tenant = name, "index in step with SQLite"),
            Recovery::CaughtUp { from, to } => {
                tracing::info!(tenant = name, from, to, "index caught up from SQLite")
            }
            Recovery::Rebuilt { reason, events } => {
                tracing::warn!(tenant = name, %reason, events, "index rebuilt from SQLite")
            }
        }
        let checkpointer = Checkpointer::spawn(database)
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        let head = storage::head(&conn).map_err(|e| format!("cannot read the head: {e}"))?;
        let low = storage::low(&conn).map_err(|e| format!("cannot read the head: {e}"))?;
        let wal = WalWatch::install(&conn, &checkpointer, database.busy_timeout)
            .map_err(|e| format!("cannot watch the WAL: {e}"))?;
        Ok((
            Store {
                name: name.to_string(),
                conn,
                index: index.clone(),
                head,
                index_behind: false,
                wal,
                checkpointer: Some(checkpointer),
                retention: Retention {
                    events: cfg.storage.retain_events,
                    age: cfg.storage.retain_age,
                },
                low,
                _lock: lock,
                events_appended: 0,
                commits: 0,
                commit_failures: 0,
                last_failure: None,
                failure_log: Default::default(),
                index_log: Default::default(),
                log: None,
            },
            index,
        ))
    }

    /// Close the connection, then stop the checkpoint thread (whose
    /// connection, now the last, checkpoints what is left as it closes).
    /// Prune by age with no append to ride on (an idle store): slices of
    /// `PRUNE_ROWS_PER_COMMIT`, each its own short transaction, until
    /// nothing more is due or `slices_max` were taken.
    pub(super) fn prune_idle(&mut self, slices_max: usize) -> Result<u64, StorageError> {
        let mut pruned = 0;
        for _ in 0..slices_max {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut w = self.index.write_txn()?;
            let low = prune(
                &self.index,
                &self.retention,
                self.low,
                &tx,
                &mut w,
                self.head,
            )?;
            if low == self.low {
                return Ok(pruned);
            }
            tx.commit()?;
            pruned += low - self.low;
            self.low = low;
            // As after a commit: SQLite is the truth, the index follows it.
            if let Err(e) = w.commit() {
                tracing::error!(tenant = %self.name, error = %e, "index commit failed after pruning; re-indexing from SQLite");
                self.index_behind = true;
                self.resync_index();
                return Ok(pruned);
            }
        }
        Ok(pruned)
    }

    /// Cluster mode: make this store a replica of `stream`; returns the last
    /// sequence of it already applied. A database that replicates another
    /// stream, or holds events it did not get from a stream (a single-node
    /// database), is refused: its positions would not be the cluster's.
    pub fn replicate(&mut self, stream: &str) -> Result<u64, String> {
        let stored = storage::log_applied(&self.conn)
            .map_err(|e| format!("cannot read cluster_log: {e}"))?;
        let applied = match stored {
            Some((s, applied)) if s == stream => applied,
            Some((s, applied)) => {
                return Err(format!(
                    "this database replicates JetStream stream {s} (applied up to {applied}), not {stream}: \
                     check cluster.stream_prefix and the tenant's name"
                ))
            }
            None if self.head > 0 => {
                return Err(format!(
                    "this database holds {} events that did not come from a JetStream stream: a \
                     single-node database cannot become a replica; start the node with an empty data \
                     directory, or from `shardcast backup` of another node (docs/cluster.md)",
                    self.head
                ))
            }
            None => 0,
        };
        self.log = Some(LogState {
            stream: stream.to_string(),
            applied,
        });
        Ok(applied)
    }

    /// Cluster mode: the last stream sequence applied (None: single node).
    pub fn log_applied(&self) -> Option<u64> {
        self.log.as_ref().map(|l| l.applied)
    }

    pub(super) fn close(mut self) {
        let checkpointer = self.checkpointer.take();
        drop(self);
        if let Some(c) = checkpointer {
            c.stop();
        }
    }

    /// Write one tenant's share of a group in one transaction and answer
    /// each of its requests (those of `FOREIGN`, another node's, need none).
    /// Returns the events it made durable, or why nothing was. `log_seq`
    /// (cluster mode): the stream sequence these requests end at, committed
    /// with them.
    pub(super) fn commit(
        &mut self,
        requests: Vec<(usize, AppendRequest)>,
        answers: &mut [Vec<(u64, Reply)>],
        log_seq: Option<u64>,
    ) -> Result<Vec<Event>, Failure> {
        if self.index_behind {
            self.resync_index();
        }
        self.wal.between_commits();
        let before = self.head;
        let tickets: Vec<(usize, u64, AppendKind)> = requests
            .iter()
            .map(|(s, r)| (*s, r.ticket, r.kind))
            .collect();
        let mut replies = Vec::with_capacity(requests.len());
        let mut committed = Vec::new();
        match self.write(requests, &mut replies, &mut committed, log_seq) {
            Ok(written) => {
                // Positions are contiguous: the head moved by exactly what was written.
                assert_eq!(
                    self.head,
                    before + written as u64,
                    "positions must stay contiguous"
                );
                debug_assert!(committed
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.position == before + 1 + i as u64));
                // Answers only now, after the commit.
                for (shard, ticket, outcome) in replies {
                    if let Some(a) = answers.get_mut(shard) {
                        a.push((ticket, outcome));
                    }
                }
                if written > 0 {
                    self.commits += 1;
                    self.events_appended += written as u64;
                }
                if self.last_failure.take().is_some() {
                    let unlogged = self.failure_log.clear();
                    tracing::info!(tenant = %self.name, failed_commits_not_logged = unlogged, "group commits succeed again");
                }
                Ok(committed)
            }
            Err(e) => {
                if let Some(unlogged) = self.failure_log.occur(std::time::Instant::now()) {
                    tracing::error!(tenant = %self.name, error = %e.message, failed_commits_not_logged = unlogged, "group commit failed; nothing of it was written");
                }
                self.head = before;
                self.commit_failures += 1;
                self.last_failure = Some(if e.full {
                    format!("storage full: {}", e.message)
                } else {
                    e.message.clone()
                });
                for (shard, ticket, kind) in tickets {
                    if let Some(a) = answers.get_mut(shard) {
                        a.push((ticket, Reply::failed(kind, e.message.clone(), e.cause())));
                    }
                }
                Err(e.cause())
            }
        }
    }

    pub(super) fn write(
        &mut self,
        requests: Vec<(usize, AppendRequest)>,
        replies: &mut Vec<(usize, u64, Reply)>,
        committed: &mut Vec<Event>,
        log_seq: Option<u64>,
    ) -> Result<usize, StorageError> {
        let t0 = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut w = self.index.write_txn()?;
        let t_begin = t0.elapsed();
        let mut next = self.head + 1;
        let mut consumers_saved = false;
        {
            let mut stmt = tx.prepare_cached(storage::INSERT_EVENT)?;
            for (shard, req) in requests {
                let ticket = req.ticket;
                if let (AppendKind::Consumer, Some((id, position))) = (req.kind, &req.consumer) {
                    // A consumer's position is its own (ebuse stores any):
                    // one beyond the head just means it has seen everything.
                    storage::set_consumer(&tx, id, *position)?;
                    self.index.put_consumer(&mut w, id, *position)?;
                    consumers_saved = true;
                    replies.push((shard, ticket, Reply::Position(PositionOutcome::Saved)));
                    continue;
                }
                let outcome = apply(
                    &self.index,
                    &tx,
                    &mut stmt,
                    &mut w,
                    req,
                    &mut next,
                    committed,
                )?;
                replies.push((shard, ticket, Reply::Append(outcome)));
            }
        }
        let written = (next - 1 - self.head) as usize;
        if written == 0 && !consumers_saved {
            // Only duplicates or conflicts: nothing to make durable.
            committed.clear();
            drop(w);
            tx.rollback()?;
            self.log_applied_to(log_seq);
            return Ok(0);
        }
        if let (Some(seq), Some(log)) = (log_seq, &self.log) {
            storage::set_log_applied(&tx, &log.stream, seq)?;
        }
        self.index.set_head(&mut w, next - 1)?;
        let low = prune(
            &self.index,
            &self.retention,
            self.low,
            &tx,
            &mut w,
            next - 1,
        )?;
        let t_apply = t0.elapsed();
        tx.commit()?;
        self.low = low;
        // From here the events are durable: the index only follows SQLite.
        self.head = next - 1;
        let t_commit = t0.elapsed();
        self.wal.after_commit();
        if let Err(e) = w.commit() {
            tracing::error!(tenant = %self.name, error = %e, "index commit failed after SQLite commit; re-indexing from SQLite");
            self.index_behind = true;
            self.resync_index();
        }
        self.log_applied_to(log_seq);
        let total = t0.elapsed();
        if total >= SLOW_COMMIT_WARN {
            tracing::warn!(
                tenant = %self.name,
                events = written,
                begin_ms = t_begin.as_millis() as u64,
                apply_ms = (t_apply - t_begin).as_millis() as u64,
                sqlite_commit_ms = (t_commit - t_apply).as_millis() as u64,
                index_commit_ms = (total - t_commit).as_millis() as u64,
                "slow group commit"
            );
        }
        Ok(written)
    }

    fn log_applied_to(&mut self, seq: Option<u64>) {
        if let (Some(seq), Some(log)) = (seq, self.log.as_mut()) {
            // The log is applied in order, each message once.
            assert!(
                seq > log.applied,
                "stream sequence {seq} applied after {}",
                log.applied
            );
            log.applied = seq;
        }
    }

    /// Ready to take appends: the last commit (if any failed) succeeded
    /// since, the write lock can be taken, the index is at the head, and the
    /// disk has room.
    pub(super) fn ready(&self) -> Result<(), String> {
        if let Some(f) = &self.last_failure {
            return Err(format!("the last commit failed: {f}"));
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .map_err(|e| format!("cannot take the write lock: {e}"))?;
        let indexed = self
            .index
            .head()
            .map_err(|e| format!("index unreadable: {e}"))?;
        if indexed != self.head || self.index_behind {
            return Err(format!(
                "index at {indexed}, database at {}: not in step",
                self.head
            ));
        }
        if let Some(free) = free_bytes(self.conn.path().map(Path::new)) {
            if free < crate::limits::READY_DISK_FREE_BYTES_MIN {
                return Err(format!("only {free} bytes free on the database's disk"));
            }
        }
        Ok(())
    }

    pub(super) fn resync_index(&mut self) {
        match self.index.head().map_err(StorageError::from).and_then(|h| {
            self.index
                .index_range(&self.conn, h + 1)
                .map_err(|e| StorageError::other(e.to_string()))
        }) {
            Ok(_) => {
                self.index_behind = false;
                self.index_log.clear();
            }
            Err(e) => {
                if let Some(unlogged) = self.index_log.occur(std::time::Instant::now()) {
                    tracing::error!(tenant = %self.name, error = %e.message, failures_not_logged = unlogged, "index still behind SQLite; will retry before the next commit")
                }
            }
        }
    }
}

/// How each event of a request will be stored.
enum Slot {
    New { position: u64, version: Option<u64> },
    Duplicate(u64),
}

#[derive(Debug)]
pub(super) struct StorageError {
    pub(super) message: String,
    /// The disk, the database's size cap or the index's map is full: 507.
    pub(super) full: bool,
}

impl StorageError {
    fn cause(&self) -> Failure {
        if self.full {
            Failure::Full
        } else {
            Failure::Storage
        }
    }

    fn other(message: String) -> StorageError {
        StorageError {
            message,
            full: false,
        }
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        let full = matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DiskFull));
        StorageError {
            message: format!("SQLite: {e}"),
            full,
        }
    }
}
impl From<heed::Error> for StorageError {
    fn from(e: heed::Error) -> Self {
        let full = matches!(e, heed::Error::Mdb(heed::MdbError::MapFull));
        StorageError {
            message: format!("LMDB: {e}"),
            full,
        }
    }
}

/// What a store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// The newest this many events (0: all).
    pub events: u64,
    /// Events whose timestamp is younger than this (None: all).
    pub age: Option<Duration>,
}

/// Inside the commit's transaction: delete the next slice (at most
/// `PRUNE_ROWS_PER_COMMIT`) of events that `retention` no longer keeps, and
/// their ids and stream entries from the index. Returns the lowest position
/// left. Pruning only ever removes the oldest events, so positions stay
/// contiguous: by age, it stops at the first event young enough, even if a
/// later one carries an older timestamp. The newest event is always kept:
/// it holds the head, from which the next position is counted.
fn prune(
    index: &Index,
    retention: &Retention,
    low: u64,
    tx: &Connection,
    w: &mut heed::RwTxn<'_>,
    newest: u64,
) -> Result<u64, StorageError> {
    if newest < low + 1 {
        return Ok(low);
    }
    let slice_end = (low + crate::limits::PRUNE_ROWS_PER_COMMIT - 1).min(newest - 1);
    let mut upto = 0;
    if retention.events > 0 && newest > retention.events {
        upto = (newest - retention.events).min(slice_end);
    }
    if let Some(age) = retention.age {
        let cutoff = crate::event::format_timestamp(time::OffsetDateTime::now_utc() - age);
        // The first event of the slice young enough to keep; all before it go.
        let young: Option<i64> = tx
            .prepare_cached(
                "SELECT MIN(position) FROM events WHERE position BETWEEN ?1 AND ?2 \
                 AND julianday(timestamp) >= julianday(?3)",
            )?
            .query_row(
                rusqlite::params![low as i64, slice_end as i64, cutoff],
                |r| r.get(0),
            )?;
        let by_age = match young {
            Some(p) => (p as u64).saturating_sub(1),
            None => slice_end,
        };
        upto = upto.max(by_age);
    }
    if upto < low {
        return Ok(low);
    }
    debug_assert!(upto < newest, "pruning would remove the head");
    let mut del = tx.prepare_cached(
        "DELETE FROM events WHERE position BETWEEN ?1 AND ?2 RETURNING id, stream, stream_version",
    )?;
    let rows = del.query_map(rusqlite::params![low as i64, upto as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<String>>(1)?,
            r.get::<_, Option<i64>>(2)?,
        ))
    })?;
    for row in rows {
        let (id, stream, version) = row?;
        index.forget_event(w, &id, stream.as_deref().zip(version.map(|v| v as u64)))?;
    }
    Ok(upto + 1)
}

/// Check one request against the index (and the requests before it in this
/// group, which the write transactions already hold), then write it. A request
/// either writes all of its new events or none.
fn apply(
    index: &Index,
    tx: &Connection,
    stmt: &mut rusqlite::CachedStatement<'_>,
    w: &mut heed::RwTxn<'_>,
    req: AppendRequest,
    next: &mut u64,
    committed: &mut Vec<Event>,
) -> Result<Outcome, StorageError> {
    let many = req.events.len() > 1;
    // Ids and stream versions claimed earlier in this same request.
    let mut own_ids: HashMap<&str, u64> = HashMap::new();
    let mut own_streams: HashMap<&str, u64> = HashMap::new();
    let mut slots = Vec::with_capacity(req.events.len());
    let mut position = *next;
    for e in &req.events {
        let known = match own_ids.get(e.id.as_str()) {
            Some(p) => Some(*p),
            None => index.position_in(w, &e.id)?,
        };
        if let Some(p) = known {
            slots.push(Slot::Duplicate(p));
            continue;
        }
        let version = match &e.stream {
            None => None,
            Some(stream) => {
                let current = match own_streams.get(stream.as_str()) {
                    Some(v) => *v,
                    None => index.stream_version_in(w, stream)?,
                };
                if let Some(expected) = e.expected_version {
                    if expected != current {
                        return Ok(Outcome::Conflict {
                            stream: stream.clone(),
                            expected,
                            current,
                        });
                    }
                }
                own_streams.insert(stream, current + 1);
                Some(current + 1)
            }
        };
        if many {
            own_ids.insert(&e.id, position);
        }
        slots.push(Slot::New { position, version });
        position += 1;
    }
    drop(own_ids);
    drop(own_streams);

    let kind = req.kind;
    let (mut saved, mut duplicates) = (0usize, 0usize);
    let (mut first, mut last) = (u64::MAX, 0u64);
    let mut one = None;
    for (new, slot) in req.events.into_iter().zip(slots) {
        match slot {
            Slot::New { position, version } => {
                let event = Event {
                    position,
                    stream_version: version,
                    new,
                };
                storage::insert(stmt, &event)?;
                index.put_event(
                    w,
                    &event.new.id,
                    position,
                    event.new.stream.as_deref().zip(version),
                )?;
                saved += 1;
                first = first.min(position);
                last = last.max(position);
                if kind == AppendKind::One {
                    one = Some((event.clone(), false));
                }
                committed.push(event);
            }
            Slot::Duplicate(p) => {
                duplicates += 1;
                first = first.min(p);
                last = last.max(p);
                if kind == AppendKind::One {
                    let original = storage::event_at(tx, p)?.ok_or_else(|| {
                        StorageError::other(format!(
                            "index names position {p}, which SQLite does not hold"
                        ))
                    })?;
                    one = Some((original, true));
                }
            }
        }
    }
    *next = position;
    Ok(match (kind, one) {
        (AppendKind::One, Some((event, duplicate))) => Outcome::One { event, duplicate },
        _ => Outcome::Batch {
            saved,
            duplicates,
            first_position: first,
            last_position: last,
        },
    })
}

/// Free bytes on the filesystem holding `path` (None when unknown).
fn free_bytes(path: Option<&Path>) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path?.parent()?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the struct we pass and reads the C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

#[cfg(test)]
mod tests {
    //! The store's group commit on a real SQLite file and LMDB environment,
    //! without HTTP: what one commit answers for each request of a group.
    use super::*;
    use crate::event::NewEvent;

    struct Fixture {
        _dir: std::path::PathBuf,
        store: Store,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }

    fn open(name: &str, env: &[(&str, &str)]) -> Fixture {
        let (dir, cfg) = crate::config::for_tests(&format!("writer-{name}"), env);
        let (store, _) = Store::open("t", &cfg.database, &cfg.index, &cfg).unwrap();
        Fixture { _dir: dir, store }
    }

    fn ev(id: &str, stream: Option<&str>, expected: Option<u64>) -> NewEvent {
        NewEvent {
            id: id.into(),
            event_type: "t".into(),
            data: b"{}".to_vec(),
            timestamp: "2026-01-01T00:00:00Z".into(),
            stream: stream.map(Into::into),
            expected_version: expected,
            metadata: None,
        }
    }

    fn req(ticket: u64, kind: AppendKind, events: Vec<NewEvent>) -> (usize, AppendRequest) {
        (
            0,
            AppendRequest {
                ticket,
                tenant: 0,
                kind,
                events,
                consumer: None,
            },
        )
    }

    /// Commit one group; the answers by ticket and the events made durable.
    fn commit(store: &mut Store, group: Vec<(usize, AppendRequest)>) -> (Vec<Outcome>, Vec<Event>) {
        let mut answers = vec![Vec::new()];
        let committed = store.commit(group, &mut answers, None).unwrap_or_default();
        let mut answers = std::mem::take(&mut answers[0]);
        answers.sort_by_key(|(t, _)| *t);
        let outcomes = answers
            .into_iter()
            .map(|(_, r)| match r {
                Reply::Append(o) => o,
                Reply::Position(p) => panic!("an append answered as a position: {p:?}"),
            })
            .collect();
        (outcomes, committed)
    }

    fn position(o: &Outcome) -> (u64, bool) {
        match o {
            Outcome::One { event, duplicate } => (event.position, *duplicate),
            other => panic!("not a single append: {other:?}"),
        }
    }

    #[test]
    fn duplicates_inside_one_group_get_the_first_position() {
        let mut f = open("dup", &[]);
        let (out, committed) = commit(
            &mut f.store,
            vec![
                req(1, AppendKind::One, vec![ev("a", None, None)]),
                req(2, AppendKind::One, vec![ev("b", None, None)]),
                req(3, AppendKind::One, vec![ev("a", None, None)]),
                req(
                    4,
                    AppendKind::Batch,
                    vec![
                        ev("c", None, None),
                        ev("c", None, None),
                        ev("b", None, None),
                    ],
                ),
            ],
        );
        assert_eq!(position(&out[0]), (1, false));
        assert_eq!(position(&out[1]), (2, false));
        assert_eq!(
            position(&out[2]),
            (1, true),
            "a within the group: its first position"
        );
        match &out[3] {
            Outcome::Batch {
                saved,
                duplicates,
                first_position,
                last_position,
            } => {
                assert_eq!((*saved, *duplicates), (1, 2));
                assert_eq!((*first_position, *last_position), (2, 3));
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            committed.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![1, 2, 3],
            "contiguous, each new id once"
        );
        // And in a later group: still the original.
        let (out, committed) = commit(
            &mut f.store,
            vec![req(5, AppendKind::One, vec![ev("c", None, None)])],
        );
        assert_eq!(position(&out[0]), (3, true));
        assert!(committed.is_empty());
        assert_eq!(f.store.index.head().unwrap(), 3);
    }

    #[test]
    fn a_version_conflict_refuses_only_its_own_request() {
        let mut f = open("conflict", &[]);
        let (out, _) = commit(
            &mut f.store,
            vec![
                req(1, AppendKind::One, vec![ev("a", Some("s"), Some(0))]),
                // Expects 0 too, but `a` made the stream 1 earlier in this group.
                req(2, AppendKind::One, vec![ev("b", Some("s"), Some(0))]),
                req(3, AppendKind::One, vec![ev("c", Some("s"), Some(1))]),
                // A batch whose second event conflicts: none of it is written.
                req(
                    4,
                    AppendKind::Batch,
                    vec![ev("d", Some("s"), None), ev("e", Some("s"), Some(9))],
                ),
            ],
        );
        assert_eq!(position(&out[0]), (1, false));
        match &out[1] {
            Outcome::Conflict {
                stream,
                expected,
                current,
            } => assert_eq!((stream.as_str(), *expected, *current), ("s", 0, 1)),
            o => panic!("{o:?}"),
        }
        assert_eq!(position(&out[2]), (2, false));
        // Its `current` is the version as its own first event left it.
        assert!(
            matches!(
                &out[3],
                Outcome::Conflict {
                    expected: 9,
                    current: 3,
                    ..
                }
            ),
            "{:?}",
            out[3]
        );
        assert_eq!(f.store.index.stream_version("s").unwrap(), 2);
        assert_eq!(f.store.index.head().unwrap(), 2);
        assert_eq!(
            f.store.index.position_of("d").unwrap(),
            None,
            "nothing of the refused batch"
        );
    }

    #[test]
    fn pruning_keeps_positions_and_stream_versions() {
        let mut f = open("prune", &[("SHARDCAST_STORAGE_RETAIN_EVENTS", "3")]);
        for i in 0..6 {
            let id = format!("e{i}");
            commit(
                &mut f.store,
                vec![req(i, AppendKind::One, vec![ev(&id, Some("s"), None)])],
            );
        }
        // Pruning rides along with commits: the oldest went, the newest 3 stay.
        assert_eq!(storage::low(&f.store.conn).unwrap(), 4);
        assert_eq!(f.store.low, 4);
        assert_eq!(
            f.store.index.position_of("e0").unwrap(),
            None,
            "a pruned id is forgotten"
        );
        assert_eq!(f.store.index.position_of("e5").unwrap(), Some(6));
        // The stream goes on from its version, not from what is left of it.
        let (out, _) = commit(
            &mut f.store,
            vec![req(9, AppendKind::One, vec![ev("n", Some("s"), Some(6))])],
        );
        match &out[0] {
            Outcome::One { event, .. } => {
                assert_eq!((event.position, event.stream_version), (7, Some(7)))
            }
            o => panic!("{o:?}"),
        }
        let kept = f.store.index.stream_positions("s", 1, 100).unwrap();
        assert_eq!(kept, vec![5, 6, 7], "only what SQLite still holds");
    }

    #[test]
    fn an_index_behind_sqlite_is_brought_in_step_before_the_next_commit() {
        let mut f = open("resync", &[]);
        commit(
            &mut f.store,
            vec![req(1, AppendKind::One, vec![ev("a", None, None)])],
        );
        // As if the index commit after a SQLite commit had failed: an event
        // SQLite holds and the index does not know.
        {
            let e = Event {
                position: 2,
                stream_version: Some(1),
                new: ev("b", Some("s"), None),
            };
            let mut stmt = f.store.conn.prepare_cached(storage::INSERT_EVENT).unwrap();
            storage::insert(&mut stmt, &e).unwrap();
        }
        f.store.head = 2;
        f.store.index_behind = true;
        assert_eq!(f.store.index.head().unwrap(), 1);
        let (out, _) = commit(
            &mut f.store,
            vec![
                req(1, AppendKind::One, vec![ev("b", None, None)]),
                req(2, AppendKind::One, vec![ev("c", Some("s"), Some(1))]),
            ],
        );
        assert_eq!(position(&out[0]), (2, true), "b is known again");
        assert_eq!(position(&out[1]), (3, false), "and s is at version 1");
        assert!(!f.store.index_behind);
        assert_eq!(f.store.index.head().unwrap(), 3);
    }

    /// Cluster mode: the stream sequence is committed with the events it
    /// produced; a message that wrote nothing moves it in memory only; a
    /// reopened store resumes after the last sequence that wrote; another
    /// node's requests (`FOREIGN`) are applied but answered to nobody.
    #[test]
    fn a_replica_commits_its_stream_sequence_with_the_events() {
        let (dir, cfg) = crate::config::for_tests("writer-replica", &[]);
        let (mut store, _) = Store::open("t", &cfg.database, &cfg.index, &cfg).unwrap();
        assert_eq!(store.replicate("s_t").unwrap(), 0);
        let foreign = |id: &str| {
            let (_, r) = req(9, AppendKind::One, vec![ev(id, None, None)]);
            (crate::writer::FOREIGN, r)
        };
        let mut answers = vec![Vec::new()];
        let events = store
            .commit(
                vec![
                    req(1, AppendKind::One, vec![ev("a", None, None)]),
                    foreign("b"),
                ],
                &mut answers,
                Some(3),
            )
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(answers[0].len(), 1, "only this node's request is answered");
        assert_eq!(store.log_applied(), Some(3));
        // Only a duplicate: nothing written, the sequence moves in memory.
        let events = store
            .commit(vec![foreign("a")], &mut answers, Some(4))
            .unwrap();
        assert!(events.is_empty());
        assert_eq!(store.log_applied(), Some(4));
        store.close();

        let (mut store, _) = Store::open("t", &cfg.database, &cfg.index, &cfg).unwrap();
        assert_eq!(
            store.replicate("s_t").unwrap(),
            3,
            "resumes after the last sequence that wrote (4 wrote nothing)"
        );
        assert!(store
            .replicate("other_t")
            .unwrap_err()
            .contains("replicates JetStream stream s_t"));
        store.close();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A database with events of its own cannot become a replica.
    #[test]
    fn a_single_node_database_is_refused_as_a_replica() {
        let mut f = open("solo", &[]);
        commit(
            &mut f.store,
            vec![req(1, AppendKind::One, vec![ev("a", None, None)])],
        );
        let e = f.store.replicate("s_t").unwrap_err();
        assert!(
            e.contains("single-node database cannot become a replica"),
            "{e}"
        );
    }
}
