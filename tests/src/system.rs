//! tether's own binaries as real processes inside network namespaces, each logging to a file; killed on drop, so
//! nothing outlives a failed test.

use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The workspace's binaries and the packages that build them.
const BINARIES: [(&str, &str); 5] =
    [("dns", "dns"), ("hds", "hds"), ("hbs", "hbs"), ("ncu", "ncu"), ("packet-forwarder", "packet-forwarder")];

/// The directory holding the workspace's binaries, built from the current sources.
///
/// `$TETHER_BIN_DIR` when set; otherwise the profile directory this test executable was built in (`target/debug`).
/// Binaries missing or older than the sources are built with cargo under nextest (which has finished its own build
/// by then); under `cargo test`, whose build lock is still held, the test fails and says what to run.
pub fn binaries() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TETHER_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let dir =
        exe.parent().and_then(Path::parent).context("the test executable is not in target/<profile>/deps")?.to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?;
    let sources = newest_source(workspace)?;
    let stale: Vec<&str> = BINARIES
        .iter()
        .filter(|(binary, _)| {
            let modified = std::fs::metadata(dir.join(binary)).and_then(|m| m.modified());
            modified.map_or(true, |time| time < sources)
        })
        .map(|(binary, _)| *binary)
        .collect();
    if stale.is_empty() {
        return Ok(dir);
    }
    if std::env::var_os("NEXTEST").is_none() {
        bail!(
            "binaries {stale:?} in {} are missing or older than the sources: run `cargo build --workspace --bins` \
             first (scripts/test does)",
            dir.display()
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace).args(["build", "--quiet", "--bins"]);
    for (_, package) in BINARIES {
        command.args(["-p", package]);
    }
    if dir.file_name() == Some(OsStr::new("release")) {
        command.arg("--release");
    }
    let status = command.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the binaries failed: {status}");
    }
    Ok(dir)
}

/// The newest modification time of the workspace's Rust sources, manifests and migrations.
fn newest_source(workspace: &Path) -> Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut dirs: Vec<PathBuf> = vec![workspace.join("migrations")];
    for (_, package) in BINARIES {
        dirs.push(workspace.join(package).join("src"));
        newest = newest.max(std::fs::metadata(workspace.join(package).join("Cargo.toml"))?.modified()?);
    }
    newest = newest.max(std::fs::metadata(workspace.join("Cargo.lock"))?.modified()?);
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
