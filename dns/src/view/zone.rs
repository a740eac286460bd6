//! [`ZoneView`]: one zone's compiled records answering as a hickory `ZoneHandler`.

use std::{collections::HashMap, sync::Arc};

use hickory_server::{
    dnssec::NxProofKind,
    proto::{
        op::ResponseCode,
        rr::{LowerName, Name, RData, Record, RecordSet, RecordType, TSigResponseContext},
    },
    server::{Request, RequestInfo},
    zone_handler::{
        AuthLookup, AxfrPolicy, LookupControlFlow, LookupError, LookupOptions, LookupRecords, Nsec3QueryInfo,
        ZoneHandler, ZoneType,
    },
};

use crate::xfr::{Journal, Published, ZoneXfr, serial_of};

use super::{
    compile::{CompiledDomain, CompiledZone, NameEntry, Rotations},
    prebuilt::{self, Negative, Prebuilt},
    rows::ZoneRow,
};

/// One zone's records, answering as a hickory `ZoneHandler`.
pub struct ZoneView {
    pub(super) row: ZoneRow,
    pub(super) origin: LowerName,
    soa: Arc<RecordSet>,
    negative_soa: Arc<RecordSet>,
    ns: Arc<RecordSet>,
    glue: Vec<Arc<RecordSet>>,
    pub(super) names: HashMap<LowerName, Arc<NameEntry>>,
    /// The names with prebuilt A or AAAA answers, keyed by their wire format (lower case).
    pub(super) prebuilt: HashMap<Box<[u8]>, Prebuilt>,
    /// NXDOMAIN and NODATA for the fast path.
    pub(super) negative: Option<Negative>,
    /// What secondaries receive and the journal IXFR answers from; `None` when the zone has no secondaries.
    xfr: Option<Arc<ZoneXfr>>,
}

impl ZoneView {
    /// The zone of `row` with its domains among `domains`, and its prebuilt answers.
    pub(super) fn build(row: ZoneRow, domains: &HashMap<i64, Arc<CompiledDomain>>) -> Self {
        let CompiledZone { row, origin, soa, negative_soa, ns, glue, names } = CompiledZone::compile(row, domains);
        let prebuilt = prebuilt::index(&names);
        let negative = prebuilt::negative(&Name::from(&origin), &negative_soa);
        let mut zone = Self { row, origin, soa, negative_soa, ns, glue, names, prebuilt, negative, xfr: None };
        if !zone.row.transfer.secondaries.is_empty() {
            zone.xfr = Some(Arc::new(ZoneXfr { published: Arc::new(zone.published()), journal: Journal::default() }));
        }
        zone
    }

    /// Carries `previous`'s journal on, with the change from it to this zone appended.
    pub(super) fn continue_journal(&mut self, previous: &ZoneView) {
        if let (Some(xfr), Some(old)) = (&mut self.xfr, &previous.xfr) {
            let Some(xfr) = Arc::get_mut(xfr) else { return };
            if old.published.serial() == xfr.published.serial() {
                // One content per serial: a secondary that transferred this serial must be able to apply the next
                // delta. What changed since is published with the next serial, which the change's own zone
                // notification brings (it comes after its domains').
                if !old.published.same_records(&xfr.published) {
                    tracing::debug!(zone = %self.origin, serial = xfr.published.serial(), "content ahead of the serial");
                }
                xfr.published = old.published.clone();
                xfr.journal = old.journal.clone();
            } else {
                xfr.journal = old.journal.after(&old.published, &xfr.published);
                tracing::debug!(
                    zone = %self.origin,
                    from = old.published.serial(),
                    to = xfr.published.serial(),
                    records = xfr.published.records().len(),
                    deltas = xfr.journal.len(),
                    "zone published"
                );
            }
        }
    }

    /// The zone's row.
    pub fn row(&self) -> &ZoneRow {
        &self.row
    }

    /// What secondaries receive and the journal of its changes, when the zone has secondaries.
    pub fn xfr(&self) -> Option<&ZoneXfr> {
        self.xfr.as_deref()
    }

    /// The SOA serial.
    pub fn serial(&self) -> u32 {
        self.soa.records_without_rrsigs().next().map_or(0, serial_of)
    }

    /// The record data of the RRset at `name` of `rtype`, as a transfer publishes it (every address of a set, no
    /// rotation); empty when there is none. For UPDATE prerequisites (RFC 2136 section 3.2).
    pub fn rrset_data(&self, name: &LowerName, rtype: RecordType) -> Vec<RData> {
        let apex = *name == self.origin;
        let set = match (rtype, self.names.get(name)) {
            (RecordType::SOA, _) if apex => Some(self.soa.clone()),
            (RecordType::NS, _) if apex => Some(self.ns.clone()),
            (RecordType::A, Some(entry)) => entry.a.as_deref().map(|r| r.base().clone()),
            (RecordType::AAAA, Some(entry)) => entry.aaaa.as_deref().map(|r| r.base().clone()),
            (RecordType::SRV, Some(entry)) => entry.srv.clone(),
            (RecordType::TXT, Some(entry)) => entry.txt.clone(),
            _ => None,
        };
        set.map(|set| set.records_without_rrsigs().map(|r| r.data.clone()).collect()).unwrap_or_default()
    }

    /// Whether `name` owns any record (an empty non-terminal does not).
    pub fn name_in_use(&self, name: &LowerName) -> bool {
        *name == self.origin
            || self
                .names
                .get(name)
                .is_some_and(|e| e.a.is_some() || e.aaaa.is_some() || e.srv.is_some() || e.txt.is_some())
    }

    /// The zone as a secondary receives it: no rotation (every address of a set, in base order), no liveness
    /// after this moment.
    fn published(&self) -> Published {
        let soa = self.soa.records_without_rrsigs().next().cloned();
        let soa = soa.unwrap_or_else(|| Record::update0(self.row.origin.clone(), 0, RecordType::SOA));
        let mut records: Vec<Record> = self.ns.records_without_rrsigs().cloned().collect();
        for entry in self.names.values() {
            for set in [entry.a.as_deref().map(Rotations::base), entry.aaaa.as_deref().map(Rotations::base)]
                .into_iter()
                .flatten()
                .chain(entry.srv.as_ref())
                .chain(entry.txt.as_ref())
            {
                records.extend(set.records_without_rrsigs().cloned());
            }
        }
        Published::new(soa, records)
    }

    /// The answer to `name` and `rtype`, with answer owner names as `asked` spells them: NSD and Knot echo the
    /// question's case, and resolvers' 0x20 checks and caches may expect it. Names are stored in lower case.
    fn lookup_now(
        &self,
        name: &LowerName,
        asked: Option<&Name>,
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
        let owned = |set: &Arc<RecordSet>| match asked {
            Some(asked) if !asked.eq_case(set.name()) => Arc::new(renamed(set, asked)),
            _ => set.clone(),
        };
        let one = |set: &Arc<RecordSet>| Ok(LookupRecords::new(options, owned(set)).into());
        match rtype {
            RecordType::SOA if apex => one(&self.soa),
            RecordType::NS if apex => Ok(AuthLookup::answers(
                LookupRecords::new(options, owned(&self.ns)),
                (!self.glue.is_empty()).then(|| LookupRecords::many(options, self.glue.clone())),
            )),
            RecordType::A => entry.a.as_deref().map(Rotations::pick).map_or_else(no_data, |set| one(&set)),
            RecordType::AAAA => entry.aaaa.as_deref().map(Rotations::pick).map_or_else(no_data, |set| one(&set)),
            RecordType::SRV => match &entry.srv {
                Some(srv) => Ok(AuthLookup::answers(
                    LookupRecords::new(options, owned(srv)),
                    (!entry.srv_additionals.is_empty())
                        .then(|| LookupRecords::many(options, entry.srv_additionals.clone())),
                )),
                None => no_data(),
            },
            RecordType::TXT => entry.txt.as_ref().map_or_else(no_data, one),
            RecordType::ANY => {
                let mut sets = Vec::new();
                if apex {
                    sets.push(self.soa.clone());
                    sets.push(self.ns.clone());
                }
                sets.extend(entry.a.as_deref().map(Rotations::pick));
                sets.extend(entry.aaaa.as_deref().map(Rotations::pick));
                sets.extend(entry.srv.clone());
                sets.extend(entry.txt.clone());
                if sets.is_empty() {
                    return no_data();
                }
                Ok(LookupRecords::many(options, sets.iter().map(owned).collect()).into())
            }
            _ => no_data(),
        }
    }
}

/// A copy of `set` owned by `owner`.
fn renamed(set: &RecordSet, owner: &Name) -> RecordSet {
    let mut copy = RecordSet::with_ttl(owner.clone(), set.record_type(), set.ttl());
    copy.set_records(
        set.records_without_rrsigs()
            .map(|record| {
                let mut record = record.clone();
                record.name = owner.clone();
                record
            })
            .collect(),
    );
    copy
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

    /// hickory's catalog answers queries through [`ZoneHandler::search`]; it calls `lookup` only to fill the
    /// authority section: the zone's NS beside an SOA answer, and the zone's SOA beside a negative answer
    /// (NXDOMAIN, NODATA). Responses are minimal (as NSD's `minimal-responses` and Knot's): no NS is added to a
    /// positive answer. The SOA of a negative answer carries the negative-caching TTL, min(SOA TTL, MINIMUM), as
    /// RFC 2308 section 3 requires; the SOA asked for as such keeps its own TTL.
    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        if *name == self.origin {
            match rtype {
                RecordType::SOA => {
                    return LookupControlFlow::Break(Ok(LookupRecords::new(options, self.negative_soa.clone()).into()));
                }
                RecordType::NS => return LookupControlFlow::Break(Ok(AuthLookup::default())),
                _ => {}
            }
        }
        LookupControlFlow::Break(self.lookup_now(name, None, rtype, options))
    }

    async fn search(
        &self,
        request: &Request,
        options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        let result = match request.request_info() {
            Ok(info) if info.query.query_type() == RecordType::AXFR => Err(LookupError::from(ResponseCode::Refused)),
            Ok(info) => {
                self.lookup_now(info.query.name(), Some(info.query.original().name()), info.query.query_type(), options)
            }
            Err(error) => Err(error),
        };
        (LookupControlFlow::Break(result), None)
    }

    async fn nsec_records(&self, _name: &LowerName, _options: LookupOptions) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Break(Ok(AuthLookup::default()))
    }

    /// Zones are not signed: no denial-of-existence records.
    async fn nsec3_records(&self, _info: Nsec3QueryInfo<'_>, _options: LookupOptions) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Break(Ok(AuthLookup::default()))
    }

    /// Zones are not signed.
    fn nx_proof_kind(&self) -> Option<&NxProofKind> {
        None
    }
}

fn no_data() -> Result<AuthLookup, LookupError> {
    Err(LookupError::NameExists)
}
