//! A small mesh of real `loom-peer` processes on loopback forms, and every probe reaches every
//! other peer through gossip.

use std::time::Duration;

use loom_simulations::{MeshScenario, default_peer_bin, run_mesh};

#[test]
fn five_peers_form_a_mesh_and_deliver_every_probe() {
    let report = run_mesh(&MeshScenario {
        peers: 5,
        probes_per_peer: 4,
        probe_interval: Duration::from_millis(20),
        timeout: Duration::from_secs(60),
        bin: default_peer_bin(),
    })
    .expect("mesh scenario");
    println!("{report:?}");
    assert_eq!(report.probe_deliveries, report.probe_deliveries_expected);
    assert!(report.propagation_ms_p50 <= report.propagation_ms_p99);
}
