//! Writes and reads behind the admin API. Every write that alters answers fires the schema's triggers, which bump
//! the zone serial and notify listeners in the same transaction.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{FromRow, PgPool, types::Json};

use super::StoreError;
use crate::{view::Nameserver, xfr::TransferPolicy};

/// A subscriber as the API shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Subscriber {
    /// Primary key.
    pub id: i64,
    /// Unique name.
    pub name: String,
}

/// A zone as the API shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Zone {
    /// Primary key.
    pub id: i64,
    /// Origin, fully qualified.
    pub origin: String,
    /// Authoritative servers and glue.
    pub nameservers: Json<Vec<Nameserver>>,
    /// SOA RNAME.
    pub hostmaster: String,
    /// Current SOA serial.
    pub serial: i64,
    /// SOA refresh.
    pub refresh: i32,
    /// SOA retry.
    pub retry: i32,
    /// SOA expire.
    pub expire: i32,
    /// SOA minimum (negative TTL).
    pub minimum: i32,
    /// TTL of the SOA record.
    pub soa_ttl: i32,
    /// TTL of NS records.
    pub ns_ttl: i32,
}

/// What creating a zone needs.
#[derive(Debug, Clone)]
pub struct NewZone {
    /// Origin, fully qualified, lower case.
    pub origin: String,
    /// Authoritative servers.
    pub nameservers: Vec<Nameserver>,
    /// SOA RNAME.
    pub hostmaster: String,
    /// SOA refresh, retry, expire, minimum.
    pub timers: [i32; 4],
    /// SOA and NS TTLs.
    pub soa_ttl: i32,
    /// NS TTL.
    pub ns_ttl: i32,
}

/// A domain as the API shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct Domain {
    /// Primary key.
    pub id: i64,
    /// Fully qualified name.
    pub fqdn: String,
    /// Origin of its zone.
    pub zone: String,
    /// Owner.
    pub subscriber_id: i64,
    /// Address owned by the packet-forwarder.
    pub static_ip: Option<IpAddr>,
    /// Record TTL.
    pub ttl: i32,
    /// Answered when nothing is live.
    pub fallback_ip: Option<IpAddr>,
    /// `nodata` or `last_known`.
    pub when_empty: String,
    /// Load hold-back threshold.
    pub load_threshold_pct: i32,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// What creating a domain needs.
#[derive(Debug, Clone)]
pub struct NewDomain {
    /// Fully qualified, lower case.
    pub fqdn: String,
    /// Owner.
    pub subscriber_id: i64,
    /// Forwarder address.
    pub static_ip: Option<IpAddr>,
    /// Record TTL.
    pub ttl: i32,
    /// Apology address.
    pub fallback_ip: Option<IpAddr>,
    /// `nodata` or `last_known`.
    pub when_empty: String,
    /// Load hold-back threshold.
    pub load_threshold_pct: i32,
}

/// An address row as the API shows it.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct AddressRow {
    /// The published address.
    pub ip: IpAddr,
    /// The interface address the NCU reported, when it differs (NAT).
    pub interface_ip: Option<IpAddr>,
    /// `ncu` or `static`.
    pub source: String,
    /// Uplink name for NCU addresses.
    pub uplink: Option<String>,
    /// Lower is preferred.
    pub priority: i32,
    /// Share among equals.
    pub weight: i32,
    /// Last reported load.
    pub load: f32,
    /// `pending`, `live` or `dead`.
    pub state: String,
    /// Heartbeat server in charge.
    pub hbs: Option<String>,
    /// Service check for static addresses.
    pub check: Option<serde_json::Value>,
    /// Last state change.
    pub changed_at: DateTime<Utc>,
}

/// A service tuple as stored.
#[derive(Debug, Clone, Serialize, FromRow, PartialEq)]
pub struct Service {
    /// Service name, without underscore.
    pub service: String,
    /// Transport, without underscore.
    pub transport: String,
    /// Address, published under a generated target.
    pub ip: Option<IpAddr>,
    /// Explicit target.
    pub target: Option<String>,
    /// Port.
    pub port: i32,
    /// SRV priority.
    pub priority: i32,
    /// SRV weight.
    pub weight: i32,
    /// False while the site holding its address reports the service failing: then it is not answered.
    #[sqlx(default)]
    pub healthy: bool,
    /// What the last check said, when it failed.
    #[sqlx(default)]
    pub health_reason: Option<String>,
}

const DOMAIN_SELECT: &str = "SELECT d.id, d.fqdn, z.origin AS zone, d.subscriber_id, d.static_ip, d.ttl, \
     d.fallback_ip, d.when_empty, d.load_threshold_pct, d.created_at FROM domains d JOIN zones z ON z.id = d.zone_id";

/// Creates a subscriber with the hash of its token.
pub async fn create_subscriber(pool: &PgPool, name: &str, token_hash: &[u8]) -> Result<Subscriber, StoreError> {
    Ok(sqlx::query_as("INSERT INTO subscribers (name, token_hash) VALUES ($1, $2) RETURNING id, name")
        .bind(name)
        .bind(token_hash)
        .fetch_one(pool)
        .await?)
}

/// The subscriber holding the token with this hash.
pub async fn subscriber_by_token(pool: &PgPool, token_hash: &[u8]) -> Result<Option<Subscriber>, StoreError> {
    Ok(sqlx::query_as("SELECT id, name FROM subscribers WHERE token_hash = $1")
        .bind(token_hash)
        .fetch_optional(pool)
        .await?)
}

/// True when a subscriber with this id exists.
pub async fn subscriber_exists(pool: &PgPool, id: i64) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM subscribers WHERE id = $1)").bind(id).fetch_one(pool).await?)
}

/// Creates a zone, refusing one that would capture another zone's domains.
pub async fn create_zone(pool: &PgPool, zone: &NewZone) -> Result<Zone, StoreError> {
    let mut tx = pool.begin().await?;
    let captured: Option<String> = sqlx::query_scalar(
        "SELECT fqdn FROM domains WHERE fqdn = $1 OR right(fqdn, length($1) + 1) = '.' || $1 LIMIT 1",
    )
    .bind(&zone.origin)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(fqdn) = captured {
        return Err(StoreError::Conflict(format!(
            "domain {} of another zone lies under {}",
            fqdn.trim_end_matches('.'),
            zone.origin.trim_end_matches('.')
        )));
    }
    let [refresh, retry, expire, minimum] = zone.timers;
    let row = sqlx::query_as(
        "INSERT INTO zones (origin, nameservers, hostmaster, refresh, retry, expire, minimum, soa_ttl, ns_ttl) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id, origin, nameservers, hostmaster, serial, \
         refresh, retry, expire, minimum, soa_ttl, ns_ttl",
    )
    .bind(&zone.origin)
    .bind(Json(&zone.nameservers))
    .bind(&zone.hostmaster)
    .bind(refresh)
    .bind(retry)
    .bind(expire)
    .bind(minimum)
    .bind(zone.soa_ttl)
    .bind(zone.ns_ttl)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// Every zone, by origin.
pub async fn list_zones(pool: &PgPool) -> Result<Vec<Zone>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, origin, nameservers, hostmaster, serial, refresh, retry, expire, minimum, soa_ttl, ns_ttl \
         FROM zones ORDER BY origin",
    )
    .fetch_all(pool)
    .await?)
}

/// The transfer policy of the zone `origin`, if it exists.
pub async fn zone_transfer(pool: &PgPool, origin: &str) -> Result<Option<TransferPolicy>, StoreError> {
    let row: Option<Json<TransferPolicy>> =
        sqlx::query_scalar("SELECT transfer FROM zones WHERE origin = $1").bind(origin).fetch_optional(pool).await?;
    Ok(row.map(|Json(policy)| policy))
}

/// Replaces the transfer policy of the zone `origin`; `false` when there is no such zone. The zone reloads (its
/// row changed) without a serial bump: what it publishes is the same.
pub async fn set_zone_transfer(pool: &PgPool, origin: &str, policy: &TransferPolicy) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE zones SET transfer = $2 WHERE origin = $1")
        .bind(origin)
        .bind(Json(policy))
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The deepest zone containing `fqdn`.
/// Who else holds names around `fqdn`, for a new domain: the zone's origin and nameserver names, the nearest domain
/// above it and its owner, and whether another subscriber has a domain below it or the static address.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Neighbours {
    /// The zone's origin.
    pub origin: String,
    /// True when `fqdn` is one of the zone's nameserver names.
    pub nameserver: bool,
    /// The nearest domain above `fqdn` and its subscriber.
    pub above: Option<String>,
    /// Its owner; `None` for the operator's own records, under which names are free.
    pub above_owner: Option<i64>,
    /// A domain of another subscriber below `fqdn`.
    pub foreign_below: Option<String>,
    /// The domain already holding the static address asked for.
    pub static_taken_by: Option<String>,
}

/// [`Neighbours`] of `fqdn` in zone `zone_id`, for `subscriber_id`'s new domain with `static_ip`.
pub async fn neighbours(
    pool: &PgPool,
    zone_id: i64,
    fqdn: &str,
    subscriber_id: i64,
    static_ip: Option<IpAddr>,
) -> Result<Neighbours, StoreError> {
    Ok(sqlx::query_as(
        "SELECT z.origin, \
                EXISTS (SELECT 1 FROM jsonb_array_elements(z.nameservers) ns \
                        WHERE lower(rtrim(ns->>'name', '.')) || '.' = $2) AS nameserver, \
                a.fqdn AS above, \
                CASE WHEN a.subscriber_id = (SELECT id FROM subscribers WHERE name = $5) THEN NULL \
                     ELSE a.subscriber_id END AS above_owner, \
                (SELECT d.fqdn FROM domains d WHERE right(d.fqdn, length($2) + 1) = '.' || $2 \
                    AND d.subscriber_id <> $3 LIMIT 1) AS foreign_below, \
                (SELECT d.fqdn FROM domains d WHERE $4::inet IS NOT NULL AND d.static_ip = $4 LIMIT 1) \
                    AS static_taken_by \
           FROM zones z \
           LEFT JOIN LATERAL (SELECT fqdn, subscriber_id FROM domains \
                WHERE right($2, length(fqdn) + 1) = '.' || fqdn ORDER BY length(fqdn) DESC LIMIT 1) a ON true \
          WHERE z.id = $1",
    )
    .bind(zone_id)
    .bind(fqdn)
    .bind(subscriber_id)
    .bind(static_ip)
    .bind(tether_db::OPERATOR_SUBSCRIBER)
    .fetch_one(pool)
    .await?)
}

/// How many of the domain's addresses have a service check.
pub async fn checks(pool: &PgPool, domain_id: i64) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM addresses WHERE domain_id = $1 AND \"check\" IS NOT NULL")
        .bind(domain_id)
        .fetch_one(pool)
        .await?)
}

/// The deepest zone holding `fqdn`.
pub async fn zone_for(pool: &PgPool, fqdn: &str) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM zones WHERE origin = $1 OR right($1, length(origin) + 1) = '.' || origin \
         ORDER BY length(origin) DESC LIMIT 1",
    )
    .bind(fqdn)
    .fetch_optional(pool)
    .await?)
}

/// Creates a domain in zone `zone_id`.
pub async fn create_domain(
    pool: &PgPool,
    zone_id: i64,
    domain: &NewDomain,
    max_domains: u32,
) -> Result<Domain, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT id FROM subscribers WHERE id = $1 FOR UPDATE")
        .bind(domain.subscriber_id)
        .execute(&mut *tx)
        .await?;
    let have: i64 = sqlx::query_scalar("SELECT count(*) FROM domains WHERE subscriber_id = $1")
        .bind(domain.subscriber_id)
        .fetch_one(&mut *tx)
        .await?;
    if have >= i64::from(max_domains) {
        return Err(StoreError::Invalid(format!("at most {max_domains} domains per subscriber")));
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO domains (fqdn, zone_id, subscriber_id, static_ip, ttl, fallback_ip, when_empty, \
         load_threshold_pct) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(&domain.fqdn)
    .bind(zone_id)
    .bind(domain.subscriber_id)
    .bind(domain.static_ip)
    .bind(domain.ttl)
    .bind(domain.fallback_ip)
    .bind(&domain.when_empty)
    .bind(domain.load_threshold_pct)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    domain_by_id(pool, id).await?.ok_or_else(|| StoreError::Conflict("domain deleted while being created".into()))
}

/// Domains of one subscriber, or all of them.
pub async fn list_domains(pool: &PgPool, subscriber_id: Option<i64>) -> Result<Vec<Domain>, StoreError> {
    Ok(sqlx::query_as(&format!("{DOMAIN_SELECT} WHERE $1::bigint IS NULL OR d.subscriber_id = $1 ORDER BY d.fqdn"))
        .bind(subscriber_id)
        .fetch_all(pool)
        .await?)
}

/// The domain with this name.
pub async fn domain_by_name(pool: &PgPool, fqdn: &str) -> Result<Option<Domain>, StoreError> {
    Ok(sqlx::query_as(&format!("{DOMAIN_SELECT} WHERE d.fqdn = $1")).bind(fqdn).fetch_optional(pool).await?)
}

async fn domain_by_id(pool: &PgPool, id: i64) -> Result<Option<Domain>, StoreError> {
    Ok(sqlx::query_as(&format!("{DOMAIN_SELECT} WHERE d.id = $1")).bind(id).fetch_optional(pool).await?)
}

/// Deletes a domain and everything hanging off it.
pub async fn delete_domain(pool: &PgPool, id: i64) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM domains WHERE id = $1").bind(id).execute(pool).await?;
    Ok(())
}

/// A domain's addresses, all states.
pub async fn addresses(pool: &PgPool, domain_id: i64) -> Result<Vec<AddressRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT ip, interface_ip, source::text AS source, uplink, priority, weight, load, state::text AS state, \
         hbs, \"check\" AS check, changed_at FROM addresses WHERE domain_id = $1 ORDER BY priority, ip",
    )
    .bind(domain_id)
    .fetch_all(pool)
    .await?)
}

/// Adds a static address: live at once without a check; with one, pending until a heartbeat server's check passes.
pub async fn add_static_address(
    pool: &PgPool,
    domain_id: i64,
    ip: IpAddr,
    priority: i32,
    weight: i32,
    check: Option<&serde_json::Value>,
    max_addresses: u32,
) -> Result<AddressRow, StoreError> {
    let mut tx = pool.begin().await?;
    if count_locked(&mut tx, "addresses", domain_id).await? >= i64::from(max_addresses) {
        return Err(StoreError::Invalid(format!("at most {max_addresses} addresses per domain")));
    }
    let row = sqlx::query_as(
        "INSERT INTO addresses (domain_id, ip, source, priority, weight, state, \"check\") \
         VALUES ($1, $2, 'static', $3, $4, CASE WHEN $5::jsonb IS NULL THEN 'live' ELSE 'pending' END::address_state, $5) \
         RETURNING ip, interface_ip, source::text AS source, \
         uplink, priority, weight, load, state::text AS state, hbs, \"check\" AS check, changed_at",
    )
    .bind(domain_id)
    .bind(ip)
    .bind(priority)
    .bind(weight)
    .bind(check)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// Removes an address; false when there was none.
pub async fn delete_address(pool: &PgPool, domain_id: i64, ip: IpAddr) -> Result<bool, StoreError> {
    // The reason the address history records (migrations/…_address_events.sql), for this statement's transaction.
    let done = sqlx::query(
        "WITH r AS (SELECT set_config('tether.reason', 'deleted through the API', true)) \
         DELETE FROM addresses WHERE domain_id = $1 AND ip = $2 AND EXISTS (SELECT 1 FROM r)",
    )
    .bind(domain_id)
    .bind(ip)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// A domain's service tuples.
pub async fn services(pool: &PgPool, domain_id: i64) -> Result<Vec<Service>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT service, transport, ip, target, port, priority, weight, healthy, health_reason FROM services \
         WHERE domain_id = $1 \
         ORDER BY service, transport, priority, weight DESC, port",
    )
    .bind(domain_id)
    .fetch_all(pool)
    .await?)
}

/// Replaces a domain's service tuples in one transaction.
pub async fn replace_services(pool: &PgPool, domain_id: i64, services: &[Service]) -> Result<(), StoreError> {
    // Tuples that stay keep their row (and the health their site reported); only the others go or come.
    const NEW: &str = "SELECT * FROM UNNEST($2::text[], $3::text[], $4::inet[], $5::text[], $6::int[], $7::int[], \
                       $8::int[]) AS v(service, transport, ip, target, port, priority, weight)";
    let same = "(s.service, s.transport, s.ip, s.target, s.port, s.priority, s.weight) IS NOT DISTINCT FROM \
                (v.service, v.transport, v.ip, v.target, v.port, v.priority, v.weight)";
    let mut tx = pool.begin().await?;
    for sql in [
        format!("DELETE FROM services s WHERE s.domain_id = $1 AND NOT EXISTS (SELECT 1 FROM ({NEW}) v WHERE {same})"),
        format!(
            "INSERT INTO services (domain_id, service, transport, ip, target, port, priority, weight) \
             SELECT $1, v.* FROM ({NEW}) v WHERE NOT EXISTS (SELECT 1 FROM services s WHERE s.domain_id = $1 AND {same})"
        ),
    ] {
        sqlx::query(&sql)
            .bind(domain_id)
            .bind(services.iter().map(|s| s.service.clone()).collect::<Vec<_>>())
            .bind(services.iter().map(|s| s.transport.clone()).collect::<Vec<_>>())
            .bind(services.iter().map(|s| s.ip).collect::<Vec<_>>())
            .bind(services.iter().map(|s| s.target.clone()).collect::<Vec<_>>())
            .bind(services.iter().map(|s| s.port).collect::<Vec<_>>())
            .bind(services.iter().map(|s| s.priority).collect::<Vec<_>>())
            .bind(services.iter().map(|s| s.weight).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Stores a one-time enrollment token's hash.
pub async fn create_enrollment(
    pool: &PgPool,
    domain_id: i64,
    token_hash: &[u8],
    expires_at: DateTime<Utc>,
    max_ncus: u32,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let ncus = count_locked(&mut tx, "ncus", domain_id).await?;
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM enrollments WHERE domain_id = $1 AND used_at IS NULL AND expires_at > now()",
    )
    .bind(domain_id)
    .fetch_one(&mut *tx)
    .await?;
    if ncus + pending >= i64::from(max_ncus) {
        return Err(StoreError::Invalid(format!(
            "at most {max_ncus} NCUs per domain (enrolled and pending enrollments count)"
        )));
    }
    sqlx::query("INSERT INTO enrollments (domain_id, token_hash, expires_at) VALUES ($1, $2, $3)")
        .bind(domain_id)
        .bind(token_hash)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// An enrolled NCU, for display.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct NcuRow {
    /// Primary key.
    pub id: i64,
    /// SHA-256 of its client certificate, hex.
    pub fingerprint: String,
    /// Hardware serial number it reported.
    pub serial_number: Option<String>,
    /// MAC address it reported.
    pub mac: Option<String>,
    /// When it enrolled.
    pub enrolled_at: DateTime<Utc>,
    /// When it last talked to hds or hbs.
    pub last_seen: Option<DateTime<Utc>>,
}

/// A domain's enrolled NCUs.
pub async fn ncus(pool: &PgPool, domain_id: i64) -> Result<Vec<NcuRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, encode(cert_fingerprint, 'hex') AS fingerprint, serial_number, mac, enrolled_at, last_seen \
         FROM ncus WHERE domain_id = $1 ORDER BY id",
    )
    .bind(domain_id)
    .fetch_all(pool)
    .await?)
}

/// Deletes an enrolled NCU of the domain (its addresses go with it); false when there is none.
pub async fn delete_ncu(pool: &PgPool, domain_id: i64, id: i64) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "WITH r AS (SELECT set_config('tether.reason', 'NCU deleted through the API', true)) \
         DELETE FROM ncus WHERE domain_id = $1 AND id = $2 AND EXISTS (SELECT 1 FROM r)",
    )
    .bind(domain_id)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A row of the fleet table.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct HeartbeatServer {
    /// Unique name.
    pub name: String,
    /// QUIC control address.
    pub control_address: String,
    /// Most addresses it takes.
    pub capacity: i32,
    /// Addresses it carries.
    pub current_load: i32,
    /// `active`, `full` or `draining`.
    pub state: String,
    /// Last refresh of the row.
    pub last_seen: DateTime<Utc>,
    /// Seconds since the last refresh.
    pub age_seconds: f64,
}

/// The fleet table.
pub async fn heartbeat_servers(pool: &PgPool) -> Result<Vec<HeartbeatServer>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT name, control_address, capacity, current_load, state::text AS state, last_seen, \
         GREATEST(EXTRACT(EPOCH FROM now() - last_seen), 0)::float8 AS age_seconds FROM heartbeat_servers ORDER BY name",
    )
    .fetch_all(pool)
    .await?)
}

/// Sets a heartbeat server's state (`draining`, or `active` to undo a drain); None when there is no such server.
pub async fn set_heartbeat_server_state(
    pool: &PgPool,
    name: &str,
    state: &str,
) -> Result<Option<HeartbeatServer>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE heartbeat_servers SET state = $2::hbs_state WHERE name = $1 RETURNING name, control_address, capacity, \
         current_load, state::text AS state, last_seen, \
         GREATEST(EXTRACT(EPOCH FROM now() - last_seen), 0)::float8 AS age_seconds",
    )
    .bind(name)
    .bind(state)
    .fetch_optional(pool)
    .await?)
}

/// A domain's packet-forwarder settings.
#[derive(Debug, Clone, Serialize, FromRow, PartialEq, Eq)]
pub struct Forwarding {
    /// Ports relayed on the static address (TCP and UDP); empty: the service tuples' ports.
    pub ports: Vec<i32>,
    /// `round_robin` or `least_connections`.
    pub policy: String,
    /// `off`, `tcp` or `tcp_udp`.
    pub proxy_protocol: String,
    /// Most concurrent flows of the domain.
    pub max_flows: i32,
    /// Most concurrent flows of one client address.
    pub max_flows_per_client: i32,
}

const FORWARDING_COLUMNS: &str = "forward_ports AS ports, forward_policy AS policy, proxy_protocol, max_flows, \
     max_flows_per_client";

/// A domain's forwarding settings.
pub async fn forwarding(pool: &PgPool, domain_id: i64) -> Result<Option<Forwarding>, StoreError> {
    Ok(sqlx::query_as(&format!("SELECT {FORWARDING_COLUMNS} FROM domains WHERE id = $1"))
        .bind(domain_id)
        .fetch_optional(pool)
        .await?)
}

/// Replaces a domain's forwarding settings; the domain row trigger notifies the forwarders.
pub async fn set_forwarding(
    pool: &PgPool,
    domain_id: i64,
    settings: &Forwarding,
) -> Result<Option<Forwarding>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "UPDATE domains SET forward_ports = $2, forward_policy = $3, proxy_protocol = $4, max_flows = $5, \
         max_flows_per_client = $6 WHERE id = $1 RETURNING {FORWARDING_COLUMNS}"
    ))
    .bind(domain_id)
    .bind(&settings.ports)
    .bind(&settings.policy)
    .bind(&settings.proxy_protocol)
    .bind(settings.max_flows)
    .bind(settings.max_flows_per_client)
    .fetch_optional(pool)
    .await?)
}

/// The rows of `table` (a child table of `domains`) that belong to `domain_id`, with the domain row locked so that
/// the count holds until the transaction ends (one writer per domain at a time).
async fn count_locked(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    table: &'static str,
    domain_id: i64,
) -> Result<i64, StoreError> {
    sqlx::query("SELECT id FROM domains WHERE id = $1 FOR UPDATE").bind(domain_id).execute(&mut **tx).await?;
    Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE domain_id = $1"))
        .bind(domain_id)
        .fetch_one(&mut **tx)
        .await?)
}

/// A dyndns2 update credential, without its secret.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct DyndnsCredential {
    /// The login clients send.
    pub username: String,
    /// The domain it may update.
    #[serde(skip)]
    pub domain_id: i64,
    /// The domain's name.
    #[serde(skip)]
    pub fqdn: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// Most credentials per domain.
pub const MAX_DYNDNS_CREDENTIALS: i64 = 16;

/// Stores a new credential for `domain_id`; `Conflict` when the domain has [`MAX_DYNDNS_CREDENTIALS`].
pub async fn create_dyndns_credential(
    pool: &PgPool,
    domain_id: i64,
    username: &str,
    secret_hash: &[u8],
) -> Result<DateTime<Utc>, StoreError> {
    let mut tx = pool.begin().await?;
    if count_locked(&mut tx, "dyndns_credentials", domain_id).await? >= MAX_DYNDNS_CREDENTIALS {
        return Err(StoreError::Conflict(format!("at most {MAX_DYNDNS_CREDENTIALS} credentials per domain")));
    }
    let created_at = sqlx::query_scalar(
        "INSERT INTO dyndns_credentials (domain_id, username, secret_hash) VALUES ($1, $2, $3) RETURNING created_at",
    )
    .bind(domain_id)
    .bind(username)
    .bind(secret_hash)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(created_at)
}

/// The credentials of `domain_id`.
pub async fn dyndns_credentials(pool: &PgPool, domain_id: i64) -> Result<Vec<DyndnsCredential>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT c.username, c.domain_id, d.fqdn, c.created_at FROM dyndns_credentials c \
         JOIN domains d ON d.id = c.domain_id WHERE c.domain_id = $1 ORDER BY c.created_at",
    )
    .bind(domain_id)
    .fetch_all(pool)
    .await?)
}

/// Revokes a credential of `domain_id`; `false` when it has none by that name.
pub async fn delete_dyndns_credential(pool: &PgPool, domain_id: i64, username: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM dyndns_credentials WHERE domain_id = $1 AND username = $2")
        .bind(domain_id)
        .bind(username)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// A credential row with the hash of its secret.
#[derive(FromRow)]
struct CredentialRow {
    #[sqlx(flatten)]
    credential: DyndnsCredential,
    secret_hash: Vec<u8>,
}

/// The credential `username` with the hash of its secret.
pub async fn dyndns_credential(
    pool: &PgPool,
    username: &str,
) -> Result<Option<(DyndnsCredential, Vec<u8>)>, StoreError> {
    let row: Option<CredentialRow> = sqlx::query_as(
        "SELECT c.username, c.domain_id, d.fqdn, c.created_at, c.secret_hash FROM dyndns_credentials c \
         JOIN domains d ON d.id = c.domain_id WHERE c.username = $1",
    )
    .bind(username)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| (row.credential, row.secret_hash)))
}

/// Makes `ip` the domain's dyndns address of its family: `true` when that changed something (the old address of the
/// family, if any, is replaced), `false` when it already was. An address of the domain from another source with the
/// same IP is left as it is (no change).
pub async fn set_dyndns_address(pool: &PgPool, domain_id: i64, ip: IpAddr) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let family = if ip.is_ipv4() { 4 } else { 6 };
    let current: Vec<IpAddr> = sqlx::query_scalar(
        "SELECT ip FROM addresses WHERE domain_id = $1 AND source = 'dyndns' AND family(ip) = $2 FOR UPDATE",
    )
    .bind(domain_id)
    .bind(family)
    .fetch_all(&mut *tx)
    .await?;
    if current == [ip] {
        return Ok(false);
    }
    sqlx::query("DELETE FROM addresses WHERE domain_id = $1 AND source = 'dyndns' AND family(ip) = $2 AND ip <> $3")
        .bind(domain_id)
        .bind(family)
        .bind(ip)
        .execute(&mut *tx)
        .await?;
    let inserted = sqlx::query(
        "INSERT INTO addresses (domain_id, ip, source, state) VALUES ($1, $2, 'dyndns', 'live') \
         ON CONFLICT (domain_id, ip) DO NOTHING",
    )
    .bind(domain_id)
    .bind(ip)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(inserted.rows_affected() == 1 || !current.is_empty())
}

/// A TXT record as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow, Serialize)]
pub struct Txt {
    /// Owner, fully qualified, lower case.
    pub name: String,
    /// The text.
    pub value: String,
    /// TTL, seconds.
    pub ttl: i32,
}

/// The TXT records of `domain_id`.
pub async fn txt_records(pool: &PgPool, domain_id: i64) -> Result<Vec<Txt>, StoreError> {
    Ok(sqlx::query_as("SELECT owner AS name, value, ttl FROM txt_records WHERE domain_id = $1 ORDER BY owner, value")
        .bind(domain_id)
        .fetch_all(pool)
        .await?)
}

/// Replaces the TXT records of `domain_id`; `Conflict` naming the owner when one is another domain's name.
pub async fn replace_txt(pool: &PgPool, domain_id: i64, records: &[Txt]) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    let owners: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    let taken: Option<String> =
        sqlx::query_scalar("SELECT fqdn FROM domains WHERE fqdn = ANY($1) AND id <> $2 LIMIT 1")
            .bind(&owners)
            .bind(domain_id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(fqdn) = taken {
        return Err(StoreError::Conflict(format!("{} is another domain", fqdn.trim_end_matches('.'))));
    }
    sqlx::query("DELETE FROM txt_records WHERE domain_id = $1").bind(domain_id).execute(&mut *tx).await?;
    if !records.is_empty() {
        // One statement, so the triggers bump the serial once.
        sqlx::query(
            "INSERT INTO txt_records (domain_id, owner, value, ttl) SELECT $1, * FROM UNNEST($2::text[], $3::text[], \
             $4::int[]) ON CONFLICT DO NOTHING",
        )
        .bind(domain_id)
        .bind(owners)
        .bind(records.iter().map(|r| r.value.clone()).collect::<Vec<_>>())
        .bind(records.iter().map(|r| r.ttl).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// An UPDATE key as the API lists it (no secret).
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct UpdateKey {
    /// Key name, fully qualified.
    pub name: String,
    /// HMAC algorithm.
    pub algorithm: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// Most UPDATE keys per domain.
pub const MAX_UPDATE_KEYS: i64 = 8;

/// Stores a new UPDATE key for `domain_id`; `Conflict` when the domain has [`MAX_UPDATE_KEYS`].
pub async fn create_update_key(
    pool: &PgPool,
    domain_id: i64,
    name: &str,
    algorithm: &str,
    secret: &str,
) -> Result<DateTime<Utc>, StoreError> {
    let mut tx = pool.begin().await?;
    if count_locked(&mut tx, "update_keys", domain_id).await? >= MAX_UPDATE_KEYS {
        return Err(StoreError::Conflict(format!("at most {MAX_UPDATE_KEYS} UPDATE keys per domain")));
    }
    let created_at = sqlx::query_scalar(
        "INSERT INTO update_keys (domain_id, name, algorithm, secret) VALUES ($1, $2, $3, $4) RETURNING created_at",
    )
    .bind(domain_id)
    .bind(name)
    .bind(algorithm)
    .bind(secret)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(created_at)
}

/// The UPDATE keys of `domain_id`.
pub async fn update_keys(pool: &PgPool, domain_id: i64) -> Result<Vec<UpdateKey>, StoreError> {
    Ok(sqlx::query_as("SELECT name, algorithm, created_at FROM update_keys WHERE domain_id = $1 ORDER BY created_at")
        .bind(domain_id)
        .fetch_all(pool)
        .await?)
}

/// Revokes an UPDATE key of `domain_id`; `false` when it has none by that name.
pub async fn delete_update_key(pool: &PgPool, domain_id: i64, name: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("DELETE FROM update_keys WHERE domain_id = $1 AND name = $2")
        .bind(domain_id)
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The key named `name` with its secret, and the id and name of its domain.
pub async fn update_key(pool: &PgPool, name: &str) -> Result<Option<(String, String, i64, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT k.algorithm, k.secret, d.id, d.fqdn FROM update_keys k JOIN domains d ON d.id = k.domain_id \
         WHERE k.name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?)
}

/// One change an UPDATE asks for, as rows see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowChange {
    /// Add an address to the domain (source static, live).
    AddAddress(IpAddr),
    /// Delete one address of the domain (static or dyndns).
    DeleteAddress(IpAddr),
    /// Delete every static and dyndns address of a family (4 or 6).
    DeleteFamily(i32),
    /// Add a TXT record at an owner.
    AddTxt { owner: String, value: String, ttl: i32 },
    /// Delete one TXT record at an owner.
    DeleteTxt { owner: String, value: String },
    /// Delete every TXT record at an owner.
    DeleteTxtAt(String),
    /// Add a service tuple with an explicit target (an SRV record).
    AddService { service: String, transport: String, target: String, port: i32, priority: i32, weight: i32 },
    /// Delete the service tuples of (service, transport) with this target and port.
    DeleteService { service: String, transport: String, target: String, port: i32 },
    /// Delete every service tuple of (service, transport).
    DeleteServices { service: String, transport: String },
}

/// Applies `changes` to `domain_id` in one transaction, in order; `Conflict` when the domain would hold more than
/// the API's bounds allow (`max_txt` TXT records).
pub async fn apply_update(
    pool: &PgPool,
    domain_id: i64,
    changes: &[RowChange],
    max_txt: i64,
    max_addresses: u32,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    for change in changes {
        let query = match change {
            RowChange::AddAddress(ip) => sqlx::query(
                "INSERT INTO addresses (domain_id, ip, source, state) VALUES ($1, $2, 'static', 'live') \
                 ON CONFLICT (domain_id, ip) DO NOTHING",
            )
            .bind(domain_id)
            .bind(*ip),
            RowChange::DeleteAddress(ip) => {
                sqlx::query("DELETE FROM addresses WHERE domain_id = $1 AND ip = $2 AND source IN ('static', 'dyndns')")
                    .bind(domain_id)
                    .bind(*ip)
            }
            RowChange::DeleteFamily(family) => sqlx::query(
                "DELETE FROM addresses WHERE domain_id = $1 AND family(ip) = $2 AND source IN ('static', 'dyndns')",
            )
            .bind(domain_id)
            .bind(*family),
            RowChange::AddTxt { owner, value, ttl } => sqlx::query(
                "INSERT INTO txt_records (domain_id, owner, value, ttl) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )
            .bind(domain_id)
            .bind(owner)
            .bind(value)
            .bind(*ttl),
            RowChange::DeleteTxt { owner, value } => {
                sqlx::query("DELETE FROM txt_records WHERE domain_id = $1 AND owner = $2 AND value = $3")
                    .bind(domain_id)
                    .bind(owner)
                    .bind(value)
            }
            RowChange::DeleteTxtAt(owner) => {
                sqlx::query("DELETE FROM txt_records WHERE domain_id = $1 AND owner = $2").bind(domain_id).bind(owner)
            }
            RowChange::AddService { service, transport, target, port, priority, weight } => sqlx::query(
                "INSERT INTO services (domain_id, service, transport, target, port, priority, weight) \
                 SELECT $1, $2, $3, $4, $5, $6, $7 WHERE NOT EXISTS (SELECT 1 FROM services WHERE domain_id = $1 \
                 AND service = $2 AND transport = $3 AND target = $4 AND port = $5)",
            )
            .bind(domain_id)
            .bind(service)
            .bind(transport)
            .bind(target)
            .bind(*port)
            .bind(*priority)
            .bind(*weight),
            RowChange::DeleteService { service, transport, target, port } => sqlx::query(
                "DELETE FROM services WHERE domain_id = $1 AND service = $2 AND transport = $3 AND target = $4 \
                 AND port = $5",
            )
            .bind(domain_id)
            .bind(service)
            .bind(transport)
            .bind(target)
            .bind(*port),
            RowChange::DeleteServices { service, transport } => {
                sqlx::query("DELETE FROM services WHERE domain_id = $1 AND service = $2 AND transport = $3")
                    .bind(domain_id)
                    .bind(service)
                    .bind(transport)
            }
        };
        query.execute(&mut *tx).await?;
    }
    let txt: i64 = sqlx::query_scalar("SELECT count(*) FROM txt_records WHERE domain_id = $1")
        .bind(domain_id)
        .fetch_one(&mut *tx)
        .await?;
    if txt > max_txt {
        return Err(StoreError::Conflict(format!("at most {max_txt} TXT records per domain")));
    }
    let addresses: i64 = sqlx::query_scalar("SELECT count(*) FROM addresses WHERE domain_id = $1")
        .bind(domain_id)
        .fetch_one(&mut *tx)
        .await?;
    if addresses > i64::from(max_addresses) {
        return Err(StoreError::Conflict(format!("at most {max_addresses} addresses per domain")));
    }
    tx.commit().await?;
    Ok(())
}
