//! Reads that build the DNS view: everything at once, or just the zones and domains a notification names.

use std::{collections::HashMap, net::IpAddr};

use hickory_server::proto::rr::Name;
use sqlx::{PgPool, Postgres, Row, Transaction, postgres::PgRow, types::Json};

use super::StoreError;
use crate::{
    answer::{Address, Policy, State, WhenEmpty},
    view::{DomainRow, Nameserver, ServiceRow, ZoneRow},
};

const ZONE_COLUMNS: &str = "id, origin, nameservers, hostmaster, serial, refresh, retry, expire, minimum, \
                            soa_ttl, ns_ttl";
const DOMAIN_COLUMNS: &str = "id, zone_id, fqdn, ttl, fallback_ip, when_empty, load_threshold_pct";

/// Everything, from one consistent snapshot.
pub async fn load_all(pool: &PgPool) -> Result<(Vec<ZoneRow>, Vec<DomainRow>), StoreError> {
    let mut tx = snapshot(pool).await?;
    let zones = sqlx::query(&format!("SELECT {ZONE_COLUMNS} FROM zones")).fetch_all(&mut *tx).await?;
    let domains = sqlx::query(&format!("SELECT {DOMAIN_COLUMNS} FROM domains")).fetch_all(&mut *tx).await?;
    let addresses = sqlx::query(
        "SELECT domain_id, ip, priority, weight, load, state::text AS state FROM addresses \
         WHERE state <> 'pending'",
    )
    .fetch_all(&mut *tx)
    .await?;
    let services =
        sqlx::query("SELECT domain_id, service, transport, ip, target, port, priority, weight FROM services")
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok((zones_from(&zones), assemble(&domains, &addresses, &services)))
}

/// The named zones that still exist.
pub async fn load_zones(pool: &PgPool, ids: &[i64]) -> Result<Vec<ZoneRow>, StoreError> {
    let rows =
        sqlx::query(&format!("SELECT {ZONE_COLUMNS} FROM zones WHERE id = ANY($1)")).bind(ids).fetch_all(pool).await?;
    Ok(zones_from(&rows))
}

/// The named domains that still exist, with their addresses and services, from one snapshot.
pub async fn load_domains(pool: &PgPool, ids: &[i64]) -> Result<Vec<DomainRow>, StoreError> {
    let mut tx = snapshot(pool).await?;
    let domains = sqlx::query(&format!("SELECT {DOMAIN_COLUMNS} FROM domains WHERE id = ANY($1)"))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
    let addresses = sqlx::query(
        "SELECT domain_id, ip, priority, weight, load, state::text AS state FROM addresses \
         WHERE domain_id = ANY($1) AND state <> 'pending'",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let services = sqlx::query(
        "SELECT domain_id, service, transport, ip, target, port, priority, weight FROM services \
         WHERE domain_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(assemble(&domains, &addresses, &services))
}

async fn snapshot(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    Ok(tx)
}

fn zones_from(rows: &[PgRow]) -> Vec<ZoneRow> {
    rows.iter()
        .filter_map(|row| match zone_from(row) {
            Ok(zone) => Some(zone),
            Err(error) => {
                tracing::error!(%error, "skipping unreadable zone row");
                None
            }
        })
        .collect()
}

fn zone_from(row: &PgRow) -> Result<ZoneRow, Box<dyn std::error::Error + Send + Sync>> {
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
    })
}

fn assemble(domains: &[PgRow], addresses: &[PgRow], services: &[PgRow]) -> Vec<DomainRow> {
    let mut by_id: HashMap<i64, DomainRow> = HashMap::with_capacity(domains.len());
    for row in domains {
        match domain_from(row) {
            Ok(domain) => {
                by_id.insert(domain.id, domain);
            }
            Err(error) => tracing::error!(%error, "skipping unreadable domain row"),
        }
    }
    for row in addresses {
        match address_from(row) {
            Ok((domain_id, address)) => {
                if let Some(domain) = by_id.get_mut(&domain_id) {
                    domain.addresses.push(address);
                }
            }
            Err(error) => tracing::error!(%error, "skipping unreadable address row"),
        }
    }
    for row in services {
        match service_from(row) {
            Ok((domain_id, service)) => {
                if let Some(domain) = by_id.get_mut(&domain_id) {
                    domain.services.push(service);
                }
            }
            Err(error) => tracing::error!(%error, "skipping unreadable service row"),
        }
    }
    by_id.into_values().collect()
}

fn domain_from(row: &PgRow) -> Result<DomainRow, Box<dyn std::error::Error + Send + Sync>> {
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
    })
}

fn address_from(row: &PgRow) -> Result<(i64, Address), Box<dyn std::error::Error + Send + Sync>> {
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

fn service_from(row: &PgRow) -> Result<(i64, ServiceRow), Box<dyn std::error::Error + Send + Sync>> {
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
