//! The `hbs` configuration file: strict TOML, named defaults, validated once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hds::settings::{self, invalid};
use serde::Deserialize;

pub use hds::settings::ConfigError;

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
    pub database_url: Option<String>,
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
    /// Log format: `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
}

impl Config {
    /// Reads, parses, applies `DATABASE_URL` and validates.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let mut config: Self = settings::read_toml(path)?;
        config.database_url = settings::database_url(config.database_url.take());
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without looking at the environment.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(invalid("name", "letters, digits and hyphens"));
        }
        settings::check_database_url(self.database_url.as_deref())?;
        settings::check_files(&[("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)])?;
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
        if self.batch_window > Duration::from_secs(1) {
            return Err(invalid("batch_window", "at most 1s"));
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return Err(invalid("log_format", "must be text or json"));
        }
        Ok(())
    }

    /// The database URL; present once `validate` has passed.
    pub fn database_url(&self) -> &str {
        self.database_url.as_deref().unwrap_or("")
    }

    /// Worst-case time from the last answered ping to a death: the figure to compare with the 1.5 s target.
    pub fn detection_bound(&self) -> Duration {
        self.interval + self.reply_timeout + self.reprobe_interval * u32::from(self.reprobes)
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
fn default_batch_window() -> Duration {
    // Short: a pending address's first proof waits for it. Under load, changes also gather while a write runs.
    Duration::from_millis(1)
}
fn default_fleet_every() -> Duration {
    Duration::from_secs(2)
}
fn default_rehome_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_session_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_log_format() -> String {
    "text".into()
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
    fn unknown_keys_are_named() {
        let err = Config::parse("name = 'a'\nca = 'a'\ncert = 'b'\nkey = 'c'\ninterval_ms = 5").expect_err("unknown");
        assert!(err.to_string().contains("interval_ms"), "{err}");
    }
}
