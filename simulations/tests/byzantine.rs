//! The byzantine training runs of the acceptance list: with 1 of 4 and 2 of 7 peers sending
//! random noise, a sign flip, an update ×100, all zeros, a copy of another peer's update or a
//! forged signature, no byzantine update ever enters the model, a refusal with its reason is
//! recorded in the round itself (in at least 80 % of the misbehaving rounds; in the others the
//! commitment came after the round closed), no honest contribution is refused or slashed,
//! credits are conserved, the honest models stay identical, and the final validation loss is
//! within 5 % of the all-honest run's. Real libtorch learners and the real exchanger; the table is
//! printed (`loom-sim byzantine` writes it to `docs/byzantine.md`).
//!
//! Not in the default suite (`scripts/test-long.sh` runs them) until more runs back them. Before
//! the last fixes the stale replay with 1 of 4 failed 3 runs in 4, and the honest peers could
//! split onto two models for a whole run (2 of 7, copy). After them (replays and copies of late
//! commitments and of blobs seen only in closes refused, better-ranked closes judged by rank key)
//! the three tests passed 12 runs in 12, 4 of them beside a full build and test run. Round closes
//! decided by consensus would end the splits for good. The audits test below runs in the default
//! suite.

use loom_simulations::byzantine::{
    ByzantineConfig, ByzantineOutcome, Misbehaviour, run, table, verdict,
};

const ROUNDS: u64 = 10;

async fn shape(
    peers: usize,
    byzantine: usize,
    misbehaviours: &[Misbehaviour],
) -> Vec<ByzantineOutcome> {
    let config = |misbehaviour: Option<Misbehaviour>, byzantine: usize| ByzantineConfig {
        peers,
        byzantine,
        misbehaviour,
        rounds: ROUNDS,
        audit: 0.0,
        screen: true,
    };
    let mut outcomes = vec![run(config(None, 0)).await.expect("all-honest run")];
    for misbehaviour in misbehaviours {
        outcomes.push(
            run(config(Some(*misbehaviour), byzantine))
                .await
                .unwrap_or_else(|e| panic!("{byzantine} of {peers} {misbehaviour:?}: {e}")),
        );
    }
    outcomes
}

fn check(shapes: &[Vec<ByzantineOutcome>]) {
    println!("{}", table(shapes));
    let mut failures = Vec::new();
    for outcomes in shapes {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "not yet reliable (honest peers can split onto two models); run by scripts/test-long.sh"]
async fn every_misbehaviour_is_refused_in_its_round_and_training_still_converges() {
    let misbehaviours: Vec<Misbehaviour> = Misbehaviour::ALL
        .into_iter()
        .filter(|m| *m != Misbehaviour::Stale)
        .collect();
    let shapes = vec![
        shape(4, 1, &misbehaviours).await,
        shape(7, 2, &misbehaviours).await,
    ];
    check(&shapes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "not yet reliable (honest peers can split onto two models); run by scripts/test-long.sh"]
async fn a_stale_replay_is_refused_in_its_round() {
    let shapes = vec![
        shape(4, 1, &[Misbehaviour::Stale]).await,
        shape(7, 2, &[Misbehaviour::Stale]).await,
    ];
    check(&shapes);
}

/// Audits by recomputation (every contribution, in these runs) never fail an honest peer: each
/// honest contribution's cosine with the assigned verifier's recomputation stays above the
/// threshold, and the models stay identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audits_by_recomputation_pass_every_honest_contribution() {
    use loom_simulations::byzantine::AUDIT_MIN_COSINE;
    let outcome = run(ByzantineConfig {
        peers: 4,
        byzantine: 0,
        misbehaviour: None,
        rounds: 6,
        audit: 1.0,
        screen: true,
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
