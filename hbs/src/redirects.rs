//! Host migrations that move a site: the redirects each NCU this server holds should run at its old uplink
//! address. Read every [`EVERY`] in one query (migrations are few, and joined only to this server's addresses) and
//! published by NCU; each session sends its NCU its set when it changes ([`crate::server`]), and writes what the
//! NCU reports back into the migration's row ([`report`]).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use sqlx::PgPool;
use tether_proto::control::Redirect;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the redirects are read.
pub const EVERY: Duration = Duration::from_secs(1);

/// Redirects by NCU id.
pub type ByNcu = Arc<BTreeMap<i64, Vec<Redirect>>>;

/// Publishes the redirects of the NCUs whose addresses `me` holds until `shutdown`.
pub async fn run(pool: PgPool, me: String, out: watch::Sender<ByNcu>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match read(&pool, &me).await {
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

async fn read(pool: &PgPool, me: &str) -> Result<BTreeMap<i64, Vec<Redirect>>, sqlx::Error> {
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
