//! Host migrations move through their phases here: every [`TICK`] one statement per phase change
//! ([`store::migration::advance`]). The statements are conditional on the phase they leave, so several dns nodes
//! running this against one database change each migration once. Each change notifies the domain (a trigger), so the
//! answers and the relays follow within a view reload.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::migration;

/// How often phases are checked.
pub const TICK: Duration = Duration::from_millis(250);
/// How long an announced migration waits for a relay to hold its old address before it goes on without one.
pub const RELAY_WAIT: Duration = Duration::from_secs(5);

/// Advances migrations until `shutdown`. A database error is logged and retried at the next tick.
pub async fn run(pool: PgPool, shutdown: CancellationToken) {
    let mut tick = tether_config::ticker(TICK);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match migration::advance(&pool, RELAY_WAIT).await {
            Ok(changes) => {
                failing = false;
                for change in changes {
                    info!(migration = change.id, domain = %change.fqdn, phase = %change.phase, flows = change.flows,
                        "migration phase changed");
                }
            }
            Err(error) if !failing => {
                failing = true;
                warn!(%error, "cannot advance migrations; retrying");
            }
            Err(_) => {}
        }
    }
}
