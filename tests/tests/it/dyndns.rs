//! dyndns2 as the clients people run speak it: Debian's ddclient and inadyn update a domain through `GET
//! /nic/update`, and `dig` reads the change back; every refusal reaches a real client as its code.

use std::{net::SocketAddr, os::unix::fs::PermissionsExt, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, ensure};
use hickory_proto::rr::RecordType;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_tests::{
    dns_client::{Transport, addresses, ask, sorted},
    eventually,
    stack::Stack,
};

const WAIT: Duration = Duration::from_secs(10);

/// A stack with zone dd.test, a subscriber, its domain www.dd.test and a dyndns credential for it.
async fn setup() -> Result<(Stack, String, String, String)> {
    let stack = Stack::start().await?;
    stack.zone("dd.test").await?;
    let token = stack.subscriber("home").await?;
    stack.domain(&token, json!({ "name": "www.dd.test" })).await?;
    let (status, body) =
        stack.api.call(Method::POST, "/v1/domains/www.dd.test/dyndns-credentials", Some(&token), None).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let user = body["username"].as_str().context("username")?.to_owned();
    let password = body["password"].as_str().context("password")?.to_owned();
    Ok((stack, token, user, password))
}

/// Waits until `name` answers `rtype` with exactly `expected` (as a set).
async fn answers_become(stack: &Stack, name: &str, rtype: RecordType, expected: &[&str]) -> Result<()> {
    eventually(WAIT, &format!("{name} {rtype} to answer {expected:?}"), || async {
        let response = ask(stack.dns.dns_addr, name, rtype, Transport::Udp).await.ok()?;
        (sorted(addresses(&response)) == expected).then_some(())
    })
    .await
}

/// Runs `program` with `args` on the blocking pool (the servers share this test's runtime); stdout and stderr.
async fn run(program: &str, args: Vec<String>) -> Result<String> {
    let name = program.to_owned();
    let output = tokio::task::spawn_blocking(move || Command::new(&name).args(&args).output())
        .await?
        .with_context(|| format!("running {program} (scripts/install-deps installs it)"))?;
    Ok(format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)))
}

/// ddclient once, in the foreground, with `ip` as the address it reports for `host`.
async fn ddclient(dir: &Path, api: SocketAddr, user: &str, password: &str, host: &str, ip: &str) -> Result<String> {
    let config = dir.join("ddclient.conf");
    std::fs::write(
        &config,
        format!(
            "daemon=0\nssl=no\nprotocol=dyndns2\nserver={api}\nlogin={user}\npassword='{password}'\n\
             use=ip, ip={ip}\n{host}\n"
        ),
    )?;
    // ddclient refuses a configuration others can read (it holds the password).
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600))?;
    let args = ["-daemon=0", "-foreground", "-force", "-verbose", "-noquiet", "-file"]
        .into_iter()
        .map(str::to_owned)
        .chain([config.display().to_string(), "-cache".into(), dir.join("cache").display().to_string()])
        .collect();
    run("ddclient", args).await
}

#[tokio::test]
async fn ddclient_updates_a_domain_and_hears_each_refusal() -> Result<()> {
    let (stack, _token, user, password) = setup().await?;
    let dir = tempfile::tempdir()?;
    let api = stack.dns.api_addr;

    let output = ddclient(dir.path(), api, &user, &password, "www.dd.test", "198.18.5.5").await?;
    ensure!(output.contains("SUCCESS"), "ddclient reports success:\n{output}");
    answers_become(&stack, "www.dd.test.", RecordType::A, &["198.18.5.5"]).await?;

    let output = ddclient(dir.path(), api, &user, &password, "www.dd.test", "198.18.5.6").await?;
    ensure!(output.contains("SUCCESS"), "{output}");
    answers_become(&stack, "www.dd.test.", RecordType::A, &["198.18.5.6"]).await?;

    let output = ddclient(dir.path(), api, &user, "wrong-password", "www.dd.test", "198.18.5.7").await?;
    ensure!(output.contains("badauth"), "ddclient hears badauth:\n{output}");
    let output = ddclient(dir.path(), api, &user, &password, "other.dd.test", "198.18.5.7").await?;
    ensure!(output.contains("nohost"), "ddclient hears nohost:\n{output}");
    answers_become(&stack, "www.dd.test.", RecordType::A, &["198.18.5.6"]).await?;
    Ok(())
}

#[tokio::test]
async fn inadyn_updates_a_domain_through_a_custom_provider() -> Result<()> {
    let (stack, _token, user, password) = setup().await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("inadyn.conf");
    let write = |ip: &str, password: &str| {
        std::fs::write(
            &config,
            format!(
                "period = 60\ncustom tether {{\n  ssl = false\n  username = \"{user}\"\n  password = \"{password}\"\n  \
                 ddns-server = \"{api}\"\n  ddns-path = \"/nic/update?hostname=%h&myip=%i\"\n  \
                 checkip-command = \"/bin/echo {ip}\"\n  hostname = \"www.dd.test\"\n}}\n",
                api = stack.dns.api_addr
            ),
        )
    };
    let args = |dir: &Path, config: &Path| -> Vec<String> {
        vec![
            "--once".into(),
            "--force".into(),
            "--foreground".into(),
            "--no-pidfile".into(),
            "-l".into(),
            "debug".into(),
            format!("--cache-dir={}", dir.display()),
            "-f".into(),
            config.display().to_string(),
        ]
    };
    write("198.18.6.6", &password)?;
    let output = run("inadyn", args(dir.path(), &config)).await?;
    answers_become(&stack, "www.dd.test.", RecordType::A, &["198.18.6.6"]).await.with_context(|| output.clone())?;
    ensure!(output.contains("good"), "inadyn saw the server's answer:\n{output}");

    write("198.18.6.7", "wrong-password")?;
    let output = run("inadyn", args(dir.path(), &config)).await?;
    ensure!(output.contains("badauth"), "inadyn hears badauth:\n{output}");
    answers_become(&stack, "www.dd.test.", RecordType::A, &["198.18.6.6"]).await?;
    Ok(())
}

/// The protocol's codes, as raw requests.
#[tokio::test]
async fn every_dyndns_code_is_answered() -> Result<()> {
    let (stack, token, user, password) = setup().await?;
    let client = reqwest::Client::new();
    let base = format!("http://{}/nic/update", stack.dns.api_addr);
    let get = |query: String, auth: Option<(&str, &str)>, agent: Option<&str>| {
        let mut request = client.get(format!("{base}?{query}"));
        if let Some((u, p)) = auth {
            request = request.basic_auth(u, Some(p));
        }
        if let Some(agent) = agent {
            request = request.header("User-Agent", agent);
        }
        async move {
            let response = request.send().await?;
            let status = response.status();
            Ok::<_, anyhow::Error>((status, response.text().await?.trim().to_owned()))
        }
    };
    let me = Some((user.as_str(), password.as_str()));
    let ua = Some("tether-test/1.0");

    assert_eq!(get("hostname=www.dd.test&myip=198.18.7.1".into(), me, ua).await?.1, "good 198.18.7.1");
    assert_eq!(get("hostname=www.dd.test&myip=198.18.7.1".into(), me, ua).await?.1, "nochg 198.18.7.1");
    let both = get("hostname=www.dd.test&myip=198.18.7.2,fd00::7:2".into(), me, ua).await?.1;
    assert_eq!(both, "good 198.18.7.2,fd00::7:2");
    answers_become(&stack, "www.dd.test.", RecordType::AAAA, &["fd00::7:2"]).await?;
    answers_become(&stack, "www.dd.test.", RecordType::A, &["198.18.7.2"]).await?;
    // Without myip: the request's source address.
    assert_eq!(get("hostname=www.dd.test".into(), me, ua).await?.1, "good 127.0.0.1");
    // Several hostnames: one line each.
    let lines = get("hostname=www.dd.test,other.dd.test,bad..name&myip=198.18.7.3".into(), me, ua).await?.1;
    assert_eq!(lines, "good 198.18.7.3\nnohost\nnotfqdn");
    let many = (0..9).map(|i| format!("h{i}.dd.test")).collect::<Vec<_>>().join(",");
    assert_eq!(get(format!("hostname={many}"), me, ua).await?.1, "numhost");
    assert_eq!(get("hostname=&myip=198.18.7.4".into(), me, ua).await?.1, "notfqdn");
    assert_eq!(get("hostname=www.dd.test&myip=not-an-ip".into(), me, ua).await?.1, "dnserr");
    assert_eq!(get("hostname=www.dd.test&myip=224.0.0.1".into(), me, ua).await?.1, "dnserr");
    assert_eq!(get("hostname=www.dd.test&myip=198.18.7.4".into(), me, None).await?.1, "badagent");
    let (status, body) = get("hostname=www.dd.test".into(), None, ua).await?;
    assert_eq!((status, body.as_str()), (StatusCode::UNAUTHORIZED, "badauth"), "no credentials: a challenge");
    assert_eq!(get("hostname=www.dd.test".into(), Some((&user, "nope")), ua).await?.1, "badauth");

    // A revoked credential is refused.
    let path = format!("/v1/domains/www.dd.test/dyndns-credentials/{user}");
    let (status, _) = stack.api.call(Method::DELETE, &path, Some(&token), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(get("hostname=www.dd.test&myip=198.18.7.9".into(), me, ua).await?.1, "badauth");
    // Repeated failed logins from one source: abuse, even with good credentials afterwards.
    for _ in 0..10 {
        get("hostname=www.dd.test".into(), Some(("dd_nobody", "x")), ua).await?;
    }
    assert_eq!(get("hostname=www.dd.test".into(), Some(("dd_nobody", "x")), ua).await?.1, "abuse");
    answers_become(&stack, "www.dd.test.", RecordType::A, &["198.18.7.3"]).await?;
    Ok(())
}

/// Found by schemathesis: a query that cannot be read (a field twice) got axum's plain-text 400, which the API
/// document did not declare; it is the API's JSON error, and nothing changes.
#[tokio::test]
async fn an_unreadable_update_query_is_a_json_400() -> Result<()> {
    let (stack, _token, user, password) = setup().await?;
    let response = reqwest::Client::new()
        .get(format!(
            "http://{}/nic/update?hostname=www.dd.test&hostname=www.dd.test&myip=198.18.7.1",
            stack.dns.api_addr
        ))
        .basic_auth(&user, Some(&password))
        .header("User-Agent", "tether-test/1.0")
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("application/json"));
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"]["code"], "bad_query", "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("hostname"), "{body}");
    let answer = ask(stack.dns.dns_addr, "www.dd.test.", RecordType::A, Transport::Udp).await?;
    assert!(addresses(&answer).is_empty(), "nothing was updated");
    Ok(())
}

#[tokio::test]
async fn credentials_belong_to_the_domains_owner() -> Result<()> {
    let (stack, token, user, _password) = setup().await?;
    let other = stack.subscriber("neighbour").await?;
    let path = "/v1/domains/www.dd.test/dyndns-credentials";
    let (status, _) = stack.api.call(Method::POST, path, Some(&other), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "another subscriber cannot issue one");
    let (status, _) = stack.api.call(Method::GET, path, Some(&other), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = stack.api.call(Method::GET, path, Some(&token), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body[0]["username"], user.as_str());
    assert!(body[0].get("password").is_none() && !body.to_string().contains("secret"), "no secret listed: {body}");
    let (status, _) = stack.api.call(Method::DELETE, &format!("{path}/{user}"), Some(&other), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for _ in 1..16 {
        let (status, body) = stack.api.call(Method::POST, path, Some(&token), None).await?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = stack.api.call(Method::POST, path, Some(&token), None).await?;
    assert_eq!(status, StatusCode::CONFLICT, "at most 16 per domain: {body}");
    Ok(())
}
