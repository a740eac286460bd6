//! TCP and UDP relaying: large transfers and half-closes checked end to end, replies from the static address, bursts
//! of mixed sizes, PROXY v2.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use packet_forwarder::batch::{self, Gso, Slots};
use serde_json::json;
use sha2::{Digest, Sha256};
use tether_tests::eventually;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpSocket, UdpSocket,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::common::{Data, SOON, Setup, Site, connect, echo_transfer, ip, parse_proxy, send_data_open};

const MIB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relays_large_transfers_both_ways() -> Result<()> {
    let setup = Setup::new(41, "bulk", &[2, 3], json!({})).await?;
    let _a = Site::start(SocketAddr::new(ip(41, 2), setup.port), false).await?;
    let _b = Site::start(SocketAddr::new(ip(41, 3), setup.port), false).await?;
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();
    let client = ip(41, 100);
    eventually(SOON, "the static listener", || async { connect(to, client).await.ok() }).await?;

    // Equal weights, round robin: consecutive connections alternate between the two sites.
    let mut sites = Vec::new();
    for _ in 0..4 {
        sites.push(connect(to, client).await?.1);
    }
    sites.sort();
    assert_eq!(sites, ["site 127.0.41.2", "site 127.0.41.2", "site 127.0.41.3", "site 127.0.41.3"]);

    // Two flows at once, 16 MiB each way each, checked with SHA-256; the client half-closes, the site closes.
    let started = Instant::now();
    let (first, _) = connect(to, client).await?;
    let (second, _) = connect(to, client).await?;
    let (one, two) =
        tokio::try_join!(echo_transfer(first, 16 * MIB, 1), echo_transfer(second, 16 * MIB, 2)).context("transfers")?;
    let elapsed = started.elapsed();
    assert_eq!(one.0, one.1, "first flow: what came back differs from what was sent");
    assert_eq!(two.0, two.1, "second flow: what came back differs from what was sent");
    assert_ne!(one.0, two.0);
    eprintln!(
        "relayed 64 MiB (2 flows × 16 MiB each way) in {elapsed:?}: {:.0} MiB/s through the forwarder (debug build)",
        64.0 / elapsed.as_secs_f64()
    );

    let up = "tether_forwarder_bytes_total{domain=\"bulk.tether.test\",protocol=\"tcp\",direction=\"up\"}";
    let down = "tether_forwarder_bytes_total{domain=\"bulk.tether.test\",protocol=\"tcp\",direction=\"down\"}";
    let expected = (32 * MIB) as f64;
    eventually(SOON, "byte counters", || async {
        let up = forwarder.sample(up).await.ok()?;
        let down = forwarder.sample(down).await.ok()?;
        (up >= expected && down >= expected).then_some(())
    })
    .await?;
    let flows = forwarder.sample("tether_forwarder_flows_total{domain=\"bulk.tether.test\",protocol=\"tcp\"}").await?;
    assert!(flows >= 6.0, "flows counted: {flows}");
    eventually(SOON, "no flow left running", || async {
        let active = forwarder
            .sample("tether_forwarder_flows_active{domain=\"bulk.tether.test\",protocol=\"tcp\"}")
            .await
            .ok()?;
        (active == 0.0).then_some(())
    })
    .await?;
    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_relays_datagrams_both_ways_from_the_static_address() -> Result<()> {
    let setup = Setup::new(42, "dgram", &[2], json!({})).await?;
    let _site = Site::start(SocketAddr::new(ip(42, 2), setup.port), false).await?;
    let forwarder = setup.forwarder("udp_idle_timeout = '300ms'").await?;
    let to = setup.static_addr();
    let client = UdpSocket::bind(SocketAddr::new(ip(42, 100), 0)).await?;

    // 8 MiB in 1 KiB datagrams, 64 in flight, lost ones sent again; every reply must come from the static address.
    const SIZE: usize = 1024;
    const COUNT: u64 = 8 * 1024;
    const WINDOW: u64 = 64;
    let payload = |seq: u64| {
        let mut bytes = vec![0_u8; SIZE];
        bytes[..8].copy_from_slice(&seq.to_be_bytes());
        Data::new(seq + 1).fill(&mut bytes[8..]);
        bytes
    };
    let mut echoed: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut buf = vec![0_u8; 2048];
    let started = Instant::now();
    let mut next = 0;
    while next < COUNT {
        let end = (next + WINDOW).min(COUNT);
        let mut rounds = 0;
        while (next..end).any(|seq| !echoed.contains_key(&seq)) {
            rounds += 1;
            ensure!(rounds <= 20, "datagrams {next}..{end} never came back");
            for seq in (next..end).filter(|seq| !echoed.contains_key(seq)) {
                client.send_to(&payload(seq), to).await?;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while (next..end).any(|seq| !echoed.contains_key(&seq)) {
                let Ok(received) = tokio::time::timeout_at(deadline, client.recv_from(&mut buf)).await else { break };
                let (len, from) = received?;
                ensure!(from == to, "a reply came from {from}, not from the static address {to}");
                ensure!(len == SIZE + 1 && buf[0] == 2, "unexpected reply of {len} bytes");
                let seq = u64::from_be_bytes(buf[1..9].try_into()?);
                echoed.insert(seq, buf[1..len].to_vec());
            }
        }
        next = end;
    }
    let elapsed = started.elapsed();
    let sent: [u8; 32] = (0..COUNT).fold(Sha256::new(), |h, seq| h.chain_update(payload(seq))).finalize().into();
    let back: [u8; 32] = echoed.values().fold(Sha256::new(), |h, p| h.chain_update(p)).finalize().into();
    assert_eq!(sent, back, "echoed datagrams differ from those sent");
    eprintln!("{COUNT} datagrams of {SIZE} bytes echoed through the forwarder in {elapsed:?} (debug build)");

    let active = "tether_forwarder_flows_active{domain=\"dgram.tether.test\",protocol=\"udp\"}";
    assert_eq!(forwarder.sample(active).await?, 1.0, "one client address, one flow");
    // Idle for the timeout: the flow is closed; the next datagram opens a new one.
    eventually(SOON, "the idle UDP flow to close", || async {
        (forwarder.sample(active).await.ok()? == 0.0).then_some(())
    })
    .await?;
    client.send_to(&payload(0), to).await?;
    let (len, from) = tokio::time::timeout(SOON, client.recv_from(&mut buf)).await??;
    assert_eq!((len, from), (SIZE + 1, to));
    let flows = forwarder.sample("tether_forwarder_flows_total{domain=\"dgram.tether.test\",protocol=\"udp\"}").await?;
    assert_eq!(flows, 2.0);
    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_tells_the_site_who_the_client_is() -> Result<()> {
    let setup = Setup::new(44, "proxied", &[2], json!({})).await?;
    let site = Site::start(SocketAddr::new(ip(44, 2), setup.port), true).await?;
    let settings = setup.forwarding(json!({ "proxy_protocol": "tcp_udp" })).await?;
    assert_eq!(settings["proxy_protocol"], "tcp_udp");
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();

    // TCP: the header arrives first (the site greets only after parsing it), then the data, unchanged.
    let (mut stream, greeting) =
        eventually(SOON, "a proxied connection", || async { connect(to, ip(44, 100)).await.ok() }).await?;
    assert_eq!(greeting, "site 127.0.44.2");
    super::common::ping(&mut stream).await?;
    let client = stream.local_addr()?;
    let seen = site.seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(seen.contains(&(client, to)), "site saw {seen:?}, expected {client} → {to}");
    drop(stream);
    let (stream, _) = connect(to, ip(44, 100)).await?;
    let (sent, back) = echo_transfer(stream, 4 * MIB, 7).await?;
    assert_eq!(sent, back, "data after the header is relayed unchanged");

    // UDP: a header in front of each datagram; the reply carries none.
    let udp = UdpSocket::bind(SocketAddr::new(ip(44, 101), 0)).await?;
    let mut buf = [0_u8; 64];
    for _ in 0..2 {
        udp.send_to(b"hello", to).await?;
        let (len, from) = tokio::time::timeout(SOON, udp.recv_from(&mut buf)).await??;
        assert_eq!((&buf[..len], from), (&b"\x02hello"[..], to));
    }
    let client = udp.local_addr()?;
    let seen = site.seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.iter().filter(|s| **s == (client, to)).count(), 2, "site saw {seen:?}");

    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_flood_arrives_complete_and_in_order_per_flow() -> Result<()> {
    let setup = Setup::new(50, "flood", &[2], json!({})).await?;
    // The site records each datagram's (source, flow, seq) and echoes it.
    let site = UdpSocket::bind(SocketAddr::new(ip(50, 2), setup.port)).await?;
    let seen: Arc<Mutex<Vec<(SocketAddr, u64, u64)>>> = Arc::default();
    let site_task = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut buf = vec![0_u8; 2048];
            while let Ok((len, from)) = site.recv_from(&mut buf).await {
                let (flow, seq) = (word(&buf, 0), word(&buf, 8));
                seen.lock().map(|mut s| s.push((from, flow, seq))).ok();
                let _ = site.send_to(&buf[..len], from).await;
            }
        }
    });
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();

    // Four clients, each sending bursts of 32 datagrams back to back (the forwarder receives and sends them in
    // batches), then waiting for the burst's echoes: at most 128 datagrams in flight, well within the socket buffers,
    // so loopback loses none and every datagram must arrive once, in order, both ways.
    const CLIENTS: u64 = 4;
    const BURSTS: u64 = 60;
    const BURST: u64 = 32;
    let mut clients = Vec::new();
    for flow in 0..CLIENTS {
        let socket = UdpSocket::bind(SocketAddr::new(ip(50, 100 + flow as u8), 0)).await?;
        clients.push(tokio::spawn(async move {
            let mut echoed = Vec::new();
            let mut buf = vec![0_u8; 2048];
            for burst in 0..BURSTS {
                for seq in burst * BURST..(burst + 1) * BURST {
                    let mut datagram = vec![0_u8; 64];
                    datagram[..8].copy_from_slice(&flow.to_le_bytes());
                    datagram[8..16].copy_from_slice(&seq.to_le_bytes());
                    socket.send_to(&datagram, to).await?;
                }
                while echoed.len() < ((burst + 1) * BURST) as usize {
                    let (len, from) = tokio::time::timeout(SOON, socket.recv_from(&mut buf))
                        .await
                        .with_context(|| format!("flow {flow}: echoes of burst {burst} missing"))??;
                    ensure!(from == to && len == 64, "unexpected echo of {len} bytes from {from}");
                    ensure!(word(&buf, 0) == flow, "flow {flow} got another flow's echo");
                    echoed.push(word(&buf, 8));
                }
            }
            anyhow::Ok(echoed)
        }));
    }
    let expected: Vec<u64> = (0..BURSTS * BURST).collect();
    for (flow, client) in clients.into_iter().enumerate() {
        let echoed = client.await??;
        assert_eq!(echoed, expected, "flow {flow}: echoes out of order or missing");
    }
    site_task.abort();

    // At the site: one upstream source per client, each client's datagrams complete and in order.
    let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let mut by_source: BTreeMap<SocketAddr, (u64, Vec<u64>)> = BTreeMap::new();
    for (source, flow, seq) in seen {
        let entry = by_source.entry(source).or_insert((flow, Vec::new()));
        ensure!(entry.0 == flow, "two clients share the upstream source {source}");
        entry.1.push(seq);
    }
    ensure!(by_source.len() == CLIENTS as usize, "{} upstream sources for {CLIENTS} clients", by_source.len());
    for (source, (flow, seqs)) in by_source {
        assert_eq!(seqs, expected, "flow {flow} (from {source}): out of order or missing at the site");
    }
    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_half_closes_pass_through_each_way_with_the_bytes_intact() -> Result<()> {
    // The site: `A` — read to EOF, then answer 16 MiB; `B` — send 16 MiB and half-close first, then read to EOF.
    // Either way it reports the SHA-256 of what it read.
    let setup = Setup::new(51, "halves", &[2], json!({})).await?;
    let listener = TcpListener::bind(SocketAddr::new(ip(51, 2), setup.port)).await?;
    let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let site = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.into_split();
                let mut mode = [0_u8; 1];
                reader.read_exact(&mut mode).await?;
                let read = if mode[0] == b'A' {
                    let read = drain(&mut reader).await?;
                    send_data(&mut writer, 16 * MIB, 20).await?;
                    read
                } else {
                    send_data(&mut writer, 16 * MIB, 21).await?;
                    drain(&mut reader).await?
                };
                report.send(read).ok();
                anyhow::Ok(())
            });
        }
    });
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();
    let client = ip(51, 100);
    let open = |mode: u8| async move {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(client, 0))?;
        let mut stream = socket.connect(to).await?;
        stream.write_all(&[mode]).await?;
        anyhow::Ok(stream.into_split())
    };
    eventually(SOON, "the static listener", || async { tokio::net::TcpStream::connect(to).await.ok() }).await?;

    // A: the client sends 24 MiB and half-closes; the answer comes after, through the half-closed flow.
    let (mut reader, mut writer) = open(b'A').await?;
    let sent = send_data(&mut writer, 24 * MIB, 10).await?;
    let answer = drain(&mut reader).await?;
    let at_site = tokio::time::timeout(SOON, reports.recv()).await?.context("site report")?;
    assert_eq!(at_site, sent, "A: what the site read differs from what the client sent");
    assert_eq!(answer, expected_data(16 * MIB, 20), "A: the answer arrived changed");

    // B: the site half-closes first; the client reads all of it while it goes on sending, then half-closes.
    let (mut reader, mut writer) = open(b'B').await?;
    let (answer, sent) = tokio::try_join!(drain(&mut reader), async {
        let first = send_data_open(&mut writer, 8 * MIB, 11).await?;
        // The site's half of the flow may well be closed by now; this side still goes through.
        let second = send_data(&mut writer, 8 * MIB, 12).await?;
        anyhow::Ok((first, second))
    })?;
    let at_site = tokio::time::timeout(SOON, reports.recv()).await?.context("site report")?;
    let expected: [u8; 32] = {
        let mut hash = Sha256::new();
        for (len, seed) in [(8 * MIB, 11), (8 * MIB, 12)] {
            let mut bytes = vec![0_u8; len];
            Data::new(seed).fill(&mut bytes);
            hash.update(&bytes);
        }
        hash.finalize().into()
    };
    assert_ne!(sent.0, sent.1);
    assert_eq!(at_site, expected, "B: what the site read differs from what the client sent");
    assert_eq!(answer, expected_data(16 * MIB, 21), "B: the site's data arrived changed");
    site.abort();
    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_bursts_of_mixed_sizes_arrive_complete_and_in_order_each_with_its_header() -> Result<()> {
    let setup = Setup::new(52, "bursts", &[2], json!({})).await?;
    let site = Arc::new(UdpSocket::bind(SocketAddr::new(ip(52, 2), setup.port)).await?);
    setup.forwarding(json!({ "proxy_protocol": "tcp_udp" })).await?;
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();
    let client = UdpSocket::bind(SocketAddr::new(ip(52, 100), 0)).await?;
    client.connect(to).await?;
    let client_addr = client.local_addr()?;

    // Bursts as a busy client sends them: runs of equal sizes (GSO from the client, GRO at the forwarder), shorter
    // datagrams ending runs, sizes changing within the burst. Each datagram: its sequence number, then its bytes.
    const BURSTS: u64 = 20;
    let sizes: Vec<usize> =
        [vec![100; 20], vec![37], vec![1_200; 10], vec![900], vec![8; 5], (1..12).map(|i| i * 97).collect()].concat();
    let datagram = |seq: u64, size: usize| {
        let mut bytes = vec![0_u8; size];
        bytes[..8].copy_from_slice(&seq.to_le_bytes());
        Data::new(seq + 1).fill(&mut bytes[8..]);
        bytes
    };

    // The site checks each datagram's PROXY header, strips it and echoes the rest, a burst at a time with GSO.
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let site_task = tokio::spawn({
        let (site, seen) = (site.clone(), seen.clone());
        async move {
            let mut slots = Slots::new(32, 65_535);
            let mut got = Vec::new();
            let gso = Gso::default();
            loop {
                slots.recv(&site, &mut got).await?;
                let mut echo = Vec::new();
                let mut ranges = Vec::new();
                let mut from = None;
                for d in &got {
                    let ((source, destination), header) = parse_proxy(slots.datagram(d))?;
                    ensure!((source, destination) == (client_addr, to), "header says {source} → {destination}");
                    let payload = &slots.datagram(d)[header..];
                    seen.lock().map(|mut s| s.push(payload.to_vec())).ok();
                    ranges.push(echo.len()..echo.len() + payload.len());
                    echo.extend_from_slice(payload);
                    from = d.from;
                }
                let sent = batch::send(&site, &gso, from, None, &echo, &ranges).await;
                ensure!(sent.failed == 0, "site could not echo: {:?}", sent.error);
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        }
    });

    let gso = Gso::default();
    let mut seq = 0;
    let mut expected = Vec::new();
    let mut buf = vec![0_u8; 2048];
    for burst in 0..BURSTS {
        let mut bytes = Vec::new();
        let mut ranges = Vec::new();
        for &size in &sizes {
            let d = datagram(seq, size);
            ranges.push(bytes.len()..bytes.len() + size);
            bytes.extend_from_slice(&d);
            expected.push(d);
            seq += 1;
        }
        let sent = batch::send(&client, &gso, None, None, &bytes, &ranges).await;
        ensure!(sent.failed == 0, "client could not send: {:?}", sent.error);
        for (i, want) in expected[expected.len() - sizes.len()..].iter().enumerate() {
            let len = tokio::time::timeout(SOON, client.recv(&mut buf))
                .await
                .with_context(|| format!("burst {burst}: echo {i} missing"))??;
            ensure!(&buf[..len] == want.as_slice(), "burst {burst}: echo {i} differs ({len} bytes)");
        }
    }
    let at_site = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    assert_eq!(at_site.len(), expected.len(), "datagrams at the site");
    assert!(at_site == expected, "the site got the datagrams changed or out of order");
    site_task.abort();
    forwarder.stop().await
}

/// Writes `len` bytes of [`Data`] from `seed`, then half-closes; the SHA-256 of what was written.
async fn send_data(writer: &mut OwnedWriteHalf, len: usize, seed: u64) -> Result<[u8; 32]> {
    let hash = send_data_open(writer, len, seed).await?;
    writer.shutdown().await?;
    Ok(hash)
}

/// Reads to EOF; the SHA-256 of what came.
async fn drain(reader: &mut OwnedReadHalf) -> Result<[u8; 32]> {
    let mut hash = Sha256::new();
    let mut buf = vec![0_u8; 64 << 10];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), reader.read(&mut buf)).await.context("stalled")??;
        if n == 0 {
            return Ok(hash.finalize().into());
        }
        hash.update(&buf[..n]);
    }
}

/// The SHA-256 of `len` bytes of [`Data`] from `seed`.
fn expected_data(len: usize, seed: u64) -> [u8; 32] {
    let mut bytes = vec![0_u8; len];
    Data::new(seed).fill(&mut bytes);
    Sha256::digest(&bytes).into()
}

/// The little-endian u64 at `at`.
fn word(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0_u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}
