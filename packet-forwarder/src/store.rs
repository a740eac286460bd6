//! The reads that build the target table, with the domain reader the forwarder shares with dns
//! ([`tether_db::domains`]); the columns and the row model are the forwarder's own.

use std::net::IpAddr;

use sqlx::{PgPool, Row, postgres::PgRow};
use tether_config::TargetPolicy;
pub use tether_db::StoreError;
use tether_db::domains::{self, Domain, RowError};
use tracing::warn;

use crate::table::{AddressRow, DomainRow, Policy, Protocol, ProxyMode};

/// Every domain with a static address, from one snapshot; targets `targets` refuses are left out.
pub async fn load_all(pool: &PgPool, targets: &TargetPolicy) -> Result<Vec<DomainRow>, StoreError> {
    load(pool, None, targets).await
}

/// The named domains that still exist and still have a static address, from one snapshot.
pub async fn load_domains(pool: &PgPool, ids: &[i64], targets: &TargetPolicy) -> Result<Vec<DomainRow>, StoreError> {
    load(pool, Some(ids), targets).await
}

async fn load(pool: &PgPool, ids: Option<&[i64]>, targets: &TargetPolicy) -> Result<Vec<DomainRow>, StoreError> {
    let mut rows: Vec<DomainRow> = domains::read(pool, ids).await?;
    for row in &mut rows {
        // The API refuses such addresses; a row written by other means is never relayed to.
        row.addresses.retain(|a| match targets.check(a.ip) {
            Ok(()) => true,
            Err(why) => {
                warn!(domain = %row.name, address = %a.ip, %why, "not relaying to this address");
                false
            }
        });
        if let Some(fallback) = row.fallback
            && let Err(why) = targets.check(fallback)
        {
            warn!(domain = %row.name, %fallback, %why, "not relaying to this fallback");
            row.fallback = None;
        }
        // Row order from Postgres is arbitrary; a stable order lets an unchanged domain compare equal.
        row.addresses.sort_by_key(|a| a.ip);
        row.services.sort_unstable();
        row.services.dedup();
    }
    Ok(rows)
}

/// Every unfinished host migration's redirect (few: at most one per domain).
pub async fn redirects(pool: &PgPool) -> Result<Vec<tether_nft::Redirect>, StoreError> {
    let rows: Vec<(i64, IpAddr, IpAddr, Vec<i32>)> =
        sqlx::query_as("SELECT id, from_ip, to_ip, ports FROM host_migrations WHERE phase <> 'done' ORDER BY id")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, from, to, ports)| tether_nft::Redirect {
            id,
            from,
            to,
            ports: ports.into_iter().filter_map(|p| u16::try_from(p).ok()).collect(),
        })
        .collect())
}

/// A listener a service tuple asks for.
type Listen = (Protocol, u16);

impl Domain for DomainRow {
    type Address = AddressRow;
    type Service = Listen;
    const DOMAINS: &'static str = "SELECT id, fqdn, static_ip, fallback_ip, forward_ports, forward_policy, \
                                   proxy_protocol, max_flows, max_flows_per_client FROM domains \
                                   WHERE static_ip IS NOT NULL AND ($1::bigint[] IS NULL OR id = ANY($1))";
    /// Live addresses, host migrations applied as dns applies them: a migration's old address takes no new flows
    /// (its running flows go on), its new address takes the old one's priority when that is better.
    const ADDRESSES: &'static str = "SELECT a.domain_id, a.ip, \
           LEAST(a.priority, (SELECT min(f.priority) FROM host_migrations m JOIN addresses f \
                ON f.domain_id = m.domain_id AND f.ip = m.from_ip \
                WHERE m.domain_id = a.domain_id AND m.to_ip = a.ip)) AS priority, a.weight, \
           EXISTS (SELECT 1 FROM host_migrations m WHERE m.domain_id = a.domain_id AND m.from_ip = a.ip) AS draining \
      FROM addresses a JOIN domains d ON d.id = a.domain_id WHERE d.static_ip IS NOT NULL \
       AND a.state = 'live' AND ($1::bigint[] IS NULL OR a.domain_id = ANY($1))";
    const SERVICES: &'static str = "SELECT s.domain_id, s.transport, s.port FROM services s \
                                    JOIN domains d ON d.id = s.domain_id WHERE d.static_ip IS NOT NULL \
                                    AND ($1::bigint[] IS NULL OR s.domain_id = ANY($1))";

    fn id(&self) -> i64 {
        self.id
    }

    fn domain(row: &PgRow) -> Result<Self, RowError> {
        domain_from(row)
    }

    fn address(row: &PgRow) -> Result<(i64, AddressRow), RowError> {
        address_from(row)
    }

    fn service(row: &PgRow) -> Result<Option<(i64, Listen)>, RowError> {
        service_from(row)
    }

    fn add_address(&mut self, address: AddressRow) {
        self.addresses.push(address);
    }

    fn add_service(&mut self, service: Listen) {
        self.services.push(service);
    }
}

fn domain_from(row: &PgRow) -> Result<DomainRow, RowError> {
    let fqdn: String = row.try_get("fqdn")?;
    let ports: Vec<i32> = row.try_get("forward_ports")?;
    let policy = match row.try_get::<&str, _>("forward_policy")? {
        "least_connections" => Policy::LeastConnections,
        _ => Policy::RoundRobin,
    };
    let proxy = match row.try_get::<&str, _>("proxy_protocol")? {
        "tcp" => ProxyMode::Tcp,
        "tcp_udp" => ProxyMode::TcpUdp,
        _ => ProxyMode::Off,
    };
    Ok(DomainRow {
        id: row.try_get("id")?,
        name: fqdn.strip_suffix('.').unwrap_or(&fqdn).to_owned(),
        static_ip: row.try_get("static_ip")?,
        fallback: row.try_get::<Option<IpAddr>, _>("fallback_ip")?,
        ports: ports.into_iter().map(u16::try_from).collect::<Result<_, _>>()?,
        services: Vec::new(),
        policy,
        proxy,
        max_flows: u32::try_from(row.try_get::<i32, _>("max_flows")?)?,
        max_flows_per_client: u32::try_from(row.try_get::<i32, _>("max_flows_per_client")?)?,
        addresses: Vec::new(),
    })
}

fn address_from(row: &PgRow) -> Result<(i64, AddressRow), RowError> {
    Ok((
        row.try_get("domain_id")?,
        AddressRow {
            ip: row.try_get("ip")?,
            priority: u32::try_from(row.try_get::<i32, _>("priority")?)?,
            weight: u32::try_from(row.try_get::<i32, _>("weight")?)?,
            draining: row.try_get("draining")?,
        },
    ))
}

/// A service tuple's listener; `None` for transports the forwarder does not relay (sctp).
fn service_from(row: &PgRow) -> Result<Option<(i64, Listen)>, RowError> {
    let protocol = match row.try_get::<&str, _>("transport")? {
        "tcp" | "tls" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return Ok(None),
    };
    Ok(Some((row.try_get("domain_id")?, (protocol, u16::try_from(row.try_get::<i32, _>("port")?)?))))
}
