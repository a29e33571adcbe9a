//! Process lifecycle: open storage and bring the index in step, bind the
//! shards' sockets, start the writer thread and the shard executors, and stop
//! them in order on SIGTERM or SIGINT (stop accepting → finish in-flight
//! requests → writer commits what it holds → exit 0).

pub mod accept;
pub mod connection;
pub mod executor;

use crate::config::Config;
use crate::shard::Control;
use crate::tenant::{Tenancy, TenantId, TenantInfo, TenantSet, TenantSpec};
use crate::writer::{Store, Writer, WriterControl};
use executor::ShardParts;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use std::collections::HashMap;
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

/// Reads the configuration again (files and environment) for a reload.
pub type LoadConfig = Box<dyn Fn() -> Result<Config, String> + Send>;

/// RLIMIT_MEMLOCK's soft limit in bytes (u64::MAX when unlimited).
fn memlock_limit() -> u64 {
    // SAFETY: getrlimit writes the struct we pass.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) != 0 {
            return u64::MAX;
        }
        if r.rlim_cur == libc::RLIM_INFINITY {
            u64::MAX
        } else {
            r.rlim_cur
        }
    }
}

/// Run the server until a shutdown signal; returns once everything stopped.
/// `reload` is called on SIGHUP: tenants and keys change, the rest needs a restart.
///
/// Long: the process's start in order (config, storage, listeners, writer,
/// readers, shards, signals) and its orderly stop; each step's failure is
/// reported where it happens.
pub fn run(cfg: Config, reload: LoadConfig) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
    // Every connection is a descriptor; 10,000 subscribers need more than the
    // usual soft limit of 1,024. The hard limit is the administrator's word.
    let nofile = raise_nofile();
    // io_uring's registered buffers are locked memory: each shard needs its
    // `io_memory_bytes` under RLIMIT_MEMLOCK, or its executor fails to start.
    let memlock = memlock_limit();
    let memlock_wanted = (cfg.server.shards * cfg.server.io_memory_bytes) as u64;
    if memlock < memlock_wanted {
        tracing::warn!(
            memlock,
            wanted = memlock_wanted,
            "RLIMIT_MEMLOCK is below shards × server.io_memory_bytes: lower io_memory_bytes or raise LimitMEMLOCK"
        );
    }
    let wanted = cfg.server.max_connections + 1024;
    if (nofile as usize) < wanted {
        tracing::warn!(
            nofile,
            wanted,
            "RLIMIT_NOFILE is below the connection caps: raise LimitNOFILE"
        );
    }
    if cfg.auth.api_key.is_none() && cfg.auth.tenants_file.is_none() && cfg.tenants.is_empty() {
        tracing::warn!(listen = %cfg.server.listen, "no API key configured: every request is accepted; listening on loopback only");
    }

    // Storage first: an error here should stop the start before any socket opens.
    let tenancy = Tenancy::from_config(&cfg).map_err(|e| start_err("bad tenants", e))?;
    let mut registry = Registry::default();
    let mut stores = HashMap::new();
    for spec in &tenancy.tenants {
        let id = registry.next_id();
        match Store::open(&spec.name, &spec.database, &spec.index, &cfg) {
            Ok((store, index)) => {
                stores.insert(id, store);
                registry.add(id, spec, Some(index), None);
            }
            // One tenant's broken storage must not keep the others down.
            Err(e) if tenancy.multi => {
                tracing::error!(tenant = %spec.name, error = %e, "tenant unavailable");
                registry.add(id, spec, None, Some(e.to_string()));
            }
            Err(e) => return Err(StartError(e.to_string())),
        }
    }
    // Cluster mode: every tenant's store is a replica of its stream.
    let mut replicas = Vec::new();
    if let Some(cc) = &cfg.cluster {
        for (id, store) in stores.iter_mut() {
            let stream = crate::cluster::stream_name(cc, &store.name);
            let applied = store.replicate(&stream).map_err(StartError)?;
            replicas.push(crate::cluster::Replica {
                tenant: *id,
                name: store.name.clone(),
                applied,
            });
        }
        replicas.sort_by_key(|r| r.tenant);
    }
    let set = registry.set(&tenancy);

    let shards = cfg.server.shards;
    let (addr, fds) = accept::bind_listeners(cfg.server.listen, shards, cfg.server.backlog)
        .map_err(|e| start_err(&format!("cannot listen on {}", cfg.server.listen), e))?;

    let (to_writer, writer_rx) =
        flume::bounded(shards * crate::limits::WRITER_INBOX_MESSAGES_PER_SHARD);
    let (writer_control, writer_control_rx) = flume::unbounded();
    let mut reply_txs = Vec::new();
    let mut reply_rxs = Vec::new();
    let mut control_txs = Vec::new();
    let mut control_rxs = Vec::new();
    for _ in 0..shards {
        let (t, r) = flume::unbounded();
        reply_txs.push(t);
        reply_rxs.push(r);
        // Unbounded, as what sends to it bounds it: reloads and scrapes wait
        // for their answers, and each SSE connection sends at most two
        // per-user counting messages (an acquire and a release, which must
        // never be dropped for a full queue).
        let (t, r) = flume::unbounded();
        control_txs.push(t);
        control_rxs.push(r);
    }

    let started = std::time::SystemTime::now();
    let reader_pool = crate::storage::reader::ReaderPool::start(cfg.database.read_connections)
        .map_err(|e| start_err("cannot start the reader threads", e))?;
    // Single node: the shards' requests go to the writer. Cluster mode: to
    // the cluster thread, which publishes them; the writer applies the log.
    let (input, cluster) = match &cfg.cluster {
        None => (crate::writer::Input::Shards(writer_rx), None),
        Some(cc) => {
            let (log_tx, log_rx) = flume::bounded(crate::limits::LOG_INBOX_BATCHES);
            let cluster = crate::cluster::start(
                cc.clone(),
                replicas,
                crate::cluster::Channels {
                    from_shards: writer_rx,
                    to_writer: log_tx,
                    shards: reply_txs.clone(),
                },
            )
            .map_err(|e| start_err("cannot start the cluster thread", e))?;
            (crate::writer::Input::Log(log_rx), Some(cluster))
        }
    };
    let mut writer = Writer::new(stores, input, writer_control_rx, reply_txs, &cfg);
    if let Some(c) = &cluster {
        writer.log_health(c.health.clone());
    }
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
            shard: crate::shard::ShardInit {
                id,
                cfg: cfg.clone(),
                to_writer: to_writer.clone(),
                tenants: set.clone(),
                readers: reader_pool.handle(),
                peers: control_txs.clone(),
                writer_control: writer_control.clone(),
                started,
            },
            listener_fd: fd,
            from_writer,
            control,
        };
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{id}"))
            .io_memory(cfg.server.io_memory_bytes)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(1))
            .spawn(move || executor::run(parts))
            .map_err(|e| start_err(&format!("cannot start shard {id}"), e))?;
        handles.push(handle);
    }
    // Only the shards hold senders now: the writer stops when the last shard hangs up.
    drop(to_writer);

    // Handlers first: once we announce, a SIGTERM must drain, not kill.
    let reloader = Reloader {
        load: reload,
        registry,
        tenancy,
        writer: writer_control,
        shards: control_txs.clone(),
        cluster: cfg.cluster.is_some(),
    };
    spawn_signal_thread(control_txs, cfg.server.shutdown_timeout, reloader)?;
    announce(addr, &cfg, &set);
    // The shards and the reloader hold the set from here: a removed tenant's
    // LMDB environment must close when they let go of it, so it can reopen.
    drop(set);

    for (id, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            tracing::error!(shard = id, error = %e, "shard ended with an error");
        }
    }
    // The cluster thread ends once the shards are gone, closing the writer's input.
    if let Some(c) = cluster {
        c.join();
    }
    match writer_thread.join() {
        Ok(stats) => tracing::info!(
            commits = stats.commits,
            events = stats.events,
            "shutdown complete"
        ),
        Err(_) => return Err(StartError("writer thread panicked".into())),
    }
    reader_pool.join();
    Ok(())
}

fn announce(addr: SocketAddr, cfg: &Config, set: &TenantSet) {
    let tenants: Vec<&str> = set.tenants.iter().map(|t| t.name.as_str()).collect();
    let databases: Vec<String> = set
        .tenants
        .iter()
        .map(|t| t.database.path.display().to_string())
        .collect();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    tracing::info!(
        %addr,
        version = env!("CARGO_PKG_VERSION"),
        cpus,
        shards = cfg.server.shards,
        shard_cpus = ?cfg.server.shard_cpus,
        writer_cpu = ?cfg.writer.cpu,
        reader_threads = cfg.database.read_connections,
        ?databases,
        index = %if set.multi { "<data_dir>/<tenant>.index".to_string() } else { cfg.index.path.display().to_string() },
        multi_tenant = set.multi,
        ?tenants,
        synchronous = cfg.database.synchronous.pragma(),
        "shardcast listening"
    );
    // One plain line on stdout for scripts and tests that start us on port 0.
    crate::say!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

/// SIGTERM/SIGINT → tell every shard to drain; a second signal, or the
/// shutdown timeout passing, ends the process at once. SIGHUP → reload the
/// tenants and keys.
fn spawn_signal_thread(
    controls: Vec<flume::Sender<Control>>,
    timeout: std::time::Duration,
    mut reloader: Reloader,
) -> Result<(), StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| start_err("cannot install signal handlers", e))?;
    std::thread::Builder::new()
        .name("shardcast-signals".into())
        .spawn(move || {
            let mut first = None;
            for sig in signals.forever() {
                if sig == SIGHUP {
                    if first.is_none() {
                        reloader.reload();
                    }
                    continue;
                }
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

/// The tenants in force, by name, with the id each keeps for the life of
/// the process.
#[derive(Default)]
struct Registry {
    infos: Vec<Arc<TenantInfo>>,
    last_id: TenantId,
}

impl Registry {
    fn next_id(&mut self) -> TenantId {
        self.last_id += 1;
        self.last_id
    }

    fn add(
        &mut self,
        id: TenantId,
        spec: &TenantSpec,
        index: Option<crate::storage::index::Index>,
        unavailable: Option<String>,
    ) {
        self.infos.push(Arc::new(TenantInfo {
            id,
            name: spec.name.clone(),
            database: Arc::new(spec.database.clone()),
            index,
            unavailable,
        }));
    }

    /// The set for `tenancy`, whose tenants must all be registered, in order.
    fn set(&self, tenancy: &Tenancy) -> Arc<TenantSet> {
        let infos = tenancy
            .tenants
            .iter()
            .map(|spec| {
                self.infos
                    .iter()
                    .find(|i| i.name == spec.name)
                    .expect("every tenant is registered before the set is built")
                    .clone()
            })
            .collect();
        Arc::new(TenantSet::new(tenancy, infos))
    }
}

/// Open a tenant's storage on reload. A tenant removed by an earlier reload
/// moments ago may still have its LMDB environment held by a shard that has
/// not yet taken the new tenant set (heed refuses a second open of a path
/// until the last handle goes): wait for that, briefly.
fn open_when_released(
    spec: &TenantSpec,
    cfg: &Config,
) -> Result<(Store, crate::storage::index::Index), String> {
    let deadline = Instant::now() + crate::limits::RELOAD_INDEX_RELEASE_WAIT;
    loop {
        match Store::open(&spec.name, &spec.database, &spec.index, cfg) {
            Err(crate::writer::OpenError::IndexHeld(_)) if Instant::now() < deadline => {
                std::thread::sleep(crate::limits::RELOAD_INDEX_RELEASE_POLL);
            }
            other => return other.map_err(|e| e.to_string()),
        }
    }
}

/// SIGHUP: read the tenants again; open the new ones and hand them to the
/// writer, then give every shard the new set (removed tenants' subscribers
/// are closed there), then let the writer close the removed ones' storage.
/// Tenants that stay keep their id, storage, rings and connections.
struct Reloader {
    load: LoadConfig,
    registry: Registry,
    tenancy: Tenancy,
    writer: flume::Sender<WriterControl>,
    shards: Vec<flume::Sender<Control>>,
    /// Cluster mode: each tenant's stream is followed from the start, so
    /// tenants come and go with a restart; keys still reload.
    cluster: bool,
}

impl Reloader {
    fn reload(&mut self) {
        let tenancy = match (self.load)().and_then(|c| {
            let t = Tenancy::from_config(&c).map_err(|e| e.to_string())?;
            Ok((c, t))
        }) {
            Ok((cfg, t)) if t.multi == self.tenancy.multi => (cfg, t),
            Ok(_) => {
                tracing::error!("reload refused: switching between single- and multi-tenant mode needs a restart");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the configuration does not load; keeping the tenants in force");
                return;
            }
        };
        let (cfg, tenancy) = tenancy;
        let same = |a: &TenantInfo, b: &TenantSpec| {
            a.name == b.name && *a.database.path == b.database.path
        };
        if self.cluster
            && (tenancy.tenants.len() != self.registry.infos.len()
                || !self
                    .registry
                    .infos
                    .iter()
                    .all(|i| tenancy.tenants.iter().any(|s| same(i, s))))
        {
            tracing::error!("reload refused: in cluster mode tenants are added and removed by a restart (keys reload as ever when the tenants stay)");
            return;
        }
        // New, and previously unavailable ones (their storage may be fixed now).
        let mut removed: Vec<Arc<TenantInfo>> = Vec::new();
        let mut kept = Vec::new();
        for info in std::mem::take(&mut self.registry.infos) {
            match tenancy.tenants.iter().find(|s| same(&info, s)) {
                Some(_) if info.index.is_some() => kept.push(info),
                _ => removed.push(info),
            }
        }
        self.registry.infos = kept;
        let mut added = Vec::new();
        for spec in &tenancy.tenants {
            if self.registry.infos.iter().any(|i| same(i, spec)) {
                continue;
            }
            // A tenant whose storage failed before is closed before it is opened again.
            if let Some(pos) = removed.iter().position(|i| same(i, spec)) {
                let old = removed.remove(pos);
                self.remove_from_writer(old.id);
            }
            let id = self.registry.next_id();
            match open_when_released(spec, &cfg) {
                Ok((store, index)) => {
                    let (done, wait) = flume::bounded(1);
                    if self
                        .writer
                        .send(WriterControl::Add {
                            id,
                            store: Box::new(store),
                            done,
                        })
                        .is_err()
                        || wait.recv().is_err()
                    {
                        tracing::error!("reload: the writer has stopped");
                        return;
                    }
                    self.registry.add(id, spec, Some(index), None);
                }
                Err(e) => {
                    tracing::error!(tenant = %spec.name, error = %e, "tenant unavailable");
                    self.registry.add(id, spec, None, Some(e));
                }
            }
            added.push(spec.name.clone());
        }
        let set = self.registry.set(&tenancy);
        for c in &self.shards {
            let _ = c.send(Control::Tenants(set.clone()));
        }
        for gone in &removed {
            self.remove_from_writer(gone.id);
        }
        tracing::info!(
            ?added,
            removed = ?removed.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            tenants = set.tenants.len(),
            "tenants reloaded"
        );
        self.tenancy = tenancy;
    }

    fn remove_from_writer(&self, id: TenantId) {
        let (done, wait) = flume::bounded(1);
        if self.writer.send(WriterControl::Remove { id, done }).is_ok() {
            let _ = wait.recv();
        }
    }
}
