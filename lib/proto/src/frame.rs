//! Length-prefixed JSON frames with a protocol version: the framing of tether's QUIC control protocols.
//!
//! A frame is a 4-byte big-endian length, then `{"version": N, "body": ...}`. The version is checked before the
//! body, so a newer peer gets "unsupported version" rather than "malformed".

use serde::{Deserialize, Serialize};

/// A frame that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than its length prefix says, or no prefix.
    #[error("truncated frame")]
    Truncated,
    /// Longer than the protocol allows.
    #[error("frame of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced or received size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Another protocol version.
    #[error("unsupported protocol version {got} (this side speaks {expected})")]
    Version {
        /// What the peer sent.
        got: u16,
        /// What we speak.
        expected: u16,
    },
    /// Not the JSON we expect.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream or connection failed.
    #[error("stream: {0}")]
    Stream(String),
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    version: u16,
    body: &'a T,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming<T> {
    #[allow(dead_code)]
    version: u16,
    body: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u16,
}

/// Encodes one frame.
pub fn encode<T: Serialize>(version: u16, body: &T) -> Vec<u8> {
    let json = serde_json::to_vec(&Envelope { version, body }).unwrap_or_default();
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&json);
    frame
}

/// Decodes one whole frame (prefix included).
pub fn decode<T: for<'de> Deserialize<'de>>(version: u16, limit: usize, frame: &[u8]) -> Result<T, FrameError> {
    let Some((prefix, json)) = frame.split_first_chunk::<4>() else {
        return Err(FrameError::Truncated);
    };
    let size = usize::try_from(u32::from_be_bytes(*prefix)).unwrap_or(usize::MAX);
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    if json.len() < size {
        return Err(FrameError::Truncated);
    }
    if json.len() > size {
        return Err(FrameError::Malformed("trailing bytes after the frame".into()));
    }
    decode_body(version, json)
}

/// Decodes a frame's JSON (without the prefix).
pub fn decode_body<T: for<'de> Deserialize<'de>>(version: u16, json: &[u8]) -> Result<T, FrameError> {
    let got = serde_json::from_slice::<VersionOnly>(json).map_err(|e| FrameError::Malformed(e.to_string()))?.version;
    if got != version {
        return Err(FrameError::Version { got, expected: version });
    }
    let incoming: Incoming<T> = serde_json::from_slice(json).map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(incoming.body)
}
