//! Two master dns sites on one anycast address (issue 21), every part real, in network namespaces:
//!
//! ```text
//!   client 198.18.3.2 ---- router (BIRD: BGP + BFD to both masters, best route into the kernel)
//!                           /                                   \
//!   master a 198.18.1.2 (lo: 198.18.100.53)         master b 198.18.2.2 (lo: 198.18.100.53)
//!     Postgres primary (TCP 198.18.4.1) ---- a-b link ---- Postgres hot standby (pg_basebackup -R)
//!     dns (view from the primary)                          dns (writes to a's primary, view from its standby)
//!     dns-monitor + BIRD                                   dns-monitor + BIRD
//! ```
//!
//! The client asks the anycast address every 20 ms while dns at a is killed, a's Postgres stopped, a's link cut,
//! and a partitioned from b with the API written at both; each time the longest gap without an answer is measured,
//! and the serials the client sees never go backwards. Needs root and BIRD (CI runs it).

use std::{
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use hickory_proto::rr::{RData, RecordType};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_tests::{
    Postgres,
    dns_client::{Transport, addresses, ask, sorted},
    eventually,
    netns::Namespaces,
    stack::{Api, OPERATOR_TOKEN},
    system::{Process, binaries, run_in, sh, veth},
};

const SERVICE: &str = "198.18.100.53";
const NAME: &str = "www.tether.test.";

/// One probe of the client: when, the addresses answered (none: no answer), the zone's serial.
#[derive(Debug, Clone)]
struct Seen {
    at: Duration,
    answer: Option<Vec<String>>,
    serial: Option<u32>,
}

struct Pair {
    ns: Namespaces,
    bin: PathBuf,
    work: tempfile::TempDir,
    processes: Vec<Process>,
    pg_a: Postgres,
    _pg_b: Postgres,
    api_a: Api,
    api_b: Api,
    started: Instant,
}

#[test]
fn two_masters_on_one_anycast_address_keep_answering_through_every_failure() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run namespace tests as root");
        eprintln!("skipping: network namespace tests need root");
        return Ok(());
    }
    if !Path::new("/usr/sbin/bird").exists() {
        assert!(std::env::var_os("CI").is_none(), "CI must have BIRD (scripts/install-deps installs bird2)");
        eprintln!("skipping: BIRD is not installed (scripts/install-deps installs bird2)");
        return Ok(());
    }
    let ns = network()?;
    let runtime = tether_tests::system::client_runtime(&ns)?;
    runtime.block_on(async {
        let mut pair = Pair::start(ns).await?;
        let result = scenario(&mut pair).await;
        if let Err(error) = &result {
            eprintln!("the anycast test failed: {error:#}");
            pair.print_logs();
        }
        result
    })
}

/// Namespaces `router`, `a`, `b`, `client`, wired as the module's picture shows.
fn network() -> Result<Namespaces> {
    let ns = Namespaces::create(&["router", "a", "b", "client"])?;
    for name in ["router", "a", "b", "client"] {
        sh(
            &ns,
            name,
            "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter",
        )?;
    }
    sh(&ns, "router", "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    for (site, dev, peer, net) in [("a", "a0", "ra", 1), ("b", "b0", "rb", 2), ("client", "c0", "rc", 3)] {
        veth(&ns, (site, dev), ("router", peer))?;
        ns.ip(site, &["addr", "add", &format!("198.18.{net}.2/30"), "dev", dev])?;
        ns.ip("router", &["addr", "add", &format!("198.18.{net}.1/30"), "dev", peer])?;
        ns.ip(site, &["route", "add", "default", "via", &format!("198.18.{net}.1")])?;
    }
    veth(&ns, ("a", "ab"), ("b", "ba"))?;
    ns.ip("a", &["addr", "add", "198.18.4.1/30", "dev", "ab"])?;
    ns.ip("b", &["addr", "add", "198.18.4.2/30", "dev", "ba"])?;
    for site in ["a", "b"] {
        ns.ip(site, &["addr", "add", &format!("{SERVICE}/32"), "dev", "lo"])?;
    }
    Ok(ns)
}

/// `text` with the BIRD constant `name` (a `define name = …;` line) set to `value`, or the `router id`.
fn define(text: &str, name: &str, value: &str) -> String {
    text.lines()
        .map(|line| {
            if name == "router id" && line.starts_with("router id ") {
                format!("router id {value};")
            } else if line.starts_with(&format!("define {name} =")) {
                format!("define {name} = {value};")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Pair {
    async fn start(ns: Namespaces) -> Result<Self> {
        let bin = binaries()?;
        let work = tempfile::Builder::new().prefix("tether-anycast-").tempdir()?;
        let pg_a = Postgres::start_listening(Some(ns.name("a")), Some("198.18.4.1")).await?;
        let pg_b = Postgres::standby_via(&pg_a, Some(("198.18.4.1", Some(ns.name("b"))))).await?;
        let api_a = Api::new("198.18.1.2:8053".parse()?);
        let api_b = Api::new("198.18.2.2:8053".parse()?);
        let mut pair =
            Self { ns, bin, work, processes: Vec::new(), pg_a, _pg_b: pg_b, api_a, api_b, started: Instant::now() };
        if let Err(error) = pair.boot().await {
            pair.print_logs();
            return Err(error);
        }
        Ok(pair)
    }

    async fn boot(&mut self) -> Result<()> {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/bird");
        let master = std::fs::read_to_string(deploy.join("master.conf"))?;
        let router = std::fs::read_to_string(deploy.join("router.conf"))?;
        let router = define(&define(&router, "MASTER_A", "198.18.1.2"), "MASTER_B", "198.18.2.2");
        self.bird("router", &router)?;
        for (site, net, local_as) in [("a", 1, "65001"), ("b", 2, "65002")] {
            let conf = define(&master, "ROUTER", &format!("198.18.{net}.1"));
            let conf = define(&define(&conf, "LOCAL_AS", local_as), "router id", &format!("198.18.{net}.2"));
            self.bird(site, &conf)?;
        }
        self.dns("a").await?;
        self.dns("b").await?;
        let canary = "canary = 'tether.test.'\ninterval = '100ms'\nfall = 3\nrise = 3\n";
        for site in ["a", "b"] {
            let socket = self.work.path().join(format!("bird-{site}.ctl"));
            let url = if site == "a" { self.pg_a.url() } else { self._pg_b.url() };
            let config =
                format!("dns = '{SERVICE}:53'\n{canary}database_url = '{url}'\nbird_socket = '{}'\n", socket.display());
            self.spawn(&format!("monitor-{site}"), site, "dns-monitor", &config)?;
        }
        Ok(())
    }

    /// Starts dns at `site`: at a on the primary, at b writing to a's primary and reading its own standby.
    async fn dns(&mut self, site: &str) -> Result<()> {
        let (api, database, view) = if site == "a" {
            ("198.18.1.2:8053", self.pg_a.url(), String::new())
        } else {
            (
                "198.18.2.2:8053",
                "postgres://postgres@198.18.4.1:5432/postgres".to_owned(),
                format!("view_database_url = '{}'\n", self._pg_b.url()),
            )
        };
        let config = format!(
            "dns_listen = '{SERVICE}:53'\napi_listen = '{api}'\ndatabase_url = '{database}'\n{view}\
             operator_token = '{OPERATOR_TOKEN}'\nmax_backoff = '500ms'\nallowed_target_ranges = ['198.18.0.0/15']\n\
             rrl_exempt = ['127.0.0.0/8', '198.18.0.0/15']\n"
        );
        self.spawn(&format!("dns-{site}"), site, "dns", &config)?;
        let api = if site == "a" { self.api_a.clone() } else { self.api_b.clone() };
        eventually(Duration::from_secs(30), &format!("dns at {site}"), || async {
            api.call(Method::GET, "/healthz", None, None).await.ok().filter(|(s, _)| s.is_success())
        })
        .await?;
        Ok(())
    }

    fn bird(&mut self, site: &str, conf: &str) -> Result<()> {
        let path = self.work.path().join(format!("bird-{site}.conf"));
        std::fs::write(&path, conf)?;
        let socket = self.work.path().join(format!("bird-{site}.ctl"));
        let args: Vec<&OsStr> = vec!["-f".as_ref(), "-c".as_ref(), path.as_os_str(), "-s".as_ref(), socket.as_os_str()];
        let log = self.work.path().join(format!("bird-{site}.log"));
        let process =
            Process::spawn(&format!("bird-{site}"), &self.ns.name(site), Path::new("/usr/sbin/bird"), &args, &[], log)?;
        self.processes.push(process);
        Ok(())
    }

    fn spawn(&mut self, name: &str, site: &str, binary: &str, config: &str) -> Result<()> {
        let path = self.work.path().join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let args: Vec<&OsStr> = vec!["--config".as_ref(), path.as_os_str()];
        let log = self.work.path().join(format!("{name}.log"));
        let env = [("RUST_LOG", "info,hickory_server=warn")];
        let process = Process::spawn(name, &self.ns.name(site), &self.bin.join(binary), &args, &env, log)?;
        self.processes.push(process);
        Ok(())
    }

    fn process(&mut self, name: &str) -> Result<&mut Process> {
        self.processes.iter_mut().find(|p| p.name == name).with_context(|| format!("no process {name}"))
    }

    /// Which master the router sends the service address to.
    fn route(&self) -> String {
        let socket = self.work.path().join("bird-router.ctl");
        let args: Vec<&OsStr> = vec![
            "-s".as_ref(),
            socket.as_os_str(),
            "show".as_ref(),
            "route".as_ref(),
            "for".as_ref(),
            SERVICE.as_ref(),
        ];
        let shown = run_in(&self.ns.name("router"), Path::new("/usr/sbin/birdc"), &args).unwrap_or_default();
        if shown.contains("198.18.1.2") {
            "a".into()
        } else if shown.contains("198.18.2.2") {
            "b".into()
        } else {
            "none".into()
        }
    }

    fn stage(&self, what: &str) {
        eprintln!("[{:>7.2} s] route → {:<4} {what}", self.started.elapsed().as_secs_f64(), self.route());
    }

    fn print_logs(&self) {
        for process in &self.processes {
            eprintln!("----- {} (last 30 lines)\n{}", process.name, process.log_tail(30));
        }
    }

    /// The addresses master `site`'s own dns answers (asked inside its namespace).
    async fn local_answer(&self, site: &str) -> Option<Vec<String>> {
        let asked = self
            .ns
            .within(site, || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                runtime.block_on(async {
                    let target: SocketAddr = format!("{SERVICE}:53").parse().ok()?;
                    let response = ask(target, NAME, RecordType::A, Transport::Udp).await.ok()?;
                    Some(sorted(addresses(&response)))
                })
            })
            .await;
        asked.ok().flatten()
    }
}

/// Asks the anycast address every 20 ms until `stop`, recording what came back.
async fn probe(started: Instant, seen: Arc<Mutex<Vec<Seen>>>, stop: tokio_util::sync::CancellationToken) {
    let service: SocketAddr = format!("{SERVICE}:53").parse().expect("address");
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    // Bounded: the scenario takes about a minute.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stop.is_cancelled() && Instant::now() < deadline {
        tick.tick().await;
        let ask_one =
            |rtype| tokio::time::timeout(Duration::from_millis(150), ask(service, NAME, rtype, Transport::Udp));
        let (a, soa) = tokio::join!(ask_one(RecordType::A), async {
            let r = tokio::time::timeout(
                Duration::from_millis(150),
                ask(service, "tether.test.", RecordType::SOA, Transport::Udp),
            );
            r.await
        });
        let answer = a.ok().and_then(Result::ok).map(|m| sorted(addresses(&m)));
        let serial = soa.ok().and_then(Result::ok).and_then(|m| {
            m.answers.iter().find_map(|r| match &r.data {
                RData::SOA(s) => Some(s.serial),
                _ => None,
            })
        });
        let at = started.elapsed();
        seen.lock().expect("lock").push(Seen { at, answer: answer.filter(|a| !a.is_empty()), serial });
    }
}

/// The longest time without an answer among the probes from `from` on.
fn longest_gap(seen: &[Seen], from: Duration) -> Duration {
    // From the last answer before `from`.
    let mut last_ok: Option<Duration> = seen.iter().rev().find(|p| p.at < from && p.answer.is_some()).map(|p| p.at);
    let mut longest = Duration::ZERO;
    for probe in seen.iter().filter(|p| p.at >= from) {
        if probe.answer.is_some() {
            if let Some(last) = last_ok {
                longest = longest.max(probe.at - last);
            }
            last_ok = Some(probe.at);
        }
    }
    longest
}

async fn scenario(pair: &mut Pair) -> Result<()> {
    // Data, through a's API.
    let (status, body) = pair
        .api_a
        .call(
            Method::POST,
            "/v1/zones",
            Some(OPERATOR_TOKEN),
            Some(json!({ "origin": "tether.test", "nameservers": [{ "name": "ns1.tether.test", "ips": [SERVICE] }] })),
        )
        .await?;
    ensure!(status == StatusCode::CREATED, "zone: {status} {body}");
    let (status, body) =
        pair.api_a.call(Method::POST, "/v1/subscribers", Some(OPERATOR_TOKEN), Some(json!({ "name": "acme" }))).await?;
    ensure!(status == StatusCode::CREATED, "subscriber: {status} {body}");
    let token = body["token"].as_str().context("token")?.to_owned();
    let (status, body) =
        pair.api_a.call(Method::POST, "/v1/domains", Some(&token), Some(json!({ "name": "www.tether.test" }))).await?;
    ensure!(status == StatusCode::CREATED, "domain: {status} {body}");
    let add = |api: &Api, ip: &str| {
        let (api, token, ip) = (api.clone(), token.clone(), ip.to_owned());
        async move {
            let body = json!({ "ip": ip });
            let call = api.call(Method::POST, "/v1/domains/www.tether.test/addresses", Some(&token), Some(body));
            tokio::time::timeout(Duration::from_secs(10), call).await.map_err(|_| anyhow::anyhow!("no answer"))?
        }
    };
    let (status, body) = add(&pair.api_a, "198.18.50.1").await?;
    ensure!(status == StatusCode::CREATED, "address: {status} {body}");
    eventually(Duration::from_secs(30), "both masters healthy and the route to a", || async {
        (pair.route() == "a" && pair.local_answer("b").await? == ["198.18.50.1"]).then_some(())
    })
    .await?;
    pair.stage("both masters up; the router prefers a (lower router id)");

    let seen = Arc::new(Mutex::new(Vec::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let prober = tokio::spawn(probe(pair.started, seen.clone(), stop.clone()));
    let started = pair.started;
    let now = move || started.elapsed();
    let answered = |since: Duration| {
        let seen = seen.clone();
        async move {
            eventually(Duration::from_secs(15), "answers again", || async {
                seen.lock().ok()?.iter().rev().take(5).all(|p| p.at > since && p.answer.is_some()).then_some(())
            })
            .await
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut gaps = Vec::new();

    // 1. dns at a dies.
    let t = now();
    pair.process("dns-a")?.kill()?;
    pair.stage("killed dns at a");
    answered(t).await?;
    eventually(Duration::from_secs(5), "the route to b", || async { (pair.route() == "b").then_some(()) }).await?;
    gaps.push(("dns at a killed", longest_gap(&seen.lock().expect("lock"), t)));
    pair.stage("answers come from b");
    pair.processes.retain(|p| p.name != "dns-a");
    pair.dns("a").await?;
    eventually(Duration::from_secs(15), "the route back to a", || async { (pair.route() == "a").then_some(()) })
        .await?;
    pair.stage("dns at a back; route back to a");

    // 2. a's Postgres (the primary) stops: a's view cannot be shown fresh, nor b's (its standby lost its primary);
    // both stay announced (degraded) and answer from their last view.
    let t = now();
    pair.pg_a.stop()?;
    pair.stage("stopped a's Postgres");
    tokio::time::sleep(Duration::from_secs(2)).await;
    gaps.push(("a's Postgres stopped", longest_gap(&seen.lock().expect("lock"), t)));
    pair.stage("both degraded, both answering");
    pair.pg_a.restart().await?;
    eventually(Duration::from_secs(15), "healthy again, route to a", || async {
        (pair.route() == "a" && pair.local_answer("b").await.is_some()).then_some(())
    })
    .await?;
    pair.stage("a's Postgres back");

    // 3. a's link is cut at the router.
    let t = now();
    pair.ns.ip("router", &["link", "set", "ra", "down"])?;
    pair.stage("cut a's link");
    answered(t).await?;
    gaps.push(("a's link cut", longest_gap(&seen.lock().expect("lock"), t)));
    pair.stage("answers come from b");
    pair.ns.ip("router", &["link", "set", "ra", "up"])?;
    eventually(Duration::from_secs(20), "the route back to a", || async { (pair.route() == "a").then_some(()) })
        .await?;
    pair.stage("a's link back");

    // 4. a and b partitioned while the API is written at both: a takes its write; b, whose primary is out of reach,
    // refuses it (the client is told, nothing is half-written). b's view cannot be shown fresh: it is demoted.
    let t = now();
    pair.ns.ip("a", &["link", "set", "ab", "down"])?;
    pair.stage("partitioned a from b");
    let (status_a, body_a) = add(&pair.api_a, "198.18.50.2").await?;
    ensure!(status_a == StatusCode::CREATED, "a's write: {status_a} {body_a}");
    let at_b = add(&pair.api_b, "198.18.50.3").await;
    let refused_at_b = match &at_b {
        Ok((status, _)) => status.is_server_error(),
        Err(_) => true,
    };
    ensure!(refused_at_b, "b cannot write without its primary: {at_b:?}");
    eprintln!("           write at b during the partition: {:?}", at_b.as_ref().map(|(s, b)| format!("{s} {b}")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    gaps.push(("a and b partitioned", longest_gap(&seen.lock().expect("lock"), t)));
    let healed = Instant::now();
    pair.ns.ip("a", &["link", "set", "ab", "up"])?;
    let want = ["198.18.50.1", "198.18.50.2"];
    eventually(Duration::from_secs(10), "a's write at b after healing", || async {
        (pair.local_answer("b").await? == want).then_some(())
    })
    .await?;
    let caught_up = healed.elapsed();
    ensure!(pair.local_answer("a").await.is_some_and(|a| a == want), "a has its own write");
    pair.stage(&format!("healed; b had a's write {caught_up:?} later"));
    let (status, body) = add(&pair.api_b, "198.18.50.4").await?;
    ensure!(status == StatusCode::CREATED, "b writes again after healing: {status} {body}");
    let want = ["198.18.50.1", "198.18.50.2", "198.18.50.4"];
    for site in ["a", "b"] {
        eventually(Duration::from_secs(5), &format!("b's write at {site}"), || async {
            (pair.local_answer(site).await? == want).then_some(())
        })
        .await?;
    }
    pair.stage("b's write after healing is at both");

    stop.cancel();
    prober.await?;
    let seen = seen.lock().expect("lock").clone();
    let serials: Vec<u32> = seen.iter().filter_map(|p| p.serial).collect();
    let backwards = serials.windows(2).filter(|w| w[1] < w[0]).count();
    eprintln!(
        "\nprobes: {} ({} answered), serials seen {:?}..{:?}",
        seen.len(),
        seen.iter().filter(|p| p.answer.is_some()).count(),
        serials.first(),
        serials.last()
    );
    for (what, gap) in &gaps {
        eprintln!("  longest gap without an answer, {what:<22}: {gap:?}");
    }
    eprintln!("  a's write reached b after healing in {caught_up:?}");
    ensure!(backwards == 0, "serials went backwards {backwards} times: {serials:?}");
    for (what, gap) in &gaps {
        // The goal is 1 s (bench figures in the closing note); the bound here is behaviour on a loaded machine.
        if *gap > Duration::from_secs(3) {
            bail!("{what}: {gap:?} without an answer");
        }
    }
    Ok(())
}
