//! The address history, the routes the status page reads, and the page itself in Debian's Chromium driven by
//! Playwright (`tests/ui/status.mjs`) against the whole system in network namespaces.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tether_tests::{
    eventually,
    stack::{OPERATOR_TOKEN, Stack},
    system::{self, DOMAIN, System},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

const NAME: &str = "shop.tether.test";

async fn events(stack: &Stack, token: &str, query: &str) -> Result<Vec<Value>> {
    let path = format!("/v1/domains/{NAME}/events{query}");
    let (status, body) = stack.api.call(Method::GET, &path, Some(token), None).await?;
    ensure!(status == StatusCode::OK, "{status} {body}");
    Ok(body.as_array().cloned().unwrap_or_default())
}

#[tokio::test]
async fn every_address_change_is_recorded_with_its_reason() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    let pool = stack.pg.pool().await?;
    stack.domain(&acme, json!({ "name": NAME })).await?;
    stack.address(&acme, NAME, json!({ "ip": "198.18.1.2" })).await?;
    let check = json!({ "ip": "198.18.1.3", "check": { "kind": "tcp", "port": 443 } });
    stack.address(&acme, NAME, check).await?;
    // Writers' statements, as hbs sends them: a silent NCU-less static address, a failed check, a handover.
    sqlx::query("UPDATE addresses SET state = 'dead' WHERE ip = '198.18.1.2'").execute(&pool).await?;
    sqlx::query("UPDATE addresses SET state = 'dead', hbs = 'hbs-a' WHERE ip = '198.18.1.3'").execute(&pool).await?;
    sqlx::query(
        "INSERT INTO heartbeat_servers (name, control_address, capacity, state) VALUES ('hbs-a', 'x', 10, 'draining')",
    )
    .execute(&pool)
    .await?;
    sqlx::query("UPDATE addresses SET hbs = 'hbs-b' WHERE ip = '198.18.1.3'").execute(&pool).await?;
    sqlx::query("UPDATE addresses SET load = 5 WHERE ip = '198.18.1.3'").execute(&pool).await?;
    let (status, _) =
        stack.api.call(Method::DELETE, &format!("/v1/domains/{NAME}/addresses/198.18.1.2"), Some(&acme), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let all = events(&stack, &acme, "").await?;
    let seen: Vec<(String, String, String)> = all
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (field("ip"), field("kind"), field("reason"))
        })
        .collect();
    let expected = [
        ("198.18.1.2", "registered", "added"),
        ("198.18.1.3", "registered", "added"),
        ("198.18.1.2", "state", "dead"),
        ("198.18.1.3", "state", "check failed"),
        ("198.18.1.3", "handover", "drained: moved off a draining server"),
        ("198.18.1.2", "removed", "deleted through the API"),
    ];
    let expected: Vec<(String, String, String)> =
        expected.iter().map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned())).collect();
    assert_eq!(seen, expected, "a load change is no event; {all:#?}");
    assert_eq!((all[2]["previous"].as_str(), all[2]["state"].as_str()), (Some("live"), Some("dead")));
    assert_eq!((all[4]["previous_hbs"].as_str(), all[4]["hbs"].as_str()), (Some("hbs-a"), Some("hbs-b")));

    // Paging and bounds.
    let after = all[3]["id"].as_i64().context("id")?;
    assert_eq!(events(&stack, &acme, &format!("?after={after}")).await?.len(), 2);
    assert_eq!(events(&stack, &acme, "?limit=1").await?.len(), 1);
    assert!(events(&stack, &acme, "?since=2999-01-01T00:00:00Z").await?.is_empty());
    for (query, status) in [("?limit=0", 422), ("?limit=5001", 422), ("?since=yesterday", 400), ("?colour=red", 400)] {
        let (got, body) =
            stack.api.call(Method::GET, &format!("/v1/domains/{NAME}/events{query}"), Some(&acme), None).await?;
        assert_eq!(got.as_u16(), status, "{query}: {body}");
    }

    // Handovers across domains are the operator's; another subscriber sees nothing of acme's.
    let (status, body) = stack.api.call(Method::GET, "/v1/events", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body[0]["domain"], NAME, "{body}");
    let globex = stack.subscriber("globex").await?;
    for path in ["/v1/events".to_owned(), format!("/v1/domains/{NAME}/events"), format!("/v1/domains/{NAME}/answer")] {
        let (status, body) = stack.api.call(Method::GET, &path, Some(&globex), None).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    let (status, _) = stack.api.call(Method::GET, "/v1/heartbeat-servers", Some(&globex), None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Old events are pruned in batches.
    sqlx::query("UPDATE address_events SET at = now() - interval '2 hours' WHERE ip = '198.18.1.2'")
        .execute(&pool)
        .await?;
    let pruned = dns::store::events::prune(&pool, Duration::from_secs(3600), 2, 10).await?;
    assert_eq!(pruned, 3);
    assert_eq!(events(&stack, &acme, "").await?.len(), 3);
    // Deleting the domain takes its history with it.
    let (status, _) = stack.api.call(Method::DELETE, &format!("/v1/domains/{NAME}"), Some(&acme), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM address_events").fetch_one(&pool).await?;
    assert_eq!(left, 0);
    Ok(())
}

/// Found by schemathesis: a negative `after` was taken as 0, and `/v1/events` ignored `after` altogether.
#[tokio::test]
async fn event_lists_page_by_after_and_refuse_a_negative_one() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    let pool = stack.pg.pool().await?;
    stack.domain(&acme, json!({ "name": NAME })).await?;
    stack.address(&acme, NAME, json!({ "ip": "198.18.1.2" })).await?;
    for hbs in ["hbs-a", "hbs-b", "hbs-c"] {
        sqlx::query("UPDATE addresses SET hbs = $1 WHERE ip = '198.18.1.2'").bind(hbs).execute(&pool).await?;
    }
    let (status, all) = stack.api.call(Method::GET, "/v1/events", Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    let all = all.as_array().cloned().unwrap_or_default();
    assert_eq!(all.len(), 3, "taken on by hbs-a, then to hbs-b, then to hbs-c: {all:#?}");
    let older = all[1]["id"].as_i64().context("id")?;
    let (status, newer) =
        stack.api.call(Method::GET, &format!("/v1/events?after={older}"), Some(OPERATOR_TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(newer, json!([all[0]]), "only the handover after {older}");
    for path in ["/v1/events?after=-1".to_owned(), format!("/v1/domains/{NAME}/events?after=-1")] {
        let (status, body) = stack.api.call(Method::GET, &path, Some(OPERATOR_TOKEN), None).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap_or_default().starts_with("after:"), "{path}: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn the_answer_and_the_change_poll_follow_the_view() -> Result<()> {
    let (stack, acme) = Stack::with_acme().await?;
    stack.domain(&acme, json!({ "name": NAME })).await?;
    // Once the new domain's view is out, the generation holds still.
    let generation = eventually(Duration::from_secs(10), "the view to settle", || async {
        let read = || async {
            let (status, body) = stack.api.call(Method::GET, "/v1/changes", Some(&acme), None).await.ok()?;
            (status == StatusCode::OK).then(|| body["generation"].as_u64()).flatten()
        };
        let first = read().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        (read().await? == first).then_some(first)
    })
    .await?;
    // The poll waits for the next view; an address makes one.
    let api = stack.api.clone();
    let token = acme.clone();
    let poll = tokio::spawn(async move {
        api.call(Method::GET, &format!("/v1/changes?after={generation}"), Some(&token), None).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "the poll waits while nothing changes");
    stack.address(&acme, NAME, json!({ "ip": "198.18.1.2" })).await?;
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), poll).await???;
    assert_eq!(status, StatusCode::OK);
    assert!(body["generation"].as_u64() > Some(generation), "{body}");
    let answer = eventually(Duration::from_secs(10), "the answer to show the address", || async {
        let (_, body) =
            stack.api.call(Method::GET, &format!("/v1/domains/{NAME}/answer"), Some(&acme), None).await.ok()?;
        (body["a"]["addresses"] == json!(["198.18.1.2"])).then_some(body)
    })
    .await?;
    assert_eq!(answer["a"]["rcode"], "No Error", "{answer}");
    assert_eq!(answer["a"]["ttl"], 1);
    assert_eq!(answer["aaaa"]["addresses"], json!([]));
    // The page is served with a policy that keeps it to this server.
    let response = reqwest::get(format!("http://{}/ui/", stack.dns.api_addr)).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let policy = response.headers().get("content-security-policy").context("CSP")?.to_str()?.to_owned();
    assert!(policy.contains("default-src 'self'"), "{policy}");
    assert!(response.text().await?.contains("app.js"));
    let missing = reqwest::get(format!("http://{}/ui/../../etc/passwd", stack.dns.api_addr)).await?;
    assert!(missing.status().is_client_error());
    Ok(())
}

/// `node tests/ui/status.mjs` in the client namespace: one command a line, one answer a line.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    fn start(ns: &str, ui: &str, tokens: &[(&str, &str)], shots: &Path) -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/status.mjs");
        ensure!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("ui/node_modules/playwright-core").exists(),
            "playwright-core is missing: run scripts/install-deps"
        );
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, "node"]).arg(&script).env("UI_URL", ui).env("SHOTS", shots);
        for (key, value) in tokens {
            command.env(key, value);
        }
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let answers = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Self { child, stdin, answers })
    }

    async fn step(&mut self, command: &str) -> Result<String> {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await?;
        let line = tokio::time::timeout(Duration::from_secs(60), self.answers.next_line())
            .await
            .with_context(|| format!("no answer to {command:?}"))??
            .with_context(|| format!("the browser script ended at {command:?}"))?;
        eprintln!("browser: {command} -> {line}");
        match line.strip_prefix("ok ") {
            Some(detail) => Ok(detail.to_owned()),
            None => bail!("{command}: {line}"),
        }
    }

    async fn quit(mut self) -> Result<()> {
        self.stdin.write_all(b"quit\n").await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }
}

#[test]
fn the_status_page_shows_uplinks_failures_and_drains_live() -> Result<()> {
    let ns = system::network(2)?;
    let runtime = system::client_runtime(&ns)?;
    runtime.block_on(async {
        let mut system = System::start(ns).await?;
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
        std::fs::create_dir_all(&shots)?;
        let result = page_scenario(&mut system, &shots).await;
        if let Err(error) = &result {
            eprintln!("the status page test failed: {error:#}; screenshots in {}", shots.display());
            system.print_logs();
        }
        result
    })
}

async fn page_scenario(system: &mut System, shots: &Path) -> Result<()> {
    eventually(Duration::from_secs(30), "both uplinks live", || async {
        (system.answer().await.ok()? == ["198.18.1.2", "198.18.2.2"]).then_some(())
    })
    .await?;
    // Another tenant with a domain of its own, which the subscriber must never see.
    let other = system
        .api
        .call(Method::POST, "/v1/subscribers", Some(system::OPERATOR_TOKEN), Some(json!({ "name": "other" })))
        .await?
        .1["token"]
        .as_str()
        .context("token")?
        .to_owned();
    let (status, body) =
        system.api.call(Method::POST, "/v1/domains", Some(&other), Some(json!({ "name": "hidden.e2e.test" }))).await?;
    ensure!(status == StatusCode::CREATED, "{body}");

    let ui = format!("http://{}:8053/ui/", system::OPERATOR);
    let tokens = [("SUBSCRIBER", system.subscriber.as_str()), ("OPERATOR", system::OPERATOR_TOKEN)];
    let mut browser = Browser::start(&system.ns.name("client"), &ui, &tokens, shots)?;
    browser.step("open shop SUBSCRIBER").await?;
    browser.step(&format!("domains shop {DOMAIN}")).await?;
    browser.step("hidden shop #operator").await?;
    browser.step(&format!("domain shop {DOMAIN}")).await?;
    browser.step("state shop wan1 live 10000").await?;
    browser.step("state shop wan2 live 10000").await?;
    browser.step("shot shop both-live.png").await?;

    // A silent cut of wan1: the page shows it dead within 2 s, and its timeline shows the gap.
    system.ip("isp", &["route", "add", "blackhole", "198.18.1.2/32"])?;
    let took: u64 = browser.step("state shop wan1 dead 2000").await?.parse()?;
    eprintln!("wan1 shown dead {took} ms after the cut");
    browser.step("gap shop wan1 5000").await?;
    browser.step("range shop 300000").await?;
    browser.step("gap shop wan1 5000").await?;
    browser.step("shot shop wan1-dead.png").await?;
    system.ip("isp", &["route", "del", "blackhole", "198.18.1.2/32"])?;
    browser.step("state shop wan1 live 10000").await?;

    // The operator drains the server holding the site with its button: the site moves to the other one.
    let db = system.pg.pool().await?;
    let holder: String = sqlx::query_scalar("SELECT hbs FROM addresses WHERE uplink = 'wan1'").fetch_one(&db).await?;
    let other_server = if holder == "hbs-a" { "hbs-b" } else { "hbs-a" };
    browser.step("open ops OPERATOR").await?;
    browser.step(&format!("domains ops {DOMAIN},hidden.e2e.test")).await?;
    browser.step(&format!("domain ops {DOMAIN}")).await?;
    browser.step(&format!("hbs ops wan1 {holder} 5000")).await?;
    browser.step(&format!("drain ops {holder}")).await?;
    browser.step(&format!("hbs ops wan1 {other_server} 20000")).await?;
    browser.step(&format!("hbs ops wan2 {other_server} 20000")).await?;
    browser.step("state ops wan1 live 10000").await?;
    browser.step("shot ops drained.png").await?;
    browser.quit().await?;

    // What the page drew is in the history with its reasons.
    let path = format!("/v1/domains/{DOMAIN}/events");
    let history = system.subscriber(Method::GET, &path, None, StatusCode::OK).await?;
    let reasons: Vec<&str> = history
        .as_array()
        .context("events")?
        .iter()
        .filter(|e| e["uplink"] == "wan1")
        .filter_map(|e| e["reason"].as_str())
        .collect();
    for reason in
        ["registered by the NCU", "silent: pings unanswered", "answering again", "drained: moved off a draining server"]
    {
        assert!(reasons.contains(&reason), "wan1's history should hold {reason:?}: {reasons:?}");
    }
    system.running()
}

/// The metric names a scrape declares (`# TYPE` lines), with the sample names each kind adds.
fn families(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.strip_prefix("# TYPE ").unwrap_or_default().split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
        names.insert(name.to_owned());
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

#[tokio::test]
async fn the_grafana_dashboard_reads_only_metrics_the_services_export() -> Result<()> {
    let (stack, _) = Stack::with_acme().await?;
    let pki = tether_tests::hds_stack::Pki::new()?;
    let hbs = tether_tests::fleet::HbsServer::start(&stack.pg.url(), &pki, "hbs-dash").await?;
    let forwarder = crate::forwarder::common::Forwarder::start(&stack.pg.url(), "").await?;
    let mut exported = std::collections::BTreeSet::new();
    for address in [stack.dns.api_addr, hbs.metrics, forwarder.metrics_addr] {
        let text = eventually(Duration::from_secs(10), "a scrape", || async {
            let response = reqwest::get(format!("http://{address}/metrics")).await.ok()?;
            response.text().await.ok().filter(|t| t.contains("# TYPE"))
        })
        .await?;
        exported.extend(families(&text));
    }
    // A labelled family shows in a scrape only once it has a sample (a transfer, a refused flow): those are checked
    // against the names the services' code declares, under the prefix its scrape shows.
    let declared = |prefix: &str, sources: &[&str]| -> std::collections::BTreeSet<String> {
        let literals = sources.iter().flat_map(|s| s.split('"').skip(1).step_by(2));
        let names = literals.filter(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        names.flat_map(|n| ["", "_total", "_bucket", "_sum", "_count"].map(|s| format!("{prefix}_{n}{s}"))).collect()
    };
    let feed = include_str!("../../../lib/db/src/feed.rs");
    let mut known = exported.clone();
    known.extend(declared("tether_dns", &[include_str!("../../../dns/src/metrics.rs"), feed]));
    known.extend(declared("hbs", &[include_str!("../../../hbs/src/metrics.rs")]));
    known.extend(declared("tether_forwarder", &[include_str!("../../../packet-forwarder/src/metrics.rs"), feed]));
    let dashboard: Value = serde_json::from_str(include_str!("../../../deploy/grafana/tether.json"))?;
    let (mut used, mut scraped) = (0, 0);
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("expr")?;
            let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            for word in words.filter(|w| ["tether_dns_", "hbs_", "tether_forwarder_"].iter().any(|p| w.starts_with(p)))
            {
                assert!(known.contains(word), "panel {:?} reads {word}, which no service exports", panel["title"]);
                used += 1;
                scraped += usize::from(exported.contains(word));
            }
        }
    }
    assert!(scraped * 2 > used, "most series the dashboard reads are in a fresh scrape: {scraped} of {used}");
    assert!(used > 30, "the dashboard reads {used} series");
    forwarder.stop().await?;
    hbs.stop().await
}
