//! The heartbeat driver: one task owning the UDP socket and the [`Monitor`]. Each turn it feeds commands,
//! datagrams or the timer into the machine, sends what it asks to send, passes its events on, and re-arms the one
//! timer at `poll_timeout()`.
//!
//! Datagrams go both ways in batches, one system call per [`BATCH`]: `recvmmsg` reads what has queued up, and the
//! pings a turn produces (every target due in the same millisecond) leave together through `sendmmsg`. The socket's
//! buffers are raised to [`SOCKET_BUFFER`] so that a second's worth of bursts at 100,000 targets is not dropped.
//! UDP_SEGMENT (GSO) cannot batch further: it cuts one buffer into datagrams for one destination, and every ping goes
//! to a different address.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use nix::sys::socket::{setsockopt, sockopt};
use rand::SeedableRng;
use tether_proto::heartbeat::{
    monitor::{Event, Liveness, Monitor, Policy, TargetId, Transmit},
    packet::{Key, PACKET_LEN},
};
use tether_service::mmsg;
use tokio::{io::Interest, net::UdpSocket, sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Datagrams read or written per system call.
pub use tether_service::mmsg::BATCH;
/// Receive batches handled per turn before the timer and the commands get a look in.
const RECV_BATCHES: usize = 8;
/// Receive batches read before deadlines are handled: more than a full [`SOCKET_BUFFER`] of heartbeat datagrams.
const DRAIN_BATCHES: usize = 128;
/// Commands applied per turn.
const COMMAND_BUDGET: usize = 1024;
/// Bytes of each receive slot: room for a heartbeat packet; anything longer is cut here, and so malformed.
const SLOT: usize = PACKET_LEN + 9;
/// SO_RCVBUF and SO_SNDBUF asked for (the kernel caps them at net.core.rmem_max / wmem_max).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// What the control side asks of the driver.
#[derive(Debug)]
pub enum Command {
    /// Start (or restart) pinging an address.
    Add {
        /// The `addresses` row.
        id: TargetId,
        /// The NCU's session.
        session: u64,
        /// Uplink index in packets.
        uplink: u8,
        /// Session key.
        key: Key,
        /// Where to ping until a hello says otherwise.
        dest: SocketAddr,
        /// `Live` for an address taken over from another server.
        initial: Liveness,
    },
    /// Stop pinging an address.
    Remove(TargetId),
    /// Stop pinging every address of a session.
    RemoveSession(u64),
}

/// Counters the driver publishes.
#[derive(Debug, Default)]
pub struct Counters {
    /// Addresses being monitored.
    pub targets: AtomicU64,
    /// Replies with a bad MAC.
    pub forged: AtomicU64,
    /// Replies matching no outstanding probe (replays, duplicates, very late).
    pub stale: AtomicU64,
    /// Datagrams that are not heartbeat packets.
    pub malformed: AtomicU64,
    /// Packets of unknown sessions or uplinks.
    pub unknown: AtomicU64,
    /// Pings sent.
    pub pings: AtomicU64,
    /// Valid replies.
    pub pongs: AtomicU64,
    /// Replies from another address than the one pinged (proved by a ping to it, or never).
    pub unproven: AtomicU64,
    /// Targets not yet proven.
    pub pending: AtomicU64,
    /// Targets answering.
    pub live: AtomicU64,
    /// Targets declared dead (still pinged).
    pub dead: AtomicU64,
}

/// Runs until `shutdown` or until every command sender is gone.
pub async fn run(
    socket: UdpSocket,
    policy: Policy,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    size_buffers(&socket);
    dont_fragment(&socket);
    let mut monitor = Monitor::new(policy);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut io = Batches::new();
    let timer = tokio::time::sleep(std::time::Duration::from_secs(3600));
    tokio::pin!(timer);
    // The deadline the timer is set to; None once it has fired.
    let mut armed = None;
    loop {
        let next = monitor.poll_timeout();
        if next != armed {
            if let Some(deadline) = next {
                timer.as_mut().reset(Instant::from_std(deadline));
            }
            armed = next;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            command = commands.recv() => match command {
                Some(command) => {
                    let now = std::time::Instant::now();
                    apply(&mut monitor, command, now);
                    for _ in 1..COMMAND_BUDGET {
                        let Ok(command) = commands.try_recv() else { break };
                        apply(&mut monitor, command, now);
                    }
                }
                None => return,
            },
            ready = socket.readable() => match ready {
                Ok(()) => io.receive(&socket, &mut monitor),
                Err(error) => debug!(%error, "heartbeat socket not readable"),
            },
            () = &mut timer, if armed.is_some() => {
                armed = None;
                io.on_timer(&socket, &mut monitor, &mut rng);
            }
        }
        io.take_transmits(&mut monitor);
        if !io.send(&socket, &shutdown).await {
            return;
        }
        while let Some(event) = monitor.poll_event() {
            if events.send(event).is_err() {
                warn!("state writer gone; stopping heartbeats");
                return;
            }
        }
        publish(&monitor, &counters);
    }
}

/// Raises the socket's buffers, so that bursts of pongs wait in the kernel rather than being dropped.
fn size_buffers(socket: &UdpSocket) {
    if let Err(error) = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER) {
        warn!(%error, "cannot raise the heartbeat socket's receive buffer");
    }
    if let Err(error) = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER) {
        warn!(%error, "cannot raise the heartbeat socket's send buffer");
    }
}

/// Sets DF on the pings (IP_PMTUDISC_PROBE, as quinn does for QUIC): a 55-byte datagram is never fragmented, and
/// without DF the kernel draws each datagram's IP identification from a shared hashed table (`__ip_select_ident`,
/// 4 % of hbs's CPU at 50,000 addresses); with DF it is 0 (RFC 6864). The datagrams are otherwise the same.
fn dont_fragment(socket: &UdpSocket) {
    use rustix::net::sockopt::{Ipv4PathMtuDiscovery, set_ip_mtu_discover};
    if let Err(error) = set_ip_mtu_discover(socket, Ipv4PathMtuDiscovery::PROBE) {
        debug!(%error, "cannot set DF on the heartbeat socket");
    }
}

/// The receive buffers, and the transmits of the turn. (nix's `MultiHeaders` holds raw pointers, so is not `Send`:
/// each system call gets its own, which costs two small allocations per batch.)
struct Batches {
    slots: Box<[[u8; SLOT]; BATCH]>,
    /// The monitor's transmits, in order, waiting for `sendmmsg`.
    pending: Vec<Transmit>,
}

impl Batches {
    fn new() -> Self {
        Self { slots: Box::new([[0; SLOT]; BATCH]), pending: Vec::with_capacity(BATCH) }
    }

    /// The timer fired: replies already queued on the socket are read first, then the deadlines handled. After this
    /// task waited for a core (a busy host, a storm of registrations), pongs that arrived within their windows are
    /// in the kernel's queue, and a deadline handled first would declare their targets dead. The kernel is asked
    /// directly: the runtime may not have seen the socket turn readable yet.
    fn on_timer(&mut self, socket: &UdpSocket, monitor: &mut Monitor, rng: &mut impl rand::RngCore) {
        self.receive_up_to(socket, monitor, DRAIN_BATCHES, Ask::Kernel);
        monitor.handle_timeout(std::time::Instant::now(), rng);
    }

    /// Feeds the monitor what has queued up on the socket, up to [`RECV_BATCHES`] system calls' worth.
    fn receive(&mut self, socket: &UdpSocket, monitor: &mut Monitor) {
        self.receive_up_to(socket, monitor, RECV_BATCHES, Ask::IfReady);
    }

    /// Feeds the monitor what has queued up on the socket, up to `batches` system calls' worth.
    fn receive_up_to(&mut self, socket: &UdpSocket, monitor: &mut Monitor, batches: usize, ask: Ask) {
        for _ in 0..batches {
            let mut received = [(0_usize, None::<SocketAddr>); BATCH];
            let slots = &mut *self.slots;
            // A short batch emptied the queue: through the runtime, it also clears the readiness (as `WouldBlock`
            // does), which saves a turn and a `recvmmsg` that would find nothing. The readiness cleared is the one
            // seen before the call, so a datagram arriving after it still wakes the task.
            let mut short = None;
            let count = match ask {
                Ask::IfReady => socket.try_io(Interest::READABLE, || {
                    let count = mmsg::receive(socket, slots, &mut received)?;
                    if count < BATCH {
                        short = Some(count);
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(count)
                }),
                Ask::Kernel => mmsg::receive(socket, slots, &mut received),
            };
            let count = match (count, short) {
                (_, Some(count)) | (Ok(count), None) => count,
                (Err(error), None) if error.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors of earlier sends can surface here; nothing to do but read on.
                (Err(error), None) => {
                    debug!(%error, "heartbeat socket receive error");
                    continue;
                }
            };
            let now = std::time::Instant::now();
            for (slot, &(len, from)) in self.slots.iter().zip(&received).take(count) {
                if let Some(from) = from {
                    monitor.handle_datagram(&slot[..len], from, now);
                }
            }
            if count < BATCH {
                return;
            }
        }
    }

    /// Moves every transmit the monitor has into the pending batch.
    fn take_transmits(&mut self, monitor: &mut Monitor) {
        while let Some(transmit) = monitor.poll_transmit() {
            self.pending.push(transmit);
        }
    }

    /// Sends every pending transmit, [`BATCH`] per system call, waiting for room in the socket's buffer when it is
    /// full. A datagram the kernel refuses is skipped. False when `shutdown` came first.
    async fn send(&mut self, socket: &UdpSocket, shutdown: &CancellationToken) -> bool {
        let mut done = 0;
        while done < self.pending.len() {
            let chunk = &self.pending[done..self.pending.len().min(done + BATCH)];
            let sent = socket.try_io(Interest::WRITABLE, || send_batch(socket, chunk));
            match sent {
                Ok(sent) => done += sent.max(1),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        writable = socket.writable() => {
                            if let Err(error) = writable {
                                debug!(%error, "heartbeat socket not writable; pings dropped");
                                break;
                            }
                        }
                    }
                }
                // `sendmmsg` fails only when its first datagram does: skip that one.
                Err(error) => {
                    debug!(%error, dest = %chunk[0].dest, "ping not sent");
                    done += 1;
                }
            }
        }
        self.pending.clear();
        true
    }
}

/// Whether a receive trusts the runtime's readiness or asks the kernel.
#[derive(Debug, Clone, Copy)]
enum Ask {
    /// Only when the runtime saw the socket readable (clearing that readiness on `WouldBlock`).
    IfReady,
    /// Whatever the runtime saw.
    Kernel,
}

/// One `sendmmsg` of up to [`BATCH`] transmits; how many the kernel took.
fn send_batch(socket: &UdpSocket, chunk: &[Transmit]) -> io::Result<usize> {
    let datagrams: Vec<(SocketAddr, &[u8])> =
        chunk.iter().take(BATCH).map(|transmit| (transmit.dest, &transmit.payload[..])).collect();
    mmsg::send(socket, &datagrams)
}

fn apply(monitor: &mut Monitor, command: Command, now: std::time::Instant) {
    match command {
        Command::Add { id, session, uplink, key, dest, initial } => {
            monitor.add(id, session, uplink, key, dest, initial, now);
        }
        Command::Remove(id) => monitor.remove(id),
        Command::RemoveSession(session) => monitor.remove_session(session),
    }
}

fn publish(monitor: &Monitor, counters: &Counters) {
    let stats = monitor.stats();
    counters.targets.store(monitor.len() as u64, Ordering::Relaxed);
    counters.forged.store(stats.forged, Ordering::Relaxed);
    counters.stale.store(stats.stale, Ordering::Relaxed);
    counters.malformed.store(stats.malformed, Ordering::Relaxed);
    counters.unknown.store(stats.unknown, Ordering::Relaxed);
    counters.pings.store(stats.pings, Ordering::Relaxed);
    counters.pongs.store(stats.pongs, Ordering::Relaxed);
    counters.unproven.store(stats.unproven, Ordering::Relaxed);
    let by_state = monitor.by_state();
    counters.pending.store(by_state.pending, Ordering::Relaxed);
    counters.live.store(by_state.live, Ordering::Relaxed);
    counters.dead.store(by_state.dead, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Every datagram a batch send is handed arrives, in order, whatever the batch boundaries.
    #[tokio::test]
    async fn batched_sends_and_receives_keep_every_datagram() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        size_buffers(&a);
        size_buffers(&b);
        let to = b.local_addr().expect("addr");
        let mut batches = Batches::new();
        let total = BATCH * 3 + 7;
        for i in 0..total {
            let mut payload = [0_u8; PACKET_LEN];
            payload[..8].copy_from_slice(&(i as u64).to_be_bytes());
            batches.pending.push(Transmit { dest: to, payload });
        }
        assert!(batches.send(&a, &CancellationToken::new()).await);
        assert!(batches.pending.is_empty());
        let mut buf = [0_u8; 128];
        for i in 0..total {
            let (n, from) = b.recv_from(&mut buf).await.expect("datagram");
            assert_eq!((n, from), (PACKET_LEN, a.local_addr().expect("addr")));
            assert_eq!(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")), i as u64);
        }
    }

    /// A driver that waited for a core finds pongs queued in the kernel: the timer reads them before it handles the
    /// deadlines they answer, so those targets are neither re-probed nor declared dead; a silent one still dies.
    #[tokio::test]
    async fn pongs_queued_while_the_driver_waited_count_before_their_deadlines() {
        use tether_proto::heartbeat::packet::{Kind, Packet, decode, encode};
        const KEY: Key = [9; 32];
        let hbs = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let ncu = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let (hbs_addr, ncu_addr) = (hbs.local_addr().expect("addr"), ncu.local_addr().expect("addr"));
        let mut monitor = Monitor::new(Policy::default());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut io = Batches::new();
        let shutdown = CancellationToken::new();
        let start = std::time::Instant::now();
        for id in 1..=3 {
            monitor.add(id, 100 + id as u64, 0, KEY, ncu_addr, Liveness::Pending, start);
        }
        while monitor.stats().pings < 3 {
            io.on_timer(&hbs, &mut monitor, &mut rng);
            io.take_transmits(&mut monitor);
            assert!(io.send(&hbs, &shutdown).await);
        }
        // Sessions 101 and 102 answer at once; 103 is silent.
        let mut buf = [0_u8; 128];
        for _ in 0..3 {
            let (len, _) = ncu.recv_from(&mut buf).await.expect("ping");
            let ping = decode(&buf[..len], &KEY).expect("authentic ping");
            if ping.session != 103 {
                let pong = Packet { kind: Kind::Pong, ..ping };
                ncu.send_to(&encode(&pong, &KEY), hbs_addr).await.expect("pong sent");
            }
        }
        // The driver gets no core until every first window has closed.
        std::thread::sleep(monitor.poll_timeout().expect("windows open") - start + Duration::from_millis(300));
        let mut events = Vec::new();
        while !events.iter().any(|event| matches!(event, Event::Dead { id: 3 })) {
            assert!(start.elapsed() < Duration::from_secs(10), "target 3 never declared dead: {events:?}");
            let next = monitor.poll_timeout().expect("a deadline");
            tokio::time::sleep_until(Instant::from_std(next)).await;
            io.on_timer(&hbs, &mut monitor, &mut rng);
            io.take_transmits(&mut monitor);
            assert!(io.send(&hbs, &shutdown).await);
            events.extend(std::iter::from_fn(|| monitor.poll_event()));
        }
        let alive: Vec<TargetId> = events
            .iter()
            .filter_map(|event| if let Event::Alive { id, .. } = event { Some(*id) } else { None })
            .collect();
        assert_eq!(alive, [1, 2], "{events:?}");
        assert_eq!(monitor.liveness(1), Some(Liveness::Live));
        assert_eq!(monitor.liveness(2), Some(Liveness::Live));
        // Only the silent target was re-probed.
        assert_eq!(monitor.stats().reprobes, u64::from(Policy::default().reprobes));
    }

    /// Batched receives hand the monitor every datagram, however many system calls that takes.
    #[tokio::test]
    async fn batched_receives_feed_every_datagram_to_the_monitor() {
        let a = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        size_buffers(&a);
        let to = a.local_addr().expect("addr");
        let total = BATCH * RECV_BATCHES + BATCH + 5;
        for i in 0..total {
            // Not heartbeat packets: too short, or too long for a receive slot.
            let len = if i % 2 == 0 { 10 } else { 200 };
            b.send_to(&vec![0xff; len], to).await.expect("sent");
        }
        let mut monitor = Monitor::new(Policy::default());
        let mut batches = Batches::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while monitor.stats().malformed < total as u64 {
            assert!(std::time::Instant::now() < deadline, "{:?}", monitor.stats());
            a.readable().await.expect("readable");
            batches.receive(&a, &mut monitor);
        }
        assert_eq!(monitor.stats().malformed, total as u64);
    }
}
