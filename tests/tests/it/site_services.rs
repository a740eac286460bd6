//! Service tuples configure sites and servers announce their load: a site router forwards a tuple to its LAN server
//! and checks it (the whole system in namespaces), and server agents with different loads join and leave.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use hickory_proto::rr::{RData, RecordType};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask},
    eventually,
    fleet::{Agent, Site, uplink},
    netns::Namespaces,
    system::{self, DOMAIN, System, WebServer},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

/// An HTTP/1.0 GET to `ip`:`port` from the client namespace: the web server names the address it was reached on.
async fn via(ip: &str, port: u16) -> Result<String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await?;
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        anyhow::Ok(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(3), exchange).await??;
    Ok(reply.rsplit("via ").next().context("no via line")?.trim().to_owned())
}

/// The targets and ports of `_web._tcp.<DOMAIN>` SRV.
async fn srv(system: &System) -> Result<Vec<u16>> {
    let answer = ask(system.dns, &format!("_web._tcp.{DOMAIN}."), RecordType::SRV, Transport::Udp).await?;
    Ok(answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(srv.port),
            _ => None,
        })
        .collect())
}

#[test]
fn a_tuple_configures_the_site_router_and_its_health_its_answers() -> Result<()> {
    let ns = system::network(1)?;
    // The site's LAN: 198.19.1.10 behind the router's lan0 198.19.1.1.
    let lan = Namespaces::create(&["lan"])?;
    tether_tests::netns::ip(&[
        "link",
        "add",
        "lan0",
        "netns",
        &ns.name("site"),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &lan.name("lan"),
    ])?;
    ns.ip("site", &["addr", "add", "198.19.1.1/24", "dev", "lan0"])?;
    ns.ip("site", &["link", "set", "lan0", "up"])?;
    lan.ip("lan", &["addr", "add", "198.19.1.10/24", "dev", "eth0"])?;
    lan.ip("lan", &["link", "set", "eth0", "up"])?;
    lan.ip("lan", &["route", "add", "default", "via", "198.19.1.1"])?;
    system::sh(&ns, "site", "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    let lan_path = format!("/run/netns/{}", lan.name("lan"));
    let runtime = system::client_runtime(&ns)?;
    runtime.block_on(async {
        let ncu = "[services.web]\nto = '198.19.1.10:8080'\n";
        let mut system = System::start_with_ncu(ns, ncu).await?;
        let result = router_scenario(&mut system, &lan_path).await;
        if let Err(error) = &result {
            eprintln!("the site services test failed: {error:#}");
            system.print_logs();
        }
        result
    })
}

async fn router_scenario(system: &mut System, lan_path: &str) -> Result<()> {
    let mut web = Some(WebServer::start(lan_path)?);
    eventually(Duration::from_secs(30), "wan1 in DNS", || async {
        (system.answer().await.ok()? == ["198.18.1.2"]).then_some(())
    })
    .await?;
    ensure!(via("198.18.1.2", 8081).await.is_err(), "nothing on the uplink's port 8081 before the tuple");

    // A tuple through the API: the router forwards it to the LAN server.
    let services = format!("/v1/domains/{DOMAIN}/services");
    let tuple = json!([{ "service": "web", "transport": "tcp", "ip": "198.18.1.2", "port": 8081 }]);
    let added = Instant::now();
    system.subscriber(Method::PUT, &services, Some(tuple.clone()), StatusCode::OK).await?;
    eventually(Duration::from_secs(2), "the uplink's port 8081 to reach the LAN server", || async {
        (via("198.18.1.2", 8081).await.ok()? == "198.19.1.10").then_some(())
    })
    .await?;
    eprintln!("tuple added: the LAN server answers on the uplink after {:?}", added.elapsed());
    assert_eq!(srv(system).await?, [8081]);

    // The tuple goes: so does the forward.
    system.subscriber(Method::PUT, &services, Some(json!([])), StatusCode::OK).await?;
    eventually(WAIT, "the forward to go", || async { via("198.18.1.2", 8081).await.is_err().then_some(()) }).await?;

    // Back, then the LAN server stops: the tuple leaves the SRV answers, the uplink stays; and returns with it.
    system.subscriber(Method::PUT, &services, Some(tuple), StatusCode::OK).await?;
    eventually(WAIT, "the forward again", || async {
        (via("198.18.1.2", 8081).await.ok()? == "198.19.1.10").then_some(())
    })
    .await?;
    drop(web.take());
    let stopped = Instant::now();
    eventually(WAIT, "the failing tuple to leave SRV", || async { srv(system).await.ok()?.is_empty().then_some(()) })
        .await?;
    eprintln!("LAN server stopped: out of SRV after {:?}", stopped.elapsed());
    assert_eq!(system.answer().await?, ["198.18.1.2"], "the uplink stays live");
    let body = system.subscriber(Method::GET, &format!("/v1/domains/{DOMAIN}"), None, StatusCode::OK).await?;
    let reason = body["services"][0]["health_reason"].as_str().unwrap_or_default().to_owned();
    assert!(body["services"][0]["healthy"] == false && reason.contains("198.19.1.10:8080"), "{body}");
    web = Some(WebServer::start(lan_path)?);
    eventually(WAIT, "the tuple back in SRV", || async { (srv(system).await.ok()? == [8081]).then_some(()) }).await?;
    let log = system.process("ncu")?.log_tail(400);
    for line in [
        "service tuples from the heartbeat server",
        "port forward installed",
        "port forward removed",
        "service failing",
    ] {
        assert!(log.contains(line), "ncu's log should say {line:?}");
    }
    drop(web);
    system.running()
}

/// The domain's A answers, `n` times: which address came first each time.
async fn firsts(site: &Site, n: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let answer = ask(site.stack.dns.dns_addr, "site.tether.test.", RecordType::A, Transport::Udp).await?;
        out.push(addresses(&answer).first().cloned().unwrap_or_default());
    }
    Ok(out)
}

async fn answered(site: &Site) -> Result<BTreeSet<String>> {
    let answer = ask(site.stack.dns.dns_addr, "site.tether.test.", RecordType::A, Transport::Udp).await?;
    Ok(addresses(&answer).into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_announce_their_load_and_join_and_leave_without_configuration() -> Result<()> {
    let site = Site::start().await?;
    let dir = tempfile::tempdir()?;
    let mut agents: Vec<(String, Agent)> = Vec::new();
    let start = |ip: &str, load: u32| {
        let (dir, ip, site) = (dir.path().to_owned(), ip.to_owned(), &site);
        async move {
            let path = dir.join(format!("load-{ip}"));
            std::fs::write(&path, format!("{load}\n"))?;
            let home = dir.join(format!("identity-{ip}"));
            std::fs::create_dir_all(&home)?;
            let identity = site.enroll(&home).await?;
            let config = ncu::agent::SiteConfig { load: ncu::load::LoadSource::File(path), ..Default::default() };
            anyhow::Ok((
                ip.clone(),
                Agent::start_with(vec![site.hds.address()], identity, vec![uplink("eth0", &ip)], config),
            ))
        }
    };
    for (ip, load) in [("127.0.0.2", 10), ("127.0.0.3", 10), ("127.0.0.4", 90)] {
        agents.push(start(ip, load).await?);
    }
    // All three live, the loaded one held back: never first (never answered at all while the others are light).
    let pool = site.stack.pg.pool().await?;
    eventually(WAIT, "three servers live with their loads", || async {
        let rows: Vec<(f32,)> = sqlx::query_as("SELECT load FROM addresses WHERE state = 'live' ORDER BY ip")
            .fetch_all(&pool)
            .await
            .ok()?;
        (rows.iter().map(|r| r.0 as u32).collect::<Vec<_>>() == [10, 10, 90]).then_some(())
    })
    .await?;
    eventually(WAIT, "the answers to hold the loaded server back", || async {
        (answered(&site).await.ok()? == BTreeSet::from(["127.0.0.2".to_owned(), "127.0.0.3".to_owned()])).then_some(())
    })
    .await?;
    let first = firsts(&site, 20).await?;
    assert!(!first.contains(&"127.0.0.4".to_owned()), "the loaded server is never first: {first:?}");
    assert!(first.contains(&"127.0.0.2".to_owned()) && first.contains(&"127.0.0.3".to_owned()), "{first:?}");

    // One dies: out of the answers; a fourth joins with nothing configured anywhere: in.
    let (_, killed) = agents.remove(0);
    killed.stop().await?;
    let stopped = Instant::now();
    // Heartbeat detection takes at most 1.42 s (the bench measures its p99); 3 s leaves room for a loaded machine.
    eventually(Duration::from_secs(3), "the stopped server to leave the answers", || async {
        (!answered(&site).await.ok()?.contains("127.0.0.2")).then_some(())
    })
    .await?;
    eprintln!("a stopped server left the answers after {:?}", stopped.elapsed());
    agents.push(start("127.0.0.5", 10).await?);
    eventually(WAIT, "the new server to be answered", || async {
        (answered(&site).await.ok()? == BTreeSet::from(["127.0.0.3".to_owned(), "127.0.0.5".to_owned()])).then_some(())
    })
    .await?;
    // A tuple on a server's address starts its service there (a command of its configuration), and its removal
    // stops it.
    let marker = dir.path().join("web-running");
    let web = ncu::services::ServiceConfig {
        start: vec!["touch".into(), marker.display().to_string()],
        stop: vec!["rm".into(), "-f".into(), marker.display().to_string()],
        check: ncu::services::CheckKind::None,
        ..Default::default()
    };
    let home = dir.path().join("identity-127.0.0.6");
    std::fs::create_dir_all(&home)?;
    let identity = site.enroll(&home).await?;
    let load = dir.path().join("load-127.0.0.6");
    std::fs::write(&load, "10\n")?;
    let config =
        ncu::agent::SiteConfig { services: [("web".to_owned(), web)].into(), load: ncu::load::LoadSource::File(load) };
    agents.push((
        "127.0.0.6".into(),
        Agent::start_with(vec![site.hds.address()], identity, vec![uplink("eth0", "127.0.0.6")], config),
    ));
    eventually(WAIT, "the sixth server live", || async {
        answered(&site).await.ok()?.contains("127.0.0.6").then_some(())
    })
    .await?;
    let services = "/v1/domains/site.tether.test/services";
    let tuple = json!([{ "service": "web", "transport": "tcp", "ip": "127.0.0.6", "port": 8443 }]);
    let (status, body) = site.stack.api.call(Method::PUT, services, Some(&site.token), Some(tuple)).await?;
    ensure!(status == StatusCode::OK, "{body}");
    eventually(WAIT, "the service started", || async { marker.exists().then_some(()) }).await?;
    let (status, body) = site.stack.api.call(Method::PUT, services, Some(&site.token), Some(json!([]))).await?;
    ensure!(status == StatusCode::OK, "{body}");
    eventually(WAIT, "the service stopped", || async { (!marker.exists()).then_some(()) }).await?;

    // The loaded one lightens: it is answered again.
    std::fs::write(dir.path().join("load-127.0.0.4"), "12\n")?;
    eventually(WAIT, "the lightened server back in the answers", || async {
        (answered(&site).await.ok()?.len() == 4).then_some(())
    })
    .await?;
    for (_, agent) in agents {
        agent.stop().await?;
    }
    site.stop().await
}
