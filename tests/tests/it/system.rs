//! The whole system end to end: every binary a real process, a real Postgres, four network namespaces.
//!
//! ```text
//!   operator  198.18.0.1 (dns :53, admin API :8053, hds :4433, hbs-a :4434, hbs-b :4444)
//!             198.18.0.10 (the domain's static address; packet-forwarder :8080), Postgres on a Unix socket
//!      |
//!     isp ---- client 198.18.9.1 (DNS and HTTP client: this test's runtime lives here)
//!    | | |
//!   site  wan1 198.18.1.2, wan2 198.18.2.2, wan3 198.18.3.2: ncu, and a web server on :8080
//! ```
//!
//! The operator creates a zone and a subscriber, the subscriber a domain with a static address, the NCU enrolls and
//! runs; then an uplink's address changes, an uplink is cut silently and restored, the primary heartbeat server is
//! killed, and Postgres restarts. DNS and the forwarder follow every step. Needs root (CI runs it).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use hickory_proto::rr::RecordType;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tether_tests::{
    dns_client::{Transport, addresses, ask},
    eventually,
    system::{DOMAIN, STATIC_IP, System, client_runtime, network},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn the_whole_system_follows_every_change_in_namespaces() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run namespace tests as root");
        eprintln!("skipping: network namespace tests need root");
        return Ok(());
    }
    let ns = network(3)?;
    let runtime = client_runtime(&ns)?;
    runtime.block_on(async {
        let mut system = System::start(ns).await?;
        let result = scenario(&mut system).await;
        if let Err(error) = &result {
            eprintln!("the system test failed: {error:#}");
            system.print_logs();
        }
        result
    })
}

async fn scenario(system: &mut System) -> Result<()> {
    let started = std::time::Instant::now();
    let stage = |what: &str| eprintln!("[{:>6.2} s] {what}", started.elapsed().as_secs_f64());
    let db = system.pg.pool().await?;
    let detail = format!("/v1/domains/{DOMAIN}");
    let body = system.subscriber(Method::GET, &detail, None, StatusCode::OK).await?;
    ensure!(body.to_string().contains("E2E-1"), "the enrolled NCU is shown with its serial: {body}");
    stage("operator services up, NCU enrolled and running");

    // DNS answers all three uplinks; HTTP to the static address reaches the site through each of them.
    let all = ["198.18.1.2", "198.18.2.2", "198.18.3.2"];
    dns_follows(system, &all, "all three uplinks in DNS").await?;
    forwarder_follows(&all, "HTTP through each uplink").await?;
    system.running()?;
    stage("DNS and forwarder serve all three uplinks");

    // wan3 gets a new address: DNS and the forwarder follow, the old one is gone from both.
    system.ip("site", &["addr", "del", "198.18.3.2/24", "dev", "wan3"])?;
    system.ip("site", &["addr", "add", "198.18.3.3/24", "dev", "wan3"])?;
    tether_tests::system::default_route(&system.ns, 3)?;
    let moved = ["198.18.1.2", "198.18.2.2", "198.18.3.3"];
    dns_follows(system, &moved, "wan3's new address in DNS").await?;
    forwarder_follows(&moved, "HTTP through wan3's new address").await?;
    stage("followed wan3's new address");

    // wan2 is cut silently: the isp drops everything for it, its link stays up. It leaves DNS and the forwarder,
    // and comes back when the isp restores it.
    system.ip("isp", &["route", "add", "blackhole", "198.18.2.2/32"])?;
    let without_wan2 = ["198.18.1.2", "198.18.3.3"];
    dns_follows(system, &without_wan2, "the cut uplink out of DNS").await?;
    forwarder_follows(&without_wan2, "HTTP avoiding the cut uplink").await?;
    system.ip("isp", &["route", "del", "blackhole", "198.18.2.2/32"])?;
    dns_follows(system, &moved, "the restored uplink back in DNS").await?;
    forwarder_follows(&moved, "HTTP through the restored uplink").await?;
    stage("followed the cut and the restoration of wan2");

    // The primary heartbeat server dies: the NCU moves to its backup, and the answer is never empty meanwhile.
    let primary: String = sqlx::query_scalar("SELECT DISTINCT hbs FROM addresses WHERE source = 'ncu'")
        .fetch_one(&db)
        .await
        .context("the NCU's heartbeat server")?;
    let backup = if primary == "hbs-a" { "hbs-b" } else { "hbs-a" };
    let watch = DnsWatch::start(system.dns);
    system.process(&primary)?.kill()?;
    eventually(Duration::from_secs(30), "every uplink live on the backup", || async {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT coalesce(hbs, ''), state::text FROM addresses WHERE source = 'ncu'")
                .fetch_all(&db)
                .await
                .ok()?;
        (rows.len() == 3 && rows.iter().all(|(hbs, state)| hbs == backup && state == "live")).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (answered, empty, failed) = watch.stop().await;
    ensure!(empty == 0 && failed == 0, "during failover: {answered} answered, {empty} empty, {failed} failed");
    ensure!(answered > 50, "the watch asked too little: {answered}");
    eprintln!("  during failover: {answered} answers, none empty");
    dns_follows(system, &moved, "all three in DNS after failover").await?;
    forwarder_follows(&moved, "HTTP after failover").await?;
    stage("failed over to the backup heartbeat server");

    // Postgres restarts, and wan1 is cut while it is down: DNS keeps answering from memory, the heartbeat server
    // keeps the death until it can write it, everyone reconnects, nothing is lost.
    system.pg.stop()?;
    system.ip("isp", &["route", "add", "blackhole", "198.18.1.2/32"])?;
    for _ in 0..10 {
        ensure!(!system.answer().await?.is_empty(), "DNS answers while Postgres is down");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    system.pg.restart().await?;
    let without_wan1 = ["198.18.2.2", "198.18.3.3"];
    dns_follows(system, &without_wan1, "the death written after the restart").await?;
    forwarder_follows(&without_wan1, "HTTP avoiding wan1 after the restart").await?;
    let body = system.subscriber(Method::GET, &detail, None, StatusCode::OK).await?;
    ensure!(states(&body).get("198.18.1.2").map(String::as_str) == Some("dead"), "wan1 recorded dead: {body}");
    system.ip("isp", &["route", "del", "blackhole", "198.18.1.2/32"])?;
    dns_follows(system, &moved, "wan1 back after the restart").await?;
    forwarder_follows(&moved, "HTTP through all three after the restart").await?;
    let db = system.pg.pool().await?;
    let ncus: i64 = sqlx::query_scalar("SELECT count(*) FROM ncus").fetch_one(&db).await?;
    ensure!(ncus == 1, "the NCU's record survived: {ncus}");
    stage("Postgres restarted, nothing lost");

    // Every survivor stops cleanly on SIGTERM.
    system.running()?;
    for name in ["ncu", "packet-forwarder", backup, "hds", "dns"] {
        let status = system.process(name)?.terminate(Duration::from_secs(15))?;
        ensure!(status.success(), "{name} exited with {status}");
    }
    stage("every process stopped cleanly");
    Ok(())
}

/// address → state, from the admin API's domain detail.
fn states(domain: &Value) -> std::collections::BTreeMap<String, String> {
    domain["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| Some((a["ip"].as_str()?.to_owned(), a["state"].as_str()?.to_owned())))
        .collect()
}

/// Waits until the domain's A answer is exactly `want`.
async fn dns_follows(system: &System, want: &[&str], what: &str) -> Result<()> {
    eventually(Duration::from_secs(20), what, || async { (system.answer().await.ok()? == want).then_some(()) }).await
}

/// Waits until twelve HTTP requests in a row to the static address all succeed and reach exactly the uplinks in
/// `want` between them.
async fn forwarder_follows(want: &[&str], what: &str) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    eventually(Duration::from_secs(20), what, || async {
        let mut seen = BTreeSet::new();
        for _ in 0..12 {
            seen.insert(http_get().await.ok()?);
        }
        (seen == want).then_some(())
    })
    .await
}

/// One HTTP/1.0 request to the static address; the web server's reply names the uplink address it came in on.
async fn http_get() -> Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((STATIC_IP, 8080)).await?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: shop.e2e.test\r\n\r\n").await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(3), exchange).await??;
    ensure!(reply.starts_with("HTTP/1.0 200"), "bad reply: {reply}");
    let via = reply.rsplit("via ").next().context("no via line")?.trim().to_owned();
    Ok(via)
}

/// Asks the domain's A record every 20 ms, counting answers, empty answers and failures.
struct DnsWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64, u64)>,
}

impl DnsWatch {
    fn start(dns: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut answered, mut empty, mut failed) = (0, 0, 0);
            while !flag.load(Ordering::Relaxed) {
                match ask(dns, &format!("{DOMAIN}."), RecordType::A, Transport::Udp).await {
                    Ok(answer) if addresses(&answer).is_empty() => empty += 1,
                    Ok(_) => answered += 1,
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (answered, empty, failed)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or((0, u64::MAX, u64::MAX))
    }
}
