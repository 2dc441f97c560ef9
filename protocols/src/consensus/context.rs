//! Loom's instance of Malachite's `Context`: the concrete types the Tendermint core runs on.
//!
//! Address = a committee member's ed25519 public key, height = the instance's height, value = a
//! [`ConsensusValue`] (a ledger block, a job's round close) identified by its hash, every member has voting power 1, and the proposer of
//! (height, round) is the member at index `(height + round) mod n` of the sorted committee
//! (Tendermint's round-robin rotation: the proposer of a height is its coordinator). Vote
//! extensions and proposal parts are not used. Nothing here signs or verifies: the engine answers
//! the core's signing and verification effects with the bytes of [`crate::ledger::vote_bytes`]
//! and [`proposal_bytes`](super::message::proposal_bytes).

use std::{fmt, marker::PhantomData, sync::Arc};

use arc_malachitebft_core_types::{
    self as mtypes, LinearTimeouts, NilOrVal, Round, SignedExtension, VoteType,
};

use super::types::ConsensusValue;
use crate::{PeerKey, contribution::BlobHash};

/// Short hex of the first bytes of a key or hash, for logs.
fn short_hex(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// A committee member, as the core sees it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Address(pub(crate) PeerKey);

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&short_hex(&self.0))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

impl mtypes::Address for Address {}

/// A ledger height.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Height(pub(crate) u64);

impl fmt::Display for Height {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl mtypes::Height for Height {
    const ZERO: Self = Self(0);
    // The ledger's first block is its genesis at height 0.
    const INITIAL: Self = Self(0);

    fn increment_by(&self, n: u64) -> Self {
        Self(self.0.saturating_add(n))
    }

    fn decrement_by(&self, n: u64) -> Option<Self> {
        self.0.checked_sub(n).map(Self)
    }

    fn as_u64(&self) -> u64 {
        self.0
    }
}

/// A block's id: its hash.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct BlockId(pub(crate) BlobHash);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&short_hex(&self.0))
    }
}

impl fmt::Debug for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockId({self})")
    }
}

/// A proposed value with its hash computed once. Equality and order are by hash.
#[derive(Clone, Debug)]
pub(crate) struct BlockValue<V> {
    id: BlobHash,
    block: Arc<V>,
}

impl<V: ConsensusValue> BlockValue<V> {
    pub(crate) fn new(block: V) -> Self {
        Self {
            id: block.hash(),
            block: Arc::new(block),
        }
    }

    pub(crate) fn hash(&self) -> BlobHash {
        self.id
    }

    pub(crate) fn block(&self) -> &V {
        &self.block
    }
}

impl<V> PartialEq for BlockValue<V> {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl<V> Eq for BlockValue<V> {}

impl<V> PartialOrd for BlockValue<V> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<V> Ord for BlockValue<V> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.id.cmp(&other.id)
    }
}

impl<V: ConsensusValue> mtypes::Value for BlockValue<V> {
    type Id = BlockId;

    fn id(&self) -> BlockId {
        BlockId(self.id)
    }
}

/// A proposal: a block for (height, round), with the round of its proof of lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Proposal<V> {
    pub(crate) height: Height,
    pub(crate) round: Round,
    pub(crate) value: BlockValue<V>,
    pub(crate) pol_round: Round,
    pub(crate) proposer: Address,
}

impl<V: ConsensusValue> mtypes::Proposal<LoomContext<V>> for Proposal<V> {
    fn height(&self) -> Height {
        self.height
    }

    fn round(&self) -> Round {
        self.round
    }

    fn value(&self) -> &BlockValue<V> {
        &self.value
    }

    fn take_value(self) -> BlockValue<V> {
        self.value
    }

    fn pol_round(&self) -> Round {
        self.pol_round
    }

    fn validator_address(&self) -> &Address {
        &self.proposer
    }
}

/// A prevote or precommit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Vote {
    pub(crate) kind: VoteType,
    pub(crate) height: Height,
    pub(crate) round: Round,
    pub(crate) value: NilOrVal<BlockId>,
    pub(crate) voter: Address,
}

impl<V: ConsensusValue> mtypes::Vote<LoomContext<V>> for Vote {
    fn height(&self) -> Height {
        self.height
    }

    fn round(&self) -> Round {
        self.round
    }

    fn value(&self) -> &NilOrVal<BlockId> {
        &self.value
    }

    fn take_value(self) -> NilOrVal<BlockId> {
        self.value
    }

    fn vote_type(&self) -> VoteType {
        self.kind
    }

    fn validator_address(&self) -> &Address {
        &self.voter
    }

    fn extension(&self) -> Option<&SignedExtension<LoomContext<V>>> {
        None
    }

    fn take_extension(&mut self) -> Option<SignedExtension<LoomContext<V>>> {
        None
    }

    fn extend(self, _extension: SignedExtension<LoomContext<V>>) -> Self {
        // Vote extensions are disabled for Loom: the core never asks for one.
        self
    }
}

/// Proposal parts are not used: a proposal carries its whole block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NoProposalPart {}

impl<V: ConsensusValue> mtypes::ProposalPart<LoomContext<V>> for NoProposalPart {
    fn is_first(&self) -> bool {
        match *self {}
    }

    fn is_last(&self) -> bool {
        match *self {}
    }
}

/// A committee member with voting power 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Validator {
    pub(crate) address: Address,
}

impl<V: ConsensusValue> mtypes::Validator<LoomContext<V>> for Validator {
    fn address(&self) -> &Address {
        &self.address
    }

    fn public_key(&self) -> &PeerKey {
        &self.address.0
    }

    fn voting_power(&self) -> mtypes::VotingPower {
        1
    }
}

/// The committee as the core sees it: sorted by key, unique, never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ValidatorSet {
    /// Invariant: sorted by address, unique, non-empty (checked by the engine before building).
    validators: Vec<Validator>,
}

impl ValidatorSet {
    /// `None` when `members` is empty. `members` must be sorted and unique.
    pub(crate) fn new(members: &[PeerKey]) -> Option<Self> {
        if members.is_empty() {
            return None;
        }
        Some(Self {
            validators: members
                .iter()
                .map(|m| Validator {
                    address: Address(*m),
                })
                .collect(),
        })
    }

    /// Tendermint round-robin: `(height + round) mod n`.
    pub(crate) fn proposer(&self, height: u64, round: u32) -> &Validator {
        let n = self.validators.len().max(1) as u64;
        let index = ((height % n) + (u64::from(round) % n)) % n;
        // The set is never empty (see `new`), and index < n.
        &self.validators[index as usize]
    }

    /// The member with `address`, if any (the same for every instance's context).
    pub(crate) fn get_by_address(&self, address: &Address) -> Option<&Validator> {
        self.validators
            .binary_search_by(|v| v.address.cmp(address))
            .ok()
            .and_then(|i| self.validators.get(i))
    }

    /// The committee's total voting power: one per member.
    pub(crate) fn total_voting_power(&self) -> mtypes::VotingPower {
        self.validators.len() as u64
    }
}

impl<V: ConsensusValue> mtypes::ValidatorSet<LoomContext<V>> for ValidatorSet {
    fn count(&self) -> usize {
        self.validators.len()
    }

    fn total_voting_power(&self) -> mtypes::VotingPower {
        ValidatorSet::total_voting_power(self)
    }

    fn get_by_address(&self, address: &Address) -> Option<&Validator> {
        ValidatorSet::get_by_address(self, address)
    }

    fn get_by_index(&self, index: usize) -> Option<&Validator> {
        self.validators.get(index)
    }
}

/// An ed25519 signature.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Signature(pub(crate) [u8; 64]);

/// A key or signature of the wrong length.
#[derive(Debug, thiserror::Error)]
#[error("expected {expected} bytes, got {got}")]
pub(crate) struct DecodingError {
    expected: usize,
    got: usize,
}

/// ed25519 (verification and signing are done by the engine, with ed25519-dalek).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ed25519;

impl mtypes::SigningScheme for Ed25519 {
    type DecodingError = DecodingError;
    type Signature = Signature;
    type PublicKey = PeerKey;
    type PrivateKey = PeerKey;

    fn decode_signature(bytes: &[u8]) -> Result<Signature, DecodingError> {
        <[u8; 64]>::try_from(bytes)
            .map(Signature)
            .map_err(|_| DecodingError {
                expected: 64,
                got: bytes.len(),
            })
    }

    fn encode_signature(signature: &Signature) -> Vec<u8> {
        signature.0.to_vec()
    }

    fn decode_public_key(bytes: &[u8]) -> Result<PeerKey, DecodingError> {
        <[u8; 32]>::try_from(bytes).map_err(|_| DecodingError {
            expected: 32,
            got: bytes.len(),
        })
    }

    fn encode_public_key(public_key: &PeerKey) -> Vec<u8> {
        public_key.to_vec()
    }
}

/// The context the core is instantiated with, for an instance deciding `V`.
pub(crate) struct LoomContext<V>(PhantomData<fn() -> V>);

impl<V> LoomContext<V> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<V> Clone for LoomContext<V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for LoomContext<V> {}

impl<V> Default for LoomContext<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> fmt::Debug for LoomContext<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LoomContext")
    }
}

impl<V: ConsensusValue> mtypes::Context for LoomContext<V> {
    type Address = Address;
    type Height = Height;
    type ProposalPart = NoProposalPart;
    type Proposal = Proposal<V>;
    type Validator = Validator;
    type ValidatorSet = ValidatorSet;
    // The core hands timeouts to the host; the engine computes their durations itself.
    type Timeouts = LinearTimeouts;
    type Value = BlockValue<V>;
    type Vote = Vote;
    type Extension = ();
    type SigningScheme = Ed25519;

    fn select_proposer<'a>(
        &self,
        validator_set: &'a ValidatorSet,
        height: Height,
        round: Round,
    ) -> &'a Validator {
        validator_set.proposer(height.0, round.as_u32().unwrap_or(0))
    }

    fn new_proposal(
        &self,
        height: Height,
        round: Round,
        value: BlockValue<V>,
        pol_round: Round,
        address: Address,
    ) -> Proposal<V> {
        Proposal {
            height,
            round,
            value,
            pol_round,
            proposer: address,
        }
    }

    fn new_prevote(
        &self,
        height: Height,
        round: Round,
        value_id: NilOrVal<BlockId>,
        address: Address,
    ) -> Vote {
        Vote {
            kind: VoteType::Prevote,
            height,
            round,
            value: value_id,
            voter: address,
        }
    }

    fn new_precommit(
        &self,
        height: Height,
        round: Round,
        value_id: NilOrVal<BlockId>,
        address: Address,
    ) -> Vote {
        Vote {
            kind: VoteType::Precommit,
            height,
            round,
            value: value_id,
            voter: address,
        }
    }
}
