//! The HBS side: pings every registered address, re-probes on silence, and declares addresses alive or dead.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngCore;

use super::packet::{self, Key, Keyed, Kind, PACKET_LEN, Packet, PacketError};

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
    /// Probes sent: pings and re-probes.
    pub pings: u64,
    /// Re-probes sent (included in `pings`).
    pub reprobes: u64,
    /// Pongs accepted as proof of life.
    pub pongs: u64,
    /// Hellos accepted.
    pub hellos: u64,
}

/// The sans-IO heartbeat monitor of one HBS.
pub struct Monitor {
    policy: Policy,
    targets: HashMap<TargetId, Target>,
    by_uplink: HashMap<(u64, u8), TargetId>,
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
        Self {
            policy,
            targets: HashMap::new(),
            by_uplink: HashMap::new(),
            last_first_ping: None,
            out: Output {
                timers: Wheel::new(policy),
                due: Vec::new(),
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                stats: Stats::default(),
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
        let same_uplink = self.by_uplink.get(&(session, uplink)).copied();
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
        let mut target = Target {
            session,
            uplink,
            keyed: packet::keyed(&key),
            dest,
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
        };
        self.out.schedule(&mut target, id, first_ping);
        self.targets.insert(id, target);
        self.by_uplink.insert((session, uplink), id);
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
            if let Some(id) = self.by_uplink.get(&(session, uplink)).copied() {
                self.remove_target(id);
            }
        }
        self.out.timers.settle();
    }

    /// What the monitor believes about a target, if it watches it.
    pub fn liveness(&self, id: TargetId) -> Option<Liveness> {
        self.targets.get(&id).map(|target| target.liveness)
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
        let Some(&id) = self.by_uplink.get(&(session, uplink)) else {
            stats.unknown += 1;
            tracing::trace!(session, uplink, "heartbeat for an unknown target");
            return;
        };
        let Some(target) = self.targets.get_mut(&id) else {
            stats.unknown += 1;
            return;
        };
        let packet = match packet::decode_with(bytes, &target.keyed) {
            Ok(packet) => packet,
            Err(PacketError::BadMac) => {
                stats.forged += 1;
                tracing::debug!(id, %from, "heartbeat failed authentication");
                return;
            }
            Err(PacketError::Malformed) => {
                stats.malformed += 1;
                return;
            }
        };
        match kind {
            Kind::Pong => target.on_pong(id, &packet, from, now, &self.policy, &mut self.out),
            Kind::Hello => target.on_hello(id, &packet, from, now, &self.policy, &mut self.out.stats),
            Kind::Ping => {}
        }
        self.out.timers.settle();
    }

    /// Sends due pings/re-probes (nonces from `rng`), declares deaths.
    pub fn handle_timeout(&mut self, now: Instant, rng: &mut impl RngCore) {
        let mut due = std::mem::take(&mut self.out.due);
        loop {
            self.out.timers.take_due(now, &mut due);
            if due.is_empty() {
                break;
            }
            for entry in &due {
                let Some(target) = self.targets.get_mut(&entry.id) else { continue };
                target.timer = None;
                target.on_deadline(entry.id, entry.deadline, now, &self.policy, rng, &mut self.out);
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
        self.out.timers.next()
    }

    /// Counters since creation.
    pub fn stats(&self) -> Stats {
        self.out.stats
    }

    fn remove_target(&mut self, id: TargetId) -> Option<Target> {
        let mut target = self.targets.remove(&id)?;
        if let Some(place) = target.timer.take() {
            self.out.timers.cancel(place, id);
        }
        let key = (target.session, target.uplink);
        if self.by_uplink.get(&key) == Some(&id) {
            self.by_uplink.remove(&key);
        }
        Some(target)
    }
}

/// Everything a target's handlers write to, apart from the target itself.
struct Output {
    /// Every target's one deadline.
    timers: Wheel,
    /// The entries [`Monitor::handle_timeout`] is working through (kept for its allocation).
    due: Vec<Entry>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    stats: Stats,
}

impl Output {
    /// Makes `at` the target's only deadline.
    fn schedule(&mut self, target: &mut Target, id: TargetId, at: Instant) {
        if let Some(place) = target.timer.take() {
            self.timers.cancel(place, id);
        }
        target.timer = Some(self.timers.insert(at, id));
    }
}

/// A target's deadline on the [`Wheel`].
#[derive(Debug, Clone, Copy)]
struct Entry {
    deadline: Instant,
    id: TargetId,
    /// The millisecond (since the wheel's origin) whose slot holds it.
    tick: u64,
}

/// Where a deadline sits on the [`Wheel`]: its slot, and its index there (which only moves, rarely, when the slot
/// is compacted with deadlines of later turns in it; then it is searched for).
#[derive(Debug, Clone, Copy)]
struct Place {
    slot: usize,
    index: usize,
}

/// The deadlines of every target, one each, in slots of one millisecond on a wheel that spans at least twice a
/// probe cycle (a deadline further out waits in its slot for later turns of the wheel).
///
/// A binary heap of 100,000 deadlines, rescheduled twice a cycle each, spends most of its time on cache misses; here
/// scheduling is a push onto the deadline's slot, cancelling marks the entry where it is (the target knows), and the
/// next deadline is cached, recomputed from the first slot with anything in it when it is taken or cancelled.
struct Wheel {
    /// The instant of tick 0: the first deadline ever scheduled.
    origin: Option<Instant>,
    slots: Vec<Vec<Entry>>,
    /// `slots.len() - 1` (a power of two).
    mask: u64,
    /// Every tick before this one has been emptied of due entries; no entry's tick is earlier.
    cursor: u64,
    len: usize,
    /// The earliest deadline, unless `stale`; never later than it.
    next: Option<Instant>,
    stale: bool,
    /// When `stale` only because entries at `next` were cancelled, from this slot: where to look for another.
    hint: Option<usize>,
}

impl Wheel {
    /// The id of a cancelled or taken entry, left in its slot until the cursor passes it.
    const GONE: TargetId = TargetId::MIN;
    /// The fewest and most slots a wheel has.
    const SLOTS: (usize, usize) = (1 << 10, 1 << 16);

    fn new(policy: Policy) -> Self {
        let cycle = policy.interval
            + policy.reply_timeout
            + policy.reprobe_interval.saturating_mul(u32::from(policy.reprobes) + 1);
        let wanted = usize::try_from(cycle.as_millis().saturating_mul(2)).unwrap_or(usize::MAX);
        let slots = wanted.clamp(Self::SLOTS.0, Self::SLOTS.1).next_power_of_two();
        Self {
            origin: None,
            slots: vec![Vec::new(); slots],
            mask: slots as u64 - 1,
            cursor: 0,
            len: 0,
            next: None,
            stale: false,
            hint: None,
        }
    }

    fn tick(origin: Instant, at: Instant) -> u64 {
        let since = at.saturating_duration_since(origin);
        since.as_secs().saturating_mul(1_000).saturating_add(u64::from(since.subsec_millis()))
    }

    fn slot(&self, tick: u64) -> usize {
        (tick & self.mask) as usize
    }

    /// Adds a deadline; returns its place, which [`Wheel::cancel`] needs.
    fn insert(&mut self, at: Instant, id: TargetId) -> Place {
        let origin = *self.origin.get_or_insert(at);
        // A deadline already past is due at the next look, like any other in the cursor's tick.
        let tick = Self::tick(origin, at).max(self.cursor);
        let slot = self.slot(tick);
        let index = self.slots[slot].len();
        self.slots[slot].push(Entry { deadline: at, id, tick });
        self.len += 1;
        // Every other entry is at `next` or later, so an earlier one is the earliest, stale or not.
        if self.next.is_none_or(|next| at < next) {
            self.next = Some(at);
            self.stale = false;
            self.hint = None;
        }
        Place { slot, index }
    }

    /// Removes a target's deadline.
    fn cancel(&mut self, place: Place, id: TargetId) {
        let slot = place.slot;
        let entries = &mut self.slots[slot];
        let index = if entries.get(place.index).is_some_and(|entry| entry.id == id) {
            place.index
        } else {
            let Some(index) = entries.iter().position(|entry| entry.id == id) else { return };
            index
        };
        let entry = entries[index];
        entries[index].id = Self::GONE;
        self.len -= 1;
        if self.next == Some(entry.deadline) {
            // Targets handled in one turn share their reply deadline: usually another is left at the same instant.
            self.hint = if self.stale && self.hint != Some(slot) { None } else { Some(slot) };
            self.stale = true;
        }
    }

    /// Moves into `due` the entries due at `now` of the earliest tick that has any, in (deadline, id) order;
    /// leaves it empty when nothing is due.
    fn take_due(&mut self, now: Instant, due: &mut Vec<Entry>) {
        due.clear();
        let Some(origin) = self.origin else { return };
        let now_tick = Self::tick(origin, now);
        loop {
            let tick = self.cursor;
            let slot = self.slot(tick);
            let entries = &mut self.slots[slot];
            for entry in entries.iter_mut() {
                if entry.id != Self::GONE && entry.tick == tick && entry.deadline <= now {
                    due.push(*entry);
                    entry.id = Self::GONE;
                }
            }
            if !due.is_empty() {
                self.len -= due.len();
                self.stale = true;
                self.hint = None;
                due.sort_unstable_by_key(|entry| (entry.deadline, entry.id));
                return;
            }
            if tick >= now_tick {
                return;
            }
            // Passed: only deadlines of later turns are left (usually none).
            entries.retain(|entry| entry.id != Self::GONE);
            self.cursor += 1;
        }
    }

    /// Brings the cached next deadline up to date.
    fn settle(&mut self) {
        if !self.stale {
            return;
        }
        let same = match (self.hint, self.next) {
            (Some(slot), Some(next)) => {
                self.slots[slot].iter().any(|entry| entry.id != Self::GONE && entry.deadline == next)
            }
            _ => false,
        };
        if !same {
            self.next = self.earliest();
        }
        self.stale = false;
        self.hint = None;
    }

    /// The earliest deadline as of the last [`Wheel::settle`].
    fn next(&self) -> Option<Instant> {
        self.next
    }

    fn earliest(&self) -> Option<Instant> {
        if self.len == 0 {
            return None;
        }
        for tick in self.cursor..=self.cursor + self.mask {
            let entries = &self.slots[self.slot(tick)];
            let earliest = entries
                .iter()
                .filter(|entry| entry.id != Self::GONE && entry.tick == tick)
                .map(|entry| entry.deadline)
                .min();
            if earliest.is_some() {
                return earliest;
            }
        }
        // Nothing within a turn of the wheel: only deadlines further out than its span.
        self.slots.iter().flatten().filter(|entry| entry.id != Self::GONE).map(|entry| entry.deadline).min()
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
    session: u64,
    uplink: u8,
    keyed: Keyed,
    dest: SocketAddr,
    liveness: Liveness,
    /// The source address last reported in an [`Event::Alive`] (or the destination, for a handover).
    observed: Option<SocketAddr>,
    /// Taken over live and not yet answered in this session.
    handover: Option<Handover>,
    reported_load: Option<u16>,
    load_reported_at: Option<Instant>,
    next_seq: u64,
    last_hello: Option<u64>,
    /// (seq, nonce) of the probes of the current cycle not yet answered.
    probes: Vec<(u64, [u8; 16])>,
    phase: Phase,
    reprobes_sent: u8,
    next_ping: Instant,
    /// Where its deadline is on the wheel; None only while the deadline is being handled.
    timer: Option<Place>,
}

impl Target {
    fn on_deadline(
        &mut self,
        id: TargetId,
        deadline: Instant,
        now: Instant,
        policy: &Policy,
        rng: &mut impl RngCore,
        out: &mut Output,
    ) {
        let late = now.saturating_duration_since(deadline);
        if late > policy.clock_jump {
            // The process stalled or the clock jumped: the missed windows say nothing about the target.
            tracing::debug!(id, ?late, "deadline handled late; restarting the probe cycle");
            self.start_cycle(id, now, now, policy, rng, out);
            return;
        }
        match self.phase {
            Phase::Waiting => {
                let anchor = if late < policy.interval { deadline } else { now };
                self.start_cycle(id, anchor, now, policy, rng, out);
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
                    self.send_probe(rng, out);
                    out.schedule(self, id, now + policy.reprobe_interval);
                    return;
                }
                if grace.is_some() {
                    tracing::debug!(id, "cycle after a handover unanswered; within the grace");
                } else if self.liveness != Liveness::Dead {
                    self.liveness = Liveness::Dead;
                    tracing::debug!(id, "target dead");
                    out.events.push_back(Event::Dead { id });
                }
                self.phase = Phase::Waiting;
                let next_ping = self.next_ping.max(now);
                out.schedule(self, id, next_ping);
            }
        }
    }

    /// Starts a cycle whose ping was due at `anchor`, sending it at `now`.
    fn start_cycle(
        &mut self,
        id: TargetId,
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
        self.send_probe(rng, out);
        out.schedule(self, id, now + policy.reply_timeout);
    }

    fn send_probe(&mut self, rng: &mut impl RngCore, out: &mut Output) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        self.probes.push((seq, nonce));
        let ping = Packet { kind: Kind::Ping, session: self.session, uplink: self.uplink, seq, nonce, load: 0 };
        out.transmits.push_back(Transmit { dest: self.dest, payload: packet::encode_with(&ping, &self.keyed) });
        out.stats.pings += 1;
    }

    fn on_pong(
        &mut self,
        id: TargetId,
        pong: &Packet,
        from: SocketAddr,
        now: Instant,
        policy: &Policy,
        out: &mut Output,
    ) {
        let Some(index) = self.probes.iter().position(|&(seq, nonce)| seq == pong.seq && nonce == pong.nonce) else {
            out.stats.stale += 1;
            tracing::trace!(id, seq = pong.seq, "stale pong");
            return;
        };
        self.probes.swap_remove(index);
        out.stats.pongs += 1;
        self.handover = None;
        if self.phase == Phase::Probing {
            self.phase = Phase::Waiting;
            let next_ping = self.next_ping.max(now);
            out.schedule(self, id, next_ping);
        }
        let load = pong.load.min(100);
        if self.liveness != Liveness::Live || self.observed != Some(from) {
            tracing::debug!(id, observed = %from, load, "target alive");
            self.liveness = Liveness::Live;
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

    fn report_load(&mut self, load: u16, now: Instant) {
        self.reported_load = Some(load);
        self.load_reported_at = Some(now);
    }

    fn on_hello(
        &mut self,
        id: TargetId,
        hello: &Packet,
        from: SocketAddr,
        now: Instant,
        policy: &Policy,
        stats: &mut Stats,
    ) {
        if self.last_hello.is_some_and(|last| hello.seq <= last) {
            stats.stale += 1;
            tracing::trace!(id, seq = hello.seq, "stale hello");
            return;
        }
        self.last_hello = Some(hello.seq);
        // The NCU holds the session's key now: the cycle under way (its re-probes get answered) and one more.
        if let Some(handover) = &mut self.handover {
            handover.until = handover.until.min(now + policy.interval);
            handover.key_shown = true;
        }
        if self.dest != from {
            tracing::debug!(id, dest = %from, "hello moved the ping destination");
        }
        self.dest = from;
        stats.hellos += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::{BTreeMap, BinaryHeap};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::heartbeat::packet::{decode, encode};
    use crate::heartbeat::responder::{Responder, ResponderEvent, ResponderPolicy};

    const KEY: Key = [3; 32];
    const WRONG_KEY: Key = [4; 32];

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The heartbeat address of the simulated HBS.
    const HBS: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(192, 0, 2, 1), 4500));

    #[derive(Debug, Clone)]
    struct Datagram {
        from: SocketAddr,
        to: SocketAddr,
        payload: [u8; PACKET_LEN],
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

    /// An NCU uplink: its datagrams leave from `source` (its NAT mapping); datagrams to `listen` or `source` reach it.
    struct Link {
        listen: SocketAddr,
        source: SocketAddr,
    }

    struct Ncu {
        session: u64,
        key: Key,
        responder: Responder,
        links: BTreeMap<u8, Link>,
        /// Drops everything sent to it.
        silent: bool,
        load: u16,
    }

    /// One monitor and some NCUs on a simulated network with loss and per-datagram delay, in virtual time.
    struct Sim {
        base: Instant,
        now: Instant,
        rng: StdRng,
        monitor: Monitor,
        ncus: Vec<Ncu>,
        routes: HashMap<SocketAddr, (usize, u8)>,
        wire: BinaryHeap<Reverse<Queued>>,
        sent: u64,
        ncu_timers: BinaryHeap<Reverse<(Instant, usize)>>,
        /// Independent loss probability of each datagram, in each direction.
        loss: f64,
        to_ncu_delay: (Duration, Duration),
        to_hbs_delay: (Duration, Duration),
        dropped: u64,
        /// An on-path attacker answering the pings a silent NCU misses, without the key.
        forger: bool,
        /// Keep `pings` and `delivered` (off for long runs).
        record: bool,
        pings: Vec<(Instant, Transmit)>,
        delivered: Vec<Datagram>,
        events: Vec<(Instant, Event)>,
        ncu_events: Vec<(Instant, ResponderEvent)>,
    }

    impl Sim {
        fn new(seed: u64) -> Self {
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
                loss: 0.0,
                to_ncu_delay: (ms(0), ms(20)),
                to_hbs_delay: (ms(0), ms(20)),
                dropped: 0,
                forger: false,
                record: true,
                pings: Vec::new(),
                delivered: Vec::new(),
                events: Vec::new(),
                ncu_events: Vec::new(),
            }
        }

        fn at(&self, offset: Duration) -> Instant {
            self.base + offset
        }

        /// Adds an NCU with uplinks (index, listen, source), answering session `session`.
        fn add_ncu(&mut self, session: u64, links: &[(u8, &str, &str)]) -> usize {
            let index = self.ncus.len();
            let mut responder = Responder::new(ResponderPolicy::default());
            let uplinks: Vec<u8> = links.iter().map(|link| link.0).collect();
            responder.set_session(session, KEY, HBS, &uplinks, self.now);
            let links = links
                .iter()
                .map(|&(uplink, listen, source)| (uplink, Link { listen: addr(listen), source: addr(source) }))
                .collect::<BTreeMap<_, _>>();
            for (&uplink, link) in &links {
                self.routes.insert(link.listen, (index, uplink));
                self.routes.insert(link.source, (index, uplink));
            }
            self.ncus.push(Ncu { session, key: KEY, responder, links, silent: false, load: 0 });
            self.pump_ncu(index);
            index
        }

        /// The NCU learns its session's key (the answer to its registration arrives): it answers that session now.
        fn give_key(&mut self, index: usize) {
            let ncu = &mut self.ncus[index];
            let uplinks: Vec<u8> = ncu.links.keys().copied().collect();
            ncu.responder.set_session(ncu.session, ncu.key, HBS, &uplinks, self.now);
            self.pump_ncu(index);
        }

        /// Has the monitor watch an NCU uplink as target `id`, pinging `dest` (by default the uplink's listen address).
        fn watch(&mut self, id: TargetId, ncu: usize, uplink: u8, dest: Option<SocketAddr>, initial: Liveness) {
            let ncu = &self.ncus[ncu];
            let dest = dest.unwrap_or(ncu.links[&uplink].listen);
            self.monitor.add(id, ncu.session, uplink, ncu.key, dest, initial, self.now);
        }

        fn run_until(&mut self, offset: Duration) {
            let end = self.at(offset);
            loop {
                let wire = self.wire.peek().map(|Reverse(queued)| queued.at);
                let ncus = self.ncu_timers.peek().map(|Reverse((at, _))| *at);
                let Some(next) = [wire, self.monitor.poll_timeout(), ncus].into_iter().flatten().min() else { break };
                if next > end {
                    break;
                }
                self.now = self.now.max(next);
                self.step();
            }
            self.now = self.now.max(end);
        }

        /// Moves an uplink's NAT mapping.
        fn set_source(&mut self, ncu: usize, uplink: u8, source: SocketAddr) {
            let link = self.ncus[ncu].links.get_mut(&uplink).expect("known uplink");
            if link.source != link.listen {
                self.routes.remove(&link.source);
            }
            link.source = source;
            self.routes.insert(source, (ncu, uplink));
        }

        /// Lets virtual time pass with nothing handled, as when the process is stalled or suspended.
        fn jump(&mut self, by: Duration) {
            self.now += by;
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
                self.pump_monitor();
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
                self.pump_monitor();
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

        fn pump_monitor(&mut self) {
            while let Some(transmit) = self.monitor.poll_transmit() {
                if self.record {
                    self.pings.push((self.now, transmit.clone()));
                }
                self.send(HBS, transmit.dest, transmit.payload);
            }
            while let Some(event) = self.monitor.poll_event() {
                self.events.push((self.now, event));
            }
        }

        fn pump_ncu(&mut self, index: usize) {
            while let Some(hello) = self.ncus[index].responder.poll_transmit() {
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
            if self.loss > 0.0 && self.rng.random_bool(self.loss) {
                self.dropped += 1;
                return;
            }
            let (low, high) = if to == HBS { self.to_hbs_delay } else { self.to_ncu_delay };
            let micros = |d: Duration| u64::try_from(d.as_micros()).expect("short delay");
            let delay = Duration::from_micros(self.rng.random_range(micros(low)..=micros(high)));
            self.sent += 1;
            self.wire.push(Reverse(Queued {
                at: self.now + delay,
                order: self.sent,
                datagram: Datagram { from, to, payload },
            }));
        }

        /// Events since `offset`, with times as offsets from the start.
        fn events_since(&self, offset: Duration) -> Vec<(Duration, Event)> {
            let since = self.at(offset);
            self.events
                .iter()
                .filter(|(at, _)| *at >= since)
                .map(|(at, event)| (*at - self.base, event.clone()))
                .collect()
        }

        /// The times (offsets) of pings to `dest` in `[from, to)`.
        fn ping_times(&self, dest: SocketAddr, from: Duration, to: Duration) -> Vec<Duration> {
            self.pings
                .iter()
                .map(|(at, transmit)| (*at - self.base, transmit.dest))
                .filter(|&(at, to_dest)| to_dest == dest && at >= from && at < to)
                .map(|(at, _)| at)
                .collect()
        }
    }

    /// The fields of a datagram as anyone on path can read them.
    fn plaintext(bytes: &[u8; PACKET_LEN]) -> Packet {
        let (kind, session, uplink) = packet::peek_header(bytes).expect("well formed");
        let mut seq = [0; 8];
        seq.copy_from_slice(&bytes[13..21]);
        let mut nonce = [0; 16];
        nonce.copy_from_slice(&bytes[21..37]);
        Packet { kind, session, uplink, seq: u64::from_be_bytes(seq), nonce, load: 0 }
    }

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
        assert_eq!((stats.pings, stats.reprobes, stats.pongs, stats.stale), (10, 0, 10, 0));
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
        // The first ping went to the registered address; the hello (sent at 0) redirected the first re-probe.
        assert_eq!(sim.ping_times(registered, ms(0), ms(3_000)), [ms(0)]);
        let events = sim.events_since(ms(0));
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].0 >= ms(100) && events[0].0 <= ms(140));
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

    /// The wheel against a sorted set: the same next deadline after every change, and entries taken in order.
    #[test]
    fn wheel_agrees_with_a_sorted_set() {
        use std::collections::BTreeSet;
        let mut rng = StdRng::seed_from_u64(19);
        let base = Instant::now();
        // A small span (1024 slots), so that deadlines up to 5 s out go round the wheel several times.
        let policy = Policy { interval: ms(10), reply_timeout: ms(1), reprobe_interval: ms(1), ..Policy::default() };
        let mut wheel = Wheel::new(policy);
        assert_eq!(wheel.slots.len(), 1024);
        let mut model: BTreeSet<(Instant, TargetId)> = BTreeSet::new();
        let mut slots: HashMap<TargetId, (Place, Instant)> = HashMap::new();
        let mut now = base;
        let mut due = Vec::new();
        let mut taken = 0;
        for _ in 0..20_000 {
            match rng.random_range(0..10) {
                0..5 => {
                    let id = rng.random_range(0..500);
                    // Half on whole milliseconds of a short range, so that many share a deadline.
                    let at = if rng.random_bool(0.5) {
                        now + Duration::from_micros(rng.random_range(0..5_000_000))
                    } else {
                        now + ms(rng.random_range(0..20))
                    };
                    if let Some((slot, old)) = slots.remove(&id) {
                        wheel.cancel(slot, id);
                        model.remove(&(old, id));
                    }
                    slots.insert(id, (wheel.insert(at, id), at));
                    model.insert((at, id));
                }
                5 => {
                    let id = rng.random_range(0..500);
                    if let Some((slot, old)) = slots.remove(&id) {
                        wheel.cancel(slot, id);
                        model.remove(&(old, id));
                    }
                }
                _ => {
                    now += Duration::from_micros(rng.random_range(0..300_000));
                    loop {
                        wheel.take_due(now, &mut due);
                        if due.is_empty() {
                            break;
                        }
                        for entry in &due {
                            let first = model.pop_first().expect("the model has it too");
                            assert_eq!((entry.deadline, entry.id), first);
                            slots.remove(&entry.id);
                            taken += 1;
                        }
                    }
                    assert!(model.first().is_none_or(|&(at, _)| at > now), "everything due was taken");
                }
            }
            wheel.settle();
            assert_eq!(wheel.next(), model.first().map(|&(at, _)| at));
            assert_eq!(wheel.len, model.len());
        }
        assert!(taken > 1_000, "{taken}");
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
        assert!(monitor.out.timers.slots.len() < 100_000, "the wheel is shorter than the interval");
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
