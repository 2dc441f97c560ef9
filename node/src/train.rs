//! Training a job inside a running node: `loom-peer train`, and the pick-up of jobs submitted
//! on the ledger by `loom-peer run`.
//!
//! Both go through [`run_job`]: it starts the Trainer and GradientExchanger actors on the node's
//! network and follows the rounds: each round's report goes to the progress file (JSON lines),
//! the status slot and, for `train`, stderr; the rounds this peer coordinates are recorded on the
//! ledger with their payments when the job is on it. Checkpoints are written atomically under
//! `<data-dir>/jobs/<job>/checkpoints/`, named by round and blake3 hash; `train --resume` (and
//! every pick-up) starts from the newest one that verifies.
//!
//! `train` loads the manifest given on the command line, starts the node, trains and exits after
//! the last round. [`pick_up`] watches the node's job book and trains, one at a time, each
//! unfinished job whose manifest parses, yields the job id it was submitted under, asks for
//! resources this machine has and names a dataset a remote submitter may make it read
//! ([`dataset_refusal`]); it stops the job's actors after its last round and the node
//! keeps running. A job it cannot run is logged once with the reason.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use libp2p::identity::Keypair;
use loom_actors::{
    CheckpointSink, ExchangerActor, ExchangerArgs, Learner, LearnerSlot, RoundReport, Strategy,
    TrainerActor, exchanger::hex, names,
};
use loom_protocols::{
    PeerKey,
    contribution::{BlobHash, blob_hash},
    ledger::{Credits, Entry, JobId},
    snapshot::{OuterState, Snapshot},
};
use loom_trainer::{DeviceChoice, TchLearner};
use ractor::{Actor, ActorRef};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    config::NodeConfig,
    identity,
    jobs::{
        RoundTerms, SharedJobBook, adopted_votes, audit_entries, round_entries, same_choice,
        vote_entry, voted_result,
    },
    manifest::{DatasetSpec, Job, Manifest},
    run::{self, KeypairSigner},
};

/// How long a peer keeps serving after its last round, so slower peers can fetch from it.
const LINGER_AFTER_LAST_ROUND: Duration = Duration::from_secs(3);
/// Longest a peer waits after its last round for the ledger to record it with this peer's model.
const FINAL_SETTLE_MAX: Duration = Duration::from_secs(30);

/// What `loom-peer train` was asked to do besides the node configuration.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The manifest text.
    pub manifest: String,
    /// Directory relative dataset paths are taken from.
    pub manifest_dir: PathBuf,
    /// Overrides `resources.device`.
    pub device: Option<DeviceChoice>,
    /// Overrides `resources.threads`.
    pub threads: Option<usize>,
    /// Continue from the newest checkpoint.
    pub resume: bool,
    /// Progress file (JSON lines) [default: <data-dir>/progress.jsonl].
    pub progress: Option<PathBuf>,
    /// Print a line per round on stderr.
    pub verbose: bool,
}

/// One line of the progress file.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressLine<'a> {
    /// Always "loom".
    pub system: &'static str,
    /// The job id (hex).
    pub job_id: &'a str,
    /// Seconds since training started on this peer.
    pub wall_s: f64,
    /// Bytes this peer sent over every connection so far.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// The round's report.
    #[serde(flatten)]
    pub report: &'a RoundReport,
}

/// Atomic checkpoint files.
struct CheckpointDir(PathBuf);

impl CheckpointSink for CheckpointDir {
    fn save(&self, round: u64, hash: &BlobHash, bytes: &[u8]) -> Result<(), String> {
        let name = format!("round-{round:08}-{}.ckpt", hex(hash));
        identity::write_atomic(&self.0.join(&name), bytes, 0o600).map_err(|e| e.to_string())?;
        identity::write_atomic(&self.0.join("latest"), name.as_bytes(), 0o600)
            .map_err(|e| e.to_string())?;
        tracing::info!(round, file = %name, "checkpoint written");
        Ok(())
    }
}

/// The newest checkpoint in `dir` that verifies against its name: (round, snapshot).
pub fn latest_checkpoint(
    dir: &Path,
    job: &Job,
    param_count: usize,
) -> anyhow::Result<Option<Snapshot>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("round-") && n.ends_with(".ckpt"))
        .collect();
    names.sort();
    for name in names.iter().rev() {
        let Some(hash_hex) = name
            .strip_suffix(".ckpt")
            .and_then(|n| n.rsplit('-').next())
        else {
            continue;
        };
        let bytes = std::fs::read(dir.join(name))
            .with_context(|| format!("cannot read checkpoint {name}"))?;
        if hex(&blob_hash(&bytes)) != hash_hex {
            tracing::warn!(file = %name, "checkpoint does not match its hash; skipped");
            continue;
        }
        match Snapshot::from_bytes(&bytes, &job.id, param_count) {
            Ok(snapshot) => return Ok(Some(snapshot)),
            Err(e) => tracing::warn!(file = %name, %e, "checkpoint refused; skipped"),
        }
    }
    Ok(None)
}

/// The state before round 1.
pub fn initial_snapshot(job: &Job, params: Vec<f32>) -> Snapshot {
    let n = params.len();
    Snapshot {
        job_id: job.id,
        round: 0,
        params,
        outer: match job.plan.strategy {
            Strategy::Diloco { .. } => OuterState::Nesterov { buf: vec![0.0; n] },
            Strategy::Sync(_) => OuterState::AdamW {
                m: vec![0.0; n],
                v: vec![0.0; n],
                step: 0,
            },
        },
    }
}

/// The job's directory in the data directory.
pub fn job_dir(data_dir: &Path, job: &Job) -> PathBuf {
    data_dir.join("jobs").join(&hex(&job.id)[..16])
}

/// What a finished training run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Job id (hex).
    pub job_id: String,
    /// The last report.
    pub last: RoundReport,
    /// Seconds of training.
    pub wall_s: f64,
    /// Bytes sent.
    pub bytes_sent: u64,
}

/// What a job run uses of the running node it trains in.
#[derive(Clone)]
pub struct NodeContext {
    /// The data directory.
    pub data_dir: PathBuf,
    /// This peer's identity.
    pub keypair: Keypair,
    /// The network command queue.
    pub handle: crate::network::NetworkHandle,
    /// Blobs this peer serves.
    pub blobs: loom_actors::SharedBlobs,
    /// Refused contributions per peer.
    pub rejections: loom_actors::SharedRejections,
    /// Per-peer byte counters.
    pub peer_bytes: crate::network::PeerBytes,
    /// The training status the control API reports.
    pub training: crate::status::TrainingSlot,
    /// The jobs on the ledger.
    pub jobs: SharedJobBook,
}

impl NodeContext {
    /// The context of a started node.
    pub fn of(node: &run::NodeHandles, data_dir: &Path, keypair: &Keypair) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            keypair: keypair.clone(),
            handle: node.handle.clone(),
            blobs: node.blobs.clone(),
            rejections: node.rejections.clone(),
            peer_bytes: node.peer_bytes.clone(),
            training: node.training.clone(),
            jobs: node.jobs.clone(),
        }
    }
}

/// A job ready to train: its learner built and its starting model chosen.
pub struct PreparedJob {
    /// The job.
    pub job: Job,
    /// Its learner.
    pub learner: Box<dyn Learner>,
    /// A second learner for audits, when the job audits contributions.
    pub auditor: Option<Box<dyn Learner>>,
    /// The model to start from.
    pub start: Snapshot,
    /// Whether `start` is a checkpoint.
    pub resumed: bool,
    /// Where checkpoints go.
    pub checkpoints: PathBuf,
    /// The progress file (JSON lines).
    pub progress_path: PathBuf,
    /// Tokens per optimizer step.
    pub tokens_per_step: u64,
    /// Where the model runs, for people.
    pub device: String,
}

/// Builds the learner of `job` and picks its starting model: the newest checkpoint in the job's
/// directory when `resume`, else the initial model. Progress goes to `progress` [default:
/// `<job dir>/progress.jsonl`].
pub fn prepare_job(
    job: Job,
    data_dir: &Path,
    resume: bool,
    progress: Option<PathBuf>,
) -> anyhow::Result<PreparedJob> {
    let learner = TchLearner::new(job.learner.clone(), job.dataset.clone())
        .context("cannot build the model")?;
    let auditor: Option<Box<dyn Learner>> = if job.plan.audit.is_some() {
        Some(Box::new(
            TchLearner::new(job.learner.clone(), job.dataset.clone())
                .context("cannot build the auditor's model")?,
        ))
    } else {
        None
    };
    let dir = job_dir(data_dir, &job);
    let checkpoints = dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)
        .with_context(|| format!("cannot create {}", checkpoints.display()))?;
    let param_count = learner.param_count();
    let resumed = if resume {
        latest_checkpoint(&checkpoints, &job, param_count)?
    } else {
        None
    };
    let start = match &resumed {
        Some(snapshot) => snapshot.clone(),
        None => initial_snapshot(&job, learner.params()),
    };
    Ok(PreparedJob {
        progress_path: progress.unwrap_or_else(|| dir.join("progress.jsonl")),
        tokens_per_step: learner.tokens_per_step(),
        device: format!("{:?}", learner.device()),
        learner: Box::new(learner),
        auditor,
        start,
        resumed: resumed.is_some(),
        checkpoints,
        job,
    })
}

/// Runs `loom-peer train` until the job's last round or a signal.
pub fn train(config: NodeConfig, options: TrainOptions) -> anyhow::Result<TrainSummary> {
    let mut manifest = Manifest::parse(&options.manifest)?;
    if let Some(device) = options.device {
        manifest.resources.device = device;
    }
    if let Some(threads) = options.threads {
        manifest.resources.threads = threads;
    }
    let job = manifest.into_job(&options.manifest_dir)?;
    run::create_data_dir(&config.data_dir)?;
    let keypair = identity::load_or_create(&config.data_dir)?;
    let progress = Some(
        options
            .progress
            .clone()
            .unwrap_or_else(|| config.data_dir.join("progress.jsonl")),
    );
    let prepared = prepare_job(job, &config.data_dir, options.resume, progress)?;
    if options.resume && !prepared.resumed {
        eprintln!(
            "no checkpoint to resume from in {}; starting fresh",
            prepared.checkpoints.display()
        );
    }
    if options.verbose {
        let job = &prepared.job;
        eprintln!(
            "job {} ({}): {} parameters on {}, {}; {}",
            &hex(&job.id)[..16],
            job.manifest.job,
            prepared.learner.param_count(),
            prepared.device,
            job.dataset.describe(),
            if prepared.resumed {
                format!("resuming after round {}", prepared.start.round)
            } else {
                "starting".to_owned()
            }
        );
        if let Some(floor) = job.dataset.entropy_rate_nats() {
            eprintln!("loss floor (entropy rate of the built-in source): {floor:.4} nats");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(train_async(config, keypair, prepared, options.verbose))
}

async fn train_async(
    config: NodeConfig,
    keypair: Keypair,
    prepared: PreparedJob,
    verbose: bool,
) -> anyhow::Result<TrainSummary> {
    let mut node = run::start_node(&config, &keypair).await?;
    let context = NodeContext::of(&node, &config.data_dir, &keypair);
    let job_dir = job_dir(&config.data_dir, &prepared.job);
    tracing::info!(peer = %keypair.public().to_peer_id(), job = %hex(&prepared.job.id), api = %node.api, "training");
    let supervisor_done = &mut node.supervisor_done;
    let stop = async move {
        tokio::select! {
            signal = run::termination() => signal.and(Err(anyhow::anyhow!("interrupted before the last round"))),
            result = supervisor_done => match result {
                Ok(()) => Err(anyhow::anyhow!("the actor tree stopped: a child kept failing")),
                Err(e) => Err(anyhow::anyhow!("the actor tree failed: {e}")),
            },
        }
    };
    let outcome = run_job(&context, prepared, verbose, stop).await;
    run::stop_node(&config, node).await;
    let summary = outcome?;
    let summary_path = job_dir.join("summary.json");
    identity::write_atomic(
        &summary_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
        0o644,
    )
    .with_context(|| format!("cannot write {}", summary_path.display()))?;
    Ok(summary)
}

/// How long after applying a round another peer waits for its coordinator's record on the
/// ledger before recording the round itself (plus a stagger of up to [`BACKUP_STAGGER`]).
const BACKUP_RECORD_DELAY: Duration = Duration::from_secs(10);
/// Spread of the backup recorders' delays, so that they do not all submit at once.
const BACKUP_STAGGER: Duration = Duration::from_secs(5);
/// Most rounds held for a backup record.
const BACKUP_ROUNDS_MAX: usize = 64;
/// How long this peer waits for its committee join or a vote to reach the ledger before it
/// submits it again (a vote sent before the join was final is refused, and so on).
const RESUBMIT_AFTER: Duration = Duration::from_secs(2);

/// Votes on and pays for the job's rounds. It joins the job's committee on the ledger, and
/// after each round it applied it submits its vote (the model, the accepted set, the refused
/// contributors: [`crate::jobs::vote_entry`]) until the ledger holds it. The rounds it
/// coordinated it records ([`crate::jobs::round_entries`]) once a quorum of the committee voted
/// for the model and accepted set it applied, slashing only whom that quorum refused. A round
/// whose coordinator did not record it (it died, it was cut off) is recorded by another peer
/// that applied it, after [`BACKUP_RECORD_DELAY`]; the ledger keeps one result per round, so a
/// late duplicate is refused.
struct RoundPayer {
    job: JobId,
    /// This peer's key: its committee membership and its votes are looked up by it.
    me: PeerKey,
    /// Credits of entries this peer submitted whose round is not recorded yet, by round.
    pending: BTreeMap<u64, Credits>,
    /// The job was not on the ledger at the last report (said once).
    unlisted_said: bool,
    /// When this peer last submitted its committee join (it is not a member yet).
    join_sent: Option<Instant>,
    /// The committee was full when this peer tried to join (said once).
    full_said: bool,
    /// This peer's votes not on the ledger yet, by round, with when each was last submitted.
    votes: BTreeMap<u64, (Entry, Option<Instant>)>,
    /// Rounds this peer applied, with when it records each if it is still missing (at once for
    /// the rounds it coordinated).
    backlog: BTreeMap<u64, (RoundReport, Instant)>,
    /// How long after a report this peer records a round its coordinator did not.
    backup_delay: Duration,
}

impl RoundPayer {
    fn new(job: &Job, me: PeerKey) -> Self {
        Self {
            job: job.id,
            me,
            pending: BTreeMap::new(),
            unlisted_said: false,
            join_sent: None,
            full_said: false,
            votes: BTreeMap::new(),
            backlog: BTreeMap::new(),
            backup_delay: BACKUP_RECORD_DELAY,
        }
    }

    /// Spreads this peer's backup delay by its key.
    fn with_stagger(mut self) -> Self {
        let spread = BACKUP_STAGGER.as_millis() as u64;
        let hash = blake3::hash(&self.me);
        let offset = u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap_or([0; 8]));
        self.backup_delay = BACKUP_RECORD_DELAY + Duration::from_millis(offset % spread.max(1));
        self
    }

    async fn on_report(&mut self, jobs: &SharedJobBook, report: &RoundReport) {
        let Some(terms) = self.terms(jobs) else {
            return;
        };
        if !report.audits.is_empty() {
            let (entries, spent) = audit_entries(&terms, report);
            self.submit(entries, report.round).await;
            *self.pending.entry(report.round).or_default() += spent;
        }
        // After a resync, this peer vouches for the lineage of the model it loaded, unless it
        // already voted for the same model and accepted set itself (its own vote also names
        // whom it refused).
        let fresh: Vec<(u64, Entry)> = {
            let book = jobs.lock().unwrap_or_else(|e| e.into_inner());
            adopted_votes(&terms, report)
                .into_iter()
                .filter_map(|adopted| {
                    let Entry::RoundVote {
                        round,
                        model_hash,
                        accepted_digest,
                        ..
                    } = adopted
                    else {
                        return None;
                    };
                    let pending = self
                        .votes
                        .get(&round)
                        .is_some_and(|(vote, _)| same_choice(vote, &adopted));
                    let held = book
                        .credits()
                        .round_votes(&self.job, round)
                        .any(|(voter, held)| {
                            *voter == self.me
                                && held.model_hash == model_hash
                                && held.accepted_digest == accepted_digest
                        });
                    (!pending && !held).then_some((round, adopted))
                })
                .collect()
        };
        for (round, adopted) in fresh {
            self.remember_vote(round, adopted);
        }
        // A round this peer resynced past (its accepted set unknown here) is not one it can
        // record.
        let Some(vote) = vote_entry(&terms, report) else {
            self.on_tick(jobs, Instant::now()).await;
            return;
        };
        self.remember_vote(report.round, vote);
        if self.backlog.len() >= BACKUP_ROUNDS_MAX {
            self.backlog.pop_first();
        }
        let due = if report.closed_by_me {
            Instant::now()
        } else {
            Instant::now() + self.backup_delay
        };
        self.backlog.insert(report.round, (report.clone(), due));
        self.on_tick(jobs, Instant::now()).await;
    }

    /// Holds this peer's vote on `round` until the ledger holds it (replacing an earlier one
    /// not sent yet; the oldest round goes beyond [`BACKUP_ROUNDS_MAX`]).
    fn remember_vote(&mut self, round: u64, vote: Entry) {
        if !self.votes.contains_key(&round) && self.votes.len() >= BACKUP_ROUNDS_MAX {
            self.votes.pop_first();
        }
        self.votes.insert(round, (vote, None));
    }

    /// Joins the committee and submits this peer's votes until the ledger holds them, and
    /// records the rounds of the backlog that are due at `now`, still missing from the ledger,
    /// and voted for by a quorum.
    async fn on_tick(&mut self, jobs: &SharedJobBook, now: Instant) {
        let resend = |sent: Option<Instant>| sent.is_none_or(|at| now >= at + RESUBMIT_AFTER);
        let (member, full, recorded, on_ledger) = {
            let book = jobs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(record) = book.get(&self.job) else {
                self.backlog.clear();
                self.votes.clear();
                return;
            };
            let credits = book.credits();
            let members = credits.committee(&self.job).count();
            let member = credits.committee(&self.job).any(|peer| *peer == self.me);
            let max = credits
                .terms(&self.job)
                .map_or(0, |terms| terms.max_contributors as usize);
            let recorded: BTreeSet<u64> = record.rounds.keys().copied().collect();
            // A vote counts as on the ledger only as this peer last cast it: after a rollback
            // onto another branch of a round, the new vote replaces the old one.
            let on_ledger: BTreeSet<u64> = self
                .votes
                .iter()
                .filter(|(round, (vote, _))| {
                    credits
                        .round_votes(&self.job, **round)
                        .any(|(voter, held)| *voter == self.me && held.matches(vote))
                })
                .map(|(round, _)| *round)
                .collect();
            (member, members >= max, recorded, on_ledger)
        };
        self.backlog.retain(|round, _| !recorded.contains(round));
        self.pending.retain(|round, _| !recorded.contains(round));
        while self.pending.len() > BACKUP_ROUNDS_MAX {
            self.pending.pop_first();
        }
        self.votes
            .retain(|round, _| !recorded.contains(round) && !on_ledger.contains(round));
        if !member {
            if full {
                if !self.full_said {
                    tracing::warn!(job = %hex(&self.job), "the job's committee is full; this peer's rounds are not voted");
                    self.full_said = true;
                }
            } else if resend(self.join_sent) {
                self.join_sent = Some(now);
                self.submit(vec![Entry::JobJoined { job: self.job }], 0)
                    .await;
            }
            return;
        }
        let to_send: Vec<(u64, Entry)> = self
            .votes
            .iter()
            .filter(|(_, (_, sent))| resend(*sent))
            .map(|(round, (vote, _))| (*round, vote.clone()))
            .collect();
        for (round, vote) in to_send {
            if let Some((_, sent)) = self.votes.get_mut(&round) {
                *sent = Some(now);
            }
            self.submit(vec![vote], round).await;
        }
        let due: Vec<u64> = self
            .backlog
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(round, _)| *round)
            .collect();
        for round in due {
            let Some(slashable) = self.voted(jobs, round) else {
                continue;
            };
            if let Some((report, _)) = self.backlog.remove(&round) {
                if !report.closed_by_me {
                    tracing::info!(
                        round,
                        "the round's coordinator did not record it; recording it"
                    );
                }
                self.record(jobs, &report, &slashable).await;
            }
        }
    }

    /// What the committee's votes let this peer record for `round` (the model and accepted set
    /// it voted for): `None` until a quorum voted for them, else whom the result may slash.
    fn voted(&self, jobs: &SharedJobBook, round: u64) -> Option<BTreeSet<PeerKey>> {
        let (report, _) = self.backlog.get(&round)?;
        let terms = self.terms_unlogged(jobs)?;
        let book = jobs.lock().unwrap_or_else(|e| e.into_inner());
        voted_result(book.credits(), &terms, report)
    }

    /// The job's terms on the ledger, with the escrow at the ledger's tip less what this peer's
    /// entries not yet on the ledger will take; None when the job is not on the ledger (said
    /// once).
    fn terms(&mut self, jobs: &SharedJobBook) -> Option<RoundTerms> {
        let terms = self.terms_unlogged(jobs);
        if terms.is_none() && !self.unlisted_said {
            tracing::info!(job = %hex(&self.job), "job not on the ledger; rounds are not paid");
            self.unlisted_said = true;
        }
        terms
    }

    fn terms_unlogged(&self, jobs: &SharedJobBook) -> Option<RoundTerms> {
        let book = jobs.lock().unwrap_or_else(|e| e.into_inner());
        let record = book.get(&self.job)?;
        let pending: Credits = self
            .pending
            .iter()
            .filter(|(round, _)| !record.rounds.contains_key(round))
            .map(|(_, credits)| credits)
            .sum();
        Some(RoundTerms {
            job: self.job,
            terms: *book.credits().terms(&self.job)?,
            available: book.credits().escrow(&self.job).saturating_sub(pending),
        })
    }

    /// Submits this peer's entries for `round` to its ledger replica.
    async fn submit(&self, entries: Vec<Entry>, round: u64) {
        let Some(ledger) = ractor::registry::where_is(names::LEDGER)
            .map(ActorRef::<loom_actors::ledger::LedgerMsg>::from)
        else {
            tracing::warn!(round, "no ledger to record the round on");
            return;
        };
        for entry in entries {
            // A vote or a join that does not apply yet (the join not final) is sent again.
            let retried = matches!(entry, Entry::RoundVote { .. } | Entry::JobJoined { .. });
            match ractor::call_t!(
                ledger,
                loom_actors::ledger::LedgerMsg::SubmitOwn,
                2_000,
                entry
            ) {
                Ok(Ok(())) => {}
                Ok(Err(error)) if retried => {
                    tracing::debug!(round, %error, "vote or join not taken yet")
                }
                Ok(Err(error)) => tracing::warn!(round, %error, "round entry refused"),
                Err(error) => tracing::warn!(round, %error, "ledger unreachable"),
            }
        }
    }

    async fn record(
        &mut self,
        jobs: &SharedJobBook,
        report: &RoundReport,
        slashable: &BTreeSet<PeerKey>,
    ) {
        let Some(terms) = self.terms(jobs) else {
            return;
        };
        let (entries, spent) = round_entries(&terms, report, slashable);
        self.submit(entries, report.round).await;
        *self.pending.entry(report.round).or_default() += spent;
        tracing::info!(
            round = report.round,
            credits = spent,
            "round recorded on the ledger"
        );
    }
}

/// Whether `model_hash` (hex) is the model the ledger recorded for the last round `rounds` of
/// `job`, or the job is not on the ledger.
fn final_model_settled(jobs: &SharedJobBook, job: &JobId, rounds: u64, model_hash: &str) -> bool {
    let book = jobs.lock().unwrap_or_else(|e| e.into_inner());
    match book.get(job) {
        None => true,
        Some(record) => record
            .rounds
            .get(&rounds)
            .is_some_and(|recorded| recorded.model_hash == model_hash),
    }
}

/// The newest round of `job` recorded on the ledger, with its model hash, when newer than
/// `after`: what the exchanger follows when its peers split onto two models.
fn newest_recorded(
    jobs: &SharedJobBook,
    job: &JobId,
    after: Option<u64>,
) -> Option<(u64, [u8; 32])> {
    let book = jobs.lock().unwrap_or_else(|e| e.into_inner());
    let (round, recorded) = book.get(job)?.rounds.last_key_value()?;
    if after.is_some_and(|fed| fed >= *round) {
        return None;
    }
    let model_hash = crate::ledger_cli::unhex(&recorded.model_hash)
        .and_then(|bytes| <[u8; 32]>::try_from(bytes.as_slice()).ok())?;
    Some((*round, model_hash))
}

/// Trains a prepared job inside a started node until its last round, or until `stop` resolves
/// (with its result): starts the Trainer and GradientExchanger actors on the node's network,
/// writes each round's report to the progress file and the status slot, records the rounds this
/// peer coordinates on the ledger, and stops the job's actors at the end.
pub async fn run_job(
    context: &NodeContext,
    prepared: PreparedJob,
    verbose: bool,
    stop: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<TrainSummary> {
    let job_hex = hex(&prepared.job.id);
    let slot: LearnerSlot = Arc::new(Mutex::new(Some(prepared.learner)));
    let (trainer, trainer_done) = Actor::spawn(Some(names::TRAINER.into()), TrainerActor, slot)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the trainer: {e}"))?;
    // Audits run on their own learner, so they never disturb this peer's inner optimizer.
    let auditor = match prepared.auditor {
        Some(learner) => {
            let slot: LearnerSlot = Arc::new(Mutex::new(Some(learner)));
            match Actor::spawn(None, TrainerActor, slot).await {
                Ok((auditor, _)) => Some(auditor),
                Err(e) => {
                    trainer.stop(None);
                    anyhow::bail!("cannot start the auditor: {e}");
                }
            }
        }
        None => None,
    };
    let (reports_tx, mut reports) = mpsc::channel(1024);
    let exchanger_args = ExchangerArgs {
        plan: prepared.job.plan.clone(),
        signer: Arc::new(KeypairSigner(context.keypair.clone())),
        network: Arc::new(context.handle.clone()),
        blobs: context.blobs.clone(),
        trainer: trainer.clone(),
        start: Arc::new(prepared.start),
        resumed: prepared.resumed,
        tokens_per_step: prepared.tokens_per_step,
        checkpoints: Some(Arc::new(CheckpointDir(prepared.checkpoints.clone()))),
        reports: reports_tx,
        rejections: context.rejections.clone(),
        auditor: auditor.clone(),
        chain_key: run::signing_key(&context.keypair).ok(),
    };
    let spawned = Actor::spawn(
        Some(names::EXCHANGER.into()),
        ExchangerActor,
        exchanger_args,
    )
    .await;
    let (exchanger, exchanger_done) = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            trainer.stop(None);
            if let Some(auditor) = &auditor {
                auditor.stop(None);
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), trainer_done).await;
            anyhow::bail!("cannot start the exchanger: {e}");
        }
    };
    let me: PeerKey = run::signing_key(&context.keypair)
        .map(|k| k.verifying_key().to_bytes())
        .unwrap_or_default();
    let mut payer = RoundPayer::new(&prepared.job, me).with_stagger();
    let mut payer_tick = tokio::time::interval(Duration::from_millis(500));
    let mut recorded_fed: Option<u64> = None;
    let mut finished_at: Option<Instant> = None;
    let rounds = prepared.job.plan.rounds;
    let started = Instant::now();
    let mut last = RoundReport::default();
    let mut trainer_done = trainer_done;
    let mut exchanger_done = exchanger_done;
    let outcome: anyhow::Result<()> = async {
        let mut progress = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&prepared.progress_path)
            .with_context(|| format!("cannot open {}", prepared.progress_path.display()))?;
        tokio::pin!(stop);
        let result = loop {
            tokio::select! {
                stopped = &mut stop => break stopped,
                _ = &mut trainer_done => break Err(anyhow::anyhow!("the trainer stopped")),
                _ = &mut exchanger_done => break Err(anyhow::anyhow!("the exchanger stopped")),
                _ = payer_tick.tick() => {
                    payer.on_tick(&context.jobs, Instant::now()).await;
                    if let Some((round, model_hash)) =
                        newest_recorded(&context.jobs, &prepared.job.id, recorded_fed)
                    {
                        recorded_fed = Some(round);
                        let _ = exchanger.cast(loom_actors::exchanger::ExchangerMsg::Recorded {
                            round,
                            model_hash,
                        });
                    }
                    // After the last round: stay to serve slower peers, to record the round if
                    // its coordinator does not, and until this peer's model is the one the
                    // ledger recorded (a peer on another model resyncs and reports again).
                    if let Some(at) = finished_at {
                        let lingered = at.elapsed();
                        let settled = final_model_settled(&context.jobs, &prepared.job.id, rounds, &last.model_hash);
                        if lingered >= LINGER_AFTER_LAST_ROUND && (settled || lingered >= FINAL_SETTLE_MAX) {
                            if !settled {
                                tracing::warn!("the ledger has not recorded this peer's last model; finishing with it");
                            }
                            break Ok(());
                        }
                    }
                }
                report = reports.recv() => {
                    let Some(report) = report else { break Err(anyhow::anyhow!("the exchanger stopped reporting")) };
                    let (bytes_received, bytes_sent) = context.peer_bytes.totals();
                    let line = ProgressLine {
                        system: "loom",
                        job_id: &job_hex,
                        wall_s: started.elapsed().as_secs_f64(),
                        bytes_sent,
                        bytes_received,
                        report: &report,
                    };
                    let json = serde_json::to_string(&line).unwrap_or_default();
                    writeln!(progress, "{json}").context("cannot write the progress file")?;
                    if verbose {
                        eprintln!("{}", render_round(&report, rounds, bytes_sent));
                    }
                    *context.training.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(crate::status::TrainingStatus {
                            job_id: job_hex.clone(),
                            job: prepared.job.manifest.job.clone(),
                            rounds,
                            last: report.clone(),
                        });
                    payer.on_report(&context.jobs, &report).await;
                    if report.finished && finished_at.is_none() {
                        finished_at = Some(Instant::now());
                    }
                    last = report;
                }
            }
        };
        let _ = progress.sync_all();
        result
    }
    .await;
    exchanger.stop(None);
    trainer.stop(None);
    if let Some(auditor) = &auditor {
        auditor.stop(None);
    }
    // Their registry names are free again once they have stopped.
    let _ = tokio::time::timeout(Duration::from_secs(5), exchanger_done).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), trainer_done).await;
    outcome?;
    let (_, bytes_sent) = context.peer_bytes.totals();
    Ok(TrainSummary {
        job_id: job_hex,
        last,
        wall_s: started.elapsed().as_secs_f64(),
        bytes_sent,
    })
}

/// Directory of the data directory a picked-up job's relative dataset files are read from.
pub const PICKED_UP_DATASETS: &str = "datasets";
/// How often the pick-up loop looks for jobs.
const PICK_UP_INTERVAL: Duration = Duration::from_millis(500);

/// Why this machine cannot give a job the resources its manifest asks for, if it cannot.
pub fn resource_mismatch(manifest: &Manifest, cores: usize, cuda: bool) -> Option<String> {
    if manifest.resources.device == DeviceChoice::Cuda && !cuda {
        return Some("it asks for CUDA and this machine has none".into());
    }
    if manifest.resources.threads > cores {
        return Some(format!(
            "it asks for {} threads and this machine has {cores} cores",
            manifest.resources.threads
        ));
    }
    None
}

/// Why a peer that picks a job up from the ledger will not load its dataset, if it will not: a
/// file must be a relative path inside `<data-dir>/datasets/`, and a URL must not name this
/// machine or a private network by address.
pub fn dataset_refusal(dataset: &DatasetSpec) -> Option<String> {
    match dataset {
        DatasetSpec::Builtin { .. } => None,
        DatasetSpec::File { path, .. } => {
            let path = Path::new(path);
            let inside = path
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            (!inside).then(|| {
                format!(
                    "its dataset file {} is not a plain relative path (a picked-up job reads files from <data-dir>/datasets/ only)",
                    path.display()
                )
            })
        }
        DatasetSpec::Url { url, .. } => {
            let host = url_host(url);
            let local = match host.as_deref() {
                None => true,
                Some("localhost") => true,
                Some(host) => host.parse::<std::net::IpAddr>().is_ok_and(|ip| match ip {
                    std::net::IpAddr::V4(v4) => {
                        v4.is_loopback()
                            || v4.is_private()
                            || v4.is_link_local()
                            || v4.is_unspecified()
                            || v4.is_broadcast()
                    }
                    std::net::IpAddr::V6(v6) => {
                        v6.is_loopback()
                            || v6.is_unspecified()
                            || v6.is_unique_local()
                            || v6.is_unicast_link_local()
                            || v6.to_ipv4_mapped().is_some()
                    }
                }),
            };
            local
                .then(|| format!("its dataset URL {url:?} names this machine or a private network"))
        }
    }
}

/// The host of an http(s) URL, lowercase, without port or brackets.
fn url_host(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// Makes a job from the ledger ready to train here, or says why it cannot be.
fn prepare_pick_up(
    data_dir: &Path,
    id: JobId,
    text: &str,
    cores: usize,
    cuda: bool,
) -> Result<PreparedJob, String> {
    let manifest = Manifest::parse(text).map_err(|e| e.to_string())?;
    if let Some(reason) = resource_mismatch(&manifest, cores, cuda) {
        return Err(reason);
    }
    if let Some(reason) = dataset_refusal(&manifest.dataset) {
        return Err(reason);
    }
    let job = manifest
        .into_job(&data_dir.join(PICKED_UP_DATASETS))
        .map_err(|e| e.to_string())?;
    if job.id != id {
        return Err(format!(
            "its manifest yields another job id ({})",
            &hex(&job.id)[..16]
        ));
    }
    prepare_job(job, data_dir, true, None).map_err(|e| format!("{e:#}"))
}

/// Trains the jobs submitted on the ledger, one at a time, until the process ends.
pub async fn pick_up(context: NodeContext) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cuda = loom_trainer::cuda_available();
    let mut considered: BTreeSet<JobId> = BTreeSet::new();
    let mut running: Option<(JobId, tokio::task::JoinHandle<anyhow::Result<TrainSummary>>)> = None;
    loop {
        tokio::time::sleep(PICK_UP_INTERVAL).await;
        if let Some((id, handle)) = running.take() {
            if !handle.is_finished() {
                running = Some((id, handle));
                continue;
            }
            match handle.await {
                Ok(Ok(summary)) => {
                    tracing::info!(job = %summary.job_id, round = summary.last.round, wall_s = summary.wall_s, "job done")
                }
                Ok(Err(error)) => {
                    tracing::error!(job = %hex(&id), error = %format!("{error:#}"), "job stopped")
                }
                Err(error) => tracing::error!(job = %hex(&id), %error, "job task failed"),
            }
        }
        let candidate = {
            let book = context.jobs.lock().unwrap_or_else(|e| e.into_inner());
            book.jobs()
                .filter(|r| r.open() && !considered.contains(&r.id))
                .min_by_key(|r| r.height)
                .map(|r| (r.id, r.manifest.clone()))
        };
        let Some((id, text)) = candidate else {
            continue;
        };
        considered.insert(id);
        let data_dir = context.data_dir.clone();
        let prepared =
            tokio::task::spawn_blocking(move || prepare_pick_up(&data_dir, id, &text, cores, cuda))
                .await;
        match prepared {
            Ok(Ok(prepared)) => {
                tracing::info!(job = %hex(&id), name = %prepared.job.manifest.job, resumed = prepared.resumed, "job picked up");
                let context = context.clone();
                running = Some((
                    id,
                    tokio::spawn(async move {
                        let closed = closed_on_ledger(context.jobs.clone(), id);
                        run_job(&context, prepared, false, closed).await
                    }),
                ));
            }
            Ok(Err(reason)) => {
                tracing::warn!(job = %hex(&id), %reason, "job not picked up");
            }
            Err(error) => tracing::error!(job = %hex(&id), %error, "job preparation failed"),
        }
    }
}

/// Resolves with an error once the job's submitter has closed it on the ledger.
async fn closed_on_ledger(jobs: crate::jobs::SharedJobBook, id: JobId) -> anyhow::Result<()> {
    loop {
        tokio::time::sleep(PICK_UP_INTERVAL).await;
        let closed = jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .is_some_and(|r| r.closed_height.is_some());
        if closed {
            anyhow::bail!("the job was closed by its submitter");
        }
    }
}

/// One line per round for people.
pub fn render_round(report: &RoundReport, rounds: u64, bytes_sent: u64) -> String {
    let loss = |l: Option<f32>| l.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into());
    format!(
        "round {:>3}/{rounds}  val {}  train {}  contributors {}  update {} (dense fp32 {})  sent {}  hash {}",
        report.round,
        loss(report.val_loss),
        loss(report.train_loss),
        report.contributors,
        human_bytes(report.update_bytes),
        human_bytes(report.dense_fp32_bytes),
        human_bytes(bytes_sent),
        &report.model_hash[..report.model_hash.len().min(12)],
    )
}

/// Bytes in B, KiB, MiB or GiB.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for the LedgerReplica: takes every entry submitted.
    struct FakeLedger;

    impl Actor for FakeLedger {
        type Msg = loom_actors::ledger::LedgerMsg;
        type State = Arc<Mutex<Vec<loom_protocols::ledger::Entry>>>;
        type Arguments = Arc<Mutex<Vec<loom_protocols::ledger::Entry>>>;

        async fn pre_start(
            &self,
            _: ActorRef<Self::Msg>,
            entries: Self::Arguments,
        ) -> Result<Self::State, ractor::ActorProcessingErr> {
            Ok(entries)
        }

        async fn handle(
            &self,
            _: ActorRef<Self::Msg>,
            message: Self::Msg,
            entries: &mut Self::State,
        ) -> Result<(), ractor::ActorProcessingErr> {
            if let loom_actors::ledger::LedgerMsg::SubmitOwn(entry, reply) = message {
                entries.lock().expect("entries").push(entry);
                let _ = reply.send(Ok(()));
            }
            Ok(())
        }
    }

    /// The payer joins the job's committee, votes on every round it applied until the ledger
    /// holds the vote, records a round it coordinated once a quorum voted for it, and records a
    /// round its coordinator never recorded once the backup delay has passed; a round already
    /// on the ledger is not recorded again.
    #[tokio::test]
    async fn the_payer_votes_and_records_rounds_once_the_committee_voted() {
        use loom_protocols::ledger::Entry;
        let job = Manifest::parse(crate::manifest::DEMO_MANIFEST)
            .expect("manifest")
            .into_job(Path::new("."))
            .expect("job");
        let ledger_keys = crate::jobs::testing::TestLedger::new(1);
        let me = ledger_keys.me;
        let sign = |entry: Entry| ledger_keys.sign(entry);
        let genesis = ledger_keys.genesis(1_000_000);
        let block = |height: u64, entries| ledger_keys.block(height, entries);
        let jobs: SharedJobBook = Arc::default();
        {
            let mut book = jobs.lock().expect("book");
            book.apply(&genesis).expect("genesis");
            book.apply(&block(
                1,
                vec![sign(Entry::JobSubmitted {
                    job: job.id,
                    escrow: 100_000,
                    manifest: crate::manifest::DEMO_MANIFEST.into(),
                    terms: job.manifest.ledger_terms(),
                })],
            ))
            .expect("job");
        }
        let submitted: Arc<Mutex<Vec<Entry>>> = Arc::default();
        let (ledger, _) = Actor::spawn(Some(names::LEDGER.into()), FakeLedger, submitted.clone())
            .await
            .expect("ledger");
        let take = || std::mem::take(&mut *submitted.lock().expect("entries"));
        let mut payer = RoundPayer::new(&job, me);
        payer.backup_delay = Duration::from_secs(10);
        let report = |round: u64, closed_by_me: bool| RoundReport {
            round,
            model_hash: hex(&[round as u8; 32]),
            closed_by_me,
            accepted: vec![hex(&me)],
            evidence: vec![crate::jobs::testing::TestLedger::commitment(
                1, job.id, round,
            )],
            ..RoundReport::default()
        };
        payer.on_report(&jobs, &report(1, false)).await;
        payer.on_report(&jobs, &report(2, false)).await;
        let joins = take();
        assert!(
            matches!(joins.as_slice(), [Entry::JobJoined { .. }]),
            "a join, no vote before it is final: {joins:?}"
        );
        let mut height = 2;
        let mut apply = |entries: Vec<Entry>| {
            let signed = entries.into_iter().map(sign).collect();
            jobs.lock()
                .expect("book")
                .apply(&block(height, signed))
                .expect("applies");
            height += 1;
        };
        apply(joins);
        payer.on_tick(&jobs, Instant::now()).await;
        let votes = take();
        assert!(
            votes
                .iter()
                .all(|e| matches!(e, Entry::RoundVote { rejected, .. } if rejected.is_empty()))
                && votes.len() == 2,
            "{votes:?}"
        );
        // Round 2's coordinator records it meanwhile.
        let mut entries = votes;
        entries.push(Entry::RoundResult {
            job: job.id,
            round: 2,
            model_hash: [2; 32],
            accepted: vec![(me, 10)],
            rejected: Vec::new(),
            evidence: vec![crate::jobs::testing::TestLedger::commitment(1, job.id, 2).1],
        });
        apply(entries);
        payer.on_tick(&jobs, Instant::now()).await;
        assert!(
            take().is_empty(),
            "round 1 is not due yet, votes are on the ledger"
        );
        payer
            .on_tick(&jobs, Instant::now() + Duration::from_secs(11))
            .await;
        let entries = take();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(
            matches!(&entries[0], Entry::RoundResult { round: 1, accepted, .. } if accepted == &vec![(me, 10)]),
            "{entries:?}"
        );
        assert!(payer.backlog.is_empty());
        // A round this peer coordinated: recorded only once its vote is on the ledger.
        payer.on_report(&jobs, &report(3, true)).await;
        let vote = take();
        assert!(
            matches!(vote.as_slice(), [Entry::RoundVote { round: 3, .. }]),
            "{vote:?}"
        );
        apply(vote);
        payer.on_tick(&jobs, Instant::now()).await;
        let entries = take();
        assert!(
            matches!(entries.as_slice(), [Entry::RoundResult { round: 3, .. }]),
            "{entries:?}"
        );
        // After a rollback onto another branch of round 4, this peer votes again.
        payer.on_report(&jobs, &report(4, false)).await;
        apply(take());
        let mut rolled_back = report(4, false);
        rolled_back.model_hash = hex(&[9; 32]);
        payer.on_report(&jobs, &rolled_back).await;
        let vote = take();
        assert!(
            matches!(vote.as_slice(), [Entry::RoundVote { round: 4, model_hash, .. }] if *model_hash == [9; 32]),
            "{vote:?}"
        );
        apply(vote);
        payer.on_tick(&jobs, Instant::now()).await;
        assert!(take().is_empty(), "the new vote is on the ledger");
        // After a resync onto round 6, it vouches for the loaded model's lineage: round 5 and
        // 6 as most announcers gave them, not round 4 again (its own vote holds that choice).
        let resynced = RoundReport {
            round: 6,
            model_hash: hex(&[6; 32]),
            adopted: [(6, [6; 32]), (5, [5; 32]), (4, [9; 32])]
                .into_iter()
                .map(|(round, model)| loom_actors::exchanger::AdoptedRound {
                    round,
                    model_hash: hex(&model),
                    accepted_digest: hex(&loom_protocols::ledger::accepted_digest(&[me])),
                })
                .collect(),
            ..RoundReport::default()
        };
        payer.on_report(&jobs, &resynced).await;
        let votes = take();
        let rounds: Vec<u64> = votes
            .iter()
            .filter_map(|e| match e {
                Entry::RoundVote {
                    round, rejected, ..
                } if rejected.is_empty() => Some(*round),
                _ => None,
            })
            .collect();
        assert_eq!(rounds, vec![5, 6], "{votes:?}");
        ledger.stop(None);
    }

    #[test]
    fn pick_up_needs_the_resources_the_manifest_asks_for() {
        let mut manifest =
            crate::manifest::Manifest::parse(crate::manifest::DEMO_MANIFEST).expect("manifest");
        manifest.resources.device = DeviceChoice::Cpu;
        manifest.resources.threads = 2;
        assert_eq!(resource_mismatch(&manifest, 2, false), None);
        assert!(
            resource_mismatch(&manifest, 1, false)
                .is_some_and(|r| r.contains("2 threads") && r.contains("1 cores"))
        );
        manifest.resources.device = DeviceChoice::Cuda;
        assert!(resource_mismatch(&manifest, 4, false).is_some_and(|r| r.contains("CUDA")));
        assert_eq!(resource_mismatch(&manifest, 4, true), None);
        manifest.resources.device = DeviceChoice::Auto;
        assert_eq!(resource_mismatch(&manifest, 4, false), None);
    }

    #[test]
    fn picked_up_jobs_read_only_their_own_datasets() {
        let file = |path: &str| DatasetSpec::File {
            path: path.into(),
            vocab: loom_trainer::Vocab::Char,
        };
        let url = |url: &str| DatasetSpec::Url {
            url: url.into(),
            vocab: loom_trainer::Vocab::Byte,
        };
        assert_eq!(
            dataset_refusal(&DatasetSpec::Builtin { seed: 1, chars: 1 }),
            None
        );
        assert_eq!(dataset_refusal(&file("text/input.txt")), None);
        for bad in ["/etc/passwd", "../secret.txt", "a/../../b", "./x"] {
            assert!(dataset_refusal(&file(bad)).is_some(), "{bad}");
        }
        for good in [
            "https://example.org/input.txt",
            "http://93.184.216.34:8080/a?b",
        ] {
            assert_eq!(dataset_refusal(&url(good)), None, "{good}");
        }
        for bad in [
            "http://127.0.0.1/x",
            "http://localhost:9464/metrics",
            "http://10.1.2.3/x",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]:80/x",
            "http://user@192.168.1.1/x",
            "ftp://example.org/x",
        ] {
            assert!(dataset_refusal(&url(bad)).is_some(), "{bad}");
        }
    }

    #[test]
    fn a_checkpoint_round_trips_and_a_corrupted_one_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let job = crate::manifest::Manifest::parse(crate::manifest::DEMO_MANIFEST)
            .expect("manifest")
            .into_job(Path::new("."))
            .expect("job");
        let sink = CheckpointDir(dir.path().to_path_buf());
        let older = Snapshot {
            round: 4,
            ..initial_snapshot(&job, vec![0.5; 10])
        };
        let newer = Snapshot {
            round: 8,
            params: vec![1.5; 10],
            ..older.clone()
        };
        for snapshot in [&older, &newer] {
            let bytes = snapshot.to_bytes();
            sink.save(snapshot.round, &blob_hash(&bytes), &bytes)
                .expect("saved");
        }
        let loaded = latest_checkpoint(dir.path(), &job, 10).expect("read");
        assert_eq!(loaded.as_ref(), Some(&newer));
        // Corrupt the newest: the older one is used instead.
        let newest = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("round-00000008"))
            .expect("newest file");
        let mut bytes = std::fs::read(&newest).expect("read");
        bytes[70] ^= 1;
        std::fs::write(&newest, bytes).expect("write");
        let loaded = latest_checkpoint(dir.path(), &job, 10).expect("read");
        assert_eq!(loaded, Some(older));
        // A model of another size finds nothing usable.
        assert_eq!(latest_checkpoint(dir.path(), &job, 11).expect("read"), None);
    }
}
