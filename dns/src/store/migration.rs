//! Host migrations (`host_migrations`): the API's reads and writes, and the phase changes [`crate::migrate`] makes.

use std::{net::IpAddr, time::Duration};

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::StoreError;

/// A migration as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Migration {
    /// Primary key.
    pub id: i64,
    /// The domain moved.
    #[serde(skip)]
    pub domain_id: i64,
    /// The address answers leave and flows are redirected from.
    #[serde(rename = "from")]
    pub from_ip: IpAddr,
    /// The address answers move to and flows are redirected to.
    #[serde(rename = "to")]
    pub to_ip: IpAddr,
    /// Answered instead of `to` while announced.
    #[serde(rename = "temporary")]
    pub temporary_ip: Option<IpAddr>,
    /// Ports redirected, TCP and UDP.
    pub ports: Vec<i32>,
    /// `announced`, `redirecting` or `done`.
    pub phase: String,
    /// Least time in `redirecting`, seconds.
    #[serde(rename = "hold")]
    pub hold_s: i32,
    /// Time without a redirected flow before `done`, seconds.
    #[serde(rename = "quiet")]
    pub quiet_s: i32,
    /// Created (announced).
    pub created_at: DateTime<Utc>,
    /// Entered `redirecting`.
    pub redirect_at: Option<DateTime<Utc>>,
    /// Entered `done`.
    pub done_at: Option<DateTime<Utc>>,
    /// The relay holding the old address, as it names itself.
    pub relay: Option<String>,
    /// When the relay started redirecting.
    pub relay_at: Option<DateTime<Utc>>,
    /// Why the relay holding the old address cannot redirect.
    pub relay_error: Option<String>,
    /// New flows redirected so far.
    pub flows: i64,
    /// The last one.
    pub last_flow_at: Option<DateTime<Utc>>,
}

/// What `POST /v1/domains/{name}/migrations` stores, validated.
#[derive(Debug, Clone)]
pub struct NewMigration {
    /// The domain.
    pub domain_id: i64,
    /// Old address.
    pub from: IpAddr,
    /// New address.
    pub to: IpAddr,
    /// Answered while announced.
    pub temporary: Option<IpAddr>,
    /// Redirected ports.
    pub ports: Vec<i32>,
    /// Hold, seconds.
    pub hold_s: i32,
    /// Quiet time, seconds.
    pub quiet_s: i32,
}

/// A phase change made by [`advance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advanced {
    /// The migration.
    pub id: i64,
    /// Its domain's name.
    pub fqdn: String,
    /// The phase entered.
    pub phase: String,
    /// Flows redirected so far.
    pub flows: i64,
}

const COLUMNS: &str = "id, domain_id, from_ip, to_ip, temporary_ip, ports, phase::text AS phase, hold_s, quiet_s, \
                       created_at, redirect_at, done_at, relay, relay_at, relay_error, flows, last_flow_at";

/// Stores a new migration (announced). An unfinished migration of the same domain is a conflict.
pub async fn create(pool: &PgPool, new: &NewMigration) -> Result<Migration, StoreError> {
    let sql = format!(
        "INSERT INTO host_migrations (domain_id, from_ip, to_ip, temporary_ip, ports, hold_s, quiet_s) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(new.domain_id)
        .bind(new.from)
        .bind(new.to)
        .bind(new.temporary)
        .bind(&new.ports)
        .bind(new.hold_s)
        .bind(new.quiet_s)
        .fetch_one(pool)
        .await?)
}

/// The domain's migrations, newest first.
pub async fn list(pool: &PgPool, domain_id: i64) -> Result<Vec<Migration>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM host_migrations WHERE domain_id = $1 ORDER BY id DESC");
    Ok(sqlx::query_as(&sql).bind(domain_id).fetch_all(pool).await?)
}

/// One migration of the domain.
pub async fn get(pool: &PgPool, domain_id: i64, id: i64) -> Result<Option<Migration>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM host_migrations WHERE domain_id = $1 AND id = $2");
    Ok(sqlx::query_as(&sql).bind(domain_id).bind(id).fetch_optional(pool).await?)
}

/// Deletes a migration of the domain (rolling it back when unfinished); its phase when it existed.
pub async fn delete(pool: &PgPool, domain_id: i64, id: i64) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar("DELETE FROM host_migrations WHERE domain_id = $1 AND id = $2 RETURNING phase::text")
        .bind(domain_id)
        .bind(id)
        .fetch_optional(pool)
        .await?)
}

/// The longest TTL the domain was ever served with, seconds.
pub async fn max_ttl_served(pool: &PgPool, domain_id: i64) -> Result<u32, StoreError> {
    let ttl: i32 =
        sqlx::query_scalar("SELECT max_ttl_served FROM domains WHERE id = $1").bind(domain_id).fetch_one(pool).await?;
    Ok(u32::try_from(ttl).unwrap_or(0))
}

/// The id of a migration of the domain that moved answers away from `ip`, if any.
pub async fn moved_away_from(pool: &PgPool, domain_id: i64, ip: IpAddr) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar("SELECT min(id) FROM host_migrations WHERE domain_id = $1 AND from_ip = $2")
        .bind(domain_id)
        .bind(ip)
        .fetch_one(pool)
        .await?)
}

/// Moves every migration whose time has come to its next phase, in one statement each:
/// - announced → redirecting once a relay holds the old address (or `relay_wait` passed without one) and, with a
///   temporary address, once a hold has passed since the answers moved to it;
/// - redirecting → done once the hold has passed since redirecting began and the quiet time since the last flow.
pub async fn advance(pool: &PgPool, relay_wait: Duration) -> Result<Vec<Advanced>, StoreError> {
    let relay_wait = relay_wait.as_secs_f64();
    let rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
        "WITH moved AS ( \
           UPDATE host_migrations SET phase = 'redirecting', redirect_at = now() \
            WHERE phase = 'announced' \
              AND (relay_at IS NOT NULL OR created_at + make_interval(secs => $1) <= now()) \
              AND (temporary_ip IS NULL OR created_at + make_interval(secs => hold_s) <= now()) \
           RETURNING id, domain_id, phase, flows \
         ), finished AS ( \
           UPDATE host_migrations SET phase = 'done', done_at = now() \
            WHERE phase = 'redirecting' \
              AND redirect_at + make_interval(secs => hold_s) <= now() \
              AND COALESCE(last_flow_at, redirect_at) + make_interval(secs => quiet_s) <= now() \
           RETURNING id, domain_id, phase, flows \
         ) \
         SELECT c.id, d.fqdn, c.phase::text, c.flows FROM (SELECT * FROM moved UNION ALL SELECT * FROM finished) c \
         JOIN domains d ON d.id = c.domain_id ORDER BY c.id",
    )
    .bind(relay_wait)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, fqdn, phase, flows)| Advanced { id, fqdn, phase, flows }).collect())
}
