//! The HBS side: pings every registered address, re-probes on silence, and declares addresses alive or dead.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngCore;
use rustc_hash::FxHashMap;

use super::packet::{self, Key, Keyed, Kind, PACKET_LEN, Packet, PacketError};
use super::wheel::{Entry, Place, Wheel};

/// Timing of probes and of what the monitor reports.
///
/// [`Monitor::new`] raises an `interval` or `reply_timeout` below 1 ms to 1 ms, so that time always moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Time between the pings that start each cycle.
    pub interval: Duration,
    /// How long the cycle's ping may go unanswered before the first re-probe.
    pub reply_timeout: Duration,
    /// Time between re-probes, and the window of the last one.
    pub reprobe_interval: Duration,
    /// Re-probes sent in a cycle before the target is declared dead.
    pub reprobes: u8,
    /// A deadline handled later than this is a stalled process or a clock jump, not a loss.
    pub clock_jump: Duration,
    /// The smallest load change (in percentage points) worth an [`Event::Load`].
    pub load_step: u16,
    /// The shortest time between two load reports of one target.
    pub load_every: Duration,
    /// The least time between the first pings of targets added together: a batch of registrations is spread over
    /// the interval instead of being pinged (and answered) in one burst every cycle from then on.
    pub first_ping_spacing: Duration,
    /// How long an address taken over live (a handover) may go unanswered before the miss policy applies to it.
    /// The NCU learns the new session's key from the answer to its registration, which races the first pings: in a
    /// failover storm that answer can take seconds to reach it. The grace ends sooner, one interval after the NCU's
    /// first authentic hello (proof that it holds the key), or at its first pong. An NCU waits as long for that
    /// answer over its standby connection before it tries another.
    pub handover_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            reply_timeout: Duration::from_millis(100),
            reprobe_interval: Duration::from_millis(80),
            reprobes: 4,
            clock_jump: Duration::from_secs(2),
            load_step: 10,
            load_every: Duration::from_secs(5),
            // 100,000 first pings a second.
            first_ping_spacing: Duration::from_micros(10),
            handover_grace: Duration::from_secs(15),
        }
    }
}

/// A monitored address: its row id in Postgres.
pub type TargetId = i64;

/// Where a target sits in the monitor's slab, for as long as it is watched.
pub(super) type TargetIndex = usize;

/// What the monitor currently believes about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Not yet answered.
    Pending,
    /// Answering.
    Live,
    /// A ping and all its re-probes went unanswered.
    Dead,
}

/// A ping to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub dest: SocketAddr,
    /// The datagram.
    pub payload: [u8; PACKET_LEN],
}

/// A change the shell should record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Became live (from pending or dead), or its observed source address changed while live.
    Alive {
        /// The target.
        id: TargetId,
        /// The source address of the pong.
        observed: SocketAddr,
        /// The NCU's load in percent.
        load: u16,
    },
    /// A ping and all its re-probes went unanswered.
    Dead {
        /// The target.
        id: TargetId,
    },
    /// Reported load moved by at least `load_step` since last reported (rate limited to one per `load_every`).
    Load {
        /// The target.
        id: TargetId,
        /// The NCU's load in percent.
        load: u16,
    },
}

/// Counters of what the monitor sent and received.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams for a known target whose MAC did not verify.
    pub forged: u64,
    /// Authentic pongs matching no outstanding probe, and hellos not newer than the last one.
    pub stale: u64,
    /// Unparseable datagrams, and pings (which the HBS never expects).
    pub malformed: u64,
    /// Datagrams for a session and uplink the monitor does not watch.
    pub unknown: u64,
    /// Probes sent: pings, re-probes, and pings of an address a hello or reply came from.
    pub pings: u64,
    /// Re-probes sent (included in `pings`).
    pub reprobes: u64,
    /// Pongs accepted as proof of life.
    pub pongs: u64,
    /// Authentic pongs from another address than the one pinged: proof of nothing until a ping to that address is
    /// answered from it (a NAT's mapping, or someone re-sending the NCU's replies).
    pub unproven: u64,
    /// Hellos accepted.
    pub hellos: u64,
}

/// How many targets the monitor believes to be in each [`Liveness`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ByState {
    /// Targets [`Liveness::Pending`].
    pub pending: u64,
    /// Targets [`Liveness::Live`].
    pub live: u64,
    /// Targets [`Liveness::Dead`].
    pub dead: u64,
}

impl ByState {
    fn of_mut(&mut self, liveness: Liveness) -> &mut u64 {
        match liveness {
            Liveness::Pending => &mut self.pending,
            Liveness::Live => &mut self.live,
            Liveness::Dead => &mut self.dead,
        }
    }
}

/// The sans-IO heartbeat monitor of one HBS.
pub struct Monitor {
    policy: Policy,
    targets: Targets,
    /// When the latest target was added, and when its first ping was scheduled.
    last_first_ping: Option<(Instant, Instant)>,
    out: Output,
}

impl Monitor {
    /// Creates a monitor with no targets.
    pub fn new(policy: Policy) -> Self {
        let floor = Duration::from_millis(1);
        let policy =
            Policy { interval: policy.interval.max(floor), reply_timeout: policy.reply_timeout.max(floor), ..policy };
        let cycle = policy.interval
            + policy.reply_timeout
            + policy.reprobe_interval.saturating_mul(u32::from(policy.reprobes) + 1);
        Self {
            policy,
            targets: Targets::default(),
            last_first_ping: None,
            out: Output {
                timers: Wheel::new(cycle),
                due: Vec::new(),
                transmits: VecDeque::new(),
                claims: Vec::new(),
                events: VecDeque::new(),
                stats: Stats::default(),
                by_state: ByState::default(),
            },
        }
    }

    /// Adds (or replaces) a target; its first ping is due at `now`, or [`Policy::first_ping_spacing`] after the
    /// previous target's first ping if that is later.
    ///
    /// `initial` = Live is used when taking over an address another server proved (handover): no Alive event on the
    /// first pong, and [`Policy::handover_grace`]: the NCU learns the session key from the reply to its registration,
    /// which races the first pings (and may be retransmitted, or processed late by a busy NCU), so cycles unanswered
    /// before its first pong (or a cycle after its first hello), within the grace, are not a death; after that the
    /// normal miss policy applies. A target already watching the same session and uplink is replaced too; the
    /// replacement keeps its sequence numbers so the NCU sees no replay, and gets no handover grace (the NCU holds
    /// that session's key already).
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        id: TargetId,
        session: u64,
        uplink: u8,
        key: Key,
        dest: SocketAddr,
        initial: Liveness,
        now: Instant,
    ) {
        let mut next_seq = 1;
        let mut last_hello = None;
        // Replacing a target of the same session: the NCU holds that session's key already, so no handover.
        let mut same_session = false;
        let same_uplink = self.targets.on_uplink(session, uplink).map(|target| target.id);
        for old_id in [Some(id), same_uplink].into_iter().flatten() {
            let Some(old) = self.remove_target(old_id) else { continue };
            if (old.session, old.uplink) == (session, uplink) {
                same_session = true;
                next_seq = next_seq.max(old.next_seq);
                last_hello = last_hello.max(old.last_hello);
            }
        }
        // Paced after the previous add's first ping, unless the caller's clock went back (tests add in any order).
        let first_ping = match self.last_first_ping {
            Some((added, first)) if now >= added => now.max(first + self.policy.first_ping_spacing),
            _ => now,
        };
        self.last_first_ping = Some((now, first_ping));
        let index = self.targets.insert(Target {
            id,
            index: 0,
            session,
            uplink,
            keyed: packet::keyed(&key),
            dest,
            candidate: None,
            liveness: initial,
            observed: (initial == Liveness::Live).then_some(dest),
            handover: (initial == Liveness::Live && !same_session)
                .then(|| Handover { until: first_ping + self.policy.handover_grace, key_shown: false }),
            reported_load: None,
            load_reported_at: None,
            next_seq,
            last_hello,
            probes: Vec::with_capacity(usize::from(self.policy.reprobes) + 1),
            phase: Phase::Waiting,
            reprobes_sent: 0,
            next_ping: first_ping,
            timer: None,
        });
        if let Some(target) = self.targets.at_mut(index) {
            self.out.schedule(target, first_ping);
        }
        *self.out.by_state.of_mut(initial) += 1;
        self.out.timers.settle();
    }

    /// Stops watching a target.
    pub fn remove(&mut self, id: TargetId) {
        self.remove_target(id);
        self.out.timers.settle();
    }

    /// Removes every target of a session.
    pub fn remove_session(&mut self, session: u64) {
        for uplink in 0..=u8::MAX {
            if let Some(id) = self.targets.on_uplink(session, uplink).map(|target| target.id) {
                self.remove_target(id);
            }
        }
        self.out.timers.settle();
    }

    /// What the monitor believes about a target, if it watches it.
    pub fn liveness(&self, id: TargetId) -> Option<Liveness> {
        self.targets.get(id).map(|target| target.liveness)
    }

    /// The number of targets.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether there are no targets.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// A datagram from the heartbeat socket: a pong or a hello. Anything else is counted and ignored.
    pub fn handle_datagram(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) {
        let stats = &mut self.out.stats;
        let Ok((kind, session, uplink)) = packet::peek_header(bytes) else {
            stats.malformed += 1;
            return;
        };
        if kind == Kind::Ping {
            stats.malformed += 1;
            return;
        }
        let Some(target) = self.targets.on_uplink_mut(session, uplink) else {
            stats.unknown += 1;
            tracing::trace!(session, uplink, "heartbeat for an unknown target");
            return;
        };
        let packet = match packet::decode_with(bytes, &target.keyed) {
            Ok(packet) => packet,
            Err(PacketError::BadMac) => {
                stats.forged += 1;
                tracing::debug!(id = target.id, %from, "heartbeat failed authentication");
                return;
            }
            Err(PacketError::Malformed) => {
                stats.malformed += 1;
                return;
            }
        };
        match kind {
            Kind::Pong => target.on_pong(&packet, from, now, &self.policy, &mut self.out),
            Kind::Hello => target.on_hello(&packet, from, now, &self.policy, &mut self.out),
            Kind::Ping => {}
        }
        self.out.timers.settle();
    }

    /// Sends due pings/re-probes and pings of claimed addresses (nonces from `rng`), declares deaths.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        let mut claims = std::mem::take(&mut self.out.claims);
        claims.retain(|claim| {
            if claim.at > now {
                return true;
            }
            if let Some(target) = self.targets.get_mut(claim.id) {
                target.send_probe(claim.address, rng, &mut self.out);
            }
            false
        });
        self.out.claims = claims;
        let mut due = std::mem::take(&mut self.out.due);
        loop {
            self.out.timers.take_due(now, &mut due);
            if due.is_empty() {
                break;
            }
            for entry in &due {
                let Some(target) = self.targets.at_mut(entry.target).filter(|target| target.id == entry.id) else {
                    continue;
                };
                target.timer = None;
                target.on_deadline(entry.deadline, now, &self.policy, rng, &mut self.out);
            }
        }
        self.out.due = due;
        self.out.timers.settle();
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.transmits.pop_front()
    }

    /// The next change to record.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.events.pop_front()
    }

    /// When [`Monitor::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let claims = self.out.claims.iter().map(|claim| claim.at);
        claims.chain(self.out.timers.next()).min()
    }

    /// Counters since creation.
    pub fn stats(&self) -> Stats {
        self.out.stats
    }

    /// How many targets are in each state (kept up to date as they change: reading it costs nothing).
    pub fn by_state(&self) -> ByState {
        self.out.by_state
    }

    fn remove_target(&mut self, id: TargetId) -> Option<Target> {
        let mut target = self.targets.remove(id)?;
        self.out.claims.retain(|claim| claim.id != id);
        *self.out.by_state.of_mut(target.liveness) -= 1;
        if let Some(place) = target.timer.take() {
            self.out.timers.cancel(place, id);
        }
        Some(target)
    }
}

/// The watched targets, in a slab: the wheel's entries and the session-and-uplink map hold a target's index, so a
/// deadline reaches its target with no lookup and a datagram with one. (Two hash lookups per pong, and one per
/// deadline, were most of the monitor's own time at 50,000 targets, spent waiting on memory.) The maps hash with Fx:
/// their keys are row ids and the server's random session ids, which no peer chooses (datagrams only look up).
#[derive(Default)]
struct Targets {
    /// Each target at its index; None where one was removed, until reused.
    slab: Vec<Option<Target>>,
    /// The free indexes of `slab`.
    free: Vec<TargetIndex>,
    by_id: FxHashMap<TargetId, TargetIndex>,
    by_uplink: FxHashMap<(u64, u8), TargetIndex>,
}

impl Targets {
    /// Adds a target, which no other has the id of, and makes it the one watching its session and uplink; returns
    /// its index.
    fn insert(&mut self, mut target: Target) -> TargetIndex {
        let index = self.free.pop().unwrap_or(self.slab.len());
        target.index = index;
        self.by_id.insert(target.id, index);
        self.by_uplink.insert((target.session, target.uplink), index);
        if index == self.slab.len() {
            self.slab.push(Some(target));
        } else {
            self.slab[index] = Some(target);
        }
        index
    }

    fn remove(&mut self, id: TargetId) -> Option<Target> {
        let index = self.by_id.remove(&id)?;
        let target = self.slab.get_mut(index)?.take()?;
        let key = (target.session, target.uplink);
        if self.by_uplink.get(&key) == Some(&index) {
            self.by_uplink.remove(&key);
        }
        self.free.push(index);
        Some(target)
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn get(&self, id: TargetId) -> Option<&Target> {
        self.slab.get(*self.by_id.get(&id)?)?.as_ref()
    }

    fn get_mut(&mut self, id: TargetId) -> Option<&mut Target> {
        self.at_mut(*self.by_id.get(&id)?)
    }

    fn at_mut(&mut self, index: TargetIndex) -> Option<&mut Target> {
        self.slab.get_mut(index)?.as_mut()
    }

    /// The target watching a session's uplink.
    fn on_uplink(&self, session: u64, uplink: u8) -> Option<&Target> {
        self.slab.get(*self.by_uplink.get(&(session, uplink))?)?.as_ref()
    }

    fn on_uplink_mut(&mut self, session: u64, uplink: u8) -> Option<&mut Target> {
        self.at_mut(*self.by_uplink.get(&(session, uplink))?)
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &Target> {
        self.slab.iter().flatten()
    }
}

/// Everything a target's handlers write to, apart from the target itself.
struct Output {
    /// Every target's one deadline.
    timers: Wheel,
    /// The entries [`Monitor::handle_timeout`] is working through (kept for its allocation).
    due: Vec<Entry>,
    transmits: VecDeque<Transmit>,
    /// Candidates to ping at once (see [`Target::claim`]).
    claims: Vec<Claim>,
    events: VecDeque<Event>,
    stats: Stats,
    /// The targets in each state.
    by_state: ByState,
}

impl Output {
    /// Makes `at` the target's only deadline.
    fn schedule(&mut self, target: &mut Target, at: Instant) {
        if let Some(place) = target.timer.take() {
            self.timers.cancel(place, target.id);
        }
        target.timer = Some(self.timers.insert(at, target.id, target.index));
    }
}

/// Where a target is in its cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The cycle is settled (answered, or dead declared); the deadline is the next ping.
    Waiting,
    /// A probe is unanswered; the deadline ends its window.
    Probing,
}

/// The grace of an address taken over live, until its first pong.
#[derive(Debug, Clone, Copy)]
struct Handover {
    /// Cycles ending before this may go unanswered.
    until: Instant,
    /// An authentic hello came: the NCU holds the session's key, so misses are re-probed again.
    key_shown: bool,
}

/// One watched address and where it is in its probe cycle.
struct Target {
    id: TargetId,
    /// Its index in [`Targets`].
    index: TargetIndex,
    session: u64,
    uplink: u8,
    keyed: Keyed,
    /// Where pings go: the address registered, then the last one that answered a ping sent to it.
    dest: SocketAddr,
    /// Another address the target may be at, pinged alongside `dest` until proved.
    candidate: Option<Candidate>,
    liveness: Liveness,
    /// The source address last reported in an [`Event::Alive`] (or the destination, for a handover).
    observed: Option<SocketAddr>,
    /// Taken over live and not yet answered in this session.
    handover: Option<Handover>,
    reported_load: Option<u16>,
    load_reported_at: Option<Instant>,
    next_seq: u64,
    last_hello: Option<u64>,
    /// The probes of the current cycle not yet answered.
    probes: Vec<Probe>,
    phase: Phase,
    reprobes_sent: u8,
    next_ping: Instant,
    /// Where its deadline is on the wheel; None only while the deadline is being handled.
    timer: Option<Place>,
}

impl Target {
    fn on_deadline(
        &mut self,
        deadline: Instant,
        now: Instant,
        policy: &Policy,
        rng: &mut impl RngCore,
        out: &mut Output,
    ) {
        let id = self.id;
        let late = now.saturating_duration_since(deadline);
        if late > policy.clock_jump {
            // The process stalled or the clock jumped: the missed windows say nothing about the target.
            tracing::debug!(id, ?late, "deadline handled late; restarting the probe cycle");
            self.start_cycle(now, now, policy, rng, out);
            return;
        }
        match self.phase {
            Phase::Waiting => {
                let anchor = if late < policy.interval { deadline } else { now };
                self.start_cycle(anchor, now, policy, rng, out);
            }
            Phase::Probing => {
                let grace = self.handover.filter(|handover| now < handover.until);
                // Re-probes find lost packets. A dead target, or one taken over whose NCU has not shown the key yet
                // (within the grace), would not answer them: its next cycle's ping is enough.
                let keyless = grace.is_some_and(|handover| !handover.key_shown);
                let allowed = if self.liveness == Liveness::Dead || keyless { 0 } else { policy.reprobes };
                if self.reprobes_sent < allowed {
                    self.reprobes_sent += 1;
                    out.stats.reprobes += 1;
                    self.send_probes(rng, out);
                    out.schedule(self, now + policy.reprobe_interval);
                    return;
                }
                if grace.is_some() {
                    tracing::debug!(id, "cycle after a handover unanswered; within the grace");
                } else if self.liveness != Liveness::Dead {
                    self.set_liveness(Liveness::Dead, &mut out.by_state);
                    tracing::debug!(id, "target dead");
                    out.events.push_back(Event::Dead { id });
                }
                self.phase = Phase::Waiting;
                let next_ping = self.next_ping.max(now);
                out.schedule(self, next_ping);
            }
        }
    }

    /// Starts a cycle whose ping was due at `anchor`, sending it at `now`.
    fn start_cycle(
        &mut self,
        anchor: Instant,
        now: Instant,
        policy: &Policy,
        rng: &mut impl RngCore,
        out: &mut Output,
    ) {
        self.probes.clear();
        self.reprobes_sent = 0;
        self.phase = Phase::Probing;
        self.next_ping = anchor + policy.interval;
        // A candidate claimed between cycles is pinged in this one too; one claimed during the last one is dropped.
        let kept = self.candidate.filter(|candidate| candidate.next_cycle);
        self.candidate = kept.map(|candidate| Candidate { next_cycle: false, ..candidate });
        self.send_probes(rng, out);
        out.schedule(self, now + policy.reply_timeout);
    }

    /// Pings `dest`, and the candidate if there is one.
    fn send_probes(&mut self, rng: &mut impl RngCore, out: &mut Output) {
        self.send_probe(self.dest, rng, out);
        if let Some(candidate) = self.candidate {
            self.send_probe(candidate.address, rng, out);
        }
    }

    fn send_probe(&mut self, dest: SocketAddr, rng: &mut impl RngCore, out: &mut Output) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        self.probes.push(Probe { seq, nonce, dest, claimed: false });
        let ping = Packet { kind: Kind::Ping, session: self.session, uplink: self.uplink, seq, nonce, load: 0 };
        out.transmits.push_back(Transmit { dest, payload: packet::encode_with(&ping, &self.keyed) });
        out.stats.pings += 1;
    }

    fn on_pong(&mut self, pong: &Packet, from: SocketAddr, now: Instant, policy: &Policy, out: &mut Output) {
        let id = self.id;
        let Some(index) = self.probes.iter().position(|probe| probe.seq == pong.seq && probe.nonce == pong.nonce)
        else {
            out.stats.stale += 1;
            tracing::trace!(id, seq = pong.seq, "stale pong");
            return;
        };
        let pinged = self.probes[index].dest;
        if from != pinged {
            // A pong proves only the address that was pinged: behind NAT the reply comes from the mapping, and an
            // on-path re-sender or a spoofing NCU could send it from anyone's. The probe stays outstanding (a copy
            // racing ahead of the genuine reply must not void it) and that address becomes the candidate (once per
            // probe); only its own answer moves the pings there and publishes it (a victim never answers: no key).
            out.stats.unproven += 1;
            tracing::debug!(id, %pinged, %from, "reply from another address than pinged; pinging it to prove it");
            if !std::mem::replace(&mut self.probes[index].claimed, true) {
                self.claim(from, now, out);
            }
            return;
        }
        self.probes.swap_remove(index);
        self.dest = from;
        self.candidate = self.candidate.filter(|candidate| candidate.address != from);
        out.stats.pongs += 1;
        self.handover = None;
        if self.phase == Phase::Probing {
            self.phase = Phase::Waiting;
            let next_ping = self.next_ping.max(now);
            out.schedule(self, next_ping);
        }
        let load = pong.load.min(100);
        if self.liveness != Liveness::Live || self.observed != Some(from) {
            tracing::debug!(id, observed = %from, load, "target alive");
            self.set_liveness(Liveness::Live, &mut out.by_state);
            self.observed = Some(from);
            self.report_load(load, now);
            out.events.push_back(Event::Alive { id, observed: from, load });
            return;
        }
        let moved = self.reported_load.is_none_or(|reported| reported.abs_diff(load) >= policy.load_step);
        let allowed = self.load_reported_at.is_none_or(|at| now.saturating_duration_since(at) >= policy.load_every);
        if moved && allowed {
            self.report_load(load, now);
            out.events.push_back(Event::Load { id, load });
        }
    }

    fn set_liveness(&mut self, liveness: Liveness, by_state: &mut ByState) {
        *by_state.of_mut(self.liveness) -= 1;
        *by_state.of_mut(liveness) += 1;
        self.liveness = liveness;
    }

    fn report_load(&mut self, load: u16, now: Instant) {
        self.reported_load = Some(load);
        self.load_reported_at = Some(now);
    }

    fn on_hello(&mut self, hello: &Packet, from: SocketAddr, now: Instant, policy: &Policy, out: &mut Output) {
        let id = self.id;
        if self.last_hello.is_some_and(|last| hello.seq <= last) {
            out.stats.stale += 1;
            tracing::trace!(id, seq = hello.seq, "stale hello");
            return;
        }
        self.last_hello = Some(hello.seq);
        // The NCU holds the session's key now: the cycle under way (its re-probes get answered) and one more.
        if let Some(handover) = &mut self.handover {
            handover.until = handover.until.min(now + policy.interval);
            handover.key_shown = true;
        }
        // Anyone on path can send a copy of the hello from anyone's address: that address is pinged, and takes the
        // pings over only by answering.
        if self.dest != from {
            tracing::debug!(id, %from, "hello from another address than pinged; pinging it to prove it");
            self.claim(from, now, out);
        }
        out.stats.hellos += 1;
    }

    /// Makes `address`, which a hello or a reply came from, the candidate, pinged at once (by the next
    /// [`Monitor::handle_timeout`]), unless pings go there already.
    fn claim(&mut self, address: SocketAddr, now: Instant, out: &mut Output) {
        let id = self.id;
        if address == self.dest {
            return;
        }
        let next_cycle = self.phase == Phase::Waiting;
        if let Some(candidate) = self.candidate.as_mut().filter(|candidate| candidate.address == address) {
            candidate.next_cycle |= next_cycle;
            return;
        }
        self.candidate = Some(Candidate { address, next_cycle });
        out.claims.push(Claim { at: now, id, address });
    }
}

/// An address a hello or a reply came from, other than where pings go: pinged with every probe until it answers
/// (then pings go there), another is claimed, or the cycle it was claimed in ends. Claimed between cycles, it is
/// pinged in the next one. A live target's cycle ends at its answer: a victim's address costs one ping a claim.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    address: SocketAddr,
    /// Claimed between cycles: pinged in the next one too.
    next_cycle: bool,
}

/// A ping of the current cycle not yet answered.
#[derive(Debug, Clone, Copy)]
struct Probe {
    seq: u64,
    nonce: [u8; 16],
    /// Where it was sent: the only address its answer proves.
    dest: SocketAddr,
    /// An answer from another address came and made it the candidate: later ones do not.
    claimed: bool,
}

/// An address a target's hello or reply came from, to be pinged at `at` to prove it.
#[derive(Debug, Clone, Copy)]
struct Claim {
    at: Instant,
    id: TargetId,
    address: SocketAddr,
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::heartbeat::packet::{decode, encode};
    use crate::heartbeat::sim::{Datagram, KEY, Sim, WRONG_KEY, addr, ms, plaintext};

    /// One NCU (session 7) with uplink 0 listening on and sending from `192.0.2.10:5000`, watched as target 1.
    fn one_target(seed: u64, initial: Liveness) -> Sim {
        let mut sim = Sim::new(seed);
        let ncu = sim.add_ncu(7, &[(0, "192.0.2.10:5000", "192.0.2.10:5000")]);
        sim.watch(1, ncu, 0, None, initial);
        sim
    }

    fn alive(observed: &str, load: u16) -> Event {
        Event::Alive { id: 1, observed: addr(observed), load }
    }

    #[test]
    fn first_pong_makes_a_pending_target_alive_with_the_observed_source() {
        let mut sim = Sim::new(1);
        let ncu = sim.add_ncu(7, &[(0, "192.0.2.10:5000", "203.0.113.9:61000")]);
        sim.ncus[ncu].load = 35;
        sim.watch(1, ncu, 0, None, Liveness::Pending);
        assert_eq!(sim.monitor.liveness(1), Some(Liveness::Pending));
        sim.run_until(ms(9_500));
        let events = sim.events_since(ms(0));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].0 <= ms(40));
        assert_eq!(events[0].1, alive("203.0.113.9:61000", 35));
        assert_eq!(sim.monitor.liveness(1), Some(Liveness::Live));
        let stats = sim.monitor.stats();
        // The first reply came from the NAT's address, not the one pinged: one more ping, to it, proved it.
        assert_eq!((stats.pings, stats.reprobes, stats.pongs, stats.stale, stats.unproven), (11, 0, 10, 0, 1));
    }

    #[test]
    fn a_pong_resent_from_another_address_neither_publishes_it_nor_voids_the_genuine_one() {
        let mut rng = StdRng::seed_from_u64(21);
        let base = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        let (dest, victim) = (addr("192.0.2.10:5000"), addr("198.51.100.66:5000"));
        monitor.add(1, 7, 0, KEY, dest, Liveness::Pending, base);
        let mut events = Vec::new();
        let mut proving = Vec::new();
        let mut t = 0;
        while t < 10_000 {
            let now = base + ms(t);
            monitor.handle_timeout(now, &mut rng);
            while let Some(transmit) = monitor.poll_transmit() {
                let ping = decode(&transmit.payload, &KEY).expect("ping");
                let pong = encode(&Packet { kind: Kind::Pong, ..ping }, &KEY);
                if transmit.dest == dest {
                    // An on-path re-sender copies the genuine reply from the victim's address, ahead of the real one.
                    monitor.handle_datagram(&pong, victim, now + ms(1));
                    monitor.handle_datagram(&pong, dest, now + ms(2));
                } else {
                    // Pings to the victim are never answered: it has no key.
                    proving.push(transmit.dest);
                }
            }
            while let Some(event) = monitor.poll_event() {
                events.push(event);
            }
            t += 10;
        }
        assert!(proving.iter().all(|d| *d == victim), "the claim was put to the test");
        assert_eq!(proving.len(), 10, "one ping to the victim per copy: the genuine reply ended each cycle");
        assert_eq!(
            events,
            [Event::Alive { id: 1, observed: dest, load: 0 }],
            "the victim's address is never published"
        );
        assert_eq!(monitor.liveness(1), Some(Liveness::Live), "the genuine reply, behind the copy, still counts");
        assert_eq!((monitor.stats().unproven, monitor.stats().pongs), (10, 10));
    }

    /// A copy of a fresh hello from a victim's address, ahead of the genuine one, moves no pings: the victim is
    /// pinged (at once, and with the next cycle's ping), never answers, and the target stays live where it is.
    #[test]
    fn a_hello_resent_from_another_address_does_not_move_the_pings() {
        let mut rng = StdRng::seed_from_u64(22);
        let base = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        let (dest, victim) = (addr("192.0.2.10:5000"), addr("198.51.100.66:5000"));
        monitor.add(1, 7, 0, KEY, dest, Liveness::Pending, base);
        let hello = encode(&Packet { kind: Kind::Hello, session: 7, uplink: 0, seq: 1, nonce: [0; 16], load: 0 }, &KEY);
        let mut to_victim = Vec::new();
        let mut t = 0;
        while t < 10_000 {
            let now = base + ms(t);
            if t == 3_500 {
                monitor.handle_datagram(&hello, victim, now);
                monitor.handle_datagram(&hello, dest, now + ms(1));
            }
            monitor.handle_timeout(now, &mut rng);
            while let Some(transmit) = monitor.poll_transmit() {
                if transmit.dest == dest {
                    let ping = decode(&transmit.payload, &KEY).expect("ping");
                    monitor.handle_datagram(&encode(&Packet { kind: Kind::Pong, ..ping }, &KEY), dest, now);
                } else {
                    to_victim.push((now - base, transmit.dest));
                }
            }
            t += 10;
        }
        assert_eq!(to_victim, [(ms(3_500), victim), (ms(4_000), victim)]);
        let events: Vec<Event> = std::iter::from_fn(|| monitor.poll_event()).collect();
        assert_eq!(events, [Event::Alive { id: 1, observed: dest, load: 0 }]);
        let stats = monitor.stats();
        assert_eq!((stats.hellos, stats.stale, stats.pongs, stats.pings), (1, 1, 10, 12));
    }

    #[test]
    fn silent_target_dies_exactly_interval_plus_reprobes_after_its_last_answered_ping_and_comes_back() {
        let mut sim = one_target(2, Liveness::Pending);
        sim.run_until(ms(3_500));
        sim.ncus[0].silent = true;
        sim.run_until(ms(5_500));
        // Last answered ping at 3 s: ping at 4 s, re-probes at 4.1, 4.18, 4.26, 4.34, dead at 4.42.
        assert_eq!(sim.events_since(ms(3_500)), [(ms(4_420), Event::Dead { id: 1 })]);
        let dest = addr("192.0.2.10:5000");
        assert_eq!(sim.ping_times(dest, ms(3_500), ms(5_500)), [4_000, 4_100, 4_180, 4_260, 4_340, 5_000].map(ms));
        assert_eq!(sim.monitor.liveness(1), Some(Liveness::Dead));

        sim.ncus[0].silent = false;
        sim.run_until(ms(8_000));
        let events = sim.events_since(ms(5_500));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].0 >= ms(6_000) && events[0].0 <= ms(6_040));
        assert_eq!(events[0].1, alive("192.0.2.10:5000", 0));
    }

    #[test]
    fn pending_target_that_never_answers_dies_after_one_cycle() {
        let mut sim = one_target(3, Liveness::Pending);
        sim.ncus[0].silent = true;
        sim.run_until(ms(10_000));
        assert_eq!(sim.events_since(ms(0)), [(ms(420), Event::Dead { id: 1 })]);
        assert_eq!(sim.monitor.stats().reprobes, 4, "a dead target gets one ping per interval, no re-probes");
        assert_eq!(sim.monitor.stats().pings, 11 + 4);
    }

    #[test]
    fn forged_pongs_never_keep_a_silent_target_alive() {
        let mut sim = one_target(4, Liveness::Pending);
        sim.forger = true;
        sim.run_until(ms(3_500));
        sim.ncus[0].silent = true;
        sim.run_until(ms(20_000));
        assert_eq!(sim.events_since(ms(3_500)), [(ms(4_420), Event::Dead { id: 1 })]);
        let stats = sim.monitor.stats();
        assert_eq!(stats.forged, 5 + 15, "every probe was answered by the forger");
        assert_eq!(stats.pongs, 4);
    }

    #[test]
    fn replayed_pongs_are_stale_and_never_revive_a_dead_target() {
        let mut sim = one_target(5, Liveness::Pending);
        sim.run_until(ms(3_500));
        let recorded: Vec<Datagram> = sim.delivered.clone();
        assert!(recorded.len() >= 4, "four pongs and the first hello");
        let pongs = recorded.iter().filter(|d| plaintext(&d.payload).kind == Kind::Pong).count() as u64;
        let hellos = recorded.len() as u64 - pongs;

        // A duplicate while live changes nothing.
        sim.monitor.handle_datagram(&recorded[0].payload, recorded[0].from, sim.now);
        sim.ncus[0].silent = true;
        sim.run_until(ms(4_500));
        for datagram in &recorded {
            sim.monitor.handle_datagram(&datagram.payload, datagram.from, sim.now);
        }
        // And during a cycle with a ping outstanding.
        sim.run_until(ms(5_005));
        for datagram in &recorded {
            sim.monitor.handle_datagram(&datagram.payload, datagram.from, sim.now);
        }
        sim.run_until(ms(8_000));
        assert_eq!(sim.events_since(ms(3_500)), [(ms(4_420), Event::Dead { id: 1 })]);
        assert_eq!(sim.monitor.liveness(1), Some(Liveness::Dead));
        assert_eq!(sim.monitor.stats().stale, 1 + 2 * (pongs + hellos));
    }

    #[test]
    fn delayed_pongs_count_while_a_probe_is_outstanding() {
        let mut sim = one_target(6, Liveness::Pending);
        sim.to_ncu_delay = (ms(0), ms(0));
        sim.to_hbs_delay = (ms(150), ms(150));
        sim.run_until(ms(30_000));
        // The ping's pong lands at 150 ms, after the first re-probe (100 ms), whose pong lands at 250 ms.
        assert_eq!(sim.events_since(ms(0)), [(ms(150), alive("192.0.2.10:5000", 0))]);
        let stats = sim.monitor.stats();
        assert_eq!((stats.pings, stats.reprobes, stats.pongs, stats.stale), (61, 30, 60, 0));
    }

    #[test]
    fn reordered_pongs_up_to_390_ms_late_keep_a_target_alive() {
        let mut sim = one_target(7, Liveness::Pending);
        sim.to_ncu_delay = (ms(0), ms(0));
        sim.to_hbs_delay = (ms(0), ms(390));
        sim.run_until(ms(120_900));
        let events = sim.events_since(ms(0));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(events[0].1, Event::Alive { .. }));
        let stats = sim.monitor.stats();
        assert!(stats.reprobes > 100, "{stats:?}");
        assert_eq!((stats.pongs, stats.stale), (stats.pings, 0));
    }

    #[test]
    fn hello_moves_the_ping_destination() {
        let mut sim = Sim::new(8);
        let ncu = sim.add_ncu(7, &[(0, "198.51.100.7:40000", "198.51.100.7:40000")]);
        let registered = addr("198.51.100.7:1111");
        sim.watch(1, ncu, 0, Some(registered), Liveness::Pending);
        sim.run_until(ms(3_000));
        // The first ping went to the registered address; the hello's address (sent at 0, delivered within 20 ms) was
        // pinged at once, and its answer moved the pings there.
        assert_eq!(sim.ping_times(registered, ms(0), ms(3_000)), [ms(0)]);
        let events = sim.events_since(ms(0));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].0 <= ms(40), "{events:?}");
        assert_eq!(events[0].1, alive("198.51.100.7:40000", 0));
        assert_eq!(sim.monitor.stats().hellos, 1, "then keepalives, every 20 s");
    }

    #[test]
    fn old_hello_is_stale_and_moves_nothing() {
        let mut rng = StdRng::seed_from_u64(9);
        let base = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        let first = addr("192.0.2.10:5000");
        monitor.add(1, 7, 2, KEY, first, Liveness::Pending, base);
        let hello =
            |seq| encode(&Packet { kind: Kind::Hello, session: 7, uplink: 2, seq, nonce: [0; 16], load: 0 }, &KEY);
        monitor.handle_datagram(&hello(5), addr("192.0.2.20:6000"), base);
        monitor.handle_datagram(&hello(5), addr("192.0.2.30:6000"), base);
        monitor.handle_datagram(&hello(4), addr("192.0.2.30:6000"), base);
        let forged =
            encode(&Packet { kind: Kind::Hello, session: 7, uplink: 2, seq: 9, nonce: [0; 16], load: 0 }, &WRONG_KEY);
        monitor.handle_datagram(&forged, addr("192.0.2.30:6000"), base);
        monitor.handle_timeout(base, &mut rng);
        assert_eq!(monitor.poll_transmit().map(|transmit| transmit.dest), Some(addr("192.0.2.20:6000")));
        let stats = monitor.stats();
        assert_eq!((stats.hellos, stats.stale, stats.forged), (1, 2, 1));
    }

    #[test]
    fn clock_jump_of_ten_seconds_is_no_death() {
        let mut sim = one_target(10, Liveness::Pending);
        sim.run_until(ms(3_500));
        sim.jump(ms(10_000));
        sim.run_until(ms(30_000));
        let events = sim.events_since(ms(0));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(events[0].1, Event::Alive { .. }));
        let dest = addr("192.0.2.10:5000");
        // A fresh ping at once after the jump, then the cycle from there.
        assert_eq!(sim.ping_times(dest, ms(3_500), ms(16_000)), [13_500, 14_500, 15_500].map(ms));
        assert_eq!(sim.monitor.liveness(1), Some(Liveness::Live));
    }

    #[test]
    fn handover_target_emits_no_alive_on_its_first_pong_but_dies_when_silent() {
        let mut sim = one_target(11, Liveness::Live);
        sim.run_until(ms(3_500));
        // No Alive; the first pong only reports the load, which the new server has not seen yet.
        let events = sim.events_since(ms(0));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].0 <= ms(40));
        assert_eq!(events[0].1, Event::Load { id: 1, load: 0 });
        assert_eq!(sim.monitor.liveness(1), Some(Liveness::Live));
        sim.ncus[0].silent = true;
        sim.run_until(ms(6_000));
        assert_eq!(sim.events_since(ms(3_500)), [(ms(4_420), Event::Dead { id: 1 })]);
    }

    /// A taken-over target (session 7) whose NCU does not hold the new session's key yet: it answers session 6.
    fn handover_before_the_key(seed: u64) -> Sim {
        let mut sim = Sim::new(seed);
        let ncu = sim.add_ncu(6, &[(0, "192.0.2.10:5000", "192.0.2.10:5000")]);
        sim.ncus[ncu].session = 7;
        sim.watch(1, ncu, 0, None, Liveness::Live);
        sim
    }

    fn deaths(sim: &Sim) -> Vec<(Duration, Event)> {
        sim.events_since(ms(0)).into_iter().filter(|(_, e)| matches!(e, Event::Dead { .. })).collect()
    }

    #[test]
    fn handover_target_whose_ncu_gets_the_key_late_stays_live() {
        // As in a failover storm: the answer to the registration reaches the NCU after four cycles.
        let mut sim = handover_before_the_key(12);
        sim.run_until(ms(3_900));
        sim.give_key(0);
        sim.run_until(ms(7_500));
        assert_eq!(deaths(&sim), []);
        assert_eq!(sim.monitor.liveness(1), Some(Liveness::Live));
    }

    #[test]
    fn handover_target_without_the_key_gets_one_ping_a_cycle_and_no_re_probes() {
        let mut sim = handover_before_the_key(12);
        sim.record = true;
        sim.run_until(ms(3_900));
        assert_eq!(sim.monitor.stats().reprobes, 0);
        assert_eq!(sim.pings.len(), 4, "one ping at 0, 1, 2 and 3 s");
        // Once the key is shown (its hello), a missed ping is re-probed as usual.
        sim.give_key(0);
        sim.run_until(ms(4_050));
        sim.ncus[0].silent = true;
        sim.run_until(ms(6_000));
        assert!(sim.monitor.stats().reprobes >= 4, "{:?}", sim.monitor.stats());
    }

    #[test]
    fn handover_grace_ends_at_the_first_pong() {
        let mut sim = handover_before_the_key(12);
        sim.run_until(ms(900));
        sim.give_key(0);
        sim.run_until(ms(1_500));
        sim.ncus[0].silent = true;
        sim.run_until(ms(4_000));
        assert_eq!(deaths(&sim), [(ms(2_420), Event::Dead { id: 1 })]);
    }

    #[test]
    fn handover_grace_ends_a_cycle_after_the_first_hello() {
        // The NCU gets the key between two cycles (its hello arrives), then its links fail before any ping.
        let mut sim = handover_before_the_key(12);
        sim.run_until(ms(2_500));
        sim.give_key(0);
        sim.run_until(ms(2_600));
        sim.ncus[0].silent = true;
        sim.run_until(ms(6_000));
        assert_eq!(sim.monitor.stats().hellos, 1);
        // The cycle at 3 s ends within a second of the hello; the one at 4 s does not.
        assert_eq!(deaths(&sim), [(ms(4_420), Event::Dead { id: 1 })]);
    }

    #[test]
    fn handover_target_that_never_answers_dies_with_the_first_cycle_past_the_grace() {
        let mut sim = handover_before_the_key(13);
        sim.run_until(ms(18_000));
        // Cycles end 420 ms after each ping (0, 1 s, …): the one pinged at 15 s is the first to end past the grace.
        assert_eq!(sim.events_since(ms(0)), [(ms(15_420), Event::Dead { id: 1 })]);
    }

    #[test]
    fn handover_target_seen_from_another_address_is_reported() {
        let mut sim = Sim::new(12);
        let ncu = sim.add_ncu(7, &[(0, "192.0.2.10:5000", "203.0.113.9:61000")]);
        sim.watch(1, ncu, 0, None, Liveness::Live);
        sim.run_until(ms(3_000));
        let events: Vec<Event> = sim.events_since(ms(0)).into_iter().map(|(_, event)| event).collect();
        assert_eq!(events, [alive("203.0.113.9:61000", 0)]);
    }

    #[test]
    fn observed_address_change_while_live_emits_alive_again() {
        let mut sim = one_target(13, Liveness::Pending);
        sim.run_until(ms(2_500));
        sim.set_source(0, 0, addr("203.0.113.50:7000"));
        sim.run_until(ms(6_000));
        let events: Vec<Event> = sim.events_since(ms(0)).into_iter().map(|(_, event)| event).collect();
        assert_eq!(events, [alive("192.0.2.10:5000", 0), alive("203.0.113.50:7000", 0)]);
    }

    #[test]
    fn load_events_respect_step_and_rate_limit() {
        let mut sim = one_target(14, Liveness::Pending);
        sim.to_ncu_delay = (ms(0), ms(0));
        sim.to_hbs_delay = (ms(0), ms(0));
        sim.ncus[0].load = 10;
        for (at, load) in [(500, 15), (2_500, 25), (5_500, 31), (10_500, 40), (11_500, 0), (16_500, 130)] {
            sim.run_until(ms(at));
            sim.ncus[0].load = load;
        }
        sim.run_until(ms(30_000));
        let expected = [
            (ms(0), alive("192.0.2.10:5000", 10)),
            (ms(5_000), Event::Load { id: 1, load: 25 }),
            (ms(11_000), Event::Load { id: 1, load: 40 }),
            (ms(16_000), Event::Load { id: 1, load: 0 }),
            (ms(21_000), Event::Load { id: 1, load: 100 }),
        ];
        assert_eq!(sim.events_since(ms(0)), expected);
    }

    #[test]
    fn poll_timeout_is_the_earliest_deadline() {
        let mut rng = StdRng::seed_from_u64(15);
        let base = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        assert_eq!(monitor.poll_timeout(), None);
        monitor.add(1, 1, 0, KEY, addr("192.0.2.1:1"), Liveness::Pending, base + ms(300));
        monitor.add(2, 2, 0, KEY, addr("192.0.2.2:1"), Liveness::Pending, base + ms(100));
        monitor.add(3, 3, 0, KEY, addr("192.0.2.3:1"), Liveness::Pending, base + ms(150));
        assert_eq!(monitor.poll_timeout(), Some(base + ms(100)));

        monitor.handle_timeout(base + ms(99), &mut rng);
        assert_eq!(monitor.poll_transmit(), None);
        monitor.handle_timeout(base + ms(100), &mut rng);
        assert_eq!(monitor.poll_transmit().map(|transmit| transmit.dest), Some(addr("192.0.2.2:1")));
        assert_eq!(monitor.poll_transmit(), None);
        assert_eq!(monitor.poll_timeout(), Some(base + ms(150)));
        monitor.remove(3);
        assert_eq!(monitor.poll_timeout(), Some(base + ms(200)), "target 2's reply window");
        monitor.remove(2);
        assert_eq!(monitor.poll_timeout(), Some(base + ms(300)));

        monitor.handle_timeout(base + ms(300), &mut rng);
        let ping = monitor.poll_transmit().expect("ping of target 1");
        assert_eq!(monitor.poll_timeout(), Some(base + ms(400)));
        let ping = decode(&ping.payload, &KEY).expect("authentic");
        let pong = encode(&Packet { kind: Kind::Pong, load: 5, ..ping }, &KEY);
        monitor.handle_datagram(&pong, addr("192.0.2.1:1"), base + ms(350));
        assert_eq!(monitor.poll_timeout(), Some(base + ms(1_300)), "answered: next ping");
        monitor.remove(1);
        assert_eq!(monitor.poll_timeout(), None);
        assert!(monitor.is_empty());
    }

    #[test]
    fn seqs_strictly_increase_and_nonces_are_fresh() {
        let mut sim = one_target(16, Liveness::Pending);
        sim.run_until(ms(2_500));
        sim.ncus[0].silent = true;
        sim.run_until(ms(10_000));
        // Replace the target with the same session and uplink: numbering continues, so the NCU sees no replay.
        sim.watch(1, 0, 0, None, Liveness::Live);
        sim.run_until(ms(12_000));
        let pings: Vec<Packet> =
            sim.pings.iter().map(|(_, transmit)| decode(&transmit.payload, &KEY).expect("authentic")).collect();
        assert!(pings.len() > 20);
        assert!(pings.windows(2).all(|pair| pair[0].seq < pair[1].seq));
        let nonces: std::collections::HashSet<[u8; 16]> = pings.iter().map(|ping| ping.nonce).collect();
        assert_eq!(nonces.len(), pings.len());
        assert!(pings.iter().all(|ping| ping.kind == Kind::Ping && ping.session == 7 && ping.uplink == 0));
    }

    #[test]
    fn counts_malformed_unknown_and_unexpected_datagrams() {
        let base = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        monitor.add(1, 7, 0, KEY, addr("192.0.2.10:5000"), Liveness::Pending, base);
        let from = addr("192.0.2.10:5000");
        let packet = Packet { kind: Kind::Pong, session: 7, uplink: 0, seq: 1, nonce: [0; 16], load: 0 };
        monitor.handle_datagram(b"hello?", from, base);
        monitor.handle_datagram(&encode(&Packet { kind: Kind::Ping, ..packet }, &KEY), from, base);
        monitor.handle_datagram(&encode(&Packet { session: 8, ..packet }, &KEY), from, base);
        monitor.handle_datagram(&encode(&Packet { uplink: 1, ..packet }, &KEY), from, base);
        monitor.handle_datagram(&encode(&packet, &WRONG_KEY), from, base);
        monitor.handle_datagram(&encode(&packet, &KEY), from, base);
        let expected = Stats { malformed: 2, unknown: 2, forged: 1, stale: 1, ..Stats::default() };
        assert_eq!(monitor.stats(), expected);
        assert_eq!(monitor.poll_event(), None);
        assert_eq!(monitor.liveness(1), Some(Liveness::Pending));
    }

    #[test]
    fn remove_session_removes_every_uplink_of_it() {
        let base = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        monitor.add(1, 7, 0, KEY, addr("192.0.2.10:5000"), Liveness::Pending, base);
        monitor.add(2, 7, 1, KEY, addr("192.0.2.11:5000"), Liveness::Pending, base);
        monitor.add(3, 8, 0, KEY, addr("192.0.2.12:5000"), Liveness::Live, base + ms(500));
        assert_eq!(monitor.len(), 3);
        monitor.remove_session(7);
        assert_eq!(monitor.len(), 1);
        assert_eq!((monitor.liveness(1), monitor.liveness(2), monitor.liveness(3)), (None, None, Some(Liveness::Live)));
        assert_eq!(monitor.poll_timeout(), Some(base + ms(500)));
        let pong = Packet { kind: Kind::Pong, session: 7, uplink: 1, seq: 1, nonce: [0; 16], load: 0 };
        monitor.handle_datagram(&encode(&pong, &KEY), addr("192.0.2.11:5000"), base);
        assert_eq!(monitor.stats().unknown, 1);
    }

    /// Targets added together ping `first_ping_spacing` apart, and keep that spread in later cycles.
    #[test]
    fn a_burst_of_targets_is_spread() {
        let mut rng = StdRng::seed_from_u64(21);
        let base = Instant::now();
        let mut monitor = Monitor::new(Policy::default());
        for id in 0..1_000 {
            monitor.add(id, 100 + id.unsigned_abs(), 0, KEY, addr("192.0.2.10:5000"), Liveness::Pending, base);
        }
        // A target added later than the spacing pings at once.
        monitor.add(5_000, 7, 1, KEY, addr("192.0.2.11:5000"), Liveness::Pending, base + ms(50));
        let mut pings: Vec<(Duration, SocketAddr)> = Vec::new();
        let mut now = base;
        while now < base + ms(1_900) {
            monitor.handle_timeout(now, &mut rng);
            while let Some(transmit) = monitor.poll_transmit() {
                let ping = decode(&transmit.payload, &KEY).expect("authentic");
                monitor.handle_datagram(&encode(&Packet { kind: Kind::Pong, ..ping }, &KEY), transmit.dest, now);
                pings.push((now - base, transmit.dest));
            }
            now = monitor.poll_timeout().expect("targets");
        }
        let spacing = Policy::default().first_ping_spacing;
        let times = |ip: &str| -> Vec<Duration> {
            pings.iter().filter(|(_, to)| to.ip().to_string() == ip).map(|(at, _)| *at).collect()
        };
        let cycle: Vec<Duration> = (0..1_000).map(|k| spacing * k).collect();
        let two_cycles: Vec<Duration> =
            cycle.iter().chain(&cycle.iter().map(|at| *at + ms(1_000)).collect::<Vec<_>>()).copied().collect();
        assert_eq!(times("192.0.2.10"), two_cycles);
        assert_eq!(times("192.0.2.11"), [ms(50), ms(1_050)]);
        assert_eq!(monitor.stats().pongs, 2_002);
    }

    /// An interval longer than the wheel's span still pings once per interval.
    #[test]
    fn intervals_longer_than_the_wheel_are_kept() {
        let mut rng = StdRng::seed_from_u64(20);
        let base = Instant::now();
        let policy = Policy { interval: Duration::from_secs(100), ..Policy::default() };
        let mut monitor = Monitor::new(policy);
        assert!(monitor.out.timers.slot_count() < 100_000, "the wheel is shorter than the interval");
        monitor.add(1, 7, 0, KEY, addr("192.0.2.10:5000"), Liveness::Pending, base);
        let mut pings = Vec::new();
        let mut now = base;
        while now < base + Duration::from_secs(350) {
            monitor.handle_timeout(now, &mut rng);
            while let Some(transmit) = monitor.poll_transmit() {
                let ping = decode(&transmit.payload, &KEY).expect("authentic");
                let pong = encode(&Packet { kind: Kind::Pong, ..ping }, &KEY);
                monitor.handle_datagram(&pong, transmit.dest, now);
                pings.push(now - base);
            }
            now = monitor.poll_timeout().expect("a target");
        }
        assert_eq!(pings, [0, 100, 200, 300].map(Duration::from_secs));
    }

    /// The counts by state against a recount of the targets after each of 4,000 random steps: adds (new targets, and
    /// replacements by id or by session and uplink), removals of a target or a session, NCUs going down and up,
    /// pongs delivered (late, from a new address, replayed, forged) or dropped, and time passing (now and then a jump).
    #[test]
    fn counts_by_state_match_a_recount_after_every_step() {
        let mut rng = StdRng::seed_from_u64(23);
        let base = Instant::now();
        let mut now = base;
        let mut monitor = Monitor::new(Policy::default());
        let dest = |id: TargetId| addr(&format!("192.0.2.{id}:5000"));
        // Sessions whose NCU answers nothing.
        let mut down = [false; 12];
        // Pongs sent and not yet delivered or dropped, with their source.
        let mut in_flight: Vec<([u8; PACKET_LEN], SocketAddr)> = Vec::new();
        let mut last_delivered = None;
        // Targets removed or replaced, by their state then.
        let mut gone = ByState::default();
        for step in 0..4_000 {
            match rng.random_range(0..20) {
                0..3 => {
                    let id = rng.random_range(1..=40);
                    let (session, uplink) = (rng.random_range(0..12), rng.random_range(0..2));
                    let initial = if rng.random_bool(0.3) { Liveness::Live } else { Liveness::Pending };
                    let same_uplink =
                        monitor.targets.on_uplink(session, uplink).map(|target| target.id).filter(|&old| old != id);
                    for old in [Some(id), same_uplink].into_iter().flatten() {
                        if let Some(liveness) = monitor.liveness(old) {
                            *gone.of_mut(liveness) += 1;
                        }
                    }
                    monitor.add(id, session, uplink, KEY, dest(id), initial, now);
                }
                3 => {
                    let id = rng.random_range(1..=40);
                    if let Some(liveness) = monitor.liveness(id) {
                        *gone.of_mut(liveness) += 1;
                    }
                    monitor.remove(id);
                }
                4 => {
                    let session = rng.random_range(0..12);
                    for target in monitor.targets.iter().filter(|target| target.session == session) {
                        *gone.of_mut(target.liveness) += 1;
                    }
                    monitor.remove_session(session);
                }
                5 => {
                    let session = rng.random_range(0..down.len());
                    down[session] = !down[session];
                }
                6..10 => {
                    for _ in 0..rng.random_range(1..=in_flight.len().max(1)) {
                        if in_flight.is_empty() {
                            break;
                        }
                        let (pong, mut from) = in_flight.swap_remove(rng.random_range(0..in_flight.len()));
                        if rng.random_bool(0.02) {
                            from.set_port(6000);
                        }
                        monitor.handle_datagram(&pong, from, now);
                        last_delivered = Some((pong, from));
                    }
                }
                10 => {
                    if !in_flight.is_empty() {
                        in_flight.swap_remove(rng.random_range(0..in_flight.len()));
                    }
                }
                11 => {
                    if let Some((pong, from)) = last_delivered {
                        monitor.handle_datagram(&pong, from, now);
                    }
                    if let Some((pong, from)) = in_flight.first() {
                        let forged = encode(&Packet { load: 90, ..plaintext(pong) }, &WRONG_KEY);
                        monitor.handle_datagram(&forged, *from, now);
                    }
                }
                _ => {
                    now += if rng.random_bool(0.01) { ms(3_000) } else { ms(rng.random_range(0..150)) };
                    monitor.handle_timeout(now, &mut rng);
                    while let Some(transmit) = monitor.poll_transmit() {
                        let ping = decode(&transmit.payload, &KEY).expect("authentic");
                        if !down[usize::try_from(ping.session).expect("small")] && rng.random_bool(0.8) {
                            let load = rng.random_range(0..=100);
                            in_flight.push((encode(&Packet { kind: Kind::Pong, load, ..ping }, &KEY), transmit.dest));
                        }
                    }
                }
            }
            let mut recount = ByState::default();
            for target in monitor.targets.iter() {
                *recount.of_mut(target.liveness) += 1;
            }
            assert_eq!(monitor.by_state(), recount, "after step {step}");
        }
        let events: Vec<Event> = std::iter::from_fn(|| monitor.poll_event()).collect();
        let alive = events.iter().filter(|event| matches!(event, Event::Alive { .. })).count();
        let dead = events.iter().filter(|event| matches!(event, Event::Dead { .. })).count();
        let stats = monitor.stats();
        assert!(alive > 100 && dead > 100, "every transition, often: {alive} alive, {dead} dead");
        assert!(gone.pending > 20 && gone.live > 20 && gone.dead > 20, "targets of every state removed: {gone:?}");
        assert!(stats.stale > 0 && stats.forged > 0, "{stats:?}");
    }

    #[test]
    fn zero_durations_do_not_spin() {
        let mut rng = StdRng::seed_from_u64(18);
        let base = Instant::now();
        let zero = Duration::ZERO;
        let policy = Policy { interval: zero, reply_timeout: zero, reprobe_interval: zero, ..Policy::default() };
        let mut monitor = Monitor::new(policy);
        monitor.add(1, 7, 0, KEY, addr("192.0.2.10:5000"), Liveness::Pending, base);
        let mut now = base;
        for _ in 0..100 {
            monitor.handle_timeout(now, &mut rng);
            let next = monitor.poll_timeout().expect("a target");
            assert!(next > now, "time moves on");
            now = next;
        }
        assert_eq!(monitor.poll_event(), Some(Event::Dead { id: 1 }));
        assert_eq!(monitor.poll_event(), None);
    }

    /// NCUs per shard of the loss simulation, each with two uplinks (so twice as many targets).
    const LOSS_SIM_NCUS: usize = 30;
    /// Shards of the loss simulation, run on their own threads.
    const LOSS_SIM_SHARDS: u64 = 2;
    /// Simulated time of the loss simulation.
    const LOSS_SIM_SECS: u64 = 3_600;

    /// What one shard of the loss simulation saw.
    #[derive(Debug, Default)]
    struct LossOutcome {
        deaths: usize,
        alive: usize,
        primary_lost: usize,
        dropped: u64,
        stats: Stats,
    }

    fn loss_shard(seed: u64) -> LossOutcome {
        let mut sim = Sim::new(seed);
        sim.record = false;
        sim.loss = 0.01;
        for index in 0..LOSS_SIM_NCUS {
            let (high, low) = (index / 250, index % 250 + 1);
            let listens: Vec<String> = (0..2).map(|uplink| format!("10.{uplink}.{high}.{low}:5000")).collect();
            let links: Vec<(u8, &str, &str)> =
                (0..2u8).zip(&listens).map(|(uplink, listen)| (uplink, &**listen, &**listen)).collect();
            let ncu = sim.add_ncu(1_000 + index as u64, &links);
            for uplink in 0..2u8 {
                let id = TargetId::try_from(index * 2).expect("small") + i64::from(uplink);
                sim.watch(id, ncu, uplink, None, Liveness::Pending);
            }
            // Spread the targets over the interval, as registrations would be.
            let next = sim.now - sim.base + ms(13);
            sim.run_until(next);
        }
        sim.run_until(Duration::from_secs(LOSS_SIM_SECS));
        LossOutcome {
            deaths: sim.events.iter().filter(|(_, event)| matches!(event, Event::Dead { .. })).count(),
            alive: sim.events.iter().filter(|(_, event)| matches!(event, Event::Alive { .. })).count(),
            primary_lost: sim.ncu_events.len(),
            dropped: sim.dropped,
            stats: sim.monitor.stats(),
        }
    }

    #[test]
    fn one_percent_loss_each_way_causes_no_false_deaths() {
        let outcomes: Vec<LossOutcome> = std::thread::scope(|scope| {
            let shards: Vec<_> =
                (0..LOSS_SIM_SHARDS).map(|shard| scope.spawn(move || loss_shard(17 + shard))).collect();
            shards.into_iter().map(|shard| shard.join().expect("shard finished")).collect()
        });
        let targets = LOSS_SIM_NCUS * 2;
        for outcome in &outcomes {
            let stats = outcome.stats;
            assert_eq!(outcome.deaths, 0, "false deaths over {targets} targets x {LOSS_SIM_SECS} s: {outcome:?}");
            assert_eq!(outcome.alive, targets, "each target came alive once: {outcome:?}");
            assert_eq!(outcome.primary_lost, 0, "no NCU lost its primary: {outcome:?}");
            assert!(outcome.dropped > 0 && stats.reprobes > 0, "loss was exercised: {outcome:?}");
            assert_eq!(stats.stale, 0);
            let cycles = stats.pings - stats.reprobes;
            assert!(cycles >= targets as u64 * (LOSS_SIM_SECS - 1), "{outcome:?}");
        }
    }
}
