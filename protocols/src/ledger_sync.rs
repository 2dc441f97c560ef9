//! What replicas say to each other about the ledger: gossip on `loom/ledger/1` (consensus
//! messages, pending entries, tip announcements) and the catch-up request and response that move
//! finalized blocks from one replica to another.
//!
//! Every decoder is bounded. A catch-up response is never trusted: the receiver folds each block
//! through [`crate::ledger_state::LedgerState::apply`], which checks the chain and the certificate
//! against the committee the receiver itself derived.

use serde::{Deserialize, Serialize};

use crate::{
    PeerKey, WireError,
    consensus::ConsensusMessage,
    contribution::BlobHash,
    decode_bounded, encode,
    ledger::{Block, MAX_BLOCK_BYTES, QuorumCertificate, SignedEntry},
};

/// Largest gossip message on the ledger topic, in bytes.
pub const MAX_LEDGER_GOSSIP_BYTES: usize = 60 * 1024;
/// Largest encoded block a proposer puts in a proposal: what fits in one ledger gossip message
/// with the proposal's own fields.
pub const MAX_PROPOSED_BLOCK_BYTES: usize = MAX_LEDGER_GOSSIP_BYTES - 1024;
/// Most finalized blocks in one catch-up response.
pub const MAX_SYNC_BLOCKS: usize = 64;
/// Largest catch-up response, in bytes.
pub const MAX_SYNC_RESPONSE_BYTES: usize = 2 * MAX_BLOCK_BYTES;

/// A message on the ledger gossip topic. Its claimed author must be the gossip author.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LedgerGossip {
    /// A proposal or a vote.
    Consensus(ConsensusMessage),
    /// An entry waiting to be included in a block.
    Entry(SignedEntry),
    /// A replica's finalized height, so lagging replicas know whom to ask.
    Tip {
        /// The replica.
        peer: PeerKey,
        /// The height its next block will have.
        next_height: u64,
        /// Hash of its genesis block (replicas of another ledger are ignored).
        genesis: BlobHash,
    },
}

impl LedgerGossip {
    /// Encodes for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes, bounded.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode_bounded(bytes, MAX_LEDGER_GOSSIP_BYTES)
    }

    /// The peer the message claims to come from (checked against the gossip author by the
    /// network, and the signature by the receiver).
    pub fn claimed_author(&self) -> PeerKey {
        match self {
            LedgerGossip::Consensus(message) => message.author(),
            LedgerGossip::Entry(entry) => entry.author,
            LedgerGossip::Tip { peer, .. } => *peer,
        }
    }
}

/// A catch-up request: up to `limit` finalized blocks from `from_height` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// The first height wanted.
    pub from_height: u64,
    /// At most this many (capped at [`MAX_SYNC_BLOCKS`] by the server).
    pub limit: u32,
}

/// A catch-up response: consecutive finalized blocks with their certificates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The blocks, in height order.
    pub blocks: Vec<(Block, QuorumCertificate)>,
}

impl SyncResponse {
    /// Encodes for the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes, bounded in bytes and in blocks.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        let response: Self = decode_bounded(bytes, MAX_SYNC_RESPONSE_BYTES)?;
        if response.blocks.len() > MAX_SYNC_BLOCKS {
            return Err(WireError::TooLarge {
                size_bytes: response.blocks.len(),
                limit_bytes: MAX_SYNC_BLOCKS,
            });
        }
        Ok(response)
    }
}
