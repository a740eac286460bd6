//! Reconciles the static listeners with the table: binds the new ones, unbinds the gone ones, touches no other.
//!
//! `plan` is the pure part (desired set vs running set → operations); `run` executes it after every table swap
//! and retries listeners that could not be bound (address not on this host yet, port taken) on a timer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, UdpSocket},
    sync::watch,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    Shared,
    table::{Key, Protocol},
    tcp, udp,
};

/// How long a listener that failed to bind waits before the next attempt.
const RETRY: Duration = Duration::from_secs(2);
/// Pending connections the kernel keeps per TCP listener.
const BACKLOG: u32 = 1024;

/// What reconciling must do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Listeners to bind.
    pub bind: Vec<Key>,
    /// Listeners to stop.
    pub unbind: Vec<Key>,
}

/// The operations taking `running` to `desired`.
pub fn plan(desired: &BTreeSet<Key>, running: &BTreeSet<Key>) -> Plan {
    Plan {
        bind: desired.difference(running).copied().collect(),
        unbind: running.difference(desired).copied().collect(),
    }
}

/// Keeps the listeners in step with the table until `shutdown`; `changed` fires after each swap.
pub async fn run(shared: Arc<Shared>, mut changed: watch::Receiver<()>, shutdown: CancellationToken) {
    let mut running: BTreeMap<Key, CancellationToken> = BTreeMap::new();
    let mut failed: BTreeMap<Key, String> = BTreeMap::new();
    let mut tasks = JoinSet::new();
    loop {
        let desired = shared.table.load().keys();
        let todo = plan(&desired, &running.keys().copied().collect());
        for key in todo.unbind {
            if let Some(stop) = running.remove(&key) {
                stop.cancel();
                info!(listener = %key, "listener closed");
            }
        }
        failed.retain(|key, _| desired.contains(key));
        for key in todo.bind {
            let stop = shutdown.child_token();
            match bind(key, &shared, stop.clone(), &mut tasks).await {
                Ok(()) => {
                    if failed.remove(&key).is_some() {
                        info!(listener = %key, "listener bound after earlier failures");
                    } else {
                        info!(listener = %key, "listener bound");
                    }
                    running.insert(key, stop);
                }
                Err(error) => {
                    shared.metrics.bind_errors.inc();
                    let message = error.to_string();
                    // Said once per distinct failure, not on every retry.
                    if failed.get(&key) != Some(&message) {
                        warn!(listener = %key, %error, retry_every = ?RETRY, "cannot bind listener");
                        failed.insert(key, message);
                    }
                }
            }
        }
        shared.metrics.listeners.set(i64::try_from(running.len()).unwrap_or(i64::MAX));
        let retry = !failed.is_empty();
        tokio::select! {
            () = shutdown.cancelled() => break,
            result = changed.changed() => if result.is_err() { break },
            () = tokio::time::sleep(RETRY), if retry => {}
            Some(_) = tasks.join_next() => {}
        }
    }
    for stop in running.values() {
        stop.cancel();
    }
    while tasks.join_next().await.is_some() {}
}

/// Binds one listener and starts its task.
async fn bind(key: Key, shared: &Arc<Shared>, stop: CancellationToken, tasks: &mut JoinSet<()>) -> std::io::Result<()> {
    let addr = SocketAddr::new(key.ip, key.port);
    match key.protocol {
        Protocol::Tcp => {
            let listener = tcp_listener(addr)?;
            tasks.spawn(tcp::serve(listener, key, shared.clone(), stop));
        }
        Protocol::Udp => {
            let socket = UdpSocket::bind(addr).await?;
            tasks.spawn(udp::serve(socket, key, shared.clone(), stop));
        }
    }
    Ok(())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn key(last: u8, port: u16, protocol: Protocol) -> Key {
        Key { ip: IpAddr::from([203, 0, 113, last]), port, protocol }
    }

    #[test]
    fn plan_binds_the_new_and_unbinds_the_gone_only() {
        let running: BTreeSet<Key> =
            [key(1, 80, Protocol::Tcp), key(1, 80, Protocol::Udp), key(2, 443, Protocol::Tcp)].into_iter().collect();
        let desired: BTreeSet<Key> =
            [key(1, 80, Protocol::Tcp), key(2, 443, Protocol::Tcp), key(3, 53, Protocol::Udp)].into_iter().collect();
        let todo = plan(&desired, &running);
        assert_eq!(todo.bind, [key(3, 53, Protocol::Udp)]);
        assert_eq!(todo.unbind, [key(1, 80, Protocol::Udp)]);
        assert_eq!(plan(&desired, &desired), Plan::default());
    }
}
