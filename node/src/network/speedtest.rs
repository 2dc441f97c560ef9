//! `/loom/speedtest/1`: measures the throughput from a peer to this one by asking it for a given
//! number of bytes (`loom-peer speedtest <peer>`). Operators use it to check a link before a job;
//! the NAT lab uses it to compare the kernel's byte counts with libp2p's on a bulk transfer.
//!
//! A request is a u32 little-endian byte count, at most [`MAX_SPEEDTEST_BYTES`]; the response is
//! a u32 length and that many bytes. Serving is bounded: one transfer per peer per
//! [`SPEEDTEST_COOLDOWN_MS`] and [`SPEEDTEST_BUDGET_BYTES`] per minute in total, so a peer cannot
//! turn it into an amplifier.

use std::{collections::HashMap, io};

use futures::{AsyncReadExt, AsyncWriteExt, prelude::*};
use libp2p::{PeerId, StreamProtocol};

/// The protocol name.
pub const SPEEDTEST_PROTOCOL: StreamProtocol = StreamProtocol::new("/loom/speedtest/1");
/// Largest transfer, in bytes.
pub const MAX_SPEEDTEST_BYTES: u32 = 64 << 20;
/// Pause between two transfers served to one peer, in milliseconds.
pub const SPEEDTEST_COOLDOWN_MS: u64 = 10_000;
/// Bytes served per minute to all peers together.
pub const SPEEDTEST_BUDGET_BYTES: u64 = 256 << 20;
/// Peers whose last transfer is remembered.
const MAX_TRACKED: usize = 1_024;

/// The codec of [`SPEEDTEST_PROTOCOL`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SpeedtestCodec;

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

impl libp2p::request_response::Codec for SpeedtestCodec {
    type Protocol = StreamProtocol;
    type Request = u32;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<u32>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut size = [0u8; 4];
        io.read_exact(&mut size).await?;
        let size = u32::from_le_bytes(size);
        if size > MAX_SPEEDTEST_BYTES {
            return Err(invalid("speedtest request too large"));
        }
        Ok(size)
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len);
        if len > MAX_SPEEDTEST_BYTES {
            return Err(invalid("speedtest response too large"));
        }
        let mut bytes = Vec::with_capacity((len as usize).min(1 << 20));
        io.take(u64::from(len)).read_to_end(&mut bytes).await?;
        if bytes.len() != len as usize {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "speedtest response ended early",
            ));
        }
        Ok(bytes)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        size: u32,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&size.to_le_bytes()).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        bytes: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let len = u32::try_from(bytes.len())
            .ok()
            .filter(|l| *l <= MAX_SPEEDTEST_BYTES)
            .ok_or_else(|| invalid("speedtest response too large"))?;
        io.write_all(&len.to_le_bytes()).await?;
        io.write_all(&bytes).await?;
        io.close().await
    }
}

/// Incompressible filler: blake3 in XOF mode over a fixed key.
pub fn filler(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new_derive_key("loom speedtest filler v1")
        .finalize_xof()
        .fill(&mut out);
    out
}

/// The server's bounds.
#[derive(Debug, Default)]
pub struct SpeedtestLimiter {
    last_served_ms: HashMap<PeerId, u64>,
    window_start_ms: u64,
    window_bytes: u64,
}

impl SpeedtestLimiter {
    /// Whether `peer` may have `size` bytes now; records it when so.
    pub fn allow(&mut self, peer: PeerId, size: u32, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.window_start_ms) >= 60_000 {
            self.window_start_ms = now_ms;
            self.window_bytes = 0;
        }
        let cooled = self
            .last_served_ms
            .get(&peer)
            .is_none_or(|last| now_ms.saturating_sub(*last) >= SPEEDTEST_COOLDOWN_MS);
        let budget = self.window_bytes + u64::from(size) <= SPEEDTEST_BUDGET_BYTES;
        if !cooled || !budget {
            return false;
        }
        if self.last_served_ms.len() >= MAX_TRACKED {
            self.last_served_ms
                .retain(|_, last| now_ms.saturating_sub(*last) < SPEEDTEST_COOLDOWN_MS);
        }
        if self.last_served_ms.len() < MAX_TRACKED {
            self.last_served_ms.insert(peer, now_ms);
        }
        self.window_bytes += u64::from(size);
        true
    }
}

/// The outcome of a speedtest, for the control API.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SpeedtestResult {
    /// The serving peer.
    pub peer: String,
    /// Bytes received (payload).
    pub bytes: u64,
    /// Request to the last byte, in milliseconds.
    pub elapsed_ms: f64,
    /// Throughput, in megabits per second.
    pub mbit_per_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_served_once_per_cooldown_and_the_budget_holds() {
        let mut limiter = SpeedtestLimiter::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        assert!(limiter.allow(a, 1 << 20, 1_000));
        assert!(!limiter.allow(a, 1 << 20, 2_000));
        assert!(limiter.allow(a, 1 << 20, 1_000 + SPEEDTEST_COOLDOWN_MS));
        let mut now = 20_000;
        let mut served = 0u64;
        while limiter.allow(PeerId::random(), MAX_SPEEDTEST_BYTES, now) {
            served += u64::from(MAX_SPEEDTEST_BYTES);
            now += 1;
        }
        assert!(served <= SPEEDTEST_BUDGET_BYTES);
        assert!(limiter.allow(b, MAX_SPEEDTEST_BYTES, now + 60_000));
        assert_eq!(filler(32), filler(32));
        assert_ne!(filler(32), vec![0; 32]);
    }
}
