//! A second master's dns reads its view from a hot standby of the primary (streaming replication, a real
//! `pg_basebackup -R` pair): it follows the change log there (LISTEN does not work on a standby), serves its last view
//! while the primary is away, catches up when it returns, and listens for changes once its standby is promoted.

use std::time::{Duration, Instant};

use anyhow::Result;
use hickory_proto::rr::RecordType;
use serde_json::json;
use tether_tests::{
    Postgres,
    dns_client::{Transport, addresses, ask, sorted},
    eventually,
    stack::{DnsServer, Stack},
};

const NAME: &str = "www.tether.test.";

async fn answer(dns: &DnsServer) -> Option<Vec<String>> {
    let response = ask(dns.dns_addr, NAME, RecordType::A, Transport::Udp).await.ok()?;
    Some(sorted(addresses(&response)))
}

async fn serial(dns: &DnsServer) -> Option<u32> {
    let response = ask(dns.dns_addr, "tether.test.", RecordType::SOA, Transport::Udp).await.ok()?;
    response.answers.iter().find_map(|r| match &r.data {
        hickory_proto::rr::RData::SOA(soa) => Some(soa.serial),
        _ => None,
    })
}

/// Waits until `dns` answers `want`, and returns how long that took.
async fn answers(dns: &DnsServer, want: &[&str], what: &str) -> Result<Duration> {
    let started = Instant::now();
    let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    eventually(Duration::from_secs(10), what, || async { (answer(dns).await? == want).then_some(()) }).await?;
    Ok(started.elapsed())
}

#[tokio::test]
async fn a_dns_on_a_hot_standby_follows_the_primary_serves_through_its_absence_and_survives_promotion() -> Result<()> {
    let (mut stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "www.tether.test" })).await?;
    stack.address(&acme, "www.tether.test", json!({ "ip": "198.18.7.1" })).await?;
    let standby = Postgres::standby_of(&stack.pg).await?;
    let second = DnsServer::start_with(&stack.pg.url(), &format!("view_database_url = '{}'\n", standby.url())).await?;
    answers(&second, &["198.18.7.1"], "the standby's dns to answer").await?;

    // A write at the primary reaches the second master's answers through the standby.
    let mut took = Vec::new();
    for host in 2..=6_u8 {
        let ip = format!("198.18.7.{host}");
        stack.address(&acme, "www.tether.test", json!({ "ip": ip })).await?;
        let want: Vec<String> = (1..=host).map(|h| format!("198.18.7.{h}")).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        took.push(answers(&second, &want, "the write to reach the standby's dns").await?);
    }
    eprintln!("write at the primary to the standby's answer: {took:?}");
    // Both masters give the same serial for the same data.
    let same = eventually(Duration::from_secs(5), "equal serials", || async {
        let (a, b) = (serial(&stack.dns).await?, serial(&second).await?);
        (a == b).then_some(a)
    })
    .await?;
    eprintln!("both masters at serial {same}");

    // The primary goes away: the second master serves on from its view.
    stack.pg.stop()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(answer(&second).await.map(|a| a.len()), Some(6), "answers while the primary is away");
    // It returns; what is written then reaches the second master.
    stack.pg.restart().await?;
    let db = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.7.6'").execute(&db).await?;
    let caught_up =
        answers(&second, &["198.18.7.1", "198.18.7.2", "198.18.7.3", "198.18.7.4", "198.18.7.5"], "catch up").await?;
    eprintln!("after the primary's return, a change reached the standby's dns in {caught_up:?}");

    // The standby is promoted (its primary is gone for good): the second master listens there from then on.
    stack.pg.stop()?;
    standby.promote().await?;
    let promoted = standby.pool().await?;
    // Give the reader its promotion check (once a second) before writing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.7.5'").execute(&promoted).await?;
    answers(&second, &["198.18.7.1", "198.18.7.2", "198.18.7.3", "198.18.7.4"], "a write at the promoted standby")
        .await?;
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM change_log").fetch_one(&promoted).await?;
    assert!(logged >= 6, "every change is in the log too: {logged}");
    second.stop().await
}
