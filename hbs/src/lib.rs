//! hbs: tether's heartbeat server, and the NCU ↔ HBS protocol it owns.
//!
//! Without the `server` feature this crate is what ncu links: the control protocol's wire types ([`control`]) and
//! the heartbeat packet format and state machines of both sides ([`heartbeat`]). With it, the server: the control
//! endpoint ([`server`]) and its batched registrations ([`registrar`]), the heartbeat driver ([`driver`]), the batched state writer ([`writer`]), fleet upkeep
//! ([`fleet`]), static address checks ([`checks`]) and the Postgres store ([`store`]).

pub mod control;
pub mod heartbeat;

#[cfg(feature = "server")]
pub mod checks;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod driver;
#[cfg(feature = "server")]
pub mod fleet;
#[cfg(feature = "server")]
pub mod registrar;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod writer;

#[cfg(feature = "server")]
pub use run::{Sockets, run};

#[cfg(feature = "server")]
mod run {
    use std::sync::Arc;

    use anyhow::Context as _;
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;
    use tracing::info;

    use crate::{
        checks, config::Config, control, driver, fleet, heartbeat::monitor::Policy, registrar, server, writer,
    };

    /// Sockets bound before `run`, so tests can bind port 0.
    pub struct Sockets {
        /// QUIC control endpoint.
        pub control: std::net::UdpSocket,
        /// Heartbeats.
        pub heartbeat: std::net::UdpSocket,
    }

    /// Serves until `shutdown`; `counters` lets a caller watch the heartbeat figures.
    pub async fn run(
        sockets: Sockets,
        config: Config,
        counters: Arc<driver::Counters>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let tls = hds::pki::server_tls(
            &hds::pki::read(&config.ca)?,
            &hds::pki::read(&config.cert)?,
            &hds::pki::read(&config.key)?,
            control::ALPN,
            false,
        )
        .context("building the TLS configuration from ca, cert and key")?;
        let pool = hds::store::pool(config.database_url()).context("database_url")?;
        if !hds::store::migrate(&pool, &shutdown).await.context("applying migrations")? {
            return Ok(());
        }
        let control_addr = sockets.control.local_addr()?;
        let heartbeat_addr = sockets.heartbeat.local_addr()?;
        sockets.heartbeat.set_nonblocking(true)?;
        let heartbeat = tokio::net::UdpSocket::from_std(sockets.heartbeat)?;
        let endpoint = server::endpoint(sockets.control, tls)?;

        let (driver_tx, driver_rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (checks_tx, checks_rx) = mpsc::unbounded_channel();
        let (registrar_tx, registrar_rx) = mpsc::unbounded_channel();
        let (draining_tx, draining_rx) = watch::channel(false);
        let policy = Policy {
            interval: config.interval,
            reply_timeout: config.reply_timeout,
            reprobe_interval: config.reprobe_interval,
            reprobes: config.reprobes,
            ..Policy::default()
        };
        let mut tasks = tokio::task::JoinSet::new();
        let inner = shutdown.child_token();
        tasks.spawn(driver::run(heartbeat, policy, driver_rx, events_tx, counters.clone(), inner.clone()));
        tasks.spawn(writer::run(
            pool.clone(),
            config.name.clone(),
            config.batch_window,
            events_rx,
            checks_rx,
            inner.clone(),
        ));
        tasks.spawn(registrar::run(pool.clone(), config.name.clone(), registrar_rx, inner.clone()));
        tasks.spawn(checks::run(pool.clone(), config.name.clone(), config.interval, checks_tx, inner.clone()));
        let advertise = config.advertise.clone().unwrap_or_else(|| control_addr.to_string());
        tasks.spawn(fleet::run(
            fleet::Fleet {
                pool: pool.clone(),
                me: config.name.clone(),
                advertise: advertise.clone(),
                capacity: config.capacity,
                low_water: config.low_water,
                every: config.fleet_every,
                rehome_grace: config.rehome_grace,
                draining: draining_tx,
                counters,
            },
            inner.clone(),
        ));
        let context = Arc::new(server::Context {
            pool: pool.clone(),
            me: config.name.clone(),
            heartbeat_port: heartbeat_addr.port(),
            interval: config.interval,
            driver: driver_tx,
            registrar: registrar_tx,
            draining: draining_rx,
            drain_turn: tokio::sync::Mutex::new(()),
            session_grace: config.session_grace,
            refused: Default::default(),
        });
        info!(name = %config.name, %control_addr, %heartbeat_addr, %advertise, "hbs serving");
        server::serve(endpoint, context, shutdown.clone()).await;
        inner.cancel();
        while tasks.join_next().await.is_some() {}
        pool.close().await;
        Ok(())
    }
}
