//! What every tether binary's configuration file shares: strict TOML read from one file, errors that name the key,
//! and shutdown on SIGTERM or Ctrl-C.

use std::path::Path;

use serde::de::DeserializeOwned;
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

/// Reads and parses a TOML file.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
    Ok(toml::from_str(&text)?)
}

/// An error for `key`.
pub fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, problem: problem.into() }
}

/// `DATABASE_URL` from the environment when set, else the file's value; then checked for the scheme.
pub fn database_url(from_file: Option<String>) -> Option<String> {
    std::env::var("DATABASE_URL").ok().filter(|url| !url.is_empty()).or(from_file)
}

/// Checks a database URL's presence and scheme.
pub fn check_database_url(url: Option<&str>) -> Result<(), ConfigError> {
    match url {
        None => Err(invalid("database_url", "missing (set it here or in DATABASE_URL)")),
        Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => {
            Err(invalid("database_url", "must start with postgres:// or postgresql://"))
        }
        Some(_) => Ok(()),
    }
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
