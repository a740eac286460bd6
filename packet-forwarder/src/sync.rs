//! Keeps the target table fresh: follows `tether_changes` with the shared change feed ([`tether_db::feed::follow`]), reloads
//! only the domains a notification names (everything after a reconnection), and swaps the new table in. After a
//! swap the flows to addresses that left the live set are closed, and the listeners are reconciled.

use std::{sync::Arc, time::Duration};

use sqlx::PgPool;
use tether_db::feed::{self, Changes};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    Shared,
    store::{self, StoreError},
    table::Table,
};

/// Runs until `shutdown`; `synced` turns true after the first full load. Zone notifications carry nothing the
/// forwarder uses (and a zone with domains cannot be deleted), so only domains are reloaded.
pub async fn run(
    pool: PgPool,
    shared: Arc<Shared>,
    max_backoff: Duration,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let metrics = shared.metrics.feed.clone();
    let apply = |changes: Changes| {
        let (pool, shared) = (pool.clone(), shared.clone());
        async move { apply(&pool, &shared, &changes).await }
    };
    feed::follow(pool.clone(), max_backoff, metrics, apply, synced, shutdown).await;
}

async fn apply(pool: &PgPool, shared: &Shared, pending: &Changes) -> Result<(), StoreError> {
    let (table, removed) = if pending.full {
        let rows = store::load_all(pool, &shared.targets).await?;
        let built = Table::build(rows, &shared.table.load());
        info!(domains = built.0.domain_count(), listeners = built.0.keys().len(), "target table loaded");
        shared.metrics.full_reloads.inc();
        built
    } else {
        let ids: Vec<i64> = pending.domains.iter().copied().collect();
        let rows = store::load_domains(pool, &ids, &shared.targets).await?;
        let mut changes: Vec<_> = ids.iter().map(|&id| (id, None)).collect();
        for row in rows {
            if let Some(change) = changes.iter_mut().find(|(id, _)| *id == row.id) {
                change.1 = Some(row);
            }
        }
        debug!(domains = ids.len(), "applying changes");
        shared.metrics.partial_reloads.inc();
        shared.table.load().with_changes(changes)
    };
    for conflict in table.conflicts() {
        warn!(listener = %conflict.key, kept = %conflict.kept, refused = %conflict.refused,
            "two domains claim one listener; the older keeps it");
    }
    shared.publish(table);
    // Migrations notify their domain when created, deleted or moved on; the relay wants them all (a handful).
    shared.redirects.send_if_modified({
        let redirects = store::redirects(pool).await?;
        move |current| {
            let changed = *current != redirects;
            *current = redirects;
            changed
        }
    });
    // New flows already avoid these addresses; now close the ones running to them.
    if !removed.is_empty() {
        debug!(targets = removed.len(), "closing flows to addresses no longer live");
    }
    for state in removed {
        state.close();
    }
    Ok(())
}
