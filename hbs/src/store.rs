//! Postgres behind hbs: registering an NCU's uplinks as addresses, batched state writes, the fleet row, orphaned
//! addresses, and the static addresses this server checks.

use std::{net::IpAddr, time::Duration};

use hds::store::StoreError;
use sqlx::{PgPool, Row};

use crate::control::{Refusal, Uplink};

/// An uplink accepted for monitoring: its address row and the state it starts in.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The uplink.
    pub uplink: Uplink,
    /// The `addresses` row.
    pub id: i64,
    /// True when the row was already live (a handover): it stays live while this server re-proves it.
    pub live: bool,
}

/// One coalesced change for the batch writer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    /// The `addresses` row.
    pub id: i64,
    /// New state, if it changed.
    pub state: Option<State>,
    /// New load, if it changed.
    pub load: Option<f32>,
}

/// Liveness as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Answering.
    Live,
    /// Not answering.
    Dead,
}

/// A static address with a service check, owned by this server.
#[derive(Debug, Clone)]
pub struct StaticCheck {
    /// The `addresses` row.
    pub id: i64,
    /// The address.
    pub ip: IpAddr,
    /// The check, as stored by the admin API.
    pub check: serde_json::Value,
    /// Live now.
    pub live: bool,
}

/// Records the NCU's uplinks as this server's addresses, in one transaction. An uplink whose interface address is
/// unchanged keeps its row and state (no flap on handover); a changed address replaces the row; uplinks no longer
/// listed are withdrawn at once.
pub async fn register(
    pool: &PgPool,
    me: &str,
    ncu_id: i64,
    domain_id: i64,
    uplinks: &[Uplink],
    replace_all: bool,
) -> Result<(Vec<Registered>, Vec<Refusal>), StoreError> {
    let mut tx = pool.begin().await?;
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for uplink in uplinks {
        let existing = sqlx::query(
            "SELECT id, ip, interface_ip, state::text AS state FROM addresses \
             WHERE ncu_id = $1 AND uplink = $2 AND source = 'ncu'",
        )
        .bind(ncu_id)
        .bind(&uplink.name)
        .fetch_optional(&mut *tx)
        .await?;
        let mut kept = None;
        if let Some(row) = existing {
            let id: i64 = row.try_get("id")?;
            let reported: IpAddr = row.try_get::<Option<IpAddr>, _>("interface_ip")?.map_or(row.try_get("ip")?, |i| i);
            if reported == uplink.address {
                sqlx::query("UPDATE addresses SET priority = $2, weight = $3, hbs = $4 WHERE id = $1")
                    .bind(id)
                    .bind(i32::from(uplink.priority))
                    .bind(i32::from(uplink.weight))
                    .bind(me)
                    .execute(&mut *tx)
                    .await?;
                kept = Some((id, row.try_get::<&str, _>("state")? == "live"));
            } else {
                sqlx::query("DELETE FROM addresses WHERE id = $1").bind(id).execute(&mut *tx).await?;
            }
        }
        let (id, live) = match kept {
            Some(kept) => kept,
            None => {
                let inserted: Option<i64> = sqlx::query_scalar(
                    "INSERT INTO addresses (domain_id, ip, source, ncu_id, uplink, priority, weight, state, hbs) \
                     VALUES ($1, $2, 'ncu', $3, $4, $5, $6, 'pending', $7) ON CONFLICT (domain_id, ip) DO NOTHING \
                     RETURNING id",
                )
                .bind(domain_id)
                .bind(uplink.address)
                .bind(ncu_id)
                .bind(&uplink.name)
                .bind(i32::from(uplink.priority))
                .bind(i32::from(uplink.weight))
                .bind(me)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(id) = inserted else {
                    refused.push(Refusal {
                        name: uplink.name.clone(),
                        reason: format!("{} is already another address of this domain", uplink.address),
                    });
                    continue;
                };
                (id, false)
            }
        };
        accepted.push(Registered { uplink: uplink.clone(), id, live });
    }
    if replace_all {
        let names: Vec<&str> = uplinks.iter().map(|u| u.name.as_str()).collect();
        sqlx::query("DELETE FROM addresses WHERE ncu_id = $1 AND source = 'ncu' AND NOT (uplink = ANY($2))")
            .bind(ncu_id)
            .bind(&names)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((accepted, refused))
}

/// Withdraws one uplink's address.
pub async fn withdraw(pool: &PgPool, ncu_id: i64, uplink: &str) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar("DELETE FROM addresses WHERE ncu_id = $1 AND uplink = $2 AND source = 'ncu' RETURNING id")
        .bind(ncu_id)
        .bind(uplink)
        .fetch_optional(pool)
        .await?)
}

/// Writes a batch of state and load changes in one statement, only to rows this server owns.
pub async fn write_batch(pool: &PgPool, me: &str, changes: &[Change]) -> Result<u64, StoreError> {
    let ids: Vec<i64> = changes.iter().map(|c| c.id).collect();
    let states: Vec<Option<&str>> = changes
        .iter()
        .map(|c| {
            c.state.map(|s| match s {
                State::Live => "live",
                State::Dead => "dead",
            })
        })
        .collect();
    let loads: Vec<Option<f32>> = changes.iter().map(|c| c.load).collect();
    let done = sqlx::query(
        "UPDATE addresses a SET state = COALESCE(v.state::address_state, a.state), load = COALESCE(v.load, a.load), \
         changed_at = CASE WHEN v.state IS NOT NULL AND v.state <> a.state::text THEN now() ELSE a.changed_at END \
         FROM UNNEST($1::bigint[], $2::text[], $3::real[]) AS v(id, state, load) WHERE a.id = v.id AND a.hbs = $4",
    )
    .bind(&ids)
    .bind(&states)
    .bind(&loads)
    .bind(me)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Records where replies come from when it differs from the interface address (NAT): the observed address is
/// published, the interface address kept beside it.
pub async fn set_observed(pool: &PgPool, me: &str, id: i64, observed: IpAddr) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE addresses SET interface_ip = CASE WHEN COALESCE(interface_ip, ip) = $2 THEN NULL \
         ELSE COALESCE(interface_ip, ip) END, ip = $2 WHERE id = $1 AND hbs = $3 AND ip <> $2",
    )
    .bind(id)
    .bind(observed)
    .bind(me)
    .execute(pool)
    .await?;
    Ok(())
}

/// Upserts this server's fleet row and returns the state in force (an operator's `draining` is kept).
pub async fn fleet_upsert(
    pool: &PgPool,
    name: &str,
    address: &str,
    capacity: u32,
    load: u32,
    full: bool,
) -> Result<String, StoreError> {
    let computed = if full { "full" } else { "active" };
    Ok(sqlx::query_scalar(
        "INSERT INTO heartbeat_servers (name, control_address, capacity, current_load, state, last_seen) \
         VALUES ($1, $2, $3, $4, $5::hbs_state, now()) ON CONFLICT (name) DO UPDATE SET \
         control_address = EXCLUDED.control_address, capacity = EXCLUDED.capacity, \
         current_load = EXCLUDED.current_load, last_seen = now(), \
         state = CASE WHEN heartbeat_servers.state = 'draining' THEN heartbeat_servers.state ELSE EXCLUDED.state END \
         RETURNING state::text",
    )
    .bind(name)
    .bind(address)
    .bind(i32::try_from(capacity).unwrap_or(i32::MAX))
    .bind(i32::try_from(load).unwrap_or(i32::MAX))
    .bind(computed)
    .fetch_one(pool)
    .await?)
}

/// Marks dead the NCU addresses whose heartbeat server has not refreshed its row within `grace` (it died and the
/// NCU did not re-home). Returns how many.
pub async fn expire_orphans(pool: &PgPool, grace: Duration) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE addresses SET state = 'dead', changed_at = now() WHERE source = 'ncu' AND state <> 'dead' \
         AND (hbs IS NULL OR hbs NOT IN (SELECT name FROM heartbeat_servers \
         WHERE last_seen > now() - make_interval(secs => $1)))",
    )
    .bind(grace.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Takes over static addresses with checks whose server is gone (or that have none).
pub async fn claim_static(pool: &PgPool, me: &str, grace: Duration) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "UPDATE addresses SET hbs = $1 WHERE source = 'static' AND \"check\" IS NOT NULL AND (hbs IS NULL OR \
         hbs NOT IN (SELECT name FROM heartbeat_servers WHERE last_seen > now() - make_interval(secs => $2) \
         AND state <> 'draining'))",
    )
    .bind(me)
    .bind(grace.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Gives up this server's static checks (when draining or shutting down), so another server claims them.
pub async fn release_static(pool: &PgPool, me: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE addresses SET hbs = NULL WHERE source = 'static' AND hbs = $1").bind(me).execute(pool).await?;
    Ok(())
}

/// The static addresses this server checks.
pub async fn static_checks(pool: &PgPool, me: &str) -> Result<Vec<StaticCheck>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, ip, \"check\" AS check, state::text AS state FROM addresses \
         WHERE source = 'static' AND \"check\" IS NOT NULL AND hbs = $1",
    )
    .bind(me)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(StaticCheck {
                id: row.try_get("id")?,
                ip: row.try_get("ip")?,
                check: row.try_get("check")?,
                live: row.try_get::<&str, _>("state")? == "live",
            })
        })
        .collect()
}
