//! `hds`: tether's heartbeat distribution server, and `hds pki` for the operator PKI.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hds::config::Config;
use tether_pki as pki;

/// Hands each NCU a primary and a backup heartbeat server, and enrolls NCUs with the operator CA.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML); runs the server.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Parse and validate the configuration, then exit.
    #[arg(long, requires = "config")]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The operator PKI.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Creates the operator CA in DIR (ca.pem, ca.key 0600) and certificates for the named servers.
    Init {
        /// Directory for the CA and certificates.
        #[arg(long)]
        dir: PathBuf,
        /// A server certificate to issue: NAME=SAN[,SAN...] (DNS names or IPs), e.g. hbs-a=hbs-a.example.net,198.18.0.2.
        #[arg(long = "server", value_name = "NAME=SANS")]
        servers: Vec<String>,
        /// Validity of the server certificates, in days.
        #[arg(long, default_value_t = 397)]
        days: u64,
    },
    /// Issues more server certificates with an existing CA in DIR.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// NAME=SAN[,SAN...].
        #[arg(long = "server", value_name = "NAME=SANS", required = true)]
        servers: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 397)]
        days: u64,
    },
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (args.command, args.config) {
        (Some(Command::Pki { command }), _) => pki_command(command),
        (None, Some(path)) => return tether_service::start("hds", &path, args.check, serve),
        (None, None) => Err(anyhow::anyhow!("give --config FILE to run the server, or a subcommand (see --help)")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hds: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn pki_command(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir, servers, days } => {
            let ca = pki::Ca::generate("tether operator CA", 10 * 365 * DAY)?;
            ca.save(&dir)?;
            eprintln!("hds: created the operator CA in {} (ca.pem, ca.key)", dir.display());
            issue(&ca, &dir, &servers, days)
        }
        PkiCommand::Issue { dir, servers, days } => {
            let ca = pki::Ca::load(&dir).context("loading the CA (run `hds pki init` first)")?;
            issue(&ca, &dir, &servers, days)
        }
    }
}

fn issue(ca: &pki::Ca, dir: &std::path::Path, servers: &[String], days: u64) -> anyhow::Result<()> {
    for spec in servers {
        let Some((name, sans)) = spec.split_once('=') else {
            bail!("--server {spec:?}: expected NAME=SAN[,SAN...]");
        };
        let sans: Vec<String> = sans.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        if name.is_empty() || sans.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("--server {spec:?}: NAME must be letters, digits and hyphens, with at least one SAN");
        }
        let issued = ca.issue_server(name, &sans, DAY * u32::try_from(days).unwrap_or(u32::MAX))?;
        pki::write_new(&dir.join(format!("{name}.key")), &issued.key_pem, 0o600)?;
        pki::write_new(&dir.join(format!("{name}.pem")), &issued.cert_pem, 0o644)?;
        eprintln!("hds: issued {name}.pem / {name}.key for {}", sans.join(", "));
    }
    Ok(())
}

async fn serve(config: Config, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    let socket =
        std::net::UdpSocket::bind(config.listen).with_context(|| format!("binding listen {}", config.listen))?;
    hds::run(socket, config, shutdown).await
}
