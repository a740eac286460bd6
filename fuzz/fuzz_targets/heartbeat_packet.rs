//! Heartbeat datagrams, forged and genuine, against the packet parser and both sans-IO machines.
//!
//! Every datagram goes through `packet::peek` and `packet::decode` with a fixed key; then a script of datagrams and
//! timeouts drives a `Monitor` watching three targets and a `Responder` answering two sessions. The machines must
//! never panic, a `Responder` answers only authentic pings, a `Monitor`'s counts by state add up to its targets, it
//! never asks to be woken in the past, and it publishes as alive only an address it pinged (a pong proves nothing
//! else).

#![no_main]

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rand::{SeedableRng, rngs::StdRng};
use tether_proto::heartbeat::{
    Event, Key, Kind, Liveness, Monitor, PACKET_LEN, Packet, Policy, Responder, ResponderPolicy,
    packet::{self, PacketError},
};

const KEY: Key = [7; 32];
const OTHER_KEY: Key = [9; 32];
/// The sessions the machines know: 7 (key `KEY`, current), 5 (key `OTHER_KEY`, the responder's previous one).
const SESSIONS: [u64; 2] = [7, 5];
const ADDRESSES: [&str; 5] =
    ["192.0.2.10:5000", "192.0.2.11:5000", "203.0.113.9:61000", "[2001:db8::1]:5000", "198.51.100.66:5000"];
const HBS: &str = "198.51.100.1:4500";

#[derive(Arbitrary, Debug)]
enum Op {
    /// A datagram at the monitor's socket.
    ToMonitor { datagram: Datagram, from: u8, after_ms: u16 },
    /// A datagram at one of the responder's uplink sockets.
    ToResponder { uplink: u8, datagram: Datagram, from: u8, load: u16, after_ms: u16 },
    /// The monitor's timer fires.
    MonitorTimeout { after_ms: u16 },
    /// The responder's timer fires.
    ResponderTimeout { after_ms: u16 },
    /// The pings the monitor sent reach the responder (maybe altered on the way) and its pongs come back.
    Exchange { from: u8, load: u16, flip: Option<(u8, u8)> },
    /// The responder's hellos reach the monitor.
    Hellos { from: u8 },
    /// The monitor stops watching a target, or watches it again.
    Toggle { target: u8 },
}

#[derive(Arbitrary, Debug)]
enum Datagram {
    /// Any bytes.
    Raw(Vec<u8>),
    /// Well-formed, with a MAC by one of the keys (or none that verifies).
    Signed { kind: u8, session: u8, uplink: u8, seq: u64, nonce: [u8; 16], load: u16, key: u8 },
    /// A datagram seen earlier, with one byte changed.
    Replay { index: u8, at: u8, xor: u8 },
}

fuzz_target!(|ops: Vec<Op>| {
    let mut world = World::new();
    for op in ops.into_iter().take(256) {
        world.step(op);
    }
});

struct World {
    now: Instant,
    rng: StdRng,
    monitor: Monitor,
    responder: Responder,
    /// Targets added: (id, session, uplink, key, dest, initial).
    targets: Vec<(i64, u64, u8, Key, SocketAddr, Liveness)>,
    watched: Vec<bool>,
    /// Where the monitor sent pings: the only addresses an `Alive` may name.
    pinged: BTreeSet<SocketAddr>,
    /// Pings not yet delivered.
    pings: VecDeque<(SocketAddr, [u8; PACKET_LEN])>,
    /// Every datagram either side saw or sent, for replays.
    seen: Vec<Vec<u8>>,
}

impl World {
    fn new() -> Self {
        let now = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        let targets = vec![
            (1, 7, 0, KEY, addr(0), Liveness::Pending),
            (2, 7, 1, KEY, addr(1), Liveness::Live),
            (3, 5, 0, OTHER_KEY, addr(3), Liveness::Dead),
        ];
        for &(id, session, uplink, key, dest, initial) in &targets {
            monitor.add(id, session, uplink, key, dest, initial, now);
        }
        let mut responder = Responder::new(ResponderPolicy::default());
        let hbs: SocketAddr = HBS.parse().expect("address");
        responder.set_session(5, OTHER_KEY, hbs, &[0], now);
        // Session 5's hellos went out before session 7 replaced it.
        while responder.poll_transmit().is_some() {}
        responder.set_session(7, KEY, hbs, &[0, 1], now);
        let watched = vec![true; targets.len()];
        let rng = StdRng::seed_from_u64(1);
        let pinged = BTreeSet::new();
        let mut world =
            Self { now, rng, monitor, responder, targets, watched, pinged, pings: VecDeque::new(), seen: Vec::new() };
        world.settle();
        world
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::ToMonitor { datagram, from, after_ms } => {
                self.advance(after_ms);
                let bytes = self.datagram(datagram);
                self.monitor.handle_datagram(&bytes, addr(from), self.now);
            }
            Op::ToResponder { uplink, datagram, from, load, after_ms } => {
                self.advance(after_ms);
                let bytes = self.datagram(datagram);
                if let Some(pong) = self.responder.handle_datagram(uplink % 4, &bytes, addr(from), load, self.now) {
                    self.check_pong(&bytes, &pong);
                    self.seen.push(pong.to_vec());
                }
            }
            Op::MonitorTimeout { after_ms } => {
                self.advance(after_ms);
                self.monitor.handle_timeout(self.now, &mut self.rng);
                let next = self.monitor.poll_timeout();
                assert!(next.is_none_or(|at| at > self.now), "the monitor asks to be woken in the past");
            }
            Op::ResponderTimeout { after_ms } => {
                self.advance(after_ms);
                self.responder.handle_timeout(self.now);
            }
            Op::Exchange { from, load, flip } => {
                while let Some((dest, mut ping)) = self.pings.pop_front() {
                    if let Some((at, xor)) = flip {
                        ping[usize::from(at) % PACKET_LEN] ^= xor;
                    }
                    let uplink = ping[12];
                    let Some(pong) = self.responder.handle_datagram(uplink, &ping, dest, load, self.now) else {
                        continue;
                    };
                    self.check_pong(&ping, &pong);
                    // From where it was sent, or from another address (a NAT, or someone re-sending it).
                    let source = if from % 2 == 0 { dest } else { addr(from / 2) };
                    self.monitor.handle_datagram(&pong, source, self.now);
                    self.settle();
                }
            }
            Op::Hellos { from } => {
                while let Some(hello) = self.responder.poll_transmit() {
                    assert_eq!(packet::peek(&hello.payload), Ok((Kind::Hello, 7)), "hellos are of the current session");
                    self.monitor.handle_datagram(&hello.payload, addr(from.wrapping_add(hello.uplink)), self.now);
                    self.seen.push(hello.payload.to_vec());
                }
            }
            Op::Toggle { target } => {
                let index = usize::from(target) % self.targets.len();
                let (id, session, uplink, key, dest, initial) = self.targets[index];
                if self.watched[index] {
                    self.monitor.remove(id);
                } else {
                    self.monitor.add(id, session, uplink, key, dest, initial, self.now);
                }
                self.watched[index] = !self.watched[index];
            }
        }
        self.settle();
    }

    /// Drains what the machines emitted and checks the monitor's invariants.
    fn settle(&mut self) {
        while let Some(transmit) = self.monitor.poll_transmit() {
            let (kind, session) = packet::peek(&transmit.payload).expect("the monitor sends well-formed pings");
            assert!(kind == Kind::Ping && SESSIONS.contains(&session), "{kind:?} of session {session}");
            self.pinged.insert(transmit.dest);
            self.seen.push(transmit.payload.to_vec());
            if self.pings.len() < 64 {
                self.pings.push_back((transmit.dest, transmit.payload));
            }
        }
        while let Some(event) = self.monitor.poll_event() {
            if let Event::Alive { observed, .. } = event {
                assert!(self.pinged.contains(&observed), "{observed} published alive without ever being pinged");
            }
        }
        while self.responder.poll_event().is_some() {}
        let counts = self.monitor.by_state();
        let watched = self.watched.iter().filter(|w| **w).count();
        assert_eq!(self.monitor.len(), watched);
        assert_eq!(counts.pending + counts.live + counts.dead, watched as u64, "{counts:?}");
        if self.seen.len() > 1024 {
            self.seen.drain(..512);
        }
    }

    fn advance(&mut self, after_ms: u16) {
        self.now += Duration::from_millis(u64::from(after_ms));
    }

    /// The datagram's bytes, after checking what the parser makes of them.
    fn datagram(&mut self, datagram: Datagram) -> Vec<u8> {
        let bytes = match datagram {
            Datagram::Raw(bytes) => bytes,
            Datagram::Signed { kind, session, uplink, seq, nonce, load, key } => {
                let kind = [Kind::Ping, Kind::Pong, Kind::Hello][usize::from(kind % 3)];
                let session = match session {
                    0..=127 => SESSIONS[usize::from(session % 2)],
                    _ => u64::from(session),
                };
                let key = match key % 3 {
                    0 => KEY,
                    1 => OTHER_KEY,
                    _ => [key; 32],
                };
                packet::encode(&Packet { kind, session, uplink: uplink % 16, seq, nonce, load }, &key).to_vec()
            }
            Datagram::Replay { index, at, xor } => {
                let Some(seen) = self.seen.len().checked_sub(1 + usize::from(index)).map(|i| self.seen[i].clone())
                else {
                    return Vec::new();
                };
                let mut bytes = seen;
                if let Some(byte) = bytes.get_mut(usize::from(at) % PACKET_LEN) {
                    *byte ^= xor;
                }
                bytes
            }
        };
        check_parser(&bytes);
        bytes
    }

    /// A pong must answer an authentic ping of a known session, echoing it.
    fn check_pong(&self, ping: &[u8], pong: &[u8; PACKET_LEN]) {
        let (kind, session) = packet::peek(ping).expect("only a well-formed ping is answered");
        let key = if session == 7 { KEY } else { OTHER_KEY };
        assert_eq!(kind, Kind::Ping);
        let ping = packet::decode(ping, &key).expect("only an authentic ping is answered");
        let pong = packet::decode(pong, &key).expect("the pong is signed with the session's key");
        assert_eq!(pong.kind, Kind::Pong);
        assert_eq!(
            (pong.session, pong.uplink, pong.seq, pong.nonce),
            (ping.session, ping.uplink, ping.seq, ping.nonce)
        );
        assert!(pong.load <= 100);
    }
}

/// `peek` and `decode` agree on what is well-formed; only the key's MAC verifies, and what verifies re-encodes to
/// the same bytes.
fn check_parser(bytes: &[u8]) {
    let peeked = packet::peek(bytes);
    for key in [KEY, OTHER_KEY] {
        match packet::decode(bytes, &key) {
            Ok(decoded) => {
                assert_eq!(peeked, Ok((decoded.kind, decoded.session)));
                assert_eq!(
                    packet::encode(&decoded, &key).as_slice(),
                    bytes,
                    "a datagram that verifies re-encodes as itself"
                );
            }
            Err(PacketError::Malformed) => assert_eq!(peeked, Err(PacketError::Malformed)),
            Err(PacketError::BadMac) => assert!(peeked.is_ok()),
        }
    }
    if peeked.is_ok() {
        assert_eq!(bytes.len(), PACKET_LEN);
    }
}

fn addr(index: u8) -> SocketAddr {
    ADDRESSES[usize::from(index) % ADDRESSES.len()].parse().expect("address")
}
