//! `loom-sim`: runs a harness scenario, prints a report and writes it as JSON.
//!
//!   loom-sim mesh --peers 20 --probes-per-peer 10 --json target/sim-mesh.json
//!   loom-sim idle --secs 60 --json target/sim-idle.json
//!   loom-sim chaos --seeds 5000 --json target/sim-chaos.json
//!   loom-sim chaos --seed 1234 --peers 7 --byzantine 2
//!   loom-sim ledger --peers 5 --kills 50 --json target/sim-ledger.json
//!   loom-sim blocks --members 16,64,256 --json target/sim-blocks.json
//!   loom-sim round-chain --peers 5 --rounds 12 --cut-at 6 --runs 5 --json target/sim-chain.json

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use loom_simulations::{
    MeshScenario,
    chaos::{self, ChaosConfig},
    default_peer_bin,
    ledger::{LedgerScenario, run_ledger},
    run_idle, run_mesh,
};

#[derive(Debug, Parser)]
#[command(name = "loom-sim", about = "Loom's local multi-node harness")]
struct Cli {
    /// The loom-peer binary [default: next to loom-sim, or LOOM_PEER_BIN].
    #[arg(long, global = true)]
    bin: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// N peers on loopback: mesh formation time and gossip propagation latency.
    Mesh {
        /// Peers.
        #[arg(long, default_value_t = 20)]
        peers: usize,
        /// Probes each peer publishes.
        #[arg(long, default_value_t = 10)]
        probes_per_peer: usize,
        /// Pause after each probe, in ms (probes go out one at a time, round-robin).
        #[arg(long, default_value_t = 20)]
        probe_interval_ms: u64,
        /// Formation timeout in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// N real peers run the replicated ledger: the coordinator is killed (failover time
    /// measured), then random peers are killed with SIGKILL and restarted while credits move;
    /// every replica must verify with the same blocks and balances at the end.
    Ledger {
        /// Peers.
        #[arg(long, default_value_t = 5)]
        peers: usize,
        /// Random kill-and-restart cycles.
        #[arg(long, default_value_t = 50)]
        kills: usize,
        /// Seed of the kill schedule.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Pause between blocks.
        #[arg(long, default_value = "200ms")]
        block_interval: String,
        /// Timeout of each wait, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Resident memory and CPU of an idle peer.
    Idle {
        /// Seconds to measure.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Block building cost: a proposal built from a job committee's joins and round votes,
    /// entry by entry (each entry checked once) against re-checking the whole block after each
    /// entry; medians and their ratio per committee size (no processes).
    Blocks {
        /// Committee sizes, comma-separated (each at most 256).
        #[arg(long, default_value = "16,64,256")]
        members: String,
        /// Repetitions per size.
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// Seeded chaos simulation of the ledger's consensus on virtual time (no processes):
    /// partitions, loss, reordering, kills, byzantine members. Checks safety, liveness and
    /// credits; measures coordinator-change latency.
    Chaos {
        /// Seeds to run.
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Run this one seed and print its report (replays a failure).
        #[arg(long)]
        seed: Option<u64>,
        /// Committee size [default: 4 peers with 1 byzantine for two seeds in three, 7 with 2
        /// for the third].
        #[arg(long, requires = "byzantine")]
        peers: Option<usize>,
        /// Byzantine members (fewer than a third of the peers).
        #[arg(long, requires = "peers")]
        byzantine: Option<usize>,
        /// Worker threads [default: the available cores].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Byzantine training: 1 of 4 and 2 of 7 peers misbehave (noise, sign flip, x100, zeros,
    /// a copy, a stale replay, a forged signature) while real learners train; prints the
    /// byzantine table (detection, exclusion, credits, loss against the all-honest run).
    Byzantine {
        /// Rounds per run.
        #[arg(long, default_value_t = 12)]
        rounds: u64,
        /// Only this misbehaviour (the baseline always runs).
        #[arg(long, value_enum)]
        only: Option<loom_simulations::byzantine::Misbehaviour>,
        /// Only this committee, as PEERS/BYZANTINE (e.g. 4/1) [default: 4/1 and 7/2].
        #[arg(long)]
        committee: Option<String>,
        /// Write the table (Markdown) here.
        #[arg(long)]
        table: Option<PathBuf>,
        /// Share of contributions audited by recomputation (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        audit: f64,
        /// Turn the verifier's screening off, to see what the other checks (commitments, the
        /// cheap loss check, audits) catch alone.
        #[arg(long)]
        no_screen: bool,
    },
    /// The round chain's coordinator failover: honest peers with real learners train; the
    /// coordinator of a height is cut off the moment it proposes; prints how long the others
    /// took to elect the next one and decide, against the other heights.
    RoundChain {
        /// Peers (all honest).
        #[arg(long, default_value_t = 5)]
        peers: usize,
        /// Rounds per run.
        #[arg(long, default_value_t = 12)]
        rounds: u64,
        /// The round-chain height whose coordinator is cut off.
        #[arg(long, default_value_t = 6)]
        cut_at: u64,
        /// Runs.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bin = cli.bin.unwrap_or_else(default_peer_bin);
    let report = match cli.scenario {
        Scenario::Mesh {
            peers,
            probes_per_peer,
            probe_interval_ms,
            timeout_secs,
        } => {
            if peers < 2 {
                eprintln!("error: --peers must be at least 2");
                return ExitCode::FAILURE;
            }
            run_mesh(&MeshScenario {
                peers,
                probes_per_peer,
                probe_interval: Duration::from_millis(probe_interval_ms),
                timeout: Duration::from_secs(timeout_secs),
                bin,
            })
            .map(|r| serde_json::to_value(r).unwrap_or_default())
        }
        Scenario::Chaos {
            seeds,
            start,
            seed,
            peers,
            byzantine,
            threads,
        } => {
            let size = peers.zip(byzantine);
            return match seed {
                Some(seed) => chaos_one(seed, size, cli.json.as_deref()),
                None => chaos_many(start, seeds, size, threads, cli.json.as_deref()),
            };
        }
        Scenario::Ledger {
            peers,
            kills,
            seed,
            block_interval,
            timeout_secs,
        } => {
            if peers < 2 {
                eprintln!("error: --peers must be at least 2");
                return ExitCode::FAILURE;
            }
            run_ledger(&LedgerScenario {
                peers,
                kills,
                seed,
                block_interval,
                timeout: Duration::from_secs(timeout_secs),
                bin,
            })
            .and_then(|r| {
                if r.all_verified && r.balances_identical {
                    Ok(serde_json::to_value(r).unwrap_or_default())
                } else {
                    Err(loom_simulations::ScenarioError::Ledger(format!(
                        "replicas disagree: {} (seed {seed})",
                        serde_json::to_string(&r).unwrap_or_default()
                    )))
                }
            })
        }
        Scenario::Byzantine {
            rounds,
            only,
            committee,
            table,
            audit,
            no_screen,
        } => {
            if !(0.0..=1.0).contains(&audit) {
                eprintln!("error: --audit must be between 0 and 1");
                return ExitCode::FAILURE;
            }
            return byzantine(
                rounds,
                only,
                committee.as_deref(),
                table.as_deref(),
                audit,
                !no_screen,
                cli.json.as_deref(),
            );
        }
        Scenario::RoundChain {
            peers,
            rounds,
            cut_at,
            runs,
        } => return round_chain(peers, rounds, cut_at, runs, cli.json.as_deref()),
        Scenario::Blocks { members, reps } => {
            let sizes: Result<Vec<usize>, _> = members
                .split(',')
                .map(|m| m.trim().parse::<usize>())
                .collect();
            let Ok(sizes) = sizes else {
                eprintln!(
                    "error: --members must be comma-separated committee sizes, got {members:?}"
                );
                return ExitCode::FAILURE;
            };
            loom_simulations::blocks::run(&sizes, reps)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
                .map_err(|e| loom_simulations::ScenarioError::Ledger(e.to_string()))
        }
        Scenario::Idle { secs } => {
            run_idle(bin, secs).map(|r| serde_json::to_value(r).unwrap_or_default())
        }
    };
    match report {
        Ok(value) => {
            let text = serde_json::to_string_pretty(&value).unwrap_or_default();
            println!("{text}");
            if let Some(path) = cli.json
                && let Err(e) = std::fs::write(&path, text + "\n")
            {
                eprintln!("error: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn chaos_config(seed: u64, size: Option<(usize, usize)>) -> ChaosConfig {
    match size {
        Some((peers, byzantine)) => ChaosConfig::new(peers, byzantine),
        None => ChaosConfig::mixed(seed),
    }
}

fn write_json(path: Option<&Path>, value: &impl serde::Serialize) -> ExitCode {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    if let Some(path) = path
        && let Err(e) = std::fs::write(path, text + "\n")
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// One seed: its report, or its failure.
fn chaos_one(seed: u64, size: Option<(usize, usize)>, json: Option<&Path>) -> ExitCode {
    match chaos::run(seed, &chaos_config(seed, size)) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            write_json(json, &report)
        }
        Err(failure) => {
            eprintln!("FAILED: {failure}");
            let _ = write_json(json, &failure);
            ExitCode::FAILURE
        }
    }
}

/// Many seeds over worker threads, summarized.
fn chaos_many(
    start: u64,
    seeds: u64,
    size: Option<(usize, usize)>,
    threads: Option<usize>,
    json: Option<&Path>,
) -> ExitCode {
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .clamp(1, 64) as u64;
    let began = Instant::now();
    let mut outcomes: Vec<(u64, Result<chaos::ChaosReport, chaos::ChaosFailure>)> =
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|worker| {
                    scope.spawn(move || {
                        (start..start.saturating_add(seeds))
                            .skip(worker as usize)
                            .step_by(threads as usize)
                            .map(|seed| (seed, chaos::run(seed, &chaos_config(seed, size))))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
    outcomes.sort_by_key(|(seed, _)| *seed);
    let outcomes: Vec<_> = outcomes.into_iter().map(|(_, o)| o).collect();
    let summary = chaos::summarize(&outcomes);
    let wall_ms = began.elapsed().as_millis() as u64;
    let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    println!(
        "chaos: {} runs (seeds {start}..{}), {} failed, {wall_ms} ms wall on {threads} threads",
        summary.runs,
        start.saturating_add(seeds),
        summary.failures.len()
    );
    println!(
        "coordinator change (virtual ms, {} measured): median {}, p99 {}, max {}",
        summary.coordinator_changes,
        ms(summary.coordinator_change_ms_p50),
        ms(summary.coordinator_change_ms_p99),
        ms(summary.coordinator_change_ms_max)
    );
    println!(
        "heights decided: {} in all, highest decision round {}; \
         liveness after healing (virtual ms): median {}, max {}",
        summary.heights_decided,
        summary.max_decided_round,
        ms(summary.liveness_ms_p50),
        ms(summary.liveness_ms_max)
    );
    println!(
        "byzantine: {} equivocated proposals, {} forged catch-up pairs refused; \
         {} restarts replayed their log; {} messages",
        summary.equivocations,
        summary.forged_sync_refused,
        summary.wal_recoveries,
        summary.messages_sent
    );
    for failure in &summary.failures {
        println!("FAILED: {failure}");
    }
    let value = serde_json::json!({
        "wall_ms": wall_ms,
        "threads": threads,
        "start": start,
        "seeds": seeds,
        "summary": summary,
    });
    let written = write_json(json, &value);
    if !summary.failures.is_empty() {
        return ExitCode::FAILURE;
    }
    written
}

/// Parses `PEERS/BYZANTINE`.
fn parse_committee(text: &str) -> Result<(usize, usize), String> {
    let (peers, byzantine) = text
        .split_once('/')
        .ok_or_else(|| format!("--committee {text:?} is not PEERS/BYZANTINE"))?;
    let peers: usize = peers
        .parse()
        .map_err(|_| format!("--committee {text:?}: bad peer count"))?;
    let byzantine: usize = byzantine
        .parse()
        .map_err(|_| format!("--committee {text:?}: bad byzantine count"))?;
    if !(2..=32).contains(&peers) || byzantine == 0 || 3 * byzantine >= peers {
        return Err(format!(
            "--committee {text:?}: need 2 to 32 peers and 1 to fewer than a third byzantine"
        ));
    }
    Ok((peers, byzantine))
}

/// The byzantine table: every misbehaviour against its baseline, for each committee.
fn byzantine(
    rounds: u64,
    only: Option<loom_simulations::byzantine::Misbehaviour>,
    committee: Option<&str>,
    table: Option<&Path>,
    audit: f64,
    screen: bool,
    json: Option<&Path>,
) -> ExitCode {
    use loom_simulations::byzantine;
    let shapes = match committee.map(parse_committee) {
        None => vec![(4, 1), (7, 2)],
        Some(Ok(shape)) => vec![shape],
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !(3..=200).contains(&rounds) {
        eprintln!("error: --rounds must be between 3 and 200");
        return ExitCode::FAILURE;
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let began = Instant::now();
    let mut results = Vec::new();
    for (peers, bad) in shapes {
        eprintln!("byzantine: {bad} of {peers}, {rounds} rounds per run ...");
        match runtime.block_on(byzantine::run_shape(
            peers, bad, rounds, only, audit, screen,
        )) {
            Ok(outcomes) => results.push(outcomes),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", byzantine::table(&results));
    let markdown = byzantine::document(&results, rounds, audit);
    println!("wall: {:.0} s", began.elapsed().as_secs_f64());
    if let Some(path) = table
        && let Err(e) = std::fs::write(path, &markdown)
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let failed = results.iter().any(|outcomes| {
        outcomes[1..]
            .iter()
            .any(|o| byzantine::verdict(o, &outcomes[0]).is_err())
    });
    let written = write_json(json, &results);
    if failed {
        eprintln!("error: a misbehaviour was not handled (see the verdict column)");
        return ExitCode::FAILURE;
    }
    written
}

/// The round chain's failover runs.
fn round_chain(
    peers: usize,
    rounds: u64,
    cut_at: u64,
    runs: usize,
    json: Option<&Path>,
) -> ExitCode {
    use loom_simulations::chain_failover::{self, FailoverConfig};
    if !(4..=16).contains(&peers) {
        eprintln!("error: --peers must be between 4 and 16 (a committee of 4 survives one loss)");
        return ExitCode::FAILURE;
    }
    if !(3..=200).contains(&rounds) || !(3..rounds).contains(&cut_at) {
        eprintln!("error: --rounds must be 3 to 200 and --cut-at between 3 and the last round");
        return ExitCode::FAILURE;
    }
    if !(1..=100).contains(&runs) {
        eprintln!("error: --runs must be between 1 and 100");
        return ExitCode::FAILURE;
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let config = FailoverConfig {
        peers,
        rounds,
        cut_at,
    };
    let mut outcomes = Vec::new();
    for run in 1..=runs {
        eprintln!("round chain: run {run} of {runs}, {peers} peers, cut at height {cut_at} ...");
        match runtime.block_on(chain_failover::run(config)) {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{}", chain_failover::table(&outcomes));
    let mut failover: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.failover_ms.iter().copied())
        .collect();
    failover.sort_unstable();
    let mut normal: Vec<u64> = outcomes.iter().filter_map(|o| o.normal_ms_median).collect();
    normal.sort_unstable();
    if let (Some(f), Some(n)) = (
        failover.get(failover.len() / 2),
        normal.get(normal.len() / 2),
    ) {
        println!(
            "median decision time: {f} ms at the cut height (new coordinator), {n} ms at the others ({:.1}x)",
            *f as f64 / (*n).max(1) as f64
        );
    }
    let written = write_json(json, &outcomes);
    let failed = outcomes
        .iter()
        .any(|o| o.cut.is_none() || o.consensus_round.is_none() || !o.survivors_finished_identical);
    if failed {
        eprintln!(
            "error: a run cut nobody, did not decide the cut height, or its survivors did not finish on one model"
        );
        return ExitCode::FAILURE;
    }
    written
}

/// The two-thread async runtime the in-process scenarios run on (None, with the error printed,
/// when it cannot start).
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| eprintln!("error: cannot start the async runtime: {e}"))
        .ok()
}
