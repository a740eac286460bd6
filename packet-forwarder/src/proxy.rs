//! PROXY protocol v2 headers, built by the `ppp` crate, so the site's server sees the client's address.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Protocol, Version};

/// The header announcing `client` → `destination` (the static address), for a stream or for datagrams.
pub fn header(client: SocketAddr, destination: SocketAddr, datagram: bool) -> std::io::Result<Vec<u8>> {
    let protocol = if datagram { Protocol::Datagram } else { Protocol::Stream };
    // Mixed families (an IPv4-mapped client on an IPv6 listener) cannot be told apart; the header says so.
    Builder::with_addresses(Version::Two | Command::Proxy, protocol, (unmap(client), unmap(destination))).build()
}

fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use ppp::v2::{Addresses, Header};

    use super::*;

    #[test]
    fn headers_parse_back() {
        let client: SocketAddr = "192.0.2.7:40000".parse().expect("addr");
        let static_addr: SocketAddr = "203.0.113.1:443".parse().expect("addr");
        let bytes = header(client, static_addr, false).expect("header");
        let parsed = Header::try_from(bytes.as_slice()).expect("parses");
        assert_eq!(parsed.len(), bytes.len());
        assert_eq!(parsed.protocol, Protocol::Stream);
        let Addresses::IPv4(a) = parsed.addresses else { panic!("IPv4 addresses") };
        assert_eq!((a.source_address, a.source_port), ([192, 0, 2, 7].into(), 40000));
        assert_eq!((a.destination_address, a.destination_port), ([203, 0, 113, 1].into(), 443));

        let mapped: SocketAddr = "[::ffff:192.0.2.7]:5".parse().expect("addr");
        let bytes = header(mapped, static_addr, true).expect("header");
        let parsed = Header::try_from(bytes.as_slice()).expect("parses");
        assert_eq!(parsed.protocol, Protocol::Datagram);
        assert!(matches!(parsed.addresses, Addresses::IPv4(_)));
    }
}
