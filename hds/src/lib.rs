//! hds: tether's heartbeat distribution server. It enrolls NCUs with the operator CA and hands each a primary and a
//! backup heartbeat server ([`assign`], pure), over the protocol of [`tether_proto::hds`] ([`server`]), with its
//! Postgres store ([`store`]).

pub mod assign;
pub mod config;
pub mod server;
pub mod store;

pub use run::run;

mod run {
    use std::{sync::Arc, time::Duration};

    use anyhow::Context as _;
    use tokio_util::sync::CancellationToken;
    use tracing::{info, warn};

    use tether_pki as pki;
    use tether_proto::hds as proto;

    use crate::{config::Config, server, store};

    /// How often this instance re-asserts its SRV tuple.
    const PUBLISH_EVERY: Duration = Duration::from_secs(60);

    /// Serves hds on `socket` until `shutdown`.
    pub async fn run(socket: std::net::UdpSocket, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ca_pem = pki::read(&config.ca)?;
        let ca = pki::Ca::load(config.ca.parent().unwrap_or_else(|| std::path::Path::new(".")))
            .context("loading the operator CA (ca.pem and ca.key)")?;
        let tls = pki::server_tls(&ca_pem, &pki::read(&config.cert)?, &pki::read(&config.key)?, proto::ALPN, true)
            .context("building the TLS configuration from cert and key")?;
        let pool = tether_db::pool(config.database_url()).context("database_url")?;
        if !tether_db::wait_and_migrate(&pool, config.max_backoff, &shutdown).await.context("applying migrations")? {
            return Ok(());
        }
        let local = socket.local_addr()?;
        let endpoint = server::endpoint(socket, tls)?;
        let context = Arc::new(server::Context {
            pool: pool.clone(),
            ca,
            ncu_cert_validity: config.ncu_cert_validity,
            stale_after: config.stale_after,
        });
        let publisher = config.publish.clone().map(|publish| {
            let pool = pool.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    match store::publish(&pool, &publish.zone, publish.address).await {
                        Ok(true) => {}
                        Ok(false) => warn!(zone = %publish.zone, "cannot publish SRV: no such zone (create it first)"),
                        Err(error) => warn!(%error, "cannot publish SRV"),
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(PUBLISH_EVERY) => {}
                    }
                }
                if let Err(error) = store::unpublish(&pool, &publish.zone, publish.address).await {
                    warn!(%error, "cannot withdraw SRV");
                }
            })
        });
        info!(%local, "hds serving");
        server::serve(endpoint, context, shutdown).await;
        if let Some(publisher) = publisher {
            let _ = publisher.await;
        }
        pool.close().await;
        Ok(())
    }
}
