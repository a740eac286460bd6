//! Network namespaces made by a test, removed when dropped (also when the test fails), and sockets or whole threads
//! placed inside them.

use std::{fs::File, process::Command};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Namespaces this test created; deleted (with their veths) on drop.
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Creates namespaces named `<prefix><pid>-<name>`, each with loopback up. Needs root.
    pub fn create(names: &[&str]) -> Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("network namespace tests need root");
        }
        let mut created = Self { names: Vec::new() };
        for name in names {
            let full = format!("t{}-{name}", std::process::id());
            ip(&["netns", "add", &full])?;
            created.names.push(full.clone());
            ip(&["-n", &full, "link", "set", "lo", "up"])?;
        }
        Ok(created)
    }

    /// The full name of namespace `short`.
    pub fn name(&self, short: &str) -> String {
        format!("t{}-{short}", std::process::id())
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Result<()> {
        let name = self.name(ns);
        let mut all = vec!["-n", name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a fresh thread that has entered namespace `ns` (sockets it creates live there), without
    /// blocking the caller's runtime, which may be serving the other end.
    pub async fn within<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.name(ns));
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let result = enter(&path).map(|()| f());
            let _ = tx.send(result);
        });
        rx.await.map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// Moves the calling thread into the namespace at `path` (`/run/netns/<name>`).
pub fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    setns(file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
    Ok(())
}

/// Runs `ip args...`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !output.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}
