//! The rows a view is built from: plain data as read from Postgres.

use std::net::IpAddr;

use hickory_server::proto::rr::Name;
use serde::{Deserialize, Serialize};

use crate::{
    answer::{Address, Policy},
    xfr::TransferPolicy,
};

/// A zone as stored in `zones`.
#[derive(Debug, Clone, PartialEq)]
pub struct ZoneRow {
    /// Primary key.
    pub id: i64,
    /// Fully qualified origin.
    pub origin: Name,
    /// Authoritative servers, with glue for those inside the zone.
    pub nameservers: Vec<Nameserver>,
    /// SOA RNAME.
    pub hostmaster: Name,
    /// SOA serial (kept modulo 2^32 on the wire).
    pub serial: i64,
    /// SOA refresh, seconds.
    pub refresh: i32,
    /// SOA retry, seconds.
    pub retry: i32,
    /// SOA expire, seconds.
    pub expire: i32,
    /// SOA minimum: the negative-caching TTL.
    pub minimum: u32,
    /// TTL of the SOA record.
    pub soa_ttl: u32,
    /// TTL of the NS records and glue.
    pub ns_ttl: u32,
    /// Who may transfer the zone and whom NOTIFY goes to.
    pub transfer: TransferPolicy,
}

/// One authoritative server of a zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nameserver {
    /// Its name, fully qualified.
    pub name: String,
    /// Glue addresses, served when the name lies inside the zone.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// A domain with everything that shapes its answers.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainRow {
    /// Primary key.
    pub id: i64,
    /// The zone it belongs to.
    pub zone_id: i64,
    /// Fully qualified name.
    pub fqdn: Name,
    /// TTL of its records.
    pub ttl: u32,
    /// Fallback and empty-answer rules.
    pub policy: Policy,
    /// Its addresses, all states.
    pub addresses: Vec<Address>,
    /// Its service tuples, served as SRV.
    pub services: Vec<ServiceRow>,
    /// Its TXT records, at the domain or under it.
    pub txt: Vec<TxtRow>,
}

/// A TXT record of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxtRow {
    /// Owner: the domain or a name under it.
    pub owner: Name,
    /// The text; served as strings of at most 255 bytes.
    pub value: String,
    /// TTL.
    pub ttl: u32,
}

/// A service tuple (service, transport, address or target, port, priority, weight).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRow {
    /// Service name without the underscore, e.g. `http`.
    pub service: String,
    /// Transport without the underscore, e.g. `tcp`.
    pub transport: String,
    /// Address served under a generated target name.
    pub ip: Option<IpAddr>,
    /// Explicit target name.
    pub target: Option<Name>,
    /// Port.
    pub port: u16,
    /// SRV priority.
    pub priority: u16,
    /// SRV weight.
    pub weight: u16,
}

/// A change read from Postgres: the new row, or `None` when it is gone.
#[derive(Debug, Clone)]
pub enum Change {
    /// A zone row changed (SOA, NS, serial) or vanished.
    Zone(i64, Option<ZoneRow>),
    /// A domain, its addresses or its services changed, or it vanished.
    Domain(i64, Option<DomainRow>),
}
