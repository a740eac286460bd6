//! hbs's `/metrics` and `/healthz`, scraped over HTTP from a real hbs with real Postgres, hds and an NCU agent.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use reqwest::StatusCode;
use tether_tests::{
    eventually,
    fleet::{HbsServer, Site, uplink},
    hds_stack::Pki,
};

async fn get(address: SocketAddr, path: &str) -> Result<(StatusCode, String)> {
    let response = reqwest::get(format!("http://{address}{path}")).await?;
    Ok((response.status(), response.text().await?))
}

/// The value of the sample `name` (with its labels, as written) in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape_until(address: SocketAddr, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    eventually(Duration::from_secs(10), what, || async {
        let (status, body) = get(address, "/metrics").await.ok()?;
        (status == StatusCode::OK && ok(&body)).then_some(body)
    })
    .await
}

#[tokio::test]
async fn hbs_without_postgres_says_so() -> Result<()> {
    let pki = Pki::new()?;
    let hbs = HbsServer::start("postgres://tether@127.0.0.1:1/none", &pki, "hbs-lonely").await?;
    let (status, body) =
        eventually(Duration::from_secs(5), "/healthz to answer", || async { get(hbs.metrics, "/healthz").await.ok() })
            .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("\"database\":\"unreachable\""), "{body}");
    let (status, body) = get(hbs.metrics, "/metrics").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sample(&body, "hbs_database_reachable"), Some(0.0), "{body}");
    hbs.stop().await
}

#[tokio::test]
async fn hbs_metrics_follow_its_targets_and_sessions() -> Result<()> {
    let site = Site::start().await?;
    let hbs = &site.hbs;
    let agent = site.agent(vec![uplink("wan1", "127.0.0.2"), uplink("wan2", "127.0.0.3")]);

    let body = scrape_until(hbs.metrics, "two live targets, written", |body| {
        sample(body, "hbs_targets_by_state{state=\"live\"}") == Some(2.0)
            && sample(body, "hbs_transitions_total{state=\"live\"}").is_some_and(|n| n >= 2.0)
    })
    .await?;
    assert_eq!(sample(&body, "hbs_targets"), Some(2.0), "{body}");
    assert!(sample(&body, "hbs_pings_total").context("pings")? > 0.0, "{body}");
    assert!(sample(&body, "hbs_pongs_total").context("pongs")? > 0.0, "{body}");
    assert_eq!(sample(&body, "hbs_sessions"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "hbs_database_reachable"), Some(1.0), "{body}");
    assert!(sample(&body, "hbs_registration_batches_total").context("registrations")? >= 1.0, "{body}");
    assert!(sample(&body, "hbs_transitions_total{state=\"live\"}").context("transitions")? >= 2.0, "{body}");
    assert!(sample(&body, "hbs_write_seconds_count").context("write latency")? >= 1.0, "{body}");
    let (status, health) = get(hbs.metrics, "/healthz").await?;
    assert_eq!(status, StatusCode::OK, "{health}");

    agent.drill.silence("wan2", true);
    let body = scrape_until(hbs.metrics, "one dead target, written", |body| {
        sample(body, "hbs_targets_by_state{state=\"dead\"}") == Some(1.0)
            && sample(body, "hbs_transitions_total{state=\"dead\"}").is_some_and(|n| n >= 1.0)
    })
    .await?;
    assert_eq!(sample(&body, "hbs_targets_by_state{state=\"live\"}"), Some(1.0), "{body}");
    assert!(sample(&body, "hbs_transitions_total{state=\"dead\"}").context("dead transitions")? >= 1.0, "{body}");

    agent.stop().await?;
    scrape_until(hbs.metrics, "no session", |body| sample(body, "hbs_sessions") == Some(0.0)).await?;
    site.stop().await
}
