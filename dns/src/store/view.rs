//! Reads that build the DNS view: everything at once, or just the zones and domains a notification names. Domains
//! are read with the reader dns shares with the forwarder ([`tether_db::domains`]); the columns are dns's own.

use std::net::IpAddr;

use hickory_server::proto::rr::Name;
use sqlx::{PgPool, Row, postgres::PgRow, types::Json};
use tether_db::domains::{self, Domain, RowError};

use super::StoreError;
use crate::{
    answer::{Address, Policy, State, WhenEmpty},
    view::{DomainRow, Nameserver, ServiceRow, TxtRow, ZoneRow},
    xfr::TransferPolicy,
};

const ZONE_COLUMNS: &str = "id, origin, nameservers, hostmaster, serial, refresh, retry, expire, minimum, \
                            soa_ttl, ns_ttl, transfer";

/// Everything, from one consistent snapshot.
pub async fn load_all(pool: &PgPool) -> Result<(Vec<ZoneRow>, Vec<DomainRow>), StoreError> {
    let mut tx = domains::snapshot(pool).await?;
    let zones = sqlx::query(&format!("SELECT {ZONE_COLUMNS} FROM zones")).fetch_all(&mut *tx).await?;
    let mut domains = domains::read_in(&mut tx, None).await?;
    attach_txt(&mut tx, &mut domains, None).await?;
    tx.commit().await?;
    Ok((domains::rows(&zones, "zone", zone_from), domains))
}

/// The named zones and domains that still exist, from one snapshot.
pub async fn load_changes(
    pool: &PgPool,
    zone_ids: &[i64],
    domain_ids: &[i64],
) -> Result<(Vec<ZoneRow>, Vec<DomainRow>), StoreError> {
    let mut tx = domains::snapshot(pool).await?;
    let mut domains: Vec<DomainRow> = domains::read_in(&mut tx, Some(domain_ids)).await?;
    attach_txt(&mut tx, &mut domains, Some(domain_ids)).await?;
    let rows = sqlx::query(&format!("SELECT {ZONE_COLUMNS} FROM zones WHERE id = ANY($1)"))
        .bind(zone_ids)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((domains::rows(&rows, "zone", zone_from), domains))
}

/// Reads the TXT records of `domains` (all, or those of `ids`) in the caller's snapshot and gives each its own.
async fn attach_txt(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    domains: &mut [DomainRow],
    ids: Option<&[i64]>,
) -> Result<(), StoreError> {
    let rows = sqlx::query(
        "SELECT domain_id, owner, value, ttl FROM txt_records WHERE $1::bigint[] IS NULL OR domain_id = ANY($1) \
         ORDER BY domain_id, owner, value",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    let read = |row: &PgRow| -> Result<(i64, TxtRow), RowError> {
        let owner = Name::from_ascii(row.try_get::<&str, _>("owner")?)?;
        let ttl = u32::try_from(row.try_get::<i32, _>("ttl")?)?;
        Ok((row.try_get("domain_id")?, TxtRow { owner, value: row.try_get("value")?, ttl }))
    };
    let mut by_domain: std::collections::HashMap<i64, Vec<TxtRow>> = std::collections::HashMap::new();
    for (domain_id, txt) in domains::rows(&rows, "txt record", read) {
        by_domain.entry(domain_id).or_default().push(txt);
    }
    for domain in domains {
        domain.txt = by_domain.remove(&domain.id).unwrap_or_default();
    }
    Ok(())
}

fn zone_from(row: &PgRow) -> Result<ZoneRow, RowError> {
    let Json(nameservers): Json<Vec<Nameserver>> = row.try_get("nameservers")?;
    Ok(ZoneRow {
        id: row.try_get("id")?,
        origin: Name::from_ascii(row.try_get::<&str, _>("origin")?)?,
        nameservers,
        hostmaster: Name::from_ascii(row.try_get::<&str, _>("hostmaster")?)?,
        serial: row.try_get("serial")?,
        refresh: row.try_get("refresh")?,
        retry: row.try_get("retry")?,
        expire: row.try_get("expire")?,
        minimum: u32::try_from(row.try_get::<i32, _>("minimum")?)?,
        soa_ttl: u32::try_from(row.try_get::<i32, _>("soa_ttl")?)?,
        ns_ttl: u32::try_from(row.try_get::<i32, _>("ns_ttl")?)?,
        transfer: row.try_get::<Json<TransferPolicy>, _>("transfer").map(|Json(t)| t).unwrap_or_else(|error| {
            // Written only through the API, which validates it; a bad row must not take the zone down with it.
            tracing::warn!(%error, "unreadable zones.transfer; the zone is served without transfers");
            TransferPolicy::default()
        }),
    })
}

impl Domain for DomainRow {
    type Address = Address;
    type Service = ServiceRow;
    const DOMAINS: &'static str = "SELECT id, zone_id, fqdn, ttl, fallback_ip, when_empty, load_threshold_pct \
                                   FROM domains WHERE $1::bigint[] IS NULL OR id = ANY($1)";
    /// The addresses as the answers see them, host migrations applied: a migration's old address is left out, its
    /// new address takes the old one's priority when that is better, and while it is announced with a temporary
    /// address the temporary one is answered instead of the new one.
    const ADDRESSES: &'static str = "SELECT a.domain_id, a.ip, \
           LEAST(a.priority, (SELECT min(f.priority) FROM host_migrations m JOIN addresses f \
                ON f.domain_id = m.domain_id AND f.ip = m.from_ip \
                WHERE m.domain_id = a.domain_id AND m.to_ip = a.ip)) AS priority, \
           a.weight, a.load, a.state::text AS state \
      FROM addresses a WHERE a.state <> 'pending' AND ($1::bigint[] IS NULL OR a.domain_id = ANY($1)) \
       AND NOT EXISTS (SELECT 1 FROM host_migrations m WHERE m.domain_id = a.domain_id AND (m.from_ip = a.ip \
            OR (m.phase = 'announced' AND m.temporary_ip IS NOT NULL AND m.to_ip = a.ip))) \
    UNION ALL \
    SELECT m.domain_id, m.temporary_ip, COALESCE(f.priority, 0), COALESCE(f.weight, 1), 0::real, 'live' \
      FROM host_migrations m LEFT JOIN addresses f ON f.domain_id = m.domain_id AND f.ip = m.from_ip \
     WHERE m.phase = 'announced' AND m.temporary_ip IS NOT NULL AND ($1::bigint[] IS NULL OR m.domain_id = ANY($1)) \
       AND NOT EXISTS (SELECT 1 FROM addresses x WHERE x.domain_id = m.domain_id AND x.ip = m.temporary_ip)";
    /// The tuples answered: a tuple whose site reports its service failing is left out.
    const SERVICES: &'static str = "SELECT domain_id, service, transport, ip, target, port, priority, weight \
                                    FROM services WHERE healthy AND ($1::bigint[] IS NULL OR domain_id = ANY($1))";

    fn id(&self) -> i64 {
        self.id
    }

    fn domain(row: &PgRow) -> Result<Self, RowError> {
        domain_from(row)
    }

    fn address(row: &PgRow) -> Result<(i64, Address), RowError> {
        address_from(row)
    }

    fn service(row: &PgRow) -> Result<Option<(i64, ServiceRow)>, RowError> {
        service_from(row).map(Some)
    }

    fn add_address(&mut self, address: Address) {
        self.addresses.push(address);
    }

    fn add_service(&mut self, service: ServiceRow) {
        self.services.push(service);
    }
}

fn domain_from(row: &PgRow) -> Result<DomainRow, RowError> {
    let when_empty = match row.try_get::<&str, _>("when_empty")? {
        "last_known" => WhenEmpty::LastKnown,
        _ => WhenEmpty::NoData,
    };
    Ok(DomainRow {
        id: row.try_get("id")?,
        zone_id: row.try_get("zone_id")?,
        fqdn: Name::from_ascii(row.try_get::<&str, _>("fqdn")?)?,
        ttl: u32::try_from(row.try_get::<i32, _>("ttl")?)?,
        policy: Policy {
            fallback: row.try_get::<Option<IpAddr>, _>("fallback_ip")?,
            when_empty,
            load_threshold_pct: u32::try_from(row.try_get::<i32, _>("load_threshold_pct")?)?,
        },
        addresses: Vec::new(),
        services: Vec::new(),
        txt: Vec::new(),
    })
}

fn address_from(row: &PgRow) -> Result<(i64, Address), RowError> {
    let state = match row.try_get::<&str, _>("state")? {
        "live" => State::Live,
        "dead" => State::Dead,
        _ => State::Pending,
    };
    Ok((
        row.try_get("domain_id")?,
        Address {
            ip: row.try_get("ip")?,
            priority: u32::try_from(row.try_get::<i32, _>("priority")?)?,
            weight: u32::try_from(row.try_get::<i32, _>("weight")?)?,
            load: row.try_get("load")?,
            state,
        },
    ))
}

fn service_from(row: &PgRow) -> Result<(i64, ServiceRow), RowError> {
    let target = row.try_get::<Option<&str>, _>("target")?.map(Name::from_ascii).transpose()?;
    Ok((
        row.try_get("domain_id")?,
        ServiceRow {
            service: row.try_get("service")?,
            transport: row.try_get("transport")?,
            ip: row.try_get("ip")?,
            target,
            port: u16::try_from(row.try_get::<i32, _>("port")?)?,
            priority: u16::try_from(row.try_get::<i32, _>("priority")?)?,
            weight: u16::try_from(row.try_get::<i32, _>("weight")?)?,
        },
    ))
}
