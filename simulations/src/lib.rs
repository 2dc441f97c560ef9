//! The local multi-node harness: starts N real `loom-peer` processes on loopback, waits for the
//! mesh to form and measures it. Scenarios return serialisable reports; `loom-sim` prints them
//! and writes JSON.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

pub mod blocks;
pub mod byzantine;
pub mod chain_failover;
pub mod chaos;
pub mod ledger;

use loom_node::localmesh::{LocalMesh, MeshError, MeshOptions};
use loom_protocols::quantile;
use serde::Serialize;

/// Why a scenario failed.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The mesh failed.
    #[error("{0}")]
    Mesh(#[from] MeshError),
    /// A control API call failed.
    #[error("{0}")]
    Client(#[from] loom_node::client::ClientError),
    /// Probes were not all delivered in time.
    #[error("only {delivered} of {expected} probe deliveries arrived within {secs} s")]
    Undelivered {
        /// Deliveries seen.
        delivered: usize,
        /// Deliveries expected.
        expected: usize,
        /// Wait.
        secs: u64,
    },
    /// /proc could not be read.
    #[error("reading /proc: {0}")]
    Proc(std::io::Error),
    /// The ledger scenario failed.
    #[error("ledger: {0}")]
    Ledger(String),
}

/// The `loom-peer` binary next to the running executable, or `LOOM_PEER_BIN`.
pub fn default_peer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LOOM_PEER_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            // target/<profile>/loom-sim or target/<profile>/deps/<test>
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(|d| d.join("loom-peer"))
                .find(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("loom-peer"))
}

/// Options of the mesh scenario.
#[derive(Debug, Clone)]
pub struct MeshScenario {
    /// Peers.
    pub peers: usize,
    /// Probes each peer publishes.
    pub probes_per_peer: usize,
    /// Pause after each probe (probes go out one at a time, round-robin over the peers).
    pub probe_interval: Duration,
    /// Formation timeout.
    pub timeout: Duration,
    /// The binary.
    pub bin: PathBuf,
}

/// What the mesh scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct MeshReport {
    /// Peers started.
    pub peers: usize,
    /// Launch to full live views, in ms.
    pub formation_ms: u64,
    /// Probe deliveries recorded.
    pub probe_deliveries: usize,
    /// Deliveries expected (probes × (peers − 1)).
    pub probe_deliveries_expected: usize,
    /// Gossip propagation latency, median, in ms.
    pub propagation_ms_p50: f64,
    /// 99th percentile, in ms.
    pub propagation_ms_p99: f64,
    /// Maximum, in ms.
    pub propagation_ms_max: f64,
}

/// Starts the mesh, waits for formation, publishes probes and gathers their latencies.
pub fn run_mesh(scenario: &MeshScenario) -> Result<MeshReport, ScenarioError> {
    let root = std::env::temp_dir().join(format!(
        "loom-sim-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let mut mesh = LocalMesh::start(&MeshOptions::run(
        scenario.peers,
        scenario.bin.clone(),
        root,
    ))?;
    let formation = mesh.wait_formed(scenario.timeout)?;
    let clients = (0..scenario.peers)
        .map(|i| mesh.client(i, Duration::from_secs(5)))
        .collect::<Result<Vec<_>, _>>()?;
    // One probe at a time, round-robin over the peers: this measures propagation, not the
    // queueing of a burst of simultaneous publications on a small machine.
    for _ in 0..scenario.probes_per_peer {
        for c in &clients {
            c.send_probe()?;
            std::thread::sleep(scenario.probe_interval);
        }
    }
    let expected = scenario.probes_per_peer * scenario.peers * (scenario.peers - 1);
    let wait = Duration::from_secs(10);
    let deadline = Instant::now() + wait;
    let latencies = loop {
        let mut all = Vec::with_capacity(expected);
        for c in &clients {
            all.extend(c.probes()?.into_iter().map(|p| p.latency_us));
        }
        if all.len() >= expected {
            break all;
        }
        if Instant::now() >= deadline {
            return Err(ScenarioError::Undelivered {
                delivered: all.len(),
                expected,
                secs: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut l = latencies.clone();
    let ms = |us: Option<u64>| us.unwrap_or(0) as f64 / 1e3;
    Ok(MeshReport {
        peers: scenario.peers,
        formation_ms: formation.as_millis() as u64,
        probe_deliveries: latencies.len(),
        probe_deliveries_expected: expected,
        propagation_ms_p50: ms(quantile(&mut l, 0.5)),
        propagation_ms_p99: ms(quantile(&mut l, 0.99)),
        propagation_ms_max: ms(quantile(&mut l, 1.0)),
    })
}

/// What the idle scenario measured.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Seconds measured.
    pub secs: u64,
    /// Resident memory at the end, MiB.
    pub rss_mib_end: f64,
    /// Peak resident memory (VmHWM), MiB.
    pub rss_mib_peak: f64,
    /// CPU time used over the window divided by the window, in % of one core.
    pub cpu_percent_of_one_core: f64,
}

fn proc_cpu_ticks(pid: u32) -> Result<u64, ScenarioError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(ScenarioError::Proc)?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(utime + stime)
}

fn proc_status_kib(pid: u32, key: &str) -> Result<u64, ScenarioError> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(ScenarioError::Proc)?;
    Ok(status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Starts two peers (one to be connected to), lets them settle, then measures one peer's CPU and
/// memory over `secs` seconds of idling (heartbeats, pings, no job).
pub fn run_idle(bin: PathBuf, secs: u64) -> Result<IdleReport, ScenarioError> {
    let root = std::env::temp_dir().join(format!("loom-idle-{}", std::process::id()));
    let mut mesh = LocalMesh::start(&MeshOptions {
        heartbeat_interval: "1s".into(),
        ..MeshOptions::run(2, bin, root)
    })?;
    mesh.wait_formed(Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(2));
    let pid = mesh.peers[1].pid();
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let start_ticks = proc_cpu_ticks(pid)?;
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let used = (proc_cpu_ticks(pid)? - start_ticks) as f64 / ticks_per_sec;
    let wall = start.elapsed().as_secs_f64();
    Ok(IdleReport {
        secs,
        rss_mib_end: proc_status_kib(pid, "VmRSS:")? as f64 / 1024.0,
        rss_mib_peak: proc_status_kib(pid, "VmHWM:")? as f64 / 1024.0,
        cpu_percent_of_one_core: 100.0 * used / wall,
    })
}
