//! `dns`: tether's authoritative DNS server and admin API.

use std::process::ExitCode;

use anyhow::Context;
use dns::{Config, Listeners};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    tether_service::main(
        "dns",
        "Authoritative DNS for tether, answering from an in-memory view of Postgres, plus the admin API.",
        serve,
    )
}

async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listeners = Listeners::bind(config.dns_listen, config.api_listen)
        .await
        .with_context(|| format!("binding dns_listen {} / api_listen {}", config.dns_listen, config.api_listen))?;
    dns::run(listeners, config, shutdown).await
}
