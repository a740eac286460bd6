//! Shared helpers: a stack (Postgres + dns) with a forwarded domain, the forwarder in-process, site servers on
//! loopback addresses, and clients that check what they get back.

use packet_forwarder::config::Load as _;
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tether_tests::{eventually, stack::Stack};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// How long anything that should happen "at once" may take in a loaded CI run.
pub(crate) const SOON: Duration = Duration::from_secs(5);

/// An address of this test's private loopback range 127.0.`net`.`host`.
pub(crate) fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, net, host))
}

/// Postgres, dns with subscriber `acme`, and one domain `name` whose static address is 127.0.`net`.1.
pub(crate) struct Setup {
    pub(crate) stack: Stack,
    pub(crate) token: String,
    pub(crate) pool: sqlx::PgPool,
    pub(crate) net: u8,
    pub(crate) name: String,
    /// The forwarded port, free on the static address and the site addresses.
    pub(crate) port: u16,
}

impl Setup {
    /// Creates the domain with `sites` as live static addresses (127.0.`net`.`site`) and forwarded port `port`.
    pub(crate) async fn new(net: u8, label: &str, sites: &[u8], extra: Value) -> Result<Self> {
        let (stack, token) = Stack::with_acme().await?;
        let pool = stack.pg.pool().await?;
        let name = format!("{label}.tether.test");
        let mut body = json!({ "name": name, "static_ip": ip(net, 1).to_string() });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        stack.domain(&token, body).await?;
        for &site in sites {
            stack.address(&token, &name, json!({ "ip": ip(net, site).to_string() })).await?;
        }
        let port = free_port(&[ip(net, 1)]).await?;
        let setup = Self { stack, token, pool, net, name, port };
        setup.forwarding(json!({ "ports": [port] })).await?;
        Ok(setup)
    }

    /// `PUT /v1/domains/{name}/forwarding`, expecting success.
    pub(crate) async fn forwarding(&self, body: Value) -> Result<Value> {
        let path = format!("/v1/domains/{}/forwarding", self.name);
        let (status, body) = self.stack.api.call(Method::PUT, &path, Some(&self.token), Some(body)).await?;
        if status != StatusCode::OK {
            bail!("forwarding settings refused: {status} {body}");
        }
        Ok(body)
    }

    /// The static address and forwarded port.
    pub(crate) fn static_addr(&self) -> SocketAddr {
        SocketAddr::new(ip(self.net, 1), self.port)
    }

    /// Sets the state of the address 127.0.`net`.`host`.
    pub(crate) async fn set_state(&self, host: u8, state: &str) -> Result<()> {
        let done = sqlx::query("UPDATE addresses SET state = $1::address_state WHERE ip = $2")
            .bind(state)
            .bind(ip(self.net, host))
            .execute(&self.pool)
            .await?;
        anyhow::ensure!(done.rows_affected() == 1, "no address 127.0.{}.{host}", self.net);
        Ok(())
    }

    /// Starts the forwarder in-process against this stack's database.
    pub(crate) async fn forwarder(&self, extra_config: &str) -> Result<Forwarder> {
        Forwarder::start(&self.stack.pg.url(), extra_config).await
    }
}

/// A port free for TCP and UDP on every one of `ips`.
pub(crate) async fn free_port(ips: &[IpAddr]) -> Result<u16> {
    'next: for _ in 0..50 {
        let probe = TcpListener::bind(SocketAddr::new(ips[0], 0)).await?;
        let port = probe.local_addr()?.port();
        drop(probe);
        for &ip in ips {
            let addr = SocketAddr::new(ip, port);
            if TcpListener::bind(addr).await.is_err() || UdpSocket::bind(addr).await.is_err() {
                continue 'next;
            }
        }
        return Ok(port);
    }
    bail!("no free port on {ips:?}")
}

/// The forwarder running in this process.
pub(crate) struct Forwarder {
    pub(crate) metrics_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl Forwarder {
    /// Starts `run` with the given database and extra TOML lines, and waits for its first table load.
    pub(crate) async fn start(database_url: &str, extra_config: &str) -> Result<Self> {
        let text = format!(
            "database_url = '{database_url}'\nmetrics_listen = '127.0.0.1:0'\nmax_backoff = '500ms'\n\
             connect_timeout = '1s'\n{}{extra_config}\n",
            if extra_config.contains("allowed_target_ranges") {
                ""
            } else {
                "allowed_target_ranges = ['127.0.0.0/8', '198.18.0.0/15']\n"
            }
        );
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let config = packet_forwarder::Config::parse(&text)?;
        config.validate()?;
        let listeners = packet_forwarder::Listeners::bind(config.metrics_listen).await?;
        let metrics_addr = listeners.metrics_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(packet_forwarder::run(listeners, config, shutdown.clone()));
        let forwarder = Self { metrics_addr, shutdown, task: Some(task) };
        eventually(Duration::from_secs(30), "the forwarder to load its table", || async {
            let status = reqwest::get(format!("http://{metrics_addr}/healthz")).await.ok()?.status();
            (status == StatusCode::OK).then_some(())
        })
        .await?;
        Ok(forwarder)
    }

    /// The Prometheus text.
    pub(crate) async fn metrics(&self) -> Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.metrics_addr)).await?.text().await?)
    }

    /// The value of the sample whose line starts with `series` (name and labels), 0 when absent.
    pub(crate) async fn sample(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .unwrap_or(0.0);
        Ok(value)
    }

    /// Stops the forwarder and returns what `run` returned.
    pub(crate) async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A PROXY v2 header a site parsed: (source, destination).
pub(crate) type Seen = Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>;

/// A site's server on a loopback address: TCP greets with `site <ip>\n` and then echoes; UDP answers each datagram
/// with its last address byte and the payload. With `proxy`, each connection or datagram must start with a PROXY
/// v2 header, parsed by the `ppp` crate and recorded.
pub(crate) struct Site {
    pub(crate) seen: Seen,
    tasks: Vec<JoinHandle<()>>,
}

impl Site {
    /// Serves TCP and UDP on `addr`.
    pub(crate) async fn start(addr: SocketAddr, proxy: bool) -> Result<Self> {
        let seen: Seen = Arc::default();
        let tcp = TcpListener::bind(addr).await.with_context(|| format!("site TCP {addr}"))?;
        let udp = UdpSocket::bind(addr).await.with_context(|| format!("site UDP {addr}"))?;
        let tasks =
            vec![tokio::spawn(serve_tcp(tcp, proxy, seen.clone())), tokio::spawn(serve_udp(udp, proxy, seen.clone()))];
        Ok(Self { seen, tasks })
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve_tcp(listener: TcpListener, proxy: bool, seen: Seen) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((mut stream, _)) = listener.accept().await {
        let seen = seen.clone();
        connections.spawn(async move {
            if proxy {
                let Ok(addresses) = read_proxy_header(&mut stream).await else { return };
                seen.lock().map(|mut s| s.push(addresses)).ok();
            }
            let Ok(local) = stream.local_addr() else { return };
            if stream.write_all(format!("site {}\n", local.ip()).as_bytes()).await.is_err() {
                return;
            }
            let (mut reader, mut writer) = stream.split();
            if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                let _ = writer.shutdown().await;
            }
        });
    }
}

/// Reads exactly one PROXY v2 header off a stream and parses it with `ppp`.
async fn read_proxy_header(stream: &mut TcpStream) -> Result<(SocketAddr, SocketAddr)> {
    let mut fixed = [0_u8; 16];
    stream.read_exact(&mut fixed).await?;
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let mut header = fixed.to_vec();
    header.resize(16 + length, 0);
    stream.read_exact(&mut header[16..]).await?;
    parse_proxy(&header).map(|(addresses, _)| addresses)
}

/// Parses a PROXY v2 header at the start of `bytes` with `ppp`: the addresses and the header length.
pub(crate) fn parse_proxy(bytes: &[u8]) -> Result<((SocketAddr, SocketAddr), usize)> {
    let header = ppp::v2::Header::try_from(bytes).map_err(|e| anyhow::anyhow!("PROXY header: {e}"))?;
    let addresses = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        ppp::v2::Addresses::IPv6(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        other => bail!("unexpected PROXY addresses {other:?}"),
    };
    Ok((addresses, header.len()))
}

async fn serve_udp(socket: UdpSocket, proxy: bool, seen: Seen) {
    let Ok(IpAddr::V4(local)) = socket.local_addr().map(|a| a.ip()) else { return };
    let tag = local.octets()[3];
    let mut buf = vec![0_u8; 65_536];
    while let Ok((len, from)) = socket.recv_from(&mut buf).await {
        let mut payload = &buf[..len];
        if proxy {
            let Ok((addresses, header_len)) = parse_proxy(payload) else { continue };
            seen.lock().map(|mut s| s.push(addresses)).ok();
            payload = &payload[header_len..];
        }
        let mut reply = Vec::with_capacity(payload.len() + 1);
        reply.push(tag);
        reply.extend_from_slice(payload);
        let _ = socket.send_to(&reply, from).await;
    }
}

/// A TCP connection through the forwarder from `client` (an address of ours), with the site's greeting read.
pub(crate) async fn connect(to: SocketAddr, client: IpAddr) -> Result<(TcpStream, String)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(client, 0))?;
    let mut stream = tokio::time::timeout(SOON, socket.connect(to)).await.context("connect timed out")??;
    let greeting = tokio::time::timeout(SOON, read_line(&mut stream)).await.context("no greeting")??;
    Ok((stream, greeting))
}

/// The greeting: one line, without the newline; an error if the connection closes first.
async fn read_line(stream: &mut TcpStream) -> Result<String> {
    let mut line = Vec::new();
    let mut byte = [0_u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            bail!("closed before a greeting");
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8(line)?);
        }
        line.push(byte[0]);
    }
}

/// Expects the forwarder to close this new connection without a greeting (refused).
pub(crate) async fn expect_refused(to: SocketAddr, client: IpAddr) -> Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(client, 0))?;
    let Ok(Ok(mut stream)) = tokio::time::timeout(SOON, socket.connect(to)).await else {
        return Ok(()); // not even accepted: refused too
    };
    let mut buf = [0_u8; 64];
    match tokio::time::timeout(SOON, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => Ok(()),
        Ok(Ok(n)) => bail!("expected a refusal, got {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(_) => bail!("expected a refusal, the connection stayed open"),
    }
}

/// Waits up to `limit` for the other side to close the connection (EOF or reset).
pub(crate) async fn closes_within(stream: &mut TcpStream, limit: Duration) -> Result<()> {
    let mut buf = [0_u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            if matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {
                return;
            }
        }
    })
    .await;
    closed.map_err(|_| anyhow::anyhow!("the connection stayed open for {limit:?}"))
}

/// One round trip on an established connection: what is written comes back.
pub(crate) async fn ping(stream: &mut TcpStream) -> Result<()> {
    stream.write_all(b"ping").await?;
    let mut buf = [0_u8; 4];
    tokio::time::timeout(SOON, stream.read_exact(&mut buf)).await.context("no echo")??;
    anyhow::ensure!(&buf == b"ping", "echo was {buf:?}");
    Ok(())
}

/// Deterministic bytes for transfers (xorshift), so both ends can be checked without storing them.
pub(crate) struct Data(u64);

impl Data {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Sends `len` bytes through an echoing connection while reading the echo; returns the SHA-256 of what was sent
/// and of what came back, after the client's half-close and the site's close.
pub(crate) async fn echo_transfer(stream: TcpStream, len: usize, seed: u64) -> Result<([u8; 32], [u8; 32])> {
    let (mut reader, mut writer) = stream.into_split();
    let send = tokio::spawn(async move {
        let hash = send_data_open(&mut writer, len, seed).await?;
        writer.shutdown().await?;
        anyhow::Ok(hash)
    });
    let mut hash = Sha256::new();
    let mut buf = vec![0_u8; 64 << 10];
    let mut received = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), reader.read(&mut buf)).await.context("stalled")??;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n;
    }
    anyhow::ensure!(received == len, "received {received} of {len} bytes");
    let sent = send.await??;
    Ok((sent, hash.finalize().into()))
}

/// Writes `len` bytes of [`Data`] from `seed`, leaving the stream open; the SHA-256 of what was written.
pub(crate) async fn send_data_open(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    len: usize,
    seed: u64,
) -> Result<[u8; 32]> {
    let mut data = Data::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0_u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        data.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        writer.write_all(&buf[..n]).await?;
        left -= n;
    }
    Ok(hash.finalize().into())
}
