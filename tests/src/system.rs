//! The whole system in network namespaces: tether's own binaries as real processes, each logging to a file and
//! killed on drop, so nothing outlives a failed test or benchmark.

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use hickory_proto::rr::RecordType;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::net::SocketAddr;

use crate::{
    Postgres,
    dns_client::{Transport, addresses, ask},
    netns::Namespaces,
    stack::Api,
};

/// The workspace's binaries, each with the workspace crates it is built from.
const BINARIES: [(&str, &[&str]); 6] = [
    ("dns", &["dns"]),
    ("dns-monitor", &["dns"]),
    ("hds", &["hds"]),
    ("hbs", &["hbs", "hds"]),
    ("ncu", &["ncu", "hbs", "hds"]),
    ("packet-forwarder", &["packet-forwarder", "dns"]),
];

/// The directory holding the workspace's binaries, built from the current sources.
///
/// `$TETHER_BIN_DIR` when set; otherwise the profile directory this executable was built in (`target/debug`). Under
/// nextest, which has finished its own build by then, `cargo build` brings them up to date first (quick when they
/// are); under `cargo test`, whose build lock is still held, a binary missing or older than its sources fails the
/// test with what to run.
pub fn binaries() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TETHER_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let dir =
        exe.parent().and_then(Path::parent).context("the test executable is not in target/<profile>/deps")?.to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let release = dir.file_name() == Some(OsStr::new("release"));
    if std::env::var_os("NEXTEST").is_some() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        // The same selection as scripts/test, so features unify alike and a built binary is not rebuilt.
        command.current_dir(workspace).args(["build", "--quiet", "--workspace", "--bins"]);
        if release {
            command.arg("--release");
        }
        let status = command.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build of the binaries failed: {status}");
        }
        return Ok(dir);
    }
    let mut stale = Vec::new();
    for (binary, crates) in BINARIES {
        let built = std::fs::metadata(dir.join(binary)).and_then(|m| m.modified()).ok();
        let sources = newest_source(workspace, crates)?;
        if built.is_none_or(|built| built < sources) {
            stale.push(binary);
        }
    }
    if !stale.is_empty() {
        bail!(
            "binaries {stale:?} in {} are missing or older than their sources: run `cargo build{} --workspace \
             --bins` first (scripts/test and the bench scripts do)",
            dir.display(),
            if release { " --release" } else { "" }
        );
    }
    Ok(dir)
}

/// The newest modification time of the files under `<crate>/src` for these crates.
fn newest_source(workspace: &Path, crates: &[&str]) -> Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut dirs: Vec<PathBuf> = crates.iter().map(|c| workspace.join(c).join("src")).collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                newest = newest.max(meta.modified()?);
            }
        }
    }
    Ok(newest)
}

/// A child process started with `ip netns exec`, its stdout and stderr in a log file.
pub struct Process {
    /// What the test calls it.
    pub name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `program args...` inside namespace `netns` (its full name) with `env` added.
    pub fn spawn(
        name: &str,
        netns: &str,
        program: &Path,
        args: &[&OsStr],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<Self> {
        let file = File::options().create(true).append(true).open(&log)?;
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(program).args(args);
        command.envs(env.iter().copied()).stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        let child = command.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self { name: name.to_owned(), log, child: Some(child) })
    }

    /// Fails, with the end of its log, when the process has exited.
    pub fn running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("{} exited with {status}:\n{}", self.name, self.log_tail(30));
        }
        Ok(())
    }

    /// SIGKILL: the process dies at once, as in a crash.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            kill(pid(&child)?, Signal::SIGKILL)?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM, then waits up to `limit` for the exit status (SIGKILL after that).
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        kill(pid(&child)?, Signal::SIGTERM)?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                child.wait()?;
                bail!("{} did not stop within {limit:?} of SIGTERM:\n{}", self.name, self.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id while it runs (`ip netns exec` execs the program, so the program's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn pid(child: &Child) -> Result<Pid> {
    Ok(Pid::from_raw(i32::try_from(child.id())?))
}

/// Runs a command to completion inside namespace `netns`, failing with its output.
pub fn run_in(netns: &str, program: &Path, args: &[&OsStr]) -> Result<String> {
    let output = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {:?} failed ({}): {}{}",
            program.display(),
            args,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The operator's services address in the `op` namespace: dns :53, admin API :8053, hds :4433, hbs-a :4434,
/// hbs-b :4444, metrics :9480.
pub const OPERATOR: &str = "198.18.0.1";
/// The test domain's static address, owned by the packet-forwarder in `op`.
pub const STATIC_IP: &str = "198.18.0.10";
/// The operator token every process is given.
pub const OPERATOR_TOKEN: &str = "operator-token-for-the-system-test";
/// The test domain: one NCU, its uplinks, forwarding on port 8080.
pub const DOMAIN: &str = "shop.e2e.test";

/// Namespaces `op`, `isp`, `site`, `client`, wired: the isp routes between the operator (198.18.0.0/24), the site's
/// uplinks `wan<i>` (198.18.<i>.2/24, i = 1..=uplinks, each with a default route) and the client (198.18.9.0/24).
pub fn network(uplinks: u8) -> Result<Namespaces> {
    let ns = Namespaces::create(&["op", "isp", "site", "client"])?;
    for name in ["op", "isp", "site", "client"] {
        // The site's web server answers by its preferred default route, whichever uplink a request came in on: no
        // reverse-path filtering anywhere (a namespace would inherit the host's setting otherwise).
        sh(
            &ns,
            name,
            "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter",
        )?;
    }
    sh(&ns, "isp", "echo 1 > /proc/sys/net/ipv4/ip_forward")?;
    veth(&ns, ("op", "op0"), ("isp", "iop"))?;
    ns.ip("op", &["addr", "add", &format!("{OPERATOR}/24"), "dev", "op0"])?;
    ns.ip("op", &["addr", "add", &format!("{STATIC_IP}/24"), "dev", "op0"])?;
    ns.ip("isp", &["addr", "add", "198.18.0.254/24", "dev", "iop"])?;
    ns.ip("op", &["route", "add", "default", "via", "198.18.0.254"])?;
    veth(&ns, ("client", "cl0"), ("isp", "icl"))?;
    ns.ip("client", &["addr", "add", "198.18.9.1/24", "dev", "cl0"])?;
    ns.ip("isp", &["addr", "add", "198.18.9.254/24", "dev", "icl"])?;
    ns.ip("client", &["route", "add", "default", "via", "198.18.9.254"])?;
    for i in 1..=uplinks {
        add_uplink(&ns, i)?;
    }
    Ok(ns)
}

/// Adds the site's uplink `i`: veth `wan<i>` in `site` ↔ `isp<i>` in `isp`, 198.18.<i>.2/24 ↔ .1, and a default
/// route through it.
pub fn add_uplink(ns: &Namespaces, i: u8) -> Result<()> {
    let (wan, peer) = (format!("wan{i}"), format!("isp{i}"));
    veth(ns, ("site", &wan), ("isp", &peer))?;
    ns.ip("site", &["addr", "add", &format!("198.18.{i}.2/24"), "dev", &wan])?;
    ns.ip("isp", &["addr", "add", &format!("198.18.{i}.1/24"), "dev", &peer])?;
    default_route(ns, i)
}

/// (Re)sets the site's default route through `wan<i>`, metric 100 + i.
pub fn default_route(ns: &Namespaces, i: u8) -> Result<()> {
    let metric = (100 + u32::from(i)).to_string();
    ns.ip(
        "site",
        &["route", "replace", "default", "via", &format!("198.18.{i}.1"), "dev", &format!("wan{i}"), "metric", &metric],
    )
}

/// A veth pair with one end in each namespace, both up.
pub fn veth(ns: &Namespaces, (a, a_dev): (&str, &str), (b, b_dev): (&str, &str)) -> Result<()> {
    crate::netns::ip(&[
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

/// Runs `sh -c script` inside namespace `name`.
pub fn sh(ns: &Namespaces, name: &str, script: &str) -> Result<()> {
    run_in(&ns.name(name), Path::new("sh"), &[OsStr::new("-c"), OsStr::new(script)])?;
    Ok(())
}

/// Moves the calling thread into the `client` namespace and returns a runtime whose threads all live there too: the
/// caller's DNS, HTTP and admin API sockets then go through the isp like any client's. Postgres is reached over its
/// Unix socket from anywhere.
pub fn client_runtime(ns: &Namespaces) -> Result<tokio::runtime::Runtime> {
    let client = format!("/run/netns/{}", ns.name("client"));
    crate::netns::enter(&client)?;
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || crate::netns::enter(&client).expect("entering the client namespace"))
        .build()?)
}

/// The whole system running in the namespaces of [`network`]: Postgres, dns, hds, hbs-a, hbs-b and the
/// packet-forwarder in `op`; an enrolled ncu (discovering `wan1..`) and a web server in `site`. Everything is
/// stopped when dropped: processes first, then Postgres, then the namespaces.
pub struct System {
    /// Started processes by name: dns, hds, hbs-a, hbs-b, packet-forwarder, ncu.
    pub processes: Vec<Process>,
    /// The site's web server.
    pub web: WebServer,
    /// Postgres, in `op`.
    pub pg: Postgres,
    /// The admin API.
    pub api: Api,
    /// dns's UDP/TCP address.
    pub dns: SocketAddr,
    /// The test domain's subscriber token.
    pub subscriber: String,
    work: tempfile::TempDir,
    bin: PathBuf,
    /// The namespaces, removed last.
    pub ns: Namespaces,
}

impl System {
    /// Starts everything and waits until the NCU's uplinks are registered. Call from [`client_runtime`].
    pub async fn start(ns: Namespaces) -> Result<Self> {
        Self::start_with_ncu(ns, "").await
    }

    /// [`System::start`] with `ncu_extra` appended to the NCU's configuration (its `[services.…]`, say).
    pub async fn start_with_ncu(ns: Namespaces, ncu_extra: &str) -> Result<Self> {
        let bin = binaries()?;
        let work = tempfile::Builder::new().prefix("tether-system-").tempdir()?;
        let pg = Postgres::start_in(Some(ns.name("op"))).await?;
        let api = Api::new(SocketAddr::new(OPERATOR.parse()?, 8053));
        let dns = SocketAddr::new(OPERATOR.parse()?, 53);
        let web = WebServer::start(&format!("/run/netns/{}", ns.name("site")))?;
        let mut system = Self { processes: Vec::new(), web, pg, api, dns, subscriber: String::new(), work, bin, ns };
        if let Err(error) = system.boot(ncu_extra).await {
            system.print_logs();
            return Err(error);
        }
        Ok(system)
    }

    async fn boot(&mut self, ncu_extra: &str) -> Result<()> {
        let url = self.pg.url();
        let env = [("DATABASE_URL", url.as_str()), ("TETHER_OPERATOR_TOKEN", OPERATOR_TOKEN)];
        let pki = self.work.path().join("pki");
        let mut args: Vec<&OsStr> = vec!["pki".as_ref(), "init".as_ref(), "--dir".as_ref(), pki.as_os_str()];
        for server in ["hds-1=198.18.0.1", "hbs-a=198.18.0.1", "hbs-b=198.18.0.1"] {
            args.extend([OsStr::new("--server"), OsStr::new(server)]);
        }
        run_in(&self.ns.name("op"), &self.bin.join("hds"), &args)?;
        let file = |name: &str| pki.join(name).display().to_string();
        // The tests' clients poll one name every few milliseconds, as a monitoring probe would: the operator
        // exempts them from response rate limiting (which its own tests cover).
        self.start_process(
            "dns",
            "dns",
            "op",
            &format!(
                "dns_listen = '{OPERATOR}:53'\napi_listen = '{OPERATOR}:8053'\nmax_backoff = '500ms'\n\
                 allowed_target_ranges = ['198.18.0.0/15']\noperator_addresses = ['{OPERATOR}/32']\n\
                 rrl_exempt = ['127.0.0.0/8', '198.18.0.0/15']\n"
            ),
            &env,
        )?;
        let api = &self.api;
        crate::eventually(Duration::from_secs(30), "the admin API", || async {
            api.call(reqwest::Method::GET, "/healthz", None, None).await.ok().filter(|(s, _)| s.is_success())
        })
        .await?;
        // dns has migrated the schema by now; the others find it done.
        let hds = format!(
            "listen = '{OPERATOR}:4433'\nca = '{}'\ncert = '{}'\nkey = '{}'\nstale_after = '3s'\n",
            file("ca.pem"),
            file("hds-1.pem"),
            file("hds-1.key")
        );
        self.start_process("hds", "hds", "op", &hds, &env)?;
        for (name, control, heartbeat) in [("hbs-a", 4434, 4435), ("hbs-b", 4444, 4445)] {
            let config = format!(
                "name = '{name}'\ncontrol_listen = '{OPERATOR}:{control}'\nheartbeat_listen = '{OPERATOR}:{heartbeat}'\n\
                 ca = '{}'\ncert = '{}'\nkey = '{}'\nfleet_every = '300ms'\n",
                file("ca.pem"),
                file(&format!("{name}.pem")),
                file(&format!("{name}.key"))
            );
            self.start_process(name, "hbs", "op", &config, &env)?;
        }
        let forwarder = format!(
            "metrics_listen = '{OPERATOR}:9480'\nconnect_timeout = '1s'\nmax_backoff = '500ms'\n\
             allowed_target_ranges = ['198.18.0.0/15']\noperator_addresses = ['{OPERATOR}/32']\n"
        );
        self.start_process("packet-forwarder", "packet-forwarder", "op", &forwarder, &env)?;
        let db = self.pg.pool().await?;
        crate::eventually(Duration::from_secs(30), "both heartbeat servers in the fleet", || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM heartbeat_servers WHERE state = 'active'")
                .fetch_one(&db)
                .await
                .ok()?;
            (n == 2).then_some(())
        })
        .await?;
        self.running()?;

        // The operator's zone and subscriber; the subscriber's domain, its forwarding, an enrollment token.
        let zone = json!({ "origin": "e2e.test", "nameservers": [{ "name": "ns1.e2e.test", "ips": [OPERATOR] }] });
        self.operator(Method::POST, "/v1/zones", zone, StatusCode::CREATED).await?;
        let body =
            self.operator(Method::POST, "/v1/subscribers", json!({ "name": "shop" }), StatusCode::CREATED).await?;
        self.subscriber = body["token"].as_str().context("subscriber token")?.to_owned();
        let domain = json!({ "name": DOMAIN, "static_ip": STATIC_IP });
        self.subscriber(Method::POST, "/v1/domains", Some(domain), StatusCode::CREATED).await?;
        let path = format!("/v1/domains/{DOMAIN}/forwarding");
        self.subscriber(Method::PUT, &path, Some(json!({ "ports": [8080] })), StatusCode::OK).await?;
        let path = format!("/v1/domains/{DOMAIN}/enrollments");
        let body = self.subscriber(Method::POST, &path, None, StatusCode::CREATED).await?;
        let enrollment = body["token"].as_str().context("enrollment token")?.to_owned();

        // The NCU, enrolled with the real binary from inside the site.
        let identity = self.work.path().join("ncu");
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
        run_in(&self.ns.name("site"), &self.bin.join("ncu"), &enroll)?;
        let config = format!(
            "hds = ['{OPERATOR}:4433']\nidentity = '{}'\nvalidate_timeout = '2s'\nmax_backoff = '2s'\n{ncu_extra}",
            identity.display()
        );
        self.start_process("ncu", "ncu run", "site", &config, &[])
    }

    /// Starts a tether binary (`command`: the binary and its subcommand, if any) in namespace `netns` (short name)
    /// with `--config <work>/<name>.toml` written from `config`.
    pub fn start_process(
        &mut self,
        name: &str,
        command: &str,
        netns: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<()> {
        let path = self.work.path().join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let mut words = command.split_whitespace();
        let binary = words.next().context("empty command")?;
        let args: Vec<&OsStr> = words.map(OsStr::new).chain([OsStr::new("--config"), path.as_os_str()]).collect();
        // TETHER_SYSTEM_LOG overrides the processes' log filter (RUST_LOG syntax).
        let filter = std::env::var("TETHER_SYSTEM_LOG").unwrap_or_else(|_| "info,hickory_server=warn".to_owned());
        let mut all_env = vec![("RUST_LOG", filter.as_str())];
        all_env.extend_from_slice(env);
        let log = self.work.path().join(format!("{name}.log"));
        let process = Process::spawn(name, &self.ns.name(netns), &self.bin.join(binary), &args, &all_env, log)?;
        self.processes.push(process);
        Ok(())
    }

    /// Starts another binary of the build (`binary` in [`binaries`]'s directory: `hbs-load`, say) with `args` in
    /// namespace `netns` (short name), logging and stopped like the others.
    pub fn start_binary(&mut self, name: &str, binary: &str, netns: &str, args: &[&OsStr]) -> Result<()> {
        let program = self.bin.join(binary);
        if !program.exists() {
            bail!("{} is missing: build it first (`cargo build --release -p {binary}`)", program.display());
        }
        let log = self.work.path().join(format!("{name}.log"));
        let process = Process::spawn(name, &self.ns.name(netns), &program, args, &[], log)?;
        self.processes.push(process);
        Ok(())
    }

    /// The operator PKI of [`System::start`] (`hds pki init`): `ca.pem` and `ca.key`, the servers' certificates.
    pub fn pki_dir(&self) -> PathBuf {
        self.work.path().join("pki")
    }

    /// The process called `name`.
    pub fn process(&mut self, name: &str) -> Result<&mut Process> {
        self.processes.iter_mut().find(|p| p.name == name).with_context(|| format!("no process {name}"))
    }

    /// Fails, with its log, when any process has exited.
    pub fn running(&mut self) -> Result<()> {
        self.processes.iter_mut().try_for_each(Process::running)
    }

    /// Prints the end of every process's log to stderr.
    pub fn print_logs(&self) {
        for process in &self.processes {
            eprintln!("----- {} (last 40 lines)\n{}", process.name, process.log_tail(40));
        }
    }

    /// `ip -n <netns> args...` (short namespace name).
    pub fn ip(&self, netns: &str, args: &[&str]) -> Result<()> {
        self.ns.ip(netns, args)
    }

    async fn operator(&self, method: Method, path: &str, body: Value, want: StatusCode) -> Result<Value> {
        let (status, body) = self.api.call(method, path, Some(OPERATOR_TOKEN), Some(body)).await?;
        crate::stack::expect(status, want, &body)?;
        Ok(body)
    }

    /// An admin API call with the subscriber's token, expecting status `want`.
    pub async fn subscriber(&self, method: Method, path: &str, body: Option<Value>, want: StatusCode) -> Result<Value> {
        let (status, body) = self.api.call(method, path, Some(&self.subscriber), body).await?;
        crate::stack::expect(status, want, &body)?;
        Ok(body)
    }

    /// The domain's A answer, sorted.
    pub async fn answer(&self) -> Result<Vec<String>> {
        let answer = ask(self.dns, &format!("{DOMAIN}."), RecordType::A, Transport::Udp).await?;
        let mut list = addresses(&answer);
        list.sort();
        Ok(list)
    }
}

/// A small web server in a namespace, on port 8080 of every address, answering `via <address it was reached on>`.
/// Runs on its own thread and runtime; stops when dropped.
pub struct WebServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebServer {
    /// Starts it in the namespace at `netns_path` (`/run/netns/<name>`).
    pub fn start(netns_path: &str) -> Result<Self> {
        let path = netns_path.to_owned();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let ready = ready_tx.clone();
            let serve = move || -> Result<()> {
                crate::netns::enter(&path)?;
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
                    let _ = ready.send(Ok(()));
                    let accept = async {
                        loop {
                            let Ok((stream, _)) = listener.accept().await else { continue };
                            tokio::spawn(answer_http(stream));
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

async fn answer_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let via = stream.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let mut request = [0_u8; 1024];
    let _ = stream.read(&mut request).await;
    let body = format!("via {via}\n");
    let reply = format!("HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
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
