//! The `/metrics` (Prometheus text) and `/healthz` (JSON) routes every server answers, and the listener that serves
//! them until shutdown.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// What a server shows on `/metrics` and `/healthz`.
pub trait Status: Send + Sync + 'static {
    /// The metrics in Prometheus text format ([`render`]).
    fn metrics(&self) -> String;
    /// Whether the server is ready (200, else 503), and a JSON object that says why.
    fn health(&self) -> (bool, String);
}

/// `GET /metrics` and `GET /healthz` for `status`, to serve alone or to merge into a router with state `T`.
pub fn routes<S: Status, T: Clone + Send + Sync + 'static>(status: Arc<S>) -> Router<T> {
    Router::new().route("/metrics", get(metrics::<S>)).route("/healthz", get(healthz::<S>)).with_state(status)
}

/// Serves `router` on `listener` until `shutdown`.
pub fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::warn!(%error, "HTTP listener did not stop cleanly");
        }
    })
}

/// A registry in Prometheus text format; an encoding failure is logged and gives what was encoded.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(error) = encode(&mut out, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    out
}

async fn metrics<S: Status>(State(status): State<Arc<S>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], status.metrics()).into_response()
}

async fn healthz<S: Status>(State(status): State<Arc<S>>) -> Response {
    let (ready, body) = status.health();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
