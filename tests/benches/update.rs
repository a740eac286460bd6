//! RFC 2136 UPDATE to answer: a signed UPDATE changes a domain's address; the time from its NOERROR (sent only after
//! the commit) to `dns` answering the new address, and the UPDATE's own round trip. Real Postgres and dns.
//!
//! `cargo bench -p tether-tests --bench update` (TRIALS=n, default 200). Prints p50/p90/p99/max in ms.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType, TSigner, rdata::A, rdata::tsig::TsigAlgorithm},
};
use reqwest::Method;
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask, exchange_tcp},
    stack::Stack,
};

#[tokio::main]
async fn main() -> Result<()> {
    let trials: usize = std::env::var("TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(200);
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "www.tether.test" })).await?;
    let (_, body) = stack.api.call(Method::POST, "/v1/domains/www.tether.test/update-keys", Some(&token), None).await?;
    let name = body["name"].as_str().context("key name")?.to_owned();
    let secret =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body["secret"].as_str().context("secret")?)?;
    let signer = TSigner::new(secret, TsigAlgorithm::HmacSha256, Name::from_ascii(&name)?, 300)?;
    let dns = stack.dns.dns_addr;
    let (mut visible, mut round_trip) = (Vec::with_capacity(trials), Vec::with_capacity(trials));
    for trial in 0..trials {
        let ip = [198, 18, 10 + u8::try_from(trial / 250)?, u8::try_from(trial % 250)? + 1];
        let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Update);
        message.add_query(Query::query(Name::from_ascii("tether.test.")?, RecordType::SOA));
        // Replace the address: delete the A RRset, add the new one.
        let mut delete = Record::update0(Name::from_ascii("www.tether.test.")?, 0, RecordType::A);
        delete.dns_class = DNSClass::ANY;
        message.add_authority(delete);
        let add = Record::from_rdata(
            Name::from_ascii("www.tether.test.")?,
            1,
            RData::A(A::from(std::net::Ipv4Addr::from(ip))),
        );
        message.add_authority(add);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let (signature, _) = signer.sign_message(&message, now)?;
        message.signature = Some(signature);
        let sent = Instant::now();
        let reply = Message::from_vec(&exchange_tcp(dns, &message.to_vec()?).await?)?;
        let committed = Instant::now();
        if reply.metadata.response_code != ResponseCode::NoError {
            bail!("trial {trial}: {}", reply.metadata.response_code);
        }
        round_trip.push(committed - sent);
        let want = std::net::Ipv4Addr::from(ip).to_string();
        loop {
            let response = ask(dns, "www.tether.test.", RecordType::A, Transport::Udp).await?;
            if addresses(&response) == [want.clone()] {
                break;
            }
            if committed.elapsed() > Duration::from_secs(5) {
                bail!("trial {trial}: {want} not answered after 5 s");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        visible.push(committed.elapsed());
    }
    let quantiles = |mut list: Vec<Duration>| {
        list.sort();
        let pick = |q: f64| list[((list.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
        format!("p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms", pick(0.5), pick(0.9), pick(0.99), pick(1.0))
    };
    #[allow(clippy::print_stdout)]
    {
        println!("signed UPDATE replacing an address, {trials} trials, loopback");
        println!("UPDATE round trip (NOERROR after the commit)  {}", quantiles(round_trip));
        println!("NOERROR -> dns answers the new address         {}", quantiles(visible));
        println!("target: answered p99 <= 20 ms");
    }
    Ok(())
}
