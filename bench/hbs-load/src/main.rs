//! `hbs-load`: the load generator behind `bench/hbs-capacity` and `bench/failover-storm`. One process simulates many
//! NCUs: each registers over the real control protocol (QUIC, mutual TLS with its own certificate, `Register`), and
//! one UDP socket answers every uplink's pings with the real `Responder` from the pinged address. Loopback only.
//!
//! `capacity`: one hbs (pinned with taskset) carries more and more addresses; per step, its CPU and the addresses
//! wrongly marked dead. `storm`: every NCU sits on hbs-a with hbs-b as backup (from hds, in-process here) and, as
//! ncu does, an idle standby connection to hbs-b; hbs-a is SIGKILLed; how long until every NCU is registered on
//! hbs-b, and how many addresses were marked dead meanwhile. `attach`: no hbs of its own; addresses registered with
//! a running one (bench/system's), kept heartbeating while another measurement runs beside them.

#![allow(clippy::print_stdout)]

mod farm;
mod ncu;
mod setup;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sqlx::PgPool;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use crate::{
    farm::{Farm, Lost, ToFarm},
    setup::{HbsProcess, SimNcu},
};

/// The simulated NCUs keep `ncu run`'s timings: one registration, one over the standby connection, and the wait
/// before the backup search after a move.
use ::ncu::session::{BACKUP_SETTLE, BACKUP_SPREAD, CONNECT_TIMEOUT, STANDBY_TIMEOUT};

/// Client endpoints (UDP sockets) the simulated NCUs share.
const ENDPOINTS: usize = 16;

#[derive(Parser)]
struct Args {
    /// The hbs binary under test (not used by `attach`).
    #[arg(long)]
    hbs_bin: Option<PathBuf>,
    /// A throwaway Postgres (its tables are filled with bench rows).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Uplinks (addresses) per simulated NCU.
    #[arg(long, default_value_t = 4)]
    uplinks: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The responder farm reads its socket every this many microseconds instead of when it turns readable (see
    /// farm.rs: then no ping wakes it, work that would count in hbs's CPU time on loopback).
    #[arg(long)]
    farm_poll: Option<u64>,
    /// Registrations started per second, at most (0: as many as `concurrency` allows).
    #[arg(long, default_value_t = 0.0)]
    register_rate: f64,
    /// Keep the work directory (hbs logs and configs) by moving it here at exit, instead of deleting it.
    #[arg(long, env = "HBS_LOAD_KEEP")]
    keep: Option<PathBuf>,
    /// TOML lines appended to each hbs's configuration (e.g. a wider policy for a run under valgrind).
    #[arg(long, env = "HBS_CONFIG_EXTRA", default_value = "")]
    hbs_config: String,
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Heartbeat capacity of one hbs.
    Capacity {
        /// Address counts to hold, in order.
        #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
        steps: Vec<usize>,
        /// Seconds each step is held and measured.
        #[arg(long, default_value_t = 60)]
        hold: u64,
        /// CPU list for hbs (taskset -c).
        #[arg(long, default_value = "1")]
        hbs_cpu: String,
        /// Seconds every address of a step has to turn live.
        #[arg(long, default_value_t = 120)]
        live_within: u64,
        /// Seconds between all addresses live and the held window.
        #[arg(long, default_value_t = 5)]
        settle: u64,
        /// Shell command run (and waited for) just before each held window, with HBS_PID, ADDRESSES and HOLD set.
        #[arg(long)]
        before_hold: Option<String>,
        /// Shell command run (and waited for) just after each held window, with the same variables.
        #[arg(long)]
        after_hold: Option<String>,
    },
    /// Failover storm: SIGKILL the hbs carrying every NCU.
    Storm {
        /// Simulated NCUs.
        #[arg(long, default_value_t = 10_000)]
        ncus: usize,
        /// The NCUs' failover timer (ncu's `failover_after`).
        #[arg(long, default_value_t = 3.0)]
        failover_after: f64,
        /// Seconds to keep watching for deaths once all have re-homed (past hbs's rehome_grace of 20 s).
        #[arg(long, default_value_t = 20)]
        watch: u64,
    },
    /// Addresses heartbeating on a running hbs (trusting the CA in `--pki`), until killed or for `--hold` seconds.
    Attach {
        /// The hbs's control address.
        #[arg(long)]
        server: SocketAddr,
        /// Its name (in `heartbeat_servers`).
        #[arg(long)]
        name: String,
        /// The directory with the CA (ca.pem, ca.key) the hbs trusts; the simulated NCUs' certificates are signed
        /// with it.
        #[arg(long)]
        pki: PathBuf,
        /// Addresses to keep heartbeating (NCUs × `--uplinks`).
        #[arg(long, default_value_t = 10_000)]
        addresses: usize,
        /// Seconds every address has to turn live.
        #[arg(long, default_value_t = 180)]
        live_within: u64,
        /// Seconds to keep them heartbeating at most, once live.
        #[arg(long, default_value_t = 1800)]
        hold: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("hbs-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // Ctrl-C or SIGTERM (the bench scripts' time limit) drops the run, and with it the hbs processes it started.
        let stop = CancellationToken::new();
        tether_config::cancel_on_signal(stop.clone());
        let result = tokio::select! {
            result = run(&args, &dir) => result,
            () = stop.cancelled() => Err(anyhow::anyhow!("interrupted; the hbs processes it started are stopped")),
        };
        match &args.keep {
            Some(keep) => match std::fs::rename(&dir, keep) {
                Ok(()) => eprintln!("hbs-load: logs kept in {}", keep.display()),
                Err(error) => {
                    eprintln!("hbs-load: cannot keep logs in {}: {error}; left in {}", keep.display(), dir.display())
                }
            },
            None => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        result
    })
}

async fn run(args: &Args, dir: &Path) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&args.database_url).await?;
    tether_db::migrate(&pool).await?;
    setup::install_death_log(&pool).await?;
    match &args.command {
        Mode::Capacity { steps, hold, hbs_cpu, live_within, settle, before_hold, after_hold } => {
            let timing = Timing {
                hold: Duration::from_secs(*hold),
                live_within: Duration::from_secs(*live_within),
                settle: Duration::from_secs(*settle),
            };
            let hooks = Hooks { before: before_hold.as_deref(), after: after_hold.as_deref() };
            capacity(args, dir, &pool, steps, timing, hooks, hbs_cpu).await
        }
        Mode::Storm { ncus, failover_after, watch } => {
            storm(args, dir, &pool, *ncus, Duration::from_secs_f64(*failover_after), Duration::from_secs(*watch)).await
        }
        Mode::Attach { server, name, pki, addresses, live_within, hold } => {
            let target = Attached { control: *server, name, pki };
            let timing = (Duration::from_secs(*live_within), Duration::from_secs(*hold));
            attach(args, &pool, target, *addresses, timing).await
        }
    }
}

impl Args {
    /// `--hbs-bin`, which the modes that start their own hbs need.
    fn hbs_bin(&self) -> anyhow::Result<&Path> {
        self.hbs_bin.as_deref().context("--hbs-bin is needed in this mode")
    }
}

/// How long each step of `capacity` waits and holds.
struct Timing {
    hold: Duration,
    live_within: Duration,
    settle: Duration,
}

/// Commands run around each held window of `capacity` (`sh -c`).
struct Hooks<'a> {
    before: Option<&'a str>,
    after: Option<&'a str>,
}

async fn capacity(
    args: &Args,
    dir: &Path,
    pool: &PgPool,
    steps: &[usize],
    timing: Timing,
    hooks: Hooks<'_>,
    hbs_cpu: &str,
) -> anyhow::Result<()> {
    let Timing { hold, live_within, settle } = timing;
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let ca = setup::make_pki(dir, &[("hbs-a", local)])?;
    let mut hbs = HbsProcess::start(
        args.hbs_bin()?,
        dir,
        "hbs-a",
        setup::free_port(local)?,
        &args.database_url,
        Some(hbs_cpu),
        &args.hbs_config,
    )?;
    setup::wait_for_fleet_row(pool, "hbs-a", Duration::from_secs(30)).await?;
    let most = steps.iter().copied().max().unwrap_or(0);
    let count = most.div_ceil(args.uplinks.max(1));
    let started = Instant::now();
    let ncus = Arc::new(setup::seed_ncus(pool, &ca, 0, count, args.uplinks).await?);
    eprintln!("seeded {count} NCUs × {} uplinks in {:.1?}", args.uplinks, started.elapsed());
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let ips: Vec<Vec<IpAddr>> = ncus.iter().map(|n| n.ips.clone()).collect();
    let farm = Farm::start(&ips, Duration::from_secs(3), lost_tx, args.farm_poll.map(Duration::from_micros))?;
    let endpoints = client_endpoints(local)?;
    let mut sessions = Vec::new();
    println!(
        "| addresses | NCUs | hbs CPU (one core) | dead while held (live→dead / pending→dead) | dead while ramping (same) | pongs/s | held |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &step in steps {
        let want = step.div_ceil(args.uplinks.max(1)).min(count);
        let before_ramp = setup::deaths(pool).await?;
        let ramp = Instant::now();
        let new = register_all(args, &ncus, sessions.len()..want, &endpoints, &farm, &hbs.control.to_string()).await?;
        sessions.extend(new);
        let addresses = i64::try_from(want * args.uplinks)?;
        wait_live(pool, "hbs-a", addresses, live_within).await?;
        eprintln!("{addresses} addresses live after {:.1?}; settling", ramp.elapsed());
        tokio::time::sleep(settle).await;
        hbs.check()?;
        run_hook(hooks.before, hbs.pid(), addresses, hold).await?;
        let deaths0 = setup::deaths(pool).await?;
        let cpu0 = setup::cpu_time(hbs.pid())?;
        let pongs0 = farm.stats.pongs.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let mut lost = 0;
        while t0.elapsed() < hold {
            tokio::time::sleep(Duration::from_millis(500)).await;
            hbs.check()?;
            while lost_rx.try_recv().is_ok() {
                lost += 1;
            }
        }
        let elapsed = t0.elapsed();
        let cpu = setup::cpu_time(hbs.pid())?.saturating_sub(cpu0);
        run_hook(hooks.after, hbs.pid(), addresses, hold).await?;
        let deaths1 = setup::deaths(pool).await?;
        let deaths = (deaths1.0 - deaths0.0, deaths1.1 - deaths0.1);
        let pongs = farm.stats.pongs.load(Ordering::Relaxed) - pongs0;
        let (live, pending, dead) = setup::address_states(pool, "hbs-a").await?;
        eprintln!("now: {live} live, {pending} pending, {dead} dead; primaries lost by simulated NCUs: {lost}");
        println!(
            "| {addresses} | {want} | {:.1} % | {} / {} | {} / {} | {:.0} | {:.0} s |",
            cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
            deaths.0,
            deaths.1,
            deaths0.0 - before_ramp.0,
            deaths0.1 - before_ramp.1,
            pongs as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
        );
    }
    let stats = &farm.stats;
    eprintln!(
        "farm: pings {} pongs {} hellos {} unknown {} send errors {}",
        stats.pings.load(Ordering::Relaxed),
        stats.pongs.load(Ordering::Relaxed),
        stats.hellos.load(Ordering::Relaxed),
        stats.unknown.load(Ordering::Relaxed),
        stats.send_errors.load(Ordering::Relaxed),
    );
    drop(sessions);
    Ok(())
}

/// Runs a hook of `capacity` to its end; fails when it fails.
async fn run_hook(command: Option<&str>, pid: u32, addresses: i64, hold: Duration) -> anyhow::Result<()> {
    let Some(command) = command else { return Ok(()) };
    let mut child = std::process::Command::new("sh");
    child
        .arg("-c")
        .arg(command)
        .env("HBS_PID", pid.to_string())
        .env("ADDRESSES", addresses.to_string())
        .env("HOLD", hold.as_secs().to_string());
    let status =
        tokio::task::spawn_blocking(move || child.status()).await?.with_context(|| format!("running {command}"))?;
    if !status.success() {
        bail!("{command} failed: {status}");
    }
    Ok(())
}

/// Registers NCUs `range` with `server`, `args.concurrency` at a time and at most `args.register_rate` a second,
/// and starts answering their pings.
async fn register_all(
    args: &Args,
    ncus: &Arc<Vec<SimNcu>>,
    range: std::ops::Range<usize>,
    endpoints: &[quinn::Endpoint],
    farm: &Farm,
    server: &str,
) -> anyhow::Result<Vec<ncu::Session>> {
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let start = tokio::time::Instant::now();
    let gap = (args.register_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.register_rate));
    let mut tasks = JoinSet::new();
    for (k, i) in range.clone().enumerate() {
        let not_before = gap.map(|gap| start + gap.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX)));
        let ncus = ncus.clone();
        let endpoint = endpoints[i % endpoints.len()].clone();
        let permits = permits.clone();
        let server = server.to_owned();
        let port = farm.port;
        let farm_tx = farm.tx.clone();
        tasks.spawn(async move {
            if let Some(at) = not_before {
                tokio::time::sleep_until(at).await;
            }
            let _permit = permits.acquire_owned().await?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                match ncu::register(&endpoint, &ncus[i], port, &server, CONNECT_TIMEOUT).await {
                    Ok(session) => {
                        // Answer from the first ping on, as ncu does.
                        let _ = farm_tx.send(ToFarm::Session {
                            ncu: i,
                            session: session.id,
                            key: session.key,
                            hbs: session.heartbeat,
                        });
                        return Ok::<_, anyhow::Error>(session);
                    }
                    Err(error) if attempt < 10 => {
                        tracing::warn!(ncu = i, error = %format!("{error:#}"), "registration failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                    Err(error) => return Err(error.context(format!("registering NCU {i}"))),
                }
            }
        });
    }
    let mut sessions = Vec::with_capacity(range.len());
    while let Some(joined) = tasks.join_next().await {
        sessions.push(joined??);
    }
    Ok(sessions)
}

async fn wait_live(pool: &PgPool, hbs: &str, addresses: i64, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let (live, pending, dead) = setup::address_states(pool, hbs).await?;
        if live >= addresses {
            return Ok(());
        }
        if Instant::now() > deadline {
            let which = setup::pending_ncus(pool, hbs).await?;
            bail!(
                "only {live} of {addresses} addresses live on {hbs} after {limit:?} ({pending} pending, {dead} dead): \
                 {which}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The generator's QUIC client endpoints. Each stands for hundreds of NCUs (a real one has a socket of its own), so
/// each gets socket buffers as large as the servers': with the default 208 KiB, a storm's answers overflowed them and
/// the registrations waited out QUIC's retransmission timers.
fn client_endpoints(ip: IpAddr) -> anyhow::Result<Vec<quinn::Endpoint>> {
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    (0..ENDPOINTS)
        .map(|_| {
            let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
            let state = quinn_udp::UdpSocketState::new((&socket).into())?;
            state.set_recv_buffer_size((&socket).into(), 8 << 20)?;
            state.set_send_buffer_size((&socket).into(), 8 << 20)?;
            Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime.clone())?)
        })
        .collect()
}

/// One NCU's failover, timed from the kill.
struct Rehome {
    /// Kill → the responder's PrimaryLost.
    detected: Duration,
    /// Kill → `Registered` from the new server.
    registered: Duration,
    /// Where it ended up.
    server: String,
    /// Whether it moved over its standby connection (no handshake at the move).
    over_standby: bool,
}

async fn storm(
    args: &Args,
    dir: &Path,
    pool: &PgPool,
    count: usize,
    failover_after: Duration,
    watch: Duration,
) -> anyhow::Result<()> {
    let a_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let b_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let ca = setup::make_pki(dir, &[("hbs-a", a_ip), ("hbs-b", b_ip), ("hds", a_ip)])?;
    let hds_socket = std::net::UdpSocket::bind((a_ip, 0))?;
    let hds_addr = hds_socket.local_addr()?.to_string();
    let hds_config = <hds::config::Config as tether_config::Load>::parse(&format!(
        "listen = '{hds_addr}'\ndatabase_url = '{}'\nca = '{}'\ncert = '{}'\nkey = '{}'\n",
        args.database_url,
        dir.join("ca.pem").display(),
        dir.join("hds.pem").display(),
        dir.join("hds.key").display(),
    ))?;
    let shutdown = CancellationToken::new();
    let hds_task = tokio::spawn(hds::run(hds_socket, hds_config, shutdown.clone()));

    let mut hbs_a = HbsProcess::start(
        args.hbs_bin()?,
        dir,
        "hbs-a",
        setup::free_port(a_ip)?,
        &args.database_url,
        None,
        &args.hbs_config,
    )?;
    setup::wait_for_fleet_row(pool, "hbs-a", Duration::from_secs(30)).await?;
    let started = Instant::now();
    let ncus = Arc::new(setup::seed_ncus(pool, &ca, 0, count, args.uplinks).await?);
    eprintln!("seeded {count} NCUs × {} uplinks in {:.1?}", args.uplinks, started.elapsed());
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel::<Lost>();
    let ips: Vec<Vec<IpAddr>> = ncus.iter().map(|n| n.ips.clone()).collect();
    let farm = Arc::new(Farm::start(&ips, failover_after, lost_tx, args.farm_poll.map(Duration::from_micros))?);
    let endpoints = client_endpoints(a_ip)?;

    // 1. Every NCU asks hds (only hbs-a exists: no backup yet) and registers there.
    let ramp = Instant::now();
    let assigned = assign_all(&ncus, &hds_addr, &[], args.concurrency).await?;
    if let Some((i, (primary, _))) = assigned.iter().enumerate().find(|(_, (p, _))| p.name != "hbs-a") {
        bail!("NCU {i} was assigned {}", primary.name);
    }
    let a_address = assigned.first().map(|(p, _)| p.address.clone()).context("no NCUs")?;
    let sessions = register_all(args, &ncus, 0..count, &endpoints, &farm, &a_address).await?;
    let addresses = i64::try_from(count * args.uplinks)?;
    wait_live(pool, "hbs-a", addresses, Duration::from_secs(120)).await?;
    eprintln!("{count} NCUs ({addresses} addresses) live on hbs-a after {:.1?}", ramp.elapsed());

    // 2. hbs-b joins; every NCU asks hds for a backup, as ncu does while it has none.
    let mut hbs_b = HbsProcess::start(
        args.hbs_bin()?,
        dir,
        "hbs-b",
        setup::free_port(b_ip)?,
        &args.database_url,
        None,
        &args.hbs_config,
    )?;
    setup::wait_for_fleet_row(pool, "hbs-b", Duration::from_secs(30)).await?;
    let pairs = assign_all(&ncus, &hds_addr, &[], args.concurrency).await?;
    let backups: Vec<Option<tether_proto::hds::HeartbeatServer>> = pairs
        .into_iter()
        .map(|(primary, backup)| [Some(primary), backup].into_iter().flatten().find(|s| s.name != "hbs-a"))
        .collect();
    let with_backup = backups.iter().filter(|b| b.is_some()).count();
    eprintln!("{with_backup} of {count} NCUs have hbs-b as backup");
    // As ncu does once it knows its backup: an idle connection to it, handshake done, ready for a move.
    let dialled = Instant::now();
    let mut standbys = dial_all(&ncus, &backups, &endpoints, args.concurrency).await;
    let ready = standbys.iter().filter(|s| s.is_some()).count();
    eprintln!("{ready} standby connections to the backup open after {:.1?}; settling 5 s", dialled.elapsed());
    tokio::time::sleep(Duration::from_secs(5)).await;
    hbs_a.check()?;
    hbs_b.check()?;

    // 3. Each NCU waits for its primary to go quiet, then moves: backup first, hds (hbs-a failed) if that fails.
    let killed: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let premature = Arc::new(AtomicUsize::new(0));
    let mut notify = Vec::with_capacity(count);
    let mut tasks = JoinSet::new();
    for (i, backup) in backups.into_iter().enumerate() {
        let (tx, mut rx) = mpsc::unbounded_channel::<u64>();
        notify.push(tx);
        let ncus = ncus.clone();
        let endpoint = endpoints[i % endpoints.len()].clone();
        let farm = farm.clone();
        let killed = killed.clone();
        let premature = premature.clone();
        let hds_addr = hds_addr.clone();
        let mut standby = standbys[i].take();
        tasks.spawn(async move {
            loop {
                let _session = rx.recv().await.context("farm gone")?;
                let Some(&at) = killed.get() else {
                    premature.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let detected = at.elapsed();
                let ncu = &ncus[i];
                let mut failed = vec!["hbs-a".to_owned()];
                let mut target = backup.clone();
                loop {
                    let server = match target.take() {
                        Some(server) => server,
                        None => assign_patiently(&hds_addr, ncu, &failed).await?.0,
                    };
                    // The standby connection first, as ncu does; a new connection when it is gone or fails.
                    let standby = standby.take().filter(|c| c.close_reason().is_none());
                    let over_standby = standby.is_some();
                    let attempt = match standby {
                        Some(connection) => {
                            let registering = ncu::register_on(connection, ncu, farm.port);
                            match tokio::time::timeout(STANDBY_TIMEOUT, registering).await {
                                Ok(result) => result,
                                Err(_) => Err(anyhow::anyhow!("no registration within {STANDBY_TIMEOUT:?}")),
                            }
                        }
                        None => ncu::register(&endpoint, ncu, farm.port, &server.address, CONNECT_TIMEOUT).await,
                    };
                    match attempt {
                        Ok(session) => {
                            let registered = at.elapsed();
                            let _ = farm.tx.send(ToFarm::Session {
                                ncu: i,
                                session: session.id,
                                key: session.key,
                                hbs: session.heartbeat,
                            });
                            // As ncu does after a move: ask hds for a new backup, in the background, once the
                            // storm has settled and after a random share of ncu's BACKUP_SPREAD.
                            let hds_addr = hds_addr.clone();
                            let ncus = ncus.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(BACKUP_SETTLE + BACKUP_SPREAD.mul_f64(rand::random())).await;
                                let _ = ncu::assign(&hds_addr, &ncus[i], &[]).await;
                            });
                            return Ok::<_, anyhow::Error>((
                                Rehome { detected, registered, server: server.name, over_standby },
                                session,
                            ));
                        }
                        Err(error) => {
                            tracing::warn!(ncu = i, server = %server.name, error = %format!("{error:#}"), "cannot re-home");
                            failed.push(server.name);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some(lost) = lost_rx.recv().await {
            if let Some(tx) = notify.get(lost.ncu) {
                let _ = tx.send(lost.session);
            }
        }
    });

    let deaths_before = setup::deaths(pool).await?;
    let at = Instant::now();
    let _ = killed.set(at);
    hbs_a.kill()?;
    let killed_at =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    eprintln!("hbs-a killed (SIGKILL) at {killed_at:.3} (Unix time)");
    let mut rehomed = Vec::with_capacity(count);
    let mut failures = 0;
    let mut kept = Vec::with_capacity(count);
    let limit = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(limit);
    while !tasks.is_empty() {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok(Ok((rehome, session)))) => {
                    rehomed.push(rehome);
                    kept.push(session);
                }
                Some(_) => failures += 1,
                None => break,
            },
            () = &mut limit => {
                failures += tasks.len();
                tasks.abort_all();
                break;
            }
        }
    }
    let all = at.elapsed();
    eprintln!("{} NCUs re-homed in {all:.1?}; watching {watch:?} for deaths (hbs rehome_grace is 20 s)", rehomed.len());
    tokio::time::sleep(watch).await;
    hbs_b.check()?;
    let deaths_after = setup::deaths(pool).await?;
    let wrongly_dead = (deaths_after.0 - deaths_before.0, deaths_after.1 - deaths_before.1);
    let death_times = setup::death_times(pool, killed_at).await?;
    let (live, pending, dead) = setup::address_states(pool, "hbs-b").await?;
    let (a_live, a_pending, a_dead) = setup::address_states(pool, "hbs-a").await?;

    if let Ok(path) = std::env::var("STORM_CSV") {
        let rows: Vec<String> = rehomed
            .iter()
            .zip(&kept)
            .map(|(r, s)| {
                format!("{:.3},{:.3},{},{}", r.detected.as_secs_f64(), r.registered.as_secs_f64(), r.over_standby, s.id)
            })
            .collect();
        std::fs::write(path, rows.join("\n"))?;
    }
    let mut registered: Vec<Duration> = rehomed.iter().map(|r| r.registered).collect();
    let mut detected: Vec<Duration> = rehomed.iter().map(|r| r.detected).collect();
    registered.sort();
    detected.sort();
    let on_b = rehomed.iter().filter(|r| r.server == "hbs-b").count();
    let over_standby = rehomed.iter().filter(|r| r.over_standby).count();
    let ms = |d: Option<&Duration>| d.map_or("-".to_owned(), |d| format!("{:.0} ms", d.as_secs_f64() * 1000.0));
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| NCUs (addresses) | {count} ({addresses}) |");
    println!(
        "| re-homed | {} ({on_b} on hbs-b, {over_standby} over their standby connection), {failures} failed |",
        rehomed.len()
    );
    println!("| all re-homed (kill → last Registered) | {} |", ms(registered.last()));
    println!(
        "| per NCU, p50 / p99 / max | {} / {} / {} |",
        ms(pct(&registered, 50)),
        ms(pct(&registered, 99)),
        ms(registered.last())
    );
    println!("| kill → primary lost, p50 / max | {} / {} |", ms(pct(&detected, 50)), ms(detected.last()));
    println!(
        "| addresses marked dead, kill → {} s after the last re-home (live→dead / pending→dead) | {} / {} |",
        watch.as_secs(),
        wrongly_dead.0,
        wrongly_dead.1
    );
    let secs = |i: usize| death_times.get(i).map_or("-".to_owned(), |t| format!("{t:.1} s"));
    println!(
        "| live → dead, seconds after the kill: first / median / last | {} / {} / {} |",
        secs(0),
        secs(death_times.len() / 2),
        secs(death_times.len().saturating_sub(1))
    );
    println!("| addresses on hbs-b: live / pending / dead | {live} / {pending} / {dead} |");
    println!("| left on hbs-a: live / pending / dead | {a_live} / {a_pending} / {a_dead} |");
    println!("| premature primary-lost events | {} |", premature.load(Ordering::Relaxed));
    drop(kept);
    drop(sessions);
    shutdown.cancel();
    let _ = hds_task.await;
    Ok(())
}

/// The running hbs `attach` registers with.
struct Attached<'a> {
    /// Its control address.
    control: SocketAddr,
    /// Its name.
    name: &'a str,
    /// The directory holding the CA it trusts.
    pki: &'a Path,
}

async fn attach(
    args: &Args,
    pool: &PgPool,
    hbs: Attached<'_>,
    addresses: usize,
    (live_within, hold): (Duration, Duration),
) -> anyhow::Result<()> {
    let ca = tether_pki::Ca::load(hbs.pki).with_context(|| format!("loading the CA in {}", hbs.pki.display()))?;
    let uplinks = args.uplinks.max(1);
    let count = addresses.div_ceil(uplinks);
    let started = Instant::now();
    let ncus = Arc::new(setup::seed_ncus(pool, &ca, 0, count, uplinks).await?);
    eprintln!("seeded {count} NCUs × {uplinks} uplinks in {:.1?}", started.elapsed());
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let ips: Vec<Vec<IpAddr>> = ncus.iter().map(|n| n.ips.clone()).collect();
    let farm = Farm::start(&ips, Duration::from_secs(3), lost_tx, args.farm_poll.map(Duration::from_micros))?;
    let endpoints = client_endpoints(hbs.control.ip())?;
    let ramp = Instant::now();
    let sessions = register_all(args, &ncus, 0..count, &endpoints, &farm, &hbs.control.to_string()).await?;
    let total = i64::try_from(count * uplinks)?;
    let deadline = Instant::now() + live_within;
    loop {
        let (live, pending, dead) = setup::bench_address_states(pool).await?;
        if live >= total {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {live} of {total} addresses live after {live_within:?} ({pending} pending, {dead} dead)");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "attach: all {total} addresses ({count} NCUs × {uplinks}) live on {} after {:.1?}",
        hbs.name,
        ramp.elapsed()
    );
    let deaths0 = setup::bench_deaths(pool).await?;
    let mut reported = deaths0;
    let mut lost = 0;
    let held = Instant::now();
    while held.elapsed() < hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        while lost_rx.try_recv().is_ok() {
            lost += 1;
        }
        let deaths = setup::bench_deaths(pool).await?;
        if deaths != reported {
            println!(
                "attach: since all were live, {} live→dead and {} pending→dead; primaries lost: {lost}",
                deaths.0 - deaths0.0,
                deaths.1 - deaths0.1
            );
            reported = deaths;
        }
    }
    println!("attach: held {hold:?}; stopping");
    drop(sessions);
    Ok(())
}

/// Opens each NCU's standby connection to its backup (none without a backup or when the handshake fails),
/// `concurrency` at a time.
async fn dial_all(
    ncus: &Arc<Vec<SimNcu>>,
    backups: &[Option<tether_proto::hds::HeartbeatServer>],
    endpoints: &[quinn::Endpoint],
    concurrency: usize,
) -> Vec<Option<quinn::Connection>> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for (i, backup) in backups.iter().enumerate() {
        let Some(backup) = backup.clone() else { continue };
        let ncus = ncus.clone();
        let endpoint = endpoints[i % endpoints.len()].clone();
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.ok()?;
            match ncu::dial(&endpoint, &ncus[i], &backup.address, CONNECT_TIMEOUT).await {
                Ok(connection) => Some((i, connection)),
                Err(error) => {
                    tracing::warn!(ncu = i, error = %format!("{error:#}"), "no standby connection");
                    None
                }
            }
        });
    }
    let mut standbys: Vec<Option<quinn::Connection>> = (0..ncus.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Some((i, connection))) = joined {
            standbys[i] = Some(connection);
        }
    }
    standbys
}

/// Asks hds for a primary and a backup, retrying with backoff while none is available or hds is slow to answer, as
/// ncu does (bounded here: 60 s).
async fn assign_patiently(
    hds: &str,
    ncu: &SimNcu,
    failed: &[String],
) -> anyhow::Result<(tether_proto::hds::HeartbeatServer, Option<tether_proto::hds::HeartbeatServer>)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut delay = Duration::from_millis(200);
    loop {
        match ncu::assign(hds, ncu, failed).await {
            Ok(pair) => return Ok(pair),
            Err(error) if Instant::now() + delay < deadline => {
                tracing::debug!(error = %format!("{error:#}"), "no answer from hds yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Asks hds for every NCU's servers, `concurrency` at a time.
async fn assign_all(
    ncus: &Arc<Vec<SimNcu>>,
    hds: &str,
    failed: &[String],
    concurrency: usize,
) -> anyhow::Result<Vec<(tether_proto::hds::HeartbeatServer, Option<tether_proto::hds::HeartbeatServer>)>> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..ncus.len() {
        let ncus = ncus.clone();
        let permits = permits.clone();
        let hds = hds.to_owned();
        let failed = failed.to_vec();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let pair = assign_patiently(&hds, &ncus[i], &failed).await.with_context(|| format!("assigning NCU {i}"))?;
            Ok::<_, anyhow::Error>((i, pair))
        });
    }
    let mut pairs: Vec<Option<_>> = (0..ncus.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, pair) = joined??;
        pairs[i] = Some(pair);
    }
    pairs.into_iter().map(|p| p.context("missing assignment")).collect()
}

fn pct(sorted: &[Duration], p: usize) -> Option<&Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted.get(rank - 1)
}
