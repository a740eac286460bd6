//! The anycast health monitor (`dns-monitor`) that runs beside each master: every `interval` it asks its own dns
//! for the canary zone's SOA and reads that zone's serial (and, on a hot standby, whether WAL is streaming in) from
//! the database the view comes from. From that it keeps one of three states and tells BIRD which route to announce
//! for the shared service address:
//!
//! - **healthy** (dns answers, its serial is the database's, the database is current): the `healthy` static
//!   protocol is enabled, exported as is;
//! - **degraded** (dns answers but its freshness cannot be shown: the database is away, a standby is cut off from
//!   its primary, or the serial lags for longer than `lag`): the `degraded` protocol, which the BGP export filter
//!   prepends, so routers prefer a healthy master but still reach this one when no master is healthy;
//! - **down** (dns did not answer `fall` probes in a row): both withdrawn.
//!
//! A state is left for a better one only after `rise` probes in a row agree, for a worse one at once (down after
//! `fall`). BIRD is driven with `birdc enable|disable <protocol>` (the new route first, then the old one off, so
//! the address is never withdrawn on the way), and the state is applied again every 10 s in case BIRD restarted.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hickory_server::proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
};
use serde::Deserialize;
use sqlx::PgPool;
use tether_config::{ConfigError, Load, LogFormat, Secret, invalid};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `dns-monitor`'s configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// This master's dns (its own unicast or the service address as seen from the master itself).
    pub dns: SocketAddr,
    /// A zone the master serves: its SOA is asked, its serial compared.
    pub canary: String,
    /// The database this master's view is read from (its `view_database_url`, else its `database_url`); the
    /// environment variable `DATABASE_URL` takes precedence.
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// Time between probes.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// A probe's DNS query waits this long.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Unanswered probes in a row before the route is withdrawn.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Good probes in a row before a better state is taken.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// How long the served serial may differ from the database's before the master counts as degraded.
    #[serde(default = "default_lag", with = "humantime_serde")]
    pub lag: Duration,
    /// `birdc`.
    #[serde(default = "default_birdc")]
    pub birdc: PathBuf,
    /// BIRD's control socket.
    #[serde(default = "default_bird_socket")]
    pub bird_socket: PathBuf,
    /// The static protocol announcing the address as healthy.
    #[serde(default = "default_healthy")]
    pub healthy_protocol: String,
    /// The static protocol announcing it as degraded.
    #[serde(default = "default_degraded")]
    pub degraded_protocol: String,
    /// Log format: `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
}

fn default_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_fall() -> u32 {
    3
}
fn default_rise() -> u32 {
    3
}
fn default_lag() -> Duration {
    Duration::from_secs(2)
}
fn default_birdc() -> PathBuf {
    PathBuf::from("/usr/sbin/birdc")
}
fn default_bird_socket() -> PathBuf {
    PathBuf::from("/run/bird/bird.ctl")
}
fn default_healthy() -> String {
    "anycast_healthy".into()
}
fn default_degraded() -> String {
    "anycast_degraded".into()
}

impl Load for MonitorConfig {
    fn apply_env(&mut self, var: &dyn Fn(&str) -> Option<String>) {
        tether_config::env_secret(&mut self.database_url, var, "DATABASE_URL");
    }

    fn validate(&self) -> Result<(), ConfigError> {
        tether_config::check_database(self.database_url.as_ref())?;
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(10) {
            return Err(invalid("interval", "must be between 10ms and 10s"));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(10) {
            return Err(invalid("timeout", "must be above zero and at most 10s"));
        }
        if !(1..=100).contains(&self.fall) || !(1..=100).contains(&self.rise) {
            return Err(invalid("fall", "fall and rise must be 1 to 100"));
        }
        if Name::from_ascii(&self.canary).is_err() {
            return Err(invalid("canary", "must be a domain name"));
        }
        let protocol = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !protocol(&self.healthy_protocol) || !protocol(&self.degraded_protocol) {
            return Err(invalid("healthy_protocol", "protocol names are letters, digits and _"));
        }
        Ok(())
    }
}

impl tether_service::ServerConfig for MonitorConfig {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

/// What the monitor announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The preferred route.
    Healthy,
    /// The prepended route.
    Degraded,
    /// No route.
    Down,
}

/// One probe: the serial dns served (none: no answer), and what the database says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The canary's serial as served.
    pub served: Option<u32>,
    /// The canary's serial in the database, if the database answered and is current (a primary, or a standby
    /// whose WAL receiver is streaming).
    pub stored: Option<u32>,
}

/// The monitor's state machine, without I/O.
#[derive(Debug)]
pub struct Judge {
    fall: u32,
    rise: u32,
    lag: Duration,
    state: Health,
    /// Unanswered probes in a row.
    missed: u32,
    /// The better state probes have pointed to, and how many in a row.
    better: Option<(Health, u32)>,
    /// Since when the served serial differs from the stored one.
    lagging_since: Option<std::time::Instant>,
}

impl Judge {
    /// Starts `Down`: nothing is announced before the first good probes.
    pub fn new(fall: u32, rise: u32, lag: Duration) -> Self {
        Self { fall, rise, lag, state: Health::Down, missed: 0, better: None, lagging_since: None }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Takes one probe's outcome at `now`; returns the new state when it changed.
    pub fn probe(&mut self, probe: Probe, now: std::time::Instant) -> Option<Health> {
        let seen = match (probe.served, probe.stored) {
            (None, _) => {
                self.missed += 1;
                self.better = None;
                self.lagging_since = None;
                if self.missed >= self.fall && self.state != Health::Down {
                    return self.set(Health::Down);
                }
                return None;
            }
            (Some(_), None) => {
                self.lagging_since = None;
                Health::Degraded
            }
            (Some(served), Some(stored)) if served == stored => {
                self.lagging_since = None;
                Health::Healthy
            }
            (Some(_), Some(_)) => {
                let since = *self.lagging_since.get_or_insert(now);
                // A young lag (a change on its way) keeps a healthy master healthy, and lifts no other.
                if now.duration_since(since) < self.lag && self.state == Health::Healthy {
                    Health::Healthy
                } else {
                    Health::Degraded
                }
            }
        };
        self.missed = 0;
        if seen.rank() < self.state.rank() {
            // Worse (healthy → degraded): at once.
            self.better = None;
            return self.set(seen);
        }
        if seen == self.state {
            self.better = None;
            return None;
        }
        let count = match self.better {
            Some((state, count)) if state == seen => count + 1,
            _ => 1,
        };
        self.better = Some((seen, count));
        if count >= self.rise {
            self.better = None;
            return self.set(seen);
        }
        None
    }

    fn set(&mut self, state: Health) -> Option<Health> {
        self.state = state;
        Some(state)
    }
}

impl Health {
    fn rank(self) -> u8 {
        match self {
            Self::Down => 0,
            Self::Degraded => 1,
            Self::Healthy => 2,
        }
    }

    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Down => "down",
        }
    }
}

/// Runs the monitor until `shutdown`; on the way out the route is withdrawn (a stopped monitor cannot vouch).
pub async fn run(config: MonitorConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let url = config.database_url.as_ref().map_or("", Secret::expose);
    let pool =
        sqlx::postgres::PgPoolOptions::new().max_connections(1).acquire_timeout(config.timeout).connect_lazy(url)?;
    let canary = Name::from_ascii(&config.canary)?;
    let mut judge = Judge::new(config.fall, config.rise, config.lag);
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut applied = std::time::Instant::now();
    info!(dns = %config.dns, canary = %canary, "monitoring; nothing is announced before the first good probes");
    apply(&config, Health::Down).await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (served, stored) =
            tokio::join!(served_serial(config.dns, &canary, config.timeout), stored_serial(&pool, &config));
        let probe = Probe { served, stored };
        if let Some(state) = judge.probe(probe, std::time::Instant::now()) {
            info!(state = state.as_str(), served = ?probe.served, stored = ?probe.stored, "health changed");
            apply(&config, state).await;
            applied = std::time::Instant::now();
        } else if applied.elapsed() >= Duration::from_secs(10) {
            apply(&config, judge.state()).await;
            applied = std::time::Instant::now();
        }
    }
    apply(&config, Health::Down).await;
    Ok(())
}

/// The canary's SOA serial as `dns` serves it, within `timeout`.
async fn served_serial(dns: SocketAddr, canary: &Name, timeout: Duration) -> Option<u32> {
    let bind: SocketAddr = if dns.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0_u16; 8], 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await.ok()?;
    let id: u16 = rand::random();
    let mut query = Message::new(id, MessageType::Query, OpCode::Query);
    query.add_query(Query::query(canary.clone(), RecordType::SOA));
    // Connected: a dns that is gone (its port closed) fails the probe at once with the ICMP error, not at the timeout.
    socket.connect(dns).await.ok()?;
    socket.send(&query.to_vec().ok()?).await.ok()?;
    let mut buf = vec![0_u8; 4096];
    let answer = tokio::time::timeout(timeout, async {
        loop {
            let len = socket.recv(&mut buf).await.ok()?;
            let message = Message::from_vec(&buf[..len]).ok()?;
            if message.metadata.id == id {
                return Some(message);
            }
        }
    })
    .await
    .ok()??;
    answer.answers.iter().find_map(|r| match &r.data {
        RData::SOA(soa) => Some(soa.serial),
        _ => None,
    })
}

/// The canary's serial in the database, when the database answers and is current: a primary, or a standby whose
/// WAL receiver is streaming from its primary.
async fn stored_serial(pool: &PgPool, config: &MonitorConfig) -> Option<u32> {
    let origin = format!("{}.", config.canary.trim_end_matches('.').to_ascii_lowercase());
    let read = sqlx::query_as::<_, (i64, bool)>(
        "SELECT z.serial, NOT pg_is_in_recovery() OR EXISTS \
         (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') FROM zones z WHERE z.origin = $1",
    )
    .bind(origin)
    .fetch_optional(pool);
    match tokio::time::timeout(config.timeout, read).await {
        Ok(Ok(Some((serial, true)))) => u32::try_from(serial & 0xffff_ffff).ok(),
        Ok(Ok(_)) => None,
        Ok(Err(error)) => {
            tracing::debug!(%error, "database not readable");
            None
        }
        Err(_) => None,
    }
}

/// Makes BIRD announce what `state` says: the new route enabled before the old one is disabled.
async fn apply(config: &MonitorConfig, state: Health) {
    let (on, off): (&[&str], &[&str]) = match state {
        Health::Healthy => (&[&config.healthy_protocol], &[&config.degraded_protocol]),
        Health::Degraded => (&[&config.degraded_protocol], &[&config.healthy_protocol]),
        Health::Down => (&[], &[&config.healthy_protocol, &config.degraded_protocol]),
    };
    for (verb, protocol) in on.iter().map(|p| ("enable", *p)).chain(off.iter().map(|p| ("disable", *p))) {
        let mut command = std::process::Command::new(&config.birdc);
        command.arg("-s").arg(&config.bird_socket).args([verb, protocol]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())));
        match output {
            Ok(output)
                if output.status.success() && !String::from_utf8_lossy(&output.stdout).contains("syntax error") => {}
            Ok(output) => warn!(
                verb,
                protocol,
                status = %output.status,
                out = %String::from_utf8_lossy(&output.stdout).trim(),
                err = %String::from_utf8_lossy(&output.stderr).trim(),
                "birdc refused"
            ),
            Err(error) => warn!(%error, birdc = %config.birdc.display(), "cannot run birdc"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> std::time::Instant {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        *START.get_or_init(std::time::Instant::now) + Duration::from_millis(ms)
    }

    const GOOD: Probe = Probe { served: Some(7), stored: Some(7) };
    const UNVERIFIED: Probe = Probe { served: Some(7), stored: None };
    const SILENT: Probe = Probe { served: None, stored: Some(7) };

    #[test]
    fn rises_after_rise_good_probes_and_falls_after_fall_silent_ones() {
        let mut judge = Judge::new(3, 2, Duration::from_secs(1));
        assert_eq!(judge.probe(GOOD, at(0)), None);
        assert_eq!(judge.probe(GOOD, at(100)), Some(Health::Healthy));
        assert_eq!(judge.probe(SILENT, at(200)), None);
        assert_eq!(judge.probe(SILENT, at(300)), None);
        assert_eq!(judge.probe(GOOD, at(400)), None, "a good probe resets the count");
        assert_eq!(judge.probe(SILENT, at(500)), None);
        assert_eq!(judge.probe(SILENT, at(600)), None);
        assert_eq!(judge.probe(SILENT, at(700)), Some(Health::Down));
        assert_eq!(judge.probe(GOOD, at(800)), None);
        assert_eq!(judge.probe(GOOD, at(900)), Some(Health::Healthy));
    }

    #[test]
    fn an_unverifiable_view_degrades_at_once_and_recovers_after_rise() {
        let mut judge = Judge::new(3, 2, Duration::from_secs(1));
        judge.probe(GOOD, at(0));
        judge.probe(GOOD, at(100));
        assert_eq!(judge.probe(UNVERIFIED, at(200)), Some(Health::Degraded));
        assert_eq!(judge.probe(UNVERIFIED, at(300)), None);
        assert_eq!(judge.probe(GOOD, at(400)), None);
        assert_eq!(judge.probe(GOOD, at(500)), Some(Health::Healthy));
        // From down, an answering but unverifiable master is announced degraded after rise probes.
        let mut fresh = Judge::new(3, 2, Duration::from_secs(1));
        assert_eq!(fresh.probe(UNVERIFIED, at(0)), None);
        assert_eq!(fresh.probe(UNVERIFIED, at(100)), Some(Health::Degraded));
    }

    #[test]
    fn a_serial_lag_is_tolerated_for_lag_then_degrades() {
        let lagging = Probe { served: Some(7), stored: Some(8) };
        let mut judge = Judge::new(3, 1, Duration::from_secs(1));
        assert_eq!(judge.probe(GOOD, at(0)), Some(Health::Healthy));
        assert_eq!(judge.probe(lagging, at(100)), None);
        assert_eq!(judge.probe(lagging, at(900)), None);
        assert_eq!(judge.probe(lagging, at(1100)), Some(Health::Degraded));
        assert_eq!(judge.probe(GOOD, at(1200)), Some(Health::Healthy));
    }

    #[test]
    fn the_example_configuration_validates() {
        let text = include_str!("../../deploy/dns-monitor.toml");
        let config = MonitorConfig::parse(text).expect("parses");
        config.validate().expect("validates");
        let bad = MonitorConfig::parse(&text.replace("fall = 3", "fall = 0")).expect("parses");
        assert!(bad.validate().is_err());
    }
}
