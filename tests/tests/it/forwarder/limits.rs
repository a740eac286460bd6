//! Caps: flows beyond the per-client and per-domain limits are refused, a flood of them changes nothing, and
//! places come back when flows end.

use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use serde_json::json;
use tether_tests::eventually;
use tokio::net::UdpSocket;

use super::common::{SOON, Setup, Site, closes_within, connect, expect_refused, ip, ping};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_beyond_the_caps_are_refused() -> Result<()> {
    let setup = Setup::new(45, "capped", &[2], json!({})).await?;
    let _site = Site::start(SocketAddr::new(ip(45, 2), setup.port), false).await?;
    setup.forwarding(json!({ "max_flows": 4, "max_flows_per_client": 2 })).await?;
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();
    let (x, y, z) = (ip(45, 100), ip(45, 101), ip(45, 102));
    let first = eventually(SOON, "the static listener", || async { connect(to, x).await.ok() }).await?;

    // Two per client.
    let second = connect(to, x).await?;
    expect_refused(to, x).await?;
    // Four in all.
    let mut y1 = connect(to, y).await?;
    let _y2 = connect(to, y).await?;
    expect_refused(to, z).await?;

    // A flood of refused connections from z: every one is closed, the running flows go on.
    let flood: Vec<_> = (0..200).map(|_| tokio::spawn(expect_refused(to, z))).collect();
    for attempt in flood {
        attempt.await??;
    }
    ping(&mut y1.0).await?;

    // A flow ends: its place comes back.
    drop(first);
    drop(second);
    let (_, site) = eventually(SOON, "a place for x again", || async { connect(to, x).await.ok() }).await?;
    assert_eq!(site, "site 127.0.45.2");

    let refused = |reason: &str| {
        format!("tether_forwarder_refused_total{{domain=\"capped.tether.test\",protocol=\"tcp\",reason=\"{reason}\"}}")
    };
    assert!(forwarder.sample(&refused("client_cap")).await? >= 1.0);
    assert!(forwarder.sample(&refused("domain_cap")).await? >= 201.0);
    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_beyond_the_client_cap_get_no_reply() -> Result<()> {
    let setup = Setup::new(49, "capdgram", &[2], json!({})).await?;
    let _site = Site::start(SocketAddr::new(ip(49, 2), setup.port), false).await?;
    setup.forwarding(json!({ "max_flows": 10, "max_flows_per_client": 2 })).await?;
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();
    let mut buf = [0_u8; 16];

    // Each source port of one client address is a flow: two get replies, the third is dropped.
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(UdpSocket::bind(SocketAddr::new(ip(49, 100), 0)).await?);
    }
    for socket in &sockets[..2] {
        let reply = eventually(SOON, "a UDP reply", || async {
            socket.send_to(b"x", to).await.ok()?;
            tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut [0_u8; 16])).await.ok()?.ok()
        })
        .await?;
        assert_eq!(reply, (2, to));
    }
    let refused =
        "tether_forwarder_refused_total{domain=\"capdgram.tether.test\",protocol=\"udp\",reason=\"client_cap\"}";
    sockets[2].send_to(b"x", to).await?;
    eventually(SOON, "the refusal to be counted", || async {
        (forwarder.sample(refused).await.ok()? >= 1.0).then_some(())
    })
    .await?;
    let nothing = tokio::time::timeout(Duration::from_millis(300), sockets[2].recv_from(&mut buf)).await;
    assert!(nothing.is_err(), "the third flow of one client got a reply");
    // Another client address has its own cap.
    let other = UdpSocket::bind(SocketAddr::new(ip(49, 101), 0)).await?;
    other.send_to(b"y", to).await?;
    let (len, from) = tokio::time::timeout(SOON, other.recv_from(&mut buf)).await??;
    assert_eq!((&buf[..len], from), (&b"\x02y"[..], to));
    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_flow_silent_both_ways_is_closed_after_the_idle_timeout_and_a_talking_one_is_not() -> Result<()> {
    let setup = Setup::new(54, "idle", &[2], json!({})).await?;
    let _site = Site::start(SocketAddr::new(ip(54, 2), setup.port), false).await?;
    let forwarder = setup.forwarder("tcp_idle_timeout = '2s'").await?;
    let to = setup.static_addr();
    let (mut silent, _) =
        eventually(SOON, "the static listener", || async { connect(to, ip(54, 100)).await.ok() }).await?;
    let (mut talking, _) = connect(to, ip(54, 101)).await?;
    let started = std::time::Instant::now();
    // One round trip every 500 ms keeps a flow open well past the idle timeout.
    while started.elapsed() < Duration::from_secs(5) {
        ping(&mut talking).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    closes_within(&mut silent, Duration::from_secs(1)).await?;
    ping(&mut talking).await?;
    let closed = "tether_forwarder_errors_total{domain=\"idle.tether.test\",protocol=\"tcp\",kind=\"idle_timeout\"}";
    assert_eq!(forwarder.sample(closed).await?, 1.0);
    forwarder.stop().await
}
