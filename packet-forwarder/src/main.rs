//! `packet-forwarder`: each static address relayed to the live dynamic addresses.

use std::process::ExitCode;

use anyhow::Context;
use packet_forwarder::{Config, Listeners};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    tether_service::main(
        "packet-forwarder",
        "Relays each domain's static address (TCP and UDP) to its live addresses, as Postgres says.",
        serve,
    )
}

async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listeners = Listeners::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics_listen {}", config.metrics_listen))?;
    packet_forwarder::run(listeners, config, shutdown).await
}
