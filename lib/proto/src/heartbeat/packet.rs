//! The heartbeat datagram: a fixed 55-byte big-endian record authenticated by a truncated HMAC-SHA256.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A session key, given to the NCU over the TLS control channel.
pub type Key = [u8; 32];

/// The length of every heartbeat datagram, whatever its kind.
pub const PACKET_LEN: usize = 55;

const MAGIC: &[u8; 2] = b"TH";
const VERSION: u8 = 1;
const MAC_LEN: usize = 16;
const BODY_LEN: usize = PACKET_LEN - MAC_LEN;

/// What a datagram is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HBS → NCU probe of one address.
    Ping,
    /// NCU → HBS answer to a ping, echoing it and carrying the NCU's load.
    Pong,
    /// NCU → HBS announcement of where pings for an uplink should go (NAT traversal).
    Hello,
}

/// The fields of a heartbeat datagram; fields a kind does not use are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// What the datagram is for.
    pub kind: Kind,
    /// The NCU's session with the HBS.
    pub session: u64,
    /// The index of the NCU's uplink.
    pub uplink: u8,
    /// Probe sequence number (ping, pong) or hello sequence number (hello).
    pub seq: u64,
    /// Random per probe; echoed by the pong.
    pub nonce: [u8; 16],
    /// The NCU's load in percent (pong only).
    pub load: u16,
}

/// Why a datagram was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// Wrong length, magic, version or kind.
    #[error("malformed heartbeat datagram")]
    Malformed,
    /// The MAC does not match the key.
    #[error("heartbeat datagram failed authentication")]
    BadMac,
}

/// Serialises and authenticates `packet` with `key`.
pub fn encode(packet: &Packet, key: &Key) -> [u8; PACKET_LEN] {
    encode_with(packet, &keyed(key))
}

/// Reads kind and session without checking the MAC, to find the key.
///
/// # Errors
///
/// [`PacketError::Malformed`] for a wrong length, magic, version or kind.
pub fn peek(bytes: &[u8]) -> Result<(Kind, u64), PacketError> {
    let (kind, session, _) = peek_header(bytes)?;
    Ok((kind, session))
}

/// Parses `bytes` and checks its MAC against `key` in constant time.
///
/// # Errors
///
/// [`PacketError::Malformed`] for a wrong length, magic, version or kind; [`PacketError::BadMac`] when the MAC does
/// not verify.
pub fn decode(bytes: &[u8], key: &Key) -> Result<Packet, PacketError> {
    decode_with(bytes, &keyed(key))
}

/// A MAC state already keyed, so that per-packet work skips the key schedule.
pub(crate) type Keyed = Hmac<Sha256>;

/// Prepares the MAC state for `key`.
pub(crate) fn keyed(key: &Key) -> Keyed {
    // HMAC pads a key shorter than the 64-byte block with zeros, so this is HMAC(key) without a fallible constructor.
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    <Keyed as KeyInit>::new(&block.into())
}

/// Like [`encode`] with a prepared key.
pub(crate) fn encode_with(packet: &Packet, keyed: &Keyed) -> [u8; PACKET_LEN] {
    let mut out = [0u8; PACKET_LEN];
    out[0..2].copy_from_slice(MAGIC);
    out[2] = VERSION;
    out[3] = kind_byte(packet.kind);
    out[4..12].copy_from_slice(&packet.session.to_be_bytes());
    out[12] = packet.uplink;
    out[13..21].copy_from_slice(&packet.seq.to_be_bytes());
    out[21..37].copy_from_slice(&packet.nonce);
    out[37..39].copy_from_slice(&packet.load.to_be_bytes());
    let mut mac = keyed.clone();
    mac.update(&out[..BODY_LEN]);
    let tag = mac.finalize().into_bytes();
    out[BODY_LEN..].copy_from_slice(&tag[..MAC_LEN]);
    out
}

/// Like [`decode`] with a prepared key.
pub(crate) fn decode_with(bytes: &[u8], keyed: &Keyed) -> Result<Packet, PacketError> {
    let (kind, session, uplink) = peek_header(bytes)?;
    let mut mac = keyed.clone();
    mac.update(&bytes[..BODY_LEN]);
    mac.verify_truncated_left(&bytes[BODY_LEN..]).map_err(|_| PacketError::BadMac)?;
    Ok(Packet {
        kind,
        session,
        uplink,
        seq: u64::from_be_bytes(array(&bytes[13..21])),
        nonce: array(&bytes[21..37]),
        load: u16::from_be_bytes(array(&bytes[37..39])),
    })
}

/// Reads kind, session and uplink without checking the MAC; validates length, magic, version and kind.
pub(crate) fn peek_header(bytes: &[u8]) -> Result<(Kind, u64, u8), PacketError> {
    if bytes.len() != PACKET_LEN || &bytes[0..2] != MAGIC || bytes[2] != VERSION {
        return Err(PacketError::Malformed);
    }
    let kind = match bytes[3] {
        1 => Kind::Ping,
        2 => Kind::Pong,
        3 => Kind::Hello,
        _ => return Err(PacketError::Malformed),
    };
    Ok((kind, u64::from_be_bytes(array(&bytes[4..12])), bytes[12]))
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Ping => 1,
        Kind::Pong => 2,
        Kind::Hello => 3,
    }
}

/// Copies a slice whose length the caller has already fixed.
fn array<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(slice);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Key = [7; 32];

    fn sample(kind: Kind) -> Packet {
        Packet {
            kind,
            session: 0x0102_0304_0506_0708,
            uplink: 3,
            seq: 0x1122_3344_5566_7788,
            nonce: [0xa5; 16],
            load: 42,
        }
    }

    #[test]
    fn round_trips_every_kind() {
        for kind in [Kind::Ping, Kind::Pong, Kind::Hello] {
            let packet = sample(kind);
            let bytes = encode(&packet, &KEY);
            assert_eq!(bytes.len(), PACKET_LEN);
            assert_eq!(decode(&bytes, &KEY), Ok(packet));
            assert_eq!(peek(&bytes), Ok((kind, packet.session)));
        }
    }

    #[test]
    fn layout_is_big_endian_with_magic_and_version() {
        let bytes = encode(&sample(Kind::Pong), &KEY);
        assert_eq!(&bytes[0..4], b"TH\x01\x02");
        assert_eq!(&bytes[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(bytes[12], 3);
        assert_eq!(&bytes[13..21], &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        assert_eq!(&bytes[37..39], &[0, 42]);
    }

    #[test]
    fn mac_is_truncated_hmac_sha256_of_the_body() {
        let bytes = encode(&sample(Kind::Ping), &KEY);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&KEY).expect("any key length");
        mac.update(&bytes[..BODY_LEN]);
        assert_eq!(&mac.finalize().into_bytes()[..16], &bytes[BODY_LEN..]);
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let bytes = encode(&sample(Kind::Pong), &KEY);
        for bit in 0..PACKET_LEN * 8 {
            let mut flipped = bytes;
            flipped[bit / 8] ^= 1 << (bit % 8);
            let err = decode(&flipped, &KEY).expect_err("a flipped bit must not verify");
            assert!(matches!(err, PacketError::BadMac | PacketError::Malformed), "bit {bit}: {err:?}");
        }
    }

    #[test]
    fn wrong_key_is_bad_mac() {
        let bytes = encode(&sample(Kind::Hello), &KEY);
        assert_eq!(decode(&bytes, &[8; 32]), Err(PacketError::BadMac));
    }

    #[test]
    fn wrong_length_magic_version_or_kind_is_malformed() {
        let bytes = encode(&sample(Kind::Ping), &KEY);
        assert_eq!(decode(&bytes[..PACKET_LEN - 1], &KEY), Err(PacketError::Malformed));
        let mut long = bytes.to_vec();
        long.push(0);
        assert_eq!(decode(&long, &KEY), Err(PacketError::Malformed));
        assert_eq!(decode(&[], &KEY), Err(PacketError::Malformed));
        for (index, value) in [(0, b'X'), (1, b'X'), (2, 2), (2, 0), (3, 0), (3, 4)] {
            let mut bad = bytes;
            bad[index] = value;
            assert_eq!(decode(&bad, &KEY), Err(PacketError::Malformed), "byte {index} = {value}");
            assert_eq!(peek(&bad), Err(PacketError::Malformed), "byte {index} = {value}");
        }
    }
}
