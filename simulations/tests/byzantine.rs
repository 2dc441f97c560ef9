//! The byzantine training runs of the acceptance list: with 1 of 4 and 2 of 7 peers sending
//! random noise, a sign flip, an update ×100, all zeros, a copy of another peer's update or a
//! forged signature, no byzantine update ever enters the model, a refusal with its reason is
//! recorded in the round itself (in at least 80 % of the misbehaving rounds; in the others the
//! commitment came after the round closed), no honest contribution is refused or slashed,
//! credits are conserved, the honest models stay identical, and the final validation loss is
//! within 5 % of the all-honest run's. Real libtorch learners and the real exchanger; the table is
//! printed (`loom-sim byzantine` writes it to `docs/byzantine.md`).
//!
//! The three tests run one at a time (each trains several peers' real learners at once). Under
//! heavy load the reference peer can lag and resync past rounds, and miss the refusals of those
//! rounds: one run in three failed that way beside two busy loops with the tests running in
//! parallel, none with them one at a time (counts in `docs/benchmarks.md`). Before the
//! majority-branch rule and the refusal of late replays and copies, a peer that had closed a
//! round alone could also run on alone to the end, and a replay arriving after its round's close
//! went unrecorded; the first two tests were kept out of the default suite until then.

use loom_simulations::byzantine::{
    ByzantineConfig, ByzantineOutcome, Misbehaviour, run, table, verdict,
};

/// Held by each test for its whole run: the runs compete for the same cores otherwise.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
async fn every_misbehaviour_is_refused_in_its_round_and_training_still_converges() {
    let _one = ONE_AT_A_TIME.lock().await;
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
async fn a_stale_replay_is_refused_in_its_round() {
    let _one = ONE_AT_A_TIME.lock().await;
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
    let _one = ONE_AT_A_TIME.lock().await;
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
