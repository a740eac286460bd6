//! The `hbs` configuration file: strict TOML, named defaults, validated once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
pub use tether_config::{ConfigError, Load};
use tether_config::{LogFormat, Secret, invalid};

/// Everything `hbs` reads from its `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unique name of this server (the `heartbeat_servers` key), e.g. `hbs-a`.
    pub name: String,
    /// UDP address of the QUIC control endpoint.
    #[serde(default = "default_control_listen")]
    pub control_listen: SocketAddr,
    /// The control address NCUs are told to use (`host:port`); defaults to `control_listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// UDP address of the heartbeat socket; port 0 picks one.
    #[serde(default = "default_heartbeat_listen")]
    pub heartbeat_listen: SocketAddr,
    /// Postgres URL; the environment variable `DATABASE_URL` takes precedence.
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// The operator CA certificate (PEM).
    pub ca: PathBuf,
    /// This server's certificate (PEM), issued by `hds pki`.
    pub cert: PathBuf,
    /// This server's private key (PEM).
    pub key: PathBuf,
    /// Most addresses this server carries; at capacity it marks itself full.
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    /// Back to active once the load falls below this share of capacity.
    #[serde(default = "default_low_water")]
    pub low_water: f64,
    /// Time between two pings of an address.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Wait for a reply before re-probing.
    #[serde(default = "default_reply_timeout", with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// Time between re-probes.
    #[serde(default = "default_reprobe_interval", with = "humantime_serde")]
    pub reprobe_interval: Duration,
    /// Re-probes before an address is dead.
    #[serde(default = "default_reprobes")]
    pub reprobes: u8,
    /// The heartbeat driver turns on this grid: pings due and pongs that arrived meanwhile are handled together at
    /// the next multiple of it, one wake-up for all of them. Each deadline, and each proof of a new address, may
    /// come up to one tick late. `0s` turns at every deadline as it comes, reading the socket every millisecond.
    #[serde(default = "default_tick", with = "humantime_serde")]
    pub tick: Duration,
    /// Longest time state changes wait to be written together.
    #[serde(default = "default_batch_window", with = "humantime_serde")]
    pub batch_window: Duration,
    /// How often the fleet row is refreshed.
    #[serde(default = "default_fleet_every", with = "humantime_serde")]
    pub fleet_every: Duration,
    /// Addresses of an NCU whose heartbeat server vanished, and that did not re-home within this, become dead. Longer
    /// than an NCU may take to move: silence for its failover_after (3 s), then up to 15 s for a registration over
    /// its standby connection when the backup is busy with a storm, and a fleet refresh.
    #[serde(default = "default_rehome_grace", with = "humantime_serde")]
    pub rehome_grace: Duration,
    /// A session whose control connection closed keeps being pinged this long (the NCU may be moving).
    #[serde(default = "default_session_grace", with = "humantime_serde")]
    pub session_grace: Duration,
    /// Most addresses one domain may have: NCU uplinks past it are refused by name (dns bounds the rest alike).
    #[serde(default = "default_max_addresses_per_domain")]
    pub max_addresses_per_domain: u32,
    /// TCP address serving `GET /metrics` and `GET /healthz`; none when absent.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format: `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Longest wait between two attempts to reach Postgres at start.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Load for Config {
    fn apply_env(&mut self, var: &dyn Fn(&str) -> Option<String>) {
        tether_config::env_secret(&mut self.database_url, var, "DATABASE_URL");
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(invalid("name", "letters, digits and hyphens"));
        }
        tether_config::check_database(self.database_url.as_ref())?;
        tether_config::check_files(&[("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)])?;
        tether_config::check_backoff(self.max_backoff)?;
        if self.capacity == 0 {
            return Err(invalid("capacity", "must be above zero"));
        }
        if !(0.0..1.0).contains(&self.low_water) {
            return Err(invalid("low_water", "must be in [0, 1)"));
        }
        if self.interval < Duration::from_millis(100) {
            return Err(invalid("interval", "must be at least 100ms"));
        }
        if self.reply_timeout.is_zero() || self.reply_timeout >= self.interval {
            return Err(invalid("reply_timeout", "must be above zero and below interval"));
        }
        if self.reprobe_interval.is_zero() {
            return Err(invalid("reprobe_interval", "must be above zero"));
        }
        if self.tick > Duration::from_millis(50) || self.tick * 2 > self.reprobe_interval.min(self.reply_timeout) {
            return Err(invalid("tick", "at most 50ms and half of reply_timeout and of reprobe_interval"));
        }
        if self.batch_window > Duration::from_secs(1) {
            return Err(invalid("batch_window", "at most 1s"));
        }
        Ok(())
    }
}

impl tether_service::ServerConfig for Config {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

impl Config {
    /// The database URL; present once `validate` has passed.
    pub fn database_url(&self) -> &str {
        self.database_url.as_ref().map_or("", Secret::expose)
    }

    /// Worst-case time from the last answered ping to a death: the figure to compare with the 1.5 s target. Each
    /// deadline of the chain (the cycle's ping, its reply window, every re-probe window) may be handled a tick late.
    pub fn detection_bound(&self) -> Duration {
        let deadlines = u32::from(self.reprobes) + 2;
        self.interval + self.reply_timeout + self.reprobe_interval * u32::from(self.reprobes) + self.tick * deadlines
    }
}

fn default_control_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4434))
}
fn default_heartbeat_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4435))
}
fn default_capacity() -> u32 {
    100_000
}
fn default_low_water() -> f64 {
    0.9
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_reply_timeout() -> Duration {
    Duration::from_millis(100)
}
fn default_reprobe_interval() -> Duration {
    Duration::from_millis(80)
}
fn default_reprobes() -> u8 {
    4
}
fn default_tick() -> Duration {
    Duration::from_millis(2)
}
fn default_batch_window() -> Duration {
    // Short: a pending address's first proof waits for it. Under load, changes also gather while a write runs.
    Duration::from_millis(1)
}
fn default_fleet_every() -> Duration {
    Duration::from_secs(2)
}
fn default_max_addresses_per_domain() -> u32 {
    crate::store::MAX_ADDRESSES_PER_DOMAIN
}

fn default_rehome_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_session_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_meets_the_detection_target() {
        let config = Config::parse(include_str!("../../deploy/hbs.toml")).expect("example parses");
        assert_eq!(config.name, "hbs-a");
        assert!(config.detection_bound() <= Duration::from_millis(1500), "{:?}", config.detection_bound());
    }

    #[test]
    fn a_tick_too_long_for_the_windows_is_refused() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let base =
            format!("name = 'a'\ndatabase_url = 'postgres://h/db'\nca = '{file}'\ncert = '{file}'\nkey = '{file}'\n");
        // The default windows: reply_timeout 100 ms, reprobe_interval 80 ms.
        for (tick, ms, ok) in
            [("0s", 0, true), ("5ms", 5, true), ("40ms", 40, true), ("41ms", 41, false), ("60ms", 60, false)]
        {
            let config = Config::parse(&format!("{base}tick = '{tick}'")).expect("parses");
            assert_eq!(config.tick, Duration::from_millis(ms));
            let checked = config.validate();
            assert_eq!(checked.is_ok(), ok, "tick {tick}: {checked:?}");
            if let Err(error) = checked {
                assert!(error.to_string().contains("tick"), "{error}");
            }
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("name = 'a'\nca = 'a'\ncert = 'b'\nkey = 'c'\ninterval_ms = 5").expect_err("unknown");
        assert!(err.to_string().contains("interval_ms"), "{err}");
    }
}
