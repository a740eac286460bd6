//! The in-memory view of Postgres that answers every query: one [`ZoneView`] per zone behind a hickory `Catalog`.
//!
//! A view is immutable once built. Changes build a new view that shares every untouched zone and domain with the
//! old one, and the server swaps it in atomically; queries never wait on a lock or the database.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use hickory_server::proto::rr::TSigResponseContext;
use hickory_server::{
    proto::serialize::binary::{BinDecoder, BinEncodable, BinEncoder},
    proto::{
        op::{MessageType, Metadata, OpCode, Query, ResponseCode},
        rr::{
            LowerName, Name, RData, Record, RecordSet, RecordType,
            rdata::{A, AAAA, NS, SOA, SRV},
        },
    },
    server::{Request, RequestInfo},
    zone_handler::{
        AuthLookup, AxfrPolicy, Catalog, LookupControlFlow, LookupError, LookupOptions, LookupRecords,
        MessageResponseBuilder, Queries, ZoneHandler, ZoneType,
    },
};
use serde::{Deserialize, Serialize};

use crate::answer::{self, Address, Family, Policy};
use crate::wire;

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

/// Everything the server answers from.
pub struct View {
    zones: HashMap<i64, Arc<ZoneView>>,
    domains: HashMap<i64, Arc<CompiledDomain>>,
    catalog: Catalog,
    /// The zones by origin in wire format (lower case), for [`View::prebuilt_answer`].
    origins: HashMap<Box<[u8]>, Arc<ZoneView>>,
}

/// One zone's records, answering as a hickory `ZoneHandler`.
pub struct ZoneView {
    row: ZoneRow,
    origin: LowerName,
    soa: Arc<RecordSet>,
    ns: Arc<RecordSet>,
    glue: Vec<Arc<RecordSet>>,
    names: HashMap<LowerName, Arc<NameEntry>>,
    /// The names with prebuilt A or AAAA answers, keyed by their wire format (lower case).
    prebuilt: HashMap<Box<[u8]>, Prebuilt>,
}

/// A domain turned into records, ready to be placed in its zone.
struct CompiledDomain {
    zone_id: i64,
    names: Vec<(LowerName, Arc<NameEntry>)>,
}

/// The records at one owner name.
#[derive(Default)]
struct NameEntry {
    a: Option<Arc<Rotations>>,
    aaaa: Option<Arc<Rotations>>,
    srv: Option<Arc<RecordSet>>,
    srv_additionals: Vec<Arc<RecordSet>>,
}

/// The rotations of one name that have prebuilt messages: a flat copy of its [`NameEntry`], one pointer from the
/// map to the counter and the bytes (the fast path is bound by memory latency, not instructions).
struct Prebuilt {
    a: Option<Arc<Rotations>>,
    aaaa: Option<Arc<Rotations>>,
}

/// Every rotation of an address set, prebuilt, and the weighted order they are served in.
struct Rotations {
    sets: Vec<Arc<RecordSet>>,
    /// Each rotation as a whole response message (see [`wire`]), all of `message_len` bytes, one after the other;
    /// empty when the answers do not qualify.
    messages: Box<[u8]>,
    message_len: usize,
    schedule: Vec<u16>,
    /// The schedule is 0, 1, …, n-1 (equal weights): the turn alone picks the rotation, one memory load less.
    in_order: bool,
    next: AtomicUsize,
}

impl View {
    /// A view with no zones: everything is REFUSED.
    pub fn empty() -> Self {
        Self { zones: HashMap::new(), domains: HashMap::new(), catalog: Catalog::new(), origins: HashMap::new() }
    }

    /// Builds a view from a full read of the database.
    pub fn build(zones: Vec<ZoneRow>, domains: Vec<DomainRow>) -> Self {
        let domains: HashMap<i64, Arc<CompiledDomain>> =
            domains.into_iter().map(|d| (d.id, Arc::new(CompiledDomain::compile(&d)))).collect();
        let zones = zones.into_iter().map(|z| (z.id, Arc::new(ZoneView::build(z, &domains)))).collect();
        Self::assemble(zones, domains)
    }

    /// A new view with `changes` applied; zones no change touches are shared with `self`.
    pub fn with_changes(&self, changes: Vec<Change>) -> Self {
        let mut domains = self.domains.clone();
        let mut zone_rows: HashMap<i64, Option<ZoneRow>> = HashMap::new();
        let mut touched: Vec<i64> = Vec::new();
        for change in changes {
            match change {
                Change::Zone(id, row) => {
                    zone_rows.insert(id, row);
                    touched.push(id);
                }
                Change::Domain(id, row) => {
                    if let Some(old) = domains.remove(&id) {
                        touched.push(old.zone_id);
                    }
                    if let Some(row) = row {
                        touched.push(row.zone_id);
                        domains.insert(id, Arc::new(CompiledDomain::compile(&row)));
                    }
                }
            }
        }
        let mut zones = self.zones.clone();
        touched.sort_unstable();
        touched.dedup();
        for zone_id in touched {
            let row = match zone_rows.remove(&zone_id) {
                Some(row) => row,
                None => zones.get(&zone_id).map(|z| z.row.clone()),
            };
            match row {
                Some(row) => {
                    zones.insert(zone_id, Arc::new(ZoneView::build(row, &domains)));
                }
                None => {
                    zones.remove(&zone_id);
                }
            }
        }
        Self::assemble(zones, domains)
    }

    /// The catalog that answers queries.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The prebuilt response to a query for `qname` (wire format, exactly as asked) and `rtype` (A or AAAA), taking
    /// the next turn of its rotation; `None` when the catalog must answer. The caller patches it with
    /// [`wire::respond`].
    ///
    /// Only names stored in lower case have one, and only exact (case-sensitive) matches are served, so the walk
    /// from the name to its deepest zone agrees with the catalog's case-insensitive one.
    pub fn prebuilt_answer(&self, qname: &[u8], rtype: RecordType) -> Option<&[u8]> {
        let zone = wire::suffixes(qname).find_map(|suffix| self.origins.get(suffix))?;
        let prebuilt = zone.prebuilt.get(qname)?;
        let rotations = match rtype {
            RecordType::A => prebuilt.a.as_ref()?,
            RecordType::AAAA => prebuilt.aaaa.as_ref()?,
            _ => return None,
        };
        rotations.pick_message()
    }

    /// Number of zones served.
    pub fn zone_count(&self) -> usize {
        self.zones.len()
    }

    /// Number of domains served.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    fn assemble(zones: HashMap<i64, Arc<ZoneView>>, domains: HashMap<i64, Arc<CompiledDomain>>) -> Self {
        let mut catalog = Catalog::new();
        let mut origins = HashMap::new();
        for zone in zones.values() {
            catalog.upsert(zone.origin.clone(), vec![zone.clone() as Arc<dyn ZoneHandler>]);
            if let Some(key) = wire_name(&zone.origin) {
                origins.insert(key, zone.clone());
            }
        }
        Self { zones, domains, catalog, origins }
    }
}

impl ZoneView {
    fn build(row: ZoneRow, domains: &HashMap<i64, Arc<CompiledDomain>>) -> Self {
        let origin = LowerName::new(&row.origin);
        let serial = u32::try_from(row.serial.rem_euclid(1 << 32)).unwrap_or(0);
        let mname = row
            .nameservers
            .first()
            .and_then(|ns| Name::from_ascii(&ns.name).ok())
            .unwrap_or_else(|| row.origin.clone());
        let soa = SOA::new(mname, row.hostmaster.clone(), serial, row.refresh, row.retry, row.expire, row.minimum);
        let soa = Arc::new(RecordSet::from(Record::from_rdata(row.origin.clone(), row.soa_ttl, RData::SOA(soa))));

        let mut ns = RecordSet::with_ttl(row.origin.clone(), RecordType::NS, row.ns_ttl);
        let mut names: HashMap<LowerName, Arc<NameEntry>> = HashMap::new();
        let mut glue = Vec::new();
        for server in &row.nameservers {
            let Ok(name) = Name::from_ascii(&server.name) else {
                continue;
            };
            ns.add_rdata(RData::NS(NS(name.clone())));
            if !row.origin.zone_of(&name) || server.ips.is_empty() {
                continue;
            }
            let entry = NameEntry::fixed(&name, &server.ips, row.ns_ttl);
            glue.extend(entry.a.iter().chain(entry.aaaa.iter()).map(|r| r.sets[0].clone()));
            names.insert(LowerName::new(&name), Arc::new(entry));
        }

        for domain in domains.values().filter(|d| d.zone_id == row.id) {
            for (name, entry) in &domain.names {
                if origin.zone_of(name) {
                    names.insert(name.clone(), entry.clone());
                }
            }
        }
        // Empty non-terminals and the apex exist (NODATA), they are not NXDOMAIN.
        let owners: Vec<LowerName> = names.keys().cloned().collect();
        for owner in owners {
            let mut parent = owner.base_name();
            while origin.zone_of(&parent) && !names.contains_key(&parent) {
                names.insert(parent.clone(), Arc::new(NameEntry::default()));
                parent = parent.base_name();
            }
        }
        names.entry(origin.clone()).or_default();

        let prebuilt = names.iter().filter_map(|(name, entry)| Some((wire_name(name)?, entry.prebuilt()?))).collect();
        Self { row, origin, soa, ns: Arc::new(ns), glue, names, prebuilt }
    }

    fn lookup_now(
        &self,
        name: &LowerName,
        rtype: RecordType,
        options: LookupOptions,
    ) -> Result<AuthLookup, LookupError> {
        if !self.origin.zone_of(name) {
            return Err(LookupError::from(ResponseCode::Refused));
        }
        let Some(entry) = self.names.get(name) else {
            return Err(LookupError::from(ResponseCode::NXDomain));
        };
        let apex = *name == self.origin;
        let one = |set: Arc<RecordSet>| Ok(LookupRecords::new(options, set).into());
        match rtype {
            RecordType::SOA if apex => one(self.soa.clone()),
            RecordType::NS if apex => Ok(AuthLookup::answers(
                LookupRecords::new(options, self.ns.clone()),
                (!self.glue.is_empty()).then(|| LookupRecords::many(options, self.glue.clone())),
            )),
            RecordType::A => entry.a.as_deref().map(Rotations::pick).map_or_else(no_data, one),
            RecordType::AAAA => entry.aaaa.as_deref().map(Rotations::pick).map_or_else(no_data, one),
            RecordType::SRV => match &entry.srv {
                Some(srv) => Ok(AuthLookup::answers(
                    LookupRecords::new(options, srv.clone()),
                    (!entry.srv_additionals.is_empty())
                        .then(|| LookupRecords::many(options, entry.srv_additionals.clone())),
                )),
                None => no_data(),
            },
            RecordType::ANY => {
                let mut sets = Vec::new();
                if apex {
                    sets.push(self.soa.clone());
                    sets.push(self.ns.clone());
                }
                sets.extend(entry.a.as_deref().map(Rotations::pick));
                sets.extend(entry.aaaa.as_deref().map(Rotations::pick));
                sets.extend(entry.srv.clone());
                if sets.is_empty() {
                    return no_data();
                }
                Ok(LookupRecords::many(options, sets).into())
            }
            _ => no_data(),
        }
    }
}

#[async_trait::async_trait]
impl ZoneHandler for ZoneView {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Break(self.lookup_now(name, rtype, options))
    }

    async fn search(
        &self,
        request: &Request,
        options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        let result = match request.request_info() {
            Ok(info) if info.query.query_type() == RecordType::AXFR => Err(LookupError::from(ResponseCode::Refused)),
            Ok(info) => self.lookup_now(info.query.name(), info.query.query_type(), options),
            Err(error) => Err(error),
        };
        (LookupControlFlow::Break(result), None)
    }

    async fn nsec_records(&self, _name: &LowerName, _options: LookupOptions) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Break(Ok(AuthLookup::default()))
    }
}

impl CompiledDomain {
    fn compile(row: &DomainRow) -> Self {
        let mut names = Vec::new();
        let select = |family| answer::select(&row.addresses, &row.policy, family);
        let entry = NameEntry {
            a: Rotations::build(&row.fqdn, &select(Family::V4), row.ttl).map(Arc::new),
            aaaa: Rotations::build(&row.fqdn, &select(Family::V6), row.ttl).map(Arc::new),
            ..NameEntry::default()
        };
        names.push((LowerName::new(&row.fqdn), Arc::new(entry)));

        // SRV: one RRset per (service, transport) owner; address tuples get a generated target name.
        let mut by_owner: Vec<(Name, RecordSet, Vec<Arc<RecordSet>>)> = Vec::new();
        for svc in &row.services {
            let Ok(owner) = Name::from_ascii(format!("_{}._{}", svc.service, svc.transport))
                .and_then(|prefix| prefix.append_domain(&row.fqdn))
            else {
                continue;
            };
            let (target, extra) = match (&svc.target, svc.ip) {
                (Some(target), _) => (target.clone(), None),
                (None, Some(ip)) => {
                    let Ok(target) = service_target(&row.fqdn, ip) else {
                        continue;
                    };
                    let entry = NameEntry::fixed(&target, &[ip], row.ttl);
                    let set = entry.a.iter().chain(entry.aaaa.iter()).map(|r| r.sets[0].clone()).next();
                    names.push((LowerName::new(&target), Arc::new(entry)));
                    (target, set)
                }
                (None, None) => continue,
            };
            let rdata = RData::SRV(SRV::new(svc.priority, svc.weight, svc.port, target));
            let slot = match by_owner.iter().position(|(o, _, _)| *o == owner) {
                Some(i) => i,
                None => {
                    let set = RecordSet::with_ttl(owner.clone(), RecordType::SRV, row.ttl);
                    by_owner.push((owner, set, Vec::new()));
                    by_owner.len() - 1
                }
            };
            by_owner[slot].1.add_rdata(rdata);
            if let Some(extra) = extra
                && !by_owner[slot].2.iter().any(|s| Arc::ptr_eq(s, &extra) || **s == *extra)
            {
                by_owner[slot].2.push(extra);
            }
        }
        for (owner, set, additionals) in by_owner {
            let entry = NameEntry { srv: Some(Arc::new(set)), srv_additionals: additionals, ..NameEntry::default() };
            names.push((LowerName::new(&owner), Arc::new(entry)));
        }
        Self { zone_id: row.zone_id, names }
    }
}

impl NameEntry {
    /// Its rotations that have prebuilt messages, if any.
    fn prebuilt(&self) -> Option<Prebuilt> {
        let with_messages = |r: &Option<Arc<Rotations>>| r.clone().filter(|r| !r.messages.is_empty());
        let prebuilt = Prebuilt { a: with_messages(&self.a), aaaa: with_messages(&self.aaaa) };
        (prebuilt.a.is_some() || prebuilt.aaaa.is_some()).then_some(prebuilt)
    }

    /// An entry answering `ips` in a fixed order (glue, generated service targets).
    fn fixed(name: &Name, ips: &[IpAddr], ttl: u32) -> Self {
        let of = |family| answer::Selection {
            ips: ips.iter().copied().filter(|ip| Family::of(ip) == family).collect(),
            weights: Vec::new(),
        };
        Self {
            a: Rotations::build(name, &of(Family::V4), ttl).map(Rotations::frozen).map(Arc::new),
            aaaa: Rotations::build(name, &of(Family::V6), ttl).map(Rotations::frozen).map(Arc::new),
            ..Self::default()
        }
    }
}

impl Rotations {
    fn build(name: &Name, selection: &answer::Selection, ttl: u32) -> Option<Self> {
        if selection.ips.is_empty() {
            return None;
        }
        let rtype = match Family::of(&selection.ips[0]) {
            Family::V4 => RecordType::A,
            Family::V6 => RecordType::AAAA,
        };
        let n = selection.ips.len();
        let sets: Vec<Arc<RecordSet>> = (0..n)
            .map(|start| {
                let mut set = RecordSet::with_ttl(name.clone(), rtype, ttl);
                for ip in selection.ips[start..].iter().chain(&selection.ips[..start]) {
                    set.add_rdata(match ip {
                        IpAddr::V4(v4) => RData::A(A(*v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                    });
                }
                Arc::new(set)
            })
            .collect();
        let (messages, message_len) = concat_messages(name, &sets).unwrap_or_default();
        let weights = if selection.weights.len() == n { selection.weights.clone() } else { vec![1; n] };
        let schedule = answer::schedule(&weights);
        let in_order = schedule.len() == n && schedule.iter().enumerate().all(|(i, &s)| usize::from(s) == i);
        Some(Self { sets, messages, message_len, schedule, in_order, next: AtomicUsize::new(0) })
    }

    /// Keeps only the base order.
    fn frozen(mut self) -> Self {
        self.sets.truncate(1);
        self.messages = self.messages.get(..self.message_len).unwrap_or_default().into();
        self.schedule = vec![0];
        self.in_order = true;
        self
    }

    /// The record set for this query: the next rotation in the weighted schedule. Lock-free, allocation-free.
    fn pick(&self) -> Arc<RecordSet> {
        self.sets[self.next_index()].clone()
    }

    /// Like [`Rotations::pick`], as a prebuilt response; the same schedule and counter.
    fn pick_message(&self) -> Option<&[u8]> {
        if self.messages.is_empty() {
            return None;
        }
        let start = self.next_index() * self.message_len;
        self.messages.get(start..start + self.message_len)
    }

    fn next_index(&self) -> usize {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if self.in_order {
            return turn % self.sets.len();
        }
        usize::from(self.schedule[turn % self.schedule.len()])
    }
}

/// The prebuilt messages of every rotation, one after the other, and their common length; `None` when one does not
/// qualify or their lengths differ.
fn concat_messages(owner: &Name, sets: &[Arc<RecordSet>]) -> Option<(Box<[u8]>, usize)> {
    let mut all = Vec::new();
    let mut len = None;
    for set in sets {
        let message = prebuilt_message(owner, set)?;
        if *len.get_or_insert(message.len()) != message.len() {
            return None;
        }
        all.extend_from_slice(&message);
    }
    Some((all.into_boxed_slice(), len?))
}

/// The catalog's answer to a plain query for `set` as a whole message with ID 0 and no EDNS (see [`wire`]), encoded
/// the way the catalog encodes it (hickory's `MessageResponse`, the question echoed as asked), or `None` when the
/// owner is not in lower case or the message might not fit a UDP response with an OPT record.
fn prebuilt_message(owner: &Name, set: &RecordSet) -> Option<Box<[u8]>> {
    if !owner.eq_case(&owner.to_lowercase()) {
        return None;
    }
    let question = Query::query(owner.clone(), set.record_type()).to_bytes().ok()?;
    let queries = Queries::read(&mut BinDecoder::new(&question), 1).ok()?;
    let mut metadata = Metadata::new(0, MessageType::Response, OpCode::Query);
    metadata.authoritative = true;
    let response =
        MessageResponseBuilder::new(&queries, None).build(metadata, set.records_without_rrsigs(), [], [], []);
    let mut bytes = Vec::with_capacity(wire::MAX_PLAIN_UDP);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(u16::try_from(wire::MAX_PLAIN_UDP - wire::OPT_LEN).ok()?);
    response.destructive_emit(&mut encoder).ok()?;
    let truncated = bytes.get(2).is_none_or(|flags| flags & 0x02 != 0);
    (!truncated).then(|| bytes.into_boxed_slice())
}

/// A name in wire format (uncompressed).
fn wire_name(name: &LowerName) -> Option<Box<[u8]>> {
    let mut bytes = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut bytes);
    name.emit(&mut encoder).ok()?;
    Some(bytes.into_boxed_slice())
}

/// `ip-198-18-0-1.<domain>` or `ip-fd00-0-0-0-0-0-0-1.<domain>`: the generated SRV target of an address tuple.
pub fn service_target(domain: &Name, ip: IpAddr) -> Result<Name, hickory_server::proto::ProtoError> {
    let label = match ip {
        IpAddr::V4(v4) => v4.octets().map(|o| o.to_string()).join("-"),
        IpAddr::V6(v6) => v6.segments().map(|s| format!("{s:x}")).join("-"),
    };
    Name::from_ascii(format!("ip-{label}"))?.append_domain(domain)
}

fn no_data() -> Result<AuthLookup, LookupError> {
    Err(LookupError::NameExists)
}
