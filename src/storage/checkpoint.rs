//! WAL checkpoints, off the writer's thread.
//!
//! SQLite's own autocheckpoint runs inside the commit that crosses the
//! threshold, on the committing connection: copying the WAL into the database
//! and fsyncing it stalled every append behind it (p99 in the hundreds of ms
//! under load, measured with `scripts/bench-ingest.sh`). So the writer's
//! connection has autocheckpoint off; after each commit it notes the WAL's
//! frame count (a WAL hook, below) and, every `database.wal_autocheckpoint`
//! pages, nudges this thread, which holds its own connection and runs:
//!
//! * a PASSIVE checkpoint: copies and fsyncs while the writer keeps
//!   committing, never taking the writer's lock;
//! * a RESTART checkpoint once the WAL passes `database.journal_size_limit`:
//!   under continuous writes a passive checkpoint never catches the last
//!   frames, so the WAL could only grow. RESTART needs the write lock, which a
//!   busy writer almost never leaves free (measured: RESTART starved for 2 s
//!   while the WAL grew by 200 MB), so the checkpointer asks the writer to
//!   pause between two commits (`Pause`), copies the few frames since its last
//!   passive run, and lets the next commit start the WAL over: a pause of
//!   milliseconds instead of an unbounded file.

use crate::config::DatabaseConfig;
use rusqlite::Connection;
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;

thread_local! {
    /// Frames in the WAL after the calling thread's last commit (set by the hook).
    static WAL_FRAMES: Cell<u32> = const { Cell::new(0) };
}

/// How long the writer sleeps between tries while a checkpoint holds the lock.
const BUSY_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// `database.busy_timeout` in `BUSY_POLL`s. Written once at start and read
/// only while the writer is blocked on a lock, never on the request path.
static BUSY_TRIES_MAX: AtomicI32 = AtomicI32::new(25_000);

thread_local! {
    /// Times the calling thread (the writer) waited on a lock: a metric.
    static BUSY_RETRIES: Cell<u64> = const { Cell::new(0) };
}

/// The writer's busy retries so far (call on the writer's thread).
pub fn busy_retries() -> u64 {
    BUSY_RETRIES.with(|c| c.get())
}

fn writer_busy(tries: i32) -> bool {
    if tries >= BUSY_TRIES_MAX.load(Ordering::Relaxed) {
        return false;
    }
    BUSY_RETRIES.with(|c| c.set(c.get() + 1));
    std::thread::sleep(BUSY_POLL);
    true
}

fn on_wal_commit(_: &rusqlite::hooks::Wal, frames: std::os::raw::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|f| f.set(frames.max(0) as u32));
    Ok(())
}

/// The checkpointer's request that the writer hold still between commits.
struct Pause {
    /// The writer says it has stopped.
    parked: flume::Sender<()>,
    /// Dropped by the checkpointer when it is done: the writer goes on.
    resume: flume::Receiver<()>,
}

/// The writer's side: turns off SQLite's inline autocheckpoint on `conn`,
/// decides when to nudge the checkpointer, and pauses when asked.
pub struct WalWatch {
    nudge: flume::Sender<()>,
    pauses: flume::Receiver<Pause>,
    every_frames: u32,
    last_nudge_frames: u32,
    busy_timeout: std::time::Duration,
}

impl WalWatch {
    /// Install on the writer's connection (must be called on the writer's thread,
    /// which is the one that commits).
    pub fn install(
        conn: &Connection,
        checkpointer: &Checkpointer,
        busy_timeout: std::time::Duration,
    ) -> rusqlite::Result<WalWatch> {
        // Replaces the autocheckpoint hook, which is exactly what we want.
        conn.wal_hook(Some(on_wal_commit));
        // SQLite's default busy handler sleeps 1, 2, 5, 10 … 100 ms between
        // tries, so a RESTART checkpoint of 20 ms costs the writer up to 78.
        // Poll finely instead; the writer has nothing else to do meanwhile.
        BUSY_TRIES_MAX.store(
            (busy_timeout.as_micros() / BUSY_POLL.as_micros()).clamp(1, i32::MAX as u128) as i32,
            Ordering::Relaxed,
        );
        conn.busy_handler(Some(writer_busy))?;
        Ok(WalWatch {
            nudge: checkpointer.nudge.clone(),
            pauses: checkpointer.pauses.clone(),
            every_frames: checkpointer.every_frames,
            last_nudge_frames: 0,
            busy_timeout,
        })
    }

    /// Between two commits: if the checkpointer wants the write lock, hold
    /// still until it is done (never longer than `database.busy_timeout`).
    pub fn between_commits(&self) {
        if let Ok(p) = self.pauses.try_recv() {
            let _ = p.parked.try_send(());
            let _ = p.resume.recv_timeout(self.busy_timeout);
        }
    }

    /// After each commit: nudge once another `wal_autocheckpoint` pages are in the WAL.
    pub fn after_commit(&mut self) {
        let frames = WAL_FRAMES.with(|f| f.get());
        if frames < self.last_nudge_frames {
            // The WAL started over after a checkpoint.
            self.last_nudge_frames = 0;
        }
        if self.every_frames > 0 && frames >= self.last_nudge_frames + self.every_frames {
            self.last_nudge_frames = frames;
            // A nudge already pending is as good as a second one.
            let _ = self.nudge.try_send(());
        }
    }
}

pub struct Checkpointer {
    nudge: flume::Sender<()>,
    pauses: flume::Receiver<Pause>,
    every_frames: u32,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Start the checkpoint thread with its own connection to the database.
    pub fn spawn(cfg: &DatabaseConfig) -> rusqlite::Result<Checkpointer> {
        let conn = crate::storage::open_checkpointer(cfg)?;
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let every_frames = cfg.wal_autocheckpoint_pages;
        // RESTART when the WAL outgrows the size it is truncated back to; at
        // least a few passive rounds' worth, so RESTART stays the exception.
        let restart_frames = if cfg.journal_size_limit_bytes > 0 {
            ((cfg.journal_size_limit_bytes / page_size.max(512)) as u64)
                .max(4 * every_frames as u64)
        } else {
            16 * every_frames.max(1000) as u64
        };
        let (nudge, rx) = flume::bounded::<()>(1);
        let (pause_tx, pauses) = flume::bounded::<Pause>(1);
        let thread = std::thread::Builder::new()
            .name("shardcast-ckpt".into())
            .spawn(move || run(conn, rx, pause_tx, restart_frames))
            .map_err(|e| {
                rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                    Some(format!("cannot spawn checkpoint thread: {e}")),
                )
            })?;
        Ok(Checkpointer {
            nudge,
            pauses,
            every_frames,
            thread: Some(thread),
        })
    }

    /// Stop after the current checkpoint (the writer's last commit is already
    /// durable in the WAL; closing the last connection checkpoints the rest).
    pub fn stop(mut self) {
        let (dead, _) = flume::bounded(1);
        self.nudge = dead;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Passive rounds before a RESTART: each copies what the writer committed
/// during the one before, so the part RESTART copies with the writer
/// waiting shrinks round by round.
const PASSIVE_ROUNDS_BEFORE_RESTART: usize = 3;

/// How long the checkpointer waits for a busy writer to park before it tries
/// RESTART anyway (an idle writer, blocked waiting for work, never parks: it
/// holds no lock either).
const PARK_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

fn run(
    conn: Connection,
    nudges: flume::Receiver<()>,
    pauses: flume::Sender<Pause>,
    restart_frames: u64,
) {
    // Every sender gone (writer stopped, `stop` called): done.
    while nudges.recv().is_ok() {
        let mut log = 0;
        for round in 0..PASSIVE_ROUNDS_BEFORE_RESTART {
            let started = std::time::Instant::now();
            match checkpoint(&conn, "PASSIVE") {
                Ok((l, done)) => {
                    tracing::trace!(
                        log = l,
                        done,
                        millis = started.elapsed().as_millis() as u64,
                        "passive WAL checkpoint"
                    );
                    log = l;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "passive WAL checkpoint failed");
                    break;
                }
            }
            if log < restart_frames || round + 1 == PASSIVE_ROUNDS_BEFORE_RESTART {
                break;
            }
        }
        if log >= restart_frames {
            let started = std::time::Instant::now();
            let (parked_tx, parked) = flume::bounded(1);
            let (resume, resume_rx) = flume::bounded::<()>(1);
            let asked = pauses
                .try_send(Pause {
                    parked: parked_tx,
                    resume: resume_rx,
                })
                .is_ok();
            if asked {
                let _ = parked.recv_timeout(PARK_WAIT);
            }
            let result = checkpoint(&conn, "RESTART");
            // The writer goes on (also if it parks late: the sender is gone).
            drop(resume);
            match result {
                Ok((log, done)) => tracing::debug!(
                    log,
                    done,
                    millis = started.elapsed().as_millis() as u64,
                    "WAL restarted"
                ),
                Err(e) => tracing::warn!(error = %e, "restart WAL checkpoint failed"),
            }
        }
    }
}

/// Run one checkpoint; returns (frames in the WAL, frames copied).
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((
            r.get::<_, i64>(1)?.max(0) as u64,
            r.get::<_, i64>(2)?.max(0) as u64,
        ))
    })
}
