//! Zone transfers to real secondaries: NSD and Knot (Debian's packages) transfer tether's zones by AXFR, learn of
//! each change by NOTIFY and follow it by IXFR; TSIG-protected zones transfer with the right key only; unlisted
//! sources are refused; the secondaries answer what tether answers.

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, Record, RecordType},
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tether_tests::{
    dns_client::{Transport, addresses, ask, sorted},
    eventually,
    peers::{Key, Kind, Peer, Zone},
    stack::{OPERATOR_TOKEN, Stack},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const WAIT: Duration = Duration::from_secs(15);
const SECRET: &str = "dGV0aGVyLXRyYW5zZmVyLWtleS0zMi1ieXRlcy1sb25n";
const WRONG: &str = "d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmct";

async fn put_transfer(stack: &Stack, origin: &str, policy: Value) -> Result<(StatusCode, Value)> {
    stack.api.call(Method::PUT, &format!("/v1/zones/{origin}/transfer"), Some(OPERATOR_TOKEN), Some(policy)).await
}

/// An AXFR over TCP with tether_tests' plain client: every record of every message until the closing SOA.
async fn axfr(server: SocketAddr, origin: &str) -> Result<(ResponseCode, Vec<Record>)> {
    let mut query = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    query.add_query(Query::query(Name::from_ascii(origin)?, RecordType::AXFR));
    transfer(server, &query, |records| records.iter().filter(|r| r.record_type() == RecordType::SOA).count() >= 2).await
}

/// Sends `query` over TCP and gathers the answer records of every message until `complete` says they are, or until
/// a message with an error rcode.
async fn transfer(
    server: SocketAddr,
    query: &Message,
    complete: impl Fn(&[Record]) -> bool,
) -> Result<(ResponseCode, Vec<Record>)> {
    let mut stream = TcpStream::connect(server).await?;
    let bytes = query.to_vec()?;
    stream.write_all(&u16::try_from(bytes.len())?.to_be_bytes()).await?;
    stream.write_all(&bytes).await?;
    let mut records: Vec<Record> = Vec::new();
    loop {
        let mut len = [0_u8; 2];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut len))
            .await
            .context("transfer stalled")??;
        let mut buf = vec![0_u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        let message = Message::from_vec(&buf)?;
        if message.metadata.response_code != ResponseCode::NoError {
            return Ok((message.metadata.response_code, records));
        }
        records.extend(message.answers);
        if complete(&records) {
            return Ok((ResponseCode::NoError, records));
        }
    }
}

/// `dig` as an operator runs it, from `source`, with `key` (`name:secret`) when given; its output. It runs on the
/// blocking pool: the server under test shares this test's runtime.
async fn dig_axfr(server: SocketAddr, origin: &str, source: &str, key: Option<&str>) -> Result<String> {
    let mut command = Command::new("dig");
    command.args(["+tries=1", "+time=5", "-p", &server.port().to_string(), &format!("@{}", server.ip())]);
    command.args(["-b", source, "AXFR", origin]);
    if let Some(key) = key {
        command.args(["-y", &format!("hmac-sha256:{key}")]);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await?
        .context("running dig (scripts/install-deps installs it)")?;
    Ok(format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

/// Waits until every peer answers `name` `rtype` with exactly tether's addresses (as sets: no rotation there).
async fn peers_match(stack: &Stack, peers: &[&Peer], name: &str, rtype: RecordType) -> Result<()> {
    let ours = sorted(addresses(&ask(stack.dns.dns_addr, name, rtype, Transport::Udp).await?));
    for peer in peers {
        eventually(WAIT, &format!("{} to answer {name} {rtype} {ours:?}", peer.kind.name()), || async {
            let theirs = ask(peer.addr, name, rtype, Transport::Udp).await.ok()?;
            (sorted(addresses(&theirs)) == ours).then_some(())
        })
        .await
        .with_context(|| peer.logs())?;
    }
    Ok(())
}

/// Transfers tether served: (incremental IXFRs, whole zones by AXFR or IXFR), from its /metrics.
async fn transfer_counts(stack: &Stack) -> Result<(u64, u64)> {
    let text = reqwest::get(format!("http://{}/metrics", stack.dns.api_addr)).await?.text().await?;
    let count = |kind: &str| -> u64 {
        let prefix = format!("tether_dns_zone_transfers_total{{kind=\"{kind}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok()).unwrap_or(0)
    };
    Ok((count("ixfr"), count("axfr") + count("ixfr-full")))
}

/// `count` names `{prefix}{i}.{origin}` (i from 1) of the zone's first subscriber, each with one live address
/// 198.18.(i / 256).(i % 256), in one transaction (as an operator's bulk import would write them).
async fn insert_names(pool: &sqlx::PgPool, origin: &str, prefix: &str, count: i32) -> Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO domains (fqdn, zone_id, subscriber_id, ttl) \
         SELECT format('%s%s.%s', $2::text, i, $1::text), z.id, s.id, 1 \
         FROM generate_series(1, $3) i, zones z, (SELECT id FROM subscribers ORDER BY id LIMIT 1) s \
         WHERE z.origin = $1",
    )
    .bind(origin)
    .bind(prefix)
    .bind(count)
    .execute(&mut *tx)
    .await
    .context("inserting names")?;
    sqlx::query(
        "INSERT INTO addresses (domain_id, ip, source, state) \
         SELECT d.id, format('198.18.%s.%s', i / 256, i % 256)::inet, 'static', 'live' \
         FROM generate_series(1, $3) i JOIN domains d ON d.fqdn = format('%s%s.%s', $2::text, i, $1::text)",
    )
    .bind(origin)
    .bind(prefix)
    .bind(count)
    .execute(&mut *tx)
    .await
    .context("inserting addresses")?;
    tx.commit().await?;
    Ok(())
}

/// Waits until tether serves the serial Postgres holds for `origin`: every change made so far is then published.
async fn caught_up(stack: &Stack, pool: &sqlx::PgPool, origin: &str) -> Result<()> {
    let last: i64 =
        sqlx::query_scalar("SELECT serial FROM zones WHERE origin = $1").bind(origin).fetch_one(pool).await?;
    eventually(WAIT, &format!("tether to serve serial {last} of {origin}"), || async {
        let soa = ask(stack.dns.dns_addr, origin, RecordType::SOA, Transport::Udp).await.ok()?;
        match soa.answers.first().map(|r| &r.data) {
            Some(hickory_proto::rr::RData::SOA(soa)) if i64::from(soa.serial) == last => Some(()),
            _ => None,
        }
    })
    .await
}

/// Waits until tether itself answers `name` A with `expected`.
async fn tether_answers(stack: &Stack, name: &str, expected: &[&str]) -> Result<()> {
    eventually(WAIT, &format!("tether to answer {name} A {expected:?}"), || async {
        let response = ask(stack.dns.dns_addr, name, RecordType::A, Transport::Udp).await.ok()?;
        (sorted(addresses(&response)) == expected).then_some(())
    })
    .await
}

#[tokio::test]
async fn nsd_and_knot_transfer_then_follow_changes_by_notify_and_ixfr() -> Result<()> {
    let stack = Stack::start().await?;
    stack.zone("xfr.test").await?;
    let token = stack.subscriber("acme").await?;
    for (name, ips) in [("www", &["198.18.1.1", "198.18.1.2", "fd00::1:1"][..]), ("a.b", &["198.18.2.1"][..])] {
        let fqdn = format!("{name}.xfr.test");
        stack.domain(&token, json!({ "name": fqdn, "ttl": 30 })).await?;
        for ip in ips {
            stack.address(&token, &fqdn, json!({ "ip": ip })).await?;
        }
    }
    // Before a policy, nobody transfers.
    let (rcode, _) = axfr(stack.dns.dns_addr, "xfr.test.").await?;
    assert_eq!(rcode, ResponseCode::Refused);

    let (status, body) =
        put_transfer(&stack, "xfr.test", json!({ "secondaries": [{ "prefix": "127.0.0.1/32" }] })).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let records = eventually(WAIT, "tether to allow the transfer", || async {
        let (rcode, records) = axfr(stack.dns.dns_addr, "xfr.test.").await.ok()?;
        (rcode == ResponseCode::NoError).then_some(records)
    })
    .await?;
    assert_eq!(records.first().map(Record::record_type), Some(RecordType::SOA), "SOA first");
    assert_eq!(records.last().map(Record::record_type), Some(RecordType::SOA), "and last");
    let a: Vec<String> =
        sorted(records.iter().filter(|r| r.record_type() == RecordType::A).map(|r| r.data.to_string()).collect());
    assert_eq!(a, ["198.18.0.53", "198.18.1.1", "198.18.1.2", "198.18.2.1"], "every address, glue included");

    let zone = Zone::Secondary { origin: "xfr.test".into(), primary: stack.dns.dns_addr, key: None };
    let nsd = Peer::serve(Kind::Nsd, std::slice::from_ref(&zone)).await?;
    let knot = Peer::serve(Kind::Knot, &[zone]).await?;
    for (name, rtype) in
        [("www.xfr.test.", RecordType::A), ("www.xfr.test.", RecordType::AAAA), ("a.b.xfr.test.", RecordType::A)]
    {
        peers_match(&stack, &[&nsd, &knot], name, rtype).await?;
    }

    let notify = json!([{ "addr": nsd.addr.to_string() }, { "addr": knot.addr.to_string() }]);
    let policy = json!({ "secondaries": [{ "prefix": "127.0.0.1/32" }], "notify": notify });
    let (status, body) = put_transfer(&stack, "xfr.test", policy).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // An address dies, written as hbs writes it. The SOA refresh is an hour: only NOTIFY brings the change within
    // the wait.
    let pool = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.1.2'").execute(&pool).await?;
    tether_answers(&stack, "www.xfr.test.", &["198.18.1.1"]).await?;
    peers_match(&stack, &[&nsd, &knot], "www.xfr.test.", RecordType::A).await?;
    assert_eq!(
        sorted(addresses(&ask(nsd.addr, "www.xfr.test.", RecordType::A, Transport::Udp).await?)),
        ["198.18.1.1"]
    );
    // Two more changes; each secondary follows incrementally.
    stack.address(&token, "a.b.xfr.test", json!({ "ip": "198.18.2.2" })).await?;
    tether_answers(&stack, "a.b.xfr.test.", &["198.18.2.1", "198.18.2.2"]).await?;
    peers_match(&stack, &[&nsd, &knot], "a.b.xfr.test.", RecordType::A).await?;
    // NSD's log does not name the kind of transfer; tether counts what it served: the two changes went to each
    // secondary as an IXFR, and the only whole zones were the first transfers (this test's, NSD's and Knot's).
    let metrics = transfer_counts(&stack).await?;
    ensure!(metrics.0 >= 4, "incremental transfers served: {metrics:?}\n{}", nsd.logs());
    ensure!(metrics.1 <= 3, "whole zones served: {metrics:?}\n{}", nsd.logs());
    // Every name the zone publishes is answered alike by tether and both secondaries.
    let (_, records) = axfr(stack.dns.dns_addr, "xfr.test.").await?;
    let mut owners: Vec<(String, RecordType)> = records
        .iter()
        .filter(|r| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
        .map(|r| (r.name.to_string(), r.record_type()))
        .collect();
    owners.dedup();
    ensure!(owners.len() >= 4, "{owners:?}");
    for (name, rtype) in &owners {
        peers_match(&stack, &[&nsd, &knot], name, *rtype).await?;
    }
    let knot_logs = knot.logs();
    ensure!(knot_logs.contains("IXFR, incoming"), "Knot followed by IXFR:\n{knot_logs}");

    // An unlisted source is refused, whatever it asks.
    let output = dig_axfr(stack.dns.dns_addr, "xfr.test", "127.0.0.2", None).await?;
    ensure!(output.contains("Transfer failed") || output.contains("REFUSED"), "{output}");
    Ok(())
}

#[tokio::test]
async fn a_tsig_zone_transfers_with_its_key_only_and_in_signed_messages() -> Result<()> {
    let stack = Stack::start().await?;
    stack.zone("sec.test").await?;
    stack.subscriber("acme").await?;
    // Enough names for several messages: each is signed, the later ones over the previous MAC.
    let pool = stack.pg.pool().await?;
    insert_names(&pool, "sec.test.", "h", 1500).await?;
    let keys = json!([{ "name": "k1", "algorithm": "hmac-sha256", "secret": SECRET }]);
    let policy = json!({ "secondaries": [{ "prefix": "127.0.0.0/8", "key": "k1" }], "keys": keys.clone() });
    let (status, body) = put_transfer(&stack, "sec.test", policy).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["keys"][0]["secret"], "***", "secrets never leave: {body}");
    caught_up(&stack, &pool, "sec.test.").await?;

    let last = std::sync::Mutex::new(String::new());
    let signed = eventually(WAIT, "a signed AXFR", || async {
        let output = dig_axfr(stack.dns.dns_addr, "sec.test", "127.0.0.1", Some(&format!("k1:{SECRET}"))).await.ok()?;
        if output.contains("XFR size") {
            return Some(output);
        }
        *last.lock().ok()? = output;
        None
    })
    .await
    .with_context(|| format!("dig said: {}", last.lock().map(|s| s.clone()).unwrap_or_default()))?;
    ensure!(!signed.contains("failed") && !signed.to_lowercase().contains("tsig error"), "{signed}");
    let messages: usize = signed
        .lines()
        .find_map(|l| l.split("messages ").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .context("dig's message count")?;
    ensure!(messages > 1, "several messages, each verified by dig: {signed}");

    let unsigned = dig_axfr(stack.dns.dns_addr, "sec.test", "127.0.0.1", None).await?;
    ensure!(unsigned.contains("Transfer failed") || unsigned.contains("REFUSED"), "{unsigned}");
    let wrong = dig_axfr(stack.dns.dns_addr, "sec.test", "127.0.0.1", Some(&format!("k1:{WRONG}"))).await?;
    ensure!(!wrong.contains("XFR size"), "a wrong secret transfers nothing: {wrong}");
    let other = dig_axfr(stack.dns.dns_addr, "sec.test", "127.0.0.1", Some(&format!("k2:{SECRET}"))).await?;
    ensure!(!other.contains("XFR size"), "an unknown key transfers nothing: {other}");

    let key = Key { name: "k1".into(), algorithm: "hmac-sha256".into(), secret: SECRET.into() };
    let zone = Zone::Secondary { origin: "sec.test".into(), primary: stack.dns.dns_addr, key: Some(key) };
    let knot = Peer::serve(Kind::Knot, &[zone]).await?;
    let answer = ask(knot.addr, "h1500.sec.test.", RecordType::A, Transport::Udp).await?;
    assert_eq!(addresses(&answer), ["198.18.5.220"], "{}", knot.logs());

    // A signed NOTIFY (Knot's ACL requires the key), then a signed IXFR.
    let notify = json!([{ "addr": knot.addr.to_string(), "key": "k1" }]);
    let policy = json!({ "secondaries": [{ "prefix": "127.0.0.0/8", "key": "k1" }], "notify": notify, "keys": keys });
    let (status, body) = put_transfer(&stack, "sec.test", policy).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    sqlx::query("UPDATE addresses SET ip = '198.18.99.1' WHERE ip = '198.18.5.220'").execute(&pool).await?;
    eventually(WAIT, "Knot to follow the signed NOTIFY", || async {
        let answer = ask(knot.addr, "h1500.sec.test.", RecordType::A, Transport::Udp).await.ok()?;
        (addresses(&answer) == ["198.18.99.1"]).then_some(())
    })
    .await
    .with_context(|| knot.logs())?;
    let logs = knot.logs();
    ensure!(logs.contains("IXFR, incoming"), "Knot followed by IXFR:\n{logs}");
    ensure!(!logs.contains("denied"), "Knot accepted the signed NOTIFY:\n{logs}");
    Ok(())
}

#[tokio::test]
async fn a_storm_of_ten_thousand_transitions_is_a_few_deltas() -> Result<()> {
    let stack = Stack::start().await?;
    stack.zone("storm.test").await?;
    stack.subscriber("acme").await?;
    let pool = stack.pg.pool().await?;
    insert_names(&pool, "storm.test.", "s", 10_000).await?;
    let (status, body) =
        put_transfer(&stack, "storm.test", json!({ "secondaries": [{ "prefix": "127.0.0.1/32" }] })).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let before = eventually(WAIT, "the whole zone", || async {
        let (rcode, records) = axfr(stack.dns.dns_addr, "storm.test.").await.ok()?;
        (rcode == ResponseCode::NoError && records.len() > 10_000).then_some(records)
    })
    .await?;
    let serial = match &before[0].data {
        hickory_proto::rr::RData::SOA(soa) => soa.serial,
        other => anyhow::bail!("not an SOA: {other:?}"),
    };
    // Every address dies, in ten batches of a thousand as hbs writes them.
    for batch in 0..10 {
        sqlx::query(
            "UPDATE addresses SET state = 'dead' WHERE ip IN \
             (SELECT format('198.18.%s.%s', i / 256, i % 256)::inet FROM generate_series($1, $1 + 999) i)",
        )
        .bind(batch * 1000 + 1)
        .execute(&pool)
        .await?;
    }
    // The last batch is published with its serial, which its zone notification (sent after its domains') brings.
    caught_up(&stack, &pool, "storm.test.").await?;
    tether_answers(&stack, "s10000.storm.test.", &[]).await?;
    let (rcode, records) = ixfr(stack.dns.dns_addr, "storm.test.", serial).await?;
    assert_eq!(rcode, ResponseCode::NoError);
    let soas = records.iter().filter(|r| r.record_type() == RecordType::SOA).count();
    let deltas = (soas - 2) / 2;
    ensure!((1..=10).contains(&deltas), "10,000 transitions in ten statements are at most ten deltas: {deltas}");
    let deleted = records.iter().filter(|r| r.record_type() == RecordType::A).count();
    assert_eq!(deleted, 10_000, "every address is deleted once in the incremental answer");
    Ok(())
}

/// An IXFR over TCP from `serial`: every record until the answer's closing SOA.
async fn ixfr(server: SocketAddr, origin: &str, serial: u32) -> Result<(ResponseCode, Vec<Record>)> {
    let name = Name::from_ascii(origin)?;
    let mut query = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    query.add_query(Query::query(name.clone(), RecordType::IXFR));
    let soa = hickory_proto::rr::rdata::SOA::new(name.clone(), name.clone(), serial, 0, 0, 0, 0);
    query.add_authority(Record::from_rdata(name, 0, hickory_proto::rr::RData::SOA(soa)));
    // Incremental: the current SOA first, (old SOA, deletions, new SOA, additions)*, the current SOA last.
    transfer(server, &query, |records| {
        let soas = records.iter().filter(|r| r.record_type() == RecordType::SOA).count();
        records.len() > 1
            && records.last().map(|r| &r.data) == records.first().map(|r| &r.data)
            && soas % 2 == 0
            && soas >= 4
    })
    .await
}

#[tokio::test]
async fn transfer_policies_are_checked_and_operator_only() -> Result<()> {
    let stack = Stack::start().await?;
    stack.zone("pol.test").await?;
    let token = stack.subscriber("acme").await?;
    let good = json!({ "secondaries": [{ "prefix": "198.18.0.0/24" }] });
    let (status, _) =
        stack.api.call(Method::PUT, "/v1/zones/pol.test/transfer", Some(&token), Some(good.clone())).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "a subscriber cannot open transfers");
    let (status, _) = put_transfer(&stack, "nope.test", good).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for (bad, field) in [
        (json!({ "secondaries": [{ "prefix": "198.18.0.0/33" }] }), "prefix"),
        (json!({ "secondaries": [{ "prefix": "198.18.0.0/24", "key": "k9" }] }), "secondaries[0].key"),
        (json!({ "keys": [{ "name": "k1", "secret": "c2hvcnQ=" }] }), "keys[0].secret"),
        (json!({ "keys": [{ "name": "k1", "algorithm": "hmac-md5", "secret": SECRET }] }), "keys[0].algorithm"),
        (json!({ "notify": [{ "addr": "198.18.0.2:0" }] }), "notify[0].addr"),
        (json!({ "allow": [] }), "allow"),
    ] {
        let (status, body) = put_transfer(&stack, "pol.test", bad.clone()).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad} → {body}");
        assert!(body.to_string().contains(field), "{bad}: the error names {field}: {body}");
    }
    let (status, body) = stack.api.call(Method::GET, "/v1/zones/pol.test/transfer", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "secondaries": [], "notify": [], "keys": [] }), "nothing was stored");
    Ok(())
}

/// Found by schemathesis: an origin in the path that is no name was a 422 as if it were the body's fault; like every
/// other path, it is a 400 `bad_path`.
#[tokio::test]
async fn a_transfer_path_naming_no_zone_is_a_bad_path() -> Result<()> {
    let stack = Stack::start().await?;
    for origin in ["__main__", "a..b", "nodot"] {
        let path = format!("/v1/zones/{origin}/transfer");
        let (status, body) = stack.api.call(Method::GET, &path, Some(OPERATOR_TOKEN), None).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_path")), "{body}");
        let (status, body) = put_transfer(&stack, origin, json!({})).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_path")), "{body}");
    }
    Ok(())
}
