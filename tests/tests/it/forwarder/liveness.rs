//! Liveness: a dead address gets no new flows and loses its running ones; a refused connect moves to the next
//! address; with nothing live, connections are refused or go to the fallback; unrelated flows never notice.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tether_tests::eventually;

use super::common::{SOON, Setup, Site, closes_within, connect, expect_refused, ip, ping};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_address_loses_new_and_running_flows() -> Result<()> {
    // .2 and .3 serve; .5 is live in the database but nothing listens there (connects are refused).
    let setup = Setup::new(43, "alive", &[2, 3, 5], json!({})).await?;
    let _a = Site::start(SocketAddr::new(ip(43, 2), setup.port), false).await?;
    let _b = Site::start(SocketAddr::new(ip(43, 3), setup.port), false).await?;
    let _fallback = Site::start(SocketAddr::new(ip(43, 4), setup.port), false).await?;
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();
    let client = ip(43, 100);
    eventually(SOON, "the static listener", || async { connect(to, client).await.ok() }).await?;

    // Every connection lands on a serving site: refused connects to .5 move on to the next address.
    let mut on_a = None;
    let mut on_b = None;
    for _ in 0..6 {
        let (stream, site) = connect(to, client).await?;
        match site.as_str() {
            "site 127.0.43.2" => on_a = Some(stream),
            "site 127.0.43.3" => on_b = Some(stream),
            other => anyhow::bail!("unexpected {other}"),
        }
    }
    let (Some(mut on_a), Some(mut on_b)) = (on_a, on_b) else { anyhow::bail!("round robin missed a site") };
    let failovers = forwarder.sample("tether_forwarder_failovers_total{domain=\"alive.tether.test\"}").await?;
    assert!(failovers >= 1.0, "refused connects counted as failovers: {failovers}");

    // .2 dies: its running flow is closed, the flow on .3 goes on, new flows all go to .3.
    let started = Instant::now();
    setup.set_state(2, "dead").await?;
    closes_within(&mut on_a, SOON).await.context("the flow to the dead address")?;
    eprintln!("flow to the dead address closed {:?} after the UPDATE", started.elapsed());
    ping(&mut on_b).await?;
    for _ in 0..6 {
        assert_eq!(connect(to, client).await?.1, "site 127.0.43.3");
    }

    // Nothing live: refused. Then with a fallback address: connections go there.
    setup.set_state(3, "dead").await?;
    setup.set_state(5, "dead").await?;
    closes_within(&mut on_b, SOON).await.context("the flow to .3")?;
    expect_refused(to, client).await?;
    sqlx::query("UPDATE domains SET fallback_ip = $1 WHERE fqdn = 'alive.tether.test.'")
        .bind(ip(43, 4))
        .execute(&setup.pool)
        .await?;
    let (mut on_fallback, site) = eventually(SOON, "the fallback", || async { connect(to, client).await.ok() }).await?;
    assert_eq!(site, "site 127.0.43.4");

    // .2 is back: new flows go to it; the fallback flow is not an address flow and goes on.
    setup.set_state(2, "live").await?;
    let (_, site) = eventually(SOON, "flows back on .2", || async {
        connect(to, client).await.ok().filter(|(_, site)| site == "site 127.0.43.2")
    })
    .await?;
    assert_eq!(site, "site 127.0.43.2");
    ping(&mut on_fallback).await?;
    let refused = "tether_forwarder_refused_total{domain=\"alive.tether.test\",protocol=\"tcp\",reason=\"no_target\"}";
    assert!(forwarder.sample(refused).await? >= 1.0);
    forwarder.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_apply_at_once_without_touching_unrelated_flows() -> Result<()> {
    let setup = Setup::new(48, "steady", &[2], json!({})).await?;
    let _site = Site::start(SocketAddr::new(ip(48, 2), setup.port), false).await?;
    let forwarder = setup.forwarder("").await?;
    let to = setup.static_addr();
    let client = ip(48, 100);
    let (mut running, _) = eventually(SOON, "the static listener", || async { connect(to, client).await.ok() }).await?;

    // Another domain appears, with its own static address and port; the running flow does not notice.
    let other_port = super::common::free_port(&[ip(48, 11), ip(48, 12)]).await?;
    let _other_site = Site::start(SocketAddr::new(ip(48, 12), other_port), false).await?;
    let started = Instant::now();
    setup
        .stack
        .domain(&setup.token, json!({ "name": "other.tether.test", "static_ip": ip(48, 11).to_string() }))
        .await?;
    setup.stack.address(&setup.token, "other.tether.test", json!({ "ip": ip(48, 12).to_string() })).await?;
    let path = "/v1/domains/other.tether.test/forwarding";
    let body = json!({ "ports": [other_port] });
    let (status, body) = setup.stack.api.call(reqwest::Method::PUT, path, Some(&setup.token), Some(body)).await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let other = SocketAddr::new(ip(48, 11), other_port);
    let (_, site) =
        eventually(SOON, "the new domain's listener", || async { connect(other, client).await.ok() }).await?;
    eprintln!("new domain relayed {:?} after its creation began", started.elapsed());
    assert_eq!(site, "site 127.0.48.12");
    ping(&mut running).await?;

    // A second port on the first domain: a new listener, the running flow on the first port goes on.
    let second = super::common::free_port(&[ip(48, 1), ip(48, 2)]).await?;
    let _second_site = Site::start(SocketAddr::new(ip(48, 2), second), false).await?;
    let started = Instant::now();
    setup.forwarding(json!({ "ports": [setup.port, second] })).await?;
    let second_addr = SocketAddr::new(ip(48, 1), second);
    eventually(SOON, "the second port", || async { connect(second_addr, client).await.ok() }).await?;
    eprintln!("second port relayed {:?} after the PUT", started.elapsed());
    ping(&mut running).await?;

    // The other domain goes: its listener closes, ours is untouched.
    let (status, _) = setup
        .stack
        .api
        .call(reqwest::Method::DELETE, "/v1/domains/other.tether.test", Some(&setup.token), None)
        .await?;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT);
    eventually(SOON, "the deleted domain's listener to close", || async {
        connect(other, client).await.is_err().then_some(())
    })
    .await?;
    ping(&mut running).await?;
    forwarder.stop().await
}
