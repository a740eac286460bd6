//! Tenant isolation: what a subscriber can never do to the operator or to another tenant, each refusal a clear 4xx.

use std::net::SocketAddr;

use anyhow::Result;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tether_tests::{
    Postgres,
    stack::{Api, DnsServer, OPERATOR_TOKEN, Stack},
};

use crate::forwarder::common::{Setup, Site, connect, ip};

fn message(body: &Value) -> String {
    body["error"]["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn no_subscriber_address_points_into_private_space_or_at_the_operator() -> Result<()> {
    let pg = Postgres::start().await?;
    let dns = DnsServer::start_with(&pg.url(), "operator_addresses = ['198.18.0.53/32']").await?;
    let stack = Stack { api: Api::new(dns.api_addr), pg, dns };
    stack.zone("tether.test").await?;
    let acme = stack.subscriber("acme").await?;
    stack.domain(&acme, json!({ "name": "t.tether.test" })).await?;
    let path = "/v1/domains/t.tether.test/addresses";
    for (ip, rule) in [
        ("10.0.0.1", "10.0.0.0/8"),
        ("172.16.5.5", "172.16.0.0/12"),
        ("192.168.1.1", "192.168.0.0/16"),
        ("100.64.0.1", "100.64.0.0/10"),
        ("169.254.1.1", "169.254.0.0/16"),
        ("::ffff:10.0.0.1", "10.0.0.0/8"),
        ("fe80::1", "fe80::/10"),
        ("fc00::1", "fc00::/7"),
        ("203.0.113.5", "203.0.113.0/24"),
        ("2001:db8::1", "2001:db8::/32"),
        ("198.18.0.53", "operator's own"),
    ] {
        let (status, body) = stack.api.call(Method::POST, path, Some(&acme), Some(json!({ "ip": ip }))).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{ip}: {body}");
        assert!(message(&body).contains(rule), "{ip}: {body}");
    }
    let fallback = json!({ "name": "u.tether.test", "fallback_ip": "192.168.0.1" });
    let (status, body) = stack.api.call(Method::POST, "/v1/domains", Some(&acme), Some(fallback)).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(message(&body).starts_with("fallback_ip:"), "{body}");
    let (_, domain) = stack.api.call(Method::GET, "/v1/domains/t.tether.test", Some(&acme), None).await?;
    assert_eq!(domain["addresses"], json!([]), "nothing was stored");
    let (status, body) = stack.api.call(Method::POST, path, Some(&acme), Some(json!({ "ip": "198.18.1.1" }))).await?;
    assert_eq!(status, StatusCode::CREATED, "a range the operator opened: {body}");
    let (status, _) = stack.api.call(Method::GET, "/v1/zones", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_never_relays_to_space_its_operator_did_not_open() -> Result<()> {
    // Both sites are API-valid here (the test stack opens loopback); the forwarder opens only the first.
    let setup = Setup::new(53, "reserved", &[2, 3], json!({})).await?;
    let _a = Site::start(SocketAddr::new(ip(53, 2), setup.port), false).await?;
    let _b = Site::start(SocketAddr::new(ip(53, 3), setup.port), false).await?;
    let _forwarder = setup.forwarder("allowed_target_ranges = ['127.0.53.2/32']").await?;
    let to = setup.static_addr();
    let client = ip(53, 100);
    tether_tests::eventually(crate::forwarder::common::SOON, "the static listener", || async {
        connect(to, client).await.ok()
    })
    .await?;
    for _ in 0..6 {
        assert_eq!(connect(to, client).await?.1, "site 127.0.53.2", "127.0.53.3 is not open to the forwarder");
    }
    Ok(())
}

#[tokio::test]
async fn names_and_static_addresses_belong_to_their_owner() -> Result<()> {
    // Zone tether.test has ns1.tether.test (with glue) and ns2.example.net.
    let (stack, acme) = Stack::with_acme().await?;
    let globex = stack.subscriber("globex").await?;
    stack.domain(&acme, json!({ "name": "shop.tether.test", "static_ip": "198.18.9.9" })).await?;
    stack.domain(&acme, json!({ "name": "a.b.tether.test" })).await?;
    let refused = [
        (&acme, json!({ "name": "tether.test" }), StatusCode::FORBIDDEN, "the zone's apex"),
        (&acme, json!({ "name": "ns1.tether.test" }), StatusCode::CONFLICT, "a nameserver of the zone"),
        (
            &globex,
            json!({ "name": "x.shop.tether.test" }),
            StatusCode::FORBIDDEN,
            "under shop.tether.test, another subscriber's",
        ),
        (&globex, json!({ "name": "b.tether.test" }), StatusCode::FORBIDDEN, "a.b.tether.test below it"),
        (
            &acme,
            json!({ "name": "ip-198-18-0-7.shop.tether.test" }),
            StatusCode::CONFLICT,
            "reserved for the SRV targets",
        ),
        (
            &globex,
            json!({ "name": "c.tether.test", "static_ip": "198.18.9.9" }),
            StatusCode::CONFLICT,
            "already another domain's",
        ),
    ];
    for (token, body, status, says) in refused {
        let (got, answer) = stack.api.call(Method::POST, "/v1/domains", Some(token), Some(body.clone())).await?;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(message(&answer).contains(says), "{body}: {answer}");
    }
    let (_, mine) = stack.api.call(Method::GET, "/v1/domains", Some(&globex), None).await?;
    assert_eq!(mine, json!([]), "nothing was created for globex");
    // Service names of the operator's.
    stack.domain(&globex, json!({ "name": "g.tether.test" })).await?;
    let hds = json!([{ "service": "tether-hds", "transport": "udp", "ip": "198.18.3.3", "port": 4433 }]);
    let (status, body) =
        stack.api.call(Method::PUT, "/v1/domains/g.tether.test/services", Some(&globex), Some(hds)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // The operator cannot put another subscriber's domain under acme's apex either; once it is gone, it may.
    let apex = json!({ "name": "tether.test", "subscriber_id": 1 });
    let (status, body) = stack.api.call(Method::POST, "/v1/domains", Some(OPERATOR_TOKEN), Some(apex.clone())).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = stack.api.call(Method::DELETE, "/v1/domains/g.tether.test", Some(&globex), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = stack.api.call(Method::POST, "/v1/domains", Some(OPERATOR_TOKEN), Some(apex)).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // What is one's own stays possible.
    stack.domain(&acme, json!({ "name": "www.shop.tether.test" })).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tenant_input_has_a_bound() -> Result<()> {
    let pg = Postgres::start().await?;
    let limits = "max_addresses_per_domain = 3\nmax_domains_per_subscriber = 2\napi_requests_per_second = 20";
    let dns = DnsServer::start_with(&pg.url(), limits).await?;
    let stack = Stack { api: Api::new(dns.api_addr), pg, dns };
    stack.zone("tether.test").await?;
    let acme = stack.subscriber("acme").await?;
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(1100));
    stack.domain(&acme, json!({ "name": "one.tether.test" })).await?;
    stack.domain(&acme, json!({ "name": "two.tether.test" })).await?;
    let (status, body) =
        stack.api.call(Method::POST, "/v1/domains", Some(&acme), Some(json!({ "name": "three.tether.test" }))).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(message(&body).contains("at most 2 domains per subscriber"), "{body}");

    let addresses = "/v1/domains/one.tether.test/addresses";
    for i in 1..=3 {
        stack.address(&acme, "one.tether.test", json!({ "ip": format!("198.18.4.{i}") })).await?;
    }
    let (status, body) =
        stack.api.call(Method::POST, addresses, Some(&acme), Some(json!({ "ip": "198.18.4.9" }))).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(message(&body).contains("at most 3 addresses per domain"), "{body}");
    let enrollments = "/v1/domains/two.tether.test/enrollments";
    for _ in 0..3 {
        let (status, body) = stack.api.call(Method::POST, enrollments, Some(&acme), None).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = stack.api.call(Method::POST, enrollments, Some(&acme), None).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(message(&body).contains("at most 3 NCUs per domain"), "{body}");
    pause().await;

    // Bodies past 64 KiB are refused before they are parsed.
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(70 * 1024));
    let (status, _) = stack.api.raw(Method::POST, "/v1/domains", Some(&acme), Some("application/json"), &big).await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // A token asking more than 20 times a second gets 429, then gets through again.
    pause().await;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(stack.api.call(Method::GET, "/v1/domains", Some(&acme), None).await?.0);
    }
    let limited = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert!(limited >= 5 && statuses[..20].iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
    pause().await;
    assert_eq!(stack.api.call(Method::GET, "/v1/domains", Some(&acme), None).await?.0, StatusCode::OK);

    // A flood of bogus tokens gets 401s and never delays the view: a change is answered meanwhile.
    let api = stack.api.clone();
    let flood = tokio::spawn(async move {
        let mut refused = 0;
        for i in 0..400 {
            let (status, _) = api.call(Method::GET, "/v1/domains", Some(&format!("bogus-{i}")), None).await?;
            refused += usize::from(status == StatusCode::UNAUTHORIZED);
        }
        anyhow::Ok(refused)
    });
    let pool = stack.pg.pool().await?;
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.4.1'").execute(&pool).await?;
    tether_tests::eventually(std::time::Duration::from_secs(3), "the view to follow during the flood", || async {
        let answer = tether_tests::dns_client::ask(
            stack.dns.dns_addr,
            "one.tether.test.",
            hickory_proto::rr::RecordType::A,
            tether_tests::dns_client::Transport::Udp,
        )
        .await
        .ok()?;
        (tether_tests::dns_client::sorted(tether_tests::dns_client::addresses(&answer)) == ["198.18.4.2", "198.18.4.3"])
            .then_some(())
    })
    .await?;
    assert_eq!(flood.await??, 400, "every bogus token is refused");
    Ok(())
}

/// An HTTP server on `addr` answering every request with `reply`, counting requests.
async fn http_server(addr: &str, reply: String) -> Result<(u16, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let port = listener.local_addr()?.port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = [0_u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok((port, hits))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_checks_are_no_tool_against_others() -> Result<()> {
    let site = tether_tests::fleet::Site::start().await?;
    let (stack, token) = (&site.stack, &site.token);
    let path = "/v1/domains/site.tether.test/addresses";
    let refused = [
        (json!({ "kind": "http", "port": 80, "path": "@127.0.0.1/" }), "check.path"),
        (json!({ "kind": "http", "port": 80, "path": "/a b" }), "check.path"),
        (json!({ "kind": "tcp", "port": 25, "send": "HELO x\r\n" }), "no bytes of yours are sent there"),
        (json!({ "kind": "tcp", "port": 25, "expect": "x".repeat(300) }), "check.expect"),
    ];
    for (check, says) in refused {
        let body = json!({ "ip": "127.0.62.9", "check": check });
        let (status, answer) = stack.api.call(Method::POST, path, Some(token), Some(body)).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{check}: {answer}");
        assert!(message(&answer).contains(says), "{check}: {answer}");
    }

    // A redirect is an answer, never followed: the other host is never asked.
    let (elsewhere, asked) = http_server("127.0.62.2:0", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".into()).await?;
    let moved = format!("HTTP/1.1 302 Found\r\nLocation: http://127.0.62.2:{elsewhere}/\r\nContent-Length: 0\r\n\r\n");
    let (port, hits) = http_server("127.0.62.1:0", moved).await?;
    let check = json!({ "kind": "http", "port": port, "path": "/health?full=1", "status": 200 });
    stack.address(token, "site.tether.test", json!({ "ip": "127.0.62.1", "check": check })).await?;
    let pool = stack.pg.pool().await?;
    tether_tests::eventually(std::time::Duration::from_secs(15), "three checks", || async {
        (hits.load(std::sync::atomic::Ordering::Relaxed) >= 3).then_some(())
    })
    .await?;
    let state: String =
        sqlx::query_scalar("SELECT state::text FROM addresses WHERE ip = '127.0.62.1'").fetch_one(&pool).await?;
    assert_ne!(state, "live", "a 302 is not the 200 the check wants");
    assert_eq!(asked.load(std::sync::atomic::Ordering::Relaxed), 0, "the redirect was not followed");

    // At most 16 checked addresses per domain.
    for i in 2..=16 {
        let body = json!({ "ip": format!("127.0.63.{i}"), "check": { "kind": "tcp", "port": 9 } });
        let (status, answer) = stack.api.call(Method::POST, path, Some(token), Some(body)).await?;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let body = json!({ "ip": "127.0.63.99", "check": { "kind": "tcp", "port": 9 } });
    let (status, answer) = stack.api.call(Method::POST, path, Some(token), Some(body)).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(message(&answer).contains("at most 16 checked addresses"), "{answer}");
    site.stop().await
}

#[tokio::test]
async fn udp_answers_never_exceed_1232_bytes_whatever_the_edns_size() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "big.tether.test" })).await?;
    for i in 1..=60 {
        stack.address(&acme, "big.tether.test", json!({ "ip": format!("fd00::b:{i:x}") })).await?;
    }
    use tether_tests::dns_client::{Transport, ask};
    let tcp = tether_tests::eventually(std::time::Duration::from_secs(10), "all 60 over TCP", || async {
        let r = ask(stack.dns.dns_addr, "big.tether.test.", hickory_proto::rr::RecordType::AAAA, Transport::Tcp)
            .await
            .ok()?;
        (r.answers.len() == 60).then_some(r)
    })
    .await?;
    assert!(tcp.to_vec()?.len() > 1232, "the full answer is larger than 1232 bytes");
    let udp =
        ask(stack.dns.dns_addr, "big.tether.test.", hickory_proto::rr::RecordType::AAAA, Transport::UdpEdns(4096))
            .await?;
    assert!(udp.metadata.truncation, "truncated, for the client to retry over TCP");
    assert!(udp.to_vec()?.len() <= 1232, "{} bytes over UDP", udp.to_vec()?.len());
    Ok(())
}

#[tokio::test]
async fn quic_clients_prove_their_address_when_the_server_is_loaded() -> Result<()> {
    // Retry forced (as past 256 handshakes in flight): a real client still connects, one round trip later.
    let pki = tether_tests::hds_stack::Pki::new()?;
    let read = |name: &str| std::fs::read_to_string(pki.path(name));
    let tls = tether_pki::server_tls(&read("ca.pem")?, &read("hds.pem")?, &read("hds.key")?, b"tether-test/1", true)?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let server_addr = socket.local_addr()?;
    let endpoint = tether_pki::server_endpoint(socket, tls, 1, std::time::Duration::from_secs(5), None)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let serving = tokio::spawn({
        let (endpoint, shutdown) = (endpoint.clone(), shutdown.clone());
        async move {
            tether_service::accept::serve_with(
                &endpoint,
                &shutdown,
                tether_service::accept::AtShutdown::Abort,
                0,
                move |connection, remote| {
                    let accepted_tx = accepted_tx.clone();
                    async move {
                        let _ = accepted_tx.send((connection.is_ok(), remote));
                    }
                },
            )
            .await;
        }
    });
    let client = tether_pki::client_endpoint(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
    let config = tether_pki::client_tls(&pki.ca_pem(), None, b"tether-test/1")?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config)?;
    let connection = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.connect_with(quinn::ClientConfig::new(std::sync::Arc::new(crypto)), server_addr, "localhost")?,
    )
    .await??;
    let (ok, _) = tokio::time::timeout(std::time::Duration::from_secs(5), accepted.recv()).await?.expect("accepted");
    assert!(ok, "the handshake completed after the Retry");
    connection.close(0_u32.into(), b"done");
    shutdown.cancel();
    serving.await?;
    Ok(())
}

#[tokio::test]
async fn names_under_the_operators_own_records_are_free_for_subscribers() -> Result<()> {
    // hds publishes `_tether-hds._udp.<zone>` on a domain at the apex owned by the operator's own subscriber.
    let (stack, acme) = Stack::with_acme().await?;
    let pool = stack.pg.pool().await?;
    sqlx::query("INSERT INTO subscribers (name, token_hash) VALUES ('(operator)', '\\x00')").execute(&pool).await?;
    sqlx::query(
        "INSERT INTO domains (fqdn, zone_id, subscriber_id) SELECT 'tether.test.', z.id, s.id FROM zones z, subscribers s \
         WHERE z.origin = 'tether.test.' AND s.name = '(operator)'",
    )
    .execute(&pool)
    .await?;
    stack.domain(&acme, json!({ "name": "www.tether.test" })).await?;
    let body = json!({ "name": "ip-198-18-0-1.tether.test" });
    let (status, answer) = stack.api.call(Method::POST, "/v1/domains", Some(&acme), Some(body)).await?;
    assert_eq!(status, StatusCode::CONFLICT, "a generated SRV target of the operator's: {answer}");
    Ok(())
}

#[tokio::test]
async fn another_subscriber_can_change_nothing_of_a_tenants() -> Result<()> {
    let (stack, alice) = Stack::with_acme().await?;
    let bob = stack.subscriber("bob").await?;
    let a = "a.tether.test";
    stack.domain(&alice, json!({ "name": a, "static_ip": "198.18.20.1" })).await?;
    stack.address(&alice, a, json!({ "ip": "198.18.20.2" })).await?;
    stack.address(&alice, a, json!({ "ip": "198.18.20.3", "priority": 1 })).await?;
    let (_, credential) =
        stack.api.call(Method::POST, &format!("/v1/domains/{a}/dyndns-credentials"), Some(&alice), None).await?;
    let user = credential["username"].as_str().unwrap_or_default().to_owned();
    let (_, key) = stack.api.call(Method::POST, &format!("/v1/domains/{a}/update-keys"), Some(&alice), None).await?;
    let key = key["name"].as_str().unwrap_or_default().to_owned();
    let migration = json!({ "from": "198.18.20.2", "to": "198.18.20.3", "ports": [80], "hold": 600 });
    let (status, created) = stack
        .api
        .call(Method::POST, &format!("/v1/domains/{a}/migrations"), Some(&alice), Some(migration.clone()))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_i64().unwrap_or_default();
    let snapshot = || async {
        let mut all = Vec::new();
        for path in ["", "/txt", "/migrations", "/dyndns-credentials", "/update-keys"] {
            all.push(stack.api.call(Method::GET, &format!("/v1/domains/{a}{path}"), Some(&alice), None).await?.1);
        }
        anyhow::Ok(all)
    };
    let before = snapshot().await?;

    let d = format!("/v1/domains/{a}");
    let attempts: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, d.clone(), None),
        (Method::DELETE, d.clone(), None),
        (Method::POST, format!("{d}/addresses"), Some(json!({ "ip": "198.18.20.9" }))),
        (Method::DELETE, format!("{d}/addresses/198.18.20.2"), None),
        (Method::PUT, format!("{d}/services"), Some(json!([]))),
        (Method::PUT, format!("{d}/forwarding"), Some(json!({ "ports": [22] }))),
        (Method::GET, format!("{d}/txt"), None),
        (Method::PUT, format!("{d}/txt"), Some(json!([{ "value": "bob was here" }]))),
        (Method::POST, format!("{d}/enrollments"), None),
        (Method::GET, format!("{d}/dyndns-credentials"), None),
        (Method::POST, format!("{d}/dyndns-credentials"), None),
        (Method::DELETE, format!("{d}/dyndns-credentials/{user}"), None),
        (Method::GET, format!("{d}/update-keys"), None),
        (Method::POST, format!("{d}/update-keys"), None),
        (Method::DELETE, format!("{d}/update-keys/{key}"), None),
        (Method::GET, format!("{d}/migrations"), None),
        (Method::POST, format!("{d}/migrations"), Some(migration)),
        (Method::GET, format!("{d}/migrations/{id}"), None),
        (Method::DELETE, format!("{d}/migrations/{id}"), None),
        (Method::GET, format!("{d}/events"), None),
        (Method::GET, format!("{d}/answer"), None),
        // The operator's.
        (Method::POST, "/v1/subscribers".into(), Some(json!({ "name": "mallory" }))),
        (Method::POST, "/v1/zones".into(), Some(json!({ "origin": "evil.test", "nameservers": ["ns.evil.test"] }))),
        (Method::GET, "/v1/zones/tether.test/transfer".into(), None),
        (Method::PUT, "/v1/zones/tether.test/transfer".into(), Some(json!({}))),
        (Method::GET, "/v1/heartbeat-servers".into(), None),
        (Method::POST, "/v1/heartbeat-servers/hbs-a/drain".into(), None),
        (Method::GET, "/v1/events".into(), None),
        // Alice's names and the operator's.
        (Method::POST, "/v1/domains".into(), Some(json!({ "name": "x.a.tether.test" }))),
        (Method::POST, "/v1/domains".into(), Some(json!({ "name": "tether.test" }))),
        (Method::POST, "/v1/domains".into(), Some(json!({ "name": "ns1.tether.test" }))),
        (Method::POST, "/v1/domains".into(), Some(json!({ "name": "b.tether.test", "static_ip": "198.18.20.1" }))),
        (Method::POST, "/v1/domains".into(), Some(json!({ "name": "c.tether.test", "subscriber_id": 1 }))),
    ];
    for (method, path, body) in attempts {
        let (status, answer) = stack.api.call(method.clone(), &path, Some(&bob), body).await?;
        assert!(
            [StatusCode::FORBIDDEN, StatusCode::NOT_FOUND, StatusCode::CONFLICT].contains(&status),
            "bob: {method} {path} got {status}: {answer}"
        );
    }
    assert_eq!(snapshot().await?, before, "nothing of alice's changed");
    let (_, mine) = stack.api.call(Method::GET, "/v1/domains", Some(&bob), None).await?;
    assert_eq!(mine, json!([]), "bob has nothing and sees nothing of alice's");
    Ok(())
}
