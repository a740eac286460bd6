//! The DNS front: a hickory `RequestHandler` that hands each query to the current view's catalog (over TCP, and
//! over UDP for what [`crate::udp`] does not answer itself).

use std::sync::Arc;

use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
};

use crate::sync::Shared;

/// Answers from whatever view is current when the query arrives.
pub struct Handler {
    shared: Arc<Shared>,
}

impl Handler {
    /// A handler over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
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
        let info = view.catalog().handle_request::<R, T>(request, response_handle).await;
        self.shared.metrics.count_response(u16::from(info.response_code));
        info
    }
}
