//! The LedgerReplica actor: this peer's replica of the ledger, and its voice in the consensus
//! that extends it.
//!
//! A thin shell around three pure parts: the Tendermint engine
//! ([`loom_protocols::consensus::ConsensusEngine`]) that agrees on each height's block and elects
//! its proposer, the [`LedgerState`] fold that checks every block and derives the committee and
//! balances, and the durable [`LedgerStore`]. It carries out the engine's actions: broadcasts go
//! to the `loom/ledger/1` gossip topic, timeouts become timers, a request for a value is answered
//! with a block built from the pending entries, and a decision is appended to the store (fsynced)
//! before anything else sees it. Replicas that fall behind (a restart, a partition, a new peer)
//! learn of it from tip announcements and consensus messages of later heights, and catch up by
//! fetching finalized blocks from a peer, which they verify before storing.
//!
//! Everything a remote peer can grow is bounded: pending entries ([`LedgerConfig::mempool_max`]),
//! the engine's buffer of future messages, catch-up batches.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use ed25519_dalek::SigningKey;
use loom_protocols::{
    PeerKey,
    consensus::{Committee, ConsensusAction, ConsensusConfig, ConsensusEngine},
    contribution::BlobHash,
    credits::CreditState,
    ledger::{Block, Credits, Entry, QuorumCertificate, SignedEntry},
    ledger_state::{LedgerState, make_genesis},
    ledger_sync::{LedgerGossip, MAX_PROPOSED_BLOCK_BYTES, MAX_SYNC_BLOCKS},
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::{
    NetworkPort, Topic,
    ledger_store::{Finalized, LedgerStore, LedgerStoreError},
    unix_ms,
};

/// The store, shared with the network task that serves catch-up requests from it.
pub type SharedLedgerStore = Arc<Mutex<LedgerStore>>;
/// Peers banned or revoked on the ledger, kept current by the replica for the network.
pub type SharedBans = Arc<std::sync::RwLock<std::collections::BTreeSet<PeerKey>>>;

/// Room left in a proposal for a block's own fields besides its entries, in bytes.
const MAX_BLOCK_HEADER_BYTES: usize = 256;
/// How often the replica announces its tip and checks whether it lags.
const TICK: Duration = Duration::from_millis(1_000);
/// A catch-up request unanswered for this long is given up.
const SYNC_TIMEOUT_MS: u64 = 5_000;

/// Where the replica's genesis comes from when its store is empty.
#[derive(Debug, Clone)]
pub enum GenesisPlan {
    /// Make a new ledger with this peer as its authority and first member.
    Create {
        /// The network's name.
        network: String,
        /// Whether peers enroll themselves.
        open_enrollment: bool,
        /// Credits minted at genesis.
        mint: Vec<(PeerKey, Credits)>,
        /// Further members enrolled at genesis.
        members: Vec<PeerKey>,
        /// The private fleet's key, when the ledger belongs to one.
        fleet: Option<PeerKey>,
    },
    /// Fetch the genesis from peers; when `authority` is given, only a genesis authored by that
    /// key is accepted (a private fleet's key).
    Join {
        /// The expected genesis author.
        authority: Option<PeerKey>,
        /// The private fleet the genesis must name.
        fleet: Option<PeerKey>,
    },
}

/// Replica settings.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// Consensus timeouts.
    pub consensus: ConsensusConfig,
    /// Pause between a decision and the start of the next height.
    pub block_interval: Duration,
    /// Most pending entries held.
    pub mempool_max: usize,
    /// Most entries put in one block.
    pub block_entries_max: usize,
    /// Enroll this peer (open ledgers) when it is not a member yet.
    pub self_enroll: bool,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            consensus: ConsensusConfig::default(),
            block_interval: Duration::from_millis(500),
            mempool_max: 10_000,
            block_entries_max: 1_000,
            self_enroll: true,
        }
    }
}

/// Everything the replica starts from.
#[derive(Clone)]
pub struct LedgerArgs {
    /// The durable store.
    pub store: SharedLedgerStore,
    /// This peer's identity key (signs votes, proposals and its own entries).
    pub signing_key: SigningKey,
    /// The network.
    pub network: Arc<dyn NetworkPort>,
    /// Genesis when the store is empty.
    pub genesis: GenesisPlan,
    /// Settings.
    pub config: LedgerConfig,
    /// Registry name of the credit accounting actor, which receives every finalized block.
    pub credits: Option<&'static str>,
    /// Updated with the ledger's bans after every block.
    pub bans: SharedBans,
}

impl std::fmt::Debug for LedgerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerArgs")
            .field("genesis", &self.genesis)
            .field("config", &self.config)
            .finish()
    }
}

/// What the replica reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerStatus {
    /// The network's name (empty before genesis).
    pub network: String,
    /// Hash of the genesis block.
    pub genesis: Option<BlobHash>,
    /// The next height to decide (number of finalized blocks).
    pub next_height: u64,
    /// Hash of the last finalized block.
    pub tip_hash: Option<BlobHash>,
    /// The consensus round at the current height.
    pub round: u32,
    /// The proposer (coordinator) of the current height and round.
    pub proposer: Option<PeerKey>,
    /// Committee size.
    pub committee: usize,
    /// Whether this peer is in the committee.
    pub member: bool,
    /// Pending entries.
    pub mempool: usize,
    /// Blocks fetched from peers.
    pub synced_blocks: u64,
    /// Coordinator changes (a height decided by another proposer than the previous one's
    /// first-round proposer because that one failed).
    pub coordinator_changes: u64,
}

/// Messages of the LedgerReplica actor.
#[derive(Debug)]
pub enum LedgerMsg {
    /// A message from the ledger gossip topic (already checked against its gossip author).
    Gossip(Vec<u8>),
    /// A consensus timeout fired.
    Timeout(loom_protocols::consensus::TimeoutKey),
    /// Start deciding the next height.
    StartHeight(u64),
    /// Periodic: announce the tip, retry or give up catch-up.
    Tick,
    /// Blocks fetched from `from` for catch-up.
    Synced {
        /// The serving peer.
        from: PeerKey,
        /// The blocks, or why the fetch failed.
        result: Result<Vec<Finalized>, String>,
    },
    /// Submit an entry signed by this peer.
    SubmitOwn(Entry, RpcReplyPort<Result<(), String>>),
    /// Submit an entry signed elsewhere.
    Submit(SignedEntry, RpcReplyPort<Result<(), String>>),
    /// Report the status.
    Status(RpcReplyPort<LedgerStatus>),
    /// The folded credit state at the tip.
    Credits(RpcReplyPort<Option<CreditState>>),
}

/// The actor.
#[derive(Debug, Default, Clone, Copy)]
pub struct LedgerReplica;

/// Its state.
pub struct LedgerReplicaState {
    args: LedgerArgs,
    me: PeerKey,
    state: Option<LedgerState>,
    genesis_hash: Option<BlobHash>,
    engine: ConsensusEngine,
    engine_height: Option<u64>,
    mempool: BTreeMap<BlobHash, SignedEntry>,
    /// Announced next heights of peers (bounded by the committee and recent announcers).
    peer_tips: HashMap<PeerKey, u64>,
    sync_in_flight: Option<(PeerKey, u64)>,
    synced_blocks: u64,
    coordinator_changes: u64,
    last_round_zero_proposer: Option<PeerKey>,
    saved_watermark: Option<loom_protocols::consensus::SigningWatermark>,
    /// Write-ahead entries of the current height already on disk.
    wal_saved: usize,
    /// The write-ahead log read back at start-up, for the height it belongs to.
    recovered_wal: Option<(u64, Vec<loom_protocols::consensus::WalEntry>)>,
    rng_state: u64,
}

/// Most peers whose tip announcements are remembered.
const PEER_TIPS_MAX: usize = 4_096;

fn entry_hash(entry: &SignedEntry) -> BlobHash {
    *blake3::hash(&loom_protocols::encode(entry)).as_bytes()
}

impl LedgerReplicaState {
    fn now_ms(&self) -> u64 {
        unix_ms()
    }

    fn publish(&self, gossip: &LedgerGossip) {
        if let Err(error) = self.args.network.publish(Topic::Ledger, gossip.to_bytes()) {
            tracing::debug!(%error, "ledger gossip not published");
        }
    }

    fn status(&self) -> LedgerStatus {
        let Some(state) = &self.state else {
            return LedgerStatus {
                mempool: self.mempool.len(),
                ..LedgerStatus::default()
            };
        };
        let height = state.next_height();
        let round = self.engine.round();
        LedgerStatus {
            network: state.network().to_string(),
            genesis: self.genesis_hash,
            next_height: height,
            tip_hash: Some(state.tip_hash()),
            round,
            proposer: (!state.committee().is_empty()).then(|| self.engine.proposer(height, round)),
            committee: state.committee().len(),
            member: state.is_member(&self.me),
            mempool: self.mempool.len(),
            synced_blocks: self.synced_blocks,
            coordinator_changes: self.coordinator_changes,
        }
    }

    /// Folds and stores a finalized block; the caller has it from consensus or catch-up.
    fn commit(&mut self, block: &Block, certificate: &QuorumCertificate) -> Result<(), String> {
        match self.state.as_mut() {
            None => {
                let state =
                    LedgerState::from_genesis(block, certificate).map_err(|e| e.to_string())?;
                if let GenesisPlan::Join { authority, fleet } = &self.args.genesis {
                    if authority.is_some_and(|a| &a != state.authority()) {
                        return Err("genesis is not authored by the expected authority".into());
                    }
                    if fleet.is_some() && fleet.as_ref() != state.fleet() {
                        return Err("genesis does not belong to this fleet".into());
                    }
                }
                self.store_append(block, certificate)?;
                self.genesis_hash = Some(block.hash());
                self.state = Some(state);
            }
            Some(state) => {
                let mut next = state.clone();
                next.apply(block, certificate).map_err(|e| e.to_string())?;
                self.store_append(block, certificate)?;
                self.state = Some(next);
            }
        }
        for entry in &block.entries {
            self.mempool.remove(&entry_hash(entry));
        }
        metrics::gauge!("loom_ledger_height").set(block.height as f64);
        self.refresh_bans();
        if let Some(name) = self.args.credits
            && let Some(credits) = ractor::registry::where_is(name)
        {
            let credits: ActorRef<crate::credits::CreditsMsg> = credits.into();
            let _ = credits.cast(crate::credits::CreditsMsg::Finalized(Box::new(
                block.clone(),
            )));
        }
        Ok(())
    }

    fn refresh_bans(&self) {
        if let Some(state) = &self.state {
            let banned = state.banned();
            let mut shared = self.args.bans.write().unwrap_or_else(|e| e.into_inner());
            if *shared != banned {
                *shared = banned;
            }
        }
    }

    fn store_append(&self, block: &Block, certificate: &QuorumCertificate) -> Result<(), String> {
        self.args
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(block, certificate)
            .map_err(|e: LedgerStoreError| e.to_string())
    }

    /// Admits an entry to the pending pool when it is signed and could apply at the tip.
    fn admit(&mut self, entry: SignedEntry) -> Result<bool, String> {
        if !entry.is_valid() {
            return Err("entry is not validly signed".into());
        }
        let hash = entry_hash(&entry);
        if self.mempool.contains_key(&hash) {
            return Ok(false);
        }
        // An entry no proposal can carry would wait in the pool for good.
        if loom_protocols::encode(&entry).len() > MAX_PROPOSED_BLOCK_BYTES - MAX_BLOCK_HEADER_BYTES
        {
            return Err("entry is too large for a block".into());
        }
        if let Some(state) = &self.state {
            let probe = Block {
                height: state.next_height(),
                prev_hash: state.tip_hash(),
                proposer: self.me,
                timestamp_unix_ms: state.tip().timestamp_unix_ms.max(self.now_ms()),
                entries: vec![entry.clone()],
            };
            state.check_block(&probe).map_err(|e| e.to_string())?;
        }
        if self.mempool.len() >= self.args.config.mempool_max {
            return Err("pending entry pool is full".into());
        }
        self.mempool.insert(hash, entry);
        metrics::gauge!("loom_ledger_mempool").set(self.mempool.len() as f64);
        Ok(true)
    }

    /// The block this peer proposes: pending entries that apply, in pool order, as many as fit
    /// in one proposal ([`MAX_PROPOSED_BLOCK_BYTES`]; the rest wait for a later block).
    fn build_block(&mut self, height: u64) -> Option<Block> {
        let state = self.state.as_ref()?;
        if height != state.next_height() {
            return None;
        }
        // Each entry is checked once, against what the entries before it leave.
        let mut builder = state.block_builder(self.me, self.now_ms());
        let mut stale = Vec::new();
        let mut block_bytes = loom_protocols::encode(builder.block()).len();
        for (hash, entry) in &self.mempool {
            if builder.block().entries.len() >= self.args.config.block_entries_max {
                break;
            }
            let entry_bytes = loom_protocols::encode(entry).len();
            if block_bytes + entry_bytes > MAX_PROPOSED_BLOCK_BYTES {
                continue;
            }
            if builder.try_push(entry.clone()).is_ok() {
                block_bytes += entry_bytes;
            } else {
                stale.push(*hash);
            }
        }
        let block = builder.finish();
        // Entries that no longer apply alone are dropped; the rest wait for a later block.
        for hash in stale {
            if let Some(entry) = self.mempool.get(&hash) {
                let mut alone = block.clone();
                alone.entries = vec![entry.clone()];
                if state.check_block(&alone).is_err() {
                    self.mempool.remove(&hash);
                }
            }
        }
        Some(block)
    }

    /// Stores the engine's new write-ahead entries durably; false when that failed (the caller
    /// then withholds its votes).
    fn persist_wal(&mut self) -> bool {
        let wal = self.engine.wal();
        if wal.len() < self.wal_saved {
            self.wal_saved = 0;
        }
        if wal.len() == self.wal_saved {
            return true;
        }
        let height = self.engine.height();
        let new = wal[self.wal_saved..].to_vec();
        let from = self.wal_saved as u32;
        let stored = self
            .args
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append_wal(height, from, &new);
        match stored {
            Ok(()) => {
                self.wal_saved += new.len();
                true
            }
            Err(error) => {
                tracing::error!(%error, "cannot store the consensus log; votes withheld");
                false
            }
        }
    }

    fn run_actions(&mut self, myself: &ActorRef<LedgerMsg>, actions: Vec<ConsensusAction>) {
        let wal_ok = self.persist_wal();
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                ConsensusAction::Broadcast(message) => {
                    // Never send a signature the disk does not know of: a restart must not
                    // sign again at the same height and round, nor forget its lock.
                    if !wal_ok {
                        continue;
                    }
                    if let Some(mark) = self.engine.signing_watermark()
                        && self.saved_watermark.is_none_or(|saved| saved < mark)
                    {
                        let saved = self
                            .args
                            .store
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .save_watermark(mark);
                        match saved {
                            Ok(()) => self.saved_watermark = Some(mark),
                            Err(error) => {
                                tracing::error!(%error, "cannot store the signing watermark; vote withheld");
                                continue;
                            }
                        }
                    }
                    self.publish(&LedgerGossip::Consensus(message));
                }
                ConsensusAction::ScheduleTimeout { key, after_ms } => {
                    myself.send_after(Duration::from_millis(after_ms), move || {
                        LedgerMsg::Timeout(key)
                    });
                }
                ConsensusAction::RequestValue { height, round } => {
                    if let Some(block) = self.build_block(height) {
                        let now = self.now_ms();
                        let more = self.engine.propose(height, round, block, now);
                        if !self.persist_wal() {
                            continue;
                        }
                        queue.extend(more);
                    }
                }
                ConsensusAction::NewRound {
                    height,
                    round,
                    proposer,
                } => {
                    tracing::debug!(height, round, proposer = %crate::short(&proposer), "ledger round");
                    if round == 0 {
                        self.last_round_zero_proposer = Some(proposer);
                    } else {
                        metrics::counter!("loom_ledger_round_changes_total").increment(1);
                    }
                }
                ConsensusAction::Decided { block, certificate } => {
                    let height = block.height;
                    if self
                        .last_round_zero_proposer
                        .is_some_and(|p| p != block.proposer)
                    {
                        self.coordinator_changes += 1;
                        metrics::counter!("loom_ledger_coordinator_changes_total").increment(1);
                    }
                    match self.commit(&block, &certificate) {
                        Ok(()) => {
                            tracing::debug!(
                                height,
                                entries = block.entries.len(),
                                "ledger block finalized"
                            );
                            myself.send_after(self.args.config.block_interval, move || {
                                LedgerMsg::StartHeight(height + 1)
                            });
                        }
                        Err(error) => {
                            tracing::warn!(height, %error, "decided block refused by the fold");
                        }
                    }
                }
            }
        }
    }

    fn start_height(&mut self, myself: &ActorRef<LedgerMsg>, height: u64) {
        let Some(state) = &self.state else { return };
        if height != state.next_height() || self.engine_height == Some(height) {
            return;
        }
        if state.committee().is_empty() {
            return;
        }
        self.engine_height = Some(height);
        let committee = Committee::new(state.committee().iter().copied().collect());
        let tip = state.tip().clone();
        let now = self.now_ms();
        self.wal_saved = 0;
        let actions = match self.recovered_wal.take() {
            Some((wal_height, wal)) if wal_height == height && !wal.is_empty() => {
                tracing::info!(
                    height,
                    entries = wal.len(),
                    "consensus state recovered from the log"
                );
                self.wal_saved = wal.len();
                self.engine
                    .recover(height, Some(&tip), committee, &wal, now)
            }
            _ => self.engine.start_height(height, Some(&tip), committee, now),
        };
        self.run_actions(myself, actions);
        if self.args.config.self_enroll
            && let Some(state) = &self.state
            && state.open_enrollment()
            && !state.enrolled().contains(&self.me)
        {
            let entry = self.sign_own(Entry::Enroll { peer: self.me });
            if let Ok(true) = self.admit(entry.clone()) {
                self.publish(&LedgerGossip::Entry(entry));
            }
        }
    }

    fn sign_own(&self, entry: Entry) -> SignedEntry {
        let key = &self.args.signing_key;
        SignedEntry::sign(entry, self.me, |message| {
            ed25519_dalek::Signer::sign(key, message)
                .to_bytes()
                .to_vec()
        })
    }

    fn next_random(&mut self) -> u64 {
        self.rng_state = self.rng_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Asks a peer that is ahead for the blocks this replica lacks.
    fn maybe_sync(&mut self) {
        let now = self.now_ms();
        if let Some((_, started)) = self.sync_in_flight
            && now.saturating_sub(started) < SYNC_TIMEOUT_MS
        {
            return;
        }
        self.sync_in_flight = None;
        let ours = self.state.as_ref().map_or(0, LedgerState::next_height);
        let ahead: Vec<PeerKey> = self
            .peer_tips
            .iter()
            .filter(|(_, height)| **height > ours)
            .map(|(peer, _)| *peer)
            .collect();
        if ahead.is_empty() {
            return;
        }
        let peer = ahead[(self.next_random() % ahead.len() as u64) as usize];
        if self
            .args
            .network
            .fetch_ledger(peer, ours, MAX_SYNC_BLOCKS as u32)
            .is_ok()
        {
            self.sync_in_flight = Some((peer, now));
        }
    }

    fn on_gossip(&mut self, myself: &ActorRef<LedgerMsg>, data: &[u8]) {
        let Ok(gossip) = LedgerGossip::from_bytes(data) else {
            return;
        };
        match gossip {
            LedgerGossip::Tip {
                peer,
                next_height,
                genesis,
            } => {
                if self.genesis_hash.is_some_and(|ours| ours != genesis) {
                    return;
                }
                if self.peer_tips.len() >= PEER_TIPS_MAX && !self.peer_tips.contains_key(&peer) {
                    return;
                }
                self.peer_tips.insert(peer, next_height);
                let ours = self.state.as_ref().map_or(0, LedgerState::next_height);
                if next_height > ours {
                    self.maybe_sync();
                }
            }
            LedgerGossip::Entry(entry) => {
                let _ = self.admit(entry);
            }
            LedgerGossip::Consensus(message) => {
                let Some(state) = self.state.clone() else {
                    return;
                };
                if message.height() > state.next_height() {
                    // Evidence that we lag: remember who is ahead.
                    if self.peer_tips.len() < PEER_TIPS_MAX
                        || self.peer_tips.contains_key(&message.author())
                    {
                        let entry = self.peer_tips.entry(message.author()).or_insert(0);
                        *entry = (*entry).max(message.height());
                    }
                }
                let now = self.now_ms();
                let mut validate = |block: &Block| state.check_block(block).is_ok();
                let actions = self.engine.on_message(message, now, &mut validate);
                self.run_actions(myself, actions);
            }
        }
    }

    fn on_synced(
        &mut self,
        myself: &ActorRef<LedgerMsg>,
        from: PeerKey,
        result: Result<Vec<Finalized>, String>,
    ) {
        if self.sync_in_flight.is_some_and(|(peer, _)| peer == from) {
            self.sync_in_flight = None;
        }
        let blocks = match result {
            Ok(blocks) => blocks,
            Err(error) => {
                tracing::debug!(peer = %crate::short(&from), %error, "ledger catch-up failed");
                self.peer_tips.remove(&from);
                return;
            }
        };
        let mut applied = 0;
        for (block, certificate) in &blocks {
            let ours = self.state.as_ref().map_or(0, LedgerState::next_height);
            if block.height < ours {
                continue;
            }
            if let Err(error) = self.commit(block, certificate) {
                tracing::warn!(peer = %crate::short(&from), height = block.height, %error, "catch-up block refused");
                self.peer_tips.remove(&from);
                break;
            }
            applied += 1;
        }
        if applied > 0 {
            self.synced_blocks += applied;
            metrics::counter!("loom_ledger_synced_blocks_total").increment(applied);
            self.engine_height = None;
            if let Some(state) = &self.state {
                let next = state.next_height();
                self.start_height(myself, next);
            }
            self.maybe_sync();
        }
    }
}

impl Actor for LedgerReplica {
    type Msg = LedgerMsg;
    type State = LedgerReplicaState;
    type Arguments = LedgerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: LedgerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let me = args.signing_key.verifying_key().to_bytes();
        let engine = ConsensusEngine::new(args.signing_key.clone(), args.config.consensus.clone());
        let mut state = LedgerReplicaState {
            me,
            state: None,
            genesis_hash: None,
            engine,
            engine_height: None,
            mempool: BTreeMap::new(),
            peer_tips: HashMap::new(),
            sync_in_flight: None,
            synced_blocks: 0,
            coordinator_changes: 0,
            last_round_zero_proposer: None,
            saved_watermark: None,
            wal_saved: 0,
            recovered_wal: None,
            rng_state: u64::from_le_bytes(me[..8].try_into().unwrap_or_default()) ^ unix_ms(),
            args,
        };
        let replayed = {
            let store = state.args.store.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mark) = store.watermark()? {
                state.engine.restore_signing_watermark(mark);
                state.saved_watermark = Some(mark);
            }
            let next = store.next_height();
            let wal = store.wal(next)?;
            if !wal.is_empty() {
                state.recovered_wal = Some((next, wal));
            }
            let mut genesis = None;
            let folded = store.replay(|block, _, _| {
                if block.height == 0 {
                    genesis = Some(block.hash());
                }
            })?;
            folded.map(|s| (s, genesis))
        };
        match replayed {
            Some((folded, genesis)) => {
                tracing::info!(
                    next_height = folded.next_height(),
                    "ledger replayed from disk"
                );
                state.genesis_hash = genesis;
                state.state = Some(folded);
                state.refresh_bans();
            }
            None => {
                if let GenesisPlan::Create {
                    network,
                    open_enrollment,
                    mint,
                    members,
                    fleet,
                } = state.args.genesis.clone()
                {
                    let mut all = vec![me];
                    all.extend(members.into_iter().filter(|m| *m != me));
                    let (block, certificate) = make_genesis(
                        &state.args.signing_key,
                        &network,
                        open_enrollment,
                        fleet,
                        &all,
                        &mint,
                        unix_ms(),
                    );
                    state.commit(&block, &certificate).map_err(|e| {
                        ActorProcessingErr::from(format!("cannot create the genesis block: {e}"))
                    })?;
                    tracing::info!(network, "ledger genesis created");
                }
            }
        }
        if let Some(folded) = &state.state {
            let next = folded.next_height();
            myself.send_message(LedgerMsg::StartHeight(next))?;
        }
        myself.send_interval(TICK, || LedgerMsg::Tick);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LedgerMsg::Gossip(data) => state.on_gossip(&myself, &data),
            LedgerMsg::Timeout(key) => {
                let now = state.now_ms();
                let actions = state.engine.on_timeout(key, now);
                state.run_actions(&myself, actions);
            }
            LedgerMsg::StartHeight(height) => state.start_height(&myself, height),
            LedgerMsg::Tick => {
                if let (Some(folded), Some(genesis)) = (&state.state, state.genesis_hash) {
                    state.publish(&LedgerGossip::Tip {
                        peer: state.me,
                        next_height: folded.next_height(),
                        genesis,
                    });
                    let next = folded.next_height();
                    state.start_height(&myself, next);
                }
                state.maybe_sync();
            }
            LedgerMsg::Synced { from, result } => state.on_synced(&myself, from, result),
            LedgerMsg::SubmitOwn(entry, reply) => {
                let signed = state.sign_own(entry);
                let result = state.admit(signed.clone()).map(|_| ());
                if result.is_ok() {
                    state.publish(&LedgerGossip::Entry(signed));
                }
                let _ = reply.send(result);
            }
            LedgerMsg::Submit(entry, reply) => {
                let result = state.admit(entry.clone()).map(|_| ());
                if result.is_ok() {
                    state.publish(&LedgerGossip::Entry(entry));
                }
                let _ = reply.send(result);
            }
            LedgerMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            LedgerMsg::Credits(reply) => {
                let _ = reply.send(state.state.as_ref().map(|s| s.credits().clone()));
            }
        }
        Ok(())
    }
}
