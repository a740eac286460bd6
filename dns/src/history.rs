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
        match prune_change_log(&pool).await {
            Ok(0) => {}
            Ok(deleted) => info!(deleted, "old change log rows pruned"),
            Err(error) => warn!(%error, "cannot prune the change log; next run"),
        }
    }
}

/// How long `change_log` rows are kept: a reader of a hot standby that falls further behind reloads everything.
pub const CHANGE_LOG_KEEP: Duration = Duration::from_secs(600);

/// Deletes change log rows older than [`CHANGE_LOG_KEEP`], in batches; nothing on a hot standby (read-only).
pub async fn prune_change_log(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    for _ in 0..BATCHES {
        let done = sqlx::query(
            "DELETE FROM change_log WHERE NOT pg_is_in_recovery() AND id IN \
             (SELECT id FROM change_log WHERE at < now() - make_interval(secs => $1) ORDER BY id LIMIT $2)",
        )
        .bind(CHANGE_LOG_KEEP.as_secs_f64())
        .bind(BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        deleted += done;
        if done < u64::try_from(BATCH).unwrap_or(u64::MAX) {
            break;
        }
    }
    Ok(deleted)
}
