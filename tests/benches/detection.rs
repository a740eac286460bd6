//! Failure detection, measured end to end on loopback: an NCU uplink goes silent (its heartbeats go unanswered) →
//! `dns` no longer answers that address. Real Postgres, dns, hds, hbs and an NCU agent, in one process.
//!
//! `cargo bench -p tether-tests --bench detection` (TRIALS=n, default 30). Prints p50/p90/p99/max in ms.

use std::time::{Duration, Instant};

use anyhow::Result;
use hickory_proto::rr::RecordType;
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask},
    eventually,
    fleet::LoopbackSite,
    stack::Stack,
};

const NAME: &str = "bench.tether.test.";

#[tokio::main]
async fn main() -> Result<()> {
    let trials: usize = std::env::var("TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(30);
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "bench.tether.test" })).await?;
    let site = LoopbackSite::start(&stack, &acme, "bench.tether.test").await?;
    let (hbs, agent) = (&site.hbs, &site.agent);
    let dns = stack.dns.dns_addr;
    let answers = || async {
        let r = ask(dns, NAME, RecordType::A, Transport::Udp).await.ok()?;
        let mut list = addresses(&r);
        list.sort();
        Some(list)
    };
    eventually(Duration::from_secs(20), "both uplinks live", || async {
        (answers().await? == ["127.0.0.2", "127.0.0.3"]).then_some(())
    })
    .await?;

    let mut samples = Vec::with_capacity(trials);
    for trial in 0..trials {
        // Go silent at a random point of the ping cycle.
        tokio::time::sleep(Duration::from_millis(u64::from(rand::random::<u16>() % 1000))).await;
        agent.drill.silence("wan2", true);
        let silenced = Instant::now();
        loop {
            if answers().await.is_some_and(|a| a == ["127.0.0.2"]) {
                break;
            }
            if silenced.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("trial {trial}: still answered after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(silenced.elapsed());
        agent.drill.silence("wan2", false);
        eventually(Duration::from_secs(10), "wan2 back", || async {
            (answers().await? == ["127.0.0.2", "127.0.0.3"]).then_some(())
        })
        .await?;
    }
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    let forged = hbs.counters.forged.load(std::sync::atomic::Ordering::Relaxed);
    #[allow(clippy::print_stdout)]
    {
        println!("silent uplink -> out of DNS, {trials} trials, 1 Hz pings, loopback");
        println!("p50 {:.0} ms  p90 {:.0} ms  p99 {:.0} ms  max {:.0} ms", pick(0.5), pick(0.9), pick(0.99), pick(1.0));
        println!("target p99 <= 1500 ms; forged replies seen: {forged}");
    }
    site.agent.stop().await?;
    Ok(())
}
