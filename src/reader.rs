//! The reader pool: `database.read_connections` threads, each owning one
//! read-only SQLite connection, that serve reads off the shards' executors
//! (an io_uring executor must never block on a disk read). Shards send a job
//! over one shared flume queue and await the answer on a one-shot channel, so
//! a long read delays nobody else on the shard.
//!
//! WAL mode lets these read while the writer commits; each query sees the
//! database as of its start, which is all a catch-up or a page needs (the
//! caller asks again for what came after).

use crate::config::DatabaseConfig;
use crate::event::Event;
use rusqlite::Connection;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce(&Connection) + Send>;

/// A handle shards clone; the threads stop when every handle is dropped.
#[derive(Clone)]
pub struct Readers {
    jobs: flume::Sender<Job>,
}

pub struct ReaderPool {
    pub readers: Readers,
    threads: Vec<JoinHandle<()>>,
}

impl ReaderPool {
    /// Open `cfg.read_connections` read-only connections, a thread each.
    pub fn start(cfg: &DatabaseConfig) -> rusqlite::Result<ReaderPool> {
        // Unbounded: jobs in flight are bounded by their callers, each
        // awaiting its answer before it sends another.
        let (jobs, rx) = flume::unbounded::<Job>();
        let mut threads = Vec::new();
        for i in 0..cfg.read_connections {
            let conn = crate::storage::open_reader(cfg)?;
            let rx = rx.clone();
            let t = std::thread::Builder::new()
                .name(format!("shardcast-read-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job(&conn);
                    }
                })
                .map_err(|e| {
                    rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                        Some(format!("cannot spawn reader thread: {e}")),
                    )
                })?;
            threads.push(t);
        }
        Ok(ReaderPool {
            readers: Readers { jobs },
            threads,
        })
    }

    /// Wait for the threads once every `Readers` clone is gone.
    pub fn join(self) {
        let ReaderPool { readers, threads } = self;
        drop(readers);
        for t in threads {
            let _ = t.join();
        }
    }
}

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
            .send_async(Box::new(move |conn: &Connection| {
                let _ = reply.send(read(conn).map_err(|e| e.to_string()));
            }))
            .await
            .map_err(|_| "the reader pool has stopped".to_string())?;
        answer
            .recv_async()
            .await
            .map_err(|_| "a reader thread stopped".to_string())?
    }

    /// Up to `limit` stored events in `from..=to`, optionally of one type,
    /// encoded on the pool thread straight from the rows: the JSON array and
    /// the last position in it.
    pub async fn range_json(
        &self,
        from: u64,
        to: u64,
        event_type: Option<String>,
        limit: usize,
    ) -> Result<(Vec<u8>, Option<u64>), String> {
        self.run(move |c| {
            crate::storage::events_range_json(c, from, to, event_type.as_deref(), limit)
        })
        .await
    }

    /// Up to `limit` stored events from `from` on.
    pub async fn events_from(&self, from: u64, limit: usize) -> Result<Vec<Event>, String> {
        self.run(move |c| crate::storage::events_from(c, from, limit))
            .await
    }

    /// The events at these positions, in the order given, as a JSON array,
    /// gzipped per `gzip_if`.
    pub async fn at_json(
        &self,
        positions: Vec<u64>,
        gzip_min: Option<usize>,
        level: u32,
    ) -> Result<(Vec<u8>, bool), String> {
        self.run(move |c| {
            let events = crate::storage::events_at(c, &positions)?;
            Ok(gzip_if(crate::event::events_json(&events), gzip_min, level))
        })
        .await
    }

    /// `range_json`, then `gzip_if`, both on the pool thread.
    pub async fn range_json_gzip(
        &self,
        from: u64,
        to: u64,
        event_type: Option<String>,
        limit: usize,
        gzip_min: Option<usize>,
        level: u32,
    ) -> Result<(Vec<u8>, bool), String> {
        self.run(move |c| {
            let (body, _) =
                crate::storage::events_range_json(c, from, to, event_type.as_deref(), limit)?;
            Ok(gzip_if(body, gzip_min, level))
        })
        .await
    }
}
