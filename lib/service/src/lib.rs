//! The plumbing every tether server shares: its `main` ([`main`], [`start`]: arguments, configuration, logs, runtime,
//! signals, exit codes), the `/metrics` and `/healthz` listener ([`http`]), the QUIC accept loop ([`accept`]) and
//! batched UDP system calls ([`mmsg`]).

use std::{future::Future, path::PathBuf, process::ExitCode};

use clap::{CommandFactory, FromArgMatches, Parser};
use tether_config::Load;
pub use tether_config::LogFormat;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

pub mod accept;
pub mod http;
pub mod mmsg;

/// A server's configuration file.
pub trait ServerConfig: Load {
    /// How the server logs.
    fn log_format(&self) -> LogFormat;
}

/// The arguments every server takes.
#[derive(Parser)]
#[command(version)]
pub struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Parse and validate the configuration, then exit.
    #[arg(long)]
    pub check: bool,
}

/// A server's whole `main`: parses `--config` and `--check`, then [`start`]s.
pub fn main<C, F, Fut>(name: &'static str, about: &'static str, serve: F) -> ExitCode
where
    C: ServerConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let command = Args::command().name(name).about(about);
    let args = match Args::from_arg_matches(&command.get_matches()) {
        Ok(args) => args,
        Err(error) => error.exit(),
    };
    start(name, &args.config, args.check, serve)
}

/// Loads the configuration (exit 2 when it is bad, naming the key), stops after that with `check`, else sets up logs
/// and a runtime and runs `serve` until SIGTERM or Ctrl-C cancels its token (exit 0, or 1 when it fails).
pub fn start<C, F, Fut>(name: &str, path: &std::path::Path, check: bool, serve: F) -> ExitCode
where
    C: ServerConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = match C::load(path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{name}: bad configuration in {}: {error}", path.display());
            return ExitCode::from(2);
        }
    };
    if check {
        eprintln!("{name}: {} is valid", path.display());
        return ExitCode::SUCCESS;
    }
    init_tracing(config.log_format());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tether_config::cancel_on_signal(shutdown.clone());
        serve(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("{name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr in `format`, at `RUST_LOG` or INFO; colours only on a terminal.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
