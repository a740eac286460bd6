//! The relay of host migrations: a forwarder on the host that holds a migration's old address redirects new flows
//! to it on to the new address ([`nft`]) from the moment it sees the migration (announced or redirecting) until the
//! migration is done or deleted, and reports into the migration's row: that it holds the address (`relay`,
//! `relay_at`), why it cannot (`relay_error`), and the flows redirected (`flows`, `last_flow_at`).
//!
//! A forwarder holds an old address when the address is assigned to its host (a socket can be bound to it). The
//! wanted set comes from the sync task after every reload; this task applies it, and reads the counters every
//! [`TICK`] while it holds anything. On shutdown the table is removed: no redirect outlives the process that
//! reports it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::nft::{self, Redirect};

/// How often counters are read and a failed apply is retried.
pub const TICK: Duration = Duration::from_secs(1);

/// Every unfinished migration, as the sync task last read them.
pub type Wanted = watch::Receiver<Vec<Redirect>>;

/// Runs until `shutdown`; `name` is how this forwarder names itself in the rows it reports into.
pub async fn run(pool: PgPool, name: String, mut wanted: Wanted, shutdown: CancellationToken) {
    let mut relay = Relay { pool, name, installed: Vec::new(), flows: BTreeMap::new(), error: None };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = wanted.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
        let local: Vec<Redirect> = wanted.borrow_and_update().iter().filter(|r| is_local(r.from)).cloned().collect();
        relay.reconcile(local).await;
        relay.count().await;
    }
    if !relay.installed.is_empty() {
        match nft::apply(&[]).await {
            Ok(()) => info!(migrations = relay.installed.len(), "shutting down: redirects removed"),
            Err(error) => warn!(%error, "shutting down: could not remove the redirects"),
        }
    }
}

struct Relay {
    pool: PgPool,
    name: String,
    /// What the kernel holds now.
    installed: Vec<Redirect>,
    /// Flows last reported, by migration.
    flows: BTreeMap<i64, u64>,
    /// The last failure, reported once.
    error: Option<String>,
}

impl Relay {
    /// Makes the kernel hold exactly `wanted` (those whose family can be forwarded), and reports what changed.
    async fn reconcile(&mut self, mut wanted: Vec<Redirect>) {
        wanted.sort();
        if wanted == self.installed && self.error.is_none() {
            return;
        }
        let (ok, blocked): (Vec<Redirect>, Vec<Redirect>) = wanted.into_iter().partition(|r| forwarding_on(r.from));
        for r in &blocked {
            let why =
                format!("IP forwarding is off on {} ({}): redirected flows could not leave", self.name, sysctl(r.from));
            self.report_error(r.id, &why).await;
        }
        if ok == self.installed && self.error.is_none() {
            return;
        }
        match nft::apply(&ok).await {
            Ok(()) => {
                let before: BTreeSet<i64> = self.installed.iter().map(|r| r.id).collect();
                let now: BTreeSet<i64> = ok.iter().map(|r| r.id).collect();
                for r in ok.iter().filter(|r| !before.contains(&r.id)) {
                    info!(migration = r.id, from = %r.from, to = %r.to, ports = ?r.ports, "redirecting new flows");
                }
                for id in before.difference(&now) {
                    info!(migration = id, "redirect released");
                    self.flows.remove(id);
                }
                self.report_held(&now.iter().copied().collect::<Vec<_>>()).await;
                self.installed = ok;
                self.error = None;
            }
            Err(error) => {
                let why = error.to_string();
                if self.error.as_ref() != Some(&why) {
                    warn!(%error, migrations = ok.len(), "cannot install the redirects; retrying every second");
                    for r in &ok {
                        self.report_error(r.id, &why).await;
                    }
                }
                self.error = Some(why);
            }
        }
    }

    /// Reads the counters and reports migrations whose count grew.
    async fn count(&mut self) {
        if self.installed.is_empty() {
            return;
        }
        let counters = match nft::counters().await {
            Ok(counters) => counters,
            Err(error) => {
                debug!(%error, "cannot read the redirect counters");
                return;
            }
        };
        for (id, flows) in counters {
            if self.flows.get(&id).is_some_and(|seen| *seen >= flows) || flows == 0 {
                continue;
            }
            let result = sqlx::query(
                "UPDATE host_migrations SET flows = GREATEST(flows, $2), last_flow_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(i64::try_from(flows).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await;
            match result {
                Ok(_) => {
                    self.flows.insert(id, flows);
                }
                Err(error) => debug!(%error, migration = id, "cannot report redirected flows; next tick"),
            }
        }
    }

    async fn report_held(&self, ids: &[i64]) {
        if ids.is_empty() {
            return;
        }
        let result = sqlx::query(
            "UPDATE host_migrations SET relay = $2, relay_at = COALESCE(relay_at, now()), relay_error = NULL \
             WHERE id = ANY($1)",
        )
        .bind(ids)
        .bind(&self.name)
        .execute(&self.pool)
        .await;
        if let Err(error) = result {
            warn!(%error, "cannot report the redirects held");
        }
    }

    async fn report_error(&self, id: i64, why: &str) {
        let result = sqlx::query(
            "UPDATE host_migrations SET relay = $2, relay_error = $3 WHERE id = $1 AND relay_error IS DISTINCT FROM $3",
        )
        .bind(id)
        .bind(&self.name)
        .bind(why)
        .execute(&self.pool)
        .await;
        match result {
            Ok(done) if done.rows_affected() > 0 => warn!(migration = id, error = why, "cannot redirect"),
            Ok(_) => {}
            Err(error) => warn!(%error, "cannot report a redirect error"),
        }
    }
}

/// True when `ip` is assigned to this host (in this network namespace).
fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The sysctl that lets this host forward `ip`'s family.
fn sysctl(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "net.ipv4.ip_forward" } else { "net.ipv6.conf.all.forwarding" }
}

/// True when that sysctl is on.
fn forwarding_on(ip: IpAddr) -> bool {
    let path = format!("/proc/sys/{}", sysctl(ip).replace('.', "/"));
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}
