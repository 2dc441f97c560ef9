//! `/loom/blob/1`: the request-response protocol that moves contribution blobs and model
//! snapshots between peers.
//!
//! A request is the 32-byte blake3 hash of the blob wanted. A response is one status byte
//! (1: found, 0: not held) followed, when found, by a u64 little-endian length and the bytes.
//! Both sides bound what they read: requests are exactly 32 bytes, responses at most
//! [`MAX_BLOB_BYTES`]; the receiver checks the hash before using anything (the exchanger does).

use std::{io, sync::Arc};

use futures::{AsyncReadExt, AsyncWriteExt, prelude::*};
use libp2p::StreamProtocol;
use loom_protocols::contribution::BlobHash;

/// The protocol name.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/loom/blob/1");
/// Largest blob served or accepted, in bytes.
pub const MAX_BLOB_BYTES: u64 = 256 << 20;

/// A peer's answer.
#[derive(Debug, Clone)]
pub enum BlobReply {
    /// The bytes.
    Found(Arc<Vec<u8>>),
    /// Not held (evicted or never had it).
    Missing,
}

/// The codec of [`BLOB_PROTOCOL`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BlobCodec;

impl libp2p::request_response::Codec for BlobCodec {
    type Protocol = StreamProtocol;
    type Request = BlobHash;
    type Response = BlobReply;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<BlobHash>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut hash = [0u8; 32];
        io.read_exact(&mut hash).await?;
        Ok(hash)
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<BlobReply>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut status = [0u8; 1];
        io.read_exact(&mut status).await?;
        match status[0] {
            0 => Ok(BlobReply::Missing),
            1 => {
                let mut len = [0u8; 8];
                io.read_exact(&mut len).await?;
                let len = u64::from_le_bytes(len);
                if len > MAX_BLOB_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("blob of {len} bytes exceeds the limit of {MAX_BLOB_BYTES}"),
                    ));
                }
                // Read what arrives instead of trusting the length for the allocation up front.
                let mut bytes = Vec::with_capacity((len as usize).min(1 << 20));
                io.take(len).read_to_end(&mut bytes).await?;
                if bytes.len() as u64 != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob response ended early",
                    ));
                }
                Ok(BlobReply::Found(Arc::new(bytes)))
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown blob response status {other}"),
            )),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        hash: BlobHash,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&hash).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        reply: BlobReply,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match reply {
            BlobReply::Missing => io.write_all(&[0]).await?,
            BlobReply::Found(bytes) => {
                io.write_all(&[1]).await?;
                io.write_all(&(bytes.len() as u64).to_le_bytes()).await?;
                io.write_all(&bytes).await?;
            }
        }
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec as _;

    fn block_on<F: Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn a_found_blob_round_trips() {
        let mut codec = BlobCodec;
        let mut wire = Vec::new();
        block_on(codec.write_response(
            &BLOB_PROTOCOL,
            &mut futures::io::Cursor::new(&mut wire),
            BlobReply::Found(Arc::new(b"hello".to_vec())),
        ))
        .expect("write");
        let reply = block_on(codec.read_response(&BLOB_PROTOCOL, &mut &wire[..])).expect("read");
        assert!(matches!(reply, BlobReply::Found(b) if b.as_slice() == b"hello"));
    }

    #[test]
    fn an_oversize_or_truncated_response_is_refused() {
        let mut codec = BlobCodec;
        let mut oversize = vec![1u8];
        oversize.extend_from_slice(&(MAX_BLOB_BYTES + 1).to_le_bytes());
        assert!(block_on(codec.read_response(&BLOB_PROTOCOL, &mut &oversize[..])).is_err());
        let mut truncated = vec![1u8];
        truncated.extend_from_slice(&100u64.to_le_bytes());
        truncated.extend_from_slice(&[0; 10]);
        assert!(block_on(codec.read_response(&BLOB_PROTOCOL, &mut &truncated[..])).is_err());
        assert!(block_on(codec.read_response(&BLOB_PROTOCOL, &mut &[7u8][..])).is_err());
    }
}
