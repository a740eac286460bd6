//! [`ZoneView`]: one zone's compiled records answering as a hickory `ZoneHandler`.

use std::{collections::HashMap, sync::Arc};

use hickory_server::{
    proto::{
        op::ResponseCode,
        rr::{LowerName, RecordSet, RecordType, TSigResponseContext},
    },
    server::{Request, RequestInfo},
    zone_handler::{
        AuthLookup, AxfrPolicy, LookupControlFlow, LookupError, LookupOptions, LookupRecords, ZoneHandler, ZoneType,
    },
};

use super::{
    compile::{CompiledDomain, CompiledZone, NameEntry, Rotations},
    prebuilt::{self, Prebuilt},
    rows::ZoneRow,
};

/// One zone's records, answering as a hickory `ZoneHandler`.
pub struct ZoneView {
    pub(super) row: ZoneRow,
    pub(super) origin: LowerName,
    soa: Arc<RecordSet>,
    ns: Arc<RecordSet>,
    glue: Vec<Arc<RecordSet>>,
    pub(super) names: HashMap<LowerName, Arc<NameEntry>>,
    /// The names with prebuilt A or AAAA answers, keyed by their wire format (lower case).
    pub(super) prebuilt: HashMap<Box<[u8]>, Prebuilt>,
}

impl ZoneView {
    /// The zone of `row` with its domains among `domains`, and its prebuilt answers.
    pub(super) fn build(row: ZoneRow, domains: &HashMap<i64, Arc<CompiledDomain>>) -> Self {
        let CompiledZone { row, origin, soa, ns, glue, names } = CompiledZone::compile(row, domains);
        let prebuilt = prebuilt::index(&names);
        Self { row, origin, soa, ns, glue, names, prebuilt }
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

fn no_data() -> Result<AuthLookup, LookupError> {
    Err(LookupError::NameExists)
}
