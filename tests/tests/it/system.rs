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
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use hickory_proto::rr::RecordType;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tether_tests::{
    Postgres,
    dns_client::{Transport, addresses, ask},
    eventually,
    netns::Namespaces,
    stack::{Api, expect},
    system::{Process, binaries, run_in},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPERATOR: &str = "198.18.0.1";
const STATIC_IP: &str = "198.18.0.10";
const TOKEN: &str = "operator-token-for-the-system-test";
const DOMAIN: &str = "shop.e2e.test";

#[test]
fn the_whole_system_follows_every_change_in_namespaces() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run namespace tests as root");
        eprintln!("skipping: network namespace tests need root");
        return Ok(());
    }
    let bin = binaries()?;
    let ns = Namespaces::create(&["op", "isp", "site", "client"])?;
    wire(&ns)?;
    // This test's own sockets (DNS, HTTP, the admin API) are made in the client namespace: every worker thread of
    // its runtime enters it first. Postgres is reached over its Unix socket from there.
    let client = format!("/run/netns/{}", ns.name("client"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || tether_tests::netns::enter(&client).expect("entering the client namespace"))
        .build()?;
    let work = tempfile::Builder::new().prefix("tether-system-").tempdir()?;
    let paths =
        Paths { op: ns.name("op"), isp: ns.name("isp"), site: ns.name("site"), bin, work: work.path().to_owned() };
    // The scenario's processes are killed when it ends, whatever the outcome; the namespaces go after them.
    runtime.block_on(async { runtime.spawn(scenario_in(paths)).await? })
}

/// Where the scenario runs: the namespaces' full names, the binaries, a working directory.
#[derive(Clone)]
struct Paths {
    op: String,
    isp: String,
    site: String,
    bin: PathBuf,
    work: PathBuf,
}

/// Links, addresses and routes: the isp routes between the operator, the site's three uplinks and the client.
fn wire(ns: &Namespaces) -> Result<()> {
    for name in ["op", "isp", "site", "client"] {
        // Replies of the site's web server leave by its preferred default route, whichever uplink the request came
        // in on: no reverse-path filtering anywhere (a namespace inherits the host's setting otherwise).
        sh(
            ns,
            name,
            "for f in /proc/sys/net/ipv4/conf/all/rp_filter /proc/sys/net/ipv4/conf/default/rp_filter; do echo 0 > $f; done",
        )?;
    }
    sh(ns, "isp", "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    veth(ns, ("op", "op0"), ("isp", "iop"))?;
    ns.ip("op", &["addr", "add", &format!("{OPERATOR}/24"), "dev", "op0"])?;
    ns.ip("op", &["addr", "add", &format!("{STATIC_IP}/24"), "dev", "op0"])?;
    ns.ip("isp", &["addr", "add", "198.18.0.254/24", "dev", "iop"])?;
    ns.ip("op", &["route", "add", "default", "via", "198.18.0.254"])?;
    veth(ns, ("client", "cl0"), ("isp", "icl"))?;
    ns.ip("client", &["addr", "add", "198.18.9.1/24", "dev", "cl0"])?;
    ns.ip("isp", &["addr", "add", "198.18.9.254/24", "dev", "icl"])?;
    ns.ip("client", &["route", "add", "default", "via", "198.18.9.254"])?;
    for i in 1..=3 {
        let (wan, peer) = (format!("wan{i}"), format!("isp{i}"));
        veth(ns, ("site", &wan), ("isp", &peer))?;
        ns.ip("site", &["addr", "add", &format!("198.18.{i}.2/24"), "dev", &wan])?;
        ns.ip("isp", &["addr", "add", &format!("198.18.{i}.1/24"), "dev", &peer])?;
        default_route(ns, i)?;
    }
    Ok(())
}

/// A veth pair with one end in each namespace, both up.
fn veth(ns: &Namespaces, (a, a_dev): (&str, &str), (b, b_dev): (&str, &str)) -> Result<()> {
    tether_tests::netns::ip(&[
        "link",
        "add",
        a_dev,
        "netns",
        &ns.name(a),
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        &ns.name(b),
    ])?;
    ns.ip(a, &["link", "set", a_dev, "up"])?;
    ns.ip(b, &["link", "set", b_dev, "up"])
}

fn default_route(ns: &Namespaces, i: u8) -> Result<()> {
    let metric = (100 + u32::from(i)).to_string();
    ns.ip(
        "site",
        &["route", "replace", "default", "via", &format!("198.18.{i}.1"), "dev", &format!("wan{i}"), "metric", &metric],
    )
}

fn sh(ns: &Namespaces, name: &str, script: &str) -> Result<()> {
    run_in(&ns.name(name), Path::new("sh"), &[OsStr::new("-c"), OsStr::new(script)])?;
    Ok(())
}

/// Runs the scenario; on failure, prints the end of every process's log.
async fn scenario_in(paths: Paths) -> Result<()> {
    let mut processes = Processes { list: Vec::new(), paths: paths.clone() };
    let result = scenario(&paths, &mut processes).await;
    if let Err(error) = &result {
        eprintln!("the system test failed: {error:#}");
        for process in &processes.list {
            eprintln!("----- {} (last 40 lines)\n{}", process.name, process.log_tail(40));
        }
    }
    result
}

struct Processes {
    list: Vec<Process>,
    paths: Paths,
}

impl Processes {
    /// Starts a tether binary (`command` is the binary and its subcommand, if any) in namespace `netns` with
    /// `--config <work>/<name>.toml` written from `config`.
    fn start(&mut self, name: &str, command: &str, netns: &str, config: &str, env: &[(&str, &str)]) -> Result<()> {
        let path = self.paths.work.join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let mut words = command.split_whitespace();
        let binary = words.next().context("empty command")?;
        let args: Vec<&OsStr> = words.map(OsStr::new).chain([OsStr::new("--config"), path.as_os_str()]).collect();
        let mut all_env = vec![("RUST_LOG", "info,hickory_server=warn")];
        all_env.extend_from_slice(env);
        let log = self.paths.work.join(format!("{name}.log"));
        let process = Process::spawn(name, netns, &self.paths.bin.join(binary), &args, &all_env, log)?;
        self.list.push(process);
        Ok(())
    }

    fn get(&mut self, name: &str) -> Result<&mut Process> {
        self.list.iter_mut().find(|p| p.name == name).with_context(|| format!("no process {name}"))
    }

    fn all_running(&mut self) -> Result<()> {
        self.list.iter_mut().try_for_each(Process::running)
    }
}

async fn scenario(paths: &Paths, processes: &mut Processes) -> Result<()> {
    let started = std::time::Instant::now();
    let stage = |what: &str| eprintln!("[{:>6.2} s] {what}", started.elapsed().as_secs_f64());
    // Postgres and the operator's services.
    let mut pg = Postgres::start_in(Some(paths.op.clone())).await?;
    let url = pg.url();
    let env = [("DATABASE_URL", url.as_str()), ("TETHER_OPERATOR_TOKEN", TOKEN)];
    let pki = paths.work.join("pki");
    let pki_args: Vec<&OsStr> = ["pki", "init", "--dir"]
        .iter()
        .map(OsStr::new)
        .chain([pki.as_os_str()])
        .chain(
            ["--server", "hds-1=198.18.0.1", "--server", "hbs-a=198.18.0.1", "--server", "hbs-b=198.18.0.1"]
                .map(OsStr::new),
        )
        .collect();
    run_in(&paths.op, &paths.bin.join("hds"), &pki_args)?;
    let pki_path = |file: &str| pki.join(file).display().to_string();
    processes.start(
        "dns",
        "dns",
        &paths.op,
        &format!("dns_listen = '{OPERATOR}:53'\napi_listen = '{OPERATOR}:8053'\nmax_backoff = '500ms'\n"),
        &env,
    )?;
    let api = Api::new(SocketAddr::new(OPERATOR.parse()?, 8053));
    eventually(Duration::from_secs(30), "the admin API", || async {
        api.call(Method::GET, "/healthz", None, None).await.ok().filter(|(s, _)| s.is_success())
    })
    .await?;
    // dns migrated the schema; the others wait for it or migrate too.
    processes.start(
        "hds",
        "hds",
        &paths.op,
        &format!(
            "listen = '{OPERATOR}:4433'\nca = '{}'\ncert = '{}'\nkey = '{}'\nstale_after = '3s'\n",
            pki_path("ca.pem"),
            pki_path("hds-1.pem"),
            pki_path("hds-1.key")
        ),
        &env,
    )?;
    for (name, control, heartbeat) in [("hbs-a", 4434, 4435), ("hbs-b", 4444, 4445)] {
        processes.start(
            name,
            "hbs",
            &paths.op,
            &format!(
                "name = '{name}'\ncontrol_listen = '{OPERATOR}:{control}'\nheartbeat_listen = '{OPERATOR}:{heartbeat}'\n\
                 ca = '{}'\ncert = '{}'\nkey = '{}'\nfleet_every = '300ms'\n",
                pki_path("ca.pem"),
                pki_path(&format!("{name}.pem")),
                pki_path(&format!("{name}.key"))
            ),
            &env,
        )?;
    }
    processes.start(
        "packet-forwarder",
        "packet-forwarder",
        &paths.op,
        &format!("metrics_listen = '{OPERATOR}:9480'\nconnect_timeout = '1s'\nmax_backoff = '500ms'\n"),
        &env,
    )?;
    let db = pg.pool().await?;
    eventually(Duration::from_secs(30), "both heartbeat servers in the fleet", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM heartbeat_servers WHERE state = 'active'")
            .fetch_one(&db)
            .await
            .ok()?;
        (n == 2).then_some(())
    })
    .await?;
    processes.all_running()?;

    stage("operator services up");
    // The operator's zone and subscriber; the subscriber's domain, its forwarding and an enrollment token.
    let (status, body) = api
        .call(
            Method::POST,
            "/v1/zones",
            Some(TOKEN),
            Some(json!({ "origin": "e2e.test", "nameservers": [{ "name": "ns1.e2e.test", "ips": [OPERATOR] }] })),
        )
        .await?;
    expect(status, StatusCode::CREATED, &body)?;
    let (status, body) =
        api.call(Method::POST, "/v1/subscribers", Some(TOKEN), Some(json!({ "name": "shop" }))).await?;
    expect(status, StatusCode::CREATED, &body)?;
    let shop = body["token"].as_str().context("subscriber token")?.to_owned();
    let (status, body) = api
        .call(Method::POST, "/v1/domains", Some(&shop), Some(json!({ "name": DOMAIN, "static_ip": STATIC_IP })))
        .await?;
    expect(status, StatusCode::CREATED, &body)?;
    let path = format!("/v1/domains/{DOMAIN}/forwarding");
    let (status, body) = api.call(Method::PUT, &path, Some(&shop), Some(json!({ "ports": [8080] }))).await?;
    ensure!(status.is_success(), "forwarding: {status} {body}");
    let path = format!("/v1/domains/{DOMAIN}/enrollments");
    let (status, body) = api.call(Method::POST, &path, Some(&shop), None).await?;
    expect(status, StatusCode::CREATED, &body)?;
    let enrollment = body["token"].as_str().context("enrollment token")?.to_owned();

    // The site: a web server answering on every uplink, and the NCU, enrolled with the real binary.
    let site_path = format!("/run/netns/{}", paths.site);
    let web = WebServer::start(&site_path)?;
    let identity = paths.work.join("ncu");
    let ca = pki.join("ca.pem");
    let enroll: Vec<&OsStr> = vec![
        "enroll".as_ref(),
        "--hds".as_ref(),
        "198.18.0.1:4433".as_ref(),
        "--token".as_ref(),
        enrollment.as_ref(),
        "--ca".as_ref(),
        ca.as_os_str(),
        "--dir".as_ref(),
        identity.as_os_str(),
        "--serial".as_ref(),
        "E2E-1".as_ref(),
    ];
    run_in(&paths.site, &paths.bin.join("ncu"), &enroll)?;
    processes.start(
        "ncu",
        "ncu run",
        &paths.site,
        &format!(
            "hds = ['{OPERATOR}:4433']\nidentity = '{}'\ninterfaces = ['wan1', 'wan2', 'wan3']\n\
             validate_timeout = '2s'\nmax_backoff = '2s'\n",
            identity.display()
        ),
        &[],
    )?;
    let (status, body) = api.call(Method::GET, &format!("/v1/domains/{DOMAIN}"), Some(&shop), None).await?;
    expect(status, StatusCode::OK, &body)?;
    ensure!(body.to_string().contains("E2E-1"), "the enrolled NCU is shown with its serial: {body}");

    stage("NCU running");
    // DNS answers all three uplinks; HTTP to the static address reaches the site through each of them.
    let dns = SocketAddr::new(OPERATOR.parse()?, 53);
    let all = ["198.18.1.2", "198.18.2.2", "198.18.3.2"];
    dns_follows(dns, &all, "all three uplinks in DNS").await?;
    forwarder_follows(&all, "HTTP through each uplink").await?;
    processes.all_running()?;

    stage("DNS and forwarder serve all three uplinks");
    // wan3 gets a new address: DNS and the forwarder follow, the old one is gone from both.
    run_ip(&paths.site, &["addr", "del", "198.18.3.2/24", "dev", "wan3"])?;
    run_ip(&paths.site, &["addr", "add", "198.18.3.3/24", "dev", "wan3"])?;
    run_ip(&paths.site, &["route", "replace", "default", "via", "198.18.3.1", "dev", "wan3", "metric", "103"])?;
    let moved = ["198.18.1.2", "198.18.2.2", "198.18.3.3"];
    dns_follows(dns, &moved, "wan3's new address in DNS").await?;
    forwarder_follows(&moved, "HTTP through wan3's new address").await?;

    stage("followed wan3's new address");
    // wan2 is cut silently: the isp drops everything for it, its link stays up. It leaves DNS and the forwarder,
    // and comes back when the isp restores it.
    run_ip(&paths.isp, &["route", "add", "blackhole", "198.18.2.2/32"])?;
    let without_wan2 = ["198.18.1.2", "198.18.3.3"];
    dns_follows(dns, &without_wan2, "the cut uplink out of DNS").await?;
    forwarder_follows(&without_wan2, "HTTP avoiding the cut uplink").await?;
    run_ip(&paths.isp, &["route", "del", "blackhole", "198.18.2.2/32"])?;
    dns_follows(dns, &moved, "the restored uplink back in DNS").await?;
    forwarder_follows(&moved, "HTTP through the restored uplink").await?;

    stage("followed the cut and the restoration of wan2");
    // The primary heartbeat server dies: the NCU moves to its backup, and the answer is never empty meanwhile.
    let primary: String = sqlx::query_scalar("SELECT DISTINCT hbs FROM addresses WHERE source = 'ncu'")
        .fetch_one(&db)
        .await
        .context("the NCU's heartbeat server")?;
    let backup = if primary == "hbs-a" { "hbs-b" } else { "hbs-a" };
    let watch = DnsWatch::start(dns);
    processes.get(&primary)?.kill()?;
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
    dns_follows(dns, &moved, "all three in DNS after failover").await?;
    forwarder_follows(&moved, "HTTP after failover").await?;

    stage("failed over to the backup heartbeat server");
    // Postgres restarts, and wan1 is cut while it is down: DNS keeps answering from memory, the heartbeat server
    // keeps the death until it can write it, everyone reconnects, nothing is lost.
    pg.stop()?;
    run_ip(&paths.isp, &["route", "add", "blackhole", "198.18.1.2/32"])?;
    for _ in 0..10 {
        let answer = ask(dns, &format!("{DOMAIN}."), RecordType::A, Transport::Udp).await?;
        ensure!(!addresses(&answer).is_empty(), "DNS answers while Postgres is down");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    pg.restart().await?;
    let without_wan1 = ["198.18.2.2", "198.18.3.3"];
    dns_follows(dns, &without_wan1, "the death written after the restart").await?;
    forwarder_follows(&without_wan1, "HTTP avoiding wan1 after the restart").await?;
    let db = pg.pool().await?;
    let (status, body) = api.call(Method::GET, &format!("/v1/domains/{DOMAIN}"), Some(&shop), None).await?;
    expect(status, StatusCode::OK, &body)?;
    ensure!(states(&body).get("198.18.1.2").map(String::as_str) == Some("dead"), "wan1 recorded dead: {body}");
    run_ip(&paths.isp, &["route", "del", "blackhole", "198.18.1.2/32"])?;
    dns_follows(dns, &moved, "wan1 back after the restart").await?;
    forwarder_follows(&moved, "HTTP through all three after the restart").await?;
    let ncus: i64 = sqlx::query_scalar("SELECT count(*) FROM ncus").fetch_one(&db).await?;
    ensure!(ncus == 1, "the NCU's record survived: {ncus}");

    stage("Postgres restarted, nothing lost");
    // Every survivor stops cleanly on SIGTERM.
    processes.all_running()?;
    for name in ["ncu", "packet-forwarder", backup, "hds", "dns"] {
        let status = processes.get(name)?.terminate(Duration::from_secs(15))?;
        ensure!(status.success(), "{name} exited with {status}");
    }
    stage("every process stopped cleanly");
    drop(web);
    Ok(())
}

fn run_ip(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    tether_tests::netns::ip(&all)
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
async fn dns_follows(dns: SocketAddr, want: &[&str], what: &str) -> Result<()> {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    eventually(Duration::from_secs(20), what, || async {
        let answer = ask(dns, &format!("{DOMAIN}."), RecordType::A, Transport::Udp).await.ok()?;
        (addresses(&answer).into_iter().collect::<BTreeSet<_>>() == want).then_some(())
    })
    .await
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
            let (answered, empty, failed) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
            while !flag.load(Ordering::Relaxed) {
                match ask(dns, &format!("{DOMAIN}."), RecordType::A, Transport::Udp).await {
                    Ok(answer) if addresses(&answer).is_empty() => empty.fetch_add(1, Ordering::Relaxed),
                    Ok(_) => answered.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (answered.into_inner(), empty.into_inner(), failed.into_inner())
        });
        Self { stop, task }
    }

    async fn stop(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or((0, u64::MAX, u64::MAX))
    }
}

/// A small web server in the site namespace, on port 8080 of every address, answering which address it was reached
/// on. Runs on its own thread and runtime; stops when dropped.
struct WebServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebServer {
    fn start(netns_path: &str) -> Result<Self> {
        let path = netns_path.to_owned();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let ready = ready_tx.clone();
            let serve = move || -> Result<()> {
                tether_tests::netns::enter(&path)?;
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
                    let _ = ready.send(Ok(()));
                    let accept = async {
                        loop {
                            let Ok((mut stream, _)) = listener.accept().await else { continue };
                            tokio::spawn(async move {
                                let via = stream.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                                let mut request = [0_u8; 1024];
                                let _ = stream.read(&mut request).await;
                                let body = format!("via {via}\n");
                                let reply = format!(
                                    "HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                                    body.len()
                                );
                                let _ = stream.write_all(reply.as_bytes()).await;
                                let _ = stream.shutdown().await;
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                    anyhow::Ok(())
                })
            };
            if let Err(error) = serve() {
                let _ = ready_tx.send(Err(error));
            }
        });
        ready.recv_timeout(Duration::from_secs(10)).context("the web server did not start")??;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
