//! The byzantine training runs of the acceptance list: with 1 of 4 and 2 of 7 peers sending
//! random noise, a sign flip, an update ×100, all zeros, a copy of another peer's update, a
//! stale replay or a forged signature, no byzantine update ever enters the model, a refusal with
//! its reason is recorded in the round itself (in at least 80 % of the misbehaving rounds; in the
//! others the commitment came after the round closed), no honest contribution is refused or
//! slashed, credits are conserved, the honest models stay identical, and the final validation
//! loss is within 5 % of the all-honest run's. Real libtorch learners and the real exchanger; the
//! table is printed (`loom-sim byzantine` writes it to `docs/byzantine.md`).

use loom_simulations::byzantine::{run_shape, table, verdict};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_misbehaviour_is_refused_in_its_round_and_training_still_converges() {
    let mut shapes = Vec::new();
    for (peers, byzantine) in [(4, 1), (7, 2)] {
        shapes.push(
            run_shape(peers, byzantine, 10, None, 0.0)
                .await
                .unwrap_or_else(|e| panic!("{byzantine} of {peers}: {e}")),
        );
    }
    println!("{}", table(&shapes));
    let mut failures = Vec::new();
    for outcomes in &shapes {
        let baseline = &outcomes[0];
        assert!(baseline.models_identical, "baseline models differ");
        for outcome in &outcomes[1..] {
            if let Err(why) = verdict(outcome, baseline) {
                failures.push(format!(
                    "{} of {} {:?}: {why}; rounds: {:?}",
                    outcome.config.byzantine,
                    outcome.config.peers,
                    outcome.config.misbehaviour,
                    outcome.rounds
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Audits by recomputation (every contribution, in these runs) never fail an honest peer: each
/// honest contribution's cosine with the assigned verifier's recomputation stays above the
/// threshold, and the models stay identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_by_recomputation_pass_every_honest_contribution() {
    use loom_simulations::byzantine::{AUDIT_MIN_COSINE, ByzantineConfig, run};
    let outcome = run(ByzantineConfig {
        peers: 4,
        byzantine: 0,
        misbehaviour: None,
        rounds: 6,
        audit: 1.0,
    })
    .await
    .expect("run");
    assert!(outcome.models_identical);
    assert!(
        outcome.audit_cosines_honest.len() >= 4 * 4,
        "audits made: {:?}",
        outcome.audit_cosines_honest
    );
    assert!(
        outcome
            .audit_cosines_honest
            .iter()
            .all(|c| f64::from(*c) >= AUDIT_MIN_COSINE),
        "{:?}",
        outcome.audit_cosines_honest
    );
    assert!(outcome.rounds.iter().all(|r| r.refused.is_empty()));
}
