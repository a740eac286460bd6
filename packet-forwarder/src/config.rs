//! The `packet-forwarder` configuration file: strict TOML, named defaults, validated once.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use tether_config::invalid;
pub use tether_config::{ConfigError, Load, LogFormat, Secret};

/// Everything `packet-forwarder` reads from its `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Postgres URL; the environment variable `DATABASE_URL` takes precedence.
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// TCP address serving `GET /metrics` and `GET /healthz`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Log format: `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// A UDP flow with no datagram either way for this long is closed.
    #[serde(default = "default_udp_idle_timeout", with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
    /// Longest wait for a site's server to accept a TCP connection before the next address is tried.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bytes buffered per direction of a TCP flow: its pipe's size (the kernel rounds it up to a power of two pages),
    /// or its buffer's where the kernel cannot splice.
    #[serde(default = "default_tcp_buffer")]
    pub tcp_buffer: usize,
    /// Longest wait between two attempts to reach Postgres.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How long running flows may take to finish after a shutdown signal before they are cut.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How this forwarder names itself in the host migrations it relays (`relay` in the API); default: the host
    /// name.
    #[serde(default)]
    pub relay_name: Option<String>,
    /// Most flows in all, whatever the domains' own caps add up to; past it new flows are refused (`global_cap`).
    #[serde(default = "default_max_flows_total")]
    pub max_flows_total: u32,
    /// TCP keep-alive on both sides of every relayed connection: probes start after this much silence, so a peer
    /// that vanished is found and its flow freed.
    #[serde(default = "default_tcp_keepalive", with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// A relayed TCP connection that moves no byte either way for this long is closed, so silent peers cannot hold
    /// flows (and the domain's flow cap) forever.
    #[serde(default = "default_tcp_idle_timeout", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// Ranges of private or reserved space (`tether_config::RESERVED_RANGES`) the forwarder may still relay to;
    /// a live address or fallback anywhere else in that space (written by other means than the API) is dropped.
    #[serde(default)]
    pub allowed_target_ranges: Vec<ipnet::IpNet>,
    /// The operator's own service addresses: never relayed to.
    #[serde(default)]
    pub operator_addresses: Vec<ipnet::IpNet>,
}

impl Load for Config {
    /// Lets `DATABASE_URL` override the file.
    fn apply_env(&mut self, var: &dyn Fn(&str) -> Option<String>) {
        tether_config::env_secret(&mut self.database_url, var, "DATABASE_URL");
    }

    /// Checks what serde cannot: presence of the database URL, sane durations and sizes.
    fn validate(&self) -> Result<(), ConfigError> {
        tether_config::check_database(self.database_url.as_ref())?;
        if self.udp_idle_timeout < Duration::from_millis(100) {
            return Err(invalid("udp_idle_timeout", "must be at least 100ms"));
        }
        if self.connect_timeout < Duration::from_millis(10) || self.connect_timeout > Duration::from_secs(60) {
            return Err(invalid("connect_timeout", "must be between 10ms and 60s"));
        }
        if !(1024..=16 << 20).contains(&self.tcp_buffer) {
            return Err(invalid("tcp_buffer", "must be between 1024 and 16777216 bytes"));
        }
        if let Some(name) = &self.relay_name
            && (name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()))
        {
            return Err(invalid("relay_name", "must be 1-64 printable characters"));
        }
        if self.max_flows_total == 0 {
            return Err(invalid("max_flows_total", "must be above zero"));
        }
        if self.tcp_keepalive < Duration::from_secs(1) || self.tcp_keepalive > Duration::from_secs(7200) {
            return Err(invalid("tcp_keepalive", "must be between 1s and 2h"));
        }
        if self.tcp_idle_timeout < Duration::from_secs(1) || self.tcp_idle_timeout > Duration::from_secs(86_400) {
            return Err(invalid("tcp_idle_timeout", "must be between 1s and 24h"));
        }
        tether_config::check_backoff(self.max_backoff)
    }
}

impl tether_service::ServerConfig for Config {
    fn log_format(&self) -> LogFormat {
        self.log_format
    }
}

impl Config {
    /// Where flows may be relayed.
    pub fn targets(&self) -> tether_config::TargetPolicy {
        tether_config::TargetPolicy {
            allowed: self.allowed_target_ranges.clone(),
            operator: self.operator_addresses.clone(),
        }
    }

    /// [`Config::relay_name`], else the host name, else `packet-forwarder`.
    pub fn relay_name(&self) -> String {
        self.relay_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "packet-forwarder".to_owned())
        })
    }

    /// The database URL; present once `validate` has passed.
    pub fn database_url(&self) -> &str {
        self.database_url.as_ref().map_or("", Secret::expose)
    }
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9480))
}

fn default_udp_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_tcp_buffer() -> usize {
    64 << 10
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}

fn default_max_flows_total() -> u32 {
    200_000
}

fn default_tcp_keepalive() -> Duration {
    Duration::from_secs(60)
}

fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(900)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../deploy/packet-forwarder.toml");
        let config = Config::parse(text).expect("example parses");
        config.validate().expect("example validates");
        assert_eq!(config.metrics_listen.port(), 9480);
        assert_eq!(config.udp_idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn defaults_apply() {
        let config = Config::parse("database_url = 'postgres://localhost/tether'").expect("parses");
        assert_eq!(config.metrics_listen, default_metrics_listen());
        assert_eq!(config.connect_timeout, Duration::from_secs(3));
        assert_eq!(config.tcp_buffer, 65536);
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let err = Config::parse("metrics_lisen = '127.0.0.1:1'").expect_err("unknown key refused");
        assert!(err.to_string().contains("metrics_lisen"), "{err}");
        let err = Config::parse("udp_idle_timeout = 'soon'").expect_err("bad duration refused");
        assert!(err.to_string().contains("udp_idle_timeout"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("", "database_url"),
            ("database_url = 'mysql://x'", "database_url"),
            ("database_url = 'postgres://x'\nudp_idle_timeout = '1ms'", "udp_idle_timeout"),
            ("database_url = 'postgres://x'\nconnect_timeout = '2m'", "connect_timeout"),
            ("database_url = 'postgres://x'\ntcp_buffer = 10", "tcp_buffer"),
        ] {
            let config = Config::parse(text).expect("parses");
            let err = config.validate().expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn env_overrides_file_and_secrets_are_masked() {
        let mut config = Config::parse("database_url = 'postgres://file/db'").expect("parses");
        config.apply_env(&|key| (key == "DATABASE_URL").then(|| "postgres://env/db".into()));
        assert_eq!(config.database_url(), "postgres://env/db");
        let debug = format!("{config:?}");
        assert!(!debug.contains("postgres://"), "{debug}");
    }
}
