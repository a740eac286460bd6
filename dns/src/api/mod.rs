//! The admin API: JSON over HTTP with bearer tokens. The operator creates subscribers and zones; each subscriber
//! manages only its own domains.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{FromRequestParts, Request, State},
    http::{StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::{store, sync::Shared};

pub mod dyndns;
mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod input;
mod migrations;
mod routes;
mod status;

pub use error::ApiError;
pub use migrations::MigrationSettings;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Postgres.
    pub pool: PgPool,
    /// The served view and metrics.
    pub shared: Arc<Shared>,
    /// SHA-256 of the operator token; `None` disables operator routes.
    pub operator_token_hash: Option<[u8; 32]>,
    /// Lifetime of enrollment tokens.
    pub enrollment_ttl: Duration,
    /// The configuration file's TSIG keys, which transfer policies may name.
    pub tsig_keys: Arc<[crate::xfr::TsigKey]>,
    /// Proxies whose `X-Forwarded-For` names a dyndns client's address.
    pub dyndns_trusted_proxies: Arc<[ipnet::IpNet]>,
    /// Rate limits of dyndns failed logins (per source) and no-change updates (per credential).
    pub dyndns_limiter: Arc<dyndns::Limiter>,
    /// Where this server answers DNS: the status page asks it as a resolver would.
    pub dns_addr: std::net::SocketAddr,
    /// Host migration defaults.
    pub migrations: MigrationSettings,
    /// Per-tenant bounds.
    pub bounds: Bounds,
    /// Requests per token per second.
    pub token_limiter: Arc<dyndns::Limiter>,
    /// Tokens found unknown lately: refused without asking Postgres, so a flood of bogus tokens cannot take the
    /// connections the API and the view sync need.
    pub bad_tokens: Arc<dyndns::Limiter>,
}

/// What one tenant may hold and ask; the operator sets them in the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Addresses per domain (static, and NCUs enrolled).
    pub addresses_per_domain: u32,
    /// Domains per subscriber.
    pub domains_per_subscriber: u32,
    /// API requests per token per second.
    pub requests_per_second: u32,
}

/// Largest request body the API reads.
pub const MAX_BODY: usize = 64 * 1024;

/// Who is calling, from the bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The operator: everything.
    Operator,
    /// A subscriber: only its own domains.
    Subscriber(i64),
}

/// The admin API's routes.
pub fn router(state: AppState) -> Router {
    tether_service::http::routes(state.shared.clone())
        .route("/v1/openapi.json", get(routes::openapi))
        .route("/v1/subscribers", post(routes::create_subscriber))
        .route("/v1/zones", post(routes::create_zone).get(routes::list_zones))
        .route("/v1/zones/{origin}/transfer", get(routes::get_transfer).put(routes::put_transfer))
        .route("/v1/domains", post(routes::create_domain).get(routes::list_domains))
        .route("/v1/domains/{name}", get(routes::get_domain).delete(routes::delete_domain))
        .route("/v1/domains/{name}/addresses", post(routes::add_address))
        .route("/v1/domains/{name}/addresses/{ip}", delete(routes::delete_address))
        .route("/v1/domains/{name}/services", axum::routing::put(routes::put_services))
        .route("/v1/domains/{name}/forwarding", axum::routing::put(routes::put_forwarding))
        .route("/v1/domains/{name}/txt", get(routes::get_txt).put(routes::put_txt))
        .route("/v1/domains/{name}/migrations", post(migrations::create).get(migrations::list))
        .route("/v1/domains/{name}/migrations/{id}", get(migrations::get).delete(migrations::delete))
        .route("/v1/domains/{name}/enrollments", post(routes::create_enrollment))
        .route("/v1/domains/{name}/ncus/{id}", delete(routes::delete_ncu))
        .route(
            "/v1/domains/{name}/dyndns-credentials",
            post(routes::create_dyndns_credential).get(routes::list_dyndns_credentials),
        )
        .route("/v1/domains/{name}/dyndns-credentials/{username}", delete(routes::delete_dyndns_credential))
        .route("/nic/update", get(dyndns::update))
        .route("/v1/domains/{name}/update-keys", post(routes::create_update_key).get(routes::list_update_keys))
        .route("/v1/domains/{name}/update-keys/{key}", delete(routes::delete_update_key))
        .route("/v1/domains/{name}/events", get(status::domain_events))
        .route("/v1/domains/{name}/answer", get(status::answer))
        .route("/v1/events", get(status::handovers))
        .route("/v1/changes", get(status::changes))
        .route("/ui", get(status::ui_root))
        .route("/ui/", get(status::ui_file))
        .route("/ui/{file}", get(status::ui_file))
        .route("/v1/heartbeat-servers", get(routes::list_heartbeat_servers))
        .route("/v1/heartbeat-servers/{name}/drain", post(routes::drain_heartbeat_server))
        .route("/v1/heartbeat-servers/{name}/activate", post(routes::activate_heartbeat_server))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count_responses))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// SHA-256 of a token, as stored and compared.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token with a readable prefix, e.g. `tsub_…`.
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0_u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized("missing Authorization: Bearer <token>"));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
        let hash = token_hash(token);
        let key = hex::encode(&hash[..16]);
        if state.token_limiter.hit(&key) > state.bounds.requests_per_second {
            tracing::warn!(token = %&key[..8], "API requests over the per-token rate");
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!("more than {} requests per second with this token", state.bounds.requests_per_second),
            ));
        }
        let operator = state
            .operator_token_hash
            .is_some_and(|expected| bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &hash[..])));
        if operator {
            return Ok(Self::Operator);
        }
        if state.bad_tokens.peek(&key) > 0 {
            return Err(ApiError::unauthorized("unknown token"));
        }
        match store::admin::subscriber_by_token(&state.pool, &hash).await? {
            Some(subscriber) => Ok(Self::Subscriber(subscriber.id)),
            None => {
                state.bad_tokens.hit(&key);
                tracing::info!(token = %&key[..8], "unknown API token");
                Err(ApiError::unauthorized("unknown token"))
            }
        }
    }
}

impl Caller {
    /// Refuses anyone but the operator.
    pub fn require_operator(self) -> Result<(), ApiError> {
        match self {
            Self::Operator => Ok(()),
            Self::Subscriber(_) => Err(ApiError::forbidden("only the operator may do this")),
        }
    }

    /// Refuses a subscriber acting on another subscriber's domain.
    pub fn require_owner(self, subscriber_id: i64) -> Result<(), ApiError> {
        match self {
            Self::Operator => Ok(()),
            Self::Subscriber(id) if id == subscriber_id => Ok(()),
            Self::Subscriber(_) => Err(ApiError::forbidden("this domain belongs to another subscriber")),
        }
    }
}

async fn count_responses(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state
        .shared
        .metrics
        .api_responses
        .get_or_create(&crate::metrics::StatusLabel { status: response.status().as_u16() })
        .inc();
    response
}

/// Shorthand for handlers that answer JSON with a status.
fn created<T: serde::Serialize>(body: T) -> Response {
    (StatusCode::CREATED, axum::Json(body)).into_response()
}
