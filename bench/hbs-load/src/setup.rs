//! Everything around the load: the operator PKI, NCU identities and rows, the death log in Postgres, and the hbs
//! processes under test.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use sqlx::PgPool;
use tether_pki as pki;

/// An NCU simulated by the load generator.
pub(crate) struct SimNcu {
    /// Its TLS identity (client certificate signed by the operator CA).
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// Its uplink addresses, in index order.
    pub(crate) ips: Vec<IpAddr>,
}

/// The operator PKI in `dir`: the CA (ca.pem, ca.key) and a server certificate per `(name, ip)`.
pub(crate) fn make_pki(dir: &Path, servers: &[(&str, IpAddr)]) -> anyhow::Result<pki::Ca> {
    let ca = pki::Ca::generate("tether bench CA", Duration::from_secs(3600 * 24))?;
    ca.save(dir)?;
    for (name, ip) in servers {
        let issued = ca.issue_server(name, &[ip.to_string()], Duration::from_secs(3600 * 24))?;
        pki::write_new(&dir.join(format!("{name}.pem")), &issued.cert_pem, 0o644)?;
        pki::write_new(&dir.join(format!("{name}.key")), &issued.key_pem, 0o600)?;
    }
    Ok(ca)
}

/// The `n`-th uplink address of the run: 127.16.0.0 upwards, clear of 127.0.0.0/16 where the servers listen.
pub(crate) fn uplink_ip(n: usize) -> IpAddr {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 16, 0, 0)).saturating_add(n)))
}

/// Creates NCUs `first..first + count` with `uplinks` addresses each: a domain per NCU, its `ncus` row bound to a
/// fresh client certificate, as enrollment would leave them (enrollment itself is not what is measured).
pub(crate) async fn seed_ncus(
    pool: &PgPool,
    ca: &pki::Ca,
    first: usize,
    count: usize,
    uplinks: usize,
) -> anyhow::Result<Vec<SimNcu>> {
    let (zone, subscriber) = bench_zone(pool).await?;
    let ca_pem = ca.cert_pem().to_owned();
    let mut ncus = Vec::with_capacity(count);
    let mut fqdns = Vec::with_capacity(count);
    let mut fingerprints = Vec::with_capacity(count);
    for i in first..first + count {
        let domain = format!("n{i}.bench.test");
        let csr = pki::new_csr("tether ncu")?;
        let cert_pem = ca.sign_ncu(&csr.csr_pem, &domain, Duration::from_secs(3600 * 24))?;
        fingerprints.push(pki::fingerprint(&pki::cert_from_pem(&cert_pem)?).to_vec());
        fqdns.push(format!("{domain}."));
        let tls = pki::client_tls(&ca_pem, Some((&cert_pem, &csr.key_pem)), tether_proto::control::ALPN)?;
        let ips = (0..uplinks).map(|u| uplink_ip(i * uplinks + u)).collect();
        ncus.push(SimNcu { tls: Arc::new(tls), ips });
    }
    sqlx::query(
        "WITH d AS (INSERT INTO domains (fqdn, zone_id, subscriber_id) \
         SELECT f, $2, $3 FROM UNNEST($1::text[]) AS f RETURNING id, fqdn) \
         INSERT INTO ncus (domain_id, cert_fingerprint) \
         SELECT d.id, v.fp FROM d JOIN UNNEST($1::text[], $4::bytea[]) AS v(fqdn, fp) ON v.fqdn = d.fqdn",
    )
    .bind(&fqdns)
    .bind(zone)
    .bind(subscriber)
    .bind(&fingerprints)
    .execute(pool)
    .await
    .context("inserting domains and NCUs")?;
    Ok(ncus)
}

async fn bench_zone(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let subscriber: i64 = sqlx::query_scalar(
        "INSERT INTO subscribers (name, token_hash) VALUES ('bench', '\\x00') \
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
    )
    .fetch_one(pool)
    .await?;
    let zone: i64 = sqlx::query_scalar(
        "INSERT INTO zones (origin, nameservers, hostmaster) VALUES ('bench.test.', '[]', 'hostmaster.bench.test.') \
         ON CONFLICT (origin) DO UPDATE SET origin = EXCLUDED.origin RETURNING id",
    )
    .fetch_one(pool)
    .await?;
    Ok((zone, subscriber))
}

/// Logs every transition to `dead` (whoever makes it: a heartbeat server or orphan expiry) in `bench_deaths`.
pub(crate) async fn install_death_log(pool: &PgPool) -> anyhow::Result<()> {
    for statement in [
        "CREATE TABLE IF NOT EXISTS bench_deaths \
         (id bigint, hbs text, was text, at timestamptz NOT NULL DEFAULT clock_timestamp())",
        "CREATE OR REPLACE FUNCTION bench_log_death() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO bench_deaths (id, hbs, was) VALUES (NEW.id, NEW.hbs, OLD.state::text); RETURN NULL; END $$",
        "DROP TRIGGER IF EXISTS bench_deaths ON addresses",
        "CREATE TRIGGER bench_deaths AFTER UPDATE OF state ON addresses FOR EACH ROW \
         WHEN (NEW.state = 'dead' AND OLD.state <> 'dead') EXECUTE FUNCTION bench_log_death()",
    ] {
        sqlx::query(statement).execute(pool).await.with_context(|| statement.to_owned())?;
    }
    Ok(())
}

/// Deaths logged so far: (live → dead, pending → dead). Only the first are false deaths of proven addresses; the
/// second are new addresses whose first pings went unanswered (e.g. a generator too slow to learn its session).
pub(crate) async fn deaths(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE was = 'live'), count(*) FILTER (WHERE was <> 'live') FROM bench_deaths",
    )
    .fetch_one(pool)
    .await?)
}

/// Seconds from `since` (Unix time) to each death of a live address logged after it, in order.
pub(crate) async fn death_times(pool: &PgPool, since: f64) -> anyhow::Result<Vec<f64>> {
    Ok(sqlx::query_scalar(
        "SELECT (extract(epoch FROM at) - $1)::float8 FROM bench_deaths \
         WHERE was = 'live' AND extract(epoch FROM at) >= $1 ORDER BY at",
    )
    .bind(since)
    .fetch_all(pool)
    .await?)
}

/// NCU addresses by (server, state).
pub(crate) async fn address_states(pool: &PgPool, hbs: &str) -> anyhow::Result<(i64, i64, i64)> {
    let row: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'live'), count(*) FILTER (WHERE state = 'pending'), \
         count(*) FILTER (WHERE state = 'dead') FROM addresses WHERE source = 'ncu' AND hbs = $1",
    )
    .bind(hbs)
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// The states of the seeded NCUs' addresses (zone `bench.test.`, whichever server has them): (live, pending, dead).
pub(crate) async fn bench_address_states(pool: &PgPool) -> anyhow::Result<(i64, i64, i64)> {
    let row: (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE a.state = 'live'), count(*) FILTER (WHERE a.state = 'pending'), \
         count(*) FILTER (WHERE a.state = 'dead') FROM addresses a JOIN domains d ON d.id = a.domain_id \
         JOIN zones z ON z.id = d.zone_id WHERE a.source = 'ncu' AND z.origin = 'bench.test.'",
    )
    .fetch_one(pool)
    .await?;
    Ok(row)
}

/// [`deaths`] of the seeded NCUs' addresses only (beside others in a shared database).
pub(crate) async fn bench_deaths(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE b.was = 'live'), count(*) FILTER (WHERE b.was <> 'live') \
         FROM bench_deaths b JOIN addresses a ON a.id = b.id JOIN domains d ON d.id = a.domain_id \
         JOIN zones z ON z.id = d.zone_id WHERE z.origin = 'bench.test.'",
    )
    .fetch_one(pool)
    .await?)
}

/// Which NCUs have addresses still pending on `hbs`: how many NCUs, how many of them have every address pending,
/// and the first few ids (to find in hbs's log).
pub(crate) async fn pending_ncus(pool: &PgPool, hbs: &str) -> anyhow::Result<String> {
    let row: (i64, i64, Option<Vec<i64>>) = sqlx::query_as(
        "WITH p AS (SELECT ncu_id, count(*) FILTER (WHERE state = 'pending') AS pending, count(*) AS all_rows \
         FROM addresses WHERE source = 'ncu' AND hbs = $1 GROUP BY ncu_id) \
         SELECT count(*), count(*) FILTER (WHERE pending = all_rows), \
         (SELECT array_agg(ncu_id ORDER BY ncu_id) \
          FROM (SELECT ncu_id FROM p WHERE pending > 0 ORDER BY ncu_id LIMIT 10) AS f) \
         FROM p WHERE pending > 0",
    )
    .bind(hbs)
    .fetch_one(pool)
    .await?;
    Ok(format!(
        "{} NCUs with pending addresses ({} with all pending), first: {:?}",
        row.0,
        row.1,
        row.2.unwrap_or_default()
    ))
}

/// A free UDP port on 127.0.0.1 (bound and released; the server binds it next).
pub(crate) fn free_port(ip: IpAddr) -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?.local_addr()?)
}

/// An hbs process under test; killed (SIGKILL) on drop.
pub(crate) struct HbsProcess {
    /// Its name.
    pub(crate) name: String,
    /// Its control address.
    pub(crate) control: SocketAddr,
    child: Child,
}

impl HbsProcess {
    /// Starts `bin` as `name` on `control`, pinned to `cpu` (taskset) when given, with `extra` appended to its
    /// configuration; logs go to `dir/<name>.log`.
    pub(crate) fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        control: SocketAddr,
        database_url: &str,
        cpu: Option<&str>,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let config = dir.join(format!("{name}.toml"));
        let text = format!(
            "name = '{name}'\ncontrol_listen = '{control}'\nheartbeat_listen = '{}:0'\ndatabase_url = '{database_url}'\n\
             ca = '{ca}'\ncert = '{cert}'\nkey = '{key}'\ncapacity = 1000000\nfleet_every = '1s'\n",
            control.ip(),
            ca = dir.join("ca.pem").display(),
            cert = dir.join(format!("{name}.pem")).display(),
            key = dir.join(format!("{name}.key")).display(),
        );
        std::fs::write(&config, format!("{text}{extra}\n"))?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut command = match cpu {
            Some(cpu) => {
                let mut command = Command::new("taskset");
                command.args(["-c", cpu]).arg(bin);
                command
            }
            None => Command::new(bin),
        };
        let child = command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", std::env::var("HBS_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { name: name.to_owned(), control, child })
    }

    /// The process id (taskset execs hbs, so it is hbs's).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as when the host dies.
    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Fails if the process has exited.
    pub(crate) fn check(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for HbsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) of a process, from /proc.
pub(crate) fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, rest)| rest).context("unreadable /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok(Duration::from_millis(ticks * 10))
}

/// Waits until `hbs` has refreshed its fleet row.
pub(crate) async fn wait_for_fleet_row(pool: &PgPool, hbs: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let seen: Option<i32> = sqlx::query_scalar("SELECT 1 FROM heartbeat_servers WHERE name = $1")
            .bind(hbs)
            .fetch_optional(pool)
            .await
            .unwrap_or(None);
        if seen.is_some() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{hbs} did not appear in heartbeat_servers within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
