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
    Serve {
        /// TOML config file; without it the embedded default is used
        /// (127.0.0.1:8080, data in ./data). Environment variables override both.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn init_logs(cfg: &Config) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    install_panic_hook();
    let config_file = match cli.command {
        None => None,
        Some(Command::Serve { config }) => config,
    };
    let cfg = match Config::load(config_file.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardcast: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(&cfg);
    match shardcast::server::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardcast: {e}");
            ExitCode::from(1)
        }
    }
}
