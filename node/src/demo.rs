//! `loom-peer demo`: a local mesh on loopback that shows peers finding each other.
//!
//! Starts N `loom-peer` processes (this same binary), waits until every peer sees every other in
//! its live view, prints who is connected to whom and how, measures gossip propagation with a few
//! probes, then stops the peers and removes their data.

use std::time::Duration;

use anyhow::Context as _;
use loom_protocols::quantile;

use crate::{
    cli::DemoArgs,
    localmesh::{LocalMesh, MeshOptions},
};

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let bin = std::env::current_exe().context("cannot locate the loom-peer binary")?;
    let root = std::env::temp_dir().join(format!("loom-demo-{}", std::process::id()));
    let n = args.peers as usize;
    println!(
        "Starting {n} loom-peer processes on loopback (data in {})",
        root.display()
    );
    let mut mesh = LocalMesh::start(&MeshOptions {
        peers: n,
        bin,
        root,
        heartbeat_interval: "500ms".into(),
        log: "warn".into(),
        extra_args: Vec::new(),
    })?;
    for (i, p) in mesh.peers.iter().enumerate() {
        println!("  peer {i}: {}  {}", p.peer_id, p.addr);
    }
    let formed = mesh.wait_formed(Duration::from_secs(60))?;
    println!(
        "\nMesh formed in {:.2} s: every peer sees the other {} in its live view.\n",
        formed.as_secs_f64(),
        n - 1
    );
    let clients: Vec<_> = (0..n)
        .map(|i| mesh.client(i, Duration::from_secs(5)))
        .collect::<Result<_, _>>()?;
    println!(
        "{:<6} {:<14} {:>6} {:>10} {:>10}",
        "peer", "id", "alive", "connected", "rtt_ms"
    );
    for (i, c) in clients.iter().enumerate() {
        let r = c.status()?;
        let rtts: Vec<f64> = r.network.peers.iter().filter_map(|p| p.rtt_ms).collect();
        let rtt = if rtts.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.2}", rtts.iter().sum::<f64>() / rtts.len() as f64)
        };
        let id = r.network.peer_id;
        println!(
            "{:<6} {:<14} {:>6} {:>10} {:>10}",
            i,
            format!("..{}", &id[id.len().saturating_sub(12)..]),
            r.members.len(),
            r.network.peers.len(),
            rtt
        );
    }
    // Gossip propagation: each peer publishes a few probes.
    for _ in 0..5 {
        for c in &clients {
            let _ = c.send_probe();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut latencies: Vec<u64> = Vec::new();
    for c in &clients {
        latencies.extend(c.probes()?.iter().map(|p| p.latency_us));
    }
    let delivered = latencies.len();
    let expected = 5 * n * (n - 1);
    println!(
        "\nGossip: {delivered}/{expected} probe deliveries, propagation p50 {:.2} ms, p99 {:.2} ms",
        quantile(&mut latencies, 0.5).unwrap_or(0) as f64 / 1e3,
        quantile(&mut latencies, 0.99).unwrap_or(0) as f64 / 1e3
    );
    if args.linger_secs > 0 {
        println!(
            "\nKeeping the mesh up for {} s (Ctrl-C to stop)...",
            args.linger_secs
        );
        std::thread::sleep(Duration::from_secs(args.linger_secs));
    }
    println!("Stopping peers.");
    drop(mesh);
    Ok(())
}
