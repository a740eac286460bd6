//! The `ncu run` configuration file: strict TOML, named defaults, validated once.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use tether_config::invalid;

pub use tether_config::{ConfigError, Load};

/// Everything `ncu run` reads from its `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// hds addresses (`host:port`), tried in turn.
    pub hds: Vec<String>,
    /// Directory holding the identity written by `ncu enroll`.
    #[serde(default = "default_identity")]
    pub identity: PathBuf,
    /// Move to the backup heartbeat server when the primary's heartbeats stop for this long.
    #[serde(default = "default_failover_after", with = "humantime_serde")]
    pub failover_after: Duration,
    /// Fixed uplinks. When none are listed, uplinks are discovered from the kernel (netlink).
    #[serde(default, rename = "uplink")]
    pub uplinks: Vec<UplinkConfig>,
    /// Discovery: the interfaces that are uplinks; by default every interface with a default route.
    #[serde(default)]
    pub interfaces: Option<Vec<String>>,
    /// Discovery: full re-read of addresses and routes, the safety net for missed events.
    #[serde(default = "default_rescan_every", with = "humantime_serde")]
    pub rescan_every: Duration,
    /// Discovery: how an uplink is validated: `hds` (a QUIC handshake with hds through it) or `tcp:HOST:PORT`.
    #[serde(default = "default_validate")]
    pub validate: String,
    /// Discovery: how long one validation may take.
    #[serde(default = "default_validate_timeout", with = "humantime_serde")]
    pub validate_timeout: Duration,
    /// Discovery: longest wait between checks of a non-Internet uplink.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Discovery: priority per interface (lower is preferred; default 0).
    #[serde(default)]
    pub priorities: std::collections::BTreeMap<String, u16>,
    /// Discovery: weight per interface (default 1).
    #[serde(default)]
    pub weights: std::collections::BTreeMap<String, u16>,
    /// Spread outgoing traffic: a multipath default route over the valid uplinks, restored on exit.
    #[serde(default)]
    pub manage_routes: bool,
    /// Metric of that route; lower than the system's default routes so it takes precedence.
    #[serde(default)]
    pub route_metric: u32,
    /// Log format: `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// What each service tuple bound to this site's addresses is, by service name (`[services.https]`): a port
    /// forward to a LAN server (`to`), or commands that start and stop it here (`start`, `stop`), and its check.
    #[serde(default)]
    pub services: std::collections::BTreeMap<String, crate::services::ServiceConfig>,
    /// The load announced with each heartbeat reply: `cpu` (the load average per CPU), `file:PATH` (a number 0-100
    /// in that file) or `connections:N` (established TCP connections on the tuples' ports, as a share of N).
    #[serde(default)]
    pub load: crate::load::LoadSource,
}

/// One uplink from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Interface name.
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Lower is preferred.
    #[serde(default)]
    pub priority: u16,
    /// Share among equals.
    #[serde(default = "one")]
    pub weight: u16,
}

impl Load for Config {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.hds.is_empty() {
            return Err(invalid("hds", "at least one hds address"));
        }
        if self.failover_after < Duration::from_millis(500) {
            return Err(invalid("failover_after", "must be at least 500ms"));
        }
        if self.uplinks.len() > tether_proto::control::MAX_UPLINKS {
            return Err(invalid("uplink", format!("at most {} uplinks", tether_proto::control::MAX_UPLINKS)));
        }
        for (i, uplink) in self.uplinks.iter().enumerate() {
            if self.uplinks[..i].iter().any(|u| u.name == uplink.name) {
                return Err(invalid("uplink", format!("duplicate uplink name {:?}", uplink.name)));
            }
            if uplink.weight == 0 {
                return Err(invalid("uplink", format!("uplink {:?}: weight must be above zero", uplink.name)));
            }
        }
        if self.validate != "hds" && self.tcp_target().is_none() {
            return Err(invalid("validate", "`hds` or `tcp:HOST:PORT` with an IP address"));
        }
        if self.rescan_every < Duration::from_secs(1) {
            return Err(invalid("rescan_every", "must be at least 1s"));
        }
        if self.weights.values().any(|w| *w == 0) {
            return Err(invalid("weights", "weights must be above zero"));
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return Err(invalid("log_format", "must be text or json"));
        }
        for (name, service) in &self.services {
            service.validate(name).map_err(|reason| invalid("services", reason))?;
        }
        Ok(())
    }
}

impl Config {
    /// The TCP validation target, when `validate` is `tcp:HOST:PORT`.
    pub fn tcp_target(&self) -> Option<std::net::SocketAddr> {
        self.validate.strip_prefix("tcp:")?.parse().ok()
    }
}

fn default_rescan_every() -> Duration {
    Duration::from_secs(30)
}

fn default_validate() -> String {
    "hds".into()
}

fn default_validate_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}

fn default_identity() -> PathBuf {
    PathBuf::from("/var/lib/tether-ncu")
}

fn default_failover_after() -> Duration {
    Duration::from_secs(3)
}

fn default_log_format() -> String {
    "text".into()
}

fn one() -> u16 {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let config = Config::parse(include_str!("../../deploy/ncu.toml")).expect("parses");
        config.validate().expect("validates");
        assert_eq!(config.failover_after, Duration::from_secs(3));
        assert!(config.uplinks.is_empty(), "the example discovers its uplinks");
        assert_eq!(config.priorities.get("wan2"), Some(&10));
    }

    #[test]
    fn discovery_settings_parse_and_validate() {
        let config = Config::parse(
            "hds = ['127.0.0.1:4433']\ninterfaces = ['wan1', 'wan2']\nvalidate = 'tcp:198.18.0.1:7'\n\
             [priorities]\nwan2 = 10\n",
        )
        .expect("parses");
        config.validate().expect("validates");
        assert_eq!(config.tcp_target(), Some("198.18.0.1:7".parse().expect("addr")));
        assert_eq!(config.rescan_every, Duration::from_secs(30));
        let bad = Config::parse("hds = ['a:1']\nvalidate = 'ping'").expect("parses");
        assert!(bad.validate().expect_err("bad validate").to_string().contains("validate"));
    }

    #[test]
    fn bad_keys_are_named() {
        let err = Config::parse("hds = ['a:1']\n[[uplink]]\nname = 'x'\naddress = 'nope'").expect_err("bad ip");
        assert!(err.to_string().contains("address"), "{err}");
        let config = Config::parse("hds = []").expect("parses");
        assert!(config.validate().expect_err("no hds").to_string().contains("hds"));
    }
}
