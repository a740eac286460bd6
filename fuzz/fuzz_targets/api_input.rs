//! The admin API's input, through its parsers and validators (`dns::api::fuzzing`, built with dns's `fuzzing`
//! feature): request bodies as JSON (zones, domains, addresses and their checks, service tuples, forwarding, TXT,
//! migrations, transfer policies), names, labels, TXT values, key names and addresses as text, dyndns updates (the
//! query string, `Authorization`, `X-Forwarded-For`), and `tether_config::TargetPolicy` with arbitrary ranges.
//! Nothing may panic, and what is accepted keeps the validators' promises (see `dns/src/api/fuzzing.rs`).
//!
//! Input: the first byte picks what the rest is (0-8: a body of `Body::ALL`, 9: text, 10: a dyndns update whose
//! parts are separated by NUL bytes, 11: a target policy and an address), so that seeds can be written by hand.

#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use dns::api::fuzzing::{self, Body};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use tether_config::TargetPolicy;

/// As the tests and the demo run: 198.18.0.0/15 and fd00::/8 opened, one operator address.
static TARGETS: LazyLock<TargetPolicy> = LazyLock::new(|| TargetPolicy {
    allowed: vec![net("198.18.0.0/15"), net("fd00::/8")],
    operator: vec![net("198.18.0.53/32")],
});
/// The proxies whose `X-Forwarded-For` counts.
static TRUSTED: LazyLock<Vec<IpNet>> = LazyLock::new(|| vec![net("127.0.0.0/8"), net("::1/128")]);
const PEERS: [&str; 4] = ["127.0.0.1:4000", "198.18.0.1:5000", "[::ffff:127.0.0.1]:4000", "[2001:db8::1]:1"];

fuzz_target!(|data: &[u8]| {
    let Some((&what, rest)) = data.split_first() else { return };
    match what % 12 {
        body @ 0..=8 => fuzzing::body(Body::ALL[usize::from(body)], rest, &TARGETS),
        9 => fuzzing::text(&String::from_utf8_lossy(rest), &TARGETS),
        10 => {
            let mut parts = rest.splitn(4, |b| *b == 0);
            let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
            let authorization = parts.next().unwrap_or_default();
            let forwarded_for = parts.next().unwrap_or_default();
            let peer = parts.next().and_then(|p| p.first()).map_or(0, |p| usize::from(*p) % PEERS.len());
            let peer: SocketAddr = PEERS[peer].parse().expect("peer");
            fuzzing::dyndns(&query, authorization, forwarded_for, peer, &TRUSTED, &TARGETS);
        }
        _ => {
            let mut u = Unstructured::new(rest);
            let Ok((allowed, operator, ip)) = <(Vec<(IpAddr, u8)>, Vec<(IpAddr, u8)>, IpAddr)>::arbitrary(&mut u)
            else {
                return;
            };
            target_policy(&allowed, &operator, ip);
        }
    }
});

/// The operator's own addresses are never a target; an opened range is, unless it is the operator's; IPv4-mapped
/// addresses count as IPv4.
fn target_policy(allowed: &[(IpAddr, u8)], operator: &[(IpAddr, u8)], ip: IpAddr) {
    let nets = |list: &[(IpAddr, u8)]| list.iter().filter_map(|&(ip, len)| IpNet::new(ip, len).ok()).collect();
    let policy = TargetPolicy { allowed: nets(allowed), operator: nets(operator) };
    let verdict = policy.check(ip);
    let canonical = ip.to_canonical();
    assert_eq!(verdict, policy.check(canonical), "{ip} and {canonical}");
    if policy.operator.iter().any(|net| net.contains(&canonical)) {
        assert!(verdict.is_err(), "{ip} is the operator's");
    } else if policy.allowed.iter().any(|net| net.contains(&canonical)) {
        assert!(verdict.is_ok(), "{ip} is in an opened range: {verdict:?}");
    }
}

fn net(text: &str) -> IpNet {
    text.parse().expect("range")
}
