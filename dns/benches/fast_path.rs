//! dns's work per query, without sockets, over a view of 10,000 names: the UDP fast path (parse the query, find the
//! prebuilt answer, patch it, as `udp.rs` does) and what else a query may cost (SRV, NXDOMAIN, NODATA, and an A query
//! over TCP), each through whatever path the server takes for it: the fast one when it answers, else the catalog
//! (decoding, `server::Handler`, encoding), as `udp.rs` and `tcp.rs` hand it over.
//!
//! `cargo bench -p dns --bench fast_path -- CASE QUERIES`: CASE is `lower`, `mixed` (A queries, lower- and mixed-case
//! names), `srv`, `nxdomain` (random names under the zone), `nodata` (AAAA of names with only A) or `tcp` (the
//! `lower` queries as DNS over TCP messages on an established connection, length prefix included), QUERIES how many
//! (default 2,000,000). It prints ns per query; `bench/fast-path` runs it under callgrind, whose instruction counts
//! do not move with the machine's load.

use std::{
    hint::black_box,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Instant,
};

use dns::{
    answer::{Address, Policy, State, WhenEmpty},
    server::Handler,
    sync::Shared,
    tcp,
    view::{DomainRow, Nameserver, ServiceRow, View, ZoneRow},
    xfr::TransferPolicy,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, Record, RecordType},
    serialize::binary::BinEncoder,
};
use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};

const NAMES: usize = 10_000;
/// Domains with an SRV record (`_http._tcp.<name>`, a generated target with its A record in the additional section).
const WITH_SRV: usize = 1_000;
const CASES: [&str; 6] = ["lower", "mixed", "srv", "nxdomain", "nodata", "tcp"];

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let case = args.next().unwrap_or_else(|| "lower".to_owned());
    let queries: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(2_000_000);
    assert!(CASES.contains(&case.as_str()), "CASE is one of {CASES:?}, not {case}");

    let shared = Shared::new();
    shared.view.store(Arc::new(view()));
    let handler = Arc::new(Handler::new(Arc::new(shared)));
    let packets = packets(&case);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let src: SocketAddr = "192.0.2.1:53000".parse().expect("address");

    let mut out = Vec::with_capacity(64 * 512);
    let mut fast = 0_usize;
    let start = Instant::now();
    for i in 0..queries {
        let packet = &packets[i % packets.len()];
        out.clear();
        let view = handler.shared().view.load();
        if case == "tcp" {
            if tcp::answer_fast(handler.shared(), &view, black_box(packet), &mut out) {
                fast += 1;
            } else {
                runtime.block_on(catalog(&handler, packet, src, Protocol::Tcp, &mut out));
            }
        } else if dns::server::answer_fast(handler.shared(), &view, black_box(packet), &mut out).is_some() {
            fast += 1;
        } else {
            runtime.block_on(catalog(&handler, packet, src, Protocol::Udp, &mut out));
        }
        assert!(!out.is_empty(), "{case}: every query is answered");
        black_box(&out);
    }
    let elapsed = start.elapsed();
    #[allow(clippy::print_stdout)]
    {
        let per_query = elapsed.as_nanos() as f64 / queries.max(1) as f64;
        println!("{case}: {queries} queries, {fast} from the fast path, {per_query:.1} ns per query");
    }
}

/// Ten thousand queries of `case`, as they arrive (over TCP without the length prefix, which the reader strips).
fn packets(case: &str) -> Vec<Vec<u8>> {
    let mut seed = 7_u32;
    let mut random = move || {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        seed >> 16
    };
    (0..NAMES)
        .map(|i| {
            let (name, rtype) = match case {
                "srv" => (format!("_http._tcp.d{:05}.bench.test.", i % WITH_SRV), RecordType::SRV),
                "nxdomain" => (format!("r{:08x}.bench.test.", random() << 16 | random()), RecordType::A),
                "nodata" => (format!("d{i:05}.bench.test."), RecordType::AAAA),
                "mixed" => {
                    let name = format!("d{i:05}.bench.test.");
                    let name = name
                        .chars()
                        .map(|c| if random() & 1 == 1 { c.to_ascii_uppercase() } else { c })
                        .collect::<String>();
                    (name, RecordType::A)
                }
                _ => (format!("d{i:05}.bench.test."), RecordType::A),
            };
            let mut message = Message::new(0x1234, MessageType::Query, OpCode::Query);
            message.metadata.recursion_desired = true;
            message.add_query(Query::query(Name::from_str(&name).expect("name"), rtype));
            message.to_vec().expect("query")
        })
        .collect()
}

/// The slow path: decode, the handler with the current view's catalog, encode (within 1,232 bytes over UDP, whole
/// over TCP, with its length prefix), as `udp.rs` and `tcp.rs` do.
async fn catalog(handler: &Handler, packet: &[u8], src: SocketAddr, protocol: Protocol, out: &mut Vec<u8>) {
    let request = Request::from_bytes(packet.to_vec(), src, protocol).expect("a query hickory reads");
    let capture = Capture { bytes: Arc::default(), protocol };
    handler.handle_request::<_, TokioTime>(&request, capture.clone()).await;
    let bytes = capture.bytes.lock().expect("capture");
    if protocol == Protocol::Tcp {
        out.extend_from_slice(&u16::try_from(bytes.len()).expect("length").to_be_bytes());
    }
    out.extend_from_slice(&bytes);
}

/// Keeps the encoded response.
#[derive(Clone)]
struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    protocol: Protocol,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let limit = match self.protocol {
            Protocol::Udp => response.edns().map_or(512, |edns| edns.max_payload()).min(dns::udp::MAX_UDP_ANSWER),
            _ => u16::MAX,
        };
        let mut bytes = self.bytes.lock().expect("capture");
        bytes.clear();
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        Ok(response.destructive_emit(&mut encoder)?)
    }
}

/// One zone of 10,000 names with one or two live addresses each, as `bench/dns-qps` serves; the first 1,000 also
/// have an SRV record whose target is generated from an address.
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
            let services = if i < WITH_SRV {
                vec![ServiceRow {
                    service: "http".into(),
                    transport: "tcp".into(),
                    ip: Some(addresses[0].ip),
                    target: None,
                    port: 8080,
                    priority: 10,
                    weight: 5,
                }]
            } else {
                Vec::new()
            };
            DomainRow {
                id: i64::try_from(i).expect("id") + 1,
                zone_id: 1,
                fqdn: Name::from_ascii(format!("d{i:05}.bench.test.")).expect("fqdn"),
                ttl: 300,
                policy: Policy { fallback: None, when_empty: WhenEmpty::NoData, load_threshold_pct: 50 },
                addresses,
                services,
                txt: Vec::new(),
            }
        })
        .collect();
    View::build(vec![zone], domains)
}
