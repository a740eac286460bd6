//! `ncu`: tether's agent on the site's router.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ncu::{agent, hds_client, identity::Identity};
use tracing_subscriber::{filter::Targets, prelude::*};

/// tether's network connection unit.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enrolls this NCU: makes a key and CSR here and exchanges them and a one-time token for a certificate.
    Enroll {
        /// hds address(es), host:port; tried in turn.
        #[arg(long, required = true, value_delimiter = ',')]
        hds: Vec<String>,
        /// One-time token from the admin API (POST /v1/domains/{name}/enrollments).
        #[arg(long, env = "TETHER_ENROLLMENT_TOKEN")]
        token: String,
        /// The operator CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Where to store the identity.
        #[arg(long, default_value = "/var/lib/tether-ncu")]
        dir: PathBuf,
        /// Hardware serial number, shown to the operator.
        #[arg(long)]
        serial: Option<String>,
        /// MAC address, shown to the operator.
        #[arg(long)]
        mac: Option<String>,
    },
    /// Asks hds for a primary and a backup heartbeat server and prints them.
    Assign {
        /// hds address(es), host:port; tried in turn.
        #[arg(long, required = true, value_delimiter = ',')]
        hds: Vec<String>,
        /// Where the identity is stored.
        #[arg(long, default_value = "/var/lib/tether-ncu")]
        dir: PathBuf,
        /// Heartbeat servers found unreachable, never to be assigned.
        #[arg(long)]
        failed: Vec<String>,
        /// How long to keep retrying while no server is available.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Renews this NCU's certificate now (the agent also renews it by itself before it expires): a new key, its CSR
    /// exchanged with hds under the current certificate; the new pair replaces the old one in the identity directory.
    /// A running agent uses the new certificate from its next start.
    Renew {
        /// hds address(es), host:port; tried in turn.
        #[arg(long, required = true, value_delimiter = ',')]
        hds: Vec<String>,
        /// Where the identity is stored.
        #[arg(long, default_value = "/var/lib/tether-ncu")]
        dir: PathBuf,
    },
    /// Runs the agent: registers the uplinks, answers heartbeats, fails over.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Runs the agent for a server without a router role: announces its own addresses (the `[[uplink]]` entries),
    /// its presence and load every second, and starts and stops its services as their tuples come and go.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let default_level =
        if matches!(args.command, Command::Run { .. } | Command::Serve { .. }) { "info" } else { "warn" };
    // RUST_LOG as `level` or `target=level,...` (no regular expressions: the router build leaves the regex engine out).
    let filter = std::env::var("RUST_LOG").ok().and_then(|spec| spec.parse::<Targets>().ok());
    let filter = filter.unwrap_or_else(|| default_level.parse().unwrap_or_default());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    tracing_subscriber::registry().with(fmt).with(filter).init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ncu: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(args.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ncu: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command) -> anyhow::Result<()> {
    let serve = matches!(command, Command::Serve { .. });
    match command {
        Command::Enroll { hds, token, ca, dir, serial, mac } => {
            let ca_pem = tether_pki::read(&ca)?;
            let domain =
                hds_client::enroll(&hds, &ca_pem, &token, &dir, serial, mac).await.context("enrollment failed")?;
            eprintln!("ncu: enrolled for {domain}; identity stored in {} (0600)", dir.display());
            Ok(())
        }
        Command::Renew { hds, dir } => {
            let identity =
                Identity::load(&dir).with_context(|| format!("no NCU identity in {} (enroll first)", dir.display()))?;
            let renewed = hds_client::renew(&hds, &identity, &dir).await.context("renewal failed")?;
            let (_, not_after) = tether_pki::validity(&renewed.cert_pem)?;
            let until = humantime::format_rfc3339_seconds(not_after);
            eprintln!("ncu: certificate renewed, valid until {until}; identity in {} (0600)", dir.display());
            Ok(())
        }
        Command::Assign { hds, dir, failed, wait } => {
            let identity =
                Identity::load(&dir).with_context(|| format!("no NCU identity in {} (enroll first)", dir.display()))?;
            let pair = hds_client::assign(&hds, &identity, &failed, wait).await.context("assignment failed")?;
            let backup = pair.backup.map_or_else(|| "none".to_owned(), |b| format!("{} {}", b.name, b.address));
            #[allow(clippy::print_stdout)]
            {
                println!("primary {} {}", pair.primary.name, pair.primary.address);
                println!("backup {backup}");
            }
            Ok(())
        }
        Command::Run { config: path } | Command::Serve { config: path } => {
            let config = <ncu::config::Config as tether_config::Load>::load(&path)
                .with_context(|| format!("bad configuration in {}", path.display()))?;
            if serve {
                anyhow::ensure!(
                    !config.uplinks.is_empty(),
                    "bad configuration in {}: ncu serve announces the server's own addresses: list them as [[uplink]]",
                    path.display()
                );
                anyhow::ensure!(
                    config.services.values().all(|s| s.to.is_none()) && !config.manage_routes,
                    "bad configuration in {}: a server forwards nothing (no `to`, no manage_routes); use ncu run on a router",
                    path.display()
                );
            }
            let identity = Identity::load(&config.identity)
                .with_context(|| format!("no NCU identity in {} (enroll first)", config.identity.display()))?;
            let shutdown = tokio_util::sync::CancellationToken::new();
            let uplinks_rx = uplink_source(&config, &identity, &shutdown)?;
            let (status, _) = tokio::sync::watch::channel(agent::Status::default());
            tether_config::cancel_on_signal(shutdown.clone());
            let setup = agent::Setup {
                hds: config.hds,
                identity,
                failover_after: config.failover_after,
                site: agent::SiteConfig { services: config.services, load: config.load },
                identity_dir: Some(config.identity.clone()),
            };
            agent::run(setup, uplinks_rx, agent::Drill::default(), status, shutdown).await
        }
    }
}

/// The uplinks: fixed from the configuration, or discovered from the kernel by a background task.
fn uplink_source(
    config: &ncu::config::Config,
    identity: &Identity,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::sync::watch::Receiver<Vec<agent::UplinkSpec>>> {
    if !config.uplinks.is_empty() {
        let fixed = config
            .uplinks
            .iter()
            .map(|u| agent::UplinkSpec {
                name: u.name.clone(),
                address: u.address,
                interface: None,
                priority: u.priority,
                weight: u.weight,
            })
            .collect();
        return Ok(tokio::sync::watch::channel(fixed).1);
    }
    let target = match config.tcp_target() {
        Some(server) => ncu::uplinks::validate::Target::Tcp(server),
        None => ncu::uplinks::validate::Target::Hds {
            addresses: config.hds.clone(),
            tls: std::sync::Arc::new(tether_pki::client_tls(
                &identity.ca_pem,
                Some((&identity.cert_pem, &identity.key_pem)),
                tether_proto::hds::ALPN,
            )?),
        },
    };
    let settings = ncu::uplinks::discovery::Settings {
        selection: match &config.interfaces {
            Some(names) => ncu::uplinks::state::Selection::Names(names.clone()),
            None => ncu::uplinks::state::Selection::Auto,
        },
        rescan_every: config.rescan_every,
        target,
        validate_timeout: config.validate_timeout,
        max_backoff: config.max_backoff,
        priorities: config.priorities.clone(),
        weights: config.weights.clone(),
        manage_routes: config.manage_routes.then_some(config.route_metric),
    };
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(error) = ncu::uplinks::discovery::run(settings, tx, shutdown).await {
            tracing::error!("uplink discovery stopped: {error:#}");
        }
    });
    Ok(rx)
}
