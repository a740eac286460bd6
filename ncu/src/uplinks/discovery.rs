//! The discovery task: reads the kernel's tables on every netlink event (debounced) and every `rescan_every`,
//! reconciles, validates, and publishes the uplink set the agent registers.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    netlink,
    routes::RouteManager,
    state::{self, Candidate, Retry, Selection},
    validate::{self, Target},
};
use crate::agent::UplinkSpec;

/// How discovery behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Which interfaces are uplinks.
    pub selection: Selection,
    /// Full re-read period, the safety net for missed events.
    pub rescan_every: Duration,
    /// Where validation connects to.
    pub target: Target,
    /// How long one validation may take.
    pub validate_timeout: Duration,
    /// Longest wait between two checks of a non-Internet uplink.
    pub max_backoff: Duration,
    /// Priority per interface name (default 0).
    pub priorities: BTreeMap<String, u16>,
    /// Weight per interface name (default 1).
    pub weights: BTreeMap<String, u16>,
    /// Install a multipath default route over the valid uplinks with this metric (outbound spreading).
    pub manage_routes: Option<u32>,
}

/// Wait after a netlink event before re-reading, so a burst (address + route) is read once.
const DEBOUNCE: Duration = Duration::from_millis(2);

/// Longest a changed uplink's old address stays withdrawn-but-unannounced while its new address is validated. The
/// two normally go out as one change (one registration, one transaction on the server); a slow validation does
/// not keep the change from the agent longer than this.
const REPLACE_HOLD: Duration = Duration::from_millis(200);

/// Runs until `shutdown`, publishing the validated uplinks into `publish`.
pub async fn run(
    settings: Settings,
    publish: watch::Sender<Vec<UplinkSpec>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (connection, handle, mut events) = rtnetlink::new_multicast_connection(&netlink::GROUPS)?;
    tokio::spawn(connection);
    let mut routes = settings.manage_routes.map(|metric| RouteManager::new(handle.clone(), metric));
    let mut published: BTreeMap<String, Candidate> = BTreeMap::new();
    // Changed uplinks withdrawn from `published` but not announced yet, with the time they must be by.
    let mut held: BTreeMap<String, Instant> = BTreeMap::new();
    let mut retries: BTreeMap<String, Retry> = BTreeMap::new();
    let mut checks: JoinSet<(Candidate, Result<(), String>)> = JoinSet::new();
    let mut checking: Vec<String> = Vec::new();
    let mut offered: Vec<Candidate> = Vec::new();
    let mut rescan = tether_config::ticker(settings.rescan_every);
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            match netlink::read(&handle).await {
                Ok(observed) => offered = state::candidates(&observed, &settings.selection),
                Err(error) => {
                    warn!(%error, "cannot read the kernel's tables; keeping the last view");
                }
            }
            let plan = state::reconcile(&offered, &published, &retries, &checking, Instant::now());
            let mut changed = false;
            for name in &plan.withdraw {
                published.remove(name);
                info!(uplink = %name, "uplink gone or changed; withdrawn");
                changed = true;
            }
            for name in &plan.replace {
                published.remove(name);
                held.entry(name.clone()).or_insert_with(|| Instant::now() + REPLACE_HOLD);
                info!(uplink = %name, "uplink's address changed; withdrawn together with its replacement");
            }
            for name in &plan.forget {
                retries.remove(name);
            }
            for candidate in plan.validate {
                debug!(uplink = %candidate.name, address = %candidate.address, "validating");
                checking.push(candidate.name.clone());
                let target = settings.target.clone();
                let timeout = settings.validate_timeout;
                checks.spawn(async move {
                    let result = validate::validate(&candidate, &target, timeout).await;
                    (candidate, result)
                });
            }
            if changed {
                announce(&publish, &published, &settings, &mut routes).await;
                held.clear();
            }
        }
        let next_retry = retries.values().map(|r| r.due).min();
        let hold_ends = held.values().min().copied();
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Some(routes) = routes.as_mut() {
                    routes.restore().await;
                }
                return Ok(());
            }
            event = events.next() => {
                if event.is_none() {
                    anyhow::bail!("the netlink event stream ended");
                }
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, events.next()).await {}
                dirty = true;
            }
            _ = rescan.tick() => dirty = true,
            () = sleep_until(next_retry) => dirty = true,
            () = sleep_until(hold_ends) => {
                debug!(uplinks = ?held.keys().collect::<Vec<_>>(), "replacement still validating; announcing the withdrawal");
                announce(&publish, &published, &settings, &mut routes).await;
                held.clear();
            }
            Some(joined) = checks.join_next() => {
                let Ok((candidate, result)) = joined else { continue };
                checking.retain(|n| n != &candidate.name);
                let name = candidate.name.clone();
                match result {
                    Ok(()) if offered.contains(&candidate) => {
                        info!(uplink = %candidate.name, address = %candidate.address, "uplink validated");
                        retries.remove(&candidate.name);
                        published.insert(candidate.name.clone(), candidate);
                        announce(&publish, &published, &settings, &mut routes).await;
                        held.clear();
                        dirty = true;
                        continue;
                    }
                    Ok(()) => debug!(uplink = %candidate.name, "validated, but it changed meanwhile"),
                    Err(reason) => {
                        let previous = retries.get(&candidate.name).map_or(Duration::ZERO, |r| r.backoff);
                        let backoff = state::next_backoff(previous, settings.max_backoff);
                        warn!(uplink = %candidate.name, %reason, retry_in = ?backoff, "uplink has no Internet access");
                        retries.insert(
                            candidate.name.clone(),
                            Retry { candidate, due: Instant::now() + backoff, backoff },
                        );
                    }
                }
                if held.remove(&name).is_some() {
                    // The replacement did not make it: the old address's withdrawal goes out now.
                    announce(&publish, &published, &settings, &mut routes).await;
                    held.clear();
                }
                dirty = true;
            }
        }
    }
}

async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(tokio::time::Instant::from_std(when)).await,
        None => std::future::pending().await,
    }
}

/// Publishes the uplink set to the agent and, when managed, points the multipath default route at it.
async fn announce(
    publish: &watch::Sender<Vec<UplinkSpec>>,
    published: &BTreeMap<String, Candidate>,
    settings: &Settings,
    routes: &mut Option<RouteManager>,
) {
    publish.send_replace(specs(published, settings));
    if let Some(routes) = routes.as_mut() {
        let weight = |c: &Candidate| settings.weights.get(&c.interface).copied().unwrap_or(1);
        routes.apply(&published.values().cloned().collect::<Vec<_>>(), weight).await;
    }
}

fn specs(published: &BTreeMap<String, Candidate>, settings: &Settings) -> Vec<UplinkSpec> {
    published
        .values()
        .map(|c| UplinkSpec {
            name: c.name.clone(),
            address: c.address,
            interface: Some(c.interface.clone()),
            priority: settings.priorities.get(&c.interface).copied().unwrap_or(0),
            weight: settings.weights.get(&c.interface).copied().unwrap_or(1),
        })
        .collect()
}
