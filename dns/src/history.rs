//! Keeps the address history bounded: every [`EVERY`] events older than `event_retention` are deleted in batches
//! ([`store::events::prune`]). Any number of dns nodes may run it.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store;

/// How often old events are pruned.
pub const EVERY: Duration = Duration::from_secs(60);
/// Rows per delete statement.
pub const BATCH: i64 = 10_000;
/// Statements per run at most: a backlog goes over several runs.
pub const BATCHES: u32 = 50;

/// Prunes until `shutdown`.
pub async fn run(pool: PgPool, retention: Duration, shutdown: CancellationToken) {
    let mut tick = tether_config::ticker(EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store::events::prune(&pool, retention, BATCH, BATCHES).await {
            Ok(0) => {}
            Ok(deleted) => info!(deleted, ?retention, "old address events pruned"),
            Err(error) => warn!(%error, "cannot prune address events; next run"),
        }
    }
}
