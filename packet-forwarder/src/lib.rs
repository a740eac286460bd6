//! tether's packet forwarder: each domain's static address relayed to its live dynamic addresses.
//!
//! The [`table::Table`] (static address, port, protocol → domain and live targets) is read from Postgres and kept
//! fresh by LISTEN/NOTIFY ([`sync`]); [`listeners`] binds and unbinds the static listeners as it changes; [`tcp`]
//! and [`udp`] relay the flows; [`limits`] caps them; [`metrics`] counts them per domain.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use arc_swap::ArcSwap;
use tether_service::http;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

pub mod batch;
pub mod config;
pub mod flows;
pub mod limits;
pub mod listeners;
pub mod metrics;
pub mod migrate;
pub mod proxy;
pub mod splice;
pub mod store;
pub mod sync;
pub mod table;
pub mod tcp;
pub mod udp;

pub use config::Config;

/// Sockets bound before `run`, so tests can bind port 0 and read the address back. The static listeners are
/// bound by `run` itself, as the table asks for them.
pub struct Listeners {
    /// `GET /metrics` and `GET /healthz`.
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds the configured metrics address.
    pub async fn bind(metrics: SocketAddr) -> io::Result<Self> {
        Ok(Self { metrics: TcpListener::bind(metrics).await? })
    }

    /// The metrics address.
    pub fn metrics_addr(&self) -> io::Result<SocketAddr> {
        self.metrics.local_addr()
    }
}

/// What the relays, the sync task and the listeners share.
pub struct Shared {
    /// The table every new flow reads.
    pub table: ArcSwap<table::Table>,
    /// Counters and gauges.
    pub metrics: metrics::Metrics,
    /// Flow caps.
    pub limits: Arc<limits::Limits>,
    /// Every TCP flow, so shutdown can wait for them.
    pub flows: TaskTracker,
    /// Cancelled when flows must end now (after the shutdown grace).
    pub cut: CancellationToken,
    /// See [`Config::connect_timeout`].
    pub connect_timeout: Duration,
    /// See [`Config::udp_idle_timeout`].
    pub udp_idle_timeout: Duration,
    /// See [`Config::tcp_buffer`].
    pub tcp_buffer: usize,
    /// See [`Config::tcp_keepalive`].
    pub tcp_keepalive: Duration,
    /// See [`Config::tcp_idle_timeout`].
    pub tcp_idle_timeout: Duration,
    /// Pipes of `tcp_buffer` bytes, lent to TCP flows while they splice.
    pub pipes: splice::Pipes,
    changed: watch::Sender<()>,
    /// Where flows may be relayed (see [`Config::targets`]).
    pub targets: tether_config::TargetPolicy,
    /// Every unfinished host migration, for the relay ([`migrate`]).
    pub redirects: watch::Sender<Vec<tether_nft::Redirect>>,
}

impl Shared {
    /// An empty table and the relay settings of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            table: ArcSwap::from_pointee(table::Table::empty()),
            metrics: metrics::Metrics::new(),
            limits: Arc::new(limits::Limits::new(config.max_flows_total)),
            flows: TaskTracker::new(),
            cut: CancellationToken::new(),
            connect_timeout: config.connect_timeout,
            udp_idle_timeout: config.udp_idle_timeout,
            tcp_buffer: config.tcp_buffer,
            tcp_keepalive: config.tcp_keepalive,
            tcp_idle_timeout: config.tcp_idle_timeout,
            pipes: splice::Pipes::new(config.tcp_buffer),
            changed: watch::Sender::new(()),
            redirects: watch::Sender::new(Vec::new()),
            targets: config.targets(),
        }
    }

    /// Swaps in a new table and wakes the listener reconciler.
    pub fn publish(&self, table: table::Table) {
        self.metrics.domains.set(i64::try_from(table.domain_count()).unwrap_or(i64::MAX));
        self.table.store(Arc::new(table));
        self.changed.send_replace(());
    }
}

/// Runs the forwarder until `shutdown`, then lets running flows finish for `shutdown_grace` before cutting them.
pub async fn run(listeners: Listeners, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = tether_db::pool(config.database_url()).context("database_url")?;
    let shared = Arc::new(Shared::new(&config));
    let (synced_tx, synced_rx) = watch::channel(false);
    let metrics_addr = listeners.metrics_addr()?;
    let status = Arc::new(Status { shared: shared.clone(), synced: synced_rx });
    let http = http::serve(listeners.metrics, http::routes(status), shutdown.clone());
    info!(%metrics_addr, "metrics served");

    if !tether_db::wait_and_migrate(&pool, config.max_backoff, &shutdown).await.context("applying migrations")? {
        let _ = http.await;
        return Ok(());
    }
    let sync_task =
        tokio::spawn(sync::run(pool.clone(), shared.clone(), config.max_backoff, synced_tx, shutdown.clone()));
    let listener_task = tokio::spawn(listeners::run(shared.clone(), shared.changed.subscribe(), shutdown.clone()));
    let relay_task =
        tokio::spawn(migrate::run(pool.clone(), config.relay_name(), shared.redirects.subscribe(), shutdown.clone()));

    shutdown.cancelled().await;
    info!("shutting down: no new flows");
    let _ = listener_task.await;
    let _ = sync_task.await;
    let _ = relay_task.await;
    shared.flows.close();
    if tokio::time::timeout(config.shutdown_grace, shared.flows.wait()).await.is_err() {
        warn!(flows = shared.flows.len(), "flows still running after the shutdown grace; cutting them");
    }
    shared.cut.cancel();
    shared.flows.wait().await;
    if let Err(error) = http.await {
        warn!(%error, "metrics server task failed");
    }
    pool.close().await;
    Ok(())
}

/// What `/metrics` and `/healthz` show.
struct Status {
    shared: Arc<Shared>,
    synced: watch::Receiver<bool>,
}

impl http::Status for Status {
    fn metrics(&self) -> String {
        self.shared.metrics.render()
    }

    /// Ready once the table has been loaded.
    fn health(&self) -> (bool, String) {
        let ready = *self.synced.borrow();
        let body = format!(
            "{{\"status\":\"{}\",\"domains\":{},\"listeners\":{}}}",
            if ready { "ok" } else { "starting" },
            self.shared.metrics.domains.get(),
            self.shared.metrics.listeners.get(),
        );
        (ready, body)
    }
}
