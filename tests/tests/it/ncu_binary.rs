//! `ncu run` as the real binary against dns, hds and hbs in-process over real Postgres: it registers its fixed
//! uplinks, keeps answering, and stops cleanly on SIGTERM.

use std::{process::Command, time::Duration};

use anyhow::Result;
use hickory_proto::rr::RecordType;
use reqwest::Method;
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask},
    eventually,
    fleet::HbsServer,
    hds_stack::{HdsServer, Pki},
    stack::Stack,
};

// The servers run on this test's runtime while the real binaries are waited for: two worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_registers_fixed_uplinks_keeps_answering_and_stops_on_sigterm() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "cli.tether.test" })).await?;
    let pki = Pki::new()?;
    let hds = HdsServer::start(&stack.pg.url(), &pki, "").await?;
    let _hbs = HbsServer::start(&stack.pg.url(), &pki, "hbs-cli").await?;
    let (_, body) = stack.api.call(Method::POST, "/v1/domains/cli.tether.test/enrollments", Some(&acme), None).await?;
    let token = body["token"].as_str().unwrap_or_default().to_owned();
    let dir = tempfile::tempdir()?;
    let identity = dir.path().join("identity");
    let enroll = Command::new(tether_tests::system::binaries()?.join("ncu"))
        .args(["enroll", "--hds", &hds.address(), "--token", &token, "--ca"])
        .arg(pki.path("ca.pem"))
        .arg("--dir")
        .arg(&identity)
        .output()?;
    assert!(enroll.status.success(), "{}", String::from_utf8_lossy(&enroll.stderr));

    let config = dir.path().join("ncu.toml");
    std::fs::write(
        &config,
        format!(
            "hds = ['{}']\nidentity = '{}'\n[[uplink]]\nname = 'wan1'\naddress = '127.0.3.1'\n\
             [[uplink]]\nname = 'wan2'\naddress = '127.0.3.2'\n",
            hds.address(),
            identity.display()
        ),
    )?;
    let mut child =
        Command::new(tether_tests::system::binaries()?.join("ncu")).arg("run").arg("--config").arg(&config).spawn()?;
    let result = async {
        eventually(Duration::from_secs(20), "both uplinks answered", || async {
            let r = ask(stack.dns.dns_addr, "cli.tether.test.", RecordType::A, Transport::Udp).await.ok()?;
            let mut got = addresses(&r);
            got.sort();
            (got == ["127.0.3.1", "127.0.3.2"]).then_some(())
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        anyhow::ensure!(child.try_wait()?.is_none(), "ncu run exited on its own");
        let r = ask(stack.dns.dns_addr, "cli.tether.test.", RecordType::A, Transport::Udp).await?;
        anyhow::ensure!(addresses(&r).len() == 2, "still answered after 3 s");
        Ok(())
    }
    .await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    result?;
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    Ok(())
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ncu.toml");
    std::fs::write(&path, "hds = ['a:1']\nfailover_after = '1ms'\n").expect("write");
    let out = Command::new(tether_tests::system::binaries().expect("binaries").join("ncu"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("failover_after"), "{message}");
}

#[test]
fn serve_and_services_configurations_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ncu.toml");
    let uplink = "[[uplink]]\nname = 'eth0'\naddress = '127.0.3.9'\n";
    for (command, config, says) in [
        ("serve", String::new(), "list them as [[uplink]]"),
        ("serve", format!("{uplink}[services.web]\nto = '198.19.1.10:80'\n"), "a server forwards nothing"),
        ("run", "[services.web]\nto = '198.19.1.10:80'\nstart = ['true']\n".to_owned(), "not both"),
        ("run", "[services.'a b']\ncheck = 'tcp'\n".to_owned(), "services"),
        ("run", "[services.web]\ncheck = 'ping'\n".to_owned(), "check"),
        ("run", "load = 'gpu'\n".to_owned(), "load"),
        ("run", "load = 'connections:0'\n".to_owned(), "load"),
    ] {
        std::fs::write(&path, format!("hds = ['a:1']\nidentity = '/nonexistent'\n{config}")).expect("write");
        let out = Command::new(tether_tests::system::binaries().expect("binaries").join("ncu"))
            .arg(command)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "ncu {command} with {config:?}");
        let message = String::from_utf8_lossy(&out.stderr);
        assert!(message.contains(says), "ncu {command} with {config:?}: {message}");
    }
}
