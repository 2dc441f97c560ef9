//! `loom-sim`: runs a harness scenario, prints a report and writes it as JSON.
//!
//!   loom-sim mesh --peers 20 --probes-per-peer 10 --json target/sim-mesh.json
//!   loom-sim idle --secs 60 --json target/sim-idle.json

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use loom_simulations::{MeshScenario, default_peer_bin, run_idle, run_mesh};

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
    /// Resident memory and CPU of an idle peer.
    Idle {
        /// Seconds to measure.
        #[arg(long, default_value_t = 60)]
        secs: u64,
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
