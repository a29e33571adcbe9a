//! The operator's commands beside `serve`: `check` (is the LMDB index in
//! step with SQLite?), `backup` (an online copy of a database through
//! SQLite's backup API) and `config` (the effective settings and where each
//! came from). Each works on the same configuration `serve` would load, and
//! on a running server's files without disturbing it.

use crate::config::{Config, ConfigError, Env};
use crate::tenant::{Tenancy, TenantSpec};
use rusqlite::{Connection, OpenFlags};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// `shardcast check` exit codes.
pub mod exit {
    /// Every checked index is in step with its database.
    pub const IN_STEP: u8 = 0;
    /// An index differs from SQLite (or is missing); the next start repairs it.
    pub const INDEX_OUT_OF_STEP: u8 = 1;
    /// Bad usage, or configuration that does not load.
    pub const USAGE: u8 = 2;
    /// A database fails SQLite's integrity check, or cannot be opened.
    pub const DATABASE_DAMAGED: u8 = 3;
    /// Cluster mode: a replica cannot follow its stream (ahead of it, or
    /// the stream no longer holds what it needs next), or NATS cannot be
    /// asked.
    pub const REPLICA_CANNOT_FOLLOW: u8 = 4;
}

/// Pages copied per backup step (4 MiB at the default page size): the
/// progress bar moves per step.
const BACKUP_PAGES_PER_STEP: std::os::raw::c_int = 1024;

fn tenants_of(cfg: &Config, only: Option<&str>) -> Result<Vec<TenantSpec>, String> {
    let tenancy = Tenancy::from_config(cfg).map_err(|e| e.to_string())?;
    match only {
        None => Ok(tenancy.tenants),
        Some(name) => tenancy
            .tenants
            .into_iter()
            .find(|t| t.name == name)
            .map(|t| vec![t])
            .ok_or_else(|| format!("no tenant named {name:?}")),
    }
}

fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// `shardcast check`: SQLite's integrity check, then the index compared
/// entry by entry. Prints a report per tenant; returns the exit code.
pub fn check(cfg: &Config, tenant: Option<&str>, out: &mut dyn Write) -> u8 {
    let tenants = match tenants_of(cfg, tenant) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(out, "check: {e}");
            return exit::USAGE;
        }
    };
    let mut code = exit::IN_STEP;
    for t in &tenants {
        let _ = writeln!(out, "tenant {}: {}", t.name, t.database.path.display());
        if !t.database.path.exists() {
            let _ = writeln!(out, "  database: missing");
            code = code.max(exit::DATABASE_DAMAGED);
            continue;
        }
        let conn = match open_read_only(&t.database.path) {
            Ok(c) => c,
            Err(e) => {
                let _ = writeln!(out, "  database: cannot open: {e}");
                code = code.max(exit::DATABASE_DAMAGED);
                continue;
            }
        };
        let _ = conn.busy_timeout(Duration::from_secs(5));
        match conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) {
            Ok(ok) if ok == "ok" => {
                let _ = writeln!(out, "  database: ok (quick_check)");
            }
            Ok(problem) => {
                let _ = writeln!(out, "  database: DAMAGED: {problem}");
                code = code.max(exit::DATABASE_DAMAGED);
                continue;
            }
            Err(e) => {
                let _ = writeln!(out, "  database: DAMAGED: {e}");
                code = code.max(exit::DATABASE_DAMAGED);
                continue;
            }
        }
        let index = match crate::storage::index::Index::open_for_check(&t.index) {
            Ok(i) => i,
            Err(e) => {
                let _ = writeln!(out, "  index: {e}");
                code = code.max(exit::INDEX_OUT_OF_STEP);
                continue;
            }
        };
        match index.verify(&conn) {
            Ok(v) if v.in_step() => {
                let _ = writeln!(
                    out,
                    "  index: in step ({} events, head {})",
                    v.events, v.sqlite_head
                );
            }
            Ok(v) => {
                let _ = writeln!(
                    out,
                    "  index: OUT OF STEP, {} difference(s) over {} events (SQLite head {}, index head {}); the next start repairs it:",
                    v.differences, v.events, v.sqlite_head, v.index_head
                );
                for p in &v.problems {
                    let _ = writeln!(out, "    {p}");
                }
                code = code.max(exit::INDEX_OUT_OF_STEP);
            }
            Err(e) => {
                let _ = writeln!(out, "  index: unreadable: {e}");
                code = code.max(exit::INDEX_OUT_OF_STEP);
            }
        }
        if let Some(cc) = &cfg.cluster {
            code = code.max(check_replica(cc, &t.name, &conn, out));
        }
    }
    code
}

/// Cluster mode: the replica beside its stream. Says how far it applied,
/// what the stream holds, and whether the node can follow it.
fn check_replica(
    cc: &crate::config::ClusterConfig,
    tenant: &str,
    conn: &Connection,
    out: &mut dyn Write,
) -> u8 {
    let stream = crate::cluster::stream_name(cc, tenant);
    let applied = match crate::storage::log_applied(conn) {
        Ok(Some((s, _))) if s != stream => {
            let _ = writeln!(out, "  replica: of stream {s}, not {stream}: CANNOT FOLLOW");
            return exit::REPLICA_CANNOT_FOLLOW;
        }
        Ok(Some((_, applied))) => applied,
        Ok(None) => 0,
        Err(e) => {
            let _ = writeln!(out, "  replica: cluster_log unreadable: {e}");
            return exit::REPLICA_CANNOT_FOLLOW;
        }
    };
    match crate::cluster::stream_state(cc, tenant) {
        Ok(st) => {
            let verdict = st.verdict(applied);
            let _ = writeln!(
                out,
                "  replica: applied {applied} of stream {stream} (holds {}..={}, {} of {} replicas current): {}",
                st.first,
                st.last,
                st.current,
                st.replicas,
                verdict.as_ref().map_or_else(|e| e.as_str(), |ok| ok.as_str())
            );
            if verdict.is_ok() {
                exit::IN_STEP
            } else {
                exit::REPLICA_CANNOT_FOLLOW
            }
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "  replica: applied {applied} of stream {stream}; the stream cannot be asked: {e}"
            );
            exit::REPLICA_CANNOT_FOLLOW
        }
    }
}

/// What a finished backup holds.
#[derive(Debug)]
pub struct BackupReport {
    pub pages: i32,
    pub events: u64,
    pub head: u64,
    /// Cluster mode: the stream the copy replicates and the last sequence
    /// of it applied (a node started from the copy resumes after it).
    pub log_applied: Option<(String, u64)>,
    pub seconds: f64,
}

/// `shardcast backup`: copy a database online into `dest` (which must not
/// exist) through SQLite's backup API, showing progress on `progress`.
///
/// The source is read inside one read transaction held across every step:
/// in WAL mode that snapshot never blocks the writer, and no commit made
/// meanwhile can restart the copy (as it would between steps otherwise), so
/// the copy is the database exactly as of the moment the backup began.
pub fn backup(
    source: &Path,
    dest: &Path,
    progress: &mut dyn Write,
) -> Result<BackupReport, String> {
    if dest.exists() {
        return Err(format!("{} exists; choose a new file", dest.display()));
    }
    if !source.exists() {
        return Err(format!("no database at {}", source.display()));
    }
    let started = Instant::now();
    let src =
        open_read_only(source).map_err(|e| format!("cannot open {}: {e}", source.display()))?;
    src.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    src.execute_batch("BEGIN").map_err(|e| e.to_string())?;
    // The snapshot starts at the first read.
    let head = crate::storage::head(&src).map_err(|e| e.to_string())?;
    let events: u64 = src
        .query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0))
        .map_err(|e| e.to_string())? as u64;
    // A database from before cluster mode has no such table: not a replica.
    let log_applied = crate::storage::log_applied(&src).ok().flatten();
    let partial = dest.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut dst = Connection::open(&partial)
        .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
    let pages = {
        let b = rusqlite::backup::Backup::new(&src, &mut dst).map_err(|e| e.to_string())?;
        let mut last_drawn = Instant::now() - Duration::from_secs(1);
        loop {
            let step = b.step(BACKUP_PAGES_PER_STEP).map_err(|e| e.to_string())?;
            let p = b.progress();
            let done = matches!(step, rusqlite::backup::StepResult::Done);
            if done || last_drawn.elapsed() >= Duration::from_millis(100) {
                draw(progress, p.pagecount - p.remaining, p.pagecount);
                last_drawn = Instant::now();
            }
            match step {
                rusqlite::backup::StepResult::Done => break p.pagecount,
                rusqlite::backup::StepResult::More => {}
                // Another connection holds a lock SQLite needs: wait a little.
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    let _ = writeln!(progress);
    src.execute_batch("COMMIT").map_err(|e| e.to_string())?;
    // The copy must be whole before it takes its name.
    let ok: String = dst
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if ok != "ok" {
        return Err(format!("the copy fails its integrity check: {ok}"));
    }
    drop(dst);
    std::fs::rename(&partial, dest).map_err(|e| e.to_string())?;
    for suffix in ["-wal", "-shm"] {
        let mut p = partial.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    Ok(BackupReport {
        pages,
        events,
        head,
        log_applied,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn draw(out: &mut dyn Write, done: i32, total: i32) {
    const WIDTH: i32 = 30;
    let total = total.max(1);
    let filled = (done * WIDTH / total).clamp(0, WIDTH);
    let _ = write!(
        out,
        "\r[{}{}] {:>3}% {done}/{total} pages",
        "#".repeat(filled as usize),
        " ".repeat((WIDTH - filled) as usize),
        done * 100 / total
    );
    let _ = out.flush();
}

/// The database to back up: the only one, or the named tenant's.
pub fn backup_source(cfg: &Config, tenant: Option<&str>) -> Result<TenantSpec, String> {
    let mut tenants = tenants_of(cfg, tenant)?;
    if tenants.len() > 1 {
        let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
        return Err(format!(
            "multi-tenant mode: name the tenant to back up with --tenant (one of {})",
            names.join(", ")
        ));
    }
    Ok(tenants.remove(0))
}

/// `shardcast config`: every key as TOML, with where its value came from.
pub fn print_config(
    file: Option<&Path>,
    env: &dyn Env,
    out: &mut dyn Write,
) -> Result<(), ConfigError> {
    let explained = crate::config::explain(file, env)?;
    let cfg = Config::load(file, env)?;
    let width = explained
        .iter()
        .map(|e| e.key.len() + e.value.len() + 3)
        .max()
        .unwrap_or(40);
    let mut section = "";
    for e in &explained {
        let (s, k) = e.key.split_once('.').unwrap_or(("", &e.key));
        if s != section {
            let _ = writeln!(out, "{}[{s}]", if section.is_empty() { "" } else { "\n" });
            section = s;
        }
        let line = format!("{k} = {}", e.value);
        let _ = writeln!(out, "{line:<width$} # {}", e.origin);
    }
    let _ = writeln!(
        out,
        "\n# resolved: {} shard(s) on CPUs {:?}, writer on CPU {:?}; {}",
        cfg.server.shards,
        cfg.server.shard_cpus,
        cfg.writer.cpu,
        match Tenancy::from_config(&cfg) {
            Ok(t) if t.multi => format!(
                "multi-tenant: {}",
                t.tenants
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Ok(_) => "single-tenant".to_string(),
            Err(e) => format!("tenants do not load: {e}"),
        }
    );
    Ok(())
}

/// What `shardcast token` puts in a token and signs it with.
pub struct TokenArgs {
    pub mint: crate::token::Mint,
    /// A private key PEM file (RS256/ES256/EdDSA); else the configured secret.
    pub private_key: Option<std::path::PathBuf>,
}

/// `shardcast token`: a subscription token signed with the configured
/// secret (`auth.token_secret`, or the tenant's `token_secret` in
/// multi-tenant mode, which also names the tenant in the token), for tests
/// and scripts. An app's backend mints its own with any JWT library.
pub fn token(cfg: &Config, mut args: TokenArgs) -> Result<String, String> {
    let multi = cfg.auth.tenants_file.is_some() || !cfg.tenants.is_empty();
    let secret = if multi {
        let name = args
            .mint
            .tenant
            .clone()
            .ok_or("multi-tenant mode: name the tenant the token is for with --tenant")?;
        let raw = match &cfg.auth.tenants_file {
            Some(path) => {
                crate::tenant::read_tenants_file(path)
                    .map_err(|e| e.to_string())?
                    .tenants
            }
            None => cfg.tenants.clone(),
        };
        raw.into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format!("no tenant named {name}"))?
            .token_secret
    } else {
        args.mint.tenant = None;
        cfg.auth.token_secret.clone()
    };
    let pem = match &args.private_key {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
        None => None,
    };
    let (key, alg) = crate::token::signing_key(secret.as_deref(), pem.as_deref())?;
    if args.mint.sub.is_empty() {
        return Err("--sub must name the user".into());
    }
    if args.mint.types.is_empty() && args.mint.streams.is_empty() {
        return Err("give --types or --streams (--types '*' for every event)".into());
    }
    for p in args.mint.types.iter().chain(&args.mint.streams) {
        crate::filter::Pattern::parse(p)?;
    }
    crate::token::mint(&args.mint, &key, alg, crate::token::now_secs())
}
