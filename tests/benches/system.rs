//! Change latency and failure detection of the whole system in network namespaces (real binaries, real Postgres;
//! see `tether_tests::system`), as seen by a client asking `dns`:
//!
//! - change: a new address on the site's uplink `wan2` (one `ip` command: the old address goes, the new one comes
//!   with its default route) → `dns` answers the new address;
//! - detection: the isp silently drops everything for `wan2`'s address (a blackhole route) → `dns` no longer answers
//!   it; then the route is removed and the address comes back before the next trial.
//!
//! `cargo bench -p tether-tests --bench system` as root (TRIALS=n each, default 100). Prints p50/p90/p99/max in ms;
//! BENCH_LOGS=1 prints the end of every process's log too.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tether_tests::{
    eventually,
    system::{System, client_runtime, network},
};

fn main() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("this benchmark makes network namespaces: run it as root");
    }
    let trials: usize = std::env::var("TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(100);
    let ns = network(2)?;
    let runtime = client_runtime(&ns)?;
    runtime.block_on(async {
        let mut system = System::start(ns).await?;
        let result = measure(&mut system, trials).await;
        if result.is_err() || std::env::var_os("BENCH_LOGS").is_some() {
            system.print_logs();
        }
        result
    })
}

async fn measure(system: &mut System, trials: usize) -> Result<()> {
    let site = system.ns.name("site");
    wait_for(system, &["198.18.1.2", "198.18.2.2"], "both uplinks").await?;

    // Change latency: wan2 alternates between .2 and .3.
    let mut change = Vec::with_capacity(trials);
    let mut current = "198.18.2.2";
    for trial in 0..trials {
        tokio::time::sleep(Duration::from_millis(u64::from(rand::random::<u16>() % 200))).await;
        let next = if current == "198.18.2.2" { "198.18.2.3" } else { "198.18.2.2" };
        let script = format!(
            "addr del {current}/24 dev wan2\naddr add {next}/24 dev wan2\n\
             route replace default via 198.18.2.1 dev wan2 metric 102\n"
        );
        let started = Instant::now();
        ip_batch(&site, &script)?;
        loop {
            if system.answer().await.is_ok_and(|a| a.iter().any(|ip| ip == next)) {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("change trial {trial}: {next} not answered after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        change.push(started.elapsed());
        current = next;
        wait_for(system, &["198.18.1.2", next], "the old address gone").await?;
    }
    report("address change on an uplink -> new address answered", &mut change);

    // Failure detection: a silent cut at a random point of the 1 s ping cycle.
    let mut detection = Vec::with_capacity(trials);
    let route = format!("{current}/32");
    for trial in 0..trials {
        tokio::time::sleep(Duration::from_millis(u64::from(rand::random::<u16>() % 1000))).await;
        let started = Instant::now();
        system.ip("isp", &["route", "add", "blackhole", &route])?;
        loop {
            if system.answer().await.is_ok_and(|a| a == ["198.18.1.2"]) {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("detection trial {trial}: still answered after 10 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        detection.push(started.elapsed());
        system.ip("isp", &["route", "del", "blackhole", &route])?;
        wait_for(system, &["198.18.1.2", current], "the uplink back").await?;
    }
    report("silent cut of an uplink (1 Hz pings) -> out of DNS", &mut detection);
    system.running()
}

/// `ip -n <netns> -batch -` with `script` on stdin: several changes from one process.
fn ip_batch(netns: &str, script: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().map(|mut stdin| stdin.write_all(script.as_bytes())).transpose()?;
    let status = child.wait()?;
    if !status.success() {
        bail!("ip -batch failed: {status}");
    }
    Ok(())
}

async fn wait_for(system: &System, want: &[&str], what: &str) -> Result<()> {
    eventually(Duration::from_secs(20), what, || async { (system.answer().await.ok()? == want).then_some(()) }).await
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let pick = |q: f64| {
        let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(index).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    #[allow(clippy::print_stdout)]
    {
        println!("{what}, {} trials, network namespaces", samples.len());
        println!(
            "  p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            pick(0.5),
            pick(0.9),
            pick(0.99),
            pick(1.0)
        );
    }
}
