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
            // A hot standby takes no LISTEN: there the change log (which streams with the data) is followed.
            let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&pool).await?;
            if standby {
                return follow_log(&pool, &metrics, &tx, &mut backoff).await;
            }
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

/// How often a standby's change log is read.
const LOG_EVERY: Duration = Duration::from_millis(100);
/// Most log rows read at once; a longer backlog is read in turns.
const LOG_BATCH: i64 = 5000;
/// How long an id missing below the highest seen is still awaited: a transaction that took it may commit later
/// (ids are taken at insert, rows appear at commit); past this it rolled back.
const GAP_WAIT: Duration = Duration::from_secs(60);
/// More missing ids than this at once: reload everything instead of tracking them.
const MAX_GAPS: i64 = 100_000;

/// Follows `change_log` on a hot standby until the connection fails (an error) or the standby is promoted (`Ok`:
/// the caller reconnects and LISTENs).
async fn follow_log(
    pool: &PgPool,
    metrics: &FeedMetrics,
    tx: &mpsc::UnboundedSender<Event>,
    backoff: &mut Backoff,
) -> Result<(), sqlx::Error> {
    let max: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM change_log").fetch_one(pool).await?;
    let mut cursor = LogCursor::new(max);
    metrics.connected.set(1);
    info!("the database is a hot standby: following its change log");
    backoff.reset();
    // The cursor is placed before the reload starts, so nothing falls between the two.
    let _ = tx.send(Event::Resync);
    let mut tick = tokio::time::interval(LOG_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checked = std::time::Instant::now();
    loop {
        tick.tick().await;
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            let (standby, oldest): (bool, i64) =
                sqlx::query_as("SELECT pg_is_in_recovery(), COALESCE((SELECT min(id) FROM change_log), 0)")
                    .fetch_one(pool)
                    .await?;
            if !standby {
                info!("the database was promoted; listening for changes instead");
                return Ok(());
            }
            if cursor.pruned_past(oldest) {
                warn!("the change log was pruned past this reader; reloading everything");
                cursor = LogCursor::new(
                    sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM change_log").fetch_one(pool).await?,
                );
                let _ = tx.send(Event::Resync);
            }
        }
        loop {
            let rows: Vec<(i64, String)> =
                sqlx::query_as("SELECT id, payload FROM change_log WHERE id > $1 OR id = ANY($2) ORDER BY id LIMIT $3")
                    .bind(cursor.max)
                    .bind(cursor.gaps())
                    .bind(LOG_BATCH)
                    .fetch_all(pool)
                    .await?;
            let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= LOG_BATCH;
            match cursor.take(rows, std::time::Instant::now()) {
                Some(payloads) => {
                    for payload in payloads {
                        metrics.notifications.inc();
                        let _ = tx.send(Event::Notify(payload));
                    }
                }
                None => {
                    warn!("the change log jumped too far ahead; reloading everything");
                    cursor = LogCursor::new(
                        sqlx::query_scalar("SELECT COALESCE(max(id), 0) FROM change_log").fetch_one(pool).await?,
                    );
                    let _ = tx.send(Event::Resync);
                }
            }
            if !full {
                break;
            }
        }
    }
}

/// Where a reader of `change_log` stands: the highest id applied and the ids below it not seen yet.
#[derive(Debug)]
struct LogCursor {
    max: i64,
    gaps: std::collections::BTreeMap<i64, std::time::Instant>,
}

impl LogCursor {
    fn new(max: i64) -> Self {
        Self { max, gaps: std::collections::BTreeMap::new() }
    }

    /// True when rows this reader has not seen were pruned: the oldest row left is past an id it still lacks.
    fn pruned_past(&self, oldest: i64) -> bool {
        oldest > 0 && (oldest > self.max + 1 || self.gaps.keys().next().is_some_and(|&gap| gap < oldest))
    }

    fn gaps(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }

    /// The payloads of `rows` not applied before, in order; `None` when too many ids are missing to track.
    fn take(&mut self, rows: Vec<(i64, String)>, now: std::time::Instant) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for (id, payload) in rows {
            if self.gaps.remove(&id).is_some() {
                out.push(payload);
            } else if id > self.max {
                if id - self.max - 1 > MAX_GAPS {
                    return None;
                }
                for missing in self.max + 1..id {
                    self.gaps.insert(missing, now);
                }
                self.max = id;
                out.push(payload);
            }
        }
        self.gaps.retain(|_, since| now.duration_since(*since) < GAP_WAIT);
        Some(out)
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
    fn the_log_cursor_applies_each_row_once_and_waits_for_gaps_a_while() {
        let at = std::time::Instant::now();
        let row = |id: i64| (id, format!("domain:{id}"));
        let mut cursor = LogCursor::new(10);
        // 12 is in a transaction not committed yet when 11 and 13 are read.
        assert_eq!(cursor.take(vec![row(11), row(13)], at), Some(vec!["domain:11".into(), "domain:13".into()]));
        assert_eq!(cursor.gaps(), [12]);
        // Read again (the gap and above): 13 is not applied twice, 12 is when it shows.
        assert_eq!(
            cursor.take(vec![row(12), row(13), row(14)], at),
            Some(vec!["domain:12".into(), "domain:14".into()])
        );
        assert!(cursor.gaps().is_empty());
        // A gap that never fills (a rollback) is given up after a while.
        assert_eq!(cursor.take(vec![row(16)], at), Some(vec!["domain:16".into()]));
        assert_eq!(cursor.gaps(), [15]);
        assert_eq!(cursor.take(vec![], at + GAP_WAIT), Some(vec![]));
        assert!(cursor.gaps().is_empty());
        // Rows pruned before this reader saw them: it must reload.
        assert!(!cursor.pruned_past(0) && !cursor.pruned_past(10) && !cursor.pruned_past(17));
        assert!(cursor.pruned_past(18));
        // Too far ahead to track: reload instead.
        assert_eq!(cursor.take(vec![row(16 + MAX_GAPS + 2)], at), None);
    }

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
