//! Heartbeat servers end to end: an NCU agent with loopback uplinks, two hbs, hds, dns and Postgres, in-process.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use hickory_proto::rr::RecordType;
use ncu::identity::Identity;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_proto::{
    control::{self, ControlError, ToHbs, ToNcu, Uplink},
    heartbeat::packet::{self, Kind, Packet},
};
use tether_tests::{
    dns_client::{Transport, addresses, ask, sorted},
    eventually,
    fleet::{Agent, HbsServer, uplink},
    hds_stack::{HdsServer, Pki},
    stack::{OPERATOR_TOKEN, Stack},
};

const NAME: &str = "site.tether.test.";

/// dns + hds + two hbs + an enrolled identity for site.tether.test.
struct World {
    stack: Stack,
    acme: String,
    pki: Pki,
    hds: HdsServer,
    hbs: Vec<HbsServer>,
    identity: Identity,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new(servers: usize) -> Result<Self> {
        let (stack, acme) = Stack::with_acme().await?;
        stack.domain(&acme, json!({ "name": "site.tether.test" })).await?;
        let pki = Pki::new()?;
        let hds = HdsServer::start(&stack.pg.url(), &pki, "stale_after = '3s'\n").await?;
        let mut hbs = Vec::new();
        for i in 0..servers {
            hbs.push(HbsServer::start(&stack.pg.url(), &pki, &format!("hbs-{i}")).await?);
        }
        let (status, body) =
            stack.api.call(Method::POST, "/v1/domains/site.tether.test/enrollments", Some(&acme), None).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let token = body["token"].as_str().unwrap_or_default().to_owned();
        let dir = tempfile::tempdir()?;
        ncu::hds_client::enroll(&[hds.address()], &pki.ca_pem(), &token, dir.path(), None, None).await?;
        let identity = Identity::load(dir.path())?;
        // Both servers in the fleet table before the NCU asks.
        let db = stack.pg.pool().await?;
        eventually(Duration::from_secs(10), "every hbs in the fleet table", || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM heartbeat_servers").fetch_one(&db).await.ok()?;
            (n == i64::try_from(servers).ok()?).then_some(())
        })
        .await?;
        Ok(Self { stack, acme, pki, hds, hbs, identity, _dir: dir })
    }

    fn agent(&self, uplinks: &[(&str, &str)]) -> Agent {
        let uplinks = uplinks.iter().map(|(n, a)| uplink(n, a)).collect();
        Agent::start(vec![self.hds.address()], self.identity.clone(), uplinks)
    }

    async fn answers(&self) -> Option<Vec<String>> {
        let r = ask(self.stack.dns.dns_addr, NAME, RecordType::A, Transport::Udp).await.ok()?;
        Some(sorted(addresses(&r)))
    }

    async fn answers_become(&self, want: &[&str], limit: Duration) -> Result<()> {
        let want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        eventually(limit, &format!("DNS to answer {want:?}"), || async {
            (self.answers().await? == want).then_some(())
        })
        .await
    }

    async fn hbs_of_rows(&self) -> Result<BTreeSet<String>> {
        let db = self.stack.pg.pool().await?;
        let rows: Vec<Option<String>> =
            sqlx::query_scalar("SELECT hbs FROM addresses WHERE source = 'ncu'").fetch_all(&db).await?;
        Ok(rows.into_iter().flatten().collect())
    }
}

/// Polls DNS every 50 ms in the background and counts empty answers, to prove an answer is never empty.
fn watch_for_empty_answers(world: &World) -> (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let empties = Arc::new(AtomicU64::new(0));
    let asked = Arc::new(AtomicU64::new(0));
    let (s, e, a) = (stop.clone(), empties.clone(), asked.clone());
    let server = world.stack.dns.dns_addr;
    tokio::spawn(async move {
        while !s.load(Ordering::Relaxed) {
            if let Ok(r) = ask(server, NAME, RecordType::A, Transport::Udp).await {
                a.fetch_add(1, Ordering::Relaxed);
                if r.answers.is_empty() {
                    e.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (stop, empties, asked)
}

#[tokio::test]
async fn registered_uplinks_are_proven_then_answered_and_a_silent_one_leaves_dns() -> Result<()> {
    let world = World::new(2).await?;
    let agent = world.agent(&[("wan1", "127.0.0.2"), ("wan2", "127.0.0.3"), ("wan3", "127.0.0.4")]);
    world.answers_become(&["127.0.0.2", "127.0.0.3", "127.0.0.4"], Duration::from_secs(10)).await?;
    let (_, detail) =
        world.stack.api.call(Method::GET, "/v1/domains/site.tether.test", Some(&world.acme), None).await?;
    let rows = detail["addresses"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 3, "{detail}");
    for row in &rows {
        assert_eq!(row["source"], "ncu");
        assert_eq!(row["state"], "live");
        assert!(row["uplink"].as_str().is_some_and(|u| u.starts_with("wan")), "{row}");
        assert!(row["interface_ip"].is_null(), "no NAT on loopback: {row}");
    }

    agent.drill.silence("wan2", true);
    let silenced = std::time::Instant::now();
    world.answers_become(&["127.0.0.2", "127.0.0.4"], Duration::from_secs(5)).await?;
    assert!(silenced.elapsed() < Duration::from_secs(4), "out of DNS in {:?}", silenced.elapsed());
    agent.drill.silence("wan2", false);
    world.answers_become(&["127.0.0.2", "127.0.0.3", "127.0.0.4"], Duration::from_secs(5)).await?;

    // Steady heartbeats write nothing: the serial stands still.
    let db = world.stack.pg.pool().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before: i64 = sqlx::query_scalar("SELECT serial FROM zones").fetch_one(&db).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: i64 = sqlx::query_scalar("SELECT serial FROM zones").fetch_one(&db).await?;
    assert_eq!(before, after, "steady heartbeats must not write");
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn forged_replies_never_keep_a_silent_address_alive() -> Result<()> {
    let world = World::new(1).await?;
    let mut agent = world.agent(&[("wan1", "127.0.0.2"), ("wan2", "127.0.0.3")]);
    world.answers_become(&["127.0.0.2", "127.0.0.3"], Duration::from_secs(10)).await?;
    let session = agent.status.wait_for(|s| s.session.is_some()).await?.session.unwrap_or_default();
    agent.drill.silence("wan2", true);

    // Someone on wan2's address answers every ping with a forged reply.
    let forger = tokio::net::UdpSocket::bind("127.0.0.3:0").await?;
    let target = world.hbs[0].heartbeat;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let forging = tokio::spawn(async move {
        let mut seq = 0_u64;
        while !flag.load(Ordering::Relaxed) {
            seq += 1;
            let pong = Packet { kind: Kind::Pong, session, uplink: 1, seq, nonce: rand::random(), load: 0 };
            let _ = forger.send_to(&packet::encode(&pong, &rand::random()), target).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    world.answers_become(&["127.0.0.2"], Duration::from_secs(5)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(world.answers().await, Some(vec!["127.0.0.2".to_owned()]), "forgeries did not revive it");
    stop.store(true, Ordering::Relaxed);
    forging.await?;
    assert!(world.hbs[0].counters.forged.load(Ordering::Relaxed) > 10, "forged replies are counted");
    Ok(())
}

#[tokio::test]
async fn killing_the_primary_moves_the_ncu_to_the_backup_and_the_answer_never_empties() -> Result<()> {
    let mut world = World::new(2).await?;
    let mut agent = world.agent(&[("wan1", "127.0.0.2"), ("wan2", "127.0.0.3")]);
    world.answers_become(&["127.0.0.2", "127.0.0.3"], Duration::from_secs(10)).await?;
    // The NCU holds an idle connection to its backup (handshake done) before anything fails.
    let ready = agent.status.wait_for(|s| s.hbs.is_some() && s.backup.is_some() && s.standby == s.backup).await?;
    let primary = ready.hbs.clone().unwrap_or_default();
    let standby = ready.standby.clone().unwrap_or_default();
    drop(ready);
    let (stop, empties, asked) = watch_for_empty_answers(&world);

    let index = world.hbs.iter().position(|h| h.name == primary).unwrap_or(0);
    world.hbs.remove(index).kill().await;
    let moved = agent.status.wait_for(|s| s.hbs.as_ref().is_some_and(|h| h != &primary)).await?.hbs.clone();
    let backup = moved.unwrap_or_default();
    assert_eq!(backup, standby, "the NCU moved to the server its standby connection led to");
    eventually(Duration::from_secs(10), "rows owned by the backup", || async {
        (world.hbs_of_rows().await.ok()? == BTreeSet::from([backup.clone()])).then_some(())
    })
    .await?;
    // Past the re-home grace: nothing expired, both still answered.
    tokio::time::sleep(Duration::from_secs(4)).await;
    world.answers_become(&["127.0.0.2", "127.0.0.3"], Duration::from_secs(1)).await?;
    stop.store(true, Ordering::Relaxed);
    assert!(asked.load(Ordering::Relaxed) > 50, "the watcher really asked");
    assert_eq!(empties.load(Ordering::Relaxed), 0, "the answer was never empty during the failover");
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn draining_moves_the_ncu_with_no_dns_change() -> Result<()> {
    let world = World::new(2).await?;
    let mut agent = world.agent(&[("wan1", "127.0.0.2"), ("wan2", "127.0.0.3")]);
    world.answers_become(&["127.0.0.2", "127.0.0.3"], Duration::from_secs(10)).await?;
    let primary = agent.status.wait_for(|s| s.hbs.is_some()).await?.hbs.clone().unwrap_or_default();
    let db = world.stack.pg.pool().await?;
    let (stop, empties, _) = watch_for_empty_answers(&world);

    let (status, body) = world
        .stack
        .api
        .call(Method::POST, &format!("/v1/heartbeat-servers/{primary}/drain"), Some(OPERATOR_TOKEN), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let moved = agent.status.wait_for(|s| s.hbs.as_ref().is_some_and(|h| h != &primary)).await?.hbs.clone();
    let other = moved.unwrap_or_default();
    eventually(Duration::from_secs(10), "rows owned by the other server", || async {
        (world.hbs_of_rows().await.ok()? == BTreeSet::from([other.clone()])).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(empties.load(Ordering::Relaxed), 0);
    world.answers_become(&["127.0.0.2", "127.0.0.3"], Duration::from_secs(1)).await?;
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state::text FROM addresses WHERE source = 'ncu'").fetch_all(&db).await?;
    assert_eq!(states, ["live", "live"], "no address flapped");
    agent.stop().await?;
    Ok(())
}

/// One live address whose server died first (so it cannot mark the address dead itself), and whose NCU then went
/// away for good: an orphan.
async fn orphaned_address() -> Result<World> {
    let mut world = World::new(1).await?;
    let agent = world.agent(&[("wan1", "127.0.0.2")]);
    world.answers_become(&["127.0.0.2"], Duration::from_secs(10)).await?;
    world.hbs.remove(0).kill().await;
    agent.stop().await?;
    Ok(world)
}

#[tokio::test]
async fn addresses_of_an_ncu_that_never_re_homes_become_dead() -> Result<()> {
    let world = orphaned_address().await?;
    // Once the dead server's row is older than the re-home grace, another server's janitor marks it dead.
    let fresh = HbsServer::start(&world.stack.pg.url(), &world.pki, "hbs-fresh").await?;
    world.answers_become(&[], Duration::from_secs(10)).await?;
    fresh.stop().await?;
    Ok(())
}

#[tokio::test]
async fn orphan_expiry_skips_an_address_a_registration_is_taking_over() -> Result<()> {
    let world = orphaned_address().await?;
    let db = world.stack.pg.pool().await?;
    // A registration in flight holds the row, as a batch taking it over in a failover storm does.
    let mut taking_over = db.begin().await?;
    let id: i64 = sqlx::query_scalar("SELECT id FROM addresses WHERE source = 'ncu' FOR UPDATE")
        .fetch_one(&mut *taking_over)
        .await?;
    let expired = tokio::time::timeout(Duration::from_secs(5), hbs::store::expire_orphans(&db, Duration::ZERO))
        .await
        .map_err(|_| anyhow::anyhow!("expiry waited for the registration's lock"))??;
    assert_eq!(expired, 0, "the row being taken over is skipped");
    let state =
        |db| sqlx::query_scalar::<_, String>("SELECT state::text FROM addresses WHERE id = $1").bind(id).fetch_one(db);
    assert_eq!(state(&db).await?, "live");
    taking_over.rollback().await?;
    // Left orphaned after all, it is expired by the next round.
    assert_eq!(hbs::store::expire_orphans(&db, Duration::ZERO).await?, 1);
    assert_eq!(state(&db).await?, "dead");
    Ok(())
}

#[tokio::test]
async fn bad_input_is_refused_and_the_server_stays_up() -> Result<()> {
    let world = World::new(1).await?;
    let hbs = &world.hbs[0];

    // Garbage on the heartbeat port.
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    for payload in [&b""[..], b"TH", &[0xff; 55], &[0; 1500]] {
        for _ in 0..50 {
            junk.send_to(payload, hbs.heartbeat).await?;
        }
    }
    eventually(Duration::from_secs(5), "malformed datagrams counted", || async {
        (hbs.counters.malformed.load(Ordering::Relaxed) >= 100).then_some(())
    })
    .await?;

    // Control frames: a registration of 16 uplinks, a malformed frame, an unknown version.
    let (endpoint, crypto) = control_client(&world.identity)?;
    let connection = endpoint.connect_with(quinn::ClientConfig::new(crypto), hbs.control, "127.0.0.1")?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let sixteen: Vec<Uplink> = (0..16)
        .map(|i| Uplink {
            name: format!("u{i}"),
            index: i,
            address: [127, 0, 1, i].into(),
            port: 9,
            priority: 0,
            weight: 1,
        })
        .collect();
    tether_pki::stream::write(&mut send, control::VERSION, &ToHbs::Register { uplinks: sixteen, generation: 0 })
        .await?;
    let answer = tether_pki::stream::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await?;
    assert!(
        matches!(&answer, Some(ToNcu::Error { code: ControlError::Invalid, message }) if message.contains("at most 15")),
        "{answer:?}"
    );
    send.write_all(b"\x00\x00\x00\x04{{{{").await?;
    let answer = tether_pki::stream::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await?;
    assert!(matches!(answer, Some(ToNcu::Error { code: ControlError::Malformed, .. })), "{answer:?}");
    send.write_all(&tether_proto::frame::encode(7, &json!({"type": "register", "uplinks": []}))).await?;
    let answer = tether_pki::stream::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await?;
    assert!(
        matches!(&answer, Some(ToNcu::Error { code: ControlError::Malformed, message }) if message.contains("version 7")),
        "{answer:?}"
    );
    connection.close(0_u32.into(), b"");

    // A client certificate from another CA never gets a session.
    let foreign = tether_pki::Ca::generate("other", Duration::from_secs(3600))?;
    let stranger = foreign.issue_client_between(
        "stranger",
        time::OffsetDateTime::now_utc() - time::Duration::hours(1),
        time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    )?;
    let tls =
        tether_pki::client_tls(&world.identity.ca_pem, Some((&stranger.cert_pem, &stranger.key_pem)), control::ALPN)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let refused = async {
        let connection =
            endpoint.connect_with(quinn::ClientConfig::new(Arc::new(crypto)), hbs.control, "127.0.0.1")?.await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        tether_pki::stream::write(&mut send, control::VERSION, &ToHbs::Register { uplinks: vec![], generation: 0 })
            .await?;
        anyhow::Ok(tether_pki::stream::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await?)
    }
    .await;
    assert!(refused.is_err(), "{refused:?}");

    // Still serving a real NCU.
    let agent = world.agent(&[("wan1", "127.0.0.2")]);
    world.answers_become(&["127.0.0.2"], Duration::from_secs(10)).await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn uplink_changes_are_registered_at_once() -> Result<()> {
    let world = World::new(1).await?;
    let agent = world.agent(&[("wan1", "127.0.0.2"), ("wan2", "127.0.0.3")]);
    world.answers_become(&["127.0.0.2", "127.0.0.3"], Duration::from_secs(10)).await?;
    agent.uplinks.send_replace(vec![uplink("wan1", "127.0.0.2"), uplink("wan3", "127.0.0.5")]);
    world.answers_become(&["127.0.0.2", "127.0.0.5"], Duration::from_secs(5)).await?;
    agent.stop().await?;
    Ok(())
}

#[tokio::test]
async fn static_addresses_are_checked_by_one_server_and_taken_over() -> Result<()> {
    let mut world = World::new(2).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.9:0").await?;
    let port = listener.local_addr()?.port();
    let serving = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"HELLO tether\n").await;
            });
        }
    });
    world
        .stack
        .address(
            &world.acme,
            "site.tether.test",
            json!({ "ip": "127.0.0.9", "check": { "kind": "tcp", "port": port, "expect": "HELLO" } }),
        )
        .await?;
    world.answers_become(&["127.0.0.9"], Duration::from_secs(10)).await?;
    let db = world.stack.pg.pool().await?;
    let owner: String = sqlx::query_scalar("SELECT hbs FROM addresses WHERE ip = '127.0.0.9'").fetch_one(&db).await?;

    // The owner dies: the other server takes the check over and keeps it live.
    let index = world.hbs.iter().position(|h| h.name == owner).unwrap_or(0);
    world.hbs.remove(index).kill().await;
    let survivor = world.hbs[0].name.clone();
    eventually(Duration::from_secs(15), "the check taken over", || async {
        let now: Option<String> =
            sqlx::query_scalar("SELECT hbs FROM addresses WHERE ip = '127.0.0.9'").fetch_one(&db).await.ok()?;
        (now.as_deref() == Some(survivor.as_str())).then_some(())
    })
    .await?;
    world.answers_become(&["127.0.0.9"], Duration::from_secs(1)).await?;

    // The service goes away: dead after three failed checks, out of DNS.
    serving.abort();
    let _ = serving.await;
    world.answers_become(&[], Duration::from_secs(10)).await?;
    Ok(())
}

/// First proofs of many addresses reach the state writer together (a ramp, a storm): where their replies came from
/// is written in one statement, which changes only the rows behind NAT. An observed address that is already another
/// of the domain's is refused for that row alone, which stays pending (never live with an address it has not proven)
/// and is tried again; rows of another server are not touched.
#[tokio::test]
async fn observed_addresses_are_written_together_and_a_collision_refuses_only_its_row() -> Result<()> {
    use tether_proto::heartbeat::monitor::Event;
    let (stack, token) = Stack::with_acme().await?;
    let db = stack.pg.pool().await?;
    stack.domain(&token, json!({ "name": "nat.tether.test" })).await?;
    let mut ids = Vec::new();
    for ip in ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"] {
        stack.address(&token, "nat.tether.test", json!({ "ip": ip })).await?;
        ids.push(
            sqlx::query_scalar::<_, i64>("SELECT id FROM addresses WHERE ip = $1::inet")
                .bind(ip)
                .fetch_one(&db)
                .await?,
        );
    }
    // Taken over by heartbeat servers, not yet proven.
    sqlx::query("UPDATE addresses SET state = 'pending', hbs = CASE WHEN id = $1 THEN 'hbs-other' ELSE 'hbs-me' END")
        .bind(ids[3])
        .execute(&db)
        .await?;

    let (events, heartbeat) = tokio::sync::mpsc::unbounded_channel();
    let (_checks_tx, checks) = tokio::sync::mpsc::unbounded_channel();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(hbs::writer::run(
        db.clone(),
        "hbs-me".into(),
        Duration::from_millis(20),
        heartbeat,
        checks,
        std::sync::Arc::new(hbs::metrics::Metrics::new(Default::default(), Default::default())),
        shutdown.clone(),
    ));
    let alive = |id: i64, ip: &str| Event::Alive { id, observed: format!("{ip}:9").parse().expect("addr"), load: 0 };
    for event in [
        alive(ids[0], "198.18.0.1"), // no NAT
        alive(ids[1], "198.18.7.2"), // behind NAT
        alive(ids[2], "198.18.0.4"), // another address of the domain: refused
        alive(ids[3], "198.18.7.4"), // another server's row
    ] {
        events.send(event)?;
    }
    let row = |id: i64| {
        sqlx::query_as::<_, (String, Option<String>, String)>(
            "SELECT host(ip), host(interface_ip), state::text FROM addresses WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db)
    };
    eventually(Duration::from_secs(5), "the proofs written", || async {
        let mut states = Vec::new();
        for &id in &ids[..2] {
            states.push(row(id).await.ok()?.2);
        }
        states.iter().all(|state| state == "live").then_some(())
    })
    .await?;
    assert_eq!(row(ids[0]).await?, ("198.18.0.1".into(), None, "live".into()));
    assert_eq!(row(ids[1]).await?, ("198.18.7.2".into(), Some("198.18.0.2".into()), "live".into()));
    assert_eq!(
        row(ids[2]).await?,
        ("198.18.0.3".into(), None, "pending".into()),
        "refused alone, and not live unproven"
    );
    assert_eq!(row(ids[3]).await?, ("198.18.0.4".into(), None, "pending".into()), "another server's row is untouched");
    // The other address goes: the parked proof is tried again and written, with the address it proved.
    sqlx::query("DELETE FROM addresses WHERE id = $1").bind(ids[3]).execute(&db).await?;
    eventually(Duration::from_secs(5 + 5), "the parked proof written", || async {
        (row(ids[2]).await.ok()? == ("198.18.0.4".into(), Some("198.18.0.3".into()), "live".into())).then_some(())
    })
    .await?;
    shutdown.cancel();
    writer.await?;
    Ok(())
}

/// A QUIC client endpoint and the control protocol's TLS with the NCU's identity.
fn control_client(identity: &Identity) -> Result<(quinn::Endpoint, Arc<quinn::crypto::rustls::QuicClientConfig>)> {
    let tls = tether_pki::client_tls(&identity.ca_pem, Some((&identity.cert_pem, &identity.key_pem)), control::ALPN)?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    Ok((endpoint, Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?)))
}

/// A session held open: the connection and its control stream (dropping the stream ends the session).
type Held = (quinn::Connection, quinn::SendStream, quinn::RecvStream);

/// A new control connection registering one uplink on `address`; the session and the server's answer.
async fn register_one(
    endpoint: &quinn::Endpoint,
    crypto: &Arc<quinn::crypto::rustls::QuicClientConfig>,
    server: std::net::SocketAddr,
    address: [u8; 4],
) -> Result<(Held, Option<ToNcu>)> {
    let connection = endpoint.connect_with(quinn::ClientConfig::new(crypto.clone()), server, "127.0.0.1")?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let uplink = Uplink { name: "wan1".into(), index: 0, address: address.into(), port: 9, priority: 0, weight: 1 };
    tether_pki::stream::write(&mut send, control::VERSION, &ToHbs::Register { uplinks: vec![uplink], generation: 0 })
        .await?;
    let answer = tether_pki::stream::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await?;
    Ok(((connection, send, recv), answer))
}

#[tokio::test]
async fn one_certificate_holds_at_most_four_sessions() -> Result<()> {
    let world = World::new(1).await?;
    let hbs = &world.hbs[0];
    let (endpoint, crypto) = control_client(&world.identity)?;
    let mut open = Vec::new();
    let mut answers = Vec::new();
    for i in 0..5_u8 {
        let (session, answer) = register_one(&endpoint, &crypto, hbs.control, [127, 0, 2, i + 1]).await?;
        answers.push(answer);
        open.push(session);
    }
    for answer in &answers[..4] {
        assert!(matches!(answer, Some(ToNcu::Registered { .. })), "{answer:?}");
    }
    assert!(
        matches!(&answers[4], Some(ToNcu::Error { code: ControlError::Unavailable, message }) if message.contains("at most 4 sessions per certificate")),
        "{:?}",
        answers[4]
    );
    // A session that ends gives its place back.
    open.remove(0).0.close(0_u32.into(), b"bye");
    let (connection, _, _) = eventually(Duration::from_secs(5), "a place again", || async {
        let (session, answer) = register_one(&endpoint, &crypto, hbs.control, [127, 0, 2, 9]).await.ok()?;
        matches!(answer, Some(ToNcu::Registered { .. })).then_some(session)
    })
    .await?;
    connection.close(0_u32.into(), b"bye");
    Ok(())
}

/// Sends `Register` (one uplink on 127.0.2.1) with `generation` on a new session to `server`, and reads the answer.
async fn register_generation(
    endpoint: &quinn::Endpoint,
    crypto: &Arc<quinn::crypto::rustls::QuicClientConfig>,
    server: std::net::SocketAddr,
    generation: u64,
) -> Result<(Held, Option<ToNcu>)> {
    let connection = endpoint.connect_with(quinn::ClientConfig::new(crypto.clone()), server, "127.0.0.1")?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let uplink =
        Uplink { name: "wan1".into(), index: 0, address: [127, 0, 2, 1].into(), port: 9, priority: 0, weight: 1 };
    tether_pki::stream::write(&mut send, control::VERSION, &ToHbs::Register { uplinks: vec![uplink], generation })
        .await?;
    let answer = tether_pki::stream::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await?;
    Ok(((connection, send, recv), answer))
}

#[tokio::test]
async fn the_newest_session_owns_the_ncu_when_two_servers_race() -> Result<()> {
    let world = World::new(2).await?;
    let db = world.stack.pg.pool().await?;
    let (a, b) = (world.hbs[0].control, world.hbs[1].control);
    let (endpoint, crypto) = control_client(&world.identity)?;
    let owner = || async { Ok::<_, anyhow::Error>(world.hbs_of_rows().await?.into_iter().collect::<Vec<_>>()) };

    // The NCU's newest session is at hbs-1; a registration of its older session at hbs-0 arrives late.
    let (_newest, answer) = register_generation(&endpoint, &crypto, b, 200).await?;
    assert!(matches!(answer, Some(ToNcu::Registered { .. })), "{answer:?}");
    let (mut late, answer) = register_generation(&endpoint, &crypto, a, 100).await?;
    assert_eq!(answer, Some(ToNcu::Superseded { generation: 200 }));
    assert_eq!(owner().await?, ["hbs-1"], "the late registration took nothing");
    // Nor may the older session withdraw what the newer one holds.
    tether_pki::stream::write(&mut late.1, control::VERSION, &ToHbs::UplinkDown { name: "wan1".into() }).await?;
    let _ = tether_pki::stream::read::<ToNcu>(&mut late.2, control::VERSION, control::MAX_FRAME).await?;
    assert_eq!(owner().await?, ["hbs-1"], "the older session's withdrawal removed nothing");

    // Both registrations in flight at once, held back by a lock on the NCU until both wait: whichever commits
    // first, the newer generation's server holds the rows at the end.
    for (older, newer) in [(300_u64, 400_u64), (500, 600)] {
        let mut lock = db.begin().await?;
        sqlx::query("SELECT id FROM ncus FOR UPDATE").execute(&mut *lock).await?;
        let first = tokio::spawn({
            let (endpoint, crypto) = (endpoint.clone(), crypto.clone());
            async move { register_generation(&endpoint, &crypto, if older == 300 { a } else { b }, older).await }
        });
        let second = tokio::spawn({
            let (endpoint, crypto) = (endpoint.clone(), crypto.clone());
            async move { register_generation(&endpoint, &crypto, if older == 300 { b } else { a }, newer).await }
        });
        eventually(Duration::from_secs(10), "both registrations waiting on the lock", || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%ncus%'",
            )
            .fetch_one(&db)
            .await
            .ok()?;
            (waiting >= 2).then_some(())
        })
        .await?;
        lock.rollback().await?;
        let (_older_session, older_answer) = first.await??;
        let (_newer_session, newer_answer) = second.await??;
        assert!(matches!(newer_answer, Some(ToNcu::Registered { .. })), "{newer_answer:?}");
        assert!(matches!(older_answer, Some(ToNcu::Registered { .. } | ToNcu::Superseded { .. })), "{older_answer:?}");
        let want = if older == 300 { "hbs-1" } else { "hbs-0" };
        assert_eq!(owner().await?, [want], "generation {newer} holds the NCU");
        let stored: i64 = sqlx::query_scalar("SELECT session_generation FROM ncus").fetch_one(&db).await?;
        assert_eq!(stored, i64::try_from(newer)?);
    }
    Ok(())
}

#[tokio::test]
async fn a_deleted_ncu_is_cut_off_at_once() -> Result<()> {
    let world = World::new(1).await?;
    let agent = world.agent(&[("wan1", "127.0.0.2")]);
    world.answers_become(&["127.0.0.2"], Duration::from_secs(10)).await?;
    // A second session of the same certificate, read directly.
    let (endpoint, crypto) = control_client(&world.identity)?;
    let ((_connection, _send, mut recv), answer) =
        register_one(&endpoint, &crypto, world.hbs[0].control, [127, 0, 2, 1]).await?;
    assert!(matches!(answer, Some(ToNcu::Registered { .. })), "{answer:?}");
    let (_, body) = world.stack.api.call(Method::GET, "/v1/domains/site.tether.test", Some(&world.acme), None).await?;
    let id = body["ncus"][0]["id"].as_i64().ok_or_else(|| anyhow::anyhow!("no NCU listed: {body}"))?;
    let path = format!("/v1/domains/site.tether.test/ncus/{id}");

    // Nobody else may, and a bad id is simply not found.
    let bob = world.stack.subscriber("bob").await?;
    let (status, body) = world.stack.api.call(Method::DELETE, &path, Some(&bob), None).await?;
    assert!(matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND), "{status} {body}");
    for bad in ["x", "99999", "-1"] {
        let (status, body) = world
            .stack
            .api
            .call(Method::DELETE, &format!("/v1/domains/site.tether.test/ncus/{bad}"), Some(&world.acme), None)
            .await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{bad}: {body}");
    }

    let (status, body) = world.stack.api.call(Method::DELETE, &path, Some(&world.acme), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let deleted = std::time::Instant::now();
    world.answers_become(&[], Duration::from_secs(2)).await?;
    // hbs ends the open session itself, saying why, within about a second.
    let said = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match tether_pki::stream::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await {
                Ok(Some(ToNcu::Error { code, message })) => return Some((code, message)),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    })
    .await?;
    let (code, message) = said.ok_or_else(|| anyhow::anyhow!("the session ended without a reason"))?;
    assert_eq!(code, ControlError::UnknownCertificate);
    assert!(message.contains("deleted"), "{message}");
    eprintln!("the deleted NCU's session was closed {:?} after the DELETE", deleted.elapsed());
    // The certificate opens no new session.
    let (_, answer) = register_one(&endpoint, &crypto, world.hbs[0].control, [127, 0, 2, 1]).await?;
    assert!(matches!(answer, Some(ToNcu::Error { code: ControlError::UnknownCertificate, .. })), "{answer:?}");
    let _ = agent.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_silent_or_trickling_control_stream_is_closed_after_the_deadline_and_an_idle_session_is_not() -> Result<()> {
    let world = World::new(1).await?;
    let server = world.hbs[0].control;
    let (endpoint, crypto) = control_client(&world.identity)?;
    // Opens a stream and sends only the first two bytes of a frame's length.
    let silent = endpoint.connect_with(quinn::ClientConfig::new(crypto.clone()), server, "127.0.0.1")?.await?;
    let (mut silent_send, _silent_recv) = silent.open_bi().await?;
    silent_send.write_all(&[0, 0]).await?;
    // Registers, then starts a 100-byte frame and sends ten bytes of it.
    let ((trickling, mut trickling_send, _r1), answer) =
        register_one(&endpoint, &crypto, server, [127, 0, 2, 1]).await?;
    assert!(matches!(answer, Some(ToNcu::Registered { .. })), "{answer:?}");
    trickling_send.write_all(&100_u32.to_be_bytes()).await?;
    trickling_send.write_all(b"{\"version\"").await?;
    // Registers and then says nothing: idle between frames is normal.
    let ((idle, _s2, _r2), answer) = register_one(&endpoint, &crypto, server, [127, 0, 2, 2]).await?;
    assert!(matches!(answer, Some(ToNcu::Registered { .. })), "{answer:?}");

    let started = std::time::Instant::now();
    for (what, connection) in [("silent", &silent), ("trickling", &trickling)] {
        let reason = tokio::time::timeout(Duration::from_secs(20), connection.closed())
            .await
            .map_err(|_| anyhow::anyhow!("the {what} stream was never closed"))?;
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(close) if close.error_code == quinn::VarInt::from_u32(3)),
            "{what}: {reason:?}"
        );
    }
    eprintln!("both closed {:?} after the frames stalled", started.elapsed());
    assert!(idle.close_reason().is_none(), "an idle registered session stays: {:?}", idle.close_reason());
    Ok(())
}
