//! Shared helpers for tether's integration tests: a throwaway Postgres cluster, servers on port 0, and clients.

use std::{
    fs::File,
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{Gid, Pid, Uid, User},
};

pub mod dns_client;
pub mod fleet;
pub mod hds_stack;
pub mod netns;
pub mod peers;
pub mod stack;
pub mod system;

/// A Postgres cluster in a temporary directory, reachable over a Unix socket only; removed on drop.
pub struct Postgres {
    root: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(Uid, Gid)>,
    netns: Option<String>,
    child: Option<Child>,
    /// TCP address it listens on besides its Unix socket, if any.
    listen: Option<String>,
    /// Extra `-c name=value` settings.
    settings: Vec<String>,
}

const PORT: u16 = 5432;

impl Postgres {
    /// Runs initdb and starts the server; as root, both run as the `postgres` user (created if missing).
    pub async fn start() -> Result<Self> {
        Self::start_in(None).await
    }

    /// Like [`Postgres::start`], with the server inside network namespace `netns` (its full name; needs root).
    /// It still listens on a Unix socket only, which any namespace reaches.
    pub async fn start_in(netns: Option<String>) -> Result<Self> {
        Self::start_listening(netns, None).await
    }

    /// [`Postgres::start_in`], also listening on TCP at `listen` (an address of its namespace), where any client
    /// of 198.18.0.0/15 may connect and replicate without a password.
    pub async fn start_listening(netns: Option<String>, listen: Option<&str>) -> Result<Self> {
        let bin = postgres_bin()?;
        let owner = if Uid::effective().is_root() { Some(postgres_user()?) } else { None };
        let root = tempfile::Builder::new().prefix("tether-pg-").tempdir()?;
        std::fs::create_dir(root.path().join("run"))?;
        if let Some((uid, gid)) = owner {
            for dir in [root.path().to_owned(), root.path().join("run")] {
                std::os::unix::fs::chown(&dir, Some(uid.as_raw()), Some(gid.as_raw()))?;
            }
        }
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
        let listen = listen.map(str::to_owned);
        // A standby that stops answering is dropped after 2 s (keep-alives every second), not 60.
        let settings = if listen.is_some() { vec!["wal_sender_timeout=2s".to_owned()] } else { Vec::new() };
        let mut pg = Self { root, bin, owner, netns, child: None, listen, settings };
        let status = pg
            .command("initdb")
            .args(["-D", "data", "-U", "postgres", "--auth=trust", "--no-locale", "-E", "UTF8", "-N"])
            .stdout(Stdio::null())
            .stderr(pg.log_file()?)
            .status()
            .context("running initdb")?;
        if !status.success() {
            bail!("initdb failed: {}", pg.log_tail());
        }
        if pg.listen.is_some() {
            let hba = pg.root.path().join("data").join("pg_hba.conf");
            let mut file = File::options().append(true).open(&hba)?;
            std::io::Write::write_all(
                &mut file,
                b"host all all 198.18.0.0/15 trust\nhost replication all 198.18.0.0/15 trust\n",
            )?;
        }
        pg.restart().await?;
        Ok(pg)
    }

    /// A hot standby of `primary`: a base backup streamed from it (`pg_basebackup -R`), then started; it follows the
    /// primary's WAL from then on and takes only reads. In the primary's network namespace, if any.
    pub async fn standby_of(primary: &Postgres) -> Result<Self> {
        Self::standby_via(primary, None).await
    }

    /// [`Postgres::standby_of`] streaming over TCP from `host` (the primary's listening address, reached from the
    /// primary's namespace or `netns`), so cutting the link between them cuts the replication; the standby retries
    /// every 200 ms.
    pub async fn standby_via(primary: &Postgres, via: Option<(&str, Option<String>)>) -> Result<Self> {
        let bin = postgres_bin()?;
        let root = tempfile::Builder::new().prefix("tether-pg-standby-").tempdir()?;
        std::fs::create_dir(root.path().join("run"))?;
        if let Some((uid, gid)) = primary.owner {
            for dir in [root.path().to_owned(), root.path().join("run")] {
                std::os::unix::fs::chown(&dir, Some(uid.as_raw()), Some(gid.as_raw()))?;
            }
        }
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
        let (host, netns) = match via {
            Some((host, netns)) => (std::path::PathBuf::from(host), netns),
            None => (primary.root.path().join("run"), primary.netns.clone()),
        };
        // A silent primary (a cut link) is noticed within 2 s, a connection attempt gives up after 1 s, and the
        // next one follows 200 ms later: replication resumes about a second after the link returns.
        let settings =
            ["wal_retrieve_retry_interval=200ms", "wal_receiver_timeout=2s", "wal_receiver_status_interval=1s"]
                .map(str::to_owned)
                .to_vec();
        let mut standby = Self { root, bin, owner: primary.owner, netns, child: None, listen: None, settings };
        let status = standby
            .command("pg_basebackup")
            .args(["-D", "data", "-R", "-X", "stream", "-c", "fast", "-U", "postgres", "-p", &PORT.to_string()])
            // A replication slot: the primary keeps the WAL the standby has not received, however long a
            // partition lasts, so it always catches up.
            .args(["-C", "-S", "tether_standby", "-d", "connect_timeout=1", "-h"])
            .arg(host)
            .stdout(Stdio::null())
            .stderr(standby.log_file()?)
            .status()
            .context("running pg_basebackup")?;
        if !status.success() {
            bail!("pg_basebackup failed: {}", standby.log_tail());
        }
        standby.restart().await?;
        Ok(standby)
    }

    /// Promotes a standby to a primary (and waits until it is one).
    pub async fn promote(&self) -> Result<()> {
        let pool = self.pool().await?;
        sqlx::query("SELECT pg_promote(true, 30)").execute(&pool).await?;
        pool.close().await;
        Ok(())
    }

    /// A URL for sqlx and the servers.
    pub fn url(&self) -> String {
        format!("postgres://postgres@localhost:{PORT}/postgres?host={}", self.root.path().join("run").display())
    }

    /// Fast shutdown (SIGINT): connections are cut, as when a database host goes away.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        kill(pid, Signal::SIGINT)?;
        child.wait()?;
        Ok(())
    }

    /// Starts the server (again) on the same data directory and waits until it accepts connections.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let run = self.root.path().join("run");
        let child = self
            .command("postgres")
            .args(["-D", "data", "-p", &PORT.to_string(), "-k"])
            .arg(&run)
            .arg("-c")
            .arg(format!("listen_addresses={}", self.listen.as_deref().unwrap_or("")))
            .args(self.settings.iter().flat_map(|setting| ["-c", setting.as_str()]))
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdout(Stdio::null())
            .stderr(self.log_file()?)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(conn) = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(1))
                .connect(&self.url())
                .await
            {
                conn.close().await;
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("postgres exited with {status}: {}", self.log_tail());
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections within 30 s: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A pool for the test's own queries.
    pub async fn pool(&self) -> Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&self.url()).await?)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = match (&self.netns, self.owner) {
            // `ip netns exec` and `setpriv` both exec, so the child's pid is the server's.
            (Some(netns), Some((uid, gid))) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", netns, "setpriv"])
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(self.bin.join(program));
                command
            }
            _ => {
                let mut command = Command::new(self.bin.join(program));
                if let Some((uid, gid)) = self.owner {
                    command.uid(uid.as_raw()).gid(gid.as_raw());
                }
                command
            }
        };
        command.current_dir(self.root.path());
        command
    }

    fn log_path(&self) -> PathBuf {
        self.root.path().join("postgres.log")
    }

    fn log_file(&self) -> Result<File> {
        Ok(File::options().create(true).append(true).open(self.log_path())?)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // Immediate shutdown: the directory is deleted next anyway.
                let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            }
            let _ = child.wait();
        }
    }
}

/// The directory holding initdb and postgres: `$TETHER_PG_BIN`, the newest `/usr/lib/postgresql/*/bin`, or PATH.
fn postgres_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TETHER_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).find(|dir| Path::new(dir).join("postgres").exists()))
        .context("no PostgreSQL server found: install postgresql (scripts/install-deps) or set TETHER_PG_BIN")
}

/// The `postgres` user, created if missing: initdb and postgres refuse to run as root.
fn postgres_user() -> Result<(Uid, Gid)> {
    if let Some(user) = User::from_name("postgres")? {
        return Ok((user.uid, user.gid));
    }
    let status = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "postgres"])
        .status()
        .context("running useradd")?;
    if !status.success() {
        bail!("useradd postgres failed");
    }
    let user = User::from_name("postgres")?.context("postgres user missing after useradd")?;
    Ok((user.uid, user.gid))
}

/// Polls `check` every 20 ms until it returns `Some`, or fails after `limit` with `what` in the message.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends the in-process servers' logs to stderr when `TETHER_TEST_LOG` holds a filter (RUST_LOG syntax, e.g.
/// `dns=debug`); a test that fails can be rerun with it.
pub fn log_from_env() {
    if let Ok(filter) = std::env::var("TETHER_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The loopback address with port 0, for servers under test.
pub fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
