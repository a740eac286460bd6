//! A running `dns` (in-process, port 0) over a throwaway Postgres, and an admin API client.

use std::{net::SocketAddr, time::Duration};
use tether_config::Load as _;

use anyhow::{Context, Result, bail};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    Postgres,
    dns_client::{Transport, ask},
    eventually, loopback0,
};
use hickory_proto::rr::RecordType;

/// The operator token every test stack uses.
pub const OPERATOR_TOKEN: &str = "operator-token-for-tests-0123456789";

/// Postgres plus one dns server.
pub struct Stack {
    /// The database; stop and restart it to test outages.
    pub pg: Postgres,
    /// The server.
    pub dns: DnsServer,
    /// Client for the server's admin API.
    pub api: Api,
}

/// A `dns` server running in this process.
pub struct DnsServer {
    /// DNS over UDP and TCP.
    pub dns_addr: SocketAddr,
    /// Admin API.
    pub api_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

/// A JSON client for the admin API.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Stack {
    /// Starts Postgres and a dns server, and waits until the server answers.
    pub async fn start() -> Result<Self> {
        crate::log_from_env();
        let pg = Postgres::start().await?;
        let dns = DnsServer::start(&pg.url()).await?;
        let api = Api::new(dns.api_addr);
        Ok(Self { pg, dns, api })
    }

    /// Creates a subscriber and returns its token.
    pub async fn subscriber(&self, name: &str) -> Result<String> {
        let (status, body) =
            self.api.call(Method::POST, "/v1/subscribers", Some(OPERATOR_TOKEN), Some(json!({ "name": name }))).await?;
        expect(status, StatusCode::CREATED, &body)?;
        Ok(body["token"].as_str().context("token in response")?.to_owned())
    }

    /// Creates a zone with one in-zone nameserver and its glue, and waits until it is served.
    pub async fn zone(&self, origin: &str) -> Result<Value> {
        let body = json!({
            "origin": origin,
            "nameservers": [{ "name": format!("ns1.{origin}"), "ips": ["198.18.0.53"] }, "ns2.example.net"],
        });
        let (status, body) = self.api.call(Method::POST, "/v1/zones", Some(OPERATOR_TOKEN), Some(body)).await?;
        expect(status, StatusCode::CREATED, &body)?;
        let apex = format!("{origin}.");
        eventually(Duration::from_secs(10), "the new zone to be served", || async {
            let r = ask(self.dns.dns_addr, &apex, RecordType::SOA, Transport::Udp).await.ok()?;
            (r.answers.len() == 1).then_some(())
        })
        .await?;
        Ok(body)
    }

    /// Creates a domain for the subscriber holding `token`.
    pub async fn domain(&self, token: &str, body: Value) -> Result<Value> {
        let (status, body) = self.api.call(Method::POST, "/v1/domains", Some(token), Some(body)).await?;
        expect(status, StatusCode::CREATED, &body)?;
        Ok(body)
    }

    /// Adds a static address.
    pub async fn address(&self, token: &str, domain: &str, body: Value) -> Result<Value> {
        let path = format!("/v1/domains/{domain}/addresses");
        let (status, body) = self.api.call(Method::POST, &path, Some(token), Some(body)).await?;
        expect(status, StatusCode::CREATED, &body)?;
        Ok(body)
    }

    /// Zone `tether.test`, subscriber `acme`, and its token.
    pub async fn with_acme() -> Result<(Self, String)> {
        let stack = Self::start().await?;
        stack.zone("tether.test").await?;
        let token = stack.subscriber("acme").await?;
        Ok((stack, token))
    }
}

impl DnsServer {
    /// Starts a server against `database_url` and waits until its view is loaded.
    pub async fn start(database_url: &str) -> Result<Self> {
        Self::start_with(database_url, "").await
    }

    /// [`DnsServer::start`] with `extra` configuration lines (an `allowed_target_ranges` there replaces the tests'
    /// default: loopback, 198.18.0.0/15 and fd00::/8).
    pub async fn start_with(database_url: &str, extra: &str) -> Result<Self> {
        let allowed = if extra.contains("allowed_target_ranges") {
            ""
        } else {
            "allowed_target_ranges = ['127.0.0.0/8', '198.18.0.0/15', 'fd00::/8']\n"
        };
        // Tests make requests in bursts; the one that tests the per-token rate sets its own.
        let rate = if extra.contains("api_requests_per_second") { "" } else { "api_requests_per_second = 100000\n" };
        let text = format!(
            "dns_listen = '127.0.0.1:0'\napi_listen = '127.0.0.1:0'\ndatabase_url = '{database_url}'\n\
             operator_token = '{OPERATOR_TOKEN}'\nmax_backoff = '500ms'\n{allowed}{rate}{extra}\n"
        );
        let config = dns::Config::parse(&text)?;
        config.validate()?;
        let listeners = dns::Listeners::bind(loopback0(), loopback0()).await?;
        let dns_addr = listeners.dns_addr()?;
        let api_addr = listeners.api_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(dns::run(listeners, config, shutdown.clone()));
        let server = Self { dns_addr, api_addr, shutdown, task: Some(task) };
        let api = Api::new(api_addr);
        eventually(Duration::from_secs(30), "dns to load its view", || async {
            matches!(api.call(Method::GET, "/healthz", None, None).await, Ok((StatusCode::OK, _))).then_some(())
        })
        .await?;
        Ok(server)
    }

    /// Stops the server and returns what `run` returned.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Api {
    /// A client for the API at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default(),
        }
    }

    /// One request with an optional bearer token and JSON body; the body comes back parsed (or as a string).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    /// A request with a raw body and content type, for malformed input.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: &str,
    ) -> Result<(StatusCode, Value)> {
        let mut request = self.client.request(method, format!("{}{path}", self.base)).body(body.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        self.send(request).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(StatusCode, Value)> {
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body))
    }
}

/// Fails with the response body when the status is not the expected one.
pub fn expect(status: StatusCode, expected: StatusCode, body: &Value) -> Result<()> {
    if status != expected {
        bail!("expected {expected}, got {status}: {body}");
    }
    Ok(())
}
