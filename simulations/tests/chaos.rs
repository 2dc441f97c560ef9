//! Seeded chaos runs of the ledger's consensus (partitions, loss, reordering, kills and restarts,
//! byzantine members): safety, liveness and credits hold on every seed, an equivocating proposer
//! never causes two decisions, and a killed coordinator is replaced within bounded virtual time.
//! A failing run prints its seed and the `loom-sim chaos` command that replays it.

use loom_simulations::chaos::{
    ByzantineMode, ChaosConfig, ChaosFailure, ChaosReport, FailureKind, run, summarize,
};

/// Runs `seeds` and fails the test with every failing seed's replay line.
fn run_all(
    seeds: std::ops::Range<u64>,
    config: impl Fn(u64) -> ChaosConfig,
) -> Vec<Result<ChaosReport, ChaosFailure>> {
    let outcomes: Vec<_> = seeds.clone().map(|seed| run(seed, &config(seed))).collect();
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} seeded runs failed:\n{}",
        failures.len(),
        seeds.end - seeds.start,
        failures.join("\n")
    );
    outcomes
}

#[test]
fn four_peers_with_one_byzantine_keep_safety_liveness_and_credits_over_140_seeds() {
    let outcomes = run_all(0..140, |_| ChaosConfig::new(4, 1));
    let summary = summarize(&outcomes);
    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    assert!(
        summary.equivocations > 0,
        "the byzantine member equivocated"
    );
    assert!(
        summary.coordinator_changes > 0,
        "coordinators were killed or cut off"
    );
}

#[test]
fn seven_peers_with_two_byzantine_keep_safety_liveness_and_credits_over_70_seeds() {
    let outcomes = run_all(10_000..10_070, |_| ChaosConfig::new(7, 2));
    let summary = summarize(&outcomes);
    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    assert!(
        summary.forged_sync_refused > 0,
        "forged catch-up answers were refused"
    );
}

#[test]
fn an_equivocating_proposer_never_causes_two_decisions() {
    let outcomes = run_all(20_000..20_030, |seed| ChaosConfig {
        byzantine_mode: ByzantineMode::Equivocate,
        ..if seed % 2 == 0 {
            ChaosConfig::new(4, 1)
        } else {
            ChaosConfig::new(7, 2)
        }
    });
    let equivocations: u64 = outcomes
        .iter()
        .filter_map(|o| o.as_ref().ok())
        .map(|r| r.equivocations)
        .sum();
    assert!(equivocations >= 30, "{equivocations} equivocated proposals");
}

#[test]
fn a_killed_coordinator_is_replaced_within_bounded_virtual_time() {
    // Honest peers on a timely network; each run kills the coordinator of the moment once.
    let config = ChaosConfig {
        loss_max: 0.0,
        partitions: 0,
        kills: 1,
        kill_coordinator: 1.0,
        ..ChaosConfig::new(4, 0)
    };
    let outcomes = run_all(30_000..30_020, |_| config.clone());
    let mut latencies = Vec::new();
    for report in outcomes.iter().filter_map(|o| o.as_ref().ok()) {
        assert_eq!(report.kills, 1, "seed {}", report.seed);
        assert_eq!(
            report.coordinator_change_ms.len(),
            1,
            "seed {}: one coordinator change measured",
            report.seed
        );
        latencies.extend_from_slice(&report.coordinator_change_ms);
    }
    // A dead proposer costs its round: the propose timeout, the nil votes, the next proposer's
    // round. With the simulation's timeouts that is well under 2 s of virtual time.
    let max = latencies.iter().copied().max().unwrap_or(0);
    assert!(
        max <= 2_000,
        "coordinator change took {max} ms: {latencies:?}"
    );
}

#[test]
fn a_run_is_a_function_of_its_seed() {
    let config = ChaosConfig::new(4, 1);
    assert_eq!(run(77, &config), run(77, &config));
}

#[test]
fn a_failure_names_its_seed_and_how_to_replay_it() {
    // Two byzantine members of four: more than Tendermint tolerates, refused up front.
    let failure = run(7, &ChaosConfig::new(4, 2)).expect_err("not a valid run");
    assert_eq!(failure.kind, FailureKind::Config);
    let text = failure.to_string();
    assert!(
        text.contains("replay with: loom-sim chaos --seed 7 --peers 4 --byzantine 2"),
        "{text}"
    );
}
