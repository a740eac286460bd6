//! Frames ([`tether_proto::frame`]) over QUIC streams: a long-lived stream of many frames ([`read`], [`write`]), or
//! one request and one response per stream ([`read_whole`], [`write_whole`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_proto::frame::{FrameError, decode, decode_body, encode};

/// Longest a frame may take to arrive once its first bytes did ([`read`]), and a whole request ([`read_whole`]): a
/// peer trickling bytes (or stopping mid-frame) holds a stream no longer than this.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// Reads the next frame of a long-lived stream; `None` when the peer finished the stream cleanly.
pub async fn read<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
    version: u16,
    limit: usize,
) -> Result<Option<T>, FrameError> {
    let mut prefix = [0_u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Stream(e.to_string())),
    }
    let size = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    let mut json = vec![0_u8; size];
    let body = tokio::time::timeout(FRAME_DEADLINE, recv.read_exact(&mut json))
        .await
        .map_err(|_| FrameError::Stream(format!("frame of {size} bytes incomplete after {FRAME_DEADLINE:?}")))?;
    body.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        quinn::ReadExactError::ReadError(e) => FrameError::Stream(e.to_string()),
    })?;
    decode_body(version, &json).map(Some)
}

/// Writes one frame to a stream (without finishing it).
pub async fn write<T: Serialize>(send: &mut quinn::SendStream, version: u16, body: &T) -> Result<(), FrameError> {
    send.write_all(&encode(version, body)).await.map_err(|e| FrameError::Stream(e.to_string()))
}

/// Reads the one frame of a stream (up to its end), enforcing `limit`.
pub async fn read_whole<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
    version: u16,
    limit: usize,
) -> Result<T, FrameError> {
    let whole = tokio::time::timeout(FRAME_DEADLINE, recv.read_to_end(limit + 4))
        .await
        .map_err(|_| FrameError::Stream(format!("request incomplete after {FRAME_DEADLINE:?}")))?;
    match whole {
        Ok(bytes) => decode(version, limit, &bytes),
        Err(quinn::ReadToEndError::TooLong) => Err(FrameError::TooLarge { size: limit + 1, limit }),
        Err(quinn::ReadToEndError::Read(e)) => Err(FrameError::Stream(e.to_string())),
    }
}

/// Writes one frame and finishes the stream.
pub async fn write_whole<T: Serialize>(send: &mut quinn::SendStream, version: u16, body: &T) -> std::io::Result<()> {
    send.write_all(&encode(version, body)).await.map_err(std::io::Error::other)?;
    send.finish().map_err(std::io::Error::other)
}
