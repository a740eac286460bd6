//! RFC 2136 UPDATE as nsupdate (Debian's bind9-dnsutils) sends it, signed with a domain's TSIG key: adds, replaces
//! and deletes an address and a TXT record, and each refusal (wrong key, a name outside the key's domain, a failed
//! prerequisite, clock skew, a type it may not change) changes nothing.

use std::{io::Write as _, net::SocketAddr, process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, TSigner, rdata::A, rdata::tsig::TsigAlgorithm},
};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask, exchange_tcp, sorted},
    eventually,
    stack::Stack,
};

const WAIT: Duration = Duration::from_secs(10);

/// Runs nsupdate with `key` (`name:secret`) on `script`; its exit success and output.
async fn nsupdate(server: SocketAddr, key: &str, script: &str) -> Result<(bool, String)> {
    let script = format!("server {} {}\nzone tether.test\n{script}\nsend\n", server.ip(), server.port());
    let key = format!("hmac-sha256:{key}");
    tokio::task::spawn_blocking(move || -> Result<(bool, String)> {
        let mut child = std::process::Command::new("nsupdate")
            .args(["-y", &key, "-t", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nsupdate (scripts/install-deps installs bind9-dnsutils)")?;
        child.stdin.take().context("stdin")?.write_all(script.as_bytes())?;
        let output = child.wait_with_output()?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        Ok((output.status.success(), text))
    })
    .await?
}

async fn answers_become(stack: &Stack, name: &str, rtype: RecordType, expected: &[&str]) -> Result<()> {
    eventually(WAIT, &format!("{name} {rtype} to answer {expected:?}"), || async {
        let response = ask(stack.dns.dns_addr, name, rtype, Transport::Udp).await.ok()?;
        let got: Vec<String> = match rtype {
            RecordType::TXT => response
                .answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => {
                        Some(txt.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
                    }
                    _ => None,
                })
                .collect(),
            _ => addresses(&response),
        };
        (sorted(got) == expected).then_some(())
    })
    .await
}

#[tokio::test]
async fn nsupdate_adds_replaces_and_deletes_and_every_refusal_changes_nothing() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "www.tether.test" })).await?;
    stack.domain(&token, json!({ "name": "other.tether.test" })).await?;
    let (status, body) =
        stack.api.call(Method::POST, "/v1/domains/www.tether.test/update-keys", Some(&token), None).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let name = body["name"].as_str().context("key name")?.to_owned();
    let secret = body["secret"].as_str().context("secret")?.to_owned();
    let key = format!("{}:{secret}", name.trim_end_matches('.'));
    let dns = stack.dns.dns_addr;

    let (ok, output) = nsupdate(
        dns,
        &key,
        "update add www.tether.test 60 A 198.18.9.1\nupdate add _acme-challenge.www.tether.test 60 TXT \"challenge-1\"",
    )
    .await?;
    ensure!(ok, "nsupdate added:\n{output}");
    answers_become(&stack, "www.tether.test.", RecordType::A, &["198.18.9.1"]).await?;
    answers_become(&stack, "_acme-challenge.www.tether.test.", RecordType::TXT, &["challenge-1"]).await?;

    let replace = "update delete www.tether.test A\nupdate add www.tether.test 60 A 198.18.9.2";
    let (ok, output) = nsupdate(dns, &key, replace).await?;
    ensure!(ok, "nsupdate replaced:\n{output}");
    answers_become(&stack, "www.tether.test.", RecordType::A, &["198.18.9.2"]).await?;

    let delete = "update delete _acme-challenge.www.tether.test TXT \"challenge-1\"";
    let (ok, output) = nsupdate(dns, &key, delete).await?;
    ensure!(ok, "nsupdate deleted:\n{output}");
    answers_become(&stack, "_acme-challenge.www.tether.test.", RecordType::TXT, &[]).await?;

    // SRV at _service._transport under the domain: a service tuple with that target.
    let srv = "update add _sip._udp.www.tether.test 60 SRV 10 5 5060 sip.example.net";
    let (ok, output) = nsupdate(dns, &key, srv).await?;
    ensure!(ok, "nsupdate added SRV:\n{output}");
    let srv = eventually(WAIT, "the SRV record", || async {
        let r = ask(dns, "_sip._udp.www.tether.test.", RecordType::SRV, Transport::Udp).await.ok()?;
        (r.answers.len() == 1).then_some(r)
    })
    .await?;
    assert_eq!(srv.answers[0].data.to_string(), "10 5 5060 sip.example.net.");
    let (status, services) = stack.api.call(Method::GET, "/v1/domains/www.tether.test", Some(&token), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(services.to_string().contains("sip.example.net"), "the tuple is the domain's: {services}");

    // Refusals, each seen by nsupdate; the answers stay.
    let wrong = format!("{}:dGhpcy1pcy1ub3QtdGhlLWtleS1hdC1hbGwtMzItYnl0ZXM=", name.trim_end_matches('.'));
    for (key, script, says) in [
        (wrong.as_str(), "update add www.tether.test 60 A 198.18.9.3", "NOTAUTH"),
        (key.as_str(), "update add other.tether.test 60 A 198.18.9.3", "REFUSED"),
        (key.as_str(), "update add www.tether.test 60 MX 10 mail.tether.test", "REFUSED"),
        (key.as_str(), "update add _sip._bogus.www.tether.test 60 SRV 1 1 1 x.example.net", "REFUSED"),
        (key.as_str(), "update add sub.www.tether.test 60 A 198.18.9.3", "REFUSED"),
        (key.as_str(), "prereq nxdomain www.tether.test\nupdate add www.tether.test 60 A 198.18.9.3", "YXDOMAIN"),
        (key.as_str(), "prereq yxrrset www.tether.test A 198.18.9.9\nupdate delete www.tether.test A", "NXRRSET"),
    ] {
        let (ok, output) = nsupdate(dns, key, script).await?;
        ensure!(!ok && output.contains(says), "{script}: nsupdate reports {says}:\n{output}");
    }
    // A value-dependent prerequisite that holds.
    let (ok, output) =
        nsupdate(dns, &key, "prereq yxrrset www.tether.test A 198.18.9.2\nupdate add www.tether.test 60 A 198.18.9.4")
            .await?;
    ensure!(ok, "{output}");
    answers_become(&stack, "www.tether.test.", RecordType::A, &["198.18.9.2", "198.18.9.4"]).await?;

    // Ten minutes of clock skew: BADTIME, nothing changes.
    let response = signed_update(dns, &name, &secret, -600).await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NotAuth);
    let error = response.signature.as_ref().and_then(|s| s.data.error);
    assert_eq!(error.map(u16::from), Some(18), "TSIG error BADTIME: {response:?}");
    let response = signed_update(dns, &name, &secret, 0).await?;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError, "the same update on time");
    answers_become(&stack, "www.tether.test.", RecordType::A, &["198.18.9.2", "198.18.9.4", "198.18.9.7"]).await?;
    Ok(())
}

/// An UPDATE adding www.tether.test A 198.18.9.7, signed `skew` seconds off the clock.
async fn signed_update(server: SocketAddr, key: &str, secret: &str, skew: i64) -> Result<Message> {
    let secret = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, secret)?;
    let signer = TSigner::new(secret, TsigAlgorithm::HmacSha256, Name::from_ascii(key)?, 300)?;
    let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Update);
    message.add_query(Query::query(Name::from_ascii("tether.test.")?, RecordType::SOA));
    let mut record = Record::from_rdata(Name::from_ascii("www.tether.test.")?, 60, RData::A(A::new(198, 18, 9, 7)));
    record.dns_class = DNSClass::IN;
    message.add_authority(record);
    let now = u64::try_from(chrono_now() + skew)?;
    let (signature, _) = signer.sign_message(&message, now)?;
    message.signature = Some(signature);
    let reply = exchange_tcp(server, &message.to_vec()?).await?;
    Ok(Message::from_vec(&reply)?)
}

fn chrono_now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
        .unwrap_or(0)
}

#[tokio::test]
async fn update_keys_belong_to_the_domains_owner() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "www.tether.test" })).await?;
    let other = stack.subscriber("neighbour").await?;
    let path = "/v1/domains/www.tether.test/update-keys";
    let (status, _) = stack.api.call(Method::POST, path, Some(&other), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = stack.api.call(Method::POST, path, Some(&token), None).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let name = body["name"].as_str().context("name")?.to_owned();
    let (status, list) = stack.api.call(Method::GET, path, Some(&token), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list[0]["name"], name.as_str());
    assert!(list[0].get("secret").is_none(), "no secret listed: {list}");
    let (status, _) = stack.api.call(Method::DELETE, &format!("{path}/{name}"), Some(&other), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = stack.api.call(Method::DELETE, &format!("{path}/{name}"), Some(&token), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    Ok(())
}
