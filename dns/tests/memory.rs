//! The memory a domain's answers take once compiled, measured with a counting allocator: every rotation of its
//! address set is built ahead (n rotations of n records), so the bound on addresses per domain
//! (`max_addresses_per_domain`, 64) is what bounds it. At 20,000 addresses the same would be 400 million records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dns::{
    answer::{Address, Policy, State, WhenEmpty},
    view::{DomainRow, Nameserver, View, ZoneRow},
};
use hickory_server::proto::rr::Name;

// dhat's heap accounting: the bytes live on the heap, read in the test.
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

fn rows(addresses: usize) -> (ZoneRow, DomainRow) {
    let name = |s: &str| Name::from_ascii(s).expect("name");
    let zone = ZoneRow {
        id: 1,
        origin: name("mem.test."),
        nameservers: vec![Nameserver { name: "ns1.mem.test.".into(), ips: vec!["198.18.0.53".parse().expect("ip")] }],
        hostmaster: name("hostmaster.mem.test."),
        serial: 1,
        refresh: 3600,
        retry: 600,
        expire: 86400,
        minimum: 1,
        soa_ttl: 60,
        ns_ttl: 3600,
        transfer: dns::xfr::TransferPolicy::default(),
    };
    // Half IPv4, half IPv6, all live: both families' rotations are built.
    let addresses = (0..addresses)
        .map(|i| {
            let n = u16::try_from(i).expect("small");
            let ip = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::new(198, 18, (n >> 8) as u8, n as u8))
            } else {
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n))
            };
            Address { ip, priority: 0, weight: 1, load: 0.0, state: State::Live }
        })
        .collect();
    let domain = DomainRow {
        id: 1,
        zone_id: 1,
        fqdn: name("www.mem.test."),
        ttl: 1,
        policy: Policy { fallback: None, when_empty: WhenEmpty::NoData, load_threshold_pct: 50 },
        addresses,
        services: Vec::new(),
        txt: Vec::new(),
    };
    (zone, domain)
}

/// Bytes the view holds for a domain of `n` addresses, beyond an empty domain's.
fn footprint(n: usize) -> usize {
    let (zone, domain) = rows(n);
    let before = dhat::HeapStats::get().curr_bytes;
    let view = View::build(vec![zone], vec![domain]);
    let held = dhat::HeapStats::get().curr_bytes.saturating_sub(before);
    drop(view);
    held
}

#[test]
fn a_domain_at_the_address_bound_compiles_within_two_mebibytes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let empty = footprint(0);
    let at_bound = footprint(64).saturating_sub(empty);
    let quarter = footprint(16).saturating_sub(empty);
    eprintln!("compiled domain: 16 addresses {quarter} B, 64 addresses {at_bound} B (empty view {empty} B)");
    assert!(at_bound < 2 << 20, "64 addresses take {at_bound} bytes");
    // n rotations of n records: quadratic, which is why the bound matters.
    assert!(at_bound > 8 * quarter, "64 addresses take {at_bound} B, 16 take {quarter} B: the growth is quadratic");
}
