//! The consensus wire format: signed proposals and votes, their signing bytes, and their bounded
//! encoding.
//!
//! A proposal carries its whole block (blocks are small next to gradients, and a proposal without
//! its value cannot be voted on); its signature covers the block's hash, not the block. A vote
//! carries the hash it votes for, or nothing for nil. Signatures are ed25519 by the message's
//! author over [`proposal_bytes`] or [`vote_bytes`]; precommit signatures are exactly what a
//! [`QuorumCertificate`](crate::ledger::QuorumCertificate) collects. A polka certificate is a
//! quorum of prevotes for one block, relayed whole: a receiver that already holds another prevote
//! of a byzantine voter would drop that voter's prevote if it came alone, and miss the polka.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::types::{ConsensusValue, max_message_bytes};
use crate::{
    PeerKey, WireError,
    contribution::BlobHash,
    decode_bounded, encode,
    ledger::{Block, MAX_BLOCK_BYTES, VoteKind, chain_vote_bytes},
};

/// Largest encoded ledger consensus message accepted from the wire, in bytes.
pub const MAX_CONSENSUS_MESSAGE_BYTES: usize = MAX_BLOCK_BYTES + 1024;
const PROPOSAL_DOMAIN: &[u8] = b"loom/consensus-proposal/v1\0";
const CHAIN_PROPOSAL_DOMAIN: &[u8] = b"loom/chain-proposal/v1\0";

/// The bytes a ledger proposer signs to propose the block `block_hash` at (`height`, `round`),
/// with the round of its proof of lock (`pol_round`, `None` for a fresh value).
pub fn proposal_bytes(
    height: u64,
    round: u32,
    pol_round: Option<u32>,
    block_hash: &BlobHash,
) -> Vec<u8> {
    chain_proposal_bytes(None, height, round, pol_round, block_hash)
}

/// [`proposal_bytes`] for the consensus instance `chain` (`None`: the ledger's).
pub fn chain_proposal_bytes(
    chain: Option<&BlobHash>,
    height: u64,
    round: u32,
    pol_round: Option<u32>,
    block_hash: &BlobHash,
) -> Vec<u8> {
    let mut out = match chain {
        None => PROPOSAL_DOMAIN.to_vec(),
        Some(chain) => [CHAIN_PROPOSAL_DOMAIN, chain.as_slice()].concat(),
    };
    out.extend_from_slice(&height.to_le_bytes());
    out.extend_from_slice(&round.to_le_bytes());
    match pol_round {
        Some(r) => {
            out.push(1);
            out.extend_from_slice(&r.to_le_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(block_hash);
    out
}

/// A consensus message: Tendermint's proposal or one of its two votes. `V` is what the instance
/// decides: a ledger [`Block`] unless said otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "V: ConsensusValue")]
pub enum ConsensusMessage<V: ConsensusValue = Block> {
    /// The proposer of (height, round) proposes a block.
    Proposal {
        /// The height.
        height: u64,
        /// The round.
        round: u32,
        /// The round in which the block got a quorum of prevotes, when it is re-proposed.
        pol_round: Option<u32>,
        /// The proposed block (the value).
        block: V,
        /// The proposer.
        proposer: PeerKey,
        /// ed25519 over [`proposal_bytes`].
        signature: Vec<u8>,
    },
    /// A prevote or precommit.
    Vote {
        /// Prevote or precommit.
        kind: VoteKind,
        /// The height.
        height: u64,
        /// The round.
        round: u32,
        /// The block hash voted for; `None` is a vote for nil.
        value: Option<BlobHash>,
        /// The voter.
        voter: PeerKey,
        /// ed25519 over [`vote_bytes`].
        signature: Vec<u8>,
    },
    /// A quorum of prevotes for one block in one round (a "polka"), as a whole. Sent with the
    /// re-proposal of a block, so that every member can accept it.
    PolkaCertificate {
        /// The height.
        height: u64,
        /// The round of the prevotes.
        round: u32,
        /// The block they prevoted.
        block_hash: BlobHash,
        /// (voter, ed25519 over the prevote's [`vote_bytes`]).
        votes: Vec<(PeerKey, Vec<u8>)>,
        /// Who sent it; not signed: the prevotes are the proof.
        sender: PeerKey,
    },
}

impl ConsensusMessage<Block> {
    /// A ledger proposal signed with `key`.
    pub fn signed_proposal(
        key: &SigningKey,
        height: u64,
        round: u32,
        pol_round: Option<u32>,
        block: Block,
    ) -> Self {
        Self::signed_proposal_in(None, key, height, round, pol_round, block)
    }

    /// A ledger vote signed with `key`.
    pub fn signed_vote(
        key: &SigningKey,
        kind: VoteKind,
        height: u64,
        round: u32,
        value: Option<BlobHash>,
    ) -> Self {
        Self::signed_vote_in(None, key, kind, height, round, value)
    }
}

impl<V: ConsensusValue> ConsensusMessage<V> {
    /// A proposal of the instance `chain` signed with `key`.
    pub fn signed_proposal_in(
        chain: Option<&BlobHash>,
        key: &SigningKey,
        height: u64,
        round: u32,
        pol_round: Option<u32>,
        block: V,
    ) -> Self {
        let signature = key
            .sign(&chain_proposal_bytes(
                chain,
                height,
                round,
                pol_round,
                &block.hash(),
            ))
            .to_bytes()
            .to_vec();
        Self::Proposal {
            height,
            round,
            pol_round,
            block,
            proposer: key.verifying_key().to_bytes(),
            signature,
        }
    }

    /// A vote of the instance `chain` signed with `key`.
    pub fn signed_vote_in(
        chain: Option<&BlobHash>,
        key: &SigningKey,
        kind: VoteKind,
        height: u64,
        round: u32,
        value: Option<BlobHash>,
    ) -> Self {
        let signature = key
            .sign(&chain_vote_bytes(
                chain,
                kind,
                height,
                round,
                value.as_ref(),
            ))
            .to_bytes()
            .to_vec();
        Self::Vote {
            kind,
            height,
            round,
            value,
            voter: key.verifying_key().to_bytes(),
            signature,
        }
    }

    /// The height the message is for.
    pub fn height(&self) -> u64 {
        match self {
            Self::Proposal { height, .. }
            | Self::Vote { height, .. }
            | Self::PolkaCertificate { height, .. } => *height,
        }
    }

    /// The round the message is for.
    pub fn round(&self) -> u32 {
        match self {
            Self::Proposal { round, .. }
            | Self::Vote { round, .. }
            | Self::PolkaCertificate { round, .. } => *round,
        }
    }

    /// Who sent it: the proposer, the voter, or the sender of a certificate.
    pub fn author(&self) -> PeerKey {
        match self {
            Self::Proposal { proposer, .. } => *proposer,
            Self::Vote { voter, .. } => *voter,
            Self::PolkaCertificate { sender, .. } => *sender,
        }
    }

    /// The author's signature (a certificate has one per prevote instead).
    pub fn signature(&self) -> Option<&[u8]> {
        match self {
            Self::Proposal { signature, .. } | Self::Vote { signature, .. } => Some(signature),
            Self::PolkaCertificate { .. } => None,
        }
    }

    /// The bytes the author signed in the instance `chain` (`None`: the ledger's); for a
    /// proposal this hashes the block.
    pub fn signing_bytes(&self, chain: Option<&BlobHash>) -> Option<Vec<u8>> {
        match self {
            Self::Proposal {
                height,
                round,
                pol_round,
                block,
                ..
            } => Some(chain_proposal_bytes(
                chain,
                *height,
                *round,
                *pol_round,
                &block.hash(),
            )),
            Self::Vote {
                kind,
                height,
                round,
                value,
                ..
            } => Some(chain_vote_bytes(
                chain,
                *kind,
                *height,
                *round,
                value.as_ref(),
            )),
            Self::PolkaCertificate { .. } => None,
        }
    }

    /// Whether the author's signature is valid in the instance `chain` (`None`: the ledger's);
    /// for a certificate, whether every prevote's is (membership and quorum are the engine's to
    /// check, against its committee).
    pub fn verify_signature(&self, chain: Option<&BlobHash>) -> bool {
        match self {
            Self::PolkaCertificate {
                height,
                round,
                block_hash,
                votes,
                ..
            } => {
                let message =
                    chain_vote_bytes(chain, VoteKind::Prevote, *height, *round, Some(block_hash));
                votes
                    .iter()
                    .all(|(voter, signature)| verify(voter, &message, signature))
            }
            _ => match (self.signing_bytes(chain), self.signature()) {
                (Some(bytes), Some(signature)) => verify(&self.author(), &bytes, signature),
                _ => false,
            },
        }
    }

    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a message from the network, refusing more than [`MAX_CONSENSUS_MESSAGE_BYTES`]
    /// for the ledger (the value's bound plus room for the rest, for another instance). The
    /// signature is not checked here: the engine checks it on receipt.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode_bounded(bytes, max_message_bytes::<V>())
    }
}

/// ed25519 (strict) verification of `signature` by `key` over `message`.
pub(crate) fn verify(key: &PeerKey, message: &[u8], signature: &[u8]) -> bool {
    let (Ok(key), Ok(signature)) = (
        VerifyingKey::from_bytes(key),
        Signature::from_slice(signature),
    ) else {
        return false;
    };
    key.verify_strict(message, &signature).is_ok()
}
