//! Entry points for the `api_input` fuzz target (feature `fuzzing`): the admin API's and dyndns's parsers and
//! validators on arbitrary input, each result held against what its callers rely on; a broken promise panics.

use std::net::{IpAddr, SocketAddr};

use axum::{
    Json,
    extract::Query,
    http::{HeaderMap, HeaderValue, Uri, header},
};
use hickory_server::proto::rr::Name;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use tether_config::TargetPolicy;

use super::{ApiError, dyndns, input};
use crate::{
    store::admin,
    xfr::{TransferPolicy, policy::key_name},
};

/// The JSON request bodies of the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `POST /v1/subscribers`.
    Subscriber,
    /// `POST /v1/zones`.
    Zone,
    /// `POST /v1/domains`.
    Domain,
    /// `POST /v1/domains/{name}/addresses`.
    Address,
    /// `PUT /v1/domains/{name}/services`.
    Services,
    /// `PUT /v1/domains/{name}/forwarding`.
    Forwarding,
    /// `PUT /v1/domains/{name}/txt`.
    Txt,
    /// `POST /v1/domains/{name}/migrations`.
    Migration,
    /// `PUT /v1/zones/{origin}/transfer`.
    Transfer,
}

impl Body {
    /// Every body.
    pub const ALL: [Self; 9] = [
        Self::Subscriber,
        Self::Zone,
        Self::Domain,
        Self::Address,
        Self::Services,
        Self::Forwarding,
        Self::Txt,
        Self::Migration,
        Self::Transfer,
    ];
}

/// Decodes `json` as the route's extractor does, then runs the checks its handler makes on the body before it
/// reaches the database.
pub fn body(body: Body, json: &[u8], targets: &TargetPolicy) {
    match body {
        Body::Subscriber => {
            decode::<input::NewSubscriber>(json);
        }
        Body::Zone => {
            let Some(zone) = decode::<input::NewZone>(json) else { return };
            name("origin", &zone.origin, false);
            for spec in zone.nameservers {
                let (server, ips) = match spec {
                    input::NameserverSpec::Name(server) => (server, Vec::new()),
                    input::NameserverSpec::WithGlue(ns) => (ns.name, ns.ips),
                };
                name("nameservers", &server, false);
                for ip in ips {
                    address(ip, targets);
                }
            }
            if let Some(hostmaster) = &zone.hostmaster {
                name("hostmaster", &hostmaster.replacen('@', ".", 1), false);
            }
            for value in [zone.refresh, zone.retry, zone.expire, zone.minimum, zone.soa_ttl, zone.ns_ttl] {
                bounded(value);
            }
        }
        Body::Domain => {
            let Some(domain) = decode::<input::NewDomain>(json) else { return };
            name("name", &domain.name, false);
            for ip in domain.static_ip.into_iter().chain(domain.fallback_ip) {
                address(ip, targets);
            }
            bounded(domain.ttl);
            bounded(domain.load_threshold_pct);
        }
        Body::Address => {
            let Some(new) = decode::<input::NewAddress>(json) else { return };
            address(new.ip, targets);
            if let Some(check) = &new.check
                && let Ok(ip) = input::target_ip("ip", new.ip, targets)
                && check.validate(ip).is_ok()
            {
                assert!(serde_json::to_value(check).is_ok(), "a valid check is stored as JSON: {check:?}");
            }
        }
        Body::Services => {
            let Some(specs) = decode::<Vec<input::ServiceSpec>>(json) else { return };
            for spec in specs.iter().take(input::MAX_SERVICES) {
                label(&spec.service);
                label(&spec.transport);
                if let Some(ip) = spec.ip {
                    address(ip, targets);
                }
                if let Some(target) = &spec.target {
                    name("target", target, false);
                }
            }
        }
        Body::Forwarding => {
            let Some(update) = decode::<input::Forwarding>(json) else { return };
            forwarding(update);
        }
        Body::Txt => {
            let Some(specs) = decode::<Vec<input::TxtSpec>>(json) else { return };
            for spec in specs.iter().take(input::MAX_TXT) {
                if let Some(owner) = &spec.name {
                    name("name", owner, true);
                }
                txt(&spec.value);
                bounded(spec.ttl);
            }
        }
        Body::Migration => {
            let Some(migration) = decode::<input::NewMigration>(json) else { return };
            for ip in [migration.from, migration.to].into_iter().chain(migration.temporary) {
                address(ip, targets);
            }
            for value in migration.hold.into_iter().chain(migration.quiet) {
                bounded(value);
            }
        }
        Body::Transfer => {
            let Some(policy) = decode::<TransferPolicy>(json) else { return };
            if policy.validate(&|_| false).is_ok() {
                for key in &policy.keys {
                    assert!(key.signer().is_ok(), "a key of a valid policy signs: {key:?}");
                }
            }
        }
    }
}

/// Runs the name, label, TXT, key-name and address validators on `text`.
pub fn text(text: &str, targets: &TargetPolicy) {
    name("name", text, false);
    name("name", text, true);
    label(text);
    txt(text);
    if let Ok(key) = key_name(text) {
        assert!(key.is_fqdn() && key.eq_case(&key.to_lowercase()), "{text:?} became the key name {key}");
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        address(ip, targets);
    }
}

/// A dyndns update (`GET /nic/update?{query}`) from `peer` with these `Authorization` and `X-Forwarded-For` headers:
/// the client's address, its credentials, the hostnames and the addresses to set, as the handler reads them.
pub fn dyndns(
    query: &str,
    authorization: &[u8],
    forwarded_for: &[u8],
    peer: SocketAddr,
    trusted: &[IpNet],
    targets: &TargetPolicy,
) {
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(authorization) {
        headers.insert(header::AUTHORIZATION, value);
    }
    if let Ok(value) = HeaderValue::from_bytes(forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    let source = dyndns::client_address(peer, &headers, trusted);
    let peer_ip = peer.ip().to_canonical();
    assert!(source == peer_ip || trusted.iter().any(|net| net.contains(&peer_ip)), "{source} from an untrusted peer");
    if let Some((user, password)) = dyndns::basic_auth(&headers) {
        assert!(user.len() <= 128 && password.len() <= 256 && !user.contains(':'), "credentials {user:?}");
    }
    let Ok(uri) = format!("/nic/update?{query}").parse::<Uri>() else { return };
    let Ok(Query(update)) = Query::<dyndns::UpdateQuery>::try_from_uri(&uri) else { return };
    let hostnames = update.hostname.as_deref().unwrap_or("").split(',').map(str::trim).filter(|h| !h.is_empty());
    for hostname in hostnames.take(dyndns::MAX_HOSTNAMES) {
        name("hostname", hostname, false);
    }
    if let Some(ips) = dyndns::addresses(update.myip.as_deref(), source, targets) {
        let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
        assert!(!ips.is_empty() && v4 <= 1 && ips.len() - v4 <= 1, "one address per family: {ips:?}");
        for ip in &ips {
            assert_eq!(*ip, ip.to_canonical(), "{ip} is stored as the address it stands for");
            assert!(input::target_ip("myip", *ip, targets).is_ok(), "{ip} breaks the target policy");
        }
    }
}

fn decode<T: DeserializeOwned>(json: &[u8]) -> Option<T> {
    match Json::<T>::from_bytes(json) {
        Ok(Json(value)) => Some(value),
        Err(rejection) => {
            // What the client is told.
            let _ = ApiError::from(rejection);
            None
        }
    }
}

/// A name normalised for storage: fully qualified, lower case, normalised again unchanged, and read by hickory
/// (as the view reads every stored name) as itself.
fn name(field: &str, text: &str, underscore: bool) {
    let normalise =
        |text: &str| if underscore { input::record_owner(field, text) } else { input::hostname(field, text) };
    let Ok(stored) = normalise(text) else { return };
    assert!(stored.ends_with('.') && stored.len() <= 254, "{text:?} became {stored:?}");
    assert_eq!(stored, stored.to_ascii_lowercase(), "{text:?}");
    assert_eq!(normalise(&stored).ok().as_deref(), Some(stored.as_str()), "{text:?} normalised twice");
    let parsed = Name::from_ascii(&stored).unwrap_or_else(|e| panic!("{stored:?} is no DNS name: {e}"));
    assert!(parsed.is_fqdn() && parsed.to_ascii() == stored, "{stored:?} read as {parsed}");
}

/// A service or transport label, which the view makes the first labels of an SRV owner.
fn label(text: &str) {
    let Ok(label) = input::service_label("service", text) else { return };
    assert!((1..=62).contains(&label.len()), "{text:?} became {label:?}");
    assert_eq!(input::service_label("service", &label).ok().as_deref(), Some(label.as_str()));
    let owner = format!("_{label}._tcp.www.example.com.");
    assert!(Name::from_ascii(&owner).is_ok(), "{owner:?} is no DNS name");
}

fn txt(text: &str) {
    let Ok(value) = input::txt_value("value", text) else { return };
    assert!((1..=input::MAX_TXT_VALUE).contains(&value.len()), "{} characters", value.len());
    assert!(value.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "{value:?}");
}

/// An address through the checks of static, fallback and target addresses.
fn address(ip: IpAddr, targets: &TargetPolicy) {
    if let Ok(usable) = input::usable_ip("ip", ip) {
        assert!(!usable.is_unspecified() && !usable.is_multicast(), "{usable}");
    }
    if let Ok(target) = input::target_ip("ip", ip, targets) {
        assert_eq!(target, ip.to_canonical());
        assert!(targets.check(target).is_ok() && input::usable_ip("ip", target).is_ok(), "{target}");
    }
}

fn bounded(value: u32) {
    for (min, max) in [(0, 86_400), (1, 10_000), (1, 2_147_483_647)] {
        let result = input::bounded("value", value, min, max);
        assert_eq!(result.is_ok(), (min..=max).contains(&value));
        if let Ok(stored) = result {
            assert_eq!(i64::from(stored), i64::from(value));
        }
    }
}

/// An update of the forwarding settings, over settings as a new domain has them.
fn forwarding(update: input::Forwarding) {
    let current = admin::Forwarding {
        ports: Vec::new(),
        policy: "round_robin".into(),
        proxy_protocol: "off".into(),
        max_flows: 100,
        max_flows_per_client: 10,
    };
    let Ok(next) = input::forwarding(current, update) else { return };
    assert!(next.ports.len() <= input::MAX_FORWARD_PORTS, "{} ports", next.ports.len());
    assert!(next.ports.windows(2).all(|pair| pair[0] < pair[1]), "ports sorted, once each: {:?}", next.ports);
    assert!(next.ports.iter().all(|port| (1..=65_535).contains(port)), "{:?}", next.ports);
    let max = i32::try_from(input::MAX_FLOWS).unwrap_or(i32::MAX);
    assert!((1..=max).contains(&next.max_flows) && (1..=next.max_flows).contains(&next.max_flows_per_client));
}
