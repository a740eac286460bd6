//! What configures each site this server holds, read every [`EVERY`] (one query each, joined only to this server's
//! addresses) and published by NCU: the service tuples bound to its uplink addresses (which the site forwards or
//! runs, and checks) and the redirects of host migrations away from them. Each session sends its NCU its sets when
//! they change ([`crate::server`]), and writes what the NCU reports back: a migration's flows ([`report`]), a
//! tuple's health ([`health`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use sqlx::PgPool;
use tether_proto::control::{Redirect, SiteService};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the redirects are read.
pub const EVERY: Duration = Duration::from_secs(1);

/// What each NCU should hold, by NCU id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sites {
    /// Host migrations' redirects.
    pub redirects: BTreeMap<i64, Vec<Redirect>>,
    /// Service tuples.
    pub services: BTreeMap<i64, Vec<SiteService>>,
    /// NCUs with a session here that are no longer enrolled (deleted through the API): their sessions end.
    pub deleted: BTreeSet<i64>,
}

/// Shared between the reader and the sessions.
pub type ByNcu = Arc<Sites>;

/// The NCUs with a session open here, with their count of sessions.
pub type Open = Arc<std::sync::Mutex<BTreeMap<i64, u32>>>;

/// Publishes the redirects and services of the NCUs whose addresses `me` holds, and which NCUs of the `open`
/// sessions were deleted, until `shutdown`.
pub async fn run(pool: PgPool, me: String, open: Open, out: watch::Sender<ByNcu>, shutdown: CancellationToken) {
    let mut tick = tether_config::ticker(EVERY);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sessions: Vec<i64> =
            open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).keys().copied().collect();
        match read(&pool, &me, &sessions).await {
            Ok(by_ncu) => {
                failing = false;
                out.send_if_modified(|current| {
                    let changed = **current != by_ncu;
                    if changed {
                        *current = Arc::new(by_ncu);
                    }
                    changed
                });
            }
            Err(error) if !failing => {
                failing = true;
                warn!(%error, "cannot read host migrations; retrying");
            }
            Err(_) => {}
        }
    }
}

async fn read(pool: &PgPool, me: &str, sessions: &[i64]) -> Result<Sites, sqlx::Error> {
    Ok(Sites {
        redirects: read_redirects(pool, me).await?,
        services: read_services(pool, me).await?,
        deleted: read_deleted(pool, sessions).await?,
    })
}

/// The NCUs of `sessions` no longer enrolled. Only those rows come back: reading every enrolled id each second
/// cost hbs more than a tenth of its instructions outside the heartbeat MACs at 10,000 addresses.
async fn read_deleted(pool: &PgPool, sessions: &[i64]) -> Result<BTreeSet<i64>, sqlx::Error> {
    if sessions.is_empty() {
        return Ok(BTreeSet::new());
    }
    let deleted: Vec<i64> = sqlx::query_scalar(
        "SELECT s.id FROM UNNEST($1::int8[]) AS s(id) WHERE NOT EXISTS (SELECT 1 FROM ncus n WHERE n.id = s.id)",
    )
    .bind(sessions)
    .fetch_all(pool)
    .await?;
    Ok(deleted.into_iter().collect())
}

async fn read_services(pool: &PgPool, me: &str) -> Result<BTreeMap<i64, Vec<SiteService>>, sqlx::Error> {
    let rows: Vec<(i64, i64, String, String, String, IpAddr, i32)> = sqlx::query_as(
        "SELECT a.ncu_id, s.id, s.service, s.transport, a.uplink, COALESCE(a.interface_ip, a.ip), s.port \
           FROM services s JOIN addresses a ON a.domain_id = s.domain_id AND a.ip = s.ip \
          WHERE a.source = 'ncu' AND a.hbs = $1 AND a.ncu_id IS NOT NULL AND a.uplink IS NOT NULL AND s.port > 0 \
          ORDER BY s.id",
    )
    .bind(me)
    .fetch_all(pool)
    .await?;
    let mut by_ncu: BTreeMap<i64, Vec<SiteService>> = BTreeMap::new();
    for (ncu, id, service, transport, uplink, address, port) in rows {
        let Ok(port) = u16::try_from(port) else { continue };
        by_ncu.entry(ncu).or_default().push(SiteService { id, service, transport, uplink, address, port });
    }
    Ok(by_ncu)
}

async fn read_redirects(pool: &PgPool, me: &str) -> Result<BTreeMap<i64, Vec<Redirect>>, sqlx::Error> {
    let rows: Vec<(i64, i64, String, IpAddr, IpAddr, Vec<i32>)> = sqlx::query_as(
        "SELECT a.ncu_id, m.id, a.uplink, COALESCE(a.interface_ip, a.ip), m.to_ip, m.ports \
           FROM host_migrations m JOIN addresses a ON a.domain_id = m.domain_id AND a.ip = m.from_ip \
          WHERE m.phase <> 'done' AND a.source = 'ncu' AND a.hbs = $1 AND a.ncu_id IS NOT NULL \
            AND a.uplink IS NOT NULL ORDER BY m.id",
    )
    .bind(me)
    .fetch_all(pool)
    .await?;
    let mut by_ncu: BTreeMap<i64, Vec<Redirect>> = BTreeMap::new();
    for (ncu, id, uplink, from, to, ports) in rows {
        let ports = ports.into_iter().filter_map(|p| u16::try_from(p).ok()).collect();
        by_ncu.entry(ncu).or_default().push(Redirect { id, uplink, from, to, ports });
    }
    Ok(by_ncu)
}

/// Writes an NCU's check of service tuple `id` of `domain_id` (one the session sent it); a change notifies the
/// domain, so the SRV answers follow.
pub async fn health(
    pool: &PgPool,
    domain_id: i64,
    id: i64,
    healthy: bool,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE services SET healthy = $3, health_reason = $4, health_at = now() \
          WHERE id = $1 AND domain_id = $2 AND (healthy, health_reason) IS DISTINCT FROM ($3, $4)",
    )
    .bind(id)
    .bind(domain_id)
    .bind(healthy)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}

/// Writes an NCU's report on redirect `id` (one the session sent it) into the migration's row; `relay` names the
/// NCU. Held with no error sets `relay_at` once; flows only grow.
pub async fn report(pool: &PgPool, relay: &str, id: i64, flows: u64, error: Option<&str>) -> Result<(), sqlx::Error> {
    let flows = i64::try_from(flows).unwrap_or(i64::MAX);
    sqlx::query(
        "UPDATE host_migrations SET relay = $2, relay_error = $4, \
                relay_at = CASE WHEN $4::text IS NULL THEN COALESCE(relay_at, now()) ELSE relay_at END, \
                last_flow_at = CASE WHEN $3 > flows THEN now() ELSE last_flow_at END, \
                flows = GREATEST(flows, $3) \
          WHERE id = $1",
    )
    .bind(id)
    .bind(relay)
    .bind(flows)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
