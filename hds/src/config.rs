//! The `hds` configuration file: strict TOML, named defaults, validated once.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

pub use crate::settings::ConfigError;
use crate::settings::{self, invalid};

/// Everything `hds` reads from its `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP address of the QUIC endpoint.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Postgres URL; the environment variable `DATABASE_URL` takes precedence.
    #[serde(default)]
    pub database_url: Option<String>,
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
    #[serde(default = "default_log_format")]
    pub log_format: String,
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
        settings::check_database_url(self.database_url.as_deref())?;
        settings::check_files(&[("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)])?;
        if self.stale_after < Duration::from_secs(1) {
            return Err(invalid("stale_after", "must be at least 1s"));
        }
        if self.ncu_cert_validity < Duration::from_secs(3600) {
            return Err(invalid("ncu_cert_validity", "must be at least 1h"));
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

fn default_log_format() -> String {
    "text".into()
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
