//! Service checks of static addresses (a leased line, say): TCP connect and optional exchange, or an HTTP status.
//! One server checks each address (claimed through the fleet table); it is dead after three failures in a row and
//! live again after one success.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::Deserialize;
use sqlx::PgPool;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{store, writer::Update};

/// Consecutive failures before a live address is dead.
pub const FAILURES: u32 = 3;

/// A check as the admin API stores it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Check {
    /// Connect; optionally send `send` and expect a reply starting with `expect`.
    Tcp {
        /// Port.
        port: u16,
        /// Sent after connecting.
        #[serde(default)]
        send: Option<String>,
        /// Expected prefix of the reply.
        #[serde(default)]
        expect: Option<String>,
    },
    /// GET `path`; expect `status`.
    Http {
        /// Port.
        port: u16,
        /// Path.
        #[serde(default = "root")]
        path: String,
        /// Expected status.
        #[serde(default = "ok")]
        status: u16,
    },
}

fn root() -> String {
    "/".into()
}

fn ok() -> u16 {
    200
}

/// Runs the checks this server owns every `interval` until `shutdown`.
pub async fn run(
    pool: PgPool,
    me: String,
    interval: Duration,
    updates: mpsc::UnboundedSender<Update>,
    shutdown: CancellationToken,
) {
    // Never to another host than the address's: no redirects followed, no proxy from the environment.
    let http = reqwest::Client::builder()
        .timeout(interval.mul_f32(0.8))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap_or_default();
    let mut failures: BTreeMap<i64, u32> = BTreeMap::new();
    let mut ticker = tether_config::ticker(interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let owned = match store::static_checks(&pool, &me).await {
            Ok(owned) => owned,
            Err(error) => {
                debug!(%error, "cannot read static checks");
                continue;
            }
        };
        failures.retain(|id, _| owned.iter().any(|o| o.id == *id));
        let mut running = JoinSet::new();
        for address in owned {
            let check: Check = match serde_json::from_value(address.check.clone()) {
                Ok(check) => check,
                Err(error) => {
                    warn!(id = address.id, %error, "unreadable check; skipping");
                    continue;
                }
            };
            let http = http.clone();
            let limit = interval.mul_f32(0.8);
            running.spawn(async move {
                let passed = tokio::time::timeout(limit, probe(&http, address.ip, &check)).await.unwrap_or(false);
                (address, passed)
            });
        }
        while let Some(result) = running.join_next().await {
            let Ok((address, passed)) = result else { continue };
            let count = failures.entry(address.id).or_insert(0);
            *count = if passed { 0 } else { *count + 1 };
            let next = if passed {
                Some(true)
            } else if *count >= FAILURES {
                Some(false)
            } else {
                None
            };
            // Pending addresses fail straight to dead only after the same three tries.
            if let Some(live) = next
                && live != address.live
            {
                debug!(id = address.id, live, "static check state changed");
                let _ = updates.send(Update::Checked { id: address.id, live });
            }
        }
    }
}

async fn probe(http: &reqwest::Client, ip: std::net::IpAddr, check: &Check) -> bool {
    match check {
        Check::Tcp { port, send, expect } => {
            let Ok(mut stream) = TcpStream::connect(SocketAddr::new(ip, *port)).await else {
                return false;
            };
            // The API refuses it; a row written otherwise still sends nothing of the subscriber's into private space.
            if let Some(send) = send.as_ref().filter(|_| tether_config::TargetPolicy::default().check(ip).is_ok())
                && stream.write_all(send.as_bytes()).await.is_err()
            {
                return false;
            }
            let Some(expect) = expect else {
                return true;
            };
            let mut buf = vec![0_u8; expect.len().max(1)];
            let mut got = 0;
            while got < expect.len() {
                match stream.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => got += n,
                }
            }
            buf.starts_with(expect.as_bytes())
        }
        Check::Http { port, path, status } => {
            let host = match ip {
                std::net::IpAddr::V4(v4) => v4.to_string(),
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            };
            // A path that is not one (`@other-host/`) would name another host: checked, then set as the path only.
            if !path.starts_with('/') {
                return false;
            }
            let Ok(mut url) = reqwest::Url::parse(&format!("http://{host}:{port}/")) else { return false };
            let (only_path, query) = path.split_once('?').map_or((path.as_str(), None), |(p, q)| (p, Some(q)));
            url.set_path(only_path);
            url.set_query(query);
            matches!(http.get(url).send().await, Ok(response) if response.status().as_u16() == *status)
        }
    }
}
