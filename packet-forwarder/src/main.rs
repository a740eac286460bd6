//! `packet-forwarder`: each static address relayed to the live dynamic addresses.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use packet_forwarder::{Config, Listeners};
use tokio_util::sync::CancellationToken;

/// Relays each domain's static address (TCP and UDP) to its live addresses, as Postgres says.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Parse and validate the configuration, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("packet-forwarder: bad configuration in {}: {error}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        eprintln!("packet-forwarder: {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    dns::cli::init_tracing(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("packet-forwarder: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("packet-forwarder: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics_listen {}", config.metrics_listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(dns::cli::stop_on_signal(shutdown.clone()));
    packet_forwarder::run(listeners, config, shutdown).await
}
