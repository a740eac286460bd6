//! The heartbeat driver: one task owning the UDP socket and the [`Monitor`]. Each turn it feeds commands or the
//! timer into the machine (the timer first reads every datagram that queued up), sends what it asks to send, passes
//! its events on, and re-arms the one timer at `poll_timeout()`, moved onto the tick grid.
//!
//! The driver turns on a grid of `tick` (2 ms by default), never on a datagram's arrival: the socket is not even
//! registered with the runtime, whose edge-triggered epoll would wake the thread for every burst of pongs whether a
//! task waits or not. While any target is monitored it turns on every grid point (reading what queued up; with
//! none, every [`IDLE_READ`]), and each deadline is handled at the first grid point at or after it, after the pongs
//! queued until then are read, so a pong read late still counts: what the wait changes is only when a proof or a
//! verdict is made, by at most a tick. What it saves is wake-ups: at 10,000 addresses one per tick instead of one
//! per millisecond's pings and per burst of pongs, each a context switch, and on a virtual machine an exit.
//!
//! Datagrams go both ways in batches, one system call per [`BATCH`]: `recvmmsg` reads what has queued up, and the
//! pings a turn produces (every target due in the same tick) leave together through `sendmmsg`. The socket's
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
use tokio::{net::UdpSocket, sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Datagrams read or written per system call.
pub use tether_service::mmsg::BATCH;
/// Receive batches read before deadlines are handled: more than a full [`SOCKET_BUFFER`] of heartbeat datagrams.
const DRAIN_BATCHES: usize = 128;
/// Time between two reads of the socket while no target is monitored: stray datagrams are counted and dropped, and
/// the first hellos heard, this soon. (With targets, the socket is read every tick.)
const IDLE_READ: std::time::Duration = std::time::Duration::from_millis(20);
/// The shortest time between two reads when `tick` is zero (deadlines are then handled as they come).
const MIN_TICK: std::time::Duration = std::time::Duration::from_millis(1);
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

/// Runs until `shutdown` or until every command sender is gone, turning on the grid of `tick` (see the module).
pub async fn run(
    socket: UdpSocket,
    policy: Policy,
    tick: std::time::Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    // Out of the runtime's reactor: nothing but the timer reads it (the socket stays non-blocking).
    let socket = match socket.into_std() {
        Ok(socket) => socket,
        Err(error) => {
            warn!(%error, "cannot take the heartbeat socket out of the runtime; no heartbeats");
            return;
        }
    };
    size_buffers(&socket);
    dont_fragment(&socket);
    let mut monitor = Monitor::new(policy);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut io = Batches::new(tick);
    let timer = tokio::time::sleep(std::time::Duration::from_secs(3600));
    tokio::pin!(timer);
    // The instant the timer is set to; None once it has fired.
    let mut armed = None;
    let grid = Grid { origin: std::time::Instant::now(), tick };
    // The grid point of the last read.
    let mut last_read = grid.origin;
    loop {
        let read_by = last_read + if monitor.is_empty() { IDLE_READ } else { tick.max(MIN_TICK) };
        let next = Some(grid.at_or_after(monitor.poll_timeout().map_or(read_by, |deadline| deadline.min(read_by))));
        if next != armed {
            if let Some(at) = next {
                timer.as_mut().reset(Instant::from_std(at));
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
            () = &mut timer, if armed.is_some() => {
                last_read = armed.take().unwrap_or_else(std::time::Instant::now);
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

/// The instants the driver turns at: multiples of `tick` from `origin` (every instant when `tick` is zero).
#[derive(Debug, Clone, Copy)]
struct Grid {
    origin: std::time::Instant,
    tick: std::time::Duration,
}

impl Grid {
    /// The first grid point at or after `at`.
    fn at_or_after(&self, at: std::time::Instant) -> std::time::Instant {
        let tick = self.tick.as_nanos();
        let Some(since) = at.checked_duration_since(self.origin).filter(|_| tick > 0) else { return at };
        let steps = since.as_nanos().div_ceil(tick);
        let offset = u64::try_from(steps * tick).unwrap_or(u64::MAX);
        self.origin + std::time::Duration::from_nanos(offset)
    }
}

/// Raises the socket's buffers, so that bursts of pongs wait in the kernel rather than being dropped.
fn size_buffers(socket: &std::net::UdpSocket) {
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
fn dont_fragment(socket: &std::net::UdpSocket) {
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
    /// How long a send waits for room in a full socket buffer before it tries again.
    retry: std::time::Duration,
}

impl Batches {
    fn new(tick: std::time::Duration) -> Self {
        let retry = tick.max(MIN_TICK);
        Self { slots: Box::new([[0; SLOT]; BATCH]), pending: Vec::with_capacity(BATCH), retry }
    }

    /// The timer fired: replies queued on the socket are read first, then the deadlines handled. Pongs that
    /// arrived within their windows while the driver waited for its tick (or for a core: a busy host, a storm of
    /// registrations) are in the kernel's queue, and a deadline handled first would declare their targets dead.
    fn on_timer(&mut self, socket: &std::net::UdpSocket, monitor: &mut Monitor, rng: &mut impl rand::RngCore) {
        self.receive(socket, monitor);
        monitor.handle_timeout(std::time::Instant::now(), rng);
    }

    /// Feeds the monitor what has queued up on the socket, up to [`DRAIN_BATCHES`] system calls' worth.
    fn receive(&mut self, socket: &std::net::UdpSocket, monitor: &mut Monitor) {
        for _ in 0..DRAIN_BATCHES {
            let mut received = [(0_usize, None::<SocketAddr>); BATCH];
            let count = match mmsg::receive(socket, &mut self.slots, &mut received) {
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors of earlier sends can surface here; nothing to do but read on.
                Err(error) => {
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

    /// Sends every pending transmit, [`BATCH`] per system call; when the socket's buffer is full, tries again
    /// after a pause. A datagram the kernel refuses is skipped. False when `shutdown` came first.
    async fn send(&mut self, socket: &std::net::UdpSocket, shutdown: &CancellationToken) -> bool {
        let datagrams: Vec<(SocketAddr, &[u8])> =
            self.pending.iter().map(|transmit| (transmit.dest, &transmit.payload[..])).collect();
        let mut done = 0;
        while mmsg::send_from(socket, &datagrams, &mut done).is_err() {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.retry) => {}
            }
        }
        self.pending.clear();
        true
    }
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

    /// Deadlines move to the next multiple of the tick from the origin (one on the grid stays); a zero tick, or
    /// a deadline before the origin, leaves them as they are.
    #[test]
    fn deadlines_move_to_the_next_grid_point() {
        let origin = std::time::Instant::now();
        let ms = Duration::from_millis;
        let grid = Grid { origin, tick: ms(5) };
        assert_eq!(grid.at_or_after(origin), origin);
        assert_eq!(grid.at_or_after(origin + Duration::from_nanos(1)), origin + ms(5));
        assert_eq!(grid.at_or_after(origin + ms(5)), origin + ms(5));
        assert_eq!(grid.at_or_after(origin + ms(12)), origin + ms(15));
        assert_eq!(grid.at_or_after(origin + ms(3_600_001)), origin + ms(3_600_005));
        let before = origin.checked_sub(ms(2)).expect("an instant before");
        assert_eq!(grid.at_or_after(before), before);
        let none = Grid { origin, tick: Duration::ZERO };
        assert_eq!(none.at_or_after(origin + ms(12)), origin + ms(12));
    }

    /// Every datagram a batch send is handed arrives, in order, whatever the batch boundaries.
    #[tokio::test]
    async fn batched_sends_and_receives_keep_every_datagram() {
        let a = bound();
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        size_buffers(&a);
        let to = b.local_addr().expect("addr");
        let mut batches = Batches::new(Duration::from_millis(5));
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
        let hbs = bound();
        let ncu = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let (hbs_addr, ncu_addr) = (hbs.local_addr().expect("addr"), ncu.local_addr().expect("addr"));
        let mut monitor = Monitor::new(Policy::default());
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut io = Batches::new(Duration::from_millis(5));
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
        let a = bound();
        let b = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        size_buffers(&a);
        let to = a.local_addr().expect("addr");
        let total = BATCH * 8 + 5;
        for i in 0..total {
            // Not heartbeat packets: too short, or too long for a receive slot.
            let len = if i % 2 == 0 { 10 } else { 200 };
            b.send_to(&vec![0xff; len], to).await.expect("sent");
        }
        let mut monitor = Monitor::new(Policy::default());
        let mut batches = Batches::new(Duration::from_millis(5));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while monitor.stats().malformed < total as u64 {
            assert!(std::time::Instant::now() < deadline, "{:?}", monitor.stats());
            tokio::time::sleep(Duration::from_millis(5)).await;
            batches.receive(&a, &mut monitor);
        }
        assert_eq!(monitor.stats().malformed, total as u64);
    }

    /// With no target to ping, and so no deadline, the socket is still read: stray datagrams are counted (and
    /// dropped) within a few reads, not left to fill the queue.
    #[tokio::test]
    async fn an_idle_driver_still_reads_its_socket() {
        let hbs = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let to = hbs.local_addr().expect("addr");
        let (_command_tx, command_rx) = mpsc::unbounded_channel();
        let (event_tx, _event_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let shutdown = CancellationToken::new();
        let tick = Duration::from_millis(5);
        let driver =
            tokio::spawn(run(hbs, Policy::default(), tick, command_rx, event_tx, counters.clone(), shutdown.clone()));
        let sender = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        for _ in 0..3 {
            sender.send_to(b"not a heartbeat", to).await.expect("sent");
        }
        let start = std::time::Instant::now();
        while counters.malformed.load(Ordering::Relaxed) < 3 {
            assert!(start.elapsed() < Duration::from_secs(2), "stray datagrams never read");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        driver.await.expect("driver stopped");
    }

    /// A non-blocking socket on loopback, as the driver holds it.
    fn bound() -> std::net::UdpSocket {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.set_nonblocking(true).expect("non-blocking");
        socket
    }

    /// A full run: pings leave on the tick grid, pongs read at the ticks keep the target live, and a target whose
    /// answers stop is declared dead within the policy's bound plus a tick per deadline.
    #[tokio::test]
    async fn the_ticked_driver_keeps_an_answering_target_live_and_finds_a_silent_one_dead() {
        use tether_proto::heartbeat::packet::{Kind, Packet, decode, encode};
        const KEY: Key = [4; 32];
        let hbs = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let ncu = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let ncu_addr = ncu.local_addr().expect("addr");
        let policy = Policy { interval: Duration::from_millis(200), ..Policy::default() };
        let (command_tx, command_rx) = mpsc::unbounded_channel();
        let (event_tx, mut event_rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let tick = Duration::from_millis(5);
        let driver = tokio::spawn(run(hbs, policy, tick, command_rx, event_tx, Arc::default(), shutdown.clone()));
        command_tx
            .send(Command::Add { id: 1, session: 11, uplink: 0, key: KEY, dest: ncu_addr, initial: Liveness::Pending })
            .expect("driver running");
        // Answer five pings, then fall silent.
        let mut buf = [0_u8; 128];
        for _ in 0..5 {
            let (len, from) = tokio::time::timeout(Duration::from_secs(2), ncu.recv_from(&mut buf))
                .await
                .expect("a ping within the interval")
                .expect("ping");
            let ping = decode(&buf[..len], &KEY).expect("authentic ping");
            ncu.send_to(&encode(&Packet { kind: Kind::Pong, ..ping }, &KEY), from).await.expect("pong");
        }
        let silent_at = std::time::Instant::now();
        let mut alive = false;
        let death = loop {
            let event = tokio::time::timeout(Duration::from_secs(5), event_rx.recv())
                .await
                .expect("an event")
                .expect("driver running");
            match event {
                Event::Alive { id: 1, .. } => alive = true,
                Event::Dead { id: 1 } => break silent_at.elapsed(),
                _ => {}
            }
        };
        assert!(alive, "the answering target was never live");
        let deadlines = u32::from(policy.reprobes) + 2;
        let bound = policy.interval
            + policy.reply_timeout
            + policy.reprobe_interval * u32::from(policy.reprobes)
            + tick * deadlines
            + Duration::from_millis(100);
        assert!(death <= bound, "dead {death:?} after the last pong; bound {bound:?}");
        shutdown.cancel();
        driver.await.expect("driver stopped");
    }
}
