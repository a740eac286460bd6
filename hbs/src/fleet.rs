//! Fleet upkeep, every few seconds: this server's `heartbeat_servers` row (load, capacity, full/active), the
//! operator's drain flag, orphaned NCU addresses of vanished servers, and static addresses to take over.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{driver::Counters, metrics::Metrics, store};

/// What the upkeep needs.
pub struct Fleet {
    /// Postgres.
    pub pool: PgPool,
    /// This server's name.
    pub me: String,
    /// The control address hds hands out.
    pub advertise: String,
    /// Most addresses carried.
    pub capacity: u32,
    /// Back to active below this share of capacity.
    pub low_water: f64,
    /// Refresh period.
    pub every: Duration,
    /// Orphans of servers silent this long become dead.
    pub rehome_grace: Duration,
    /// Published when the operator drains this server.
    pub draining: watch::Sender<bool>,
    /// The driver's counters (the load).
    pub counters: Arc<Counters>,
    /// Where draining and reachability show.
    pub metrics: Arc<Metrics>,
}

/// Runs until `shutdown`.
pub async fn run(fleet: Fleet, shutdown: CancellationToken) {
    let mut full = false;
    let mut interval = tether_config::ticker(fleet.every);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let load = u32::try_from(fleet.counters.targets.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        full = next_full(full, load, fleet.capacity, fleet.low_water);
        match store::fleet_upsert(&fleet.pool, &fleet.me, &fleet.advertise, fleet.capacity, load, full).await {
            Ok(state) => {
                fleet.metrics.database_reachable.set(1);
                let draining = state == "draining";
                fleet.metrics.draining.set(i64::from(draining));
                if draining != *fleet.draining.borrow() {
                    info!(draining, "drain state changed");
                    fleet.draining.send_replace(draining);
                    if draining && let Err(error) = store::release_static(&fleet.pool, &fleet.me).await {
                        warn!(%error, "cannot release static checks");
                    }
                }
            }
            Err(error) => {
                if error.is_unavailable() {
                    fleet.metrics.database_reachable.set(0);
                }
                warn!(%error, "cannot refresh the fleet row");
            }
        }
        match store::expire_orphans(&fleet.pool, fleet.rehome_grace).await {
            Ok(0) => {}
            Ok(n) => warn!(addresses = n, "addresses of a vanished heartbeat server did not re-home; marked dead"),
            Err(error) => warn!(%error, "cannot expire orphaned addresses"),
        }
        if !*fleet.draining.borrow() {
            match store::claim_static(&fleet.pool, &fleet.me, fleet.rehome_grace).await {
                Ok(0) => {}
                Ok(n) => info!(addresses = n, "took over static address checks"),
                Err(error) => warn!(%error, "cannot claim static checks"),
            }
        }
    }
}

/// Full at capacity; active again only below the low-water mark (hysteresis).
pub fn next_full(full: bool, load: u32, capacity: u32, low_water: f64) -> bool {
    if load >= capacity {
        true
    } else if full {
        f64::from(load) >= f64::from(capacity) * low_water
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::next_full;

    #[test]
    fn full_has_hysteresis() {
        assert!(!next_full(false, 99, 100, 0.9));
        assert!(next_full(false, 100, 100, 0.9));
        assert!(next_full(true, 95, 100, 0.9), "stays full above low water");
        assert!(!next_full(true, 89, 100, 0.9));
    }
}
