//! The round chain's coordinator failover, measured: honest peers with real learners train one
//! job over the in-process bus of the byzantine harness; at a chosen height of the job's round
//! chain, its coordinator is cut off the moment it proposes (nothing it sends goes out, nothing
//! reaches it, its blobs are gone: what a crash or a cut link at the worst moment looks like).
//! The others must elect the next coordinator by their votes and decide the round, and training
//! must go on without the lost peer.
//!
//! Reported per run: who was cut, who coordinated instead and in which consensus round, how
//! long after starting the height each survivor learned the decision (the failover), against
//! the median decision time of the other heights in the same run (the baseline), and whether
//! the survivors finished on one model.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use loom_actors::exchanger::ChainDecision;
use loom_protocols::PeerKey;
use loom_trainer::Dataset;
use serde::Serialize;

use crate::byzantine::{Bus, ByzantineConfig, ByzantineError, Peer, spawn_peer};

/// One failover run's settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FailoverConfig {
    /// Peers (all honest).
    pub peers: usize,
    /// Rounds to train.
    pub rounds: u64,
    /// The round-chain height whose coordinator is cut off when it proposes.
    pub cut_at: u64,
}

/// What one run showed.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverOutcome {
    /// The settings.
    pub config: FailoverConfig,
    /// Hex key of the coordinator cut off, if one was.
    pub cut: Option<String>,
    /// The height it was cut at.
    pub cut_height: Option<u64>,
    /// Hex key of the coordinator whose proposal was decided at that height.
    pub new_coordinator: Option<String>,
    /// The consensus round of that decision (1 or more: the cut coordinator was skipped).
    pub consensus_round: Option<u32>,
    /// Each survivor's decision time of that height, ms after it started the height.
    pub failover_ms: Vec<u64>,
    /// Median decision time of the other heights decided in consensus round 0, ms.
    pub normal_ms_median: Option<u64>,
    /// Heights decided, as any survivor learned them (decisions that came after a survivor's
    /// last report are not counted).
    pub heights_decided: usize,
    /// Whether every survivor reported the last round, on one model.
    pub survivors_finished_identical: bool,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
}

/// Runs one failover configuration to its last round.
pub async fn run(config: FailoverConfig) -> Result<FailoverOutcome, ByzantineError> {
    let started = std::time::Instant::now();
    let bus = Arc::new(Bus::cutting_at(config.cut_at));
    let dataset = Arc::new(Dataset::builtin(42, 20_000));
    let settings = ByzantineConfig {
        peers: config.peers,
        byzantine: 0,
        misbehaviour: None,
        rounds: config.rounds,
        audit: 0.0,
        screen: true,
    };
    let mut peers = Vec::with_capacity(config.peers);
    for index in 0..config.peers {
        // Nobody is copied: the victim of the copy attack is irrelevant here.
        peers.push(spawn_peer(&bus, index, &settings, &dataset, [0; 32]).await?);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + 10 * config.rounds);
    loop {
        let cut = *bus.cut.lock().unwrap_or_else(|e| e.into_inner());
        for peer in &mut peers {
            while let Ok(report) = peer.reports.try_recv() {
                peer.seen.push(report);
            }
        }
        let survivors_done = peers
            .iter()
            .filter(|p| Some(p.key) != cut)
            .all(|p| p.seen.last().is_some_and(|r| r.finished));
        if survivors_done {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let (index, peer) = peers
                .iter()
                .enumerate()
                .find(|(_, p)| Some(p.key) != cut && !p.seen.last().is_some_and(|r| r.finished))
                .ok_or(ByzantineError::Stalled {
                    peer: 0,
                    after: 0,
                    secs: 0,
                })?;
            return Err(ByzantineError::Stalled {
                peer: index,
                after: peer.seen.last().map_or(0, |r| r.round),
                secs: deadline.elapsed().as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut = *bus.cut.lock().unwrap_or_else(|e| e.into_inner());
    let outcome = measure(config, &peers, cut, started.elapsed().as_secs_f64());
    for peer in &peers {
        peer.exchanger.stop(None);
        peer.trainer.stop(None);
    }
    Ok(outcome)
}

/// The decisions each survivor learned, by height (the first of each).
fn decisions(peer: &Peer) -> BTreeMap<u64, ChainDecision> {
    let mut by_height = BTreeMap::new();
    for decision in peer.seen.iter().flat_map(|r| r.decisions.iter()) {
        by_height
            .entry(decision.round)
            .or_insert_with(|| decision.clone());
    }
    by_height
}

fn measure(
    config: FailoverConfig,
    peers: &[Peer],
    cut: Option<PeerKey>,
    wall_s: f64,
) -> FailoverOutcome {
    let survivors: Vec<&Peer> = peers.iter().filter(|p| Some(p.key) != cut).collect();
    let views: Vec<BTreeMap<u64, ChainDecision>> = survivors.iter().map(|p| decisions(p)).collect();
    let cut_hex = cut.map(|k| loom_actors::exchanger::hex(&k));
    // The height the coordinator was cut at: the first decided in a consensus round above 0
    // at or after `cut_at`.
    let cut_height = views.first().and_then(|view| {
        view.values()
            .find(|d| d.round >= config.cut_at && d.consensus_round > 0)
            .map(|d| d.round)
    });
    let at_cut: Vec<&ChainDecision> = cut_height
        .map(|h| views.iter().filter_map(|v| v.get(&h)).collect())
        .unwrap_or_default();
    let mut normal: Vec<u64> = views
        .iter()
        .flat_map(|v| v.values())
        .filter(|d| Some(d.round) != cut_height && d.consensus_round == 0)
        .map(|d| d.after_ms)
        .collect();
    normal.sort_unstable();
    let finals: Vec<Option<&str>> = survivors
        .iter()
        .map(|p| {
            p.seen
                .last()
                .filter(|r| r.finished)
                .map(|r| r.model_hash.as_str())
        })
        .collect();
    FailoverOutcome {
        config,
        cut: cut_hex,
        cut_height,
        new_coordinator: at_cut.first().map(|d| d.coordinator.clone()),
        consensus_round: at_cut.first().map(|d| d.consensus_round),
        failover_ms: at_cut.iter().map(|d| d.after_ms).collect(),
        normal_ms_median: normal.get(normal.len() / 2).copied(),
        heights_decided: views
            .iter()
            .flat_map(|v| v.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        survivors_finished_identical: finals
            .first()
            .is_some_and(|first| first.is_some() && finals.iter().all(|f| f == first)),
        wall_s,
    }
}

/// A markdown table of runs.
pub fn table(outcomes: &[FailoverOutcome]) -> String {
    let mut out = String::from(
        "| run | peers | cut at height | cut coordinator | new coordinator (consensus round) | failover, each survivor (ms) | other heights, median (ms) | heights decided | survivors finished on one model |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (i, o) in outcomes.iter().enumerate() {
        let short = |k: &Option<String>| {
            k.as_ref()
                .map_or("-".to_owned(), |k| k.get(..8).unwrap_or(k).to_owned())
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} ({}) | {:?} | {} | {} of {} | {} |\n",
            i + 1,
            o.config.peers,
            o.cut_height.map_or("-".to_owned(), |h| h.to_string()),
            short(&o.cut),
            short(&o.new_coordinator),
            o.consensus_round.map_or("-".to_owned(), |r| r.to_string()),
            o.failover_ms,
            o.normal_ms_median.map_or("-".to_owned(), |m| m.to_string()),
            o.heights_decided,
            o.config.rounds.saturating_sub(1),
            if o.survivors_finished_identical {
                "yes"
            } else {
                "NO"
            },
        ));
    }
    out
}
