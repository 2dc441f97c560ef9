//! The round chain's coordinator failover with real learners and the real exchanger: five honest
//! peers train; the coordinator of the round chain's height 6 is cut off the moment it proposes
//! (nothing it sends goes out, nothing reaches it). The others elect the next coordinator by
//! their votes and decide the round, and the four survivors finish the job on one model. The
//! time it took is printed (`loom-sim round-chain` measures it over several runs; figures in
//! `docs/benchmarks.md`), not asserted: this machine is shared.

use loom_simulations::chain_failover::{FailoverConfig, run, table};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_as_it_proposes_is_replaced_and_training_goes_on() {
    let outcome = run(FailoverConfig {
        peers: 5,
        rounds: 10,
        cut_at: 6,
    })
    .await
    .expect("the survivors finish the job");
    println!("{}", table(std::slice::from_ref(&outcome)));
    let cut = outcome.cut.clone().expect("a coordinator was cut off");
    let height = outcome.cut_height.expect("the cut height was decided");
    assert!(height >= 6);
    let new = outcome
        .new_coordinator
        .clone()
        .expect("a new coordinator's proposal was decided");
    assert_ne!(new, cut, "another member coordinated");
    assert!(
        outcome.consensus_round.is_some_and(|r| r >= 1),
        "the cut coordinator's consensus round was skipped"
    );
    assert!(
        !outcome.failover_ms.is_empty(),
        "the survivors learned the decision"
    );
    assert!(outcome.survivors_finished_identical);
}
