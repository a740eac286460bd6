//! The NCU/HBS ↔ HDS protocol (QUIC, ALPN `tether-hds/1`): one request and one response per bidirectional stream,
//! each a length-prefixed JSON frame carrying a protocol version.

use serde::{Deserialize, Serialize};

use crate::frame;
pub use crate::frame::FrameError;

/// ALPN of the protocol.
pub const ALPN: &[u8] = b"tether-hds/1";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 64 * 1024;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Exchange a one-time token and a CSR for a client certificate. Needs no client certificate.
    Enroll {
        /// The token from `POST /v1/domains/{name}/enrollments`.
        token: String,
        /// PKCS#10 request, PEM.
        csr: String,
        /// Hardware serial number, for display.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        serial: Option<String>,
        /// MAC address, for display.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    /// Exchange a new CSR for a new certificate of the same NCU, before the current one expires. Needs the NCU's
    /// (current) client certificate. The old certificate stays valid until the new one is first used.
    Renew {
        /// PKCS#10 request for the new key, PEM.
        csr: String,
    },
    /// Ask for a primary and a backup heartbeat server. Needs the NCU's client certificate.
    Assign {
        /// Servers the NCU found unreachable; never assigned back.
        #[serde(default)]
        failed: Vec<String>,
    },
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The NCU's certificate.
    Enrolled {
        /// Client certificate, PEM.
        certificate: String,
        /// The domain it is bound to.
        domain: String,
    },
    /// The NCU's new certificate (after `Renew`).
    Renewed {
        /// Client certificate, PEM.
        certificate: String,
    },
    /// The heartbeat servers to use.
    Assignment {
        /// Register here.
        primary: HeartbeatServer,
        /// Move here when the primary stops; absent when only one server is active.
        backup: Option<HeartbeatServer>,
    },
    /// The request was refused.
    Error {
        /// Stable, machine-readable reason.
        code: ErrorCode,
        /// For a person.
        message: String,
    },
}

/// A heartbeat server as handed to an NCU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatServer {
    /// Its name (the `heartbeat_servers` key, also in its certificate).
    pub name: String,
    /// QUIC control address, `host:port`.
    pub address: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be parsed.
    Malformed,
    /// The frame exceeded [`MAX_FRAME`].
    TooLarge,
    /// The client speaks another protocol version.
    UnsupportedVersion,
    /// The token is unknown.
    UnknownToken,
    /// The token was used already.
    TokenUsed,
    /// The token has expired.
    TokenExpired,
    /// The CSR could not be used.
    BadCsr,
    /// The request needs a client certificate.
    CertificateRequired,
    /// The certificate is not (or no longer) enrolled, e.g. its domain was deleted.
    UnknownCertificate,
    /// No heartbeat server can take the NCU now; retry later.
    NoServer,
    /// The server could not complete the request; retry later.
    Unavailable,
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error { code, message: message.into() }
    }
}

/// The response code that reports a frame error to the peer.
pub fn error_code(error: &FrameError) -> ErrorCode {
    match error {
        FrameError::TooLarge { .. } => ErrorCode::TooLarge,
        FrameError::Version { .. } => ErrorCode::UnsupportedVersion,
        FrameError::Truncated | FrameError::Malformed(_) | FrameError::Stream(_) => ErrorCode::Malformed,
    }
}

/// Encodes a message as one frame of this protocol.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    frame::encode(VERSION, body)
}

/// Decodes one whole frame of this protocol.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, FrameError> {
    frame::decode(VERSION, MAX_FRAME, bytes)
}

/// The host part of `host:port` or `[v6]:port`: the name the server's certificate must carry.
pub fn host_of(address: &str) -> &str {
    match address.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => address,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let request = Request::Assign { failed: vec!["hbs-a".into()] };
        assert_eq!(decode::<Request>(&encode(&request)), Ok(request));
        let response = Response::Assignment {
            primary: HeartbeatServer { name: "a".into(), address: "127.0.0.1:1".into() },
            backup: None,
        };
        assert_eq!(decode::<Response>(&encode(&response)), Ok(response));
    }

    #[test]
    fn refusals_are_specific() {
        assert_eq!(decode::<Request>(b"\x00\x00"), Err(FrameError::Truncated));
        assert_eq!(decode::<Request>(b"\x00\x00\x00\x09{}"), Err(FrameError::Truncated));
        assert!(matches!(decode::<Request>(b"\x00\x01\x00\x01"), Err(FrameError::TooLarge { .. })));
        let v2 = br#"{"version":2,"body":{"type":"teleport"}}"#;
        let mut frame = (v2.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(v2);
        assert_eq!(decode::<Request>(&frame), Err(FrameError::Version { got: 2, expected: 1 }));
        let unknown = br#"{"version":1,"body":{"type":"teleport"}}"#;
        let mut frame = (unknown.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(unknown);
        assert!(matches!(decode::<Request>(&frame), Err(FrameError::Malformed(_))));
        let extra = br#"{"version":1,"body":{"type":"assign","failed":[],"x":1}}"#;
        let mut frame = (extra.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(extra);
        assert!(matches!(decode::<Request>(&frame), Err(FrameError::Malformed(_))), "unknown fields refused");
    }
}
