//! The consensus engine: Malachite's Tendermint core behind Loom's small sans-I/O API.
//!
//! The host feeds it messages, timeouts and (when this peer is the proposer) a block, and
//! carries out the [`ConsensusAction`]s it returns: broadcasts, timers, value requests, decisions.
//! Inside, each input runs through `arc_malachitebft_core_consensus::process!`, and the engine
//! answers the core's effects: it signs and verifies with ed25519, keeps the armed timers (a
//! cancelled or superseded timer that fires later is ignored), turns published messages and
//! liveness certificates into [`ConsensusMessage`]s, and collects the commit certificate of a
//! decision into a [`QuorumCertificate`].
//!
//! Bounds, since every input but the host's may come from a byzantine peer: a message is checked
//! for membership, height window and signature before it costs anything else; messages for the
//! next [`FUTURE_HEIGHTS`] heights are kept (at most [`MAX_BUFFERED_PER_MEMBER`] per member and
//! height) and replayed when that height starts; rounds more than the core's lookahead ahead are
//! refused; the core itself caps proposals per round and equivocation evidence.
//!
//! A restarted peer has lost what it voted. So that it never signs twice in one round (which
//! would make it byzantine), the host persists [`ConsensusEngine::signing_watermark`] before it
//! sends the broadcasts of a call, and gives it back with
//! [`ConsensusEngine::restore_signing_watermark`] after a restart: the engine then follows, but
//! does not vote or propose, up to and including that round.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    fmt,
};

use arc_malachitebft_core_consensus::{
    Effect, Error as CoreError, Input, LivenessMsg, LocallyProposedValue,
    MAX_FUTURE_ROUND_LOOKAHEAD, Params, ProposedValue, Resumable, Resume, SignedConsensusMsg,
    State, ThresholdParams, ValuePayload, VoteExtensionError,
};
use arc_malachitebft_core_types::{
    CertificateError, CommitCertificate, CommitSignature, NilOrVal, PolkaCertificate,
    PolkaSignature, Round, RoundCertificate, RoundCertificateType, SignedMessage, SignedProposal,
    SignedVote, Timeout, TimeoutKind as CoreTimeoutKind, ValidatorSet as _, Validity, ValueOrigin,
    VoteExtensionPolicy, VoteType,
};
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};

use super::{
    context::{
        Address, BlockId, BlockValue, Height, LoomContext, Proposal, Signature, ValidatorSet, Vote,
    },
    message::{ConsensusMessage, proposal_bytes, verify},
};
use crate::{
    PeerKey,
    contribution::BlobHash,
    ledger::{
        Block, LedgerError, QuorumCertificate, VoteKind, quorum, verify_block, verify_certificate,
        vote_bytes,
    },
};

/// Heights ahead of the current one whose messages are kept for later.
pub const FUTURE_HEIGHTS: u64 = 2;
/// Messages kept per member for one future height.
pub const MAX_BUFFERED_PER_MEMBER: usize = 16;
/// Verified (signature, message) pairs remembered per height, to verify each once.
const MAX_VERIFIED: usize = 4096;
/// Block validity verdicts remembered per height.
const MAX_VALIDITY: usize = 64;
/// (round, block) proposals remembered per height, to drop repeats cheaply.
const MAX_SEEN_PROPOSALS: usize = 256;

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

/// A timer the host must arm: hand it back to [`ConsensusEngine::on_timeout`] when it fires. A
/// timer cancelled or re-armed in the meantime is ignored then.
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

/// What the host must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsensusAction {
    /// Send to every committee member.
    Broadcast(ConsensusMessage),
    /// Arm a timer.
    ScheduleTimeout {
        /// Hand this back to [`ConsensusEngine::on_timeout`].
        key: TimeoutKey,
        /// After this long.
        after_ms: u64,
    },
    /// This peer is the proposer: build a block for `height` and pass it to
    /// [`ConsensusEngine::propose`].
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
        block: Block,
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
    #[error("proposal for height {height} round {round} from {}, not its proposer", short_hex(.author))]
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

fn round_u32(round: Round) -> u32 {
    // The core only hands out defined rounds for votes, proposals and timeouts.
    round.as_u32().unwrap_or(u32::MAX)
}

fn vote_kind(kind: VoteType) -> VoteKind {
    match kind {
        VoteType::Prevote => VoteKind::Prevote,
        VoteType::Precommit => VoteKind::Precommit,
    }
}

fn vote_type(kind: VoteKind) -> VoteType {
    match kind {
        VoteKind::Prevote => VoteType::Prevote,
        VoteKind::Precommit => VoteType::Precommit,
    }
}

fn nil_or(value: &NilOrVal<BlockId>) -> Option<BlobHash> {
    match value {
        NilOrVal::Nil => None,
        NilOrVal::Val(id) => Some(id.0),
    }
}

fn core_vote_bytes(vote: &Vote) -> Vec<u8> {
    vote_bytes(
        vote_kind(vote.kind),
        vote.height.0,
        round_u32(vote.round),
        nil_or(&vote.value).as_ref(),
    )
}

fn core_proposal_bytes(proposal: &Proposal) -> Vec<u8> {
    proposal_bytes(
        proposal.height.0,
        round_u32(proposal.round),
        proposal.pol_round.as_u32(),
        &proposal.value.hash(),
    )
}

fn vote_message(vote: &SignedVote<LoomContext>) -> ConsensusMessage {
    ConsensusMessage::Vote {
        kind: vote_kind(vote.message.kind),
        height: vote.message.height.0,
        round: round_u32(vote.message.round),
        value: nil_or(&vote.message.value),
        voter: vote.message.voter.0,
        signature: vote.signature.0.to_vec(),
    }
}

fn proposal_message(proposal: &SignedProposal<LoomContext>) -> ConsensusMessage {
    ConsensusMessage::Proposal {
        height: proposal.message.height.0,
        round: round_u32(proposal.message.round),
        pol_round: proposal.message.pol_round.as_u32(),
        block: proposal.message.value.block().clone(),
        proposer: proposal.message.proposer.0,
        signature: proposal.signature.0.to_vec(),
    }
}

fn signature_of(message: &ConsensusMessage) -> Option<Signature> {
    <[u8; 64]>::try_from(message.signature())
        .ok()
        .map(Signature)
}

fn core_timeout_kind(kind: CoreTimeoutKind) -> Option<TimeoutKind> {
    match kind {
        CoreTimeoutKind::Propose => Some(TimeoutKind::Propose),
        CoreTimeoutKind::Prevote => Some(TimeoutKind::Prevote),
        CoreTimeoutKind::Precommit => Some(TimeoutKind::Precommit),
        CoreTimeoutKind::Rebroadcast => Some(TimeoutKind::Rebroadcast),
        // Never emitted: heights are started without a target time.
        CoreTimeoutKind::FinalizeHeight(_) => None,
    }
}

/// How a set of certificate signatures failed.
enum SignersFailure {
    Unknown(Address),
    Duplicate(Address),
    BadSignature(usize),
    NotEnough {
        signed: u64,
        total: u64,
        expected: u64,
    },
}

/// The part of the engine that answers the core's effects (everything but the core's state).
struct Io {
    key: SigningKey,
    me: PeerKey,
    config: ConsensusConfig,
    height: u64,
    armed: BTreeMap<(TimeoutKind, u32), u64>,
    next_seq: u64,
    actions: Vec<ConsensusAction>,
    verified: BTreeSet<([u8; 64], Vec<u8>)>,
    decided: Option<CommitCertificate<LoomContext>>,
    own_proposal: Option<ConsensusMessage>,
    watermark: Option<SigningWatermark>,
}

impl Io {
    fn remember(&mut self, signature: [u8; 64], bytes: Vec<u8>) {
        if self.verified.len() < MAX_VERIFIED {
            self.verified.insert((signature, bytes));
        }
    }

    /// Verifies once per height: a pair already verified (on receipt, or signed here) passes.
    fn check(&mut self, key: &PeerKey, bytes: Vec<u8>, signature: &[u8; 64]) -> bool {
        let entry = (*signature, bytes);
        if self.verified.contains(&entry) {
            return true;
        }
        let ok = verify(key, &entry.1, signature);
        if ok && self.verified.len() < MAX_VERIFIED {
            self.verified.insert(entry);
        }
        ok
    }

    fn raise_watermark(&mut self, height: u64, round: u32) {
        let mark = SigningWatermark { height, round };
        if self.watermark.is_none_or(|w| w < mark) {
            self.watermark = Some(mark);
        }
    }

    fn sign(&mut self, bytes: Vec<u8>) -> Signature {
        let signature = self.key.sign(&bytes).to_bytes();
        self.remember(signature, bytes);
        Signature(signature)
    }

    fn schedule(&mut self, timeout: Timeout) {
        let (Some(kind), Some(round)) = (core_timeout_kind(timeout.kind), timeout.round.as_u32())
        else {
            return;
        };
        self.next_seq += 1;
        self.armed.insert((kind, round), self.next_seq);
        self.actions.push(ConsensusAction::ScheduleTimeout {
            key: TimeoutKey {
                height: self.height,
                round,
                kind,
                seq: self.next_seq,
            },
            after_ms: self.config.timeout_ms(kind, round),
        });
    }

    fn broadcast_votes(&mut self, votes: impl Iterator<Item = SignedVote<LoomContext>>) {
        for vote in votes {
            self.actions
                .push(ConsensusAction::Broadcast(vote_message(&vote)));
        }
    }

    /// Distinct committee members, each with a valid signature, weighing at least `expected`.
    fn check_signers(
        &mut self,
        set: &ValidatorSet,
        signers: impl Iterator<Item = (Address, Vec<u8>, [u8; 64])>,
        expected: u64,
    ) -> Result<(), SignersFailure> {
        let mut seen = BTreeSet::new();
        for (index, (address, bytes, signature)) in signers.enumerate() {
            if set.get_by_address(&address).is_none() {
                return Err(SignersFailure::Unknown(address));
            }
            if !seen.insert(address) {
                return Err(SignersFailure::Duplicate(address));
            }
            if !self.check(&address.0, bytes, &signature) {
                return Err(SignersFailure::BadSignature(index));
            }
        }
        let signed = seen.len() as u64;
        if signed < expected {
            return Err(SignersFailure::NotEnough {
                signed,
                total: set.total_voting_power(),
                expected,
            });
        }
        Ok(())
    }

    // The error type is the core's resume value.
    #[allow(clippy::result_large_err)]
    fn verify_commit(
        &mut self,
        certificate: &CommitCertificate<LoomContext>,
        set: &ValidatorSet,
        params: ThresholdParams,
    ) -> Result<(), CertificateError<LoomContext>> {
        let (height, round) = (certificate.height.0, round_u32(certificate.round));
        let hash = certificate.value_id.0;
        let signers = certificate.commit_signatures.iter().map(|s| {
            (
                s.address,
                vote_bytes(VoteKind::Precommit, height, round, Some(&hash)),
                s.signature.0,
            )
        });
        let expected = params.quorum.min_expected(set.total_voting_power());
        self.check_signers(set, signers, expected)
            .map_err(|failure| match failure {
                SignersFailure::Unknown(a) => CertificateError::UnknownValidator(a),
                SignersFailure::Duplicate(a) => CertificateError::DuplicateVote(a),
                SignersFailure::BadSignature(i) => CertificateError::InvalidCommitSignature(
                    certificate
                        .commit_signatures
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| {
                            CommitSignature::new(Address(self.me), Signature([0; 64]))
                        }),
                ),
                SignersFailure::NotEnough {
                    signed,
                    total,
                    expected,
                } => CertificateError::NotEnoughVotingPower {
                    signed,
                    total,
                    expected,
                },
            })
    }

    // The error type is the core's resume value.
    #[allow(clippy::result_large_err)]
    fn verify_polka(
        &mut self,
        certificate: &PolkaCertificate<LoomContext>,
        set: &ValidatorSet,
        params: ThresholdParams,
    ) -> Result<(), CertificateError<LoomContext>> {
        let (height, round) = (certificate.height.0, round_u32(certificate.round));
        let hash = certificate.value_id.0;
        let signers = certificate.polka_signatures.iter().map(|s| {
            (
                s.address,
                vote_bytes(VoteKind::Prevote, height, round, Some(&hash)),
                s.signature.0,
            )
        });
        let expected = params.quorum.min_expected(set.total_voting_power());
        self.check_signers(set, signers, expected)
            .map_err(|failure| match failure {
                SignersFailure::Unknown(a) => CertificateError::UnknownValidator(a),
                SignersFailure::Duplicate(a) => CertificateError::DuplicateVote(a),
                SignersFailure::BadSignature(i) => CertificateError::InvalidPolkaSignature(
                    certificate
                        .polka_signatures
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| {
                            PolkaSignature::new(Address(self.me), Signature([0; 64]))
                        }),
                ),
                SignersFailure::NotEnough {
                    signed,
                    total,
                    expected,
                } => CertificateError::NotEnoughVotingPower {
                    signed,
                    total,
                    expected,
                },
            })
    }

    // The error type is the core's resume value.
    #[allow(clippy::result_large_err)]
    fn verify_round(
        &mut self,
        certificate: &RoundCertificate<LoomContext>,
        set: &ValidatorSet,
        params: ThresholdParams,
    ) -> Result<(), CertificateError<LoomContext>> {
        let (height, round) = (certificate.height.0, round_u32(certificate.round));
        let total = set.total_voting_power();
        let expected = match certificate.cert_type {
            RoundCertificateType::Skip => params.honest.min_expected(total),
            RoundCertificateType::Precommit => {
                if let Some(s) = certificate
                    .round_signatures
                    .iter()
                    .find(|s| s.vote_type != VoteType::Precommit)
                {
                    return Err(CertificateError::InvalidVoteType(s.address));
                }
                params.quorum.min_expected(total)
            }
        };
        let signers = certificate.round_signatures.iter().map(|s| {
            (
                s.address,
                vote_bytes(
                    vote_kind(s.vote_type),
                    height,
                    round,
                    nil_or(&s.value_id).as_ref(),
                ),
                s.signature.0,
            )
        });
        match self.check_signers(set, signers, expected) {
            Ok(()) => Ok(()),
            Err(SignersFailure::Unknown(a)) => Err(CertificateError::UnknownValidator(a)),
            Err(SignersFailure::Duplicate(a)) => Err(CertificateError::DuplicateVote(a)),
            Err(SignersFailure::BadSignature(i)) => match certificate.round_signatures.get(i) {
                Some(s) => Err(CertificateError::InvalidRoundSignature(s.clone())),
                None => Err(CertificateError::VerificationError(None)),
            },
            Err(SignersFailure::NotEnough {
                signed,
                total,
                expected,
            }) => Err(CertificateError::NotEnoughVotingPower {
                signed,
                total,
                expected,
            }),
        }
    }

    /// Answers one effect of the core.
    fn handle(&mut self, effect: Effect<LoomContext>) -> Result<Resume<LoomContext>, Infallible> {
        Ok(match effect {
            Effect::CancelAllTimeouts(r) => {
                self.armed.clear();
                r.resume_with(())
            }
            Effect::CancelTimeout(timeout, r) => {
                if let (Some(kind), Some(round)) =
                    (core_timeout_kind(timeout.kind), timeout.round.as_u32())
                {
                    self.armed.remove(&(kind, round));
                }
                r.resume_with(())
            }
            Effect::ScheduleTimeout(timeout, r) => {
                self.schedule(timeout);
                r.resume_with(())
            }
            Effect::StartRound(height, round, proposer, _role, r) => {
                self.actions.push(ConsensusAction::NewRound {
                    height: height.0,
                    round: round_u32(round),
                    proposer: proposer.0,
                });
                r.resume_with(())
            }
            Effect::PublishConsensusMsg(message, r) => {
                let message = match message {
                    SignedConsensusMsg::Vote(vote) => vote_message(&vote),
                    SignedConsensusMsg::Proposal(proposal) => {
                        let message = proposal_message(&proposal);
                        self.own_proposal = Some(message.clone());
                        message
                    }
                };
                self.actions.push(ConsensusAction::Broadcast(message));
                r.resume_with(())
            }
            Effect::PublishLivenessMsg(message, r) => {
                // Certificates travel as the votes they are made of: every receiver verifies
                // and counts them like any vote.
                match message {
                    LivenessMsg::Vote(vote) => self.broadcast_votes(std::iter::once(vote)),
                    LivenessMsg::PolkaCertificate(certificate) => {
                        self.broadcast_votes(certificate.votes(&LoomContext))
                    }
                    LivenessMsg::SkipRoundCertificate(certificate) => {
                        self.broadcast_votes(certificate.votes(&LoomContext))
                    }
                }
                r.resume_with(())
            }
            Effect::RepublishVote(vote, r) => {
                self.broadcast_votes(std::iter::once(vote));
                r.resume_with(())
            }
            Effect::RepublishRoundCertificate(certificate, r) => {
                self.broadcast_votes(certificate.votes(&LoomContext));
                r.resume_with(())
            }
            Effect::GetValue(height, round, _timeout, r) => {
                self.actions.push(ConsensusAction::RequestValue {
                    height: height.0,
                    round: round_u32(round),
                });
                r.resume_with(())
            }
            // A proposal message carries its whole block, and the core publishes re-proposals
            // itself: there are no parts to stream again.
            Effect::RestreamProposal(_, _, _, _, _, r) => r.resume_with(()),
            // The sync path of the core is not used: catch-up of decided blocks is the host's.
            Effect::CertVerifiedSyncValue(_, _, r) => r.resume_with(()),
            Effect::CertRejectedSyncValue(_, _, _, r) => r.resume_with(()),
            Effect::Decide(certificate, _extensions, r) => {
                self.decided = Some(certificate);
                r.resume_with(())
            }
            Effect::SignVote(vote, r) => {
                self.raise_watermark(vote.height.0, round_u32(vote.round));
                let signature = self.sign(core_vote_bytes(&vote));
                r.resume_with(SignedMessage::new(vote, signature))
            }
            Effect::SignProposal(proposal, r) => {
                self.raise_watermark(proposal.height.0, round_u32(proposal.round));
                let signature = self.sign(core_proposal_bytes(&proposal));
                r.resume_with(SignedMessage::new(proposal, signature))
            }
            Effect::VerifySignature(message, key, r) => {
                let bytes = match &message.message {
                    arc_malachitebft_core_consensus::ConsensusMsg::Vote(vote) => {
                        core_vote_bytes(vote)
                    }
                    arc_malachitebft_core_consensus::ConsensusMsg::Proposal(proposal) => {
                        core_proposal_bytes(proposal)
                    }
                };
                r.resume_with(self.check(&key, bytes, &message.signature.0))
            }
            Effect::VerifyCommitCertificate(certificate, set, params, r) => {
                r.resume_with(self.verify_commit(&certificate, &set, params))
            }
            Effect::VerifyExtendedCommitCertificate(certificate, set, params, _policy, r) => {
                let result = match certificate
                    .commit_signatures
                    .iter()
                    .find(|s| s.extension.is_some())
                {
                    Some(s) => Err(CertificateError::UnexpectedVoteExtension(s.address)),
                    None => self.verify_commit(&certificate.trim_vote_extensions(), &set, params),
                };
                r.resume_with(result)
            }
            Effect::VerifyPolkaCertificate(certificate, set, params, r) => {
                r.resume_with(self.verify_polka(&certificate, &set, params))
            }
            Effect::VerifyRoundCertificate(certificate, set, params, r) => {
                r.resume_with(self.verify_round(&certificate, &set, params))
            }
            // No write-ahead log: a restarted peer rejoins from its decided chain and its
            // signing watermark.
            Effect::WalAppend(_, _, r) => r.resume_with(()),
            // Vote extensions are disabled.
            Effect::ExtendVote(_, _, _, _, r) => r.resume_with(None),
            Effect::VerifyVoteExtension(_, _, _, _, _, _, r) => {
                r.resume_with(Err(VoteExtensionError::InvalidVoteExtension))
            }
            // Decide already reported the block; the host starts the next height.
            Effect::Finalize(_, _, _, r) => r.resume_with(()),
        })
    }
}

/// One peer's consensus: Tendermint (Malachite's core) for the ledger, one height at a time.
pub struct ConsensusEngine {
    io: Io,
    core: Option<State<LoomContext>>,
    committee: Committee,
    previous: Option<Block>,
    started: bool,
    future: BTreeMap<u64, Vec<ConsensusMessage>>,
    future_per_author: BTreeMap<(u64, PeerKey), usize>,
    pending_proposals: Vec<ConsensusMessage>,
    validity: BTreeMap<BlobHash, bool>,
    seen_proposals: BTreeSet<(u32, BlobHash)>,
    restored: Option<SigningWatermark>,
    decision: Option<(Block, QuorumCertificate)>,
    last_core_error: Option<String>,
}

impl fmt::Debug for ConsensusEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsensusEngine")
            .field("me", &short_hex(&self.io.me))
            .field("height", &self.height())
            .field("round", &self.round())
            .field("committee", &self.committee.len())
            .field("decided", &self.decision.is_some())
            .finish_non_exhaustive()
    }
}

impl ConsensusEngine {
    /// An engine that signs with `signing_key`. Nothing happens until [`Self::start_height`].
    pub fn new(signing_key: SigningKey, config: ConsensusConfig) -> Self {
        let me = signing_key.verifying_key().to_bytes();
        Self {
            io: Io {
                key: signing_key,
                me,
                config,
                height: 0,
                armed: BTreeMap::new(),
                next_seq: 0,
                actions: Vec::new(),
                verified: BTreeSet::new(),
                decided: None,
                own_proposal: None,
                watermark: None,
            },
            core: None,
            committee: Committee::default(),
            previous: None,
            started: false,
            future: BTreeMap::new(),
            future_per_author: BTreeMap::new(),
            pending_proposals: Vec::new(),
            validity: BTreeMap::new(),
            seen_proposals: BTreeSet::new(),
            restored: None,
            decision: None,
            last_core_error: None,
        }
    }

    /// This peer's key.
    pub fn me(&self) -> PeerKey {
        self.io.me
    }

    /// The height being decided (or last decided, until the next [`Self::start_height`]).
    pub fn height(&self) -> u64 {
        self.io.height
    }

    /// The current round of the height.
    pub fn round(&self) -> u32 {
        self.core
            .as_ref()
            .and_then(|s| s.round().as_u32())
            .unwrap_or(0)
    }

    /// The proposer (coordinator) of (`height`, `round`) in the current committee (all zeros
    /// before the first height starts).
    pub fn proposer(&self, height: u64, round: u32) -> PeerKey {
        self.committee.proposer(height, round).unwrap_or([0; 32])
    }

    /// The committee of the current height.
    pub fn committee(&self) -> &Committee {
        &self.committee
    }

    /// The decision of the current height, once there is one.
    pub fn decision(&self) -> Option<&(Block, QuorumCertificate)> {
        self.decision.as_ref()
    }

    /// The highest (height, round) this peer has signed at. The host must store it durably
    /// before sending the broadcasts of the call that raised it.
    pub fn signing_watermark(&self) -> Option<SigningWatermark> {
        self.io.watermark
    }

    /// After a restart: the watermark stored before. The engine will not sign at or below it
    /// (it follows those rounds without voting or proposing). Call before [`Self::start_height`].
    pub fn restore_signing_watermark(&mut self, watermark: SigningWatermark) {
        if self.io.watermark.is_none_or(|w| w < watermark) {
            self.io.watermark = Some(watermark);
        }
        if self.restored.is_none_or(|w| w < watermark) {
            self.restored = Some(watermark);
        }
    }

    /// The last internal error of the core, if any (diagnostics: it should never happen).
    pub fn last_core_error(&self) -> Option<&str> {
        self.last_core_error.as_deref()
    }

    /// Starts deciding `height`, whose block must chain to `previous` (`None` for genesis, height
    /// 0), with `committee`. Messages kept for this height are replayed (proposals wait for the
    /// next [`Self::on_message`], which brings the host's validation). An empty committee starts
    /// nothing.
    pub fn start_height(
        &mut self,
        height: u64,
        previous: Option<&Block>,
        committee: Committee,
        now_ms: u64,
    ) -> Vec<ConsensusAction> {
        let _ = now_ms;
        let Some(validator_set) = ValidatorSet::new(committee.members()) else {
            return Vec::new();
        };
        self.committee = committee;
        self.previous = previous.cloned();
        self.started = true;
        self.io.height = height;
        self.io.armed.clear();
        self.io.verified.clear();
        self.io.decided = None;
        self.io.own_proposal = None;
        self.validity.clear();
        self.seen_proposals.clear();
        self.pending_proposals.clear();
        self.decision = None;

        if self.restored.is_some_and(|w| w.height < height) {
            self.restored = None;
        }
        let params = Params {
            address: Address(self.io.me),
            threshold_params: ThresholdParams::default(),
            value_payload: ValuePayload::ProposalAndParts,
            enabled: self.restored.is_none(),
        };
        match &mut self.core {
            Some(state) => state.params = params,
            None => {
                self.core = Some(State::new(
                    LoomContext,
                    Height(height),
                    validator_set.clone(),
                    params,
                    1,
                    1,
                ));
            }
        }
        self.run(Input::StartHeight(
            Height(height),
            validator_set,
            false,
            None,
            VoteExtensionPolicy::Disabled,
        ));

        // Replay what was kept for this height; drop what is now behind.
        let mut kept = self.future.split_off(&height);
        let replay = kept.remove(&height).unwrap_or_default();
        self.future = kept;
        self.future_per_author = std::mem::take(&mut self.future_per_author)
            .into_iter()
            .filter(|((h, _), _)| *h > height)
            .collect();
        for message in replay {
            let Some(signature) = signature_of(&message) else {
                continue;
            };
            match &message {
                ConsensusMessage::Vote { .. } => {
                    // Verified when it was kept.
                    self.io.remember(signature.0, message.signing_bytes());
                    if let Some(vote) = self.to_core_vote(&message, signature) {
                        self.run(Input::Vote(vote));
                    }
                }
                ConsensusMessage::Proposal { .. } => self.pending_proposals.push(message),
            }
        }
        self.take_actions()
    }

    /// A message from the network. See [`Self::handle_message`]; a dropped message yields no
    /// action.
    pub fn on_message(
        &mut self,
        message: ConsensusMessage,
        now_ms: u64,
        validate: &mut dyn FnMut(&Block) -> bool,
    ) -> Vec<ConsensusAction> {
        match self.handle_message(message, now_ms, validate) {
            Ok(actions) => actions,
            // A refused message may follow the replay of kept proposals: their actions go out.
            Err(_) => self.take_actions(),
        }
    }

    /// A message from the network, from any author. Dropped with an error: non-members, bad
    /// signatures, proposals from someone other than the round's proposer, heights already left,
    /// heights or rounds too far ahead. Messages for the next [`FUTURE_HEIGHTS`] heights are kept
    /// and replayed when their height starts. A proposal's block is valid when it is for this
    /// height, chains to the previous block with validly signed entries
    /// ([`verify_block`]) and `validate` (the host's application check) accepts it; an invalid
    /// block is prevoted nil.
    pub fn handle_message(
        &mut self,
        message: ConsensusMessage,
        now_ms: u64,
        validate: &mut dyn FnMut(&Block) -> bool,
    ) -> Result<Vec<ConsensusAction>, ConsensusError> {
        let _ = now_ms;
        if !self.started {
            return Err(ConsensusError::NotStarted);
        }
        let author = message.author();
        if !self.committee.contains(&author) {
            return Err(ConsensusError::NotMember(author));
        }
        let Some(signature) = signature_of(&message) else {
            return Err(ConsensusError::BadSignature(author));
        };
        let (height, round) = (message.height(), message.round());
        let current = self.io.height;
        let current_round = self.round();
        let too_far = ConsensusError::TooFarAhead {
            height,
            round,
            current_height: current,
            current_round,
        };
        if height < current {
            return Err(ConsensusError::Stale { height, current });
        }
        if height > current.saturating_add(FUTURE_HEIGHTS) {
            return Err(too_far);
        }
        if let ConsensusMessage::Proposal { pol_round, .. } = &message {
            if self.committee.proposer(height, round) != Some(author) {
                return Err(ConsensusError::NotProposer {
                    height,
                    round,
                    author,
                });
            }
            if let Some(pol_round) = *pol_round
                && pol_round >= round
            {
                return Err(ConsensusError::BadPolRound { round, pol_round });
            }
        }

        if height > current {
            if round > MAX_FUTURE_ROUND_LOOKAHEAD {
                return Err(too_far);
            }
            let count = self.future_per_author.entry((height, author)).or_insert(0);
            if *count >= MAX_BUFFERED_PER_MEMBER {
                return Err(ConsensusError::BufferFull { height, author });
            }
            if !message.verify_signature() {
                return Err(ConsensusError::BadSignature(author));
            }
            *count += 1;
            self.future.entry(height).or_default().push(message);
            return Ok(Vec::new());
        }

        // Proposals kept from before this height started get the host's validation now; what
        // they produce goes out with this call, or with the next one if this message is refused.
        self.replay_pending(validate);
        if round > current_round.saturating_add(MAX_FUTURE_ROUND_LOOKAHEAD) {
            return Err(too_far);
        }
        match message {
            ConsensusMessage::Vote { .. } => {
                let Some(vote) = self.to_core_vote(&message, signature.clone()) else {
                    return Ok(self.take_actions());
                };
                let duplicate = self
                    .core
                    .as_ref()
                    .is_some_and(|s| s.driver.votes().has_vote(&vote));
                if duplicate {
                    return Ok(self.take_actions());
                }
                if !self
                    .io
                    .check(&author, core_vote_bytes(&vote.message), &signature.0)
                {
                    return Err(ConsensusError::BadSignature(author));
                }
                self.run(Input::Vote(vote));
            }
            ConsensusMessage::Proposal {
                pol_round, block, ..
            } => {
                let value = BlockValue::new(block);
                if self.seen_proposals.contains(&(round, value.hash())) {
                    return Ok(self.take_actions());
                }
                let bytes = proposal_bytes(height, round, pol_round, &value.hash());
                if !self.io.check(&author, bytes, &signature.0) {
                    return Err(ConsensusError::BadSignature(author));
                }
                self.feed_proposal(round, pol_round, author, value, signature, validate);
            }
        }
        Ok(self.take_actions())
    }

    /// A timer armed by [`ConsensusAction::ScheduleTimeout`] fired.
    pub fn on_timeout(&mut self, timeout: TimeoutKey, now_ms: u64) -> Vec<ConsensusAction> {
        let _ = now_ms;
        if !self.started || timeout.height != self.io.height {
            return Vec::new();
        }
        if self.io.armed.get(&(timeout.kind, timeout.round)) != Some(&timeout.seq) {
            return Vec::new();
        }
        self.io.armed.remove(&(timeout.kind, timeout.round));
        let kind = match timeout.kind {
            TimeoutKind::Propose => CoreTimeoutKind::Propose,
            TimeoutKind::Prevote => CoreTimeoutKind::Prevote,
            TimeoutKind::Precommit => CoreTimeoutKind::Precommit,
            TimeoutKind::Rebroadcast => CoreTimeoutKind::Rebroadcast,
        };
        self.run(Input::TimeoutElapsed(Timeout::new(
            Round::new(timeout.round),
            kind,
        )));
        if timeout.kind == TimeoutKind::Rebroadcast
            && let Some(proposal) = &self.io.own_proposal
            && proposal.height() == self.io.height
            && proposal.round() == self.round()
        {
            // The core re-sends our votes; the proposal of our round goes with them.
            let proposal = proposal.clone();
            self.io.actions.push(ConsensusAction::Broadcast(proposal));
        }
        self.take_actions()
    }

    /// The host's answer to [`ConsensusAction::RequestValue`]: the block this peer proposes.
    /// Ignored unless this peer is the proposer of (`height`, `round`), that round is current,
    /// and the block chains to the previous one.
    pub fn propose(
        &mut self,
        height: u64,
        round: u32,
        block: Block,
        now_ms: u64,
    ) -> Vec<ConsensusAction> {
        let _ = now_ms;
        if !self.started
            || height != self.io.height
            || self.committee.proposer(height, round) != Some(self.io.me)
            || verify_block(&block, self.previous.as_ref()).is_err()
        {
            return Vec::new();
        }
        let value = BlockValue::new(block);
        if self.seen_proposals.len() < MAX_SEEN_PROPOSALS {
            self.seen_proposals.insert((round, value.hash()));
        }
        self.run(Input::Propose(LocallyProposedValue::new(
            Height(height),
            Round::new(round),
            value,
        )));
        self.take_actions()
    }

    fn to_core_vote(
        &self,
        message: &ConsensusMessage,
        signature: Signature,
    ) -> Option<SignedVote<LoomContext>> {
        let ConsensusMessage::Vote {
            kind,
            height,
            round,
            value,
            voter,
            ..
        } = message
        else {
            return None;
        };
        let vote = Vote {
            kind: vote_type(*kind),
            height: Height(*height),
            round: Round::new(*round),
            value: match value {
                Some(hash) => NilOrVal::Val(BlockId(*hash)),
                None => NilOrVal::Nil,
            },
            voter: Address(*voter),
        };
        Some(SignedMessage::new(vote, signature))
    }

    /// Proposals kept from before this height started, now that `validate` is at hand.
    fn replay_pending(&mut self, validate: &mut dyn FnMut(&Block) -> bool) {
        for message in std::mem::take(&mut self.pending_proposals) {
            let Some(signature) = signature_of(&message) else {
                continue;
            };
            let ConsensusMessage::Proposal {
                height,
                round,
                pol_round,
                block,
                proposer,
                ..
            } = message
            else {
                continue;
            };
            if height != self.io.height {
                continue;
            }
            let value = BlockValue::new(block);
            if self.seen_proposals.contains(&(round, value.hash())) {
                continue;
            }
            // Verified when it was kept.
            self.io.remember(
                signature.0,
                proposal_bytes(height, round, pol_round, &value.hash()),
            );
            self.feed_proposal(round, pol_round, proposer, value, signature, validate);
        }
    }

    /// A verified proposal of the current height: the core gets the signed proposal, then the
    /// block with its validity.
    fn feed_proposal(
        &mut self,
        round: u32,
        pol_round: Option<u32>,
        proposer: PeerKey,
        value: BlockValue,
        signature: Signature,
        validate: &mut dyn FnMut(&Block) -> bool,
    ) {
        let height = self.io.height;
        let hash = value.hash();
        if self.seen_proposals.len() < MAX_SEEN_PROPOSALS {
            self.seen_proposals.insert((round, hash));
        }
        let valid = match self.validity.get(&hash) {
            Some(valid) => *valid,
            None => {
                let block = value.block();
                let valid = block.height == height
                    && verify_block(block, self.previous.as_ref()).is_ok()
                    && validate(block);
                if self.validity.len() < MAX_VALIDITY {
                    self.validity.insert(hash, valid);
                }
                valid
            }
        };
        let pol = pol_round.map_or(Round::Nil, Round::new);
        let proposal = Proposal {
            height: Height(height),
            round: Round::new(round),
            value: value.clone(),
            pol_round: pol,
            proposer: Address(proposer),
        };
        self.run(Input::Proposal(SignedMessage::new(proposal, signature)));
        self.run(Input::ProposedValue(
            ProposedValue {
                height: Height(height),
                round: Round::new(round),
                valid_round: pol,
                proposer: Address(proposer),
                value,
                validity: Validity::from_bool(valid),
            },
            ValueOrigin::Consensus,
        ));
    }

    /// Runs one input through the core, answering its effects.
    fn run(&mut self, input: Input<LoomContext>) {
        let Some(state) = self.core.as_mut() else {
            return;
        };
        let io = &mut self.io;
        let result: Result<(), CoreError<LoomContext>> = arc_malachitebft_core_consensus::process!(
            input: input,
            state: state,
            metrics: &(),
            with: effect => io.handle(effect)
        );
        if let Err(error) = result {
            self.last_core_error = Some(error.to_string());
        }
        if let Some(certificate) = self.io.decided.take()
            && let Some((_round, value)) = state.decided_value()
            && value.hash() == certificate.value_id.0
        {
            let certificate = QuorumCertificate {
                height: certificate.height.0,
                round: round_u32(certificate.round),
                block_hash: certificate.value_id.0,
                votes: certificate
                    .commit_signatures
                    .iter()
                    .map(|s| (s.address.0, s.signature.0.to_vec()))
                    .collect(),
            };
            let block = value.block().clone();
            self.decision = Some((block.clone(), certificate.clone()));
            self.io
                .actions
                .push(ConsensusAction::Decided { block, certificate });
        }
        // A restarted peer votes again once past the last round it signed in before.
        if let Some(mark) = self.restored {
            let past = state.height().0 > mark.height
                || (state.height().0 == mark.height
                    && state.round().as_i64() > i64::from(mark.round));
            if past {
                state.params.enabled = true;
                self.restored = None;
            }
        }
    }

    fn take_actions(&mut self) -> Vec<ConsensusAction> {
        std::mem::take(&mut self.io.actions)
    }
}
