//! Deterministic chaos simulation of the ledger's consensus: N [`ConsensusEngine`]s on virtual
//! time, driven by one seed.
//!
//! Each peer is a host around an engine with a durable decided chain, its credit state and the
//! engine's write-ahead log of the current height. The network gossips (an honest peer forwards
//! what its engine accepted), delays every message by a random amount (so messages are
//! reordered), loses some, and is split into two groups for a while, more than once. Peers are
//! killed (the coordinator of the moment more often than not) and restarted: a restarted peer
//! keeps its chain and log, loses its engine, replays the log (so it keeps its votes and lock),
//! and catches up by asking a random peer for decided (block, certificate) pairs, which it
//! verifies before applying. Fewer than a third of the committee are byzantine: they propose two
//! different blocks to the two halves of the committee, propose invalid blocks, vote twice, vote
//! for random hashes, forge signatures and certificates, send garbage, spam the next heights, and
//! answer catch-up requests with forged certificates.
//! Blocks carry signed transfers between honest peers, and every replica folds them into a
//! [`CreditState`].
//!
//! A run checks: SAFETY (no two honest replicas ever finalize different blocks at one height,
//! and every decided certificate verifies), LIVENESS (once the chaos ends, every honest peer
//! reaches a target height within a bounded virtual time), CREDITS (conservation holds and honest
//! replicas at equal heights hold identical balances). It also measures, each time the
//! coordinator is killed or cut off, the virtual time until a block proposed by another peer is
//! decided. Everything is a function of the seed: a failure names it and how to replay it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    hash::{Hash, Hasher},
};

use ed25519_dalek::{Signer, SigningKey};
use loom_protocols::{
    PeerKey,
    consensus::{
        Committee, ConsensusAction, ConsensusConfig, ConsensusEngine, ConsensusMessage, TimeoutKey,
        WalEntry, verify_decided,
    },
    contribution::BlobHash,
    credits::CreditState,
    data::SplitMix64,
    ledger::{Block, Entry, QuorumCertificate, SignedEntry, quorum},
    quantile,
};
use serde::Serialize;

/// Credits minted to every peer at genesis.
const GENESIS_CREDITS: u64 = 1_000;
/// Most decided pairs in one catch-up response.
const SYNC_BATCH: usize = 8;
/// Most transfers the simulation puts in one block.
const MAX_TRANSFERS: u64 = 3;

/// How byzantine members behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ByzantineMode {
    /// A random mix of every attack, message by message.
    Mixed,
    /// Always propose two different valid blocks to the two halves, and always vote twice.
    Equivocate,
}

/// The shape of a chaos run (what varies with the seed is drawn inside these bounds).
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Committee size.
    pub peers: usize,
    /// Byzantine members (must be fewer than a third).
    pub byzantine: usize,
    /// What the byzantine members do.
    pub byzantine_mode: ByzantineMode,
    /// Virtual length of the chaos phase (partitions, kills); everything heals at its end.
    pub chaos_ms: u64,
    /// Heights every honest peer must decide after the chaos ends.
    pub extra_heights: u64,
    /// Virtual time allowed for that after the chaos ends.
    pub liveness_bound_ms: u64,
    /// Message loss probability is drawn uniformly from `0..=loss_max` per run.
    pub loss_max: f64,
    /// Smallest one-way delay.
    pub delay_ms_min: u64,
    /// Largest one-way delay (delays are uniform in between, so messages are reordered).
    pub delay_ms_max: u64,
    /// Network partitions (two groups) during the chaos phase.
    pub partitions: usize,
    /// Peer kills (each followed by a restart) during the chaos phase.
    pub kills: usize,
    /// Probability that a kill targets the coordinator of the moment.
    pub kill_coordinator: f64,
    /// Period of each peer's catch-up request.
    pub sync_interval_ms: u64,
    /// Consensus timeouts.
    pub consensus: ConsensusConfig,
    /// Safety valve on simulated events.
    pub max_events: u64,
}

impl ChaosConfig {
    /// `peers` peers of which `byzantine` are byzantine, with partitions, loss, reordering and
    /// kills.
    pub fn new(peers: usize, byzantine: usize) -> Self {
        Self {
            peers,
            byzantine,
            byzantine_mode: ByzantineMode::Mixed,
            chaos_ms: 4_000,
            extra_heights: 3,
            liveness_bound_ms: 30_000,
            loss_max: 0.2,
            delay_ms_min: 2,
            delay_ms_max: 40,
            partitions: 2,
            kills: 2,
            kill_coordinator: 0.6,
            sync_interval_ms: 400,
            consensus: ConsensusConfig::default()
                .with_propose_ms(300)
                .with_prevote_ms(120)
                .with_precommit_ms(120)
                .with_rebroadcast_ms(250)
                .with_round_delta_ms(60)
                .with_max_timeout_ms(2_000),
            max_events: 2_000_000,
        }
    }

    /// The mix the test suite and `loom-sim chaos` use when no size is given: 4 peers with 1
    /// byzantine for two seeds in three, 7 peers with 2 byzantine for the third.
    pub fn mixed(seed: u64) -> Self {
        if seed % 3 == 2 {
            Self::new(7, 2)
        } else {
            Self::new(4, 1)
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// Committee size.
    pub peers: usize,
    /// Byzantine members.
    pub byzantine: usize,
    /// Message loss probability of this run.
    pub loss: f64,
    /// Partitions that happened.
    pub partitions: usize,
    /// Kills that happened.
    pub kills: usize,
    /// Heights decided by every honest peer at the end.
    pub heights_decided: u64,
    /// Highest round in which an honest replica decided a height.
    pub max_decided_round: u32,
    /// Heights decided in a round above 0.
    pub heights_after_round_zero: u64,
    /// Virtual time when the chaos ended.
    pub heal_ms: u64,
    /// Virtual time from the end of the chaos to the liveness target.
    pub liveness_ms: u64,
    /// For each kill or cut-off of the coordinator: virtual ms until a block proposed by
    /// another peer was decided.
    pub coordinator_change_ms: Vec<u64>,
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages lost, cut by a partition, or sent to a dead peer.
    pub messages_dropped: u64,
    /// Proposals a byzantine member equivocated on.
    pub equivocations: u64,
    /// Catch-up pairs refused by verification (forged by byzantine members).
    pub forged_sync_refused: u64,
    /// Decided pairs applied through catch-up.
    pub synced_blocks: u64,
    /// Restarts that replayed a non-empty write-ahead log.
    pub wal_recoveries: u64,
    /// Events simulated.
    pub events: u64,
}

/// Which property a run violated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FailureKind {
    /// Two honest replicas finalized different blocks at one height.
    Safety,
    /// A decided or synced certificate does not verify, or a replica's chain is inconsistent.
    Certificate,
    /// Credits are not conserved, or honest replicas at one height disagree on balances.
    Credits,
    /// The honest peers did not reach the target height in time after the chaos ended.
    Liveness,
    /// The configuration cannot run (too many byzantine members, too few peers).
    Config,
}

/// A violated property, with what it takes to replay it.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error(
    "chaos seed {seed}: {kind:?} violated at {at_ms} ms (virtual): {detail}; \
     replay with: loom-sim chaos --seed {seed} --peers {peers} --byzantine {byzantine}"
)]
pub struct ChaosFailure {
    /// The seed.
    pub seed: u64,
    /// Committee size.
    pub peers: usize,
    /// Byzantine members.
    pub byzantine: usize,
    /// Which property.
    pub kind: FailureKind,
    /// Virtual time of the violation.
    pub at_ms: u64,
    /// What happened.
    pub detail: String,
}

/// Many runs, summarized.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChaosSummary {
    /// Runs.
    pub runs: u64,
    /// Failed runs, with their seeds.
    pub failures: Vec<ChaosFailure>,
    /// Coordinator changes measured.
    pub coordinator_changes: usize,
    /// Median coordinator-change latency, virtual ms.
    pub coordinator_change_ms_p50: Option<u64>,
    /// 99th percentile, virtual ms.
    pub coordinator_change_ms_p99: Option<u64>,
    /// Maximum, virtual ms.
    pub coordinator_change_ms_max: Option<u64>,
    /// Heights decided by all honest peers, summed over the successful runs.
    pub heights_decided: u64,
    /// Highest decision round seen.
    pub max_decided_round: u32,
    /// Median time from the end of the chaos to the liveness target, virtual ms.
    pub liveness_ms_p50: Option<u64>,
    /// Maximum of it, virtual ms.
    pub liveness_ms_max: Option<u64>,
    /// Equivocated proposals, summed.
    pub equivocations: u64,
    /// Forged catch-up pairs refused, summed.
    pub forged_sync_refused: u64,
    /// Messages sent, summed.
    pub messages_sent: u64,
    /// Restarts that replayed a write-ahead log, summed.
    pub wal_recoveries: u64,
}

/// Summarizes the outcomes of many runs.
pub fn summarize(outcomes: &[Result<ChaosReport, ChaosFailure>]) -> ChaosSummary {
    let mut changes = Vec::new();
    let mut liveness = Vec::new();
    let mut summary = ChaosSummary {
        runs: outcomes.len() as u64,
        failures: Vec::new(),
        coordinator_changes: 0,
        coordinator_change_ms_p50: None,
        coordinator_change_ms_p99: None,
        coordinator_change_ms_max: None,
        heights_decided: 0,
        max_decided_round: 0,
        liveness_ms_p50: None,
        liveness_ms_max: None,
        equivocations: 0,
        forged_sync_refused: 0,
        messages_sent: 0,
        wal_recoveries: 0,
    };
    for outcome in outcomes {
        match outcome {
            Ok(report) => {
                changes.extend_from_slice(&report.coordinator_change_ms);
                liveness.push(report.liveness_ms);
                summary.heights_decided += report.heights_decided;
                summary.max_decided_round = summary.max_decided_round.max(report.max_decided_round);
                summary.equivocations += report.equivocations;
                summary.forged_sync_refused += report.forged_sync_refused;
                summary.messages_sent += report.messages_sent;
                summary.wal_recoveries += report.wal_recoveries;
            }
            Err(failure) => summary.failures.push(failure.clone()),
        }
    }
    summary.coordinator_changes = changes.len();
    summary.coordinator_change_ms_p50 = quantile(&mut changes, 0.5);
    summary.coordinator_change_ms_p99 = quantile(&mut changes, 0.99);
    summary.coordinator_change_ms_max = quantile(&mut changes, 1.0);
    summary.liveness_ms_p50 = quantile(&mut liveness, 0.5);
    summary.liveness_ms_max = quantile(&mut liveness, 1.0);
    summary
}

/// Runs one seeded chaos simulation.
pub fn run(seed: u64, config: &ChaosConfig) -> Result<ChaosReport, ChaosFailure> {
    let mut sim = Sim::new(seed, config)?;
    sim.setup()?;
    sim.run()
}

#[derive(Debug, Clone)]
enum Payload {
    Consensus(Vec<u8>),
    Garbage(Vec<u8>),
    SyncRequest { from_height: u64 },
    SyncResponse(Vec<(Block, QuorumCertificate)>),
}

#[derive(Debug, Clone)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        payload: Payload,
    },
    Timer {
        peer: usize,
        incarnation: u64,
        key: TimeoutKey,
    },
    SyncTick {
        peer: usize,
        incarnation: u64,
    },
    Kill {
        coordinator: bool,
        down_ms: u64,
    },
    Restart {
        peer: usize,
    },
    PartitionStart {
        groups: Vec<bool>,
        duration_ms: u64,
    },
    PartitionEnd,
    ChaosEnd,
}

struct Peer {
    key: SigningKey,
    pk: PeerKey,
    byzantine: bool,
    alive: bool,
    incarnation: u64,
    engine: ConsensusEngine,
    /// Durable: survives restarts.
    chain: Vec<(Block, QuorumCertificate)>,
    /// Derived from `chain`.
    credits: CreditState,
    /// Durable: the engine's write-ahead log of height `wal_height`.
    wal: Vec<WalEntry>,
    wal_height: u64,
    /// Digests of the gossip messages accepted recently (gossipsub's seen cache); in memory.
    seen: BTreeSet<u64>,
    seen_order: VecDeque<u64>,
}

/// Gossip messages a peer remembers having handled.
const SEEN_CAPACITY: usize = 8_192;

/// A digest of gossip bytes, for the seen cache.
fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

impl Peer {
    /// Remembers an accepted gossip message (forgetting the oldest past the capacity).
    fn remember(&mut self, digest: u64) {
        if !self.seen.insert(digest) {
            return;
        }
        self.seen_order.push_back(digest);
        if self.seen_order.len() > SEEN_CAPACITY
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
    }
}

struct Decision {
    hash: BlobHash,
    by: usize,
}

struct Sim<'a> {
    seed: u64,
    config: &'a ChaosConfig,
    rng: SplitMix64,
    now_ms: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    processed: u64,
    peers: Vec<Peer>,
    committee: Committee,
    loss: f64,
    partition: Option<Vec<bool>>,
    decisions: BTreeMap<u64, Decision>,
    pending_change: Option<(u64, PeerKey)>,
    target: Option<u64>,
    deadline_ms: u64,
    report: ChaosReport,
}

/// Whether an honest host accepts `block` on top of its state (the engine has already checked
/// the chain link and the entry signatures): genesis only mints, and the credits apply.
fn block_is_valid(block: &Block, credits: &CreditState) -> bool {
    if block.entries.len() > 64 {
        return false;
    }
    if block.height == 0
        && !block
            .entries
            .iter()
            .all(|e| matches!(e.entry, Entry::Mint { amount, .. } if amount <= GENESIS_CREDITS))
    {
        return false;
    }
    credits.clone().apply_block(block).is_ok()
}

impl<'a> Sim<'a> {
    fn new(seed: u64, config: &'a ChaosConfig) -> Result<Self, ChaosFailure> {
        let config_failure = |detail: String| ChaosFailure {
            seed,
            peers: config.peers,
            byzantine: config.byzantine,
            kind: FailureKind::Config,
            at_ms: 0,
            detail,
        };
        if config.peers < 2 || config.peers > 64 {
            return Err(config_failure(format!(
                "{} peers (2 to 64 are simulated)",
                config.peers
            )));
        }
        if config.byzantine * 3 >= config.peers {
            return Err(config_failure(format!(
                "{} byzantine of {}: Tendermint tolerates fewer than a third",
                config.byzantine, config.peers
            )));
        }
        let mut rng = SplitMix64::new(seed ^ 0x6368_616f_735f_7631);
        let keys: Vec<SigningKey> = (0..config.peers)
            .map(|_| {
                let mut bytes = [0u8; 32];
                for chunk in bytes.chunks_mut(8) {
                    chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
                }
                SigningKey::from_bytes(&bytes)
            })
            .collect();
        // The byzantine members: a seeded choice.
        let mut order: Vec<usize> = (0..config.peers).collect();
        for i in (1..order.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let byzantine: Vec<usize> = order.into_iter().take(config.byzantine).collect();
        let committee = Committee::new(keys.iter().map(|k| k.verifying_key().to_bytes()).collect());
        let peers = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| Peer {
                pk: key.verifying_key().to_bytes(),
                engine: ConsensusEngine::new(key.clone(), config.consensus.clone()),
                key,
                byzantine: byzantine.contains(&i),
                alive: true,
                incarnation: 0,
                chain: Vec::new(),
                credits: CreditState::default(),
                wal: Vec::new(),
                wal_height: 0,
                seen: BTreeSet::new(),
                seen_order: VecDeque::new(),
            })
            .collect();
        let loss = config.loss_max * rng.next_f64();
        Ok(Self {
            seed,
            config,
            rng,
            now_ms: 0,
            seq: 0,
            events: BTreeMap::new(),
            processed: 0,
            peers,
            committee,
            loss,
            partition: None,
            decisions: BTreeMap::new(),
            pending_change: None,
            target: None,
            deadline_ms: u64::MAX,
            report: ChaosReport {
                seed,
                peers: config.peers,
                byzantine: config.byzantine,
                loss,
                partitions: 0,
                kills: 0,
                heights_decided: 0,
                max_decided_round: 0,
                heights_after_round_zero: 0,
                heal_ms: 0,
                liveness_ms: 0,
                coordinator_change_ms: Vec::new(),
                messages_sent: 0,
                messages_dropped: 0,
                equivocations: 0,
                forged_sync_refused: 0,
                synced_blocks: 0,
                wal_recoveries: 0,
                events: 0,
            },
        })
    }

    fn failure(&self, kind: FailureKind, detail: String) -> ChaosFailure {
        ChaosFailure {
            seed: self.seed,
            peers: self.config.peers,
            byzantine: self.config.byzantine,
            kind,
            at_ms: self.now_ms,
            detail,
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.next_f64() < p
    }

    fn random_hash(&mut self) -> BlobHash {
        let mut hash = [0u8; 32];
        for chunk in hash.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        hash
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        self.seq += 1;
        self.events.insert((at_ms, self.seq), event);
    }

    fn honest(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.peers.len()).filter(|i| !self.peers[*i].byzantine)
    }

    /// Schedules the chaos: partitions, kills, the end of the chaos; starts every engine.
    fn setup(&mut self) -> Result<(), ChaosFailure> {
        let chaos = self.config.chaos_ms.max(1);
        let n = self.peers.len();
        if self.config.partitions > 0 {
            let slot = chaos / self.config.partitions as u64;
            for k in 0..self.config.partitions as u64 {
                let start = slot * k + self.rng.below(slot / 3 + 1);
                let duration_ms = slot / 4 + self.rng.below(slot / 4 + 1);
                let mut groups: Vec<bool> = (0..n).map(|_| self.rng.next_f64() < 0.5).collect();
                if groups.iter().all(|g| *g) || groups.iter().all(|g| !*g) {
                    let flip = self.rng.below(n as u64) as usize;
                    groups[flip] = !groups[flip];
                }
                self.schedule(
                    start,
                    Event::PartitionStart {
                        groups,
                        duration_ms,
                    },
                );
            }
        }
        for _ in 0..self.config.kills {
            let at = self.rng.below(chaos * 4 / 5 + 1);
            let down_ms = 200 + self.rng.below(1_200);
            let coordinator = self.chance(self.config.kill_coordinator);
            self.schedule(
                at,
                Event::Kill {
                    coordinator,
                    down_ms,
                },
            );
        }
        self.schedule(chaos, Event::ChaosEnd);
        for i in 0..n {
            let phase = self.rng.below(self.config.sync_interval_ms.max(1));
            self.schedule(
                phase,
                Event::SyncTick {
                    peer: i,
                    incarnation: 0,
                },
            );
            let committee = self.committee.clone();
            let actions = self.peers[i].engine.start_height(0, None, committee, 0);
            self.apply_actions(i, actions)?;
        }
        Ok(())
    }

    fn run(mut self) -> Result<ChaosReport, ChaosFailure> {
        while let Some(((at_ms, _), event)) = self.events.pop_first() {
            self.now_ms = at_ms;
            self.processed += 1;
            if self.processed > self.config.max_events {
                return Err(self.failure(
                    FailureKind::Liveness,
                    format!("gave up after {} events", self.processed),
                ));
            }
            if at_ms > self.deadline_ms {
                let heights: Vec<String> = self
                    .honest()
                    .map(|i| {
                        let e = &self.peers[i].engine;
                        let short = |v: Option<(u32, BlobHash)>| {
                            v.map(|(r, h)| format!("{r}:{:02x}{:02x}", h[0], h[1]))
                        };
                        format!(
                            "peer {i}: chain {} height {} round {} locked {:?} valid {:?}",
                            self.peers[i].chain.len(),
                            e.height(),
                            e.round(),
                            short(e.locked()),
                            short(e.valid())
                        )
                    })
                    .collect();
                return Err(self.failure(
                    FailureKind::Liveness,
                    format!(
                        "{heights:?}, target {} not reached within {} ms of the end of the chaos",
                        self.target.unwrap_or(0),
                        self.config.liveness_bound_ms
                    ),
                ));
            }
            self.handle(event)?;
            if let Some(target) = self.target
                && self
                    .honest()
                    .all(|i| self.peers[i].chain.len() as u64 >= target)
            {
                return self.finish();
            }
        }
        Err(self.failure(FailureKind::Liveness, "no event left".into()))
    }

    fn handle(&mut self, event: Event) -> Result<(), ChaosFailure> {
        match event {
            Event::Deliver { from, to, payload } => self.deliver(from, to, payload),
            Event::Timer {
                peer,
                incarnation,
                key,
            } => {
                let p = &mut self.peers[peer];
                if !p.alive || p.incarnation != incarnation {
                    return Ok(());
                }
                let actions = p.engine.on_timeout(key, self.now_ms);
                self.apply_actions(peer, actions)
            }
            Event::SyncTick { peer, incarnation } => {
                let p = &self.peers[peer];
                if !p.alive || p.incarnation != incarnation {
                    return Ok(());
                }
                self.request_sync(peer);
                let next = self.now_ms + self.config.sync_interval_ms.max(1);
                self.schedule(next, Event::SyncTick { peer, incarnation });
                Ok(())
            }
            Event::Kill {
                coordinator,
                down_ms,
            } => {
                let current = self.current_coordinator();
                let victim = match current {
                    Some(c) if coordinator => c,
                    _ => self.rng.below(self.peers.len() as u64) as usize,
                };
                if !self.peers[victim].alive {
                    return Ok(());
                }
                self.report.kills += 1;
                let p = &mut self.peers[victim];
                p.alive = false;
                p.incarnation += 1;
                if current == Some(victim) && self.pending_change.is_none() {
                    self.pending_change = Some((self.now_ms, self.peers[victim].pk));
                }
                let restart = (self.now_ms + down_ms).min(self.config.chaos_ms);
                self.schedule(restart, Event::Restart { peer: victim });
                Ok(())
            }
            Event::Restart { peer } => self.restart(peer),
            Event::PartitionStart {
                groups,
                duration_ms,
            } => {
                if self.partition.is_some() {
                    return Ok(());
                }
                self.report.partitions += 1;
                if let Some(c) = self.current_coordinator() {
                    let side = groups[c];
                    let size = groups.iter().filter(|g| **g == side).count();
                    if size < quorum(self.peers.len()) && self.pending_change.is_none() {
                        self.pending_change = Some((self.now_ms, self.peers[c].pk));
                    }
                }
                self.partition = Some(groups);
                let end = (self.now_ms + duration_ms).min(self.config.chaos_ms);
                self.schedule(end, Event::PartitionEnd);
                Ok(())
            }
            Event::PartitionEnd => {
                self.partition = None;
                Ok(())
            }
            Event::ChaosEnd => {
                self.partition = None;
                for peer in 0..self.peers.len() {
                    if !self.peers[peer].alive {
                        self.restart(peer)?;
                    }
                }
                let tip = self
                    .honest()
                    .map(|i| self.peers[i].chain.len() as u64)
                    .max()
                    .unwrap_or(0);
                self.target = Some(tip + self.config.extra_heights);
                self.report.heal_ms = self.now_ms;
                self.deadline_ms = self.now_ms + self.config.liveness_bound_ms;
                Ok(())
            }
        }
    }

    /// The proposer of the most advanced live honest engine's (height, round).
    fn current_coordinator(&self) -> Option<usize> {
        let (_, _, proposer) = self
            .honest()
            .filter(|i| self.peers[*i].alive)
            .map(|i| {
                let e = &self.peers[i].engine;
                (e.height(), e.round(), e.proposer(e.height(), e.round()))
            })
            .max()?;
        self.peers.iter().position(|p| p.pk == proposer)
    }

    fn restart(&mut self, peer: usize) -> Result<(), ChaosFailure> {
        let committee = self.committee.clone();
        let now = self.now_ms;
        let consensus = self.config.consensus.clone();
        let p = &mut self.peers[peer];
        if p.alive {
            return Ok(());
        }
        p.alive = true;
        p.incarnation += 1;
        // The engine's memory is gone; the chain and the log were on disk.
        p.engine = ConsensusEngine::new(p.key.clone(), consensus);
        p.seen.clear();
        p.seen_order.clear();
        let height = p.chain.len() as u64;
        let previous = p.chain.last().map(|(b, _)| b.clone());
        let actions = if p.wal_height == height {
            let wal = std::mem::take(&mut p.wal);
            if !wal.is_empty() {
                self.report.wal_recoveries += 1;
            }
            p.engine
                .recover(height, previous.as_ref(), committee, &wal, now)
        } else {
            p.engine
                .start_height(height, previous.as_ref(), committee, now)
        };
        let incarnation = p.incarnation;
        self.apply_actions(peer, actions)?;
        // Catch up at once, then periodically.
        self.request_sync(peer);
        let next = now + self.config.sync_interval_ms.max(1);
        self.schedule(next, Event::SyncTick { peer, incarnation });
        Ok(())
    }

    fn request_sync(&mut self, peer: usize) {
        let live: Vec<usize> = (0..self.peers.len())
            .filter(|j| *j != peer && self.peers[*j].alive)
            .collect();
        if live.is_empty() {
            return;
        }
        let to = live[self.rng.below(live.len() as u64) as usize];
        let from_height = self.peers[peer].chain.len() as u64;
        self.send(peer, to, Payload::SyncRequest { from_height });
    }

    fn send(&mut self, from: usize, to: usize, payload: Payload) {
        self.report.messages_sent += 1;
        if self.chance(self.loss) {
            self.report.messages_dropped += 1;
            return;
        }
        let spread = self
            .config
            .delay_ms_max
            .saturating_sub(self.config.delay_ms_min);
        let delay = self.config.delay_ms_min + self.rng.below(spread + 1);
        self.schedule(self.now_ms + delay, Event::Deliver { from, to, payload });
    }

    fn send_to_all(&mut self, from: usize, message: &ConsensusMessage) {
        let bytes = message.to_bytes();
        for to in 0..self.peers.len() {
            if to != from {
                self.send(from, to, Payload::Consensus(bytes.clone()));
            }
        }
    }

    /// Sends `a` to a random half of the others and `b` to the rest.
    fn send_split(&mut self, from: usize, a: &ConsensusMessage, b: &ConsensusMessage) {
        let (a, b) = (a.to_bytes(), b.to_bytes());
        for to in 0..self.peers.len() {
            if to != from {
                let bytes = if self.chance(0.5) {
                    a.clone()
                } else {
                    b.clone()
                };
                self.send(from, to, Payload::Consensus(bytes));
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, payload: Payload) -> Result<(), ChaosFailure> {
        let cut = self
            .partition
            .as_ref()
            .is_some_and(|groups| groups[from] != groups[to]);
        if !self.peers[to].alive || cut {
            self.report.messages_dropped += 1;
            return Ok(());
        }
        match payload {
            Payload::Consensus(bytes) => {
                // Gossip: an honest peer forwards, once, each message its engine accepted to
                // everyone else (gossipsub's validated forwarding), and skips copies of what it
                // already accepted. Tendermint's liveness rests on this: what one correct peer
                // received, the other correct peers receive too.
                let digest = digest(&bytes);
                if self.peers[to].seen.contains(&digest) {
                    return Ok(());
                }
                let Ok(message) = ConsensusMessage::from_bytes(&bytes) else {
                    return Ok(());
                };
                let now = self.now_ms;
                let Peer {
                    engine, credits, ..
                } = &mut self.peers[to];
                let mut validate = |block: &Block| block_is_valid(block, credits);
                let Ok(actions) = engine.handle_message(message, now, &mut validate) else {
                    return Ok(());
                };
                self.peers[to].remember(digest);
                if !self.peers[to].byzantine {
                    for next in 0..self.peers.len() {
                        if next != to && next != from {
                            self.send(to, next, Payload::Consensus(bytes.clone()));
                        }
                    }
                }
                self.apply_actions(to, actions)
            }
            Payload::Garbage(bytes) => {
                // Whatever it is, it must not decode into something that harms; feed it if it
                // decodes.
                if let Ok(message) = ConsensusMessage::from_bytes(&bytes) {
                    let now = self.now_ms;
                    let Peer {
                        engine, credits, ..
                    } = &mut self.peers[to];
                    let mut validate = |block: &Block| block_is_valid(block, credits);
                    let actions = engine.on_message(message, now, &mut validate);
                    self.apply_actions(to, actions)?;
                }
                Ok(())
            }
            Payload::SyncRequest { from_height } => {
                if self.peers[to].byzantine && self.chance(0.5) {
                    let forged = self.forged_pair(to, from_height);
                    self.send(to, from, Payload::SyncResponse(vec![forged]));
                    return Ok(());
                }
                let chain = &self.peers[to].chain;
                let start = usize::try_from(from_height).unwrap_or(usize::MAX);
                if start < chain.len() {
                    let blocks = chain[start..]
                        .iter()
                        .take(SYNC_BATCH)
                        .cloned()
                        .collect::<Vec<_>>();
                    self.send(to, from, Payload::SyncResponse(blocks));
                }
                Ok(())
            }
            Payload::SyncResponse(blocks) => self.on_synced(to, blocks),
        }
    }

    /// A byzantine member's answer to a catch-up request: a plausible next block whose
    /// certificate is signed by the byzantine members only, or claims honest members' votes
    /// with made-up signatures.
    fn forged_pair(&mut self, byzantine: usize, height: u64) -> (Block, QuorumCertificate) {
        let previous = self.peers[byzantine]
            .chain
            .get(height.saturating_sub(1) as usize)
            .map(|(b, _)| b.hash())
            .unwrap_or([0; 32]);
        let block = Block {
            height,
            prev_hash: if height == 0 { [0; 32] } else { previous },
            proposer: self.peers[byzantine].pk,
            timestamp_unix_ms: self.now_ms,
            entries: Vec::new(),
        };
        let hash = block.hash();
        let round = self.rng.below(3) as u32;
        let message = loom_protocols::ledger::precommit_bytes(height, round, &hash);
        let mut votes = Vec::new();
        for i in 0..self.peers.len() {
            let signature = if self.peers[i].byzantine {
                self.peers[i].key.sign(&message).to_bytes().to_vec()
            } else {
                let mut forged = self.random_hash().to_vec();
                forged.extend_from_slice(&self.random_hash());
                forged
            };
            votes.push((self.peers[i].pk, signature));
        }
        (
            block,
            QuorumCertificate {
                height,
                round,
                block_hash: hash,
                votes,
            },
        )
    }

    /// The engine's log reaches the disk (before anything the call produced is sent).
    fn persist_wal(&mut self, peer: usize) {
        let p = &mut self.peers[peer];
        let wal = p.engine.wal();
        if p.wal_height != p.engine.height() || wal.len() < p.wal.len() {
            p.wal.clear();
            p.wal_height = p.engine.height();
        }
        let stored = p.wal.len();
        p.wal.extend_from_slice(&wal[stored..]);
    }

    fn apply_actions(
        &mut self,
        peer: usize,
        actions: Vec<ConsensusAction>,
    ) -> Result<(), ChaosFailure> {
        self.persist_wal(peer);
        let mut work = VecDeque::from(actions);
        while let Some(action) = work.pop_front() {
            match action {
                ConsensusAction::Broadcast(message) => self.broadcast(peer, message),
                ConsensusAction::ScheduleTimeout { key, after_ms } => {
                    let incarnation = self.peers[peer].incarnation;
                    self.schedule(
                        self.now_ms + after_ms,
                        Event::Timer {
                            peer,
                            incarnation,
                            key,
                        },
                    );
                }
                ConsensusAction::RequestValue { height, round } => {
                    let block = self.build_block(peer, height);
                    let now = self.now_ms;
                    let more = self.peers[peer].engine.propose(height, round, block, now);
                    self.persist_wal(peer);
                    work.extend(more);
                }
                ConsensusAction::Decided { block, certificate } => {
                    let more = self.on_decided(peer, block, certificate)?;
                    work.extend(more);
                }
                ConsensusAction::NewRound { .. } => {}
            }
        }
        Ok(())
    }

    /// A block for `height` on top of `peer`'s chain: the genesis mints, later blocks carry
    /// transfers signed by random honest peers with amounts their balances cover.
    fn build_block(&mut self, peer: usize, height: u64) -> Block {
        let prev_hash = self.peers[peer]
            .chain
            .last()
            .map(|(b, _)| b.hash())
            .unwrap_or([0; 32]);
        let proposer = self.peers[peer].pk;
        let mut entries = Vec::new();
        if height == 0 {
            let key = self.peers[peer].key.clone();
            for p in &self.peers {
                let entry = Entry::Mint {
                    to: p.pk,
                    amount: GENESIS_CREDITS,
                };
                entries.push(SignedEntry::sign(entry, proposer, |m| {
                    key.sign(m).to_bytes().to_vec()
                }));
            }
        } else {
            let mut scratch = self.peers[peer].credits.clone();
            let honest: Vec<usize> = self.honest().collect();
            for _ in 0..self.rng.below(MAX_TRANSFERS + 1) {
                let author = honest[self.rng.below(honest.len() as u64) as usize];
                let to = self.rng.below(self.peers.len() as u64) as usize;
                let author_pk = self.peers[author].pk;
                let balance = scratch.balance(&author_pk);
                if balance < 4 {
                    continue;
                }
                let amount = 1 + self.rng.below(balance / 4);
                let key = &self.peers[author].key;
                let entry = SignedEntry::sign(
                    Entry::Transfer {
                        to: self.peers[to].pk,
                        amount,
                    },
                    author_pk,
                    |m| key.sign(m).to_bytes().to_vec(),
                );
                let single = Block {
                    height,
                    prev_hash,
                    proposer,
                    timestamp_unix_ms: self.now_ms,
                    entries: vec![entry.clone()],
                };
                if scratch.apply_block(&single).is_ok() {
                    entries.push(entry);
                }
            }
        }
        Block {
            height,
            prev_hash,
            proposer,
            timestamp_unix_ms: self.now_ms,
            entries,
        }
    }

    /// A block honest peers must refuse: an overspend, or a mint after genesis.
    fn invalid_block(&mut self, byzantine: usize, base: &Block) -> Block {
        let mut bad = base.clone();
        let key = self.peers[byzantine].key.clone();
        let pk = self.peers[byzantine].pk;
        let entry = if bad.height > 0 && self.chance(0.5) {
            Entry::Mint {
                to: pk,
                amount: 1_000_000,
            }
        } else {
            Entry::Transfer {
                to: pk,
                amount: u64::MAX / 2,
            }
        };
        bad.entries.push(SignedEntry::sign(entry, pk, |m| {
            key.sign(m).to_bytes().to_vec()
        }));
        bad
    }

    fn broadcast(&mut self, from: usize, message: ConsensusMessage) {
        if !self.peers[from].byzantine {
            self.send_to_all(from, &message);
            return;
        }
        let key = self.peers[from].key.clone();
        let equivocate = self.config.byzantine_mode == ByzantineMode::Equivocate;
        match &message {
            ConsensusMessage::Proposal {
                height,
                round,
                pol_round,
                block,
                ..
            } => {
                let roll = self.rng.next_f64();
                if equivocate || roll < 0.45 {
                    // Two valid blocks, one per half of the committee.
                    let mut twin = block.clone();
                    twin.timestamp_unix_ms += 1 + self.rng.below(1_000);
                    let twin =
                        ConsensusMessage::signed_proposal(&key, *height, *round, *pol_round, twin);
                    self.report.equivocations += 1;
                    self.send_split(from, &message, &twin);
                } else if roll < 0.65 {
                    let bad = self.invalid_block(from, block);
                    let bad =
                        ConsensusMessage::signed_proposal(&key, *height, *round, *pol_round, bad);
                    self.send_to_all(from, &bad);
                } else if roll < 0.75 {
                    // Silence.
                } else {
                    self.send_to_all(from, &message);
                }
            }
            ConsensusMessage::Vote {
                kind,
                height,
                round,
                value,
                ..
            } => {
                let roll = self.rng.next_f64();
                if equivocate || roll < 0.4 {
                    let other = match value {
                        Some(_) if self.chance(0.5) => None,
                        _ => Some(self.random_hash()),
                    };
                    let twin = ConsensusMessage::signed_vote(&key, *kind, *height, *round, other);
                    self.send_split(from, &message, &twin);
                } else if roll < 0.55 {
                    let random = Some(self.random_hash());
                    let vote = ConsensusMessage::signed_vote(&key, *kind, *height, *round, random);
                    self.send_to_all(from, &vote);
                } else if roll < 0.65 {
                    // Silence.
                } else {
                    self.send_to_all(from, &message);
                }
            }
            ConsensusMessage::PolkaCertificate {
                height,
                round,
                block_hash,
                votes,
                sender,
            } => {
                if self.chance(0.5) {
                    // Short of a quorum, or for another block: it must be refused.
                    let mut forged = votes.clone();
                    forged.truncate(forged.len().saturating_sub(1));
                    let block_hash = if self.chance(0.5) {
                        self.random_hash()
                    } else {
                        *block_hash
                    };
                    let forged = ConsensusMessage::PolkaCertificate {
                        height: *height,
                        round: *round,
                        block_hash,
                        votes: forged,
                        sender: *sender,
                    };
                    self.send_to_all(from, &forged);
                } else {
                    self.send_to_all(from, &message);
                }
            }
        }
        if self.chance(0.25) {
            self.noise(from, message.height(), message.round());
        }
    }

    /// Byzantine noise: forged signatures, spam for the next heights, far rounds, garbage.
    fn noise(&mut self, from: usize, height: u64, round: u32) {
        let key = self.peers[from].key.clone();
        let honest: Vec<usize> = self.honest().collect();
        let victim = honest[self.rng.below(honest.len() as u64) as usize];
        let victim_pk = self.peers[victim].pk;
        let kind = if self.chance(0.5) {
            loom_protocols::consensus::VoteKind::Prevote
        } else {
            loom_protocols::consensus::VoteKind::Precommit
        };
        match self.rng.below(5) {
            0 => {
                // A vote in an honest member's name with a made-up signature.
                let mut signature = self.random_hash().to_vec();
                signature.extend_from_slice(&self.random_hash());
                let forged = ConsensusMessage::Vote {
                    kind,
                    height,
                    round,
                    value: Some(self.random_hash()),
                    voter: victim_pk,
                    signature,
                };
                self.send_to_all(from, &forged);
            }
            1 => {
                // Spam for the next heights, in many rounds.
                for r in 0..4 {
                    let ahead = height + 1 + self.rng.below(2);
                    let value = Some(self.random_hash());
                    let vote = ConsensusMessage::signed_vote(&key, kind, ahead, round + r, value);
                    self.send_to_all(from, &vote);
                }
            }
            2 => {
                // A vote for a round far ahead.
                let value = Some(self.random_hash());
                let far = round.saturating_add(50 + self.rng.below(1_000) as u32);
                let vote = ConsensusMessage::signed_vote(&key, kind, height, far, value);
                self.send_to_all(from, &vote);
            }
            3 => {
                // A proposal in the name of the round's proposer, with a made-up signature.
                let proposer = self.peers[from].engine.proposer(height, round);
                let mut signature = self.random_hash().to_vec();
                signature.extend_from_slice(&self.random_hash());
                let forged = ConsensusMessage::Proposal {
                    height,
                    round,
                    pol_round: None,
                    block: Block {
                        height,
                        prev_hash: self.random_hash(),
                        proposer,
                        timestamp_unix_ms: self.now_ms,
                        entries: Vec::new(),
                    },
                    proposer,
                    signature,
                };
                self.send_to_all(from, &forged);
            }
            _ => {
                let length = 1 + self.rng.below(200) as usize;
                let bytes: Vec<u8> = (0..length).map(|_| self.rng.next_u64() as u8).collect();
                for to in 0..self.peers.len() {
                    if to != from {
                        self.send(from, to, Payload::Garbage(bytes.clone()));
                    }
                }
            }
        }
    }

    /// An honest decision: check it, record it globally, apply it, start the next height.
    fn on_decided(
        &mut self,
        peer: usize,
        block: Block,
        certificate: QuorumCertificate,
    ) -> Result<Vec<ConsensusAction>, ChaosFailure> {
        let honest = !self.peers[peer].byzantine;
        let height = block.height;
        let len = self.peers[peer].chain.len() as u64;
        if height != len {
            if honest {
                return Err(self.failure(
                    FailureKind::Certificate,
                    format!("peer {peer} decided height {height} with a chain of {len} blocks"),
                ));
            }
            return Ok(Vec::new());
        }
        let previous = self.peers[peer].chain.last().map(|(b, _)| b.clone());
        if let Err(error) = verify_decided(&block, &certificate, previous.as_ref(), &self.committee)
        {
            if honest {
                return Err(self.failure(
                    FailureKind::Certificate,
                    format!(
                        "peer {peer} decided height {height} with a certificate that does not \
                         verify: {error}"
                    ),
                ));
            }
            return Ok(Vec::new());
        }
        if honest {
            self.record_decision(peer, &block)?;
            self.report.max_decided_round = self.report.max_decided_round.max(certificate.round);
        }
        self.append(peer, block.clone(), certificate)?;
        let committee = self.committee.clone();
        let now = self.now_ms;
        let actions =
            self.peers[peer]
                .engine
                .start_height(height + 1, Some(&block), committee, now);
        self.persist_wal(peer);
        Ok(actions)
    }

    /// Adds a verified decided pair to `peer`'s chain and credits.
    fn append(
        &mut self,
        peer: usize,
        block: Block,
        certificate: QuorumCertificate,
    ) -> Result<(), ChaosFailure> {
        let honest = !self.peers[peer].byzantine;
        let applied = self.peers[peer].credits.apply_block(&block);
        if honest {
            if let Err(error) = applied {
                return Err(self.failure(
                    FailureKind::Credits,
                    format!(
                        "peer {peer} cannot apply decided block {}: {error}",
                        block.height
                    ),
                ));
            }
            if !self.peers[peer].credits.check_conservation() {
                return Err(self.failure(
                    FailureKind::Credits,
                    format!(
                        "peer {peer}: credits not conserved at height {}",
                        block.height
                    ),
                ));
            }
        }
        let p = &mut self.peers[peer];
        p.chain.push((block, certificate));
        Ok(())
    }

    fn record_decision(&mut self, peer: usize, block: &Block) -> Result<(), ChaosFailure> {
        let hash = block.hash();
        match self.decisions.get(&block.height) {
            Some(decision) if decision.hash != hash => Err(self.failure(
                FailureKind::Safety,
                format!(
                    "height {}: peer {} finalized {:02x?}, peer {peer} finalized {:02x?}",
                    block.height,
                    decision.by,
                    &decision.hash[..4],
                    &hash[..4]
                ),
            )),
            Some(_) => Ok(()),
            None => {
                self.decisions
                    .insert(block.height, Decision { hash, by: peer });
                if let Some((since, old)) = self.pending_change
                    && block.proposer != old
                {
                    self.report.coordinator_change_ms.push(self.now_ms - since);
                    self.pending_change = None;
                }
                Ok(())
            }
        }
    }

    /// Catch-up: verify each pair against the chain before applying it.
    fn on_synced(
        &mut self,
        peer: usize,
        pairs: Vec<(Block, QuorumCertificate)>,
    ) -> Result<(), ChaosFailure> {
        let honest = !self.peers[peer].byzantine;
        let mut applied = false;
        for (block, certificate) in pairs {
            let len = self.peers[peer].chain.len() as u64;
            if block.height < len {
                continue;
            }
            if block.height > len {
                break;
            }
            let previous = self.peers[peer].chain.last().map(|(b, _)| b.clone());
            if verify_decided(&block, &certificate, previous.as_ref(), &self.committee).is_err() {
                self.report.forged_sync_refused += 1;
                break;
            }
            if honest {
                self.record_decision(peer, &block)?;
                self.report.max_decided_round =
                    self.report.max_decided_round.max(certificate.round);
            }
            self.append(peer, block, certificate)?;
            self.report.synced_blocks += 1;
            applied = true;
        }
        let p = &self.peers[peer];
        let len = p.chain.len() as u64;
        if applied && p.engine.height() < len {
            let committee = self.committee.clone();
            let now = self.now_ms;
            let previous = p.chain.last().map(|(b, _)| b.clone());
            let actions =
                self.peers[peer]
                    .engine
                    .start_height(len, previous.as_ref(), committee, now);
            self.apply_actions(peer, actions)?;
        }
        Ok(())
    }

    /// Final checks once every honest peer reached the target.
    fn finish(mut self) -> Result<ChaosReport, ChaosFailure> {
        let honest: Vec<usize> = self.honest().collect();
        for &i in &honest {
            if !self.peers[i].credits.check_conservation() {
                return Err(self.failure(
                    FailureKind::Credits,
                    format!("peer {i}: credits not conserved"),
                ));
            }
        }
        for (a, &i) in honest.iter().enumerate() {
            for &j in &honest[a + 1..] {
                let (ci, cj) = (&self.peers[i].chain, &self.peers[j].chain);
                for ((bi, _), (bj, _)) in ci.iter().zip(cj.iter()) {
                    if bi.hash() != bj.hash() {
                        return Err(self.failure(
                            FailureKind::Safety,
                            format!("peers {i} and {j} differ at height {}", bi.height),
                        ));
                    }
                }
                if ci.len() == cj.len() && self.peers[i].credits != self.peers[j].credits {
                    return Err(self.failure(
                        FailureKind::Credits,
                        format!(
                            "peers {i} and {j} at height {} hold different balances",
                            ci.len()
                        ),
                    ));
                }
            }
        }
        let mut report = self.report.clone();
        report.heights_decided = honest
            .iter()
            .map(|i| self.peers[*i].chain.len() as u64)
            .min()
            .unwrap_or(0);
        report.heights_after_round_zero = self.peers[honest[0]]
            .chain
            .iter()
            .filter(|(_, c)| c.round > 0)
            .count() as u64;
        report.liveness_ms = self.now_ms.saturating_sub(report.heal_ms);
        report.events = self.processed;
        self.report = report.clone();
        Ok(report)
    }
}
