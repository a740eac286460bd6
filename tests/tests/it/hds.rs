//! Enrollment, assignment and every refusal, over real QUIC with real certificates and real Postgres.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use anyhow::Result;
use hickory_proto::rr::{RData, RecordType};
use ncu::{
    hds_client::{self, NcuError},
    identity::Identity,
};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_pki::{self as pki, hds_client::ClientError};
use tether_proto::hds::{self as proto, ErrorCode, Request, Response};
use tether_tests::{
    dns_client::{Transport, ask},
    eventually,
    hds_stack::{HdsServer, Pki, raw_exchange},
    stack::{OPERATOR_TOKEN, Stack},
};

const PATIENCE: Duration = Duration::from_millis(500);

/// A stack with zone tether.test, subscriber acme, domain site.tether.test, a PKI and one hds.
struct World {
    stack: Stack,
    acme: String,
    pki: Pki,
    hds: HdsServer,
}

impl World {
    async fn new() -> Result<Self> {
        let (stack, acme) = Stack::with_acme().await?;
        stack.domain(&acme, json!({ "name": "site.tether.test" })).await?;
        let pki = Pki::new()?;
        let hds = HdsServer::start(&stack.pg.url(), &pki, "").await?;
        Ok(Self { stack, acme, pki, hds })
    }

    async fn token(&self) -> Result<String> {
        let (status, body) = self
            .stack
            .api
            .call(Method::POST, "/v1/domains/site.tether.test/enrollments", Some(&self.acme), None)
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Ok(body["token"].as_str().unwrap_or_default().to_owned())
    }

    async fn enroll(&self, dir: &std::path::Path) -> Result<Result<String, NcuError>> {
        let token = self.token().await?;
        Ok(hds_client::enroll(&[self.hds.address()], &self.pki.ca_pem(), &token, dir, Some("SN-1".into()), None).await)
    }

    async fn fleet(&self, rows: &[(&str, &str, i32, i32, &str, i64)]) -> Result<()> {
        let db = self.stack.pg.pool().await?;
        for (name, address, capacity, load, state, age) in rows {
            sqlx::query(
                "INSERT INTO heartbeat_servers (name, control_address, capacity, current_load, state, last_seen) \
                 VALUES ($1, $2, $3, $4, $5::hbs_state, now() - make_interval(secs => $6))",
            )
            .bind(name)
            .bind(address)
            .bind(capacity)
            .bind(load)
            .bind(state)
            .bind(*age as f64)
            .execute(&db)
            .await?;
        }
        Ok(())
    }
}

fn refused(result: Result<impl std::fmt::Debug, NcuError>) -> (ErrorCode, String) {
    match result {
        Err(NcuError::Hds(ClientError::Refused { code, message })) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn enrollment_stores_a_private_identity_and_assignment_follows_the_fleet() -> Result<()> {
    let world = World::new().await?;
    let dir = tempfile::tempdir()?;
    let ncu_dir = dir.path().join("ncu");
    let domain = world.enroll(&ncu_dir).await??;
    assert_eq!(domain, "site.tether.test");
    for file in Identity::files(&ncu_dir) {
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let identity = Identity::load(&ncu_dir)?;
    let cert = pki::cert_from_pem(&identity.cert_pem)?;
    let (status, detail) =
        world.stack.api.call(Method::GET, "/v1/domains/site.tether.test", Some(&world.acme), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(detail["ncus"][0]["fingerprint"], hex::encode(pki::fingerprint(&cert)));
    assert_eq!(detail["ncus"][0]["serial_number"], "SN-1");

    world
        .fleet(&[
            ("light", "127.0.0.1:7001", 100, 10, "active", 0),
            ("medium", "127.0.0.2:7001", 100, 50, "active", 0),
            ("full", "127.0.0.3:7001", 100, 0, "full", 0),
            ("stale", "127.0.0.4:7001", 100, 0, "active", 3600),
            ("draining", "127.0.0.5:7001", 100, 0, "draining", 0),
        ])
        .await?;
    let pair = hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await?;
    assert_eq!(pair.primary.name, "light");
    assert_eq!(pair.primary.address, "127.0.0.1:7001");
    assert_eq!(pair.backup.map(|b| b.name).as_deref(), Some("medium"));
    // The same NCU asking again gets the same pair.
    let again = hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await?;
    assert_eq!(again.primary.name, "light");

    let without_light = hds_client::assign(&[world.hds.address()], &identity, &["light".into()], PATIENCE).await?;
    assert_eq!(without_light.primary.name, "medium");
    assert_eq!(without_light.backup, None, "full, stale and draining servers are never assigned");

    let (status, _) =
        world.stack.api.call(Method::POST, "/v1/heartbeat-servers/light/drain", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    let after_drain = hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await?;
    assert_eq!(after_drain.primary.name, "medium");
    let (status, body) =
        world.stack.api.call(Method::POST, "/v1/heartbeat-servers/light/activate", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("active")));
    let reactivated = hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await?;
    assert_eq!(reactivated.primary.name, "light");
    let (status, _) =
        world.stack.api.call(Method::POST, "/v1/heartbeat-servers/light/drain", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    let (_, fleet) = world.stack.api.call(Method::GET, "/v1/heartbeat-servers", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(fleet.as_array().map(Vec::len), Some(5));
    let (status, _) = world.stack.api.call(Method::GET, "/v1/heartbeat-servers", Some(&world.acme), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) =
        world.stack.api.call(Method::POST, "/v1/heartbeat-servers/nope/drain", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn tokens_are_single_use_expire_and_must_exist() -> Result<()> {
    let world = World::new().await?;
    let dir = tempfile::tempdir()?;
    let token = world.token().await?;
    let hds = [world.hds.address()];
    let ca = world.pki.ca_pem();

    // A bad CSR is refused and does not use the token up.
    let tls = std::sync::Arc::new(pki::client_tls(&ca, None, proto::ALPN)?);
    let bad = Request::Enroll { token: token.clone(), csr: "garbage".into(), serial: None, mac: None };
    let answer = tether_pki::hds_client::request_one(&hds[0], tls, &bad).await?;
    assert!(matches!(answer, Response::Error { code: ErrorCode::BadCsr, .. }), "{answer:?}");

    hds_client::enroll(&hds, &ca, &token, &dir.path().join("a"), None, None).await?;
    let (code, message) = refused(hds_client::enroll(&hds, &ca, &token, &dir.path().join("b"), None, None).await);
    assert_eq!(code, ErrorCode::TokenUsed);
    assert!(message.contains("already used"), "{message}");
    assert!(!dir.path().join("b").join("ncu.pem").exists(), "no certificate for a reused token");

    let (code, message) =
        refused(hds_client::enroll(&hds, &ca, "tenr_unknown", &dir.path().join("c"), None, None).await);
    assert_eq!(code, ErrorCode::UnknownToken);
    assert!(message.contains("unknown"), "{message}");

    let expired = world.token().await?;
    let db = world.stack.pg.pool().await?;
    sqlx::query("UPDATE enrollments SET expires_at = now() - interval '1 minute' WHERE used_at IS NULL")
        .execute(&db)
        .await?;
    let (code, message) = refused(hds_client::enroll(&hds, &ca, &expired, &dir.path().join("d"), None, None).await);
    assert_eq!(code, ErrorCode::TokenExpired);
    assert!(message.contains("expired"), "{message}");

    let again = hds_client::enroll(&hds, &ca, &token, &dir.path().join("a"), None, None).await;
    assert!(matches!(again, Err(NcuError::AlreadyEnrolled(_))), "an existing identity is not overwritten");
    Ok(())
}

#[tokio::test]
async fn no_active_server_is_a_clear_error_after_retrying() -> Result<()> {
    let world = World::new().await?;
    let dir = tempfile::tempdir()?;
    world.enroll(dir.path()).await??;
    let identity = Identity::load(dir.path())?;
    world.fleet(&[("only", "127.0.0.1:7001", 100, 100, "active", 0)]).await?;
    let started = std::time::Instant::now();
    let (code, message) = refused(hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await);
    assert_eq!(code, ErrorCode::NoServer);
    assert!(message.contains("no active heartbeat server"), "{message}");
    assert!(started.elapsed() >= Duration::from_millis(200), "it retried before giving up");
    Ok(())
}

#[tokio::test]
async fn two_hds_instances_answer_alike_and_ncu_tries_them_in_turn() -> Result<()> {
    let world = World::new().await?;
    let second = HdsServer::start(&world.stack.pg.url(), &world.pki, "").await?;
    let dir = tempfile::tempdir()?;
    world.enroll(dir.path()).await??;
    let identity = Identity::load(dir.path())?;
    world
        .fleet(&[
            ("a", "127.0.0.1:7001", 100, 10, "active", 0),
            ("b", "127.0.0.2:7001", 100, 12, "active", 0),
            ("c", "127.0.0.3:7001", 100, 14, "active", 0),
        ])
        .await?;
    let one = hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await?;
    let two = hds_client::assign(&[second.address()], &identity, &[], PATIENCE).await?;
    assert_eq!(one, two);
    assert_ne!(Some(&one.primary.name), one.backup.as_ref().map(|b| &b.name));

    // The first address is dead: the NCU moves on to the next.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let via_second = hds_client::assign(&[dead, second.address()], &identity, &[], Duration::from_secs(30)).await?;
    assert_eq!(via_second, one);
    second.stop().await?;
    Ok(())
}

#[tokio::test]
async fn certificates_not_from_the_ca_or_expired_are_refused_at_the_handshake() -> Result<()> {
    let world = World::new().await?;
    world.fleet(&[("a", "127.0.0.1:7001", 100, 10, "active", 0)]).await?;
    let hds = [world.hds.address()];

    let foreign_ca = pki::Ca::generate("someone else", Duration::from_secs(3600))?;
    let foreign = foreign_ca.issue_client_between(
        "intruder",
        time::OffsetDateTime::now_utc() - time::Duration::hours(1),
        time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    )?;
    let forged = Identity { ca_pem: world.pki.ca_pem(), key_pem: foreign.key_pem, cert_pem: foreign.cert_pem };
    let result = hds_client::assign(&hds, &forged, &[], PATIENCE).await;
    assert!(matches!(result, Err(NcuError::Hds(ClientError::Handshake { .. }))), "{result:?}");
    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("TLS with hds") && message.contains("certificate"), "{message}");

    let old = world.pki.ca.issue_client_between(
        "expired",
        time::OffsetDateTime::now_utc() - time::Duration::days(30),
        time::OffsetDateTime::now_utc() - time::Duration::days(1),
    )?;
    let expired = Identity { ca_pem: world.pki.ca_pem(), key_pem: old.key_pem, cert_pem: old.cert_pem };
    let result = hds_client::assign(&hds, &expired, &[], PATIENCE).await;
    assert!(matches!(result, Err(NcuError::Hds(ClientError::Handshake { .. }))), "{result:?}");

    // A server certificate from another CA is refused by the NCU.
    let dir = tempfile::tempdir()?;
    let token = world.token().await?;
    let result = hds_client::enroll(&hds, foreign_ca.cert_pem(), &token, dir.path(), None, None).await;
    assert!(matches!(result, Err(NcuError::Hds(ClientError::Handshake { .. }))), "{result:?}");

    // The server is still up for a good NCU, and the token was not used up by the failed handshake.
    hds_client::enroll(&hds, &world.pki.ca_pem(), &token, dir.path(), None, None).await?;
    let identity = Identity::load(dir.path())?;
    assert_eq!(hds_client::assign(&hds, &identity, &[], PATIENCE).await?.primary.name, "a");
    Ok(())
}

#[tokio::test]
async fn bad_frames_wrong_alpn_and_missing_certificates_get_clear_refusals() -> Result<()> {
    let world = World::new().await?;
    let ca = world.pki.ca_pem();
    let addr = world.hds.addr;

    let decode = |bytes: Vec<u8>| proto::decode::<Response>(&bytes);
    let garbage = decode(raw_exchange(addr, &ca, None, proto::ALPN, b"\x00\x00\x00\x05hello").await?)?;
    assert!(matches!(garbage, Response::Error { code: ErrorCode::Malformed, .. }), "{garbage:?}");

    let huge = vec![b'x'; proto::MAX_FRAME + 100];
    let too_large = decode(raw_exchange(addr, &ca, None, proto::ALPN, &huge).await?)?;
    assert!(matches!(too_large, Response::Error { code: ErrorCode::TooLarge, .. }), "{too_large:?}");

    let v9 = br#"{"version":9,"body":{"type":"assign"}}"#;
    let mut frame = u32::try_from(v9.len())?.to_be_bytes().to_vec();
    frame.extend_from_slice(v9);
    let version = decode(raw_exchange(addr, &ca, None, proto::ALPN, &frame).await?)?;
    let Response::Error { code: ErrorCode::UnsupportedVersion, message } = version else {
        panic!("expected UnsupportedVersion, got {version:?}");
    };
    assert!(message.contains("version 9"), "{message}");

    let assign = proto::encode(&Request::Assign { failed: vec![] });
    let no_cert = decode(raw_exchange(addr, &ca, None, proto::ALPN, &assign).await?)?;
    assert!(matches!(no_cert, Response::Error { code: ErrorCode::CertificateRequired, .. }), "{no_cert:?}");

    let wrong_alpn = raw_exchange(addr, &ca, None, b"h3", &assign).await;
    assert!(wrong_alpn.is_err(), "a wrong ALPN is refused at the handshake");

    // Still serving.
    let dir = tempfile::tempdir()?;
    world.enroll(dir.path()).await??;
    Ok(())
}

#[tokio::test]
async fn a_certificate_for_a_deleted_domain_is_refused() -> Result<()> {
    let world = World::new().await?;
    world.fleet(&[("a", "127.0.0.1:7001", 100, 10, "active", 0)]).await?;
    let dir = tempfile::tempdir()?;
    world.enroll(dir.path()).await??;
    let identity = Identity::load(dir.path())?;
    hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await?;
    let (status, _) =
        world.stack.api.call(Method::DELETE, "/v1/domains/site.tether.test", Some(&world.acme), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (code, message) = refused(hds_client::assign(&[world.hds.address()], &identity, &[], PATIENCE).await);
    assert_eq!(code, ErrorCode::UnknownCertificate);
    assert!(message.contains("domain deleted"), "{message}");
    Ok(())
}

#[tokio::test]
async fn hds_publishes_itself_as_srv_through_our_dns() -> Result<()> {
    let world = World::new().await?;
    let published = HdsServer::start(
        &world.stack.pg.url(),
        &world.pki,
        "[publish]\nzone = 'tether.test'\naddress = '127.0.0.1:4433'\n",
    )
    .await?;
    let name = "_tether-hds._udp.tether.test.";
    let srv = eventually(Duration::from_secs(10), "the hds SRV record", || async {
        let r = ask(world.stack.dns.dns_addr, name, RecordType::SRV, Transport::Udp).await.ok()?;
        r.answers.iter().find_map(|rec| match &rec.data {
            RData::SRV(srv) => Some((srv.port, srv.target.to_string())),
            _ => None,
        })
    })
    .await?;
    assert_eq!(srv, (4433, "ip-127-0-0-1.tether.test.".to_owned()));
    published.stop().await?;
    eventually(Duration::from_secs(10), "the SRV record to be withdrawn", || async {
        let r = ask(world.stack.dns.dns_addr, name, RecordType::SRV, Transport::Udp).await.ok()?;
        r.answers.is_empty().then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_lost_enrollment_reply_is_repeated_for_the_same_csr_only() -> Result<()> {
    let world = World::new().await?;
    let token = world.token().await?;
    let tls = std::sync::Arc::new(pki::client_tls(&world.pki.ca_pem(), None, proto::ALPN)?);
    let csr = pki::new_csr("tether ncu")?;
    let enroll = |csr: &str| Request::Enroll { token: token.clone(), csr: csr.to_owned(), serial: None, mac: None };
    let address = world.hds.address();
    let first = tether_pki::hds_client::request_one(&address, tls.clone(), &enroll(&csr.csr_pem)).await?;
    let Response::Enrolled { certificate, .. } = &first else { anyhow::bail!("not enrolled: {first:?}") };
    // The reply was lost: the NCU asks again with the same CSR and gets the same certificate, and one NCU exists.
    let again = tether_pki::hds_client::request_one(&address, tls.clone(), &enroll(&csr.csr_pem)).await?;
    assert_eq!(again, first);
    let db = world.stack.pg.pool().await?;
    let ncus: i64 = sqlx::query_scalar("SELECT count(*) FROM ncus").fetch_one(&db).await?;
    assert_eq!(ncus, 1);
    // Anyone else with the token (another key) gets nothing.
    let other = pki::new_csr("tether ncu")?;
    let answer = tether_pki::hds_client::request_one(&address, tls.clone(), &enroll(&other.csr_pem)).await?;
    assert!(matches!(answer, Response::Error { code: ErrorCode::TokenUsed, .. }), "{answer:?}");
    // Past the token's lifetime the same CSR gets nothing either.
    sqlx::query("UPDATE enrollments SET expires_at = now() - interval '1 second'").execute(&db).await?;
    let answer = tether_pki::hds_client::request_one(&address, tls, &enroll(&csr.csr_pem)).await?;
    assert!(matches!(answer, Response::Error { code: ErrorCode::TokenUsed, .. }), "{answer:?}");
    assert!(certificate.contains("BEGIN CERTIFICATE"));
    Ok(())
}

#[tokio::test]
async fn ncu_renew_replaces_the_certificate_and_the_old_one_ends_at_the_new_ones_first_use() -> Result<()> {
    let world = World::new().await?;
    let dir = tempfile::tempdir()?;
    let dir = dir.path().join("id");
    world.enroll(&dir).await??;
    let old = Identity::load(&dir)?;
    let hds = world.hds.address();

    // `ncu renew`, the binary as an operator runs it.
    let output = tokio::process::Command::new(tether_tests::system::binaries()?.join("ncu"))
        .args(["renew", "--hds", &hds, "--dir"])
        .arg(&dir)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("certificate renewed, valid until"), "{stderr}");
    let new = Identity::load(&dir)?;
    assert_ne!(new.cert_pem, old.cert_pem);
    assert_ne!(new.key_pem, old.key_pem);
    assert_eq!(std::fs::metadata(dir.join("ncu.key"))?.permissions().mode() & 0o777, 0o600);
    assert!(!dir.join("ncu.pem.new").exists() && !dir.join("ncu.key.new").exists());

    // Until the new certificate is used, the old one still works (a renewal whose reply was lost harms nothing).
    world.fleet(&[("a", "127.0.0.1:7001", 100, 10, "active", 0)]).await?;
    hds_client::assign(std::slice::from_ref(&hds), &old, &[], PATIENCE).await?;
    // The new one works, and from then on the old one is refused.
    hds_client::assign(std::slice::from_ref(&hds), &new, &[], PATIENCE).await?;
    let (code, _) = refused(hds_client::assign(std::slice::from_ref(&hds), &old, &[], PATIENCE).await);
    assert_eq!(code, ErrorCode::UnknownCertificate);

    // The same CSR twice (a lost reply) gets the same certificate; renewal needs a certificate.
    let tls = std::sync::Arc::new(pki::client_tls(&new.ca_pem, Some((&new.cert_pem, &new.key_pem)), proto::ALPN)?);
    let csr = pki::new_csr("tether ncu")?;
    let renew = Request::Renew { csr: csr.csr_pem };
    let first = tether_pki::hds_client::request_one(&hds, tls.clone(), &renew).await?;
    assert!(matches!(first, Response::Renewed { .. }), "{first:?}");
    assert_eq!(tether_pki::hds_client::request_one(&hds, tls, &renew).await?, first);
    let anonymous = std::sync::Arc::new(pki::client_tls(&new.ca_pem, None, proto::ALPN)?);
    let answer = tether_pki::hds_client::request_one(&hds, anonymous, &renew).await?;
    assert!(matches!(answer, Response::Error { code: ErrorCode::CertificateRequired, .. }), "{answer:?}");
    Ok(())
}

#[tokio::test]
async fn a_request_that_never_completes_is_answered_with_an_error_after_the_deadline() -> Result<()> {
    let world = World::new().await?;
    let tls = pki::client_tls(&world.pki.ca_pem(), None, proto::ALPN)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let address: std::net::SocketAddr = world.hds.address().parse()?;
    let connection =
        endpoint.connect_with(quinn::ClientConfig::new(std::sync::Arc::new(crypto)), address, "127.0.0.1")?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    // Part of a request, never finished: the stream is not held forever.
    send.write_all(&40_u32.to_be_bytes()).await?;
    send.write_all(b"{\"version\":1,").await?;
    let answer = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(proto::MAX_FRAME + 4))
        .await
        .map_err(|_| anyhow::anyhow!("no answer to an incomplete request"))??;
    let answer: Response = proto::decode(&answer)?;
    assert!(
        matches!(&answer, Response::Error { code: ErrorCode::Malformed, message } if message.contains("incomplete")),
        "{answer:?}"
    );
    Ok(())
}
