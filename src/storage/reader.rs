//! The reader pool: `database.read_connections` threads, each holding a
//! read-only SQLite connection per tenant it has served, that serve reads
//! off the shards' executors
//! (an io_uring executor must never block on a disk read). Shards send a job
//! over one shared flume queue and await the answer on a one-shot channel, so
//! a long read delays nobody else on the shard.
//!
//! WAL mode lets these read while the writer commits; each query sees the
//! database as of its start, which is all a catch-up or a page needs (the
//! caller asks again for what came after).

use crate::config::DatabaseConfig;
use crate::event::Event;
use crate::filter::Filter;
use crate::ids::TenantId;
use crate::storage::Page;
use rusqlite::Connection;
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce(Result<&Connection, String>) + Send>;

/// A tenant's read: which database, and what to do with a connection to it.
struct Read {
    tenant: TenantId,
    database: Arc<DatabaseConfig>,
    job: Job,
}

/// Connections a reader thread keeps open; past this (tenants removed and
/// added over a long life) it closes them all and reopens on demand.
const CONNECTIONS_PER_THREAD_MAX: usize = 256;

/// A handle shards clone, bound to one tenant's database; the threads stop
/// when every handle is dropped.
#[derive(Clone)]
pub struct Readers {
    jobs: flume::Sender<Read>,
    /// Pool threads: how many parts a large page may be read in at once.
    threads: usize,
    tenant: TenantId,
    database: Arc<DatabaseConfig>,
}

/// The pool, without a tenant: makes `Readers` for one.
#[derive(Clone)]
pub struct ReaderHandle {
    jobs: flume::Sender<Read>,
    count: usize,
}

impl ReaderHandle {
    /// A handle for one tenant's reads.
    pub fn readers(&self, tenant: TenantId, database: Arc<DatabaseConfig>) -> Readers {
        Readers {
            jobs: self.jobs.clone(),
            threads: self.count,
            tenant,
            database,
        }
    }
}

pub struct ReaderPool {
    jobs: flume::Sender<Read>,
    count: usize,
    threads: Vec<JoinHandle<()>>,
}

impl ReaderPool {
    /// Start `count` reader threads. Each opens a read-only connection to a
    /// tenant's database the first time it serves that tenant, and keeps it.
    pub fn start(count: usize) -> std::io::Result<ReaderPool> {
        // Unbounded: jobs in flight are bounded by their callers, each
        // awaiting its answer before it sends another.
        let (jobs, rx) = flume::unbounded::<Read>();
        let mut threads = Vec::new();
        for i in 0..count {
            let rx = rx.clone();
            let t = std::thread::Builder::new()
                .name(format!("shardcast-read-{i}"))
                .spawn(move || {
                    let mut conns: HashMap<TenantId, Connection> = HashMap::new();
                    while let Ok(read) = rx.recv() {
                        if !conns.contains_key(&read.tenant) {
                            if conns.len() >= CONNECTIONS_PER_THREAD_MAX {
                                conns.clear();
                            }
                            match crate::storage::open_reader(&read.database) {
                                Ok(c) => {
                                    conns.insert(read.tenant, c);
                                }
                                Err(e) => {
                                    (read.job)(Err(format!("cannot open a read connection: {e}")));
                                    continue;
                                }
                            }
                        }
                        (read.job)(Ok(&conns[&read.tenant]));
                    }
                })?;
            threads.push(t);
        }
        Ok(ReaderPool {
            jobs,
            count,
            threads,
        })
    }

    /// What shards make tenants' read handles from.
    pub fn handle(&self) -> ReaderHandle {
        ReaderHandle {
            jobs: self.jobs.clone(),
            count: self.count,
        }
    }

    /// Wait for the threads once every `Readers` clone is gone.
    pub fn join(self) {
        let ReaderPool { jobs, threads, .. } = self;
        drop(jobs);
        for t in threads {
            let _ = t.join();
        }
    }
}

pub use crate::http::response::Answer;

/// Fewest events in a page worth reading as several concurrent parts: below
/// this the hand-off and the join cost more than the scan they split.
pub const PAGE_SPLIT_MIN_EVENTS: usize = 2_000;

/// Gzip `body` when `min` allows it and it is at least that large; says
/// whether it did. Runs on a reader thread, never on a shard.
pub fn gzip_if(body: Vec<u8>, min: Option<usize>, level: u32) -> (Vec<u8>, bool) {
    use std::io::Write;
    match min {
        Some(min) if body.len() >= min => {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::new(level),
            );
            // Writing to a Vec cannot fail.
            if enc.write_all(&body).is_ok() {
                if let Ok(z) = enc.finish() {
                    return (z, true);
                }
            }
            (body, false)
        }
        _ => (body, false),
    }
}

impl Readers {
    /// Run `read` on a pool thread and await its result.
    pub async fn run<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let (reply, answer) = flume::bounded(1);
        self.jobs
            .send_async(Read {
                tenant: self.tenant,
                database: self.database.clone(),
                job: Box::new(move |conn: Result<&Connection, String>| {
                    let _ = reply.send(conn.and_then(|c| read(c).map_err(|e| e.to_string())));
                }),
            })
            .await
            .map_err(|_| "the reader pool has stopped".to_string())?;
        answer
            .recv_async()
            .await
            .map_err(|_| "a reader thread stopped".to_string())?
    }

    /// Up to `limit` stored events in `from..=to`, optionally of one type,
    /// encoded on the pool thread straight from the rows.
    pub async fn range_json(
        &self,
        from: u64,
        to: u64,
        event_type: Option<String>,
        limit: usize,
        scope: Option<Filter>,
    ) -> Result<Page, String> {
        self.run(move |c| {
            crate::storage::events_range_json(
                c,
                from,
                to,
                event_type.as_deref(),
                limit,
                scope.as_ref(),
            )
        })
        .await
    }

    /// `GET /events`: `range_json`, gzipped per `gzip_if` on the pool.
    ///
    /// An unfiltered, uncompressed page of at least `PAGE_SPLIT_MIN_EVENTS`
    /// that lies wholly at or below `head` (committed before this call, so
    /// every snapshot sees all of it) is read as one position range per pool
    /// thread, concurrently, and the parts are joined: the SQLite scan and
    /// encoding are ~90% of a 10,000-event answer, and positions are
    /// contiguous, so the parts are exactly the slices the single scan would
    /// have returned. If any part comes back short (retention pruned below
    /// it meanwhile), the page is read again in one piece, so the answer is
    /// always the one a single scan gives.
    ///
    /// With a `scope` (a token's), events outside it are left out; a page
    /// cut by `SCOPED_SCAN_ROWS_MAX` says where to go on like one cut by
    /// `limit`.
    #[allow(clippy::too_many_arguments)]
    pub async fn page_json(
        &self,
        from: u64,
        to: u64,
        event_type: Option<String>,
        limit: usize,
        head: u64,
        gzip_min: Option<usize>,
        level: u32,
        scope: Option<Filter>,
    ) -> Result<Answer, String> {
        let from = from.max(1);
        let end = to.min(head);
        let span = end.checked_sub(from).map_or(0, |d| d.saturating_add(1));
        let n = span.min(limit as u64) as usize;
        let parts = self.threads.min(n / (PAGE_SPLIT_MIN_EVENTS / 2)).max(1);
        if event_type.is_some()
            || scope.is_some()
            || gzip_min.is_some()
            || parts < 2
            || n < PAGE_SPLIT_MIN_EVENTS
        {
            return self
                .run(move |c| {
                    let page = crate::storage::events_range_json(
                        c,
                        from,
                        to,
                        event_type.as_deref(),
                        limit,
                        scope.as_ref(),
                    )?;
                    let next = page.next_from(limit, end);
                    let (body, gzipped) = gzip_if(page.json, gzip_min, level);
                    let mut answer = Answer::one(body, gzipped);
                    answer.next_from = next;
                    Ok(answer)
                })
                .await;
        }
        let each = n.div_ceil(parts);
        let reads = (0..parts).map(|i| {
            let lo = from + (i * each) as u64;
            let len = each.min(n - i * each);
            (
                lo,
                len,
                self.range_json(lo, lo + len as u64 - 1, None, len, None),
            )
        });
        let mut want = Vec::with_capacity(parts);
        let mut futures = Vec::with_capacity(parts);
        for (lo, len, f) in reads {
            want.push((lo, len));
            futures.push(f);
        }
        let mut pages = Vec::with_capacity(parts);
        for f in join_all(futures).await {
            pages.push(f?);
        }
        let whole = pages
            .iter()
            .zip(&want)
            .all(|(p, &(lo, len))| p.count == len && p.last == Some(lo + len as u64 - 1));
        if !whole {
            return self.range_json(from, to, None, limit, None).await.map(|p| {
                let next = p.next_from(limit, end);
                let mut answer = Answer::one(p.json, false);
                answer.next_from = next;
                answer
            });
        }
        Ok(Answer {
            parts: pages.into_iter().map(|p| p.json).collect(),
            gzipped: false,
            next_from: None,
        }
        .cut(n, Some(from + n as u64 - 1), limit, end))
    }

    /// Up to `limit` stored events from `from` on.
    pub async fn events_from(&self, from: u64, limit: usize) -> Result<Vec<Event>, String> {
        self.run(move |c| crate::storage::events_from(c, from, limit))
            .await
    }

    /// The events at these positions, in the order given, as a JSON array,
    /// gzipped per `gzip_if`; with a `scope`, only those within it.
    pub async fn at_json(
        &self,
        positions: Vec<u64>,
        gzip_min: Option<usize>,
        level: u32,
        scope: Option<Filter>,
    ) -> Result<(Vec<u8>, bool), String> {
        self.run(move |c| {
            let mut events = crate::storage::events_at(c, &positions)?;
            if let Some(scope) = &scope {
                events.retain(|e| scope.matches(&e.new.event_type, e.new.stream.as_deref()));
            }
            Ok(gzip_if(crate::event::events_json(&events), gzip_min, level))
        })
        .await
    }
}

/// Await every future, polled together (the parts of a split page run on
/// different pool threads; awaiting them in turn would still overlap them,
/// but this keeps each part's reply from waiting on the one before).
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    //! The pool on a real SQLite file, driven without an executor (its
    //! channels work from any thread).
    use super::*;
    use crate::event::NewEvent;

    #[test]
    fn a_page_read_in_parts_is_the_page_read_whole_and_scopes_hold() {
        let (dir, cfg) = crate::config::for_tests("reader", &[]);
        let conn = crate::storage::open_writer(&cfg.database).unwrap();
        let n = 5_000u64;
        {
            let tx = conn.unchecked_transaction().unwrap();
            let mut stmt = tx.prepare_cached(crate::storage::INSERT_EVENT).unwrap();
            for p in 1..=n {
                let e = Event {
                    position: p,
                    stream_version: None,
                    new: NewEvent {
                        id: format!("e{p}"),
                        event_type: if p % 3 == 0 { "three" } else { "other" }.into(),
                        data: format!("{{\"p\":{p}}}").into_bytes(),
                        timestamp: "2026-01-01T00:00:00Z".into(),
                        stream: None,
                        expected_version: None,
                        metadata: None,
                    },
                };
                crate::storage::insert(&mut stmt, &e).unwrap();
            }
            drop(stmt);
            tx.commit().unwrap();
        }
        let pool = ReaderPool::start(2).unwrap();
        let readers = pool.handle().readers(1, Arc::new(cfg.database.clone()));
        let block = futures_lite::future::block_on;
        // 4,000 events at or below the head: read as two parts at once.
        let parts = block(readers.page_json(1, u64::MAX, None, 4_000, n, None, 6, None)).unwrap();
        assert_eq!(parts.parts.len(), 2, "split over the pool's two threads");
        let mut joined = Vec::new();
        parts.write_to(&mut joined);
        let whole =
            crate::storage::events_range_json(&conn, 1, u64::MAX, None, 4_000, None).unwrap();
        assert_eq!(joined, whole.json, "the parts make the single scan's page");
        assert_eq!(
            parts.next_from,
            Some(4_001),
            "cut by the limit before the head"
        );
        // A scope: only its events, in one piece.
        let scope = crate::filter::Filter {
            types: vec![crate::filter::Pattern::Exact("three".into())],
            streams: Vec::new(),
        };
        let scoped = block(readers.page_json(1, 30, None, 100, n, None, 6, Some(scope))).unwrap();
        let mut body = Vec::new();
        scoped.write_to(&mut body);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let positions: Vec<u64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["position"].as_u64().unwrap())
            .collect();
        assert_eq!(positions, (1..=10).map(|i| i * 3).collect::<Vec<_>>());
        drop(readers);
        pool.join();
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
    }
}
