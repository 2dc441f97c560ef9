//! Training rounds with real libtorch learners, several peers in one process, joined by an
//! in-memory bus standing in for gossip and the blob protocol (the loopback tests in
//! `train.rs` run the same actors over libp2p).
//!
//! Checks: identical model hashes on every peer after every round; a peer crashing mid-run
//! and another joining mid-run; a peer serving corrupted blobs has them refused, and the rounds
//! go on without its contribution while every model stays identical.

#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use ed25519_dalek::{Signer, SigningKey};
use loom_actors::{
    ExchangerActor, ExchangerArgs, ExchangerMsg, HeartbeatSigner, JobPlan, Learner, LearnerSlot,
    NetworkPort, PortError, RoundReport, SharedBlobs, Strategy, Topic, TrainerActor, TrainerMsg,
};
use loom_protocols::{
    NatStatus, PeerKey,
    blobstore::BlobStore,
    compress::{Codec, Sparsity, ValueFormat},
    contribution::BlobHash,
    outer::OuterConfig,
    round::RoundConfig,
    snapshot::{OuterState, Snapshot},
};
use loom_trainer::{Dataset, DeviceChoice, LearnerConfig, ModelSpec, TchLearner};
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;

#[derive(Default)]
struct Bus {
    peers: Mutex<HashMap<PeerKey, Entry>>,
}

#[derive(Clone)]
struct Entry {
    exchanger: ActorRef<ExchangerMsg>,
    blobs: SharedBlobs,
    corrupts_blobs: bool,
}

struct BusPort {
    me: PeerKey,
    bus: Arc<Bus>,
}

impl NetworkPort for BusPort {
    fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), PortError> {
        if topic != Topic::Training {
            return Ok(());
        }
        for (key, entry) in self.bus.peers.lock().unwrap().iter() {
            if *key != self.me {
                let _ = entry.exchanger.cast(ExchangerMsg::Gossip {
                    from: self.me,
                    data: data.clone(),
                });
            }
        }
        Ok(())
    }

    fn connect_hint(&self, _: PeerKey, _: Vec<String>, _: NatStatus) -> Result<(), PortError> {
        Ok(())
    }

    fn fetch_blob(&self, peer: PeerKey, hash: BlobHash) -> Result<(), PortError> {
        let peers = self.bus.peers.lock().unwrap();
        let me = peers
            .get(&self.me)
            .ok_or(PortError::Closed)?
            .exchanger
            .clone();
        let result = match peers.get(&peer) {
            None => Err("peer unreachable".to_owned()),
            Some(entry) => match entry.blobs.lock().unwrap().get(&hash) {
                None => Err("peer does not hold the blob".to_owned()),
                Some(bytes) => {
                    let mut bytes = bytes.as_ref().clone();
                    if entry.corrupts_blobs && !bytes.is_empty() {
                        let last = bytes.len() - 1;
                        bytes[last] ^= 0x55;
                    }
                    Ok(bytes)
                }
            },
        };
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

const JOB: [u8; 32] = [7; 32];

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
        eval_batches: 2,
        ..LearnerConfig::default()
    }
}

fn plan(rounds: u64) -> JobPlan {
    plan_with(
        rounds,
        Strategy::Diloco {
            inner_steps: 2,
            outer: OuterConfig::default(),
        },
    )
}

fn plan_with(rounds: u64, strategy: Strategy) -> JobPlan {
    JobPlan {
        job_id: JOB,
        rounds,
        strategy,
        codec: Codec {
            sparsity: Sparsity::TopK { ratio: 0.1 },
            values: ValueFormat::Int8,
        },
        feedback_decay: match strategy {
            Strategy::Diloco { .. } => 0.95,
            Strategy::Sync(_) => 1.0,
        },
        round: RoundConfig {
            round_deadline_ms: 1_500,
            proposer_grace_ms: 500,
            ..RoundConfig::default()
        },
        data_seed: 3,
        checkpoint_every: 0,
        join_wait_ms: 300,
        eval_every: 1,
        aggregation: loom_actors::Aggregation::Mean,
        screening: Some(Default::default()),
        audit: None,
        loss_check: true,
    }
}

struct Peer {
    key: PeerKey,
    exchanger: ActorRef<ExchangerMsg>,
    trainer: ActorRef<TrainerMsg>,
    reports: mpsc::Receiver<RoundReport>,
    seen: Vec<RoundReport>,
}

async fn spawn_peer(
    bus: &Arc<Bus>,
    seed: u8,
    rounds: u64,
    dataset: &Arc<Dataset>,
    corrupts_blobs: bool,
) -> Peer {
    spawn_peer_with(bus, seed, plan(rounds), dataset, corrupts_blobs).await
}

async fn spawn_peer_with(
    bus: &Arc<Bus>,
    seed: u8,
    plan: JobPlan,
    dataset: &Arc<Dataset>,
    corrupts_blobs: bool,
) -> Peer {
    let signing = SigningKey::from_bytes(&[seed; 32]);
    let key = signing.verifying_key().to_bytes();
    // libtorch's seed is process-wide: tests running side by side must not interleave their
    // initialisations (each `loom-peer` process has one learner).
    static INIT: Mutex<()> = Mutex::new(());
    let learner = {
        let _guard = INIT.lock().unwrap();
        TchLearner::new(learner_config(), dataset.clone()).unwrap()
    };
    let params = learner.params();
    let n = params.len();
    let slot: LearnerSlot = Arc::new(Mutex::new(Some(Box::new(learner) as Box<dyn Learner>)));
    let (trainer, _) = Actor::spawn(None, TrainerActor, slot).await.unwrap();
    let blobs: SharedBlobs = Arc::new(Mutex::new(BlobStore::new(256 << 20)));
    let (tx, reports) = mpsc::channel(1024);
    let outer = match plan.strategy {
        Strategy::Diloco { .. } => OuterState::Nesterov { buf: vec![0.0; n] },
        Strategy::Sync(_) => OuterState::AdamW {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        },
    };
    let args = ExchangerArgs {
        plan,
        signer: Arc::new(KeySigner(signing.clone())),
        network: Arc::new(BusPort {
            me: key,
            bus: bus.clone(),
        }),
        blobs: blobs.clone(),
        trainer: trainer.clone(),
        start: Arc::new(Snapshot {
            job_id: JOB,
            round: 0,
            params,
            outer,
        }),
        resumed: false,
        tokens_per_step: 32,
        checkpoints: None,
        reports: tx,
        rejections: Default::default(),
        auditor: None,
        chain_key: Some(signing.clone()),
    };
    let (exchanger, _) = Actor::spawn(None, ExchangerActor, args).await.unwrap();
    bus.peers.lock().unwrap().insert(
        key,
        Entry {
            exchanger: exchanger.clone(),
            blobs,
            corrupts_blobs,
        },
    );
    Peer {
        key,
        exchanger,
        trainer,
        reports,
        seen: Vec::new(),
    }
}

impl Peer {
    /// Collects reports until one for `round` (or the last) arrives.
    async fn wait_round(&mut self, round: u64) -> &RoundReport {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            if self.seen.last().is_some_and(|r| r.round >= round) {
                return self.seen.last().unwrap();
            }
            let report = tokio::time::timeout_at(deadline, self.reports.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no report for round {round} within 180 s; last: {:?}",
                        self.seen.last()
                    )
                })
                .expect("exchanger stopped");
            self.seen.push(report);
        }
    }

    fn stop(&self, bus: &Bus) {
        bus.peers.lock().unwrap().remove(&self.key);
        self.exchanger.stop(None);
        self.trainer.stop(None);
    }

    fn hashes(&self) -> BTreeMap<u64, String> {
        self.seen
            .iter()
            .map(|r| (r.round, r.model_hash.clone()))
            .collect()
    }
}

fn dataset() -> Arc<Dataset> {
    Arc::new(Dataset::builtin(42, 20_000))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_hold_identical_models_after_every_one_of_20_rounds() {
    let bus = Arc::new(Bus::default());
    let data = dataset();
    let mut peers = Vec::new();
    for seed in 1..=3 {
        peers.push(spawn_peer(&bus, seed, 20, &data, false).await);
    }
    for peer in &mut peers {
        let last = peer.wait_round(20).await;
        assert!(last.finished);
    }
    let hashes: Vec<BTreeMap<u64, String>> = peers.iter().map(Peer::hashes).collect();
    for round in 1..=20 {
        let first = hashes[0].get(&round).expect("every round reported");
        for (i, h) in hashes.iter().enumerate() {
            assert_eq!(
                h.get(&round),
                Some(first),
                "peer {i} differs at round {round}"
            );
        }
    }
    let first_loss = peers[0].seen.first().and_then(|r| r.val_loss).unwrap();
    let last_loss = peers[0].seen.last().and_then(|r| r.val_loss).unwrap();
    assert!(last_loss < first_loss, "loss {first_loss} -> {last_loss}");
    let contributors: Vec<usize> = peers[0].seen.iter().map(|r| r.contributors).collect();
    assert!(
        contributors.iter().filter(|&&c| c == 3).count() >= 18,
        "{contributors:?}"
    );
    // The round chain decided the rounds after the first (whose committee nobody knows), each
    // the close every peer applied.
    for peer in &peers {
        let last = peer.seen.last().unwrap();
        eprintln!(
            "chain: decided {} overruled {} coordinator changes {} per round {:?}",
            last.chain_decided,
            last.chain_overruled,
            last.chain_coordinator_changes,
            peer.seen
                .iter()
                .map(|r| (r.round, r.chain_decided, r.decided_in_consensus_round))
                .collect::<Vec<_>>()
        );
        assert!(last.chain_decided >= 18, "{last:?}");
        assert_eq!(last.chain_overruled, 0);
    }
    for peer in &peers {
        peer.stop(&bus);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_carries_on_when_a_peer_crashes_and_a_joiner_catches_up() {
    let bus = Arc::new(Bus::default());
    let data = dataset();
    let mut peers = Vec::new();
    for seed in 11..=13 {
        peers.push(spawn_peer(&bus, seed, 16, &data, false).await);
    }
    // Crash the third peer after round 4.
    peers[2].wait_round(4).await;
    peers[2].stop(&bus);
    peers[0].wait_round(7).await;
    // A new peer joins mid-run: it must load the latest model from a peer and train on.
    let mut joiner = spawn_peer(&bus, 14, 16, &data, false).await;
    let joined = joiner.wait_round(9).await.clone();
    assert!(joined.resyncs >= 1, "the joiner loaded a snapshot");
    for peer in peers.iter_mut().take(2) {
        assert!(peer.wait_round(16).await.finished);
    }
    joiner.wait_round(16).await;
    let a = peers[0].hashes();
    let b = peers[1].hashes();
    let j = joiner.hashes();
    // Around the crash two proposers may close the same round (the first-ranked one is dead
    // and the next two time out close together); the one with the worse rank then loads the
    // better one's snapshot. Every other round, and the end, agree.
    let agreeing = (1..=16).filter(|r| a.get(r) == b.get(r)).count();
    assert!(agreeing >= 14, "survivors agree on {agreeing} of 16 rounds");
    assert_eq!(a.get(&16), b.get(&16), "survivors end on the same model");
    assert_eq!(a.get(&16), j.get(&16), "the joiner ends on the same model");
    let joined_agreeing = j.iter().filter(|(r, h)| a.get(r) == Some(h)).count();
    assert!(
        joined_agreeing + 2 >= j.len(),
        "joiner agrees on {joined_agreeing} of {}",
        j.len()
    );
    // The crashed peer is gone from later rounds, the joiner is in the last ones.
    let last = peers[0].seen.last().unwrap();
    assert_eq!(last.contributors, 3, "two survivors and the joiner");
    // The round chain went on deciding rounds: it needs all three members of a three-member
    // committee, so the rounds whose committee held the crashed peer stay undecided.
    for report in [last, joiner.seen.last().unwrap()] {
        eprintln!(
            "chain: decided {} overruled {} resyncs {}",
            report.chain_decided, report.chain_overruled, report.chain_resyncs
        );
    }
    assert!(last.chain_decided >= 8, "{last:?}");
    for peer in peers.iter().take(2) {
        peer.stop(&bus);
    }
    joiner.stop(&bus);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blobs_are_rejected_and_the_rounds_complete_without_them() {
    if std::env::var("LOOM_TEST_LOG").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("loom_actors=debug")
            .with_writer(std::io::stderr)
            .try_init();
    }
    let bus = Arc::new(Bus::default());
    let data = dataset();
    let mut honest_a = spawn_peer(&bus, 21, 6, &data, false).await;
    let mut honest_b = spawn_peer(&bus, 22, 6, &data, false).await;
    // This peer trains honestly but corrupts every blob it serves.
    let corrupter = spawn_peer(&bus, 23, 6, &data, true).await;
    honest_a.wait_round(6).await;
    honest_b.wait_round(6).await;
    let (a, b) = (honest_a.hashes(), honest_b.hashes());
    // Every round both report has the same model on both (a peer that resynced past a round
    // reports the round it resynced to instead), and both end on the same model.
    for round in 1..=6 {
        if let (Some(x), Some(y)) = (a.get(&round), b.get(&round)) {
            assert_eq!(x, y, "round {round}");
        }
    }
    assert!(
        a.contains_key(&6) && a.get(&6) == b.get(&6),
        "last round: {a:?} {b:?}"
    );
    let rejected =
        honest_a.seen.last().unwrap().rejected_blobs + honest_b.seen.last().unwrap().rejected_blobs;
    assert!(rejected > 0, "corrupted blobs were noticed");
    // Nothing the corrupter served was ever aggregated by the honest peers.
    assert!(
        honest_a.seen.iter().all(|r| r.contributors <= 2),
        "{:?}",
        honest_a
            .seen
            .iter()
            .map(|r| r.contributors)
            .collect::<Vec<_>>()
    );
    for peer in [&honest_a, &honest_b, &corrupter] {
        peer.stop(&bus);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_strategy_exchanges_a_gradient_every_step_and_stays_identical() {
    let bus = Arc::new(Bus::default());
    let data = dataset();
    let strategy = Strategy::Sync(loom_protocols::outer::AdamWConfig {
        lr: 3e-3,
        ..Default::default()
    });
    let mut peers = Vec::new();
    for seed in 31..=33 {
        peers.push(spawn_peer_with(&bus, seed, plan_with(12, strategy), &data, false).await);
    }
    for peer in &mut peers {
        assert!(peer.wait_round(12).await.finished);
    }
    let hashes: Vec<BTreeMap<u64, String>> = peers.iter().map(Peer::hashes).collect();
    for round in 1..=12 {
        assert_eq!(
            hashes[0].get(&round),
            hashes[1].get(&round),
            "round {round}"
        );
        assert_eq!(
            hashes[0].get(&round),
            hashes[2].get(&round),
            "round {round}"
        );
    }
    // One optimizer step per round: 12 steps per peer.
    assert_eq!(peers[0].seen.last().unwrap().steps, 12);
    let first = peers[0].seen.first().and_then(|r| r.val_loss).unwrap();
    let last = peers[0].seen.last().and_then(|r| r.val_loss).unwrap();
    assert!(last < first, "loss {first} -> {last}");
    for peer in &peers {
        peer.stop(&bus);
    }
}
