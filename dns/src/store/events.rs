//! The address history (`address_events`, written by triggers in the writers' statements): reads for the API and
//! the status page, and the pruning of old events.

use std::{net::IpAddr, time::Duration};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::StoreError;

/// One event of one address.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Event {
    /// Its position in the history: ask for events after it.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// The domain, for events across domains (the operator's view).
    #[sqlx(default)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// The published address.
    pub ip: IpAddr,
    /// The interface address behind NAT, when it differs.
    pub interface_ip: Option<IpAddr>,
    /// `ncu`, `static` or `dyndns`.
    pub source: String,
    /// The NCU's uplink.
    pub uplink: Option<String>,
    /// `registered`, `state`, `handover` or `removed`.
    pub kind: String,
    /// The state after it.
    pub state: Option<String>,
    /// The state before it.
    pub previous: Option<String>,
    /// The heartbeat server in charge after it.
    pub hbs: Option<String>,
    /// The one before it.
    pub previous_hbs: Option<String>,
    /// Why.
    pub reason: String,
}

const COLUMNS: &str = "e.id, e.at, e.ip, e.interface_ip, e.source::text AS source, e.uplink, e.kind, \
                       e.state::text AS state, e.previous::text AS previous, e.hbs, e.previous_hbs, e.reason";

/// The domain's events since `since` (and after event `after`), oldest first, at most `limit`.
pub async fn for_domain(
    pool: &PgPool,
    domain_id: i64,
    since: DateTime<Utc>,
    after: i64,
    limit: i64,
) -> Result<Vec<Event>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM address_events e WHERE e.domain_id = $1 AND e.at >= $2 AND e.id > $3 \
         ORDER BY e.id LIMIT $4"
    );
    Ok(sqlx::query_as(&sql).bind(domain_id).bind(since).bind(after).bind(limit).fetch_all(pool).await?)
}

/// Handovers between heartbeat servers (failovers, drains) across every domain since `since` (and after event
/// `after`), newest first.
pub async fn handovers(pool: &PgPool, since: DateTime<Utc>, after: i64, limit: i64) -> Result<Vec<Event>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS}, rtrim(d.fqdn, '.') AS domain FROM address_events e JOIN domains d ON d.id = e.domain_id \
         WHERE e.kind = 'handover' AND e.at >= $1 AND e.id > $2 ORDER BY e.id DESC LIMIT $3"
    );
    Ok(sqlx::query_as(&sql).bind(since).bind(after).bind(limit).fetch_all(pool).await?)
}

/// Deletes events older than `retention`, `batch` rows per statement and at most `batches` statements, so a large
/// backlog never holds locks for long. Returns how many went.
pub async fn prune(pool: &PgPool, retention: Duration, batch: i64, batches: u32) -> Result<u64, StoreError> {
    let mut total = 0;
    for _ in 0..batches {
        let done = sqlx::query(
            "DELETE FROM address_events WHERE id IN (SELECT id FROM address_events \
             WHERE at < now() - make_interval(secs => $1) ORDER BY id LIMIT $2)",
        )
        .bind(retention.as_secs_f64())
        .bind(batch)
        .execute(pool)
        .await?;
        total += done.rows_affected();
        if done.rows_affected() < u64::try_from(batch).unwrap_or(u64::MAX) {
            break;
        }
    }
    Ok(total)
}
