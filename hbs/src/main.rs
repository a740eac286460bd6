//! `hbs`: tether's heartbeat server.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use hbs::{Sockets, config::Config};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Pings every registered address once per second, records which are live, and hands NCUs over when draining.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match serve(&args.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hbs: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path).with_context(|| format!("bad configuration in {}", path.display()))?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let sockets = Sockets {
        control: std::net::UdpSocket::bind(config.control_listen)
            .with_context(|| format!("binding control_listen {}", config.control_listen))?,
        heartbeat: std::net::UdpSocket::bind(config.heartbeat_listen)
            .with_context(|| format!("binding heartbeat_listen {}", config.heartbeat_listen))?,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        hds::settings::cancel_on_signal(shutdown.clone());
        hbs::run(sockets, config, Arc::default(), shutdown).await
    })
}
