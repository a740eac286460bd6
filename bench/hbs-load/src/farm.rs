//! The responder farm: one UDP socket answering the pings of every simulated uplink with the real [`Responder`]. The
//! socket is bound to the wildcard address with IP_PKTINFO (quinn-udp), so a ping to 127.16.3.7 is seen with that
//! destination and answered from it: to hbs each uplink is a distinct address, as with real NCUs.
//!
//! On loopback the sender runs the receiver's side of each datagram: waking the farm when a ping arrives is work
//! done in hbs's `sendmmsg`, and on hbs's CPU time. A farm that polls its socket ([`Farm::start`]'s `poll`) is never
//! woken by a datagram, so hbs's figures count what hbs does, not how the generator sleeps (real NCUs are other
//! machines, woken by their own interrupts).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    io::IoSliceMut,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tether_proto::heartbeat::{
    packet::{Key, PACKET_LEN},
    responder::{Responder, ResponderEvent, ResponderPolicy},
};
use tokio::{io::Interest, net::UdpSocket, sync::mpsc};

/// Datagrams read per system call.
const BATCH: usize = 32;
/// SO_RCVBUF and SO_SNDBUF of the farm's socket, even where the host allows more: when the farm falls behind (it
/// shares a core with the rest of the generator), a ping queued longer than hbs's probe cycle (420 ms) is answered
/// too late to count: at 50,000 addresses 32 MiB holds more than half a second of pings, 4 MiB under 100 ms.
const FARM_SOCKET_BUFFER: usize = 4 << 20;
/// How old a ping that arrived before its session may be and still be answered when the session turns up: within
/// the cycle of hbs's default policy (ping, four re-probes 80 ms apart, 420 ms in all), whose probes it accepts.
const EARLY_FOR: Duration = Duration::from_millis(400);

/// What the NCU side asks of the farm.
pub(crate) enum ToFarm {
    /// An NCU registered with a server: answer this session (the previous one is still answered, as in ncu).
    Session {
        /// The NCU.
        ncu: usize,
        /// Session id.
        session: u64,
        /// Session key.
        key: Key,
        /// The server's heartbeat socket (hellos go there).
        hbs: SocketAddr,
    },
}

/// A simulated NCU's primary went quiet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lost {
    /// The NCU.
    pub(crate) ncu: usize,
    /// Its silent session.
    pub(crate) session: u64,
}

/// What the farm did.
#[derive(Debug, Default)]
pub(crate) struct FarmStats {
    /// Pings received.
    pub(crate) pings: AtomicU64,
    /// Pongs sent.
    pub(crate) pongs: AtomicU64,
    /// Hellos sent.
    pub(crate) hellos: AtomicU64,
    /// Datagrams to an address no simulated uplink has.
    pub(crate) unknown: AtomicU64,
    /// Sends that failed.
    pub(crate) send_errors: AtomicU64,
    /// Pings that arrived before their session was known and were answered once it was.
    pub(crate) early: AtomicU64,
}

/// Handle to a running farm.
pub(crate) struct Farm {
    /// Commands.
    pub(crate) tx: mpsc::UnboundedSender<ToFarm>,
    /// Counters.
    pub(crate) stats: Arc<FarmStats>,
    /// The port every uplink answers on.
    pub(crate) port: u16,
}

impl Farm {
    /// Starts the farm for `ncus` NCUs whose uplink addresses are `uplinks[ncu]`; lost primaries go to `lost`. With
    /// `poll`, the socket is read that often instead of when it turns readable.
    pub(crate) fn start(
        uplinks: &[Vec<IpAddr>],
        failover_after: Duration,
        lost: mpsc::UnboundedSender<Lost>,
        poll: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let std_socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        std_socket.set_nonblocking(true)?;
        let port = std_socket.local_addr()?.port();
        let state = UdpSocketState::new((&std_socket).into())?;
        state.set_recv_buffer_size((&std_socket).into(), FARM_SOCKET_BUFFER)?;
        state.set_send_buffer_size((&std_socket).into(), FARM_SOCKET_BUFFER)?;
        let mut by_ip = HashMap::new();
        for (ncu, ips) in uplinks.iter().enumerate() {
            for (index, ip) in ips.iter().enumerate() {
                by_ip.insert(*ip, (ncu, u8::try_from(index)?));
            }
        }
        let policy = ResponderPolicy { failover_after, ..ResponderPolicy::default() };
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(FarmStats::default());
        let responders = uplinks.iter().map(|_| Responder::new(policy)).collect();
        let uplinks = uplinks.to_vec();
        let farm_stats = stats.clone();
        // A thread of its own: thousands of real NCUs each answer their heartbeats on their own router, so the
        // farm must not wait behind the generator's QUIC tasks (handshakes, registrations) on the shared runtime.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let socket = match poll {
            // Not registered with the runtime: no readiness, so no wake-up per datagram.
            Some(every) => Socket::Polled(std_socket, every),
            None => {
                let _farm_runtime = runtime.enter();
                Socket::Woken(UdpSocket::from_std(std_socket)?)
            }
        };
        std::thread::Builder::new().name("farm".into()).spawn(move || {
            runtime.block_on(async move {
                let inner = Inner {
                    socket,
                    state,
                    responders,
                    uplinks,
                    by_ip,
                    timers: BinaryHeap::new(),
                    lost,
                    stats: farm_stats,
                    early: HashMap::new(),
                    early_reported: (0, Instant::now()),
                };
                inner.run(rx).await;
            });
        })?;
        Ok(Self { tx, stats, port })
    }
}

/// The farm's socket, read when it turns readable or every so often.
enum Socket {
    Woken(UdpSocket),
    Polled(std::net::UdpSocket, Duration),
}

impl Socket {
    fn as_ref(&self) -> quinn_udp::UdpSockRef<'_> {
        match self {
            Self::Woken(socket) => socket.into(),
            Self::Polled(socket, _) => socket.into(),
        }
    }

    /// Until the socket turns readable; never for a polled one.
    async fn readable(&self) -> std::io::Result<()> {
        match self {
            Self::Woken(socket) => socket.readable().await,
            Self::Polled(..) => std::future::pending().await,
        }
    }

    /// One receive of a batch; `WouldBlock` when there is nothing to read.
    fn recv(
        &self,
        state: &UdpSocketState,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> std::io::Result<usize> {
        match self {
            Self::Woken(socket) => socket.try_io(Interest::READABLE, || state.recv(socket.into(), bufs, meta)),
            Self::Polled(socket, _) => state.recv(socket.into(), bufs, meta),
        }
    }
}

struct Inner {
    socket: Socket,
    state: UdpSocketState,
    responders: Vec<Responder>,
    uplinks: Vec<Vec<IpAddr>>,
    by_ip: HashMap<IpAddr, (usize, u8)>,
    /// Hints of (deadline, ncu): never later than the responder's own deadline; re-checked when they fire.
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    lost: mpsc::UnboundedSender<Lost>,
    stats: Arc<FarmStats>,
    /// The latest unanswered ping of each uplink, answered if its session turns up within [`EARLY_FOR`].
    early: HashMap<(usize, u8), Early>,
    /// `stats.early` when last reported, and when.
    early_reported: (u64, Instant),
}

/// A ping the farm could not answer when it arrived.
struct Early {
    bytes: [u8; PACKET_LEN],
    from: SocketAddr,
    dst: Option<IpAddr>,
    at: Instant,
}

impl Inner {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ToFarm>) {
        let mut storage = vec![[0_u8; 2048]; BATCH];
        let mut meta = [RecvMeta::default(); BATCH];
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (polled, every) = match self.socket {
            Socket::Polled(_, every) => (true, every),
            Socket::Woken(_) => (false, Duration::from_secs(3600)),
        };
        let mut poll = tokio::time::interval(every);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Sessions first: a ping of a session the farm does not know yet goes unanswered until it does.
                biased;
                command = rx.recv() => {
                    let Some(command) = command else { return };
                    self.on_command(command);
                    while let Ok(command) = rx.try_recv() {
                        self.on_command(command);
                    }
                }
                ready = self.socket.readable() => {
                    if ready.is_err() {
                        return;
                    }
                    self.drain(&mut storage, &mut meta);
                },
                _ = poll.tick(), if polled => self.drain(&mut storage, &mut meta),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    /// Answers what is queued on the socket, a bounded number of batches per turn.
    fn drain(&mut self, storage: &mut [[u8; 2048]], meta: &mut [RecvMeta; BATCH]) {
        for _ in 0..64 {
            let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(&mut b[..])).collect();
            let Ok(count) = self.socket.recv(&self.state, &mut bufs, meta) else { break };
            let now = Instant::now();
            for (buf, meta) in storage.iter().zip(meta.iter()).take(count) {
                let stride = meta.stride.max(1);
                for segment in buf[..meta.len].chunks(stride) {
                    self.on_ping(segment, meta.addr, meta.dst_ip, now);
                }
            }
        }
    }

    fn on_command(&mut self, command: ToFarm) {
        let ToFarm::Session { ncu, session, key, hbs } = command;
        let Some(responder) = self.responders.get_mut(ncu) else { return };
        let indexes: Vec<u8> = (0..self.uplinks[ncu].len()).filter_map(|i| u8::try_from(i).ok()).collect();
        let now = Instant::now();
        responder.set_session(session, key, hbs, &indexes, now);
        self.flush(ncu);
        self.arm(ncu);
        // hbs pings a new address as soon as it has written the registration, before `Registered` has reached the
        // simulated NCU (and, on a busy generator, well before this task hears of it): answer the latest such ping
        // of each uplink now, as an NCU reading its `Registered` when that ping arrives would have.
        for uplink in 0..u8::try_from(indexes.len()).unwrap_or(u8::MAX) {
            let Some(early) = self.early.remove(&(ncu, uplink)) else { continue };
            if now.saturating_duration_since(early.at) < EARLY_FOR {
                self.stats.early.fetch_add(1, Ordering::Relaxed);
                self.answer(ncu, uplink, &early.bytes, early.from, early.dst, now);
            }
        }
    }

    fn on_ping(&mut self, bytes: &[u8], from: SocketAddr, dst: Option<IpAddr>, now: Instant) {
        self.stats.pings.fetch_add(1, Ordering::Relaxed);
        let Some(&(ncu, uplink)) = dst.and_then(|dst| self.by_ip.get(&dst)) else {
            self.stats.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !self.answer(ncu, uplink, bytes, from, dst, now)
            && let Ok(bytes) = <[u8; PACKET_LEN]>::try_from(bytes)
        {
            self.early.insert((ncu, uplink), Early { bytes, from, dst, at: now });
        }
    }

    /// Has the responder answer a ping; false when it would not (unknown session, forged, malformed).
    fn answer(
        &mut self,
        ncu: usize,
        uplink: u8,
        bytes: &[u8],
        from: SocketAddr,
        dst: Option<IpAddr>,
        now: Instant,
    ) -> bool {
        let Some(pong) = self.responders[ncu].handle_datagram(uplink, bytes, from, 5, now) else { return false };
        let transmit = Transmit { destination: from, ecn: None, contents: &pong, segment_size: None, src_ip: dst };
        match self.state.try_send(self.socket.as_ref(), &transmit) {
            Ok(()) => self.stats.pongs.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.send_errors.fetch_add(1, Ordering::Relaxed),
        };
        true
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let early = self.stats.early.load(Ordering::Relaxed);
        if early != self.early_reported.0 && now >= self.early_reported.1 + Duration::from_secs(5) {
            eprintln!("farm: {early} pings answered late, once their session was known");
            self.early_reported = (early, now);
        }
        while let Some(&Reverse((deadline, ncu))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let responder = &mut self.responders[ncu];
            if responder.poll_timeout().is_some_and(|due| due <= now) {
                responder.handle_timeout(now);
                while let Some(event) = responder.poll_event() {
                    let ResponderEvent::PrimaryLost { session } = event;
                    let _ = self.lost.send(Lost { ncu, session });
                }
                self.flush(ncu);
            }
            self.arm(ncu);
        }
    }

    fn arm(&mut self, ncu: usize) {
        if let Some(due) = self.responders[ncu].poll_timeout() {
            self.timers.push(Reverse((due, ncu)));
        }
    }

    /// Sends the responder's hellos from the uplink addresses they belong to.
    fn flush(&mut self, ncu: usize) {
        while let Some(out) = self.responders[ncu].poll_transmit() {
            let Some(&src) = self.uplinks[ncu].get(usize::from(out.uplink)) else { continue };
            let transmit = Transmit {
                destination: out.dest,
                ecn: None,
                contents: &out.payload,
                segment_size: None,
                src_ip: Some(src),
            };
            match self.state.try_send(self.socket.as_ref(), &transmit) {
                Ok(()) => self.stats.hellos.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.stats.send_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    }
}
