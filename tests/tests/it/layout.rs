//! The workspace's layering, read from cargo itself: no server crate depends on another, and ncu, which runs on
//! routers, links none of the servers' heavy crates, even in a workspace build where features unify.

use std::process::Command;

use anyhow::{Context, Result, ensure};

const SERVERS: [&str; 5] = ["dns", "hbs", "hds", "ncu", "packet-forwarder"];

fn cargo(args: &[&str]) -> Result<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let output = Command::new(cargo).current_dir(workspace).args(args).output()?;
    ensure!(output.status.success(), "cargo {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8(output.stdout)?)
}

#[test]
fn no_server_crate_depends_on_another() -> Result<()> {
    let metadata: serde_json::Value =
        serde_json::from_str(&cargo(&["metadata", "--no-deps", "--format-version", "1"])?)?;
    let packages = metadata["packages"].as_array().context("packages")?;
    let mut found = 0;
    let mut wrong = Vec::new();
    for package in packages {
        let name = package["name"].as_str().context("name")?;
        if !SERVERS.contains(&name) {
            continue;
        }
        found += 1;
        for dependency in package["dependencies"].as_array().context("dependencies")? {
            let on = dependency["name"].as_str().context("dependency name")?;
            if SERVERS.contains(&on) || on == "tether-tests" {
                wrong.push(format!("{name} -> {on} ({})", dependency["kind"].as_str().unwrap_or("normal")));
            }
        }
    }
    assert_eq!(found, SERVERS.len(), "every server crate is a workspace member");
    assert!(wrong.is_empty(), "server crates depending on other server crates: {wrong:?}");
    Ok(())
}

#[test]
fn ncu_links_no_server_side_crates_in_a_workspace_build() -> Result<()> {
    let tree = cargo(&["tree", "-p", "ncu", "-e", "normal", "--prefix", "none"])?;
    let crates: Vec<&str> = tree.lines().filter_map(|line| line.split_whitespace().next()).collect();
    assert!(crates.contains(&"tether-proto") && crates.contains(&"quinn"), "the tree was read: {crates:?}");
    let heavy: Vec<&&str> =
        crates.iter().filter(|name| ["sqlx", "hickory-server", "axum", "reqwest"].contains(name)).collect();
    assert!(heavy.is_empty(), "ncu links {heavy:?}");
    Ok(())
}
