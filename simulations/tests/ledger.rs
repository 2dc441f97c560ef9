//! Five real `loom-peer` processes run the replicated ledger on loopback: the coordinator is
//! killed and another takes over, random peers are killed with SIGKILL and restarted while
//! credits move, and at the end every replica verifies from genesis with the same blocks and
//! balances. The longer run (50 kills) is `loom-sim ledger --kills 50`.
//!
//! It once stalled under load (gossip to some peers stopped while their connections stayed up);
//! the network's gossip watchdog now resets such connections (`docs/benchmarks.md`).

use std::time::Duration;

use loom_simulations::{
    default_peer_bin,
    ledger::{LedgerScenario, run_ledger},
};

#[test]
fn the_ledger_survives_coordinator_loss_and_random_kills() {
    let seed = std::env::var("LOOM_LEDGER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let report = run_ledger(&LedgerScenario {
        peers: 5,
        kills: 6,
        seed,
        block_interval: "200ms".into(),
        timeout: Duration::from_secs(120),
        bin: default_peer_bin(),
    })
    .expect("ledger scenario");
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    assert!(report.all_verified, "a replica does not verify: {report:?}");
    assert!(report.balances_identical, "balances differ: {report:?}");
    assert!(report.failover_heights.1 >= report.failover_heights.0);
    assert!(report.final_height > report.failover_heights.1);
}
