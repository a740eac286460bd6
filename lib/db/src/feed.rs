//! The change feed: LISTEN on `tether_changes`, coalesce what notifications name, and hand it to the caller's
//! `apply`. Two tasks: a reader that owns the listener connection and turns notifications into events, and an applier
//! that coalesces events and calls `apply`. When the connection is lost the reader reconnects with backoff and asks
//! for a full reload, which catches up on every change missed meanwhile; the caller's last state keeps serving
//! throughout. dns follows it to rebuild its view, the packet-forwarder its target table.

use std::{collections::BTreeSet, time::Duration};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::CHANNEL;

#[derive(Debug)]
enum Event {
    /// The listener (re)connected: anything may have changed.
    Resync,
    /// A notification payload.
    Notify(String),
}

/// What changed since the last apply: everything, or only the named zones and domains.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Reload everything (after a (re)connection, or an unreadable notification).
    pub full: bool,
    /// Zones whose row changed.
    pub zones: BTreeSet<i64>,
    /// The highest serial each zone's notifications named (`zone:<id>:<serial>`): the serial the changes notified so
    /// far add up to, which the zone row, read later, may already have passed.
    pub serials: std::collections::BTreeMap<i64, i64>,
    /// Domains whose row, addresses or services changed.
    pub domains: BTreeSet<i64>,
}

/// The counters a follower of `tether_changes` keeps.
#[derive(Clone, Default)]
pub struct FeedMetrics {
    /// 1 while the listener is connected.
    pub connected: Gauge,
    /// Notifications received.
    pub notifications: Counter,
    /// Failed attempts to reach or read Postgres.
    pub errors: Counter,
}

/// Follows `tether_changes` until `shutdown`: a reader task owns the listener and turns notifications into events;
/// the applier coalesces them and calls `apply`, retrying with backoff (and merging newer changes) when it fails.
/// After every (re)connection the listener LISTENs first and then asks for a full reload, so nothing falls between
/// the two and changes missed while disconnected are caught up. `synced` turns true after the first full apply.
pub async fn follow<F, Fut, E>(
    pool: PgPool,
    max_backoff: Duration,
    metrics: FeedMetrics,
    apply: F,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) where
    F: FnMut(Changes) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = read_notifications(pool, metrics.clone(), tx, max_backoff, shutdown.clone());
    let applier = apply_changes(apply, metrics, rx, max_backoff, synced, shutdown);
    tokio::join!(reader, applier);
}

async fn read_notifications(
    pool: PgPool,
    metrics: FeedMetrics,
    tx: mpsc::UnboundedSender<Event>,
    max_backoff: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        let session = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            metrics.connected.set(1);
            info!("listening for changes");
            backoff.reset();
            // LISTEN is in place before the reload starts, so nothing falls between the two.
            let _ = tx.send(Event::Resync);
            loop {
                match listener.try_recv().await? {
                    Some(notification) => {
                        metrics.notifications.inc();
                        let _ = tx.send(Event::Notify(notification.payload().to_owned()));
                    }
                    None => {
                        // The listener reconnected on its own; what happened meanwhile is unknown.
                        warn!("change listener lost its connection and reconnected; reloading everything");
                        let _ = tx.send(Event::Resync);
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        let error = tokio::select! {
            () = shutdown.cancelled() => return,
            result = session => match result {
                Ok(()) => continue,
                Err(error) => error,
            },
        };
        metrics.connected.set(0);
        metrics.errors.inc();
        let delay = backoff.next();
        warn!(%error, retry_in = ?delay, "change listener cannot reach Postgres; keeping the last state");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn apply_changes<F, Fut, E>(
    mut apply: F,
    metrics: FeedMetrics,
    mut rx: mpsc::UnboundedReceiver<Event>,
    max_backoff: Duration,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) where
    F: FnMut(Changes) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut pending = Changes::default();
    let mut backoff = Backoff::new(max_backoff);
    loop {
        if pending.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                event = rx.recv() => match event {
                    Some(event) => pending.add(event),
                    None => return,
                },
            }
        }
        while let Ok(event) = rx.try_recv() {
            pending.add(event);
        }
        let was_full = pending.full;
        match apply(pending.clone()).await {
            Ok(()) => {
                pending = Changes::default();
                backoff.reset();
                if was_full {
                    synced.send_replace(true);
                }
            }
            Err(error) => {
                metrics.errors.inc();
                let delay = backoff.next();
                warn!(%error, retry_in = ?delay, "cannot apply the changes; keeping the last state");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

impl FeedMetrics {
    /// Registers the three under the names every follower exposes: `notifications`, `sync_errors` and
    /// `database_connected` (prefixed by the registry's own).
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register("notifications", "Change notifications received", self.notifications.clone());
        registry.register("sync_errors", "Failed attempts to reach or read Postgres", self.errors.clone());
        registry.register("database_connected", "1 while the change listener is connected", self.connected.clone());
    }
}

impl Changes {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        !self.full && self.zones.is_empty() && self.domains.is_empty()
    }

    fn add(&mut self, event: Event) {
        match event {
            Event::Resync => self.full = true,
            Event::Notify(payload) => match parse_payload(&payload) {
                Some(Target::Zone(id, serial)) => {
                    self.zones.insert(id);
                    if let Some(serial) = serial {
                        let known = self.serials.entry(id).or_insert(serial);
                        *known = (*known).max(serial);
                    }
                }
                Some(Target::Domain(id)) => {
                    self.domains.insert(id);
                }
                None => {
                    warn!(payload, "unrecognised change notification; reloading everything");
                    self.full = true;
                }
            },
        }
        if self.full {
            self.zones.clear();
            self.domains.clear();
            self.serials.clear();
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A zone and, when the notification names it, its serial after the change.
    Zone(i64, Option<i64>),
    Domain(i64),
}

/// `domain:<id>`, `zone:<id>` or `zone:<id>:<serial>`.
fn parse_payload(payload: &str) -> Option<Target> {
    let (kind, rest) = payload.split_once(':')?;
    match kind {
        "zone" => match rest.split_once(':') {
            Some((id, serial)) => Some(Target::Zone(id.parse().ok()?, Some(serial.parse().ok()?))),
            None => Some(Target::Zone(rest.parse().ok()?, None)),
        },
        "domain" => Some(Target::Domain(rest.parse().ok()?)),
        _ => None,
    }
}

/// Exponential backoff from 100 ms up to a cap.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Self { next: Duration::from_millis(100), max }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse() {
        assert_eq!(parse_payload("domain:42"), Some(Target::Domain(42)));
        assert_eq!(parse_payload("zone:7"), Some(Target::Zone(7, None)));
        assert_eq!(parse_payload("zone:7:1234"), Some(Target::Zone(7, Some(1234))));
        assert_eq!(parse_payload("zone:7:x"), None);
        assert_eq!(parse_payload("domain:x"), None);
        assert_eq!(parse_payload("host:1"), None);
        assert_eq!(parse_payload(""), None);
    }

    #[test]
    fn a_resync_absorbs_partial_changes() {
        let mut pending = Changes::default();
        pending.add(Event::Notify("domain:1".into()));
        pending.add(Event::Notify("zone:2".into()));
        pending.add(Event::Notify("zone:2:41".into()));
        pending.add(Event::Notify("zone:2:40".into()));
        assert_eq!(pending.serials.get(&2), Some(&41), "the highest serial named");
        assert!(!pending.full);
        assert_eq!(pending.domains.len(), 1);
        pending.add(Event::Resync);
        assert!(pending.full && pending.domains.is_empty() && pending.zones.is_empty());
        pending.add(Event::Notify("domain:3".into()));
        assert!(pending.domains.is_empty(), "a full reload covers later notifications in the batch");
    }

    #[test]
    fn unknown_payload_forces_full_reload() {
        let mut pending = Changes::default();
        pending.add(Event::Notify("garbage".into()));
        assert!(pending.full);
    }

    #[test]
    fn backoff_doubles_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let seq: Vec<u128> = (0..5).map(|_| b.next().as_millis()).collect();
        assert_eq!(seq, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next().as_millis(), 100);
    }
}
