//! `/loom/ledger-sync/1`: the request-response protocol through which a lagging replica fetches
//! finalized ledger blocks from a peer.
//!
//! A request is a bincode [`SyncRequest`] (at most [`MAX_SYNC_REQUEST_BYTES`]). A response is a
//! u32 little-endian length and that many bytes of an encoded
//! [`loom_protocols::ledger_sync::SyncResponse`], at most [`MAX_SYNC_RESPONSE_BYTES`]. The
//! receiver decodes it with its bounds and verifies every block before storing it (the ledger
//! replica does).

use std::io;

use futures::{AsyncReadExt, AsyncWriteExt, prelude::*};
use libp2p::StreamProtocol;
use loom_protocols::{
    decode_bounded, encode,
    ledger_sync::{MAX_SYNC_RESPONSE_BYTES, SyncRequest},
};

/// The protocol name.
pub const LEDGER_SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/loom/ledger-sync/1");
/// Largest request, in bytes.
pub const MAX_SYNC_REQUEST_BYTES: usize = 64;

/// The codec of [`LEDGER_SYNC_PROTOCOL`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LedgerSyncCodec;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl libp2p::request_response::Codec for LedgerSyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut bytes = Vec::new();
        io.take(MAX_SYNC_REQUEST_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .await?;
        decode_bounded(&bytes, MAX_SYNC_REQUEST_BYTES).map_err(|e| invalid(e.to_string()))
    }

    async fn read_response<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut len = [0u8; 4];
        io.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_SYNC_RESPONSE_BYTES {
            return Err(invalid(format!(
                "ledger response of {len} bytes exceeds the limit of {MAX_SYNC_RESPONSE_BYTES}"
            )));
        }
        let mut bytes = Vec::with_capacity(len.min(1 << 20));
        io.take(len as u64).read_to_end(&mut bytes).await?;
        if bytes.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "ledger response ended early",
            ));
        }
        Ok(bytes)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        request: SyncRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode(&request)).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        response: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        if response.len() > MAX_SYNC_RESPONSE_BYTES {
            return Err(invalid("ledger response too large".into()));
        }
        io.write_all(&(response.len() as u32).to_le_bytes()).await?;
        io.write_all(&response).await?;
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;

    #[tokio::test]
    async fn requests_and_responses_round_trip_and_oversize_is_refused() {
        let mut codec = LedgerSyncCodec;
        let mut buffer = Vec::new();
        let request = SyncRequest {
            from_height: 7,
            limit: 3,
        };
        codec
            .write_request(&LEDGER_SYNC_PROTOCOL, &mut buffer, request)
            .await
            .expect("write");
        let read = codec
            .read_request(&LEDGER_SYNC_PROTOCOL, &mut buffer.as_slice())
            .await
            .expect("read");
        assert_eq!(read, request);

        let mut buffer = Vec::new();
        codec
            .write_response(&LEDGER_SYNC_PROTOCOL, &mut buffer, vec![1, 2, 3])
            .await
            .expect("write");
        let read = codec
            .read_response(&LEDGER_SYNC_PROTOCOL, &mut buffer.as_slice())
            .await
            .expect("read");
        assert_eq!(read, vec![1, 2, 3]);

        let mut huge = ((MAX_SYNC_RESPONSE_BYTES + 1) as u32)
            .to_le_bytes()
            .to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(
            codec
                .read_response(&LEDGER_SYNC_PROTOCOL, &mut huge.as_slice())
                .await
                .is_err()
        );
        let truncated = [10u8, 0, 0, 0, 1, 2];
        assert!(
            codec
                .read_response(&LEDGER_SYNC_PROTOCOL, &mut truncated.as_slice())
                .await
                .is_err()
        );
    }
}
