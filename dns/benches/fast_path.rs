//! The UDP fast path's work per query, without sockets: parse the query, find the prebuilt answer, patch it
//! (`wire::parse`, `View::prebuilt_answer`, `wire::respond`, as `udp.rs` does), over a view of 10,000 names.
//!
//! `cargo bench -p dns --bench fast_path -- CASE QUERIES`: CASE is `lower` or `mixed`, QUERIES how many (default
//! 2,000,000). It prints ns per query; `bench/fast-path` runs it under callgrind, whose instruction counts do not
//! move with the machine's load.

use std::{hint::black_box, str::FromStr, time::Instant};

use dns::{
    answer::{Address, Policy, State, WhenEmpty},
    view::{DomainRow, Nameserver, View, ZoneRow},
    wire,
    xfr::TransferPolicy,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};

const NAMES: usize = 10_000;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let case = args.next().unwrap_or_else(|| "lower".to_owned());
    let queries: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(2_000_000);
    assert!(case == "lower" || case == "mixed", "CASE is lower or mixed, not {case}");

    let view = view();
    let mut seed = 7_u32;
    let packets: Vec<Vec<u8>> = (0..NAMES)
        .map(|i| {
            let mut name = format!("d{i:05}.bench.test.");
            if case == "mixed" {
                name = name
                    .chars()
                    .map(|c| {
                        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                        if seed >> 16 & 1 == 1 { c.to_ascii_uppercase() } else { c }
                    })
                    .collect();
            }
            let mut message = Message::new(0x1234, MessageType::Query, OpCode::Query);
            message.metadata.recursion_desired = true;
            message.add_query(Query::query(Name::from_str(&name).expect("name"), RecordType::A));
            message.to_vec().expect("query")
        })
        .collect();

    let mut out = Vec::with_capacity(64 * 512);
    let start = Instant::now();
    let mut answered = 0_usize;
    for i in 0..queries {
        let packet = &packets[i % NAMES];
        out.clear();
        if let Some(query) = wire::parse(black_box(packet))
            && let Some(prebuilt) = view.prebuilt_answer(query.qname, query.qtype)
            && wire::respond(&query, prebuilt, &mut out)
        {
            answered += 1;
        }
        black_box(&out);
    }
    let elapsed = start.elapsed();
    assert_eq!(answered, queries, "every query is answered from the fast path");
    #[allow(clippy::print_stdout)]
    {
        let per_query = elapsed.as_nanos() as f64 / queries.max(1) as f64;
        println!("{case}: {queries} queries, {per_query:.1} ns per query");
    }
}

/// One zone of 10,000 names with one or two live addresses each, as `bench/dns-qps` serves.
fn view() -> View {
    let zone = ZoneRow {
        id: 1,
        origin: Name::from_ascii("bench.test.").expect("origin"),
        nameservers: vec![Nameserver { name: "ns1.bench.test.".into(), ips: vec!["127.0.0.1".parse().expect("ip")] }],
        hostmaster: Name::from_ascii("hostmaster.bench.test.").expect("hostmaster"),
        serial: 1,
        refresh: 3600,
        retry: 600,
        expire: 604_800,
        minimum: 1,
        soa_ttl: 60,
        ns_ttl: 3600,
        transfer: TransferPolicy::default(),
    };
    let address =
        |ip: String| Address { ip: ip.parse().expect("ip"), priority: 0, weight: 1, load: 0.0, state: State::Live };
    let domains = (0..NAMES)
        .map(|i| {
            let mut addresses = vec![address(format!("198.18.{}.{}", i / 256 % 256, i % 256))];
            if i % 2 == 1 {
                addresses.push(address(format!("198.19.{}.{}", i / 256 % 256, i % 256)));
            }
            DomainRow {
                id: i64::try_from(i).expect("id") + 1,
                zone_id: 1,
                fqdn: Name::from_ascii(format!("d{i:05}.bench.test.")).expect("fqdn"),
                ttl: 300,
                policy: Policy { fallback: None, when_empty: WhenEmpty::NoData, load_threshold_pct: 50 },
                addresses,
                services: Vec::new(),
                txt: Vec::new(),
            }
        })
        .collect();
    View::build(vec![zone], domains)
}
