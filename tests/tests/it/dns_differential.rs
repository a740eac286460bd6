//! tether against the reference servers: one zone built in tether through the admin API and written as a zone file
//! for NSD and Knot (from Debian's packages, started on loopback ports), the same generated queries to all three,
//! and every difference in rcode, flags, EDNS, answer and authority reported. The documented choices (README, "DNS
//! answers") are the only differences allowed, each checked for what tether does instead.

use std::{collections::BTreeSet, fmt::Write as _, net::SocketAddr, str::FromStr, time::Duration};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, rdata::opt::EdnsOption},
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use reqwest::Method;
use serde_json::{Value, json};
use tether_tests::{
    dns_client::{Transport, ask, exchange_tcp, exchange_udp},
    eventually,
    peers::{Kind, Peer},
    stack::{OPERATOR_TOKEN, Stack, expect},
};

const ORIGIN: &str = "diff.test";
/// SOA TTL 300 and MINIMUM 5: negative answers carry TTL 5.
const SOA: (u32, u32, u32, u32, u32, u32) = (300, 7200, 900, 1_209_600, 5, 3600);

/// A domain of the zone as a subscriber registers it.
struct Site {
    name: &'static str,
    ttl: u32,
    ips: &'static [&'static str],
    /// (service, transport, target name or address, port, priority, weight)
    services: &'static [(&'static str, &'static str, &'static str, u16, u16, u16)],
    /// (owner below the site, "" for the site itself; text), TTL 60
    txt: &'static [(&'static str, &'static str)],
}

const SITES: &[Site] = &[
    Site {
        name: "www",
        ttl: 30,
        ips: &["198.18.1.1", "198.18.1.2", "fd00::1:1"],
        services: &[],
        txt: &[("", "v=spf1 -all"), ("_acme-challenge", "token-1"), ("_acme-challenge", "token-2")],
    },
    Site { name: "v4", ttl: 5, ips: &["198.18.2.1"], services: &[], txt: &[] },
    Site { name: "a.b.deep", ttl: 60, ips: &["fd00::2:1"], services: &[], txt: &[] },
    // Registered as "CaSe": names are case-insensitive and stored in lower case.
    Site { name: "CaSe", ttl: 10, ips: &["198.18.4.1"], services: &[], txt: &[] },
    Site {
        name: "svc",
        ttl: 20,
        ips: &["198.18.3.1"],
        services: &[
            ("http", "tcp", "198.18.8.1", 8080, 10, 5),
            ("http", "tcp", "backup.example.net", 80, 20, 0),
            ("sip", "udp", "fd00::8:1", 5060, 0, 0),
        ],
        txt: &[],
    },
];

/// Names to ask for beyond the sites': the apex, glue, empty non-terminals, names that do not exist (also under an
/// empty non-terminal and under a leaf), and names outside the zone.
const OTHER_NAMES: &[&str] = &[
    "",
    "ns1",
    "deep",
    "b.deep",
    "_tcp.svc",
    "_udp.svc",
    "nope",
    "x.www",
    "c.b.deep",
    "z.a.b.deep",
    "x.ns1",
    "nope.svc",
    "_acme-challenge.www",
    "x._acme-challenge.www",
];
const OUTSIDE: &[&str] = &["other.test.", "test.", "example.net.", "diff.test.example."];
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
    RecordType::ANY,
];
/// Queries per (name, type): each with its own case, transport and EDNS.
const VARIANTS: usize = 3;

#[tokio::test]
async fn answers_match_nsd_and_knot() -> Result<()> {
    let stack = Stack::start().await?;
    build_in_tether(&stack).await?;
    let serial = serial_of(stack.dns.dns_addr).await?;
    let zone = zone_file(serial)?;
    let nsd = Peer::start(Kind::Nsd, ORIGIN, &zone).await?;
    let knot = Peer::start(Kind::Knot, ORIGIN, &zone).await?;

    let seed = std::env::var("DIFF_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut names: Vec<String> = SITES.iter().map(|s| fqdn(s.name)).collect();
    names.extend(OTHER_NAMES.iter().map(|n| fqdn(n)));
    names.extend(service_names()?);
    names.extend(OUTSIDE.iter().map(|n| (*n).to_owned()));

    let mut differences = Vec::new();
    let mut asked = 0;
    let mut seen = Coverage::default();
    for name in &names {
        for &rtype in TYPES {
            for _ in 0..VARIANTS {
                let ask = Ask::random(&mut rng, name, rtype);
                let ours = ask.send(stack.dns.dns_addr).await.context("asking tether")?;
                seen.note(&ask, &ours);
                let mut mismatches = Vec::new();
                for peer in [&nsd, &knot] {
                    let theirs = ask.send(peer.addr).await.with_context(|| format!("asking {}", peer.kind.name()))?;
                    if let Some(difference) = compare(&ask, &ours, &theirs) {
                        mismatches.push(format!("{}: {difference}", peer.kind.name()));
                    }
                }
                // Where NSD and Knot answer differently, tether must answer as one of them.
                if mismatches.len() == 2 {
                    differences.push(format!("{}:\n  {}", ask.describe(), mismatches.join("\n  ")));
                }
                asked += 1;
            }
        }
    }
    assert_eq!(serial_of(stack.dns.dns_addr).await?, serial, "the zone changed during the comparison");
    assert!(
        differences.is_empty(),
        "{} of {asked} queries differ (DIFF_SEED={seed}):\n{}",
        differences.len(),
        differences.join("\n")
    );
    seen.check()?;
    Ok(())
}

/// One generated query: the name in some case, a type, how it travels and what EDNS it carries.
struct Ask {
    name: String,
    rtype: RecordType,
    tcp: bool,
    edns: Option<EdnsAsk>,
    rd: bool,
    cd: bool,
}

#[derive(Clone, Copy)]
struct EdnsAsk {
    payload: u16,
    version: u8,
    dnssec_ok: bool,
    cookie: bool,
}

impl Ask {
    fn random(rng: &mut StdRng, name: &str, rtype: RecordType) -> Self {
        let name = match rng.random_range(0..3) {
            0 => name.to_owned(),
            1 => name.to_ascii_uppercase(),
            _ => name
                .chars()
                .map(|c| if rng.random_bool(0.5) { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() })
                .collect(),
        };
        let edns = [None, Some((1232, 0)), Some((512, 0)), Some((4096, 0)), Some((1232, 1))]
            .choose(rng)
            .copied()
            .flatten()
            .map(|(payload, version)| EdnsAsk {
                payload,
                version,
                dnssec_ok: rng.random_bool(0.5),
                cookie: rng.random_bool(0.3),
            });
        Self { name, rtype, tcp: rng.random_bool(0.25), edns, rd: rng.random_bool(0.5), cd: rng.random_bool(0.2) }
    }

    fn message(&self) -> Result<Message> {
        let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = self.rd;
        message.metadata.checking_disabled = self.cd;
        message.add_query(Query::query(Name::from_ascii(&self.name)?, self.rtype));
        if let Some(ask) = self.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(ask.payload);
            edns.set_version(ask.version);
            edns.set_dnssec_ok(ask.dnssec_ok);
            if ask.cookie {
                edns.options_mut().insert(EdnsOption::Unknown(10, vec![1, 2, 3, 4, 5, 6, 7, 8]));
            }
            message.set_edns(edns);
        }
        Ok(message)
    }

    async fn send(&self, server: SocketAddr) -> Result<Message> {
        let query = self.message()?;
        let bytes = query.to_vec()?;
        let reply = if self.tcp { exchange_tcp(server, &bytes).await? } else { exchange_udp(server, &bytes).await? };
        let response = Message::from_vec(&reply).context("parsing the response")?;
        if response.metadata.id != query.metadata.id {
            bail!("response id {} for query id {}", response.metadata.id, query.metadata.id);
        }
        Ok(response)
    }

    fn describe(&self) -> String {
        let edns = match self.edns {
            None => "no EDNS".to_owned(),
            Some(e) => format!(
                "EDNS{} {}{}{}",
                e.version,
                e.payload,
                if e.dnssec_ok { " DO" } else { "" },
                if e.cookie { " cookie" } else { "" }
            ),
        };
        let flags = format!("{}{}", if self.rd { " RD" } else { "" }, if self.cd { " CD" } else { "" });
        format!("{} {} over {}, {edns}{flags}", self.name, self.rtype, if self.tcp { "TCP" } else { "UDP" })
    }
}

/// A response as compared: what must match, in a canonical form. Answer owner names keep their case (they must
/// echo the question's); every other name is compared in lower case (names are case-insensitive, and NSD and Knot
/// compress names against the question, which gives them its case).
#[derive(Debug, PartialEq)]
struct Canonical {
    rcode: ResponseCode,
    flags: BTreeSet<&'static str>,
    /// Version, DO bit and option codes (a payload size is each server's own).
    edns: Option<(u8, bool, BTreeSet<u16>)>,
    answer: BTreeSet<String>,
    authority: BTreeSet<String>,
}

impl Canonical {
    fn of(message: &Message) -> Self {
        let m = &message.metadata;
        let flags = [
            (m.message_type == MessageType::Response, "qr"),
            (m.authoritative, "aa"),
            (m.truncation, "tc"),
            (m.recursion_desired, "rd"),
            (m.recursion_available, "ra"),
            (m.authentic_data, "ad"),
            (m.checking_disabled, "cd"),
        ];
        Self {
            rcode: m.response_code,
            flags: flags.into_iter().filter_map(|(on, flag)| on.then_some(flag)).collect(),
            edns: message.edns.as_ref().map(|edns| {
                let codes = edns.options().options.iter().map(|(code, _)| u16::from(*code)).collect();
                (edns.version(), edns.flags().dnssec_ok, codes)
            }),
            answer: message.answers.iter().map(|r| record_line(r, true)).collect(),
            authority: message.authorities.iter().map(|r| record_line(r, false)).collect(),
        }
    }
}

fn record_line(record: &Record, keep_owner_case: bool) -> String {
    let owner = if keep_owner_case { record.name.to_string() } else { record.name.to_string().to_ascii_lowercase() };
    let class = if record.dns_class == DNSClass::IN { "IN".to_owned() } else { format!("{:?}", record.dns_class) };
    let data = record.data.to_string().to_ascii_lowercase();
    format!("{owner} {} {class} {} {data}", record.ttl, record.record_type())
}

/// The difference between tether's response and a reference server's, apart from the documented choices:
/// - CD is copied from the query, as RFC 4035 section 3.1.6 asks (NSD 4.6 and Knot 3.2 clear it);
/// - ANY over TCP is answered with every RRset at the name, so theirs must be a part of ours; over UDP with one
///   RRset of it (RFC 8482; NSD and Knot each make their own pick), and the TCP variants check its data;
/// - no Extended DNS Error (RFC 8914) comes with REFUSED (NSD and Knot add "Not Authoritative").
fn compare(ask: &Ask, ours: &Message, theirs: &Message) -> Option<String> {
    const EXTENDED_ERROR: u16 = 15;
    let mut ours = Canonical::of(ours);
    let mut theirs = Canonical::of(theirs);
    if theirs.rcode == ResponseCode::Refused
        && let Some((_, _, codes)) = &mut theirs.edns
    {
        codes.remove(&EXTENDED_ERROR);
    }
    if ask.cd {
        if !ours.flags.remove("cd") {
            return Some("tether did not copy CD".to_owned());
        }
        theirs.flags.remove("cd");
    }
    if ask.rtype == RecordType::ANY && ours.rcode == ResponseCode::NoError && !theirs.answer.is_empty() {
        let rrsets: BTreeSet<(&str, &str)> = ours
            .answer
            .iter()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                Some((*fields.first()?, *fields.get(3)?))
            })
            .collect();
        if ask.tcp && !theirs.answer.is_subset(&ours.answer) {
            return Some(format!("ANY: theirs {:?} is not part of ours {:?}", theirs.answer, ours.answer));
        }
        if !ask.tcp && rrsets.len() != 1 {
            return Some(format!("ANY over UDP: tether gave {:?}, not one RRset", ours.answer));
        }
        theirs.answer.clone_from(&ours.answer);
    }
    if ours == theirs {
        return None;
    }
    let mut text = String::new();
    let _ = write!(text, "\n  tether: {ours:?}\n  theirs: {theirs:?}");
    Some(text)
}

/// What the generated queries covered, so that a narrower generator cannot pass unnoticed.
#[derive(Default)]
struct Coverage {
    rcodes: BTreeSet<u16>,
    negative_soa_ttls: BTreeSet<u32>,
    mixed_case_answers: usize,
    tcp: usize,
    dnssec_ok: usize,
    badvers: usize,
}

impl Coverage {
    fn note(&mut self, ask: &Ask, ours: &Message) {
        self.rcodes.insert(u16::from(ours.metadata.response_code));
        if ours.answers.is_empty() {
            self.negative_soa_ttls
                .extend(ours.authorities.iter().filter(|r| r.record_type() == RecordType::SOA).map(|r| r.ttl));
        }
        // Upper case in an answer's owner: the question's case went out on the wire and came back.
        if ours.answers.first().is_some_and(|r| r.name.to_string().bytes().any(|b| b.is_ascii_uppercase())) {
            self.mixed_case_answers += 1;
        }
        self.tcp += usize::from(ask.tcp);
        self.dnssec_ok += usize::from(ask.edns.is_some_and(|e| e.dnssec_ok));
        // BADVERS shares code 16 with BADSIG; hickory decodes it as the latter.
        self.badvers += usize::from(u16::from(ours.metadata.response_code) == 16);
    }

    fn check(&self) -> Result<()> {
        let want: BTreeSet<u16> =
            [ResponseCode::NoError, ResponseCode::NXDomain, ResponseCode::Refused].into_iter().map(u16::from).collect();
        anyhow::ensure!(want.is_subset(&self.rcodes), "rcodes seen: {:?}", self.rcodes);
        anyhow::ensure!(
            self.negative_soa_ttls == BTreeSet::from([SOA.4]),
            "negative TTLs {:?}",
            self.negative_soa_ttls
        );
        anyhow::ensure!(self.mixed_case_answers >= 20, "mixed-case answers: {}", self.mixed_case_answers);
        anyhow::ensure!(
            self.tcp > 50 && self.dnssec_ok > 50 && self.badvers > 10,
            "tcp {} DO {} BADVERS {}",
            self.tcp,
            self.dnssec_ok,
            self.badvers
        );
        Ok(())
    }
}

fn fqdn(name: &str) -> String {
    if name.is_empty() { format!("{ORIGIN}.") } else { format!("{name}.{ORIGIN}.") }
}

/// The SRV owners and generated targets of the sites' services.
fn service_names() -> Result<Vec<String>> {
    let mut names = BTreeSet::new();
    for site in SITES {
        for (service, transport, target, ..) in site.services {
            names.insert(fqdn(&format!("_{service}._{transport}.{}", site.name)));
            if let Ok(ip) = target.parse() {
                names.insert(dns::view::service_target(&Name::from_str(&fqdn(site.name))?, ip)?.to_string());
            }
        }
    }
    Ok(names.into_iter().collect())
}

/// The zone, subscriber and sites, through the admin API as an operator and a subscriber would.
async fn build_in_tether(stack: &Stack) -> Result<()> {
    let (soa_ttl, refresh, retry, expire, minimum, ns_ttl) = SOA;
    let zone = json!({
        "origin": ORIGIN,
        "nameservers": [{ "name": fqdn("ns1"), "ips": ["198.18.0.53"] }, "ns2.example.net"],
        "hostmaster": fqdn("hostmaster"),
        "soa_ttl": soa_ttl, "refresh": refresh, "retry": retry, "expire": expire, "minimum": minimum, "ns_ttl": ns_ttl,
    });
    let (status, body) = stack.api.call(Method::POST, "/v1/zones", Some(OPERATOR_TOKEN), Some(zone)).await?;
    expect(status, reqwest::StatusCode::CREATED, &body)?;
    let token = stack.subscriber("diff").await?;
    for site in SITES {
        let name = fqdn(site.name);
        stack.domain(&token, json!({ "name": name, "ttl": site.ttl })).await?;
        for ip in site.ips {
            stack.address(&token, &name.to_ascii_lowercase(), json!({ "ip": ip })).await?;
        }
        if !site.txt.is_empty() {
            let records: Vec<Value> = site
                .txt
                .iter()
                .map(|(below, text)| {
                    let owner = if below.is_empty() { name.clone() } else { format!("{below}.{name}") };
                    json!({ "name": owner, "value": text, "ttl": 60 })
                })
                .collect();
            let path = format!("/v1/domains/{}/txt", name.to_ascii_lowercase());
            let (status, body) = stack.api.call(Method::PUT, &path, Some(&token), Some(json!(records))).await?;
            expect(status, reqwest::StatusCode::OK, &body)?;
        }
        if !site.services.is_empty() {
            let tuples: Vec<Value> = site
                .services
                .iter()
                .map(|(service, transport, target, port, priority, weight)| {
                    let mut tuple = json!({
                        "service": service, "transport": transport, "port": port, "priority": priority, "weight": weight,
                    });
                    let key = if target.parse::<std::net::IpAddr>().is_ok() { "ip" } else { "target" };
                    tuple[key] = json!(target);
                    tuple
                })
                .collect();
            let path = format!("/v1/domains/{}/services", name.to_ascii_lowercase());
            let (status, body) = stack.api.call(Method::PUT, &path, Some(&token), Some(json!(tuples))).await?;
            expect(status, reqwest::StatusCode::OK, &body)?;
        }
    }
    // Everything is served once the last site's last address and its services are.
    let last = SITES.last().context("sites")?;
    let srv = fqdn(&format!("_sip._udp.{}", last.name));
    eventually(Duration::from_secs(10), "the zone to be served", || async {
        let a = ask(stack.dns.dns_addr, &fqdn(last.name), RecordType::A, Transport::Udp).await.ok()?;
        let s = ask(stack.dns.dns_addr, &srv, RecordType::SRV, Transport::Udp).await.ok()?;
        (!a.answers.is_empty() && !s.answers.is_empty()).then_some(())
    })
    .await
}

async fn serial_of(server: SocketAddr) -> Result<u32> {
    let response = ask(server, &fqdn(""), RecordType::SOA, Transport::Udp).await?;
    match response.answers.first().map(|r| &r.data) {
        Some(RData::SOA(soa)) => Ok(soa.serial),
        other => bail!("no SOA in the answer: {other:?}"),
    }
}

/// The zone file NSD and Knot load: the same zone, written by hand from the same sites.
fn zone_file(serial: u32) -> Result<String> {
    let (soa_ttl, refresh, retry, expire, minimum, ns_ttl) = SOA;
    let mut zone = format!("$ORIGIN {ORIGIN}.\n");
    writeln!(zone, "@ {soa_ttl} IN SOA ns1 hostmaster {serial} {refresh} {retry} {expire} {minimum}")?;
    writeln!(zone, "@ {ns_ttl} IN NS ns1\n@ {ns_ttl} IN NS ns2.example.net.\nns1 {ns_ttl} IN A 198.18.0.53")?;
    for site in SITES {
        for ip in site.ips {
            let rtype = if ip.contains(':') { "AAAA" } else { "A" };
            writeln!(zone, "{} {} IN {rtype} {ip}", site.name, site.ttl)?;
        }
        for (below, text) in site.txt {
            let owner = if below.is_empty() { site.name.to_owned() } else { format!("{below}.{}", site.name) };
            writeln!(zone, "{owner} 60 IN TXT \"{text}\"")?;
        }
        for (service, transport, target, port, priority, weight) in site.services {
            let target = match target.parse() {
                Ok(ip) => {
                    let name = dns::view::service_target(&Name::from_str(&fqdn(site.name))?, ip)?;
                    let rtype = if target.contains(':') { "AAAA" } else { "A" };
                    writeln!(zone, "{name} {} IN {rtype} {target}", site.ttl)?;
                    name.to_string()
                }
                Err(_) => format!("{target}."),
            };
            writeln!(
                zone,
                "_{service}._{transport}.{} {} IN SRV {priority} {weight} {port} {target}",
                site.name, site.ttl
            )?;
        }
    }
    Ok(zone)
}
