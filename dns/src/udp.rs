//! DNS over UDP: one task owns the socket, answers plain queries from prebuilt messages in place (A, AAAA, SRV,
//! NXDOMAIN, NODATA: [`View::answer`]), and hands every other query to the catalog ([`crate::server::Handler`]) in a
//! task of its own.
//!
//! hickory's own UDP server spawns a task, decodes the whole message and sends through a channel for every query;
//! for the common query this loop does a hash lookup and a copy instead. What the catalog answers is unchanged: the
//! same decoding, FORMERR for undecodable queries, silence for responses and for unusable source addresses.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::{
        op::Message,
        rr::{Record, RecordType},
        serialize::binary::{BinDecodable, BinEncodable},
    },
    server::{RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use tether_service::mmsg;
use tokio::{io::Interest, net::UdpSocket, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    rrl::{Verdict, truncated},
    server::{self, Handler},
    wire,
};

/// Datagrams handled per wake-up before other tasks get a turn.
const BUDGET: usize = 64;
/// Largest query read; longer datagrams are cut, as hickory's server does.
const RECEIVE_BUFFER: usize = 4096;
/// Most queries the catalog works on at once. Past this a query is dropped (and counted), as a full socket buffer
/// would drop it: a flood of queries off the fast path (random names, say) cannot grow the set of tasks without end.
const MAX_SLOW: usize = 1024;
/// Socket buffers asked for (as NSD does): the default (~200 KiB) overflows when a burst of a few hundred queries
/// arrives while the server is not on a CPU, and every query lost costs the resolver a timeout.
const SOCKET_BUFFER: usize = 1 << 20;

/// Serves DNS on `socket` until `shutdown`; queries for the catalog still running then are finished first.
pub async fn serve(socket: UdpSocket, handler: Arc<Handler>, shutdown: CancellationToken) -> io::Result<()> {
    let sock = socket2::SockRef::from(&socket);
    if let Err(error) = sock.set_recv_buffer_size(SOCKET_BUFFER).and_then(|()| sock.set_send_buffer_size(SOCKET_BUFFER))
    {
        warn!(%error, "cannot enlarge the UDP socket buffers; bursts may be dropped");
    }
    let socket = Arc::new(socket);
    let mut slots = Box::new([[0u8; RECEIVE_BUFFER]; mmsg::BATCH]);
    let mut received = [(0_usize, None::<SocketAddr>); mmsg::BATCH];
    // Answers of one batch, back to back, and where each goes: read a batch, then send it, so the client is woken
    // once per batch rather than once per answer (a cross-CPU wake-up costs more than building the answer).
    let mut answers = Vec::with_capacity(BUDGET * wire::MAX_PLAIN_UDP);
    let mut sends: Vec<(SocketAddr, usize)> = Vec::with_capacity(BUDGET);
    let mut slow = JoinSet::new();
    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            ready = socket.readable() => if let Err(error) = ready { break Err(error) },
        }
        // One `recvmmsg` of up to a batch. A short batch emptied the queue: returned through the runtime as
        // `WouldBlock`, it also clears the readiness, which saves a turn and a call that would find nothing (the
        // readiness cleared is the one seen before the call, so a datagram arriving after it still wakes the task).
        let mut short = None;
        let count = socket.try_io(Interest::READABLE, || {
            let count = mmsg::receive(&*socket, &mut slots, &mut received)?;
            if count < mmsg::BATCH {
                short = Some(count);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(count)
        });
        let (count, drained) = match (count, short) {
            (_, Some(count)) => (count, true),
            (Ok(count), None) => (count, false),
            (Err(error), None) if error.kind() == io::ErrorKind::WouldBlock => (0, true),
            // ICMP errors from earlier sends and the like: nothing to do with the next datagram.
            (Err(error), None) => {
                debug!(%error, "UDP receive failed");
                (0, false)
            }
        };
        // One view for the batch: a change lands in the next one.
        let view = handler.shared().view.load_full();
        for (slot, &(len, src)) in slots.iter().zip(&received).take(count) {
            let Some(src) = src.filter(|src| usable_source(*src)) else {
                continue;
            };
            let packet = &slot[..len];
            let start = answers.len();
            if let Some(rcode) = server::answer_fast(handler.shared(), &view, packet, &mut answers) {
                let name = wire::parse(packet).map_or(&[][..], |q| q.qname);
                if limit(handler.shared(), src.ip(), name, rcode, &mut answers, start) {
                    sends.push((src, answers.len()));
                }
                continue;
            }
            if slow.len() >= MAX_SLOW {
                while slow.try_join_next().is_some() {}
            }
            if slow.len() >= MAX_SLOW {
                handler.shared().metrics.udp_shed.inc();
                debug!(%src, "catalog busy; query dropped");
                continue;
            }
            let responder = UdpResponder {
                socket: socket.clone(),
                dst: src,
                minimal_any: false,
                name: Vec::new(),
                handler: handler.clone(),
            };
            slow.spawn(handle_with_catalog(handler.clone(), packet.to_vec(), src, responder));
        }
        send_all(&socket, &answers, &sends).await;
        sends.clear();
        answers.clear();
        while slow.try_join_next().is_some() {}
        if !drained {
            tokio::task::yield_now().await;
        }
    };
    while slow.join_next().await.is_some() {}
    result
}

/// Response rate limiting of the answer in `out[start..]` to `source`: true to send it (as it is, or truncated in
/// place when it slips); false when it was dropped (and removed from `out`).
fn limit(
    shared: &crate::sync::Shared,
    source: IpAddr,
    name: &[u8],
    rcode: u16,
    out: &mut Vec<u8>,
    start: usize,
) -> bool {
    match shared.rrl.check(source, name, rcode) {
        Verdict::Send => true,
        Verdict::Slip => {
            let short = truncated(&out[start..]);
            out.truncate(start);
            shared.metrics.rrl.get_or_create(&crate::metrics::KindLabel { kind: "slipped" }).inc();
            short.is_some_and(|short| {
                out.extend_from_slice(&short);
                true
            })
        }
        Verdict::Drop => {
            out.truncate(start);
            shared.metrics.rrl.get_or_create(&crate::metrics::KindLabel { kind: "dropped" }).inc();
            false
        }
    }
}

/// Sends the answers of a batch (`answers`, cut at each end offset in `sends`), [`mmsg::BATCH`] per `sendmmsg`,
/// waiting for room when the socket's buffer is full. An answer the kernel refuses is skipped.
async fn send_all(socket: &UdpSocket, answers: &[u8], sends: &[(SocketAddr, usize)]) {
    let mut start = 0;
    let datagrams: Vec<(SocketAddr, &[u8])> = sends
        .iter()
        .map(|&(dst, end)| {
            let bytes = &answers[start..end];
            start = end;
            (dst, bytes)
        })
        .collect();
    let mut done = 0;
    while socket.try_io(Interest::WRITABLE, || mmsg::send_from(socket, &datagrams, &mut done)).is_err() {
        if let Err(error) = socket.writable().await {
            debug!(%error, "UDP socket not writable; answers dropped");
            return;
        }
    }
}

/// What hickory's server does with a datagram before its handler sees it, then the handler.
async fn handle_with_catalog(handler: Arc<Handler>, packet: Vec<u8>, src: SocketAddr, mut responder: UdpResponder) {
    let Some(request) = server::decode_request(&handler, packet, src, Protocol::Udp, &mut responder).await else {
        return;
    };
    // RFC 8482: ANY over UDP gets one RRset of the name, never all of them (no amplification); over TCP, all.
    let question = request.queries.queries().first();
    responder.minimal_any = question.is_some_and(|q| q.query_type() == RecordType::ANY);
    responder.name = question.map(|q| q.name().to_string().into_bytes()).unwrap_or_default();
    handler.handle_request::<_, TokioTime>(&request, responder).await;
}

/// Sends the catalog's response back from the server's socket.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
    /// Answer a query for ANY with its first RRset only.
    minimal_any: bool,
    /// The question's name, for rate limiting.
    name: Vec<u8>,
    /// Its rate limiter and metrics.
    handler: Arc<Handler>,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
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
        let (info, mut bytes) = encode_udp(response)?;
        if self.minimal_any {
            bytes = minimal_any(bytes);
        }
        let rcode = u16::from(info.response_code);
        if limit(self.handler.shared(), self.dst.ip(), &self.name, rcode, &mut bytes, 0) {
            self.socket.send_to(&bytes, self.dst).await?;
        }
        Ok(info)
    }
}

/// Keeps only the first RRset of an answer to ANY (RFC 8482 section 4.1; the choice is the catalog's first), with
/// what the additional section says; a message that cannot be read back is sent as it is.
fn minimal_any(bytes: Vec<u8>) -> Vec<u8> {
    let Ok(mut message) = Message::from_bytes(&bytes) else {
        return bytes;
    };
    let Some(first) = message.answers.first().map(|r| (r.record_type(), r.name.clone())) else {
        return bytes;
    };
    message.answers.retain(|r| (r.record_type(), &r.name) == (first.0, &first.1));
    message.to_bytes().unwrap_or(bytes)
}

/// Largest UDP answer whatever the requestor's EDNS size (DNS flag day 2020, as NSD and Knot): larger answers are
/// truncated and retried over TCP, never fragmented, and a forged source gets no large reflection.
pub const MAX_UDP_ANSWER: u16 = 1232;

/// Encodes a response within the requestor's UDP limit (its EDNS payload, or 512, and never more than
/// [`MAX_UDP_ANSWER`]), as hickory's server does; an encoding failure becomes a bare SERVFAIL.
fn encode_udp<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let limit = response.edns().map_or(512, |edns| edns.max_payload()).min(MAX_UDP_ANSWER);
    server::encode_within(response, limit)
}

/// Encodes a catalog response as DNS over UDP sends it (within the requestor's limit and [`MAX_UDP_ANSWER`]), for
/// the `dns_fast_path` fuzz target, which holds it against the fast path's answer and that limit.
#[cfg(feature = "fuzzing")]
pub fn encode_response<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    encode_udp(response)
}

/// hickory's rule: never answer port 0, an unspecified or a broadcast address.
pub(crate) fn usable_source(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
            IpAddr::V6(v6) => !v6.is_unspecified(),
        }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use hickory_server::{
        proto::{
            op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
            rr::{Name, RecordType},
        },
        server::Request,
    };

    use super::*;
    use crate::{
        answer::{Address, Policy, State, WhenEmpty},
        sync::Shared,
        view::{DomainRow, Nameserver, View, ZoneRow},
    };

    /// Records what the catalog sends, encoded as [`UdpResponder`] would.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

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
            let (info, bytes) = encode_udp(response)?;
            *self.0.lock().expect("capture lock") = bytes;
            Ok(info)
        }
    }

    pub(crate) fn handler() -> Handler {
        handler_with(crate::rrl::Settings::default())
    }

    fn handler_with(rrl: crate::rrl::Settings) -> Handler {
        let zone = ZoneRow {
            id: 1,
            origin: Name::from_ascii("example.test.").expect("origin"),
            nameservers: vec![Nameserver {
                name: "ns1.example.test.".into(),
                ips: vec!["192.0.2.53".parse().expect("ip")],
            }],
            hostmaster: Name::from_ascii("hostmaster.example.test.").expect("hostmaster"),
            serial: 7,
            refresh: 3600,
            retry: 600,
            expire: 604_800,
            minimum: 1,
            soa_ttl: 60,
            ns_ttl: 3600,
            transfer: crate::xfr::TransferPolicy::default(),
        };
        let address = |ip: &str, weight| Address {
            ip: ip.parse().expect("ip"),
            priority: 0,
            weight,
            load: 0.0,
            state: State::Live,
        };
        let domain = |id, fqdn: &str, addresses| DomainRow {
            id,
            zone_id: 1,
            fqdn: Name::from_ascii(fqdn).expect("fqdn"),
            ttl: 30,
            policy: Policy { fallback: None, when_empty: WhenEmpty::NoData, load_threshold_pct: 50 },
            addresses,
            services: Vec::new(),
            txt: Vec::new(),
        };
        let service = |service: &str, ip: Option<&str>, target: Option<&str>, port| crate::view::ServiceRow {
            service: service.into(),
            transport: "tcp".into(),
            ip: ip.map(|ip| ip.parse().expect("ip")),
            target: target.map(|t| Name::from_ascii(t).expect("target")),
            port,
            priority: 10,
            weight: 5,
        };
        let domains = vec![
            domain(1, "www.example.test.", vec![address("198.51.100.1", 1), address("198.51.100.2", 1)]),
            domain(2, "v6.example.test.", vec![address("2001:db8::1", 1), address("198.51.100.9", 1)]),
            domain(3, "weighted.example.test.", vec![address("198.51.100.3", 3), address("198.51.100.4", 1)]),
            domain(4, "MiXed.example.test.", vec![address("198.51.100.5", 1)]),
        ];
        let mut domains = domains;
        domains[0].services = vec![
            service("http", Some("198.51.100.7"), None, 8080),
            service("http", Some("2001:db8::7"), None, 8080),
            service("http", None, Some("backup.example.org."), 80),
            service("imap", None, Some("mail.example.org."), 143),
        ];
        domains[0].txt.push(crate::view::TxtRow {
            owner: Name::from_ascii("www.example.test.").expect("owner"),
            value: "v=spf1 -all".into(),
            ttl: 30,
        });
        let shared = Shared::new().with_rrl(rrl);
        shared.view.store(Arc::new(View::build(vec![zone], domains)));
        Handler::new(Arc::new(shared))
    }

    pub(crate) fn query(name: &str, rtype: RecordType, edns: Option<u16>, id: u16, rd: bool) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = rd;
        message.add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        if let Some(size) = edns {
            let mut opt = Edns::new();
            opt.set_max_payload(size);
            message.set_edns(opt);
        }
        message.to_vec().expect("encode query")
    }

    pub(crate) async fn by_catalog(handler: &Handler, packet: &[u8]) -> Vec<u8> {
        let capture = Capture::default();
        let request =
            Request::from_bytes(packet.to_vec(), ([127, 0, 0, 1], 5300).into(), Protocol::Udp).expect("decodable");
        handler.handle_request::<_, TokioTime>(&request, capture.clone()).await;
        let bytes = capture.0.lock().expect("capture lock").clone();
        assert!(!bytes.is_empty(), "the catalog answered");
        bytes
    }

    fn by_fast_path(handler: &Handler, packet: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        server::answer_fast(handler.shared(), &handler.shared().view.load_full(), packet, &mut out).map(|_| out)
    }

    #[tokio::test]
    async fn prebuilt_answers_are_the_catalogs_byte_for_byte() {
        let handler = handler();
        let cases = [
            ("www.example.test.", RecordType::A),
            ("v6.example.test.", RecordType::AAAA),
            ("v6.example.test.", RecordType::A),
            ("ns1.example.test.", RecordType::A),
        ];
        for (name, rtype) in cases {
            for edns in [None, Some(100), Some(512), Some(1232), Some(4096)] {
                for (id, rd) in [(0x1234, false), (0xfedc, true)] {
                    let packet = query(name, rtype, edns, id, rd);
                    // Same turn of the rotation for both: fast, fast, then the catalog on the first one's turn.
                    let first = by_fast_path(&handler, &packet).expect("served from the prebuilt answer");
                    let second = by_fast_path(&handler, &packet).expect("served from the prebuilt answer");
                    let catalog = by_catalog(&handler, &packet).await;
                    assert_eq!(first, catalog, "{name} {rtype} edns {edns:?} rd {rd}");
                    let catalog = by_catalog(&handler, &packet).await;
                    assert_eq!(second, catalog, "{name} {rtype} edns {edns:?} rd {rd}, second turn");
                }
            }
        }
    }

    #[tokio::test]
    async fn srv_and_negative_answers_are_the_catalogs_byte_for_byte() {
        let handler = handler();
        let lower = [
            ("_http._tcp.www.example.test.", RecordType::SRV, ResponseCode::NoError),
            ("_imap._tcp.www.example.test.", RecordType::SRV, ResponseCode::NoError),
            ("nope.example.test.", RecordType::A, ResponseCode::NXDomain),
            ("a.b.c.nope.example.test.", RecordType::SRV, ResponseCode::NXDomain),
            ("x.www.example.test.", RecordType::TXT, ResponseCode::NXDomain),
            ("hostmaster.example.test.", RecordType::AAAA, ResponseCode::NXDomain),
            ("www.example.test.", RecordType::AAAA, ResponseCode::NoError),
            ("www.example.test.", RecordType::SRV, ResponseCode::NoError),
            ("example.test.", RecordType::A, ResponseCode::NoError),
            ("example.test.", RecordType::TXT, ResponseCode::NoError),
            ("_tcp.www.example.test.", RecordType::A, ResponseCode::NoError),
            ("ip-198-51-100-7.www.example.test.", RecordType::AAAA, ResponseCode::NoError),
            ("_http._tcp.www.example.test.", RecordType::A, ResponseCode::NoError),
        ];
        // In mixed case: NXDOMAIN and NODATA from the fast path; SRV from it when its bytes allow, else the catalog.
        let mixed = [
            ("_HTTP._tcp.WWW.Example.test.", RecordType::SRV, ResponseCode::NoError),
            ("_imap._TCP.www.example.TEST.", RecordType::SRV, ResponseCode::NoError),
            ("NoPe.Example.TEST.", RecordType::AAAA, ResponseCode::NXDomain),
            ("WWW.EXAMPLE.TEST.", RecordType::SRV, ResponseCode::NoError),
        ];
        for (name, rtype, rcode) in lower.into_iter().chain(mixed) {
            for edns in [None, Some(512), Some(4096)] {
                for dnssec_ok in [false, true] {
                    if dnssec_ok && edns.is_none() {
                        continue;
                    }
                    let mut packet = query(name, rtype, edns, 0x5678, dnssec_ok);
                    if dnssec_ok {
                        let at = packet.len() - 4;
                        packet[at] |= 0x80;
                    }
                    let catalog = by_catalog(&handler, &packet).await;
                    let message = Message::from_vec(&catalog).expect("response decodes");
                    assert_eq!(message.metadata.response_code, rcode, "{name} {rtype}");
                    let fast = by_fast_path(&handler, &packet);
                    let must = lower.iter().any(|(n, _, _)| *n == name) || rtype != RecordType::SRV;
                    assert!(fast.is_some() || !must, "{name} {rtype} edns {edns:?}: from the fast path");
                    if let Some(fast) = fast {
                        assert_eq!(fast, catalog, "{name} {rtype} edns {edns:?} DO {dnssec_ok}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn checking_disabled_is_echoed_like_the_catalog() {
        let handler = handler();
        let mut packet = query("ns1.example.test.", RecordType::A, Some(1232), 7, true);
        packet[3] |= 0x10;
        let fast = by_fast_path(&handler, &packet).expect("served from the prebuilt answer");
        assert_eq!(fast, by_catalog(&handler, &packet).await);
    }

    #[tokio::test]
    async fn rotation_and_weights_go_on_across_both_paths() {
        let handler = handler();
        let packet = query("weighted.example.test.", RecordType::A, None, 1, false);
        let first_ip = |bytes: &[u8]| -> String {
            let message = Message::from_vec(bytes).expect("response decodes");
            message.answers[0].data.to_string()
        };
        let mut firsts = Vec::new();
        for turn in 0..8 {
            let bytes = if turn % 2 == 0 {
                by_fast_path(&handler, &packet).expect("prebuilt")
            } else {
                by_catalog(&handler, &packet).await
            };
            firsts.push(first_ip(&bytes));
        }
        let heavy = firsts.iter().filter(|ip| *ip == "198.51.100.3").count();
        assert_eq!(heavy, 6, "weights 3:1 over 8 turns: {firsts:?}");
        assert_eq!(firsts.len() - heavy, 2);
    }

    #[tokio::test]
    async fn any_case_and_the_do_bit_are_answered_like_the_catalog() {
        let handler = handler();
        let cases = [
            ("WWW.EXAMPLE.TEST.", RecordType::A),
            ("wWw.ExAmPlE.tEsT.", RecordType::A),
            ("V6.example.test.", RecordType::AAAA),
            ("mixed.example.test.", RecordType::A),
            ("MIXED.example.test.", RecordType::A),
        ];
        for (name, rtype) in cases {
            for dnssec_ok in [false, true] {
                let mut packet = query(name, rtype, Some(1232), 0x4321, true);
                if dnssec_ok {
                    let at = packet.len() - 4; // OPT flags: DO is the top bit of the first flags byte
                    packet[at] |= 0x80;
                }
                // Two turns each, so both paths answer from the same rotation (at most two here).
                let fast = by_fast_path(&handler, &packet).expect("served from the prebuilt answer");
                by_fast_path(&handler, &packet).expect("served from the prebuilt answer");
                let catalog = by_catalog(&handler, &packet).await;
                by_catalog(&handler, &packet).await;
                assert_eq!(fast, catalog, "{name} {rtype} DO {dnssec_ok}");
                let message = Message::from_vec(&fast).expect("response decodes");
                let asked = Name::from_ascii(name).expect("name");
                assert!(message.answers.iter().all(|r| r.name.eq_case(&asked)), "{name}: {:?}", message.answers);
                assert!(!message.answers.is_empty());
                let edns = message.edns.as_ref().expect("OPT");
                assert_eq!(edns.flags().dnssec_ok, dnssec_ok, "{name}: DO is copied");
            }
        }
    }

    #[tokio::test]
    async fn negative_answers_carry_the_negative_caching_ttl() {
        let handler = handler();
        let soa_ttls = |bytes: &[u8], section: fn(&Message) -> &Vec<Record>| -> Vec<u32> {
            let message = Message::from_vec(bytes).expect("response decodes");
            section(&message).iter().filter(|r| r.record_type() == RecordType::SOA).map(|r| r.ttl).collect()
        };
        // SOA TTL 60, MINIMUM 1: negative answers are cached for min(60, 1) seconds (RFC 2308 section 3).
        for (name, rtype, rcode) in [
            ("nope.example.test.", RecordType::A, ResponseCode::NXDomain),
            ("NoPe.Example.TEST.", RecordType::AAAA, ResponseCode::NXDomain),
            ("www.example.test.", RecordType::AAAA, ResponseCode::NoError),
            ("example.test.", RecordType::A, ResponseCode::NoError),
        ] {
            let bytes = by_catalog(&handler, &query(name, rtype, Some(1232), 5, false)).await;
            let message = Message::from_vec(&bytes).expect("response decodes");
            assert_eq!(message.metadata.response_code, rcode, "{name} {rtype}");
            assert!(message.answers.is_empty(), "{name} {rtype}");
            assert_eq!(soa_ttls(&bytes, |m| &m.authorities), [1], "{name} {rtype}");
        }
        let bytes = by_catalog(&handler, &query("example.test.", RecordType::SOA, None, 5, false)).await;
        assert_eq!(soa_ttls(&bytes, |m| &m.answers), [60], "the SOA asked for keeps its own TTL");
    }

    #[tokio::test]
    async fn the_catalog_echoes_the_question_case_in_answer_owners() {
        let handler = handler();
        for (name, rtype) in [
            ("ExAmPlE.TeSt.", RecordType::SOA),
            ("EXAMPLE.test.", RecordType::NS),
            ("Example.Test.", RecordType::ANY),
            ("WWW.example.test.", RecordType::ANY),
            ("Ns1.Example.Test.", RecordType::A),
            ("WwW.example.test.", RecordType::TXT),
        ] {
            let bytes = by_catalog(&handler, &query(name, rtype, None, 5, false)).await;
            let message = Message::from_vec(&bytes).expect("response decodes");
            let asked = Name::from_ascii(name).expect("name");
            assert!(!message.answers.is_empty(), "{name} {rtype}");
            assert!(message.answers.iter().all(|r| r.name.eq_case(&asked)), "{name} {rtype}: {:?}", message.answers);
        }
    }

    #[tokio::test]
    async fn everything_else_is_left_to_the_catalog() {
        let handler = handler();
        let mut version1 = query("www.example.test.", RecordType::A, Some(1232), 1, false);
        let at = version1.len() - 5; // OPT: extended RCODE, then version
        version1[at] = 1;
        let mut compressed = query("www.example.test.", RecordType::A, None, 1, false);
        compressed.truncate(12);
        compressed.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        let mut trailing = query("www.example.test.", RecordType::A, None, 1, false);
        trailing.push(0);
        let mut response = query("www.example.test.", RecordType::A, None, 1, false);
        response[2] |= 0x80;
        let left = [
            ("TXT", query("www.example.test.", RecordType::TXT, None, 1, false)),
            ("NXDOMAIN of type MX", query("nope.example.test.", RecordType::MX, None, 1, false)),
            ("NODATA of type MX", query("www.example.test.", RecordType::MX, None, 1, false)),
            ("SOA", query("example.test.", RecordType::SOA, None, 1, false)),
            ("not ours", query("www.example.org.", RecordType::A, None, 1, false)),
            ("EDNS version 1", version1),
            ("compressed", compressed),
            ("trailing byte", trailing),
            ("response", response),
            ("short", vec![0; 11]),
        ];
        for (what, packet) in left {
            assert!(by_fast_path(&handler, &packet).is_none(), "{what}");
        }
    }

    #[tokio::test]
    async fn serves_over_a_socket_until_shutdown() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(socket, Arc::new(handler()), shutdown.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        let mut buf = vec![0u8; 4096];
        for (name, rtype, rcode) in [
            ("www.example.test.", RecordType::A, ResponseCode::NoError),
            ("nope.example.test.", RecordType::A, ResponseCode::NXDomain),
            ("www.example.org.", RecordType::A, ResponseCode::Refused),
        ] {
            client.send_to(&query(name, rtype, Some(1232), 99, true), addr).await.expect("send");
            let (len, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("answered in time")
                .expect("recv");
            let message = Message::from_vec(&buf[..len]).expect("response decodes");
            assert_eq!(message.metadata.id, 99);
            assert_eq!(message.metadata.response_code, rcode, "{name}");
        }
        // A burst, answered as a batch: every query once, whatever the order.
        for id in 1..=40_u16 {
            client.send_to(&query("www.example.test.", RecordType::A, None, id, false), addr).await.expect("send");
        }
        let mut ids = Vec::new();
        for _ in 1..=40 {
            let (len, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf))
                .await
                .expect("answered in time")
                .expect("recv");
            let message = Message::from_vec(&buf[..len]).expect("response decodes");
            assert_eq!(message.answers.len(), 2);
            ids.push(message.metadata.id);
        }
        ids.sort_unstable();
        assert_eq!(ids, (1..=40).collect::<Vec<u16>>());
        // Garbage after a header: FORMERR, as hickory's server answers.
        client.send_to(&[0, 5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63], addr).await.expect("send");
        let (len, _) = tokio::time::timeout(std::time::Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .expect("answered in time")
            .expect("recv");
        let message = Message::from_vec(&buf[..len]).expect("response decodes");
        assert_eq!(message.metadata.response_code, ResponseCode::FormErr);
        shutdown.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("stops")
            .expect("joins")
            .expect("ok");
    }

    async fn exchange(client: &UdpSocket, addr: SocketAddr, packet: &[u8]) -> Option<Message> {
        let mut buf = vec![0u8; 4096];
        client.send_to(packet, addr).await.expect("send");
        let wait = tokio::time::timeout(std::time::Duration::from_millis(300), client.recv_from(&mut buf)).await;
        wait.ok().map(|received| Message::from_vec(&buf[..received.expect("recv").0]).expect("decodes"))
    }

    /// Sends every packet, then collects answers until none comes for 300 ms.
    async fn burst_exchange(client: &UdpSocket, addr: SocketAddr, packets: &[Vec<u8>]) -> Vec<Message> {
        for packet in packets {
            client.send_to(packet, addr).await.expect("send");
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Ok(received) =
            tokio::time::timeout(std::time::Duration::from_millis(300), client.recv_from(&mut buf)).await
        {
            got.push(Message::from_vec(&buf[..received.expect("recv").0]).expect("decodes"));
        }
        got
    }

    #[tokio::test]
    async fn any_over_udp_gets_one_rrset_and_answers_past_the_rate_slip_or_drop() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let rrl = crate::rrl::Settings { rate: 4, slip: 2, ..crate::rrl::Settings::default() };
        let handler = Arc::new(handler_with(rrl));
        let task = tokio::spawn(serve(socket, handler.clone(), shutdown.clone()));
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");

        // www has two A records and a TXT: ANY over UDP gets one of the two RRsets, whole.
        let any = exchange(&client, addr, &query("www.example.test.", RecordType::ANY, Some(1232), 1, false)).await;
        let any = any.expect("ANY answered");
        let types: std::collections::BTreeSet<RecordType> = any.answers.iter().map(Record::record_type).collect();
        assert_eq!(types.len(), 1, "{:?}", any.answers);
        let expected = if types.contains(&RecordType::A) { 2 } else { 1 };
        assert_eq!(any.answers.len(), expected, "{:?}", any.answers);
        assert_eq!(any.metadata.response_code, ResponseCode::NoError);

        // Four A answers a second for this name from this prefix (the fast path); past them every second answer
        // slips (truncated, no records) and the others are dropped. A burst falls in at most two seconds.
        let burst: Vec<Vec<u8>> =
            (10..20_u16).map(|id| query("weighted.example.test.", RecordType::A, None, id, false)).collect();
        let got = burst_exchange(&client, addr, &burst).await;
        let full = got.iter().filter(|m| !m.metadata.truncation && m.answers.len() == 2).count();
        let slipped = got.iter().filter(|m| m.metadata.truncation && m.answers.is_empty()).count();
        assert_eq!(full + slipped, got.len(), "nothing else");
        assert!((4..=8).contains(&full) && slipped >= 1 && got.len() < 10, "{full} full, {slipped} slipped of 10");
        // Catalog answers count too: NXDOMAIN for any name shares one budget.
        let burst: Vec<Vec<u8>> =
            (0..12_u16).map(|id| query(&format!("nope{id}.example.test."), RecordType::A, None, id, false)).collect();
        let got = burst_exchange(&client, addr, &burst).await;
        let full = got.iter().filter(|m| m.metadata.response_code == ResponseCode::NXDomain && !m.metadata.truncation);
        assert!(full.count() <= 8 && got.len() < 12, "{} of 12 answered", got.len());
        let dropped = handler.shared().metrics.rrl.get_or_create(&crate::metrics::KindLabel { kind: "dropped" }).get();
        let slipped = handler.shared().metrics.rrl.get_or_create(&crate::metrics::KindLabel { kind: "slipped" }).get();
        assert!(dropped >= 3 && slipped >= 1, "dropped {dropped}, slipped {slipped}");
        shutdown.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
}
