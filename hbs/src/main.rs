//! `hbs`: tether's heartbeat server.

use std::process::ExitCode;

use anyhow::Context;
use hbs::{Sockets, config::Config};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    tether_service::main(
        "hbs",
        "Pings every registered address once per second, records which are live, and hands NCUs over when draining.",
        serve,
    )
}

async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sockets = Sockets {
        control: std::net::UdpSocket::bind(config.control_listen)
            .with_context(|| format!("binding control_listen {}", config.control_listen))?,
        heartbeat: std::net::UdpSocket::bind(config.heartbeat_listen)
            .with_context(|| format!("binding heartbeat_listen {}", config.heartbeat_listen))?,
        metrics: match config.metrics_listen {
            Some(address) => Some(
                tokio::net::TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding metrics_listen {address}"))?,
            ),
            None => None,
        },
    };
    hbs::run(sockets, config, Default::default(), shutdown).await
}
