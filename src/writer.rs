//! The writer: one OS thread, pinned to its own CPU, that owns the SQLite
//! connection and is the only writer of the LMDB index.
//!
//! Each wakeup it takes everything the shards have queued (up to
//! `writer.batch_events_max` events), checks it (idempotency, stream versions),
//! writes it in one SQLite transaction, commits, updates the index, and only
//! then answers: one message per shard per commit. A client's 2xx therefore
//! always follows the commit of its events (group commit).

use crate::checkpoint::WalWatch;
use crate::event::{Event, NewEvent};
use crate::index::Index;
use crate::storage;
use rusqlite::{Connection, TransactionBehavior};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A group commit slower than this is logged with where its time went.
const SLOW_COMMIT_WARN: Duration = Duration::from_millis(100);

/// What a request asks for; decides the shape of its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendKind {
    /// `POST /events`: answered with the stored event.
    One,
    /// `POST /events/batch`: all or nothing, answered with a summary.
    Batch,
    /// `POST|PUT /subscriptions/{id}/position`: no events; `consumer` is set.
    Consumer,
}

/// One HTTP request's events, on their way to the writer.
#[derive(Debug)]
pub struct AppendRequest {
    /// Shard-local number the answer is matched back by.
    pub ticket: u64,
    pub kind: AppendKind,
    pub events: Vec<NewEvent>,
    /// For `AppendKind::Consumer`: the consumer id and the position to save.
    pub consumer: Option<(String, u64)>,
}

/// Shard → writer: every request a shard queued since its last message.
#[derive(Debug)]
pub struct ToWriter {
    pub shard: usize,
    pub requests: Vec<AppendRequest>,
}

/// The answer to one request.
#[derive(Debug)]
pub enum Outcome {
    One {
        event: Event,
        duplicate: bool,
    },
    Batch {
        saved: usize,
        duplicates: usize,
        first_position: u64,
        last_position: u64,
    },
    /// `expected_version` did not match; nothing of the request was written.
    Conflict {
        stream: String,
        expected: u64,
        current: u64,
    },
    /// A consumer position was saved.
    PositionSaved,
    /// A consumer position beyond the head was refused.
    PositionBeyondHead {
        head: u64,
    },
    /// Storage failed; nothing of the request was written.
    Failed {
        message: String,
    },
}

/// Writer → shard: one message per shard per commit, with the answers to
/// that shard's requests and the events the commit made durable (shared by
/// every shard: each encodes them once into its SSE ring).
#[derive(Debug)]
pub struct FromWriter {
    pub replies: Vec<(u64, Outcome)>,
    /// In position order, contiguous, following the previous message's.
    pub events: Arc<Vec<Event>>,
}

pub struct Writer {
    conn: Connection,
    index: Index,
    rx: flume::Receiver<ToWriter>,
    shards: Vec<flume::Sender<FromWriter>>,
    batch_events_max: usize,
    /// Position of the last committed event; the next gets `head + 1`.
    head: u64,
    /// The index missed a commit (its own commit failed); bring it up to date first.
    index_behind: bool,
    carry: Option<ToWriter>,
    /// Nudges the checkpoint thread as the WAL grows.
    wal: WalWatch,
    /// `storage.retain_events` (0: keep everything).
    retain_events: u64,
    /// Lowest stored position: where pruning continues.
    low: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct WriterStats {
    pub commits: u64,
    pub events: u64,
}

/// How each event of a request will be stored.
enum Slot {
    New { position: u64, version: Option<u64> },
    Duplicate(u64),
}

#[derive(Debug)]
struct StorageError(String);

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError(format!("SQLite: {e}"))
    }
}
impl From<heed::Error> for StorageError {
    fn from(e: heed::Error) -> Self {
        StorageError(format!("LMDB: {e}"))
    }
}

impl Writer {
    pub fn new(
        conn: Connection,
        index: Index,
        rx: flume::Receiver<ToWriter>,
        shards: Vec<flume::Sender<FromWriter>>,
        cfg: &crate::config::Config,
        checkpointer: &crate::checkpoint::Checkpointer,
    ) -> Result<Writer, rusqlite::Error> {
        let head = storage::head(&conn)?;
        let low = storage::low(&conn)?;
        let wal = WalWatch::install(&conn, checkpointer, cfg.database.busy_timeout)?;
        let batch_events_max = cfg.writer.batch_events_max;
        let retain_events = cfg.storage.retain_events;
        Ok(Writer {
            conn,
            index,
            rx,
            shards,
            batch_events_max,
            head,
            index_behind: false,
            carry: None,
            wal,
            retain_events,
            low,
        })
    }

    /// Run until every shard has hung up, committing everything they sent.
    pub fn run(mut self) -> WriterStats {
        let mut stats = WriterStats::default();
        while let Some(group) = self.next_group() {
            self.wal.between_commits();
            let started = Instant::now();
            let n = self.commit_group(group);
            stats.commits += 1;
            stats.events += n as u64;
            tracing::trace!(
                events = n,
                micros = started.elapsed().as_micros() as u64,
                "group commit"
            );
        }
        tracing::info!(
            commits = stats.commits,
            events = stats.events,
            head = self.head,
            "writer stopped"
        );
        stats
    }

    /// Block for the first message, then take whatever else is queued without
    /// waiting, up to `batch_events_max` events. None when all shards are gone.
    fn next_group(&mut self) -> Option<Vec<ToWriter>> {
        let first = match self.carry.take() {
            Some(m) => m,
            None => self.rx.recv().ok()?,
        };
        let mut events = count_events(&first);
        let mut group = vec![first];
        while events < self.batch_events_max {
            match self.rx.try_recv() {
                Ok(m) => {
                    let n = count_events(&m);
                    if events + n > self.batch_events_max {
                        self.carry = Some(m);
                        break;
                    }
                    events += n;
                    group.push(m);
                }
                Err(_) => break,
            }
        }
        Some(group)
    }

    /// Write one group in one transaction and answer every request in it.
    /// Returns the number of events written.
    fn commit_group(&mut self, group: Vec<ToWriter>) -> usize {
        if self.index_behind {
            self.resync_index();
        }
        let before = self.head;
        let mut answers: Vec<Vec<(u64, Outcome)>> =
            (0..self.shards.len()).map(|_| Vec::new()).collect();
        let tickets: Vec<(usize, u64)> = group
            .iter()
            .flat_map(|m| m.requests.iter().map(move |r| (m.shard, r.ticket)))
            .collect();
        let mut committed = Vec::new();
        match self.write(group, &mut answers, &mut committed) {
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
                let events = Arc::new(committed);
                for (shard, replies) in answers.into_iter().enumerate() {
                    if !replies.is_empty() || !events.is_empty() {
                        // A shard that already stopped has no one left to answer.
                        let _ = self.shards[shard].send(FromWriter {
                            replies,
                            events: events.clone(),
                        });
                    }
                }
                written
            }
            Err(e) => {
                tracing::error!(error = %e.0, "group commit failed; nothing of it was written");
                self.head = before;
                let mut per_shard: Vec<Vec<(u64, Outcome)>> =
                    (0..self.shards.len()).map(|_| Vec::new()).collect();
                for (shard, ticket) in tickets {
                    per_shard[shard].push((
                        ticket,
                        Outcome::Failed {
                            message: e.0.clone(),
                        },
                    ));
                }
                let none = Arc::new(Vec::new());
                for (shard, replies) in per_shard.into_iter().enumerate() {
                    if !replies.is_empty() {
                        let _ = self.shards[shard].send(FromWriter {
                            replies,
                            events: none.clone(),
                        });
                    }
                }
                0
            }
        }
    }

    fn write(
        &mut self,
        group: Vec<ToWriter>,
        answers: &mut [Vec<(u64, Outcome)>],
        committed: &mut Vec<Event>,
    ) -> Result<usize, StorageError> {
        let t0 = Instant::now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut w = self.index.env.write_txn()?;
        let t_begin = t0.elapsed();
        let mut next = self.head + 1;
        let mut consumers_saved = false;
        {
            let mut stmt = tx.prepare_cached(storage::INSERT_EVENT)?;
            for msg in group {
                for req in msg.requests {
                    let ticket = req.ticket;
                    if let (AppendKind::Consumer, Some((id, position))) = (req.kind, &req.consumer)
                    {
                        // Positions of this same group count: they commit together.
                        let head = next - 1;
                        let outcome = if *position > head {
                            Outcome::PositionBeyondHead { head }
                        } else {
                            storage::set_consumer(&tx, id, *position)?;
                            self.index.consumers.put(&mut w, id.as_bytes(), position)?;
                            consumers_saved = true;
                            Outcome::PositionSaved
                        };
                        answers[msg.shard].push((ticket, outcome));
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
                    answers[msg.shard].push((ticket, outcome));
                }
            }
        }
        let written = (next - 1 - self.head) as usize;
        if written == 0 && !consumers_saved {
            // Only duplicates or conflicts: nothing to make durable.
            committed.clear();
            drop(w);
            tx.rollback()?;
            return Ok(0);
        }
        self.index.set_head(&mut w, next - 1)?;
        let low = prune(
            &self.index,
            self.retain_events,
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
            tracing::error!(error = %e, "index commit failed after SQLite commit; re-indexing from SQLite");
            self.index_behind = true;
            self.resync_index();
        }
        let total = t0.elapsed();
        if total >= SLOW_COMMIT_WARN {
            tracing::warn!(
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

    fn resync_index(&mut self) {
        match self.index.head().map_err(StorageError::from).and_then(|h| {
            self.index
                .index_range(&self.conn, h + 1)
                .map_err(|e| StorageError(e.to_string()))
        }) {
            Ok(_) => self.index_behind = false,
            Err(e) => {
                tracing::error!(error = %e.0, "index still behind SQLite; will retry before the next commit")
            }
        }
    }
}

/// Inside the commit's transaction: delete the next slice of events older
/// than the newest `retain_events`, and their ids from the index. Returns
/// the lowest position left.
fn prune(
    index: &Index,
    retain_events: u64,
    low: u64,
    tx: &Connection,
    w: &mut heed::RwTxn<'_>,
    newest: u64,
) -> Result<u64, StorageError> {
    if retain_events == 0 || newest <= retain_events {
        return Ok(low);
    }
    let cutoff = newest - retain_events;
    if low > cutoff {
        return Ok(low);
    }
    let upto = cutoff.min(low + crate::limits::PRUNE_ROWS_PER_COMMIT - 1);
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
        index.ids.delete(w, id.as_bytes())?;
        if let (Some(s), Some(v)) = (stream, version) {
            index
                .stream_events
                .delete(w, &crate::index::stream_key(&s, v as u64))?;
        }
    }
    Ok(upto + 1)
}

fn count_events(m: &ToWriter) -> usize {
    m.requests.iter().map(|r| r.events.len()).sum()
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
            None => index.ids.get(w, e.id.as_bytes())?,
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
                    None => index.streams.get(w, stream.as_bytes())?.unwrap_or(0),
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
                index.ids.put(w, event.new.id.as_bytes(), &position)?;
                if let (Some(s), Some(v)) = (&event.new.stream, version) {
                    index.streams.put(w, s.as_bytes(), &v)?;
                    index
                        .stream_events
                        .put(w, &crate::index::stream_key(s, v), &position)?;
                }
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
                        StorageError(format!(
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
