//! The real `packet-forwarder` binary: bad configurations refused with the key named; a relay; SIGTERM.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};
use serde_json::json;
use tether_tests::eventually;

use super::common::{SOON, Setup, Site, connect, free_port, ip, ping};

/// The packet-forwarder binary built from the current sources.
fn bin() -> Result<std::path::PathBuf> {
    Ok(tether_tests::system::binaries()?.join("packet-forwarder"))
}

/// Runs the binary with `config` and returns (exit code, stderr).
fn run_with(config: &str, extra: &[&str]) -> Result<(Option<i32>, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("forwarder.toml");
    std::fs::write(&path, config)?;
    let output = Command::new(bin()?).arg("--config").arg(&path).args(extra).env_remove("DATABASE_URL").output()?;
    Ok((output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned()))
}

#[test]
fn bad_configurations_are_refused_naming_the_key() -> Result<()> {
    let url = "database_url = 'postgres://tether@localhost/tether'\n";
    for (config, key) in [
        (format!("{url}udp_idle_timout = '5s'\n"), "udp_idle_timout"),
        (format!("{url}connect_timeout = 'soon'\n"), "connect_timeout"),
        (format!("{url}connect_timeout = '5m'\n"), "connect_timeout"),
        (format!("{url}metrics_listen = 'localhost'\n"), "metrics_listen"),
        (format!("{url}tcp_buffer = 1\n"), "tcp_buffer"),
        ("log_format = 'text'\n".to_owned(), "database_url"),
        (format!("{url}log_format = 'xml'\n"), "log_format"),
        ("this is not toml".to_owned(), "expected"),
    ] {
        let (code, stderr) = run_with(&config, &[])?;
        assert_eq!(code, Some(2), "{config}: {stderr}");
        assert!(stderr.contains("bad configuration") && stderr.contains(key), "{config}: {stderr}");
    }
    let (code, stderr) = run_with(url, &["--check"])?;
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = run_with(include_str!("../../../../deploy/packet-forwarder.toml"), &["--check"])?;
    assert_eq!(code, Some(0), "the example config: {stderr}");
    Ok(())
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_relays_and_stops_on_sigterm() -> Result<()> {
    let setup = Setup::new(47, "binary", &[2], json!({})).await?;
    let _site = Site::start(SocketAddr::new(ip(47, 2), setup.port), false).await?;
    let metrics_port = free_port(&[ip(47, 200)]).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("forwarder.toml");
    std::fs::write(
        &path,
        format!(
            "database_url = '{}'\nmetrics_listen = '127.0.47.200:{metrics_port}'\n\
             allowed_target_ranges = ['127.0.0.0/8']\n",
            setup.stack.pg.url()
        ),
    )?;
    let child = Command::new(bin()?)
        .arg("--config")
        .arg(&path)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting packet-forwarder")?;
    let mut running = Running(child);
    let to = setup.static_addr();
    let (mut stream, site) =
        eventually(SOON * 4, "the binary to relay", || async { connect(to, ip(47, 100)).await.ok() }).await?;
    assert_eq!(site, "site 127.0.47.2");
    ping(&mut stream).await?;
    let metrics = reqwest::get(format!("http://127.0.47.200:{metrics_port}/metrics")).await?.text().await?;
    assert!(metrics.contains("tether_forwarder_flows_total{domain=\"binary.tether.test\",protocol=\"tcp\"} 1"));
    drop(stream);

    let status = Command::new("kill").arg("-TERM").arg(running.0.id().to_string()).status()?;
    assert!(status.success());
    let exit = eventually(SOON * 2, "the binary to exit", || {
        let exited = running.0.try_wait().ok().flatten();
        async move { exited }
    })
    .await?;
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    Ok(())
}
