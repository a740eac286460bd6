//! hbs: tether's heartbeat server. It speaks the NCU ↔ HBS protocol of [`tether_proto::control`] and pings with
//! the heartbeat machines of [`tether_proto::heartbeat`]: the control endpoint ([`server`]) and its batched
//! registrations ([`registrar`]), the heartbeat driver ([`driver`]), the batched state writer ([`writer`]), fleet
//! upkeep ([`fleet`]), static address checks ([`checks`]), `/metrics` ([`metrics`]) and the Postgres store
//! ([`store`]).

pub mod checks;
pub mod config;
pub mod driver;
pub mod fleet;
pub mod metrics;
pub mod registrar;
pub mod server;
pub mod site;
pub mod store;
pub mod writer;

pub use run::{Sockets, run};

mod run {
    use std::sync::Arc;

    use anyhow::Context as _;
    use tokio::sync::{mpsc, watch};
    use tokio_util::sync::CancellationToken;
    use tracing::info;

    use tether_proto::{control, heartbeat::monitor::Policy};

    use crate::{checks, config::Config, driver, fleet, metrics::Metrics, registrar, server, writer};

    /// What `/metrics` and `/healthz` show.
    struct Status {
        metrics: Arc<Metrics>,
        name: String,
    }

    impl tether_service::http::Status for Status {
        fn metrics(&self) -> String {
            self.metrics.render()
        }

        fn health(&self) -> (bool, String) {
            let reachable = self.metrics.database_reachable.get() == 1;
            let body = format!(
                "{{\"status\":\"{}\",\"name\":{:?},\"database\":\"{}\",\"sessions\":{}}}",
                if reachable { "ok" } else { "degraded" },
                self.name,
                if reachable { "reachable" } else { "unreachable" },
                self.metrics.sessions.get(),
            );
            (reachable, body)
        }
    }

    /// Sockets bound before `run`, so tests can bind port 0.
    pub struct Sockets {
        /// QUIC control endpoint.
        pub control: std::net::UdpSocket,
        /// Heartbeats.
        pub heartbeat: std::net::UdpSocket,
        /// `GET /metrics` and `GET /healthz`, when served.
        pub metrics: Option<tokio::net::TcpListener>,
    }

    /// Serves until `shutdown`; `counters` lets a caller watch the heartbeat figures.
    pub async fn run(
        sockets: Sockets,
        config: Config,
        counters: Arc<driver::Counters>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let tls = tether_pki::server_tls(
            &tether_pki::read(&config.ca)?,
            &tether_pki::read(&config.cert)?,
            &tether_pki::read(&config.key)?,
            control::ALPN,
            false,
        )
        .context("building the TLS configuration from ca, cert and key")?;
        // Served while Postgres is still awaited, so an operator sees why this server is not ready.
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let metrics = Arc::new(Metrics::new(counters.clone(), refused.clone()));
        let http = match sockets.metrics {
            Some(listener) => {
                let status = Arc::new(Status { metrics: metrics.clone(), name: config.name.clone() });
                info!(metrics_addr = %listener.local_addr()?, "metrics served");
                Some(tether_service::http::serve(listener, tether_service::http::routes(status), shutdown.clone()))
            }
            None => None,
        };
        let pool = tether_db::pool(config.database_url()).context("database_url")?;
        if !tether_db::wait_and_migrate(&pool, config.max_backoff, &shutdown).await.context("applying migrations")? {
            if let Some(http) = http {
                let _ = http.await;
            }
            return Ok(());
        }
        metrics.database_reachable.set(1);
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
        tasks.spawn(driver::run(heartbeat, policy, config.tick, driver_rx, events_tx, counters.clone(), inner.clone()));
        tasks.spawn(writer::run(
            pool.clone(),
            config.name.clone(),
            config.batch_window,
            events_rx,
            checks_rx,
            metrics.clone(),
            inner.clone(),
        ));
        tasks.spawn(registrar::run(
            pool.clone(),
            config.name.clone(),
            config.max_addresses_per_domain,
            registrar_rx,
            metrics.clone(),
            inner.clone(),
        ));
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
                metrics: metrics.clone(),
            },
            inner.clone(),
        ));
        let (sites_tx, sites_rx) = watch::channel(crate::site::ByNcu::default());
        let open_sessions = crate::site::Open::default();
        tasks.spawn(crate::site::run(
            pool.clone(),
            config.name.clone(),
            open_sessions.clone(),
            sites_tx,
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
            refused,
            metrics,
            sites: sites_rx,
            per_certificate: Arc::default(),
            open_sessions,
        });
        info!(name = %config.name, %control_addr, %heartbeat_addr, %advertise, "hbs serving");
        server::serve(endpoint, context, shutdown.clone()).await;
        inner.cancel();
        while tasks.join_next().await.is_some() {}
        if let Some(http) = http {
            let _ = http.await;
        }
        pool.close().await;
        Ok(())
    }
}
