//! The DNS front: a hickory `RequestHandler` that hands each query to the current view's catalog (over TCP, and
//! over UDP for what [`crate::udp`] does not answer itself).

use std::sync::Arc;

use hickory_server::{
    net::runtime::Time,
    proto::{op::OpCode, rr::RecordType},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
};

use crate::{
    sync::Shared,
    xfr::{self, TsigKey},
};

/// Answers from whatever view is current when the query arrives.
pub struct Handler {
    shared: Arc<Shared>,
    /// The configuration file's TSIG keys, for transfers.
    keys: Arc<[TsigKey]>,
    /// Where UPDATE writes; without it UPDATE is not implemented.
    pool: Option<sqlx::PgPool>,
}

impl Handler {
    /// A handler over `shared`, without TSIG keys of its own (zones may still have theirs).
    pub fn new(shared: Arc<Shared>) -> Self {
        Self::with_keys(shared, Arc::from([]))
    }

    /// A handler over `shared` with the configuration file's TSIG keys.
    pub fn with_keys(shared: Arc<Shared>, keys: Arc<[TsigKey]>) -> Self {
        Self { shared, keys, pool: None }
    }

    /// The same handler, applying RFC 2136 UPDATE through `pool`.
    pub fn with_pool(self, pool: sqlx::PgPool) -> Self {
        Self { pool: Some(pool), ..self }
    }

    /// The view and metrics it answers from.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        // One atomic load and a reference count; it keeps this view alive for the query even if a newer one is swapped in.
        let view = self.shared.view.load_full();
        let transfer = request.metadata.op_code == OpCode::Query
            && request
                .queries
                .queries()
                .first()
                .is_some_and(|q| matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR));
        let info = if transfer {
            xfr::serve::serve(&view, &self.keys, &self.shared.metrics, request, response_handle).await
        } else if let (OpCode::Update, Some(pool)) = (request.metadata.op_code, &self.pool) {
            crate::update::serve(pool, &view, &self.shared, request, response_handle).await
        } else {
            view.catalog().handle_request::<R, T>(request, response_handle).await
        };
        self.shared.metrics.count_response(u16::from(info.response_code));
        info
    }
}
