//! The consensus engine: Malachite's Tendermint core behind Loom's small sans-I/O API.
//!
//! The host feeds it messages, timeouts and (when this peer is the proposer) a block, and
//! carries out the [`ConsensusAction`]s it returns: broadcasts, timers, value requests, decisions.
//! Inside, each input runs through `arc_malachitebft_core_consensus::process!`, and `effects`
//! answers what the core asks for along the way.
//!
//! Bounds, since every input but the host's may come from a byzantine peer: a message is checked
//! for membership, height window and signature before it costs anything else; messages for the
//! next [`FUTURE_HEIGHTS`] heights are kept (at most [`MAX_BUFFERED_PER_MEMBER`] per member and
//! height) and replayed when that height starts; rounds more than the core's lookahead ahead are
//! refused; the core itself caps proposals per round and equivocation evidence.
//!
//! Crash recovery: every input fed to the core is logged ([`ConsensusEngine::wal`]). The host
//! stores the log before it sends the broadcasts of a call; after a restart,
//! [`ConsensusEngine::recover`] replays it, so the peer keeps its votes and its lock. Without it a
//! restarted peer could vote differently in a round it already voted in, or forget a lock, and
//! count as one more byzantine member.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use arc_malachitebft_core_consensus::{
    Error as CoreError, Input, LocallyProposedValue, MAX_FUTURE_ROUND_LOOKAHEAD, Params,
    ProposedValue, State, ThresholdParams, ValuePayload,
};
use arc_malachitebft_core_types::{
    NilOrVal, PolkaCertificate, PolkaSignature, Round, SignedMessage, SignedVote, Timeout,
    TimeoutKind as CoreTimeoutKind, Validity, ValueOrigin, VoteExtensionPolicy,
};
use ed25519_dalek::{SigningKey, VerifyingKey};

use super::{
    context::{
        Address, BlockId, BlockValue, Height, LoomContext, Proposal, Signature, ValidatorSet, Vote,
    },
    effects::{Io, core_vote_bytes, polka_message, round_u32, signature_of, vote_type},
    message::{ConsensusMessage, chain_proposal_bytes},
    types::{
        Committee, ConsensusAction, ConsensusConfig, ConsensusError, ConsensusValue,
        FUTURE_HEIGHTS, MAX_BUFFERED_PER_MEMBER, SigningWatermark, TimeoutKey, TimeoutKind,
        WalEntry,
    },
};
use crate::{
    PeerKey,
    contribution::BlobHash,
    ledger::{Block, QuorumCertificate, VoteKind, chain_vote_bytes},
};

/// Value validity verdicts remembered per height.
const MAX_VALIDITY: usize = 64;
/// (round, block) proposals remembered per height, to drop repeats cheaply.
const MAX_SEEN_PROPOSALS: usize = 256;
/// Most entries in one height's write-ahead log (thousands of rounds' worth).
pub const MAX_WAL_ENTRIES: usize = 65_536;

fn short_hex(key: &PeerKey) -> String {
    key.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// One peer's consensus: Tendermint (Malachite's core) for the ledger, one height at a time.
pub struct ConsensusEngine<V: ConsensusValue = Block> {
    io: Io<V>,
    core: Option<State<LoomContext<V>>>,
    committee: Committee,
    previous: Option<V>,
    started: bool,
    future: BTreeMap<u64, Vec<ConsensusMessage<V>>>,
    future_per_author: BTreeMap<(u64, PeerKey), usize>,
    pending_proposals: Vec<ConsensusMessage<V>>,
    validity: BTreeMap<BlobHash, bool>,
    seen_proposals: BTreeSet<(u32, BlobHash)>,
    wal: Vec<WalEntry<V>>,
    restored: Option<SigningWatermark>,
    decision: Option<(V, QuorumCertificate)>,
    last_core_error: Option<String>,
}

impl<V: ConsensusValue> fmt::Debug for ConsensusEngine<V> {
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

impl<V: ConsensusValue> ConsensusEngine<V> {
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
                keys: BTreeMap::new(),
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
            wal: Vec::new(),
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
    pub fn decision(&self) -> Option<&(V, QuorumCertificate)> {
        self.decision.as_ref()
    }

    /// The value this peer is locked on in the current height, and the round it locked in
    /// (Tendermint's `lockedValue`, `lockedRound`).
    pub fn locked(&self) -> Option<(u32, BlobHash)> {
        let locked = self.core.as_ref()?.driver.round_state().locked.as_ref()?;
        Some((locked.round.as_u32()?, locked.value.hash()))
    }

    /// The latest value this peer saw a quorum of prevotes for in the current height, and that
    /// round (Tendermint's `validValue`, `validRound`): what it re-proposes as proposer.
    pub fn valid(&self) -> Option<(u32, BlobHash)> {
        let valid = self.core.as_ref()?.driver.round_state().valid.as_ref()?;
        Some((valid.round.as_u32()?, valid.value.hash()))
    }

    /// The write-ahead log of the current height: every input fed to the core, in order. It only
    /// grows within a height and starts empty at each [`Self::start_height`]. The host stores
    /// what is new after each call, before it sends that call's broadcasts, and hands it to
    /// [`Self::recover`] after a restart.
    pub fn wal(&self) -> &[WalEntry<V>] {
        &self.wal
    }

    /// The highest (height, round) this peer has signed at.
    pub fn signing_watermark(&self) -> Option<SigningWatermark> {
        self.io.watermark
    }

    /// After a restart without a write-ahead log: the watermark stored before. The engine then
    /// follows the rounds up to and including it without voting or proposing, so it never signs
    /// twice in a round. This is weaker than [`Self::recover`]: the peer forgets its lock, and
    /// a round it stays silent in may need its vote. Call before [`Self::start_height`].
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
    /// next [`Self::on_message`], which brings the host's validation). Heights only go up: starting
    /// the height in progress again, or an earlier one, does nothing (it would forget what this
    /// peer voted). An empty committee starts nothing.
    pub fn start_height(
        &mut self,
        height: u64,
        previous: Option<&V>,
        committee: Committee,
        now_ms: u64,
    ) -> Vec<ConsensusAction<V>> {
        let _ = now_ms;
        if self.started && height <= self.io.height {
            return Vec::new();
        }
        let Some(validator_set) = ValidatorSet::new(committee.members()) else {
            return Vec::new();
        };
        if committee != self.committee || self.io.keys.is_empty() {
            self.io.keys = committee
                .members()
                .iter()
                .filter_map(|m| Some((*m, VerifyingKey::from_bytes(m).ok()?)))
                .collect();
        }
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
        self.wal.clear();

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
                    LoomContext::new(),
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
            match &message {
                ConsensusMessage::Vote { .. } => {
                    // Verified when it was kept.
                    let (Some(signature), Some(bytes)) = (
                        signature_of(&message),
                        message.signing_bytes(self.io.config.chain()),
                    ) else {
                        continue;
                    };
                    self.io.remember(signature.0, bytes);
                    if let Some(vote) = self.to_core_vote(&message, signature) {
                        self.feed_vote(message, vote);
                    }
                }
                ConsensusMessage::PolkaCertificate { .. } => {
                    // Checked against the committee of this height now.
                    if let Some(certificate) = self.to_core_polka(&message)
                        && self.polka_is_quorum(&certificate)
                    {
                        self.feed_polka(message, certificate);
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
        message: ConsensusMessage<V>,
        now_ms: u64,
        validate: &mut dyn FnMut(&V) -> bool,
    ) -> Vec<ConsensusAction<V>> {
        self.handle_message(message, now_ms, validate)
            .unwrap_or_default()
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
        message: ConsensusMessage<V>,
        now_ms: u64,
        validate: &mut dyn FnMut(&V) -> bool,
    ) -> Result<Vec<ConsensusAction<V>>, ConsensusError> {
        let _ = now_ms;
        if !self.started {
            return Err(ConsensusError::NotStarted);
        }
        let author = message.author();
        if !self.committee.contains(&author) {
            return Err(ConsensusError::NotMember(author));
        }
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
        match &message {
            ConsensusMessage::Proposal { pol_round, .. } => {
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
            ConsensusMessage::Vote { .. } => {}
            ConsensusMessage::PolkaCertificate { votes, .. } => {
                if votes.is_empty() || votes.len() > self.committee.len() {
                    return Err(ConsensusError::BadCertificate { height, round });
                }
            }
        }
        let signature = match message.signature() {
            Some(_) => match signature_of(&message) {
                Some(signature) => Some(signature),
                None => return Err(ConsensusError::BadSignature(author)),
            },
            None => None,
        };

        if height > current {
            if round > MAX_FUTURE_ROUND_LOOKAHEAD {
                return Err(too_far);
            }
            if self
                .future
                .get(&height)
                .is_some_and(|kept| kept.contains(&message))
            {
                return Ok(Vec::new());
            }
            let kept = self
                .future_per_author
                .get(&(height, author))
                .copied()
                .unwrap_or(0);
            if kept >= MAX_BUFFERED_PER_MEMBER {
                return Err(ConsensusError::BufferFull { height, author });
            }
            if !message.verify_signature(self.io.config.chain()) {
                return Err(ConsensusError::BadSignature(author));
            }
            if let Some(certificate) = self.to_core_polka(&message)
                && !self.polka_is_quorum(&certificate)
            {
                return Err(ConsensusError::BadCertificate { height, round });
            }
            self.future_per_author.insert((height, author), kept + 1);
            self.future.entry(height).or_default().push(message);
            return Ok(Vec::new());
        }

        if round > current_round.saturating_add(MAX_FUTURE_ROUND_LOOKAHEAD) {
            return Err(too_far);
        }
        // Proposals kept from before this height started get the host's validation once a
        // message of the height is accepted (a refused message leaves them waiting).
        match (message, signature) {
            (message @ ConsensusMessage::Vote { .. }, Some(signature)) => {
                let Some(vote) = self.to_core_vote(&message, signature.clone()) else {
                    return Ok(Vec::new());
                };
                let duplicate = self
                    .core
                    .as_ref()
                    .is_some_and(|s| s.driver.votes().has_vote(&vote));
                if !duplicate {
                    if !self.io.check(
                        &author,
                        core_vote_bytes(self.io.config.chain(), &vote.message),
                        &signature.0,
                    ) {
                        return Err(ConsensusError::BadSignature(author));
                    }
                    self.replay_pending(validate);
                    self.feed_vote(message, vote);
                }
            }
            (
                ConsensusMessage::Proposal {
                    pol_round, block, ..
                },
                Some(signature),
            ) => {
                let value = BlockValue::new(block);
                if !self.seen_proposals.contains(&(round, value.hash())) {
                    let bytes = self.proposal_bytes(height, round, pol_round, &value.hash());
                    if !self.io.check(&author, bytes, &signature.0) {
                        return Err(ConsensusError::BadSignature(author));
                    }
                    self.replay_pending(validate);
                    self.feed_proposal(round, pol_round, author, value, signature, validate);
                }
            }
            (message @ ConsensusMessage::PolkaCertificate { .. }, _) => {
                let Some(certificate) = self.to_core_polka(&message) else {
                    return Err(ConsensusError::BadCertificate { height, round });
                };
                let known = self.core.as_ref().is_some_and(|s| {
                    s.polka_certificate(certificate.round, &certificate.value_id)
                        .is_some()
                });
                if !known {
                    if !self.polka_is_quorum(&certificate) {
                        return Err(ConsensusError::BadCertificate { height, round });
                    }
                    self.replay_pending(validate);
                    self.feed_polka(message, certificate);
                }
            }
            (_, None) => return Err(ConsensusError::BadSignature(author)),
        }
        self.replay_pending(validate);
        Ok(self.take_actions())
    }

    /// The bytes a proposer of this instance signs for (`height`, `round`, `pol_round`, value).
    fn proposal_bytes(
        &self,
        height: u64,
        round: u32,
        pol_round: Option<u32>,
        hash: &BlobHash,
    ) -> Vec<u8> {
        chain_proposal_bytes(self.io.config.chain(), height, round, pol_round, hash)
    }

    /// Proposals of the current height kept from before it started, validated now with
    /// `validate` and fed to the core (without this they wait for the next message of the
    /// height). A host that can validate at once calls it right after [`Self::start_height`].
    pub fn validate_kept_proposals(
        &mut self,
        now_ms: u64,
        validate: &mut dyn FnMut(&V) -> bool,
    ) -> Vec<ConsensusAction<V>> {
        let _ = now_ms;
        if !self.started {
            return Vec::new();
        }
        self.replay_pending(validate);
        self.take_actions()
    }

    /// The core's form of a polka certificate message (`None` for another message, or a
    /// signature of the wrong length).
    fn to_core_polka(
        &self,
        message: &ConsensusMessage<V>,
    ) -> Option<PolkaCertificate<LoomContext<V>>> {
        let ConsensusMessage::PolkaCertificate {
            height,
            round,
            block_hash,
            votes,
            ..
        } = message
        else {
            return None;
        };
        let polka_signatures = votes
            .iter()
            .map(|(voter, signature)| {
                let signature = <[u8; 64]>::try_from(signature.as_slice()).ok()?;
                Some(PolkaSignature::new(Address(*voter), Signature(signature)))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(PolkaCertificate {
            height: Height(*height),
            round: Round::new(*round),
            value_id: BlockId(*block_hash),
            polka_signatures,
        })
    }

    /// Whether a polka certificate holds valid prevotes of a quorum of distinct members.
    fn polka_is_quorum(&mut self, certificate: &PolkaCertificate<LoomContext<V>>) -> bool {
        let message = chain_vote_bytes(
            self.io.config.chain(),
            VoteKind::Prevote,
            certificate.height.0,
            round_u32(certificate.round),
            Some(&certificate.value_id.0),
        );
        let mut voters = BTreeSet::new();
        for s in &certificate.polka_signatures {
            if !self.committee.contains(&s.address.0)
                || !voters.insert(s.address.0)
                || !self.io.check(&s.address.0, message.clone(), &s.signature.0)
            {
                return false;
            }
        }
        voters.len() >= self.committee.quorum()
    }

    /// A verified polka certificate of the current height, into the log and the core.
    fn feed_polka(
        &mut self,
        message: ConsensusMessage<V>,
        certificate: PolkaCertificate<LoomContext<V>>,
    ) {
        self.log(WalEntry::Message(message));
        self.run(Input::PolkaCertificate(certificate));
    }

    /// A timer armed by [`ConsensusAction::ScheduleTimeout`] fired.
    pub fn on_timeout(&mut self, timeout: TimeoutKey, now_ms: u64) -> Vec<ConsensusAction<V>> {
        let _ = now_ms;
        if !self.started || timeout.height != self.io.height {
            return Vec::new();
        }
        if self.io.armed.get(&(timeout.kind, timeout.round)) != Some(&timeout.seq) {
            return Vec::new();
        }
        self.elapse(timeout.kind, timeout.round);
        if timeout.kind == TimeoutKind::Rebroadcast
            && let Some(proposal) = &self.io.own_proposal
            && proposal.height() == self.io.height
            && proposal.round() == self.round()
        {
            // The core re-sends our votes; the proposal of our round goes with them, after the
            // proof of lock it relies on, if any.
            let proposal = proposal.clone();
            if let ConsensusMessage::Proposal {
                pol_round: Some(pol_round),
                block,
                ..
            } = &proposal
                && let Some(certificate) = self.core.as_ref().and_then(|s| {
                    s.polka_certificate(Round::new(*pol_round), &BlockId(block.hash()))
                })
            {
                let message = polka_message(certificate, self.io.me);
                self.io.actions.push(ConsensusAction::Broadcast(message));
            }
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
        block: V,
        now_ms: u64,
    ) -> Vec<ConsensusAction<V>> {
        let _ = now_ms;
        if !self.started || height != self.io.height {
            return Vec::new();
        }
        self.propose_block(round, block);
        self.take_actions()
    }

    /// Recovers the current height after a restart: starts `height` like
    /// [`Self::start_height`], then replays `wal` (what [`Self::wal`] held for that height before
    /// the restart), so that this peer's votes and lock are what they were. The actions include
    /// this peer's votes again (identical: signing is deterministic), and a
    /// [`ConsensusAction::RequestValue`] only for a round whose block it had not proposed yet.
    /// Entries that do not fit (another height, bad signature) are skipped. Only a fresh engine
    /// (no height started yet) recovers; on another this does nothing.
    pub fn recover(
        &mut self,
        height: u64,
        previous: Option<&V>,
        committee: Committee,
        wal: &[WalEntry<V>],
        now_ms: u64,
    ) -> Vec<ConsensusAction<V>> {
        if self.started {
            return Vec::new();
        }
        // The log restores exactly what was signed: no need to stay silent.
        if self.restored.is_some_and(|w| w.height <= height) {
            self.restored = None;
        }
        let mut actions = self.start_height(height, previous, committee, now_ms);
        if !self.started || self.io.height != height {
            return actions;
        }
        let proposed: BTreeSet<u32> = wal
            .iter()
            .filter_map(|entry| match entry {
                WalEntry::Propose { round, .. } => Some(*round),
                _ => None,
            })
            .collect();
        for entry in wal {
            self.replay(entry.clone());
        }
        actions.extend(self.take_actions());
        actions.retain(|action| {
            !matches!(action, ConsensusAction::RequestValue { height: h, round }
                if *h == height && proposed.contains(round))
        });
        actions
    }

    /// One logged input, fed again.
    fn replay(&mut self, entry: WalEntry<V>) {
        let height = self.io.height;
        match entry {
            WalEntry::Message(message) => {
                let author = message.author();
                if message.height() != height
                    || !self.committee.contains(&author)
                    || !message.verify_signature(self.io.config.chain())
                {
                    return;
                }
                if let Some(certificate) = self.to_core_polka(&message) {
                    if self.polka_is_quorum(&certificate) {
                        self.feed_polka(message, certificate);
                    }
                    return;
                }
                let (Some(signature), Some(bytes)) = (
                    signature_of(&message),
                    message.signing_bytes(self.io.config.chain()),
                ) else {
                    return;
                };
                self.io.remember(signature.0, bytes);
                if let Some(vote) = self.to_core_vote(&message, signature) {
                    self.feed_vote(message, vote);
                }
            }
            WalEntry::Proposal { message, valid } => {
                let Some(signature) = signature_of(&message) else {
                    return;
                };
                let author = message.author();
                if message.height() != height
                    || self.committee.proposer(height, message.round()) != Some(author)
                    || !message.verify_signature(self.io.config.chain())
                {
                    return;
                }
                let ConsensusMessage::Proposal {
                    round,
                    pol_round,
                    block,
                    ..
                } = message
                else {
                    return;
                };
                let value = BlockValue::new(block);
                if self.seen_proposals.len() < MAX_SEEN_PROPOSALS {
                    self.seen_proposals.insert((round, value.hash()));
                }
                if self.validity.len() < MAX_VALIDITY {
                    self.validity.insert(value.hash(), valid);
                }
                self.io.remember(
                    signature.0,
                    self.proposal_bytes(height, round, pol_round, &value.hash()),
                );
                self.apply_proposal(round, pol_round, author, value, signature, valid);
            }
            WalEntry::Timeout { kind, round } => {
                // It fired before the restart; the timer armed again by the replay must not
                // fire it twice.
                self.io.armed.remove(&(kind, round));
                self.elapse(kind, round);
            }
            WalEntry::Propose { round, block } => self.propose_block(round, block),
        }
    }

    /// This peer's block for `round` of the current height, if it is that round's proposer and
    /// the block chains.
    fn propose_block(&mut self, round: u32, block: V) {
        let height = self.io.height;
        if self.committee.proposer(height, round) != Some(self.io.me)
            || !block.follows(self.previous.as_ref())
        {
            return;
        }
        self.log(WalEntry::Propose {
            round,
            block: block.clone(),
        });
        let value = BlockValue::new(block);
        if self.seen_proposals.len() < MAX_SEEN_PROPOSALS {
            self.seen_proposals.insert((round, value.hash()));
        }
        self.run(Input::Propose(LocallyProposedValue::new(
            Height(height),
            Round::new(round),
            value,
        )));
    }

    /// A timeout of the current height, into the core (logged unless it only re-sends).
    fn elapse(&mut self, kind: TimeoutKind, round: u32) {
        let core_kind = match kind {
            TimeoutKind::Propose => CoreTimeoutKind::Propose,
            TimeoutKind::Prevote => CoreTimeoutKind::Prevote,
            TimeoutKind::Precommit => CoreTimeoutKind::Precommit,
            TimeoutKind::Rebroadcast => CoreTimeoutKind::Rebroadcast,
        };
        if kind != TimeoutKind::Rebroadcast {
            self.log(WalEntry::Timeout { kind, round });
        }
        self.run(Input::TimeoutElapsed(Timeout::new(
            Round::new(round),
            core_kind,
        )));
    }

    fn log(&mut self, entry: WalEntry<V>) {
        if self.wal.len() < MAX_WAL_ENTRIES {
            self.wal.push(entry);
        }
    }

    /// A verified vote of the current height, into the log and the core.
    fn feed_vote(&mut self, message: ConsensusMessage<V>, vote: SignedVote<LoomContext<V>>) {
        self.log(WalEntry::Message(message));
        self.run(Input::Vote(vote));
    }

    fn to_core_vote(
        &self,
        message: &ConsensusMessage<V>,
        signature: Signature,
    ) -> Option<SignedVote<LoomContext<V>>> {
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
    fn replay_pending(&mut self, validate: &mut dyn FnMut(&V) -> bool) {
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
                self.proposal_bytes(height, round, pol_round, &value.hash()),
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
        value: BlockValue<V>,
        signature: Signature,
        validate: &mut dyn FnMut(&V) -> bool,
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
                let valid = block.height() == height
                    && block.follows(self.previous.as_ref())
                    && validate(block);
                if self.validity.len() < MAX_VALIDITY {
                    self.validity.insert(hash, valid);
                }
                valid
            }
        };
        self.apply_proposal(round, pol_round, proposer, value, signature, valid);
    }

    /// A verified proposal with its validity, into the log and the core: the signed proposal,
    /// then the block with its validity.
    fn apply_proposal(
        &mut self,
        round: u32,
        pol_round: Option<u32>,
        proposer: PeerKey,
        value: BlockValue<V>,
        signature: Signature,
        valid: bool,
    ) {
        let height = self.io.height;
        self.log(WalEntry::Proposal {
            message: ConsensusMessage::Proposal {
                height,
                round,
                pol_round,
                block: value.block().clone(),
                proposer,
                signature: signature.0.to_vec(),
            },
            valid,
        });
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
    fn run(&mut self, input: Input<LoomContext<V>>) {
        let Some(state) = self.core.as_mut() else {
            return;
        };
        let io = &mut self.io;
        let result: Result<(), CoreError<LoomContext<V>>> = arc_malachitebft_core_consensus::process!(
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
        // A peer restored from a watermark votes again once past the round it last signed in.
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

    fn take_actions(&mut self) -> Vec<ConsensusAction<V>> {
        std::mem::take(&mut self.io.actions)
    }
}
