//! Writes state transitions, not heartbeats: events are coalesced per address and written together, one statement
//! per batch window. Nothing is lost while Postgres is away: pending changes wait and merge with newer ones.
//!
//! An address whose observed source cannot be recorded (another address of the domain holds it) is not written
//! live with the interface address it has not proven: its change is parked and tried again every [`RETRY`].

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use sqlx::PgPool;
use tether_proto::heartbeat::monitor::Event;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    metrics::Metrics,
    store::{self, Change, State},
};

/// A change to write, from the heartbeat driver or the static checks.
#[derive(Debug, Clone)]
pub enum Update {
    /// From the heartbeat monitor.
    Heartbeat(Event),
    /// A static address passed or failed its check.
    Checked {
        /// The `addresses` row.
        id: i64,
        /// Passed.
        live: bool,
    },
}

/// How long a change whose observed address was refused waits before it is tried again.
pub const RETRY: Duration = Duration::from_secs(5);

/// Runs until `shutdown` and both senders are done, writing every `window` at most.
pub async fn run(
    pool: PgPool,
    me: String,
    window: Duration,
    mut heartbeat: mpsc::UnboundedReceiver<Event>,
    mut checks: mpsc::UnboundedReceiver<Update>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut pending: BTreeMap<i64, Change> = BTreeMap::new();
    let mut observed: BTreeMap<i64, IpAddr> = BTreeMap::new();
    // Changes whose observed address was refused, with when to try again.
    let mut parked: BTreeMap<i64, (Change, IpAddr, tokio::time::Instant)> = BTreeMap::new();
    let mut delay = Duration::from_millis(100);
    loop {
        let now = tokio::time::Instant::now();
        let due: Vec<i64> = parked.iter().filter(|(_, (_, _, at))| *at <= now).map(|(id, _)| *id).collect();
        for id in due {
            if let Some((change, ip, _)) = parked.remove(&id) {
                pending.entry(id).or_insert(change);
                observed.entry(id).or_insert(ip);
            }
        }
        if pending.is_empty() && observed.is_empty() {
            let retry = parked.values().map(|(_, _, at)| *at).min();
            let update = tokio::select! {
                () = shutdown.cancelled() => return,
                Some(event) = heartbeat.recv() => Update::Heartbeat(event),
                Some(update) = checks.recv() => update,
                () = sleep_until(retry) => continue,
                else => return,
            };
            merge(&mut pending, &mut observed, update);
            // Let the rest of the burst arrive.
            tokio::time::sleep(window).await;
        }
        while let Ok(event) = heartbeat.try_recv() {
            merge(&mut pending, &mut observed, Update::Heartbeat(event));
        }
        while let Ok(update) = checks.try_recv() {
            merge(&mut pending, &mut observed, update);
        }
        let started = std::time::Instant::now();
        match flush(&pool, &me, &pending, &observed).await {
            Ok((written, refused)) => {
                for id in refused {
                    if let (Some(change), Some(ip)) = (pending.remove(&id), observed.remove(&id)) {
                        parked.insert(id, (change, ip, tokio::time::Instant::now() + RETRY));
                    }
                }
                debug!(changes = pending.len(), written, "state changes written");
                metrics.write_seconds.observe(started.elapsed().as_secs_f64());
                metrics.write_batches.inc();
                metrics.database_reachable.set(1);
                for change in pending.values() {
                    if let Some(state) = change.state {
                        metrics.transition(state.as_str());
                    }
                }
                pending.clear();
                observed.clear();
                delay = Duration::from_millis(100);
            }
            Err(error) => {
                warn!(%error, retry_in = ?delay, pending = pending.len(), "cannot write state changes; keeping them");
                metrics.write_errors.inc();
                if error.is_unavailable() {
                    metrics.database_reachable.set(0);
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn merge(pending: &mut BTreeMap<i64, Change>, observed: &mut BTreeMap<i64, IpAddr>, update: Update) {
    let (id, state, load) = match update {
        Update::Heartbeat(Event::Alive { id, observed: from, load }) => {
            observed.insert(id, from.ip());
            (id, Some(State::Live), Some(f32::from(load)))
        }
        Update::Heartbeat(Event::Dead { id }) => (id, Some(State::Dead), None),
        Update::Heartbeat(Event::Load { id, load }) => (id, None, Some(f32::from(load))),
        Update::Checked { id, live } => (id, Some(if live { State::Live } else { State::Dead }), None),
    };
    let change = pending.entry(id).or_insert(Change { id, state: None, load: None });
    if state.is_some() {
        change.state = state;
    }
    if load.is_some() {
        change.load = load;
    }
}

/// Resolves at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes the observed addresses, then the changes; the ids whose observed address was refused are left out of the
/// changes and returned, so they are never written live unproven.
async fn flush(
    pool: &PgPool,
    me: &str,
    pending: &BTreeMap<i64, Change>,
    observed: &BTreeMap<i64, IpAddr>,
) -> Result<(u64, Vec<i64>), tether_db::StoreError> {
    let mut refused = Vec::new();
    // Every first proof reports where replies come from: a ramp or a storm brings thousands at once, so they go in
    // one statement, which touches only the rows behind NAT.
    let batch: Vec<(i64, IpAddr)> = observed.iter().map(|(id, ip)| (*id, *ip)).collect();
    if !batch.is_empty()
        && let Err(error) = store::set_observed(pool, me, &batch).await
    {
        if error.is_unavailable() {
            return Err(error);
        }
        // An observed address taken by another of the domain's: write each alone so only that one is refused.
        warn!(%error, addresses = batch.len(), "cannot record observed addresses together; writing one by one");
        for one in batch.chunks(1) {
            if let Err(error) = store::set_observed(pool, me, one).await {
                if error.is_unavailable() {
                    return Err(error);
                }
                warn!(%error, id = one[0].0, retry_in = ?RETRY, "cannot record the observed address; the change waits");
                refused.push(one[0].0);
            }
        }
    }
    let changes: Vec<Change> = pending.values().filter(|c| !refused.contains(&c.id)).copied().collect();
    if changes.is_empty() {
        return Ok((0, refused));
    }
    Ok((store::write_batch(pool, me, &changes).await?, refused))
}
