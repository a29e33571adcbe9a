//! Process lifecycle: open storage and bring the index in step, bind the
//! shards' sockets, start the writer thread and the shard executors, and stop
//! them in order on SIGTERM or SIGINT (stop accepting → finish in-flight
//! requests → writer commits what it holds → exit 0).

use crate::config::Config;
use crate::index::{Index, Recovery};
use crate::shard::{Control, ShardParts};
use crate::writer::Writer;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for StartError {}

fn start_err(what: &str, e: impl std::fmt::Display) -> StartError {
    StartError(format!("{what}: {e}"))
}

/// Pin the calling thread to one CPU.
fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "could not pin thread");
        }
    }
}

/// Raise RLIMIT_NOFILE's soft limit to the hard one; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        r.rlim_cur
    }
}

/// Run the server until a shutdown signal; returns once everything stopped.
pub fn run(cfg: Config) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
    // Every connection is a descriptor; 10,000 subscribers need more than the
    // usual soft limit of 1,024. The hard limit is the administrator's word.
    let nofile = raise_nofile();
    let wanted = cfg.server.max_connections + 1024;
    if (nofile as usize) < wanted {
        tracing::warn!(
            nofile,
            wanted,
            "RLIMIT_NOFILE is below the connection caps: raise LimitNOFILE"
        );
    }
    if cfg.auth.api_key.is_none() {
        tracing::warn!(listen = %cfg.server.listen, "no API key configured: every request is accepted; listening on loopback only");
    }

    // Storage first: an error here should stop the start before any socket opens.
    let _db_lock = crate::storage::lock_database(&cfg.database)
        .map_err(|e| start_err("cannot lock database", e))?;
    let conn = crate::storage::open_writer(&cfg.database).map_err(|e| {
        start_err(
            &format!("cannot open database {}", cfg.database.path.display()),
            e,
        )
    })?;
    let (index, recovery) = Index::open_checked(&cfg.index, &conn).map_err(|e| {
        start_err(
            &format!("cannot open index {}", cfg.index.path.display()),
            e,
        )
    })?;
    match &recovery {
        Recovery::InStep => tracing::info!("index in step with SQLite"),
        Recovery::CaughtUp { from, to } => tracing::info!(from, to, "index caught up from SQLite"),
        Recovery::Rebuilt { reason, events } => {
            tracing::warn!(%reason, events, "index rebuilt from SQLite")
        }
    }

    let shards = cfg.server.shards;
    let (addr, fds) = crate::accept::bind_listeners(cfg.server.listen, shards, cfg.server.backlog)
        .map_err(|e| start_err(&format!("cannot listen on {}", cfg.server.listen), e))?;

    let (to_writer, writer_rx) = flume::bounded(shards * 64);
    let mut reply_txs = Vec::new();
    let mut reply_rxs = Vec::new();
    let mut control_txs = Vec::new();
    let mut control_rxs = Vec::new();
    for _ in 0..shards {
        let (t, r) = flume::unbounded();
        reply_txs.push(t);
        reply_rxs.push(r);
        let (t, r) = flume::bounded(1);
        control_txs.push(t);
        control_rxs.push(r);
    }

    let start_head =
        crate::storage::head(&conn).map_err(|e| start_err("cannot read the database head", e))?;
    let reader_pool = crate::reader::ReaderPool::start(&cfg.database)
        .map_err(|e| start_err("cannot open read connections", e))?;
    let checkpointer = crate::checkpoint::Checkpointer::spawn(&cfg.database)
        .map_err(|e| start_err("cannot start the checkpoint thread", e))?;
    let writer = Writer::new(
        conn,
        index.clone(),
        writer_rx,
        reply_txs,
        &cfg,
        &checkpointer,
    )
    .map_err(|e| start_err("cannot start writer", e))?;
    let writer_cpu = cfg.writer.cpu;
    let writer_thread = std::thread::Builder::new()
        .name("shardcast-writer".into())
        .spawn(move || {
            if let Some(cpu) = writer_cpu {
                pin_current_thread(cpu);
            }
            writer.run()
        })
        .map_err(|e| start_err("cannot spawn writer thread", e))?;

    let mut handles = Vec::new();
    for (id, ((fd, from_writer), control)) in
        fds.into_iter().zip(reply_rxs).zip(control_rxs).enumerate()
    {
        let placement = match cfg.server.shard_cpus.get(id) {
            Some(cpu) => Placement::Fixed(*cpu),
            None => Placement::Unbound,
        };
        let parts = ShardParts {
            id,
            cfg: cfg.clone(),
            index: index.clone(),
            listener_fd: fd,
            to_writer: to_writer.clone(),
            from_writer,
            control,
            start_head,
            readers: reader_pool.readers.clone(),
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .io_memory(cfg.server.io_memory_bytes)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(1))
            .spawn(move || crate::shard::run(parts))
            .map_err(|e| start_err(&format!("cannot start shard {id}"), e))?;
        handles.push(handle);
    }
    // Only the shards hold senders now: the writer stops when the last shard hangs up.
    drop(to_writer);

    // Handlers first: once we announce, a SIGTERM must drain, not kill.
    spawn_signal_thread(control_txs, cfg.server.shutdown_timeout)?;
    announce(addr, &cfg);

    for (id, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            tracing::error!(shard = id, error = %e, "shard ended with an error");
        }
    }
    match writer_thread.join() {
        Ok(stats) => tracing::info!(
            commits = stats.commits,
            events = stats.events,
            "shutdown complete"
        ),
        Err(_) => return Err(StartError("writer thread panicked".into())),
    }
    checkpointer.stop();
    reader_pool.join();
    drop(index);
    Ok(())
}

fn announce(addr: SocketAddr, cfg: &Config) {
    tracing::info!(
        %addr,
        shards = cfg.server.shards,
        shard_cpus = ?cfg.server.shard_cpus,
        writer_cpu = ?cfg.writer.cpu,
        database = %cfg.database.path.display(),
        index = %cfg.index.path.display(),
        synchronous = cfg.database.synchronous.pragma(),
        "shardcast listening"
    );
    // One plain line on stdout for scripts and tests that start us on port 0.
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// SIGTERM/SIGINT → tell every shard to drain; a second signal, or the
/// shutdown timeout passing, ends the process at once.
fn spawn_signal_thread(
    controls: Vec<flume::Sender<Control>>,
    timeout: std::time::Duration,
) -> Result<(), StartError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| start_err("cannot install signal handlers", e))?;
    std::thread::Builder::new()
        .name("shardcast-signals".into())
        .spawn(move || {
            let mut first = None;
            for sig in signals.forever() {
                match first {
                    None => {
                        tracing::info!(
                            signal = sig,
                            timeout_ms = timeout.as_millis() as u64,
                            "shutting down"
                        );
                        let started = Instant::now();
                        first = Some(started);
                        // Shards drain until 90% of the timeout, leaving the rest for the writer's last commit.
                        let deadline = started + timeout.mul_f64(0.9);
                        for c in &controls {
                            let _ = c.try_send(Control::Shutdown { deadline });
                        }
                        std::thread::spawn(move || {
                            std::thread::sleep(timeout);
                            tracing::error!("shutdown timeout passed; exiting now");
                            std::process::exit(0);
                        });
                    }
                    Some(_) => {
                        tracing::warn!("second signal: exiting now");
                        std::process::exit(130);
                    }
                }
            }
        })
        .map_err(|e| start_err("cannot spawn signal thread", e))?;
    Ok(())
}
