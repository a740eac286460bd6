//! The `dns` configuration file: strict TOML, named defaults, validated once.

use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;
use tether_config::invalid;
pub use tether_config::{ConfigError, Load, LogFormat, Secret};

/// Everything `dns` reads from its `--config` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP and TCP address the authoritative server listens on.
    #[serde(default = "default_dns_listen")]
    pub dns_listen: SocketAddr,
    /// UDP sockets serving `dns_listen`, each read by a task of its own (SO_REUSEPORT: the kernel spreads queries
    /// over them by source). Unset: one per core the process may run on, as NSD's `server-count` and Knot's
    /// `udp-workers` default to.
    #[serde(default)]
    pub udp_workers: Option<usize>,
    /// TCP address of the admin API (HTTP, JSON).
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    /// Postgres URL; the environment variable `DATABASE_URL` takes precedence.
    #[serde(default)]
    pub database_url: Option<Secret>,
    /// Where the view is read from, when not `database_url`: a hot standby of it at this master's own site (the
    /// environment variable `TETHER_VIEW_DATABASE_URL` takes precedence). Writes (the API, UPDATE, migrations) still
    /// go to `database_url`; while that is away this dns serves on from its own replica.
    #[serde(default)]
    pub view_database_url: Option<Secret>,
    /// Bearer token of the operator; the environment variable `TETHER_OPERATOR_TOKEN` takes precedence.
    #[serde(default)]
    pub operator_token: Option<Secret>,
    /// Log format: `text` or `json`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Idle time after which a DNS-over-TCP connection is closed.
    #[serde(default = "default_tcp_idle_timeout", with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// DNS-over-TCP connections open at once; a connection past it is closed as soon as it is accepted.
    #[serde(default = "default_tcp_max_connections")]
    pub tcp_max_connections: usize,
    /// DNS-over-TCP connections open at once from one source address (IPv6: one /64).
    #[serde(default = "default_tcp_max_connections_per_source")]
    pub tcp_max_connections_per_source: usize,
    /// Lifetime of NCU enrollment tokens issued by the admin API.
    #[serde(default = "default_enrollment_ttl", with = "humantime_serde")]
    pub enrollment_ttl: Duration,
    /// Longest wait between two attempts to reach Postgres.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// TSIG keys any zone's transfer policy may name (`[[tsig_keys]]` with `name`, `algorithm`, `secret`).
    #[serde(default)]
    pub tsig_keys: Vec<crate::xfr::TsigKey>,
    /// Told by NOTIFY of every change of every zone that has a transfer policy, besides the zone's own targets.
    #[serde(default)]
    pub also_notify: Vec<SocketAddr>,
    /// Proxies in front of the admin API whose `X-Forwarded-For` names a dyndns client's address; from anyone
    /// else the header is ignored.
    #[serde(default)]
    pub dyndns_trusted_proxies: Vec<ipnet::IpNet>,
    /// A migration's default hold: this many times the longest TTL its name was ever served with.
    #[serde(default = "default_migration_hold_factor")]
    pub migration_hold_factor: u32,
    /// A migration's default quiet time: it ends only after this long without a redirected flow.
    #[serde(default = "default_migration_quiet", with = "humantime_serde")]
    pub migration_quiet: Duration,
    /// Ranges of private or reserved space (`tether_config::RESERVED_RANGES`) that subscribers' addresses,
    /// fallbacks and migration targets may still use (say, a lab's 10.0.0.0/8); the rest of that space is refused.
    #[serde(default)]
    pub allowed_target_ranges: Vec<ipnet::IpNet>,
    /// The operator's own service addresses (its DNS, API, heartbeat and forwarder addresses): never a
    /// subscriber's target.
    #[serde(default)]
    pub operator_addresses: Vec<ipnet::IpNet>,
    /// Most addresses one domain may have: static ones through the API or UPDATE, and NCUs enrolled (hbs has the
    /// same bound for what NCUs register). A domain's answers are compiled with every rotation of its addresses, so
    /// this bounds its memory (64: 4,096 records).
    #[serde(default = "default_max_addresses_per_domain")]
    pub max_addresses_per_domain: u32,
    /// Response rate limiting over UDP: answers per second one source prefix gets for one name (errors: for one
    /// response code); 0 turns it off.
    #[serde(default = "default_rrl_responses_per_second")]
    pub rrl_responses_per_second: u32,
    /// Every this many answers over the rate one goes out truncated (a resolver then asks over TCP); 0 drops all.
    #[serde(default = "default_rrl_slip")]
    pub rrl_slip: u32,
    /// Prefix lengths a source is counted by: IPv4, IPv6.
    #[serde(default = "default_rrl_prefixes")]
    pub rrl_prefixes: (u8, u8),
    /// Sources never rate limited (default: loopback, for local monitoring and benchmarks).
    #[serde(default = "default_rrl_exempt")]
    pub rrl_exempt: Vec<ipnet::IpNet>,
    /// Most domains one subscriber may have.
    #[serde(default = "default_max_domains_per_subscriber")]
    pub max_domains_per_subscriber: u32,
    /// Admin API requests one token may make per second; more get 429.
    #[serde(default = "default_api_requests_per_second")]
    pub api_requests_per_second: u32,
    /// How long the address history (registrations, transitions, handovers) is kept.
    #[serde(default = "default_event_retention", with = "humantime_serde")]
    pub event_retention: Duration,
}

impl Load for Config {
    /// Lets `DATABASE_URL` and `TETHER_OPERATOR_TOKEN` override the file.
    fn apply_env(&mut self, var: &dyn Fn(&str) -> Option<String>) {
        tether_config::env_secret(&mut self.database_url, var, "DATABASE_URL");
        tether_config::env_secret(&mut self.operator_token, var, "TETHER_OPERATOR_TOKEN");
        tether_config::env_secret(&mut self.view_database_url, var, "TETHER_VIEW_DATABASE_URL");
    }

    /// Checks what serde cannot: presence of the database URL, token strength, sane durations.
    fn validate(&self) -> Result<(), ConfigError> {
        tether_config::check_database(self.database_url.as_ref())?;
        if let Some(token) = &self.operator_token
            && token.expose().len() < 16
        {
            return Err(invalid("operator_token", "must be at least 16 characters"));
        }
        if self.dns_listen == self.api_listen && self.dns_listen.port() != 0 {
            return Err(invalid("api_listen", "must differ from dns_listen"));
        }
        for (i, key) in self.tsig_keys.iter().enumerate() {
            if let Err(error) = key.signer() {
                return Err(invalid("tsig_keys", format!("entry {i}: {error}")));
            }
            if self.tsig_keys[..i].iter().any(|k| k.name.eq_ignore_ascii_case(&key.name)) {
                return Err(invalid("tsig_keys", format!("entry {i}: name {} defined twice", key.name)));
            }
        }
        if let Some(addr) = self.also_notify.iter().find(|a| a.port() == 0 || a.ip().is_unspecified()) {
            return Err(invalid("also_notify", format!("{addr} is not a unicast address with a port")));
        }
        if self.udp_workers.is_some_and(|workers| !(1..=MAX_UDP_WORKERS).contains(&workers)) {
            return Err(invalid("udp_workers", format!("must be 1 to {MAX_UDP_WORKERS}")));
        }
        if self.tcp_idle_timeout.is_zero() {
            return Err(invalid("tcp_idle_timeout", "must be above zero"));
        }
        if !(1..=65_536).contains(&self.tcp_max_connections) {
            return Err(invalid("tcp_max_connections", "must be 1 to 65536"));
        }
        if !(1..=self.tcp_max_connections).contains(&self.tcp_max_connections_per_source) {
            return Err(invalid("tcp_max_connections_per_source", "must be 1 to tcp_max_connections"));
        }
        if self.event_retention < Duration::from_secs(3600) || self.event_retention > Duration::from_secs(3650 * 86_400)
        {
            return Err(invalid("event_retention", "must be between 1h and 3650d"));
        }
        if !(1..=1024).contains(&self.max_addresses_per_domain) {
            return Err(invalid("max_addresses_per_domain", "must be 1 to 1024"));
        }
        if self.rrl_slip > 100 {
            return Err(invalid("rrl_slip", "must be 0 to 100"));
        }
        if !(8..=32).contains(&self.rrl_prefixes.0) || !(16..=128).contains(&self.rrl_prefixes.1) {
            return Err(invalid("rrl_prefixes", "must be [8 to 32, 16 to 128]"));
        }
        if self.max_domains_per_subscriber == 0 {
            return Err(invalid("max_domains_per_subscriber", "must be above zero"));
        }
        if self.api_requests_per_second == 0 {
            return Err(invalid("api_requests_per_second", "must be above zero"));
        }
        if !(1..=1000).contains(&self.migration_hold_factor) {
            return Err(invalid("migration_hold_factor", "must be 1 to 1000"));
        }
        if self.migration_quiet > Duration::from_secs(604_800) {
            return Err(invalid("migration_quiet", "must be at most 7d"));
        }
        if self.enrollment_ttl < Duration::from_secs(60) {
            return Err(invalid("enrollment_ttl", "must be at least 1m"));
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
    /// The database URL; present once `validate` has passed.
    pub fn database_url(&self) -> &str {
        self.database_url.as_ref().map_or("", Secret::expose)
    }

    /// Where the view is read from: `view_database_url`, else the database.
    pub fn view_database_url(&self) -> &str {
        self.view_database_url.as_ref().map_or_else(|| self.database_url(), Secret::expose)
    }
}

fn default_dns_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 53))
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8053))
}

/// Most UDP sockets `udp_workers` may ask for.
pub const MAX_UDP_WORKERS: usize = 256;

impl Config {
    /// UDP sockets to serve on: `udp_workers`, or one per core this process may run on (its CPU affinity).
    pub fn udp_workers(&self) -> usize {
        self.udp_workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
            .clamp(1, MAX_UDP_WORKERS)
    }
}

fn default_tcp_idle_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_tcp_max_connections() -> usize {
    1024
}

fn default_tcp_max_connections_per_source() -> usize {
    16
}

fn default_enrollment_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_rrl_responses_per_second() -> u32 {
    20
}

fn default_rrl_slip() -> u32 {
    2
}

fn default_rrl_prefixes() -> (u8, u8) {
    (24, 56)
}

fn default_rrl_exempt() -> Vec<ipnet::IpNet> {
    ["127.0.0.0/8", "::1/128"].iter().filter_map(|net| net.parse().ok()).collect()
}

impl Config {
    /// The response rate limiter these settings describe.
    pub fn rrl(&self) -> crate::rrl::Settings {
        crate::rrl::Settings {
            rate: self.rrl_responses_per_second,
            slip: self.rrl_slip,
            ipv4_prefix: self.rrl_prefixes.0,
            ipv6_prefix: self.rrl_prefixes.1,
            exempt: self.rrl_exempt.clone(),
        }
    }
}

fn default_max_addresses_per_domain() -> u32 {
    64
}

fn default_max_domains_per_subscriber() -> u32 {
    100
}

fn default_api_requests_per_second() -> u32 {
    50
}

fn default_event_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}

fn default_migration_hold_factor() -> u32 {
    10
}

fn default_migration_quiet() -> Duration {
    Duration::from_secs(300)
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
    fn rate_limiting_is_on_by_default_and_its_settings_are_checked() {
        let base = "database_url = 'postgres://localhost/tether'\n";
        let config = Config::parse(base).expect("parses");
        let rrl = config.rrl();
        assert_eq!((rrl.rate, rrl.slip, rrl.ipv4_prefix, rrl.ipv6_prefix), (20, 2, 24, 56));
        assert_eq!(rrl.exempt.len(), 2, "loopback");
        let custom =
            format!("{base}rrl_prefixes = [20, 48]\nrrl_slip = 0\nrrl_exempt = []\nrrl_responses_per_second = 0\n");
        let config = Config::parse(&custom).expect("parses");
        config.validate().expect("validates");
        assert_eq!((config.rrl_prefixes, config.rrl_slip, config.rrl_exempt.len()), ((20, 48), 0, 0));
        for (bad, field) in [("rrl_prefixes = [4, 56]", "rrl_prefixes"), ("rrl_slip = 1000", "rrl_slip")] {
            let err = Config::parse(&format!("{base}{bad}\n")).expect("parses").validate().expect_err(bad);
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn transfer_keys_and_also_notify_are_checked_and_never_printed() {
        let base = "database_url = 'postgres://localhost/tether'\nalso_notify = ['198.18.0.2:53']\n";
        let good =
            format!("{base}[[tsig_keys]]\nname = 'xfr'\nsecret = 'dGV0aGVyLXRyYW5zZmVyLWtleS0zMi1ieXRlcy1sb25n'\n");
        let config = Config::parse(&good).expect("parses");
        config.validate().expect("validates");
        assert_eq!(config.also_notify.len(), 1);
        assert!(!format!("{config:?}").contains("dGV0aGVy"), "Debug hides the secret");
        let short = format!("{base}[[tsig_keys]]\nname = 'xfr'\nsecret = 'c2hvcnQ='\n");
        let err = Config::parse(&short).expect("parses").validate().expect_err("short secret");
        assert!(err.to_string().contains("tsig_keys") && err.to_string().contains("secret"), "{err}");
        let zero = "database_url = 'postgres://localhost/tether'\nalso_notify = ['198.18.0.2:0']\n";
        let err = Config::parse(zero).expect("parses").validate().expect_err("port 0");
        assert!(err.to_string().contains("also_notify"), "{err}");
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
        config.apply_env(&|key| match key {
            "DATABASE_URL" => Some("postgres://env/db".into()),
            _ => None,
        });
        assert_eq!(config.database_url(), "postgres://env/db");
        let debug = format!("{config:?}");
        assert!(!debug.contains("postgres://env/db"), "{debug}");
        assert!(!debug.contains("from-the-file"), "{debug}");
    }

    #[test]
    fn udp_workers_default_to_the_cores_and_are_bounded() {
        let config = Config::parse("database_url = 'postgres://x/y'").expect("parses");
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(config.udp_workers(), cores.min(MAX_UDP_WORKERS));
        let config = Config::parse("database_url = 'postgres://x/y'\nudp_workers = 3").expect("parses");
        config.validate().expect("3 workers are fine");
        assert_eq!(config.udp_workers(), 3);
        for workers in [0, MAX_UDP_WORKERS + 1] {
            let config =
                Config::parse(&format!("database_url = 'postgres://x/y'\nudp_workers = {workers}")).expect("parses");
            let err = config.validate().expect_err("out of bounds");
            assert!(err.to_string().contains("udp_workers"), "{err}");
        }
    }

    #[test]
    fn short_operator_token_refused() {
        let config = Config::parse("database_url = 'postgres://x/y'\noperator_token = 'short'").expect("parses");
        let err = config.validate().expect_err("short token refused");
        assert!(err.to_string().contains("operator_token"), "{err}");
    }
}
