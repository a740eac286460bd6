//! Hostile input from schemathesis: every operation of `/v1/openapi.json`, fuzzed on a real stack as the operator and
//! as a subscriber, answers no 5xx and only what the document declares, in the declared shape.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_tests::stack::{OPERATOR_TOKEN, Stack, expect};
use tokio::process::Command;

/// Where `scripts/install-deps` puts schemathesis, unless `$TETHER_SCHEMATHESIS_VENV` says otherwise.
const DEFAULT_VENV: &str = "/opt/tether/schemathesis-venv";

/// Time budget of one schemathesis run (its fuzzing repeats until the budget is spent); there are two, and the
/// whole test stays within two minutes.
const MAX_TIME: Duration = Duration::from_secs(35);

const DOMAIN: &str = "shop.tether.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_as_documented_under_fuzzing() -> Result<()> {
    let Some(st) = schemathesis()? else {
        return Ok(());
    };
    let (stack, acme) = Stack::with_acme().await?;
    let spec = format!("http://{}/v1/openapi.json", stack.dns.api_addr);
    for (who, token) in [("subscriber", acme.as_str()), ("operator", OPERATOR_TOKEN)] {
        // Each run starts from the same objects: the one before may have deleted them.
        let dyndns = objects(&stack, &acme).await?;
        run(&st, &spec, who, &config(token, &dyndns)).await?;
    }
    Ok(())
}

/// Something of every kind for the answers to show, made anew: a domain with a static address, addresses with and
/// without a check, service tuples, TXT records, forwarded ports, a migration, an UPDATE key, a heartbeat server;
/// and a dyndns credential, returned as the `Authorization` value of `/nic/update`.
async fn objects(stack: &Stack, token: &str) -> Result<String> {
    let (status, body) = stack.api.call(Method::DELETE, &format!("/v1/domains/{DOMAIN}"), Some(token), None).await?;
    ensure!(matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_FOUND), "deleting {DOMAIN}: {status} {body}");
    stack.domain(token, json!({ "name": DOMAIN, "static_ip": "198.18.7.1", "fallback_ip": "198.18.7.9" })).await?;
    let check = json!({ "kind": "http", "port": 80, "path": "/health" });
    stack.address(token, DOMAIN, json!({ "ip": "198.18.7.2", "check": check })).await?;
    stack.address(token, DOMAIN, json!({ "ip": "198.18.7.3", "priority": 1 })).await?;
    let base = format!("/v1/domains/{DOMAIN}");
    let services = json!([
        { "service": "http", "transport": "tcp", "ip": "198.18.7.3", "port": 80 },
        { "service": "sip", "transport": "udp", "target": "sip.example.net", "port": 5060 },
    ]);
    let txt = json!([{ "value": "v=spf1 -all" }, { "name": format!("_acme-challenge.{DOMAIN}"), "value": "x" }]);
    for (method, path, body, status) in [
        (Method::PUT, "services", Some(services), StatusCode::OK),
        (Method::PUT, "txt", Some(txt), StatusCode::OK),
        (Method::PUT, "forwarding", Some(json!({ "ports": [80, 443] })), StatusCode::OK),
        (Method::POST, "migrations", Some(json!({ "from": "198.18.7.2", "to": "198.18.7.3" })), StatusCode::CREATED),
        (Method::POST, "update-keys", None, StatusCode::CREATED),
    ] {
        let (got, answer) = stack.api.call(method, &format!("{base}/{path}"), Some(token), body).await?;
        expect(got, status, &answer).context(path)?;
    }
    let (status, credential) =
        stack.api.call(Method::POST, &format!("{base}/dyndns-credentials"), Some(token), None).await?;
    expect(status, StatusCode::CREATED, &credential)?;
    let pool = stack.pg.pool().await?;
    sqlx::query(
        "INSERT INTO heartbeat_servers (name, control_address, capacity, state) \
         VALUES ('hbs-a', '198.18.0.10:4433', 100, 'active') ON CONFLICT DO NOTHING",
    )
    .execute(&pool)
    .await?;
    let field = |name: &str| credential[name].as_str().with_context(|| format!("{name} in {credential}"));
    let pair = format!("{}:{}", field("username")?, field("password")?);
    Ok(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(pair)))
}

/// The run's configuration: the checks that judge single requests, and the operations that need their own.
fn config(token: &str, dyndns: &str) -> String {
    format!(
        r#"headers = {{ Authorization = "Bearer {token}" }}

# Every check of a single answer. Left out: positive_data_acceptance (a valid body for a domain that does not
# exist is rightly a 404) and the checks that need OpenAPI links (use_after_free, ensure_resource_availability,
# object_level_authorization).
[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_headers_conformance.enabled = true
response_schema_conformance.enabled = true
missing_required_header.enabled = true
unsupported_method.enabled = true
allow_header_conformance.enabled = true
ignored_auth.enabled = true

# A body past the API's 64 KiB is refused with 413 before it is read.
[checks.negative_data_rejection]
enabled = true
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# The long poll waits up to 25 s for a view newer than `after`: ask for the current one, which answers at once.
[[operations]]
include-path = "/v1/changes"
parameters = {{ "query.after" = 0 }}

# dyndns2 answers its codes with 200 (badauth, notfqdn, abuse), as its clients expect; only a client without
# credentials gets a 401 challenge.
[[operations]]
include-path = "/nic/update"
headers = {{ Authorization = "{dyndns}" }}
checks.ignored_auth.enabled = false
checks.negative_data_rejection.enabled = false
checks.missing_required_header.enabled = false
"#
    )
}

/// The `st` executable: `$TETHER_SCHEMATHESIS`, the virtualenv's, or one on PATH. Missing, it fails the test under
/// CI and skips it (loudly) elsewhere.
fn schemathesis() -> Result<Option<PathBuf>> {
    let venv = std::env::var_os("TETHER_SCHEMATHESIS_VENV").map_or_else(|| PathBuf::from(DEFAULT_VENV), PathBuf::from);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::var_os("TETHER_SCHEMATHESIS")
        .map(PathBuf::from)
        .into_iter()
        .chain([venv.join("bin/st")])
        .chain(std::env::split_paths(&path).map(|dir| dir.join("st")));
    for candidate in candidates {
        if is_executable(&candidate) {
            return Ok(Some(candidate));
        }
    }
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        bail!("schemathesis not found (looked in {}): run scripts/install-deps", venv.display());
    }
    eprintln!(
        "\n!!!!! SKIPPING the schemathesis test: no `st` in {} or on PATH; run scripts/install-deps !!!!!\n",
        venv.display()
    );
    Ok(None)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// One schemathesis run against the spec with `config`; fails with its whole output unless it exits 0.
async fn run(st: &Path, spec: &str, who: &str, config: &str) -> Result<()> {
    // The configuration, reports and anything else it writes stay in a directory of its own.
    let dir = tempfile::Builder::new().prefix("tether-schemathesis-").tempdir()?;
    let config_file = dir.path().join("schemathesis.toml");
    std::fs::write(&config_file, config)?;
    let base = spec.trim_end_matches("/v1/openapi.json");
    let mut command = Command::new(st);
    command
        .arg("--config-file")
        .arg(&config_file)
        .args(["run", spec, "--url", base])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "30"])
        .args(["--max-time", &MAX_TIME.as_secs().to_string()])
        .args(["--seed", "17"])
        .args(["--workers", "2"])
        .args(["--request-timeout", "10"])
        .args(["--max-redirects", "0"])
        .args(["--generation-database", "none"])
        .args(["--continue-on-failure", "--no-color"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let started = Instant::now();
    let limit = MAX_TIME + Duration::from_secs(30);
    let output = tokio::time::timeout(limit, command.output())
        .await
        .with_context(|| format!("schemathesis as the {who} ran past {limit:?}"))?
        .with_context(|| format!("running {}", st.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!("----- schemathesis as the {who}: {}\n{stdout}\n{stderr}", output.status);
        bail!("schemathesis as the {who} found failures ({}); its output is above", output.status);
    }
    let summary = stdout.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or_default();
    let summary = summary.trim_matches(|c: char| c == '=' || c.is_whitespace());
    eprintln!("schemathesis as the {who}: {summary} ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
