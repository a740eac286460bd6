//! The TCP relay: per connection, choose a live address, connect (the next address when refused), send the PROXY
//! header if the domain wants one, then relay both ways until both sides are done or the address dies.
//!
//! Each direction moves its bytes with splice(2) ([`splice`]): socket → pipe → socket, never through user space,
//! with at most one pipe's worth (`tcp_buffer`) in flight, so a slow reader stalls its writer (backpressure) and the
//! kernel memory per flow is bounded. An EOF is passed on as a half-close (`shutdown(SHUT_WR)`) while the other
//! direction goes on. Pipes are lent from a shared pool only while bytes are in them, so an idle flow costs its two
//! sockets and nothing more; past the user's pipe quota (`fs.pipe-user-pages-soft`, when running neither as root nor
//! with CAP_SYS_RESOURCE) the kernel makes new pipes small, which costs system calls, not correctness. Where the
//! kernel cannot splice (EINVAL or ENOSYS before any byte moved) the direction falls back to copying through a
//! buffer of `tcp_buffer` bytes, read then written out in full.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    Shared,
    limits::Caps,
    metrics::{FlowMetrics, Refusal},
    proxy,
    splice::{self, Activity, Pipes, Spliced, Tally},
    table::{Domain, Entry, Key, Protocol, TargetState},
};

/// Accepts connections on one static listener until `stop`; each runs as its own task in `shared.flows`.
pub async fn serve(listener: TcpListener, key: Key, shared: Arc<Shared>, stop: CancellationToken) {
    let mut pause = PAUSE_MIN;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                pause = PAUSE_MIN;
                shared.flows.spawn(handle(stream, peer, key, shared.clone()));
            }
            Err(error) => {
                // Out of descriptors or buffers under a flood: pause accepting rather than spin; flows go on.
                warn!(%error, listener = %key, retry_in = ?pause, "cannot accept");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(PAUSE_MAX);
            }
        }
    }
}

const PAUSE_MIN: Duration = Duration::from_millis(10);
const PAUSE_MAX: Duration = Duration::from_secs(1);

/// One connection, from the choice of a target to the end of the relay.
async fn handle(mut client: TcpStream, peer: SocketAddr, key: Key, shared: Arc<Shared>) {
    let entry = shared.table.load().get(&key).cloned();
    let Some(Entry::Forward { domain, port }) = entry else {
        debug!(listener = %key, "no entry for this listener any more; closing");
        return;
    };
    let caps = Caps { max_flows: domain.row.max_flows, max_flows_per_client: domain.row.max_flows_per_client };
    let _permit = match shared.limits.admit(domain.row.id, peer.ip(), caps) {
        Ok(permit) => permit,
        Err(why) => {
            shared.metrics.refuse(&domain.row.name, Protocol::Tcp, why);
            debug!(domain = %domain.row.name, %peer, ?why, "flow refused");
            return;
        }
    };
    let metrics = shared.metrics.flow(&domain.row.name, Protocol::Tcp);
    let Some((mut upstream, target)) = connect(&domain, port, &shared, &metrics).await else {
        metrics.refused(Refusal::NoTarget);
        debug!(domain = %domain.row.name, "no address accepted the connection; closing");
        return;
    };
    let _flow = metrics.start();
    let _active = target.as_ref().map(TargetState::enter);
    // The flow ends when its address leaves the live set (the fallback has no such set) or on a hard shutdown.
    let token = target.as_ref().map_or_else(|| shared.cut.child_token(), |t| t.flow_token());
    for stream in [&client, &upstream] {
        let _ = stream.set_nodelay(true);
        if let Err(error) = keepalive(stream, shared.tcp_keepalive) {
            debug!(%error, "cannot turn TCP keep-alive on");
        }
    }
    if domain.row.proxy.tcp() {
        let header = client.local_addr().and_then(|local| proxy::header(peer, local, false));
        let sent = match header {
            Ok(header) => upstream.write_all(&header).await,
            Err(error) => Err(error),
        };
        if let Err(error) = sent {
            metrics.error("proxy_header");
            debug!(%error, domain = %domain.row.name, "cannot send the PROXY header; closing");
            return;
        }
    }
    let activity = Activity::new();
    tokio::select! {
        () = token.cancelled() => debug!(domain = %domain.row.name, "address left the live set; flow closed"),
        () = shared.cut.cancelled() => {}
        () = activity.idle_for(shared.tcp_idle_timeout) => {
            metrics.error("idle_timeout");
            debug!(domain = %domain.row.name, %peer, idle = ?shared.tcp_idle_timeout, "no byte either way; flow closed");
        }
        result = relay(&mut client, &mut upstream, &shared, &metrics, &activity) => if let Err(error) = result {
            metrics.error("relay");
            debug!(%error, domain = %domain.row.name, "relay ended with an error");
        },
    }
}

/// Connects to a live address, trying the next on failure, then the fallback. The target's state is `None` for
/// the fallback.
async fn connect(
    domain: &Domain,
    port: u16,
    shared: &Shared,
    metrics: &FlowMetrics,
) -> Option<(TcpStream, Option<Arc<TargetState>>)> {
    let mut tried = Vec::new();
    while let Some(target) = domain.choose(&tried) {
        let addr = SocketAddr::new(target.ip, port);
        match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                if !tried.is_empty() {
                    metrics.failovers.inc();
                }
                return Some((stream, Some(target.state.clone())));
            }
            Ok(Err(error)) => debug!(%error, %addr, "connect failed; trying the next address"),
            Err(_) => debug!(%addr, "connect timed out; trying the next address"),
        }
        metrics.error("connect");
        tried.push(target.ip);
    }
    let addr = SocketAddr::new(domain.row.fallback?, port);
    match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            if !tried.is_empty() {
                metrics.failovers.inc();
            }
            Some((stream, None))
        }
        Ok(Err(_)) | Err(_) => {
            metrics.error("connect");
            None
        }
    }
}

/// TCP keep-alive: probes after `idle` of silence, every `idle / 6` (at least 1 s), six of them: a vanished peer
/// frees its flow within about twice `idle`.
fn keepalive(stream: &TcpStream, idle: std::time::Duration) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = u32::try_from(idle.as_secs().max(1)).unwrap_or(u32::MAX);
    setsockopt(stream, sockopt::KeepAlive, &true)?;
    setsockopt(stream, sockopt::TcpKeepIdle, &secs)?;
    setsockopt(stream, sockopt::TcpKeepInterval, &(secs / 6).max(1))?;
    setsockopt(stream, sockopt::TcpKeepCount, &6)
}

/// Relays both ways until both directions reached EOF; an error in either ends both.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    shared: &Shared,
    metrics: &FlowMetrics,
    activity: &Activity,
) -> io::Result<()> {
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let (pipes, size) = (&shared.pipes, shared.tcp_buffer);
    let up = Tally { bytes: &metrics.bytes_up, activity };
    let down = Tally { bytes: &metrics.bytes_down, activity };
    tokio::try_join!(
        pump(&mut client_read, &mut upstream_write, pipes, size, up),
        pump(&mut upstream_read, &mut client_write, pipes, size, down),
    )?;
    Ok(())
}

/// One direction, spliced through `pipes` (copied through a buffer of `size` bytes when the kernel cannot splice);
/// EOF becomes a half-close of the writer.
async fn pump(
    reader: &mut ReadHalf<'_>,
    writer: &mut WriteHalf<'_>,
    pipes: &Pipes,
    size: usize,
    tally: Tally<'_>,
) -> io::Result<()> {
    if splice::forward(reader.as_ref(), writer.as_ref(), pipes, tally).await? == Spliced::Unsupported {
        debug!("splice unavailable; copying this direction through user space");
        copy(reader, writer, size, tally).await?;
    }
    // The peer may be gone already (ENOTCONN); the other direction decides the flow's end.
    let _ = writer.shutdown().await;
    Ok(())
}

/// The fallback: read into a buffer, write it all, count, until EOF.
async fn copy(reader: &mut ReadHalf<'_>, writer: &mut WriteHalf<'_>, size: usize, tally: Tally<'_>) -> io::Result<()> {
    // Capacity, not zeroed bytes: `read_buf` fills the spare capacity, so a flow costs no memset of its buffer and
    // touches only the pages its reads reach.
    let mut buf = Vec::with_capacity(size);
    loop {
        buf.clear();
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        writer.write_all(&buf).await?;
        tally.add(n);
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::socket::{getsockopt, sockopt};

    use super::*;

    #[tokio::test]
    async fn keepalive_probes_after_the_idle_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        keepalive(&stream, std::time::Duration::from_secs(60)).expect("keepalive");
        assert!(getsockopt(&stream, sockopt::KeepAlive).expect("get"));
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepIdle).expect("get"), 60);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepInterval).expect("get"), 10);
        assert_eq!(getsockopt(&stream, sockopt::TcpKeepCount).expect("get"), 6);
    }
}
