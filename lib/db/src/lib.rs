//! tether's Postgres, shared by every server that uses it: the pool, the one migrator (`migrations/`, embedded), the
//! typed errors every query returns, the change feed ([`feed`]), the domain reader that dns and the forwarder share
//! ([`domains`]) and enrolled NCUs by certificate ([`ncus`]).

use std::time::Duration;

use sqlx::{PgPool, postgres::PgPoolOptions};

pub mod domains;
pub mod feed;
pub mod ncus;

/// The channel every change is announced on.
pub const CHANNEL: &str = "tether_changes";

/// The migrations in `migrations/`, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A database failure, classified for callers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Postgres cannot be reached or the pool is exhausted; worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A row with the same key exists, or a referenced row is in use.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A value was refused by a constraint.
    #[error("invalid value: {0}")]
    Invalid(String),
    /// Anything else; a bug or a schema mismatch.
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

/// The subscriber that owns the operator's own records (hds's `_tether-hds` SRV at a zone's apex): not a tenant,
/// so names under its domains are free for subscribers.
pub const OPERATOR_SUBSCRIBER: &str = "(operator)";

impl StoreError {
    /// True when the database is merely out of reach.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Self::Unavailable(error),
            sqlx::Error::Database(db) => {
                let constraint = db.constraint().unwrap_or("constraint").to_owned();
                match db.code().as_deref() {
                    Some("23505") => Self::Conflict(format!("duplicate ({constraint})")),
                    Some("23503") => Self::Conflict(format!("still referenced ({constraint})")),
                    Some("23514" | "23502" | "22003" | "22P02") => Self::Invalid(constraint),
                    // admin_shutdown, crash_shutdown, cannot_connect_now
                    Some("57P01" | "57P02" | "57P03") => Self::Unavailable(error),
                    _ => Self::Other(error),
                }
            }
            _ => Self::Other(error),
        }
    }
}

/// Opens a pool without connecting yet; connections are made on demand.
pub fn pool(url: &str) -> Result<PgPool, StoreError> {
    let options: sqlx::postgres::PgConnectOptions = url.parse().map_err(StoreError::Other)?;
    Ok(PgPoolOptions::new().max_connections(8).acquire_timeout(Duration::from_secs(3)).connect_lazy_with(options))
}

/// Applies pending migrations once. Safe when several binaries start at once: the migrator holds an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(|error| match error {
        sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
        other => StoreError::Other(sqlx::Error::Migrate(Box::new(other))),
    })
}

/// Applies migrations, waiting for Postgres with backoff while it is out of reach. False when shut down while
/// waiting.
pub async fn wait_and_migrate(
    pool: &PgPool,
    max_backoff: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool, StoreError> {
    let mut delay = Duration::from_millis(100);
    loop {
        match migrate(pool).await {
            Ok(()) => return Ok(true),
            Err(error) if error.is_unavailable() => {
                tracing::warn!(%error, retry_in = ?delay, "waiting for Postgres");
            }
            Err(error) => return Err(error),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(max_backoff);
    }
}
