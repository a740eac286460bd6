//! A minimal DNS client over real UDP and TCP sockets, with hickory-proto doing the wire format.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

/// How to ask.
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    /// One datagram, no EDNS: answers are limited to 512 bytes.
    Udp,
    /// One datagram with EDNS advertising this payload size.
    UdpEdns(u16),
    /// Length-prefixed over TCP.
    Tcp,
}

/// Builds a query with a random id and RD clear.
pub fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Result<Message> {
    let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    message.add_query(Query::query(Name::from_ascii(name)?, rtype));
    if let Some(size) = edns {
        let mut opt = Edns::new();
        opt.set_max_payload(size);
        message.set_edns(opt);
    }
    Ok(message)
}

/// Sends one query and returns the parsed response.
pub async fn ask(server: SocketAddr, name: &str, rtype: RecordType, transport: Transport) -> Result<Message> {
    let edns = match transport {
        Transport::UdpEdns(size) => Some(size),
        _ => None,
    };
    let request = query(name, rtype, edns)?;
    let bytes = request.to_vec()?;
    let reply = match transport {
        Transport::Udp | Transport::UdpEdns(_) => exchange_udp(server, &bytes).await?,
        Transport::Tcp => exchange_tcp(server, &bytes).await?,
    };
    let response = Message::from_vec(&reply).context("parsing the response")?;
    anyhow::ensure!(response.metadata.id == request.metadata.id, "response id mismatch");
    Ok(response)
}

/// Sends raw bytes over UDP and waits up to 2 s for a datagram back.
pub async fn exchange_udp(server: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let any: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0_u16; 8], 0).into() };
    let socket = UdpSocket::bind(any).await?;
    socket.send_to(bytes, server).await?;
    let mut buf = vec![0_u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .context("no UDP answer within 2 s")??;
    buf.truncate(n);
    Ok(buf)
}

/// Sends raw bytes over TCP, length-prefixed, and waits up to 2 s for the response.
pub async fn exchange_tcp(server: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(bytes.len())?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(bytes).await?;
    let mut len = [0_u8; 2];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut len))
        .await
        .context("no TCP answer within 2 s")??;
    let mut buf = vec![0_u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// The A and AAAA addresses in the answer section, in order.
pub fn addresses(message: &Message) -> Vec<String> {
    addresses_in(&message.answers)
}

/// The A and AAAA addresses among `records`, in order.
pub fn addresses_in(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(aaaa) => Some(aaaa.0.to_string()),
            _ => None,
        })
        .collect()
}

/// Sorted copy, for comparing sets.
pub fn sorted(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list
}
