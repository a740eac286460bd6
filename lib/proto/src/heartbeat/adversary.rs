//! An adversarial heartbeat simulation: an on-path attacker replays, re-sources and forges heartbeats on a network that
//! loses, duplicates, delays and reorders them, and every event of the monitor is checked against the ground truth.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::monitor::{Event, Liveness, Monitor, Policy, Stats, TargetId};
use super::packet::{Kind, PACKET_LEN, Packet, decode, encode};
use super::sim::{Datagram, HBS, KEY, Sim, Tap, WRONG_KEY, addr, ms, plaintext};

/// Runs, each with its own seed: its own NCUs, outages, NAT rebindings, losses and attacks.
const SEEDS: u64 = 64;
/// Virtual time of each run.
const RUN: Duration = Duration::from_secs(30);
/// The end of each run without the attacker, in which everything that answers must be found live again.
const CALM: Duration = Duration::from_secs(10);
/// Independent loss of each datagram.
const LOSS: f64 = 0.02;
/// Independent probability that a datagram is delivered twice.
const DUPLICATE: f64 = 0.02;
/// Independent probability that a datagram is held up, and the most it is held up by: datagrams arrive out of order.
const STALL: (f64, Duration) = (0.02, Duration::from_millis(400));
/// The most a datagram is delayed on its way, before any stall.
const DELAY: Duration = Duration::from_millis(20);
/// How unlikely a count of false deaths above the allowance must be, were the losses the only cause.
const FALSE_DEATH_RISK: f64 = 1e-6;

#[test]
fn an_on_path_attacker_neither_publishes_a_victim_nor_kills_a_live_ncu() {
    let policy = Policy::default();
    let mut total = Tally::default();
    for seed in 0..SEEDS {
        total.add(World::new(seed, policy).run());
    }
    eprintln!("{total:#?}");
    // A probe goes unanswered if its ping or its pong is lost or held up (counted as lost, however short the stall);
    // a cycle is a false death only if all of its probes go unanswered.
    let answered = ((1.0 - LOSS) * (1.0 - STALL.0)).powi(2);
    let per_cycle = (1.0 - answered).powi(i32::from(policy.reprobes) + 1);
    let expected = total.cycles * per_cycle;
    let allowed = poisson_bound(expected, FALSE_DEATH_RISK);
    assert!(
        total.false_deaths.len() as u64 <= allowed,
        "{} false deaths (seed, target, when) over {:.0} cycles, {expected:.3} expected, {allowed} allowed: {:?}",
        total.false_deaths.len(),
        total.cycles,
        total.false_deaths
    );
    let attacks = total.attacks;
    assert!(
        attacks.replayed > 100 && attacks.resourced > 100 && attacks.forged > 100 && attacks.flipped > 100,
        "every attack, often: {attacks:?}"
    );
    assert!(attacks.hellos_resourced > 50 && attacks.hellos_forged > 50, "{attacks:?}");
    let stats = total.stats;
    assert!(stats.forged > 100 && stats.stale > 100 && stats.unproven > 100 && stats.malformed > 0, "{stats:?}");
    assert!(total.foreign_pings > 0, "claimed addresses were put to the test: {total:?}");
    assert!(total.ncu_forged > 10, "flipped pings were refused by the NCUs: {total:?}");
    assert!(total.alive_checked > 500 && total.moves > 10, "{total:?}");
    assert!(total.deaths_on_schedule > 20 && total.rebinds > 20 && total.comebacks > 10, "{total:?}");
}

/// The smallest `k` such that a Poisson variable of mean `mean` exceeds `k` with probability below `risk`.
fn poisson_bound(mean: f64, risk: f64) -> u64 {
    let mut term = (-mean).exp();
    let mut below = term;
    let mut k = 0;
    while 1.0 - below >= risk {
        k += 1;
        term *= mean / k as f64;
        below += term;
    }
    k
}

/// What runs saw.
#[derive(Debug, Default)]
struct Tally {
    /// Probe cycles of targets whose NCU was answering.
    cycles: f64,
    /// Deaths, after their first proof, of targets whose NCU was answering at its address: (seed, target, when).
    false_deaths: Vec<(u64, TargetId, Duration)>,
    /// Deaths of NAT uplinks not yet found: their first hello was lost, or a copy from elsewhere beat it.
    first_contact_deaths: u64,
    /// `Alive` events checked against the ping they answer.
    alive_checked: u64,
    /// `Alive` events of a target whose published address changed.
    moves: u64,
    /// Targets of a silenced NCU declared dead in time.
    deaths_on_schedule: u64,
    /// Targets of an NCU back from an outage that came alive again.
    comebacks: u64,
    /// NAT mappings moved.
    rebinds: u64,
    /// Pings the monitor sent to an address of no NCU of that target, nor the one registered.
    foreign_pings: u64,
    attacks: Attacks,
    stats: Stats,
    /// Pings the NCUs refused as forged.
    ncu_forged: u64,
}

impl Tally {
    fn add(&mut self, run: Tally) {
        self.cycles += run.cycles;
        self.false_deaths.extend(run.false_deaths);
        self.first_contact_deaths += run.first_contact_deaths;
        self.alive_checked += run.alive_checked;
        self.moves += run.moves;
        self.deaths_on_schedule += run.deaths_on_schedule;
        self.comebacks += run.comebacks;
        self.rebinds += run.rebinds;
        self.foreign_pings += run.foreign_pings;
        let (sum, one) = (&mut self.attacks, run.attacks);
        sum.replayed += one.replayed;
        sum.resourced += one.resourced;
        sum.forged += one.forged;
        sum.flipped += one.flipped;
        sum.hellos_resourced += one.hellos_resourced;
        sum.hellos_forged += one.hellos_forged;
        sum.claims += one.claims;
        let (sum, one) = (&mut self.stats, run.stats);
        sum.forged += one.forged;
        sum.stale += one.stale;
        sum.malformed += one.malformed;
        sum.unknown += one.unknown;
        sum.pings += one.pings;
        sum.reprobes += one.reprobes;
        sum.pongs += one.pongs;
        sum.unproven += one.unproven;
        sum.hellos += one.hellos;
        self.ncu_forged += run.ncu_forged;
    }
}

/// What the attacker sent.
#[derive(Debug, Default, Clone, Copy)]
struct Attacks {
    /// Genuine pings, pongs and hellos sent again later, from their own source.
    replayed: u64,
    /// Genuine pongs sent again from a victim's address.
    resourced: u64,
    /// Pongs made with a wrong key.
    forged: u64,
    /// Genuine datagrams with a bit flipped.
    flipped: u64,
    /// Genuine hellos sent again from a victim's address.
    hellos_resourced: u64,
    /// Hellos made with a wrong key, claiming a victim's address.
    hellos_forged: u64,
    /// Authentic datagrams sent from an address their NCU does not have: each may cost the monitor some pings.
    claims: u64,
}

/// How an NCU uplink is wired to the Internet.
#[derive(Debug, Clone, Copy)]
enum Wiring {
    /// Reached at, and sending from, one public address.
    Direct,
    /// Behind NAT: registered with a private address nobody can reach; reached at its mapping, which it sends from.
    Nat,
    /// Reached at its address, but its replies leave from another one (which reaches it too).
    Asymmetric,
}

/// The ground truth about one watched uplink.
struct Watched {
    ncu: usize,
    session: u64,
    uplink: u8,
    /// The address the monitor was given, and pinged first.
    registered: SocketAddr,
    /// Every address a ping could ever reach this uplink at.
    reachable: BTreeSet<SocketAddr>,
    /// The addresses a ping reaches it at now.
    current: BTreeSet<SocketAddr>,
    /// The monitor's `Alive` (with the address) and `Dead` (None) events, with their offsets.
    log: Vec<(Duration, Option<SocketAddr>)>,
}

/// Something the run does at a set offset.
#[derive(Debug, Clone, Copy)]
enum Action {
    /// An NCU's links go down (everything to and from it is lost), for good or until `Action::Restore`.
    Silence(usize),
    /// An NCU's links come back.
    Restore(usize),
    /// An uplink's NAT mapping moves to a new port.
    Rebind(usize, u8),
}

/// An outage of an NCU: from, until (None: for good), and the liveness of each of its targets when it started.
struct Outage {
    ncu: usize,
    from: Duration,
    until: Option<Duration>,
    before: Vec<(TargetId, Option<Liveness>)>,
}

/// A ping the monitor sent.
#[derive(Debug, Clone, Copy)]
struct SentPing {
    at: Instant,
    dest: SocketAddr,
    nonce: [u8; 16],
}

/// One run: the simulated network, the attacker on it, and the checks.
struct World {
    seed: u64,
    policy: Policy,
    sim: Sim,
    /// The attacker's and the scenario's randomness (the network has its own).
    rng: StdRng,
    targets: BTreeMap<TargetId, Watched>,
    by_uplink: HashMap<(u64, u8), TargetId>,
    /// Every address of every uplink, with its NCU: the victims.
    addresses: Vec<(usize, SocketAddr)>,
    /// The monitor's pings by (session, uplink, seq).
    pings: HashMap<(u64, u8, u64), SentPing>,
    schedule: Vec<(Duration, Action)>,
    outages: Vec<Outage>,
    /// When each uplink's mapping moved.
    rebinds: Vec<(TargetId, Duration)>,
    tally: Tally,
}

impl World {
    /// Builds a random set of NCUs and a schedule of outages and NAT rebindings.
    fn new(seed: u64, policy: Policy) -> Self {
        let mut sim = Sim::new(seed);
        sim.monitor = Monitor::new(policy);
        sim.record = false;
        sim.loss = LOSS;
        sim.duplicate = DUPLICATE;
        sim.stall = STALL;
        sim.to_ncu_delay = (ms(0), DELAY);
        sim.to_hbs_delay = (ms(0), DELAY);
        sim.tap = Some(Tap::default());
        let mut world = Self {
            seed,
            policy,
            sim,
            rng: StdRng::seed_from_u64(0xadd5_0000 + seed),
            targets: BTreeMap::new(),
            by_uplink: HashMap::new(),
            addresses: Vec::new(),
            pings: HashMap::new(),
            schedule: Vec::new(),
            outages: Vec::new(),
            rebinds: Vec::new(),
            tally: Tally::default(),
        };
        for index in 0..world.rng.random_range(5..=8usize) {
            world.add_ncu(index);
        }
        world.plan();
        world
    }

    /// Adds NCU `index` with one to three uplinks, each wired its own way, every uplink watched.
    fn add_ncu(&mut self, index: usize) {
        let session = 1_000 + index as u64;
        let mut links = Vec::new();
        for uplink in 0..self.rng.random_range(1..=3u8) {
            let wiring = match self.rng.random_range(0..3) {
                0 => Wiring::Direct,
                1 => Wiring::Nat,
                _ => Wiring::Asymmetric,
            };
            let host = format!("{index}.{}", uplink + 1);
            let (listen, source) = match wiring {
                Wiring::Direct => (format!("100.64.{host}:5000"), format!("100.64.{host}:5000")),
                Wiring::Nat => (format!("192.168.{host}:5000"), format!("100.65.{host}:40000")),
                Wiring::Asymmetric => (format!("100.64.{host}:5000"), format!("100.66.{host}:5000")),
            };
            links.push((uplink, wiring, listen, source));
        }
        let borrowed: Vec<(u8, &str, &str)> =
            links.iter().map(|(uplink, _, listen, source)| (*uplink, listen.as_str(), source.as_str())).collect();
        let ncu = self.sim.add_ncu(session, &borrowed);
        for (uplink, wiring, listen, source) in links {
            let (listen, source) = (addr(&listen), addr(&source));
            let reachable: BTreeSet<SocketAddr> = match wiring {
                Wiring::Direct => [listen].into(),
                Wiring::Nat => {
                    self.sim.unroute(listen);
                    [source].into()
                }
                Wiring::Asymmetric => [listen, source].into(),
            };
            self.addresses.extend([(ncu, listen), (ncu, source)]);
            let id = TargetId::try_from(ncu * 10 + usize::from(uplink)).expect("small");
            self.sim.watch(id, ncu, uplink, None, Liveness::Pending);
            let current = reachable.clone();
            let watched = Watched { ncu, session, uplink, registered: listen, reachable, current, log: Vec::new() };
            self.targets.insert(id, watched);
            self.by_uplink.insert((session, uplink), id);
        }
    }

    /// Plans one or two outages (half of them for good) and moves half of the NAT mappings.
    fn plan(&mut self) {
        let ncus = self.sim.ncus.len();
        let first = self.rng.random_range(0..ncus);
        let mut silenced = vec![first];
        if self.rng.random_bool(0.5) {
            silenced.push((first + self.rng.random_range(1..ncus)) % ncus);
        }
        for ncu in silenced {
            let from = ms(self.rng.random_range(6_000..18_000));
            self.schedule.push((from, Action::Silence(ncu)));
            if self.rng.random_bool(0.5) {
                let until = from + ms(self.rng.random_range(1_500..6_000));
                self.schedule.push((until, Action::Restore(ncu)));
            }
        }
        let nat: Vec<(usize, u8)> = self
            .targets
            .values()
            .filter(|watched| !watched.reachable.contains(&watched.registered))
            .map(|watched| (watched.ncu, watched.uplink))
            .collect();
        for (ncu, uplink) in nat {
            if self.rng.random_bool(0.5) {
                self.schedule.push((ms(self.rng.random_range(4_000..16_000)), Action::Rebind(ncu, uplink)));
            }
        }
        self.schedule.sort_by_key(|(at, _)| *at);
    }

    /// Runs the schedule, checking every event as it comes, then what the run as a whole must show.
    fn run(mut self) -> Tally {
        for (at, action) in std::mem::take(&mut self.schedule) {
            self.advance(at);
            self.apply(action, at);
        }
        self.advance(RUN);
        self.check_outages();
        self.check_deaths();
        self.check_end();
        // A claimed address is pinged at once, then with the probes left in its cycle (or in the next one).
        let per_claim = u64::from(self.policy.reprobes) + 2;
        assert!(
            self.tally.foreign_pings <= self.tally.attacks.claims * per_claim,
            "seed {}: {} pings to addresses of no NCU of theirs, for {} claims",
            self.seed,
            self.tally.foreign_pings,
            self.tally.attacks.claims
        );
        self.tally.stats = self.sim.monitor.stats();
        self.tally.ncu_forged = self.sim.ncus.iter().map(|ncu| ncu.responder.stats().forged).sum();
        self.tally
    }

    /// Runs the network until `offset`, the attacker and the checks seeing each instant as it is handled.
    fn advance(&mut self, offset: Duration) {
        while self.sim.step_until(offset) {
            self.observe();
        }
        self.observe();
    }

    fn apply(&mut self, action: Action, at: Duration) {
        match action {
            Action::Silence(ncu) => {
                self.sim.ncus[ncu].silent = true;
                let before = self
                    .targets
                    .iter()
                    .filter(|(_, watched)| watched.ncu == ncu)
                    .map(|(&id, _)| (id, self.sim.monitor.liveness(id)))
                    .collect();
                self.outages.push(Outage { ncu, from: at, until: None, before });
            }
            Action::Restore(ncu) => {
                self.sim.ncus[ncu].silent = false;
                let outage = self.outages.iter_mut().rev().find(|outage| outage.ncu == ncu).expect("silenced first");
                outage.until = Some(at);
            }
            Action::Rebind(ncu, uplink) => {
                let (&id, watched) = self
                    .targets
                    .iter_mut()
                    .find(|(_, watched)| (watched.ncu, watched.uplink) == (ncu, uplink))
                    .expect("a watched uplink");
                let mut source = *watched.current.first().expect("reachable");
                source.set_port(40_000 + u16::try_from(watched.reachable.len()).expect("few"));
                self.sim.set_source(ncu, uplink, source);
                watched.reachable.insert(source);
                watched.current = [source].into();
                self.addresses.push((ncu, source));
                self.rebinds.push((id, at));
                self.tally.rebinds += 1;
            }
        }
    }

    /// Lets the attacker see what was sent, and checks what the monitor reported.
    fn observe(&mut self) {
        let Some(tap) = &mut self.sim.tap else { return };
        let sent = std::mem::take(&mut tap.sent);
        let events = std::mem::take(&mut tap.events);
        for (at, datagram) in sent {
            if datagram.from == HBS {
                self.record_ping(at, &datagram);
            }
            if at - self.sim.base < RUN - CALM {
                self.attack(&datagram);
            }
        }
        for (at, event, cause) in events {
            self.check_event(at, &event, cause.as_ref());
        }
    }

    fn record_ping(&mut self, at: Instant, datagram: &Datagram) {
        let ping = decode(&datagram.payload, &KEY).expect("the monitor's pings are authentic");
        let sent = SentPing { at, dest: datagram.to, nonce: ping.nonce };
        let previous = self.pings.insert((ping.session, ping.uplink, ping.seq), sent);
        assert!(previous.is_none(), "seed {}: a ping seq used twice: {ping:?}", self.seed);
        let watched = &self.targets[&self.by_uplink[&(ping.session, ping.uplink)]];
        if !watched.reachable.contains(&datagram.to) && watched.registered != datagram.to {
            self.tally.foreign_pings += 1;
        }
    }

    /// What the attacker does with a datagram it saw sent: copies ahead of it (racing) or long after it, from its
    /// source or from a victim's address, with a bit flipped, or forged with a wrong key.
    fn attack(&mut self, datagram: &Datagram) {
        let seen = plaintext(&datagram.payload);
        let Some(&id) = self.by_uplink.get(&(seen.session, seen.uplink)) else { return };
        let racing = ms(0)..=ms(2);
        match seen.kind {
            Kind::Ping => {
                if self.rng.random_bool(0.04) {
                    // Answers for the NCU, without its key, from the address pinged.
                    let forged = encode(&Packet { kind: Kind::Pong, load: 99, ..seen }, &WRONG_KEY);
                    self.inject(datagram.to, HBS, forged, racing.clone());
                    self.tally.attacks.forged += 1;
                }
                if self.rng.random_bool(0.02) {
                    let victim = self.victim(id);
                    let forged = encode(&Packet { kind: Kind::Pong, load: 99, ..seen }, &WRONG_KEY);
                    self.inject(victim, HBS, forged, racing.clone());
                    self.tally.attacks.forged += 1;
                }
                if self.rng.random_bool(0.03) {
                    // The NCU answers a replayed ping: its pong is authentic, and stale.
                    self.inject(datagram.from, datagram.to, datagram.payload, ms(200)..=ms(3_000));
                    self.tally.attacks.replayed += 1;
                }
                if self.rng.random_bool(0.03) {
                    let flipped = self.flip(&datagram.payload);
                    self.inject(datagram.from, datagram.to, flipped, racing);
                    self.tally.attacks.flipped += 1;
                }
            }
            Kind::Pong => {
                if self.rng.random_bool(0.05) {
                    self.inject(datagram.from, HBS, datagram.payload, ms(200)..=ms(5_000));
                    self.tally.attacks.replayed += 1;
                }
                if self.rng.random_bool(0.1) {
                    let victim = self.victim(id);
                    let delay = if self.rng.random_bool(0.7) { racing.clone() } else { ms(50)..=ms(3_000) };
                    self.inject(victim, HBS, datagram.payload, delay);
                    self.tally.attacks.resourced += 1;
                    self.tally.attacks.claims += 1;
                }
                if self.rng.random_bool(0.05) {
                    let flipped = self.flip(&datagram.payload);
                    let from = if self.rng.random_bool(0.5) { datagram.from } else { self.victim(id) };
                    self.inject(from, HBS, flipped, racing);
                    self.tally.attacks.flipped += 1;
                }
            }
            Kind::Hello => {
                if self.rng.random_bool(0.5) {
                    let victim = self.victim(id);
                    let delay = if self.rng.random_bool(0.7) { racing.clone() } else { ms(50)..=ms(3_000) };
                    self.inject(victim, HBS, datagram.payload, delay);
                    self.tally.attacks.hellos_resourced += 1;
                    self.tally.attacks.claims += 1;
                }
                if self.rng.random_bool(0.3) {
                    let victim = self.victim(id);
                    let forged = encode(&Packet { seq: seen.seq + 1_000_000, ..seen }, &WRONG_KEY);
                    self.inject(victim, HBS, forged, racing.clone());
                    self.tally.attacks.hellos_forged += 1;
                }
                if self.rng.random_bool(0.3) {
                    self.inject(datagram.from, HBS, datagram.payload, ms(500)..=ms(5_000));
                    self.tally.attacks.replayed += 1;
                }
                if self.rng.random_bool(0.2) {
                    let flipped = self.flip(&datagram.payload);
                    self.inject(datagram.from, HBS, flipped, racing);
                    self.tally.attacks.flipped += 1;
                }
            }
        }
    }

    /// An address that is not target `id`'s: nobody's, another NCU's, or another uplink's of the same NCU.
    fn victim(&mut self, id: TargetId) -> SocketAddr {
        let watched = &self.targets[&id];
        loop {
            let victim = match self.rng.random_range(0..3) {
                0 => addr(&format!("198.51.100.{}:5000", self.rng.random_range(1..=20))),
                1 => self.addresses[self.rng.random_range(0..self.addresses.len())].1,
                _ => {
                    let own: Vec<SocketAddr> = self
                        .addresses
                        .iter()
                        .filter(|(ncu, _)| *ncu == watched.ncu)
                        .map(|(_, address)| *address)
                        .collect();
                    own[self.rng.random_range(0..own.len())]
                }
            };
            if !watched.reachable.contains(&victim) && victim != watched.registered {
                return victim;
            }
        }
    }

    /// A copy of `payload` with one random bit flipped.
    fn flip(&mut self, payload: &[u8; PACKET_LEN]) -> [u8; PACKET_LEN] {
        let mut flipped = *payload;
        let bit = self.rng.random_range(0..PACKET_LEN * 8);
        flipped[bit / 8] ^= 1 << (bit % 8);
        flipped
    }

    fn inject(&mut self, from: SocketAddr, to: SocketAddr, payload: [u8; PACKET_LEN], delay: RangeInclusive<Duration>) {
        let at = self.sim.now + self.rng.random_range(delay);
        self.sim.inject(Datagram { from, to, payload }, at);
    }

    /// Every `Alive` names an address of the target's own uplink that answered a ping sent to that very address,
    /// within a probe's lifetime (one interval).
    fn check_event(&mut self, at: Instant, event: &Event, cause: Option<&Datagram>) {
        let offset = at - self.sim.base;
        match *event {
            Event::Alive { id, observed, .. } => {
                let watched = self.targets.get_mut(&id).expect("a watched target");
                let context = format!("seed {}, {offset:?}: {event:?}", self.seed);
                assert!(
                    watched.reachable.contains(&observed),
                    "{context}: published a victim's address (the target is reached at {:?})",
                    watched.reachable
                );
                let cause = cause.unwrap_or_else(|| panic!("{context}: published on a deadline"));
                let pong = decode(&cause.payload, &KEY).unwrap_or_else(|error| panic!("{context}: on {error:?}"));
                assert_eq!((pong.kind, pong.session, pong.uplink), (Kind::Pong, watched.session, watched.uplink));
                assert_eq!(cause.from, observed, "{context}: published another address than the pong's source");
                let &SentPing { at: sent, dest, nonce } = self
                    .pings
                    .get(&(pong.session, pong.uplink, pong.seq))
                    .unwrap_or_else(|| panic!("{context}: no ping of seq {}", pong.seq));
                assert_eq!(nonce, pong.nonce, "{context}: the pong does not echo its ping");
                assert_eq!(
                    dest, observed,
                    "{context}: the pong answers a ping to {dest}, not to the address published"
                );
                assert!(at - sent <= self.policy.interval, "{context}: the ping was sent {:?} before", at - sent);
                if watched.log.iter().rev().find_map(|(_, event)| *event).is_some_and(|last| last != observed) {
                    self.tally.moves += 1;
                }
                watched.log.push((offset, Some(observed)));
                self.tally.alive_checked += 1;
            }
            Event::Dead { id } => {
                self.targets.get_mut(&id).expect("a watched target").log.push((offset, None));
            }
            Event::Load { .. } => {}
        }
    }

    /// How long after its NCU goes silent a target can stay live: the next ping is due within an interval of the
    /// last answered one, then its reply timeout and re-probes run out.
    fn death_bound(&self) -> Duration {
        let policy = &self.policy;
        policy.interval + policy.reply_timeout + policy.reprobe_interval * u32::from(policy.reprobes)
    }

    /// A silenced NCU's targets are declared dead within the bound and stay dead while it is silent (once the pongs
    /// it sent before are past their probes' lifetime, an interval); an NCU that comes back is live again.
    fn check_outages(&mut self) {
        let bound = self.death_bound();
        for outage in &self.outages {
            let until = outage.until.unwrap_or(RUN);
            for &(id, before) in &outage.before {
                let log = &self.targets[&id].log;
                let context =
                    format!("seed {}: target {id}, NCU silent from {:?} to {until:?}", self.seed, outage.from);
                if before != Some(Liveness::Dead) {
                    let death = log.iter().find(|(at, event)| *at > outage.from && event.is_none());
                    let &(death, _) = death.unwrap_or_else(|| panic!("{context}: never declared dead ({log:?})"));
                    assert!(death <= outage.from + bound, "{context}: dead only at {death:?} ({log:?})");
                    self.tally.deaths_on_schedule += 1;
                }
                let state = log.iter().rev().find(|(at, _)| *at <= until).map(|(_, event)| *event);
                assert_eq!(state, Some(None), "{context}: not dead at the end of the outage ({log:?})");
                let late = outage.from + self.policy.interval;
                let revived = log.iter().find(|(at, event)| *at > late && *at <= until && event.is_some());
                assert_eq!(revived, None, "{context}: alive while silent ({log:?})");
                if outage.until.is_some() {
                    let back = log.iter().any(|(at, event)| *at > until && event.is_some());
                    assert!(back, "{context}: never came back ({log:?})");
                    self.tally.comebacks += 1;
                }
            }
        }
    }

    /// Counts the deaths no outage or NAT rebinding explains (but for NAT uplinks not found yet), and the cycles
    /// that could have had one.
    fn check_deaths(&mut self) {
        let bound = self.death_bound();
        for (&id, watched) in &self.targets {
            let outages: Vec<(Duration, Duration)> = self
                .outages
                .iter()
                .filter(|outage| outage.ncu == watched.ncu)
                .map(|outage| (outage.from, outage.until.unwrap_or(RUN)))
                .collect();
            let answering = RUN - outages.iter().map(|&(from, until)| until - from).sum::<Duration>();
            self.tally.cycles += answering.as_secs_f64() / self.policy.interval.as_secs_f64();
            let found = watched.log.iter().find(|(_, event)| event.is_some()).map(|(at, _)| *at);
            let nat = !watched.reachable.contains(&watched.registered);
            for &(at, event) in &watched.log {
                if event.is_some() {
                    continue;
                }
                let silent = outages.iter().any(|&(from, until)| at > from && at <= until + bound);
                let rebound =
                    self.rebinds.iter().any(|&(target, when)| target == id && at > when && at <= when + bound);
                if silent || rebound {
                    continue;
                }
                if nat && found.is_none_or(|found| at < found) {
                    self.tally.first_contact_deaths += 1;
                } else {
                    self.tally.false_deaths.push((self.seed, id, at));
                }
            }
        }
    }

    /// After the calm, every target whose NCU answers is live, at an address it is reached at now.
    fn check_end(&self) {
        for (&id, watched) in &self.targets {
            if self.outages.iter().any(|outage| outage.ncu == watched.ncu && outage.until.is_none()) {
                continue;
            }
            let context = format!("seed {}: target {id} at the end", self.seed);
            assert_eq!(self.sim.monitor.liveness(id), Some(Liveness::Live), "{context}: {:?}", watched.log);
            let last = watched.log.iter().rev().find_map(|(_, event)| *event);
            let last = last.unwrap_or_else(|| panic!("{context}: never alive"));
            assert!(watched.current.contains(&last), "{context}: published {last}, reached at {:?}", watched.current);
        }
    }
}
