//! `loom-peer train`: joins the mesh and trains the manifest's job together with every peer
//! running the same job.
//!
//! Loads the manifest and its dataset, builds the libtorch learner, starts the peer (network,
//! membership, control API) plus the Trainer and GradientExchanger actors, and follows the
//! rounds: each round's report goes to the progress file (JSON lines) and to stderr. Checkpoints
//! are written atomically under `<data-dir>/jobs/<job>/checkpoints/`, named by round and blake3
//! hash; `--resume` starts from the newest one that verifies.

use std::{
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
    contribution::{BlobHash, blob_hash},
    snapshot::{OuterState, Snapshot},
};
use loom_trainer::{DeviceChoice, TchLearner};
use ractor::Actor;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::{
    config::NodeConfig,
    identity,
    manifest::{Job, Manifest},
    run::{self, KeypairSigner},
};

/// How long a peer keeps serving after its last round, so slower peers can fetch from it.
const LINGER_AFTER_LAST_ROUND: Duration = Duration::from_secs(3);

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
    let learner = TchLearner::new(job.learner.clone(), job.dataset.clone())
        .context("cannot build the model")?;
    run::create_data_dir(&config.data_dir)?;
    let keypair = identity::load_or_create(&config.data_dir)?;
    let dir = job_dir(&config.data_dir, &job);
    let checkpoints = dir.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)
        .with_context(|| format!("cannot create {}", checkpoints.display()))?;
    let param_count = learner.param_count();
    let resumed = if options.resume {
        let found = latest_checkpoint(&checkpoints, &job, param_count)?;
        if found.is_none() {
            eprintln!(
                "no checkpoint to resume from in {}; starting fresh",
                checkpoints.display()
            );
        }
        found
    } else {
        None
    };
    let start = match resumed.clone() {
        Some(snapshot) => snapshot,
        None => initial_snapshot(&job, learner.params()),
    };
    let progress_path = options
        .progress
        .clone()
        .unwrap_or_else(|| config.data_dir.join("progress.jsonl"));
    if options.verbose {
        eprintln!(
            "job {} ({}): {} parameters on {:?}, {}; {}",
            &hex(&job.id)[..16],
            job.manifest.job,
            param_count,
            learner.device(),
            job.dataset.describe(),
            match &resumed {
                Some(s) => format!("resuming after round {}", s.round),
                None => "starting".to_owned(),
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
    let tokens_per_step = learner.tokens_per_step();
    runtime.block_on(train_async(TrainRun {
        config,
        keypair,
        job,
        learner: Box::new(learner),
        start,
        resumed: resumed.is_some(),
        checkpoints,
        progress_path,
        tokens_per_step,
        verbose: options.verbose,
    }))
}

struct TrainRun {
    config: NodeConfig,
    keypair: Keypair,
    job: Job,
    learner: Box<dyn Learner>,
    start: Snapshot,
    resumed: bool,
    checkpoints: PathBuf,
    progress_path: PathBuf,
    tokens_per_step: u64,
    verbose: bool,
}

async fn train_async(run: TrainRun) -> anyhow::Result<TrainSummary> {
    let config = &run.config;
    let mut node = run::start_node(config, &run.keypair).await?;
    let job_hex = hex(&run.job.id);
    tracing::info!(peer = %run.keypair.public().to_peer_id(), job = %job_hex, api = %node.api, "training");
    let slot: LearnerSlot = Arc::new(Mutex::new(Some(run.learner)));
    let (trainer, trainer_done) = Actor::spawn(Some(names::TRAINER.into()), TrainerActor, slot)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the trainer: {e}"))?;
    let (reports_tx, mut reports) = mpsc::channel(1024);
    let exchanger_args = ExchangerArgs {
        plan: run.job.plan.clone(),
        signer: Arc::new(KeypairSigner(run.keypair.clone())),
        network: Arc::new(node.handle.clone()),
        blobs: node.blobs.clone(),
        trainer: trainer.clone(),
        start: Arc::new(run.start),
        resumed: run.resumed,
        tokens_per_step: run.tokens_per_step,
        checkpoints: Some(Arc::new(CheckpointDir(run.checkpoints.clone()))),
        reports: reports_tx,
        rejections: node.rejections.clone(),
    };
    let (exchanger, exchanger_done) = Actor::spawn(
        Some(names::EXCHANGER.into()),
        ExchangerActor,
        exchanger_args,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the exchanger: {e}"))?;
    let mut progress = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&run.progress_path)
        .with_context(|| format!("cannot open {}", run.progress_path.display()))?;
    let started = Instant::now();
    let mut last = RoundReport::default();
    let rounds = run.job.plan.rounds;
    let mut trainer_done = trainer_done;
    let mut exchanger_done = exchanger_done;
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            signal = run::termination() => break signal.and(Err(anyhow::anyhow!("interrupted before the last round"))),
            _ = &mut trainer_done => break Err(anyhow::anyhow!("the trainer stopped")),
            _ = &mut exchanger_done => break Err(anyhow::anyhow!("the exchanger stopped")),
            result = &mut node.supervisor_done => break match result {
                Ok(()) => Err(anyhow::anyhow!("the actor tree stopped: a child kept failing")),
                Err(e) => Err(anyhow::anyhow!("the actor tree failed: {e}")),
            },
            report = reports.recv() => {
                let Some(report) = report else { break Err(anyhow::anyhow!("the exchanger stopped reporting")) };
                let (bytes_received, bytes_sent) = node.peer_bytes.totals();
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
                if run.verbose {
                    eprintln!("{}", render_round(&report, rounds, bytes_sent));
                }
                *node.training.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(crate::status::TrainingStatus {
                        job_id: job_hex.clone(),
                        job: run.job.manifest.job.clone(),
                        rounds,
                        last: report.clone(),
                    });
                let finished = report.finished;
                last = report;
                if finished {
                    tokio::time::sleep(LINGER_AFTER_LAST_ROUND).await;
                    break Ok(());
                }
            }
        }
    };
    let _ = progress.sync_all();
    let (_, bytes_sent) = node.peer_bytes.totals();
    exchanger.stop(None);
    trainer.stop(None);
    run::stop_node(config, node).await;
    outcome?;
    let summary = TrainSummary {
        job_id: job_hex,
        last,
        wall_s: started.elapsed().as_secs_f64(),
        bytes_sent,
    };
    let summary_path = job_dir(&config.data_dir, &run.job).join("summary.json");
    identity::write_atomic(
        &summary_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
        0o644,
    )
    .with_context(|| format!("cannot write {}", summary_path.display()))?;
    Ok(summary)
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
