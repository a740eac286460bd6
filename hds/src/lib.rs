//! hds: tether's heartbeat distribution server, the NCU/HBS ↔ HDS protocol it owns, and the operator PKI.
//!
//! Without the `server` feature this crate is what ncu links: wire types ([`proto`]), the client ([`client`]), the
//! assignment rule ([`assign`]) and PKI helpers ([`pki`]). With it, the server ([`server`]) and its Postgres store.

pub mod assign;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
pub mod frame;
pub mod pki;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
pub mod settings;
#[cfg(feature = "server")]
pub mod store;

#[cfg(feature = "server")]
pub use run::run;

#[cfg(feature = "server")]
mod run {
    use std::{sync::Arc, time::Duration};

    use anyhow::Context as _;
    use tokio_util::sync::CancellationToken;
    use tracing::{info, warn};

    use crate::{config::Config, pki, proto, server, store};

    /// How often this instance re-asserts its SRV tuple.
    const PUBLISH_EVERY: Duration = Duration::from_secs(60);

    /// Serves hds on `socket` until `shutdown`.
    pub async fn run(socket: std::net::UdpSocket, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ca_pem = pki::read(&config.ca)?;
        let ca = pki::Ca::load(config.ca.parent().unwrap_or_else(|| std::path::Path::new(".")))
            .context("loading the operator CA (ca.pem and ca.key)")?;
        let tls = pki::server_tls(&ca_pem, &pki::read(&config.cert)?, &pki::read(&config.key)?, proto::ALPN, true)
            .context("building the TLS configuration from cert and key")?;
        let pool = store::pool(config.database_url()).context("database_url")?;
        if !store::migrate(&pool, &shutdown).await.context("applying migrations")? {
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
