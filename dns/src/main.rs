//! `dns`: tether's authoritative DNS server and admin API.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use dns::{Config, Listeners};
use tokio_util::sync::CancellationToken;

/// Authoritative DNS for tether, answering from an in-memory view of Postgres, plus the admin API.
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
            eprintln!("dns: bad configuration in {}: {error}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        eprintln!("dns: {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    dns::cli::init_tracing(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dns: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("dns: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(config.dns_listen, config.api_listen)
        .await
        .with_context(|| format!("binding dns_listen {} / api_listen {}", config.dns_listen, config.api_listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(dns::cli::stop_on_signal(shutdown.clone()));
    dns::run(listeners, config, shutdown).await
}
