//! Secondaries behind tether, measured end to end on loopback: an NCU uplink goes silent (its heartbeats go
//! unanswered) → hbs marks it dead → dns drops it → NOTIFY → NSD and Knot transfer by IXFR → they no longer answer
//! it. Real Postgres, dns, hds, hbs, an NCU agent, NSD and Knot (Debian's packages).
//!
//! `cargo bench -p tether-tests --bench secondaries` (TRIALS=n, default 50). Prints p50/p90/p99/max in ms from the
//! uplink going silent to tether, NSD and Knot answering without it, the lag of each secondary behind tether, and
//! the bytes of one IXFR against one AXFR of the zone.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::SOA},
};
use reqwest::Method;
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask},
    eventually,
    fleet::LoopbackSite,
    peers::{Kind, Peer, Zone},
    stack::{OPERATOR_TOKEN, Stack},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const NAME: &str = "bench.tether.test.";
const BOTH: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

async fn answers(server: SocketAddr) -> Option<Vec<String>> {
    let response = ask(server, NAME, RecordType::A, Transport::Udp).await.ok()?;
    let mut list = addresses(&response);
    list.sort();
    Some(list)
}

#[tokio::main]
async fn main() -> Result<()> {
    let trials: usize = std::env::var("TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(50);
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "bench.tether.test" })).await?;
    // A zone of realistic size beside the changing name: 200 more names.
    for i in 0..200 {
        let name = format!("site{i}.tether.test");
        stack.domain(&acme, json!({ "name": name })).await?;
        stack.address(&acme, &name, json!({ "ip": format!("198.18.{}.{}", i / 200, i % 200 + 1) })).await?;
    }
    let site = LoopbackSite::start(&stack, &acme, "bench.tether.test").await?;
    let agent = &site.agent;
    let dns = stack.dns.dns_addr;
    eventually(Duration::from_secs(20), "both uplinks live", || async { (answers(dns).await? == BOTH).then_some(()) })
        .await?;

    let policy = json!({ "secondaries": [{ "prefix": "127.0.0.1/32" }] });
    let path = "/v1/zones/tether.test/transfer";
    stack.api.call(Method::PUT, path, Some(OPERATOR_TOKEN), Some(policy)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // the zone reloads with its policy
    let zone = Zone::Secondary { origin: "tether.test".into(), primary: dns, key: None };
    let nsd = Peer::serve(Kind::Nsd, std::slice::from_ref(&zone)).await?;
    let knot = Peer::serve(Kind::Knot, &[zone]).await?;
    let notify = json!([{ "addr": nsd.addr.to_string() }, { "addr": knot.addr.to_string() }]);
    let policy = json!({ "secondaries": [{ "prefix": "127.0.0.1/32" }], "notify": notify });
    stack.api.call(Method::PUT, path, Some(OPERATOR_TOKEN), Some(policy)).await?;
    for peer in [&nsd, &knot] {
        eventually(Duration::from_secs(20), "the secondary to serve both", || async {
            (answers(peer.addr).await? == BOTH).then_some(())
        })
        .await
        .with_context(|| peer.logs())?;
    }

    let servers = [("tether", dns), ("nsd", nsd.addr), ("knot", knot.addr)];
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let mut lag: [Vec<Duration>; 2] = Default::default();
    for trial in 0..trials {
        // Go silent at a random point of the ping cycle.
        tokio::time::sleep(Duration::from_millis(u64::from(rand::random::<u16>() % 1000))).await;
        agent.drill.silence("wan2", true);
        let silenced = Instant::now();
        let mut done: [Option<Duration>; 3] = [None; 3];
        while done.iter().any(Option::is_none) {
            for (i, (_, addr)) in servers.iter().enumerate() {
                if done[i].is_none() && answers(*addr).await.is_some_and(|a| a == ["127.0.0.2"]) {
                    done[i] = Some(silenced.elapsed());
                }
            }
            if silenced.elapsed() > Duration::from_secs(15) {
                bail!("trial {trial}: still answered after 15 s: {done:?}\n{}\n{}", nsd.logs(), knot.logs());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let done = done.map(|d| d.unwrap_or_default());
        for i in 0..3 {
            samples[i].push(done[i]);
        }
        lag[0].push(done[1].saturating_sub(done[0]));
        lag[1].push(done[2].saturating_sub(done[0]));
        agent.drill.silence("wan2", false);
        for (what, addr) in servers {
            eventually(Duration::from_secs(15), &format!("wan2 back on {what}"), || async {
                (answers(addr).await? == BOTH).then_some(())
            })
            .await?;
        }
    }

    let serial = soa_serial(dns).await?;
    let ixfr = xfr_bytes(dns, RecordType::IXFR, Some(serial.wrapping_sub(1))).await?;
    let axfr = xfr_bytes(dns, RecordType::AXFR, None).await?;
    let quantiles = |mut list: Vec<Duration>| {
        list.sort();
        let pick = |q: f64| list[((list.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
        format!("p50 {:.0} ms  p90 {:.0} ms  p99 {:.0} ms  max {:.0} ms", pick(0.5), pick(0.9), pick(0.99), pick(1.0))
    };
    let [tether_samples, nsd_samples, knot_samples] = samples;
    let [nsd_lag, knot_lag] = lag;
    #[allow(clippy::print_stdout)]
    {
        println!("silent uplink -> out of the answers, {trials} trials, 1 Hz pings, loopback, 202 names in the zone");
        println!("tether          {}", quantiles(tether_samples));
        println!("NSD secondary   {}", quantiles(nsd_samples));
        println!("Knot secondary  {}", quantiles(knot_samples));
        println!("NSD behind tether   {}", quantiles(nsd_lag));
        println!("Knot behind tether  {}", quantiles(knot_lag));
        println!(
            "one change: IXFR {} bytes ({} messages), AXFR {} bytes ({} messages)",
            ixfr.0, ixfr.1, axfr.0, axfr.1
        );
    }
    site.agent.stop().await?;
    Ok(())
}

async fn soa_serial(server: SocketAddr) -> Result<u32> {
    let response = ask(server, "tether.test.", RecordType::SOA, Transport::Udp).await?;
    match response.answers.first().map(|r| &r.data) {
        Some(RData::SOA(soa)) => Ok(soa.serial),
        other => bail!("no SOA: {other:?}"),
    }
}

/// Bytes and messages of one transfer over TCP (IXFR from `serial`, or AXFR).
async fn xfr_bytes(server: SocketAddr, rtype: RecordType, serial: Option<u32>) -> Result<(usize, usize)> {
    let origin = Name::from_ascii("tether.test.")?;
    let mut query = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    query.add_query(Query::query(origin.clone(), rtype));
    if let Some(serial) = serial {
        let soa = SOA::new(origin.clone(), origin.clone(), serial, 0, 0, 0, 0);
        query.add_authority(Record::from_rdata(origin, 0, RData::SOA(soa)));
    }
    let bytes = query.to_vec()?;
    let mut stream = TcpStream::connect(server).await?;
    stream.write_all(&u16::try_from(bytes.len())?.to_be_bytes()).await?;
    stream.write_all(&bytes).await?;
    let (mut total, mut messages) = (0, 0);
    // The answer starts and ends with the current SOA; an incremental IXFR has it once more, as the last delta's new
    // SOA, after SOAs of older serials.
    let (mut first, mut current, mut older) = (None, 0, false);
    loop {
        let mut len = [0_u8; 2];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut len)).await.context("stalled")??;
        let mut buf = vec![0_u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        total += buf.len() + 2;
        messages += 1;
        let message = Message::from_vec(&buf)?;
        if message.metadata.response_code != ResponseCode::NoError {
            bail!("{rtype}: {}", message.metadata.response_code);
        }
        for record in &message.answers {
            if let RData::SOA(soa) = &record.data {
                let first = *first.get_or_insert(soa.serial);
                if soa.serial == first { current += 1 } else { older = true }
            }
        }
        let ends_with_current =
            message.answers.last().is_some_and(|r| matches!(&r.data, RData::SOA(soa) if Some(soa.serial) == first));
        if ends_with_current && current >= if older { 3 } else { 2 } {
            break;
        }
    }
    Ok((total, messages))
}
