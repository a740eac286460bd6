//! NCU uplinks from netlink, in network namespaces made by the test: a `site` namespace with veth uplinks into an
//! `isp` namespace holding hds and hbs. Addresses change, links go down and up, an uplink loses its Internet access
//! and gets it back, a fourth uplink appears: the registered set follows every change. Needs root (CI runs it).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Result;
use ncu::{
    agent::{Drill, Status},
    identity::Identity,
    uplinks::{discovery::Settings, state::Selection, validate::Target},
};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_tests::{
    eventually,
    fleet::HbsServer,
    hds_stack::HdsServer,
    hds_stack::Pki,
    netns::Namespaces,
    stack::Stack,
    system::{add_uplink, default_route},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SERVERS: &str = "198.18.0.1";

/// `ip route show default` in the site namespace.
fn default_routes(ns: &Namespaces) -> Result<String> {
    let output =
        std::process::Command::new("ip").args(["-n", &ns.name("site"), "route", "show", "default"]).output()?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The NCU's registered uplinks as recorded by the heartbeat server: name → address.
async fn registered(db: &sqlx::PgPool) -> Option<BTreeMap<String, String>> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT uplink, host(ip) FROM addresses WHERE source = 'ncu' AND state <> 'dead' ORDER BY uplink",
    )
    .fetch_all(db)
    .await
    .ok()?;
    Some(rows.into_iter().collect())
}

fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

/// An NCU (discovery and agent) on its own thread inside the site namespace.
struct SiteNcu {
    status: watch::Receiver<Status>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SiteNcu {
    fn start(ns: &Namespaces, hds: String, identity: Identity) -> Result<Self> {
        let path = format!("/run/netns/{}", ns.name("site"));
        let (status_tx, status) = watch::channel(Status::default());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let run = || -> Result<()> {
                tether_tests::netns::enter(&path)?;
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let tls = Arc::new(tether_pki::client_tls(
                        &identity.ca_pem,
                        Some((&identity.cert_pem, &identity.key_pem)),
                        tether_proto::hds::ALPN,
                    )?);
                    let settings = Settings {
                        selection: Selection::Auto,
                        rescan_every: Duration::from_secs(30),
                        target: Target::Hds { addresses: vec![hds.clone()], tls },
                        validate_timeout: Duration::from_secs(2),
                        max_backoff: Duration::from_secs(2),
                        priorities: BTreeMap::new(),
                        weights: BTreeMap::new(),
                        manage_routes: Some(10),
                    };
                    let (uplinks_tx, uplinks_rx) = watch::channel(Vec::new());
                    let discovery = ncu::uplinks::discovery::run(settings, uplinks_tx, stop.clone());
                    let setup = ncu::agent::Setup {
                        hds: vec![hds],
                        identity,
                        failover_after: Duration::from_secs(3),
                        site: ncu::agent::SiteConfig::default(),
                        identity_dir: None,
                    };
                    let agent = ncu::agent::run(setup, uplinks_rx, Drill::default(), status_tx, stop.clone());
                    let (d, a) = tokio::join!(discovery, agent);
                    d.and(a)
                })
            };
            if let Err(error) = run() {
                tracing::error!("site NCU failed: {error:#}");
            }
        });
        Ok(Self { status, shutdown, thread: Some(thread) })
    }
}

impl Drop for SiteNcu {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registered_set_follows_addresses_links_reachability_and_new_uplinks() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run namespace tests as root");
        eprintln!("skipping: network namespace tests need root");
        return Ok(());
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let ns = Namespaces::create(&["site", "isp"])?;
    ns.ip("isp", &["addr", "add", &format!("{SERVERS}/32"), "dev", "lo"])?;
    for i in 1..=3 {
        add_uplink(&ns, i)?;
    }

    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "site.tether.test" })).await?;
    let pki = Pki::with_sans(&[SERVERS])?;
    let hds_socket = ns.within("isp", || std::net::UdpSocket::bind((SERVERS, 4433))).await??;
    let hds = HdsServer::start_on(hds_socket, &stack.pg.url(), &pki, "").await?;
    let control = ns.within("isp", || std::net::UdpSocket::bind((SERVERS, 4434))).await??;
    let heartbeat = ns.within("isp", || std::net::UdpSocket::bind((SERVERS, 4435))).await??;
    let _hbs = HbsServer::start_on(control, heartbeat, &stack.pg.url(), &pki, "hbs-isp").await?;
    let db = stack.pg.pool().await?;
    eventually(Duration::from_secs(10), "hbs in the fleet table", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM heartbeat_servers").fetch_one(&db).await.ok()?;
        (n == 1).then_some(())
    })
    .await?;

    // Enrollment from the test's namespace cannot reach 198.18.0.1; enroll from inside the site namespace.
    let (status, body) =
        stack.api.call(Method::POST, "/v1/domains/site.tether.test/enrollments", Some(&acme), None).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["token"].as_str().unwrap_or_default().to_owned();
    let dir = tempfile::tempdir()?;
    let (identity_dir, ca) = (dir.path().to_owned(), pki.ca_pem());
    let hds_address = format!("{SERVERS}:4433");
    let address = hds_address.clone();
    ns.within("site", move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(ncu::hds_client::enroll(&[address], &ca, &token, &identity_dir, None, None))?;
        anyhow::Ok(())
    })
    .await??;
    let identity = Identity::load(dir.path())?;
    let mut ncu = SiteNcu::start(&ns, hds_address, identity)?;

    let follows = |want: BTreeMap<String, String>, what: &'static str| {
        let db = db.clone();
        async move {
            eventually(Duration::from_secs(15), what, || async {
                let got = registered(&db).await?;
                (got == want).then_some(())
            })
            .await
        }
    };
    follows(set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.2"), ("wan3", "198.18.3.2")]), "three uplinks").await?;
    let status = ncu.status.wait_for(|s| s.registered.len() == 3).await?.clone();
    assert_eq!(status.hbs.as_deref(), Some("hbs-isp"));
    eventually(Duration::from_secs(10), "all three live", || async {
        let live: i64 =
            sqlx::query_scalar("SELECT count(*) FROM addresses WHERE state = 'live'").fetch_one(&db).await.ok()?;
        (live == 3).then_some(())
    })
    .await?;

    // A new lease on wan2: the old address goes, the new one is registered.
    ns.ip("site", &["addr", "del", "198.18.2.2/24", "dev", "wan2"])?;
    ns.ip("site", &["addr", "add", "198.18.2.20/24", "dev", "wan2"])?;
    default_route(&ns, 2)?;
    follows(set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.20"), ("wan3", "198.18.3.2")]), "the new address").await?;

    // wan3's link goes down: withdrawn at once; up again: validated and registered.
    ns.ip("site", &["link", "set", "wan3", "down"])?;
    let down = std::time::Instant::now();
    follows(set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.20")]), "wan3 withdrawn").await?;
    assert!(down.elapsed() < Duration::from_secs(2), "withdrawn in {:?}", down.elapsed());
    ns.ip("site", &["link", "set", "wan3", "up"])?;
    default_route(&ns, 3)?;
    follows(set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.20"), ("wan3", "198.18.3.2")]), "wan3 back").await?;

    // wan3 loses its Internet access (the isp side drops its route), and the link bounces: it fails validation
    // and stays unregistered; once the isp restores the route, a retry registers it.
    ns.ip("isp", &["addr", "del", "198.18.3.1/24", "dev", "isp3"])?;
    ns.ip("site", &["link", "set", "wan3", "down"])?;
    follows(set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.20")]), "wan3 withdrawn again").await?;
    ns.ip("site", &["link", "set", "wan3", "up"])?;
    default_route(&ns, 3)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        registered(&db).await,
        Some(set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.20")])),
        "a non-Internet uplink is not registered"
    );
    ns.ip("isp", &["addr", "add", "198.18.3.1/24", "dev", "isp3"])?;
    follows(set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.20"), ("wan3", "198.18.3.2")]), "wan3 re-checked").await?;

    // A fourth uplink appears at run time.
    add_uplink(&ns, 4)?;
    follows(
        set(&[("wan1", "198.18.1.2"), ("wan2", "198.18.2.20"), ("wan3", "198.18.3.2"), ("wan4", "198.18.4.2")]),
        "a fourth uplink",
    )
    .await?;

    // Outbound spreading: one multipath default route over the four valid uplinks, ahead of the system's own.
    let routes = default_routes(&ns)?;
    assert!(routes.contains("proto 222 metric 10"), "{routes}");
    for i in 1..=4 {
        assert!(routes.contains(&format!("nexthop via 198.18.{i}.1 dev wan{i}")), "{routes}");
    }
    // A withdrawn uplink leaves the route at once.
    ns.ip("site", &["link", "set", "wan4", "down"])?;
    eventually(Duration::from_secs(5), "wan4 out of the multipath route", || async {
        let routes = default_routes(&ns).ok()?;
        (!routes.contains("dev wan4") && routes.contains("dev wan1")).then_some(())
    })
    .await?;
    // On exit the system's routes are in force again, and tether's is gone.
    drop(ncu);
    let routes = default_routes(&ns)?;
    assert!(!routes.contains("proto 222"), "{routes}");
    for i in 1..=3 {
        assert!(routes.contains(&format!("default via 198.18.{i}.1 dev wan{i} metric 10{i}")), "{routes}");
    }
    drop(hds);
    Ok(())
}
