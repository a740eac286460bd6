//! Keeps the view fresh: follows `tether_changes` ([`tether_db::feed::follow`]), reloads only what a notification
//! names, builds the next view and swaps it in atomically; the last view keeps answering while Postgres is away.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use sqlx::PgPool;
use tether_db::{
    StoreError,
    feed::{self, Changes},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{
    metrics::Metrics,
    store,
    view::{Change, View},
};

/// The view being served and what is known about its freshness.
pub struct Shared {
    /// The view every query reads.
    pub view: ArcSwap<View>,
    /// Unix time (ms) of the last successful reload; 0 before the first.
    pub last_sync_ms: AtomicI64,
    /// Counters and gauges.
    pub metrics: Metrics,
    /// Bumped after every view swap, for those that act on changes (NOTIFY).
    generation: watch::Sender<u64>,
    /// Where subscribers' addresses may point (the API, UPDATE and dyndns check it).
    pub targets: tether_config::TargetPolicy,
    /// Most addresses a domain may have (the API and UPDATE check it).
    pub addresses_per_domain: u32,
    /// Response rate limiting of UDP answers.
    pub rrl: crate::rrl::Limiter,
}

impl Shared {
    /// An empty view, not yet synced.
    pub fn new() -> Self {
        Self {
            view: ArcSwap::from_pointee(View::empty()),
            last_sync_ms: AtomicI64::new(0),
            metrics: Metrics::new(),
            generation: watch::Sender::new(0),
            targets: tether_config::TargetPolicy::default(),
            addresses_per_domain: 64,
            rrl: crate::rrl::Limiter::off(),
        }
    }

    /// The same, with the most addresses a domain may have.
    pub fn with_address_bound(self, addresses_per_domain: u32) -> Self {
        Self { addresses_per_domain, ..self }
    }

    /// The same, rate limiting UDP answers with `settings`.
    pub fn with_rrl(self, settings: crate::rrl::Settings) -> Self {
        Self { rrl: crate::rrl::Limiter::new(settings), ..self }
    }

    /// The same, with the operator's target policy.
    pub fn with_targets(self, targets: tether_config::TargetPolicy) -> Self {
        Self { targets, ..self }
    }

    /// Wakes on every view swap after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn publish(&self, view: View) {
        self.metrics.domains.set(i64::try_from(view.domain_count()).unwrap_or(i64::MAX));
        self.metrics.zones.set(i64::try_from(view.zone_count()).unwrap_or(i64::MAX));
        self.view.store(Arc::new(view));
        self.last_sync_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
    }
}

impl tether_service::http::Status for Shared {
    fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// Ready once the first view is loaded.
    fn health(&self) -> (bool, String) {
        let last = self.last_sync_ms.load(Ordering::Relaxed);
        let connected = self.metrics.feed.connected.get() == 1;
        let body = format!(
            "{{\"status\":\"{}\",\"database\":\"{}\",\"last_sync_ms\":{last}}}",
            if last > 0 { "ok" } else { "starting" },
            if connected { "connected" } else { "disconnected" },
        );
        (last > 0, body)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps the DNS view fresh until `shutdown`; `synced` turns true after the first full load.
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
    if pending.full {
        let (zones, domains) = store::view::load_all(pool).await?;
        let view = View::build(zones, domains);
        info!(zones = view.zone_count(), domains = view.domain_count(), "view loaded");
        shared.publish(view);
        shared.metrics.full_reloads.inc();
        return Ok(());
    }
    let domain_ids: Vec<i64> = pending.domains.iter().copied().collect();
    // A zone's row (its serial) is taken only from its own notification, which a change sends after its domains'
    // (migrations/20261204000005): a serial then never labels a part of the change it was bumped for.
    let zone_ids: Vec<i64> = pending.zones.iter().copied().collect();
    let (mut zones, domains) = store::view::load_changes(pool, &zone_ids, &domain_ids).await?;
    // The zone row may carry a serial a later change bumped, whose domains are not among these changes yet: the
    // serial its notifications named labels what is applied now.
    for zone in &mut zones {
        if let Some(&notified) = pending.serials.get(&zone.id) {
            zone.serial = zone.serial.min(notified);
        }
    }
    let current = shared.view.load();
    let mut changes = Vec::with_capacity(zone_ids.len() + domain_ids.len());
    for id in zone_ids {
        changes.push(Change::Zone(id, zones.iter().find(|z| z.id == id).cloned()));
    }
    for id in domain_ids {
        changes.push(Change::Domain(id, domains.iter().find(|d| d.id == id).cloned()));
    }
    debug!(changes = changes.len(), "applying changes");
    let next = current.with_changes(changes);
    shared.publish(next);
    shared.metrics.partial_reloads.inc();
    Ok(())
}
