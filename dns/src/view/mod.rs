//! The in-memory view of Postgres that answers every query: one [`ZoneView`] per zone behind a hickory `Catalog`.
//!
//! A view is immutable once built. Changes build a new view that shares every untouched zone and domain with the
//! old one, and the server swaps it in atomically; queries never wait on a lock or the database.

mod compile;
mod prebuilt;
mod rows;
mod zone;

use std::{collections::HashMap, sync::Arc};

use hickory_server::{
    proto::{op::ResponseCode, rr::RecordType},
    zone_handler::{Catalog, ZoneHandler},
};

pub use compile::service_target;
pub use rows::{Change, DomainRow, Nameserver, ServiceRow, TxtRow, ZoneRow};
pub use zone::ZoneView;

use crate::wire;
use compile::{CompiledDomain, Rotations};

/// Everything the server answers from.
pub struct View {
    zones: HashMap<i64, Arc<ZoneView>>,
    domains: HashMap<i64, Arc<CompiledDomain>>,
    catalog: Catalog,
    /// The zones by origin in wire format (lower case), for [`View::prebuilt_answer`].
    origins: HashMap<Box<[u8]>, Arc<ZoneView>>,
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
                    let mut zone = ZoneView::build(row, &domains);
                    if let Some(previous) = zones.get(&zone_id) {
                        zone.continue_journal(previous);
                    }
                    zones.insert(zone_id, Arc::new(zone));
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

    /// The prebuilt response to a query for `qname` (wire format, any case) and `rtype` (A or AAAA), taking the
    /// next turn of its rotation; `None` when the catalog must answer. The caller patches it with [`wire::respond`],
    /// which puts the question back in the case it was asked in.
    ///
    /// Names, origins and the index are in lower case, and so is the name looked up, so the walk from the name to
    /// its deepest zone agrees with the catalog's case-insensitive one.
    pub fn prebuilt_answer(&self, qname: &[u8], rtype: RecordType) -> Option<&[u8]> {
        let mut buf = [0; 255];
        let qname = wire::lowercase(qname, &mut buf)?;
        let zone = wire::suffixes(qname).find_map(|suffix| self.origins.get(suffix))?;
        let prebuilt = zone.prebuilt.get(qname)?;
        let rotations = match rtype {
            RecordType::A => prebuilt.a.as_ref()?,
            RecordType::AAAA => prebuilt.aaaa.as_ref()?,
            _ => return None,
        };
        rotations.pick_message()
    }

    /// Appends the answer to `query` to `out` when it is prebuilt, taking the next turn of a rotation: an A, AAAA or
    /// SRV answer, or NXDOMAIN or NODATA (A, AAAA, SRV, TXT) with the zone's SOA; its response code, or `None` (and
    /// `out` untouched) when the catalog must answer: no zone of ours, an answer too large to prebuild, a TXT
    /// answer, an SRV set whose answer depends on the case asked in and the name asked in mixed case.
    pub fn answer(&self, query: &wire::PlainQuery<'_>, out: &mut Vec<u8>) -> Option<ResponseCode> {
        let mut buf = [0; 255];
        let qname = wire::lowercase(query.qname, &mut buf)?;
        let zone = wire::suffixes(qname).find_map(|suffix| self.origins.get(suffix))?;
        let Some(prebuilt) = zone.prebuilt.get(qname) else {
            let negative = zone.negative.as_ref()?;
            return wire::respond_relocated(query, &negative.nxdomain, out).then_some(ResponseCode::NXDomain);
        };
        let positive = match query.qtype {
            RecordType::A => prebuilt.a.as_deref().map(Rotations::pick_message),
            RecordType::AAAA => prebuilt.aaaa.as_deref().map(Rotations::pick_message),
            RecordType::SRV => prebuilt.entry.srv.as_ref().map(|_| {
                let message = prebuilt.entry.srv_message.as_ref()?;
                (message.any_case || query.qname == qname).then_some(&*message.bytes)
            }),
            RecordType::TXT => prebuilt.entry.txt.as_ref().map(|_| None),
            _ => return None,
        };
        match positive {
            Some(message) => wire::respond(query, message?, out).then_some(ResponseCode::NoError),
            None => {
                let negative = zone.negative.as_ref()?;
                wire::respond_relocated(query, &negative.nodata, out).then_some(ResponseCode::NoError)
            }
        }
    }

    /// The zone whose origin is `origin`, if served.
    pub fn zone_at(&self, origin: &hickory_server::proto::rr::LowerName) -> Option<&Arc<ZoneView>> {
        let key = prebuilt::wire_name(origin)?;
        self.origins.get(&key)
    }

    /// Every zone served.
    pub fn zones(&self) -> impl Iterator<Item = &Arc<ZoneView>> {
        self.zones.values()
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
            if let Some(key) = prebuilt::wire_name(&zone.origin) {
                origins.insert(key, zone.clone());
            }
        }
        Self { zones, domains, catalog, origins }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{Change, View, compile::tests::*};
    use crate::answer::State;

    fn two_zones() -> View {
        View::build(
            vec![zone(1, "ho.test."), zone(2, "other.test.")],
            vec![
                domain(10, 1, "a.ho.test.", vec![address("198.18.0.1", 0, 1, State::Live)]),
                domain(11, 1, "b.ho.test.", vec![address("198.18.0.2", 0, 1, State::Live)]),
                domain(20, 2, "c.other.test.", vec![address("198.18.0.3", 0, 1, State::Live)]),
            ],
        )
    }

    #[test]
    fn a_domain_change_rebuilds_only_its_zone_and_shares_the_rest() {
        let view = two_zones();
        let changed = domain(10, 1, "a.ho.test.", vec![address("198.18.0.9", 0, 1, State::Live)]);
        let next = view.with_changes(vec![Change::Domain(10, Some(changed))]);
        assert!(Arc::ptr_eq(&view.zones[&2], &next.zones[&2]), "the other zone is shared");
        assert!(!Arc::ptr_eq(&view.zones[&1], &next.zones[&1]), "its zone is rebuilt");
        assert!(Arc::ptr_eq(&view.domains[&11], &next.domains[&11]), "untouched domains are shared");
        assert!(!Arc::ptr_eq(&view.domains[&10], &next.domains[&10]));
        assert_eq!((next.zone_count(), next.domain_count()), (2, 3));
    }

    #[test]
    fn deleted_domains_and_zones_leave_the_view() {
        let view = two_zones();
        let next = view.with_changes(vec![Change::Domain(20, None), Change::Zone(2, None)]);
        assert_eq!((next.zone_count(), next.domain_count()), (1, 2));
        assert!(Arc::ptr_eq(&view.zones[&1], &next.zones[&1]));
        let renamed = view.with_changes(vec![Change::Zone(1, Some(zone(1, "ho.test.")))]);
        assert!(!Arc::ptr_eq(&view.zones[&1], &renamed.zones[&1]), "a zone row change rebuilds the zone");
        assert!(Arc::ptr_eq(&view.domains[&10], &renamed.domains[&10]), "but not its domains");
    }

    #[test]
    fn prebuilt_answers_exist_for_stored_names_only() {
        let view = two_zones();
        let wire = |text: &str| {
            let mut out = Vec::new();
            for label in text.trim_end_matches('.').split('.') {
                out.push(u8::try_from(label.len()).expect("label"));
                out.extend_from_slice(label.as_bytes());
            }
            out.push(0);
            out
        };
        let a = hickory_server::proto::rr::RecordType::A;
        assert!(view.prebuilt_answer(&wire("a.ho.test."), a).is_some());
        assert!(view.prebuilt_answer(&wire("A.Ho.TEST."), a).is_some(), "any case");
        assert!(view.prebuilt_answer(&wire("nope.ho.test."), a).is_none());
        assert!(view.prebuilt_answer(&wire("a.nozone.test."), a).is_none());
        assert!(view.prebuilt_answer(&wire("a.ho.test."), hickory_server::proto::rr::RecordType::MX).is_none());
    }
}
