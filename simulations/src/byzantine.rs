//! Byzantine training runs: real libtorch learners and the real Trainer and GradientExchanger
//! actors, several peers in one process joined by an in-memory bus, with a minority of peers
//! misbehaving. Each run reports, round by round, which contributions the honest peers refused
//! and why, the final validation loss, and the credits a ledger would pay for the rounds.
//!
//! Misbehaviours come in two kinds:
//! - **poisoned updates** (random noise, a sign flip, ×100, all zeros): the peer runs the honest
//!   exchanger with a learner whose update is rewritten after every inner loop;
//! - **protocol attacks** (a copy of another peer's update, a stale update replayed from an old
//!   round, a forged signature): the peer's network port rewrites or adds commitments.
//!
//! The bus stands in for gossip and the blob protocol only; everything that decides what counts
//! (commit-then-reveal, the verifier's screening, aggregation) is the production code.
//!
//! With `LOOM_SIM_TRACE` set, each run prints every honest peer's report of every round (model,
//! accepted, refused, who closed, resyncs) to stderr.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use ed25519_dalek::{Signer, SigningKey};
use loom_actors::{
    ExchangerActor, ExchangerArgs, ExchangerMsg, HeartbeatSigner, JobPlan, Learner, LearnerError,
    LearnerSlot, NetworkPort, PortError, RoundReport, ShardKey, SharedBlobs, StepReport, Strategy,
    Topic, TrainerActor, TrainerMsg,
};
use loom_node::jobs::{
    RoundTerms, adopted_votes, report_model_hash, same_choice, vote_entry, voted_result,
};
use loom_protocols::{
    NatStatus, PeerKey,
    blobstore::BlobStore,
    compress::{self, Codec, Sparsity, ValueFormat},
    consensus::ConsensusMessage,
    contribution::{BlobHash, Commitment, SignedCommitment},
    credits::CreditState,
    ledger::{Credits, Entry, JobTerms, accepted_digest},
    outer::OuterConfig,
    round::{RoundConfig, TrainMessage},
    snapshot::{OuterState, Snapshot},
    verify::ScreeningConfig,
};
use loom_trainer::{Dataset, DeviceChoice, LearnerConfig, ModelSpec, TchLearner};
use ractor::{Actor, ActorRef};
use serde::Serialize;
use tokio::sync::mpsc;

/// What a byzantine peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Misbehaviour {
    /// Its update is replaced by random noise of the same norm.
    Noise,
    /// Its update points the other way.
    SignFlip,
    /// Its update is scaled ×100.
    Scale100,
    /// It sends all zeros (a free rider).
    Zero,
    /// It commits a copy of another peer's update instead of its own.
    Copy,
    /// It replays its own update of two rounds before.
    Stale,
    /// It also sends commitments in another peer's name with a forged signature.
    ForgedSignature,
}

impl Misbehaviour {
    /// Every misbehaviour, in table order.
    pub const ALL: [Misbehaviour; 7] = [
        Misbehaviour::Noise,
        Misbehaviour::SignFlip,
        Misbehaviour::Scale100,
        Misbehaviour::Zero,
        Misbehaviour::Copy,
        Misbehaviour::Stale,
        Misbehaviour::ForgedSignature,
    ];

    /// The name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Misbehaviour::Noise => "random noise",
            Misbehaviour::SignFlip => "sign flip",
            Misbehaviour::Scale100 => "update x100",
            Misbehaviour::Zero => "all-zero free rider",
            Misbehaviour::Copy => "copy of another peer's update",
            Misbehaviour::Stale => "stale update (replay of round r-2)",
            Misbehaviour::ForgedSignature => "forged signature",
        }
    }

    /// The first round in which it misbehaves (a replay needs an old round to replay).
    fn first_round(self) -> u64 {
        match self {
            Misbehaviour::Stale => 3,
            _ => 1,
        }
    }
}

/// One run's settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ByzantineConfig {
    /// Peers in all.
    pub peers: usize,
    /// How many of them misbehave (the last ones).
    pub byzantine: usize,
    /// What they do (None: an all-honest baseline).
    pub misbehaviour: Option<Misbehaviour>,
    /// Rounds to train.
    pub rounds: u64,
    /// Share of contributions audited by recomputation (0: none).
    pub audit: f64,
    /// Whether the verifier screens updates (off: the commitment checks, the cheap loss check
    /// and audits are left).
    pub screen: bool,
}

/// Smallest cosine an audited contribution must have with its recomputation in these runs.
pub const AUDIT_MIN_COSINE: f64 = 0.3;

/// Credits paid per accepted contribution in the run's ledger accounting.
pub const PAY_PER_CONTRIBUTION: Credits = 10;

/// What one run showed.
#[derive(Debug, Clone, Serialize)]
pub struct ByzantineOutcome {
    /// The settings.
    pub config: ByzantineConfig,
    /// Rounds in which the byzantine peers misbehaved.
    pub misbehaving_rounds: u64,
    /// Of those, rounds in which every byzantine contribution (or forged commitment) was refused
    /// in that same round.
    pub detected_same_round: u64,
    /// Rounds in which a byzantine contribution went into the model.
    pub byzantine_accepted_rounds: u64,
    /// Refusals of honest contributions (must be 0).
    pub honest_refusals: u64,
    /// The distinct reasons given for refusing byzantine contributions.
    pub reasons: Vec<String>,
    /// Forged commitments refused at the signature check (seen by the first honest peer).
    pub forged_refused: u64,
    /// Final validation loss on the first honest peer.
    pub final_val_loss: f32,
    /// Whether every honest peer ended with the same model hash.
    pub models_identical: bool,
    /// Credits earned by each honest peer, from a ledger fold of the rounds' results.
    pub honest_credits: Vec<Credits>,
    /// Round results the ledger's credit rules refused (each should apply: it pays the round's
    /// own contributors, backed by their commitments, within the job's terms).
    pub ledger_refusals: Vec<String>,
    /// Results the byzantine members recorded first in the misbehaving runs (paying one honest
    /// contributor of the round, leaving the others out and slashing another, backed by their
    /// real commitments and every byzantine vote) that the ledger refused: one per round with
    /// two honest contributors.
    pub forged_results_refused: u64,
    /// Of those, the ones the ledger took (must be 0).
    pub forged_results_taken: u64,
    /// Rounds the job's round chain decided, as the first honest peer knew at the end (every
    /// round has a committee but the first).
    pub chain_decided: u64,
    /// Decided rounds whose close differed from the one the first honest peer applied.
    pub chain_overruled: u64,
    /// Reputation of each honest peer.
    pub honest_reputation: Vec<i64>,
    /// Credits of each byzantine peer at the end (they start at 0; slashes come from escrow
    /// they do not have, so only reputation falls).
    pub byzantine_reputation: Vec<i64>,
    /// Whether minted = balances + escrow at the end.
    pub credits_conserved: bool,
    /// Smallest cosine, over rounds, between an honest update and the sum of the other honest
    /// updates (the margin above the screening threshold).
    pub honest_cosine_min: f64,
    /// The smallest relative loss decrease the cheap check measured for an honest contribution
    /// ((before − after) / before on its assigned batch; the check refuses at 0 or below).
    pub honest_loss_drop_min: f64,
    /// Every relative loss decrease the cheap check measured for an honest contribution.
    pub honest_loss_drops: Vec<f64>,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Round by round, as the first honest peer saw it.
    pub rounds: Vec<RoundLine>,
    /// Audit cosines of honest contributions (every honest verifier's verdicts).
    pub audit_cosines_honest: Vec<f32>,
    /// Audit cosines of byzantine contributions.
    pub audit_cosines_byzantine: Vec<f32>,
}

/// One round of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RoundLine {
    /// The round.
    pub round: u64,
    /// Contributions in the model.
    pub accepted: usize,
    /// Byzantine contributions in the model.
    pub byzantine_accepted: usize,
    /// Refusals: (peer index, reason).
    pub refused: Vec<(usize, String)>,
    /// Validation loss after the round.
    pub val_loss: Option<f32>,
    /// Whether the first honest peer closed the round itself.
    pub closed_by_reference: bool,
    /// Its counters so far: stale, forged and after-reveal commitments.
    pub stale_forged_after_reveal: (u64, u64, u64),
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum ByzantineError {
    /// The model could not be built.
    #[error("cannot build the model: {0}")]
    Model(String),
    /// An actor did not start.
    #[error("cannot start an actor: {0}")]
    Spawn(String),
    /// A peer stopped reporting.
    #[error("peer {peer} reported no round after {after} within {secs} s")]
    Stalled {
        /// The peer index.
        peer: usize,
        /// Its last round.
        after: u64,
        /// The wait.
        secs: u64,
    },
}

// ---------------------------------------------------------------------------------------------
// The bus.

#[derive(Default)]
pub(crate) struct Bus {
    peers: Mutex<HashMap<PeerKey, BusEntry>>,
    /// Every signed commitment published, in order (what a copier watches).
    commitments: Mutex<Vec<SignedCommitment>>,
    /// Cut off the first peer that proposes in the round chain at this height or later.
    pub(crate) cut_from_height: Option<u64>,
    /// The peer cut off: nothing it sends goes out, nothing reaches it, its blobs are gone.
    pub(crate) cut: Mutex<Option<PeerKey>>,
}

impl Bus {
    /// A bus that cuts off the round chain's coordinator of height `height` (or the first
    /// later one to propose) the moment it proposes.
    pub(crate) fn cutting_at(height: u64) -> Self {
        Self {
            cut_from_height: Some(height),
            ..Self::default()
        }
    }

    fn is_cut(&self, peer: &PeerKey) -> bool {
        self.cut.lock().unwrap_or_else(|e| e.into_inner()).as_ref() == Some(peer)
    }

    /// Whether `from`, publishing `data`, is the coordinator to cut off now (it then is).
    fn cuts(&self, from: PeerKey, data: &[u8]) -> bool {
        let Some(height) = self.cut_from_height else {
            return false;
        };
        let mut cut = self.cut.lock().unwrap_or_else(|e| e.into_inner());
        if cut.is_some() {
            return false;
        }
        let proposes = matches!(
            TrainMessage::from_bytes(data),
            Ok(TrainMessage::Chain(ConsensusMessage::Proposal { height: h, .. })) if h >= height
        );
        if proposes {
            *cut = Some(from);
        }
        proposes
    }
}

#[derive(Clone)]
pub(crate) struct BusEntry {
    exchanger: ActorRef<ExchangerMsg>,
    blobs: SharedBlobs,
}

impl Bus {
    fn broadcast(&self, from: PeerKey, data: &[u8]) {
        if self.is_cut(&from) || self.cuts(from, data) {
            return;
        }
        if let Ok(TrainMessage::Commit(signed)) = TrainMessage::from_bytes(data) {
            let mut log = self.commitments.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() < 100_000 {
                log.push(signed);
            }
        }
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        for (key, entry) in peers.iter() {
            if *key != from && !self.is_cut(key) {
                let _ = entry.exchanger.cast(ExchangerMsg::Gossip {
                    from,
                    data: data.to_vec(),
                });
            }
        }
    }

    fn blob_of(&self, holder: &PeerKey, hash: &BlobHash) -> Option<Vec<u8>> {
        if self.is_cut(holder) {
            return None;
        }
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let entry = peers.get(holder)?;
        let store = entry.blobs.lock().unwrap_or_else(|e| e.into_inner());
        store.get(hash).map(|b| b.as_ref().clone())
    }
}

struct BusPort {
    me: PeerKey,
    key: SigningKey,
    bus: Arc<Bus>,
    job: [u8; 32],
    attack: Option<Misbehaviour>,
    own_blobs: SharedBlobs,
    /// Own commitments by round (hash, length), for the replay attack.
    history: Mutex<BTreeMap<u64, (BlobHash, u64)>>,
    /// Rounds already attacked (commitments are republished until the round closes).
    attacked: Mutex<HashSet<u64>>,
    victim: PeerKey,
}

impl BusPort {
    fn sign(&self, commitment: &Commitment) -> SignedCommitment {
        commitment.seal(|m| self.key.sign(m).to_bytes().to_vec())
    }

    fn publish_commit(&self, signed: SignedCommitment) {
        self.bus
            .broadcast(self.me, &TrainMessage::Commit(signed).to_bytes());
    }

    /// Rewrites this peer's own commitment of `round` per the attack; true when the original
    /// must not go out.
    fn attack_commit(&self, own: &Commitment) -> bool {
        let Some(attack) = self.attack else {
            return false;
        };
        let first_time = self
            .attacked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(own.round);
        // What this peer published in each round: a replay repeats what went out two rounds
        // before (itself a replay from the fifth round on).
        let old = {
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            let replayed = (attack == Misbehaviour::Stale
                && own.round >= Misbehaviour::Stale.first_round())
            .then(|| history.get(&(own.round - 2)).copied())
            .flatten();
            history
                .entry(own.round)
                .or_insert(replayed.unwrap_or((own.blob_hash, own.blob_len)));
            replayed
        };
        match attack {
            Misbehaviour::Copy => {
                if first_time {
                    self.spawn_copier(own.clone());
                }
                true
            }
            Misbehaviour::Stale if own.round >= Misbehaviour::Stale.first_round() => {
                if let Some((hash, len)) = old {
                    let replay = Commitment {
                        blob_hash: hash,
                        blob_len: len,
                        ..own.clone()
                    };
                    self.publish_commit(self.sign(&replay));
                }
                true
            }
            Misbehaviour::ForgedSignature => {
                if first_time {
                    let forged = Commitment {
                        job_id: self.job,
                        round: own.round,
                        blob_hash: *blake3::hash(&own.round.to_le_bytes()).as_bytes(),
                        blob_len: own.blob_len,
                        author: self.victim,
                    };
                    let mut signed = self.sign(&forged);
                    signed.signature = vec![0x5a; 64];
                    self.publish_commit(signed);
                }
                false
            }
            _ => false,
        }
    }

    /// Waits for another peer's blob of the round to be revealed, then commits a copy of it.
    fn spawn_copier(&self, own: Commitment) {
        let bus = self.bus.clone();
        let key = self.key.clone();
        let me = self.me;
        let own_blobs = self.own_blobs.clone();
        tokio::spawn(async move {
            for _ in 0..2_000 {
                let candidates: Vec<Commitment> = bus
                    .commitments
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter_map(|s| s.verify().ok())
                    .filter(|c| c.round == own.round && c.author != me)
                    .collect();
                for original in candidates {
                    if let Some(bytes) = bus.blob_of(&original.author, &original.blob_hash) {
                        own_blobs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(bytes);
                        let copy = Commitment {
                            blob_hash: original.blob_hash,
                            blob_len: original.blob_len,
                            ..own.clone()
                        };
                        let signed = copy.seal(|m| key.sign(m).to_bytes().to_vec());
                        bus.broadcast(me, &TrainMessage::Commit(signed).to_bytes());
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
}

impl NetworkPort for BusPort {
    fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), PortError> {
        if topic != Topic::Training {
            return Ok(());
        }
        // A peer attacking the protocol does not coordinate rounds: its own engine would close
        // with the honest commitment it keeps to itself.
        if matches!(self.attack, Some(Misbehaviour::Copy | Misbehaviour::Stale))
            && matches!(TrainMessage::from_bytes(&data), Ok(TrainMessage::Close(_)))
        {
            return Ok(());
        }
        if let Ok(TrainMessage::Commit(signed)) = TrainMessage::from_bytes(&data)
            && let Ok(own) = signed.verify()
            && own.author == self.me
            && self.attack_commit(&own)
        {
            return Ok(());
        }
        self.bus.broadcast(self.me, &data);
        Ok(())
    }

    fn connect_hint(&self, _: PeerKey, _: Vec<String>, _: NatStatus) -> Result<(), PortError> {
        Ok(())
    }

    fn fetch_blob(&self, peer: PeerKey, hash: BlobHash) -> Result<(), PortError> {
        let me = self
            .bus
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.me)
            .ok_or(PortError::Closed)?
            .exchanger
            .clone();
        let result = (!self.bus.is_cut(&self.me))
            .then(|| self.bus.blob_of(&peer, &hash))
            .flatten()
            .ok_or_else(|| "peer does not hold the blob".to_owned());
        let _ = me.cast(ExchangerMsg::BlobFetched {
            hash,
            from: peer,
            result,
        });
        Ok(())
    }
}

struct KeySigner(SigningKey);

impl HeartbeatSigner for KeySigner {
    fn public_key(&self) -> PeerKey {
        self.0.verifying_key().to_bytes()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).to_bytes().to_vec()
    }
}

// ---------------------------------------------------------------------------------------------
// Poisoned learners.

/// A learner whose inner-loop result is rewritten so the update it yields is poisoned.
struct Poisoned {
    inner: TchLearner,
    misbehaviour: Misbehaviour,
    rng: u64,
}

impl Poisoned {
    fn next_gaussian(&mut self) -> f32 {
        // Box-Muller over a splitmix64 stream.
        let mut uniform = || {
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let (u1, u2) = (uniform().max(1e-12), uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

impl Learner for Poisoned {
    fn param_count(&self) -> usize {
        self.inner.param_count()
    }

    fn params(&self) -> Vec<f32> {
        self.inner.params()
    }

    fn set_params(&mut self, flat: &[f32]) -> Result<(), LearnerError> {
        self.inner.set_params(flat)
    }

    fn train_inner(
        &mut self,
        first_step: u64,
        steps: u32,
        shard: ShardKey,
    ) -> Result<StepReport, LearnerError> {
        let start = self.inner.params();
        let report = self.inner.train_inner(first_step, steps, shard)?;
        let end = self.inner.params();
        let delta: Vec<f32> = end.iter().zip(&start).map(|(e, s)| e - s).collect();
        let poisoned: Vec<f32> = match self.misbehaviour {
            Misbehaviour::Noise => {
                let norm = delta.iter().map(|d| d * d).sum::<f32>().sqrt();
                let noise: Vec<f32> = (0..delta.len()).map(|_| self.next_gaussian()).collect();
                let noise_norm = noise.iter().map(|d| d * d).sum::<f32>().sqrt().max(1e-12);
                noise.iter().map(|n| n * norm / noise_norm).collect()
            }
            Misbehaviour::SignFlip => delta.iter().map(|d| -d).collect(),
            Misbehaviour::Scale100 => delta.iter().map(|d| d * 100.0).collect(),
            Misbehaviour::Zero => vec![0.0; delta.len()],
            _ => delta,
        };
        let rewritten: Vec<f32> = start.iter().zip(&poisoned).map(|(s, p)| s + p).collect();
        self.inner.set_params(&rewritten)?;
        Ok(report)
    }

    fn gradient(
        &mut self,
        step: u64,
        shard: ShardKey,
    ) -> Result<(Vec<f32>, StepReport), LearnerError> {
        self.inner.gradient(step, shard)
    }

    fn validation_loss(&mut self) -> Result<f32, LearnerError> {
        self.inner.validation_loss()
    }

    fn batch_loss(&mut self, step: u64, shard: ShardKey) -> Result<f32, LearnerError> {
        self.inner.batch_loss(step, shard)
    }

    fn tokens_per_step(&self) -> u64 {
        self.inner.tokens_per_step()
    }
}

// ---------------------------------------------------------------------------------------------
// Runs.

const JOB: [u8; 32] = [0xb7; 32];

fn learner_config() -> LearnerConfig {
    LearnerConfig {
        model: ModelSpec::Mlp {
            hidden: 32,
            layers: 1,
            embed: 8,
            context: 4,
        },
        batch: 8,
        lr: 3e-3,
        device: DeviceChoice::Cpu,
        threads: 1,
        eval_batches: 4,
        ..LearnerConfig::default()
    }
}

fn plan(rounds: u64, peers: usize, audit: f64, screen: bool) -> JobPlan {
    JobPlan {
        job_id: JOB,
        rounds,
        strategy: Strategy::Diloco {
            inner_steps: 4,
            outer: OuterConfig::default(),
        },
        codec: Codec {
            sparsity: Sparsity::TopK { ratio: 0.1 },
            values: ValueFormat::Int8,
        },
        feedback_decay: 0.95,
        round: RoundConfig {
            round_deadline_ms: 1_500,
            proposer_grace_ms: 500,
            max_contributors: peers.max(1) * 2,
            ..RoundConfig::default()
        },
        data_seed: 3,
        checkpoint_every: 0,
        join_wait_ms: 300,
        eval_every: 1,
        aggregation: loom_actors::Aggregation::Mean,
        screening: screen.then(ScreeningConfig::default),
        audit: (audit > 0.0).then_some(loom_actors::exchanger::AuditConfig {
            fraction: audit,
            min_cosine: AUDIT_MIN_COSINE,
            exclusion_rounds: rounds,
        }),
        loss_check: true,
    }
}

pub(crate) struct Peer {
    pub(crate) key: PeerKey,
    pub(crate) exchanger: ActorRef<ExchangerMsg>,
    pub(crate) trainer: ActorRef<TrainerMsg>,
    pub(crate) reports: mpsc::Receiver<RoundReport>,
    pub(crate) seen: Vec<RoundReport>,
    blobs: SharedBlobs,
    param_count: usize,
}

/// libtorch's seed is process-wide: learners are built one at a time.
static INIT: Mutex<()> = Mutex::new(());

pub(crate) async fn spawn_peer(
    bus: &Arc<Bus>,
    index: usize,
    config: &ByzantineConfig,
    dataset: &Arc<Dataset>,
    victim: PeerKey,
) -> Result<Peer, ByzantineError> {
    let signing = SigningKey::from_bytes(&[index as u8 + 1; 32]);
    let key = signing.verifying_key().to_bytes();
    let byzantine = index >= config.peers - config.byzantine;
    let misbehaviour = config.misbehaviour.filter(|_| byzantine);
    let learner = {
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        TchLearner::new(learner_config(), dataset.clone())
            .map_err(|e| ByzantineError::Model(e.to_string()))?
    };
    let params = learner.params();
    let n = params.len();
    let learner: Box<dyn Learner> = match misbehaviour {
        Some(
            m @ (Misbehaviour::Noise
            | Misbehaviour::SignFlip
            | Misbehaviour::Scale100
            | Misbehaviour::Zero),
        ) => Box::new(Poisoned {
            inner: learner,
            misbehaviour: m,
            rng: index as u64 * 7_919,
        }),
        // A copier does no work of its own: were it ever to close a round with its own
        // commitment, that would be an all-zero update.
        Some(Misbehaviour::Copy) => Box::new(Poisoned {
            inner: learner,
            misbehaviour: Misbehaviour::Zero,
            rng: 0,
        }),
        _ => Box::new(learner),
    };
    let slot: LearnerSlot = Arc::new(Mutex::new(Some(learner)));
    let (trainer, _) = Actor::spawn(None, TrainerActor, slot)
        .await
        .map_err(|e| ByzantineError::Spawn(e.to_string()))?;
    let auditor = if config.audit > 0.0 {
        let learner = {
            let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
            TchLearner::new(learner_config(), dataset.clone())
                .map_err(|e| ByzantineError::Model(e.to_string()))?
        };
        let slot: LearnerSlot = Arc::new(Mutex::new(Some(Box::new(learner) as Box<dyn Learner>)));
        let (auditor, _) = Actor::spawn(None, TrainerActor, slot)
            .await
            .map_err(|e| ByzantineError::Spawn(e.to_string()))?;
        Some(auditor)
    } else {
        None
    };
    let blobs: SharedBlobs = Arc::new(Mutex::new(BlobStore::new(256 << 20)));
    let (tx, reports) = mpsc::channel(4_096);
    let port = BusPort {
        me: key,
        key: signing.clone(),
        bus: bus.clone(),
        job: JOB,
        attack: misbehaviour.filter(|m| {
            matches!(
                m,
                Misbehaviour::Copy | Misbehaviour::Stale | Misbehaviour::ForgedSignature
            )
        }),
        own_blobs: blobs.clone(),
        history: Mutex::default(),
        attacked: Mutex::default(),
        victim,
    };
    let args = ExchangerArgs {
        plan: plan(config.rounds, config.peers, config.audit, config.screen),
        signer: Arc::new(KeySigner(signing.clone())),
        network: Arc::new(port),
        blobs: blobs.clone(),
        trainer: trainer.clone(),
        start: Arc::new(Snapshot {
            job_id: JOB,
            round: 0,
            params,
            outer: OuterState::Nesterov { buf: vec![0.0; n] },
        }),
        resumed: false,
        tokens_per_step: 32,
        checkpoints: None,
        reports: tx,
        rejections: Default::default(),
        auditor,
        chain_key: Some(signing.clone()),
    };
    let (exchanger, _) = Actor::spawn(None, ExchangerActor, args)
        .await
        .map_err(|e| ByzantineError::Spawn(e.to_string()))?;
    bus.peers.lock().unwrap_or_else(|e| e.into_inner()).insert(
        key,
        BusEntry {
            exchanger: exchanger.clone(),
            blobs: blobs.clone(),
        },
    );
    Ok(Peer {
        key,
        exchanger,
        trainer,
        reports,
        seen: Vec::new(),
        blobs,
        param_count: n,
    })
}

impl Peer {
    /// Collects reports until the job's last round is reported.
    async fn wait_finished(
        &mut self,
        index: usize,
        timeout: Duration,
    ) -> Result<(), ByzantineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.seen.last().is_some_and(|r| r.finished) {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(report)) => self.seen.push(report),
                _ => {
                    return Err(ByzantineError::Stalled {
                        peer: index,
                        after: self.seen.last().map_or(0, |r| r.round),
                        secs: timeout.as_secs(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The last report of each round.
    fn by_round(&self) -> BTreeMap<u64, &RoundReport> {
        self.seen.iter().map(|r| (r.round, r)).collect()
    }
}

fn hex(key: &PeerKey) -> String {
    loom_actors::exchanger::hex(key)
}

/// Runs one configuration to its last round.
pub async fn run(config: ByzantineConfig) -> Result<ByzantineOutcome, ByzantineError> {
    let started = std::time::Instant::now();
    let bus = Arc::new(Bus::default());
    let dataset = Arc::new(Dataset::builtin(42, 20_000));
    let victim = SigningKey::from_bytes(&[1; 32]).verifying_key().to_bytes();
    let mut peers = Vec::with_capacity(config.peers);
    for index in 0..config.peers {
        peers.push(spawn_peer(&bus, index, &config, &dataset, victim).await?);
    }
    let honest_count = config.peers - config.byzantine;
    let timeout = Duration::from_secs(60 + 10 * config.rounds);
    for (index, peer) in peers.iter_mut().enumerate().take(honest_count) {
        peer.wait_finished(index, timeout).await?;
    }
    let honest: Vec<PeerKey> = peers[..honest_count].iter().map(|p| p.key).collect();
    let byzantine: Vec<PeerKey> = peers[honest_count..].iter().map(|p| p.key).collect();
    if std::env::var_os("LOOM_SIM_TRACE").is_some() {
        // Each honest peer's view of every round, to tell a split or a late arrival apart.
        for (i, p) in peers.iter().enumerate().take(honest_count) {
            for r in &p.seen {
                eprintln!(
                    "peer {i} round {} model {} accepted {:?} refused {:?} closed_by_me {} resyncs {} majority_resyncs {} divergences_refused {} finished {}",
                    r.round,
                    r.model_hash.get(..8).unwrap_or_default(),
                    r.accepted
                        .iter()
                        .map(|a| a.get(..6).unwrap_or_default())
                        .collect::<Vec<_>>(),
                    r.refused
                        .iter()
                        .map(|x| x.author.get(..6).unwrap_or_default())
                        .collect::<Vec<_>>(),
                    r.closed_by_me,
                    r.resyncs,
                    r.majority_resyncs,
                    r.divergences_refused,
                    r.finished,
                );
            }
        }
    }
    let reference = peers[0].by_round();
    let honest_hex_all: Vec<String> = peers[..honest_count].iter().map(|p| hex(&p.key)).collect();
    let mut outcome = ByzantineOutcome {
        config,
        misbehaving_rounds: 0,
        detected_same_round: 0,
        byzantine_accepted_rounds: 0,
        honest_refusals: 0,
        reasons: Vec::new(),
        forged_refused: reference
            .values()
            .map(|r| r.forged_commitments)
            .max()
            .unwrap_or(0),
        final_val_loss: reference
            .values()
            .rev()
            .find_map(|r| r.val_loss)
            .unwrap_or(f32::NAN),
        models_identical: true,
        honest_credits: Vec::new(),
        ledger_refusals: Vec::new(),
        forged_results_refused: 0,
        forged_results_taken: 0,
        chain_decided: reference
            .values()
            .map(|r| r.chain_decided)
            .max()
            .unwrap_or(0),
        chain_overruled: reference
            .values()
            .map(|r| r.chain_overruled)
            .max()
            .unwrap_or(0),
        honest_reputation: Vec::new(),
        byzantine_reputation: Vec::new(),
        credits_conserved: false,
        honest_cosine_min: f64::INFINITY,
        honest_loss_drop_min: f64::INFINITY,
        honest_loss_drops: reference
            .values()
            .flat_map(|r| &r.loss_checks)
            .filter(|c| honest_hex_all.contains(&c.author))
            .map(|c| f64::from(c.before - c.after) / f64::from(c.before))
            .collect(),
        wall_s: 0.0,
        rounds: Vec::new(),
        audit_cosines_honest: Vec::new(),
        audit_cosines_byzantine: Vec::new(),
    };
    let last_hashes: Vec<Option<&String>> = peers[..honest_count]
        .iter()
        .map(|p| {
            p.seen
                .iter()
                .rev()
                .find(|r| r.finished)
                .map(|r| &r.model_hash)
        })
        .collect();
    outcome.models_identical = last_hashes.windows(2).all(|w| w[0] == w[1]);
    outcome.honest_loss_drop_min = outcome
        .honest_loss_drops
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let honest_hex: Vec<String> = honest.iter().map(hex).collect();
    let byzantine_hex: Vec<String> = byzantine.iter().map(hex).collect();
    // A ledger's view of the run: the submitter escrows, every round's result pays accepted
    // contributions and slashes refused ones, folded by the production credit rules.
    let submitter = [0xee; 32];
    let job_terms = JobTerms {
        rounds: config.rounds,
        max_contributors: config.peers as u32,
        per_contribution: PAY_PER_CONTRIBUTION,
        per_verdict: 0,
    };
    let mut credits = CreditState::default();
    let escrow = PAY_PER_CONTRIBUTION * config.peers as u64 * config.rounds * 2;
    // Folded as a block of one entry: a refused one changes nothing.
    let fold = |credits: &mut CreditState, author: &PeerKey, entry: &Entry| {
        let mut next = credits.clone();
        next.apply_finalized_entry(author, entry)
            .map_err(|e| e.to_string())?;
        *credits = next;
        Ok::<(), String>(())
    };
    let mut refusals = Vec::new();
    let ledger =
        |credits: &mut CreditState, refusals: &mut Vec<String>, author: &PeerKey, entry: Entry| {
            if let Err(e) = fold(credits, author, &entry) {
                refusals.push(e);
            }
        };
    ledger(
        &mut credits,
        &mut refusals,
        &submitter,
        Entry::Mint {
            to: submitter,
            amount: escrow,
        },
    );
    ledger(
        &mut credits,
        &mut refusals,
        &submitter,
        Entry::JobSubmitted {
            job: JOB,
            escrow,
            manifest: String::new(),
            terms: job_terms,
        },
    );
    // Every peer joins the job's committee; each honest one votes on each round it applied,
    // as a node does.
    for key in honest.iter().chain(&byzantine) {
        ledger(
            &mut credits,
            &mut refusals,
            key,
            Entry::JobJoined { job: JOB },
        );
    }
    let views: Vec<BTreeMap<u64, &RoundReport>> =
        peers[..honest_count].iter().map(Peer::by_round).collect();
    let round_terms = RoundTerms {
        job: JOB,
        terms: job_terms,
        available: 0,
    };
    let mut reasons = BTreeSet::new();
    let misbehaving_from = config.misbehaviour.map_or(u64::MAX, |m| m.first_round());
    // Refusals of commitments that came after their round's report went out, by round.
    let mut late_refused: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for late in peers[0].seen.iter().flat_map(|r| r.late_refused.iter()) {
        late_refused
            .entry(late.round)
            .or_default()
            .push(late.author.as_str());
    }
    for (&round, report) in reference.iter().filter(|(r, _)| **r > 0) {
        let mut refused_authors: Vec<&str> =
            report.refused.iter().map(|r| r.author.as_str()).collect();
        refused_authors.extend(late_refused.get(&round).into_iter().flatten());
        outcome.honest_refusals += honest_hex
            .iter()
            .filter(|h| refused_authors.contains(&h.as_str()))
            .count() as u64;
        let byzantine_in = byzantine_hex
            .iter()
            .filter(|b| report.accepted.contains(b))
            .count();
        if config.misbehaviour.is_some() && round >= misbehaving_from {
            outcome.misbehaving_rounds += 1;
            if byzantine_in > 0 && config.misbehaviour != Some(Misbehaviour::ForgedSignature) {
                outcome.byzantine_accepted_rounds += 1;
            }
            // A forged commitment is refused on arrival, whichever round is open then (the
            // forger sends the next round's early): counted over the run below.
            let detected = match config.misbehaviour {
                Some(Misbehaviour::ForgedSignature) => false,
                _ => byzantine_hex
                    .iter()
                    .all(|b| refused_authors.contains(&b.as_str())),
            };
            if detected {
                outcome.detected_same_round += 1;
            }
        }
        let index_of = |author: &str| {
            honest_hex
                .iter()
                .chain(&byzantine_hex)
                .position(|h| h == author)
                .unwrap_or(usize::MAX)
        };
        outcome.rounds.push(RoundLine {
            round,
            accepted: report.accepted.len(),
            byzantine_accepted: byzantine_in,
            refused: report
                .refused
                .iter()
                .map(|r| (index_of(&r.author), r.reason.clone()))
                .collect(),
            val_loss: report.val_loss,
            closed_by_reference: report.closed_by_me,
            stale_forged_after_reveal: (
                report.stale_commitments,
                report.forged_commitments,
                report.after_reveal_commitments,
            ),
        });
        for refusal in &report.refused {
            if byzantine_hex.contains(&refusal.author) {
                reasons.insert(reason_kind(&refusal.reason));
            }
        }
    }
    // Each honest peer's votes, from its reports in order, as a node casts them: its own vote
    // on each round it applied (a later one replaces an earlier one), and after a resync a vote
    // for each round of the loaded model's lineage it had not chosen alike itself.
    let honest_votes: Vec<BTreeMap<u64, Entry>> = peers[..honest_count]
        .iter()
        .map(|peer| {
            let mut votes: BTreeMap<u64, Entry> = BTreeMap::new();
            for report in &peer.seen {
                for adopted in adopted_votes(&round_terms, report) {
                    let Entry::RoundVote { round, .. } = adopted else {
                        continue;
                    };
                    let same = votes
                        .get(&round)
                        .is_some_and(|mine| same_choice(mine, &adopted));
                    if !same {
                        votes.insert(round, adopted);
                    }
                }
                if let Some(vote) = vote_entry(&round_terms, report) {
                    votes.insert(report.round, vote);
                }
            }
            votes
        })
        .collect();
    // The ledger's view of every round some honest peer applied.
    let all_rounds: BTreeSet<u64> = views
        .iter()
        .flat_map(|view| view.keys().copied())
        .filter(|round| *round > 0)
        .collect();
    for round in all_rounds {
        // Each honest peer votes on the round as it last applied it or, after a resync, as
        // the lineage of the model it loaded has it.
        for (key, votes) in honest.iter().zip(&honest_votes) {
            if let Some(vote) = votes.get(&round) {
                ledger(&mut credits, &mut refusals, key, vote.clone());
            }
        }
        // As on a node, the round is recorded by a peer that applied it (the reference, or a
        // backup recorder when the reference resynced past it), once a quorum of the votes is
        // for its model and accepted set; it slashes whom that quorum refused.
        let recorded = honest.iter().zip(&views).find_map(|(key, view)| {
            let mine = *view.get(&round)?;
            let slashable = voted_result(&credits, &round_terms, mine)?;
            Some((*key, mine, slashable))
        });
        let Some((recorder, mine, slashable)) = recorded else {
            refusals.push(format!(
                "round {round}: no honest peer applied it with a quorum of votes"
            ));
            continue;
        };
        let model_hash = report_model_hash(mine).unwrap_or_default();
        // Paid or slashed only with the contributor's commitment as evidence, as a node does.
        let accepted: Vec<(PeerKey, Credits)> = honest
            .iter()
            .chain(&byzantine)
            .filter(|k| mine.accepted.contains(&hex(k)) && mine.evidence_of(k).is_some())
            .map(|k| (*k, PAY_PER_CONTRIBUTION))
            .collect();
        let rejected: Vec<PeerKey> = honest
            .iter()
            .chain(&byzantine)
            .filter(|k| {
                mine.refused.iter().any(|r| r.author == hex(k))
                    && mine.evidence_of(k).is_some()
                    && slashable.contains(*k)
            })
            .filter(|k| !mine.accepted.contains(&hex(k)))
            .copied()
            .collect();
        // The byzantine members record first: a result for the honest model that pays one
        // honest contributor, leaves the others unpaid and slashes another, with their real
        // commitments as evidence and every byzantine vote behind it.
        let honest_in: Vec<PeerKey> = accepted
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| honest.contains(k))
            .collect();
        if config.misbehaviour.is_some()
            && let ([paid, slashed, ..], Some(forger)) = (honest_in.as_slice(), byzantine.first())
        {
            let forged = Entry::RoundResult {
                job: JOB,
                round,
                model_hash,
                accepted: vec![(*paid, PAY_PER_CONTRIBUTION)],
                rejected: vec![*slashed],
                evidence: [paid, slashed]
                    .into_iter()
                    .filter_map(|k| mine.evidence_of(k).cloned())
                    .collect(),
            };
            for key in &byzantine {
                let vote = Entry::RoundVote {
                    job: JOB,
                    round,
                    model_hash,
                    accepted_digest: accepted_digest([paid]),
                    rejected: vec![*slashed],
                };
                ledger(&mut credits, &mut refusals, key, vote);
            }
            match fold(&mut credits, forger, &forged) {
                Ok(()) => outcome.forged_results_taken += 1,
                Err(_) => outcome.forged_results_refused += 1,
            }
        }
        let evidence = accepted
            .iter()
            .map(|(k, _)| k)
            .chain(&rejected)
            .filter_map(|k| mine.evidence_of(k).cloned())
            .collect();
        ledger(
            &mut credits,
            &mut refusals,
            &recorder,
            Entry::RoundResult {
                job: JOB,
                round,
                model_hash,
                accepted,
                rejected,
                evidence,
            },
        );
    }
    outcome.ledger_refusals = refusals;
    if config.misbehaviour == Some(Misbehaviour::ForgedSignature) {
        reasons.insert("signature does not verify".into());
        // Every forged commitment is refused at the signature check: one per byzantine peer
        // and round sent, none admitted.
        outcome.detected_same_round = (outcome.forged_refused / config.byzantine.max(1) as u64)
            .min(outcome.misbehaving_rounds);
    }
    outcome.reasons = reasons.into_iter().collect();
    outcome.honest_credits = honest.iter().map(|k| credits.balance(k)).collect();
    outcome.honest_reputation = honest.iter().map(|k| credits.reputation(k)).collect();
    outcome.byzantine_reputation = byzantine.iter().map(|k| credits.reputation(k)).collect();
    outcome.credits_conserved = credits.check_conservation();
    outcome.honest_cosine_min = honest_cosine_min(&bus, &peers, &honest);
    for peer in &peers[..honest_count] {
        for audit in peer.seen.iter().flat_map(|r| &r.audits) {
            if honest_hex.contains(&audit.subject) {
                outcome.audit_cosines_honest.push(audit.cosine);
            } else if byzantine_hex.contains(&audit.subject) {
                outcome.audit_cosines_byzantine.push(audit.cosine);
            }
        }
    }
    for peer in &peers {
        peer.exchanger.stop(None);
        peer.trainer.stop(None);
    }
    outcome.wall_s = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// The smallest cosine between an honest update and the sum of the other honest updates of the
/// same round, over every round where at least two honest updates were committed.
fn honest_cosine_min(bus: &Bus, peers: &[Peer], honest: &[PeerKey]) -> f64 {
    let log = bus.commitments.lock().unwrap_or_else(|e| e.into_inner());
    let mut by_round: BTreeMap<u64, BTreeMap<PeerKey, BlobHash>> = BTreeMap::new();
    for signed in log.iter() {
        if let Ok(c) = signed.verify()
            && honest.contains(&c.author)
        {
            by_round
                .entry(c.round)
                .or_default()
                .insert(c.author, c.blob_hash);
        }
    }
    let len = peers.first().map_or(0, |p| p.param_count);
    let mut min = f64::INFINITY;
    for commits in by_round.values() {
        let mut updates = Vec::new();
        for (author, hash) in commits {
            let blob = peers.iter().find_map(|p| {
                p.blobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(hash)
                    .map(|b| b.as_ref().clone())
            });
            if let Some(blob) = blob
                && let Ok((update, _)) = compress::decode(&blob, blob.len(), len)
            {
                updates.push((*author, update));
            }
        }
        if updates.len() < 2 {
            continue;
        }
        let refs: Vec<(PeerKey, &compress::SparseUpdate)> =
            updates.iter().map(|(k, u)| (*k, u)).collect();
        for cosine in loom_protocols::verify::cosines(&refs) {
            min = min.min(cosine);
        }
    }
    min
}

/// Every misbehaviour for one committee shape, with its all-honest baseline first.
pub async fn run_shape(
    peers: usize,
    byzantine: usize,
    rounds: u64,
    only: Option<Misbehaviour>,
    audit: f64,
    screen: bool,
) -> Result<Vec<ByzantineOutcome>, ByzantineError> {
    let mut outcomes = vec![
        run(ByzantineConfig {
            peers,
            byzantine: 0,
            misbehaviour: None,
            rounds,
            audit,
            screen,
        })
        .await?,
    ];
    for misbehaviour in Misbehaviour::ALL {
        if only.is_some_and(|o| o != misbehaviour) {
            continue;
        }
        outcomes.push(
            run(ByzantineConfig {
                peers,
                byzantine,
                misbehaviour: Some(misbehaviour),
                rounds,
                audit,
                screen,
            })
            .await?,
        );
    }
    Ok(outcomes)
}

/// Whether an outcome meets the bar: a refusal recorded in the round itself in at least 80 % of
/// the misbehaving rounds, nothing byzantine in the model in any, no honest refusal, identical models, conserved credits, honest
/// credits as in the baseline, and a validation loss within 5 % of the baseline's.
pub fn verdict(outcome: &ByzantineOutcome, baseline: &ByzantineOutcome) -> Result<(), String> {
    let mut problems = Vec::new();
    // Every misbehaving round keeps the byzantine update out of the model (below); a refusal
    // with its reason is recorded in at least 80 % of them (in the others the byzantine
    // commitment reached the reference peer only after the round had closed without it).
    if outcome.detected_same_round * 5 < outcome.misbehaving_rounds * 4 {
        problems.push(format!(
            "detected in {} of {} rounds",
            outcome.detected_same_round, outcome.misbehaving_rounds
        ));
    }
    if outcome.byzantine_accepted_rounds > 0 {
        problems.push(format!(
            "byzantine update in the model in {} rounds",
            outcome.byzantine_accepted_rounds
        ));
    }
    if outcome.honest_refusals > 0 {
        problems.push(format!("{} honest refusals", outcome.honest_refusals));
    }
    if !outcome.models_identical {
        problems.push("honest models differ".into());
    }
    if !outcome.credits_conserved {
        problems.push("credits not conserved".into());
    }
    if let Some(refusal) = outcome.ledger_refusals.first() {
        problems.push(format!(
            "{} round results refused by the ledger, first: {refusal}",
            outcome.ledger_refusals.len()
        ));
    }
    if outcome.forged_results_taken > 0 {
        problems.push(format!(
            "{} forged round results taken by the ledger",
            outcome.forged_results_taken
        ));
    }
    if outcome.honest_reputation.iter().any(|r| *r < 0) {
        problems.push("an honest peer lost reputation".into());
    }
    let ratio = loss_ratio(outcome, baseline);
    if ratio.is_nan() || ratio > 1.05 {
        problems.push(format!(
            "validation loss {:.4} is {:.1} % above the baseline {:.4}",
            outcome.final_val_loss,
            (ratio - 1.0) * 100.0,
            baseline.final_val_loss
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Final validation loss relative to the baseline's.
pub fn loss_ratio(outcome: &ByzantineOutcome, baseline: &ByzantineOutcome) -> f64 {
    f64::from(outcome.final_val_loss) / f64::from(baseline.final_val_loss)
}

/// The byzantine table in Markdown: one row per (committee, misbehaviour).
pub fn table(shapes: &[Vec<ByzantineOutcome>]) -> String {
    let mut out = String::from(
        "| committee | misbehaviour | detected in its round | refused because | byzantine in model | honest refusals | forged results refused | rounds decided by the round chain | honest credits (baseline) | byzantine reputation | val loss vs baseline | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for outcomes in shapes {
        let Some(baseline) = outcomes.first() else {
            continue;
        };
        for outcome in &outcomes[1..] {
            let c = &outcome.config;
            let name = c.misbehaviour.map_or("none", |m| m.name());
            let detected = format!(
                "{}/{}",
                outcome.detected_same_round, outcome.misbehaving_rounds
            );
            let credits = format!(
                "{:?} ({:?})",
                outcome.honest_credits,
                &baseline.honest_credits[..outcome
                    .honest_credits
                    .len()
                    .min(baseline.honest_credits.len())]
            );
            let verdict = match verdict(outcome, baseline) {
                Ok(()) => "pass".to_owned(),
                Err(why) => format!("FAIL: {why}"),
            };
            out.push_str(&format!(
                "| {} of {} | {} | {} | {} | {} rounds | {} | {}/{} | {}/{} | {} | {:?} | {:+.1} % ({:.4} vs {:.4}) | {} |\n",
                c.byzantine,
                c.peers,
                name,
                detected,
                outcome.reasons.join("; "),
                outcome.byzantine_accepted_rounds,
                outcome.honest_refusals,
                outcome.forged_results_refused,
                outcome.forged_results_refused + outcome.forged_results_taken,
                outcome.chain_decided,
                c.rounds.saturating_sub(1),
                credits,
                outcome.byzantine_reputation,
                (loss_ratio(outcome, baseline) - 1.0) * 100.0,
                outcome.final_val_loss,
                baseline.final_val_loss,
                verdict
            ));
        }
    }
    out
}

/// A refusal reason without its numbers and peer names, so that reasons group.
fn reason_kind(reason: &str) -> String {
    let cut = reason
        .split(" (cosine")
        .next()
        .unwrap_or("")
        .split(" of the update of")
        .next()
        .unwrap_or("")
        .split(" (")
        .next()
        .unwrap_or("");
    let mut out = String::new();
    let mut in_number = false;
    for ch in cut.chars() {
        if ch.is_ascii_digit() || (in_number && ch == '.') {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(ch);
        }
    }
    out
}

/// The whole `docs/byzantine.md`: how the runs are made and read, the table, and each run's
/// margins.
pub fn document(shapes: &[Vec<ByzantineOutcome>], rounds: u64, audit: f64) -> String {
    let screening = ScreeningConfig::default();
    let screened = shapes
        .first()
        .and_then(|o| o.first())
        .is_none_or(|o| o.config.screen);
    let no_screen = if screened { "" } else { " --no-screen" };
    let mut out = format!(
        "# Byzantine training\n\n\
         Produced by `loom-sim byzantine --rounds {rounds} --audit {audit}{no_screen} --table \
         docs/byzantine.md` \
         (`simulations/src/byzantine.rs`); the test suite runs the same checks with 10 rounds \
         (`simulations/tests/byzantine.rs`).\n\n\
         Each run trains the same job on real libtorch learners (an MLP on the built-in text, \
         DiLoCo with 4 inner steps, top-k 10 % int8 updates with error feedback) with the real \
         Trainer and GradientExchanger actors, several peers in one process joined by an \
         in-memory bus standing in for gossip and the blob protocol. The last peers of each \
         committee misbehave from the first round on (a replay from the third, as it needs an \
         old round):\n\n\
         - **random noise**, **sign flip**, **update x100**, **all-zero free rider**: the peer's \
         learner rewrites its update after every inner loop; the exchanger is honest;\n\
         - **copy of another peer's update**: the peer does no work and commits the blob of the \
         first honest peer to reveal one, signed as its own;\n\
         - **stale update**: from the third round on the peer commits again what it published two \
         rounds before;\n\
         - **forged signature**: besides its own honest update the peer sends a commitment in \
         another peer's name with a forged signature.\n\n\
         What refuses them (`docs/protocols.md`, training rounds): commit-then-reveal and the \
         copy and replay checks on commitments, the signature check, and the verifier's \
         screening of every update before aggregation (non-finite, all zeros, duplicates, a \
         norm over {:.0}x the round's median or under it divided by that, a cosine below {:.2} \
         with the sum of the others), then the cheap check (every peer measures each update's \
         mean loss on up to 4 of the batches its author was assigned, at the round's starting model and \
         after the update, and refuses an update that does not lower it). With `--audit` a share of the accepted contributions is \
         also recomputed by an assigned verifier (its own learner, a fresh inner optimizer, the \
         subject's shard and steps) and compared on the transmitted coordinates; a cosine below \
         {AUDIT_MIN_COSINE} excludes the contributor for the rest of the run. Every contribution \
         that gets past the checks above is honest here, so the audits' column below is the \
         margin they keep.\n\n\
         Columns: *detected in its round* counts the rounds in which every byzantine \
         contribution was refused with a reason in that same round (for the forged signature: \
         the forged commitments refused), over the rounds the peer misbehaved in as seen by the \
         first honest peer, a replay or copy refused after the round's report went out \
         included (it names its round; the bar is 80 %: in the other rounds the byzantine \
         commitment reached that peer only after the round had closed without it, and was not \
         refused as a copy or replay then); *refused because* groups the reasons given; \
         *byzantine in model* counts \
         rounds where a byzantine update was aggregated; *honest credits* and *byzantine \
         reputation* come from folding, with the ledger's credit rules, every peer's join of the \
         job's committee, each honest peer's vote on each round it applied, and one \
         `RoundResult` per round that pays {PAY_PER_CONTRIBUTION} credits per accepted \
         contribution and slashes each refused one that a quorum of the votes refused, next to \
         the all-honest run of the same committee; *forged results refused* counts the results \
         the byzantine members recorded first in each round with two honest contributors (one \
         honest contributor paid, the others left out, another slashed, with their real \
         commitments and every byzantine vote behind it) that the ledger refused, over those \
         tried; *rounds decided by the round chain* counts the rounds after the first whose \
         close the job's round chain (its own Tendermint instance among the previous round's \
         contributors) decided, as the first honest peer knew by its last report (the last \
         round's decision often comes after it); *val loss* compares \
         the first honest peer's final validation loss with the all-honest run's (the bar is \
         5 %).\n\n",
        screening.max_norm_ratio, screening.min_cosine
    );
    out.push_str(&table(shapes));
    out.push_str("\nMargins and times:\n\n| committee | run | smallest cosine of an honest update with the other honest updates | smallest loss drop of an honest update (cheap check) | audits of honest contributions: count, smallest cosine | wall s |\n|---|---|---|---|---|---|\n");
    for outcomes in shapes {
        for outcome in outcomes {
            let c = &outcome.config;
            let audits = if outcome.audit_cosines_honest.is_empty() {
                "-".to_owned()
            } else {
                format!(
                    "{}, {:.3}",
                    outcome.audit_cosines_honest.len(),
                    outcome
                        .audit_cosines_honest
                        .iter()
                        .copied()
                        .fold(f32::INFINITY, f32::min)
                )
            };
            out.push_str(&format!(
                "| {} of {} | {} | {:.3} | {:.2} % | {audits} | {:.1} |\n",
                c.byzantine,
                c.peers,
                c.misbehaviour.map_or("all honest", |m| m.name()),
                outcome.honest_cosine_min,
                outcome.honest_loss_drop_min * 100.0,
                outcome.wall_s
            ));
        }
    }
    out
}
