//! The `dns` configuration file: strict TOML, named defaults, validated once.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use serde::Deserialize;

/// Everything `dns` reads from its `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP and TCP address the authoritative server listens on.
    #[serde(default = "default_dns_listen")]
    pub dns_listen: SocketAddr,
    /// TCP address of the admin API (HTTP, JSON).
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    /// Postgres URL; the environment variable `DATABASE_URL` takes precedence.
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// Bearer token of the operator; the environment variable `TETHER_OPERATOR_TOKEN` takes precedence.
    #[serde(default)]
    pub operator_token: Option<Secret>,
    /// Log format: `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Idle time after which a DNS-over-TCP connection is closed.
    #[serde(default = "default_tcp_idle_timeout", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// Lifetime of NCU enrollment tokens issued by the admin API.
    #[serde(default = "default_enrollment_ttl", with = "humantime_serde")]
    pub enrollment_ttl: Duration,
    /// Longest wait between two attempts to reach Postgres.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// A string that never appears in `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

/// A configuration that cannot be used, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or a key is unknown or mistyped.
    #[error(transparent)]
    Parse(#[from] toml::de::Error),
    /// A key has a value that parses but cannot work.
    #[error("`{key}`: {problem}")]
    Invalid {
        /// The key at fault.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl Config {
    /// Reads, parses and validates the file at `path`, then applies the environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut config = Self::parse(&text)?;
        config.apply_env(|key| std::env::var(key).ok());
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text without looking at the environment.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Lets `DATABASE_URL` and `TETHER_OPERATOR_TOKEN` override the file.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        if let Some(url) = var("DATABASE_URL").filter(|v| !v.is_empty()) {
            self.database_url = Some(Secret(url));
        }
        if let Some(token) = var("TETHER_OPERATOR_TOKEN").filter(|v| !v.is_empty()) {
            self.operator_token = Some(Secret(token));
        }
    }

    /// Checks what serde cannot: presence of the database URL, token strength, sane durations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(url) = &self.database_url else {
            return Err(invalid("database_url", "missing (set it here or in DATABASE_URL)"));
        };
        if !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://")) {
            return Err(invalid("database_url", "must start with postgres:// or postgresql://"));
        }
        if let Some(token) = &self.operator_token
            && token.expose().len() < 16
        {
            return Err(invalid("operator_token", "must be at least 16 characters"));
        }
        if self.dns_listen == self.api_listen && self.dns_listen.port() != 0 {
            return Err(invalid("api_listen", "must differ from dns_listen"));
        }
        if self.tcp_idle_timeout.is_zero() {
            return Err(invalid("tcp_idle_timeout", "must be above zero"));
        }
        if self.enrollment_ttl < Duration::from_secs(60) {
            return Err(invalid("enrollment_ttl", "must be at least 1m"));
        }
        if self.max_backoff < Duration::from_millis(100) {
            return Err(invalid("max_backoff", "must be at least 100ms"));
        }
        Ok(())
    }

    /// The database URL; present once `validate` has passed.
    pub fn database_url(&self) -> &str {
        self.database_url.as_ref().map_or("", Secret::expose)
    }
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn invalid(key: &'static str, problem: &str) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.to_owned() }
}

fn default_dns_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 53))
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8053))
}

fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_enrollment_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../deploy/dns.toml");
        let config = Config::parse(text).expect("example parses");
        config.validate().expect("example validates");
        assert_eq!(config.dns_listen.port(), 53);
    }

    #[test]
    fn defaults_apply() {
        let config = Config::parse("database_url = 'postgres://localhost/tether'").expect("parses");
        assert_eq!(config.dns_listen, default_dns_listen());
        assert_eq!(config.api_listen, default_api_listen());
        assert_eq!(config.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("dns_lisen = '127.0.0.1:53'").expect_err("unknown key refused");
        assert!(err.to_string().contains("dns_lisen"), "{err}");
    }

    #[test]
    fn bad_address_is_named() {
        let err = Config::parse("api_listen = 'localhost'").expect_err("bad address refused");
        assert!(err.to_string().contains("api_listen"), "{err}");
    }

    #[test]
    fn missing_database_url_is_named() {
        let config = Config::parse("").expect("parses");
        let err = config.validate().expect_err("missing url refused");
        assert!(err.to_string().contains("database_url"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_secrets_are_masked() {
        let mut config = Config::parse("database_url = 'postgres://file/db'\noperator_token = 'from-the-file-0123'")
            .expect("parses");
        config.apply_env(|key| match key {
            "DATABASE_URL" => Some("postgres://env/db".into()),
            _ => None,
        });
        assert_eq!(config.database_url(), "postgres://env/db");
        let debug = format!("{config:?}");
        assert!(!debug.contains("postgres://env/db"), "{debug}");
        assert!(!debug.contains("from-the-file"), "{debug}");
    }

    #[test]
    fn short_operator_token_refused() {
        let config = Config::parse("database_url = 'postgres://x/y'\noperator_token = 'short'").expect("parses");
        let err = config.validate().expect_err("short token refused");
        assert!(err.to_string().contains("operator_token"), "{err}");
    }
}
