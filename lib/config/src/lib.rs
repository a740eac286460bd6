//! What every tether binary's configuration file shares: strict TOML read from one file, errors that name the key,
//! environment overrides, masked secrets, and shutdown on SIGTERM or Ctrl-C.

use std::{fmt, path::Path};

use serde::{Deserialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;

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

/// A configuration file: strict TOML (the type denies unknown fields), then the environment, then `validate`.
pub trait Load: DeserializeOwned {
    /// Lets environment variables override the file; `var` reads one (a closure, so tests need no real environment).
    fn apply_env(&mut self, var: &dyn Fn(&str) -> Option<String>) {
        let _ = var;
    }

    /// Checks what serde cannot.
    fn validate(&self) -> Result<(), ConfigError>;

    /// Parses TOML text without looking at the environment or validating.
    fn parse(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses the file at `path`, applies the environment, and validates.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let mut config = Self::parse(&text)?;
        config.apply_env(&|key| std::env::var(key).ok());
        config.validate()?;
        Ok(config)
    }
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

/// An error for `key`.
pub fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

/// Overrides `slot` with the environment variable `name` when it is set and not empty.
pub fn env_secret(slot: &mut Option<Secret>, var: &dyn Fn(&str) -> Option<String>, name: &str) {
    if let Some(value) = var(name).filter(|value| !value.is_empty()) {
        *slot = Some(Secret(value));
    }
}

/// Checks a database URL's presence and scheme (`database_url`, overridden by `DATABASE_URL`).
pub fn check_database(url: Option<&Secret>) -> Result<(), ConfigError> {
    match url.map(Secret::expose) {
        None => Err(invalid("database_url", "missing (set it here or in DATABASE_URL)")),
        Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => {
            Err(invalid("database_url", "must start with postgres:// or postgresql://"))
        }
        Some(_) => Ok(()),
    }
}

/// Checks a back-off ceiling (`max_backoff`).
pub fn check_backoff(max_backoff: std::time::Duration) -> Result<(), ConfigError> {
    if max_backoff < std::time::Duration::from_millis(100) {
        return Err(invalid("max_backoff", "must be at least 100ms"));
    }
    Ok(())
}

/// Checks that each `(key, path)` names a readable file.
pub fn check_files(files: &[(&'static str, &Path)]) -> Result<(), ConfigError> {
    for (key, path) in files {
        if !path.is_file() {
            return Err(invalid(key, format!("{} is not a readable file", path.display())));
        }
    }
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            tracing::error!("cannot watch SIGTERM");
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        shutdown.cancel();
    });
}

/// Private, loopback, shared, link-local, benchmarking and documentation space: no subscriber's traffic is sent
/// there (relayed, redirected, answered as a fallback) unless the operator opens a range.
pub const RESERVED_RANGES: [&str; 16] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "240.0.0.0/4",
    "::1/128",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
];

/// Where subscribers' traffic may go: anywhere but [`RESERVED_RANGES`] and the operator's own addresses, except the
/// ranges the operator allows (`allowed_target_ranges`; the tests and the demo open 198.18.0.0/15).
#[derive(Debug, Clone, Default)]
pub struct TargetPolicy {
    /// Opened by the operator.
    pub allowed: Vec<ipnet::IpNet>,
    /// The operator's own service addresses: never a target, whatever is allowed.
    pub operator: Vec<ipnet::IpNet>,
}

impl TargetPolicy {
    /// `Err` with the rule `ip` breaks, for the message; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn check(&self, ip: std::net::IpAddr) -> Result<(), String> {
        let ip = ip.to_canonical();
        if let Some(range) = self.operator.iter().find(|r| r.contains(&ip)) {
            return Err(format!("{ip} is the operator's own ({range})"));
        }
        if self.allowed.iter().any(|r| r.contains(&ip)) {
            return Ok(());
        }
        for range in RESERVED_RANGES {
            let Ok(range) = range.parse::<ipnet::IpNet>() else { continue };
            if range.contains(&ip) {
                return Err(format!(
                    "{ip} is in private or reserved space ({range}); the operator may allow it with allowed_target_ranges"
                ));
            }
        }
        Ok(())
    }
}

/// The next round of a task that keeps something equal to a wanted set: returns when `wanted` changed or `tick`
/// fired; false on `shutdown` or once the set's sender is gone.
pub async fn next_round<T>(
    shutdown: &CancellationToken,
    wanted: &mut tokio::sync::watch::Receiver<T>,
    tick: &mut tokio::time::Interval,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        changed = wanted.changed() => changed.is_ok(),
        _ = tick.tick() => true,
    }
}

/// A timer for a periodic task: the first tick at once, then every `period`; a late tick delays the next ones
/// rather than bursting to catch up.
pub fn ticker(period: std::time::Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_outside_reserved_space_pass_unless_opened_or_the_operators() {
        use super::TargetPolicy;
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        let closed = TargetPolicy::default();
        for reserved in
            ["10.1.2.3", "127.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:192.168.1.1", "198.18.0.5", "100.64.0.1"]
        {
            assert!(closed.check(ip(reserved)).is_err(), "{reserved}");
        }
        for public in ["8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1"] {
            assert!(closed.check(ip(public)).is_ok(), "{public}");
        }
        let open = TargetPolicy {
            allowed: vec!["198.18.0.0/15".parse().expect("net")],
            operator: vec!["198.18.0.1/32".parse().expect("net"), "9.9.9.0/24".parse().expect("net")],
        };
        assert!(open.check(ip("198.18.7.7")).is_ok());
        assert!(open.check(ip("198.18.0.1")).unwrap_err().contains("operator's own"));
        assert!(open.check(ip("9.9.9.9")).unwrap_err().contains("operator's own"));
        assert!(open.check(ip("10.0.0.1")).unwrap_err().contains("10.0.0.0/8"));
    }

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        #[serde(default)]
        database_url: Option<Secret>,
    }

    impl Load for Example {
        fn apply_env(&mut self, var: &dyn Fn(&str) -> Option<String>) {
            env_secret(&mut self.database_url, var, "DATABASE_URL");
        }

        fn validate(&self) -> Result<(), ConfigError> {
            check_database(self.database_url.as_ref())
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let error = Example::parse("database_ulr = 'x'").expect_err("unknown key refused");
        assert!(error.to_string().contains("database_ulr"), "{error}");
        let error = Example::parse("database_url = 'mysql://x'").and_then(|c| c.validate()).expect_err("scheme");
        assert!(error.to_string().contains("database_url"), "{error}");
        let error = Example::parse("").and_then(|c| c.validate()).expect_err("missing");
        assert!(error.to_string().contains("DATABASE_URL"), "{error}");
    }

    #[test]
    fn environment_overrides_and_secrets_are_masked() {
        let mut config = Example::parse("database_url = 'postgres://file/db'").expect("parses");
        config.apply_env(&|key| (key == "DATABASE_URL").then(|| "postgres://env/db".to_owned()));
        assert_eq!(config.database_url.as_ref().map(Secret::expose), Some("postgres://env/db"));
        config.apply_env(&|_| Some(String::new()));
        assert_eq!(config.database_url.as_ref().map(Secret::expose), Some("postgres://env/db"), "empty ignored");
        assert!(!format!("{config:?}").contains("postgres://"), "{config:?}");
    }

    #[test]
    fn missing_files_are_named() {
        let error = check_files(&[("ca", Path::new("/nonexistent/ca.pem"))]).expect_err("missing file");
        assert!(error.to_string().contains("`ca`"), "{error}");
    }
}
