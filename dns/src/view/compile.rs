//! Rows compiled into the records queries are answered from: record sets, every rotation and its weighted schedule.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use hickory_server::proto::rr::{
    LowerName, Name, RData, Record, RecordSet, RecordType,
    rdata::{A, AAAA, NS, SOA, SRV, TXT},
};

use super::{
    prebuilt,
    rows::{DomainRow, TxtRow, ZoneRow},
};
use crate::answer::{self, Family};

/// A zone's records: its apex, its glue and every name of its domains.
pub(super) struct CompiledZone {
    pub(super) row: ZoneRow,
    pub(super) origin: LowerName,
    pub(super) soa: Arc<RecordSet>,
    /// The SOA as negative answers carry it: TTL min(SOA TTL, MINIMUM) (RFC 2308 section 3), so a resolver caches
    /// NXDOMAIN and NODATA no longer than the zone's MINIMUM says.
    pub(super) negative_soa: Arc<RecordSet>,
    pub(super) ns: Arc<RecordSet>,
    pub(super) glue: Vec<Arc<RecordSet>>,
    pub(super) names: HashMap<LowerName, Arc<NameEntry>>,
}

/// A domain turned into records, ready to be placed in its zone.
pub(super) struct CompiledDomain {
    pub(super) zone_id: i64,
    pub(super) names: Vec<(LowerName, Arc<NameEntry>)>,
}

/// The records at one owner name.
#[derive(Default)]
pub(super) struct NameEntry {
    pub(super) a: Option<Arc<Rotations>>,
    pub(super) aaaa: Option<Arc<Rotations>>,
    pub(super) srv: Option<Arc<RecordSet>>,
    pub(super) srv_additionals: Vec<Arc<RecordSet>>,
    /// The SRV answer prebuilt, when it qualifies.
    pub(super) srv_message: Option<prebuilt::SrvMessage>,
    pub(super) txt: Option<Arc<RecordSet>>,
}

/// Every rotation of an address set, prebuilt, and the weighted order they are served in.
pub(super) struct Rotations {
    sets: Vec<Arc<RecordSet>>,
    /// Each rotation as a whole response message (see [`crate::wire`]), all of `message_len` bytes, one after the
    /// other; empty when the answers do not qualify.
    pub(super) messages: Box<[u8]>,
    message_len: usize,
    schedule: Vec<u16>,
    /// The schedule is 0, 1, …, n-1 (equal weights): the turn alone picks the rotation, one memory load less.
    in_order: bool,
    next: AtomicUsize,
}

impl CompiledZone {
    /// The zone of `row` with the names of its domains among `domains` that lie inside it.
    pub(super) fn compile(row: ZoneRow, domains: &HashMap<i64, Arc<CompiledDomain>>) -> Self {
        let apex = row.origin.to_lowercase();
        let origin = LowerName::new(&apex);
        let serial = u32::try_from(row.serial.rem_euclid(1 << 32)).unwrap_or(0);
        let mname = row
            .nameservers
            .first()
            .and_then(|ns| Name::from_ascii(&ns.name).ok())
            .unwrap_or_else(|| row.origin.clone());
        let soa = SOA::new(mname, row.hostmaster.clone(), serial, row.refresh, row.retry, row.expire, row.minimum);
        let negative_ttl = row.soa_ttl.min(row.minimum);
        let negative_soa =
            Arc::new(RecordSet::from(Record::from_rdata(apex.clone(), negative_ttl, RData::SOA(soa.clone()))));
        let soa = Arc::new(RecordSet::from(Record::from_rdata(apex.clone(), row.soa_ttl, RData::SOA(soa))));

        let mut ns = RecordSet::with_ttl(apex.clone(), RecordType::NS, row.ns_ttl);
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
            let glue_owner = name.to_lowercase();
            let entry = NameEntry::fixed(&glue_owner, &server.ips, row.ns_ttl);
            glue.extend(entry.a.iter().chain(entry.aaaa.iter()).map(|r| r.sets[0].clone()));
            names.insert(LowerName::new(&glue_owner), Arc::new(entry));
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

        Self { row, origin, soa, negative_soa, ns: Arc::new(ns), glue, names }
    }
}

impl CompiledDomain {
    /// The names of `row`: its own addresses and its services.
    pub(super) fn compile(row: &DomainRow) -> Self {
        // Names are served in lower case (answers echo the question's case, see `ZoneView`).
        let fqdn = row.fqdn.to_lowercase();
        let mut names = Vec::new();
        let select = |family| answer::select(&row.addresses, &row.policy, family);
        let mut txt = txt_sets(&fqdn, &row.txt);
        let entry = NameEntry {
            a: Rotations::build(&fqdn, &select(Family::V4), row.ttl).map(Arc::new),
            aaaa: Rotations::build(&fqdn, &select(Family::V6), row.ttl).map(Arc::new),
            txt: txt.remove(&LowerName::new(&fqdn)),
            ..NameEntry::default()
        };
        names.push((LowerName::new(&fqdn), Arc::new(entry)));

        // SRV: one RRset per (service, transport) owner; address tuples get a generated target name.
        let mut by_owner: Vec<(Name, RecordSet, Vec<Arc<RecordSet>>)> = Vec::new();
        for svc in &row.services {
            let Ok(owner) = Name::from_ascii(format!("_{}._{}", svc.service, svc.transport))
                .and_then(|prefix| prefix.append_domain(&fqdn))
            else {
                continue;
            };
            let (target, extra) = match (&svc.target, svc.ip) {
                (Some(target), _) => (target.clone(), None),
                (None, Some(ip)) => {
                    let Ok(target) = service_target(&fqdn, ip) else {
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
            let owner = LowerName::new(&owner);
            let txt = txt.remove(&owner);
            let srv_message = prebuilt::srv_message(&set, &additionals);
            let entry = NameEntry {
                srv: Some(Arc::new(set)),
                srv_additionals: additionals,
                srv_message,
                txt,
                ..NameEntry::default()
            };
            names.push((owner, Arc::new(entry)));
        }
        // TXT under the domain at names of their own (an ACME challenge, say); one at a generated SRV target's name is
        // dropped (the API never writes one there).
        for (owner, set) in txt {
            if !names.iter().any(|(name, _)| *name == owner) {
                names.push((owner, Arc::new(NameEntry { txt: Some(set), ..NameEntry::default() })));
            }
        }
        Self { zone_id: row.zone_id, names }
    }
}

/// The TXT records of a domain as one set per owner (lower case), within the domain; each value split into strings of
/// at most 255 bytes, the set's TTL the lowest of its records'.
fn txt_sets(fqdn: &Name, rows: &[TxtRow]) -> HashMap<LowerName, Arc<RecordSet>> {
    let mut sets: HashMap<LowerName, RecordSet> = HashMap::new();
    for row in rows {
        let owner = row.owner.to_lowercase();
        if !fqdn.zone_of(&owner) {
            continue;
        }
        let strings = split_txt(&row.value);
        let set =
            sets.entry(LowerName::new(&owner)).or_insert_with(|| RecordSet::with_ttl(owner, RecordType::TXT, row.ttl));
        if row.ttl < set.ttl() {
            set.set_ttl(row.ttl);
        }
        set.add_rdata(RData::TXT(TXT::new(strings)));
    }
    sets.into_iter().map(|(owner, set)| (owner, Arc::new(set))).collect()
}

/// `value` as character strings of at most 255 bytes, cut at character boundaries.
fn split_txt(value: &str) -> Vec<String> {
    let mut strings = Vec::new();
    let mut current = String::new();
    for c in value.chars() {
        if current.len() + c.len_utf8() > 255 {
            strings.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() || strings.is_empty() {
        strings.push(current);
    }
    strings
}

impl NameEntry {
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
    /// The whole set in base order (rotation 0): what a zone transfer publishes.
    pub(super) fn base(&self) -> &Arc<RecordSet> {
        &self.sets[0]
    }

    /// The record set for this query: the next rotation in the weighted schedule. Lock-free, allocation-free.
    #[inline]
    pub(super) fn pick(&self) -> Arc<RecordSet> {
        self.sets[self.next_index()].clone()
    }

    /// Like [`Rotations::pick`], as a prebuilt response; the same schedule and counter.
    #[inline]
    pub(super) fn pick_message(&self) -> Option<&[u8]> {
        if self.messages.is_empty() {
            return None;
        }
        let start = self.next_index() * self.message_len;
        self.messages.get(start..start + self.message_len)
    }

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
        let (messages, message_len) = prebuilt::concat_messages(name, &sets).unwrap_or_default();
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

    #[inline]
    fn next_index(&self) -> usize {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        if self.in_order {
            return turn % self.sets.len();
        }
        usize::from(self.schedule[turn % self.schedule.len()])
    }
}

/// `ip-198-18-0-1.<domain>` or `ip-fd00-0-0-0-0-0-0-1.<domain>`: the generated SRV target of an address tuple.
pub fn service_target(domain: &Name, ip: IpAddr) -> Result<Name, hickory_server::proto::ProtoError> {
    let label = match ip {
        IpAddr::V4(v4) => v4.octets().map(|o| o.to_string()).join("-"),
        IpAddr::V6(v6) => v6.segments().map(|s| format!("{s:x}")).join("-"),
    };
    Name::from_ascii(format!("ip-{label}"))?.append_domain(domain)
}

#[cfg(test)]
pub(super) mod tests {
    use std::{collections::HashMap, net::IpAddr, sync::Arc};

    use hickory_server::proto::rr::{LowerName, Name, RData, RecordSet};

    use super::{CompiledDomain, CompiledZone, NameEntry};
    use crate::{
        answer::{Address, Policy, State, WhenEmpty},
        view::rows::{DomainRow, Nameserver, ServiceRow, ZoneRow},
    };

    pub(in crate::view) fn name(text: &str) -> Name {
        Name::from_ascii(text).expect("name")
    }

    pub(in crate::view) fn zone(id: i64, origin: &str) -> ZoneRow {
        ZoneRow {
            id,
            origin: name(origin),
            nameservers: vec![Nameserver {
                name: format!("ns1.{origin}"),
                ips: vec!["198.18.0.53".parse().expect("ip")],
            }],
            hostmaster: name(&format!("hostmaster.{origin}")),
            serial: 7,
            refresh: 3600,
            retry: 600,
            expire: 86400,
            minimum: 1,
            soa_ttl: 60,
            ns_ttl: 3600,
            transfer: crate::xfr::TransferPolicy::default(),
        }
    }

    pub(in crate::view) fn address(ip: &str, priority: u32, weight: u32, state: State) -> Address {
        Address { ip: ip.parse().expect("ip"), priority, weight, load: 0.0, state }
    }

    pub(in crate::view) fn domain(id: i64, zone_id: i64, fqdn: &str, addresses: Vec<Address>) -> DomainRow {
        DomainRow {
            id,
            zone_id,
            fqdn: name(fqdn),
            ttl: 1,
            policy: Policy { fallback: None, when_empty: WhenEmpty::NoData, load_threshold_pct: 0 },
            addresses,
            services: Vec::new(),
            txt: Vec::new(),
        }
    }

    fn ips(set: &RecordSet) -> Vec<IpAddr> {
        set.records_without_rrsigs()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect()
    }

    fn parsed(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().expect("ip")).collect()
    }

    fn entry<'a>(domain: &'a CompiledDomain, owner: &str) -> &'a NameEntry {
        let owner = LowerName::new(&name(owner));
        &domain.names.iter().find(|(n, _)| *n == owner).expect("owner compiled").1
    }

    /// The first address answered on each of `n` queries.
    fn firsts(entry: &NameEntry, n: usize) -> Vec<IpAddr> {
        let rotations = entry.a.as_ref().expect("A records");
        (0..n).map(|_| ips(&rotations.pick())[0]).collect()
    }

    #[test]
    fn live_addresses_of_the_best_priority_are_answered_and_rotate() {
        let row = domain(
            1,
            1,
            "www.ho.test.",
            vec![
                address("198.18.0.1", 0, 1, State::Live),
                address("198.18.0.2", 0, 1, State::Live),
                address("198.18.0.3", 1, 1, State::Live),
                address("198.18.0.4", 0, 1, State::Dead),
                address("198.18.0.5", 0, 1, State::Pending),
            ],
        );
        let compiled = CompiledDomain::compile(&row);
        let www = entry(&compiled, "www.ho.test.");
        let first = ips(&www.a.as_ref().expect("A").pick());
        assert_eq!(first, parsed(&["198.18.0.1", "198.18.0.2"]), "backup, dead and pending left out");
        assert_eq!(ips(&www.a.as_ref().expect("A").pick()), parsed(&["198.18.0.2", "198.18.0.1"]), "rotated");
        assert!(www.aaaa.is_none());
    }

    #[test]
    fn backups_answer_when_the_primaries_are_dead() {
        let row = domain(
            1,
            1,
            "www.ho.test.",
            vec![address("198.18.0.1", 0, 1, State::Dead), address("198.18.0.3", 1, 1, State::Live)],
        );
        let compiled = CompiledDomain::compile(&row);
        assert_eq!(firsts(entry(&compiled, "www.ho.test."), 2), parsed(&["198.18.0.3", "198.18.0.3"]));
    }

    #[test]
    fn weights_decide_how_often_an_address_comes_first() {
        let row = domain(
            1,
            1,
            "www.ho.test.",
            vec![address("198.18.0.1", 0, 3, State::Live), address("198.18.0.2", 0, 1, State::Live)],
        );
        let compiled = CompiledDomain::compile(&row);
        let firsts = firsts(entry(&compiled, "www.ho.test."), 8);
        let heavy = firsts.iter().filter(|ip| **ip == parsed(&["198.18.0.1"])[0]).count();
        assert_eq!(heavy, 6, "3:1 over 8 queries: {firsts:?}");
    }

    #[test]
    fn the_fallback_answers_when_nothing_is_live_and_only_in_its_family() {
        let mut row = domain(1, 1, "www.ho.test.", vec![address("198.18.0.1", 0, 1, State::Dead)]);
        row.policy.fallback = Some("198.18.9.9".parse().expect("ip"));
        let compiled = CompiledDomain::compile(&row);
        let www = entry(&compiled, "www.ho.test.");
        assert_eq!(ips(&www.a.as_ref().expect("A").pick()), parsed(&["198.18.9.9"]));
        assert!(www.aaaa.is_none(), "an IPv4 fallback gives no AAAA");
    }

    #[test]
    fn nothing_live_answers_nodata_or_the_last_known_addresses() {
        let mut row = domain(1, 1, "www.ho.test.", vec![address("198.18.0.1", 0, 1, State::Dead)]);
        assert!(entry(&CompiledDomain::compile(&row), "www.ho.test.").a.is_none());
        row.policy.when_empty = WhenEmpty::LastKnown;
        let compiled = CompiledDomain::compile(&row);
        assert_eq!(ips(&entry(&compiled, "www.ho.test.").a.as_ref().expect("A").pick()), parsed(&["198.18.0.1"]));
    }

    #[test]
    fn each_family_has_its_own_records() {
        let row = domain(
            1,
            1,
            "www.ho.test.",
            vec![address("198.18.0.1", 0, 1, State::Live), address("fd00::1", 0, 1, State::Live)],
        );
        let compiled = CompiledDomain::compile(&row);
        let www = entry(&compiled, "www.ho.test.");
        assert_eq!(ips(&www.a.as_ref().expect("A").pick()), parsed(&["198.18.0.1"]));
        assert_eq!(ips(&www.aaaa.as_ref().expect("AAAA").pick()), parsed(&["fd00::1"]));
    }

    #[test]
    fn services_become_srv_with_generated_targets_and_their_addresses() {
        let mut row = domain(1, 1, "www.ho.test.", Vec::new());
        let service = |ip: Option<&str>, target: Option<&str>, port| ServiceRow {
            service: "https".into(),
            transport: "tcp".into(),
            ip: ip.map(|ip| ip.parse().expect("ip")),
            target: target.map(name),
            port,
            priority: 10,
            weight: 5,
        };
        row.services = vec![service(Some("198.18.0.7"), None, 443), service(None, Some("web.example.net."), 8443)];
        let compiled = CompiledDomain::compile(&row);
        let srv = entry(&compiled, "_https._tcp.www.ho.test.");
        let set = srv.srv.as_ref().expect("SRV");
        let mut targets: Vec<(String, u16)> = set
            .records_without_rrsigs()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((srv.target.to_ascii(), srv.port)),
                _ => None,
            })
            .collect();
        targets.sort();
        assert_eq!(targets, [("ip-198-18-0-7.www.ho.test.".to_owned(), 443), ("web.example.net.".to_owned(), 8443)]);
        assert_eq!(srv.srv_additionals.len(), 1, "the generated target's address goes in the additional section");
        let target = entry(&compiled, "ip-198-18-0-7.www.ho.test.");
        assert_eq!(ips(&target.a.as_ref().expect("A").pick()), parsed(&["198.18.0.7"]));
    }

    #[test]
    fn a_zone_has_its_soa_ns_glue_and_empty_non_terminals() {
        let domains: HashMap<i64, Arc<CompiledDomain>> = HashMap::from([(
            1,
            Arc::new(CompiledDomain::compile(&domain(
                1,
                1,
                "a.b.ho.test.",
                vec![address("198.18.0.1", 0, 1, State::Live)],
            ))),
        )]);
        let zone = CompiledZone::compile(zone(1, "ho.test."), &domains);
        let soa = zone.soa.records_without_rrsigs().next().expect("SOA");
        assert_eq!(soa.ttl, 60);
        let RData::SOA(soa) = &soa.data else { panic!("not an SOA") };
        assert_eq!((soa.serial, soa.minimum, soa.mname.to_ascii()), (7, 1, "ns1.ho.test.".to_owned()));
        assert_eq!(zone.ns.records_without_rrsigs().count(), 1);
        assert_eq!(zone.glue.len(), 1, "ns1 lies inside the zone: glue");
        let has = |owner: &str| zone.names.contains_key(&LowerName::new(&name(owner)));
        assert!(has("a.b.ho.test.") && has("ns1.ho.test."));
        assert!(has("b.ho.test.") && has("ho.test."), "empty non-terminal and apex exist (NODATA, not NXDOMAIN)");
        assert!(!has("c.ho.test."));
    }

    #[test]
    fn names_outside_their_zone_and_other_zones_domains_are_left_out() {
        let domains: HashMap<i64, Arc<CompiledDomain>> = HashMap::from([
            (1, Arc::new(CompiledDomain::compile(&domain(1, 1, "www.elsewhere.test.", Vec::new())))),
            (2, Arc::new(CompiledDomain::compile(&domain(2, 2, "www.ho.test.", Vec::new())))),
        ]);
        let zone = CompiledZone::compile(zone(1, "ho.test."), &domains);
        assert!(!zone.names.contains_key(&LowerName::new(&name("www.elsewhere.test."))), "outside the zone");
        assert!(!zone.names.contains_key(&LowerName::new(&name("www.ho.test."))), "a domain of zone 2");
    }

    #[test]
    fn glue_and_generated_targets_keep_one_order() {
        let mut row = zone(1, "ho.test.");
        row.nameservers[0].ips = parsed(&["198.18.0.53", "198.18.0.54"]);
        let zone = CompiledZone::compile(row, &HashMap::new());
        let ns1 = zone.names.get(&LowerName::new(&name("ns1.ho.test."))).expect("glue owner");
        let rotations = ns1.a.as_ref().expect("glue A");
        let first = ips(&rotations.pick());
        assert_eq!(first, parsed(&["198.18.0.53", "198.18.0.54"]));
        assert_eq!(ips(&rotations.pick()), first, "frozen: no rotation");
    }
}
