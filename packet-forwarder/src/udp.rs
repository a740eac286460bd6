//! The UDP relay: one socket on the static address receives from every client; each client address is a flow
//! with its own upstream socket connected to the chosen address, and replies go back out of the static socket, so
//! they leave from the static address.
//!
//! One task per listener drives the [`FlowTable`]: datagrams in, one timer at `poll_timeout()`, expired flows out.
//! Each flow has a reply task reading its upstream socket. A flow whose address leaves the live set is cancelled,
//! and the client's next datagram opens a new flow to a live address.
//!
//! Datagrams move in bursts ([`batch`]): one recvmmsg per burst on a socket (UDP GRO on, so a sender's GSO burst
//! arrives as one buffer), then one sendmmsg per flow, each client's datagrams in the order they came, runs of
//! equal size as GSO messages (PROXY headers included: each datagram gets its own). A quiet flow's reply task starts
//! with one slot and grows to a full batch only once the site sends bursts.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{
    Shared,
    batch::{self, BATCH, Datagram, Gso, Slots},
    flows::FlowTable,
    limits::{Caps, Permit},
    metrics::{FlowMetrics, Refusal, RunningFlow},
    proxy,
    table::{ActiveGuard, Entry, Key, Protocol, TargetState},
};

/// The largest UDP payload, and of a GRO buffer.
const MAX_DATAGRAM: usize = 65_535;

/// One client's flow: the shell's value in the [`FlowTable`].
struct UdpFlow {
    upstream: Arc<UdpSocket>,
    /// GSO on the upstream socket.
    gso: Gso,
    header: Option<Vec<u8>>,
    token: CancellationToken,
    /// Nanoseconds after the listener's epoch of the last reply, plus one; 0 before the first.
    last_reply: Arc<AtomicU64>,
    metrics: FlowMetrics,
    _permit: Permit,
    _active: Option<ActiveGuard>,
    _running: RunningFlow,
}

/// Relays datagrams on one static listener until `stop`.
pub async fn serve(socket: UdpSocket, key: Key, shared: Arc<Shared>, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let Ok(local) = socket.local_addr() else { return };
    if let Err(error) = batch::enable_gro(&socket) {
        debug!(%error, listener = %key, "no UDP GRO; datagrams arrive one by one");
    }
    let gso = Arc::new(Gso::default());
    let epoch = Instant::now();
    let mut flows: FlowTable<UdpFlow> = FlowTable::new(shared.udp_idle_timeout);
    let mut slots = Slots::new(BATCH, MAX_DATAGRAM);
    let mut got = Vec::with_capacity(BATCH);
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        let deadline = flows.poll_timeout();
        if let Some(at) = deadline {
            timer.as_mut().reset(tokio::time::Instant::from_std(at));
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = &mut timer, if deadline.is_some() => {
                let expired = flows.handle_timeout(Instant::now(), |flow| flow.last_reply(epoch));
                if !expired.is_empty() {
                    debug!(listener = %key, flows = expired.len(), "idle UDP flows closed");
                }
            }
            received = slots.recv(&socket, &mut got) => match received {
                Ok(_) => {
                    let ctx = Context { key, local, epoch, socket: &socket, gso: &gso, shared: &shared };
                    ctx.forward(&mut flows, &slots, &got).await;
                }
                // ICMP errors surface here on some systems; the socket itself stays usable.
                Err(error) => debug!(%error, listener = %key, "UDP receive failed"),
            },
        }
    }
}

/// What the listener's handlers need.
struct Context<'a> {
    key: Key,
    local: SocketAddr,
    epoch: Instant,
    socket: &'a Arc<UdpSocket>,
    /// GSO on the static socket, which every flow's replies share.
    gso: &'a Arc<Gso>,
    shared: &'a Arc<Shared>,
}

impl Context<'_> {
    /// Sends a batch of client datagrams upstream, each client's in the order they came, opening flows as needed.
    async fn forward(&self, flows: &mut FlowTable<UdpFlow>, slots: &Slots, got: &[Datagram]) {
        // Group by client, keeping each client's order (a stable sort of at most `BATCH` entries).
        let mut order: Vec<&Datagram> = got.iter().filter(|d| d.from.is_some()).collect();
        order.sort_by_key(|d| d.from);
        let now = Instant::now();
        for group in order.chunk_by(|a, b| a.from == b.from) {
            let Some(client) = group[0].from else { continue };
            if flows.get(client, now).is_none_or(|flow| flow.token.is_cancelled()) {
                drop(flows.remove(client));
                let Some(flow) = self.open(client).await else { continue };
                flows.insert(client, flow, now);
            }
            let Some(flow) = flows.get(client, now) else { continue };
            let ranges: Vec<Range<usize>> = group.iter().map(|d| d.range()).collect();
            let header = flow.header.as_deref();
            let sent = batch::send(&flow.upstream, &flow.gso, None, header, slots.bytes(), &ranges).await;
            let bytes: usize = group.iter().map(|d| d.len).sum();
            if let Some(error) = sent.error {
                flow.metrics.error("send");
                debug!(%error, failed = sent.failed, listener = %self.key, "cannot send upstream");
            }
            // Exact when all went; otherwise an estimate (which ones failed is not known).
            flow.metrics.bytes_up.inc_by((bytes * sent.sent / group.len()) as u64);
        }
    }

    /// A new flow for `client`, or `None` when refused (caps, nothing live) or the upstream socket fails.
    async fn open(&self, client: SocketAddr) -> Option<UdpFlow> {
        let entry = self.shared.table.load().get(&self.key).cloned();
        let Some(Entry::Forward { domain, port }) = entry else { return None };
        let caps = Caps { max_flows: domain.row.max_flows, max_flows_per_client: domain.row.max_flows_per_client };
        let permit = match self.shared.limits.admit(domain.row.id, client.ip(), caps) {
            Ok(permit) => permit,
            Err(why) => {
                self.shared.metrics.refuse(&domain.row.name, Protocol::Udp, why);
                return None;
            }
        };
        let metrics = self.shared.metrics.flow(&domain.row.name, Protocol::Udp);
        let (ip, target) = match domain.choose(&[]) {
            Some(target) => (target.ip, Some(target.state.clone())),
            None => match domain.row.fallback {
                Some(ip) => (ip, None),
                None => {
                    metrics.refused(Refusal::NoTarget);
                    return None;
                }
            },
        };
        let upstream = match connected_socket(SocketAddr::new(ip, port)).await {
            Ok(socket) => Arc::new(socket),
            Err(error) => {
                metrics.error("connect");
                debug!(%error, listener = %self.key, "cannot open an upstream UDP socket");
                return None;
            }
        };
        let header = if domain.row.proxy.udp() {
            match proxy::header(client, self.local, true) {
                Ok(header) => Some(header),
                Err(_) => {
                    metrics.error("proxy_header");
                    return None;
                }
            }
        } else {
            None
        };
        let token = target.as_ref().map_or_else(|| self.shared.cut.child_token(), |t| t.flow_token());
        let last_reply = Arc::new(AtomicU64::new(0));
        let replies = Replies {
            upstream: upstream.clone(),
            socket: self.socket.clone(),
            gso: self.gso.clone(),
            client,
            token: token.clone(),
            cut: self.shared.cut.clone(),
            last_reply: last_reply.clone(),
            metrics: metrics.clone(),
            epoch: self.epoch,
        };
        tokio::spawn(replies.run());
        Some(UdpFlow {
            upstream,
            gso: Gso::default(),
            header,
            token,
            last_reply,
            _running: metrics.start(),
            metrics,
            _permit: permit,
            _active: target.as_ref().map(TargetState::enter),
        })
    }
}

impl UdpFlow {
    fn last_reply(&self, epoch: Instant) -> Option<Instant> {
        match self.last_reply.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(epoch + Duration::from_nanos(nanos - 1)),
        }
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        // Stops the reply task, which drops the upstream socket.
        self.token.cancel();
    }
}

/// A UDP socket on an ephemeral port, connected to `target`: it sends only there and hears only from there, with
/// UDP GRO when the kernel has it.
async fn connected_socket(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let any = match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(target).await?;
    let _ = batch::enable_gro(&socket);
    Ok(socket)
}

/// The reply side of one flow: upstream socket → static socket → client.
struct Replies {
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    gso: Arc<Gso>,
    client: SocketAddr,
    token: CancellationToken,
    cut: CancellationToken,
    last_reply: Arc<AtomicU64>,
    metrics: FlowMetrics,
    epoch: Instant,
}

impl Replies {
    async fn run(self) {
        // One slot until the site sends bursts: a quiet flow keeps one datagram's worth of buffer.
        let mut slots = Slots::new(1, MAX_DATAGRAM);
        let mut got = Vec::with_capacity(BATCH);
        let mut ranges = Vec::with_capacity(BATCH);
        loop {
            let received = tokio::select! {
                () = self.token.cancelled() => return,
                () = self.cut.cancelled() => return,
                received = slots.recv(&self.upstream, &mut got) => received,
            };
            let messages = match received {
                Ok(messages) => messages,
                Err(error) => {
                    // ECONNREFUSED: the site's port is closed (ICMP). Reported once per ICMP; keep listening.
                    self.metrics.error("upstream");
                    debug!(%error, "upstream UDP socket reported an error");
                    continue;
                }
            };
            let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            self.last_reply.store(nanos + 1, Ordering::Relaxed);
            ranges.clear();
            ranges.extend(got.iter().map(Datagram::range));
            let sent = batch::send(&self.socket, &self.gso, Some(self.client), None, slots.bytes(), &ranges).await;
            let bytes: usize = got.iter().map(|d| d.len).sum();
            self.metrics.bytes_down.inc_by((bytes * sent.sent / got.len().max(1)) as u64);
            if let Some(error) = sent.error {
                self.metrics.error("send");
                debug!(%error, failed = sent.failed, "cannot send a reply to the client");
            }
            if messages == slots.count() {
                slots.grow(slots.count() * 2);
            }
        }
    }
}
