//! Job manifests: the YAML file that says what a job trains, on what, and how its peers combine
//! their work.
//!
//! Parsing refuses unknown fields and names the field at fault, with its line. Validation then
//! checks ranges, again naming the field. The **job id** is the blake3 hash of the job's
//! canonical content: the manifest without the per-peer parts (`resources`, `checkpoint_every`),
//! with the dataset's location replaced by the fingerprint of its tokens, so two peers that read
//! the same text from different paths or URLs run the same job.

use std::{path::Path, time::Duration};

use loom_actors::{Aggregation, JobPlan, Strategy, exchanger::AuditConfig};
use loom_protocols::{
    compress::{Codec, Sparsity, ValueFormat},
    ledger::JobTerms,
    outer::{AdamWConfig, OuterConfig},
    round::{JobId, RoundConfig},
    verify::ScreeningConfig,
};
use loom_trainer::{Dataset, DeviceChoice, LearnerConfig, ModelSpec, Vocab};
use serde::{Deserialize, Serialize};

/// The manifest of `loom-peer demo`: a small transformer on the built-in Markov text.
pub const DEMO_MANIFEST: &str = include_str!("../../examples/demo.yaml");

/// Most peers a job may name (the ledger's bound on a job's contributors).
pub const MAX_REPLICAS: usize = loom_protocols::ledger::MAX_JOB_CONTRIBUTORS as usize;
/// Most rounds a job may name (the ledger's bound).
pub const MAX_ROUNDS: u64 = loom_protocols::ledger::MAX_JOB_ROUNDS;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Could not read the file.
    #[error("cannot read manifest {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid YAML for a manifest (serde names the field and line).
    #[error("manifest: {0}")]
    Parse(String),
    /// A field out of range.
    #[error("manifest field `{field}`: {message}")]
    Field {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The dataset could not be loaded.
    #[error("manifest field `dataset`: {0}")]
    Dataset(loom_trainer::TrainerError),
}

fn field(field: &str, message: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// A job manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// A name for people.
    pub job: String,
    /// How many peers the job wants.
    #[serde(default)]
    pub replicas: Replicas,
    /// What this peer gives the job (not part of the job id).
    #[serde(default)]
    pub resources: Resources,
    /// The architecture.
    pub model: ModelSpec,
    /// The data.
    pub dataset: DatasetSpec,
    /// Inner optimizer.
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// How peers combine their work.
    pub strategy: StrategySpec,
    /// How updates travel.
    #[serde(default)]
    pub compression: CompressionSpec,
    /// Rounds to train.
    pub rounds: u64,
    /// How long a round waits for stragglers after its first contribution, e.g. "30s".
    #[serde(default = "default_deadline")]
    pub round_deadline: String,
    /// Checkpoint every this many rounds; 0 only at the end (not part of the job id).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Seed of the data shards.
    #[serde(default)]
    pub seed: u64,
    /// Validation batches per evaluation.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Evaluate every this many rounds (and the first and last); not part of the job id.
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// How a round's accepted updates are combined.
    #[serde(default)]
    pub aggregation: AggregationSpec,
    /// The verifier's screening of each round's updates.
    #[serde(default)]
    pub verification: VerificationSpec,
    /// What the job pays from its escrow (part of the job id when not the default).
    #[serde(default)]
    pub pay: Pay,
}

/// How a round's accepted updates are combined: `{kind: mean}`, `{kind: trimmed_mean, trim: 1}`
/// or `{kind: median}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AggregationSpec {
    /// The plain mean.
    #[default]
    Mean,
    /// Coordinate-wise mean without the `trim` largest and smallest values.
    TrimmedMean {
        /// Values dropped at each end of every coordinate.
        trim: usize,
    },
    /// Coordinate-wise median.
    Median,
}

/// The verifier's screening: `{screen: true, min_cosine: 0.05, max_norm_ratio: 10}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationSpec {
    /// Whether updates are screened at all.
    #[serde(default = "default_screen")]
    pub screen: bool,
    /// Smallest cosine between an update and the sum of the others.
    #[serde(default = "default_min_cosine")]
    pub min_cosine: f64,
    /// Largest ratio between an update's norm and the round's median norm.
    #[serde(default = "default_max_norm_ratio")]
    pub max_norm_ratio: f64,
    /// Share of each round's contributions recomputed by an assigned verifier (0: none).
    #[serde(default)]
    pub audit: f64,
    /// Smallest cosine between a contribution and its recomputation, on the transmitted
    /// coordinates.
    #[serde(default = "default_audit_min_cosine")]
    pub audit_min_cosine: f64,
    /// Rounds a contributor that failed an audit is excluded for.
    #[serde(default = "default_audit_exclusion_rounds")]
    pub audit_exclusion_rounds: u64,
    /// The cheap check: a contribution must lower the loss on batches its author was assigned
    /// (off by default: every peer then runs two forward passes per contribution and batch).
    #[serde(default)]
    pub loss_check: bool,
}

fn default_audit_min_cosine() -> f64 {
    0.3
}

fn default_audit_exclusion_rounds() -> u64 {
    5
}

impl Default for VerificationSpec {
    fn default() -> Self {
        Self {
            screen: default_screen(),
            min_cosine: default_min_cosine(),
            max_norm_ratio: default_max_norm_ratio(),
            audit: 0.0,
            audit_min_cosine: default_audit_min_cosine(),
            audit_exclusion_rounds: default_audit_exclusion_rounds(),
            loss_check: false,
        }
    }
}

/// Most credits a job may pay per accepted contribution or per verdict (the ledger's bound).
pub const MAX_PAY_CREDITS: u64 = loom_protocols::ledger::MAX_JOB_PAY;

/// A job's payment terms, in credits paid from its escrow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pay {
    /// Paid to each contributor whose update a round applied.
    pub per_contribution: u64,
    /// Paid to the verifier per verdict on a refused contribution.
    pub per_verdict: u64,
}

impl Default for Pay {
    fn default() -> Self {
        Self {
            per_contribution: 10,
            per_verdict: 1,
        }
    }
}

impl AggregationSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl VerificationSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_screen() -> bool {
    true
}

fn default_min_cosine() -> f64 {
    loom_protocols::verify::ScreeningConfig::default().min_cosine
}

fn default_max_norm_ratio() -> f64 {
    loom_protocols::verify::ScreeningConfig::default().max_norm_ratio
}

impl Pay {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_eval_every() -> u64 {
    1
}

fn default_deadline() -> String {
    "30s".to_owned()
}

fn default_eval_batches() -> usize {
    16
}

/// Peer counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replicas {
    /// A round closes only with at least this many contributions.
    pub min: usize,
    /// At most this many contributions count per round.
    pub max: usize,
}

impl Default for Replicas {
    fn default() -> Self {
        Self { min: 1, max: 64 }
    }
}

/// What this peer brings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Where to train.
    #[serde(default)]
    pub device: DeviceChoice,
    /// libtorch threads (0: libtorch's default).
    #[serde(default)]
    pub threads: usize,
}

/// Where the text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum DatasetSpec {
    /// Text generated from a seeded order-2 Markov source (known entropy rate).
    Builtin {
        /// Generator seed.
        seed: u64,
        /// Characters generated.
        chars: usize,
    },
    /// A local text file.
    File {
        /// Its path.
        path: String,
        /// Byte or character tokens.
        vocab: Vocab,
    },
    /// A text file over HTTP(S).
    Url {
        /// Its URL.
        url: String,
        /// Byte or character tokens.
        vocab: Vocab,
    },
}

/// Inner optimizer (AdamW) settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSpec {
    /// Sequences per batch.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        let d = LearnerConfig::default();
        Self {
            batch: d.batch,
            lr: d.lr,
            beta1: d.beta1,
            beta2: d.beta2,
            weight_decay: d.weight_decay,
            grad_clip: d.grad_clip,
        }
    }
}

/// How peers combine their work.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StrategySpec {
    /// Exchange gradients every step.
    Sync,
    /// DiLoCo.
    Diloco {
        /// Inner steps per round (H).
        inner_steps: u32,
        /// Outer learning rate.
        #[serde(default = "default_outer_lr")]
        outer_lr: f32,
        /// Outer Nesterov momentum.
        #[serde(default = "default_outer_momentum")]
        outer_momentum: f32,
    },
}

fn default_outer_lr() -> f32 {
    OuterConfig::default().lr
}

fn default_outer_momentum() -> f32 {
    OuterConfig::default().momentum
}

/// Compression of updates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionSpec {
    /// `none` (dense) or `topk` (with error feedback).
    pub kind: CompressionKind,
    /// Fraction of coordinates sent with `topk`.
    #[serde(default = "default_ratio")]
    pub ratio: f32,
    /// Value format.
    #[serde(default = "default_values")]
    pub values: ValueSpec,
    /// Error-feedback decay β in [0, 1]: the unsent residual is multiplied by β before the next
    /// update is added (1: classic error feedback; default 0.95 with `diloco`, as SparseLoCo,
    /// and 1 with `sync`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback_decay: Option<f32>,
}

fn default_ratio() -> f32 {
    0.01
}

fn default_values() -> ValueSpec {
    ValueSpec::Int8
}

impl Default for CompressionSpec {
    fn default() -> Self {
        Self {
            kind: CompressionKind::Topk,
            ratio: default_ratio(),
            values: default_values(),
            feedback_decay: None,
        }
    }
}

/// Sparsity kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionKind {
    /// Every coordinate.
    None,
    /// The largest fraction, with error feedback.
    Topk,
}

/// Value formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueSpec {
    /// 4 bytes.
    Fp32,
    /// 2 bytes.
    Fp16,
    /// 1 byte and a scale.
    Int8,
}

/// A manifest checked, with its dataset loaded and its id computed.
#[derive(Debug, Clone)]
pub struct Job {
    /// The manifest as given.
    pub manifest: Manifest,
    /// The job id.
    pub id: JobId,
    /// The tokens.
    pub dataset: std::sync::Arc<Dataset>,
    /// The learner settings.
    pub learner: LearnerConfig,
    /// What the exchanger needs.
    pub plan: JobPlan,
}

impl Manifest {
    /// Reads and parses a manifest file.
    pub fn from_file(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses manifest text and validates every field.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_yaml::from_str(text).map_err(|e| ManifestError::Parse(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks ranges, naming the field at fault.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if let AggregationSpec::TrimmedMean { trim } = self.aggregation
            && (trim == 0 || 2 * trim >= self.replicas.max)
        {
            return Err(field(
                "aggregation.trim",
                format!(
                    "must be at least 1 and leave values with replicas.max {} (got {trim})",
                    self.replicas.max
                ),
            ));
        }
        if !(-1.0..=1.0).contains(&self.verification.min_cosine) {
            return Err(field("verification.min_cosine", "must be in [-1, 1]"));
        }
        if !(0.0..=1.0).contains(&self.verification.audit) {
            return Err(field("verification.audit", "must be in [0, 1]"));
        }
        if !(-1.0..=1.0).contains(&self.verification.audit_min_cosine) {
            return Err(field("verification.audit_min_cosine", "must be in [-1, 1]"));
        }
        if self.verification.audit_exclusion_rounds > MAX_ROUNDS {
            return Err(field(
                "verification.audit_exclusion_rounds",
                format!("must be at most {MAX_ROUNDS}"),
            ));
        }
        if !(self.verification.max_norm_ratio >= 1.0
            && self.verification.max_norm_ratio.is_finite())
        {
            return Err(field("verification.max_norm_ratio", "must be at least 1"));
        }
        if self.job.trim().is_empty() || self.job.len() > 128 {
            return Err(field("job", "must be 1 to 128 characters"));
        }
        if self.replicas.min == 0 || self.replicas.min > self.replicas.max {
            return Err(field(
                "replicas.min",
                format!(
                    "must be at least 1 and at most replicas.max ({})",
                    self.replicas.max
                ),
            ));
        }
        if self.replicas.max > MAX_REPLICAS {
            return Err(field(
                "replicas.max",
                format!("must be at most {MAX_REPLICAS}"),
            ));
        }
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(field("rounds", format!("must be 1 to {MAX_ROUNDS}")));
        }
        let deadline = self.round_deadline()?;
        if deadline < Duration::from_millis(100) || deadline > Duration::from_secs(24 * 3600) {
            return Err(field("round_deadline", "must be between 100ms and 24h"));
        }
        if let StrategySpec::Diloco {
            inner_steps,
            outer_lr,
            outer_momentum,
        } = self.strategy
        {
            if inner_steps == 0 || inner_steps > 100_000 {
                return Err(field("strategy.inner_steps", "must be 1 to 100000"));
            }
            if !(outer_lr > 0.0 && outer_lr <= 10.0) {
                return Err(field("strategy.outer_lr", "must be in (0, 10]"));
            }
            if !(0.0..1.0).contains(&outer_momentum) {
                return Err(field("strategy.outer_momentum", "must be in [0, 1)"));
            }
        }
        if !(self.compression.ratio > 0.0 && self.compression.ratio <= 1.0) {
            return Err(field(
                "compression.ratio",
                format!("must be in (0, 1], got {}", self.compression.ratio),
            ));
        }
        if let Some(decay) = self.compression.feedback_decay
            && !(0.0..=1.0).contains(&decay)
        {
            return Err(field(
                "compression.feedback_decay",
                format!("must be in [0, 1], got {decay}"),
            ));
        }
        if self.eval_every == 0 {
            return Err(field("eval_every", "must be at least 1"));
        }
        if self.eval_batches == 0 || self.eval_batches > 10_000 {
            return Err(field("eval_batches", "must be 1 to 10000"));
        }
        if self.pay.per_contribution > MAX_PAY_CREDITS {
            return Err(field(
                "pay.per_contribution",
                format!("must be at most {MAX_PAY_CREDITS}"),
            ));
        }
        if self.pay.per_verdict > MAX_PAY_CREDITS {
            return Err(field(
                "pay.per_verdict",
                format!("must be at most {MAX_PAY_CREDITS}"),
            ));
        }
        if let DatasetSpec::Builtin { chars, .. } = self.dataset
            && !(1_000..=100_000_000).contains(&chars)
        {
            return Err(field("dataset.chars", "must be 1000 to 100000000"));
        }
        self.learner_config().validate().map_err(|e| match e {
            loom_trainer::TrainerError::Config {
                field: name,
                message,
            } => {
                let path = match name {
                    "eval_batches" => name.to_owned(),
                    "device" | "threads" => format!("resources.{name}"),
                    _ => format!("optimizer.{name}"),
                };
                field(&path, message)
            }
            loom_trainer::TrainerError::ModelSpec {
                field: name,
                message,
            } => field(&format!("model.{name}"), message),
            other => field("model", other.to_string()),
        })?;
        Ok(())
    }

    /// The terms the job is submitted to the ledger with: its rounds, its most contributors per
    /// round and its pay. Replicas check every result and verdict of the job against them.
    pub fn ledger_terms(&self) -> JobTerms {
        JobTerms {
            rounds: self.rounds,
            max_contributors: u32::try_from(self.replicas.max).unwrap_or(u32::MAX),
            per_contribution: self.pay.per_contribution,
            per_verdict: self.pay.per_verdict,
        }
    }

    /// The least escrow the job needs: every round paying `replicas.max` contributions.
    pub fn min_escrow(&self) -> u64 {
        self.rounds
            .saturating_mul(self.replicas.max as u64)
            .saturating_mul(self.pay.per_contribution)
    }

    /// The escrow put up when the submitter names none: the least escrow plus a verdict fee per
    /// possible contribution.
    pub fn default_escrow(&self) -> u64 {
        self.rounds
            .saturating_mul(self.replicas.max as u64)
            .saturating_mul(
                self.pay
                    .per_contribution
                    .saturating_add(self.pay.per_verdict),
            )
    }

    /// The error-feedback decay in effect.
    pub fn feedback_decay(&self) -> f32 {
        self.compression
            .feedback_decay
            .unwrap_or(match self.strategy {
                StrategySpec::Diloco { .. } => 0.95,
                StrategySpec::Sync => 1.0,
            })
    }

    /// The straggler deadline.
    pub fn round_deadline(&self) -> Result<Duration, ManifestError> {
        humantime::parse_duration(&self.round_deadline)
            .map_err(|e| field("round_deadline", e.to_string()))
    }

    /// Learner settings from the manifest (device and threads from `resources`).
    pub fn learner_config(&self) -> LearnerConfig {
        LearnerConfig {
            model: self.model,
            batch: self.optimizer.batch,
            lr: self.optimizer.lr,
            beta1: self.optimizer.beta1,
            beta2: self.optimizer.beta2,
            weight_decay: self.optimizer.weight_decay,
            grad_clip: self.optimizer.grad_clip,
            device: self.resources.device,
            threads: self.resources.threads,
            eval_batches: self.eval_batches,
            ..LearnerConfig::default()
        }
    }

    /// Loads the dataset the manifest names; a relative file path is taken from `base`.
    pub fn load_dataset(&self, base: &Path) -> Result<Dataset, ManifestError> {
        match &self.dataset {
            DatasetSpec::Builtin { seed, chars } => Ok(Dataset::builtin(*seed, *chars)),
            DatasetSpec::File { path, vocab } => {
                Dataset::from_file(base.join(path), *vocab).map_err(ManifestError::Dataset)
            }
            DatasetSpec::Url { url, vocab } => {
                Dataset::from_url(url, *vocab).map_err(ManifestError::Dataset)
            }
        }
    }

    /// Loads the dataset and computes the job id and plan.
    pub fn into_job(self, base: &Path) -> Result<Job, ManifestError> {
        let dataset = self.load_dataset(base)?;
        let learner = self.learner_config();
        dataset
            .check_usable(self.model.context())
            .map_err(ManifestError::Dataset)?;
        let id = self.job_id(&dataset.fingerprint());
        let codec = Codec {
            sparsity: match self.compression.kind {
                CompressionKind::None => Sparsity::Dense,
                CompressionKind::Topk => Sparsity::TopK {
                    ratio: self.compression.ratio,
                },
            },
            values: match self.compression.values {
                ValueSpec::Fp32 => ValueFormat::Fp32,
                ValueSpec::Fp16 => ValueFormat::Fp16,
                ValueSpec::Int8 => ValueFormat::Int8,
            },
        };
        let strategy = match self.strategy {
            StrategySpec::Sync => Strategy::Sync(AdamWConfig {
                lr: self.optimizer.lr as f32,
                beta1: self.optimizer.beta1 as f32,
                beta2: self.optimizer.beta2 as f32,
                eps: 1e-8,
                weight_decay: self.optimizer.weight_decay as f32,
            }),
            StrategySpec::Diloco {
                inner_steps,
                outer_lr,
                outer_momentum,
            } => Strategy::Diloco {
                inner_steps,
                outer: OuterConfig {
                    lr: outer_lr,
                    momentum: outer_momentum,
                },
            },
        };
        let deadline = self.round_deadline()?;
        let plan = JobPlan {
            job_id: id,
            rounds: self.rounds,
            strategy,
            codec,
            feedback_decay: self.feedback_decay(),
            round: RoundConfig {
                round_deadline_ms: deadline.as_millis() as u64,
                proposer_grace_ms: (deadline.as_millis() as u64 / 4).clamp(500, 10_000),
                min_contributors: self.replicas.min,
                max_contributors: self.replicas.max,
                // No valid update is larger than dense fp32 with an index per value.
                max_blob_bytes: crate::network::blobs::MAX_BLOB_BYTES
                    .min(64 + 9 * self.model.param_count(dataset.vocab_size) as u64),
            },
            data_seed: self.seed,
            checkpoint_every: self.checkpoint_every,
            join_wait_ms: 3_000,
            eval_every: self.eval_every,
            aggregation: match self.aggregation {
                AggregationSpec::Mean => Aggregation::Mean,
                AggregationSpec::TrimmedMean { trim } => Aggregation::TrimmedMean { trim },
                AggregationSpec::Median => Aggregation::Median,
            },
            audit: (self.verification.audit > 0.0).then_some(AuditConfig {
                fraction: self.verification.audit,
                min_cosine: self.verification.audit_min_cosine,
                exclusion_rounds: self.verification.audit_exclusion_rounds,
            }),
            loss_check: self.verification.loss_check,
            screening: self.verification.screen.then(|| ScreeningConfig {
                min_cosine: self.verification.min_cosine,
                max_norm_ratio: self.verification.max_norm_ratio,
                ..ScreeningConfig::default()
            }),
        };
        Ok(Job {
            manifest: self,
            id,
            dataset: std::sync::Arc::new(dataset),
            learner,
            plan,
        })
    }

    /// The job id for a dataset with fingerprint `dataset_fingerprint`.
    pub fn job_id(&self, dataset_fingerprint: &[u8; 32]) -> JobId {
        #[derive(Serialize)]
        struct Canonical<'a> {
            job: &'a str,
            replicas: Replicas,
            model: ModelSpec,
            dataset: String,
            optimizer: OptimizerSpec,
            strategy: StrategySpec,
            compression: CompressionSpec,
            rounds: u64,
            round_deadline_ms: u128,
            seed: u64,
            eval_batches: usize,
            #[serde(skip_serializing_if = "AggregationSpec::is_default")]
            aggregation: AggregationSpec,
            #[serde(skip_serializing_if = "VerificationSpec::is_default")]
            verification: VerificationSpec,
            #[serde(skip_serializing_if = "Pay::is_default")]
            pay: Pay,
        }
        let canonical = Canonical {
            job: &self.job,
            replicas: self.replicas,
            model: self.model,
            dataset: loom_actors::exchanger::hex(dataset_fingerprint),
            optimizer: self.optimizer,
            strategy: self.strategy,
            compression: self.compression,
            rounds: self.rounds,
            round_deadline_ms: self.round_deadline().map(|d| d.as_millis()).unwrap_or(0),
            seed: self.seed,
            eval_batches: self.eval_batches,
            aggregation: self.aggregation,
            verification: self.verification,
            pay: self.pay,
        };
        let json = serde_json::to_vec(&canonical).unwrap_or_default();
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"loom/job/v1\0");
        hasher.update(&json);
        *hasher.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_manifests_are_valid() {
        let manifest = Manifest::parse(DEMO_MANIFEST).expect("demo manifest");
        assert!(matches!(manifest.dataset, DatasetSpec::Builtin { .. }));
        let shakespeare = Manifest::parse(include_str!("../../examples/shakespeare.yaml"))
            .expect("shakespeare manifest");
        assert_eq!(shakespeare.feedback_decay(), 0.95);
        assert_eq!(shakespeare.eval_every, 6);
    }

    fn error_of(text: &str) -> String {
        match Manifest::parse(text) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let base = DEMO_MANIFEST;
        let unknown = format!("{base}\ncolour: blue\n");
        assert!(
            error_of(&unknown).contains("colour"),
            "{}",
            error_of(&unknown)
        );
        let ratio = base.replace("ratio: 0.05", "ratio: 2.0");
        assert!(error_of(&ratio).contains("compression.ratio"));
        let rounds = base.replace("rounds: 30", "rounds: 0");
        assert!(error_of(&rounds).contains("`rounds`"));
        let heads = base.replace("heads: 4", "heads: 3");
        assert!(
            error_of(&heads).contains("model.heads"),
            "{}",
            error_of(&heads)
        );
        let missing = base.replace("rounds: 30\n", "");
        assert!(error_of(&missing).contains("rounds"));
        let kind = base.replace("kind: diloco", "kind: gossip");
        assert!(error_of(&kind).contains("gossip"));
    }

    #[test]
    fn pay_defaults_and_bounds() {
        let demo = Manifest::parse(DEMO_MANIFEST).expect("ok");
        assert_eq!(demo.pay, Pay::default());
        assert_eq!(demo.pay.per_contribution, 10);
        assert_eq!(demo.pay.per_verdict, 1);
        let text = format!("{DEMO_MANIFEST}\npay: {{per_contribution: 3}}\n");
        let paid = Manifest::parse(&text).expect("partial pay section");
        assert_eq!(
            paid.pay,
            Pay {
                per_contribution: 3,
                per_verdict: 1
            }
        );
        assert_eq!(
            paid.min_escrow(),
            paid.rounds * paid.replicas.max as u64 * 3
        );
        assert_eq!(
            paid.default_escrow(),
            paid.rounds * paid.replicas.max as u64 * 4
        );
        let too_much = format!("{DEMO_MANIFEST}\npay: {{per_verdict: 1000000000000}}\n");
        let error = error_of(&too_much);
        assert!(error.contains("pay.per_verdict"), "{error}");
        assert_eq!(error.lines().count(), 1, "{error}");
        let unknown = format!("{DEMO_MANIFEST}\npay: {{per_round: 1}}\n");
        assert!(
            error_of(&unknown).contains("per_round"),
            "{}",
            error_of(&unknown)
        );
        let negative = format!("{DEMO_MANIFEST}\npay: {{per_contribution: -1}}\n");
        assert!(
            error_of(&negative).contains("pay"),
            "{}",
            error_of(&negative)
        );
        // Default terms leave the job id as it was; other terms make another job.
        let fp = [1; 32];
        let mut explicit = demo.clone();
        explicit.pay = Pay::default();
        assert_eq!(demo.job_id(&fp), explicit.job_id(&fp));
        assert_ne!(demo.job_id(&fp), paid.job_id(&fp));
    }

    #[test]
    fn the_job_id_ignores_per_peer_fields_and_follows_the_content() {
        let a = Manifest::parse(DEMO_MANIFEST).expect("ok");
        let mut b = a.clone();
        b.resources.threads = 7;
        b.checkpoint_every = 99;
        let fp = [1; 32];
        assert_eq!(a.job_id(&fp), b.job_id(&fp));
        b.rounds += 1;
        assert_ne!(a.job_id(&fp), b.job_id(&fp));
        assert_ne!(a.job_id(&fp), a.job_id(&[2; 32]));
    }
}
