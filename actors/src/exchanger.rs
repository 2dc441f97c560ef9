//! The GradientExchanger actor: runs one training job's rounds on this peer.
//!
//! A shell around [`RoundEngine`]: it asks the Trainer for this peer's update, compresses it
//! (top-k with error feedback, see [`loom_protocols::compress`]), stores the blob under its
//! blake3 hash, signs and gossips the commitment, serves the blob only once the round's expected
//! contributors have all committed (commit-then-reveal: nobody can copy an update it has not
//! committed before), fetches the blobs others commit (checking hash and size on receipt, trying
//! other holders on failure), screens the accepted set with the verifier's checks
//! ([`loom_protocols::verify`]) and aggregates what passes in canonical order (mean, trimmed
//! mean or coordinate-wise median), applies the outer step (DiLoCo's Nesterov or the `sync` AdamW) in
//! plain Rust so every peer's model is bit-identical, publishes the model hash and a snapshot,
//! writes checkpoints, and reports each round.
//!
//! Everything a remote peer can grow is bounded: fetches in flight, attempts per blob, the blob
//! store's bytes, and the engine's per-round maps.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use ed25519_dalek::SigningKey;
use loom_protocols::{
    PeerKey,
    blobstore::BlobStore,
    compress::{self, Codec},
    consensus::{ConsensusConfig, TimeoutKey},
    contribution::{self, BlobHash, Commitment, SignedCommitment},
    outer::{self, AdamWConfig, OuterConfig},
    robust,
    round::{
        Action, AuditVerdict, JobId, ModelHash, ModelState, RoundConfig, RoundEngine, TrainMessage,
    },
    round_chain::{ChainAction, RoundChain},
    snapshot::{OuterState, Snapshot},
    verify::{self, ScreeningConfig},
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use crate::{
    HeartbeatSigner, NetworkPort, ShardKey, StepReport, Topic, TrainerMsg,
    trainer::{LossCandidate, LossMeasured, Work},
    unix_ms,
};

/// A blob store shared with the network task, which serves it.
pub type SharedBlobs = Arc<std::sync::Mutex<BlobStore>>;

/// Most blob fetches in flight.
const MAX_INFLIGHT_FETCHES: usize = 256;
/// Attempts per blob before giving up on it (with backoff: about a minute in all).
const MAX_FETCH_ATTEMPTS: u32 = 20;
/// First retry delay after a failed fetch; doubles per attempt up to [`MAX_RETRY_DELAY_MS`].
const FIRST_RETRY_DELAY_MS: u64 = 100;
/// Longest retry delay.
const MAX_RETRY_DELAY_MS: u64 = 4_000;
/// How long a blob given up on is not asked for again.
const FAILED_QUARANTINE_MS: u64 = 10_000;
/// Most blobs remembered as given up on.
const MAX_FAILED: usize = 4096;
/// How long one fetch may take before another holder is tried.
const FETCH_TIMEOUT_MS: u64 = 30_000;
/// How often the engine is polled.
const TICK: Duration = Duration::from_millis(50);
/// How often the latest model state is announced again while no round completes.
const STATE_REPUBLISH_MS: u64 = 2_000;

/// How the job's peers combine their work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// Exchange a gradient every step; every peer applies the same AdamW step.
    Sync(AdamWConfig),
    /// DiLoCo: `inner_steps` local AdamW steps, then a Nesterov outer step on the averaged
    /// pseudo-gradient.
    Diloco {
        /// Inner steps per round (H).
        inner_steps: u32,
        /// Outer optimizer.
        outer: OuterConfig,
    },
}

/// How a round's accepted updates are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// The plain mean.
    #[default]
    Mean,
    /// Coordinate-wise mean without the `trim` largest and `trim` smallest values.
    TrimmedMean {
        /// Values dropped at each end.
        trim: usize,
    },
    /// Coordinate-wise median.
    Median,
}

/// Audits: a seeded sample of each round's contributions is recomputed by assigned verifiers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditConfig {
    /// Share of contributions audited (0 to 1).
    pub fraction: f64,
    /// Smallest cosine, on the transmitted coordinates, between a contribution and its
    /// recomputation.
    pub min_cosine: f64,
    /// Rounds a contributor that failed an audit is excluded for.
    pub exclusion_rounds: u64,
}

/// Most audits waiting on this peer.
const MAX_QUEUED_AUDITS: usize = 16;
/// Rounds of audit assignments remembered (to check the verdicts that arrive).
const AUDIT_ROUNDS_KEPT: u64 = 8;

/// A hasher over a domain tag and what identifies an audited contribution.
fn audit_hasher(
    tag: &[u8],
    job: &JobId,
    round: u64,
    subject: &PeerKey,
    model_hash: &BlobHash,
) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new();
    hasher.update(tag);
    hasher.update(job);
    hasher.update(&round.to_le_bytes());
    hasher.update(subject);
    hasher.update(model_hash);
    hasher
}

/// Whether `subject`'s contribution to `round` (after which the model hash is `model_hash`) is
/// audited: a draw from the hash of the round's outcome, which nobody knows when committing.
pub fn audit_sampled(
    job: &JobId,
    round: u64,
    subject: &PeerKey,
    model_hash: &BlobHash,
    fraction: f64,
) -> bool {
    let hasher = audit_hasher(b"loom/audit/v1\0", job, round, subject, model_hash);
    let draw = u64::from_le_bytes(
        hasher.finalize().as_bytes()[..8]
            .try_into()
            .unwrap_or([0; 8]),
    );
    (draw as f64) < fraction.clamp(0.0, 1.0) * u64::MAX as f64
}

/// The verifier assigned to `subject`'s contribution to `round`: among the round's other
/// accepted contributors, the one with the smallest draw.
pub fn audit_verifier(
    job: &JobId,
    round: u64,
    subject: &PeerKey,
    model_hash: &BlobHash,
    contributors: &[PeerKey],
) -> Option<PeerKey> {
    contributors
        .iter()
        .filter(|k| *k != subject)
        .min_by_key(|k| {
            let mut hasher = audit_hasher(b"loom/auditor/v1\0", job, round, subject, model_hash);
            hasher.update(k.as_slice());
            *hasher.finalize().as_bytes()
        })
        .copied()
}

/// One audit this peer runs.
#[derive(Debug, Clone)]
struct PendingAudit {
    round: u64,
    subject: PeerKey,
    params: Arc<Vec<f32>>,
    blob_hash: BlobHash,
}

/// An audit verdict as reported.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// The round audited.
    pub round: u64,
    /// Hex key of the contributor.
    pub subject: String,
    /// Hex key of the verifier.
    pub verifier: String,
    /// Cosine between the contribution and its recomputation.
    pub cosine: f32,
    /// Whether it passed.
    pub passed: bool,
}

/// Everything about a job the exchanger needs.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// The job.
    pub job_id: JobId,
    /// Rounds to train.
    pub rounds: u64,
    /// How updates are combined.
    pub strategy: Strategy,
    /// How updates are compressed.
    pub codec: Codec,
    /// Error-feedback decay β: the residual is multiplied by β before each update is added.
    pub feedback_decay: f32,
    /// Deadlines and limits of rounds.
    pub round: RoundConfig,
    /// The data seed (shards).
    pub data_seed: u64,
    /// Write a checkpoint every this many rounds (0: never; the last round always).
    pub checkpoint_every: u64,
    /// How long a fresh peer listens for a run in progress before starting from round 0.
    pub join_wait_ms: u64,
    /// Evaluate the model every this many rounds (and after round 0 and the last).
    pub eval_every: u64,
    /// How accepted updates are combined.
    pub aggregation: Aggregation,
    /// The verifier's screening of each round's updates (None: off).
    pub screening: Option<ScreeningConfig>,
    /// Audits by recomputation (None: off).
    pub audit: Option<AuditConfig>,
    /// The cheap check: every peer measures each contribution's loss on a batch its author was
    /// assigned, before and after the update, and refuses one that does not lower it.
    pub loss_check: bool,
}

/// Writes checkpoints (the node writes them atomically to its data directory).
pub trait CheckpointSink: Send + Sync + 'static {
    /// Stores the snapshot after `round`, with its hash.
    fn save(&self, round: u64, hash: &BlobHash, bytes: &[u8]) -> Result<(), String>;
}

/// One round as reported to the node (progress file, status, demo).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundReport {
    /// The round the model is after.
    pub round: u64,
    /// Validation loss of that model.
    pub val_loss: Option<f32>,
    /// Mean training loss of this peer's last update.
    pub train_loss: Option<f32>,
    /// Optimizer steps this peer has computed.
    pub steps: u64,
    /// Tokens consumed by all accepted contributions so far.
    pub tokens: u64,
    /// Seconds this peer spent in forward, backward and the optimizer.
    pub compute_s: f64,
    /// Contributions accepted in the round.
    pub contributors: usize,
    /// Hex model hash after the round.
    pub model_hash: String,
    /// Bytes of update blobs this peer published.
    pub update_bytes: u64,
    /// What dense fp32 exchange of every step's update would have been, for the steps so far.
    pub dense_fp32_bytes: u64,
    /// Straggler contributions excluded so far.
    pub late_contributions: u64,
    /// Model hash mismatches detected so far.
    pub hash_mismatches: u64,
    /// Snapshot resyncs so far.
    pub resyncs: u64,
    /// Blobs refused (bad hash, size, or undecodable) so far.
    pub rejected_blobs: u64,
    /// The job's last round is done.
    pub finished: bool,
    /// Whether this peer's close is the one it applied (it coordinated the round).
    #[serde(default)]
    pub closed_by_me: bool,
    /// Hex keys of the contributors whose updates went into the model.
    #[serde(default)]
    pub accepted: Vec<String>,
    /// Contributions of the round refused by the verifier, with the reason.
    #[serde(default)]
    pub refused: Vec<RefusedContribution>,
    /// Commitments refused so far for a bad signature.
    #[serde(default)]
    pub forged_commitments: u64,
    /// Commitments refused so far for replaying an earlier round's blob.
    #[serde(default)]
    pub stale_commitments: u64,
    /// Commitments so far that came after this peer's reveal (left out of its closes).
    #[serde(default)]
    pub after_reveal_commitments: u64,
    /// Audits this peer made as the assigned verifier since the last report.
    #[serde(default)]
    pub audits: Vec<AuditRecord>,
    /// Audits failed so far, as known to this peer (any verifier).
    #[serde(default)]
    pub audits_failed: u64,
    /// The cheap check's measurements of the round's contributions (empty when off).
    #[serde(default)]
    pub loss_checks: Vec<LossCheckRecord>,
    /// The newest round of the job recorded on the ledger, as known to this peer.
    #[serde(default)]
    pub ledger_round: Option<u64>,
    /// Resyncs so far onto the branch the ledger recorded (this peer had trained on another).
    #[serde(default)]
    pub ledger_resyncs: u64,
    /// Models announced by the proposer of a close this peer applied that its close does not
    /// yield here, not followed (more contributors hold this peer's model).
    #[serde(default)]
    pub divergences_refused: u64,
    /// Resyncs onto the branch most of a past round's contributors announced (this peer had
    /// run on another, possibly ahead, and rolled back).
    #[serde(default)]
    pub majority_resyncs: u64,
    /// The round chain's elected coordinator of this round, when its decision is known here (hex
    /// key), and the consensus round it was decided in (above 0: coordinators were skipped).
    #[serde(default)]
    pub decided_by: Option<String>,
    /// See `decided_by`.
    #[serde(default)]
    pub decided_in_consensus_round: Option<u32>,
    /// Rounds the round chain decided so far, as known here.
    #[serde(default)]
    pub chain_decided: u64,
    /// Decided rounds whose close differed from the one this peer applied, so far.
    #[serde(default)]
    pub chain_overruled: u64,
    /// Resyncs onto a decided branch so far.
    #[serde(default)]
    pub chain_resyncs: u64,
    /// Coordinators skipped in the round chain so far (down, cut off, or proposing a close
    /// the members had not applied).
    #[serde(default)]
    pub chain_coordinator_changes: u64,
    /// The round chain's decisions that came since the report before.
    #[serde(default)]
    pub decisions: Vec<ChainDecision>,
    /// Replays and copies refused since the report before, for rounds whose report had already
    /// gone out (their commitment came late): each names its round.
    #[serde(default)]
    pub late_refused: Vec<LateRefusal>,
    /// After a resync: the rounds of the loaded model's announced lineage, newest first, with
    /// the model and the accepted-set digest most of their announcers gave. This peer votes for
    /// them on the ledger as it trusted the model.
    #[serde(default)]
    pub adopted: Vec<AdoptedRound>,
    /// The signed commitments behind the round's close, by author (its contributions', and
    /// those of refused contributors this peer holds): the evidence the round's ledger result
    /// carries. Not part of the JSON progress.
    #[serde(skip)]
    pub evidence: Vec<(PeerKey, SignedCommitment)>,
}

impl RoundReport {
    /// `peer`'s signed commitment behind the round's close, when this peer holds it.
    pub fn evidence_of(&self, peer: &PeerKey) -> Option<&SignedCommitment> {
        self.evidence
            .iter()
            .find(|(author, _)| author == peer)
            .map(|(_, signed)| signed)
    }
}

/// A contribution refused after its round's report went out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LateRefusal {
    /// The round it was committed for.
    pub round: u64,
    /// Hex key of its author.
    pub author: String,
    /// Why it was refused.
    pub reason: String,
}

/// A decision of the job's round chain, as this peer learned it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChainDecision {
    /// The training round decided.
    pub round: u64,
    /// Hex key of its elected coordinator (who proposed the decided close).
    pub coordinator: String,
    /// The consensus round it was decided in (above 0: coordinators before it were skipped).
    pub consensus_round: u32,
    /// How long after this peer started the round's height the decision came, in ms.
    pub after_ms: u64,
}

/// A round of the lineage of a model this peer loaded from others.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdoptedRound {
    /// The round.
    pub round: u64,
    /// Hex model hash after it.
    pub model_hash: String,
    /// Hex accepted-set digest of its close, as most announcers gave it.
    pub accepted_digest: String,
}

/// The cheap check of one contribution: loss on its assigned batch before and after it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossCheckRecord {
    /// Hex key of its author.
    pub author: String,
    /// Loss at the round's starting model (nats per token).
    pub before: f32,
    /// Loss after the contribution's update.
    pub after: f32,
}

/// A contribution refused in a round and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedContribution {
    /// Hex key of its author.
    pub author: String,
    /// Why it was refused.
    pub reason: String,
}

/// Everything the exchanger starts from.
#[derive(Clone)]
pub struct ExchangerArgs {
    /// The job.
    pub plan: JobPlan,
    /// This peer's identity.
    pub signer: Arc<dyn HeartbeatSigner>,
    /// The network.
    pub network: Arc<dyn NetworkPort>,
    /// Blobs this peer holds and serves.
    pub blobs: SharedBlobs,
    /// The Trainer actor.
    pub trainer: ActorRef<TrainerMsg>,
    /// The model to start from: the initial model (round 0) or a resumed checkpoint.
    pub start: Arc<Snapshot>,
    /// Whether `start` is a resumed checkpoint (it is used when no peer is further along).
    pub resumed: bool,
    /// Tokens per optimizer step of one peer.
    pub tokens_per_step: u64,
    /// Where checkpoints go.
    pub checkpoints: Option<Arc<dyn CheckpointSink>>,
    /// Where round reports go (bounded; a full queue drops reports, never blocks).
    pub reports: mpsc::Sender<RoundReport>,
    /// Refused contributions per serving peer, read by the node's anomaly detector.
    pub rejections: SharedRejections,
    /// A second Trainer with its own learner for audits (None: this peer audits nothing).
    pub auditor: Option<ActorRef<TrainerMsg>>,
    /// This peer's ed25519 key, for its votes in the job's round chain (None: the peer does not
    /// run the round chain, and takes the fast path's closes alone).
    pub chain_key: Option<SigningKey>,
}

/// The round chain's timeouts for rounds configured as `round`: a coordinator gets the
/// proposer grace to propose (it proposes at once when it applied the round), the votes half
/// a second.
pub fn chain_config(round: &RoundConfig) -> ConsensusConfig {
    ConsensusConfig::default()
        .with_propose_ms(round.proposer_grace_ms.clamp(500, 10_000))
        .with_prevote_ms(500)
        .with_precommit_ms(500)
        .with_round_delta_ms(250)
        .with_rebroadcast_ms(1_000)
}

/// Refused contributions (blobs that failed their checks) per peer that served them; bounded.
pub type SharedRejections = Arc<std::sync::Mutex<std::collections::BTreeMap<PeerKey, u64>>>;
/// Most peers counted in [`SharedRejections`].
const MAX_REJECTION_PEERS: usize = 4_096;

impl std::fmt::Debug for ExchangerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangerArgs")
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

/// Messages of the exchanger.
#[derive(Debug)]
pub enum ExchangerMsg {
    /// A training gossip message from `from` (already checked against its gossip author).
    Gossip {
        /// The gossip author.
        from: PeerKey,
        /// The payload.
        data: Vec<u8>,
    },
    /// The outcome of a blob fetch.
    BlobFetched {
        /// The hash asked for.
        hash: BlobHash,
        /// Who answered (or failed to).
        from: PeerKey,
        /// The bytes, or why not.
        result: Result<Vec<u8>, String>,
    },
    /// The trainer's update for `round`.
    Trained {
        /// The round.
        round: u64,
        /// The update (pseudo-gradient or gradient) and what it cost.
        result: Result<(Vec<f32>, StepReport), String>,
    },
    /// The auditor's recomputation of `subject`'s work of `round`.
    Audited {
        /// The round.
        round: u64,
        /// Whose work.
        subject: PeerKey,
        /// The recomputed update, or why not.
        result: Result<Vec<f32>, String>,
    },
    /// The trainer's measurements for the cheap check of `round`.
    LossChecked {
        /// The round.
        round: u64,
        /// Loss before and after each contribution, or why not.
        result: Result<Vec<LossMeasured>, String>,
    },
    /// The validation loss of the model after `round`.
    Evaluated {
        /// The round.
        round: u64,
        /// The loss, or why not.
        val_loss: Result<f32, String>,
    },
    /// The ledger recorded `round` of the job with `model_hash` (a finalized block).
    Recorded {
        /// The round.
        round: u64,
        /// The model hash recorded.
        model_hash: ModelHash,
    },
    /// A timer of the round chain fired.
    ChainTimeout(TimeoutKey),
    /// Poll the engine.
    Tick,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Contribution,
    Snapshot { round: u64 },
}

#[derive(Debug)]
struct Fetch {
    len: u64,
    candidates: Vec<PeerKey>,
    next: usize,
    attempts: u32,
    started_ms: u64,
    /// Waiting until then after a failure.
    retry_at_ms: Option<u64>,
    purpose: Purpose,
}

/// State of the exchanger.
pub struct ExchangerState {
    args: ExchangerArgs,
    me: PeerKey,
    engine: RoundEngine,
    params: Arc<Vec<f32>>,
    outer: OuterState,
    residual: Vec<f32>,
    fetches: HashMap<BlobHash, Fetch>,
    /// Blobs given up on, and when.
    failed: HashMap<BlobHash, u64>,
    started_ms: u64,
    training_round: Option<u64>,
    last_train: Option<StepReport>,
    served_snapshots: Vec<BlobHash>,
    report: RoundReport,
    pending_reports: HashMap<u64, RoundReport>,
    /// The accepted-set digest of the model this peer holds (announced with its state): of the
    /// close it applied, or the one most announcers gave for a model it loaded.
    accepted_digest: BlobHash,
    finished: bool,
    /// The last round's report, held until that round's model is confirmed by its proposer
    /// (or the settle time has passed), so a peer does not finish on a model the mesh did not
    /// keep.
    final_report: Option<RoundReport>,
    /// When this peer last took on a model of the last round.
    final_applied_ms: Option<u64>,
    seen_future: bool,
    last_state: Option<(u64, ModelState)>,
    /// This peer's commitment of the open round and when it was last published: republished
    /// until the round closes, so peers that connect (or are admitted) after it went out hear it.
    own_commit: Option<(u64, u64, loom_protocols::contribution::SignedCommitment)>,
    /// Size of this job's snapshots.
    snapshot_len: u64,
    /// This peer's blob of the open round, held back until the engine says to reveal it.
    unrevealed: Option<(u64, Vec<u8>)>,
    /// The round being applied: its number, the model it started from, and its contributions.
    audit_base: Option<(u64, Arc<Vec<f32>>, Vec<Commitment>)>,
    /// Assigned verifiers of recent rounds' sampled contributions.
    audit_assignments: BTreeMap<(u64, PeerKey), PeerKey>,
    /// Audits waiting for the auditor, and whether one is running.
    audit_queue: VecDeque<PendingAudit>,
    audit_running: bool,
    pending_audit: Option<PendingAudit>,
    /// The round waiting for the trainer's loss check before it is aggregated.
    pending_apply: Option<PendingApply>,
    /// The job's round chain (None: not run).
    chain: Option<RoundChain>,
}

/// A round being applied: the close's contributions and the decoded updates still in.
struct PendingApply {
    round: u64,
    accepted: Vec<Commitment>,
    updates: Vec<(PeerKey, Arc<compress::SparseUpdate>)>,
}

/// The GradientExchanger actor.
#[derive(Debug, Default, Clone)]
pub struct ExchangerActor;

impl Actor for ExchangerActor {
    type Msg = ExchangerMsg;
    type State = ExchangerState;
    type Arguments = ExchangerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let me = args.signer.public_key();
        let start = args.start.clone();
        let engine = RoundEngine::new(
            args.plan.round,
            args.plan.job_id,
            me,
            start.round,
            // A resumed peer, like a new one, first listens for a run further along.
            false,
        );
        let len = start.params.len();
        let start_bytes = start.to_bytes();
        let snapshot_len = start_bytes.len() as u64;
        {
            // Held from the start: a peer announcing the same starting model needs no fetch.
            let mut store = args.blobs.lock().unwrap_or_else(|e| e.into_inner());
            let hash = store.insert(start_bytes);
            store.pin(hash);
        }
        myself.send_interval(TICK, || ExchangerMsg::Tick);
        let state = ExchangerState {
            me,
            engine,
            params: Arc::new(start.params.clone()),
            outer: start.outer.clone(),
            residual: vec![0.0; len],
            fetches: HashMap::new(),
            failed: HashMap::new(),
            started_ms: unix_ms(),
            training_round: None,
            last_train: None,
            served_snapshots: Vec::new(),
            report: RoundReport::default(),
            pending_reports: HashMap::new(),
            accepted_digest: [0; 32],
            finished: false,
            final_report: None,
            final_applied_ms: None,
            seen_future: false,
            last_state: None,
            own_commit: None,
            snapshot_len,
            unrevealed: None,
            audit_base: None,
            audit_assignments: BTreeMap::new(),
            audit_queue: VecDeque::new(),
            audit_running: false,
            pending_audit: None,
            pending_apply: None,
            chain: args
                .chain_key
                .clone()
                .map(|key| RoundChain::new(key, args.plan.job_id, chain_config(&args.plan.round))),
            args,
        };
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let now = unix_ms();
        match message {
            ExchangerMsg::Tick => state.on_tick(&myself, now),
            ExchangerMsg::Gossip { from, data } => state.on_gossip(&myself, from, &data, now),
            ExchangerMsg::BlobFetched { hash, from, result } => {
                state.on_blob(&myself, hash, from, result, now)
            }
            ExchangerMsg::Trained { round, result } => state.on_trained(&myself, round, result),
            ExchangerMsg::Audited {
                round,
                subject,
                result,
            } => state.on_audited(&myself, round, subject, result),
            ExchangerMsg::LossChecked { round, result } => {
                state.on_loss_checked(&myself, round, result)
            }
            ExchangerMsg::Evaluated { round, val_loss } => state.on_evaluated(round, val_loss),
            ExchangerMsg::Recorded { round, model_hash } => {
                state.engine.on_recorded(round, model_hash, now);
            }
            ExchangerMsg::ChainTimeout(key) => {
                if let Some(chain) = state.chain.as_mut() {
                    let actions = chain.on_timeout(key, now);
                    state.run_chain(&myself, actions, now);
                }
            }
        }
        Ok(())
    }
}

impl ExchangerState {
    fn on_tick(&mut self, myself: &ActorRef<ExchangerMsg>, now: u64) {
        if !self.engine.is_synced()
            && !self.seen_future
            && self.engine.latest_state().is_none()
            && (self.engine.heard_others() || now >= self.started_ms + self.args.plan.join_wait_ms)
        {
            // Nobody is further along: start the job from the initial model (or the resumed
            // checkpoint).
            self.engine.start_fresh();
            self.after_model_changed(myself, self.engine.current_round() - 1, 0);
        }
        if let Some((at, round, signed)) = &self.own_commit
            && now >= at + STATE_REPUBLISH_MS
        {
            let (round, signed) = (*round, signed.clone());
            if round >= self.engine.current_round() && !self.engine.is_closed() {
                self.publish(&TrainMessage::Commit(signed.clone()));
                self.own_commit = Some((now, round, signed));
            } else {
                self.own_commit = None;
            }
        }
        if let Some((at, state)) = &self.last_state
            && now >= at + STATE_REPUBLISH_MS
        {
            // Peers that join between rounds learn where the job is without waiting a round.
            let state = state.clone();
            self.publish(&TrainMessage::State(state.clone()));
            self.last_state = Some((now, state));
        }
        self.retry_slow_fetches(now);
        if let Some(chain) = self.chain.as_mut() {
            let actions = chain.poll(now);
            self.run_chain(myself, actions, now);
        }
        let actions = self.engine_poll(now);
        self.run(myself, actions, now);
        self.try_finish(now);
    }

    /// "Is this blob held?" for the engine, owning its own handle on the store.
    fn holds(&self) -> impl Fn(&BlobHash) -> bool + use<> {
        let blobs = self.args.blobs.clone();
        move |hash: &BlobHash| {
            blobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(hash)
        }
    }

    fn engine_poll(&mut self, now: u64) -> Vec<Action> {
        let have = self.holds();
        self.engine.poll(now, &have)
    }

    fn on_gossip(&mut self, myself: &ActorRef<ExchangerMsg>, from: PeerKey, data: &[u8], now: u64) {
        let Ok(message) = TrainMessage::from_bytes(data) else {
            metrics::counter!("loom_train_messages_rejected_total").increment(1);
            return;
        };
        let have = self.holds();
        let outcome = match message {
            TrainMessage::Commit(signed) => self.engine.on_commit(signed, now),
            TrainMessage::Close(close) => self.engine.on_close(close, from, &have, now),
            TrainMessage::State(state) => self.engine.on_state(state, from),
            TrainMessage::Audit(verdict) => {
                if verdict.verifier == from {
                    self.on_verdict(&verdict);
                }
                Ok(Vec::new())
            }
            TrainMessage::Chain(message) => {
                if let Some(chain) = self.chain.as_mut() {
                    match chain.on_message(message, now) {
                        Ok(actions) => self.run_chain(myself, actions, now),
                        Err(why) => {
                            metrics::counter!("loom_round_chain_messages_refused_total")
                                .increment(1);
                            tracing::debug!(%why, "round chain message not taken");
                        }
                    }
                }
                Ok(Vec::new())
            }
        };
        match outcome {
            Ok(actions) => self.run(myself, actions, now),
            Err(loom_protocols::round::RoundRejected::Late { round }) => {
                metrics::counter!("loom_train_late_contributions_total").increment(1);
                tracing::info!(round, "late contribution excluded");
            }
            Err(
                loom_protocols::round::RoundRejected::OtherJob
                | loom_protocols::round::RoundRejected::Duplicate,
            ) => {}
            Err(loom_protocols::round::RoundRejected::Future { .. }) => {
                // Others are further along: wait for their model state instead of starting.
                self.seen_future = true;
            }
            Err(why) => {
                metrics::counter!("loom_train_messages_rejected_total").increment(1);
                tracing::debug!(%why, "training message not taken");
            }
        }
        self.record_late_refusals();
    }

    /// A replay or copy refused after its round closed here belongs to that round's report
    /// (what the round's coordinator records on the ledger), while the report is still held.
    fn record_late_refusals(&mut self) {
        for (round, author, reason, signed) in self.engine.take_late_refusals() {
            let report = if let Some(report) = self.pending_reports.get_mut(&round) {
                report
            } else if round == self.engine.current_round() {
                // Closed and being applied: its report is still being filled.
                &mut self.report
            } else {
                // The round's report is gone: the refusal goes with the next one, naming its
                // round (bounded like the refusals of a round).
                let late = &mut self.report.late_refused;
                if late.len() < self.args.plan.round.max_contributors
                    && !late
                        .iter()
                        .any(|l| l.round == round && l.author == hex(&author))
                {
                    late.push(LateRefusal {
                        round,
                        author: hex(&author),
                        reason,
                    });
                }
                continue;
            };
            let author_hex = hex(&author);
            if report.refused.iter().any(|r| r.author == author_hex) {
                continue;
            }
            report.refused.push(RefusedContribution {
                author: author_hex,
                reason,
            });
            if !report.evidence.iter().any(|(k, _)| *k == author) {
                report.evidence.push((author, signed));
            }
        }
    }

    fn run(&mut self, myself: &ActorRef<ExchangerMsg>, actions: Vec<Action>, now: u64) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Reveal { round } => {
                    if let Some((held_round, blob)) = self.unrevealed.take() {
                        if held_round == round {
                            self.args
                                .blobs
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(blob);
                            // With the blob in hand the round may close now.
                            queue.extend(self.engine_poll(now));
                        } else {
                            self.unrevealed = Some((held_round, blob));
                        }
                    }
                }
                Action::Fetch { hash, len, from } => {
                    self.fetch(hash, len, from, Purpose::Contribution, now);
                }
                Action::Publish(message) => self.publish(&message),
                Action::Apply {
                    round,
                    contributions,
                    proposer,
                    refused,
                    evidence,
                } => {
                    self.report.closed_by_me = proposer == self.me;
                    self.report.evidence = evidence;
                    self.report.loss_checks.clear();
                    // The close's refusals, and those this peer made itself.
                    let mut refused = refused;
                    for (author, reason) in self.engine.refused_here() {
                        if !refused.iter().any(|(k, _)| *k == author) {
                            refused.push((author, reason));
                        }
                    }
                    self.report.refused = refused
                        .into_iter()
                        .map(|(author, reason)| RefusedContribution {
                            author: hex(&author),
                            reason,
                        })
                        .collect();
                    self.apply(myself, round, &contributions)
                }
                Action::Resync {
                    round,
                    model_hash: _,
                    snapshot_hash,
                    snapshot_len,
                    from,
                } => {
                    if snapshot_len != self.snapshot_len {
                        // Every snapshot of this job has the same size: refuse before fetching.
                        tracing::warn!(snapshot_len, "announced snapshot has the wrong size");
                        self.engine.resync_failed();
                        continue;
                    }
                    tracing::warn!(round, "resyncing from a peer's snapshot");
                    metrics::counter!("loom_train_resyncs_total").increment(1);
                    if let Some((round, _)) = self.fetch(
                        snapshot_hash,
                        snapshot_len,
                        from,
                        Purpose::Snapshot { round },
                        now,
                    ) {
                        self.after_model_changed(myself, round, 0);
                    }
                }
            }
        }
    }

    fn publish(&self, message: &TrainMessage) {
        if let Err(e) = self
            .args
            .network
            .publish(Topic::Training, message.to_bytes())
        {
            tracing::warn!(%e, "cannot publish a training message");
        }
    }

    /// Starts fetching a blob; returns the round of a snapshot that was already held and has
    /// been loaded (the caller then restarts the round's work).
    fn fetch(
        &mut self,
        hash: BlobHash,
        len: u64,
        from: Vec<PeerKey>,
        purpose: Purpose,
        now: u64,
    ) -> Option<(u64, BlobHash)> {
        if (self.holds())(&hash) {
            if let Purpose::Snapshot { round } = purpose {
                // Already held (e.g. our own): load it at once.
                let bytes = self
                    .args
                    .blobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&hash);
                if let Some(bytes) = bytes
                    && self.load_snapshot(hash, round, &bytes)
                {
                    return Some((round, hash));
                }
            }
            return None;
        }
        if self
            .failed
            .get(&hash)
            .is_some_and(|at| now < at + FAILED_QUARANTINE_MS)
        {
            return None;
        }
        self.failed.remove(&hash);
        let candidates: Vec<PeerKey> = from.into_iter().filter(|p| *p != self.me).collect();
        if let Some(existing) = self.fetches.get_mut(&hash) {
            for c in candidates {
                if !existing.candidates.contains(&c) && existing.candidates.len() < 16 {
                    existing.candidates.push(c);
                }
            }
            return None;
        }
        if candidates.is_empty() || self.fetches.len() >= MAX_INFLIGHT_FETCHES {
            return None;
        }
        let fetch = Fetch {
            len,
            candidates,
            next: 0,
            attempts: 0,
            started_ms: now,
            retry_at_ms: None,
            purpose,
        };
        self.fetches.insert(hash, fetch);
        self.try_next(hash, now);
        None
    }

    fn try_next(&mut self, hash: BlobHash, now: u64) {
        let Some(fetch) = self.fetches.get_mut(&hash) else {
            return;
        };
        if fetch.attempts >= MAX_FETCH_ATTEMPTS || fetch.candidates.is_empty() {
            let purpose = fetch.purpose;
            self.fetches.remove(&hash);
            if self.failed.len() >= MAX_FAILED {
                self.failed.clear();
            }
            self.failed.insert(hash, now);
            metrics::counter!("loom_train_fetch_failures_total").increment(1);
            tracing::warn!(hash = %hex(&hash), "giving up on a blob");
            match purpose {
                Purpose::Snapshot { .. } => self.engine.resync_failed(),
                // A blob of the accepted set that no holder serves intact: drop that close
                // and wait for the next proposer's, which can only list blobs it holds.
                Purpose::Contribution if self.engine.is_closed() => self.engine.apply_failed(),
                Purpose::Contribution => {}
            }
            return;
        }
        let peer = fetch.candidates[fetch.next % fetch.candidates.len()];
        fetch.next += 1;
        fetch.attempts += 1;
        fetch.started_ms = now;
        fetch.retry_at_ms = None;
        if self.args.network.fetch_blob(peer, hash).is_err() {
            metrics::counter!("loom_train_fetch_failures_total").increment(1);
        }
    }

    /// After a failed attempt: the next one after a delay that doubles per attempt.
    fn retry_later(&mut self, hash: BlobHash, now: u64) {
        let Some(fetch) = self.fetches.get_mut(&hash) else {
            return;
        };
        let delay = FIRST_RETRY_DELAY_MS
            .saturating_mul(1 << fetch.attempts.saturating_sub(1).min(10))
            .min(MAX_RETRY_DELAY_MS);
        fetch.retry_at_ms = Some(now + delay);
        if fetch.attempts >= MAX_FETCH_ATTEMPTS {
            self.try_next(hash, now);
        }
    }

    fn retry_slow_fetches(&mut self, now: u64) {
        let slow: Vec<BlobHash> = self
            .fetches
            .iter()
            .filter(|(_, f)| match f.retry_at_ms {
                Some(at) => now >= at,
                None => now.saturating_sub(f.started_ms) > FETCH_TIMEOUT_MS,
            })
            .map(|(h, _)| *h)
            .collect();
        for hash in slow {
            self.try_next(hash, now);
        }
    }

    fn on_blob(
        &mut self,
        myself: &ActorRef<ExchangerMsg>,
        hash: BlobHash,
        from: PeerKey,
        result: Result<Vec<u8>, String>,
        now: u64,
    ) {
        let Some(fetch) = self.fetches.get(&hash) else {
            return;
        };
        let purpose = fetch.purpose;
        let expected_len = fetch.len;
        // Transport failures (unreachable, not held) are retried; bytes that fail their checks
        // are also counted as rejected.
        let verdict = result.map_err(|why| (false, why)).and_then(|bytes| {
            let size = bytes.len() as u64;
            if size != expected_len || size > self.args.plan.round.max_blob_bytes.max(expected_len)
            {
                return Err((
                    true,
                    format!("blob of {size} bytes, expected {expected_len}"),
                ));
            }
            if contribution::blob_hash(&bytes) != hash {
                return Err((true, "blob does not hash to its name".to_owned()));
            }
            Ok(bytes)
        });
        match verdict {
            Ok(bytes) => {
                self.fetches.remove(&hash);
                match purpose {
                    Purpose::Contribution => {
                        self.args
                            .blobs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(bytes);
                        let actions = self.engine_poll(now);
                        self.run(myself, actions, now);
                    }
                    Purpose::Snapshot { round } => {
                        if self.load_snapshot(hash, round, &bytes) {
                            self.args
                                .blobs
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(bytes);
                            self.after_model_changed(myself, round, 0);
                        }
                    }
                }
            }
            Err((rejected, why)) => {
                if rejected {
                    self.report.rejected_blobs += 1;
                    metrics::counter!("loom_train_blobs_rejected_total").increment(1);
                    tracing::warn!(%why, peer = %hex(&from), "blob refused");
                    {
                        let mut counts = self
                            .args
                            .rejections
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        if counts.len() < MAX_REJECTION_PEERS || counts.contains_key(&from) {
                            *counts.entry(from).or_insert(0) += 1;
                        }
                    }
                    // A holder that served bad bytes is not asked again for this blob.
                    if let Some(fetch) = self.fetches.get_mut(&hash) {
                        fetch.candidates.retain(|c| *c != from);
                        if fetch.candidates.is_empty() {
                            fetch.attempts = MAX_FETCH_ATTEMPTS;
                            self.try_next(hash, now);
                            return;
                        }
                    }
                } else {
                    tracing::debug!(%why, peer = %hex(&from), "blob fetch failed");
                }
                self.retry_later(hash, now);
            }
        }
    }

    fn load_snapshot(&mut self, hash: BlobHash, round: u64, bytes: &[u8]) -> bool {
        match Snapshot::from_verified_bytes(bytes, &hash, &self.args.plan.job_id, self.params.len())
        {
            Ok(snapshot) if snapshot.round == round => {
                self.params = Arc::new(snapshot.params);
                self.outer = snapshot.outer;
                let rolled_back = round + 1 < self.engine.current_round();
                self.engine.resynced(round, hash);
                if rolled_back {
                    // Back onto the branch most peers are on: what this peer committed on its
                    // own branch is not published again.
                    self.own_commit = None;
                    self.unrevealed = None;
                    tracing::info!(round, "rolled back onto the branch most peers are on");
                }
                // The round's report is of the model loaded, which this peer did not close: its
                // accepted set is not known here (the refusals it saw itself still stand).
                self.report.closed_by_me = false;
                self.report.accepted.clear();
                self.report.evidence.clear();
                self.report.loss_checks.clear();
                self.report.resyncs = self.engine.counters().resyncs;
                // What this peer now vouches for: the announced lineage of the model it loaded.
                let lineage = self.engine.announced_lineage(round, hash);
                self.accepted_digest = lineage
                    .first()
                    .filter(|(at, _, _)| *at == round)
                    .map_or([0; 32], |(_, _, digest)| *digest);
                self.report.adopted = lineage
                    .into_iter()
                    .map(|(round, model_hash, digest)| AdoptedRound {
                        round,
                        model_hash: hex(&model_hash),
                        accepted_digest: hex(&digest),
                    })
                    .collect();
                tracing::info!(round, "model loaded from a peer's snapshot");
                true
            }
            Ok(_) | Err(_) => {
                self.report.rejected_blobs += 1;
                self.engine.resync_failed();
                false
            }
        }
    }

    fn apply(&mut self, myself: &ActorRef<ExchangerMsg>, round: u64, accepted: &[Commitment]) {
        let len = self.params.len();
        let limit = self.args.plan.round.max_blob_bytes as usize;
        let mut updates = Vec::with_capacity(accepted.len());
        {
            let store = self.args.blobs.lock().unwrap_or_else(|e| e.into_inner());
            for commitment in accepted {
                let Some(blob) = store.get(&commitment.blob_hash) else {
                    continue;
                };
                match compress::decode(&blob, limit, len) {
                    Ok((update, _)) if update.len == len => {
                        updates.push((commitment.author, Arc::new(update)))
                    }
                    // Every peer holds the same bytes, so every peer skips the same update.
                    _ => {
                        self.report.refused.push(RefusedContribution {
                            author: hex(&commitment.author),
                            reason: "undecodable or wrong-sized update".into(),
                        });
                        self.report.rejected_blobs += 1;
                        metrics::counter!("loom_train_blobs_rejected_total").increment(1);
                    }
                }
            }
        }
        if let Some(config) = &self.args.plan.screening {
            let refs: Vec<(PeerKey, &compress::SparseUpdate)> =
                updates.iter().map(|(k, u)| (*k, u.as_ref())).collect();
            let refused = verify::screen(&refs, config);
            for (author, why) in &refused {
                self.refuse(round, author, why.to_string());
            }
            updates.retain(|(k, _)| !refused.iter().any(|(r, _)| r == k));
        }
        let pending = PendingApply {
            round,
            accepted: accepted.to_vec(),
            updates,
        };
        if self.args.plan.loss_check && !pending.updates.is_empty() {
            let work = work_of_round(self.args.plan.strategy, round);
            let step_scale = match self.args.plan.strategy {
                Strategy::Diloco { .. } => 1.0,
                Strategy::Sync(config) => config.lr,
            };
            let candidates = pending
                .updates
                .iter()
                .map(|(author, update)| LossCandidate {
                    author: *author,
                    update: update.clone(),
                    step_scale,
                    batch_steps: loss_check_steps(&self.args.plan.job_id, round, author, work),
                    shard: ShardKey {
                        seed: self.args.plan.data_seed,
                        peer: *author,
                    },
                })
                .collect();
            let asked = self.args.trainer.cast(TrainerMsg::CheckLoss {
                round,
                params: self.params.clone(),
                candidates,
                reply_to: myself.clone(),
            });
            if asked.is_ok() {
                self.pending_apply = Some(pending);
                return;
            }
            tracing::error!(
                round,
                "trainer gone: contributions applied without the loss check"
            );
        }
        self.finish_apply(myself, pending);
    }

    /// Records a contribution of `round` refused by this peer's verifier.
    fn refuse(&mut self, round: u64, author: &PeerKey, why: String) {
        tracing::warn!(round, author = %crate::short(author), %why, "contribution refused");
        metrics::counter!("loom_train_contributions_refused_total").increment(1);
        {
            let mut rejections = self
                .args
                .rejections
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if rejections.len() < MAX_REJECTION_PEERS || rejections.contains_key(author) {
                *rejections.entry(*author).or_default() += 1;
            }
        }
        self.report.refused.push(RefusedContribution {
            author: hex(author),
            reason: why,
        });
    }

    /// The trainer measured the cheap check of the round being applied: a contribution that does
    /// not lower the loss on its assigned batch is refused; the rest are aggregated.
    fn on_loss_checked(
        &mut self,
        myself: &ActorRef<ExchangerMsg>,
        round: u64,
        result: Result<Vec<LossMeasured>, String>,
    ) {
        let Some(mut pending) = self.pending_apply.take_if(|p| p.round == round) else {
            return;
        };
        match result {
            Ok(measured) => {
                for m in &measured {
                    // NaN compares false: a loss that is not a number is not lowered either.
                    let lowered = m.after < m.before;
                    if !lowered {
                        self.refuse(
                            round,
                            &m.author,
                            format!(
                                "loss check: does not lower the loss on its assigned batches \
                                 ({:.4} -> {:.4})",
                                m.before, m.after
                            ),
                        );
                        pending.updates.retain(|(k, _)| *k != m.author);
                    }
                    self.report.loss_checks.push(LossCheckRecord {
                        author: hex(&m.author),
                        before: m.before,
                        after: m.after,
                    });
                }
            }
            Err(why) => {
                tracing::error!(%why, round, "loss check failed; contributions applied unchecked")
            }
        }
        self.finish_apply(myself, pending);
    }

    /// Aggregates the round's updates that passed the verifier and takes the outer step.
    fn finish_apply(&mut self, myself: &ActorRef<ExchangerMsg>, pending: PendingApply) {
        let PendingApply {
            round,
            accepted,
            updates,
        } = pending;
        let len = self.params.len();
        let refs: Vec<(PeerKey, &compress::SparseUpdate)> =
            updates.iter().map(|(k, u)| (*k, u.as_ref())).collect();
        let (mean, used) = contribution::aggregate(len, &refs);
        if self.args.plan.audit.is_some() {
            let used_commitments: Vec<Commitment> = accepted
                .into_iter()
                .filter(|c| used.contains(&c.author))
                .collect();
            self.audit_base = Some((round, self.params.clone(), used_commitments));
        }
        let average = match self.args.plan.aggregation {
            Aggregation::Mean => mean,
            Aggregation::TrimmedMean { trim } => {
                robust::trimmed_mean(len, &sorted_updates(&refs, &used), trim)
            }
            Aggregation::Median => robust::coordinate_median(len, &sorted_updates(&refs, &used)),
        };
        self.report.accepted = used.iter().map(|k| hex(k)).collect();
        self.accepted_digest = loom_protocols::ledger::accepted_digest(&used);
        let counters = self.engine.counters();
        self.report.forged_commitments = counters.forged_commitments;
        self.report.stale_commitments = counters.stale_commitments;
        self.report.after_reveal_commitments = counters.after_reveal_commitments;
        let mut params = self.params.as_ref().clone();
        if !used.is_empty() {
            match (&mut self.outer, self.args.plan.strategy) {
                (OuterState::Nesterov { buf }, Strategy::Diloco { outer, .. }) => {
                    outer::nesterov_step(&mut params, &average, buf, outer)
                }
                (OuterState::AdamW { m, v, step }, Strategy::Sync(config)) => {
                    *step += 1;
                    outer::adamw_step(&mut params, &average, m, v, *step, config)
                }
                _ => tracing::error!("outer state does not match the strategy"),
            }
        }
        self.params = Arc::new(params);
        let steps_per_update = match self.args.plan.strategy {
            Strategy::Sync(_) => 1,
            Strategy::Diloco { inner_steps, .. } => u64::from(inner_steps),
        };
        self.report.tokens += used.len() as u64 * steps_per_update * self.args.tokens_per_step;
        self.report.contributors = used.len();
        self.after_model_changed(myself, round, used.len());
    }

    /// The model now is the state after `round`: publish its hash and snapshot, checkpoint,
    /// evaluate it and start the next round's work.
    fn after_model_changed(
        &mut self,
        myself: &ActorRef<ExchangerMsg>,
        round: u64,
        contributors: usize,
    ) {
        let snapshot = Snapshot {
            job_id: self.args.plan.job_id,
            round,
            params: self.params.as_ref().clone(),
            outer: self.outer.clone(),
        };
        let bytes = snapshot.to_bytes();
        let hash = contribution::blob_hash(&bytes);
        let snapshot_len = bytes.len() as u64;
        let every = self.args.plan.checkpoint_every;
        let checkpoint_due = round > 0
            && ((every > 0 && round.is_multiple_of(every)) || round == self.args.plan.rounds);
        if checkpoint_due
            && let Some(sink) = &self.args.checkpoints
            && let Err(e) = sink.save(round, &hash, &bytes)
        {
            tracing::error!(%e, round, "cannot write checkpoint");
        }
        {
            let mut store = self.args.blobs.lock().unwrap_or_else(|e| e.into_inner());
            store.insert(bytes);
            store.pin(hash);
            self.served_snapshots.push(hash);
            while self.served_snapshots.len() > 3 {
                let old = self.served_snapshots.remove(0);
                store.unpin(&old);
            }
        }
        self.schedule_audits(myself, round, &hash);
        // After a resync or at the start the engine is already past `round`; `applied` then
        // does nothing.
        self.engine.applied(round, hash);
        self.start_chain_height(myself, round);
        let state = ModelState {
            job_id: self.args.plan.job_id,
            round,
            model_hash: hash,
            parent_hash: self.engine.parent_hash(round),
            snapshot_hash: hash,
            snapshot_len,
            author: self.me,
            accepted_digest: self.accepted_digest,
        };
        self.publish(&TrainMessage::State(state.clone()));
        self.last_state = Some((unix_ms(), state));
        let counters = self.engine.counters();
        let mut report = self.report.clone();
        report.round = round;
        report.contributors = contributors;
        report.model_hash = hex(&hash);
        report.late_contributions = counters.late_contributions;
        report.hash_mismatches = counters.hash_mismatches;
        report.resyncs = counters.resyncs;
        report.ledger_resyncs = counters.ledger_resyncs;
        report.divergences_refused = counters.divergences_refused;
        report.majority_resyncs = counters.majority_resyncs;
        self.chain_counters_into(&mut report);
        report.ledger_round = self.engine.ledger_tip().map(|(round, _)| round);
        report.finished = round >= self.args.plan.rounds;
        self.report.audits.clear();
        self.report.adopted.clear();
        self.report.decisions.clear();
        self.report.late_refused.clear();
        if report.finished {
            self.final_applied_ms = Some(unix_ms());
        }
        if let Some(last) = self.last_train {
            report.train_loss = Some(last.loss_mean);
        }
        self.pending_reports.insert(round, report);
        // Train first, evaluate second: the trainer runs them in order, so the evaluation of
        // this round's model fills the time this peer then waits for the others' updates.
        if round < self.args.plan.rounds {
            self.start_training(myself, round + 1);
        }
        let every = self.args.plan.eval_every.max(1);
        if round == 0 || round.is_multiple_of(every) || round >= self.args.plan.rounds {
            let _ = self.args.trainer.cast(TrainerMsg::Evaluate {
                round,
                params: self.params.clone(),
                reply_to: myself.clone(),
            });
        } else {
            self.on_evaluated(round, Err(String::new()));
        }
    }

    fn start_training(&mut self, myself: &ActorRef<ExchangerMsg>, round: u64) {
        let work = work_of_round(self.args.plan.strategy, round);
        self.training_round = Some(round);
        let _ = self.args.trainer.cast(TrainerMsg::Train {
            round,
            params: self.params.clone(),
            work,
            shard: ShardKey {
                seed: self.args.plan.data_seed,
                peer: self.me,
            },
            reply_to: myself.clone(),
        });
    }

    fn on_trained(
        &mut self,
        myself: &ActorRef<ExchangerMsg>,
        round: u64,
        result: Result<(Vec<f32>, StepReport), String>,
    ) {
        if self.training_round == Some(round) {
            self.training_round = None;
        }
        let (update, step_report) = match result {
            Ok(ok) => ok,
            Err(why) => {
                tracing::error!(%why, round, "training failed; this peer skips the round");
                return;
            }
        };
        self.report.steps += u64::from(step_report.steps);
        self.report.compute_s += step_report.compute_s;
        self.report.dense_fp32_bytes +=
            u64::from(step_report.steps) * compress::dense_fp32_bytes(update.len()) as u64;
        self.last_train = Some(step_report);
        if round != self.engine.current_round()
            || self.engine.is_closed()
            || !self.engine.is_synced()
        {
            self.engine_late(round);
            return;
        }
        // Error feedback with decay (SparseLoCo): e ← β·e, then e + update is compressed and
        // what was not sent stays in e. β = 1 is classic error feedback.
        let decay = self.args.plan.feedback_decay;
        if decay != 1.0 {
            for r in &mut self.residual {
                *r *= decay;
            }
        }
        let (blob, _) = compress::compress(&update, &mut self.residual, self.args.plan.codec);
        let blob_len = blob.len() as u64;
        let hash = contribution::blob_hash(&blob);
        // Commit-then-reveal: the blob is served only when the engine says so.
        self.unrevealed = Some((round, blob));
        let signer = self.args.signer.clone();
        let signed = Commitment {
            job_id: self.args.plan.job_id,
            round,
            blob_hash: hash,
            blob_len,
            author: self.me,
        }
        .seal(|m| signer.sign(m));
        self.report.update_bytes += blob_len;
        metrics::counter!("loom_train_update_bytes_total").increment(blob_len);
        let now = unix_ms();
        match self.engine.on_commit(signed.clone(), now) {
            Ok(actions) => {
                self.publish(&TrainMessage::Commit(signed.clone()));
                self.own_commit = Some((now, round, signed));
                self.run(myself, actions, now);
            }
            Err(why) => tracing::warn!(%why, round, "own contribution not taken"),
        }
    }

    fn engine_late(&mut self, round: u64) {
        metrics::counter!("loom_train_own_late_total").increment(1);
        tracing::info!(
            round,
            "own update finished after its round closed; discarded"
        );
    }

    fn on_evaluated(&mut self, round: u64, val_loss: Result<f32, String>) {
        let Some(mut report) = self.pending_reports.remove(&round) else {
            return;
        };
        match val_loss {
            Ok(loss) => report.val_loss = Some(loss),
            // Not evaluated this round.
            Err(why) if why.is_empty() => {}
            Err(why) => tracing::warn!(%why, round, "validation failed"),
        }
        if self.finished {
            // A resync after the last round (onto the model the ledger recorded): the last
            // round is reported again, with that model.
            if report.finished {
                let _ = self.args.reports.try_send(report);
            }
            return;
        }
        if let Some(loss) = report.val_loss {
            metrics::gauge!("loom_train_val_loss").set(f64::from(loss));
        }
        metrics::gauge!("loom_train_round").set(round as f64);
        if report.finished {
            self.final_report = Some(report);
            self.try_finish(unix_ms());
            return;
        }
        let _ = self.args.reports.try_send(report);
    }

    /// The round chain's counters so far, into `report`.
    fn chain_counters_into(&self, report: &mut RoundReport) {
        let counters = self.engine.counters();
        report.chain_decided = counters.chain_decided;
        report.chain_overruled = counters.chain_overruled;
        report.chain_resyncs = counters.chain_resyncs;
        report.chain_coordinator_changes = self
            .chain
            .as_ref()
            .map_or(0, RoundChain::coordinator_changes);
    }

    /// Once this peer applied `round` with a close: the round chain's height `round` starts,
    /// with the round's committee (the contributors of the round before), when it is known.
    fn start_chain_height(&mut self, myself: &ActorRef<ExchangerMsg>, round: u64) {
        if self.engine.current_round() != round + 1 {
            return;
        }
        let (Some(applied), Some(committee)) = (
            self.engine.applied_close(round).cloned(),
            self.engine.chain_committee(round),
        ) else {
            return;
        };
        let now = unix_ms();
        if let Some(chain) = self.chain.as_mut() {
            let actions = chain.start(applied, committee, now);
            self.run_chain(myself, actions, now);
        }
    }

    /// Carries out the round chain's actions.
    fn run_chain(&mut self, myself: &ActorRef<ExchangerMsg>, actions: Vec<ChainAction>, now: u64) {
        for action in actions {
            match action {
                ChainAction::Broadcast(message) => self.publish(&TrainMessage::Chain(message)),
                ChainAction::ScheduleTimeout { key, after_ms } => {
                    myself.send_after(Duration::from_millis(after_ms), move || {
                        ExchangerMsg::ChainTimeout(key)
                    });
                }
                ChainAction::Decided {
                    round,
                    close,
                    certificate,
                    coordinator,
                    after_ms,
                } => {
                    metrics::counter!("loom_round_chain_decided_total").increment(1);
                    tracing::debug!(
                        round,
                        consensus_round = certificate.round,
                        coordinator = %hex(&coordinator),
                        "round decided by the round chain"
                    );
                    self.report.decisions.push(ChainDecision {
                        round,
                        coordinator: hex(&coordinator),
                        consensus_round: certificate.round,
                        after_ms,
                    });
                    // The round's report, while it is held (its evaluation runs).
                    if let Some(report) = self.pending_reports.get_mut(&round) {
                        report.decided_by = Some(hex(&coordinator));
                        report.decided_in_consensus_round = Some(certificate.round);
                    }
                    let have = self.holds();
                    let round_actions = self.engine.on_decided(close, now, &have);
                    self.run(myself, round_actions, now);
                }
                ChainAction::NewCoordinator {
                    round,
                    consensus_round,
                    coordinator,
                } => {
                    if consensus_round > 0 {
                        metrics::counter!("loom_round_chain_coordinator_changes_total")
                            .increment(1);
                        tracing::info!(
                            round,
                            consensus_round,
                            coordinator = %hex(&coordinator),
                            "round chain: the coordinator before was skipped"
                        );
                    }
                }
            }
        }
    }

    /// Reports the last round once its model is confirmed: the winning proposer announced the
    /// same hash, or this peer closed it itself and no better-ranked close came within two
    /// grace periods. A peer whose model differs resyncs first (the engine asks for it when
    /// the proposer's state arrives) and reports the model it resynced to.
    fn try_finish(&mut self, now: u64) {
        let Some(applied_ms) = self.final_applied_ms else {
            return;
        };
        if self.finished || self.final_report.is_none() {
            return;
        }
        let round = self.args.plan.rounds;
        let grace_ms = self.args.plan.round.proposer_grace_ms;
        let own_close = self.engine.round_proposer(round) == Some(self.me);
        // A close of this peer's that nobody confirms is taken as the mesh's once better-ranked
        // closes have had two grace periods to arrive.
        let confirmed =
            self.engine.confirmed(round) || (own_close && now >= applied_ms + 2 * grace_ms);
        let settle_max_ms = applied_ms + 2 * self.args.plan.round.round_deadline_ms + 4 * grace_ms;
        if !confirmed && now < settle_max_ms {
            return;
        }
        if !confirmed {
            tracing::warn!(
                round,
                "the last round's model was not confirmed by its proposer; finishing with it"
            );
        }
        if let Some(mut report) = self.final_report.take() {
            // The round chain's decisions known by now (the last round's included).
            self.chain_counters_into(&mut report);
            if let Some(consensus_round) = self.chain.as_ref().and_then(|c| c.decided(round)) {
                report.decided_in_consensus_round = Some(consensus_round);
            }
            self.finished = true;
            let _ = self.args.reports.try_send(report);
        }
    }
}

impl ExchangerState {
    /// After round `round` was applied with model hash `hash`: draws the audited contributions,
    /// records their verifiers, and queues those assigned to this peer.
    fn schedule_audits(&mut self, myself: &ActorRef<ExchangerMsg>, round: u64, hash: &BlobHash) {
        let Some((base_round, params, contributions)) = self.audit_base.take() else {
            return;
        };
        let Some(config) = self.args.plan.audit else {
            return;
        };
        if base_round != round {
            return;
        }
        let job = self.args.plan.job_id;
        let contributors: Vec<PeerKey> = contributions.iter().map(|c| c.author).collect();
        for commitment in &contributions {
            if !audit_sampled(&job, round, &commitment.author, hash, config.fraction) {
                continue;
            }
            let Some(verifier) =
                audit_verifier(&job, round, &commitment.author, hash, &contributors)
            else {
                continue;
            };
            self.audit_assignments
                .insert((round, commitment.author), verifier);
            if verifier == self.me
                && self.args.auditor.is_some()
                && self.audit_queue.len() < MAX_QUEUED_AUDITS
            {
                self.audit_queue.push_back(PendingAudit {
                    round,
                    subject: commitment.author,
                    params: params.clone(),
                    blob_hash: commitment.blob_hash,
                });
            }
        }
        let floor = round.saturating_sub(AUDIT_ROUNDS_KEPT);
        self.audit_assignments
            .retain(|(audited_round, _), _| *audited_round >= floor);
        self.next_audit(myself);
    }

    /// Hands the next queued audit to the auditor when none is running.
    fn next_audit(&mut self, myself: &ActorRef<ExchangerMsg>) {
        if self.audit_running {
            return;
        }
        let Some(auditor) = self.args.auditor.clone() else {
            return;
        };
        let Some(audit) = self.audit_queue.pop_front() else {
            return;
        };
        let work = work_of_round(self.args.plan.strategy, audit.round);
        self.pending_audit = Some(audit.clone());
        self.audit_running = auditor
            .cast(TrainerMsg::Audit {
                round: audit.round,
                subject: audit.subject,
                params: audit.params,
                work,
                shard: ShardKey {
                    seed: self.args.plan.data_seed,
                    peer: audit.subject,
                },
                reply_to: myself.clone(),
            })
            .is_ok();
    }

    /// The auditor's recomputation arrived: compare it with the contribution on the transmitted
    /// coordinates, publish the verdict and take it.
    fn on_audited(
        &mut self,
        myself: &ActorRef<ExchangerMsg>,
        round: u64,
        subject: PeerKey,
        result: Result<Vec<f32>, String>,
    ) {
        self.audit_running = false;
        let pending = self.pending_audit.take();
        let (Some(config), Some(pending)) = (self.args.plan.audit, pending) else {
            self.next_audit(myself);
            return;
        };
        if pending.round != round || pending.subject != subject {
            self.next_audit(myself);
            return;
        }
        let recomputed = match result {
            Ok(update) => update,
            Err(why) => {
                tracing::warn!(%why, round, "audit could not recompute; no verdict");
                self.next_audit(myself);
                return;
            }
        };
        let blob = self
            .args
            .blobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pending.blob_hash);
        let limit = self.args.plan.round.max_blob_bytes as usize;
        let cosine = match blob.map(|b| compress::decode(&b, limit, self.params.len())) {
            Some(Ok((update, _))) => robust::cosine_on_support(&update, &recomputed),
            _ => {
                tracing::warn!(round, "audited blob no longer held; no verdict");
                self.next_audit(myself);
                return;
            }
        };
        let verdict = AuditVerdict {
            job_id: self.args.plan.job_id,
            round,
            subject,
            verifier: self.me,
            cosine_milli: (cosine * 1000.0).round() as i32,
            passed: cosine >= config.min_cosine,
        };
        self.publish(&TrainMessage::Audit(verdict.clone()));
        self.on_verdict(&verdict);
        self.next_audit(myself);
    }

    /// An audit verdict from its assigned verifier: a failed one excludes the contributor for
    /// a while (its commitments are refused, and closes listing one).
    fn on_verdict(&mut self, verdict: &AuditVerdict) {
        let Some(config) = self.args.plan.audit else {
            return;
        };
        if verdict.job_id != self.args.plan.job_id
            || self
                .audit_assignments
                .get(&(verdict.round, verdict.subject))
                .is_none_or(|v| *v != verdict.verifier)
        {
            return;
        }
        // Each assignment is taken once.
        self.audit_assignments
            .remove(&(verdict.round, verdict.subject));
        let cosine = verdict.cosine_milli as f32 / 1000.0;
        if verdict.verifier == self.me {
            self.report.audits.push(AuditRecord {
                round: verdict.round,
                subject: hex(&verdict.subject),
                verifier: hex(&verdict.verifier),
                cosine,
                passed: verdict.passed,
            });
        }
        metrics::counter!("loom_train_audits_total").increment(1);
        if verdict.passed {
            return;
        }
        self.report.audits_failed += 1;
        metrics::counter!("loom_train_audits_failed_total").increment(1);
        let through = self.engine.current_round() + config.exclusion_rounds;
        tracing::warn!(
            round = verdict.round,
            subject = %crate::short(&verdict.subject),
            cosine,
            through,
            "contribution failed its audit; contributor excluded"
        );
        self.engine.exclude(
            verdict.subject,
            through,
            format!(
                "excluded: failed the audit of round {} (cosine {cosine:.3})",
                verdict.round
            ),
        );
    }
}

/// What every contributor computes for `round`: the same for its own update and for an audit
/// of someone else's.
fn work_of_round(strategy: Strategy, round: u64) -> Work {
    match strategy {
        Strategy::Sync(_) => Work::Gradient { step: round - 1 },
        Strategy::Diloco { inner_steps, .. } => Work::Inner {
            first_step: (round - 1) * u64::from(inner_steps),
            steps: inner_steps,
        },
    }
}

/// Most batches the cheap check measures one contribution on.
pub const LOSS_CHECK_BATCHES: u64 = 4;

/// The global steps whose batches the cheap check measures `author`'s contribution of `round`
/// on: batches its work was assigned (all of them up to [`LOSS_CHECK_BATCHES`], else that many
/// consecutive ones from an offset drawn from the job, round and author), the same on every
/// peer.
pub fn loss_check_steps(job: &JobId, round: u64, author: &PeerKey, work: Work) -> Vec<u64> {
    match work {
        Work::Gradient { step } => vec![step],
        Work::Inner { first_step, steps } => {
            let steps = u64::from(steps.max(1));
            let count = steps.min(LOSS_CHECK_BATCHES);
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"loom/losscheck/v1\0");
            hasher.update(job);
            hasher.update(&round.to_le_bytes());
            hasher.update(author);
            let draw = hasher.finalize();
            let draw = u64::from_le_bytes(draw.as_bytes()[..8].try_into().unwrap_or([0; 8]));
            let offset = draw % (steps - count + 1);
            (0..count).map(|i| first_step + offset + i).collect()
        }
    }
}

/// The updates of `used` (sorted by author), in that order.
fn sorted_updates<'a>(
    refs: &[(PeerKey, &'a compress::SparseUpdate)],
    used: &[PeerKey],
) -> Vec<&'a compress::SparseUpdate> {
    used.iter()
        .filter_map(|k| refs.iter().find(|(r, _)| r == k).map(|(_, u)| *u))
        .collect()
}

/// Lower-case hex of a hash.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> PeerKey {
        [i; 32]
    }

    #[test]
    fn audit_draws_follow_the_fraction_and_every_peer_draws_the_same() {
        let job = [1; 32];
        let hash = [2; 32];
        let keys: Vec<PeerKey> = (1..=200).map(key).collect();
        assert!(keys.iter().all(|k| !audit_sampled(&job, 3, k, &hash, 0.0)));
        assert!(keys.iter().all(|k| audit_sampled(&job, 3, k, &hash, 1.0)));
        let half = keys
            .iter()
            .filter(|k| audit_sampled(&job, 3, k, &hash, 0.5))
            .count();
        assert!((60..=140).contains(&half), "{half} of 200 at one half");
        // Another model hash draws another sample (nobody knows it when committing).
        let other: Vec<bool> = keys
            .iter()
            .map(|k| audit_sampled(&job, 3, k, &[9; 32], 0.5))
            .collect();
        let same: Vec<bool> = keys
            .iter()
            .map(|k| audit_sampled(&job, 3, k, &hash, 0.5))
            .collect();
        assert_ne!(other, same);
    }

    #[test]
    fn the_loss_check_batches_are_ones_the_author_trained_on() {
        let job = [3; 32];
        let work = Work::Inner {
            first_step: 40,
            steps: 10,
        };
        let drawn: Vec<Vec<u64>> = (0..64u8)
            .map(|i| loss_check_steps(&job, 5, &key(i), work))
            .collect();
        for steps in &drawn {
            assert_eq!(steps.len() as u64, LOSS_CHECK_BATCHES);
            assert!(steps.iter().all(|s| (40..50).contains(s)), "{steps:?}");
            assert!(steps.windows(2).all(|w| w[1] == w[0] + 1), "{steps:?}");
        }
        let offsets: std::collections::BTreeSet<u64> = drawn.iter().map(|s| s[0]).collect();
        assert!(offsets.len() > 4, "the draw spreads: {offsets:?}");
        assert_eq!(
            loss_check_steps(&job, 5, &key(1), work),
            loss_check_steps(&job, 5, &key(1), work)
        );
        let few = Work::Inner {
            first_step: 8,
            steps: 2,
        };
        assert_eq!(loss_check_steps(&job, 5, &key(1), few), vec![8, 9]);
        assert_eq!(
            loss_check_steps(&job, 5, &key(1), Work::Gradient { step: 4 }),
            vec![4]
        );
    }

    #[test]
    fn the_verifier_is_another_contributor_the_same_for_every_peer() {
        let job = [1; 32];
        let contributors = [key(1), key(2), key(3)];
        for subject in &contributors {
            let verifier =
                audit_verifier(&job, 5, subject, &[7; 32], &contributors).expect("a verifier");
            assert_ne!(&verifier, subject);
            assert!(contributors.contains(&verifier));
            let mut reordered = contributors;
            reordered.reverse();
            assert_eq!(
                audit_verifier(&job, 5, subject, &[7; 32], &reordered),
                Some(verifier)
            );
        }
        assert_eq!(audit_verifier(&job, 5, &key(1), &[7; 32], &[key(1)]), None);
    }
}
