//! Every answer rule, asked with a real DNS client over UDP and TCP.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use hickory_proto::{
    op::ResponseCode,
    rr::{RData, RecordType},
};
use reqwest::Method;
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, addresses_in, ask, exchange_udp, sorted},
    eventually,
    stack::Stack,
};

const WAIT: Duration = Duration::from_secs(10);

/// Waits until `name` answers exactly `expected` (as a set) for `rtype`.
async fn answers_become(stack: &Stack, name: &str, rtype: RecordType, expected: &[&str]) -> Result<()> {
    let want: Vec<String> = sorted(expected.iter().map(|s| (*s).to_owned()).collect());
    eventually(WAIT, &format!("{name} {rtype} to answer {want:?}"), || async {
        let response = ask(stack.dns.dns_addr, name, rtype, Transport::Udp).await.ok()?;
        (sorted(addresses(&response)) == want).then_some(())
    })
    .await
}

#[tokio::test]
async fn two_static_addresses_rotate_with_ttl_one() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "www.tether.test" })).await?;
    stack.address(&token, "www.tether.test", json!({ "ip": "198.18.1.1" })).await?;
    stack.address(&token, "www.tether.test", json!({ "ip": "198.18.1.2" })).await?;
    answers_become(&stack, "www.tether.test.", RecordType::A, &["198.18.1.1", "198.18.1.2"]).await?;

    let mut firsts = BTreeMap::new();
    for transport in [Transport::Udp, Transport::Tcp, Transport::Udp, Transport::Tcp] {
        let response = ask(stack.dns.dns_addr, "www.tether.test.", RecordType::A, transport).await?;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative, "AA must be set");
        assert!(!response.metadata.recursion_available, "no recursion offered");
        assert_eq!(response.answers.len(), 2);
        assert!(response.answers.iter().all(|r| r.ttl == 1), "TTL 1: {:?}", response.answers);
        *firsts.entry(addresses(&response)[0].clone()).or_insert(0) += 1;
    }
    assert_eq!(firsts.len(), 2, "both addresses take first place in turn: {firsts:?}");
    assert!(firsts.values().all(|&n| n == 2), "equal weights share first place equally: {firsts:?}");
    Ok(())
}

#[tokio::test]
async fn families_are_answered_separately() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "dual.tether.test", "ttl": 5 })).await?;
    stack.address(&token, "dual.tether.test", json!({ "ip": "198.18.2.1" })).await?;
    stack.address(&token, "dual.tether.test", json!({ "ip": "fd00::2:1" })).await?;
    answers_become(&stack, "dual.tether.test.", RecordType::AAAA, &["fd00::2:1"]).await?;
    let a = ask(stack.dns.dns_addr, "dual.tether.test.", RecordType::A, Transport::Tcp).await?;
    assert_eq!(addresses(&a), ["198.18.2.1"]);
    assert_eq!(a.answers[0].ttl, 5, "the domain's TTL");
    Ok(())
}

#[tokio::test]
async fn backups_answer_only_while_no_primary_is_live() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "pb.tether.test" })).await?;
    stack.address(&token, "pb.tether.test", json!({ "ip": "198.18.3.1", "priority": 0 })).await?;
    stack.address(&token, "pb.tether.test", json!({ "ip": "198.18.3.2", "priority": 0 })).await?;
    stack.address(&token, "pb.tether.test", json!({ "ip": "198.18.3.9", "priority": 10 })).await?;
    answers_become(&stack, "pb.tether.test.", RecordType::A, &["198.18.3.1", "198.18.3.2"]).await?;

    let db = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.3.1'").execute(&db).await?;
    answers_become(&stack, "pb.tether.test.", RecordType::A, &["198.18.3.2"]).await?;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.3.2'").execute(&db).await?;
    answers_become(&stack, "pb.tether.test.", RecordType::A, &["198.18.3.9"]).await?;
    sqlx::query("UPDATE addresses SET state = 'live' WHERE ip = '198.18.3.1'").execute(&db).await?;
    answers_become(&stack, "pb.tether.test.", RecordType::A, &["198.18.3.1"]).await?;
    Ok(())
}

#[tokio::test]
async fn pending_addresses_are_never_answered() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "p.tether.test" })).await?;
    stack.address(&token, "p.tether.test", json!({ "ip": "198.18.4.1" })).await?;
    answers_become(&stack, "p.tether.test.", RecordType::A, &["198.18.4.1"]).await?;
    let db = stack.pg.pool().await?;
    sqlx::query(
        "INSERT INTO addresses (domain_id, ip, source, state) \
         SELECT id, '198.18.4.2', 'ncu', 'pending' FROM domains WHERE fqdn = 'p.tether.test.'",
    )
    .execute(&db)
    .await?;
    // Wait for the serial bump to be served, then check the pending address is absent.
    let serial: i64 = sqlx::query_scalar("SELECT serial FROM zones").fetch_one(&db).await?;
    eventually(WAIT, "the new serial", || async {
        let r = ask(stack.dns.dns_addr, "tether.test.", RecordType::SOA, Transport::Udp).await.ok()?;
        match &r.answers.first()?.data {
            RData::SOA(soa) => (i64::from(soa.serial) == serial).then_some(()),
            _ => None,
        }
    })
    .await?;
    let r = ask(stack.dns.dns_addr, "p.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(addresses(&r), ["198.18.4.1"]);
    Ok(())
}

#[tokio::test]
async fn weights_decide_the_share_of_first_place() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "w.tether.test" })).await?;
    stack.address(&token, "w.tether.test", json!({ "ip": "198.18.5.1", "weight": 3 })).await?;
    stack.address(&token, "w.tether.test", json!({ "ip": "198.18.5.2", "weight": 1 })).await?;
    answers_become(&stack, "w.tether.test.", RecordType::A, &["198.18.5.1", "198.18.5.2"]).await?;
    let mut firsts = BTreeMap::new();
    for _ in 0..40 {
        let r = ask(stack.dns.dns_addr, "w.tether.test.", RecordType::A, Transport::Udp).await?;
        *firsts.entry(addresses(&r)[0].clone()).or_insert(0) += 1;
    }
    assert_eq!(firsts.get("198.18.5.1"), Some(&30), "{firsts:?}");
    assert_eq!(firsts.get("198.18.5.2"), Some(&10), "{firsts:?}");
    Ok(())
}

#[tokio::test]
async fn an_overloaded_address_is_held_back() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "l.tether.test" })).await?;
    for ip in ["198.18.6.1", "198.18.6.2", "198.18.6.3"] {
        stack.address(&token, "l.tether.test", json!({ "ip": ip })).await?;
    }
    answers_become(&stack, "l.tether.test.", RecordType::A, &["198.18.6.1", "198.18.6.2", "198.18.6.3"]).await?;
    let db = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET load = CASE WHEN ip = '198.18.6.3' THEN 95 ELSE 10 END").execute(&db).await?;
    answers_become(&stack, "l.tether.test.", RecordType::A, &["198.18.6.1", "198.18.6.2"]).await?;
    Ok(())
}

#[tokio::test]
async fn fallback_answers_when_nothing_is_live() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "f.tether.test", "fallback_ip": "198.18.7.99" })).await?;
    stack.domain(&token, json!({ "name": "k.tether.test", "when_empty": "last_known" })).await?;
    stack.domain(&token, json!({ "name": "n.tether.test" })).await?;
    for name in ["f", "k", "n"] {
        stack.address(&token, &format!("{name}.tether.test"), json!({ "ip": "198.18.7.1" })).await?;
    }
    answers_become(&stack, "f.tether.test.", RecordType::A, &["198.18.7.1"]).await?;
    let db = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET state = 'dead'").execute(&db).await?;
    answers_become(&stack, "f.tether.test.", RecordType::A, &["198.18.7.99"]).await?;
    answers_become(&stack, "k.tether.test.", RecordType::A, &["198.18.7.1"]).await?;
    answers_become(&stack, "n.tether.test.", RecordType::A, &[]).await?;
    let r = ask(stack.dns.dns_addr, "n.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError, "no live address is NODATA, not NXDOMAIN");
    Ok(())
}

#[tokio::test]
async fn srv_records_come_from_service_tuples() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "svc.tether.test" })).await?;
    let tuples = json!([
        { "service": "http", "transport": "tcp", "ip": "198.18.8.1", "port": 8080, "priority": 10, "weight": 5 },
        { "service": "http", "transport": "tcp", "target": "backup.example.net", "port": 80, "priority": 20 },
        { "service": "sip", "transport": "udp", "ip": "fd00::8:1", "port": 5060 },
    ]);
    let (status, body) =
        stack.api.call(Method::PUT, "/v1/domains/svc.tether.test/services", Some(&token), Some(tuples)).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(3), "{body}");

    let name = "_http._tcp.svc.tether.test.";
    let r = eventually(WAIT, "SRV records", || async {
        let r = ask(stack.dns.dns_addr, name, RecordType::SRV, Transport::Udp).await.ok()?;
        (r.answers.len() == 2).then_some(r)
    })
    .await?;
    let mut srvs: Vec<(u16, u16, u16, String)> = r
        .answers
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::SRV(srv) => Some((srv.priority, srv.weight, srv.port, srv.target.to_string())),
            _ => None,
        })
        .collect();
    srvs.sort();
    assert_eq!(
        srvs,
        [(10, 5, 8080, "ip-198-18-8-1.svc.tether.test.".to_owned()), (20, 0, 80, "backup.example.net.".to_owned()),]
    );
    let glue = addresses_in(&r.additionals);
    assert_eq!(glue, ["198.18.8.1"], "the generated target's address is in the additional section");

    let target = ask(stack.dns.dns_addr, "ip-198-18-8-1.svc.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(addresses(&target), ["198.18.8.1"]);
    let sip = ask(stack.dns.dns_addr, "_sip._udp.svc.tether.test.", RecordType::SRV, Transport::Tcp).await?;
    assert_eq!(sip.answers.len(), 1);
    // `_tcp.svc.tether.test` exists only as an empty non-terminal: NODATA.
    let ent = ask(stack.dns.dns_addr, "_tcp.svc.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(ent.metadata.response_code, ResponseCode::NoError);
    assert!(ent.answers.is_empty());
    Ok(())
}

#[tokio::test]
async fn soa_and_ns_at_the_apex() -> Result<()> {
    let (stack, _token) = Stack::with_acme().await?;
    let soa = ask(stack.dns.dns_addr, "tether.test.", RecordType::SOA, Transport::Udp).await?;
    assert!(soa.metadata.authoritative, "{soa:?}");
    let RData::SOA(record) = &soa.answers[0].data else {
        panic!("SOA expected: {soa:?}");
    };
    assert_eq!(record.mname.to_string(), "ns1.tether.test.");
    assert_eq!(record.rname.to_string(), "hostmaster.tether.test.");
    assert_eq!(record.minimum, 1);

    let ns = ask(stack.dns.dns_addr, "TETHER.test.", RecordType::NS, Transport::Tcp).await?;
    let mut names: Vec<String> = ns
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.to_string()),
            _ => None,
        })
        .collect();
    names.sort();
    assert_eq!(names, ["ns1.tether.test.", "ns2.example.net."]);
    let glue: Vec<String> = ns
        .additionals
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(format!("{} {}", r.name, a.0)),
            _ => None,
        })
        .collect();
    assert_eq!(glue, ["ns1.tether.test. 198.18.0.53"]);
    let glue_a = ask(stack.dns.dns_addr, "ns1.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(addresses(&glue_a), ["198.18.0.53"]);
    Ok(())
}

#[tokio::test]
async fn nxdomain_and_nodata_carry_the_soa() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "a.b.tether.test" })).await?;
    stack.address(&token, "a.b.tether.test", json!({ "ip": "198.18.9.1" })).await?;
    answers_become(&stack, "a.b.tether.test.", RecordType::A, &["198.18.9.1"]).await?;

    let nx = ask(stack.dns.dns_addr, "nope.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(nx.metadata.authoritative);
    assert!(nx.answers.is_empty());
    assert!(matches!(nx.authorities.first().map(|r| &r.data), Some(RData::SOA(_))), "{nx:?}");
    // SOA TTL 60, MINIMUM 1 (the defaults): a negative answer is cached for 1 s (RFC 2308 section 3).
    assert_eq!(nx.authorities[0].ttl, 1, "{nx:?}");

    for (name, rtype) in [
        ("a.b.tether.test.", RecordType::TXT),
        ("a.b.tether.test.", RecordType::AAAA),
        ("b.tether.test.", RecordType::A), // empty non-terminal
        ("tether.test.", RecordType::A),   // apex without addresses
    ] {
        let r = ask(stack.dns.dns_addr, name, rtype, Transport::Udp).await?;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name} {rtype}");
        assert!(r.metadata.authoritative, "{name} {rtype}");
        assert!(r.answers.is_empty(), "{name} {rtype}");
        assert!(matches!(r.authorities.first().map(|r| &r.data), Some(RData::SOA(_))), "{name} {rtype}: {r:?}");
        assert_eq!(r.authorities[0].ttl, 1, "{name} {rtype}: the negative-caching TTL");
    }
    Ok(())
}

#[tokio::test]
async fn names_outside_our_zones_are_refused() -> Result<()> {
    let (stack, _token) = Stack::with_acme().await?;
    for transport in [Transport::Udp, Transport::Tcp] {
        let r = ask(stack.dns.dns_addr, "www.example.org.", RecordType::A, transport).await?;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(!r.metadata.authoritative);
        assert!(r.answers.is_empty());
    }
    Ok(())
}

#[tokio::test]
async fn large_answers_truncate_over_udp_and_complete_over_tcp_and_edns() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "big.tether.test" })).await?;
    let db = stack.pg.pool().await?;
    sqlx::query(
        "INSERT INTO addresses (domain_id, ip, source, state) \
         SELECT d.id, ('fd00::' || to_hex(n))::inet, 'static', 'live' \
         FROM domains d, generate_series(1, 40) AS n WHERE d.fqdn = 'big.tether.test.'",
    )
    .execute(&db)
    .await?;
    let name = "big.tether.test.";
    eventually(WAIT, "40 AAAA over TCP", || async {
        let r = ask(stack.dns.dns_addr, name, RecordType::AAAA, Transport::Tcp).await.ok()?;
        (r.answers.len() == 40).then_some(())
    })
    .await?;
    // 40 AAAA records are about 1.1 kB: over the 512-byte limit of plain UDP.
    let udp = ask(stack.dns.dns_addr, name, RecordType::AAAA, Transport::Udp).await?;
    assert!(udp.metadata.truncation, "TC must be set");
    assert!(udp.answers.len() < 40);
    let edns = ask(stack.dns.dns_addr, name, RecordType::AAAA, Transport::UdpEdns(4096)).await?;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 40);
    let opt = edns.edns.as_ref().expect("EDNS answered with EDNS");
    assert!(opt.max_payload() >= 512);
    let small = ask(stack.dns.dns_addr, name, RecordType::AAAA, Transport::UdpEdns(512)).await?;
    assert!(small.metadata.truncation, "EDNS 512 still truncates");
    Ok(())
}

#[tokio::test]
async fn malformed_packets_do_not_stop_the_server() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "m.tether.test" })).await?;
    stack.address(&token, "m.tether.test", json!({ "ip": "198.18.10.1" })).await?;
    answers_become(&stack, "m.tether.test.", RecordType::A, &["198.18.10.1"]).await?;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for garbage in [&b""[..], b"\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", &[0x41; 600]] {
        socket.send_to(garbage, stack.dns.dns_addr).await?;
    }
    // A header claiming one question with no question following.
    let _ = exchange_udp(stack.dns.dns_addr, &[0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await;
    let mut tcp = tokio::net::TcpStream::connect(stack.dns.dns_addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"\x00\x05hello").await?;
    drop(tcp);
    let r = ask(stack.dns.dns_addr, "m.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(addresses(&r), ["198.18.10.1"]);
    Ok(())
}

#[tokio::test]
async fn txt_records_at_the_domain_and_under_it() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "txt.tether.test" })).await?;
    let long = "x".repeat(300);
    let records = json!([
        { "value": "v=spf1 -all" },
        { "name": "_acme-challenge.txt.tether.test", "value": "token-1", "ttl": 5 },
        { "name": "_acme-challenge.txt.tether.test", "value": "token-2", "ttl": 5 },
        { "name": "long.txt.tether.test", "value": long },
    ]);
    let (status, body) =
        stack.api.call(Method::PUT, "/v1/domains/txt.tether.test/txt", Some(&token), Some(records)).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(4), "{body}");

    let texts = |r: &hickory_proto::op::Message| -> Vec<String> {
        let mut all: Vec<String> = r
            .answers
            .iter()
            .filter_map(|rec| match &rec.data {
                RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect()),
                _ => None,
            })
            .collect();
        all.sort();
        all
    };
    let challenge = eventually(WAIT, "the challenge TXT", || async {
        let r =
            ask(stack.dns.dns_addr, "_acme-challenge.txt.tether.test.", RecordType::TXT, Transport::Udp).await.ok()?;
        (r.answers.len() == 2).then_some(r)
    })
    .await?;
    assert_eq!(texts(&challenge), ["token-1", "token-2"]);
    assert!(challenge.answers.iter().all(|r| r.ttl == 5));
    let apex = ask(stack.dns.dns_addr, "TXT.tether.test.", RecordType::TXT, Transport::Udp).await?;
    assert_eq!(texts(&apex), ["v=spf1 -all"]);
    assert_eq!(apex.answers[0].name.to_string(), "TXT.tether.test.", "the question's case");
    let split = ask(stack.dns.dns_addr, "long.txt.tether.test.", RecordType::TXT, Transport::Tcp).await?;
    let RData::TXT(txt) = &split.answers[0].data else { panic!("not TXT: {split:?}") };
    assert_eq!(txt.txt_data.iter().map(|s| s.len()).collect::<Vec<_>>(), [255, 45], "split into <= 255 bytes");
    let none = ask(stack.dns.dns_addr, "long.txt.tether.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(none.metadata.response_code, ResponseCode::NoError, "the TXT name exists: NODATA for A");

    // Refusals: outside the domain, another tenant's domain under it, bounds.
    for (records, status) in [
        (json!([{ "name": "other.tether.test", "value": "x" }]), 403),
        (json!([{ "value": "" }]), 422),
        (json!([{ "value": "a\u{7}b" }]), 422),
        (json!([{ "value": "x".repeat(1025) }]), 422),
        (json!([{ "value": "x", "ttl": 86_401 }]), 422),
        (json!((0..33).map(|i| json!({ "value": format!("v{i}") })).collect::<Vec<_>>()), 422),
        (json!([{ "value": "x", "extra": 1 }]), 422),
    ] {
        let (got, body) =
            stack.api.call(Method::PUT, "/v1/domains/txt.tether.test/txt", Some(&token), Some(records.clone())).await?;
        assert_eq!(got, status, "{records} → {body}");
    }
    let neighbour = stack.subscriber("neighbour").await?;
    // The API refuses another tenant's domain under ours; one written by other means still keeps its names.
    let (got, body) = stack
        .api
        .call(Method::POST, "/v1/domains", Some(&neighbour), Some(json!({ "name": "sub.txt.tether.test" })))
        .await?;
    assert_eq!(got, 403, "{body}");
    let pool = stack.pg.pool().await?;
    sqlx::query(
        "INSERT INTO domains (fqdn, zone_id, subscriber_id) SELECT 'sub.txt.tether.test.', z.id, s.id \
         FROM zones z, subscribers s WHERE z.origin = 'tether.test.' AND s.name = 'neighbour'",
    )
    .execute(&pool)
    .await?;
    let (got, body) = stack
        .api
        .call(
            Method::PUT,
            "/v1/domains/txt.tether.test/txt",
            Some(&token),
            Some(json!([{ "name": "sub.txt.tether.test", "value": "mine" }])),
        )
        .await?;
    assert_eq!(got, 409, "another tenant's domain under ours: {body}");
    let (got, _) =
        stack.api.call(Method::PUT, "/v1/domains/txt.tether.test/txt", Some(&neighbour), Some(json!([]))).await?;
    assert_eq!(got, 403, "not the neighbour's to change");
    let (got, body) = stack.api.call(Method::GET, "/v1/domains/txt.tether.test/txt", Some(&token), None).await?;
    assert_eq!((got.as_u16(), body.as_array().map(Vec::len)), (200, Some(4)), "nothing changed: {body}");
    Ok(())
}
