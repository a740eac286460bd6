//! The dyndns2 protocol (`GET /nic/update`) that ddclient, inadyn and most routers' DDNS pages speak, and the API
//! that makes and revokes its credentials.
//!
//! A client authenticates with HTTP basic auth by an update credential of one domain (generated, stored hashed) and
//! names the domain in `hostname`; `myip` (one address per family, comma-separated) or, without it, the request's
//! source address becomes the domain's dyndns address of that family: an address row of source `dyndns`, live,
//! answered by the same rules as any other. Answers are the protocol's plain-text codes, one line per hostname.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, Query, State, rejection::QueryRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use ipnet::IpNet;
use serde::Deserialize;
use tracing::{info, warn};

use super::{ApiError, AppState, input, token_hash};
use crate::store::admin;

/// Most hostnames in one request.
pub const MAX_HOSTNAMES: usize = 8;
/// Failed logins allowed per source address per [`WINDOW`] before it gets `abuse`.
pub const MAX_BAD_AUTH: u32 = 10;
/// Updates that change nothing allowed per credential per [`WINDOW`] before it gets `abuse`.
pub const MAX_NOCHG: u32 = 20;
/// The rate limits' window.
pub const WINDOW: Duration = Duration::from_secs(600);
/// Most keys a limiter tracks; past it, the oldest windows are dropped.
const MAX_TRACKED: usize = 10_000;

/// Counts per key over fixed windows: bounded in memory, shared by the API's handlers.
pub struct Limiter {
    counts: Mutex<HashMap<String, (Instant, u32)>>,
    window: Duration,
}

impl Default for Limiter {
    /// Windows of [`WINDOW`].
    fn default() -> Self {
        Self::with_window(WINDOW)
    }
}

impl Limiter {
    /// Counts over windows of `window`.
    pub fn with_window(window: Duration) -> Self {
        Self { counts: Mutex::default(), window }
    }

    /// Counts one event for `key`; its count in the current window, this one included.
    pub fn hit(&self, key: &str) -> u32 {
        let now = Instant::now();
        let Ok(mut counts) = self.counts.lock() else { return 0 };
        if counts.len() >= MAX_TRACKED && !counts.contains_key(key) {
            counts.retain(|_, (start, _)| now.duration_since(*start) < self.window);
            if counts.len() >= MAX_TRACKED {
                counts.clear();
            }
        }
        let entry = counts.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1
    }

    /// The count of `key` in its current window, without counting.
    pub fn peek(&self, key: &str) -> u32 {
        let Ok(counts) = self.counts.lock() else { return 0 };
        counts.get(key).filter(|(start, _)| start.elapsed() < self.window).map_or(0, |(_, n)| *n)
    }
}

/// The query of `GET /nic/update`.
#[derive(Debug, Deserialize)]
pub(super) struct UpdateQuery {
    pub(super) hostname: Option<String>,
    pub(super) myip: Option<String>,
    /// Sent by some clients (`wildcard`, `mx`, `backmx`, `offline`, `system`); accepted and ignored.
    #[serde(flatten)]
    _rest: HashMap<String, String>,
}

/// `GET /nic/update`: the dyndns2 update.
pub(super) async fn update(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    query: Result<Query<UpdateQuery>, QueryRejection>,
) -> Response {
    // A query that is no dyndns2 query (a field twice, bytes that are not UTF-8) gets the API's JSON error.
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return ApiError::from(rejection).into_response(),
    };
    let source = client_address(peer, &headers, &state.dyndns_trusted_proxies);
    let source_key = format!("src:{source}");
    if state.dyndns_limiter.peek(&source_key) >= MAX_BAD_AUTH {
        info!(%source, "dyndns: abuse (failed logins)");
        return text(StatusCode::OK, "abuse");
    }
    if headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).is_none_or(|agent| agent.trim().is_empty()) {
        info!(%source, "dyndns: badagent (no User-Agent)");
        return text(StatusCode::OK, "badagent");
    }
    let Some((username, password)) = basic_auth(&headers) else {
        info!(%source, "dyndns: badauth (no credentials)");
        return challenge();
    };
    let credential = match admin::dyndns_credential(&state.pool, &username).await {
        Ok(Some((credential, hash))) if constant_time_eq(&hash, &token_hash(&password)) => credential,
        Ok(_) => {
            state.dyndns_limiter.hit(&source_key);
            info!(%source, username = %truncate(&username), "dyndns: badauth");
            return text(StatusCode::OK, "badauth");
        }
        Err(error) => {
            warn!(%error, "dyndns: cannot read credentials");
            return text(StatusCode::OK, "911");
        }
    };
    let credential_key = format!("cred:{}", credential.username);
    if state.dyndns_limiter.peek(&credential_key) >= MAX_NOCHG {
        info!(%source, username = %credential.username, "dyndns: abuse (repeated nochg)");
        return text(StatusCode::OK, "abuse");
    }
    let hostnames: Vec<&str> =
        query.hostname.as_deref().unwrap_or("").split(',').map(str::trim).filter(|h| !h.is_empty()).collect();
    if hostnames.is_empty() {
        return text(StatusCode::OK, "notfqdn");
    }
    if hostnames.len() > MAX_HOSTNAMES {
        info!(%source, count = hostnames.len(), "dyndns: numhost");
        return text(StatusCode::OK, "numhost");
    }
    let ips = match addresses(query.myip.as_deref(), source, &state.shared.targets) {
        Some(ips) => ips,
        None => {
            info!(%source, myip = ?query.myip, "dyndns: unusable myip");
            return text(StatusCode::OK, "dnserr");
        }
    };
    let shown = ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut lines = Vec::with_capacity(hostnames.len());
    for hostname in hostnames {
        let Ok(fqdn) = input::hostname("hostname", hostname) else {
            lines.push("notfqdn".to_owned());
            continue;
        };
        if fqdn != credential.fqdn {
            info!(%source, username = %credential.username, hostname = %fqdn, "dyndns: nohost (not this credential's)");
            lines.push("nohost".to_owned());
            continue;
        }
        let mut changed = false;
        let mut failed = false;
        for ip in &ips {
            match admin::set_dyndns_address(&state.pool, credential.domain_id, *ip).await {
                Ok(c) => changed |= c,
                Err(error) => {
                    warn!(%error, domain = %fqdn, "dyndns: update not stored");
                    failed = true;
                }
            }
        }
        if failed {
            lines.push("dnserr".to_owned());
        } else if changed {
            info!(domain = %fqdn, ips = %shown, "dyndns: good");
            lines.push(format!("good {shown}"));
        } else {
            state.dyndns_limiter.hit(&credential_key);
            lines.push(format!("nochg {shown}"));
        }
    }
    text(StatusCode::OK, &lines.join("\n"))
}

/// The addresses to set: `myip`'s (at most one per family, no unusable ones) or else the source address. An
/// IPv4-mapped IPv6 address stands for its IPv4 address: it is set as that (as the API stores a static address),
/// never as an AAAA record beside another IPv4 address.
pub(super) fn addresses(
    myip: Option<&str>,
    source: IpAddr,
    targets: &tether_config::TargetPolicy,
) -> Option<Vec<IpAddr>> {
    let given: Vec<&str> = myip.unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let ips: Vec<IpAddr> = if given.is_empty() {
        vec![source.to_canonical()]
    } else {
        given.iter().map(|s| s.parse().ok().map(|ip: IpAddr| ip.to_canonical())).collect::<Option<Vec<IpAddr>>>()?
    };
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    let v6 = ips.len() - v4;
    if v4 > 1 || v6 > 1 || ips.iter().any(|ip| input::target_ip("myip", *ip, targets).is_err()) {
        return None;
    }
    Some(ips)
}

/// The client's address: the peer's, or the last `X-Forwarded-For` hop when the peer is a trusted proxy.
pub(super) fn client_address(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !trusted.iter().any(|net| net.contains(&peer_ip)) {
        return peer_ip;
    }
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|hop| hop.trim().parse::<IpAddr>().ok())
        .unwrap_or(peer_ip)
}

/// The user and password of a `Basic` Authorization header.
pub(super) fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    (user.len() <= 128 && password.len() <= 256).then(|| (user.to_owned(), password.to_owned()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn truncate(text: &str) -> String {
    text.chars().take(40).collect()
}

fn text(status: StatusCode, body: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{body}\n")).into_response()
}

/// No credentials: 401 with a Basic challenge, for clients that wait for one before sending them.
fn challenge() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"tether dyndns\""), (header::CONTENT_TYPE, "text/plain")],
        "badauth\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn myip_gives_one_address_per_family() {
        let src: IpAddr = "198.18.0.1".parse().expect("ip");
        let open = tether_config::TargetPolicy {
            allowed: vec!["198.18.0.0/15".parse().expect("net"), "fd00::/8".parse().expect("net")],
            operator: vec![],
        };
        let addresses = |myip, src| addresses(myip, src, &open);
        assert_eq!(addresses(None, src), Some(vec![src]));
        assert_eq!(addresses(Some(""), src), Some(vec![src]));
        let both = addresses(Some("198.18.5.5, fd00::5"), src).expect("two families");
        assert_eq!(both.len(), 2);
        assert_eq!(addresses(Some("198.18.5.5,198.18.5.6"), src), None, "two of one family");
        assert_eq!(addresses(Some("nonsense"), src), None);
        assert_eq!(addresses(Some("224.0.0.1"), src), None, "multicast");
        assert_eq!(addresses(Some("10.0.0.1"), src), None, "private space");
    }

    #[test]
    fn ipv4_mapped_addresses_are_set_as_ipv4() {
        let src: IpAddr = "198.18.0.1".parse().expect("ip");
        let open =
            tether_config::TargetPolicy { allowed: vec!["198.18.0.0/15".parse().expect("net")], operator: vec![] };
        let v4: IpAddr = "198.18.5.5".parse().expect("ip");
        assert_eq!(addresses(Some("::ffff:198.18.5.5"), src, &open), Some(vec![v4]), "not an AAAA record");
        assert_eq!(addresses(Some("198.18.5.6, ::ffff:198.18.5.5"), src, &open), None, "two IPv4 addresses");
        let mapped_source: IpAddr = "::ffff:198.18.5.5".parse().expect("ip");
        assert_eq!(addresses(None, mapped_source, &open), Some(vec![v4]), "a forwarded-for hop, say");
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.9, 198.18.7.7".parse().expect("header"));
        let proxy: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().expect("net")];
        assert_eq!(client_address(proxy, &headers, &trusted), "198.18.7.7".parse::<IpAddr>().expect("ip"));
        assert_eq!(client_address(proxy, &headers, &[]), proxy.ip(), "untrusted: the peer itself");
    }

    #[test]
    fn basic_auth_is_decoded_and_bounded() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().expect("header"));
        assert_eq!(basic_auth(&headers), Some(("user".into(), "pass".into())));
        headers.insert(header::AUTHORIZATION, "Bearer x".parse().expect("header"));
        assert_eq!(basic_auth(&headers), None);
    }

    #[test]
    fn the_limiter_counts_per_key_within_a_window() {
        let limiter = Limiter::default();
        assert_eq!(limiter.hit("a"), 1);
        assert_eq!(limiter.hit("a"), 2);
        assert_eq!(limiter.hit("b"), 1);
        assert_eq!(limiter.peek("a"), 2);
        assert_eq!(limiter.peek("c"), 0);
    }
}
