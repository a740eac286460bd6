//! The `hds` configuration file: strict TOML, named defaults, validated once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
pub use tether_config::{ConfigError, Load};
use tether_config::{LogFormat, Secret, invalid};

/// Everything `hds` reads from its `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP address of the QUIC endpoint.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Postgres URL; the environment variable `DATABASE_URL` takes precedence.
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// The operator CA certificate (PEM); its key (`ca.key` beside it) signs NCU certificates.
    pub ca: PathBuf,
    /// This server's certificate (PEM), issued by `hds pki`.
    pub cert: PathBuf,
    /// This server's private key (PEM).
    pub key: PathBuf,
    /// A heartbeat server whose row is older than this is treated as gone.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// Lifetime of the client certificates given to NCUs.
    #[serde(default = "default_ncu_cert_validity", with = "humantime_serde")]
    pub ncu_cert_validity: Duration,
    /// Publish this instance as `_tether-hds._udp.<zone>` SRV through tether's own dns.
    #[serde(default)]
    pub publish: Option<Publish>,
    /// Log format: `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Longest wait between two attempts to reach Postgres at start.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

/// Where and how this instance is published in DNS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The operator's zone, e.g. `tether.example.net`; it must exist (`POST /v1/zones`).
    pub zone: String,
    /// The address NCUs reach this instance at.
    pub address: SocketAddr,
}

impl Load for Config {
    fn apply_env(&mut self, var: &dyn Fn(&str) -> Option<String>) {
        tether_config::env_secret(&mut self.database_url, var, "DATABASE_URL");
    }

    fn validate(&self) -> Result<(), ConfigError> {
        tether_config::check_database(self.database_url.as_ref())?;
        tether_config::check_files(&[("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)])?;
        tether_config::check_backoff(self.max_backoff)?;
        if self.stale_after < Duration::from_secs(1) {
            return Err(invalid("stale_after", "must be at least 1s"));
        }
        if self.ncu_cert_validity < Duration::from_secs(3600) {
            return Err(invalid("ncu_cert_validity", "must be at least 1h"));
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
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4433))
}

fn default_stale_after() -> Duration {
    Duration::from_secs(15)
}

fn default_ncu_cert_validity() -> Duration {
    Duration::from_secs(365 * 24 * 3600)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let config = Config::parse(include_str!("../../deploy/hds.toml")).expect("example parses");
        assert_eq!(config.listen.port(), 4433);
        assert_eq!(config.stale_after, Duration::from_secs(15));
        assert!(config.publish.is_some());
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let err = Config::parse("ca = 'a'\ncert = 'b'\nkey = 'c'\nlisten_on = '1.2.3.4:1'").expect_err("unknown");
        assert!(err.to_string().contains("listen_on"), "{err}");
        let err = Config::parse("cert = 'b'\nkey = 'c'").expect_err("missing");
        assert!(err.to_string().contains("ca"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let config =
            Config::parse("database_url = 'postgres://x/y'\nca = '/nonexistent/ca.pem'\ncert = '/x'\nkey = '/y'")
                .expect("parses");
        let err = config.validate().expect_err("missing file");
        assert!(err.to_string().contains("`ca`"), "{err}");
    }
}
