//! The one uplink limit (`tether_proto::control::MAX_UPLINKS`, 15), with real Postgres, hds, hbs and an NCU agent:
//! 15 uplinks are all registered and live; a 16th is refused by name, with no address row, while the first 15 stay
//! registered and live; when one of them goes away the 16th takes its index.

use std::time::Duration;

use anyhow::Result;
use tether_proto::control::MAX_UPLINKS;
use tether_tests::{
    eventually,
    fleet::{Site, uplink},
};

fn address(i: usize) -> String {
    format!("127.0.4.{i}")
}

fn uplinks(range: std::ops::RangeInclusive<usize>) -> Vec<ncu::agent::UplinkSpec> {
    range.map(|i| uplink(&format!("wan{i:02}"), &address(i))).collect()
}

/// Live address rows of the NCU's domain, as text, sorted.
async fn live(db: &sqlx::PgPool) -> Result<Vec<String>> {
    let mut rows: Vec<String> =
        sqlx::query_scalar("SELECT host(ip) FROM addresses WHERE source = 'ncu' AND state = 'live'")
            .fetch_all(db)
            .await?;
    rows.sort();
    Ok(rows)
}

fn sorted(range: impl Iterator<Item = usize>) -> Vec<String> {
    let mut all: Vec<String> = range.map(address).collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifteen_uplinks_register_and_a_sixteenth_is_refused_by_name() -> Result<()> {
    assert_eq!(MAX_UPLINKS, 15);
    let site = Site::start().await?;
    let mut agent = site.agent(uplinks(1..=MAX_UPLINKS));
    let db = site.stack.pg.pool().await?;

    // Fifteen: every one registered and live.
    let all = sorted(1..=15);
    eventually(Duration::from_secs(15), "15 live addresses", || async { (live(&db).await.ok()? == all).then_some(()) })
        .await?;
    assert_eq!(agent.status.borrow().registered.len(), 15);
    assert!(agent.status.borrow().refused.is_empty(), "{:?}", agent.status.borrow().refused);

    // Sixteen: the 16th refused by name, the first 15 untouched.
    let session = agent.status.borrow().session;
    agent.uplinks.send_replace(uplinks(1..=16));
    let refused = agent.status.wait_for(|s| s.refused.contains_key("wan16")).await?.refused.clone();
    assert_eq!(refused.get("wan16").map(String::as_str), Some("at most 15 uplinks"), "{refused:?}");
    assert_eq!(refused.len(), 1, "{refused:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(live(&db).await?, all, "the first 15 stay live");
    let status = agent.status.borrow().clone();
    assert_eq!(status.session, session, "the session was not disturbed");
    assert_eq!(status.registered.len(), 15, "{status:?}");
    assert!(!status.registered.contains(&"wan16".to_owned()), "{status:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM addresses WHERE host(ip) = $1")
        .bind(address(16))
        .fetch_one(&db)
        .await?;
    assert_eq!(rows, 0, "no row for the refused uplink");

    // wan03 goes away: wan16 takes its index and is registered.
    let without_third: Vec<_> = uplinks(1..=16).into_iter().filter(|u| u.name != "wan03").collect();
    agent.uplinks.send_replace(without_third);
    let want = sorted((1..=16).filter(|i| *i != 3));
    eventually(Duration::from_secs(15), "wan16 live in wan03's place", || async {
        (live(&db).await.ok()? == want).then_some(())
    })
    .await?;
    let status = agent.status.wait_for(|s| s.registered.contains(&"wan16".to_owned())).await?.clone();
    assert!(status.refused.is_empty(), "{status:?}");
    assert_eq!(status.registered.len(), 15, "{status:?}");

    agent.stop().await?;
    site.stop().await
}
