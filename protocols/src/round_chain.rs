//! A job's round chain: Tendermint (the same Malachite core as the ledger) deciding, round after
//! round, which close of a training round is final, and electing the round's coordinator.
//!
//! The round's close is built by its first-ranked ready contributor and applied by every peer on
//! receipt ([`crate::round`]): that is the fast path, and it can split when two contributors
//! close the same round (a slow first-ranked one, a byzantine one sending two closes). The round
//! chain settles it. Height `r` of the chain decides round `r`:
//!
//! - **Committee**: the contributors the close of round `r - 1` accepted (the round's electorate,
//!   the same set on every peer that applied that close, or learned it from the chain's
//!   decision). The first round of a job, and a round right after a resync, have no committee
//!   known to the peer: the fast path alone closes them.
//! - **Coordinator**: the proposer of (height, consensus round) in Tendermint's rotation over the
//!   committee. It proposes the close it applied. If it is down or cut off, the members time
//!   out, prevote and precommit nil, and the next member in the rotation coordinates: the
//!   election is the members' gossiped, signed votes.
//! - **Validity**: a member prevotes a proposal only when its accepted set (authors and blobs)
//!   is the one it applied itself. A decision therefore needs more than two thirds of the
//!   committee to have applied that close: with fewer than a third byzantine, honest peers hold
//!   the decided model, and a byzantine coordinator cannot have a close decided that nobody
//!   holds.
//! - **Decision**: the close and its quorum certificate. A peer that applied another close of
//!   the round resyncs onto the decided branch ([`crate::round::RoundEngine::on_decided`]); a
//!   peer that has not closed the round yet applies the decided close; other closes of a decided
//!   round are refused.
//!
//! A member starts height `r` once it applied round `r` and the height before is settled, so the
//! coordinator has its close at hand and the height takes one exchange of votes, not a training
//! round. Settled means decided, passed by the members (a member's signed message of a later
//! height this peer applied), or given up after four proposal timeouts; applied rounds wait in a
//! short queue meanwhile. A height given up leaves the round to the fast path's other menders
//! (majority, ledger tip). Messages of later heights are kept (bounded) and judged against their
//! own height's committee when it starts. Peers outside the committee, and members that applied
//! another close, learn a decision from its proposal and a quorum of precommits, as a catching-up
//! replica would.
//!
//! Votes and proposals are signed with the job id in their domain
//! ([`crate::ledger::chain_vote_bytes`]): a member's vote in one job, or on the ledger, never
//! counts in another.

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::SigningKey;

use crate::{
    PeerKey,
    consensus::{
        Committee, ConsensusAction, ConsensusConfig, ConsensusEngine, ConsensusError,
        ConsensusMessage, ConsensusValue, TimeoutKey,
    },
    contribution::{BlobHash, SignedCommitment},
    encode,
    ledger::{QuorumCertificate, VoteKind, verify_certificate_in},
    round::{JobId, MAX_TRAIN_MESSAGE_BYTES, RoundClose},
};

/// Decisions remembered (newest rounds).
const DECIDED_ROUNDS: usize = 8;
/// Proposed closes of the current height kept to learn a decision from its precommits.
const MAX_PROPOSALS_KEPT: usize = 16;
/// (consensus round, value) pairs of the current height whose precommits are counted.
const MAX_PRECOMMIT_TALLIES: usize = 64;
/// Messages of later heights kept: in all, per author, and their encoded bytes in all.
const MAX_AHEAD_MESSAGES: usize = 1_024;
const MAX_AHEAD_PER_AUTHOR: usize = 16;
const MAX_AHEAD_BYTES: usize = 4 << 20;
/// Heights beyond the one in progress whose messages are kept (further ones would be given up
/// before they start).
const AHEAD_HEIGHTS: u64 = QUEUED_HEIGHTS as u64 + 2;
/// Applied rounds waiting for their height to start (beyond, the oldest is skipped).
pub const QUEUED_HEIGHTS: usize = 4;
/// A height runs this many proposal timeouts without a decision before the next starts: room
/// for a few coordinators to be skipped.
const GIVE_UP_PROPOSE_TIMEOUTS: u64 = 4;

impl ConsensusValue for RoundClose {
    // A proposal travels in a training gossip message.
    const MAX_BYTES: usize = MAX_TRAIN_MESSAGE_BYTES - 2048;

    fn hash(&self) -> BlobHash {
        *blake3::hash(&encode(self)).as_bytes()
    }

    fn height(&self) -> u64 {
        self.round
    }

    /// Heights are not chained: each round's close stands on its own (`previous` is always
    /// `None`). The close must be well formed: non-empty, every commitment validly signed for
    /// its job and round, no author twice.
    fn follows(&self, previous: Option<&Self>) -> bool {
        previous.is_none_or(|p| p.job_id == self.job_id && p.round + 1 == self.round)
            && close_is_well_formed(self)
    }
}

/// Whether `close` lists at least one contribution, each signed by its author for the close's
/// job and round, and no author twice.
pub fn close_is_well_formed(close: &RoundClose) -> bool {
    let mut authors = BTreeSet::new();
    !close.commitments.is_empty()
        && close.commitments.iter().all(|signed| {
            signed.verify().is_ok_and(|c| {
                c.job_id == close.job_id && c.round == close.round && authors.insert(c.author)
            })
        })
}

/// What a close aggregates: its accepted (author, blob) pairs, sorted. Two closes of a round
/// with the same content yield the same model from the same start. The commitments are read as
/// claimed, not verified again: this compares closes whose signatures were checked
/// ([`close_is_well_formed`], the round engine).
pub fn close_content(close: &RoundClose) -> Vec<(PeerKey, BlobHash)> {
    let mut content: Vec<(PeerKey, BlobHash)> = close
        .commitments
        .iter()
        .filter_map(|signed: &SignedCommitment| signed.claimed().ok())
        .map(|c| (c.author, c.blob_hash))
        .collect();
    content.sort_unstable();
    content.dedup();
    content
}

/// Whether `certificate` holds the precommits of a quorum of `committee` for `close` in the
/// round chain of `job_id` (what a decision carries).
pub fn certificate_decides(
    job_id: &JobId,
    close: &RoundClose,
    certificate: &QuorumCertificate,
    committee: &Committee,
) -> bool {
    close.job_id == *job_id
        && verify_certificate_in(
            Some(job_id),
            close.round,
            &close.hash(),
            certificate,
            &committee.to_set(),
        )
        .is_ok()
}

/// What the host must do for the round chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainAction {
    /// Gossip to the job's peers (the training topic).
    Broadcast(ConsensusMessage<RoundClose>),
    /// Arm a timer; hand `key` back to [`RoundChain::on_timeout`] when it fires.
    ScheduleTimeout {
        /// The timer.
        key: TimeoutKey,
        /// After this long.
        after_ms: u64,
    },
    /// The close of `round` is decided, for good.
    Decided {
        /// The training round (the chain height).
        round: u64,
        /// The decided close.
        close: RoundClose,
        /// The precommits that decided it.
        certificate: QuorumCertificate,
        /// Who proposed it: the round's elected coordinator.
        coordinator: PeerKey,
        /// How long after this peer started the height the decision came, in ms.
        after_ms: u64,
    },
    /// A consensus round of the height started, coordinated by `coordinator` (consensus round
    /// above 0: the coordinators before it were skipped).
    NewCoordinator {
        /// The training round.
        round: u64,
        /// The consensus round within it.
        consensus_round: u32,
        /// Its coordinator.
        coordinator: PeerKey,
    },
}

/// One peer's round chain for one job.
#[derive(Debug)]
pub struct RoundChain {
    engine: ConsensusEngine<RoundClose>,
    job_id: JobId,
    /// The close this peer applied at the height being decided.
    applied: Option<RoundClose>,
    /// Its content ([`close_content`]), what a valid proposal must aggregate.
    applied_content: std::sync::Arc<Vec<(PeerKey, BlobHash)>>,
    /// Decided rounds (newest [`DECIDED_ROUNDS`]), with the consensus round they were decided in.
    decided: BTreeMap<u64, u32>,
    /// Coordinators skipped (consensus rounds above 0 started) so far.
    coordinator_changes: u64,
    /// Closes proposed at the current height, by hash.
    proposals: BTreeMap<BlobHash, RoundClose>,
    /// Precommits for a value at the current height: (consensus round, value) -> voter ->
    /// signature. The first verified signature of each voter is kept.
    precommits: BTreeMap<(u32, BlobHash), BTreeMap<PeerKey, Vec<u8>>>,
    /// Heights this peer applied, waiting for the one in progress: round -> (its close, its
    /// committee).
    queued: BTreeMap<u64, (RoundClose, BTreeSet<PeerKey>)>,
    /// When the height in progress started.
    started_ms: u64,
    /// How long a height runs without a decision before the next queued one starts.
    give_up_ms: u64,
    /// The highest later height a member's message was taken for since the height in progress
    /// started (the members moved on).
    ahead_seen: Option<u64>,
    /// Messages of heights above the one in progress (or of any height before the first
    /// starts), kept unchecked and taken when their height starts, against its committee: the
    /// committee changes from one height to the next, so they cannot be judged before.
    ahead: Vec<(ConsensusMessage<RoundClose>, usize)>,
    /// Encoded bytes of `ahead` (each message's are kept beside it).
    ahead_bytes: usize,
}

impl RoundChain {
    /// The chain of `job_id`, signing with `key`. `config` sets the timeouts; its chain id is
    /// set to the job here.
    pub fn new(key: SigningKey, job_id: JobId, config: ConsensusConfig) -> Self {
        let give_up_ms = GIVE_UP_PROPOSE_TIMEOUTS.saturating_mul(config.propose_ms().max(1));
        Self {
            engine: ConsensusEngine::new(key, config.with_chain(job_id)),
            job_id,
            applied: None,
            applied_content: Default::default(),
            decided: BTreeMap::new(),
            coordinator_changes: 0,
            proposals: BTreeMap::new(),
            precommits: BTreeMap::new(),
            queued: BTreeMap::new(),
            started_ms: 0,
            give_up_ms,
            ahead_seen: None,
            ahead: Vec::new(),
            ahead_bytes: 0,
        }
    }

    /// The height being decided (0 before the first).
    pub fn height(&self) -> u64 {
        self.engine.height()
    }

    /// The coordinator of consensus round `consensus_round` of training round `round`, in the
    /// current committee.
    pub fn coordinator(&self, round: u64, consensus_round: u32) -> PeerKey {
        self.engine.proposer(round, consensus_round)
    }

    /// The current committee.
    pub fn committee(&self) -> &Committee {
        self.engine.committee()
    }

    /// Whether `round` was decided here, and in which consensus round.
    pub fn decided(&self, round: u64) -> Option<u32> {
        self.decided.get(&round).copied()
    }

    /// Rounds decided so far (the newest few are remembered).
    pub fn decided_rounds(&self) -> usize {
        self.decided.len()
    }

    /// How many times a coordinator was skipped (a consensus round above 0 started).
    pub fn coordinator_changes(&self) -> u64 {
        self.coordinator_changes
    }

    /// This peer applied `applied`, the close of its round `r`, whose committee (the
    /// contributors of round `r - 1`'s close) is `committee`: height `r` starts once the height
    /// in progress is decided or given up ([`Self::poll`]); until then it waits in a queue of
    /// [`QUEUED_HEIGHTS`] (the oldest dropped beyond). A height at or below the one in progress,
    /// another job's close, or an empty committee starts nothing.
    pub fn start(
        &mut self,
        applied: RoundClose,
        committee: BTreeSet<PeerKey>,
        now_ms: u64,
    ) -> Vec<ChainAction> {
        let round = applied.round;
        if applied.job_id != self.job_id || committee.is_empty() {
            return Vec::new();
        }
        if self.applied.is_some() && round <= self.engine.height() {
            return Vec::new();
        }
        // Members' messages of this height that came before it was applied here show the
        // members already run it.
        let members_there = self.ahead.iter().any(|(m, _)| {
            m.height() == round
                && committee.contains(&m.author())
                && m.verify_signature(Some(&self.job_id))
        });
        if members_there && round > self.engine.height() {
            self.members_at(round);
        }
        self.queued.insert(round, (applied, committee));
        while self.queued.len() > QUEUED_HEIGHTS {
            self.queued.pop_first();
        }
        self.poll(now_ms)
    }

    /// Starts the next queued height when the one in progress is settled: decided (the next
    /// queued starts), passed by the members (a message of a later queued height came: that
    /// height starts), or run for [`RoundChain::give_up_ms`] without either (its committee lost
    /// its quorum, or the members applied different closes: the newest queued starts, the
    /// others being behind the members by then). Called on every tick of the host.
    pub fn poll(&mut self, now_ms: u64) -> Vec<ChainAction> {
        let mut out = Vec::new();
        loop {
            let height = self.engine.height();
            let running = self.applied.is_some();
            let next = if !running || self.decided.contains_key(&height) {
                self.queued.keys().find(|r| **r > height).copied()
            } else if let Some(seen) = self.ahead_seen.filter(|seen| *seen > height) {
                self.queued.keys().find(|r| **r >= seen).copied()
            } else if now_ms >= self.started_ms.saturating_add(self.give_up_ms) {
                self.queued.keys().next_back().copied()
            } else {
                None
            };
            let Some(next) = next else {
                return out;
            };
            self.queued = self.queued.split_off(&next);
            let Some((applied, committee)) = self.queued.remove(&next) else {
                return out;
            };
            out.extend(self.begin(applied, committee, now_ms));
        }
    }

    /// Starts the height of `applied` with `committee`.
    fn begin(
        &mut self,
        applied: RoundClose,
        committee: BTreeSet<PeerKey>,
        now_ms: u64,
    ) -> Vec<ChainAction> {
        let round = applied.round;
        self.started_ms = now_ms;
        self.ahead_seen = None;
        self.applied_content = std::sync::Arc::new(close_content(&applied));
        self.applied = Some(applied);
        self.proposals.clear();
        self.precommits.clear();
        let mut actions = self.engine.start_height(
            round,
            None,
            Committee::new(committee.into_iter().collect()),
            now_ms,
        );
        // The messages of this height that came before it started are taken now; those of
        // later heights wait on.
        let mut validate = self.validity();
        let (now_due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ahead)
            .into_iter()
            .filter(|(m, _)| m.height() >= round)
            .partition(|(m, _)| m.height() == round);
        self.ahead = later;
        self.ahead_bytes = self.ahead.iter().map(|(_, bytes)| bytes).sum();
        for (message, _) in now_due {
            if let Ok(more) = self
                .engine
                .handle_message(message.clone(), now_ms, &mut validate)
            {
                actions.extend(more);
                self.tally(&message);
            }
        }
        actions.extend(self.engine.validate_kept_proposals(now_ms, &mut validate));
        let mut out = self.translate(actions, now_ms);
        out.extend(self.learn_decision(now_ms));
        out
    }

    /// A chain message from the training topic. Non-members' messages, bad signatures and
    /// heights out of the window are refused with the reason.
    pub fn on_message(
        &mut self,
        message: ConsensusMessage<RoundClose>,
        now_ms: u64,
    ) -> Result<Vec<ChainAction>, ConsensusError> {
        let height = message.height();
        if self.applied.is_none() || height > self.engine.height() {
            self.keep_ahead(message);
            return Ok(self.poll(now_ms));
        }
        let mut validate = self.validity();
        let current = self.engine.height() == height;
        let seen = current.then(|| message.clone());
        let actions = self.engine.handle_message(message, now_ms, &mut validate)?;
        let mut out = self.translate(actions, now_ms);
        if let Some(message) = seen {
            self.tally(&message);
            out.extend(self.learn_decision(now_ms));
        }
        out.extend(self.poll(now_ms));
        Ok(out)
    }

    /// A member's signed message showed the members at `height`, above the one in progress.
    fn members_at(&mut self, height: u64) {
        self.ahead_seen = Some(self.ahead_seen.map_or(height, |seen| seen.max(height)));
    }

    /// Keeps a message of a later height (bounded in all and per author). One signed by a member
    /// of a height this peer applied and queued shows the members moved on to it.
    fn keep_ahead(&mut self, message: ConsensusMessage<RoundClose>) {
        let author = message.author();
        let height = message.height();
        let bytes = message.to_bytes().len();
        let too_far =
            self.applied.is_some() && height > self.engine.height().saturating_add(AHEAD_HEIGHTS);
        if too_far
            || self.ahead.len() >= MAX_AHEAD_MESSAGES
            || self.ahead_bytes.saturating_add(bytes) > MAX_AHEAD_BYTES
            || self.ahead.iter().any(|(m, _)| *m == message)
            || self
                .ahead
                .iter()
                .filter(|(m, _)| m.author() == author)
                .count()
                >= MAX_AHEAD_PER_AUTHOR
        {
            return;
        }
        if let Some((_, committee)) = self.queued.get(&height)
            && committee.contains(&author)
            && message.verify_signature(Some(&self.job_id))
        {
            self.members_at(height);
        }
        self.ahead_bytes += bytes;
        self.ahead.push((message, bytes));
    }

    /// Counts a verified message of the current height: a proposal's close, a precommit for a
    /// value.
    fn tally(&mut self, message: &ConsensusMessage<RoundClose>) {
        match message {
            ConsensusMessage::Proposal { block, .. }
                if self.proposals.len() < MAX_PROPOSALS_KEPT =>
            {
                self.proposals.insert(block.hash(), block.clone());
            }
            ConsensusMessage::Vote {
                kind: VoteKind::Precommit,
                round,
                value: Some(value),
                voter,
                signature,
                ..
            } => {
                let key = (*round, *value);
                if !self.precommits.contains_key(&key)
                    && self.precommits.len() >= MAX_PRECOMMIT_TALLIES
                {
                    return;
                }
                self.precommits
                    .entry(key)
                    .or_default()
                    .entry(*voter)
                    .or_insert_with(|| signature.clone());
            }
            _ => {}
        }
    }

    /// A decision this peer's own consensus did not reach (it judged the close invalid: it had
    /// applied another), learned as a catching-up replica learns one: a proposed close and the
    /// precommits of a quorum of the committee for it in one consensus round.
    fn learn_decision(&mut self, now_ms: u64) -> Vec<ChainAction> {
        let height = self.engine.height();
        if self.decided.contains_key(&height) || self.engine.decision().is_some() {
            return Vec::new();
        }
        let quorum = self.engine.committee().quorum();
        let Some(((round, value), votes)) = self.precommits.iter().find(|((_, value), votes)| {
            votes.len() >= quorum && self.proposals.contains_key(value)
        }) else {
            return Vec::new();
        };
        let Some(close) = self.proposals.get(value).cloned() else {
            return Vec::new();
        };
        let certificate = QuorumCertificate {
            height,
            round: *round,
            block_hash: *value,
            votes: votes.iter().map(|(k, s)| (*k, s.clone())).collect(),
        };
        vec![self.decide(close, certificate, now_ms)]
    }

    /// Records the decision of `close`'s round.
    fn decide(
        &mut self,
        close: RoundClose,
        certificate: QuorumCertificate,
        now_ms: u64,
    ) -> ChainAction {
        let round = close.round;
        let coordinator = self.engine.proposer(round, certificate.round);
        self.decided.insert(round, certificate.round);
        while self.decided.len() > DECIDED_ROUNDS {
            self.decided.pop_first();
        }
        ChainAction::Decided {
            round,
            close,
            certificate,
            coordinator,
            after_ms: now_ms.saturating_sub(self.started_ms),
        }
    }

    /// Whether a proposed close is valid here: the one this peer applied at the height, by
    /// content (its accepted authors and blobs).
    fn validity(&self) -> impl FnMut(&RoundClose) -> bool + use<> {
        let mine = self.applied.is_some().then(|| self.applied_content.clone());
        let job_id = self.job_id;
        move |close: &RoundClose| {
            close.job_id == job_id && mine.as_ref().is_some_and(|m| **m == close_content(close))
        }
    }

    /// A timer armed by [`ChainAction::ScheduleTimeout`] fired.
    pub fn on_timeout(&mut self, key: TimeoutKey, now_ms: u64) -> Vec<ChainAction> {
        let actions = self.engine.on_timeout(key, now_ms);
        let mut out = self.translate(actions, now_ms);
        out.extend(self.poll(now_ms));
        out
    }

    /// The engine's actions in the chain's terms; a request for this peer's proposal is
    /// answered with the close it applied.
    fn translate(
        &mut self,
        actions: Vec<ConsensusAction<RoundClose>>,
        now_ms: u64,
    ) -> Vec<ChainAction> {
        let mut out = Vec::new();
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                ConsensusAction::Broadcast(message) => {
                    if message.height() == self.engine.height() {
                        self.tally(&message);
                    }
                    out.push(ChainAction::Broadcast(message));
                }
                ConsensusAction::ScheduleTimeout { key, after_ms } => {
                    out.push(ChainAction::ScheduleTimeout { key, after_ms })
                }
                ConsensusAction::RequestValue { height, round } => {
                    if let Some(applied) = self.applied.clone()
                        && applied.round == height
                    {
                        queue.extend(self.engine.propose(height, round, applied, now_ms));
                    }
                }
                ConsensusAction::Decided { block, certificate } => {
                    if !self.decided.contains_key(&block.round) {
                        out.push(self.decide(block, certificate, now_ms));
                    }
                }
                ConsensusAction::NewRound {
                    height,
                    round,
                    proposer,
                } => {
                    if round > 0 {
                        self.coordinator_changes += 1;
                    }
                    out.push(ChainAction::NewCoordinator {
                        round: height,
                        consensus_round: round,
                        coordinator: proposer,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ed25519_dalek::{Signer, SigningKey};

    use super::*;
    use crate::contribution::Commitment;

    const JOB: JobId = [7; 32];
    const PROPOSE_MS: u64 = 1_000;

    fn key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i + 1; 32])
    }

    fn commit(round: u64, signer: &SigningKey, blob: &[u8]) -> SignedCommitment {
        Commitment {
            job_id: JOB,
            round,
            blob_hash: crate::contribution::blob_hash(blob),
            blob_len: blob.len() as u64,
            author: signer.verifying_key().to_bytes(),
        }
        .seal(|m| signer.sign(m).to_bytes().to_vec())
    }

    /// The close of `round` by `closer` accepting the contributions of `authors` (blob `tag`).
    fn close(round: u64, closer: u8, authors: &[u8], tag: u8) -> RoundClose {
        RoundClose {
            job_id: JOB,
            round,
            proposer: key(closer).verifying_key().to_bytes(),
            commitments: authors
                .iter()
                .map(|a| commit(round, &key(*a), &[*a, tag]))
                .collect(),
            refused: Vec::new(),
        }
    }

    /// A prevote by `signer` in the instance `chain` (`None`: the ledger's).
    fn prevote(
        chain: Option<&JobId>,
        signer: u8,
        height: u64,
        round: u32,
        value: Option<BlobHash>,
    ) -> ConsensusMessage<RoundClose> {
        ConsensusMessage::signed_vote_in(
            chain,
            &key(signer),
            VoteKind::Prevote,
            height,
            round,
            value,
        )
    }

    /// The index of the test peer whose key is `peer`.
    fn index_of(peer: &PeerKey) -> usize {
        (0..=u8::MAX)
            .position(|i| key(i).verifying_key().to_bytes() == *peer)
            .expect("a test peer")
    }

    /// The keys of the test peers `keys`.
    fn member_set(keys: &[u8]) -> BTreeSet<PeerKey> {
        keys.iter()
            .map(|k| key(*k).verifying_key().to_bytes())
            .collect()
    }

    fn members(keys: &[u8]) -> Committee {
        member_set(keys).into_iter().collect()
    }

    fn config() -> ConsensusConfig {
        ConsensusConfig::default()
            .with_propose_ms(PROPOSE_MS)
            .with_prevote_ms(500)
            .with_precommit_ms(500)
            .with_rebroadcast_ms(2_000)
    }

    /// Peers on virtual time: every broadcast reaches every other peer that is up, in order.
    struct Net {
        chains: Vec<RoundChain>,
        up: Vec<bool>,
        now_ms: u64,
        inbox: std::collections::VecDeque<(usize, ConsensusMessage<RoundClose>)>,
        timers: BTreeMap<(u64, u64), (usize, TimeoutKey)>,
        next_timer: u64,
        decided: Vec<Option<(RoundClose, PeerKey, u32)>>,
    }

    impl Net {
        fn new(n: u8) -> Self {
            Self {
                chains: (0..n)
                    .map(|i| RoundChain::new(key(i), JOB, config()))
                    .collect(),
                up: vec![true; usize::from(n)],
                now_ms: 0,
                inbox: Default::default(),
                timers: BTreeMap::new(),
                next_timer: 0,
                decided: vec![None; usize::from(n)],
            }
        }

        fn handle(&mut self, from: usize, actions: Vec<ChainAction>) {
            for action in actions {
                match action {
                    ChainAction::Broadcast(message) => self.inbox.push_back((from, message)),
                    ChainAction::ScheduleTimeout { key, after_ms } => {
                        self.next_timer += 1;
                        self.timers
                            .insert((self.now_ms + after_ms, self.next_timer), (from, key));
                    }
                    ChainAction::Decided {
                        round: _,
                        close,
                        certificate,
                        coordinator,
                        after_ms: _,
                    } => {
                        assert!(certificate_decides(
                            &JOB,
                            &close,
                            &certificate,
                            self.chains[from].committee()
                        ));
                        let mut other = certificate.clone();
                        other.round += 1;
                        assert!(!certificate_decides(
                            &JOB,
                            &close,
                            &other,
                            self.chains[from].committee()
                        ));
                        self.decided[from] = Some((close, coordinator, certificate.round));
                    }
                    ChainAction::NewCoordinator { .. } => {}
                }
            }
        }

        fn start(&mut self, i: usize, applied: RoundClose, committee: &[u8]) {
            let actions = self.chains[i].start(applied, member_set(committee), self.now_ms);
            self.handle(i, actions);
        }

        /// Delivers messages and fires timers until every peer that is up decided or
        /// `limit_ms` of virtual time passed.
        fn run(&mut self, limit_ms: u64) {
            loop {
                while let Some((from, message)) = self.inbox.pop_front() {
                    for to in 0..self.chains.len() {
                        if to == from || !self.up[to] {
                            continue;
                        }
                        if let Ok(actions) =
                            self.chains[to].on_message(message.clone(), self.now_ms)
                        {
                            self.handle(to, actions);
                        }
                    }
                }
                let all_decided =
                    (0..self.chains.len()).all(|i| !self.up[i] || self.decided[i].is_some());
                if all_decided || self.now_ms > limit_ms {
                    return;
                }
                let Some(((at, _), (peer, key))) = self.timers.pop_first() else {
                    return;
                };
                self.now_ms = self.now_ms.max(at);
                if self.up[peer] {
                    let actions = self.chains[peer].on_timeout(key, self.now_ms);
                    self.handle(peer, actions);
                }
            }
        }
    }

    #[test]
    fn members_that_applied_one_close_decide_it_with_the_rotation_coordinator() {
        let mut net = Net::new(4);
        let applied = close(5, 2, &[0, 1, 2, 3], 0);
        for i in 0..4 {
            net.start(i, applied.clone(), &[0, 1, 2, 3]);
        }
        net.run(60_000);
        let coordinator = net.chains[0].coordinator(5, 0);
        for i in 0..4 {
            let (decided, by, consensus_round) = net.decided[i].clone().expect("decided");
            assert_eq!(decided, applied);
            assert_eq!(by, coordinator);
            assert_eq!(consensus_round, 0);
            assert_eq!(net.chains[i].decided(5), Some(0));
        }
        assert!(net.now_ms < PROPOSE_MS, "decided without a timeout");
    }

    #[test]
    fn a_dead_coordinator_is_replaced_by_the_next_in_rotation() {
        let mut net = Net::new(4);
        let applied = close(3, 0, &[0, 1, 2, 3], 0);
        let first = members(&[0, 1, 2, 3]).proposer(3, 0).expect("members");
        let dead = index_of(&first);
        net.up[dead] = false;
        for i in (0..4).filter(|i| *i != dead) {
            net.start(i, applied.clone(), &[0, 1, 2, 3]);
        }
        net.run(60_000);
        for i in (0..4).filter(|i| *i != dead) {
            let (decided, by, consensus_round) = net.decided[i].clone().expect("decided");
            assert_eq!(decided, applied);
            assert_ne!(by, first, "another member coordinated");
            assert_eq!(by, net.chains[i].coordinator(3, consensus_round));
            assert!(consensus_round >= 1);
            assert!(net.chains[i].coordinator_changes() >= 1);
        }
        // The others waited one proposal timeout (and a vote exchange) for the dead one.
        assert!(net.now_ms >= PROPOSE_MS);
        assert!(net.now_ms < 10 * PROPOSE_MS, "took {} ms", net.now_ms);
    }

    #[test]
    fn a_close_a_quorum_applied_is_decided_and_the_minority_learns_it() {
        let mut net = Net::new(4);
        let majority = close(9, 1, &[0, 1, 2, 3], 0);
        let minority = close(9, 3, &[1, 2, 3], 0);
        for i in 0..3 {
            net.start(i, majority.clone(), &[0, 1, 2, 3]);
        }
        net.start(3, minority.clone(), &[0, 1, 2, 3]);
        net.run(60_000);
        for i in 0..4 {
            let (decided, _, _) = net.decided[i].clone().expect("decided");
            assert_eq!(decided, majority, "peer {i}");
        }
    }

    #[test]
    fn a_close_nobody_applied_is_never_decided() {
        // Every member applied `honest`; whoever coordinates, only it can be decided. A
        // coordinator proposing another close (here: one member's view differs from the
        // coordinator's) gets no quorum.
        let mut net = Net::new(4);
        let honest = close(2, 0, &[0, 1, 2, 3], 0);
        let forged = close(2, 0, &[0, 1], 0);
        let coordinator = members(&[0, 1, 2, 3]).proposer(2, 0).expect("members");
        for i in 0..4u8 {
            let mine = if key(i).verifying_key().to_bytes() == coordinator {
                forged.clone()
            } else {
                honest.clone()
            };
            net.start(usize::from(i), mine, &[0, 1, 2, 3]);
        }
        net.run(60_000);
        for i in 0..4u8 {
            let (decided, by, _) = net.decided[usize::from(i)].clone().expect("decided");
            assert_eq!(decided, honest);
            assert_ne!(by, coordinator);
        }
    }

    #[test]
    fn a_peer_outside_the_committee_follows_the_decision() {
        let mut net = Net::new(5);
        let applied = close(4, 0, &[0, 1, 2, 3, 4], 0);
        for i in 0..5 {
            // Peer 4 was not a contributor of the round before: not a member.
            net.start(i, applied.clone(), &[0, 1, 2, 3]);
        }
        net.run(60_000);
        let (decided, _, _) = net.decided[4].clone().expect("the observer decided");
        assert_eq!(decided, applied);
        assert!(
            !net.chains[4]
                .committee()
                .contains(&key(4).verifying_key().to_bytes())
        );
    }

    #[test]
    fn votes_of_another_job_or_the_ledger_do_not_count() {
        let mut chain = RoundChain::new(key(0), JOB, config());
        let applied = close(1, 0, &[0, 1], 0);
        let committee = member_set(&[0u8, 1, 2, 3]);
        chain.start(applied.clone(), committee, 0);
        let other_job = [8; 32];
        let foreign = prevote(Some(&other_job), 1, 1, 0, Some(applied.hash()));
        assert!(matches!(
            chain.on_message(foreign, 0),
            Err(ConsensusError::BadSignature(_))
        ));
        let ledger = prevote(None, 1, 1, 0, Some(applied.hash()));
        assert!(matches!(
            chain.on_message(ledger, 0),
            Err(ConsensusError::BadSignature(_))
        ));
        let own = prevote(Some(&JOB), 1, 1, 0, Some(applied.hash()));
        assert!(chain.on_message(own, 0).is_ok());
    }

    #[test]
    fn malformed_closes_do_not_follow() {
        let good = close(3, 0, &[0, 1], 0);
        assert!(good.follows(None));
        let mut twice = good.clone();
        twice.commitments.push(twice.commitments[0].clone());
        assert!(!twice.follows(None));
        let mut other_round = good.clone();
        other_round.commitments[0] = commit(4, &key(0), &[0, 0]);
        assert!(!other_round.follows(None));
        let empty = close(3, 0, &[], 0);
        assert!(!empty.follows(None));
        let mut tampered = good.clone();
        tampered.commitments[1].signature[0] ^= 1;
        assert!(!tampered.follows(None));
        assert!(!good.follows(Some(&close(1, 0, &[0], 0))));
        assert!(good.follows(Some(&close(2, 0, &[0], 0))));
    }

    #[test]
    fn a_second_start_at_or_below_the_height_does_nothing() {
        let mut chain = RoundChain::new(key(0), JOB, config());
        let committee = member_set(&[0u8, 1]);
        assert!(
            !chain
                .start(close(3, 0, &[0, 1], 0), committee.clone(), 0)
                .is_empty()
        );
        assert!(
            chain
                .start(close(3, 0, &[0, 1], 1), committee.clone(), 0)
                .is_empty()
        );
        assert!(
            chain
                .start(close(2, 0, &[0, 1], 0), committee.clone(), 0)
                .is_empty()
        );
        assert!(
            chain
                .start(close(4, 0, &[0, 1], 0), BTreeSet::new(), 0)
                .is_empty()
        );
        assert_eq!(chain.height(), 3);
    }

    #[test]
    fn a_height_waits_for_the_one_in_progress_and_a_peer_left_behind_catches_up() {
        let members = member_set(&[0u8, 1, 2, 3]);
        let mut chain = RoundChain::new(key(0), JOB, config());
        chain.start(close(1, 0, &[0, 1], 0), members.clone(), 0);
        assert_eq!(chain.height(), 1);
        for round in 2..=3 {
            chain.start(close(round, 0, &[0, 1], 0), members.clone(), 10);
        }
        assert_eq!(
            chain.height(),
            1,
            "height 1 is neither decided nor given up"
        );
        assert!(chain.poll(100).is_empty());
        // A member's vote of height 3: the members moved on, and so does this peer.
        let vote = prevote(Some(&JOB), 1, 3, 0, None);
        chain.on_message(vote, 200).expect("a member's vote");
        assert_eq!(chain.height(), 3, "height 2 skipped: the members are at 3");
        // More applied rounds than the queue holds: the oldest are dropped, and once height 3
        // is given up the newest starts.
        for round in 4..=9 {
            chain.start(close(round, 0, &[0, 1], 0), members.clone(), 300);
        }
        assert_eq!(chain.height(), 3);
        assert!(
            chain
                .poll(200 + GIVE_UP_PROPOSE_TIMEOUTS * PROPOSE_MS - 1)
                .is_empty()
        );
        chain.poll(200 + GIVE_UP_PROPOSE_TIMEOUTS * PROPOSE_MS);
        assert_eq!(chain.height(), 9, "the newest applied round");
    }

    #[test]
    fn decided_heights_follow_one_another() {
        let mut net = Net::new(4);
        for round in 1..=3 {
            for i in 0..4 {
                net.start(i, close(round, 0, &[0, 1, 2, 3], 0), &[0, 1, 2, 3]);
            }
        }
        // The rounds were applied faster than height 1 decided: each height starts after the
        // one before is decided, and all three are.
        for _ in 0..3 {
            net.decided = vec![None; 4];
            net.run(60_000);
        }
        for chain in &net.chains {
            assert_eq!(chain.height(), 3);
            for round in 1..=3 {
                assert_eq!(chain.decided(round), Some(0), "round {round}");
            }
        }
    }

    #[test]
    fn messages_before_the_first_height_are_kept_for_it() {
        // The coordinator applied the round and proposed before the others applied any round
        // with a known committee: they take its messages when they start.
        let mut net = Net::new(4);
        let applied = close(2, 0, &[0, 1, 2, 3], 0);
        let coordinator = members(&[0, 1, 2, 3]).proposer(2, 0).expect("members");
        let first = index_of(&coordinator);
        net.start(first, applied.clone(), &[0, 1, 2, 3]);
        // Delivered now, to peers that have started nothing.
        let early: Vec<_> = net.inbox.drain(..).collect();
        assert!(
            !early.is_empty(),
            "the proposal and the coordinator's prevote"
        );
        for (from, message) in early {
            for to in (0..4).filter(|to| *to != from) {
                assert!(net.chains[to].on_message(message.clone(), 0).is_ok());
            }
        }
        for i in (0..4).filter(|i| *i != first) {
            net.start(i, applied.clone(), &[0, 1, 2, 3]);
        }
        // Without the kept proposal nobody could prevote it before a rebroadcast.
        net.run(PROPOSE_MS - 1);
        for i in 0..4 {
            assert_eq!(net.chains[i].decided(2), Some(0), "peer {i}");
        }
    }

    #[test]
    fn a_proposal_of_the_next_height_is_judged_against_that_heights_committee() {
        // Height 1's committee is {0, 1, 2, 3}; height 2's is {0, 1, 2} (peer 3's update was
        // refused in round 1). Height 2's coordinator proposes while the others are still at
        // height 1, whose committee would name another coordinator of height 2.
        let (wide, narrow) = (members(&[0, 1, 2, 3]), members(&[0, 1, 2]));
        let coordinator = narrow.proposer(2, 0).expect("members");
        assert_ne!(
            wide.proposer(2, 0),
            Some(coordinator),
            "the test needs them to differ"
        );
        let mut net = Net::new(4);
        for i in 0..4 {
            net.start(i, close(1, 0, &[0, 1, 2], 0), &[0, 1, 2, 3]);
        }
        net.run(60_000);
        assert!((0..4).all(|i| net.chains[i].decided(1).is_some()));
        net.decided = vec![None; 4];
        let first = index_of(&coordinator);
        let applied = close(2, 0, &[0, 1, 2], 0);
        net.start(first, applied.clone(), &[0, 1, 2]);
        let early: Vec<_> = net.inbox.drain(..).collect();
        for (from, message) in early {
            for to in (0..4).filter(|to| *to != from) {
                assert!(
                    net.chains[to]
                        .on_message(message.clone(), net.now_ms)
                        .is_ok()
                );
            }
        }
        for i in (0..4).filter(|i| *i != first) {
            net.start(i, applied.clone(), &[0, 1, 2]);
        }
        let started_ms = net.now_ms;
        net.run(started_ms + PROPOSE_MS - 1);
        for i in 0..4 {
            assert_eq!(net.chains[i].decided(2), Some(0), "peer {i}");
        }
    }

    #[test]
    fn a_members_message_before_the_height_was_applied_here_still_moves_the_peer_on() {
        let members = member_set(&[0u8, 1, 2, 3]);
        let mut chain = RoundChain::new(key(0), JOB, config());
        chain.start(close(2, 0, &[0, 1], 0), members.clone(), 0);
        // The members are at height 3 (this peer never ran their height 2's decision) before
        // this peer applied round 3.
        let vote = prevote(Some(&JOB), 1, 3, 0, None);
        chain.on_message(vote, 10).expect("kept");
        assert_eq!(chain.height(), 2);
        chain.start(close(3, 0, &[0, 1], 0), members.clone(), 20);
        assert_eq!(
            chain.height(),
            3,
            "no need to wait for height 2 to be given up"
        );
        // A message of a later height from a non-member, or with a bad signature, does not.
        let mut forged = prevote(Some(&JOB), 1, 4, 0, None);
        if let ConsensusMessage::Vote { signature, .. } = &mut forged {
            signature[0] ^= 1;
        }
        chain.on_message(forged, 30).expect("kept");
        let outsider = prevote(Some(&JOB), 9, 4, 0, None);
        chain.on_message(outsider, 30).expect("kept");
        chain.start(close(4, 0, &[0, 1], 0), members, 40);
        assert_eq!(chain.height(), 3, "height 3 is still in progress");
    }

    #[test]
    fn messages_kept_for_later_heights_are_bounded() {
        let mut chain = RoundChain::new(key(0), JOB, config());
        // One author's flood before any height started: at most 16 of its messages.
        for round in 0..100u32 {
            let vote = prevote(Some(&JOB), 1, 2, round, None);
            chain.on_message(vote, 0).expect("kept or dropped");
        }
        assert_eq!(chain.ahead.len(), MAX_AHEAD_PER_AUTHOR);
        // Many authors' large proposals: at most MAX_AHEAD_BYTES in all.
        for author in 2..=200u8 {
            let proposal = ConsensusMessage::signed_proposal_in(
                Some(&JOB),
                &key(author),
                2,
                0,
                None,
                close(
                    2,
                    author,
                    &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
                    0,
                ),
            );
            chain.on_message(proposal, 0).expect("kept or dropped");
        }
        assert!(chain.ahead_bytes <= MAX_AHEAD_BYTES);
        assert!(chain.ahead.len() <= MAX_AHEAD_MESSAGES);
        // Once a height runs, messages far beyond it are not kept.
        let members = member_set(&[0u8, 1]);
        chain.start(close(3, 0, &[0, 1], 0), members, 0);
        let kept = chain.ahead.len();
        let far = prevote(Some(&JOB), 3, 3 + AHEAD_HEIGHTS + 1, 0, None);
        chain.on_message(far, 0).expect("dropped");
        assert_eq!(chain.ahead.len(), kept);
    }
}
