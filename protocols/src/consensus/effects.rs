//! The answers to Malachite's effects: signing and verifying with ed25519, arming and
//! cancelling timers, turning what the core publishes into [`ConsensusMessage`]s (certificates
//! travel as the votes they are made of), and catching the commit certificate of a decision.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
};

use arc_malachitebft_core_consensus::{
    ConsensusMsg, Effect, LivenessMsg, Resumable, Resume, SignedConsensusMsg, ThresholdParams,
    VoteExtensionError,
};
use arc_malachitebft_core_types::{
    CertificateError, CommitCertificate, CommitSignature, NilOrVal, PolkaCertificate,
    PolkaSignature, Round, RoundCertificate, RoundCertificateType, SignedMessage, SignedProposal,
    SignedVote, Timeout, TimeoutKind as CoreTimeoutKind, VoteType,
};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use super::{
    context::{Address, BlockId, LoomContext, Proposal, Signature, ValidatorSet, Vote},
    message::{ConsensusMessage, chain_proposal_bytes, verify},
    types::{
        ConsensusAction, ConsensusConfig, ConsensusValue, SigningWatermark, TimeoutKey, TimeoutKind,
    },
};
use crate::{
    PeerKey,
    contribution::BlobHash,
    ledger::{VoteKind, chain_vote_bytes},
};

/// Verified (signature, message) pairs remembered per height, to verify each once.
const MAX_VERIFIED: usize = 4096;

pub(super) fn round_u32(round: Round) -> u32 {
    // The core only hands out defined rounds for votes, proposals and timeouts.
    round.as_u32().unwrap_or(u32::MAX)
}

pub(super) fn vote_kind(kind: VoteType) -> VoteKind {
    match kind {
        VoteType::Prevote => VoteKind::Prevote,
        VoteType::Precommit => VoteKind::Precommit,
    }
}

pub(super) fn vote_type(kind: VoteKind) -> VoteType {
    match kind {
        VoteKind::Prevote => VoteType::Prevote,
        VoteKind::Precommit => VoteType::Precommit,
    }
}

pub(super) fn nil_or(value: &NilOrVal<BlockId>) -> Option<BlobHash> {
    match value {
        NilOrVal::Nil => None,
        NilOrVal::Val(id) => Some(id.0),
    }
}

pub(super) fn core_vote_bytes(chain: Option<&BlobHash>, vote: &Vote) -> Vec<u8> {
    chain_vote_bytes(
        chain,
        vote_kind(vote.kind),
        vote.height.0,
        round_u32(vote.round),
        nil_or(&vote.value).as_ref(),
    )
}

pub(super) fn core_proposal_bytes<V: ConsensusValue>(
    chain: Option<&BlobHash>,
    proposal: &Proposal<V>,
) -> Vec<u8> {
    chain_proposal_bytes(
        chain,
        proposal.height.0,
        round_u32(proposal.round),
        proposal.pol_round.as_u32(),
        &proposal.value.hash(),
    )
}

pub(super) fn vote_message<V: ConsensusValue>(
    vote: &SignedVote<LoomContext<V>>,
) -> ConsensusMessage<V> {
    ConsensusMessage::Vote {
        kind: vote_kind(vote.message.kind),
        height: vote.message.height.0,
        round: round_u32(vote.message.round),
        value: nil_or(&vote.message.value),
        voter: vote.message.voter.0,
        signature: vote.signature.0.to_vec(),
    }
}

pub(super) fn proposal_message<V: ConsensusValue>(
    proposal: &SignedProposal<LoomContext<V>>,
) -> ConsensusMessage<V> {
    ConsensusMessage::Proposal {
        height: proposal.message.height.0,
        round: round_u32(proposal.message.round),
        pol_round: proposal.message.pol_round.as_u32(),
        block: proposal.message.value.block().clone(),
        proposer: proposal.message.proposer.0,
        signature: proposal.signature.0.to_vec(),
    }
}

pub(super) fn polka_message<V: ConsensusValue>(
    certificate: &PolkaCertificate<LoomContext<V>>,
    sender: PeerKey,
) -> ConsensusMessage<V> {
    ConsensusMessage::PolkaCertificate {
        height: certificate.height.0,
        round: round_u32(certificate.round),
        block_hash: certificate.value_id.0,
        votes: certificate
            .polka_signatures
            .iter()
            .map(|s| (s.address.0, s.signature.0.to_vec()))
            .collect(),
        sender,
    }
}

pub(super) fn signature_of<V: ConsensusValue>(message: &ConsensusMessage<V>) -> Option<Signature> {
    <[u8; 64]>::try_from(message.signature()?)
        .ok()
        .map(Signature)
}

pub(super) fn core_timeout_kind(kind: CoreTimeoutKind) -> Option<TimeoutKind> {
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
pub(super) struct Io<V: ConsensusValue> {
    pub(super) key: SigningKey,
    pub(super) me: PeerKey,
    pub(super) config: ConsensusConfig,
    pub(super) height: u64,
    pub(super) armed: BTreeMap<(TimeoutKind, u32), u64>,
    pub(super) next_seq: u64,
    pub(super) actions: Vec<ConsensusAction<V>>,
    pub(super) verified: BTreeSet<([u8; 64], Vec<u8>)>,
    pub(super) decided: Option<CommitCertificate<LoomContext<V>>>,
    pub(super) own_proposal: Option<ConsensusMessage<V>>,
    /// The highest (height, round) signed at.
    pub(super) watermark: Option<SigningWatermark>,
    /// The committee's keys, decompressed once per height.
    pub(super) keys: BTreeMap<PeerKey, VerifyingKey>,
}

impl<V: ConsensusValue> Io<V> {
    /// The instance's id in the signing domain (`None`: the ledger's).
    pub(super) fn chain(&self) -> Option<BlobHash> {
        self.config.chain().copied()
    }

    pub(super) fn remember(&mut self, signature: [u8; 64], bytes: Vec<u8>) {
        if self.verified.len() < MAX_VERIFIED {
            self.verified.insert((signature, bytes));
        }
    }

    /// Verifies once per height: a pair already verified (on receipt, or signed here) passes.
    pub(super) fn check(&mut self, key: &PeerKey, bytes: Vec<u8>, signature: &[u8; 64]) -> bool {
        let entry = (*signature, bytes);
        if self.verified.contains(&entry) {
            return true;
        }
        let ok = match self.keys.get(key) {
            Some(key) => key
                .verify_strict(&entry.1, &ed25519_dalek::Signature::from_bytes(signature))
                .is_ok(),
            None => verify(key, &entry.1, signature),
        };
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

    fn broadcast_votes(&mut self, votes: impl Iterator<Item = SignedVote<LoomContext<V>>>) {
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
        certificate: &CommitCertificate<LoomContext<V>>,
        set: &ValidatorSet,
        params: ThresholdParams,
    ) -> Result<(), CertificateError<LoomContext<V>>> {
        let (height, round) = (certificate.height.0, round_u32(certificate.round));
        let chain = self.chain();
        let hash = certificate.value_id.0;
        let signers = certificate.commit_signatures.iter().map(|s| {
            (
                s.address,
                chain_vote_bytes(
                    chain.as_ref(),
                    VoteKind::Precommit,
                    height,
                    round,
                    Some(&hash),
                ),
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
        certificate: &PolkaCertificate<LoomContext<V>>,
        set: &ValidatorSet,
        params: ThresholdParams,
    ) -> Result<(), CertificateError<LoomContext<V>>> {
        let (height, round) = (certificate.height.0, round_u32(certificate.round));
        let chain = self.chain();
        let hash = certificate.value_id.0;
        let signers = certificate.polka_signatures.iter().map(|s| {
            (
                s.address,
                chain_vote_bytes(
                    chain.as_ref(),
                    VoteKind::Prevote,
                    height,
                    round,
                    Some(&hash),
                ),
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
        certificate: &RoundCertificate<LoomContext<V>>,
        set: &ValidatorSet,
        params: ThresholdParams,
    ) -> Result<(), CertificateError<LoomContext<V>>> {
        let (height, round) = (certificate.height.0, round_u32(certificate.round));
        let chain = self.chain();
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
                chain_vote_bytes(
                    chain.as_ref(),
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
    pub(super) fn handle(
        &mut self,
        effect: Effect<LoomContext<V>>,
    ) -> Result<Resume<LoomContext<V>>, Infallible> {
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
                        // From round 10 the core also re-publishes the proposal it is locked on,
                        // which may be another member's.
                        if proposal.message.proposer.0 == self.me {
                            self.own_proposal = Some(message.clone());
                        }
                        message
                    }
                };
                self.actions.push(ConsensusAction::Broadcast(message));
                r.resume_with(())
            }
            Effect::PublishLivenessMsg(message, r) => {
                // Round certificates travel as the votes they are made of: every receiver
                // verifies and counts them like any vote (a dropped equivocating vote does not
                // matter there, as the core notes for round certificates).
                match message {
                    LivenessMsg::Vote(vote) => self.broadcast_votes(std::iter::once(vote)),
                    // A polka goes whole (see `ConsensusMessage::PolkaCertificate`).
                    LivenessMsg::PolkaCertificate(certificate) => {
                        let message = polka_message(&certificate, self.me);
                        self.actions.push(ConsensusAction::Broadcast(message));
                    }
                    LivenessMsg::SkipRoundCertificate(certificate) => {
                        self.broadcast_votes(certificate.votes(&LoomContext::new()))
                    }
                }
                r.resume_with(())
            }
            Effect::RepublishVote(vote, r) => {
                self.broadcast_votes(std::iter::once(vote));
                r.resume_with(())
            }
            Effect::RepublishRoundCertificate(certificate, r) => {
                self.broadcast_votes(certificate.votes(&LoomContext::new()));
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
                let signature = self.sign(core_vote_bytes(self.chain().as_ref(), &vote));
                r.resume_with(SignedMessage::new(vote, signature))
            }
            Effect::SignProposal(proposal, r) => {
                self.raise_watermark(proposal.height.0, round_u32(proposal.round));
                let signature = self.sign(core_proposal_bytes(self.chain().as_ref(), &proposal));
                r.resume_with(SignedMessage::new(proposal, signature))
            }
            Effect::VerifySignature(message, key, r) => {
                let chain = self.chain();
                let bytes = match &message.message {
                    ConsensusMsg::Vote(vote) => core_vote_bytes(chain.as_ref(), vote),
                    ConsensusMsg::Proposal(proposal) => {
                        core_proposal_bytes(chain.as_ref(), proposal)
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
            // The engine logs its inputs itself, in its own terms (`WalEntry`).
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
