//! The NCU's control session as a sans-IO state machine: which heartbeat server to register with, when to move to
//! the backup, when to ask hds again and for a new backup, and the standby connection kept ready for a move. Inputs
//! carry an explicit `now`; [`Command`]s come out for the driver (`agent`) to carry out; [`Session::poll_timeout`]
//! says when to call [`Session::handle_timeout`]. No tokio, no sockets, no clock; the RNG is passed in.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use rand::Rng;
use tether_proto::hds::HeartbeatServer;

/// How long a registration over the standby connection may take. No handshake is at stake: a slow answer means a
/// server busy with a storm of moves, and giving up would only add a handshake to its queue. A dead server closes
/// the connection (idle timeout) before this.
pub const STANDBY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one new connection and registration with a heartbeat server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a move, an NCU asks hds for a new backup only once the move's storm is over: its peers, which noticed the
/// same server's silence within a second or so, have all registered within [`STANDBY_TIMEOUT`] (or given up on
/// their standby). Until then, the new server, hds and their shared Postgres are busy with the moves themselves.
pub const BACKUP_SETTLE: Duration = STANDBY_TIMEOUT;
/// ... and then after a further random delay below this, so that the requests reach hds as a few hundred
/// handshakes a second rather than as one burst of thousands. Should the new server fail meanwhile, the NCU simply
/// asks hds for a whole new assignment.
pub const BACKUP_SPREAD: Duration = Duration::from_secs(30);
/// While serving without a backup (or without a standby connection to it), how often to try again.
pub const BACKUP_RETRY: Duration = Duration::from_secs(30);
/// Pause after a failed registration before the next server is tried.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(200);
/// First wait after hds could not be asked (or had no server); it doubles up to [`HDS_MAX_BACKOFF`].
pub const HDS_FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between two questions to hds.
pub const HDS_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Ask hds for a primary and a backup, never one of `failed`; answer with [`Input::Assigned`] or
    /// [`Input::AssignFailed`].
    Assign {
        /// Servers found unreachable.
        failed: Vec<String>,
    },
    /// Register the uplinks with `server`, over the standby connection when it leads there (within
    /// [`STANDBY_TIMEOUT`]), else over a new one (within [`CONNECT_TIMEOUT`]); answer with [`Input::Registered`] or
    /// [`Input::RegisterFailed`].
    Register {
        /// Where.
        server: HeartbeatServer,
    },
    /// Close the current control session's connection.
    EndSession,
    /// Ask hds for a backup other than `except`; answer with [`Input::BackupFound`].
    FindBackup {
        /// The current server.
        except: String,
    },
    /// Open an idle connection to `server` (dropping any standby to another); answer with [`Input::StandbyUp`] or
    /// [`Input::StandbyDown`].
    Dial {
        /// The backup.
        server: HeartbeatServer,
    },
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// hds assigned a primary and maybe a backup.
    Assigned {
        /// Register here.
        primary: HeartbeatServer,
        /// Move here when the primary stops.
        backup: Option<HeartbeatServer>,
    },
    /// hds could not be reached or had no server for us (worth asking again).
    AssignFailed,
    /// The registration asked for succeeded.
    Registered,
    /// The registration asked for failed (unreachable, refused, timed out).
    RegisterFailed,
    /// Heartbeats from the current server stopped.
    PrimaryLost,
    /// The current control connection closed.
    Closed,
    /// The current server asked us to move.
    Drain,
    /// The answer to [`Command::FindBackup`]: a backup, or none yet.
    BackupFound(Option<HeartbeatServer>),
    /// The standby connection to this server is up.
    StandbyUp(String),
    /// The standby connection to this server could not be made, or closed.
    StandbyDown(String),
}

/// Where the session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for hds' answer.
    Assigning,
    /// hds failed; ask again at `at`.
    AssignAgain { at: Instant },
    /// Waiting for the outcome of a registration with `target`.
    Registering { target: HeartbeatServer, moved: bool },
    /// A registration failed; try `next` (or hds, when none) at `at`.
    TryNext { at: Instant, next: Option<HeartbeatServer> },
    /// Registered with `target`.
    Serving { target: HeartbeatServer },
}

/// The control session's policy.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    backup: Option<HeartbeatServer>,
    /// Servers found unreachable since the last successful registration.
    failed: Vec<String>,
    hds_backoff: Duration,
    /// The server a standby connection is up to.
    standby: Option<String>,
    /// A [`Command::FindBackup`] is outstanding.
    finding: bool,
    /// A [`Command::Dial`] is outstanding.
    dialing: bool,
    /// When to ask hds for a backup (after a move: once the storm is over).
    find_at: Option<Instant>,
    /// When to try again for a backup or a standby while serving.
    retry_at: Option<Instant>,
    commands: VecDeque<Command>,
}

impl Session {
    /// A session that starts by asking hds.
    pub fn new() -> Self {
        Self {
            phase: Phase::Assigning,
            backup: None,
            failed: Vec::new(),
            hds_backoff: HDS_FIRST_BACKOFF,
            standby: None,
            finding: false,
            dialing: false,
            find_at: None,
            retry_at: None,
            commands: VecDeque::from([Command::Assign { failed: Vec::new() }]),
        }
    }

    /// Feeds one input.
    pub fn handle(&mut self, input: Input, now: Instant, rng: &mut impl Rng) {
        match (input, &self.phase) {
            (Input::Assigned { primary, backup }, Phase::Assigning) => {
                self.hds_backoff = HDS_FIRST_BACKOFF;
                self.backup = backup;
                self.register(primary, false);
            }
            (Input::AssignFailed, Phase::Assigning) => {
                self.phase = Phase::AssignAgain { at: now + self.hds_backoff };
                self.hds_backoff = (self.hds_backoff * 2).min(HDS_MAX_BACKOFF);
            }
            (Input::Registered, Phase::Registering { target, moved }) => {
                let (target, moved) = (target.clone(), *moved);
                self.failed.clear();
                if self.backup.is_some() {
                    self.retry_at = Some(now + BACKUP_RETRY);
                    self.dial_backup();
                } else if moved {
                    // The periodic retry starts with the search.
                    self.find_at = Some(now + BACKUP_SETTLE + BACKUP_SPREAD.mul_f64(rng.random()));
                } else {
                    self.retry_at = Some(now + BACKUP_RETRY);
                    self.finding = true;
                    self.commands.push_back(Command::FindBackup { except: target.name.clone() });
                }
                self.phase = Phase::Serving { target };
            }
            (Input::RegisterFailed, Phase::Registering { target, .. }) => {
                self.failed.push(target.name.clone());
                self.phase = Phase::TryNext { at: now + RETRY_AFTER_FAILURE, next: self.backup.take() };
            }
            (Input::PrimaryLost | Input::Closed, Phase::Serving { target }) => {
                self.failed = vec![target.name.clone()];
                self.end_session();
                match self.backup.take() {
                    Some(backup) => self.register(backup, true),
                    None => self.assign(),
                }
            }
            (Input::Drain, Phase::Serving { .. }) => {
                self.end_session();
                self.backup = None;
                self.assign();
            }
            (Input::BackupFound(found), Phase::Serving { target }) if self.finding => {
                self.finding = false;
                if let Some(found) = found.filter(|found| found.name != target.name) {
                    self.backup = Some(found);
                    self.dial_backup();
                }
            }
            // Kept only while it leads to the backup being dialled; the driver drops any other.
            (Input::StandbyUp(server), _) if self.dialing && self.backup.as_ref().is_some_and(|b| b.name == server) => {
                self.dialing = false;
                self.standby = Some(server);
            }
            (Input::StandbyDown(server), phase) => {
                if self.standby.as_deref() == Some(server.as_str()) {
                    self.standby = None;
                    // A backup we cannot reach is no backup: ask hds for another at the next retry.
                    if matches!(phase, Phase::Serving { .. }) {
                        self.backup = None;
                    }
                } else if self.backup.as_ref().is_some_and(|b| b.name == server) {
                    self.dialing = false;
                }
            }
            // Late answers to what an earlier phase asked.
            _ => {}
        }
    }

    /// Acts on every deadline up to `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.phase {
            Phase::AssignAgain { at } if *at <= now => {
                self.phase = Phase::Assigning;
                self.commands.push_back(Command::Assign { failed: self.failed.clone() });
            }
            Phase::TryNext { at, next } if *at <= now => match next.clone() {
                Some(next) => self.register(next, true),
                None => self.assign(),
            },
            Phase::Serving { target } => {
                let except = target.name.clone();
                if self.find_at.is_some_and(|at| at <= now) {
                    self.find_at = None;
                    self.retry_at = Some(now + BACKUP_RETRY);
                    self.finding = true;
                    self.commands.push_back(Command::FindBackup { except: except.clone() });
                }
                if self.retry_at.is_some_and(|at| at <= now) {
                    self.retry_at = Some(now + BACKUP_RETRY);
                    if self.backup.is_none() && !self.finding && self.find_at.is_none() {
                        self.finding = true;
                        self.commands.push_back(Command::FindBackup { except });
                    } else if !self.dialing {
                        self.dial_backup();
                    }
                }
            }
            _ => {}
        }
    }

    /// The next command to carry out.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`Session::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::AssignAgain { at } | Phase::TryNext { at, .. } => Some(*at),
            Phase::Serving { .. } => [self.find_at, self.retry_at].into_iter().flatten().min(),
            Phase::Assigning | Phase::Registering { .. } => None,
        }
    }

    /// The server registered with.
    pub fn serving(&self) -> Option<&HeartbeatServer> {
        match &self.phase {
            Phase::Serving { target } => Some(target),
            _ => None,
        }
    }

    /// The server to move to.
    pub fn backup(&self) -> Option<&HeartbeatServer> {
        self.backup.as_ref()
    }

    /// The server an idle connection is kept open to.
    pub fn standby(&self) -> Option<&str> {
        self.standby.as_deref()
    }

    fn register(&mut self, server: HeartbeatServer, moved: bool) {
        // A standby to this server becomes the session's connection.
        if self.standby.as_deref() == Some(server.name.as_str()) {
            self.standby = None;
        }
        self.commands.push_back(Command::Register { server: server.clone() });
        self.phase = Phase::Registering { target: server, moved };
    }

    fn assign(&mut self) {
        self.commands.push_back(Command::Assign { failed: self.failed.clone() });
        self.phase = Phase::Assigning;
    }

    /// Dials the backup unless a standby already leads there.
    fn dial_backup(&mut self) {
        let Some(backup) = self.backup.clone() else {
            return;
        };
        if self.standby.as_deref() == Some(backup.name.as_str()) {
            return;
        }
        self.standby = None;
        self.dialing = true;
        self.commands.push_back(Command::Dial { server: backup });
    }

    fn end_session(&mut self) {
        self.commands.push_back(Command::EndSession);
        self.finding = false;
        self.find_at = None;
        self.retry_at = None;
    }
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn server(name: &str) -> HeartbeatServer {
        HeartbeatServer { name: name.into(), address: format!("{name}:4434") }
    }

    /// A session driven in virtual time: `t` is the time since start.
    struct Harness {
        session: Session,
        start: Instant,
        rng: StdRng,
    }

    impl Harness {
        fn new() -> Self {
            Self { session: Session::new(), start: Instant::now(), rng: StdRng::seed_from_u64(7) }
        }

        fn at(&self, t: Duration) -> Instant {
            self.start + t
        }

        fn input(&mut self, t: Duration, input: Input) -> Vec<Command> {
            let now = self.at(t);
            self.session.handle(input, now, &mut self.rng);
            self.drain()
        }

        fn tick(&mut self, t: Duration) -> Vec<Command> {
            self.session.handle_timeout(self.at(t));
            self.drain()
        }

        fn drain(&mut self) -> Vec<Command> {
            std::iter::from_fn(|| self.session.poll_command()).collect()
        }

        fn next_in(&self) -> Option<Duration> {
            self.session.poll_timeout().map(|at| at - self.start)
        }

        /// Assigned a and b, registered with a, standby to b up: the usual steady state.
        fn serving_a_with_standby_b() -> Self {
            let mut h = Self::new();
            assert_eq!(h.drain(), [Command::Assign { failed: vec![] }]);
            let assigned = Input::Assigned { primary: server("a"), backup: Some(server("b")) };
            assert_eq!(h.input(ms(0), assigned), [Command::Register { server: server("a") }]);
            assert_eq!(h.input(ms(50), Input::Registered), [Command::Dial { server: server("b") }]);
            assert_eq!(h.input(ms(80), Input::StandbyUp("b".into())), []);
            assert_eq!(h.session.standby(), Some("b"));
            h
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_lost_primary_moves_to_the_backup_and_finds_a_new_backup_once_the_storm_is_over() {
        let mut h = Harness::serving_a_with_standby_b();
        assert_eq!(h.next_in(), Some(ms(50) + BACKUP_RETRY), "only the periodic retry is armed");
        assert_eq!(
            h.input(ms(5000), Input::PrimaryLost),
            [Command::EndSession, Command::Register { server: server("b") }]
        );
        assert_eq!(h.session.serving(), None);
        assert_eq!(h.session.standby(), None, "the standby carries the registration");
        assert_eq!(h.next_in(), None, "nothing is due while registering");
        assert_eq!(h.input(ms(5100), Input::Registered), []);
        assert_eq!(h.session.serving(), Some(&server("b")));
        assert_eq!(h.session.backup(), None);
        // The backup search waits for the settle time plus a share of the spread drawn from the seeded RNG.
        let find = h.next_in().expect("a search is due");
        assert!(find >= ms(5100) + BACKUP_SETTLE && find < ms(5100) + BACKUP_SETTLE + BACKUP_SPREAD, "{find:?}");
        assert_eq!(h.tick(find - ms(1)), []);
        assert_eq!(h.tick(find), [Command::FindBackup { except: "b".into() }]);
        assert_eq!(h.input(find, Input::BackupFound(Some(server("c")))), [Command::Dial { server: server("c") }]);
        assert_eq!(h.input(find + ms(30), Input::StandbyUp("c".into())), []);
        assert_eq!((h.session.backup(), h.session.standby()), (Some(&server("c")), Some("c")));
    }

    #[test]
    fn a_closed_control_connection_moves_like_a_lost_primary() {
        let mut h = Harness::serving_a_with_standby_b();
        assert_eq!(h.input(ms(900), Input::Closed), [Command::EndSession, Command::Register { server: server("b") }]);
    }

    #[test]
    fn a_primary_lost_without_a_backup_asks_hds_without_the_lost_server() {
        let mut h = Harness::new();
        h.drain();
        assert_eq!(
            h.input(ms(0), Input::Assigned { primary: server("a"), backup: None }),
            [Command::Register { server: server("a") }]
        );
        assert_eq!(h.input(ms(10), Input::Registered), [Command::FindBackup { except: "a".into() }]);
        assert_eq!(h.input(ms(20), Input::BackupFound(None)), []);
        assert_eq!(
            h.input(ms(500), Input::PrimaryLost),
            [Command::EndSession, Command::Assign { failed: vec!["a".into()] }]
        );
    }

    #[test]
    fn drain_asks_hds_for_a_whole_new_assignment() {
        let mut h = Harness::serving_a_with_standby_b();
        assert_eq!(h.input(ms(1000), Input::Drain), [Command::EndSession, Command::Assign { failed: vec![] }]);
        assert_eq!(h.session.backup(), None);
        assert_eq!(h.next_in(), None);
        let assigned = Input::Assigned { primary: server("c"), backup: Some(server("b")) };
        assert_eq!(h.input(ms(1100), assigned), [Command::Register { server: server("c") }]);
        assert_eq!(h.input(ms(1200), Input::Registered), [], "the standby to b is still up: no new dial");
        assert_eq!(h.session.standby(), Some("b"));
    }

    #[test]
    fn the_backup_search_is_retried_every_thirty_seconds() {
        let mut h = Harness::new();
        h.drain();
        h.input(ms(0), Input::Assigned { primary: server("a"), backup: None });
        assert_eq!(h.input(ms(10), Input::Registered), [Command::FindBackup { except: "a".into() }]);
        assert_eq!(h.input(ms(20), Input::BackupFound(None)), []);
        assert_eq!(h.next_in(), Some(ms(10) + BACKUP_RETRY));
        assert_eq!(h.tick(ms(10) + BACKUP_RETRY), [Command::FindBackup { except: "a".into() }]);
        assert_eq!(h.next_in(), Some(ms(10) + BACKUP_RETRY * 2));
        // Found only on the second try; a found server equal to the current one is no backup.
        assert_eq!(h.input(ms(30_100), Input::BackupFound(Some(server("a")))), []);
        assert_eq!(h.tick(ms(10) + BACKUP_RETRY * 2), [Command::FindBackup { except: "a".into() }]);
        assert_eq!(h.input(ms(60_100), Input::BackupFound(Some(server("b")))), [Command::Dial { server: server("b") }]);
    }

    #[test]
    fn a_standby_that_dies_sends_the_ncu_to_hds_for_another_backup() {
        let mut h = Harness::serving_a_with_standby_b();
        assert_eq!(h.input(ms(2000), Input::StandbyDown("b".into())), []);
        assert_eq!((h.session.backup(), h.session.standby()), (None, None));
        assert_eq!(h.tick(ms(50) + BACKUP_RETRY), [Command::FindBackup { except: "a".into() }]);
        // Lost before a new backup is found: hds is asked for everything, never for a.
        assert_eq!(
            h.input(ms(31_000), Input::PrimaryLost),
            [Command::EndSession, Command::Assign { failed: vec!["a".into()] }]
        );
    }

    #[test]
    fn a_failed_dial_is_retried_at_the_next_retry() {
        let mut h = Harness::new();
        h.drain();
        h.input(ms(0), Input::Assigned { primary: server("a"), backup: Some(server("b")) });
        assert_eq!(h.input(ms(10), Input::Registered), [Command::Dial { server: server("b") }]);
        assert_eq!(h.input(ms(5010), Input::StandbyDown("b".into())), []);
        assert_eq!(h.session.backup(), Some(&server("b")), "still the backup; only the standby failed");
        assert_eq!(h.tick(ms(10) + BACKUP_RETRY), [Command::Dial { server: server("b") }]);
    }

    #[test]
    fn a_standby_for_a_stale_backup_is_not_kept() {
        let mut h = Harness::serving_a_with_standby_b();
        h.input(ms(100), Input::StandbyDown("b".into()));
        assert_eq!(h.tick(ms(50) + BACKUP_RETRY), [Command::FindBackup { except: "a".into() }]);
        assert_eq!(h.input(ms(30_100), Input::BackupFound(Some(server("c")))), [Command::Dial { server: server("c") }]);
        // A late standby to b (from an earlier dial) leads nowhere we want to go.
        assert_eq!(h.input(ms(30_200), Input::StandbyUp("b".into())), []);
        assert_eq!(h.session.standby(), None);
    }

    #[test]
    fn a_refused_registration_goes_to_the_backup_after_a_pause() {
        let mut h = Harness::new();
        h.drain();
        h.input(ms(0), Input::Assigned { primary: server("a"), backup: Some(server("b")) });
        assert_eq!(h.input(ms(40), Input::RegisterFailed), []);
        assert_eq!(h.next_in(), Some(ms(40) + RETRY_AFTER_FAILURE));
        assert_eq!(h.tick(ms(239)), []);
        assert_eq!(h.tick(ms(240)), [Command::Register { server: server("b") }]);
        // b fails too: hds is asked again, without either.
        assert_eq!(h.input(ms(300), Input::RegisterFailed), []);
        assert_eq!(h.tick(ms(500)), [Command::Assign { failed: vec!["a".into(), "b".into()] }]);
        // A fresh assignment is no move: the backup search starts at once.
        h.input(ms(600), Input::Assigned { primary: server("c"), backup: None });
        assert_eq!(h.input(ms(700), Input::Registered), [Command::FindBackup { except: "c".into() }]);
    }

    #[test]
    fn hds_unreachable_is_asked_again_with_doubling_waits_up_to_ten_seconds() {
        let mut h = Harness::new();
        assert_eq!(h.drain(), [Command::Assign { failed: vec![] }]);
        let mut t = ms(0);
        let mut waits = Vec::new();
        for _ in 0..9 {
            assert_eq!(h.input(t, Input::AssignFailed), []);
            let due = h.next_in().expect("a retry is due");
            waits.push((due - t).as_millis());
            assert_eq!(h.tick(due - ms(1)), []);
            assert_eq!(h.tick(due), [Command::Assign { failed: vec![] }]);
            t = due;
        }
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]);
        // An answer resets the back-off.
        h.input(t, Input::Assigned { primary: server("a"), backup: None });
        h.input(t, Input::Registered);
        h.input(t + ms(1), Input::Drain);
        assert_eq!(h.input(t + ms(2), Input::AssignFailed), []);
        assert_eq!(h.next_in(), Some(t + ms(202)));
    }

    #[test]
    fn late_answers_of_an_earlier_phase_change_nothing() {
        let mut h = Harness::serving_a_with_standby_b();
        assert_eq!(h.input(ms(100), Input::Registered), []);
        assert_eq!(h.input(ms(100), Input::RegisterFailed), []);
        assert_eq!(h.input(ms(100), Input::Assigned { primary: server("x"), backup: None }), []);
        assert_eq!(h.input(ms(100), Input::BackupFound(Some(server("x")))), [], "no search was outstanding");
        assert_eq!(h.session.serving(), Some(&server("a")));
        assert_eq!(h.session.backup(), Some(&server("b")));
    }
}
