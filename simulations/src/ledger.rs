//! The ledger scenario: N real `loom-peer` processes on loopback run the replicated ledger; the
//! harness kills the coordinator and measures how long the rest take to finalize a block under
//! another one, then `kill -9`s random peers at random moments while credits move, restarts
//! them, and checks at the end that every replica verifies from genesis, has the same tip and
//! reports the same balances, and that nothing finalized before a kill was lost.
//!
//! Randomness (which peer, when) comes from a seed, printed in the report, so a failing run can
//! be replayed with `loom-sim ledger --seed <seed>`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use loom_node::{
    client::ControlClient,
    ledger_cli::{hex, load_chain, verify_chain},
    localmesh::{LocalMesh, MeshOptions},
};
use loom_protocols::data::SplitMix64;
use serde::Serialize;

use crate::ScenarioError;

/// Options of the ledger scenario.
#[derive(Debug, Clone)]
pub struct LedgerScenario {
    /// Peers (the committee once all have enrolled).
    pub peers: usize,
    /// Random `kill -9` and restart cycles after the coordinator kill.
    pub kills: usize,
    /// Seed of the kill schedule.
    pub seed: u64,
    /// Pause between blocks passed to every peer.
    pub block_interval: String,
    /// Timeout of each wait.
    pub timeout: Duration,
    /// The binary.
    pub bin: PathBuf,
}

/// What the ledger scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerReport {
    /// The seed (replay with `loom-sim ledger --seed`).
    pub seed: u64,
    /// Peers.
    pub peers: usize,
    /// Launch until every peer is a committee member of the same ledger, in ms.
    pub committee_formed_ms: u64,
    /// Kill of the next height's round-0 coordinator until that height is finalized by another
    /// member, in ms (includes the rest of the current height, the block interval and the
    /// propose timeout).
    pub coordinator_failover_ms: u64,
    /// Height at the coordinator kill, and the height finalized by the new coordinator.
    pub failover_heights: (u64, u64),
    /// The consensus round in which that height was decided (round 0 was the killed one's).
    pub failover_round: u32,
    /// Random kills performed.
    pub kills: usize,
    /// Restart until the restarted peer holds a block finalized after its restart (it caught up
    /// and the committee, with it, is live again), per kill, median and max, in ms.
    pub catch_up_ms_p50: f64,
    /// Maximum.
    pub catch_up_ms_max: f64,
    /// Transfers submitted during the run.
    pub transfers: u64,
    /// Finalized blocks at the end (all peers).
    pub final_height: u64,
    /// Tip hash at the end (all peers).
    pub tip: String,
    /// Every replica verified from genesis.
    pub all_verified: bool,
    /// Every replica reports the same balances.
    pub balances_identical: bool,
}

fn ledger_heights(clients: &[Option<ControlClient>]) -> Vec<Option<u64>> {
    clients
        .iter()
        .map(|c| {
            c.as_ref()
                .and_then(|c| c.ledger_status().ok())
                .map(|s| s.next_height)
        })
        .collect()
}

fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>, ScenarioError>,
) -> Result<T, ScenarioError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(ScenarioError::Ledger(format!(
                "timed out after {} s waiting for {what}",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the scenario.
pub fn run_ledger(scenario: &LedgerScenario) -> Result<LedgerReport, ScenarioError> {
    let root = std::env::temp_dir().join(format!(
        "loom-sim-ledger-{}-{}",
        std::process::id(),
        scenario.seed
    ));
    let mut options = MeshOptions::run(scenario.peers, scenario.bin.clone(), root);
    options.extra_args = vec!["--block-interval".into(), scenario.block_interval.clone()];
    options.first_peer_args = vec!["--genesis".into(), "loom-sim".into()];
    options.log =
        std::env::var("LOOM_SIM_LOG").unwrap_or_else(|_| "warn,loom_actors::ledger=info".into());
    options.keep = std::env::var_os("LOOM_SIM_KEEP").is_some();
    let mut mesh = LocalMesh::start(&options)?;
    let n = scenario.peers;
    let mut clients: Vec<Option<ControlClient>> = Vec::with_capacity(n);
    for i in 0..n {
        clients.push(Some(mesh.client(i, scenario.timeout)?));
    }
    // What every replica says, for failure messages.
    let snapshot = |mesh: &LocalMesh| -> String {
        mesh.peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                match ControlClient::from_data_dir(&p.data_dir).and_then(|c| c.ledger_status()) {
                    Ok(s) => format!(
                        "peer {i}: height {} round {} member {} mempool {} synced {}",
                        s.next_height, s.round, s.member, s.mempool, s.synced_blocks
                    ),
                    Err(e) => format!("peer {i}: {e}"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let fail = |seed: u64, e: ScenarioError| {
        ScenarioError::Ledger(format!(
            "{e} (seed {seed}; replay with: loom-sim ledger --seed {seed})"
        ))
    };
    let seed = scenario.seed;

    // Every peer enrolled and a member of one committee.
    let committee_formed = wait_until(scenario.timeout, "the committee to form", || {
        mesh.check_alive()?;
        let all = clients.iter().all(|c| {
            c.as_ref()
                .and_then(|c| c.ledger_status().ok())
                .is_some_and(|s| s.member && s.committee == n)
        });
        Ok(all.then(|| mesh.started.elapsed()))
    })
    .map_err(|e| fail(seed, e))?;

    // Credits move from the genesis peer to every other peer while peers die.
    let ids: Vec<String> = mesh.peers.iter().map(|p| p.peer_id.to_string()).collect();
    let mut transfers = 0u64;
    let mut transfer = |clients: &[Option<ControlClient>], to: usize| {
        if let Some(c) = &clients[0]
            && c.transfer(&ids[to], 1).is_ok()
        {
            transfers += 1;
        }
    };
    for to in 1..n {
        transfer(&clients, to);
    }

    // Kill the coordinator of the next height (the committee member its round 0 rotates to)
    // while the current one is being decided: the rest must time out on it and elect the next
    // member of the rotation.
    let status = clients[1]
        .as_ref()
        .ok_or_else(|| ScenarioError::Ledger("no client".into()))?
        .ledger_status()?;
    let mut keys: Vec<(loom_protocols::PeerKey, usize)> = mesh
        .peers
        .iter()
        .enumerate()
        .filter_map(|(i, p)| loom_node::network::key_of(&p.peer_id).map(|k| (k, i)))
        .collect();
    keys.sort();
    let target_height = status.next_height + 1;
    let (proposer, victim) = keys[(target_height % n as u64) as usize];
    let observer = (victim + 1) % n;
    let height_at_kill = status.next_height;
    let killed_at = Instant::now();
    mesh.kill(victim);
    clients[victim] = None;
    let (failover_height, failover, failover_round) = wait_until(
        scenario.timeout,
        "the height after the killed coordinator's to be decided",
        || {
            let chain = load_chain(&mesh.peers[observer].data_dir).unwrap_or_default();
            Ok(chain
                .iter()
                .find(|(block, _)| block.height >= target_height)
                .map(|(block, certificate)| (block.height, killed_at.elapsed(), certificate.round)))
        },
    )
    .map_err(|e| fail(seed, e))?;
    let new_coordinator = load_chain(&mesh.peers[observer].data_dir)
        .ok()
        .and_then(|c| c.get(failover_height as usize).map(|(b, _)| b.proposer));
    if new_coordinator == Some(proposer) {
        return Err(fail(
            seed,
            ScenarioError::Ledger("the killed coordinator's height was decided by itself".into()),
        ));
    }
    tracing_note(&format!(
        "coordinator of height {target_height} killed; decided in round {failover_round} by another, {} ms after the kill",
        failover.as_millis()
    ));
    mesh.restart(victim, &options, &[])?;
    clients[victim] = Some(mesh.client(victim, scenario.timeout)?);

    // Random kills at random moments.
    let mut rng = SplitMix64::new(seed);
    let mut catch_up_ms = Vec::with_capacity(scenario.kills);
    for kill in 0..scenario.kills {
        let victim = (rng.next_u64() % n as u64) as usize;
        tracing_note(&format!("kill {kill}: peer {victim}"));
        let pause_ms = rng.next_u64() % 700;
        transfer(&clients, 1 + kill % (n - 1));
        std::thread::sleep(Duration::from_millis(pause_ms));
        let before = ledger_heights(&clients)
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        mesh.kill(victim);
        clients[victim] = None;
        mesh.restart(victim, &options, &[])?;
        let restarted = Instant::now();
        clients[victim] = Some(mesh.client(victim, scenario.timeout)?);
        wait_until(
            scenario.timeout,
            "the restarted peer to catch up and a new block",
            || {
                mesh.check_alive()?;
                let height = clients[victim]
                    .as_ref()
                    .and_then(|c| c.ledger_status().ok())
                    .map(|s| s.next_height)
                    .unwrap_or(0);
                Ok((height > before).then_some(()))
            },
        )
        .map_err(|e| {
            fail(
                seed,
                ScenarioError::Ledger(format!("{e} [{}]", snapshot(&mesh))),
            )
        })?;
        catch_up_ms.push(restarted.elapsed().as_secs_f64() * 1e3);
    }

    // Quiesce: every submitted transfer finalized, every replica at one height.
    let target = ledger_heights(&clients)
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0)
        + 3;
    wait_until(
        scenario.timeout,
        "every replica to reach the same height",
        || {
            mesh.check_alive()?;
            let heights = ledger_heights(&clients);
            Ok(heights
                .iter()
                .all(|h| h.is_some_and(|h| h >= target))
                .then_some(()))
        },
    )
    .map_err(|e| fail(seed, e))?;
    let chains: Vec<_> = mesh
        .peers
        .iter()
        .map(|p| load_chain(&p.data_dir))
        .collect::<Result<_, _>>()
        .map_err(|e| ScenarioError::Ledger(e.to_string()))?;
    let common = chains.iter().map(Vec::len).min().unwrap_or(0);
    let mut all_verified = true;
    let mut balances = Vec::new();
    for chain in &chains {
        match verify_chain(&chain[..common]) {
            Ok(state) => balances.push(state.credits().clone()),
            Err(_) => all_verified = false,
        }
    }
    // The same blocks (their certificates may hold different quorums of precommits).
    let prefix_equal = chains.windows(2).all(|w| {
        w[0][..common]
            .iter()
            .zip(&w[1][..common])
            .all(|(a, b)| a.0 == b.0)
    });
    let balances_identical = prefix_equal && balances.windows(2).all(|w| w[0] == w[1]);
    let tip = chains
        .first()
        .and_then(|c| c.get(common.saturating_sub(1)))
        .map(|(b, _)| hex(&b.hash()))
        .unwrap_or_default();
    if failover_height < height_at_kill {
        return Err(fail(
            seed,
            ScenarioError::Ledger("finalized height went back".into()),
        ));
    }
    catch_up_ms.sort_by(f64::total_cmp);
    let p50 = catch_up_ms
        .get(catch_up_ms.len() / 2)
        .copied()
        .unwrap_or(0.0);
    Ok(LedgerReport {
        seed,
        peers: n,
        committee_formed_ms: committee_formed.as_millis() as u64,
        coordinator_failover_ms: failover.as_millis() as u64,
        failover_heights: (height_at_kill, failover_height),
        failover_round,
        kills: scenario.kills,
        catch_up_ms_p50: p50,
        catch_up_ms_max: catch_up_ms.last().copied().unwrap_or(0.0),
        transfers,
        final_height: common as u64,
        tip,
        all_verified,
        balances_identical,
    })
}

fn tracing_note(line: &str) {
    if std::env::var_os("LOOM_SIM_VERBOSE").is_some() {
        eprintln!("loom-sim ledger: {line}");
    }
}
