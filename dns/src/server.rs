//! The DNS front: the fast path both transports try first ([`answer_fast`]), and a hickory `RequestHandler` that
//! hands every other query to the current view's catalog (over UDP from [`crate::udp`], over TCP from
//! [`crate::tcp`]).

use std::sync::Arc;

use hickory_server::{
    net::{NetError, runtime::Time},
    proto::{
        op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode},
        rr::{Record, RecordType},
        serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder, Queries},
};
use tracing::warn;

use crate::{
    sync::Shared,
    view::View,
    wire,
    xfr::{self, TsigKey},
};

/// The fast path: the answer to a plain query with a prebuilt answer ([`View::answer`]), appended to `out` and
/// counted in `shared`'s metrics; its response code, or `None` (and `out` untouched) when the catalog must answer.
pub fn answer_fast(shared: &Shared, view: &View, packet: &[u8], out: &mut Vec<u8>) -> Option<u16> {
    let query = wire::parse(packet)?;
    let rcode = u16::from(view.answer(&query, out)?);
    shared.metrics.count_response(rcode);
    Some(rcode)
}

/// What hickory's server does with a message before its handler sees it: a query that does not decode gets FORMERR
/// (through `responder`, counted), a response gets nothing; `None` in both cases, the request otherwise.
pub(crate) async fn decode_request<R: ResponseHandler>(
    handler: &Handler,
    packet: Vec<u8>,
    src: std::net::SocketAddr,
    protocol: hickory_server::net::xfer::Protocol,
    responder: &mut R,
) -> Option<Request> {
    let header = Header::read(&mut BinDecoder::new(&packet)).ok()?;
    let request = match Request::from_bytes(packet, src, protocol) {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, "undecodable query");
            let queries = Queries::read(&mut BinDecoder::new(&[]), 0).ok()?;
            let response =
                MessageResponseBuilder::new(&queries, None).error_msg(&header.metadata, ResponseCode::FormErr);
            if let Ok(info) = responder.send_response(response).await {
                handler.shared().metrics.count_response(u16::from(info.response_code));
            }
            return None;
        }
    };
    (request.metadata.message_type != MessageType::Response).then_some(request)
}

/// Encodes a catalog response within `limit` bytes, as hickory's server does (truncated when over, with TC); an
/// encoding failure becomes a bare SERVFAIL.
pub(crate) fn encode_within<'a>(
    response: MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    limit: u16,
) -> Result<(ResponseInfo, Vec<u8>), NetError> {
    let id = response.metadata().id;
    let mut bytes = Vec::with_capacity(512);
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(limit);
    let error = match response.destructive_emit(&mut encoder) {
        Ok(info) => return Ok((info, bytes)),
        Err(error) => error,
    };
    warn!(%error, "cannot encode response");
    bytes.clear();
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(512);
    let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
    metadata.response_code = ResponseCode::ServFail;
    let header = Header { metadata, counts: HeaderCounts::default() };
    header.emit(&mut encoder)?;
    Ok((ResponseInfo::from(header), bytes))
}

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
