//! RFC 2136 UPDATE, signed with TSIG by a key of one domain (nsupdate, certbot's DNS plugins, external-dns).
//!
//! A key may change only its domain's addresses (A, AAAA at the domain's name), the TXT records at the domain or
//! under it, and its SRV records (`_service._transport.<domain>`, kept as service tuples with an explicit target). Prerequisites (RFC 2136 section 3.2) are checked against the served view; the changes go to Postgres in
//! one transaction like any other write (the serial bumps, secondaries are notified, the view reloads), and NOERROR
//! is answered only after the commit. Everything else is refused with the RFC's rcode and a log line.

use std::net::IpAddr;

use hickory_proto::{
    op::ResponseCode,
    rr::{DNSClass, LowerName, Name, RData, Record, RecordType},
};
use hickory_server::server::{Request, ResponseHandler, ResponseInfo};
use sqlx::PgPool;
use tracing::{info, warn};

use crate::{
    store::{StoreError, admin},
    view::{View, ZoneView},
    xfr::{
        TsigKey,
        serve::{check_tsig, send, send_tsig_error, unix_now},
    },
};

/// Most records in one UPDATE's update section.
pub const MAX_UPDATES: usize = 64;
/// Most TXT records a domain may hold, as through the API.
pub const MAX_TXT: i64 = 32;

/// Why an UPDATE is refused: its rcode and what the log says.
struct Refusal(ResponseCode, String);

/// Answers an UPDATE request.
pub async fn serve<R: ResponseHandler>(
    pool: &PgPool,
    view: &View,
    shared: &crate::sync::Shared,
    request: &Request,
    mut handle: R,
) -> ResponseInfo {
    let (targets, max_addresses) = (&shared.targets, shared.addresses_per_domain);
    let now = unix_now();
    let src = request.src();
    let queries = request.queries.queries();
    let zone = match queries {
        [zone] if zone.query_type() == RecordType::SOA => zone.name().clone(),
        _ => return refuse(request, src, Refusal(ResponseCode::FormErr, "not one SOA zone".into()), &mut handle).await,
    };
    let Some(zone_view) = view.zone_at(&zone) else {
        let refusal = Refusal(ResponseCode::NotAuth, format!("{zone} is not a zone we serve"));
        return refuse(request, src, refusal, &mut handle).await;
    };
    let Some(signature) = &request.signature else {
        return refuse(request, src, Refusal(ResponseCode::Refused, "unsigned".into()), &mut handle).await;
    };
    let key_name = signature.name.to_lowercase();
    let key = match admin::update_key(pool, &key_name.to_ascii()).await {
        Ok(key) => key,
        Err(error) => {
            warn!(%error, "UPDATE: cannot read keys");
            return refuse(request, src, Refusal(ResponseCode::ServFail, "database".into()), &mut handle).await;
        }
    };
    let signer = key.as_ref().and_then(|(algorithm, secret, ..)| {
        let key = TsigKey { name: key_name.to_ascii(), algorithm: algorithm.clone(), secret: secret.clone() };
        key.signer().ok()
    });
    let signed = match check_tsig(request, |_| signer, now) {
        Ok(Some(signed)) => signed,
        Ok(None) => return refuse(request, src, Refusal(ResponseCode::Refused, "unsigned".into()), &mut handle).await,
        Err(context) => {
            info!(%src, zone = %zone, key = %key_name, "UPDATE refused: TSIG does not verify");
            return send_tsig_error(request, context, &mut handle).await;
        }
    };
    let Some((_, _, domain_id, fqdn)) = key else {
        return refuse(request, src, Refusal(ResponseCode::NotAuth, "no such key".into()), &mut handle).await;
    };
    let domain = LowerName::new(&Name::from_ascii(&fqdn).unwrap_or_default());
    let outcome = match check(zone_view, &zone, &domain, request, targets) {
        Err(refusal) => Err(refusal),
        Ok(changes) => match admin::apply_update(pool, domain_id, &changes, MAX_TXT, max_addresses).await {
            Ok(()) => Ok(changes.len()),
            Err(StoreError::Conflict(message)) => Err(Refusal(ResponseCode::Refused, message)),
            Err(error) => {
                warn!(%error, "UPDATE: not stored");
                Err(Refusal(ResponseCode::ServFail, "not stored".into()))
            }
        },
    };
    match outcome {
        Ok(changes) => {
            info!(%src, zone = %zone, key = %key_name, domain = %fqdn, changes, "UPDATE applied");
            send(request, ResponseCode::NoError, &[], Some(&signed), now, &mut handle).await
        }
        Err(Refusal(rcode, why)) => {
            info!(%src, zone = %zone, key = %key_name, %rcode, %why, "UPDATE refused");
            send(request, rcode, &[], Some(&signed), now, &mut handle).await
        }
    }
}

async fn refuse<R: ResponseHandler>(
    request: &Request,
    src: std::net::SocketAddr,
    Refusal(rcode, why): Refusal,
    handle: &mut R,
) -> ResponseInfo {
    info!(%src, %rcode, %why, "UPDATE refused");
    send(request, rcode, &[], None, unix_now(), handle).await
}

/// Checks the prerequisites against `zone` and turns the update section into row changes, or refuses.
fn check(
    zone: &ZoneView,
    origin: &LowerName,
    domain: &LowerName,
    request: &Request,
    targets: &tether_config::TargetPolicy,
) -> Result<Vec<admin::RowChange>, Refusal> {
    let within = |name: &LowerName| -> Result<(), Refusal> {
        if !origin.zone_of(name) {
            return Err(Refusal(ResponseCode::NotZone, format!("{name} is outside the zone")));
        }
        if !domain.zone_of(name) {
            return Err(Refusal(ResponseCode::Refused, format!("{name} is not the key's domain {domain} or under it")));
        }
        Ok(())
    };
    // Prerequisites (RFC 2136 section 3.2): value-dependent ones are gathered per (name, type) first.
    let mut expected: Vec<(LowerName, RecordType, Vec<RData>)> = Vec::new();
    for rr in &request.answers {
        let name = LowerName::new(&rr.name);
        within(&name)?;
        let rtype = rr.record_type();
        let present = |t: RecordType| !zone.rrset_data(&name, t).is_empty();
        match (rr.dns_class, rtype) {
            (DNSClass::ANY, RecordType::ANY) if !zone.name_in_use(&name) => {
                return Err(Refusal(ResponseCode::NXDomain, format!("{name} is not in use")));
            }
            (DNSClass::ANY, RecordType::ANY) => {}
            (DNSClass::ANY, t) if !present(t) => {
                return Err(Refusal(ResponseCode::NXRRSet, format!("no {t} at {name}")));
            }
            (DNSClass::ANY, _) => {}
            (DNSClass::NONE, RecordType::ANY) if zone.name_in_use(&name) => {
                return Err(Refusal(ResponseCode::YXDomain, format!("{name} is in use")));
            }
            (DNSClass::NONE, RecordType::ANY) => {}
            (DNSClass::NONE, t) if present(t) => return Err(Refusal(ResponseCode::YXRRSet, format!("{t} at {name}"))),
            (DNSClass::NONE, _) => {}
            (DNSClass::IN, t) => match expected.iter_mut().find(|(n, et, _)| *n == name && *et == t) {
                Some((_, _, data)) => data.push(rr.data.clone()),
                None => expected.push((name, t, vec![rr.data.clone()])),
            },
            (class, _) => return Err(Refusal(ResponseCode::FormErr, format!("prerequisite of class {class:?}"))),
        }
    }
    for (name, rtype, mut want) in expected {
        let mut have = zone.rrset_data(&name, rtype);
        let key = |d: &RData| d.to_string();
        want.sort_by_key(key);
        have.sort_by_key(key);
        want.dedup();
        if want != have {
            return Err(Refusal(ResponseCode::NXRRSet, format!("{rtype} at {name} is not as given")));
        }
    }
    // Updates (RFC 2136 section 3.4).
    if request.authorities.len() > MAX_UPDATES {
        return Err(Refusal(ResponseCode::Refused, format!("more than {MAX_UPDATES} updates")));
    }
    let mut changes = Vec::with_capacity(request.authorities.len());
    for rr in &request.authorities {
        let name = LowerName::new(&rr.name);
        within(&name)?;
        changes.extend(change(rr, &name, domain, targets)?);
    }
    Ok(changes)
}

/// The row changes one update record asks for.
fn change(
    rr: &Record,
    name: &LowerName,
    domain: &LowerName,
    targets: &tether_config::TargetPolicy,
) -> Result<Vec<admin::RowChange>, Refusal> {
    use admin::RowChange::{
        AddAddress, AddService, AddTxt, DeleteAddress, DeleteFamily, DeleteService, DeleteServices, DeleteTxt,
        DeleteTxtAt,
    };
    let owner = Name::from(name).to_ascii();
    let at_domain = name == domain;
    let address_here = |ip: IpAddr| -> Result<IpAddr, Refusal> {
        if !at_domain {
            return Err(Refusal(ResponseCode::Refused, format!("addresses only at {domain}, not {name}")));
        }
        if ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
            return Err(Refusal(ResponseCode::Refused, format!("{ip} cannot be a host address")));
        }
        targets.check(ip).map_err(|why| Refusal(ResponseCode::Refused, why))?;
        Ok(ip)
    };
    let text = |data: &RData| -> Result<String, Refusal> {
        let RData::TXT(txt) = data else {
            return Err(Refusal(ResponseCode::FormErr, "TXT without text".into()));
        };
        let value: String = txt.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        let printable = value.chars().all(|c| c.is_ascii() && !c.is_ascii_control());
        if value.is_empty() || value.len() > 1024 || !printable {
            return Err(Refusal(ResponseCode::Refused, "TXT: 1 to 1024 printable ASCII characters".into()));
        }
        Ok(value)
    };
    // An SRV owner is `_service._transport.<domain>`.
    let service = || -> Result<(String, String), Refusal> {
        let labels: Vec<String> =
            Name::from(name).iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
        let depth = usize::from(Name::from(name).num_labels()) - usize::from(Name::from(domain).num_labels());
        let valid =
            |l: &str| l.len() > 1 && l.len() <= 16 && l[1..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        match labels.as_slice() {
            [s, t, ..] if depth == 2 && s.starts_with('_') && t.starts_with('_') && valid(s) && valid(t) => {
                let transport = t[1..].to_owned();
                if !["tcp", "udp", "sctp", "tls"].contains(&transport.as_str()) {
                    return Err(Refusal(
                        ResponseCode::Refused,
                        format!("SRV transport {t} is not tcp, udp, sctp or tls"),
                    ));
                }
                Ok((s[1..].to_owned(), transport))
            }
            _ => Err(Refusal(ResponseCode::Refused, format!("SRV only at _service._transport.{domain}, not {name}"))),
        }
    };
    let rtype = rr.record_type();
    Ok(match (rr.dns_class, rtype, &rr.data) {
        (DNSClass::IN, _, RData::SRV(srv)) => {
            let (service, transport) = service()?;
            vec![AddService {
                service,
                transport,
                target: srv.target.to_lowercase().to_ascii(),
                port: i32::from(srv.port),
                priority: i32::from(srv.priority),
                weight: i32::from(srv.weight),
            }]
        }
        (DNSClass::NONE, _, RData::SRV(srv)) => {
            let (service, transport) = service()?;
            vec![DeleteService {
                service,
                transport,
                target: srv.target.to_lowercase().to_ascii(),
                port: i32::from(srv.port),
            }]
        }
        (DNSClass::ANY, RecordType::SRV, _) => {
            let (service, transport) = service()?;
            vec![DeleteServices { service, transport }]
        }
        (DNSClass::IN, _, RData::A(a)) => vec![AddAddress(address_here(IpAddr::V4(a.0))?)],
        (DNSClass::IN, _, RData::AAAA(aaaa)) => vec![AddAddress(address_here(IpAddr::V6(aaaa.0))?)],
        (DNSClass::IN, RecordType::TXT, data) => {
            vec![AddTxt { owner, value: text(data)?, ttl: i32::try_from(rr.ttl.min(86_400)).unwrap_or(86_400) }]
        }
        (DNSClass::NONE, _, RData::A(a)) => vec![DeleteAddress(address_here(IpAddr::V4(a.0))?)],
        (DNSClass::NONE, _, RData::AAAA(aaaa)) => vec![DeleteAddress(address_here(IpAddr::V6(aaaa.0))?)],
        (DNSClass::NONE, RecordType::TXT, data) => vec![DeleteTxt { owner, value: text(data)? }],
        (DNSClass::ANY, RecordType::A, _) if at_domain => vec![DeleteFamily(4)],
        (DNSClass::ANY, RecordType::AAAA, _) if at_domain => vec![DeleteFamily(6)],
        (DNSClass::ANY, RecordType::TXT, _) => vec![DeleteTxtAt(owner)],
        (DNSClass::ANY, RecordType::ANY, _) if at_domain => {
            vec![DeleteFamily(4), DeleteFamily(6), DeleteTxtAt(owner)]
        }
        (DNSClass::ANY, RecordType::ANY, _) => vec![DeleteTxtAt(owner)],
        // Deleting what is not there is no error (RFC 2136 section 3.4.2.3).
        (DNSClass::ANY, RecordType::A | RecordType::AAAA, _) => Vec::new(),
        (_, t, _) => {
            return Err(Refusal(
                ResponseCode::Refused,
                format!("{t} at {name}: only A, AAAA, TXT and SRV may be updated"),
            ));
        }
    })
}
