//! What the status page reads besides the domain itself: the address history, the operator's recent handovers,
//! the name's current answer as a resolver gets it, and a long poll that returns when the served view changes; and
//! the page itself (`/ui/`), static files built into the binary, fetching nothing from elsewhere.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
    http::header,
    response::{IntoResponse, Redirect, Response},
};
use chrono::{DateTime, Utc};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query as DnsQuery},
    rr::{Name, RData, RecordType},
};
use serde::Deserialize;
use serde_json::json;

use super::{
    AppState, Caller,
    error::{ApiError, Path},
    input::display,
    routes::owned_domain,
};
use crate::store::events;

/// Most events one request returns.
const MAX_EVENTS: i64 = 5_000;
/// How long a long poll waits for a change.
const LONG_POLL: Duration = Duration::from_secs(25);

/// `?since=&after=&limit=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// RFC 3339; default: 24 hours ago.
    since: Option<DateTime<Utc>>,
    /// Only events after this one (from an earlier answer).
    #[serde(default)]
    after: i64,
    /// At most this many (default and most: 5,000).
    limit: Option<i64>,
}

/// `?after=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChangesQuery {
    #[serde(default)]
    after: u64,
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query.map(|Query(q)| q).map_err(ApiError::from)
}

fn window(q: &EventsQuery) -> Result<(DateTime<Utc>, i64), ApiError> {
    let since = q.since.unwrap_or_else(|| Utc::now() - chrono::Duration::hours(24));
    let limit = q.limit.unwrap_or(MAX_EVENTS);
    if !(1..=MAX_EVENTS).contains(&limit) {
        return Err(ApiError::invalid(format!("limit: 1 to {MAX_EVENTS}")));
    }
    if q.after < 0 {
        return Err(ApiError::invalid(format!("after: {} is not an event id (0 or more)", q.after)));
    }
    Ok((since, limit))
}

pub(super) async fn domain_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let domain = owned_domain(&state, caller, &name).await?;
    let (since, limit) = window(&q)?;
    let list = events::for_domain(&state.pool, domain.id, since, q.after, limit).await?;
    Ok(Json(list).into_response())
}

pub(super) async fn handovers(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let q = query(q)?;
    let (since, limit) = window(&q)?;
    Ok(Json(events::handovers(&state.pool, since, q.after, limit).await?).into_response())
}

pub(super) async fn changes(
    State(state): State<AppState>,
    _caller: Caller,
    q: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let mut generation = state.shared.subscribe();
    let current = *generation.borrow_and_update();
    if current <= q.after {
        let _ = tokio::time::timeout(LONG_POLL, generation.wait_for(|g| *g > q.after)).await;
    }
    let now = *generation.borrow();
    Ok(Json(json!({ "generation": now })).into_response())
}

pub(super) async fn answer(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let domain = owned_domain(&state, caller, &name).await?;
    let server = match state.dns_addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), state.dns_addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), state.dns_addr.port()),
        _ => state.dns_addr,
    };
    let mut out = serde_json::Map::new();
    out.insert("name".into(), json!(display(&domain.fqdn)));
    out.insert("server".into(), json!(server.to_string()));
    for rtype in [RecordType::A, RecordType::AAAA] {
        let key = if rtype == RecordType::A { "a" } else { "aaaa" };
        let value = match ask(server, &domain.fqdn, rtype).await {
            Ok(value) => value,
            Err(error) => json!({ "error": error }),
        };
        out.insert(key.into(), value);
    }
    Ok(Json(out).into_response())
}

/// One query over UDP to this server, as a resolver would send it: the rcode, the addresses and their TTL.
async fn ask(server: SocketAddr, fqdn: &str, rtype: RecordType) -> Result<serde_json::Value, String> {
    let name = Name::from_ascii(fqdn).map_err(|e| e.to_string())?;
    let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    message.add_query(DnsQuery::query(name, rtype));
    let bytes = message.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr =
        if server.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = tokio::net::UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    socket.send_to(&bytes, server).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0_u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let (n, from) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf))
            .await
            .map_err(|_| "no answer within 2 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let Ok(reply) = Message::from_vec(&buf[..n]) else { continue };
        if from != server || reply.metadata.id != message.metadata.id {
            continue;
        }
        let mut addresses = Vec::new();
        let mut ttl = None;
        for record in &reply.answers {
            match &record.data {
                RData::A(a) => addresses.push(a.0.to_string()),
                RData::AAAA(a) => addresses.push(a.0.to_string()),
                _ => continue,
            }
            ttl = Some(record.ttl);
        }
        return Ok(json!({ "rcode": reply.metadata.response_code.to_string(), "addresses": addresses, "ttl": ttl }));
    }
}

/// `/ui` → `/ui/`.
pub(super) async fn ui_root() -> Redirect {
    Redirect::permanent("/ui/")
}

/// The status page's files; nothing is fetched from anywhere else (the policy says so to the browser).
pub(super) async fn ui_file(file: Option<axum::extract::Path<String>>) -> Response {
    let name = file.map(|axum::extract::Path(f)| f).unwrap_or_default();
    let (body, kind) = match name.as_str() {
        "" | "index.html" => (include_str!("../../ui/index.html"), "text/html; charset=utf-8"),
        "app.js" => (include_str!("../../ui/app.js"), "text/javascript; charset=utf-8"),
        "style.css" => (include_str!("../../ui/style.css"), "text/css; charset=utf-8"),
        _ => return ApiError::not_found(format!("no file {name:?} in the status page")).into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
