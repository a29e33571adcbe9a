//! The `shardcast` command.

use clap::{Parser, Subcommand};
use shardcast::config::{Config, LogFormat, ProcessEnv};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "shardcast",
    version,
    about = "Durable event store over HTTP with live fan-out; wire-compatible with ebuse"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default when no command is given).
    Serve(ConfigArgs),
    /// Check each database (SQLite quick_check) and its LMDB index against it.
    /// Exit code: 0 in step, 1 an index out of step (the next start repairs
    /// it), 2 bad usage or config, 3 a database damaged or missing.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only this tenant (multi-tenant mode).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Copy a database online, through SQLite's backup API, as of the moment
    /// the backup starts; the server keeps running. Restore: docs/operations.md.
    Backup {
        #[command(flatten)]
        config: ConfigArgs,
        /// The copy to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// The tenant to back up (required in multi-tenant mode).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Bring an ebuse installation across: its events (positions, types,
    /// data, timestamps) and consumer positions, into the configured store
    /// (new or empty, or a prefix of the source when resuming). Stop the
    /// server on the target first: the import locks it as the server does.
    Import {
        #[command(flatten)]
        config: ConfigArgs,
        /// ebuse's SQLite database file (read-only; both timestamp encodings).
        #[arg(
            long,
            conflicts_with = "from_url",
            required_unless_present = "from_url"
        )]
        from_ebuse_sqlite: Option<PathBuf>,
        /// A running ebuse (any backend, Pebble too) or shardcast, e.g.
        /// http://10.0.0.5:8080: copied over its HTTP API.
        #[arg(long)]
        from_url: Option<String>,
        /// The source's API key (with --from-url), sent as X-API-Key.
        #[arg(long, env = "SOURCE_API_KEY")]
        api_key: Option<String>,
        /// A consumer position to copy (with --from-url; ebuse cannot list
        /// them). Repeat for each.
        #[arg(long = "subscription")]
        subscriptions: Vec<String>,
        /// The tenant to import into (required in multi-tenant mode).
        #[arg(long)]
        tenant: Option<String>,
        /// Events per page (one read, one transaction).
        #[arg(long, default_value_t = shardcast::import::PAGE_EVENTS_DEFAULT)]
        batch: usize,
    },
    /// Mint a subscription token (a JWT) for tests and scripts, signed with
    /// the configured token secret (or --private-key); prints it. Your app's
    /// backend mints its own with any JWT library (docs/sse.md).
    Token {
        #[command(flatten)]
        config: ConfigArgs,
        /// The user it is for (the `sub` claim).
        #[arg(long)]
        sub: String,
        /// Event types it may see: names or prefixes (`order.*`), comma-separated.
        #[arg(long, value_delimiter = ',')]
        types: Vec<String>,
        /// Streams it may see: names or prefixes (`user-42:*`), comma-separated.
        #[arg(long, value_delimiter = ',')]
        streams: Vec<String>,
        /// How long it is valid (`90s`, `15m`, `1h`).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The tenant (multi-tenant mode; it goes into the token).
        #[arg(long)]
        tenant: Option<String>,
        /// Sign with this private key PEM (RSA: RS256, EC P-256: ES256,
        /// Ed25519: EdDSA) instead of the secret.
        #[arg(long)]
        private_key: Option<PathBuf>,
    },
    /// Print the effective configuration and where each value came from
    /// (default, file or environment variable); secrets are not shown.
    Config(ConfigArgs),
    /// Load tools for measuring a running server (see docs/benchmarks.md).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
}

/// Where the configuration comes from (for every command that reads it).
#[derive(clap::Args, Clone, Default)]
struct ConfigArgs {
    /// TOML config file; without it the embedded default is used
    /// (127.0.0.1:8080, data in ./data). Environment variables override both.
    /// (A `.yaml`/`.yml` file here is taken as `--tenants`, as ebuse's
    /// `-config tenants.yaml`.)
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Multi-tenant mode: ebuse's tenants.yaml (data_dir, tenants: [{name,
    /// api_key}]); reloaded on SIGHUP.
    #[arg(long)]
    tenants: Option<PathBuf>,
}

impl ConfigArgs {
    /// The TOML file and the tenants file these name.
    fn files(self) -> (Option<PathBuf>, Option<PathBuf>) {
        let yaml = self.config.as_ref().is_some_and(|c| {
            matches!(c.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        });
        if yaml {
            (None, self.config)
        } else {
            (self.config, self.tenants)
        }
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Hold N SSE subscribers, publish M events, report deliveries/s,
    /// delivery ratio, publish→deliver latency and server RSS per connection.
    Sse(SseArgs),
    /// Hold N SSE subscribers under mixed ingestion for a duration, checking
    /// every delivery and sampling the server's memory and descriptors
    /// (scripts/soak.sh runs it against a fresh server).
    Soak(SoakArgs),
}

#[derive(clap::Args)]
struct SoakArgs {
    /// The server, as host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Sent as X-API-Key.
    #[arg(long, env = "API_KEY")]
    api_key: Option<String>,
    /// The server's pid (its memory and descriptors are sampled).
    #[arg(long)]
    server_pid: u32,
    /// Subscribers: half follow everything, half one of ten types.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    subscribers: usize,
    /// How long to publish, in seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Single-event appends per second.
    #[arg(long, default_value_t = 10.0)]
    singles: f64,
    /// Batch appends (10 events each) per second.
    #[arg(long, default_value_t = 1.0)]
    batches: f64,
    /// Page reads (GET /events) per second.
    #[arg(long, default_value_t = 5.0)]
    reads: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10)]
    sample_secs: u64,
}

#[derive(clap::Args)]
struct SseArgs {
    /// The server, as host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// Publish here instead of --addr (cluster mode: append on other nodes,
    /// measure delivery on this one); repeat it to spread the publishers.
    #[arg(long)]
    publish_addr: Vec<std::net::SocketAddr>,
    /// shardcast, or nginx with the nchan module.
    #[arg(long, value_enum, default_value = "shardcast")]
    target: TargetArg,
    /// Subscribe path (default: /events/subscribe, or /sub/bench for nchan).
    #[arg(long)]
    sub_path: Option<String>,
    /// Publish path (default: /events, or /pub/bench for nchan).
    #[arg(long)]
    pub_path: Option<String>,
    /// Sent as X-API-Key.
    #[arg(long, env = "API_KEY")]
    api_key: Option<String>,
    /// Subscriber connections to hold.
    #[arg(long, short = 'n', default_value_t = 1000)]
    connections: usize,
    /// Events to publish.
    #[arg(long, short = 'm', default_value_t = 200)]
    events: usize,
    /// Events per second (0: as fast as the server answers).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// The server's pid, to report its RSS per idle connection.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds to wait for deliveries after the last publish.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Publishing connections (each pipelines its share of the events).
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Topics: subscriber i follows type t{i mod K}, event n has type
    /// t{n mod K} (nchan: channels /sub/t{i mod K}); 0: everyone gets all.
    #[arg(long, default_value_t = 0)]
    types: usize,
    /// One event in flight per publisher (wait for each answer).
    #[arg(long)]
    serial: bool,
    /// Subscribe with a subscription token each (user bench-{i}, scoped to
    /// its topic), signed with this secret (the server's auth.token_secret).
    #[arg(long, env = "BENCH_TOKEN_SECRET")]
    token_secret: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TargetArg {
    Shardcast,
    Nchan,
}

fn init_logs(cfg: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // A full disk or a closed pipe loses log lines; it must not panic
        // (tracing would otherwise report the failed write with `eprintln!`).
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// A panic is a bug, never an answer to input: log it and end the process
/// rather than run on with a shard missing. Acknowledged events are already
/// durable; a supervisor (systemd) restarts the server.
fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        tracing::error!(panic = %info, "panic: aborting");
        std::process::abort();
    }));
}

/// The process environment, with the command line's `--tenants` on top.
struct CliEnv {
    tenants_file: Option<PathBuf>,
}

impl shardcast::config::Env for CliEnv {
    fn get(&self, name: &str) -> Option<String> {
        match (&self.tenants_file, name) {
            (Some(t), "SHARDCAST_AUTH_TENANTS_FILE") => Some(t.display().to_string()),
            _ => ProcessEnv.get(name),
        }
    }
}

/// Load the configuration for a one-shot command; None (said on stderr) when it does not load.
fn load_once(args: ConfigArgs) -> Option<Config> {
    let (file, tenants_file) = args.files();
    match Config::load(file.as_deref(), &CliEnv { tenants_file }) {
        Ok(c) => Some(c),
        Err(e) => {
            shardcast::say_err!("shardcast: {e}");
            None
        }
    }
}

/// Long: the command dispatch, one short arm per command, each loading the
/// configuration and calling its `cli` function.
fn main() -> ExitCode {
    let cli = Cli::parse();
    install_panic_hook();
    let args = match cli.command {
        None => ConfigArgs::default(),
        Some(Command::Serve(args)) => args,
        Some(Command::Check { config, tenant }) => {
            let Some(cfg) = load_once(config) else {
                return ExitCode::from(shardcast::cli::exit::USAGE);
            };
            let code = shardcast::cli::check(&cfg, tenant.as_deref(), &mut std::io::stdout());
            return ExitCode::from(code);
        }
        Some(Command::Import {
            config,
            from_ebuse_sqlite,
            from_url,
            api_key,
            subscriptions,
            tenant,
            batch,
        }) => {
            let Some(cfg) = load_once(config) else {
                return ExitCode::from(2);
            };
            if cfg.cluster.is_some() {
                shardcast::say_err!(
                    "shardcast import: cluster mode is on (cluster.nats_urls): import writes one node's \
                     files directly, which would make it unlike the others; append the events through \
                     the API of any node instead (docs/cluster.md)"
                );
                return ExitCode::from(2);
            }
            let target = match shardcast::cli::backup_source(&cfg, tenant.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    shardcast::say_err!("shardcast import: {e}");
                    return ExitCode::from(2);
                }
            };
            let source = match (from_ebuse_sqlite, from_url) {
                (Some(path), _) => shardcast::import::Source::EbuseSqlite(path),
                (None, Some(base)) => shardcast::import::Source::Url {
                    base,
                    api_key,
                    subscriptions,
                },
                (None, None) => unreachable!("clap requires one source"),
            };
            shardcast::say_err!(
                "importing into tenant {} ({})",
                target.name,
                target.database.path.display()
            );
            use std::io::IsTerminal;
            let tty = std::io::stderr().is_terminal();
            return match shardcast::import::run(
                source,
                &target.database,
                &target.index,
                batch,
                &mut std::io::stderr(),
                tty,
            ) {
                Ok(r) => {
                    shardcast::say!(
                        "import complete: {} events imported ({} were already there), head {}, {} consumer positions; verified",
                        r.imported,
                        r.already,
                        r.head,
                        r.consumers
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    shardcast::say_err!("shardcast import: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Some(Command::Backup {
            config,
            out,
            tenant,
        }) => {
            let Some(cfg) = load_once(config) else {
                return ExitCode::from(2);
            };
            let source = match shardcast::cli::backup_source(&cfg, tenant.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    shardcast::say_err!("shardcast backup: {e}");
                    return ExitCode::from(2);
                }
            };
            shardcast::say_err!(
                "backing up {} ({}) to {}",
                source.name,
                source.database.path.display(),
                out.display()
            );
            return match shardcast::cli::backup(&source.database.path, &out, &mut std::io::stderr())
            {
                Ok(r) => {
                    shardcast::say!(
                        "backup of {} complete: {} events up to position {}, {} pages, {:.2} s",
                        source.name,
                        r.events,
                        r.head,
                        r.pages,
                        r.seconds
                    );
                    if let Some((stream, seq)) = &r.log_applied {
                        shardcast::say!(
                            "the copy replicates JetStream stream {stream} up to sequence {seq}: a node started from it resumes at {}",
                            seq + 1
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    shardcast::say_err!("shardcast backup: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Some(Command::Token {
            config,
            sub,
            types,
            streams,
            ttl,
            tenant,
            private_key,
        }) => {
            let Some(cfg) = load_once(config) else {
                return ExitCode::from(2);
            };
            let ttl = match shardcast::config::parse_duration(&ttl) {
                Ok(d) if d.as_secs() > 0 => d.as_secs(),
                Ok(_) => {
                    shardcast::say_err!("shardcast token: --ttl must be at least 1s");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    shardcast::say_err!("shardcast token: --ttl: {e}");
                    return ExitCode::from(2);
                }
            };
            let args = shardcast::cli::TokenArgs {
                mint: shardcast::token::Mint {
                    sub,
                    types,
                    streams,
                    ttl_secs: ttl,
                    tenant,
                },
                private_key,
            };
            return match shardcast::cli::token(&cfg, args) {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    shardcast::say_err!("shardcast token: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Config(args)) => {
            let (file, tenants_file) = args.files();
            return match shardcast::cli::print_config(
                file.as_deref(),
                &CliEnv { tenants_file },
                &mut std::io::stdout(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    shardcast::say_err!("shardcast config: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::Bench {
            what: BenchCommand::Sse(a),
        }) => return bench_sse(a),
        Some(Command::Bench {
            what: BenchCommand::Soak(a),
        }) => {
            let soak = shardcast::soak::Soak {
                addr: a.addr,
                api_key: a.api_key.filter(|k| !k.is_empty()),
                subscribers: a.subscribers,
                duration: std::time::Duration::from_secs(a.seconds),
                singles_per_sec: a.singles,
                batches_per_sec: a.batches,
                reads_per_sec: a.reads,
                server_pid: a.server_pid,
                sample: std::time::Duration::from_secs(a.sample_secs.max(1)),
            };
            return match shardcast::soak::run(soak) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    shardcast::say_err!("shardcast bench soak: {e}");
                    ExitCode::from(1)
                }
            };
        }
    };
    let (config_file, tenants_file) = args.files();
    // `--tenants` is `auth.tenants_file`, above the file and the environment.
    let load = move || {
        Config::load(
            config_file.as_deref(),
            &CliEnv {
                tenants_file: tenants_file.clone(),
            },
        )
    };
    let cfg = match load() {
        Ok(c) => c,
        Err(e) => {
            shardcast::say_err!("shardcast: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(&cfg);
    let reload = Box::new(move || load().map_err(|e| e.to_string()));
    match shardcast::server::run(cfg, reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            shardcast::say_err!("shardcast: {e}");
            ExitCode::from(1)
        }
    }
}

fn bench_sse(a: SseArgs) -> ExitCode {
    use shardcast::bench::{SseBench, Target};
    let (target, sub, publ) = match a.target {
        TargetArg::Shardcast => (Target::Shardcast, "/events/subscribe", "/events"),
        TargetArg::Nchan => (Target::Nchan, "/sub/bench", "/pub/bench"),
    };
    let b = SseBench {
        target,
        addr: a.addr,
        publish_addrs: a.publish_addr,
        sub_path: a.sub_path.unwrap_or_else(|| sub.to_string()),
        pub_path: a.pub_path.unwrap_or_else(|| publ.to_string()),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        connections: a.connections,
        events: a.events,
        rate: a.rate,
        server_pid: a.server_pid,
        connect_parallel: 256,
        drain: std::time::Duration::from_secs(a.drain_secs),
        publishers: a.publishers,
        types: a.types,
        serial: a.serial,
        token_secret: a.token_secret.filter(|s| !s.is_empty()),
    };
    match shardcast::bench::run_sse(b) {
        Ok(r) => {
            shardcast::say!("{}", r.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            shardcast::say_err!("shardcast bench sse: {e}");
            ExitCode::from(1)
        }
    }
}
