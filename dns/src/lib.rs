//! tether's authoritative DNS server and admin API.
//!
//! Queries are answered from an in-memory [`view::View`] of Postgres, kept fresh by LISTEN/NOTIFY ([`sync`]); the
//! admin API ([`api`]) writes to Postgres, and the triggers in `migrations/` announce every change.

use std::{io, net::SocketAddr, sync::Arc};

use anyhow::Context;
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub mod answer;
pub mod api;
pub mod config;
pub mod history;
pub mod metrics;
pub mod migrate;
pub mod monitor;
pub mod rrl;
pub mod server;
pub mod store;
pub mod sync;
pub mod tcp;
pub mod udp;
pub mod update;
pub mod view;
pub mod wire;
pub mod xfr;

pub use config::Config;

/// Sockets bound before `run`, so tests can bind port 0 and read the addresses back.
pub struct Listeners {
    /// DNS over UDP: the first of `udp_workers` sockets on the address (SO_REUSEPORT; `run` binds the others).
    pub dns_udp: UdpSocket,
    /// DNS over TCP, same port as UDP.
    pub dns_tcp: TcpListener,
    /// The admin API.
    pub api: TcpListener,
}

impl Listeners {
    /// Binds the configured addresses. With port 0 for DNS, UDP and TCP end up on the same free port.
    pub async fn bind(dns: SocketAddr, api: SocketAddr) -> io::Result<Self> {
        let mut attempts = 0;
        let (dns_udp, dns_tcp) = loop {
            let udp = bind_udp(dns)?;
            match TcpListener::bind(udp.local_addr()?).await {
                Ok(tcp) => break (udp, tcp),
                Err(error) if dns.port() == 0 && attempts < 16 => {
                    attempts += 1;
                    tracing::debug!(%error, "TCP port taken; trying another");
                }
                Err(error) => return Err(error),
            }
        };
        let api = TcpListener::bind(api).await?;
        Ok(Self { dns_udp, dns_tcp, api })
    }

    /// The DNS address (UDP and TCP).
    pub fn dns_addr(&self) -> io::Result<SocketAddr> {
        self.dns_udp.local_addr()
    }

    /// The admin API address.
    pub fn api_addr(&self) -> io::Result<SocketAddr> {
        self.api.local_addr()
    }
}

/// A UDP socket on `addr` that more sockets of this process (its user) may join: the kernel then spreads the
/// datagrams over them by source address and port, one flow always to the same socket.
fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// The UDP sockets to serve on: `first` (from [`Listeners::bind`]) and `workers - 1` more on its address.
fn udp_sockets(first: UdpSocket, workers: usize) -> anyhow::Result<Vec<UdpSocket>> {
    let addr = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(
            bind_udp(addr)
                .with_context(|| format!("binding UDP socket {} of {workers} on {addr}", sockets.len() + 1))?,
        );
    }
    Ok(sockets)
}

/// Runs the DNS server, the view sync and the admin API until `shutdown` is cancelled.
pub async fn run(listeners: Listeners, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = tether_db::pool(config.database_url()).context("database_url")?;
    if !tether_db::wait_and_migrate(&pool, config.max_backoff, &shutdown).await.context("applying migrations")? {
        return Ok(());
    }

    let targets = tether_config::TargetPolicy {
        allowed: config.allowed_target_ranges.clone(),
        operator: config.operator_addresses.clone(),
    };
    let shared = Arc::new(
        sync::Shared::new()
            .with_targets(targets)
            .with_address_bound(config.max_addresses_per_domain)
            .with_rrl(config.rrl()),
    );
    let (synced_tx, mut synced_rx) = watch::channel(false);
    // The view sync has connections of its own: a flood of API requests (bogus tokens, say) queues on the API's
    // pool and never delays DNS freshness.
    // At a second master site the view comes from the site's own hot standby (`view_database_url`).
    let sync_pool = tether_db::pool(config.view_database_url()).context("view_database_url")?;
    let sync_task =
        tokio::spawn(sync::run(sync_pool.clone(), shared.clone(), config.max_backoff, synced_tx, shutdown.clone()));
    tokio::select! {
        () = shutdown.cancelled() => {
            let _ = sync_task.await;
            return Ok(());
        }
        result = async { synced_rx.wait_for(|synced| *synced).await.map(|_| ()) } => {
            result.context("view sync stopped before the first load")?;
        }
    }

    let dns_addr = listeners.dns_addr()?;
    let api_addr = listeners.api_addr()?;
    let keys: Arc<[xfr::TsigKey]> = config.tsig_keys.clone().into();
    let handler = || server::Handler::with_keys(shared.clone(), keys.clone()).with_pool(pool.clone());
    let workers = config.udp_workers();
    let udp_handler = Arc::new(handler());
    let mut udp_tasks = tokio::task::JoinSet::new();
    for socket in udp_sockets(listeners.dns_udp, workers)? {
        udp_tasks.spawn(udp::serve(socket, udp_handler.clone(), shutdown.clone()));
    }
    let tcp_limits = tcp::Limits {
        idle: config.tcp_idle_timeout,
        total: config.tcp_max_connections,
        per_source: config.tcp_max_connections_per_source,
    };
    let tcp_task = tokio::spawn(tcp::serve(listeners.dns_tcp, Arc::new(handler()), tcp_limits, shutdown.clone()));
    let notify_task =
        tokio::spawn(xfr::notify::run(shared.clone(), config.also_notify.clone(), keys.clone(), shutdown.clone()));
    let migrate_task = tokio::spawn(migrate::run(pool.clone(), shutdown.clone()));
    let history_task = tokio::spawn(history::run(pool.clone(), config.event_retention, shutdown.clone()));

    let operator_token_hash = config.operator_token.as_ref().map(|t| api::token_hash(t.expose()));
    if operator_token_hash.is_none() {
        warn!("no operator token configured (operator_token or TETHER_OPERATOR_TOKEN): operator routes refuse all");
    }
    let app = api::router(api::AppState {
        pool: pool.clone(),
        shared,
        operator_token_hash,
        enrollment_ttl: config.enrollment_ttl,
        tsig_keys: keys.clone(),
        dyndns_trusted_proxies: config.dyndns_trusted_proxies.clone().into(),
        dyndns_limiter: Arc::default(),
        dns_addr,
        bounds: api::Bounds {
            addresses_per_domain: config.max_addresses_per_domain,
            domains_per_subscriber: config.max_domains_per_subscriber,
            requests_per_second: config.api_requests_per_second,
        },
        token_limiter: Arc::new(api::dyndns::Limiter::with_window(std::time::Duration::from_secs(1))),
        bad_tokens: Arc::new(api::dyndns::Limiter::with_window(std::time::Duration::from_secs(60))),
        migrations: api::MigrationSettings { hold_factor: config.migration_hold_factor, quiet: config.migration_quiet },
    });
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(listeners.api, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(api_shutdown.cancelled_owned())
            .await
    });
    info!(%dns_addr, %api_addr, udp_workers = workers, "serving");

    shutdown.cancelled().await;
    info!("shutting down");
    match tcp_task.await {
        Ok(Err(error)) => warn!(%error, "DNS over TCP stopped with an error"),
        Err(error) => warn!(%error, "DNS over TCP task failed"),
        Ok(Ok(())) => {}
    }
    while let Some(result) = udp_tasks.join_next().await {
        match result {
            Ok(Err(error)) => warn!(%error, "DNS over UDP stopped with an error"),
            Err(error) => warn!(%error, "DNS over UDP task failed"),
            Ok(Ok(())) => {}
        }
    }
    match api_task.await {
        Ok(Err(error)) => warn!(%error, "admin API did not stop cleanly"),
        Err(error) => warn!(%error, "admin API task failed"),
        Ok(Ok(())) => {}
    }
    let _ = notify_task.await;
    let _ = migrate_task.await;
    let _ = history_task.await;
    let _ = sync_task.await;
    pool.close().await;
    sync_pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hickory_server::proto::{op::Message, rr::RecordType};

    use super::*;
    use crate::udp::tests::{handler, query};

    /// Two workers share the port: every one of 32 clients is answered, which it would not be (half of them, by the
    /// kernel's spread) if a socket of the group were left unread; a third bind on the port by a process that did
    /// not ask to share it still fails.
    #[tokio::test]
    async fn udp_workers_share_the_port_and_all_are_served() {
        let first = bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = first.local_addr().expect("addr");
        let sockets = udp_sockets(first, 2).expect("second socket");
        assert_eq!(sockets.len(), 2);
        assert!(std::net::UdpSocket::bind(addr).is_err(), "a socket without SO_REUSEPORT cannot join");
        let shutdown = CancellationToken::new();
        let handler = Arc::new(handler());
        let mut tasks = tokio::task::JoinSet::new();
        for socket in sockets {
            tasks.spawn(udp::serve(socket, handler.clone(), shutdown.clone()));
        }
        let mut buf = vec![0u8; 4096];
        for id in 1..=32_u16 {
            let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
            client.send_to(&query("www.example.test.", RecordType::A, None, id, false), addr).await.expect("send");
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("client {id} answered in time"))
                .expect("recv");
            let message = Message::from_vec(&buf[..len]).expect("response decodes");
            assert_eq!(message.metadata.id, id);
            assert_eq!(message.answers.len(), 2);
        }
        shutdown.cancel();
        while let Some(result) = tasks.join_next().await {
            result.expect("joins").expect("ok");
        }
    }
}
