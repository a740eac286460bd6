//! A monitor and NCU responders exchanging heartbeats over a simulated network with loss and latency, in virtual time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::monitor::{Event, Liveness, Monitor, Policy, TargetId, Transmit};
use super::packet::{self, Key, Kind, PACKET_LEN, Packet, encode};
use super::responder::{Outgoing, Responder, ResponderEvent, ResponderPolicy};

/// The key of every simulated session.
pub(super) const KEY: Key = [3; 32];
/// A key no simulated party holds.
pub(super) const WRONG_KEY: Key = [4; 32];
/// The heartbeat address of the simulated HBS.
pub(super) const HBS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 4500));

/// Parses a socket address.
pub(super) fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

/// `n` milliseconds.
pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The fields of a datagram as anyone on path can read them.
pub(super) fn plaintext(bytes: &[u8; PACKET_LEN]) -> Packet {
    let (kind, session, uplink) = packet::peek_header(bytes).expect("well formed");
    let mut seq = [0; 8];
    seq.copy_from_slice(&bytes[13..21]);
    let mut nonce = [0; 16];
    nonce.copy_from_slice(&bytes[21..37]);
    Packet { kind, session, uplink, seq: u64::from_be_bytes(seq), nonce, load: 0 }
}

/// A datagram on the simulated wire.
#[derive(Debug, Clone)]
pub(super) struct Datagram {
    /// Its source address.
    pub(super) from: SocketAddr,
    /// Its destination address.
    pub(super) to: SocketAddr,
    /// Its bytes.
    pub(super) payload: [u8; PACKET_LEN],
}

/// A simulated NCU: a responder and its uplinks.
pub(super) struct Ncu {
    /// The session the monitor watches it under (and [`Sim::give_key`] answers).
    pub(super) session: u64,
    key: Key,
    /// Its heartbeat machine.
    pub(super) responder: Responder,
    links: BTreeMap<u8, Link>,
    /// Drops everything sent to it.
    pub(super) silent: bool,
    /// The load it reports in pongs.
    pub(super) load: u16,
}

/// One monitor and some NCUs on a simulated network with loss and per-datagram delay, in virtual time.
pub(super) struct Sim {
    /// Virtual time zero.
    pub(super) base: Instant,
    /// The current virtual time.
    pub(super) now: Instant,
    rng: StdRng,
    /// The HBS side.
    pub(super) monitor: Monitor,
    /// The NCU side.
    pub(super) ncus: Vec<Ncu>,
    routes: HashMap<SocketAddr, (usize, u8)>,
    wire: BinaryHeap<Reverse<Queued>>,
    sent: u64,
    ncu_timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// The seq of the last ping [`Sim::ping_at`] queued.
    scripted_seq: u64,
    /// Independent loss probability of each datagram, in each direction.
    pub(super) loss: f64,
    /// The least and most delay of datagrams to the NCUs.
    pub(super) to_ncu_delay: (Duration, Duration),
    /// The least and most delay of datagrams to the HBS.
    pub(super) to_hbs_delay: (Duration, Duration),
    /// Datagrams lost to `loss`.
    pub(super) dropped: u64,
    /// Independent probability that a datagram is delivered twice (each copy with its own delay).
    pub(super) duplicate: f64,
    /// Independent probability that a datagram is held up, and the most it is held up by (on top of its delay).
    pub(super) stall: (f64, Duration),
    /// What an on-path observer sees, when set.
    pub(super) tap: Option<Tap>,
    /// An on-path attacker answering the pings a silent NCU misses, without the key.
    pub(super) forger: bool,
    /// Keep `pings`, `delivered` and `hellos` (off for long runs).
    pub(super) record: bool,
    /// What the monitor sent, when.
    pub(super) pings: Vec<(Instant, Transmit)>,
    /// What reached the HBS.
    pub(super) delivered: Vec<Datagram>,
    /// The hellos the responders emitted (those of silent NCUs too), when.
    pub(super) hellos: Vec<(Instant, Outgoing)>,
    /// What the monitor reported, when.
    pub(super) events: Vec<(Instant, Event)>,
    /// What the responders reported, when.
    pub(super) ncu_events: Vec<(Instant, ResponderEvent)>,
}

impl Sim {
    /// A network with no NCUs, a monitor of the default policy, and up to 20 ms of delay each way.
    pub(super) fn new(seed: u64) -> Self {
        let base = Instant::now();
        Self {
            base,
            now: base,
            rng: StdRng::seed_from_u64(seed),
            monitor: Monitor::new(Policy::default()),
            ncus: Vec::new(),
            routes: HashMap::new(),
            wire: BinaryHeap::new(),
            sent: 0,
            ncu_timers: BinaryHeap::new(),
            scripted_seq: 0,
            loss: 0.0,
            to_ncu_delay: (ms(0), ms(20)),
            to_hbs_delay: (ms(0), ms(20)),
            dropped: 0,
            duplicate: 0.0,
            stall: (0.0, Duration::ZERO),
            tap: None,
            forger: false,
            record: true,
            pings: Vec::new(),
            delivered: Vec::new(),
            hellos: Vec::new(),
            events: Vec::new(),
            ncu_events: Vec::new(),
        }
    }

    /// The instant `offset` after the start.
    pub(super) fn at(&self, offset: Duration) -> Instant {
        self.base + offset
    }

    /// Adds an NCU with uplinks (index, listen, source), answering session `session`.
    pub(super) fn add_ncu(&mut self, session: u64, links: &[(u8, &str, &str)]) -> usize {
        let index = self.ncus.len();
        let mut responder = Responder::new(ResponderPolicy::default());
        let uplinks: Vec<u8> = links.iter().map(|link| link.0).collect();
        responder.set_session(session, KEY, HBS, &uplinks, self.now);
        let links = self.route(index, links);
        self.ncus.push(Ncu { session, key: KEY, responder, links, silent: false, load: 0 });
        self.pump_ncu(index);
        index
    }

    /// The NCU learns its session's key (the answer to its registration arrives): it answers that session now.
    pub(super) fn give_key(&mut self, index: usize) {
        self.set_session(index, self.ncus[index].session);
    }

    /// The NCU starts answering `session` as its primary (or, if it already does, restarts it).
    pub(super) fn set_session(&mut self, index: usize, session: u64) {
        let ncu = &mut self.ncus[index];
        ncu.session = session;
        let uplinks: Vec<u8> = ncu.links.keys().copied().collect();
        ncu.responder.set_session(session, ncu.key, HBS, &uplinks, self.now);
        self.pump_ncu(index);
    }

    /// Replaces an NCU's uplinks with `links` (index, listen, source), passed to its responder as given.
    pub(super) fn set_links(&mut self, index: usize, links: &[(u8, &str, &str)]) {
        for link in std::mem::take(&mut self.ncus[index].links).values() {
            self.routes.remove(&link.listen);
            self.routes.remove(&link.source);
        }
        self.ncus[index].links = self.route(index, links);
        let uplinks: Vec<u8> = links.iter().map(|link| link.0).collect();
        self.ncus[index].responder.set_uplinks(&uplinks, self.now);
        self.pump_ncu(index);
    }

    /// Has the monitor watch an NCU uplink as target `id`, pinging `dest` (by default the uplink's listen address).
    pub(super) fn watch(&mut self, id: TargetId, ncu: usize, uplink: u8, dest: Option<SocketAddr>, initial: Liveness) {
        let ncu = &self.ncus[ncu];
        let dest = dest.unwrap_or(ncu.links[&uplink].listen);
        self.monitor.add(id, ncu.session, uplink, ncu.key, dest, initial, self.now);
    }

    /// Queues a fresh ping of the NCU's session from the HBS to an uplink's listen address, arriving at `offset`
    /// (whatever the delay and loss), as if the monitor had sent it.
    pub(super) fn ping_at(&mut self, ncu: usize, uplink: u8, offset: Duration) {
        self.scripted_seq += 1;
        let seq = self.scripted_seq;
        let ncu = &self.ncus[ncu];
        let ping = Packet { kind: Kind::Ping, session: ncu.session, uplink, seq, nonce: [7; 16], load: 0 };
        let datagram = Datagram { from: HBS, to: ncu.links[&uplink].listen, payload: encode(&ping, &ncu.key) };
        self.sent += 1;
        self.wire.push(Reverse(Queued { at: self.at(offset), order: self.sent, datagram }));
    }

    /// Runs every delivery and deadline up to `offset` (inclusive), in order.
    pub(super) fn run_until(&mut self, offset: Duration) {
        while self.step_until(offset) {}
    }

    /// Handles what is due at the next instant that has anything due, if that is not after `offset`, and returns
    /// true; otherwise moves the clock to `offset` and returns false.
    pub(super) fn step_until(&mut self, offset: Duration) -> bool {
        let end = self.at(offset);
        let wire = self.wire.peek().map(|Reverse(queued)| queued.at);
        let ncus = self.ncu_timers.peek().map(|Reverse((at, _))| *at);
        match [wire, self.monitor.poll_timeout(), ncus].into_iter().flatten().min() {
            Some(next) if next <= end => {
                self.now = self.now.max(next);
                self.step();
                true
            }
            _ => {
                self.now = self.now.max(end);
                false
            }
        }
    }

    /// Puts a datagram on the wire, delivered at `at` (not before now) whatever the loss: an attacker's.
    pub(super) fn inject(&mut self, datagram: Datagram, at: Instant) {
        self.sent += 1;
        self.wire.push(Reverse(Queued { at: at.max(self.now), order: self.sent, datagram }));
    }

    /// Datagrams to `address` go nowhere from now on (a private address behind NAT).
    pub(super) fn unroute(&mut self, address: SocketAddr) {
        self.routes.remove(&address);
    }

    /// Moves an uplink's NAT mapping.
    pub(super) fn set_source(&mut self, ncu: usize, uplink: u8, source: SocketAddr) {
        let link = self.ncus[ncu].links.get_mut(&uplink).expect("known uplink");
        if link.source != link.listen {
            self.routes.remove(&link.source);
        }
        link.source = source;
        self.routes.insert(source, (ncu, uplink));
    }

    /// Lets virtual time pass with nothing handled, as when the process is stalled or suspended.
    pub(super) fn jump(&mut self, by: Duration) {
        self.now += by;
    }

    /// Events since `offset`, with times as offsets from the start.
    pub(super) fn events_since(&self, offset: Duration) -> Vec<(Duration, Event)> {
        let since = self.at(offset);
        self.events.iter().filter(|(at, _)| *at >= since).map(|(at, event)| (*at - self.base, event.clone())).collect()
    }

    /// The responders' events since `offset`, with times as offsets from the start.
    pub(super) fn ncu_events_since(&self, offset: Duration) -> Vec<(Duration, ResponderEvent)> {
        let since = self.at(offset);
        self.ncu_events
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(at, event)| (*at - self.base, event.clone()))
            .collect()
    }

    /// The hellos recorded since the last call, with times as offsets from the start.
    pub(super) fn take_hellos(&mut self) -> Vec<(Duration, Outgoing)> {
        let base = self.base;
        self.hellos.drain(..).map(|(at, hello)| (at - base, hello)).collect()
    }

    /// The times (offsets) of pings to `dest` in `[from, to)`.
    pub(super) fn ping_times(&self, dest: SocketAddr, from: Duration, to: Duration) -> Vec<Duration> {
        self.pings
            .iter()
            .map(|(at, transmit)| (*at - self.base, transmit.dest))
            .filter(|&(at, to_dest)| to_dest == dest && at >= from && at < to)
            .map(|(at, _)| at)
            .collect()
    }

    /// Parses an NCU's uplinks and routes datagrams to their addresses to it.
    fn route(&mut self, index: usize, links: &[(u8, &str, &str)]) -> BTreeMap<u8, Link> {
        let links = links
            .iter()
            .map(|&(uplink, listen, source)| (uplink, Link { listen: addr(listen), source: addr(source) }))
            .collect::<BTreeMap<_, _>>();
        for (&uplink, link) in &links {
            self.routes.insert(link.listen, (index, uplink));
            self.routes.insert(link.source, (index, uplink));
        }
        links
    }

    fn step(&mut self) {
        let now = self.now;
        while let Some(Reverse(queued)) = self.wire.peek() {
            if queued.at > now {
                break;
            }
            let Some(Reverse(queued)) = self.wire.pop() else { break };
            self.deliver(queued.datagram);
        }
        if self.monitor.poll_timeout().is_some_and(|at| at <= now) {
            self.monitor.handle_timeout(now, &mut self.rng);
            self.pump_monitor(None);
        }
        while let Some(&Reverse((at, index))) = self.ncu_timers.peek() {
            if at > now {
                break;
            }
            self.ncu_timers.pop();
            // Stale entries are dropped: every change of a responder pushes its current deadline.
            if self.ncus[index].responder.poll_timeout().is_some_and(|at| at <= now) {
                self.ncus[index].responder.handle_timeout(now);
                self.pump_ncu(index);
            }
        }
    }

    fn deliver(&mut self, datagram: Datagram) {
        if datagram.to == HBS {
            if self.record {
                self.delivered.push(datagram.clone());
            }
            self.monitor.handle_datagram(&datagram.payload, datagram.from, self.now);
            self.pump_monitor(Some(&datagram));
            return;
        }
        let Some(&(index, uplink)) = self.routes.get(&datagram.to) else { return };
        let ncu = &mut self.ncus[index];
        if ncu.silent {
            if self.forger {
                let ping = plaintext(&datagram.payload);
                let forged = encode(&Packet { kind: Kind::Pong, load: 50, ..ping }, &WRONG_KEY);
                self.send(datagram.to, datagram.from, forged);
            }
            return;
        }
        let pong = ncu.responder.handle_datagram(uplink, &datagram.payload, datagram.from, ncu.load, self.now);
        if let Some(pong) = pong {
            let source = ncu.links[&uplink].source;
            self.send(source, datagram.from, pong);
        }
        self.pump_ncu(index);
    }

    /// Sends the monitor's pings and records its events, emitted while handling `cause` (None: a deadline).
    fn pump_monitor(&mut self, cause: Option<&Datagram>) {
        while let Some(transmit) = self.monitor.poll_transmit() {
            if self.record {
                self.pings.push((self.now, transmit.clone()));
            }
            self.send(HBS, transmit.dest, transmit.payload);
        }
        while let Some(event) = self.monitor.poll_event() {
            if let Some(tap) = &mut self.tap {
                tap.events.push((self.now, event.clone(), cause.cloned()));
            }
            self.events.push((self.now, event));
        }
    }

    fn pump_ncu(&mut self, index: usize) {
        while let Some(hello) = self.ncus[index].responder.poll_transmit() {
            if self.record {
                self.hellos.push((self.now, hello.clone()));
            }
            // A silent NCU's links are down: its hellos are lost too.
            if self.ncus[index].silent {
                continue;
            }
            let source = self.ncus[index].links[&hello.uplink].source;
            self.send(source, hello.dest, hello.payload);
        }
        while let Some(event) = self.ncus[index].responder.poll_event() {
            self.ncu_events.push((self.now, event));
        }
        if let Some(at) = self.ncus[index].responder.poll_timeout() {
            self.ncu_timers.push(Reverse((at, index)));
        }
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, payload: [u8; PACKET_LEN]) {
        let datagram = Datagram { from, to, payload };
        if let Some(tap) = &mut self.tap {
            tap.sent.push((self.now, datagram.clone()));
        }
        if self.loss > 0.0 && self.rng.random_bool(self.loss) {
            self.dropped += 1;
            return;
        }
        if self.duplicate > 0.0 && self.rng.random_bool(self.duplicate) {
            self.queue(datagram.clone());
        }
        self.queue(datagram);
    }

    /// Puts a datagram on the wire with a random delay (and, now and then, a stall).
    fn queue(&mut self, datagram: Datagram) {
        let (low, high) = if datagram.to == HBS { self.to_hbs_delay } else { self.to_ncu_delay };
        let mut delay = Duration::from_micros(self.rng.random_range(micros(low)..=micros(high)));
        if self.stall.0 > 0.0 && self.rng.random_bool(self.stall.0) {
            delay += Duration::from_micros(self.rng.random_range(0..=micros(self.stall.1)));
        }
        self.sent += 1;
        self.wire.push(Reverse(Queued { at: self.now + delay, order: self.sent, datagram }));
    }
}

/// What an on-path observer of the simulated network sees: drained by whoever reads it.
#[derive(Debug, Default)]
pub(super) struct Tap {
    /// Every datagram sent by the monitor or a responder (lost ones too, not injected ones), with when.
    pub(super) sent: Vec<(Instant, Datagram)>,
    /// Every event of the monitor, with when, and the datagram it was handling (None: a deadline).
    pub(super) events: Vec<(Instant, Event, Option<Datagram>)>,
}

/// A short delay in microseconds.
fn micros(delay: Duration) -> u64 {
    u64::try_from(delay.as_micros()).expect("short delay")
}

/// An NCU uplink: its datagrams leave from `source` (its NAT mapping); datagrams to `listen` or `source` reach it.
struct Link {
    listen: SocketAddr,
    source: SocketAddr,
}

/// A datagram on the simulated wire, delivered at `at` (ties in sending order).
struct Queued {
    at: Instant,
    order: u64,
    datagram: Datagram,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}
