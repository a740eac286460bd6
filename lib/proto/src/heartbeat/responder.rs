//! The NCU side: answers pings, sends hellos from every uplink, and notices when the primary HBS goes quiet.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::packet::{self, Key, Keyed, Kind, PACKET_LEN, Packet, PacketError};

/// Timing of hellos and of failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponderPolicy {
    /// Silence of the current session, on every uplink, after which the primary is lost.
    pub failover_after: Duration,
    /// Time between hellos of an uplink until a ping arrives on it (and again once pings stop for `failover_after`).
    pub hello_every: Duration,
    /// Time between hellos of an uplink that pings reach.
    pub keepalive_every: Duration,
}

impl Default for ResponderPolicy {
    fn default() -> Self {
        Self {
            failover_after: Duration::from_secs(3),
            hello_every: Duration::from_secs(2),
            keepalive_every: Duration::from_secs(20),
        }
    }
}

/// A change the NCU should act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponderEvent {
    /// No valid ping from the current session on any uplink for `failover_after`. Emitted once per session.
    PrimaryLost {
        /// The silent session.
        session: u64,
    },
}

/// A hello to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The uplink whose socket sends it.
    pub uplink: u8,
    /// The HBS heartbeat address.
    pub dest: SocketAddr,
    /// The datagram.
    pub payload: [u8; PACKET_LEN],
}

/// Counters of what the responder received.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResponderStats {
    /// Pings answered (replays included).
    pub answered: u64,
    /// Datagrams of a known session whose MAC did not verify.
    pub forged: u64,
    /// Unparseable datagrams, and anything but a ping.
    pub malformed: u64,
    /// Pings of an unknown session, or naming another uplink than the socket they arrived on.
    pub unknown: u64,
}

/// The sans-IO heartbeat responder of one NCU.
pub struct Responder {
    policy: ResponderPolicy,
    current: Option<Current>,
    previous: Option<Answering>,
    transmits: VecDeque<Outgoing>,
    events: VecDeque<ResponderEvent>,
    stats: ResponderStats,
}

impl Responder {
    /// Creates a responder with no session.
    pub fn new(policy: ResponderPolicy) -> Self {
        Self {
            policy,
            current: None,
            previous: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: ResponderStats::default(),
        }
    }

    /// Starts answering a new session (the primary).
    ///
    /// The previous current session (if any) is kept as "previous" and still answered until
    /// [`Responder::forget_previous`], so pings of the old server during a handover are answered. `hbs` is the
    /// heartbeat address hellos go to; `uplinks` are the indexes to send hellos from. The failover timer starts at
    /// `now`. Setting the current session again only replaces its key, address and uplinks.
    pub fn set_session(&mut self, session: u64, key: Key, hbs: SocketAddr, uplinks: &[u8], now: Instant) {
        let mut answering = Answering { session, keyed: packet::keyed(&key), last_seq: BTreeMap::new() };
        let mut hello_seq = 0;
        match self.current.take() {
            Some(old) if old.answering.session == session => {
                answering.last_seq = old.answering.last_seq;
                hello_seq = old.hello_seq;
            }
            Some(old) => self.previous = Some(old.answering),
            None => {}
        }
        self.current =
            Some(Current { answering, hbs, uplinks: BTreeMap::new(), hello_seq, last_valid: now, lost: false });
        self.set_uplinks(uplinks, now);
    }

    /// Stops answering the previous session.
    pub fn forget_previous(&mut self) {
        self.previous = None;
    }

    /// Uplinks changed (added/removed) for the current session: new ones get a hello now.
    pub fn set_uplinks(&mut self, uplinks: &[u8], now: Instant) {
        let Some(current) = &mut self.current else { return };
        current.uplinks.retain(|index, _| uplinks.contains(index));
        let mut added: Vec<u8> = uplinks.iter().copied().filter(|index| !current.uplinks.contains_key(index)).collect();
        added.sort_unstable();
        added.dedup();
        for index in added {
            current.uplinks.insert(index, UplinkState { last_hello: now, last_ping: None });
            current.send_hello(index, &mut self.transmits);
        }
    }

    /// The session being answered as primary.
    pub fn current_session(&self) -> Option<u64> {
        self.current.as_ref().map(|current| current.answering.session)
    }

    /// A datagram received on uplink `uplink`'s socket.
    ///
    /// Returns the pong to send back to `from` for a valid ping (of the current or previous session, for that
    /// uplink index); None otherwise (counted). `load` (percent, clamped to 100) goes into the pong.
    pub fn handle_datagram(
        &mut self,
        uplink: u8,
        bytes: &[u8],
        from: SocketAddr,
        load: u16,
        now: Instant,
    ) -> Option<[u8; PACKET_LEN]> {
        let Ok((kind, session, _)) = packet::peek_header(bytes) else {
            self.stats.malformed += 1;
            return None;
        };
        if kind != Kind::Ping {
            self.stats.malformed += 1;
            return None;
        }
        let (answering, current) = match (&mut self.current, &mut self.previous) {
            (Some(current), _) if current.answering.session == session => {
                (&mut current.answering, Some((&mut current.last_valid, &mut current.uplinks)))
            }
            (_, Some(previous)) if previous.session == session => (previous, None),
            _ => {
                self.stats.unknown += 1;
                tracing::trace!(session, uplink, "ping of an unknown session");
                return None;
            }
        };
        let ping = match packet::decode_with(bytes, &answering.keyed) {
            Ok(ping) => ping,
            Err(PacketError::BadMac) => {
                self.stats.forged += 1;
                tracing::debug!(session, uplink, %from, "ping failed authentication");
                return None;
            }
            Err(PacketError::Malformed) => {
                self.stats.malformed += 1;
                return None;
            }
        };
        if ping.uplink != uplink {
            self.stats.unknown += 1;
            tracing::debug!(session, uplink, named = ping.uplink, "ping names another uplink");
            return None;
        }
        let fresh = answering.last_seq.get(&uplink).is_none_or(|&last| ping.seq > last);
        if fresh {
            answering.last_seq.insert(uplink, ping.seq);
            if let Some((last_valid, uplinks)) = current {
                *last_valid = now;
                if let Some(state) = uplinks.get_mut(&uplink) {
                    state.last_ping = Some(now);
                }
            }
        }
        self.stats.answered += 1;
        let pong = Packet { kind: Kind::Pong, load: load.min(100), ..ping };
        Some(packet::encode_with(&pong, &answering.keyed))
    }

    /// Sends due hellos and notices a lost primary.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(current) = &mut self.current else { return };
        if !current.lost && now >= current.last_valid + self.policy.failover_after {
            current.lost = true;
            let session = current.answering.session;
            tracing::debug!(session, "primary heartbeat server lost");
            self.events.push_back(ResponderEvent::PrimaryLost { session });
        }
        let due: Vec<u8> = current
            .uplinks
            .iter()
            .filter(|(_, state)| state.hello_due(&self.policy) <= now)
            .map(|(&index, _)| index)
            .collect();
        for index in due {
            if let Some(state) = current.uplinks.get_mut(&index) {
                state.last_hello = now;
            }
            current.send_hello(index, &mut self.transmits);
        }
    }

    /// The next hello to send.
    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.transmits.pop_front()
    }

    /// The next change to act on.
    pub fn poll_event(&mut self) -> Option<ResponderEvent> {
        self.events.pop_front()
    }

    /// When [`Responder::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let current = self.current.as_ref()?;
        let failover = (!current.lost).then(|| current.last_valid + self.policy.failover_after);
        let hellos = current.uplinks.values().map(|state| state.hello_due(&self.policy));
        failover.into_iter().chain(hellos).min()
    }

    /// Counters since creation.
    pub fn stats(&self) -> ResponderStats {
        self.stats
    }
}

/// What is needed to answer one session's pings.
struct Answering {
    session: u64,
    keyed: Keyed,
    /// The highest ping seq seen per uplink, to tell fresh pings from replays.
    last_seq: BTreeMap<u8, u64>,
}

/// The primary session: answered, helloed, and watched for silence.
struct Current {
    answering: Answering,
    hbs: SocketAddr,
    uplinks: BTreeMap<u8, UplinkState>,
    hello_seq: u64,
    /// When the failover timer started: `set_session`, or the last fresh ping.
    last_valid: Instant,
    lost: bool,
}

impl Current {
    fn send_hello(&mut self, uplink: u8, transmits: &mut VecDeque<Outgoing>) {
        self.hello_seq += 1;
        let hello = Packet {
            kind: Kind::Hello,
            session: self.answering.session,
            uplink,
            seq: self.hello_seq,
            nonce: [0; 16],
            load: 0,
        };
        let payload = packet::encode_with(&hello, &self.answering.keyed);
        transmits.push_back(Outgoing { uplink, dest: self.hbs, payload });
    }
}

/// Hello timing of one uplink of the current session.
struct UplinkState {
    last_hello: Instant,
    /// The last fresh ping of the current session on this uplink.
    last_ping: Option<Instant>,
}

impl UplinkState {
    fn hello_due(&self, policy: &ResponderPolicy) -> Instant {
        let fast = self.last_hello + policy.hello_every;
        match self.last_ping {
            None => fast,
            // Pings reach this uplink: keepalives suffice, unless they stop (a NAT mapping may have changed).
            Some(ping) => (self.last_hello + policy.keepalive_every).min(fast.max(ping + policy.failover_after)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::packet::{decode, encode};
    use crate::heartbeat::sim::{HBS, KEY, Sim, ms};

    const OLD_KEY: Key = [2; 32];

    struct Clock(Instant);

    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn hbs() -> SocketAddr {
        "192.0.2.1:4500".parse().expect("address")
    }

    fn peer() -> SocketAddr {
        "192.0.2.1:50000".parse().expect("address")
    }

    fn ping(session: u64, uplink: u8, seq: u64, key: &Key) -> [u8; PACKET_LEN] {
        let nonce = [u8::try_from(seq % 256).expect("mod 256"); 16];
        encode(&Packet { kind: Kind::Ping, session, uplink, seq, nonce, load: 0 }, key)
    }

    /// Uplink `index` of a simulated NCU, listening on and sending from one address.
    fn link(index: u8) -> (u8, &'static str, &'static str) {
        let address = match index {
            0 => "192.0.2.10:5000",
            1 => "192.0.2.11:5000",
            3 => "192.0.2.13:5000",
            other => panic!("no address for uplink {other}"),
        };
        (index, address, address)
    }

    #[test]
    fn answers_pings_of_current_and_previous_session() {
        let clock = Clock(Instant::now());
        let mut responder = Responder::new(ResponderPolicy::default());
        responder.set_session(1, OLD_KEY, hbs(), &[0], clock.at(0));
        responder.set_session(2, KEY, hbs(), &[0, 1], clock.at(10));
        assert_eq!(responder.current_session(), Some(2));

        let pong = responder.handle_datagram(1, &ping(2, 1, 7, &KEY), peer(), 150, clock.at(20)).expect("answered");
        let pong = decode(&pong, &KEY).expect("authentic pong");
        assert_eq!(pong, Packet { kind: Kind::Pong, session: 2, uplink: 1, seq: 7, nonce: [7; 16], load: 100 });

        let old = responder.handle_datagram(0, &ping(1, 0, 3, &OLD_KEY), peer(), 40, clock.at(30)).expect("answered");
        assert_eq!(decode(&old, &OLD_KEY).expect("authentic pong").load, 40);
        assert_eq!(responder.stats().answered, 2);

        responder.forget_previous();
        assert_eq!(responder.handle_datagram(0, &ping(1, 0, 4, &OLD_KEY), peer(), 40, clock.at(40)), None);
        assert_eq!(responder.stats(), ResponderStats { answered: 2, unknown: 1, ..ResponderStats::default() });
    }

    #[test]
    fn refuses_forged_malformed_and_misdirected_datagrams() {
        let clock = Clock(Instant::now());
        let mut responder = Responder::new(ResponderPolicy::default());
        let now = clock.at(0);
        assert_eq!(responder.handle_datagram(0, &ping(5, 0, 1, &KEY), peer(), 0, now), None);
        responder.set_session(5, KEY, hbs(), &[0, 1], now);

        assert_eq!(responder.handle_datagram(0, &ping(5, 0, 1, &OLD_KEY), peer(), 0, now), None);
        assert_eq!(responder.handle_datagram(0, b"not a heartbeat", peer(), 0, now), None);
        let pong = encode(&Packet { kind: Kind::Pong, session: 5, uplink: 0, seq: 1, nonce: [0; 16], load: 0 }, &KEY);
        assert_eq!(responder.handle_datagram(0, &pong, peer(), 0, now), None);
        assert_eq!(responder.handle_datagram(0, &ping(5, 1, 1, &KEY), peer(), 0, now), None);
        assert_eq!(responder.handle_datagram(0, &ping(6, 0, 1, &KEY), peer(), 0, now), None);
        assert_eq!(responder.stats(), ResponderStats { answered: 0, forged: 1, malformed: 2, unknown: 3 });
    }

    #[test]
    fn primary_lost_exactly_failover_after_the_last_fresh_ping_and_once() {
        let mut sim = Sim::new(1);
        let ncu = sim.add_ncu(9, &[link(0), link(1)]);
        for (uplink, at) in [(0, 500), (1, 1_500), (0, 2_700)] {
            sim.ping_at(ncu, uplink, ms(at));
        }
        sim.run_until(ms(60_000));
        assert_eq!(sim.ncu_events_since(ms(0)), [(ms(5_700), ResponderEvent::PrimaryLost { session: 9 })]);
        assert_eq!(sim.ncus[ncu].responder.stats().answered, 3);
    }

    #[test]
    fn primary_lost_after_set_session_without_pings() {
        let mut sim = Sim::new(2);
        sim.run_until(ms(1_000));
        let ncu = sim.add_ncu(9, &[link(0)]);
        sim.run_until(ms(60_000));
        assert_eq!(sim.ncu_events_since(ms(0)), [(ms(4_000), ResponderEvent::PrimaryLost { session: 9 })]);

        // A new session gets its own timer and its own event.
        sim.set_session(ncu, 10);
        sim.run_until(ms(70_000));
        assert_eq!(sim.ncu_events_since(ms(60_000)), [(ms(63_000), ResponderEvent::PrimaryLost { session: 10 })]);
    }

    #[test]
    fn replayed_and_previous_session_pings_are_answered_but_do_not_reset_failover() {
        let clock = Clock(Instant::now());
        let mut responder = Responder::new(ResponderPolicy::default());
        responder.set_session(1, OLD_KEY, hbs(), &[0], clock.at(0));
        responder.set_session(2, KEY, hbs(), &[0], clock.at(0));
        assert!(responder.handle_datagram(0, &ping(2, 0, 5, &KEY), peer(), 0, clock.at(1_000)).is_some());
        assert!(responder.handle_datagram(0, &ping(2, 0, 5, &KEY), peer(), 0, clock.at(2_500)).is_some());
        assert!(responder.handle_datagram(0, &ping(2, 0, 3, &KEY), peer(), 0, clock.at(2_600)).is_some());
        assert!(responder.handle_datagram(0, &ping(1, 0, 99, &OLD_KEY), peer(), 0, clock.at(3_000)).is_some());
        assert_eq!(responder.poll_timeout(), Some(clock.at(4_000)), "failover, and hellos resume, 3 s after 1 s");
        responder.handle_timeout(clock.at(3_999));
        assert_eq!(responder.poll_event(), None);
        responder.handle_timeout(clock.at(4_000));
        assert_eq!(responder.poll_event(), Some(ResponderEvent::PrimaryLost { session: 2 }));
        assert_eq!(responder.stats().answered, 4);
    }

    #[test]
    fn hellos_at_once_then_every_hello_every_until_pinged_then_every_keepalive() {
        let mut sim = Sim::new(3);
        let ncu = sim.add_ncu(3, &[link(1), link(0)]);
        let first: Vec<Outgoing> = sim.take_hellos().into_iter().map(|(_, hello)| hello).collect();
        assert_eq!(first.iter().map(|hello| (hello.uplink, hello.dest)).collect::<Vec<_>>(), [(0, HBS), (1, HBS)]);
        let decoded: Vec<Packet> = first.iter().map(|hello| decode(&hello.payload, &KEY).expect("authentic")).collect();
        assert_eq!(decoded[0], Packet { kind: Kind::Hello, session: 3, uplink: 0, seq: 1, nonce: [0; 16], load: 0 });
        assert_eq!((decoded[1].uplink, decoded[1].seq), (1, 2));

        // Uplink 0 is pinged every second from 2.5 s on; uplink 1 never.
        for second in 0..60 {
            sim.ping_at(ncu, 0, ms(2_500 + second * 1_000));
        }
        sim.run_until(ms(60_000));
        assert!(sim.ncu_events.is_empty());
        let hellos = sim.take_hellos();
        let times =
            |uplink| hellos.iter().filter(|(_, hello)| hello.uplink == uplink).map(|(at, _)| *at).collect::<Vec<_>>();
        assert_eq!(times(0), [2_000, 22_000, 42_000].map(ms));
        assert_eq!(times(1), (1..=30).map(|n| ms(n * 2_000)).collect::<Vec<_>>());
    }

    #[test]
    fn hello_seq_strictly_increases_per_session_even_when_it_is_set_again() {
        let mut sim = Sim::new(4);
        let ncu = sim.add_ncu(3, &[link(0), link(1)]);
        sim.run_until(ms(10_000));
        sim.take_hellos();
        sim.set_session(ncu, 3);
        let hellos = sim.take_hellos();
        let seqs: Vec<u64> =
            hellos.iter().map(|(_, hello)| decode(&hello.payload, &KEY).expect("authentic").seq).collect();
        assert_eq!(seqs, [13, 14], "five repeats of two uplinks after the first two");
    }

    #[test]
    fn fast_hellos_resume_when_pings_stop() {
        let mut sim = Sim::new(5);
        let ncu = sim.add_ncu(3, &[link(0)]);
        sim.take_hellos();
        for second in 0..7 {
            sim.ping_at(ncu, 0, ms(2_500 + second * 1_000));
        }
        sim.run_until(ms(20_000));
        let times: Vec<Duration> = sim.take_hellos().into_iter().map(|(at, _)| at).collect();
        assert_eq!(times, [2_000, 11_500, 13_500, 15_500, 17_500, 19_500].map(ms));
        assert_eq!(sim.ncu_events_since(ms(0)), [(ms(11_500), ResponderEvent::PrimaryLost { session: 3 })]);
    }

    #[test]
    fn new_uplinks_hello_at_once_and_removed_ones_stop() {
        let mut sim = Sim::new(6);
        let ncu = sim.add_ncu(3, &[link(0), link(1)]);
        sim.run_until(ms(700));
        sim.take_hellos();
        sim.set_links(ncu, &[link(0), link(3), link(3)]);
        let added = sim.take_hellos();
        assert_eq!(added.iter().map(|(_, hello)| hello.uplink).collect::<Vec<_>>(), [3]);
        sim.run_until(ms(4_000));
        let hellos: Vec<(Duration, u8)> = sim.take_hellos().into_iter().map(|(at, hello)| (at, hello.uplink)).collect();
        assert_eq!(hellos, [(ms(2_000), 0), (ms(2_700), 3), (ms(4_000), 0)]);
    }
}
