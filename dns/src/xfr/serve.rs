//! AXFR (RFC 5936) and IXFR (RFC 1995) answers from one view, over TCP, to the secondaries a zone lists, signed
//! with TSIG (RFC 8945) when the request is.
//!
//! hickory's catalog sends a transfer as one message and has no IXFR, so transfers never reach it: the handler
//! sends them here. Each answer is a run of messages of at most [`MESSAGE_BUDGET`] bytes of records; with TSIG the
//! first is signed over the request's MAC and all TSIG variables, the following ones over the previous MAC and the
//! timers (RFC 8945 section 5.3.1).

use std::{iter, net::SocketAddr, sync::Arc};

use hickory_proto::{
    op::{Edns, Header, HeaderCounts, Metadata, ResponseCode},
    rr::{
        Name, Record, RecordType, TSigResponseContext, TSigner,
        rdata::tsig::{TSIG, make_tsig_record},
    },
    serialize::binary::{BinEncodable, BinEncoder},
};
use hickory_server::{
    net::xfer::Protocol,
    server::{Request, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tracing::{debug, info, warn};

use super::{Delta, TransferPolicy, TsigKey, ZoneXfr, policy::key_name, serial_newer, serial_of};
use crate::{metrics::Metrics, view::View};

/// Bytes of records per message (RFC 5936 leaves the split to the server; 16 KiB keeps each well under 64 KiB).
pub const MESSAGE_BUDGET: usize = 16 * 1024;

/// What a transfer request gets, before any record is sent.
enum Verdict {
    /// Send these records, in order.
    Send { kind: &'static str, records: Vec<Record> },
    /// Answer with this rcode and no records.
    Refuse(ResponseCode),
}

/// A verified request signature: the key and the request's MAC, which the first response signature covers.
pub(crate) struct Signed {
    signer: TSigner,
    request_mac: Vec<u8>,
}

/// Answers an AXFR or IXFR request for a zone of `view`; `config_keys` are the configuration file's TSIG keys.
pub async fn serve<R: ResponseHandler>(
    view: &View,
    config_keys: &[TsigKey],
    metrics: &Metrics,
    request: &Request,
    mut handle: R,
) -> ResponseInfo {
    let count = |kind| Metrics::count(&metrics.transfers, kind);
    let src = request.src();
    let now = unix_now();
    let Ok(info) = request.request_info() else {
        return send(request, ResponseCode::FormErr, &[], None, now, &mut handle).await;
    };
    let (qtype, origin) = (info.query.query_type(), info.query.name().clone());
    let Some(zone) = view.zone_at(&origin) else {
        info!(%src, zone = %origin, %qtype, "zone transfer refused: not the apex of a zone we serve");
        count("refused");
        return send(request, ResponseCode::Refused, &[], None, now, &mut handle).await;
    };
    let policy = &zone.row().transfer;
    let signed = match verify(request, policy, config_keys, now) {
        Ok(signed) => signed,
        Err(context) => {
            // An unknown key, a bad MAC or a bad time: NOTAUTH with the TSIG error (RFC 8945 section 5.2).
            info!(%src, zone = %origin, %qtype, "zone transfer refused: TSIG does not verify");
            count("tsig-error");
            return send_tsig_error(request, context, &mut handle).await;
        }
    };
    let key = signed.as_ref().map(|s| s.signer.signer_name().clone());
    let verdict = if !allowed(policy, src, key.as_ref()) {
        info!(%src, zone = %origin, %qtype, key = ?key, "zone transfer refused: not a listed secondary, or unsigned");
        Verdict::Refuse(ResponseCode::Refused)
    } else if let Some(xfr) = zone.xfr() {
        decide(request, qtype, xfr)
    } else {
        Verdict::Refuse(ResponseCode::Refused)
    };
    match verdict {
        Verdict::Refuse(rcode) => {
            count("refused");
            send(request, rcode, &[], signed.as_ref(), now, &mut handle).await
        }
        Verdict::Send { kind, records } => {
            count(kind);
            info!(%src, zone = %origin, kind, serial = zone.serial(), records = records.len(), key = ?key, "zone transfer");
            send(request, ResponseCode::NoError, &records, signed.as_ref(), now, &mut handle).await
        }
    }
}

/// What to send for `qtype` from `xfr`: AXFR, or IXFR from the serial in the request's authority section.
fn decide(request: &Request, qtype: RecordType, xfr: &ZoneXfr) -> Verdict {
    let published = &xfr.published;
    let full = || {
        let mut records = Vec::with_capacity(published.records().len() + 2);
        records.push(published.soa.clone());
        records.extend(published.records().cloned());
        records.push(published.soa.clone());
        records
    };
    if qtype == RecordType::AXFR {
        if request.protocol() != Protocol::Tcp {
            debug!(src = %request.src(), "AXFR over UDP refused");
            return Verdict::Refuse(ResponseCode::Refused);
        }
        return Verdict::Send { kind: "axfr", records: full() };
    }
    let Some(theirs) = request.authorities.iter().find(|r| r.record_type() == RecordType::SOA).map(serial_of) else {
        return Verdict::Refuse(ResponseCode::FormErr);
    };
    let current = published.serial();
    // Up to date, or over UDP (RFC 1995 section 2: the SOA alone tells the secondary to come back over TCP).
    if !serial_newer(current, theirs) || request.protocol() != Protocol::Tcp {
        return Verdict::Send { kind: "ixfr-current", records: vec![published.soa.clone()] };
    }
    match xfr.journal.since(theirs) {
        Some(deltas) if deltas.last().is_some_and(|d| serial_of(&d.new_soa) == current) => {
            Verdict::Send { kind: "ixfr", records: incremental(&published.soa, &deltas) }
        }
        // Older than the journal, or unknown: the whole zone, in the IXFR answer (RFC 1995 section 4).
        _ => Verdict::Send { kind: "ixfr-full", records: full() },
    }
}

/// The RFC 1995 sequence: the current SOA, then per delta the old SOA, what went, the new SOA, what came; the
/// current SOA again.
fn incremental(current: &Record, deltas: &[Arc<Delta>]) -> Vec<Record> {
    let mut records = vec![current.clone()];
    for delta in deltas {
        records.push(delta.old_soa.clone());
        records.extend(delta.deleted.iter().cloned());
        records.push(delta.new_soa.clone());
        records.extend(delta.added.iter().cloned());
    }
    records.push(current.clone());
    records
}

/// Whether a secondary the policy lists covers `src`, with its key when it names one.
fn allowed(policy: &TransferPolicy, src: SocketAddr, key: Option<&Name>) -> bool {
    policy.secondaries.iter().any(|secondary| {
        secondary.prefix.contains(&src.ip())
            && match &secondary.key {
                None => true,
                Some(wanted) => key_name(wanted).ok().as_ref() == key,
            }
    })
}

/// Checks the request's TSIG, if it has one, with the zone's or the configuration's key of that name; `Err` is the
/// context of the error response.
fn verify(
    request: &Request,
    policy: &TransferPolicy,
    config_keys: &[TsigKey],
    now: u64,
) -> Result<Option<Signed>, TSigResponseContext> {
    check_tsig(
        request,
        |name| {
            policy
                .signer(name)
                .or_else(|| config_keys.iter().filter_map(|k| k.signer().ok()).find(|s| s.signer_name() == name))
        },
        now,
    )
}

/// Checks the request's TSIG, if it has one, with the key `find` gives for its name (RFC 8945 section 5.2): an
/// unknown key, a bad MAC or a time outside the fudge is `Err`, the context of the error response.
pub(crate) fn check_tsig(
    request: &Request,
    find: impl FnOnce(&Name) -> Option<TSigner>,
    now: u64,
) -> Result<Option<Signed>, TSigResponseContext> {
    let Some(signature) = &request.signature else {
        return Ok(None);
    };
    let name = signature.name.to_lowercase();
    let id = request.metadata.id;
    let Some(signer) = find(&name) else {
        return Err(TSigResponseContext::unknown_key(id, now, name));
    };
    match signer.verify_message_byte(request.as_slice(), None, true) {
        Ok((request_mac, _, valid)) if valid.contains(&now) => Ok(Some(Signed { signer, request_mac })),
        Ok((request_mac, ..)) => Err(TSigResponseContext::new(
            id,
            now,
            signer,
            request_mac,
            Some(hickory_proto::rr::rdata::tsig::TsigError::BadTime),
        )),
        Err(error) => {
            debug!(%error, "TSIG verification failed");
            Err(TSigResponseContext::bad_signature(id, now, signer))
        }
    }
}

/// Sends `records` in messages of at most [`MESSAGE_BUDGET`] bytes (one message when there are none), each signed
/// when the request was.
pub(crate) async fn send<R: ResponseHandler>(
    request: &Request,
    rcode: ResponseCode,
    records: &[Record],
    signed: Option<&Signed>,
    now: u64,
    handle: &mut R,
) -> ResponseInfo {
    let edns = request.edns.as_ref().map(|theirs| {
        let mut edns = Edns::new();
        edns.set_max_payload(theirs.max_payload().max(512));
        edns
    });
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = rcode == ResponseCode::NoError;
    metadata.response_code = rcode;
    let mut previous_mac: Option<Vec<u8>> = None;
    let mut last = None;
    for (index, chunk) in chunks(records).enumerate() {
        let build = || {
            MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
                metadata,
                chunk.iter(),
                iter::empty(),
                iter::empty(),
                iter::empty(),
            )
        };
        let mut response = build();
        if let Some(signed) = signed {
            let mut unsigned = Vec::with_capacity(MESSAGE_BUDGET + 512);
            let signature = build()
                .destructive_emit(&mut BinEncoder::new(&mut unsigned))
                .map_err(|e| e.to_string())
                .and_then(|_| match &previous_mac {
                    None => TSigResponseContext::new(
                        request.metadata.id,
                        now,
                        signed.signer.clone(),
                        signed.request_mac.clone(),
                        None,
                    )
                    .sign(&unsigned)
                    .map_err(|e| e.to_string()),
                    Some(previous) => chained(&signed.signer, previous, &unsigned, now, request.metadata.id),
                });
            match signature {
                Ok(signature) => {
                    previous_mac = Some(signature.data.mac.clone());
                    response.set_signature(signature);
                }
                Err(error) => {
                    warn!(%error, "cannot sign a transfer message");
                    return failed(request);
                }
            }
        }
        match handle.send_response(response).await {
            Ok(info) => last = Some(info),
            Err(error) => {
                debug!(%error, index, "transfer message not sent; the secondary went away");
                return failed(request);
            }
        }
    }
    last.unwrap_or_else(|| failed(request))
}

/// A TSIG error answer: NOTAUTH, no records, the TSIG record the context makes (unsigned for BADKEY and BADSIG).
pub(crate) async fn send_tsig_error<R: ResponseHandler>(
    request: &Request,
    context: TSigResponseContext,
    handle: &mut R,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::NotAuth;
    let build = || {
        MessageResponseBuilder::new(&request.queries, None).build(
            metadata,
            iter::empty(),
            iter::empty(),
            iter::empty(),
            iter::empty(),
        )
    };
    let mut unsigned = Vec::with_capacity(512);
    let mut response = build();
    match build().destructive_emit(&mut BinEncoder::new(&mut unsigned)).map(|_| context.sign(&unsigned)) {
        Ok(Ok(signature)) => response.set_signature(signature),
        _ => warn!("cannot build the TSIG error record"),
    }
    handle.send_response(response).await.unwrap_or_else(|_| failed(request))
}

/// The signature of a message after the first: over the previous MAC, the message and the timers.
fn chained(
    signer: &TSigner,
    previous_mac: &[u8],
    message: &[u8],
    time: u64,
    id: u16,
) -> Result<Box<Record<TSIG>>, String> {
    let mut tbs = Vec::with_capacity(previous_mac.len() + message.len() + 10);
    let fudge = signer.fudge();
    let len = u16::try_from(previous_mac.len()).map_err(|e| e.to_string())?;
    let encode = |encoder: &mut BinEncoder<'_>| -> Result<(), hickory_proto::ProtoError> {
        encoder.emit_u16(len)?;
        encoder.emit_vec(previous_mac)?;
        encoder.emit_vec(message)?;
        // 48-bit time: the high 16 bits, then the low 32.
        encoder.emit_u16(u16::try_from(time >> 32).unwrap_or(0))?;
        encoder.emit_u32(u32::try_from(time & 0xffff_ffff).unwrap_or(0))?;
        encoder.emit_u16(fudge)
    };
    encode(&mut BinEncoder::new(&mut tbs)).map_err(|e| e.to_string())?;
    let mac = signer.sign(&tbs).map_err(|e| e.to_string())?;
    let tsig = TSIG::new(signer.algorithm().clone(), time, fudge, mac, id, None, Vec::new());
    Ok(Box::new(make_tsig_record(signer.signer_name().clone(), tsig)))
}

/// `records` in runs of at most [`MESSAGE_BUDGET`] bytes (at least one record each); one empty run when there are
/// none.
fn chunks(records: &[Record]) -> impl Iterator<Item = &[Record]> {
    let mut rest = records;
    let mut first = true;
    iter::from_fn(move || {
        if rest.is_empty() {
            return std::mem::take(&mut first).then_some(rest);
        }
        first = false;
        let mut bytes = 0;
        let mut end = 0;
        while end < rest.len() {
            let len = rest[end].to_bytes().map_or(MESSAGE_BUDGET, |b| b.len());
            if end > 0 && bytes + len > MESSAGE_BUDGET {
                break;
            }
            bytes += len;
            end += 1;
        }
        let (chunk, tail) = rest.split_at(end);
        rest = tail;
        Some(chunk)
    })
}

/// What the server records of an answer it could not send.
fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
}

pub(crate) fn unix_now() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::rr::{RData, rdata::A};

    use super::*;

    #[test]
    fn chunks_split_by_size_and_keep_order() {
        let records: Vec<Record> = (0..3000)
            .map(|i| {
                let name = Name::from_str(&format!("name-{i}.ho.test.")).expect("name");
                Record::from_rdata(name, 1, RData::A(A::new(198, 18, 0, 1)))
            })
            .collect();
        let runs: Vec<&[Record]> = chunks(&records).collect();
        assert!(runs.len() > 2, "{} runs", runs.len());
        assert_eq!(runs.iter().map(|r| r.len()).sum::<usize>(), records.len());
        for run in &runs {
            let bytes: usize = run.iter().map(|r| r.to_bytes().expect("encodes").len()).sum();
            assert!(bytes <= MESSAGE_BUDGET);
        }
        assert_eq!(chunks(&[]).count(), 1, "an answer without records is one message");
    }

    #[test]
    fn secondaries_are_matched_by_prefix_and_key() {
        let policy: TransferPolicy = serde_json::from_value(serde_json::json!({
            "secondaries": [{ "prefix": "127.0.0.1/32" }, { "prefix": "198.18.0.0/24", "key": "k1" }],
        }))
        .expect("policy");
        let at = |ip: &str| SocketAddr::new(ip.parse().expect("ip"), 5353);
        let k1 = key_name("k1").expect("name");
        let k2 = key_name("k2").expect("name");
        assert!(allowed(&policy, at("127.0.0.1"), None));
        assert!(allowed(&policy, at("127.0.0.1"), Some(&k2)), "a prefix without a key takes any");
        assert!(!allowed(&policy, at("127.0.0.2"), None));
        assert!(allowed(&policy, at("198.18.0.9"), Some(&k1)));
        assert!(!allowed(&policy, at("198.18.0.9"), None), "the key is required");
        assert!(!allowed(&policy, at("198.18.0.9"), Some(&k2)), "and no other");
    }
}
