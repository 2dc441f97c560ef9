//! The engine's vocabulary: its configuration, the committee, timers, the actions it asks of the
//! host, its write-ahead log entries and its errors.

use std::{collections::BTreeSet, fmt};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    context::ValidatorSet,
    message::{ConsensusMessage, MAX_CONSENSUS_MESSAGE_BYTES},
};
use crate::{
    PeerKey, WireError,
    contribution::BlobHash,
    decode_bounded, encode,
    ledger::{
        Block, LedgerError, MAX_BLOCK_BYTES, QuorumCertificate, quorum, verify_block,
        verify_certificate,
    },
};

/// What one consensus instance decides, height after height: the ledger's blocks, or a job's
/// round closes. The engine only needs its identity, its height and whether it may follow the
/// value decided at the height before; what makes it acceptable beyond that is the host's
/// `validate`.
pub trait ConsensusValue:
    Clone + fmt::Debug + PartialEq + Eq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Largest encoding of a value accepted from the wire, in bytes.
    const MAX_BYTES: usize;

    /// The value's identity: what votes and certificates name (blake3 of its encoding).
    fn hash(&self) -> BlobHash;

    /// The height it is for.
    fn height(&self) -> u64;

    /// Whether it may follow `previous`, the value decided at the height before (`None`: it
    /// opens the chain), with its own signatures valid.
    fn follows(&self, previous: Option<&Self>) -> bool;
}

impl ConsensusValue for Block {
    const MAX_BYTES: usize = MAX_BLOCK_BYTES;

    fn hash(&self) -> BlobHash {
        Block::hash(self)
    }

    fn height(&self) -> u64 {
        self.height
    }

    fn follows(&self, previous: Option<&Self>) -> bool {
        verify_block(self, previous).is_ok()
    }
}

/// Heights ahead of the current one whose messages are kept for later.
pub const FUTURE_HEIGHTS: u64 = 2;
/// Messages kept per member for one future height.
pub const MAX_BUFFERED_PER_MEMBER: usize = 16;

/// Timeouts of the consensus rounds. A round's propose, prevote and precommit timeouts grow by
/// `round_delta_ms` per round (Tendermint needs growing timeouts to be live once the network is
/// timely again), up to `max_timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsensusConfig {
    propose_ms: u64,
    prevote_ms: u64,
    precommit_ms: u64,
    rebroadcast_ms: u64,
    round_delta_ms: u64,
    max_timeout_ms: u64,
    chain: Option<BlobHash>,
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        Self {
            propose_ms: 3_000,
            prevote_ms: 1_000,
            precommit_ms: 1_000,
            rebroadcast_ms: 2_000,
            round_delta_ms: 500,
            max_timeout_ms: 60_000,
            chain: None,
        }
    }
}

impl ConsensusConfig {
    /// How long to wait for the proposal of round 0.
    pub fn with_propose_ms(mut self, ms: u64) -> Self {
        self.propose_ms = ms;
        self
    }

    /// How long to wait, after a quorum of mixed prevotes, before precommitting nil (round 0).
    pub fn with_prevote_ms(mut self, ms: u64) -> Self {
        self.prevote_ms = ms;
        self
    }

    /// How long to wait, after a quorum of mixed precommits, before the next round (round 0).
    pub fn with_precommit_ms(mut self, ms: u64) -> Self {
        self.precommit_ms = ms;
        self
    }

    /// Period of re-sending this peer's latest votes and proposal (liveness under message loss).
    pub fn with_rebroadcast_ms(mut self, ms: u64) -> Self {
        self.rebroadcast_ms = ms.max(1);
        self
    }

    /// Growth of the round timeouts per round.
    pub fn with_round_delta_ms(mut self, ms: u64) -> Self {
        self.round_delta_ms = ms;
        self
    }

    /// Cap on any round timeout.
    pub fn with_max_timeout_ms(mut self, ms: u64) -> Self {
        self.max_timeout_ms = ms;
        self
    }

    /// Runs the instance `chain` instead of the ledger's: its votes and proposals are signed
    /// with `chain` in their domain ([`crate::ledger::chain_vote_bytes`]).
    pub fn with_chain(mut self, chain: BlobHash) -> Self {
        self.chain = Some(chain);
        self
    }

    /// The instance this engine runs (`None`: the ledger's).
    pub fn chain(&self) -> Option<&BlobHash> {
        self.chain.as_ref()
    }

    /// The proposal timeout of round 0, in ms.
    pub fn propose_ms(&self) -> u64 {
        self.propose_ms
    }

    /// The prevote timeout of round 0, in ms.
    pub fn prevote_ms(&self) -> u64 {
        self.prevote_ms
    }

    /// The precommit timeout of round 0, in ms.
    pub fn precommit_ms(&self) -> u64 {
        self.precommit_ms
    }

    /// The rebroadcast period, in ms.
    pub fn rebroadcast_ms(&self) -> u64 {
        self.rebroadcast_ms
    }

    /// The duration of `kind` in `round`, in ms.
    pub fn timeout_ms(&self, kind: TimeoutKind, round: u32) -> u64 {
        let base = match kind {
            TimeoutKind::Propose => self.propose_ms,
            TimeoutKind::Prevote => self.prevote_ms,
            TimeoutKind::Precommit => self.precommit_ms,
            TimeoutKind::Rebroadcast => return self.rebroadcast_ms,
        };
        base.saturating_add(self.round_delta_ms.saturating_mul(u64::from(round)))
            .min(self.max_timeout_ms.max(base))
    }
}

/// The committee of a height: sorted, unique ed25519 keys, each with one vote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committee {
    members: Vec<PeerKey>,
}

impl Committee {
    /// The committee of `members` (sorted and deduplicated here). An empty committee cannot
    /// start a height.
    pub fn new(mut members: Vec<PeerKey>) -> Self {
        members.sort_unstable();
        members.dedup();
        Self { members }
    }

    /// The members, sorted.
    pub fn members(&self) -> &[PeerKey] {
        &self.members
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether `peer` is a member.
    pub fn contains(&self, peer: &PeerKey) -> bool {
        self.members.binary_search(peer).is_ok()
    }

    /// Votes needed for a decision: more than two thirds ([`quorum`]).
    pub fn quorum(&self) -> usize {
        quorum(self.members.len())
    }

    /// The members as a set (what [`verify_certificate`] takes).
    pub fn to_set(&self) -> BTreeSet<PeerKey> {
        self.members.iter().copied().collect()
    }

    /// The proposer (coordinator) of (`height`, `round`): Tendermint's round-robin rotation, the
    /// member at `(height + round) mod n`. `None` for an empty committee.
    pub fn proposer(&self, height: u64, round: u32) -> Option<PeerKey> {
        let set = ValidatorSet::new(&self.members)?;
        Some(set.proposer(height, round).address.0)
    }
}

impl FromIterator<PeerKey> for Committee {
    fn from_iter<I: IntoIterator<Item = PeerKey>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

/// The kinds of consensus timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TimeoutKind {
    /// Waiting for the round's proposal.
    Propose,
    /// Waiting for prevotes to converge.
    Prevote,
    /// Waiting for precommits to converge.
    Precommit,
    /// Re-sending this peer's latest messages.
    Rebroadcast,
}

/// A timer the host must arm: hand it back to
/// [`ConsensusEngine::on_timeout`](super::ConsensusEngine::on_timeout) when it fires. A timer
/// cancelled or re-armed in the meantime is ignored then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeoutKey {
    /// The height it belongs to.
    pub height: u64,
    /// The round it belongs to.
    pub round: u32,
    /// What it waits for.
    pub kind: TimeoutKind,
    /// Which arming of that timer this is.
    pub seq: u64,
}

/// The highest (height, round) at which this peer signed a vote or a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SigningWatermark {
    /// The height.
    pub height: u64,
    /// The round.
    pub round: u32,
}

/// One input of the current height, as the engine fed it to the core: the write-ahead log that
/// lets a restarted peer rebuild its consensus state (its votes, its lock) instead of forgetting
/// them, which would make it byzantine. Own votes are not logged: replay derives them again,
/// with the same (deterministic) signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "V: ConsensusValue")]
pub enum WalEntry<V: ConsensusValue = Block> {
    /// Another member's vote, or a polka certificate.
    Message(ConsensusMessage<V>),
    /// A proposal, with the validity its block was given.
    Proposal {
        /// The signed proposal.
        message: ConsensusMessage<V>,
        /// Whether the block was valid.
        valid: bool,
    },
    /// A round timeout that elapsed.
    Timeout {
        /// Which.
        kind: TimeoutKind,
        /// In which round.
        round: u32,
    },
    /// The block this peer proposed.
    Propose {
        /// The round.
        round: u32,
        /// The block.
        block: V,
    },
}

impl<V: ConsensusValue> WalEntry<V> {
    /// Wire bytes, for the host's storage.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes an entry read back from storage (bounded like a consensus message).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode_bounded(bytes, max_message_bytes::<V>())
    }
}

/// Largest encoded consensus message (or write-ahead log entry) of an instance deciding `V`.
pub fn max_message_bytes<V: ConsensusValue>() -> usize {
    V::MAX_BYTES.saturating_add(MAX_CONSENSUS_MESSAGE_BYTES - MAX_BLOCK_BYTES)
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsensusAction<V: ConsensusValue = Block> {
    /// Send to every committee member.
    Broadcast(ConsensusMessage<V>),
    /// Arm a timer.
    ScheduleTimeout {
        /// Hand this back to [`ConsensusEngine::on_timeout`](super::ConsensusEngine::on_timeout).
        key: TimeoutKey,
        /// After this long.
        after_ms: u64,
    },
    /// This peer is the proposer: build a block for `height` and pass it to
    /// [`ConsensusEngine::propose`](super::ConsensusEngine::propose).
    RequestValue {
        /// The height.
        height: u64,
        /// The round.
        round: u32,
    },
    /// The block of the height is decided, for good. The certificate verifies with
    /// [`verify_certificate`] against the height's committee.
    Decided {
        /// The block.
        block: V,
        /// The precommits that decided it.
        certificate: QuorumCertificate,
    },
    /// A round started, led by `proposer`: the coordinator of the height in that round.
    NewRound {
        /// The height.
        height: u64,
        /// The round.
        round: u32,
        /// The round's proposer.
        proposer: PeerKey,
    },
}

fn short_hex(key: &PeerKey) -> String {
    key.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// Why a consensus message was dropped.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConsensusError {
    /// No height has been started yet.
    #[error("no height started")]
    NotStarted,
    /// The author is not in the committee.
    #[error("message from {}, not a committee member", short_hex(.0))]
    NotMember(PeerKey),
    /// The signature is not the author's.
    #[error("bad signature from {}", short_hex(.0))]
    BadSignature(PeerKey),
    /// A proposal from someone who is not the round's proposer.
    #[error(
        "proposal for height {height} round {round} from {}, not its proposer",
        short_hex(.author)
    )]
    NotProposer {
        /// The height.
        height: u64,
        /// The round.
        round: u32,
        /// Who sent it.
        author: PeerKey,
    },
    /// A message for a height already left.
    #[error("message for height {height}, already at {current}")]
    Stale {
        /// The message's height.
        height: u64,
        /// The current height.
        current: u64,
    },
    /// A message too far ahead (height or round) to be kept.
    #[error(
        "message for height {height} round {round} is too far ahead of {current_height}/{current_round}"
    )]
    TooFarAhead {
        /// The message's height.
        height: u64,
        /// The message's round.
        round: u32,
        /// The current height.
        current_height: u64,
        /// The current round.
        current_round: u32,
    },
    /// A proposal whose proof-of-lock round is not below its round.
    #[error("proposal for round {round} with proof-of-lock round {pol_round}")]
    BadPolRound {
        /// The round.
        round: u32,
        /// The claimed proof-of-lock round.
        pol_round: u32,
    },
    /// A polka certificate that is not a quorum of valid prevotes of distinct members.
    #[error(
        "polka certificate for height {height} round {round} is not a quorum of valid prevotes"
    )]
    BadCertificate {
        /// The height.
        height: u64,
        /// The round.
        round: u32,
    },
    /// The author already has [`MAX_BUFFERED_PER_MEMBER`] messages kept for that height.
    #[error("buffer for height {height} full for {}", short_hex(.author))]
    BufferFull {
        /// The height.
        height: u64,
        /// The author.
        author: PeerKey,
    },
}

/// Checks a decided block received from another replica (catch-up): it chains to `previous`
/// (`None`: it is genesis), its entries are signed, and `certificate` holds a quorum of
/// `committee`'s precommits for it.
pub fn verify_decided(
    block: &Block,
    certificate: &QuorumCertificate,
    previous: Option<&Block>,
    committee: &Committee,
) -> Result<(), LedgerError> {
    verify_block(block, previous)?;
    verify_certificate(block, certificate, &committee.to_set())
}
