//! Keeps the target table fresh: LISTEN on `tether_changes`, reload only the domains a notification names, swap.
//!
//! The design of `dns::sync`: a reader owns the listener connection and turns notifications into events; an
//! applier coalesces them, reads Postgres, builds the next table and swaps it in. After every (re)connection the
//! reader LISTENs first and then asks for a full reload, so nothing falls between the two. After a swap the flows to
//! addresses that left the live set are closed, and the listeners are reconciled.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    Shared,
    store::{self, StoreError},
    table::Table,
};

#[derive(Debug)]
enum Event {
    /// The listener (re)connected: anything may have changed.
    Resync,
    /// A notification payload.
    Notify(String),
}

#[derive(Debug, Default)]
struct Pending {
    full: bool,
    domains: BTreeSet<i64>,
}

/// Runs both tasks until `shutdown`; `synced` turns true after the first full load.
pub async fn run(
    pool: PgPool,
    shared: Arc<Shared>,
    max_backoff: Duration,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = read_notifications(pool.clone(), shared.clone(), tx, max_backoff, shutdown.clone());
    let applier = apply_changes(pool, shared, rx, max_backoff, synced, shutdown);
    tokio::join!(reader, applier);
}

async fn read_notifications(
    pool: PgPool,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Event>,
    max_backoff: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        let session = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(store::CHANNEL).await?;
            shared.metrics.database_connected.set(1);
            info!("listening for changes");
            backoff.reset();
            let _ = tx.send(Event::Resync);
            loop {
                match listener.try_recv().await? {
                    Some(notification) => {
                        shared.metrics.notifications.inc();
                        let _ = tx.send(Event::Notify(notification.payload().to_owned()));
                    }
                    None => {
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
        shared.metrics.database_connected.set(0);
        shared.metrics.sync_errors.inc();
        let delay = backoff.next();
        warn!(%error, retry_in = ?delay, "change listener cannot reach Postgres; relaying with the last table");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

async fn apply_changes(
    pool: PgPool,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Event>,
    max_backoff: Duration,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut pending = Pending::default();
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
        match apply(&pool, &shared, &pending).await {
            Ok(()) => {
                pending = Pending::default();
                backoff.reset();
                if was_full {
                    synced.send_replace(true);
                }
            }
            Err(error) => {
                shared.metrics.sync_errors.inc();
                let delay = backoff.next();
                warn!(%error, retry_in = ?delay, "cannot reload the target table; relaying with the last one");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn apply(pool: &PgPool, shared: &Shared, pending: &Pending) -> Result<(), StoreError> {
    let (table, removed) = if pending.full {
        let rows = store::load_all(pool).await?;
        let built = Table::build(rows, &shared.table.load());
        info!(domains = built.0.domain_count(), listeners = built.0.keys().len(), "target table loaded");
        shared.metrics.full_reloads.inc();
        built
    } else {
        let ids: Vec<i64> = pending.domains.iter().copied().collect();
        let rows = store::load_domains(pool, &ids).await?;
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
    // New flows already avoid these addresses; now close the ones running to them.
    if !removed.is_empty() {
        debug!(targets = removed.len(), "closing flows to addresses no longer live");
    }
    for state in removed {
        state.close();
    }
    Ok(())
}

impl Pending {
    fn is_empty(&self) -> bool {
        !self.full && self.domains.is_empty()
    }

    fn add(&mut self, event: Event) {
        match event {
            Event::Resync => self.full = true,
            Event::Notify(payload) => match parse_payload(&payload) {
                Some(Change::Domain(id)) => {
                    self.domains.insert(id);
                }
                // Zone rows carry nothing the forwarder uses, and a zone with domains cannot be deleted.
                Some(Change::Zone) => {}
                None => {
                    warn!(payload, "unrecognised change notification; reloading everything");
                    self.full = true;
                }
            },
        }
        if self.full {
            self.domains.clear();
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Change {
    Zone,
    Domain(i64),
}

fn parse_payload(payload: &str) -> Option<Change> {
    let (kind, id) = payload.split_once(':')?;
    let id: i64 = id.parse().ok()?;
    match kind {
        "zone" => Some(Change::Zone),
        "domain" => Some(Change::Domain(id)),
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
        assert_eq!(parse_payload("domain:42"), Some(Change::Domain(42)));
        assert_eq!(parse_payload("zone:7"), Some(Change::Zone));
        assert_eq!(parse_payload("domain:x"), None);
        assert_eq!(parse_payload("host:1"), None);
        assert_eq!(parse_payload(""), None);
    }

    #[test]
    fn zones_are_ignored_and_a_resync_absorbs_domains() {
        let mut pending = Pending::default();
        pending.add(Event::Notify("zone:2".into()));
        assert!(pending.is_empty());
        pending.add(Event::Notify("domain:1".into()));
        assert_eq!(pending.domains.len(), 1);
        pending.add(Event::Resync);
        assert!(pending.full && pending.domains.is_empty());
        pending.add(Event::Notify("domain:3".into()));
        assert!(pending.domains.is_empty(), "a full reload covers later notifications in the batch");
    }

    #[test]
    fn unknown_payload_forces_full_reload() {
        let mut pending = Pending::default();
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
