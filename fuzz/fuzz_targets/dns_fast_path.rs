//! dns's UDP fast path against hickory's catalog over the same view.
//!
//! For each query datagram: the fast path's answer (`server::answer_fast`: A, AAAA and SRV answers, NXDOMAIN and
//! NODATA from prebuilt bytes, as `dns::udp` and `dns::tcp` run it) and the catalog's (decoded and answered as `dns::udp` hands a query to `server::Handler`,
//! encoded by `udp::encode_response` as the UDP server sends it). Nothing may panic; no UDP answer may exceed 1,232
//! bytes (`udp::MAX_UDP_ANSWER`), nor a fast one 512; and what the fast path answers, the catalog answers alike:
//! byte for byte, or (when the two took different turns of a name's rotation) the same header, question, EDNS,
//! authority and additional sections, the same answer records in another order, and the same length. Queries of type
//! ANY are not compared (their UDP answer is about to become RFC 8482's minimal one).
//!
//! Input: a first byte with the low bit clear makes the rest the datagram itself; with it set, the rest describes a
//! query (a name of the view or near it, in any case, a type, flags, EDNS, then bytes patched and appended), so that
//! the fuzzer starts from queries the view has answers for.

#![no_main]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, LazyLock, Mutex},
};

use arbitrary::{Arbitrary, Unstructured};
use dns::{
    answer::{Address, Policy, State, WhenEmpty},
    server::{self, Handler},
    sync::Shared,
    udp::{self, MAX_UDP_ANSWER},
    view::{DomainRow, Nameserver, ServiceRow, TxtRow, View, ZoneRow},
    wire,
    xfr::TransferPolicy,
};
use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::{
        op::{Header, Message, MessageType, ResponseCode},
        rr::{Name, Record, RecordType},
        serialize::binary::{BinDecodable, BinDecoder},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder, Queries},
};
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz.test.";
const INNER: &str = "inner.fuzz.test.";
const CLIENT: &str = "192.0.2.1:53000";

/// Names to ask for: every owner of the view, empty non-terminals, names that do not exist (also under a leaf and
/// under an empty non-terminal), the inner zone and a name of the outer one it hides, and names outside both.
const NAMES: &[&str] = &[
    "fuzz.test.",
    "www.fuzz.test.",
    "v4.fuzz.test.",
    "a.b.deep.fuzz.test.",
    "case.fuzz.test.",
    "svc.fuzz.test.",
    "weighted.fuzz.test.",
    "m28.fuzz.test.",
    "m29.fuzz.test.",
    "big.fuzz.test.",
    "fallback.fuzz.test.",
    "lastknown.fuzz.test.",
    "pending.fuzz.test.",
    "zero.fuzz.test.",
    "ns1.fuzz.test.",
    "deep.fuzz.test.",
    "b.deep.fuzz.test.",
    "c.b.deep.fuzz.test.",
    "_tcp.svc.fuzz.test.",
    "_http._tcp.svc.fuzz.test.",
    "_sip._udp.svc.fuzz.test.",
    "ip-198-18-8-1.svc.fuzz.test.",
    "ip-fd00-0-0-0-0-0-8-1.svc.fuzz.test.",
    "_acme-challenge.www.fuzz.test.",
    "x.www.fuzz.test.",
    "nope.fuzz.test.",
    "inner.fuzz.test.",
    "ns1.inner.fuzz.test.",
    "x.inner.fuzz.test.",
    "y.inner.fuzz.test.",
    "other.test.",
    "test.",
    ".",
    "example.net.",
    "fuzz.test.example.",
];
const TYPES: &[RecordType] = &[
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::SOA,
    RecordType::NS,
    RecordType::TXT,
    RecordType::MX,
    RecordType::CAA,
    RecordType::PTR,
    RecordType::CNAME,
    RecordType::ANY,
    RecordType::AXFR,
    RecordType::IXFR,
    RecordType::OPT,
];

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"));
static HANDLER: LazyLock<Handler> = LazyLock::new(|| {
    let shared = Shared::new();
    shared.view.store(Arc::new(view()));
    Handler::new(Arc::new(shared))
});

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else { return };
    let packet = if how & 1 == 0 {
        rest.to_vec()
    } else {
        let Ok(built) = Built::arbitrary(&mut Unstructured::new(rest)) else { return };
        built.encode()
    };
    check(&packet);
});

/// One datagram through both paths.
fn check(packet: &[u8]) {
    let catalog = by_catalog(packet);
    if let Some(answer) = &catalog {
        assert!(answer.len() <= usize::from(MAX_UDP_ANSWER), "a UDP answer of {} bytes", answer.len());
    }
    let Some(fast) = by_fast_path(packet) else { return };
    assert!(fast.len() <= wire::MAX_PLAIN_UDP, "a fast answer of {} bytes", fast.len());
    let query = Message::from_vec(packet).expect("the fast path answers only queries hickory reads");
    if query.queries.first().is_some_and(|q| q.query_type() == RecordType::ANY) {
        return;
    }
    let catalog = catalog.expect("the catalog answers what the fast path answers");
    if fast == catalog {
        return;
    }
    let (ours, theirs) = (Canonical::of(&fast), Canonical::of(&catalog));
    assert_eq!(ours, theirs, "fast path and catalog differ");
    assert_eq!(fast.len(), catalog.len(), "fast path and catalog differ in length only");
}

/// What `dns::udp` answers without the catalog.
fn by_fast_path(packet: &[u8]) -> Option<Vec<u8>> {
    let view = HANDLER.shared().view.load_full();
    let mut out = Vec::new();
    server::answer_fast(HANDLER.shared(), &view, packet, &mut out).map(|_| out)
}

/// What `dns::udp` sends for a datagram it hands to the catalog: nothing for an unreadable header or a response,
/// FORMERR for an undecodable query, else the handler's answer.
fn by_catalog(packet: &[u8]) -> Option<Vec<u8>> {
    let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
    let mut capture = Capture::default();
    let client: SocketAddr = CLIENT.parse().expect("address");
    match Request::from_bytes(packet.to_vec(), client, Protocol::Udp) {
        Ok(request) => {
            if request.metadata.message_type == MessageType::Response {
                return None;
            }
            RUNTIME.block_on(HANDLER.handle_request::<_, TokioTime>(&request, capture.clone()));
        }
        Err(_) => {
            let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
            let response =
                MessageResponseBuilder::new(&queries, None).error_msg(&header.metadata, ResponseCode::FormErr);
            RUNTIME.block_on(capture.send_response(response)).ok()?;
        }
    }
    capture.0.lock().expect("capture").take()
}

/// Keeps what the catalog sends, encoded as the UDP server encodes it.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Option<Vec<u8>>>>);

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
        let (info, bytes) = udp::encode_response(response)?;
        *self.0.lock().expect("capture") = Some(bytes);
        Ok(info)
    }
}

/// A response as compared when the bytes differ: everything but the order of the answer records.
#[derive(Debug, PartialEq)]
struct Canonical {
    header: String,
    queries: Vec<String>,
    answers: BTreeSet<String>,
    authorities: Vec<String>,
    additionals: Vec<String>,
    edns: Option<String>,
}

impl Canonical {
    fn of(bytes: &[u8]) -> Self {
        let message = Message::from_vec(bytes).expect("a response hickory reads");
        let line = |r: &Record| format!("{} {} {} {} {}", r.name, r.ttl, r.dns_class, r.record_type(), r.data);
        Self {
            header: format!("{:?}", message.metadata),
            queries: message
                .queries
                .iter()
                .map(|q| format!("{} {} {}", q.name(), q.query_type(), q.query_class()))
                .collect(),
            answers: message.answers.iter().map(line).collect(),
            authorities: message.authorities.iter().map(line).collect(),
            additionals: message.additionals.iter().map(line).collect(),
            edns: message.edns.as_ref().map(|edns| format!("{edns:?}")),
        }
    }
}

/// A query near the ones the view answers.
#[derive(Arbitrary, Debug)]
struct Built {
    name: u8,
    /// Bit `i` upper-cases the name's `i`-th byte (when a letter).
    case: u64,
    /// Labels put in front of the name.
    prefix: Vec<u8>,
    qtype: QType,
    /// Not IN.
    class: Option<u16>,
    id: u16,
    rd: bool,
    cd: bool,
    /// Header flag bytes instead of a plain query's.
    flags: Option<[u8; 2]>,
    /// Header counts instead of the true ones.
    counts: Option<[u16; 4]>,
    edns: Option<Opt>,
    /// Bytes overwritten (at an offset modulo the length).
    patches: Vec<(u16, u8)>,
    /// Bytes appended.
    trailing: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum QType {
    Known(u8),
    Other(u16),
}

/// An OPT record: payload size, extended RCODE, version, flags (DO is the top bit), options.
#[derive(Arbitrary, Debug)]
struct Opt {
    payload: u16,
    rcode: u8,
    version: u8,
    dnssec_ok: bool,
    flags: u16,
    options: Vec<(u16, Vec<u8>)>,
}

impl Built {
    fn encode(&self) -> Vec<u8> {
        let mut name = Vec::new();
        for label in self.prefix.iter().take(4) {
            let label = match label % 4 {
                0 => b"x".as_slice(),
                1 => b"_tcp",
                2 => b"WWW",
                _ => b"ip-198-18-8-1",
            };
            name.push(u8::try_from(label.len()).unwrap_or(0));
            name.extend_from_slice(label);
        }
        let text = NAMES[usize::from(self.name) % NAMES.len()];
        if let Ok(parsed) = Name::from_ascii(text) {
            for label in parsed.iter() {
                name.push(u8::try_from(label.len()).unwrap_or(0));
                name.extend_from_slice(label);
            }
        }
        name.push(0);
        for (i, byte) in name.iter_mut().enumerate() {
            if self.case >> (i % 64) & 1 == 1 && byte.is_ascii_lowercase() {
                byte.make_ascii_uppercase();
            }
        }
        let qtype = match self.qtype {
            QType::Known(i) => u16::from(TYPES[usize::from(i) % TYPES.len()]),
            QType::Other(code) => code,
        };
        let flags = self.flags.unwrap_or([u8::from(self.rd), if self.cd { 0x10 } else { 0 }]);
        let counts = self.counts.unwrap_or([1, 0, 0, u16::from(self.edns.is_some())]);
        let mut packet = self.id.to_be_bytes().to_vec();
        packet.extend_from_slice(&flags);
        for count in counts {
            packet.extend_from_slice(&count.to_be_bytes());
        }
        packet.extend_from_slice(&name);
        packet.extend_from_slice(&qtype.to_be_bytes());
        packet.extend_from_slice(&self.class.unwrap_or(1).to_be_bytes());
        if let Some(opt) = &self.edns {
            let mut options = Vec::new();
            for (code, data) in opt.options.iter().take(4) {
                let data = &data[..data.len().min(64)];
                options.extend_from_slice(&code.to_be_bytes());
                options.extend_from_slice(&u16::try_from(data.len()).unwrap_or(0).to_be_bytes());
                options.extend_from_slice(data);
            }
            let flags = if opt.dnssec_ok { opt.flags | 0x8000 } else { opt.flags & 0x7fff };
            packet.extend_from_slice(&[0, 0, 41]);
            packet.extend_from_slice(&opt.payload.to_be_bytes());
            packet.extend_from_slice(&[opt.rcode, opt.version]);
            packet.extend_from_slice(&flags.to_be_bytes());
            packet.extend_from_slice(&u16::try_from(options.len()).unwrap_or(0).to_be_bytes());
            packet.extend_from_slice(&options);
        }
        for &(at, value) in self.patches.iter().take(4) {
            let len = packet.len();
            packet[usize::from(at) % len] = value;
        }
        packet.extend_from_slice(&self.trailing[..self.trailing.len().min(64)]);
        packet
    }
}

/// Two zones, one inside the other: addresses of both families, weights, priorities, load, dead and pending
/// addresses, a fallback and last-known answers, answers just within and just beyond a prebuilt message's 512 bytes
/// and beyond 1,232, TTL 0, service tuples (generated targets and a name), TXT at a name and below it, glue.
fn view() -> View {
    let zone = |id, origin: &str, nameservers: Vec<Nameserver>| ZoneRow {
        id,
        origin: name(origin),
        nameservers,
        hostmaster: name(&format!("hostmaster.{origin}")),
        serial: 7,
        refresh: 3600,
        retry: 600,
        expire: 604_800,
        minimum: 5,
        soa_ttl: 300,
        ns_ttl: 3600,
        transfer: TransferPolicy::default(),
    };
    let zones = vec![
        zone(
            1,
            ORIGIN,
            vec![
                Nameserver { name: format!("ns1.{ORIGIN}"), ips: vec![ip("198.18.0.53"), ip("198.18.0.54")] },
                Nameserver { name: "ns2.example.net.".into(), ips: Vec::new() },
            ],
        ),
        zone(2, INNER, vec![Nameserver { name: format!("ns1.{INNER}"), ips: vec![ip("fd00::53")] }]),
    ];
    let live = |text: &str| Address { ip: ip(text), priority: 0, weight: 1, load: 0.0, state: State::Live };
    let mut domains = vec![
        domain(1, 1, "www", 30, vec![live("198.18.1.1"), live("198.18.1.2"), live("fd00::1:1")]),
        domain(2, 1, "v4", 5, vec![live("198.18.2.1")]),
        domain(3, 1, "a.b.deep", 60, vec![live("fd00::2:1")]),
        domain(4, 1, "CaSe", 10, vec![live("198.18.4.1")]),
        domain(5, 1, "svc", 20, vec![live("198.18.3.1")]),
        domain(
            6,
            1,
            "weighted",
            30,
            vec![
                Address { weight: 3, load: 10.0, ..live("198.18.5.1") },
                Address { load: 12.0, ..live("198.18.5.2") },
                Address { load: 90.0, ..live("198.18.5.6") },
                Address { priority: 1, ..live("198.18.5.3") },
                Address { state: State::Dead, ..live("198.18.5.4") },
                Address { state: State::Pending, ..live("198.18.5.5") },
            ],
        ),
        domain(7, 1, "m28", 300, (1..=28).map(|i| live(&format!("198.18.6.{i}"))).collect()),
        domain(8, 1, "m29", 300, (1..=29).map(|i| live(&format!("198.18.6.{i}"))).collect()),
        domain(9, 1, "big", 300, (1..=80).map(|i| live(&format!("fd00::6:{i:x}"))).collect()),
        domain(10, 1, "fallback", 30, vec![Address { state: State::Dead, ..live("198.18.7.1") }]),
        domain(
            11,
            1,
            "lastknown",
            30,
            vec![
                Address { state: State::Dead, ..live("198.18.7.2") },
                Address { state: State::Dead, ..live("fd00::7:2") },
            ],
        ),
        domain(12, 1, "pending", 30, vec![Address { state: State::Pending, ..live("198.18.7.3") }]),
        domain(13, 1, "zero", 0, vec![live("198.18.9.1")]),
        domain(14, 1, "y.inner", 30, vec![live("198.18.10.2")]),
        domain(15, 2, "x.inner", 30, vec![live("198.18.10.1"), live("fd00::10:1")]),
    ];
    domains[0].txt = [("", "v=spf1 -all"), ("_acme-challenge.", "token-1"), ("_acme-challenge.", "token-2")]
        .into_iter()
        .map(|(below, value)| TxtRow { owner: name(&format!("{below}www.{ORIGIN}")), value: value.into(), ttl: 60 })
        .collect();
    let service = |service: &str, transport: &str, target: &str, port, priority, weight| ServiceRow {
        service: service.into(),
        transport: transport.into(),
        ip: target.parse().ok(),
        target: target.parse::<std::net::IpAddr>().is_err().then(|| name(target)),
        port,
        priority,
        weight,
    };
    domains[4].services = vec![
        service("http", "tcp", "198.18.8.1", 8080, 10, 5),
        service("http", "tcp", "backup.example.net.", 80, 20, 0),
        service("sip", "udp", "fd00::8:1", 5060, 0, 0),
    ];
    domains[9].policy.fallback = Some(ip("198.18.7.9"));
    domains[10].policy.when_empty = WhenEmpty::LastKnown;
    View::build(zones, domains)
}

fn domain(id: i64, zone_id: i64, label: &str, ttl: u32, addresses: Vec<Address>) -> DomainRow {
    DomainRow {
        id,
        zone_id,
        fqdn: name(&format!("{label}.{ORIGIN}")),
        ttl,
        policy: Policy { fallback: None, when_empty: WhenEmpty::NoData, load_threshold_pct: 50 },
        addresses,
        services: Vec::new(),
        txt: Vec::new(),
    }
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("name")
}

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().expect("address")
}
