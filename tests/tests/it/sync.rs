//! The view follows Postgres: NOTIFY, outages, missed changes, concurrent start-up.

use std::time::Duration;

use anyhow::Result;
use hickory_proto::rr::RecordType;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask, sorted},
    eventually,
    stack::{DnsServer, OPERATOR_TOKEN, Stack},
};

async fn answers(stack: &Stack, name: &str) -> Option<Vec<String>> {
    let r = ask(stack.dns.dns_addr, name, RecordType::A, Transport::Udp).await.ok()?;
    Some(sorted(addresses(&r)))
}

#[tokio::test]
async fn api_changes_are_answered_without_restart() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "www.tether.test" })).await?;
    stack.address(&token, "www.tether.test", json!({ "ip": "198.18.1.1" })).await?;
    stack.address(&token, "www.tether.test", json!({ "ip": "198.18.1.2" })).await?;
    eventually(Duration::from_secs(5), "both addresses", || async {
        (answers(&stack, "www.tether.test.").await? == ["198.18.1.1", "198.18.1.2"]).then_some(())
    })
    .await?;

    let (status, body) =
        stack.api.call(Method::DELETE, "/v1/domains/www.tether.test/addresses/198.18.1.1", Some(&token), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    eventually(Duration::from_secs(2), "the deleted address to vanish", || async {
        (answers(&stack, "www.tether.test.").await? == ["198.18.1.2"]).then_some(())
    })
    .await?;

    let (status, _) = stack.api.call(Method::DELETE, "/v1/domains/www.tether.test", Some(&token), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    eventually(Duration::from_secs(2), "the deleted domain to be NXDOMAIN", || async {
        let r = ask(stack.dns.dns_addr, "www.tether.test.", RecordType::A, Transport::Udp).await.ok()?;
        (r.metadata.response_code == hickory_proto::op::ResponseCode::NXDomain).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_new_zone_is_served_without_restart() -> Result<()> {
    let stack = Stack::start().await?;
    let r = ask(stack.dns.dns_addr, "late.test.", RecordType::SOA, Transport::Udp).await?;
    assert_eq!(r.metadata.response_code, hickory_proto::op::ResponseCode::Refused);
    stack.zone("late.test").await?;
    eventually(Duration::from_secs(5), "the new zone's SOA", || async {
        let r = ask(stack.dns.dns_addr, "late.test.", RecordType::SOA, Transport::Udp).await.ok()?;
        (r.answers.len() == 1).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn postgres_outage_keeps_answers_and_catches_up_on_missed_changes() -> Result<()> {
    let (mut stack, token) = Stack::with_acme().await?;
    stack.domain(&token, json!({ "name": "www.tether.test" })).await?;
    stack.address(&token, "www.tether.test", json!({ "ip": "198.18.1.1" })).await?;
    stack.address(&token, "www.tether.test", json!({ "ip": "198.18.1.2" })).await?;
    eventually(Duration::from_secs(5), "both addresses", || async {
        (answers(&stack, "www.tether.test.").await? == ["198.18.1.1", "198.18.1.2"]).then_some(())
    })
    .await?;

    stack.pg.stop()?;
    for _ in 0..10 {
        assert_eq!(
            answers(&stack, "www.tether.test.").await,
            Some(vec!["198.18.1.1".to_owned(), "198.18.1.2".to_owned()]),
            "answers from the last view while Postgres is down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = stack.api.call(Method::GET, "/v1/domains", Some(&token), None).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable");

    stack.pg.restart().await?;
    // Written straight away, most likely before dns has reconnected: a notification it cannot have received.
    let db = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.1.1'").execute(&db).await?;
    sqlx::query(
        "INSERT INTO addresses (domain_id, ip, source, state) \
         SELECT id, '198.18.1.3', 'static', 'live' FROM domains WHERE fqdn = 'www.tether.test.'",
    )
    .execute(&db)
    .await?;
    eventually(Duration::from_secs(15), "the changes made around the outage", || async {
        (answers(&stack, "www.tether.test.").await? == ["198.18.1.2", "198.18.1.3"]).then_some(())
    })
    .await?;

    // And the notification path works again after the reconnect.
    stack.address(&token, "www.tether.test", json!({ "ip": "198.18.1.4" })).await?;
    eventually(Duration::from_secs(5), "a change after the reconnect", || async {
        (answers(&stack, "www.tether.test.").await? == ["198.18.1.2", "198.18.1.3", "198.18.1.4"]).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn servers_starting_together_migrate_once() -> Result<()> {
    let pg = tether_tests::Postgres::start().await?;
    let url = pg.url();
    let (a, b, c) = tokio::join!(DnsServer::start(&url), DnsServer::start(&url), DnsServer::start(&url));
    let (a, b, c) = (a?, b?, c?);
    let db = pg.pool().await?;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&db).await?;
    assert_eq!(applied, i64::try_from(tether_db::MIGRATOR.iter().count())?);

    // A change through one server is answered by all.
    let api = tether_tests::stack::Api::new(a.api_addr);
    let body = json!({ "origin": "multi.test", "nameservers": ["ns.example.net"] });
    let (status, _) = api.call(Method::POST, "/v1/zones", Some(OPERATOR_TOKEN), Some(body)).await?;
    assert_eq!(status, StatusCode::CREATED);
    for server in [&a, &b, &c] {
        eventually(Duration::from_secs(5), "the zone on every server", || async {
            let r = ask(server.dns_addr, "multi.test.", RecordType::SOA, Transport::Udp).await.ok()?;
            (r.answers.len() == 1).then_some(())
        })
        .await?;
    }
    a.stop().await?;
    b.stop().await?;
    c.stop().await?;
    Ok(())
}

#[tokio::test]
async fn every_change_bumps_the_serial_in_the_same_transaction() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    let db = stack.pg.pool().await?;
    let serial = || async { sqlx::query_scalar::<_, i64>("SELECT serial FROM zones").fetch_one(&db).await };
    let s0 = serial().await?;
    stack.domain(&token, json!({ "name": "s.tether.test" })).await?;
    let s1 = serial().await?;
    assert!(s1 > s0, "domain insert bumps: {s0} -> {s1}");
    stack.address(&token, "s.tether.test", json!({ "ip": "198.18.1.1" })).await?;
    let s2 = serial().await?;
    assert!(s2 > s1, "address insert bumps: {s1} -> {s2}");
    // A rolled-back change neither bumps nor notifies.
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE addresses SET state = 'dead'").execute(&mut *tx).await?;
    tx.rollback().await?;
    assert_eq!(serial().await?, s2);
    // Many rows in one statement bump once.
    stack.address(&token, "s.tether.test", json!({ "ip": "198.18.1.2" })).await?;
    let s3 = serial().await?;
    let updated = sqlx::query("UPDATE addresses SET load = 1").execute(&db).await?;
    assert_eq!(updated.rows_affected(), 2);
    assert_eq!(serial().await?, s3 + 1);
    Ok(())
}

#[tokio::test]
async fn updates_that_change_no_answer_neither_bump_nor_notify() -> Result<()> {
    let (stack, token) = Stack::with_acme().await?;
    let db = stack.pg.pool().await?;
    for name in ["quiet.tether.test", "loud.tether.test"] {
        stack.domain(&token, json!({ "name": name })).await?;
        stack.address(&token, name, json!({ "ip": "198.18.1.1" })).await?;
    }
    let domain = |name: &'static str| {
        sqlx::query_scalar::<_, i64>("SELECT id FROM domains WHERE rtrim(fqdn, '.') = $1").bind(name).fetch_one(&db)
    };
    let (quiet, loud) = (domain("quiet.tether.test").await?, domain("loud.tether.test").await?);
    let serial = || async { sqlx::query_scalar::<_, i64>("SELECT serial FROM zones").fetch_one(&db).await };
    let mut listener = sqlx::postgres::PgListener::connect_with(&db).await?;
    listener.listen(tether_db::CHANNEL).await?;
    let s0 = serial().await?;

    // A heartbeat server taking the row over, with bookkeeping alongside: nothing readers answer from.
    let bookkeeping = "UPDATE addresses SET hbs = 'hbs-b', interface_ip = '198.18.9.9', changed_at = now() \
                       WHERE domain_id = $1";
    assert_eq!(sqlx::query(bookkeeping).bind(quiet).execute(&db).await?.rows_affected(), 1);
    assert_eq!(serial().await?, s0, "a takeover changes no answer");
    // Writing the same values again changes nothing either.
    sqlx::query("UPDATE addresses SET state = state, load = load WHERE domain_id = $1")
        .bind(quiet)
        .execute(&db)
        .await?;
    assert_eq!(serial().await?, s0);

    // One statement over both domains that changes only the loud one's load: one bump, one notification.
    sqlx::query("UPDATE addresses SET load = CASE WHEN domain_id = $1 THEN 0.5 ELSE load END, hbs = 'hbs-c'")
        .bind(loud)
        .execute(&db)
        .await?;
    assert_eq!(serial().await?, s0 + 1);
    // Notifications arrive in commit order: everything before the loud domain's came from these statements.
    let mut heard = Vec::new();
    while heard.last() != Some(&format!("domain:{loud}")) {
        heard.push(tokio::time::timeout(Duration::from_secs(5), listener.recv()).await??.payload().to_owned());
    }
    assert!(!heard.contains(&format!("domain:{quiet}")), "nothing was said about the quiet domain: {heard:?}");
    Ok(())
}
