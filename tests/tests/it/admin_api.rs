//! The admin API: every route's happy path and every error class, with real HTTP and real Postgres.

use anyhow::Result;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tether_tests::stack::{OPERATOR_TOKEN, Stack};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

#[tokio::test]
async fn tokens_decide_who_may_do_what() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    let api = &stack.api;
    let (status, body) = api.call(Method::GET, "/v1/domains", None, None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(code(&body), "unauthorized");
    let (status, _) = api.call(Method::GET, "/v1/domains", Some("tsub_forged"), None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.raw(Method::GET, "/v1/domains", Some("  "), None, "").await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Subscribers may not do the operator's work.
    let (status, body) = api.call(Method::POST, "/v1/subscribers", Some(&acme), Some(json!({ "name": "x" }))).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let zone = json!({ "origin": "evil.test", "nameservers": ["ns.evil.test"] });
    let (status, _) = api.call(Method::POST, "/v1/zones", Some(&acme), Some(zone)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Any authenticated caller may list zones.
    let (status, zones) = api.call(Method::GET, "/v1/zones", Some(&acme), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(zones[0]["origin"], "tether.test");
    Ok(())
}

#[tokio::test]
async fn subscribers_see_and_touch_only_their_own_domains() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    let other = stack.subscriber("globex").await?;
    stack.domain(&acme, json!({ "name": "acme.tether.test" })).await?;
    stack.domain(&other, json!({ "name": "globex.tether.test" })).await?;
    let api = &stack.api;

    let (_, mine) = api.call(Method::GET, "/v1/domains", Some(&acme), None).await?;
    let names: Vec<&str> = mine.as_array().into_iter().flatten().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, ["acme.tether.test"]);
    let (_, all) = api.call(Method::GET, "/v1/domains", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(all.as_array().map(Vec::len), Some(2));

    let theirs = "/v1/domains/globex.tether.test";
    for (method, path, body) in [
        (Method::GET, theirs.to_owned(), None),
        (Method::DELETE, theirs.to_owned(), None),
        (Method::POST, format!("{theirs}/addresses"), Some(json!({ "ip": "198.18.1.1" }))),
        (Method::DELETE, format!("{theirs}/addresses/198.18.1.1"), None),
        (Method::PUT, format!("{theirs}/services"), Some(json!([]))),
        (Method::POST, format!("{theirs}/enrollments"), None),
    ] {
        let (status, body) = api.call(method.clone(), &path, Some(&acme), body).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
        assert_eq!(code(&body), "forbidden");
    }
    // Creating a domain on someone else's behalf is refused too.
    let body = json!({ "name": "sneaky.tether.test", "subscriber_id": 999 });
    let (status, _) = api.call(Method::POST, "/v1/domains", Some(&acme), Some(body)).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The operator may act on any domain.
    let (status, _) = api.call(Method::GET, theirs, Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_4xx_with_a_reason() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "dup.tether.test" })).await?;
    let api = &stack.api;
    let post = |path: &'static str, body: Value| {
        let acme = acme.clone();
        async move { api.call(Method::POST, path, Some(&acme), Some(body)).await }
    };

    type Case<'a> = (&'a str, (StatusCode, Value), StatusCode, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown field",
            post("/v1/domains", json!({ "name": "a.tether.test", "colour": 1 })).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "colour",
        ),
        (
            "invalid name",
            post("/v1/domains", json!({ "name": "bad_name.tether.test" })).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "bad_name",
        ),
        (
            "outside zones",
            post("/v1/domains", json!({ "name": "www.example.org" })).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "outside_zones",
            "example.org",
        ),
        (
            "duplicate",
            post("/v1/domains", json!({ "name": "DUP.tether.test." })).await?,
            StatusCode::CONFLICT,
            "conflict",
            "dup.tether.test",
        ),
        (
            "bad ip",
            post("/v1/domains", json!({ "name": "b.tether.test", "static_ip": "300.1.1.1" })).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "static_ip",
        ),
        (
            "unusable ip",
            post("/v1/domains", json!({ "name": "b.tether.test", "fallback_ip": "0.0.0.0" })).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "fallback_ip",
        ),
        (
            "ttl too large",
            post("/v1/domains", json!({ "name": "b.tether.test", "ttl": 999999 })).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "ttl",
        ),
        (
            "wrong type",
            post("/v1/domains", json!({ "name": 5 })).await?,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "name",
        ),
        ("missing field", post("/v1/domains", json!({})).await?, StatusCode::UNPROCESSABLE_ENTITY, "invalid", "name"),
    ];
    for (what, (status, body), want_status, want_code, mention) in cases {
        assert_eq!(status, want_status, "{what}: {body}");
        assert_eq!(code(&body), want_code, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{what}: message {message:?} should mention {mention:?}");
    }

    let (status, body) =
        api.raw(Method::POST, "/v1/domains", Some(&acme), Some("application/json"), "{\"name\": ").await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(code(&body), "malformed_json");
    let (status, body) = api.raw(Method::POST, "/v1/domains", Some(&acme), None, "{}").await?;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");

    let addresses = "/v1/domains/dup.tether.test/addresses";
    let (status, _) = api.call(Method::POST, addresses, Some(&acme), Some(json!({ "ip": "198.18.1.1" }))).await?;
    assert_eq!(status, StatusCode::CREATED);
    for (body, want, mention) in [
        (json!({ "ip": "198.18.1.1" }), StatusCode::CONFLICT, "198.18.1.1"),
        (json!({ "ip": "224.0.0.1" }), StatusCode::UNPROCESSABLE_ENTITY, "ip"),
        (json!({ "ip": "198.18.1.2", "weight": 0 }), StatusCode::UNPROCESSABLE_ENTITY, "weight"),
        (json!({ "ip": "198.18.1.2", "priority": -1 }), StatusCode::UNPROCESSABLE_ENTITY, "priority"),
        (json!({ "ip": "198.18.1.2", "check": { "kind": "ping" } }), StatusCode::UNPROCESSABLE_ENTITY, "ping"),
    ] {
        let (status, resp) = api.call(Method::POST, addresses, Some(&acme), Some(body.clone())).await?;
        assert_eq!(status, want, "{body}: {resp}");
        let message = resp["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{body}: {message}");
    }

    let (status, body) = api.call(Method::GET, "/v1/domains/nope.tether.test", Some(&acme), None).await?;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = api.call(Method::GET, "/v1/domains/not..valid", Some(&acme), None).await?;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "bad_path"));
    let (status, body) =
        api.call(Method::DELETE, "/v1/domains/dup.tether.test/addresses/not-an-ip", Some(&acme), None).await?;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "bad_path"), "{body}");
    let (status, _) =
        api.call(Method::DELETE, "/v1/domains/dup.tether.test/addresses/198.18.9.9", Some(&acme), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api.call(Method::GET, "/v1/nothing-here", Some(&acme), None).await?;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, _) = api.call(Method::PATCH, "/v1/domains", Some(&acme), None).await?;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    let services = "/v1/domains/dup.tether.test/services";
    for (body, mention) in [
        (json!([{ "service": "http", "transport": "quic", "ip": "198.18.1.1", "port": 1 }]), "transport"),
        (json!([{ "service": "http", "transport": "tcp", "port": 1 }]), "exactly one"),
        (json!([{ "service": "http", "transport": "tcp", "ip": "198.18.1.1", "port": 70000 }]), "port"),
        (json!({ "service": "http" }), "sequence"),
    ] {
        let (status, resp) = api.call(Method::PUT, services, Some(&acme), Some(body.clone())).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {resp}");
        let message = resp["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{body}: {message}");
    }

    // Operator-side errors.
    let op = |path: &'static str, body: Value| async move {
        api.call(Method::POST, path, Some(OPERATOR_TOKEN), Some(body)).await
    };
    let (status, body) = op("/v1/subscribers", json!({ "name": "acme" })).await?;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");
    let (status, body) = op("/v1/zones", json!({ "origin": "tether.test", "nameservers": ["ns.x.net"] })).await?;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");
    let (status, body) = op("/v1/zones", json!({ "origin": "z.test", "nameservers": [] })).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let glue_outside =
        json!({ "origin": "z.test", "nameservers": [{ "name": "ns.other.net", "ips": ["198.18.0.1"] }] });
    let (status, body) = op("/v1/zones", glue_outside).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // A zone that would capture an existing domain of another zone.
    let (status, body) = op("/v1/zones", json!({ "origin": "dup.tether.test", "nameservers": ["ns.x.net"] })).await?;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "conflict"), "{body}");
    let (status, body) = op("/v1/domains", json!({ "name": "op.tether.test" })).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("subscriber_id"));

    // Nothing above leaked database text.
    let (status, body) = op("/v1/subscribers", json!({ "name": "acme" })).await?;
    let text = body.to_string();
    assert!(!text.contains("violates") && !text.contains("SQL"), "{status}: {text}");
    Ok(())
}

#[tokio::test]
async fn domain_detail_shows_addresses_services_and_enrollment_tokens_are_stored_hashed() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    let created = stack
        .domain(
            &acme,
            json!({ "name": "Shop.Tether.Test", "static_ip": "198.18.100.1", "fallback_ip": "198.18.100.2" }),
        )
        .await?;
    assert_eq!(created["name"], "shop.tether.test");
    assert_eq!(created["zone"], "tether.test");
    assert_eq!(created["ttl"], 1);
    stack
        .address(
            &acme,
            "shop.tether.test",
            json!({ "ip": "198.18.1.1", "priority": 5, "weight": 2,
            "check": { "kind": "http", "port": 80, "path": "/health" } }),
        )
        .await?;
    let (status, detail) = stack.api.call(Method::GET, "/v1/domains/shop.tether.test.", Some(&acme), None).await?;
    assert_eq!(status, StatusCode::OK, "{detail}");
    assert_eq!(detail["static_ip"], "198.18.100.1");
    let address = &detail["addresses"][0];
    assert_eq!(address["ip"], "198.18.1.1");
    assert_eq!(address["state"], "pending", "an address with a check waits for its first passing check");
    assert_eq!(address["source"], "static");
    assert_eq!(address["priority"], 5);
    assert_eq!(address["check"]["kind"], "http");
    assert_eq!(detail["services"], json!([]));

    let (status, enrollment) =
        stack.api.call(Method::POST, "/v1/domains/shop.tether.test/enrollments", Some(&acme), None).await?;
    assert_eq!(status, StatusCode::CREATED, "{enrollment}");
    let token = enrollment["token"].as_str().unwrap_or_default().to_owned();
    assert!(token.starts_with("tenr_") && token.len() > 40, "{token}");
    assert!(enrollment["expires_at"].is_string());
    let db = stack.pg.pool().await?;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT token_hash FROM enrollments").fetch_one(&db).await?;
    assert_eq!(stored, dns::api::token_hash(&token).to_vec(), "stored as a SHA-256 hash");
    let plain: i64 = sqlx::query_scalar("SELECT count(*) FROM subscribers WHERE token_hash = convert_to($1, 'UTF8')")
        .bind(&acme)
        .fetch_one(&db)
        .await?;
    assert_eq!(plain, 0, "subscriber tokens are not stored in clear");
    Ok(())
}

#[tokio::test]
async fn health_metrics_and_openapi() -> Result<()> {
    let (stack, _acme) = Stack::with_acme().await?;
    let (status, health) = stack.api.call(Method::GET, "/healthz", None, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"], "connected");

    tether_tests::dns_client::ask(
        stack.dns.dns_addr,
        "tether.test.",
        hickory_proto::rr::RecordType::SOA,
        tether_tests::dns_client::Transport::Udp,
    )
    .await?;
    let (status, metrics) = stack.api.call(Method::GET, "/metrics", None, None).await?;
    assert_eq!(status, StatusCode::OK);
    let text = metrics.as_str().unwrap_or_default();
    assert!(text.contains("tether_dns_responses_total{rcode=\"noerror\"}"), "{text}");
    assert!(text.contains("tether_dns_view_zones 1"), "{text}");

    let (status, spec) = stack.api.call(Method::GET, "/v1/openapi.json", None, None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spec["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true), "{spec}");
    for (path, method) in [
        ("/v1/subscribers", "post"),
        ("/v1/zones", "post"),
        ("/v1/zones", "get"),
        ("/v1/domains", "post"),
        ("/v1/domains", "get"),
        ("/v1/domains/{name}", "get"),
        ("/v1/domains/{name}", "delete"),
        ("/v1/domains/{name}/addresses", "post"),
        ("/v1/domains/{name}/addresses/{ip}", "delete"),
        ("/v1/domains/{name}/services", "put"),
        ("/v1/domains/{name}/enrollments", "post"),
        ("/v1/domains/{name}/update-keys", "post"),
        ("/v1/domains/{name}/update-keys", "get"),
        ("/v1/domains/{name}/update-keys/{key}", "delete"),
        ("/v1/domains/{name}/txt", "get"),
        ("/v1/domains/{name}/txt", "put"),
        ("/v1/domains/{name}/dyndns-credentials", "post"),
        ("/v1/domains/{name}/dyndns-credentials", "get"),
        ("/v1/domains/{name}/dyndns-credentials/{username}", "delete"),
        ("/nic/update", "get"),
        ("/v1/zones/{origin}/transfer", "get"),
        ("/v1/zones/{origin}/transfer", "put"),
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/v1/heartbeat-servers", "get"),
        ("/v1/heartbeat-servers/{name}/drain", "post"),
        ("/v1/heartbeat-servers/{name}/activate", "post"),
        ("/v1/domains/{name}/migrations", "post"),
        ("/v1/domains/{name}/migrations", "get"),
        ("/v1/domains/{name}/migrations/{id}", "get"),
        ("/v1/domains/{name}/migrations/{id}", "delete"),
        ("/v1/domains/{name}/events", "get"),
        ("/v1/domains/{name}/answer", "get"),
        ("/v1/events", "get"),
        ("/v1/changes", "get"),
        ("/ui/", "get"),
    ] {
        assert!(spec["paths"][path][method].is_object(), "openapi lacks {method} {path}");
    }
    Ok(())
}

/// Found by schemathesis: a check on port 0 or with a status no HTTP server answers was stored.
#[tokio::test]
async fn checks_on_port_zero_or_with_no_http_status_are_refused() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "chk.tether.test" })).await?;
    let path = "/v1/domains/chk.tether.test/addresses";
    for (check, mention) in [
        (json!({ "kind": "tcp", "port": 0 }), "check.port"),
        (json!({ "kind": "http", "port": 0 }), "check.port"),
        (json!({ "kind": "http", "port": 80, "status": 0 }), "check.status"),
        (json!({ "kind": "http", "port": 80, "status": 600 }), "check.status"),
    ] {
        let body = json!({ "ip": "198.18.1.1", "check": check });
        let (status, answer) = stack.api.call(Method::POST, path, Some(&acme), Some(body)).await?;
        assert_eq!((status, code(&answer)), (StatusCode::UNPROCESSABLE_ENTITY, "invalid"), "{check}: {answer}");
        assert!(answer["error"]["message"].as_str().unwrap_or_default().contains(mention), "{check}: {answer}");
    }
    let body = json!({ "ip": "198.18.1.1", "check": { "kind": "http", "port": 80, "status": 204 } });
    let (status, answer) = stack.api.call(Method::POST, path, Some(&acme), Some(body)).await?;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    Ok(())
}

/// Found by schemathesis: `PUT .../services` answered targets with the trailing dot that every read leaves out.
#[tokio::test]
async fn replaced_services_show_targets_as_reads_do() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": "srv.tether.test" })).await?;
    let tuples = json!([{ "service": "sip", "transport": "udp", "target": "SIP.Example.NET.", "port": 5060 }]);
    let path = "/v1/domains/srv.tether.test/services";
    let (status, put) = stack.api.call(Method::PUT, path, Some(&acme), Some(tuples)).await?;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put[0]["target"], "sip.example.net", "{put}");
    let (_, domain) = stack.api.call(Method::GET, "/v1/domains/srv.tether.test", Some(&acme), None).await?;
    assert_eq!(domain["services"], put, "the write answers what a read shows");
    Ok(())
}

/// Found with schemathesis: a body past 64 KiB was a 413 with the code `bad_request` and axum's buffering text.
#[tokio::test]
async fn an_oversized_body_is_a_413_that_says_so() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(70 * 1024));
    let (status, body) =
        stack.api.raw(Method::POST, "/v1/domains", Some(&acme), Some("application/json"), &big).await?;
    assert_eq!((status, code(&body)), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"), "{body}");
    assert_eq!(body["error"]["message"], "the body is larger than 64 KiB");
    Ok(())
}
