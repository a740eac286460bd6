//! Postgres behind hbs: registering an NCU's uplinks as addresses, batched state writes, the fleet row, orphaned
//! addresses, and the static addresses this server checks.

use std::{net::IpAddr, time::Duration};

use sqlx::{PgPool, Row};
use tether_db::StoreError;

use tether_proto::control::{Refusal, Uplink};

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

impl State {
    /// The `address_state` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Dead => "dead",
        }
    }
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

/// One NCU's registration, for [`register_batch`].
#[derive(Debug, Clone)]
pub struct Registration {
    /// The NCU.
    pub ncu_id: i64,
    /// Its domain.
    pub domain_id: i64,
    /// Uplinks to record.
    pub uplinks: Vec<Uplink>,
    /// The complete set (`Register`): the NCU's other addresses are withdrawn.
    pub replace_all: bool,
    /// The session's generation (see `ToHbs::Register`); 0 is unordered.
    pub generation: i64,
}

/// What became of a registration.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Uplinks accepted, with their rows.
    pub accepted: Vec<Registered>,
    /// Uplinks refused, with the reason.
    pub refused: Vec<Refusal>,
    /// Nothing was written: a newer session of the NCU holds it, at this stored generation.
    pub superseded: Option<i64>,
}

/// Records the NCU's uplinks as this server's addresses, in one transaction. An uplink whose interface address is
/// unchanged keeps its row and state (no flap on handover); a changed address replaces the row; with `replace_all`,
/// uplinks no longer listed are withdrawn at once.
pub async fn register(pool: &PgPool, me: &str, registration: Registration) -> Result<Outcome, StoreError> {
    let mut outcomes = register_batch(pool, me, MAX_ADDRESSES_PER_DOMAIN, std::slice::from_ref(&registration)).await?;
    Ok(outcomes.pop().unwrap_or_default())
}

/// [`register`] for many NCUs (each at most once) in one transaction of at most five statements, whatever the
/// batch size: one read, one delete, one update, one insert. The change triggers then bump each zone once per
/// statement rather than once per uplink, and the zone row lock they take is held for a handful of round trips.
/// The default bound on a domain's addresses (`max_addresses_per_domain`), as dns has it.
pub const MAX_ADDRESSES_PER_DOMAIN: u32 = 64;

/// A new address is inserted only while its domain has fewer than `max_addresses` (counting the batch's own inserts
/// before it); the others are refused by name.
pub async fn register_batch(
    pool: &PgPool,
    me: &str,
    max_addresses: u32,
    batch: &[Registration],
) -> Result<Vec<Outcome>, StoreError> {
    let mut tx = pool.begin().await?;
    // The newest session owns the NCU: a registration of an older generation writes nothing. The row lock taken
    // here orders racing registrations of one NCU at two servers, so the newer generation's is written last.
    let all = batch;
    let ids: Vec<i64> = all.iter().map(|r| r.ncu_id).collect();
    let stored: std::collections::HashMap<i64, i64> =
        sqlx::query_as("SELECT id, session_generation FROM ncus WHERE id = ANY($1) FOR UPDATE")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let stale = |r: &Registration| r.generation != 0 && r.generation < stored.get(&r.ncu_id).copied().unwrap_or(0);
    let current: Vec<usize> = (0..all.len()).filter(|&i| !stale(&all[i])).collect();
    let raised: Vec<(i64, i64)> = current
        .iter()
        .map(|&i| (all[i].ncu_id, all[i].generation))
        .filter(|&(id, generation)| generation > stored.get(&id).copied().unwrap_or(0))
        .collect();
    if !raised.is_empty() {
        let (ids, generations): (Vec<i64>, Vec<i64>) = raised.into_iter().unzip();
        sqlx::query(
            "UPDATE ncus n SET session_generation = v.generation \
             FROM UNNEST($1::bigint[], $2::bigint[]) AS v(id, generation) WHERE n.id = v.id",
        )
        .bind(&ids)
        .bind(&generations)
        .execute(&mut *tx)
        .await?;
    }
    let batch: Vec<Registration> = current.iter().map(|&i| all[i].clone()).collect();
    let batch = batch.as_slice();
    let ncu_ids: Vec<i64> = batch.iter().map(|r| r.ncu_id).collect();
    let rows = sqlx::query(
        "SELECT id, ncu_id, uplink, ip, interface_ip, state::text AS state FROM addresses \
         WHERE source = 'ncu' AND ncu_id = ANY($1)",
    )
    .bind(&ncu_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut existing = Vec::with_capacity(rows.len());
    for row in &rows {
        let ip: IpAddr = row.try_get("ip")?;
        existing.push(Existing {
            id: row.try_get("id")?,
            ncu_id: row.try_get("ncu_id")?,
            uplink: row.try_get::<Option<String>, _>("uplink")?.unwrap_or_default(),
            reported: row.try_get::<Option<IpAddr>, _>("interface_ip")?.unwrap_or(ip),
            live: row.try_get::<&str, _>("state")? == "live",
        });
    }
    let plan = plan(batch, &existing);
    if !plan.deletes.is_empty() {
        // The address history records why these rows go; the reason is unset again for the statements after.
        sqlx::query(
            "WITH r AS (SELECT set_config('tether.reason', 'address changed: the uplink has a new one', true)) \
             DELETE FROM addresses WHERE id = ANY($1) AND EXISTS (SELECT 1 FROM r)",
        )
        .bind(&plan.deletes)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT set_config('tether.reason', '', true)").execute(&mut *tx).await?;
    }
    if !plan.keeps.is_empty() {
        let ids: Vec<i64> = plan.keeps.iter().map(|k| k.id).collect();
        let (priorities, weights) = columns(batch, plan.keeps.iter().map(|k| (k.request, k.uplink)));
        sqlx::query(
            "UPDATE addresses a SET priority = v.priority, weight = v.weight, hbs = $4 \
             FROM UNNEST($1::bigint[], $2::int[], $3::int[]) AS v(id, priority, weight) WHERE a.id = v.id",
        )
        .bind(&ids)
        .bind(&priorities)
        .bind(&weights)
        .bind(me)
        .execute(&mut *tx)
        .await?;
    }
    let mut inserted: std::collections::HashMap<(usize, usize), i64> = std::collections::HashMap::new();
    if !plan.inserts.is_empty() {
        let slots: Vec<i32> = (0..plan.inserts.len()).map(|i| i32::try_from(i).unwrap_or(i32::MAX)).collect();
        let domains: Vec<i64> = plan.inserts.iter().map(|&(r, _)| batch[r].domain_id).collect();
        let ncus: Vec<i64> = plan.inserts.iter().map(|&(r, _)| batch[r].ncu_id).collect();
        let ips: Vec<IpAddr> = plan.inserts.iter().map(|&(r, u)| batch[r].uplinks[u].address).collect();
        let names: Vec<&str> = plan.inserts.iter().map(|&(r, u)| batch[r].uplinks[u].name.as_str()).collect();
        let (priorities, weights) = columns(batch, plan.inserts.iter().copied());
        // Any conflict (the address is another of the domain's, or a racing registration) refuses only its row.
        let rows = sqlx::query(
            "WITH v AS (SELECT * FROM UNNEST($1::int[], $2::bigint[], $3::inet[], $4::bigint[], $5::text[], \
             $6::int[], $7::int[]) AS v(slot, domain_id, ip, ncu_id, uplink, priority, weight)), \
             c AS (SELECT v.*, row_number() OVER (PARTITION BY v.domain_id ORDER BY v.slot) AS nth, \
             (SELECT count(*) FROM addresses a WHERE a.domain_id = v.domain_id) AS have FROM v), \
             ins AS (INSERT INTO addresses (domain_id, ip, source, ncu_id, uplink, priority, weight, state, hbs) \
             SELECT domain_id, ip, 'ncu', ncu_id, uplink, priority, weight, 'pending', $8 FROM c \
             WHERE c.have + c.nth <= $9 ORDER BY slot \
             ON CONFLICT DO NOTHING RETURNING id, ncu_id, uplink) \
             SELECT v.slot, ins.id FROM ins JOIN v ON v.ncu_id = ins.ncu_id AND v.uplink = ins.uplink",
        )
        .bind(&slots)
        .bind(&domains)
        .bind(&ips)
        .bind(&ncus)
        .bind(&names)
        .bind(&priorities)
        .bind(&weights)
        .bind(me)
        .bind(i64::from(max_addresses))
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let slot = usize::try_from(row.try_get::<i32, _>("slot")?).unwrap_or(usize::MAX);
            if let Some(&key) = plan.inserts.get(slot) {
                inserted.insert(key, row.try_get("id")?);
            }
        }
    }
    tx.commit().await?;
    let mut outcomes: Vec<Outcome> =
        all.iter().map(|r| Outcome { superseded: stale(r).then(|| stored[&r.ncu_id]), ..Outcome::default() }).collect();
    for keep in &plan.keeps {
        let uplink = batch[keep.request].uplinks[keep.uplink].clone();
        outcomes[current[keep.request]].accepted.push(Registered { uplink, id: keep.id, live: keep.live });
    }
    for &(request, index) in &plan.inserts {
        let uplink = &batch[request].uplinks[index];
        let outcome = &mut outcomes[current[request]];
        match inserted.get(&(request, index)) {
            Some(&id) => outcome.accepted.push(Registered { uplink: uplink.clone(), id, live: false }),
            None => outcome.refused.push(Refusal {
                name: uplink.name.clone(),
                reason: format!(
                    "{} is already another address of this domain, or the domain has its most addresses ({max_addresses})",
                    uplink.address
                ),
            }),
        }
    }
    Ok(outcomes)
}

/// An NCU address row as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Existing {
    id: i64,
    ncu_id: i64,
    uplink: String,
    /// The interface address the NCU reported (the published one may differ behind NAT).
    reported: IpAddr,
    live: bool,
}

/// A row kept for (request, uplink index): its state carries over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Keep {
    id: i64,
    request: usize,
    uplink: usize,
    live: bool,
}

/// The statements of a batch registration.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    deletes: Vec<i64>,
    keeps: Vec<Keep>,
    /// (request, uplink index) to insert as pending.
    inserts: Vec<(usize, usize)>,
}

/// Decides, for each uplink, whether its row is kept (same interface address), replaced or created, and which of
/// the NCU's rows a full registration withdraws. Pure, so the rules are tested without a database.
fn plan(batch: &[Registration], existing: &[Existing]) -> Plan {
    let mut plan = Plan::default();
    for (request, registration) in batch.iter().enumerate() {
        let rows: Vec<&Existing> = existing.iter().filter(|e| e.ncu_id == registration.ncu_id).collect();
        for (index, uplink) in registration.uplinks.iter().enumerate() {
            match rows.iter().find(|e| e.uplink == uplink.name) {
                Some(row) if row.reported == uplink.address => {
                    plan.keeps.push(Keep { id: row.id, request, uplink: index, live: row.live });
                }
                Some(row) => {
                    plan.deletes.push(row.id);
                    plan.inserts.push((request, index));
                }
                None => plan.inserts.push((request, index)),
            }
        }
        if registration.replace_all {
            let listed = |e: &&&Existing| registration.uplinks.iter().any(|u| u.name == e.uplink);
            plan.deletes.extend(rows.iter().filter(|e| !listed(e)).map(|e| e.id));
        }
    }
    plan
}

fn columns(batch: &[Registration], slots: impl Iterator<Item = (usize, usize)>) -> (Vec<i32>, Vec<i32>) {
    slots
        .map(|(request, index)| {
            let uplink = &batch[request].uplinks[index];
            (i32::from(uplink.priority), i32::from(uplink.weight))
        })
        .unzip()
}

/// Withdraws one uplink's address.
/// Only a session of the newest generation (or an unordered one, 0) withdraws.
pub async fn withdraw(pool: &PgPool, ncu_id: i64, uplink: &str, generation: i64) -> Result<Option<i64>, StoreError> {
    // The reason the address history records, for this statement's transaction.
    Ok(sqlx::query_scalar(
        "WITH r AS (SELECT set_config('tether.reason', 'withdrawn by the NCU: link down or address gone', true)) \
         DELETE FROM addresses WHERE ncu_id = $1 AND uplink = $2 AND source = 'ncu' AND EXISTS (SELECT 1 FROM r) \
         AND ($3 = 0 OR $3 >= (SELECT session_generation FROM ncus WHERE id = $1)) RETURNING id",
    )
    .bind(ncu_id)
    .bind(uplink)
    .bind(generation)
    .fetch_optional(pool)
    .await?)
}

/// Writes a batch of state and load changes in one statement, only to rows this server owns.
pub async fn write_batch(pool: &PgPool, me: &str, changes: &[Change]) -> Result<u64, StoreError> {
    let ids: Vec<i64> = changes.iter().map(|c| c.id).collect();
    let states: Vec<Option<&str>> = changes.iter().map(|c| c.state.map(State::as_str)).collect();
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
/// published, the interface address kept beside it. One statement for the whole batch; only rows whose published
/// address differs are written, so the usual case (no NAT) changes nothing. Returns how many rows changed.
///
/// An observed address that is already another address of the domain fails the statement: write each alone then,
/// so that only that row is refused.
pub async fn set_observed(pool: &PgPool, me: &str, observed: &[(i64, IpAddr)]) -> Result<u64, StoreError> {
    let (ids, ips): (Vec<i64>, Vec<IpAddr>) = observed.iter().copied().unzip();
    let done = sqlx::query(
        "UPDATE addresses a SET interface_ip = CASE WHEN COALESCE(a.interface_ip, a.ip) = v.ip THEN NULL \
         ELSE COALESCE(a.interface_ip, a.ip) END, ip = v.ip \
         FROM UNNEST($1::bigint[], $2::inet[]) AS v(id, ip) WHERE a.id = v.id AND a.hbs = $3 AND a.ip <> v.ip",
    )
    .bind(&ids)
    .bind(&ips)
    .bind(me)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
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
///
/// Rows locked by a registration in flight are skipped: their NCU is re-homing this very moment. Waiting for them
/// instead would deadlock with a batch that takes over many rows in another order, and a failover storm is exactly
/// when both run.
pub async fn expire_orphans(pool: &PgPool, grace: Duration) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "WITH r AS (SELECT set_config('tether.reason', 'rehome timeout: no heartbeat server took it over', true)) \
         UPDATE addresses SET state = 'dead', changed_at = now() WHERE EXISTS (SELECT 1 FROM r) AND id IN (SELECT id FROM addresses \
         WHERE source = 'ncu' AND state <> 'dead' AND (hbs IS NULL OR hbs NOT IN (SELECT name FROM heartbeat_servers \
         WHERE last_seen > now() - make_interval(secs => $1))) FOR UPDATE SKIP LOCKED)",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn uplink(name: &str, ip: &str) -> Uplink {
        Uplink { name: name.into(), index: 0, address: ip.parse().expect("ip"), port: 9, priority: 0, weight: 1 }
    }

    fn row(id: i64, ncu_id: i64, uplink: &str, ip: &str, live: bool) -> Existing {
        Existing { id, ncu_id, uplink: uplink.into(), reported: ip.parse().expect("ip"), live }
    }

    #[test]
    fn plan_keeps_same_address_replaces_moved_and_withdraws_unlisted() {
        let batch = [
            Registration {
                ncu_id: 1,
                domain_id: 10,
                uplinks: vec![uplink("wan0", "198.18.0.1"), uplink("wan1", "198.18.0.9"), uplink("wan2", "198.18.0.3")],
                replace_all: true,
                generation: 0,
            },
            Registration {
                ncu_id: 2,
                domain_id: 20,
                uplinks: vec![uplink("lte", "198.18.1.1")],
                replace_all: false,
                generation: 0,
            },
        ];
        let existing = [
            row(100, 1, "wan0", "198.18.0.1", true),
            row(101, 1, "wan1", "198.18.0.2", true),
            row(102, 1, "old", "198.18.0.4", false),
            row(200, 2, "other", "198.18.1.2", true),
        ];
        let plan = plan(&batch, &existing);
        assert_eq!(plan.keeps, vec![Keep { id: 100, request: 0, uplink: 0, live: true }]);
        assert_eq!(plan.inserts, vec![(0, 1), (0, 2), (1, 0)]);
        // wan1 moved; "old" is unlisted in a full registration; NCU 2's partial update withdraws nothing.
        assert_eq!(plan.deletes, vec![101, 102]);
    }

    #[test]
    fn plan_of_a_handover_keeps_every_row() {
        let batch = [Registration {
            ncu_id: 1,
            domain_id: 10,
            uplinks: vec![uplink("wan0", "198.18.0.1"), uplink("wan1", "198.18.0.2")],
            replace_all: true,
            generation: 0,
        }];
        let existing = [row(100, 1, "wan0", "198.18.0.1", true), row(101, 1, "wan1", "198.18.0.2", false)];
        let plan = plan(&batch, &existing);
        assert!(plan.deletes.is_empty() && plan.inserts.is_empty());
        assert_eq!(plan.keeps.len(), 2);
        assert!(plan.keeps[0].live && !plan.keeps[1].live);
    }
}
