//! The fast path's prebuilt responses: whole messages for every rotation, and each zone's index of them by wire name.

use std::{collections::HashMap, sync::Arc};

use hickory_server::{
    proto::{
        op::{MessageType, Metadata, OpCode, Query},
        rr::{LowerName, Name, RecordSet},
        serialize::binary::{BinDecoder, BinEncodable, BinEncoder},
    },
    zone_handler::{MessageResponseBuilder, Queries},
};

use super::compile::{NameEntry, Rotations};
use crate::wire;

/// The rotations of one name that have prebuilt messages: a flat copy of its [`NameEntry`], one pointer from the
/// map to the counter and the bytes (the fast path is bound by memory latency, not instructions).
pub(super) struct Prebuilt {
    pub(super) a: Option<Arc<Rotations>>,
    pub(super) aaaa: Option<Arc<Rotations>>,
}

/// The names among `names` with prebuilt A or AAAA answers, keyed by their wire format (lower case).
pub(super) fn index(names: &HashMap<LowerName, Arc<NameEntry>>) -> HashMap<Box<[u8]>, Prebuilt> {
    names.iter().filter_map(|(name, entry)| Some((wire_name(name)?, Prebuilt::of(entry)?))).collect()
}

/// The prebuilt messages of every rotation, one after the other, and their common length; `None` when one does not
/// qualify or their lengths differ.
pub(super) fn concat_messages(owner: &Name, sets: &[Arc<RecordSet>]) -> Option<(Box<[u8]>, usize)> {
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

/// A name in wire format (uncompressed).
pub(super) fn wire_name(name: &LowerName) -> Option<Box<[u8]>> {
    let mut bytes = Vec::with_capacity(64);
    let mut encoder = BinEncoder::new(&mut bytes);
    name.emit(&mut encoder).ok()?;
    Some(bytes.into_boxed_slice())
}

impl Prebuilt {
    /// The rotations of `entry` that have prebuilt messages, if any.
    fn of(entry: &NameEntry) -> Option<Self> {
        let with_messages = |r: &Option<Arc<Rotations>>| r.clone().filter(|r| !r.messages.is_empty());
        let prebuilt = Self { a: with_messages(&entry.a), aaaa: with_messages(&entry.aaaa) };
        (prebuilt.a.is_some() || prebuilt.aaaa.is_some()).then_some(prebuilt)
    }
}

/// The catalog's answer to a plain query for `set` as a whole message with ID 0 and no EDNS (see [`wire`]), encoded
/// the way the catalog encodes it (hickory's `MessageResponse`, the question echoed as asked), or `None` when the
/// owner is not in lower case, the message might not fit a UDP response with an OPT record, or the owner is written
/// out anywhere but in the question and the first answer (hickory writes the question as received, so the first
/// answer's owner is not compressed, and later answers point to it): [`wire::respond`] rewrites both in the
/// question's case.
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
    let name = &question[..question.len() - 4];
    let first_answer = wire::first_answer(question.len());
    let at: Vec<usize> = bytes.windows(name.len()).enumerate().filter(|(_, w)| *w == name).map(|(i, _)| i).collect();
    (!truncated && at == [wire::HEADER_LEN, first_answer]).then(|| bytes.into_boxed_slice())
}
