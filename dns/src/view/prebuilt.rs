//! The fast path's prebuilt responses: whole messages for every rotation and SRV set, each zone's negative answers,
//! and each zone's index of its names by wire name.

use std::{collections::HashMap, sync::Arc};

use hickory_server::{
    proto::{
        op::{MessageType, Metadata, OpCode, Query, ResponseCode},
        rr::{LowerName, Name, Record, RecordSet, RecordType},
        serialize::binary::{BinDecoder, BinEncodable, BinEncoder},
    },
    zone_handler::{MessageResponseBuilder, Queries},
};

use super::compile::{NameEntry, Rotations};
use crate::wire;

/// One name of a zone as the fast path sees it: its address rotations (a flat copy of its [`NameEntry`]'s, one
/// pointer from the map to the counter and the bytes: the fast path is bound by memory latency, not instructions),
/// and the entry itself for the rest.
pub(super) struct Prebuilt {
    pub(super) a: Option<Arc<Rotations>>,
    pub(super) aaaa: Option<Arc<Rotations>>,
    pub(super) entry: Arc<NameEntry>,
}

/// A prebuilt answer to an SRV query, with the targets' addresses in the additional section.
pub(super) struct SrvMessage {
    pub(super) bytes: Box<[u8]>,
    /// The same bytes answer the owner asked in any case (with [`wire::respond`]'s patch); else only in lower case.
    pub(super) any_case: bool,
}

/// A zone's negative answers (the SOA with the negative-caching TTL in the authority section), for any question.
pub(super) struct Negative {
    pub(super) nxdomain: wire::Relocatable,
    pub(super) nodata: wire::Relocatable,
}

/// Every name among `names`, keyed by its wire format (lower case).
pub(super) fn index(names: &HashMap<LowerName, Arc<NameEntry>>) -> HashMap<Box<[u8]>, Prebuilt> {
    names.iter().filter_map(|(name, entry)| Some((wire_name(name)?, Prebuilt::of(entry)))).collect()
}

/// The zone's NXDOMAIN and NODATA answers, as the catalog sends them: AA, no answer, `negative_soa` in the authority
/// section; `None` when they cannot be moved to another question (checked once on a question of another length).
pub(super) fn negative(origin: &Name, negative_soa: &RecordSet) -> Option<Negative> {
    let build = |rcode| {
        let soa = negative_soa.records_without_rrsigs();
        let template = wire::Relocatable::new(encode(origin, RecordType::A, rcode, [], soa, [])?)?;
        let soa = negative_soa.records_without_rrsigs();
        let probe = Name::from_ascii("relocation-check").ok()?.append_domain(origin).ok()?;
        let expected = encode(&probe, RecordType::SRV, rcode, [], soa, [])?;
        let mut packet = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        packet.extend_from_slice(&Query::query(probe, RecordType::SRV).to_bytes().ok()?);
        let mut moved = Vec::new();
        (wire::respond_relocated(&wire::parse(&packet)?, &template, &mut moved) && moved == expected)
            .then_some(template)
    };
    Some(Negative { nxdomain: build(ResponseCode::NXDomain)?, nodata: build(ResponseCode::NoError)? })
}

/// The answer to an SRV query for `set`, with `additionals`; `None` when it does not qualify (see
/// [`prebuilt_message`]). It answers any case of the owner when the same message with the owner in upper case is
/// this one patched (nothing else points into the owner's name).
pub(super) fn srv_message(set: &RecordSet, additionals: &[Arc<RecordSet>]) -> Option<SrvMessage> {
    let extra = || additionals.iter().flat_map(|s| s.records_without_rrsigs());
    let owner = set.name();
    let bytes = prebuilt_message(owner, set, extra())?;
    let upper = Name::from_ascii(owner.to_ascii().to_ascii_uppercase()).ok()?;
    let renamed: Vec<Record> = set
        .records_without_rrsigs()
        .map(|r| {
            let mut r = r.clone();
            r.name = upper.clone();
            r
        })
        .collect();
    let any_case = encode(&upper, RecordType::SRV, ResponseCode::NoError, &renamed, [], extra()).is_some_and(|up| {
        let name = wire_name(&LowerName::new(&upper)).unwrap_or_default();
        let mut patched = bytes.to_vec();
        let first = wire::first_answer(name.len() + 4);
        patched[wire::HEADER_LEN..wire::HEADER_LEN + name.len()].copy_from_slice(&name);
        patched[first..first + name.len()].copy_from_slice(&name);
        patched == up
    });
    Some(SrvMessage { bytes, any_case })
}

/// The prebuilt messages of every rotation, one after the other, and their common length; `None` when one does not
/// qualify or their lengths differ.
pub(super) fn concat_messages(owner: &Name, sets: &[Arc<RecordSet>]) -> Option<(Box<[u8]>, usize)> {
    let mut all = Vec::new();
    let mut len = None;
    for set in sets {
        let message = prebuilt_message(owner, set, [].into_iter())?;
        if *len.get_or_insert(message.len()) != message.len() {
            return None;
        }
        all.extend_from_slice(&message);
    }
    Some((all.into_boxed_slice(), len?))
}

/// A name in wire format (uncompressed).
pub(super) fn wire_name(name: &LowerName) -> Option<Box<[u8]>> {
    let mut bytes = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut bytes);
    name.emit(&mut encoder).ok()?;
    Some(bytes.into_boxed_slice())
}

impl Prebuilt {
    fn of(entry: &Arc<NameEntry>) -> Self {
        Self { a: entry.a.clone(), aaaa: entry.aaaa.clone(), entry: entry.clone() }
    }
}

/// The catalog's answer to a plain query for `set` as a whole message with ID 0 and no EDNS (see [`wire`]), encoded
/// the way the catalog encodes it (hickory's `MessageResponse`, the question echoed as asked), or `None` when the
/// owner is not in lower case, the message might not fit a UDP response with an OPT record, or the owner is written
/// out anywhere but in the question and the first answer (hickory writes the question as received, so the first
/// answer's owner is not compressed, and later answers point to it): [`wire::respond`] rewrites both in the
/// question's case.
pub(super) fn prebuilt_message<'a>(
    owner: &Name,
    set: &'a RecordSet,
    additionals: impl Iterator<Item = &'a Record> + Send + 'a,
) -> Option<Box<[u8]>> {
    if !owner.eq_case(&owner.to_lowercase()) {
        return None;
    }
    let bytes = encode(owner, set.record_type(), ResponseCode::NoError, set.records_without_rrsigs(), [], additionals)?;
    let question = Query::query(owner.clone(), set.record_type()).to_bytes().ok()?;
    let name = &question[..question.len() - 4];
    let first_answer = wire::first_answer(question.len());
    let at: Vec<usize> = bytes.windows(name.len()).enumerate().filter(|(_, w)| *w == name).map(|(i, _)| i).collect();
    (at == [wire::HEADER_LEN, first_answer]).then(|| bytes.into_boxed_slice())
}

/// An authoritative response to a question for `name` and `rtype` (ID 0, no EDNS) as hickory's catalog encodes it,
/// within 512 bytes with room for an OPT record; `None` when it does not fit.
fn encode<'a>(
    name: &Name,
    rtype: RecordType,
    rcode: ResponseCode,
    answers: impl IntoIterator<Item = &'a Record, IntoIter: Send> + Send + 'a,
    soa: impl IntoIterator<Item = &'a Record, IntoIter: Send> + Send + 'a,
    additionals: impl IntoIterator<Item = &'a Record, IntoIter: Send> + Send + 'a,
) -> Option<Vec<u8>> {
    let question = Query::query(name.clone(), rtype).to_bytes().ok()?;
    let queries = Queries::read(&mut BinDecoder::new(&question), 1).ok()?;
    let mut metadata = Metadata::new(0, MessageType::Response, OpCode::Query);
    metadata.authoritative = true;
    metadata.response_code = rcode;
    let response = MessageResponseBuilder::new(&queries, None).build(metadata, answers, [], soa, additionals);
    let mut bytes = Vec::with_capacity(wire::MAX_PLAIN_UDP);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(u16::try_from(wire::MAX_PLAIN_UDP - wire::OPT_LEN).ok()?);
    response.destructive_emit(&mut encoder).ok()?;
    let truncated = bytes.get(2).is_none_or(|flags| flags & 0x02 != 0);
    (!truncated).then_some(bytes)
}
