//! DNS over TCP: an accept loop and one task per connection that reads length-prefixed messages one at a time,
//! answers what the fast path answers ([`server::answer_fast`], as over UDP) and hands the rest to the catalog.
//!
//! It does what hickory's TCP server did for dns: no answer to sources it cannot answer, a connection closed when no
//! message arrives within the idle timeout (or a message takes longer than that), messages of one connection handled
//! in order, FORMERR for undecodable queries, silence for responses, whole answers (no truncation) with their length
//! prefix. No rate limiting (RRL is for UDP) and no minimal ANY (over TCP, ANY gets every RRset).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::rr::Record,
    server::{RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Mutex,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::{
    metrics::KindLabel,
    server::{self, Handler},
    sync::Shared,
    udp::usable_source,
    view::View,
};

/// How long a connection may stay idle, and how many may be open at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Closed when no message arrives within this long (or a message takes longer).
    pub idle: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub total: usize,
    /// Connections open at once from one source (IPv6: one /64).
    pub per_source: usize,
}

/// Open connections by source, each released when its task ends (even by a panic).
#[derive(Default)]
struct Open(std::sync::Mutex<HashMap<IpAddr, usize>>);

impl Open {
    /// A slot for a connection from `source`, or why there is none.
    fn take(self: &Arc<Self>, source: IpAddr, limits: &Limits) -> Result<Slot, &'static str> {
        let mut open = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if open.values().sum::<usize>() >= limits.total {
            return Err("total");
        }
        let count = open.entry(source).or_default();
        if *count >= limits.per_source {
            return Err("per_source");
        }
        *count += 1;
        Ok(Slot { open: self.clone(), source })
    }
}

struct Slot {
    open: Arc<Open>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// The key connections are counted under: the address, or for IPv6 its /64 (one subscriber's LAN).
fn source_key(src: SocketAddr) -> IpAddr {
    match src.ip() {
        IpAddr::V4(ip) => IpAddr::V4(ip),
        IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(ip.to_bits() & !u128::from(u64::MAX))),
    }
}

/// Serves DNS on `listener` until `shutdown`; open connections are closed then.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    let open = Arc::new(Open::default());
    // Refusals are logged at most once a second, with how many there were: a flood must not flood the log too.
    let mut refused_since_log = 0_u64;
    let mut last_log: Option<std::time::Instant> = None;
    let result = loop {
        let (stream, src) = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if matches!(error.kind(), io::ErrorKind::NotConnected | io::ErrorKind::ConnectionAborted) => {
                    break Err(error);
                }
                Err(error) => {
                    debug!(%error, "TCP accept failed");
                    continue;
                }
            },
        };
        if !usable_source(src) {
            continue;
        }
        while connections.try_join_next().is_some() {}
        let slot = match open.take(source_key(src), &limits) {
            Ok(slot) => slot,
            Err(cap) => {
                // Dropping the stream closes it: the peer sees the connection end before any answer.
                drop(stream);
                handler.shared().metrics.tcp_refused.get_or_create(&KindLabel { kind: cap }).inc();
                refused_since_log += 1;
                if last_log.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    let (total, per_source) = (limits.total, limits.per_source);
                    info!(%src, cap, total, per_source, refused = refused_since_log,
                        "DNS-over-TCP connection refused: too many open (tcp_max_connections, tcp_max_connections_per_source)");
                    refused_since_log = 0;
                    last_log = Some(std::time::Instant::now());
                }
                continue;
            }
        };
        connections.spawn(connection(stream, src, handler.clone(), limits.idle, shutdown.clone(), slot));
    };
    connections.shutdown().await;
    result
}

/// The answer to `packet` (a message without its length prefix) from the fast path, with its length prefix,
/// appended to `out`; `false` (and `out` untouched) when the catalog must answer.
pub fn answer_fast(shared: &Shared, view: &View, packet: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    let answered = server::answer_fast(shared, view, packet, out).is_some();
    match u16::try_from(out.len() - start - 2) {
        Ok(len) if answered => {
            out[start..start + 2].copy_from_slice(&len.to_be_bytes());
            true
        }
        _ => {
            out.truncate(start);
            false
        }
    }
}

/// One connection: message after message until the peer closes, stays idle past `idle`, or `shutdown`.
async fn connection(
    stream: TcpStream,
    src: SocketAddr,
    handler: Arc<Handler>,
    idle: Duration,
    shutdown: CancellationToken,
    // Held for as long as the connection is open.
    _slot: Slot,
) {
    let (mut reader, writer) = stream.into_split();
    let writer = Arc::new(Mutex::new(writer));
    let mut out = Vec::with_capacity(wire_capacity());
    loop {
        let packet = tokio::select! {
            () = shutdown.cancelled() => return,
            read = tokio::time::timeout(idle, read_message(&mut reader)) => match read {
                Ok(Ok(packet)) => packet,
                Ok(Err(error)) => {
                    debug!(%error, "TCP connection closed");
                    return;
                }
                Err(_) => {
                    debug!("TCP connection idle; closed");
                    return;
                }
            },
        };
        out.clear();
        let fast = answer_fast(handler.shared(), &handler.shared().view.load(), &packet, &mut out);
        if fast {
            if let Err(error) = writer.lock().await.write_all(&out).await {
                debug!(%error, "TCP send failed");
                return;
            }
            continue;
        }
        handle_with_catalog(&handler, packet, src, TcpResponder { writer: writer.clone() }).await;
    }
}

fn wire_capacity() -> usize {
    2 + crate::wire::MAX_PLAIN_UDP
}

/// One length-prefixed message.
async fn read_message(reader: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let len = reader.read_u16().await?;
    let mut packet = vec![0; usize::from(len)];
    reader.read_exact(&mut packet).await?;
    Ok(packet)
}

/// What hickory's server does with a message before its handler sees it, then the handler.
async fn handle_with_catalog<W>(handler: &Handler, packet: Vec<u8>, src: SocketAddr, mut responder: TcpResponder<W>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Some(request) = server::decode_request(handler, packet, src, Protocol::Tcp, &mut responder).await else {
        return;
    };
    handler.handle_request::<_, TokioTime>(&request, responder).await;
}

/// Writes the catalog's responses (one, or several for a zone transfer) to the connection, each with its length.
struct TcpResponder<W> {
    writer: Arc<Mutex<W>>,
}

impl<W> Clone for TcpResponder<W> {
    fn clone(&self) -> Self {
        Self { writer: self.writer.clone() }
    }
}

#[async_trait::async_trait]
impl<W: AsyncWrite + Unpin + Send + 'static> ResponseHandler for TcpResponder<W> {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let (info, bytes) = server::encode_within(response, u16::MAX)?;
        let len = u16::try_from(bytes.len()).map_err(|_| NetError::from("response over 65,535 bytes"))?;
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        self.writer.lock().await.write_all(&framed).await?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use hickory_server::proto::{
        op::{Message, ResponseCode},
        rr::RecordType,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::udp::tests::{by_catalog, handler, query};

    async fn read_answer(stream: &mut TcpStream) -> Vec<u8> {
        let wait = tokio::time::timeout(Duration::from_secs(5), read_message(stream));
        wait.await.expect("answered in time").expect("an answer")
    }

    #[tokio::test]
    async fn answers_pipelined_messages_in_order_like_the_catalog_then_closes_when_idle() {
        let handler = Arc::new(handler());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let limits = Limits { idle: Duration::from_millis(400), total: 8, per_source: 8 };
        let task = tokio::spawn(serve(listener, handler.clone(), limits, shutdown.clone()));
        let mut stream = TcpStream::connect(addr).await.expect("connect");

        // The fast path's kinds and the catalog's, back to back in one write.
        let cases = [
            ("ns1.example.test.", RecordType::A, Some(1232), true),
            ("V6.Example.test.", RecordType::AAAA, None, true),
            ("_http._tcp.www.example.test.", RecordType::SRV, Some(1232), true),
            ("nope.example.test.", RecordType::A, None, true),
            ("www.example.test.", RecordType::AAAA, Some(4096), true),
            ("example.test.", RecordType::SOA, None, false),
            ("www.example.test.", RecordType::TXT, Some(1232), false),
            ("www.example.org.", RecordType::A, None, false),
        ];
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        for (i, (name, rtype, edns, _)) in cases.iter().enumerate() {
            let packet = query(name, *rtype, *edns, 100 + u16::try_from(i).expect("id"), true);
            bytes.extend_from_slice(&u16::try_from(packet.len()).expect("len").to_be_bytes());
            bytes.extend_from_slice(&packet);
            packets.push(packet);
        }
        stream.write_all(&bytes).await.expect("send");
        for ((name, rtype, _, fast), packet) in cases.iter().zip(&packets) {
            let answer = read_answer(&mut stream).await;
            let mut out = Vec::new();
            let view = handler.shared().view.load_full();
            assert_eq!(answer_fast(handler.shared(), &view, packet, &mut out), *fast, "{name} {rtype}");
            assert_eq!(answer, by_catalog(&handler, packet).await, "{name} {rtype}");
        }

        // ANY over TCP gets every RRset (two A and a TXT at www), not the minimal answer of UDP.
        let any = query("www.example.test.", RecordType::ANY, None, 7, false);
        stream.write_all(&u16::try_from(any.len()).expect("len").to_be_bytes()).await.expect("send");
        stream.write_all(&any).await.expect("send");
        let message = Message::from_vec(&read_answer(&mut stream).await).expect("decodes");
        assert_eq!(message.answers.len(), 3, "{:?}", message.answers);

        // Garbage after a header: FORMERR.
        let garbage = [0, 5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63];
        stream.write_all(&[0, 13]).await.expect("send");
        stream.write_all(&garbage).await.expect("send");
        let message = Message::from_vec(&read_answer(&mut stream).await).expect("decodes");
        assert_eq!(message.metadata.response_code, ResponseCode::FormErr);

        // Idle past the timeout: closed.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0))), "closed after the idle timeout: {closed:?}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("joins").expect("ok");
    }

    /// Opens a connection from `source` and tells whether dns keeps it open (answers a query on it).
    async fn kept_open(addr: SocketAddr, source: &str) -> Option<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(format!("{source}:0").parse().expect("source")).expect("bind");
        let mut stream = socket.connect(addr).await.expect("connect");
        let packet = query("ns1.example.test.", RecordType::A, None, 9, true);
        let mut framed = u16::try_from(packet.len()).expect("len").to_be_bytes().to_vec();
        framed.extend_from_slice(&packet);
        // A refused connection may be closed before or after this write: either the write or the read fails.
        if stream.write_all(&framed).await.is_err() {
            return None;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), read_message(&mut stream)).await.expect("in time");
        read.ok().map(|_| stream)
    }

    #[tokio::test]
    async fn connections_past_the_caps_are_closed_and_counted() {
        let handler = Arc::new(handler());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let limits = Limits { idle: Duration::from_secs(30), total: 3, per_source: 2 };
        let task = tokio::spawn(serve(listener, handler.clone(), limits, shutdown.clone()));
        let refused = |kind| handler.shared().metrics.tcp_refused.get_or_create(&KindLabel { kind }).get();

        let first = kept_open(addr, "127.0.0.1").await.expect("first from .1 kept");
        let second = kept_open(addr, "127.0.0.1").await.expect("second from .1 kept");
        assert!(kept_open(addr, "127.0.0.1").await.is_none(), "a third from .1 is over the per-source cap");
        assert_eq!(refused("per_source"), 1);
        let other = kept_open(addr, "127.0.0.2").await.expect("another source has its own count");
        assert!(kept_open(addr, "127.0.0.3").await.is_none(), "a fourth in all is over the total");
        assert_eq!(refused("total"), 1);

        // Closing one frees its slot (its task ends when it reads the close).
        drop(first);
        let again = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(stream) = kept_open(addr, "127.0.0.1").await {
                    break stream;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a slot is freed once a connection closes");
        drop((second, other, again));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops").expect("joins").expect("ok");
    }
}
