//! Block building cost: how long a replica takes to build one proposal from a pending pool of a
//! job committee's round votes, entry by entry with [`LedgerState::block_builder`] (each entry
//! checked once) against the baseline that re-checks the whole candidate block after every entry
//! it appends (what the ledger actor did before the builder: quadratic in the entries, every
//! signature verified again each time). Both build the same block; the report gives medians and
//! their ratio per committee size.

use std::time::Instant;

use ed25519_dalek::{Signer, SigningKey};
use loom_protocols::{
    PeerKey,
    ledger::{Block, Entry, JobTerms, MAX_JOB_CONTRIBUTORS, SignedEntry, accepted_digest},
    ledger_state::{LedgerState, make_genesis},
    quantile,
};
use serde::Serialize;

/// One committee size's timings.
#[derive(Debug, Clone, Serialize)]
pub struct BlockBuildLine {
    /// Committee members (each joins the job and votes once: `2 × members` pending entries).
    pub members: usize,
    /// Entries in the block built.
    pub entries: usize,
    /// Median time to build it entry by entry (each entry checked once), in microseconds.
    pub builder_us_p50: u64,
    /// Median time to build it re-checking the whole block after each entry, in microseconds.
    pub recheck_us_p50: u64,
    /// `recheck_us_p50 / builder_us_p50`.
    pub speedup: f64,
}

/// The report of `loom-sim blocks`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockBuildReport {
    /// Repetitions per size (the medians are over these).
    pub reps: usize,
    /// One line per committee size.
    pub lines: Vec<BlockBuildLine>,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BlockBuildError {
    /// A committee size outside `1..=MAX_JOB_CONTRIBUTORS`.
    #[error("committee size {0} is outside 1..={MAX_JOB_CONTRIBUTORS}")]
    Size(usize),
    /// The two ways built different blocks (a bug).
    #[error("{members} members: the two builds differ ({builder} against {recheck} entries)")]
    Differ {
        /// The committee size.
        members: usize,
        /// Entries the builder kept.
        builder: usize,
        /// Entries the baseline kept.
        recheck: usize,
    },
}

fn signing_key(index: usize) -> SigningKey {
    SigningKey::from_bytes(blake3::hash(&(index as u64).to_le_bytes()).as_bytes())
}

fn sign(key: &SigningKey, entry: Entry) -> SignedEntry {
    SignedEntry::sign(entry, key.verifying_key().to_bytes(), |m| {
        key.sign(m).to_bytes().to_vec()
    })
}

/// The ledger after a genesis enrolling `members` peers and a job, and the pending pool: every
/// member joining the job's committee, then voting on its first round.
fn scenario(members: usize) -> (LedgerState, Vec<SignedEntry>) {
    let keys: Vec<SigningKey> = (0..members).map(signing_key).collect();
    let peers: Vec<PeerKey> = keys.iter().map(|k| k.verifying_key().to_bytes()).collect();
    let authority = signing_key(usize::MAX);
    let (genesis, certificate) = make_genesis(
        &authority,
        "blocks",
        false,
        None,
        &peers,
        &[(peers[0], 1_000_000)],
        0,
    );
    let mut state =
        LedgerState::from_genesis(&genesis, &certificate).expect("a genesis of its own making");
    let job = [7; 32];
    let submit = sign(
        &keys[0],
        Entry::JobSubmitted {
            job,
            escrow: 1_000,
            manifest: String::new(),
            terms: JobTerms {
                rounds: 10,
                max_contributors: MAX_JOB_CONTRIBUTORS,
                per_contribution: 1,
                per_verdict: 0,
            },
        },
    );
    let mut builder = state.block_builder(peers[0], 1);
    builder.try_push(submit).expect("the job applies");
    let block = builder.finish();
    let signers: Vec<&SigningKey> = keys.iter().collect();
    let certificate = loom_protocols::ledger_state::certify(&block, &signers);
    state.apply(&block, &certificate).expect("the job's block");
    let digest = accepted_digest(&peers);
    let mut pool: Vec<SignedEntry> = keys
        .iter()
        .map(|k| sign(k, Entry::JobJoined { job }))
        .collect();
    pool.extend(keys.iter().map(|k| {
        sign(
            k,
            Entry::RoundVote {
                job,
                round: 1,
                model_hash: [1; 32],
                accepted_digest: digest,
                rejected: Vec::new(),
            },
        )
    }));
    (state, pool)
}

fn build_with_builder(state: &LedgerState, pool: &[SignedEntry]) -> Block {
    let mut builder = state.block_builder([0; 32], 2);
    for entry in pool {
        let _ = builder.try_push(entry.clone());
    }
    builder.finish()
}

fn build_rechecking(state: &LedgerState, pool: &[SignedEntry]) -> Block {
    let mut block = Block {
        height: state.next_height(),
        prev_hash: state.tip_hash(),
        proposer: [0; 32],
        timestamp_unix_ms: state.tip().timestamp_unix_ms.max(2),
        entries: Vec::new(),
    };
    for entry in pool {
        block.entries.push(entry.clone());
        if state.check_block(&block).is_err() {
            block.entries.pop();
        }
    }
    block
}

fn median_us(reps: usize, mut run: impl FnMut() -> Block) -> (u64, Block) {
    let mut times = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps.max(1) {
        let started = Instant::now();
        last = Some(run());
        times.push(started.elapsed().as_micros() as u64);
    }
    let median = quantile(&mut times, 0.5).unwrap_or(0);
    (median, last.expect("at least one repetition"))
}

/// Times both ways of building the block for each committee size.
pub fn run(sizes: &[usize], reps: usize) -> Result<BlockBuildReport, BlockBuildError> {
    let mut lines = Vec::new();
    for &members in sizes {
        if !(1..=MAX_JOB_CONTRIBUTORS as usize).contains(&members) {
            return Err(BlockBuildError::Size(members));
        }
        let (state, pool) = scenario(members);
        let (builder_us_p50, built) = median_us(reps, || build_with_builder(&state, &pool));
        let (recheck_us_p50, rechecked) = median_us(reps, || build_rechecking(&state, &pool));
        if built.entries != rechecked.entries {
            return Err(BlockBuildError::Differ {
                members,
                builder: built.entries.len(),
                recheck: rechecked.entries.len(),
            });
        }
        lines.push(BlockBuildLine {
            members,
            entries: built.entries.len(),
            builder_us_p50,
            recheck_us_p50,
            speedup: recheck_us_p50 as f64 / builder_us_p50.max(1) as f64,
        });
    }
    Ok(BlockBuildReport { reps, lines })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways build the same block, holding every join and every vote.
    #[test]
    fn both_ways_build_the_whole_pool_into_one_block() {
        let report = run(&[4], 1).expect("runs");
        assert_eq!(report.lines[0].entries, 8);
        assert!(matches!(run(&[0], 1), Err(BlockBuildError::Size(0))));
    }
}
