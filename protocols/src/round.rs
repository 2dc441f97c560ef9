//! One training job's rounds, as a sans-I/O state machine: which contributions count in round r,
//! who closes the round, when a peer is behind or has diverged.
//!
//! A round goes: every contributor trains, gossips a signed [`Commitment`] to its blob, and
//! serves the blob; every peer fetches the blobs it sees committed. The round's **proposer**
//! closes it: contributors are ranked by `blake3(job, round, key)` and the first in that order
//! closes once the peers of the previous round have all committed and their blobs are in hand,
//! or once the round deadline has passed since the first commitment (stragglers are excluded and
//! counted as late). If the first proposer stays silent, the next in rank closes after a grace
//! period, and so on. The [`RoundClose`] lists the signed commitments of the accepted set; every
//! peer aggregates exactly that set, in canonical order, so every model is bit-identical.
//!
//! After applying a round every peer gossips a [`ModelState`]: its model hash and the hash of a
//! snapshot it serves. A peer whose hash differs from the proposer's has diverged and resyncs
//! from the proposer's snapshot; a peer that joins, or falls two rounds behind, resyncs from the
//! newest state it hears of.
//!
//! The ledger has the last word. Its consensus records at most one result per round, with the
//! model hash; the driver hands each recorded round to [`RoundEngine::on_recorded`]. The newest
//! recorded round is the job's **ledger tip**: a peer whose model at that round differs has
//! trained on another branch (a split the gossip rank did not mend: a partition longer than a
//! round, a proposer that sent two closes) and resyncs to the newest state descending from the
//! tip, when at least as many contributors hold that state as hold its own model (a byzantine
//! coordinator can record first a close the others refused). Descent is known because every
//! [`ModelState`] names the model it was built on. A tip whose branch nobody holds at this
//! peer's round any more is waited out (the ledger will record a later round) rather than
//! rolled back to.
//!
//! Time comes in as `now_ms`; blob availability is asked of the caller; actions come out.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    PeerKey, WireError,
    consensus::ConsensusMessage,
    contribution::{BlobHash, Commitment, ContributionRejected, SignedCommitment},
    decode_bounded, encode,
    round_chain::close_content,
};

/// A job's identity: the hash of its manifest.
pub type JobId = [u8; 32];
/// A model hash (blake3 over parameters and optimizer state).
pub type ModelHash = [u8; 32];

/// Largest training gossip message, in bytes (below the gossip limit).
pub const MAX_TRAIN_MESSAGE_BYTES: usize = 60 * 1024;
/// Most rounds of model hashes remembered.
const HASH_HISTORY_ROUNDS: u64 = 16;
/// Rounds of snapshot holders remembered.
const HOLDER_ROUNDS: usize = 4;
/// Rounds of announced states (with their parents) remembered, to follow the ledger tip.
const LINEAGE_ROUNDS: usize = 2 * HASH_HISTORY_ROUNDS as usize;
/// Ledger-tip resync targets remembered (each is tried once).
const TIP_TARGETS_TRIED: usize = 8;
/// Rounds of applied and decided closes kept for the round chain.
const CHAIN_ROUNDS: u64 = 4;
/// How long after the ledger tip arrives its branch is weighed against this peer's.
pub const TIP_SETTLE_MS: u64 = 1_000;

/// The proposer closes round `round`: these commitments are the accepted set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundClose {
    /// The job.
    pub job_id: JobId,
    /// The round closed.
    pub round: u64,
    /// Who closed it (must be the gossip author).
    pub proposer: PeerKey,
    /// The accepted contributions, each signed by its author.
    pub commitments: Vec<SignedCommitment>,
    /// Contributions of the round the proposer refused before aggregation (a replayed blob, a
    /// copy of a revealed blob), with the reason; bounded like the accepted set.
    pub refused: Vec<(PeerKey, String)>,
}

/// The digest of a close's accepted authors ([`crate::ledger::accepted_digest`]).
fn decided_digest(close: &RoundClose) -> BlobHash {
    crate::ledger::accepted_digest(close_content(close).iter().map(|(k, _)| k))
}

/// Remembers a resync target as tried, forgetting the oldest beyond [`TIP_TARGETS_TRIED`].
fn remember_tried(tried: &mut Vec<(u64, ModelHash)>, target: (u64, ModelHash)) {
    if tried.len() >= TIP_TARGETS_TRIED {
        tried.remove(0);
    }
    tried.push(target);
}

/// A blob hash this peer heard committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeenBlob {
    /// The round it was first committed in.
    first_round: u64,
    /// The last round it was committed in.
    last_round: u64,
    /// Who committed it first.
    author: PeerKey,
}

/// A blob this peer heard committed before, as a later commitment of it finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PriorBlob {
    /// Committed in an earlier round: a replay.
    Replay {
        /// The round it was first committed in.
        round: u64,
    },
    /// Committed by another author in the same round: a copy.
    Copy {
        /// The author of the original.
        original: PeerKey,
    },
}

/// A model some peers announced after a round: what it was built on, and where to fetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Announced {
    parent_hash: ModelHash,
    snapshot_hash: BlobHash,
    snapshot_len: u64,
    authors: BTreeSet<PeerKey>,
    /// The accepted-set digests its announcers gave, each with who gave it (zeros left out).
    digests: BTreeMap<BlobHash, BTreeSet<PeerKey>>,
}

impl Announced {
    /// The accepted-set digest most of its announcers gave (ties: the lower digest).
    fn digest(&self) -> Option<BlobHash> {
        self.digests
            .iter()
            .max_by(|(da, a), (db, b)| a.len().cmp(&b.len()).then(db.cmp(da)))
            .map(|(digest, _)| *digest)
    }
}

/// Longest refusal reason carried in a close.
pub const MAX_REFUSAL_REASON_BYTES: usize = 160;
/// Rounds back in which a committed blob hash is remembered (a replay of one is stale).
const STALE_ROUNDS: u64 = 8;

/// A peer's model after applying a round, and the snapshot it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelState {
    /// The job.
    pub job_id: JobId,
    /// The last round applied.
    pub round: u64,
    /// Hash of the model after that round.
    pub model_hash: ModelHash,
    /// Hash of the model that round started from (zeros when unknown: the initial model, or a
    /// resync whose origin was not heard).
    pub parent_hash: ModelHash,
    /// Hash of the snapshot blob the author serves.
    pub snapshot_hash: BlobHash,
    /// Its size in bytes.
    pub snapshot_len: u64,
    /// The author (must be the gossip author).
    pub author: PeerKey,
    /// [`crate::ledger::accepted_digest`] of the contributions the round's close aggregated
    /// into this model; after a resync, the digest most announcers of the model gave (zeros when
    /// unknown, and for the initial model). A peer that resyncs onto a model votes for the
    /// rounds of its lineage with these digests.
    pub accepted_digest: BlobHash,
}

/// An assigned verifier's verdict on a sampled contribution it recomputed (see the exchanger's
/// audits): the cosine, on the transmitted coordinates, between the contribution and the
/// verifier's recomputation of the subject's work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerdict {
    /// The job.
    pub job_id: JobId,
    /// The round the contribution was applied in.
    pub round: u64,
    /// Whose contribution.
    pub subject: PeerKey,
    /// The verifier (must be the gossip author, and the one assigned).
    pub verifier: PeerKey,
    /// The cosine × 1000.
    pub cosine_milli: i32,
    /// Whether it passed.
    pub passed: bool,
}

/// What travels on the training gossip topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainMessage {
    /// A contribution's signed commitment.
    Commit(SignedCommitment),
    /// A round's accepted set.
    Close(RoundClose),
    /// A peer's model hash after a round.
    State(ModelState),
    /// An audit's verdict.
    Audit(AuditVerdict),
    /// A message of the job's round chain ([`crate::round_chain`]): a proposal or a vote.
    Chain(ConsensusMessage<RoundClose>),
}

impl TrainMessage {
    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a message from the network, bounded.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode_bounded(bytes, MAX_TRAIN_MESSAGE_BYTES)
    }

    /// The key that must have authored the gossip message carrying this.
    pub fn claimed_author(&self) -> Option<PeerKey> {
        match self {
            TrainMessage::Commit(signed) => signed.verify().ok().map(|c| c.author),
            TrainMessage::Close(close) => Some(close.proposer),
            TrainMessage::State(state) => Some(state.author),
            TrainMessage::Audit(verdict) => Some(verdict.verifier),
            TrainMessage::Chain(message) => Some(message.author()),
        }
    }
}

/// Settings of a job's rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundConfig {
    /// How long after the first commitment a round waits for stragglers.
    pub round_deadline_ms: u64,
    /// How long each next-ranked proposer waits for the one before it.
    pub proposer_grace_ms: u64,
    /// Fewest contributions for a round to close.
    pub min_contributors: usize,
    /// Most contributions accepted in a round (and remembered per round).
    pub max_contributors: usize,
    /// Largest contribution blob.
    pub max_blob_bytes: u64,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            round_deadline_ms: 30_000,
            proposer_grace_ms: 3_000,
            min_contributors: 1,
            max_contributors: 64,
            max_blob_bytes: 64 << 20,
        }
    }
}

/// What the engine asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch a blob from one of `from` (in order of preference) and hand it back verified.
    Fetch {
        /// Its hash.
        hash: BlobHash,
        /// Its committed size.
        len: u64,
        /// Peers expected to hold it.
        from: Vec<PeerKey>,
    },
    /// Publish on the training topic.
    Publish(TrainMessage),
    /// Aggregate these contributions (sorted by author) into round `round`, then report the
    /// resulting model hash with [`RoundEngine::applied`].
    Apply {
        /// The round.
        round: u64,
        /// The accepted set.
        contributions: Vec<Commitment>,
        /// Who closed it.
        proposer: PeerKey,
        /// Contributions the close refused, with the reason.
        refused: Vec<(PeerKey, String)>,
        /// The signed commitments behind the close, by author: every contribution's, and those
        /// of the refused contributors this peer holds (what the round's ledger result carries).
        evidence: Vec<(PeerKey, SignedCommitment)>,
    },
    /// Commit-then-reveal: every expected contributor has committed (or the deadline passed),
    /// so this peer now serves its own contribution's blob for `round`. Commitments that arrive
    /// after this are left out of this peer's close: their authors could have seen the blobs.
    Reveal {
        /// The round.
        round: u64,
    },
    /// This peer is behind or diverged: load the snapshot, check it, then call
    /// [`RoundEngine::resynced`].
    Resync {
        /// The round the snapshot is after.
        round: u64,
        /// The model hash it must have.
        model_hash: ModelHash,
        /// Snapshot blob hash.
        snapshot_hash: BlobHash,
        /// Snapshot size.
        snapshot_len: u64,
        /// Who serves it.
        from: Vec<PeerKey>,
    },
}

/// Why a training message was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoundRejected {
    /// A commitment that does not verify.
    #[error(transparent)]
    Contribution(#[from] ContributionRejected),
    /// Another job's message.
    #[error("message for another job")]
    OtherJob,
    /// For a round already closed here: a straggler.
    #[error("contribution for round {round} arrived after it closed")]
    Late {
        /// Its round.
        round: u64,
    },
    /// Too far ahead of this peer.
    #[error("message for round {round}, this peer is at round {current}")]
    Future {
        /// Its round.
        round: u64,
        /// This peer's round.
        current: u64,
    },
    /// Already seen.
    #[error("duplicate")]
    Duplicate,
    /// Round full.
    #[error("round {0} already has the most contributions allowed")]
    Full(u64),
    /// A blob over the size limit.
    #[error("committed blob of {0} bytes is over the limit")]
    TooLarge(u64),
    /// A close whose author is not its proposer, or which lists a contribution twice, or none.
    #[error("malformed close: {0}")]
    BadClose(&'static str),
    /// A state whose author is not the gossip author.
    #[error("state author is not the sender")]
    BadState,
    /// A commitment to a blob already committed in an earlier round (a replay).
    #[error("replays a blob committed in round {0}")]
    Stale(u64),
    /// A commitment to the blob another author committed in the same round.
    #[error("copies another contributor's blob")]
    Copy,
    /// A contributor excluded for a while (it failed an audit).
    #[error("contributor excluded until round {0}")]
    Excluded(u64),
}

#[derive(Debug, Clone)]
struct Pending {
    commitment: Commitment,
    signed: SignedCommitment,
}

#[derive(Debug, Clone)]
struct AcceptedClose {
    proposer: PeerKey,
    rank: usize,
    contributions: Vec<Commitment>,
    /// The signed commitments of `contributions`, in the same order.
    signed: Vec<SignedCommitment>,
    refused: Vec<(PeerKey, String)>,
}

/// Counters of a job's rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundCounters {
    /// Contributions that arrived after their round closed.
    pub late_contributions: u64,
    /// Model hash mismatches detected.
    pub hash_mismatches: u64,
    /// Resyncs requested.
    pub resyncs: u64,
    /// Commitments whose signature did not verify (forged or corrupted).
    pub forged_commitments: u64,
    /// Commitments replaying a blob of an earlier round.
    pub stale_commitments: u64,
    /// Commitments to a blob another author committed in the same round.
    pub copied_commitments: u64,
    /// Commitments that arrived after this peer revealed its blob (left out of its close).
    pub after_reveal_commitments: u64,
    /// Times this peer's model was off the ledger tip's branch and it resynced to that branch.
    pub ledger_resyncs: u64,
    /// Announcements by a close's own proposer of a model other than the one its close yields
    /// here, not followed: more contributors hold this peer's model.
    pub divergences_refused: u64,
    /// Resyncs onto the branch most of a past round's electorate announced (this peer had run
    /// on another, possibly ahead).
    pub majority_resyncs: u64,
    /// Rounds whose close the job's round chain decided, as known here.
    pub chain_decided: u64,
    /// Decided rounds whose close differed from the one this peer applied (it resyncs onto the
    /// decided branch).
    pub chain_overruled: u64,
    /// Resyncs onto a decided branch.
    pub chain_resyncs: u64,
}

/// The round state machine of one job on one peer.
#[derive(Debug)]
pub struct RoundEngine {
    config: RoundConfig,
    job_id: JobId,
    me: PeerKey,
    /// The round being collected: the model is the state after `current - 1`.
    current: u64,
    synced: bool,
    commits: BTreeMap<u64, BTreeMap<PeerKey, Pending>>,
    first_commit_ms: Option<u64>,
    ready_since_ms: Option<u64>,
    expected: BTreeSet<PeerKey>,
    late_authors: BTreeSet<PeerKey>,
    /// Authors of model states per round: who holds the model a round starts from.
    state_authors: BTreeMap<u64, BTreeSet<PeerKey>>,
    /// Who announced which model after which round (the newest few rounds): where a snapshot
    /// can be fetched from.
    holders: BTreeMap<u64, BTreeMap<ModelHash, BTreeSet<PeerKey>>>,
    close: Option<AcceptedClose>,
    /// Valid closes of the current round other than `close`, by proposer rank.
    other_closes: BTreeMap<usize, AcceptedClose>,
    /// Proposers of the current round whose close could not be applied.
    failed_proposers: BTreeSet<PeerKey>,
    applying: bool,
    proposers: BTreeMap<u64, PeerKey>,
    /// Rank of the proposer whose close was applied, per round.
    applied_ranks: BTreeMap<u64, usize>,
    /// The contributors known when the last round was applied (to rank late closes).
    last_ranks: Option<BTreeSet<PeerKey>>,
    my_hashes: BTreeMap<u64, ModelHash>,
    latest_state: Option<ModelState>,
    resync_pending: bool,
    counters: RoundCounters,
    /// When this peer revealed its blob of the current round.
    revealed_ms: Option<u64>,
    /// Authors whose commitment of the current round arrived after the reveal.
    after_reveal: BTreeSet<PeerKey>,
    /// Refusals of the open round and the next (stale or copied commitments), carried in this
    /// peer's close.
    refused: BTreeMap<u64, BTreeMap<PeerKey, String>>,
    /// The signed commitments behind `refused`, where this peer received one: the evidence a
    /// round's ledger result carries to slash their authors.
    refused_evidence: BTreeMap<u64, BTreeMap<PeerKey, SignedCommitment>>,
    /// Blob hashes committed in recent rounds: who first committed each, in which round, and the
    /// last round it was seen in (a replay keeps it remembered).
    recent_blobs: BTreeMap<BlobHash, SeenBlob>,
    /// Contributors excluded through a round, and why (a failed audit).
    excluded: BTreeMap<PeerKey, (u64, String)>,
    /// Announced models of recent rounds, with what each was built on.
    lineage: BTreeMap<u64, BTreeMap<ModelHash, Announced>>,
    /// The newest round recorded on the ledger, and its model hash.
    ledger_tip: Option<(u64, ModelHash)>,
    /// When the ledger tip arrived (the states of that round are waited for a while).
    tip_since_ms: u64,
    /// Ledger-tip resync targets already tried (round, model hash).
    tip_targets_tried: Vec<(u64, ModelHash)>,
    /// The proposer whose close this peer applied, by round (not replaced when a better-ranked
    /// close of the round is heard later, unlike `proposers`).
    closed_by: BTreeMap<u64, PeerKey>,
    /// The proposer of a close this peer applied announced another model for that round:
    /// (round, its model hash, when this peer first polled since). Weighed once the round's
    /// states had time to arrive.
    divergence: Option<(u64, ModelHash, Option<u64>)>,
    /// Who was expected to contribute to each round when it opened (the contributors of the
    /// close that made its starting model): the peers whose announcements of the round's model
    /// count when branches are weighed by majority.
    electorate: BTreeMap<u64, BTreeSet<PeerKey>>,
    /// Since when this peer has seen a majority of a past round's electorate on another
    /// branch than its own (whichever round that is: a peer running alone moves on a round at
    /// a time, and so does the round weighed).
    majority_elsewhere_since: Option<u64>,
    /// Majority resync targets already tried (round, model hash).
    majority_targets_tried: Vec<(u64, ModelHash)>,
    /// Replays and copies refused after their round closed, not yet taken by the driver:
    /// (round, author, reason, the commitment).
    late_refusals: Vec<(u64, PeerKey, String, SignedCommitment)>,
    /// The closes this peer applied, by round (the newest [`CHAIN_ROUNDS`]): what it proposes
    /// and prevotes in the job's round chain.
    applied_closes: BTreeMap<u64, RoundClose>,
    /// Closes the round chain decided, by round (the newest [`CHAIN_ROUNDS`]).
    decided: BTreeMap<u64, RoundClose>,
    /// A decided round whose close differs from the one this peer applied: (round, the decided
    /// accepted set's digest). [`RoundEngine::poll`] resyncs onto the decided branch.
    decided_off: Option<(u64, BlobHash)>,
    /// Decided-branch resync targets already tried (round, model hash).
    decided_targets_tried: Vec<(u64, ModelHash)>,
}

/// The proposer rank key of `peer` in `round` of `job`.
pub fn proposer_rank_key(job_id: &JobId, round: u64, peer: &PeerKey) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"loom/proposer/v1\0");
    hasher.update(job_id);
    hasher.update(&round.to_le_bytes());
    hasher.update(peer);
    *hasher.finalize().as_bytes()
}

impl RoundEngine {
    /// An engine whose model is the state after round `applied` (0: the initial model). With
    /// `synced` false it waits for [`RoundEngine::start_fresh`] or a resync before taking part.
    pub fn new(
        config: RoundConfig,
        job_id: JobId,
        me: PeerKey,
        applied: u64,
        synced: bool,
    ) -> Self {
        Self {
            config,
            job_id,
            me,
            current: applied + 1,
            synced,
            commits: BTreeMap::new(),
            first_commit_ms: None,
            ready_since_ms: None,
            expected: BTreeSet::new(),
            late_authors: BTreeSet::new(),
            state_authors: BTreeMap::new(),
            holders: BTreeMap::new(),
            close: None,
            other_closes: BTreeMap::new(),
            failed_proposers: BTreeSet::new(),
            applying: false,
            proposers: BTreeMap::new(),
            applied_ranks: BTreeMap::new(),
            last_ranks: None,
            my_hashes: BTreeMap::new(),
            latest_state: None,
            resync_pending: false,
            counters: RoundCounters::default(),
            revealed_ms: None,
            after_reveal: BTreeSet::new(),
            refused: BTreeMap::new(),
            refused_evidence: BTreeMap::new(),
            recent_blobs: BTreeMap::new(),
            excluded: BTreeMap::new(),
            lineage: BTreeMap::new(),
            ledger_tip: None,
            tip_since_ms: 0,
            tip_targets_tried: Vec::new(),
            closed_by: BTreeMap::new(),
            divergence: None,
            electorate: BTreeMap::new(),
            majority_elsewhere_since: None,
            majority_targets_tried: Vec::new(),
            late_refusals: Vec::new(),
            applied_closes: BTreeMap::new(),
            decided: BTreeMap::new(),
            decided_off: None,
            decided_targets_tried: Vec::new(),
        }
    }

    /// The round being collected.
    pub fn current_round(&self) -> u64 {
        self.current
    }

    /// The proposer whose close this peer holds as the outcome of `round` (the best-ranked close
    /// it heard of), when known.
    pub fn round_proposer(&self, round: u64) -> Option<PeerKey> {
        self.proposers.get(&round).copied()
    }

    /// Whether the model this peer holds after `round` is confirmed as the mesh's: the proposer
    /// of the best-ranked close of that round announced the same hash, or this peer is that
    /// proposer and another peer announced the same hash (otherwise the caller gives
    /// better-ranked closes time to arrive: two proposers that each saw only part of the
    /// commitments may both rank themselves first). After a resync with no known
    /// proposer, any other peer announcing the same hash confirms it.
    pub fn confirmed(&self, round: u64) -> bool {
        if self.resync_pending || self.applying {
            return false;
        }
        let Some(mine) = self.my_hashes.get(&round) else {
            return false;
        };
        // The ledger recorded this round with this peer's model.
        if self.ledger_tip == Some((round, *mine)) {
            return true;
        }
        // The job's round chain decided the close this peer applied.
        if self.decided_mine(round) {
            return true;
        }
        let holders = self.holders.get(&round).and_then(|h| h.get(mine));
        match self.proposers.get(&round) {
            // This peer's own close: nobody could rank before it, or another peer applied the
            // same model.
            Some(proposer) if *proposer == self.me => {
                holders.is_some_and(|h| h.iter().any(|k| *k != self.me))
            }
            Some(proposer) => holders.is_some_and(|h| h.contains(proposer)),
            None => holders.is_some_and(|h| h.iter().any(|k| *k != self.me)),
        }
    }

    /// Whether this peer holds the mesh's model and takes part in rounds.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Whether the current round is closed (a contribution for it now would be late).
    pub fn is_closed(&self) -> bool {
        self.close.is_some()
    }

    /// Counters so far.
    pub fn counters(&self) -> RoundCounters {
        self.counters
    }

    /// The newest model state heard of from another peer.
    pub fn latest_state(&self) -> Option<&ModelState> {
        self.latest_state.as_ref()
    }

    /// Whether any peer has been heard training this job (a commitment or a state).
    pub fn heard_others(&self) -> bool {
        self.latest_state.is_some()
            || self
                .commits
                .values()
                .any(|round| round.keys().any(|k| *k != self.me))
    }

    /// Starts from the initial model (no peer was found further along).
    pub fn start_fresh(&mut self) {
        self.synced = true;
    }

    /// A commitment from the network (or this peer's own).
    pub fn on_commit(
        &mut self,
        signed: SignedCommitment,
        now_ms: u64,
    ) -> Result<Vec<Action>, RoundRejected> {
        let commitment = match signed.verify() {
            Ok(c) => c,
            Err(e) => {
                self.counters.forged_commitments += 1;
                return Err(e.into());
            }
        };
        if commitment.job_id != self.job_id {
            return Err(RoundRejected::OtherJob);
        }
        if commitment.blob_len > self.config.max_blob_bytes {
            return Err(RoundRejected::TooLarge(commitment.blob_len));
        }
        let round = commitment.round;
        let mine = commitment.author == self.me;
        if round < self.current || (round == self.current && self.close.is_some()) {
            // A commitment already taken (republished: it is sent again until its round
            // closes) is nothing new.
            if self
                .commits
                .get(&round)
                .is_some_and(|slot| slot.contains_key(&commitment.author))
            {
                return Err(RoundRejected::Duplicate);
            }
            // A late replay or copy is refused all the same (a peer that is only slow is
            // waited for next round; one that replays is not).
            if let Some(prior) = self.prior_blob(&commitment).filter(|_| !mine) {
                let (rejected, reason) = self.refuse_prior(prior, &commitment, &signed);
                if self.late_refusals.len() < self.config.max_contributors {
                    self.late_refusals
                        .push((round, commitment.author, reason, signed.clone()));
                }
                return Err(rejected);
            }
            // Too late to count, not too late to remember: a replay of it later is stale.
            self.remember_blob(commitment.blob_hash, round, commitment.author);
            self.counters.late_contributions += 1;
            if round == self.current && self.late_authors.len() < self.config.max_contributors {
                // Wait for it next round: it is alive, only slow.
                self.late_authors.insert(commitment.author);
            }
            return Err(RoundRejected::Late { round });
        }
        if round > self.current + 1 {
            return Err(RoundRejected::Future {
                round,
                current: self.current,
            });
        }
        if self
            .commits
            .get(&round)
            .is_some_and(|slot| slot.contains_key(&commitment.author))
        {
            return Err(RoundRejected::Duplicate);
        }
        if !mine
            && let Some((through, reason)) = self.excluded.get(&commitment.author)
            && round <= *through
        {
            let (through, reason) = (*through, reason.clone());
            self.refuse(round, commitment.author, reason, Some(signed.clone()));
            return Err(RoundRejected::Excluded(through));
        }
        // A replay of a blob committed in an earlier round, or a copy of the blob another author
        // committed in this round (commit-then-reveal means the original was committed first,
        // before any blob of the round was served). A peer does not police its own.
        if let Some(prior) = self.prior_blob(&commitment).filter(|_| !mine) {
            return Err(self.refuse_prior(prior, &commitment, &signed).0);
        }
        self.remember_blob(commitment.blob_hash, round, commitment.author);
        let expected_author = self.expected_contributors().contains(&commitment.author);
        let slot = self.commits.entry(round).or_default();
        if slot.len() >= self.config.max_contributors {
            return Err(RoundRejected::Full(round));
        }
        if round == self.current && self.first_commit_ms.is_none() {
            self.first_commit_ms = Some(now_ms);
        }
        if round == self.current
            && self.revealed_ms.is_some()
            && commitment.author != self.me
            && !expected_author
        {
            // A newcomer whose commitment comes after the reveal could have seen the revealed
            // blobs: left out of this peer's close. A contributor of the last round that is
            // only slow still counts (an exact copy is refused by hash all the same).
            self.counters.after_reveal_commitments += 1;
            self.after_reveal.insert(commitment.author);
        }
        let action = Action::Fetch {
            hash: commitment.blob_hash,
            len: commitment.blob_len,
            from: vec![commitment.author],
        };
        slot.insert(commitment.author, Pending { commitment, signed });
        Ok(if mine { Vec::new() } else { vec![action] })
    }

    /// A close from `sender` (the gossip author).
    pub fn on_close(
        &mut self,
        close: RoundClose,
        sender: PeerKey,
        have: &dyn Fn(&BlobHash) -> bool,
        now_ms: u64,
    ) -> Result<Vec<Action>, RoundRejected> {
        if close.job_id != self.job_id {
            return Err(RoundRejected::OtherJob);
        }
        if close.proposer != sender {
            return Err(RoundRejected::BadClose("proposer is not the sender"));
        }
        // The round chain decided this round: no other close of it is taken (unless the decided
        // one lists a contribution this peer refused: it never takes that one).
        if let Some(decided) = self.decided.get(&close.round)
            && close_content(decided) != close_content(&close)
            && !self.refuses_any(decided)
        {
            return Ok(Vec::new());
        }
        if close.round < self.current {
            // A better-ranked close of the round just applied (two proposers closed at once):
            // its proposer's model is the reference; its state will show whether ours differs.
            // Ranks are compared by the proposers' rank keys, which every peer computes alike,
            // not by position among the contributors this peer knows: two groups of peers that
            // each closed the round without the other's commitments agree on which close wins.
            if close.round + 1 == self.current
                && let Some(applied) = self.proposers.get(&close.round)
                && proposer_rank_key(&self.job_id, close.round, &close.proposer)
                    < proposer_rank_key(&self.job_id, close.round, applied)
            {
                let rank = self.rank_of_known(close.round, &close.proposer);
                self.proposers.insert(close.round, close.proposer);
                self.applied_ranks.insert(close.round, rank);
            }
            return Ok(Vec::new());
        }
        if close.round > self.current {
            return Err(RoundRejected::Future {
                round: close.round,
                current: self.current,
            });
        }
        if close.commitments.is_empty() || close.commitments.len() > self.config.max_contributors {
            return Err(RoundRejected::BadClose("empty or oversized accepted set"));
        }
        let mut contributions = Vec::with_capacity(close.commitments.len());
        let mut authors = BTreeSet::new();
        for signed in &close.commitments {
            let c = signed.verify()?;
            if c.job_id != self.job_id || c.round != close.round {
                return Err(RoundRejected::BadClose(
                    "contribution of another job or round",
                ));
            }
            if c.blob_len > self.config.max_blob_bytes {
                return Err(RoundRejected::TooLarge(c.blob_len));
            }
            if !authors.insert(c.author) {
                return Err(RoundRejected::BadClose("contribution listed twice"));
            }
            // A contribution this peer refused (a replay, a copy) does not make it into the
            // model through a close: the next-ranked proposer's close is taken instead.
            if self.refuses(&c) {
                return Err(RoundRejected::BadClose("lists a refused contribution"));
            }
            contributions.push((c, signed.clone()));
        }
        let (contributions, signed) = self.take_contributions(contributions);
        if close.refused.len() > self.config.max_contributors
            || close
                .refused
                .iter()
                .any(|(k, reason)| authors.contains(k) || reason.len() > MAX_REFUSAL_REASON_BYTES)
        {
            return Err(RoundRejected::BadClose("malformed refusals"));
        }
        let rank = self.rank_of(close.round, &close.proposer);
        if self.applying {
            return Ok(Vec::new());
        }
        if self.failed_proposers.contains(&close.proposer) {
            return Ok(Vec::new());
        }
        let incoming = AcceptedClose {
            proposer: close.proposer,
            rank,
            contributions,
            signed,
            refused: close.refused,
        };
        // The lowest-ranked close wins; the others are kept in case its blobs cannot be had.
        let keep = match self.close.take() {
            Some(existing) if existing.rank <= rank => {
                self.close = Some(existing);
                incoming
            }
            Some(existing) => {
                self.close = Some(incoming);
                existing
            }
            None => {
                self.close = Some(incoming);
                return Ok(self.poll(now_ms, have));
            }
        };
        if self.other_closes.len() < self.config.max_contributors {
            self.other_closes.entry(keep.rank).or_insert(keep);
        }
        Ok(self.poll(now_ms, have))
    }

    /// A model state from `sender` (the gossip author).
    pub fn on_state(
        &mut self,
        state: ModelState,
        sender: PeerKey,
    ) -> Result<Vec<Action>, RoundRejected> {
        if state.job_id != self.job_id {
            return Err(RoundRejected::OtherJob);
        }
        if state.author != sender {
            return Err(RoundRejected::BadState);
        }
        if state.round + 1 >= self.current && state.round <= self.current + 1 {
            let authors = self.state_authors.entry(state.round).or_default();
            if authors.len() < self.config.max_contributors {
                authors.insert(state.author);
            }
        }
        if self
            .latest_state
            .as_ref()
            .is_none_or(|latest| state.round > latest.round)
        {
            self.latest_state = Some(state.clone());
        }
        self.remember_state(&state);
        let holders = self
            .holders
            .entry(state.round)
            .or_default()
            .entry(state.model_hash)
            .or_default();
        if holders.len() < self.config.max_contributors {
            holders.insert(state.author);
        }
        let mut from = vec![state.author];
        from.extend(holders.iter().filter(|k| **k != state.author).copied());
        while self.holders.len() > HOLDER_ROUNDS {
            self.holders.pop_first();
        }
        let resync = Action::Resync {
            round: state.round,
            model_hash: state.model_hash,
            snapshot_hash: state.snapshot_hash,
            snapshot_len: state.snapshot_len,
            from,
        };
        if self.resync_pending {
            return Ok(Vec::new());
        }
        // A joiner, or a peer two rounds behind: take the newest state. A synced peer follows
        // a state ahead of it only once a majority of its last round's contributors hold it, so
        // one peer closing rounds alone cannot pull the mesh onto its model.
        let holders_needed = if self.synced {
            self.expected.len().div_ceil(2).max(1)
        } else {
            1
        };
        let holder_count = self
            .holders
            .get(&state.round)
            .and_then(|h| h.get(&state.model_hash))
            .map_or(0, |h| {
                h.iter()
                    .filter(|k| self.expected.is_empty() || self.expected.contains(*k))
                    .count()
            });
        if !self.applying
            && (!self.synced || state.round > self.current)
            && holder_count >= holders_needed
        {
            self.resync_pending = true;
            self.counters.resyncs += 1;
            return Ok(vec![resync]);
        }
        // Divergence: our hash for that round differs from its proposer's.
        if let (Some(mine), Some(proposer)) = (
            self.my_hashes.get(&state.round),
            self.proposers.get(&state.round),
        ) && *proposer == sender
            && *mine != state.model_hash
        {
            self.counters.hash_mismatches += 1;
            if self.closed_by.get(&state.round) == Some(&sender) {
                // The close this peer applied is the proposer's own, so aggregation being
                // deterministic, the models should agree. Either this peer went wrong or the
                // proposer announces a model its close does not yield (its snapshot is checked
                // only against its own announcement): weighed by who holds which, once the
                // round's states are in (`follow_divergence`).
                if self.divergence.is_none() {
                    self.divergence = Some((state.round, state.model_hash, None));
                }
                return Ok(Vec::new());
            }
            // Another close than the one applied here: when the round chain decided the round,
            // its close is final, and a peer that applied another follows the decided branch as
            // most of its announcers give it (`follow_decision`), not this proposer's word.
            if self.decided.contains_key(&state.round) {
                return Ok(Vec::new());
            }
            if !self.applying {
                self.resync_pending = true;
                self.counters.resyncs += 1;
                return Ok(vec![resync]);
            }
        }
        Ok(Vec::new())
    }

    /// Advances time: closes the round when this peer is its proposer, asks for missing blobs
    /// of an accepted close, and asks to apply it once every blob is in hand.
    pub fn poll(&mut self, now_ms: u64, have: &dyn Fn(&BlobHash) -> bool) -> Vec<Action> {
        if !self.synced || self.applying {
            return Vec::new();
        }
        if let Some(resync) = self.follow_decision() {
            return vec![resync];
        }
        if let Some(resync) = self.follow_tip(now_ms) {
            return vec![resync];
        }
        if let Some(resync) = self.follow_divergence(now_ms) {
            return vec![resync];
        }
        if let Some(resync) = self.follow_majority(now_ms) {
            return vec![resync];
        }
        // Commitments that arrived before the round opened start its clock now.
        if self.first_commit_ms.is_none()
            && self
                .commits
                .get(&self.current)
                .is_some_and(|c| !c.is_empty())
        {
            self.first_commit_ms = Some(now_ms);
        }
        let mut actions = Vec::new();
        // Commit-then-reveal: this peer's blob is served once every expected contributor has
        // committed, or the deadline has passed.
        if self.revealed_ms.is_none()
            && self.close.is_none()
            && let Some(round_commits) = self.commits.get(&self.current)
            && round_commits.contains_key(&self.me)
        {
            let expected = self.expected_contributors();
            // A contributor whose commitment was refused (a replay, a copy, an excluded one)
            // has had its say: the others do not wait for it until the deadline.
            let all_committed = !expected.is_empty()
                && expected
                    .iter()
                    .all(|k| round_commits.contains_key(k) || self.is_refused(k));
            let deadline_passed = self
                .first_commit_ms
                .is_some_and(|t| now_ms >= t + self.config.round_deadline_ms);
            if all_committed || deadline_passed {
                self.revealed_ms = Some(now_ms);
                actions.push(Action::Reveal {
                    round: self.current,
                });
            }
        }
        actions.extend(self.poll_close(now_ms, have));
        actions
    }

    /// Who is expected to contribute to the current round: the contributors of the previous
    /// round, or else every peer that announced the model this round starts from (the first
    /// round, or after a resync).
    fn expected_contributors(&self) -> BTreeSet<PeerKey> {
        if !self.expected.is_empty() {
            return self.expected.clone();
        }
        let mut starters = self
            .state_authors
            .get(&(self.current - 1))
            .cloned()
            .unwrap_or_default();
        if !starters.is_empty()
            && self
                .commits
                .get(&self.current)
                .is_some_and(|c| c.contains_key(&self.me))
        {
            starters.insert(self.me);
        }
        starters
    }

    fn poll_close(&mut self, now_ms: u64, have: &dyn Fn(&BlobHash) -> bool) -> Vec<Action> {
        if let Some(close) = &self.close {
            let missing: Vec<Action> = close
                .contributions
                .iter()
                .filter(|c| !have(&c.blob_hash))
                .map(|c| Action::Fetch {
                    hash: c.blob_hash,
                    len: c.blob_len,
                    from: vec![c.author, close.proposer],
                })
                .collect();
            if !missing.is_empty() {
                return missing;
            }
            self.applying = true;
            let evidence = self.evidence(close);
            return vec![Action::Apply {
                round: self.current,
                contributions: close.contributions.clone(),
                proposer: close.proposer,
                refused: close.refused.clone(),
                evidence,
            }];
        }
        let Some(round_commits) = self.commits.get(&self.current) else {
            return Vec::new();
        };
        let held: Vec<&Pending> = round_commits
            .values()
            .filter(|p| {
                !self.after_reveal.contains(&p.commitment.author)
                    && !self.is_refused(&p.commitment.author)
                    && have(&p.commitment.blob_hash)
            })
            .collect();
        // Only a contributor that revealed closes: the accepted set is what was committed
        // before its reveal. It closes once it holds all of those blobs, or a deadline after
        // the reveal with those it holds.
        let Some(revealed_ms) = self.revealed_ms else {
            return Vec::new();
        };
        if held.len() < self.config.min_contributors.max(1) {
            return Vec::new();
        }
        let candidates = round_commits
            .keys()
            .filter(|k| !self.after_reveal.contains(*k) && !self.is_refused(k))
            .count();
        if held.len() == candidates && self.ready_since_ms.is_none() {
            self.ready_since_ms = Some(now_ms);
        }
        // Every honest contributor has revealed by a deadline after its first commitment; the
        // blobs then get a deadline more to arrive.
        let all_revealed_ms = self.first_commit_ms.map_or(revealed_ms, |first| {
            revealed_ms.max(first + self.config.round_deadline_ms)
        });
        let fetch_deadline_ms = all_revealed_ms + self.config.round_deadline_ms;
        let ready_at_ms = self
            .ready_since_ms
            .map_or(fetch_deadline_ms, |ready| ready.min(fetch_deadline_ms));
        let rank = self.rank_of(self.current, &self.me);
        let my_turn_ms = ready_at_ms + rank as u64 * self.config.proposer_grace_ms;
        if now_ms < my_turn_ms {
            return Vec::new();
        }
        let mut accepted: Vec<&Pending> = held;
        accepted.sort_by_key(|p| p.commitment.author);
        let refused: Vec<(PeerKey, String)> = self
            .refused
            .get(&self.current)
            .map(|r| r.iter().map(|(k, reason)| (*k, reason.clone())).collect())
            .unwrap_or_default();
        let close = RoundClose {
            job_id: self.job_id,
            round: self.current,
            proposer: self.me,
            commitments: accepted.iter().map(|p| p.signed.clone()).collect(),
            refused: refused.clone(),
        };
        let contributions: Vec<Commitment> =
            accepted.iter().map(|p| p.commitment.clone()).collect();
        let accepted_close = AcceptedClose {
            proposer: self.me,
            rank,
            contributions: contributions.clone(),
            signed: close.commitments.clone(),
            refused: refused.clone(),
        };
        let evidence = self.evidence(&accepted_close);
        self.close = Some(accepted_close);
        self.applying = true;
        vec![
            Action::Publish(TrainMessage::Close(close)),
            Action::Apply {
                round: self.current,
                contributions,
                proposer: self.me,
                refused,
                evidence,
            },
        ]
    }

    /// The signed commitments behind a close: its contributions', then those of its refused
    /// contributors this peer holds (it took or refused their commitment itself), then those of
    /// the other commitments of the round this peer refused.
    fn evidence(&self, close: &AcceptedClose) -> Vec<(PeerKey, SignedCommitment)> {
        let mut evidence: Vec<(PeerKey, SignedCommitment)> = close
            .contributions
            .iter()
            .map(|c| c.author)
            .zip(close.signed.iter().cloned())
            .collect();
        for (author, _) in &close.refused {
            let held = self
                .refused_evidence
                .get(&self.current)
                .and_then(|r| r.get(author))
                .or_else(|| {
                    self.commits
                        .get(&self.current)
                        .and_then(|c| c.get(author))
                        .map(|p| &p.signed)
                });
            if let Some(signed) = held {
                evidence.push((*author, signed.clone()));
            }
        }
        // And those of the refusals this peer made itself (see `refused_here`).
        for (author, signed) in self
            .refused_evidence
            .get(&self.current)
            .into_iter()
            .flatten()
        {
            if !evidence.iter().any(|(k, _)| k == author) {
                evidence.push((*author, signed.clone()));
            }
        }
        evidence
    }

    /// The driver applied round `round` (the one returned by `Apply`) with model hash
    /// `model_hash`: the next round opens.
    pub fn applied(&mut self, round: u64, model_hash: ModelHash) {
        if round != self.current {
            return;
        }
        if let Some(close) = self.close.take() {
            // Next round waits for everyone who took part in this one: the accepted, and those
            // who committed too late for the close (alive, only slow). Refused replays and
            // copies never entered the commitments.
            self.expected = close.contributions.iter().map(|c| c.author).collect();
            self.expected.extend(self.late_authors.iter().copied());
            if let Some(commits) = self.commits.get(&round) {
                self.expected.extend(commits.keys().copied());
            }
            self.proposers.insert(round, close.proposer);
            self.closed_by.insert(round, close.proposer);
            self.applied_ranks.insert(round, close.rank);
            let applied = RoundClose {
                job_id: self.job_id,
                round,
                proposer: close.proposer,
                commitments: close.signed.clone(),
                refused: close.refused.clone(),
            };
            if let Some(decided) = self.decided.get(&round)
                && close_content(decided) != close_content(&applied)
                && !self.refuses_any(decided)
            {
                self.counters.chain_overruled += 1;
                self.decided_off = Some((round, decided_digest(decided)));
            }
            self.applied_closes.insert(round, applied);
            self.last_ranks = self
                .commits
                .get(&round)
                .map(|c| c.keys().copied().collect());
        }
        self.my_hashes.insert(round, model_hash);
        self.advance_to(round + 1);
        if !self.expected.is_empty() {
            self.electorate.insert(round + 1, self.expected.clone());
        }
    }

    /// The driver gave up applying (a blob of the close could not be had intact from anyone):
    /// that proposer's close is dropped for this round and the next-ranked close received, if
    /// any, takes its place; otherwise wait for another close or a resync.
    pub fn apply_failed(&mut self) {
        self.applying = false;
        if let Some(failed) = self.close.take() {
            self.failed_proposers.insert(failed.proposer);
        }
        while let Some((_, next)) = self.other_closes.pop_first() {
            if !self.failed_proposers.contains(&next.proposer) {
                self.close = Some(next);
                break;
            }
        }
    }

    /// The driver loaded a verified snapshot of the state after `round`.
    pub fn resynced(&mut self, round: u64, model_hash: ModelHash) {
        let rolled_back = round + 1 < self.current;
        if self.decided_off.is_some_and(|(off, _)| round >= off) {
            self.decided_off = None;
        }
        // The closes this peer applied were of the history the snapshot replaces.
        self.applied_closes.clear();
        self.synced = true;
        self.resync_pending = false;
        self.applying = false;
        self.close = None;
        self.my_hashes.insert(round, model_hash);
        self.expected.clear();
        self.advance_to(round + 1);
        if rolled_back {
            // This peer's commitments of the rounds it is now back before were made on the
            // abandoned branch: its new ones take their place.
            for slot in self.commits.values_mut() {
                slot.remove(&self.me);
            }
            self.my_hashes.retain(|r, _| *r <= round);
        }
        // A decided round the loaded model's announced lineage disagrees with (the resync went
        // by another rule than the decision): back onto the decided branch.
        let off = self
            .decided
            .keys()
            .rev()
            .copied()
            .filter(|at| *at <= round)
            .find(|at| self.off_decision(*at));
        if let Some(at) = off
            && let Some(decided) = self.decided.get(&at)
        {
            self.counters.chain_overruled += 1;
            self.decided_off = Some((at, decided_digest(decided)));
        }
    }

    /// The resync could not be completed (the snapshot was unavailable or bad).
    pub fn resync_failed(&mut self) {
        self.resync_pending = false;
    }

    fn advance_to(&mut self, next: u64) {
        self.current = next;
        self.applying = false;
        self.close = None;
        self.other_closes.clear();
        self.failed_proposers.clear();
        self.first_commit_ms = None;
        self.ready_since_ms = None;
        self.commits = self.commits.split_off(&next);
        self.late_authors.clear();
        self.state_authors = self.state_authors.split_off(&(next - 1));
        self.revealed_ms = None;
        self.after_reveal.clear();
        self.refused = self.refused.split_off(&next);
        self.refused_evidence = self.refused_evidence.split_off(&next);
        self.excluded.retain(|_, (through, _)| *through >= next);
        let stale_floor = next.saturating_sub(STALE_ROUNDS);
        self.recent_blobs
            .retain(|_, seen| seen.last_round >= stale_floor);
        let floor = next.saturating_sub(HASH_HISTORY_ROUNDS);
        self.my_hashes = self.my_hashes.split_off(&floor);
        self.proposers = self.proposers.split_off(&floor);
        self.closed_by = self.closed_by.split_off(&floor);
        self.electorate = self.electorate.split_off(&floor);
        self.applied_ranks = self.applied_ranks.split_off(&floor);
        let chain_floor = next.saturating_sub(CHAIN_ROUNDS);
        self.applied_closes = self.applied_closes.split_off(&chain_floor);
        self.decided = self.decided.split_off(&chain_floor);
        if self.decided_off.is_some_and(|(off, _)| off < chain_floor) {
            self.decided_off = None;
        }
    }

    /// How many of `keys` rank before `peer` in `round`.
    fn rank_among<'a>(
        &self,
        round: u64,
        peer: &PeerKey,
        keys: impl Iterator<Item = &'a PeerKey>,
    ) -> usize {
        let target = proposer_rank_key(&self.job_id, round, peer);
        keys.filter(|k| proposer_rank_key(&self.job_id, round, k) < target)
            .count()
    }

    /// Rank of `peer` among the contributors known when `round` (the last applied) closed.
    fn rank_of_known(&self, round: u64, peer: &PeerKey) -> usize {
        self.last_ranks
            .as_ref()
            .map_or(0, |keys| self.rank_among(round, peer, keys.iter()))
    }

    /// Whether this peer's model is off the round chain's decision of `round`: it applied
    /// another close, or it loaded a model whose announcers give another accepted set for that
    /// round (a resync that went elsewhere before or after the decision came).
    fn off_decision(&self, round: u64) -> bool {
        let Some(decided) = self.decided.get(&round) else {
            return false;
        };
        // A decided close listing a contribution this peer refused is not followed.
        if self.refuses_any(decided) {
            return false;
        }
        if let Some(applied) = self.applied_closes.get(&round) {
            return close_content(applied) != close_content(decided);
        }
        let Some(lineage) = self
            .my_hashes
            .get(&self.current.saturating_sub(1))
            .map(|head| self.announced_lineage(self.current.saturating_sub(1), *head))
        else {
            return false;
        };
        lineage
            .iter()
            .find(|(at, _, _)| *at == round)
            .is_some_and(|(_, _, digest)| *digest != decided_digest(decided))
    }

    /// Whether the round chain decided the close this peer applied in `round`.
    fn decided_mine(&self, round: u64) -> bool {
        match (self.decided.get(&round), self.applied_closes.get(&round)) {
            (Some(decided), Some(applied)) => close_content(decided) == close_content(applied),
            _ => false,
        }
    }

    /// The close this peer applied in `round`, while kept (the newest few rounds).
    pub fn applied_close(&self, round: u64) -> Option<&RoundClose> {
        self.applied_closes.get(&round)
    }

    /// The committee of `round` in the job's round chain: the contributors accepted by the close
    /// of the round before (the decided one if known, else the one this peer applied). `None`
    /// when this peer knows neither (the job's first round, or right after a resync).
    pub fn chain_committee(&self, round: u64) -> Option<BTreeSet<PeerKey>> {
        let before = round.checked_sub(1)?;
        let close = self
            .decided
            .get(&before)
            .or_else(|| self.applied_closes.get(&before))?;
        Some(close_content(close).into_iter().map(|(k, _)| k).collect())
    }

    /// The job's round chain decided `close` for its round. A round not yet closed here takes
    /// it as its close (whatever closes came before); an applied round whose close differs is
    /// left for the decided branch ([`RoundEngine::poll`] resyncs onto it); no other close of a
    /// decided round is taken.
    pub fn on_decided(
        &mut self,
        close: RoundClose,
        now_ms: u64,
        have: &dyn Fn(&BlobHash) -> bool,
    ) -> Vec<Action> {
        if close.job_id != self.job_id || self.decided.contains_key(&close.round) {
            return Vec::new();
        }
        let round = close.round;
        if round + CHAIN_ROUNDS < self.current || round > self.current + CHAIN_ROUNDS {
            return Vec::new();
        }
        self.counters.chain_decided += 1;
        self.decided.insert(round, close.clone());
        while self.decided.len() > 2 * CHAIN_ROUNDS as usize {
            self.decided.pop_first();
        }
        if round < self.current {
            // The decided close's proposer is the round's: a better-ranked close heard later
            // no longer pulls this peer.
            self.proposers.insert(round, close.proposer);
            if self.off_decision(round) {
                self.counters.chain_overruled += 1;
                self.decided_off = Some((round, decided_digest(&close)));
            }
            // A resync onto the decided branch, if needed, comes with the next poll.
            return Vec::new();
        }
        if round > self.current || self.applying {
            // Checked against the close this peer applies, once applied.
            return Vec::new();
        }
        let same = self.close.as_ref().is_some_and(|c| {
            let mut mine: Vec<(PeerKey, BlobHash)> = c
                .contributions
                .iter()
                .map(|c| (c.author, c.blob_hash))
                .collect();
            mine.sort_unstable();
            mine == close_content(&close)
        });
        if !same
            && let Some(accepted) = self.accepted_from_decided(&close)
            && let Some(previous) = self.close.replace(accepted)
            && self.other_closes.len() < self.config.max_contributors
        {
            self.other_closes.entry(previous.rank).or_insert(previous);
        }
        self.poll(now_ms, have)
    }

    /// Whether this peer refused the contribution `c` (a replay, a copy, an excluded author's),
    /// so that no close, decided or not, brings it into this peer's model.
    fn refuses(&self, c: &Commitment) -> bool {
        self.refused
            .get(&c.round)
            .is_some_and(|r| r.contains_key(&c.author))
            || self
                .excluded
                .get(&c.author)
                .is_some_and(|(through, _)| c.round <= *through)
            || self.prior_blob(c).is_some()
    }

    /// Whether `close` lists a contribution this peer refused.
    fn refuses_any(&self, close: &RoundClose) -> bool {
        close
            .commitments
            .iter()
            .filter_map(|signed| signed.claimed().ok())
            .any(|c| self.refuses(&c))
    }

    /// A close's verified contributions, as this peer takes them: each remembered like a
    /// commitment (one first heard of in a close included), sorted by author, split into the
    /// commitments and their signed form.
    fn take_contributions(
        &mut self,
        mut contributions: Vec<(Commitment, SignedCommitment)>,
    ) -> (Vec<Commitment>, Vec<SignedCommitment>) {
        for (c, _) in &contributions {
            self.remember_blob(c.blob_hash, c.round, c.author);
        }
        contributions.sort_by_key(|(c, _)| c.author);
        contributions.into_iter().unzip()
    }

    /// A decided close as this peer's close of the current round: its commitments verified, and
    /// none this peer refused (a peer that refused a copy or a replay never takes it, decided or
    /// not: it then stays with the fast path's rules for the round).
    fn accepted_from_decided(&mut self, close: &RoundClose) -> Option<AcceptedClose> {
        let mut contributions = Vec::with_capacity(close.commitments.len());
        for signed in &close.commitments {
            let c = signed.verify().ok()?;
            if c.job_id != self.job_id || c.round != close.round || self.refuses(&c) {
                return None;
            }
            contributions.push((c, signed.clone()));
        }
        let (contributions, signed) = self.take_contributions(contributions);
        Some(AcceptedClose {
            proposer: close.proposer,
            rank: 0,
            contributions,
            signed,
            refused: close.refused.clone(),
        })
    }

    /// A resync onto the decided branch, when this peer applied another close of a decided
    /// round: to the newest announced state built on the model that most announcers of the
    /// round's decided accepted set hold. Each target is tried once; until the decided branch is
    /// announced, nothing.
    fn follow_decision(&mut self) -> Option<Action> {
        let (round, digest) = self.decided_off?;
        if !self.synced || self.applying || self.resync_pending {
            return None;
        }
        let model_hash = self
            .lineage
            .get(&round)?
            .iter()
            .filter(|(_, a)| a.digest() == Some(digest))
            .max_by(|(ha, a), (hb, b)| a.authors.len().cmp(&b.authors.len()).then(hb.cmp(ha)))
            .map(|(hash, _)| *hash)?;
        let head = self.branch_head(round, model_hash)?;
        let action = self.resync_once(head, |engine| &mut engine.decided_targets_tried)?;
        self.counters.chain_resyncs += 1;
        Some(action)
    }

    /// The ledger recorded `round` of this job with `model_hash` (from a finalized block),
    /// known here at `now_ms`. The newest recorded round is the ledger tip: if this peer's model
    /// at that round differs, [`RoundEngine::poll`] resyncs it, once the round's states have had
    /// [`TIP_SETTLE_MS`] (or the proposer grace, if longer) to arrive, to the newest state built
    /// on the recorded model that is announced at or after its own round and backed by at least
    /// as many contributors as its own model. Recorded rounds older than the tip change nothing.
    pub fn on_recorded(&mut self, round: u64, model_hash: ModelHash, now_ms: u64) {
        if self.ledger_tip.is_some_and(|(tip, _)| tip >= round) {
            return;
        }
        self.ledger_tip = Some((round, model_hash));
        self.tip_since_ms = now_ms;
    }

    /// The newest round recorded on the ledger, and its model hash.
    pub fn ledger_tip(&self) -> Option<(u64, ModelHash)> {
        self.ledger_tip
    }

    /// The hash of the model this peer's model after `round` was built on: its own model after
    /// the round before, or else the parent its origin announced (zeros when unknown).
    pub fn parent_hash(&self, round: u64) -> ModelHash {
        if let Some(parent) = round
            .checked_sub(1)
            .and_then(|before| self.my_hashes.get(&before))
        {
            return *parent;
        }
        self.my_hashes
            .get(&round)
            .and_then(|mine| self.lineage.get(&round)?.get(mine))
            .map_or([0; 32], |a| a.parent_hash)
    }

    /// Remembers an announced state with its parent (bounded: rounds, models per round, authors
    /// per model).
    fn remember_state(&mut self, state: &ModelState) {
        // A synced peer keeps only rounds near its own: one far ahead cannot push the real ones
        // out.
        if self.synced && state.round > self.current + HASH_HISTORY_ROUNDS {
            return;
        }
        if !self.lineage.contains_key(&state.round)
            && self.lineage.len() >= LINEAGE_ROUNDS
            && self
                .lineage
                .first_key_value()
                .is_some_and(|(oldest, _)| *oldest > state.round)
        {
            return;
        }
        let models = self.lineage.entry(state.round).or_default();
        if !models.contains_key(&state.model_hash) && models.len() >= self.config.max_contributors {
            return;
        }
        let announced = models.entry(state.model_hash).or_insert_with(|| Announced {
            parent_hash: state.parent_hash,
            snapshot_hash: state.snapshot_hash,
            snapshot_len: state.snapshot_len,
            authors: BTreeSet::new(),
            digests: BTreeMap::new(),
        });
        if announced.authors.len() < self.config.max_contributors {
            announced.authors.insert(state.author);
            if state.accepted_digest != [0; 32] {
                for givers in announced.digests.values_mut() {
                    givers.remove(&state.author);
                }
                announced.digests.retain(|_, givers| !givers.is_empty());
                announced
                    .digests
                    .entry(state.accepted_digest)
                    .or_default()
                    .insert(state.author);
            }
        }
        // An author holds one model per round: its latest announcement (after a resync, the
        // model it loaded).
        for (hash, other) in models.iter_mut() {
            if *hash != state.model_hash {
                other.authors.remove(&state.author);
            }
        }
        while self.lineage.len() > LINEAGE_ROUNDS {
            self.lineage.pop_first();
        }
    }

    /// The rounds of the announced lineage of `model_hash` after `round`, newest first, back
    /// through the announced parents: (round, model hash, the accepted-set digest most of its
    /// announcers gave), for the rounds whose digest was heard (round 0 left out). What a peer
    /// that resynced onto the model vouches for on the ledger, as it trusted the model itself.
    pub fn announced_lineage(
        &self,
        round: u64,
        model_hash: ModelHash,
    ) -> Vec<(u64, ModelHash, BlobHash)> {
        let mut out = Vec::new();
        let (mut at, mut hash) = (round, model_hash);
        while at > 0 {
            let Some(announced) = self.lineage.get(&at).and_then(|models| models.get(&hash)) else {
                break;
            };
            if let Some(digest) = announced.digest() {
                out.push((at, hash, digest));
            }
            if announced.parent_hash == [0; 32] {
                break;
            }
            hash = announced.parent_hash;
            at -= 1;
        }
        out
    }

    /// How long the states of a round are given to arrive before branches are weighed.
    fn settle_ms(&self) -> u64 {
        TIP_SETTLE_MS.max(self.config.proposer_grace_ms)
    }

    /// A resync onto the announced model `model_hash` after `round`, from the peers that
    /// announced it; None when it was not heard.
    fn resync_to(&self, round: u64, model_hash: ModelHash) -> Option<Action> {
        let announced = self.lineage.get(&round)?.get(&model_hash)?;
        Some(Action::Resync {
            round,
            model_hash,
            snapshot_hash: announced.snapshot_hash,
            snapshot_len: announced.snapshot_len,
            from: announced.authors.iter().copied().collect(),
        })
    }

    /// A resync onto the announced model `target` (round, model hash), unless it is in the list
    /// of targets `tried` picks: each target is tried once. Marks the resync pending.
    fn resync_once(
        &mut self,
        target: (u64, ModelHash),
        tried: fn(&mut Self) -> &mut Vec<(u64, ModelHash)>,
    ) -> Option<Action> {
        if tried(self).contains(&target) {
            return None;
        }
        let action = self.resync_to(target.0, target.1)?;
        remember_tried(tried(self), target);
        self.resync_pending = true;
        self.counters.resyncs += 1;
        Some(action)
    }

    /// How many contributors announced `model_hash` after `round`, never counting this peer.
    /// Contributors are the last round's and those with a signed commitment for the open round
    /// or the next: an announcement costs nothing to make up, a commitment is signed work.
    fn support(&self, round: u64, model_hash: &ModelHash) -> usize {
        let contributor = |k: &PeerKey| {
            self.expected.contains(k) || self.commits.values().any(|slot| slot.contains_key(k))
        };
        self.lineage
            .get(&round)
            .and_then(|models| models.get(model_hash))
            .map_or(0, |announced| {
                announced
                    .authors
                    .iter()
                    .filter(|k| **k != self.me && contributor(k))
                    .count()
            })
    }

    /// The newest announced model built on `model_hash` after `round`, following the parents
    /// forward: (round, model hash). Among several at the newest round, the
    /// one most peers announced.
    fn branch_head(&self, round: u64, model_hash: ModelHash) -> Option<(u64, ModelHash)> {
        let mut frontier = BTreeSet::from([model_hash]);
        let mut at = round;
        loop {
            let next: BTreeSet<ModelHash> = self
                .lineage
                .get(&(at + 1))
                .map(|models| {
                    models
                        .iter()
                        .filter(|(_, a)| frontier.contains(&a.parent_hash))
                        .map(|(hash, _)| *hash)
                        .collect()
                })
                .unwrap_or_default();
            if next.is_empty() {
                break;
            }
            frontier = next;
            at += 1;
        }
        let models = self.lineage.get(&at)?;
        frontier
            .iter()
            .filter_map(|hash| models.get(hash).map(|a| (*hash, a)))
            .max_by(|(ha, a), (hb, b)| a.authors.len().cmp(&b.authors.len()).then(hb.cmp(ha)))
            .map(|(hash, _)| (at, hash))
    }

    /// A resync onto the ledger tip's branch, when this peer's model is off it and the branch is
    /// announced at or after this peer's last applied round (a branch nobody carries any more
    /// is not rolled back to: the ledger will record a later round). Each target is tried once.
    fn follow_tip(&mut self, now_ms: u64) -> Option<Action> {
        let (tip_round, tip_hash) = self.ledger_tip?;
        if !self.synced || self.applying || self.resync_pending {
            return None;
        }
        // The round's states (this peer's own branch's included) are given time to arrive
        // before the branches are weighed.
        if now_ms < self.tip_since_ms + self.settle_ms() {
            return None;
        }
        let mine = self.my_hashes.get(&tip_round)?;
        if *mine == tip_hash {
            return None;
        }
        let last_applied = self.current - 1;
        let (round, model_hash) = self.branch_head(tip_round, tip_hash)?;
        if round < last_applied || self.tip_targets_tried.contains(&(round, model_hash)) {
            return None;
        }
        // A coordinator's result is on the ledger because it was recorded first, not because
        // the mesh holds it: a byzantine coordinator can record the close the others refused.
        // The recorded branch is followed only when at least as many contributors announce
        // its head as hold this peer's own model (this peer included).
        let own_hash = self.my_hashes.get(&last_applied).copied();
        let own_support = 1 + own_hash.map_or(0, |hash| self.support(last_applied, &hash));
        if self.support(round, &model_hash) < own_support {
            return None;
        }
        let resync =
            self.resync_once((round, model_hash), |engine| &mut engine.tip_targets_tried)?;
        // The models of this peer's branch from the tip's round on are not the job's.
        self.my_hashes.retain(|r, _| *r < tip_round);
        self.counters.ledger_resyncs += 1;
        self.counters.hash_mismatches += 1;
        Some(resync)
    }

    /// A resync onto the model the proposer of a close this peer applied announced for that
    /// round, when it differs from this peer's: only once the round's states had time to arrive
    /// and at least as many contributors announce the proposer's model (or the newest one built
    /// on it) as hold this peer's own (this peer included). A proposer that announces a model
    /// its close does not yield, with a snapshot to match, pulls nobody who has company.
    fn follow_divergence(&mut self, now_ms: u64) -> Option<Action> {
        let (round, theirs, since) = self.divergence?;
        if self.resync_pending {
            return None;
        }
        let Some(since) = since else {
            self.divergence = Some((round, theirs, Some(now_ms)));
            return None;
        };
        if now_ms < since + self.settle_ms() {
            return None;
        }
        self.divergence = None;
        let mine = *self.my_hashes.get(&round)?;
        if mine == theirs {
            return None;
        }
        // Both models were announced right after the round was applied: compared there.
        if self.support(round, &theirs) < 1 + self.support(round, &mine) {
            self.counters.divergences_refused += 1;
            return None;
        }
        let (head_round, head_hash) = self.branch_head(round, theirs)?;
        if head_round + 1 < self.current {
            return None;
        }
        let resync = self.resync_to(head_round, head_hash)?;
        self.my_hashes.retain(|r, _| *r < round);
        self.resync_pending = true;
        self.counters.resyncs += 1;
        Some(resync)
    }

    /// A resync onto the branch most of a past round's electorate is on, when this peer is on
    /// another: a peer that closed a round alone (the others were slower than its deadlines)
    /// and then ran ahead on its own model, out of reach of the rules that look one round back,
    /// comes back, rolling back its rounds if it has to. Rounds are weighed from the one before
    /// the last applied backwards (the last is the business of the close and divergence rules),
    /// down to the newest where another member of the electorate holds this peer's model. In a
    /// round, each member of its electorate counts once, for the model it announced last, and
    /// this peer for its own; a tie goes to the lower model hash, so both sides pick alike. A
    /// majority elsewhere must have been seen for a second (the announcements have time to
    /// arrive), and each target is tried once.
    fn follow_majority(&mut self, now_ms: u64) -> Option<Action> {
        if self.resync_pending {
            return None;
        }
        let newest = self.current.checked_sub(2)?;
        let oldest = newest.saturating_sub(HASH_HISTORY_ROUNDS);
        let mut found = None;
        for round in (oldest..=newest).rev() {
            let (Some(mine), Some(electorate), Some(models)) = (
                self.my_hashes.get(&round),
                self.electorate.get(&round),
                self.lineage.get(&round),
            ) else {
                continue;
            };
            let votes = |hash: &ModelHash| {
                models.get(hash).map_or(0, |announced| {
                    announced
                        .authors
                        .iter()
                        .filter(|k| **k != self.me && electorate.contains(*k))
                        .count()
                })
            };
            let own_votes = votes(mine);
            let best = models
                .keys()
                .filter(|hash| *hash != mine)
                .map(|hash| (votes(hash), std::cmp::Reverse(*hash)))
                .max();
            if let Some((best_votes, std::cmp::Reverse(best))) = best
                && best_votes > 0
                && (best_votes > own_votes + 1 || (best_votes == own_votes + 1 && best < *mine))
            {
                found = Some((round, best));
                break;
            }
            if own_votes > 0 {
                break;
            }
        }
        let Some((round, best)) = found else {
            self.majority_elsewhere_since = None;
            return None;
        };
        let since = *self.majority_elsewhere_since.get_or_insert(now_ms);
        if now_ms < since + self.settle_ms() {
            return None;
        }
        let head = self.branch_head(round, best)?;
        let resync = self.resync_once(head, |engine| &mut engine.majority_targets_tried)?;
        self.majority_elsewhere_since = None;
        // This peer's branch from that round on is abandoned.
        self.my_hashes.retain(|r, _| *r < round);
        self.electorate.retain(|r, _| *r <= round);
        self.counters.majority_resyncs += 1;
        Some(resync)
    }

    /// Replays and copies refused after their round had closed here, since the last call:
    /// (round, author, reason, the commitment), for the round's report.
    pub fn take_late_refusals(&mut self) -> Vec<(u64, PeerKey, String, SignedCommitment)> {
        std::mem::take(&mut self.late_refusals)
    }

    /// The commitments of the open round this peer refused itself (replays, copies, excluded
    /// contributors), with the reason.
    pub fn refused_here(&self) -> Vec<(PeerKey, String)> {
        self.refused
            .get(&self.current)
            .map(|r| r.iter().map(|(k, reason)| (*k, reason.clone())).collect())
            .unwrap_or_default()
    }

    /// Excludes `subject`'s contributions through round `through` (it failed an audit): its
    /// commitments are refused with `reason`, and closes that list one are refused. Bounded by
    /// the contributors of a round.
    pub fn exclude(&mut self, subject: PeerKey, through: u64, reason: String) {
        if subject == self.me {
            return;
        }
        if self.excluded.len() >= self.config.max_contributors
            && !self.excluded.contains_key(&subject)
        {
            return;
        }
        let entry = self
            .excluded
            .entry(subject)
            .or_insert((through, reason.clone()));
        if entry.0 < through {
            *entry = (through, reason.clone());
        }
        // A commitment of it already taken for the open round is refused too.
        if let Some(slot) = self.commits.get_mut(&self.current)
            && self.close.is_none()
            && let Some(pending) = slot.remove(&subject)
        {
            let current = self.current;
            self.refuse(current, subject, reason, Some(pending.signed));
        }
    }

    /// What this peer already knows of `commitment`'s blob: committed in an earlier round, or
    /// by another author in the same round (found among the round's commitments, or only
    /// remembered: it came after the round closed here, or in a close).
    fn prior_blob(&self, commitment: &Commitment) -> Option<PriorBlob> {
        let seen = self.recent_blobs.get(&commitment.blob_hash);
        if let Some(seen) = seen
            && seen.first_round < commitment.round
        {
            return Some(PriorBlob::Replay {
                round: seen.first_round,
            });
        }
        self.commits
            .get(&commitment.round)
            .and_then(|slot| {
                slot.values()
                    .map(|p| &p.commitment)
                    .find(|p| p.blob_hash == commitment.blob_hash && p.author != commitment.author)
                    .map(|p| p.author)
            })
            .or_else(|| {
                seen.filter(|s| s.first_round == commitment.round && s.author != commitment.author)
                    .map(|s| s.author)
            })
            .map(|original| PriorBlob::Copy { original })
    }

    /// Remembers that `hash` was committed in `round`, so that a later commitment of it is a
    /// replay (bounded; old entries are pruned as rounds advance).
    fn remember_blob(&mut self, hash: BlobHash, round: u64, author: PeerKey) {
        if self.recent_blobs.len() < 2 * STALE_ROUNDS as usize * self.config.max_contributors
            || self.recent_blobs.contains_key(&hash)
        {
            let seen = self.recent_blobs.entry(hash).or_insert(SeenBlob {
                first_round: round,
                last_round: round,
                author,
            });
            if round < seen.first_round {
                seen.first_round = round;
                seen.author = author;
            }
            seen.last_round = seen.last_round.max(round);
        }
    }

    /// Refuses `commitment`, whose blob was committed before (`prior`): counted, and recorded
    /// with its reason when its round is the open one or the next. Returns the rejection and
    /// the reason.
    fn refuse_prior(
        &mut self,
        prior: PriorBlob,
        commitment: &Commitment,
        signed: &SignedCommitment,
    ) -> (RoundRejected, String) {
        let (rejected, reason) = match prior {
            PriorBlob::Replay { round: earlier } => {
                if let Some(seen) = self.recent_blobs.get_mut(&commitment.blob_hash) {
                    seen.last_round = seen.last_round.max(commitment.round);
                }
                self.counters.stale_commitments += 1;
                (
                    RoundRejected::Stale(earlier),
                    format!("stale: replays a blob committed in round {earlier}"),
                )
            }
            PriorBlob::Copy { original } => {
                self.counters.copied_commitments += 1;
                (
                    RoundRejected::Copy,
                    format!(
                        "copy of the update of {}",
                        crate::verify::short_hex(&original)
                    ),
                )
            }
        };
        self.refuse(
            commitment.round,
            commitment.author,
            reason.clone(),
            Some(signed.clone()),
        );
        (rejected, reason)
    }

    /// Records a refusal of `author`'s commitment in `round` (the open round or the next).
    /// `signed` is the refused commitment, kept as the evidence of the refusal.
    fn refuse(
        &mut self,
        round: u64,
        author: PeerKey,
        reason: String,
        signed: Option<SignedCommitment>,
    ) {
        if round < self.current || round > self.current + 1 {
            return;
        }
        let refused = self.refused.entry(round).or_default();
        if refused.len() < self.config.max_contributors {
            refused.insert(author, reason);
            if let Some(signed) = signed {
                self.refused_evidence
                    .entry(round)
                    .or_default()
                    .insert(author, signed);
            }
        }
    }

    /// Whether `author`'s commitment of the open round was refused.
    fn is_refused(&self, author: &PeerKey) -> bool {
        self.refused
            .get(&self.current)
            .is_some_and(|r| r.contains_key(author))
    }

    fn rank_of(&self, round: u64, peer: &PeerKey) -> usize {
        self.commits
            .get(&round)
            .map_or(0, |commits| self.rank_among(round, peer, commits.keys()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(i: u8) -> SigningKey {
        SigningKey::from_bytes(&[i; 32])
    }

    /// The public key of [`key`]`(i)`.
    fn peer(i: u8) -> PeerKey {
        key(i).verifying_key().to_bytes()
    }

    fn commit(job: JobId, round: u64, signer: &SigningKey, blob: &[u8]) -> SignedCommitment {
        Commitment {
            job_id: job,
            round,
            blob_hash: crate::contribution::blob_hash(blob),
            blob_len: blob.len() as u64,
            author: signer.verifying_key().to_bytes(),
        }
        .seal(|m| signer.sign(m).to_bytes().to_vec())
    }

    fn config() -> RoundConfig {
        RoundConfig {
            round_deadline_ms: 1_000,
            proposer_grace_ms: 500,
            ..RoundConfig::default()
        }
    }

    const JOB: JobId = [9; 32];

    impl RoundEngine {
        /// `poll` without the reveal step (tests of closing hold every blob from the start).
        fn poll_t(&mut self, now_ms: u64, have: &dyn Fn(&BlobHash) -> bool) -> Vec<Action> {
            self.poll(now_ms, have)
                .into_iter()
                .filter(|a| !matches!(a, Action::Reveal { .. }))
                .collect()
        }
    }

    /// Commit-then-reveal: a peer reveals once every expected contributor has committed (or at
    /// the deadline); a commitment after that is left out of its close, and one to a blob
    /// another author committed is refused as a copy; a replayed blob is refused as stale.
    #[test]
    fn blobs_are_revealed_after_the_commitments_and_copies_or_replays_are_refused() {
        let (a, b, c) = (key(1), key(2), key(3));
        let (pa, pb, pc) = (peer(1), peer(2), peer(3));
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        engine
            .on_state(model_state(0, [0; 32], [0; 32], 1, pb), pb)
            .expect("taken");
        engine
            .on_state(model_state(0, [0; 32], [0; 32], 1, pc), pc)
            .expect("taken");
        let all = |_: &BlobHash| true;
        engine
            .on_commit(commit(JOB, 1, &a, b"a1"), 0)
            .expect("taken");
        engine
            .on_commit(commit(JOB, 1, &b, b"b1"), 0)
            .expect("taken");
        assert!(
            !engine
                .poll(10, &all)
                .iter()
                .any(|x| matches!(x, Action::Reveal { .. })),
            "c has not committed yet"
        );
        engine
            .on_commit(commit(JOB, 1, &c, b"c1"), 20)
            .expect("taken");
        let actions = engine.poll(20, &all);
        assert_eq!(actions[0], Action::Reveal { round: 1 });
        engine.applied(1, [1; 32]);
        // Round 2: c commits only after the reveal, with a copy of b's blob; b replays the blob
        // of round 1 and is refused at once.
        engine
            .on_commit(commit(JOB, 2, &a, b"a2"), 100)
            .expect("taken");
        assert_eq!(
            engine.on_commit(commit(JOB, 2, &b, b"b1"), 100),
            Err(RoundRejected::Stale(1))
        );
        let none = |_: &BlobHash| false;
        let actions = engine.poll(100 + 1_000, &none);
        assert_eq!(
            actions,
            vec![Action::Reveal { round: 2 }],
            "deadline passed"
        );
        assert_eq!(
            engine.on_commit(commit(JOB, 2, &c, b"a2"), 1_200),
            Err(RoundRejected::Copy)
        );
        let actions = engine.poll_t(5_000, &all);
        let Some(Action::Apply {
            contributions,
            refused,
            evidence,
            ..
        }) = actions.last()
        else {
            panic!("{actions:?}");
        };
        assert_eq!(contributions.len(), 1, "only a's own contribution");
        assert_eq!(refused.len(), 2, "{refused:?}");
        // The round's ledger result can back every contributor it pays or slashes with the
        // author's own signed commitment to the round.
        let backed: Vec<PeerKey> = evidence
            .iter()
            .map(|(author, signed)| {
                let commitment = signed.verify().expect("evidence verifies");
                assert_eq!(commitment.author, *author);
                assert_eq!(commitment.round, 2);
                commitment.author
            })
            .collect();
        assert_eq!(backed.len(), 3, "a's own, b's replay and c's copy");
        assert!(backed.contains(&pb) && backed.contains(&pc));
        assert!(
            refused
                .iter()
                .any(|(k, r)| *k == pb && r.starts_with("stale"))
        );
        assert!(
            refused
                .iter()
                .any(|(k, r)| *k == pc && r.starts_with("copy"))
        );
        assert_eq!(engine.counters().stale_commitments, 1);
        assert_eq!(engine.counters().copied_commitments, 1);
    }

    /// A blob first seen in a late commitment or only inside a close is remembered all the
    /// same: committing it again in a later round is a replay.
    #[test]
    fn replays_of_late_commitments_and_of_blobs_seen_only_in_a_close_are_stale() {
        let (a, b, c) = (key(1), key(2), key(3));
        let pc = c.verifying_key().to_bytes();
        let mut engine = RoundEngine::new(config(), JOB, a.verifying_key().to_bytes(), 0, true);
        engine
            .on_commit(commit(JOB, 1, &a, b"a1"), 0)
            .expect("taken");
        engine.applied(1, [1; 32]);
        assert_eq!(
            engine.on_commit(commit(JOB, 1, &b, b"b1"), 10),
            Err(RoundRejected::Late { round: 1 })
        );
        assert_eq!(
            engine.on_commit(commit(JOB, 2, &b, b"b1"), 20),
            Err(RoundRejected::Stale(1))
        );
        let close = RoundClose {
            job_id: JOB,
            round: 2,
            proposer: pc,
            commitments: vec![commit(JOB, 2, &c, b"c2")],
            refused: Vec::new(),
        };
        let all = |_: &BlobHash| true;
        engine.on_close(close, pc, &all, 30).expect("taken");
        engine.applied(2, [2; 32]);
        assert_eq!(
            engine.on_commit(commit(JOB, 3, &c, b"c2"), 40),
            Err(RoundRejected::Stale(2))
        );
        assert_eq!(engine.counters().stale_commitments, 2);
    }

    /// A close that lists a copy of a blob this peer saw another author commit in the round is
    /// refused, even when this peer never received the copy's own commitment.
    #[test]
    fn a_close_listing_a_copy_of_a_commitment_seen_here_is_refused() {
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        let pc = c.verifying_key().to_bytes();
        let mut engine = RoundEngine::new(config(), JOB, d.verifying_key().to_bytes(), 0, true);
        engine
            .on_commit(commit(JOB, 1, &a, b"a1"), 0)
            .expect("taken");
        let all = |_: &BlobHash| true;
        let close = |commitments| RoundClose {
            job_id: JOB,
            round: 1,
            proposer: pc,
            commitments,
            refused: Vec::new(),
        };
        assert_eq!(
            engine.on_close(close(vec![commit(JOB, 1, &b, b"a1")]), pc, &all, 10),
            Err(RoundRejected::BadClose("lists a refused contribution"))
        );
        // The original itself is fine, and so is a copy's commitment refused on arrival.
        assert_eq!(
            engine.on_commit(commit(JOB, 1, &b, b"a1"), 20),
            Err(RoundRejected::Copy)
        );
        assert!(
            engine
                .on_close(close(vec![commit(JOB, 1, &a, b"a1")]), pc, &all, 30)
                .is_ok()
        );
    }

    fn model_state(
        round: u64,
        model_hash: ModelHash,
        snapshot_hash: BlobHash,
        snapshot_len: u64,
        author: PeerKey,
    ) -> ModelState {
        ModelState {
            job_id: JOB,
            round,
            model_hash,
            parent_hash: [0; 32],
            snapshot_hash,
            snapshot_len,
            author,
            accepted_digest: [0; 32],
        }
    }

    /// Three engines see the same commitments: exactly one proposes (the lowest rank), and the
    /// others accept its close.
    #[test]
    fn the_first_ranked_contributor_closes_and_everyone_applies_the_same_set() {
        let keys: Vec<SigningKey> = (1..=3).map(key).collect();
        let pks: Vec<PeerKey> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        let mut engines: Vec<RoundEngine> = pks
            .iter()
            .map(|pk| RoundEngine::new(config(), JOB, *pk, 0, true))
            .collect();
        let commits: Vec<SignedCommitment> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| commit(JOB, 1, k, &[i as u8; 10]))
            .collect();
        for engine in &mut engines {
            for c in &commits {
                engine.on_commit(c.clone(), 0).expect("valid commitment");
            }
        }
        let have = |_: &BlobHash| true;
        // Before the deadline nobody closes: the first round has no expected set.
        for engine in &mut engines {
            assert!(engine.poll_t(999, &have).is_empty());
        }
        let mut closes = Vec::new();
        for (i, engine) in engines.iter_mut().enumerate() {
            for action in engine.poll_t(1_000, &have) {
                if let Action::Publish(TrainMessage::Close(close)) = action {
                    closes.push((i, close));
                }
            }
        }
        assert_eq!(closes.len(), 1, "exactly one proposer at the deadline");
        let (proposer_index, close) = closes.remove(0);
        let mut applied = Vec::new();
        for (i, engine) in engines.iter_mut().enumerate() {
            if i == proposer_index {
                continue;
            }
            let actions = engine
                .on_close(close.clone(), pks[proposer_index], &have, 1_001)
                .expect("valid close");
            for action in actions {
                if let Action::Apply { contributions, .. } = action {
                    applied.push(contributions);
                }
            }
        }
        assert_eq!(applied.len(), 2);
        assert_eq!(applied[0], applied[1]);
        assert_eq!(applied[0].len(), 3);
    }

    #[test]
    fn with_the_previous_round_complete_the_round_closes_before_the_deadline() {
        let k = key(1);
        let pk = k.verifying_key().to_bytes();
        let mut engine = RoundEngine::new(config(), JOB, pk, 0, true);
        let have = |_: &BlobHash| true;
        engine.on_commit(commit(JOB, 1, &k, b"a"), 0).expect("ok");
        let actions = engine.poll_t(1_000, &have);
        assert!(matches!(actions[1], Action::Apply { round: 1, .. }));
        engine.applied(1, [1; 32]);
        // Round 2: the only expected peer (us) committed, so it closes at once.
        engine
            .on_commit(commit(JOB, 2, &k, b"b"), 5_000)
            .expect("ok");
        let actions = engine.poll_t(5_001, &have);
        assert!(matches!(
            actions.get(1),
            Some(Action::Apply { round: 2, .. })
        ));
    }

    #[test]
    fn the_first_round_waits_for_the_peers_that_announced_the_starting_model() {
        let (a, b) = (key(1), key(2));
        let (pa, pb) = (a.verifying_key().to_bytes(), b.verifying_key().to_bytes());
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        let state = model_state(0, [1; 32], [1; 32], 1, pb);
        assert!(engine.on_state(state, pb).expect("valid").is_empty());
        let have = |_: &BlobHash| true;
        engine.on_commit(commit(JOB, 1, &a, b"a"), 0).expect("ok");
        assert!(engine.poll_t(10, &have).is_empty(), "waits for b");
        engine.on_commit(commit(JOB, 1, &b, b"b"), 20).expect("ok");
        let actions = engine.poll_t(30, &have);
        let rank_a = engine.rank_of(1, &pa) as u64;
        if rank_a == 0 {
            assert!(matches!(
                actions.get(1),
                Some(Action::Apply { round: 1, .. })
            ));
        } else {
            assert!(actions.is_empty());
            let actions = engine.poll_t(30 + rank_a * 500, &have);
            assert!(matches!(
                actions.get(1),
                Some(Action::Apply { round: 1, .. })
            ));
        }
    }

    #[test]
    fn a_commitment_after_the_close_is_late_and_counted() {
        let (a, b) = (key(1), key(2));
        let mut engine = RoundEngine::new(config(), JOB, a.verifying_key().to_bytes(), 0, true);
        let have = |_: &BlobHash| true;
        engine.on_commit(commit(JOB, 1, &a, b"a"), 0).expect("ok");
        let _ = engine.poll_t(1_000, &have);
        let late = engine.on_commit(commit(JOB, 1, &b, b"b"), 1_001);
        assert_eq!(late, Err(RoundRejected::Late { round: 1 }));
        assert_eq!(engine.counters().late_contributions, 1);
    }

    #[test]
    fn a_close_is_not_applied_until_its_blobs_are_in_hand() {
        let (a, b) = (key(1), key(2));
        let (pa, pb) = (a.verifying_key().to_bytes(), b.verifying_key().to_bytes());
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        let close = RoundClose {
            job_id: JOB,
            round: 1,
            proposer: pb,
            commitments: vec![commit(JOB, 1, &b, b"blob")],
            refused: Vec::new(),
        };
        let none = |_: &BlobHash| false;
        let actions = engine.on_close(close, pb, &none, 0).expect("valid");
        assert!(matches!(actions[0], Action::Fetch { len: 4, .. }));
        let all = |_: &BlobHash| true;
        let actions = engine.poll_t(1, &all);
        assert!(matches!(actions[0], Action::Apply { round: 1, .. }));
    }

    #[test]
    fn forged_or_misattributed_messages_are_rejected() {
        let (a, b) = (key(1), key(2));
        let (pa, pb) = (a.verifying_key().to_bytes(), b.verifying_key().to_bytes());
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        let mut forged = commit(JOB, 1, &b, b"x");
        forged.signature[0] ^= 1;
        assert!(matches!(
            engine.on_commit(forged, 0),
            Err(RoundRejected::Contribution(_))
        ));
        let close = RoundClose {
            job_id: JOB,
            round: 1,
            proposer: pb,
            commitments: vec![commit(JOB, 1, &b, b"x")],
            refused: Vec::new(),
        };
        let have = |_: &BlobHash| true;
        assert!(matches!(
            engine.on_close(close, pa, &have, 0),
            Err(RoundRejected::BadClose(_))
        ));
        assert_eq!(
            engine.on_commit(commit([1; 32], 1, &b, b"x"), 0),
            Err(RoundRejected::OtherJob)
        );
    }

    #[test]
    fn when_the_first_close_cannot_be_applied_the_next_ranked_one_is() {
        let keys: Vec<SigningKey> = (1..=3).map(key).collect();
        let pks: Vec<PeerKey> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        let commits: Vec<SignedCommitment> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| commit(JOB, 1, k, &[i as u8; 4]))
            .collect();
        let me = pks[0];
        let mut engine = RoundEngine::new(config(), JOB, me, 0, true);
        for c in &commits {
            engine.on_commit(c.clone(), 0).expect("valid");
        }
        let mut by_rank: Vec<usize> = vec![1, 2];
        by_rank.sort_by_key(|&i| engine.rank_of(1, &pks[i]));
        let (first, second) = (by_rank[0], by_rank[1]);
        let none = |_: &BlobHash| false;
        let close_of = |i: usize| RoundClose {
            job_id: JOB,
            round: 1,
            proposer: pks[i],
            commitments: commits.clone(),
            refused: Vec::new(),
        };
        // The worse-ranked close arrives first, then the better one replaces it.
        engine
            .on_close(close_of(second), pks[second], &none, 1)
            .expect("valid");
        engine
            .on_close(close_of(first), pks[first], &none, 2)
            .expect("valid");
        engine.apply_failed();
        // The stored second close takes over; once its blobs are held it applies.
        let all = |_: &BlobHash| true;
        let actions = engine.poll_t(3, &all);
        assert!(
            matches!(&actions[0], Action::Apply { proposer, .. } if *proposer == pks[second]),
            "{actions:?}"
        );
        // The failed proposer's close is not taken again this round.
        engine.apply_failed();
        engine
            .on_close(close_of(first), pks[first], &none, 4)
            .expect("valid");
        assert!(!engine.is_closed());
    }

    #[test]
    fn a_peer_whose_hash_differs_from_the_proposers_resyncs() {
        let (a, b) = (key(1), key(2));
        let (pa, pb) = (a.verifying_key().to_bytes(), b.verifying_key().to_bytes());
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        let have = |_: &BlobHash| true;
        let close = RoundClose {
            job_id: JOB,
            round: 1,
            proposer: pb,
            commitments: vec![commit(JOB, 1, &b, b"x")],
            refused: Vec::new(),
        };
        let actions = engine.on_close(close, pb, &have, 0).expect("valid");
        assert!(matches!(actions[0], Action::Apply { .. }));
        engine.applied(1, [1; 32]);
        let state = model_state(1, [2; 32], [3; 32], 100, pb);
        assert!(engine.on_state(state, pb).expect("valid").is_empty());
        assert_eq!(engine.counters().hash_mismatches, 1);
        // Weighed once the round's states had time to arrive: nobody else holds this peer's
        // model, the proposer holds its own.
        let none = |_: &BlobHash| false;
        assert!(engine.poll(10, &none).is_empty());
        assert!(engine.poll(500, &none).is_empty(), "still settling");
        let actions = engine.poll(10 + TIP_SETTLE_MS, &none);
        assert!(
            matches!(actions[..], [Action::Resync { round: 1, model_hash, .. }] if model_hash == [2; 32]),
            "{actions:?}"
        );
        engine.resynced(1, [2; 32]);
        assert_eq!(engine.current_round(), 2);
    }

    /// Applies round `round` through a close by `proposer` of the given contributors, with
    /// resulting model `hash`.
    fn apply_round(
        engine: &mut RoundEngine,
        round: u64,
        proposer: &SigningKey,
        contributors: &[&SigningKey],
        hash: ModelHash,
    ) {
        let close = RoundClose {
            job_id: JOB,
            round,
            proposer: proposer.verifying_key().to_bytes(),
            commitments: contributors
                .iter()
                .map(|k| commit(JOB, round, k, &[round as u8, k.to_bytes()[0]]))
                .collect(),
            refused: Vec::new(),
        };
        let have = |_: &BlobHash| true;
        let actions = engine
            .on_close(close, proposer.verifying_key().to_bytes(), &have, 0)
            .expect("valid close");
        assert!(
            actions.iter().any(|a| matches!(a, Action::Apply { .. })),
            "{actions:?}"
        );
        engine.applied(round, hash);
    }

    /// A replay that arrives after its round closed is still refused as stale, and its author
    /// is not waited for in the next round as a slow contributor would be; a refused
    /// contributor does not hold the reveal back until the deadline either.
    #[test]
    fn a_late_replay_is_refused_and_not_waited_for() {
        let (a, b, c) = (key(1), key(2), key(3));
        let (pa, pb, pc) = (peer(1), peer(2), peer(3));
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        apply_round(&mut engine, 1, &a, &[&a, &b, &c], [1; 32]);
        engine
            .on_commit(commit(JOB, 2, &a, b"a2"), 0)
            .expect("taken");
        engine
            .on_commit(commit(JOB, 2, &c, b"c2"), 0)
            .expect("taken");
        let close = RoundClose {
            job_id: JOB,
            round: 2,
            proposer: pc,
            commitments: vec![commit(JOB, 2, &a, b"a2"), commit(JOB, 2, &c, b"c2")],
            refused: Vec::new(),
        };
        let have = |_: &BlobHash| true;
        engine.on_close(close, pc, &have, 10).expect("valid");
        // b replays its round-1 blob after the close.
        assert_eq!(
            engine.on_commit(commit(JOB, 2, &b, &[1, b.to_bytes()[0]]), 20),
            Err(RoundRejected::Stale(1))
        );
        assert_eq!(engine.counters().stale_commitments, 1);
        assert_eq!(engine.counters().late_contributions, 0);
        // Handed to the driver for the round's report.
        let late = engine.take_late_refusals();
        assert!(
            matches!(&late[..], [(2, author, reason, _)] if *author == pb && reason.starts_with("stale")),
            "{late:?}"
        );
        assert!(engine.take_late_refusals().is_empty());
        engine.applied(2, [2; 32]);
        assert!(!engine.expected_contributors().contains(&pb));
        // Round 3: c's commitment is a copy of a's, refused; a reveals at once.
        engine
            .on_commit(commit(JOB, 3, &a, b"a3"), 30)
            .expect("taken");
        assert_eq!(
            engine.on_commit(commit(JOB, 3, &c, b"a3"), 30),
            Err(RoundRejected::Copy)
        );
        let none = |_: &BlobHash| false;
        assert!(
            engine
                .poll(40, &none)
                .iter()
                .any(|x| matches!(x, Action::Reveal { round: 3 })),
            "not held back until the deadline by the refused contributor"
        );
    }

    /// The lineage of an announced model walks back through the announced parents, each
    /// round with the accepted-set digest most of its announcers gave (an author counts once,
    /// for its latest digest), and stops where a parent was not heard.
    #[test]
    fn the_announced_lineage_carries_each_rounds_majority_digest() {
        let pks: Vec<PeerKey> = (1..=4).map(|i| key(i).verifying_key().to_bytes()).collect();
        let mut engine = RoundEngine::new(config(), JOB, pks[3], 0, true);
        let announce = |engine: &mut RoundEngine, round: u64, parent, digest, author: PeerKey| {
            let mut state = model_state(round, [round as u8; 32], [round as u8; 32], 100, author);
            state.parent_hash = parent;
            state.accepted_digest = digest;
            engine.on_state(state, author).expect("valid");
        };
        // Round 1 (parent unknown), round 2 on it: two announcers give one digest, a third
        // another; round 3 on round 2, from a peer that resynced (no digest) and one that closed.
        announce(&mut engine, 1, [0; 32], [11; 32], pks[0]);
        announce(&mut engine, 2, [1; 32], [22; 32], pks[0]);
        announce(&mut engine, 2, [1; 32], [20; 32], pks[1]);
        announce(&mut engine, 2, [1; 32], [22; 32], pks[1]);
        announce(&mut engine, 2, [1; 32], [21; 32], pks[2]);
        announce(&mut engine, 3, [2; 32], [0; 32], pks[1]);
        announce(&mut engine, 3, [2; 32], [33; 32], pks[0]);
        assert_eq!(
            engine.announced_lineage(3, [3; 32]),
            vec![
                (3, [3; 32], [33; 32]),
                (2, [2; 32], [22; 32]),
                (1, [1; 32], [11; 32])
            ]
        );
        assert_eq!(
            engine.announced_lineage(2, [9; 32]),
            Vec::new(),
            "a model not heard"
        );
    }

    /// A peer that closed a round alone (the others were slower than its deadlines) and ran
    /// ahead on its own model comes back to the branch the rest of that round's contributors
    /// are on, rolling its rounds back, and its commitments of the abandoned rounds are dropped.
    #[test]
    fn a_peer_that_ran_ahead_alone_rolls_back_to_the_majority_branch() {
        let keys: Vec<SigningKey> = (1..=4).map(key).collect();
        let pks: Vec<PeerKey> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        let me = &keys[3];
        let mut engine = RoundEngine::new(config(), JOB, pks[3], 0, true);
        let all: Vec<&SigningKey> = keys.iter().collect();
        apply_round(&mut engine, 1, &keys[0], &all, [1; 32]);
        // Rounds 2 to 4 alone.
        for round in 2..=4 {
            apply_round(&mut engine, round, me, &[me], [10 + round as u8; 32]);
        }
        engine
            .on_commit(commit(JOB, 5, me, b"solo 5"), 0)
            .expect("own commitment");
        assert_eq!(engine.current_round(), 5);
        // The others announce round 2 and 3 of their branch, built on round 1.
        let announce = |engine: &mut RoundEngine, round: u64, hash, parent, author: PeerKey| {
            let mut state = model_state(round, hash, [round as u8; 32], 100, author);
            state.parent_hash = parent;
            engine.on_state(state, author).expect("valid");
        };
        for author in &pks[..3] {
            announce(&mut engine, 2, [2; 32], [1; 32], *author);
            announce(&mut engine, 3, [3; 32], [2; 32], *author);
        }
        let none = |_: &BlobHash| false;
        let first = engine.poll_t(100, &none);
        assert!(first.is_empty(), "the winner must hold: {first:?}");
        let actions = engine.poll_t(100 + TIP_SETTLE_MS, &none);
        assert!(
            matches!(actions[..], [Action::Resync { round: 3, model_hash, .. }] if model_hash == [3; 32]),
            "{actions:?}"
        );
        assert_eq!(engine.counters().majority_resyncs, 1);
        engine.resynced(3, [3; 32]);
        assert_eq!(engine.current_round(), 4, "rolled back");
        // Its commitment of round 5, made on its own branch, is gone: a new one is taken.
        assert!(engine.on_commit(commit(JOB, 5, me, b"main 5"), 0).is_ok());
        // The others, on the majority branch, do not move: the lone peer's rounds count for
        // one contributor against three.
        let mut other = RoundEngine::new(config(), JOB, pks[0], 0, true);
        apply_round(&mut other, 1, &keys[0], &all, [1; 32]);
        apply_round(&mut other, 2, &keys[0], &all[..3], [2; 32]);
        apply_round(&mut other, 3, &keys[0], &all[..3], [3; 32]);
        for author in &pks[1..3] {
            announce(&mut other, 2, [2; 32], [1; 32], *author);
        }
        announce(&mut other, 2, [12; 32], [1; 32], pks[3]);
        announce(&mut other, 3, [13; 32], [12; 32], pks[3]);
        announce(&mut other, 4, [14; 32], [13; 32], pks[3]);
        assert!(other.poll(100, &none).is_empty());
        assert!(other.poll(100 + TIP_SETTLE_MS, &none).is_empty());
        assert_eq!(other.counters().resyncs, 0);
    }

    /// The proposer of the close everyone applied announces a model the close does not yield
    /// (with a snapshot to match): the contributors that computed the close's model together
    /// keep it, and the lie is counted.
    #[test]
    fn a_proposer_announcing_a_model_its_close_does_not_yield_pulls_nobody_with_company() {
        let keys: Vec<SigningKey> = (1..=3).map(key).collect();
        let pks: Vec<PeerKey> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        let (me, other, liar) = (pks[0], pks[1], pks[2]);
        let mut engine = RoundEngine::new(config(), JOB, me, 0, true);
        let have = |_: &BlobHash| true;
        let close = RoundClose {
            job_id: JOB,
            round: 1,
            proposer: liar,
            commitments: keys
                .iter()
                .map(|k| commit(JOB, 1, k, &k.to_bytes()))
                .collect(),
            refused: Vec::new(),
        };
        let actions = engine.on_close(close, liar, &have, 0).expect("valid");
        assert!(matches!(actions[0], Action::Apply { .. }));
        engine.applied(1, [1; 32]);
        assert!(
            engine
                .on_state(model_state(1, [1; 32], [4; 32], 100, other), other)
                .expect("valid")
                .is_empty()
        );
        assert!(
            engine
                .on_state(model_state(1, [6; 32], [7; 32], 100, liar), liar)
                .expect("valid")
                .is_empty()
        );
        let none = |_: &BlobHash| false;
        assert!(engine.poll(10, &none).is_empty());
        let actions = engine.poll(10 + TIP_SETTLE_MS, &none);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Resync { .. })),
            "{actions:?}"
        );
        assert_eq!(engine.counters().divergences_refused, 1);
        assert_eq!(engine.counters().resyncs, 0);
    }

    #[test]
    fn a_proposer_that_closed_alongside_a_better_ranked_one_resyncs_to_it() {
        let keys: Vec<SigningKey> = (1..=3).map(key).collect();
        let pks: Vec<PeerKey> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        let commits: Vec<SignedCommitment> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| commit(JOB, 1, k, &[i as u8; 4]))
            .collect();
        // Find a peer that is not the best-ranked: it will close on its own, then hear the
        // better-ranked proposer's close and state.
        let probe = RoundEngine::new(config(), JOB, pks[0], 0, true);
        let mut order: Vec<usize> = (0..3).collect();
        let mut probe = probe;
        for c in &commits {
            probe.on_commit(c.clone(), 0).expect("valid");
        }
        order.sort_by_key(|&i| probe.rank_of(1, &pks[i]));
        let (best, worse) = (order[0], order[1]);
        let mut engine = RoundEngine::new(config(), JOB, pks[worse], 0, true);
        for c in &commits {
            engine.on_commit(c.clone(), 0).expect("valid");
        }
        let all = |_: &BlobHash| true;
        // At the deadline it reveals; past its turn (one grace later) it closes and applies its
        // own set.
        assert!(engine.poll_t(1_000, &all).is_empty());
        let actions = engine.poll_t(1_000 + 500, &all);
        assert!(
            matches!(actions.get(1), Some(Action::Apply { .. })),
            "{actions:?}"
        );
        engine.applied(1, [1; 32]);
        assert!(
            !engine.confirmed(1),
            "its own close, not the first ranked, nobody agreeing yet"
        );
        let third = order[2];
        engine
            .on_state(model_state(1, [1; 32], [1; 32], 10, pks[third]), pks[third])
            .expect("valid");
        assert!(engine.confirmed(1), "another peer applied the same model");
        // The better-ranked close arrives late, then its proposer's state with another hash.
        let close = RoundClose {
            job_id: JOB,
            round: 1,
            proposer: pks[best],
            commitments: commits.clone(),
            refused: Vec::new(),
        };
        engine
            .on_close(close, pks[best], &all, 1_600)
            .expect("valid");
        assert_eq!(engine.round_proposer(1), Some(pks[best]));
        assert!(
            !engine.confirmed(1),
            "the better-ranked proposer has not confirmed it"
        );
        let state = model_state(1, [2; 32], [2; 32], 10, pks[best]);
        let actions = engine.on_state(state, pks[best]).expect("valid");
        assert!(
            matches!(actions[0], Action::Resync { round: 1, .. }),
            "{actions:?}"
        );
        assert_eq!(engine.counters().hash_mismatches, 1);
        assert!(!engine.confirmed(1), "a resync is under way");
        engine.resynced(1, [2; 32]);
        assert!(engine.confirmed(1), "the proposer's model, now held");
    }

    #[test]
    fn a_joiner_resyncs_from_the_newest_state() {
        let (a, b) = (key(1), key(2));
        let (pa, pb) = (a.verifying_key().to_bytes(), b.verifying_key().to_bytes());
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, false);
        let state = model_state(7, [2; 32], [3; 32], 100, pb);
        let actions = engine.on_state(state, pb).expect("valid");
        assert!(matches!(actions[0], Action::Resync { round: 7, .. }));
        engine.resynced(7, [2; 32]);
        assert!(engine.is_synced());
        assert_eq!(engine.current_round(), 8);
    }

    /// A synced peer does not follow one peer that ran ahead alone, but does follow a state
    /// ahead of it that a majority of its last round's contributors announce.
    #[test]
    fn a_state_ahead_is_followed_only_when_a_majority_holds_it() {
        let keys: Vec<SigningKey> = (1..=3).map(key).collect();
        let pks: Vec<PeerKey> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
        let mut engine = RoundEngine::new(config(), JOB, pks[0], 0, true);
        let all = |_: &BlobHash| true;
        for (i, k) in keys.iter().enumerate() {
            engine
                .on_commit(commit(JOB, 1, k, &[i as u8; 3]), 0)
                .expect("valid");
        }
        engine.poll_t(1_000, &all);
        engine.poll_t(1_000 + 1_000, &all);
        engine.applied(1, [1; 32]);
        assert_eq!(engine.current_round(), 2);
        let ahead = |author: PeerKey| model_state(5, [5; 32], [5; 32], 10, author);
        assert!(
            engine
                .on_state(ahead(pks[2]), pks[2])
                .expect("valid")
                .is_empty(),
            "one peer alone is not followed"
        );
        let actions = engine.on_state(ahead(pks[1]), pks[1]).expect("valid");
        assert!(
            matches!(actions.first(), Some(Action::Resync { round: 5, .. })),
            "{actions:?}"
        );
    }

    /// Applies rounds `rounds` closed by `proposer` (one contribution of its own each), with
    /// model hashes `[round; 32]` offset by `branch`.
    fn apply_own_branch(
        engine: &mut RoundEngine,
        proposer: &SigningKey,
        rounds: std::ops::RangeInclusive<u64>,
        branch: u8,
    ) {
        let pk = proposer.verifying_key().to_bytes();
        let all = |_: &BlobHash| true;
        for round in rounds {
            let close = RoundClose {
                job_id: JOB,
                round,
                proposer: pk,
                commitments: vec![commit(JOB, round, proposer, &[round as u8, branch])],
                refused: Vec::new(),
            };
            let actions = engine.on_close(close, pk, &all, 0).expect("valid");
            assert!(
                matches!(actions.last(), Some(Action::Apply { .. })),
                "{actions:?}"
            );
            engine.applied(round, [round as u8 + branch; 32]);
        }
    }

    /// The states of another branch, rounds `rounds`, each built on the one before (hashes
    /// `[round + branch; 32]`), announced by `authors`.
    fn announce_branch(
        engine: &mut RoundEngine,
        authors: &[PeerKey],
        rounds: std::ops::RangeInclusive<u64>,
        branch: u8,
    ) {
        for round in rounds {
            let hash = [round as u8 + branch; 32];
            let parent = if round == 1 {
                [0; 32]
            } else {
                [round as u8 - 1 + branch; 32]
            };
            for author in authors {
                let mut state = model_state(round, hash, hash, 100, *author);
                state.parent_hash = parent;
                engine.on_state(state, *author).expect("valid");
            }
        }
    }

    /// Two groups trained apart for rounds (a partition longer than a round): the ledger's
    /// newest recorded round decides, and the peer on the other branch resyncs to the newest
    /// state built on the recorded model, then follows no state of its old branch.
    #[test]
    fn a_peer_off_the_recorded_branch_resyncs_to_its_newest_state() {
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        let pa = a.verifying_key().to_bytes();
        let (pb, pc, pd) = (
            b.verifying_key().to_bytes(),
            c.verifying_key().to_bytes(),
            d.verifying_key().to_bytes(),
        );
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        apply_own_branch(&mut engine, &b, 1..=3, 0);
        announce_branch(&mut engine, &[pc, pd], 1..=4, 100);
        // The other group contributes to the next round: the mend brought their commitments.
        for signer in [&c, &d] {
            let blob = [5, signer.verifying_key().to_bytes()[0]];
            engine
                .on_commit(commit(JOB, 5, signer, &blob), 0)
                .expect("valid");
        }
        assert!(
            engine.poll(0, &|_| true).is_empty(),
            "no tip yet: nothing to follow"
        );
        engine.on_recorded(2, [102; 32], 0);
        assert!(
            engine.poll(999, &|_| true).is_empty(),
            "the round's states are waited for"
        );
        let actions = engine.poll(1_000, &|_| true);
        match actions.as_slice() {
            [
                Action::Resync {
                    round: 4,
                    model_hash,
                    snapshot_hash,
                    from,
                    ..
                },
            ] => {
                assert_eq!(*model_hash, [104; 32]);
                assert_eq!(*snapshot_hash, [104; 32]);
                assert_eq!(
                    from,
                    &vec![pc, pd]
                        .into_iter()
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect::<Vec<_>>()
                );
            }
            other => panic!("expected a resync to round 4, got {other:?}"),
        }
        assert_eq!(engine.counters().ledger_resyncs, 1);
        engine.on_recorded(1, [101; 32], 0);
        assert_eq!(
            engine.ledger_tip(),
            Some((2, [102; 32])),
            "older than the tip"
        );
        engine.resynced(4, [104; 32]);
        assert_eq!(engine.current_round(), 5);
        assert_eq!(engine.parent_hash(4), [103; 32], "the announced parent");
        // One peer of its old branch announcing round 4 built on that branch does not pull it
        // back.
        let mut old = model_state(4, [4; 32], [4; 32], 100, pb);
        old.parent_hash = [3; 32];
        assert!(engine.on_state(old, pb).expect("valid").is_empty());
        assert!(
            engine.poll(0, &|_| true).is_empty(),
            "on the tip's branch now"
        );
        assert_eq!(engine.counters().ledger_resyncs, 1);
    }

    /// The close of `round` by `proposer` accepting one contribution per signer.
    fn close_of(round: u64, proposer: &SigningKey, contributors: &[&SigningKey]) -> RoundClose {
        RoundClose {
            job_id: JOB,
            round,
            proposer: proposer.verifying_key().to_bytes(),
            commitments: contributors
                .iter()
                .map(|k| commit(JOB, round, k, &[round as u8, k.to_bytes()[0]]))
                .collect(),
            refused: Vec::new(),
        }
    }

    /// The round chain decided another close of a round this peer applied: it resyncs onto the
    /// decided branch once that branch is announced, and refuses the decided round's other
    /// closes.
    #[test]
    fn a_peer_that_applied_another_close_than_the_decided_one_resyncs_onto_it() {
        let (a, b, c) = (key(1), key(2), key(3));
        let (pa, pc) = (a.verifying_key().to_bytes(), c.verifying_key().to_bytes());
        let all = |_: &BlobHash| true;
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        apply_round(&mut engine, 1, &a, &[&a, &b, &c], [1; 32]);
        // Round 2: this peer applied b's close of {a, b}; the chain decided c's of {a, b, c}.
        let mine = close_of(2, &b, &[&a, &b]);
        engine
            .on_close(mine.clone(), b.verifying_key().to_bytes(), &all, 0)
            .expect("valid");
        engine.applied(2, [2; 32]);
        assert_eq!(
            engine.applied_close(2).map(close_content),
            Some(close_content(&mine)),
            "kept with its commitments in canonical order"
        );
        assert_eq!(
            engine.chain_committee(2),
            Some([pa, b.verifying_key().to_bytes(), pc].into_iter().collect()),
            "the contributors of round 1"
        );
        let decided = close_of(2, &c, &[&a, &b, &c]);
        assert!(engine.on_decided(decided.clone(), 0, &all).is_empty());
        assert_eq!(engine.counters().chain_overruled, 1);
        // The decided branch: round 2's model (digest of {a, b, c}) and round 3 on it.
        let digest = crate::ledger::accepted_digest([pa, b.verifying_key().to_bytes(), pc].iter());
        let mut state = model_state(2, [22; 32], [22; 32], 100, pc);
        state.parent_hash = [1; 32];
        state.accepted_digest = digest;
        engine.on_state(state, pc).expect("valid");
        let mut next = model_state(3, [33; 32], [33; 32], 100, pc);
        next.parent_hash = [22; 32];
        engine.on_state(next, pc).expect("valid");
        match engine.poll(0, &all).as_slice() {
            [
                Action::Resync {
                    round: 3,
                    model_hash,
                    ..
                },
            ] => assert_eq!(*model_hash, [33; 32]),
            other => panic!("expected a resync onto the decided branch, got {other:?}"),
        }
        assert_eq!(engine.counters().chain_resyncs, 1);
        engine.resynced(3, [33; 32]);
        assert!(engine.poll(0, &all).is_empty(), "on the decided branch");
        // Another close of the decided round is not taken.
        assert!(
            engine
                .on_close(mine, b.verifying_key().to_bytes(), &all, 0)
                .expect("ignored")
                .is_empty()
        );
    }

    /// A decided close listing a copy this peer refused is neither taken nor followed: no close,
    /// decided or not, brings a contribution this peer refused into its model.
    #[test]
    fn a_decided_close_listing_a_refused_copy_is_not_taken() {
        let (a, b, c) = (key(1), key(2), key(3));
        let pa = a.verifying_key().to_bytes();
        let all = |_: &BlobHash| true;
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        apply_round(&mut engine, 1, &a, &[&a, &b, &c], [1; 32]);
        let original = commit(JOB, 2, &b, &[2, 2]);
        let copy = commit(JOB, 2, &c, &[2, 2]);
        engine.on_commit(original.clone(), 0).expect("b's own");
        assert!(
            engine.on_commit(copy.clone(), 0).is_err(),
            "refused as a copy"
        );
        let mine = commit(JOB, 2, &a, &[2, 1]);
        let decided = RoundClose {
            job_id: JOB,
            round: 2,
            proposer: c.verifying_key().to_bytes(),
            commitments: vec![mine.clone(), copy],
            refused: Vec::new(),
        };
        let actions = engine.on_decided(decided, 0, &all);
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Apply { .. })),
            "{actions:?}"
        );
        // The fast path's close of the round is still taken, and the decision not followed.
        let close = RoundClose {
            job_id: JOB,
            round: 2,
            proposer: b.verifying_key().to_bytes(),
            commitments: vec![mine, original],
            refused: Vec::new(),
        };
        let actions = engine
            .on_close(close, b.verifying_key().to_bytes(), &all, 0)
            .expect("valid");
        assert!(actions.iter().any(|a| matches!(a, Action::Apply { .. })));
        engine.applied(2, [2; 32]);
        assert!(engine.poll(0, &all).is_empty());
        assert_eq!(engine.counters().chain_overruled, 0);
    }

    /// A peer that loaded a model by another rule (here: a joiner taking the newest state) whose
    /// announced lineage gives another accepted set for a decided round moves to the decided
    /// branch, whether the decision came before or after the load.
    #[test]
    fn a_loaded_model_off_a_decided_round_is_left_for_the_decided_branch() {
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        let (pa, pb, pc) = (
            a.verifying_key().to_bytes(),
            b.verifying_key().to_bytes(),
            c.verifying_key().to_bytes(),
        );
        let all = |_: &BlobHash| true;
        let decided = close_of(2, &b, &[&a, &b, &c]);
        let decided_digest = crate::ledger::accepted_digest([pa, pb, pc].iter());
        let other_digest = crate::ledger::accepted_digest([pa, pb].iter());
        for decision_first in [true, false] {
            let me = d.verifying_key().to_bytes();
            let mut engine = RoundEngine::new(config(), JOB, me, 0, true);
            // Round 2's two branches: [20] from {a, b} (announced by b), [30] from {a, b, c}
            // (announced by c).
            for (hash, digest, author) in
                [([20; 32], other_digest, pb), ([30; 32], decided_digest, pc)]
            {
                let mut state = model_state(2, hash, hash, 100, author);
                state.parent_hash = [1; 32];
                state.accepted_digest = digest;
                engine.on_state(state, author).expect("valid");
            }
            if decision_first {
                engine.on_decided(decided.clone(), 0, &all);
            }
            // Loaded [20] (the rule that chose it does not matter here).
            engine.resynced(2, [20; 32]);
            if !decision_first {
                engine.on_decided(decided.clone(), 0, &all);
            }
            match engine.poll(0, &all).as_slice() {
                [
                    Action::Resync {
                        round: 2,
                        model_hash,
                        ..
                    },
                ] => assert_eq!(*model_hash, [30; 32], "decision first: {decision_first}"),
                other => panic!("decision first: {decision_first}: {other:?}"),
            }
            engine.resynced(2, [30; 32]);
            assert!(engine.poll(0, &all).is_empty(), "on the decided branch");
            assert_eq!(engine.counters().chain_resyncs, 1);
        }
    }

    /// Once the round chain decided the close this peer applied, a better-ranked close of the
    /// round heard later, and its proposer's model, pull it nowhere (before the chain, the
    /// rank-key rule loaded that proposer's snapshot at once).
    #[test]
    fn a_decided_round_is_not_reopened_by_a_better_ranked_close() {
        let (a, b, c) = (key(1), key(2), key(3));
        let pa = a.verifying_key().to_bytes();
        let all = |_: &BlobHash| true;
        // The better-ranked of b and c closes second.
        let rank = |k: &SigningKey| proposer_rank_key(&JOB, 2, &k.verifying_key().to_bytes());
        let (worse, better) = if rank(&b) < rank(&c) {
            (&c, &b)
        } else {
            (&b, &c)
        };
        for decision_first in [true, false] {
            let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
            apply_round(&mut engine, 1, &a, &[&a, &b, &c], [1; 32]);
            let mine = close_of(2, worse, &[&a, &b, &c]);
            engine
                .on_close(mine.clone(), worse.verifying_key().to_bytes(), &all, 0)
                .expect("valid");
            engine.applied(2, [2; 32]);
            let theirs = close_of(2, better, &[&a, better]);
            let pbetter = better.verifying_key().to_bytes();
            if decision_first {
                engine.on_decided(mine.clone(), 0, &all);
            }
            engine
                .on_close(theirs, pbetter, &all, 0)
                .expect("taken or ignored");
            if !decision_first {
                engine.on_decided(mine.clone(), 0, &all);
            }
            let mut state = model_state(2, [99; 32], [99; 32], 100, pbetter);
            state.parent_hash = [1; 32];
            let actions = engine.on_state(state, pbetter).expect("valid");
            assert!(
                actions.is_empty(),
                "decision first: {decision_first}: {actions:?}"
            );
            assert!(engine.poll(10_000, &all).is_empty());
            assert!(engine.confirmed(2));
            assert_eq!(engine.counters().chain_overruled, 0);
        }
    }

    /// A peer that has not closed the round takes the decided close, whoever closed it and
    /// whatever other close it holds, and refuses the round's other closes afterwards.
    #[test]
    fn a_decided_close_replaces_the_close_a_peer_has_not_applied() {
        let (a, b, c) = (key(1), key(2), key(3));
        let pa = a.verifying_key().to_bytes();
        let none = |_: &BlobHash| false;
        let all = |_: &BlobHash| true;
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        apply_round(&mut engine, 1, &a, &[&a, &b, &c], [1; 32]);
        let other = close_of(2, &b, &[&b]);
        // Its blobs are not in hand yet: the close waits.
        let actions = engine
            .on_close(other.clone(), b.verifying_key().to_bytes(), &none, 0)
            .expect("valid");
        assert!(actions.iter().all(|a| matches!(a, Action::Fetch { .. })));
        let decided = close_of(2, &c, &[&a, &b, &c]);
        let actions = engine.on_decided(decided.clone(), 0, &all);
        match actions.as_slice() {
            [
                Action::Apply {
                    round: 2,
                    contributions,
                    proposer,
                    ..
                },
            ] => {
                assert_eq!(contributions.len(), 3);
                assert_eq!(*proposer, c.verifying_key().to_bytes());
            }
            other => panic!("expected the decided close applied, got {other:?}"),
        }
        engine.applied(2, [2; 32]);
        assert_eq!(
            engine.applied_close(2).map(close_content),
            Some(close_content(&decided))
        );
        assert_eq!(engine.counters().chain_decided, 1);
        assert_eq!(engine.counters().chain_overruled, 0);
        assert!(engine.poll(0, &all).is_empty());
        assert_eq!(
            engine.chain_committee(3).map(|c| c.len()),
            Some(3),
            "round 2's decided contributors"
        );
        assert_eq!(engine.chain_committee(1), None, "the first round has none");
    }

    /// A byzantine coordinator recorded the round first with a model only it announces (its
    /// own close, which the others refused): the peers holding the other model do not follow.
    #[test]
    fn a_recorded_branch_only_its_recorder_announces_is_not_followed() {
        let (a, b, c, z) = (key(1), key(2), key(3), key(9));
        let pa = a.verifying_key().to_bytes();
        let (pc, pz) = (c.verifying_key().to_bytes(), z.verifying_key().to_bytes());
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        apply_own_branch(&mut engine, &b, 1..=3, 0);
        // b and c announce this peer's model of round 3; z its own.
        for author in [b.verifying_key().to_bytes(), pc] {
            let mut state = model_state(3, [3; 32], [3; 32], 100, author);
            state.parent_hash = [2; 32];
            engine.on_state(state, author).expect("valid");
        }
        let mut forged = model_state(3, [77; 32], [77; 32], 100, pz);
        forged.parent_hash = [2; 32];
        engine.on_state(forged, pz).expect("valid");
        engine
            .on_commit(commit(JOB, 4, &z, b"z4"), 0)
            .expect("z is a contributor");
        engine.on_recorded(3, [77; 32], 0);
        assert!(engine.poll(5_000, &|_| true).is_empty());
        assert_eq!(engine.counters().ledger_resyncs, 0);
    }

    /// A recorded round whose branch nobody announces at this peer's round any more is not
    /// rolled back to; a later recorded round of this peer's branch confirms it.
    #[test]
    fn a_recorded_branch_nobody_carries_is_not_rolled_back_to() {
        let (a, b, c) = (key(1), key(2), key(3));
        let pa = a.verifying_key().to_bytes();
        let pc = c.verifying_key().to_bytes();
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        apply_own_branch(&mut engine, &b, 1..=3, 0);
        announce_branch(&mut engine, &[pc], 1..=1, 100);
        engine.on_recorded(1, [101; 32], 0);
        assert!(engine.poll(5_000, &|_| true).is_empty());
        assert!(
            !engine.confirmed(1),
            "round 1 was recorded with another model"
        );
        engine.on_recorded(3, [3; 32], 0);
        assert!(engine.poll(5_000, &|_| true).is_empty());
        assert!(engine.confirmed(3), "the ledger recorded this peer's model");
        assert_eq!(engine.counters().ledger_resyncs, 0);
    }

    /// A close that lists a contribution this peer refused (a replay) is not applied.
    #[test]
    fn a_close_listing_a_refused_contribution_is_refused() {
        let (a, b, c) = (key(1), key(2), key(3));
        let (pa, pb) = (a.verifying_key().to_bytes(), b.verifying_key().to_bytes());
        let mut engine = RoundEngine::new(config(), JOB, pa, 0, true);
        let all = |_: &BlobHash| true;
        engine
            .on_commit(commit(JOB, 1, &b, b"b1"), 0)
            .expect("valid");
        engine
            .on_commit(commit(JOB, 1, &c, b"c1"), 0)
            .expect("valid");
        engine.poll_t(1_000, &all);
        engine
            .on_commit(commit(JOB, 1, &a, b"a1"), 1_000)
            .expect("valid");
        engine.poll_t(1_000, &all);
        engine.poll_t(5_000, &all);
        engine.applied(1, [1; 32]);
        let replay = commit(JOB, 2, &b, b"b1");
        assert_eq!(
            engine.on_commit(replay.clone(), 5_000),
            Err(RoundRejected::Stale(1))
        );
        let close = RoundClose {
            job_id: JOB,
            round: 2,
            proposer: pb,
            commitments: vec![replay],
            refused: Vec::new(),
        };
        assert_eq!(
            engine.on_close(close, pb, &all, 5_100),
            Err(RoundRejected::BadClose("lists a refused contribution"))
        );
    }

    #[test]
    fn training_messages_round_trip_and_are_bounded() {
        let a = key(1);
        let message = TrainMessage::Commit(commit(JOB, 1, &a, b"x"));
        let bytes = message.to_bytes();
        assert_eq!(TrainMessage::from_bytes(&bytes), Ok(message.clone()));
        assert_eq!(message.claimed_author(), Some(a.verifying_key().to_bytes()));
        let huge = vec![0u8; MAX_TRAIN_MESSAGE_BYTES + 1];
        assert!(matches!(
            TrainMessage::from_bytes(&huge),
            Err(WireError::TooLarge { .. })
        ));
    }
}
