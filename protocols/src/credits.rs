//! Credit accounting: balances, escrow and reputation as a deterministic function of the ledger.
//!
//! Every replica folds the same finalized blocks through [`CreditState::apply_block`] and gets the
//! same numbers. A block whose entries cannot all be applied (spending more than a balance, paying
//! more than a job's escrow, a duplicate job, a second result for a round) is refused whole and leaves the state unchanged.
//! Credits are conserved: everything minted is either in a balance or in a job's escrow, which
//! [`CreditState::check_conservation`] verifies.
//!
//! Rules: a job's submitter moves its escrow out of its balance; accepted contributors are paid
//! from that escrow and gain reputation; a rejected contributor is slashed (up to
//! [`SLASH_CREDITS`], moved into the job's escrow) and loses reputation; a verifier is paid its fee
//! from the escrow and gains reputation.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    PeerKey,
    ledger::{Block, Credits, Entry, JobId},
};

/// Credits taken from a contributor whose contribution was rejected.
pub const SLASH_CREDITS: Credits = 10;
/// Reputation gained per accepted contribution or verdict.
pub const REPUTATION_ACCEPTED: i64 = 1;
/// Reputation lost per rejected contribution.
pub const REPUTATION_REJECTED: i64 = -5;

/// Why a block's entries could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CreditError {
    /// A balance is too small.
    #[error("entry {index}: balance {balance} is less than {needed}")]
    Insufficient {
        /// Entry position.
        index: usize,
        /// Balance.
        balance: Credits,
        /// Needed.
        needed: Credits,
    },
    /// A job's escrow is too small.
    #[error("entry {index}: escrow {escrow} is less than {needed}")]
    EscrowShort {
        /// Entry position.
        index: usize,
        /// Escrow left.
        escrow: Credits,
        /// Needed.
        needed: Credits,
    },
    /// The job is unknown.
    #[error("entry {index}: unknown job")]
    UnknownJob {
        /// Entry position.
        index: usize,
    },
    /// The job was already submitted.
    #[error("entry {index}: job already submitted")]
    DuplicateJob {
        /// Entry position.
        index: usize,
    },
    /// Only a job's submitter may close it.
    #[error("entry {index}: only the job's submitter may close it")]
    NotSubmitter {
        /// Entry position.
        index: usize,
    },
    /// The job is closed: nothing more is paid from its escrow.
    #[error("entry {index}: the job is closed")]
    JobClosed {
        /// Entry position.
        index: usize,
    },
    /// The round's result is already on the ledger.
    #[error("entry {index}: round {round} already has a result")]
    DuplicateRound {
        /// Entry position.
        index: usize,
        /// The round.
        round: u64,
    },
    /// An amount overflowed.
    #[error("entry {index}: amount overflow")]
    Overflow {
        /// Entry position.
        index: usize,
    },
}

/// The accounting state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CreditState {
    balances: BTreeMap<PeerKey, Credits>,
    escrow: BTreeMap<JobId, Credits>,
    /// Who submitted each job (the one who may close it).
    submitters: BTreeMap<JobId, PeerKey>,
    /// Jobs closed by their submitter.
    closed: BTreeSet<JobId>,
    reputation: BTreeMap<PeerKey, i64>,
    banned_until_unix_ms: BTreeMap<PeerKey, u64>,
    /// (job, round) pairs whose result is recorded.
    rounds: BTreeSet<(JobId, u64)>,
    minted: u128,
}

impl CreditState {
    /// A peer's balance.
    pub fn balance(&self, peer: &PeerKey) -> Credits {
        self.balances.get(peer).copied().unwrap_or(0)
    }

    /// A job's remaining escrow.
    pub fn escrow(&self, job: &JobId) -> Credits {
        self.escrow.get(job).copied().unwrap_or(0)
    }

    /// A peer's reputation.
    pub fn reputation(&self, peer: &PeerKey) -> i64 {
        self.reputation.get(peer).copied().unwrap_or(0)
    }

    /// When a peer's ban ends (0: for good), if banned.
    pub fn banned_until(&self, peer: &PeerKey) -> Option<u64> {
        self.banned_until_unix_ms.get(peer).copied()
    }

    /// Whether `job` was closed by its submitter.
    pub fn job_closed(&self, job: &JobId) -> bool {
        self.closed.contains(job)
    }

    /// Whether round `round` of `job` has its result on the ledger.
    pub fn round_recorded(&self, job: &JobId, round: u64) -> bool {
        self.rounds.contains(&(*job, round))
    }

    /// Every ban ever recorded: (peer, end of the ban, 0 for good).
    pub fn bans(&self) -> impl Iterator<Item = (&PeerKey, u64)> {
        self.banned_until_unix_ms
            .iter()
            .map(|(peer, until)| (peer, *until))
    }

    /// Total credits ever minted.
    pub fn minted(&self) -> u128 {
        self.minted
    }

    /// Whether minted = balances + escrow.
    pub fn check_conservation(&self) -> bool {
        let held: u128 = self.balances.values().map(|&b| u128::from(b)).sum::<u128>()
            + self.escrow.values().map(|&e| u128::from(e)).sum::<u128>();
        held == self.minted
    }

    /// Applies every entry of a (verified, finalized) block, or none of them.
    pub fn apply_block(&mut self, block: &Block) -> Result<(), CreditError> {
        let mut next = self.clone();
        for (index, signed) in block.entries.iter().enumerate() {
            next.apply_entry(index, &signed.author, &signed.entry)?;
        }
        *self = next;
        Ok(())
    }

    /// Applies one entry of a block that is already known to apply (it passed
    /// [`Self::apply_block`] on another replica's state equal to this one, or it is finalized).
    /// Used to attribute a block's effects entry by entry; on error the state may be partly
    /// changed, so callers fold whole blocks with [`Self::apply_block`] first.
    pub fn apply_finalized_entry(
        &mut self,
        author: &PeerKey,
        entry: &Entry,
    ) -> Result<(), CreditError> {
        self.apply_entry(0, author, entry)
    }

    fn debit(&mut self, index: usize, peer: &PeerKey, amount: Credits) -> Result<(), CreditError> {
        let balance = self.balance(peer);
        if balance < amount {
            return Err(CreditError::Insufficient {
                index,
                balance,
                needed: amount,
            });
        }
        self.balances.insert(*peer, balance - amount);
        Ok(())
    }

    fn credit(&mut self, index: usize, peer: &PeerKey, amount: Credits) -> Result<(), CreditError> {
        let balance = self
            .balance(peer)
            .checked_add(amount)
            .ok_or(CreditError::Overflow { index })?;
        self.balances.insert(*peer, balance);
        Ok(())
    }

    fn take_escrow(
        &mut self,
        index: usize,
        job: &JobId,
        amount: Credits,
    ) -> Result<(), CreditError> {
        let escrow = *self
            .escrow
            .get(job)
            .ok_or(CreditError::UnknownJob { index })?;
        if escrow < amount {
            return Err(CreditError::EscrowShort {
                index,
                escrow,
                needed: amount,
            });
        }
        self.escrow.insert(*job, escrow - amount);
        Ok(())
    }

    fn add_reputation(&mut self, peer: &PeerKey, delta: i64) {
        let r = self.reputation.entry(*peer).or_insert(0);
        *r = r.saturating_add(delta);
    }

    fn apply_entry(
        &mut self,
        index: usize,
        author: &PeerKey,
        entry: &Entry,
    ) -> Result<(), CreditError> {
        match entry {
            Entry::Mint { to, amount } => {
                self.credit(index, to, *amount)?;
                self.minted += u128::from(*amount);
            }
            Entry::Enroll { peer } => {
                self.reputation.entry(*peer).or_insert(0);
            }
            Entry::JobSubmitted { job, escrow, .. } => {
                if self.escrow.contains_key(job) {
                    return Err(CreditError::DuplicateJob { index });
                }
                self.debit(index, author, *escrow)?;
                self.escrow.insert(*job, *escrow);
                self.submitters.insert(*job, *author);
            }
            Entry::JobClosed { job } => {
                let submitter = self
                    .submitters
                    .get(job)
                    .ok_or(CreditError::UnknownJob { index })?;
                if submitter != author {
                    return Err(CreditError::NotSubmitter { index });
                }
                if self.closed.contains(job) {
                    return Err(CreditError::JobClosed { index });
                }
                let refund = self.escrow(job);
                self.escrow.insert(*job, 0);
                self.credit(index, author, refund)?;
                self.closed.insert(*job);
            }
            Entry::RoundResult {
                job,
                round,
                accepted,
                rejected,
                ..
            } => {
                if self.closed.contains(job) {
                    return Err(CreditError::JobClosed { index });
                }
                if self.round_recorded(job, *round) {
                    return Err(CreditError::DuplicateRound {
                        index,
                        round: *round,
                    });
                }
                let total = accepted
                    .iter()
                    .try_fold(0u64, |sum, (_, amount)| sum.checked_add(*amount))
                    .ok_or(CreditError::Overflow { index })?;
                self.take_escrow(index, job, total)?;
                for (peer, amount) in accepted {
                    self.credit(index, peer, *amount)?;
                    self.add_reputation(peer, REPUTATION_ACCEPTED);
                }
                for peer in rejected {
                    let slashed = self.balance(peer).min(SLASH_CREDITS);
                    self.debit(index, peer, slashed)?;
                    let escrow = self.escrow(job);
                    self.escrow.insert(*job, escrow + slashed);
                    self.add_reputation(peer, REPUTATION_REJECTED);
                }
                self.rounds.insert((*job, *round));
            }
            Entry::Verdict { job, fee, .. } => {
                if self.closed.contains(job) {
                    return Err(CreditError::JobClosed { index });
                }
                self.take_escrow(index, job, *fee)?;
                self.credit(index, author, *fee)?;
                self.add_reputation(author, REPUTATION_ACCEPTED);
            }
            Entry::Transfer { to, amount } => {
                self.debit(index, author, *amount)?;
                self.credit(index, to, *amount)?;
            }
            Entry::CheckpointPublished { .. } | Entry::Genesis { .. } => {}
            Entry::Ban {
                peer,
                until_unix_ms,
                ..
            } => {
                self.banned_until_unix_ms.insert(*peer, *until_unix_ms);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::{block, pk, signed};
    use proptest::prelude::*;

    const JOB: JobId = [9; 32];

    fn genesis() -> Block {
        block(
            0,
            None,
            vec![
                signed(
                    1,
                    Entry::Mint {
                        to: pk(1),
                        amount: 1_000,
                    },
                ),
                signed(
                    1,
                    Entry::Mint {
                        to: pk(2),
                        amount: 50,
                    },
                ),
                signed(
                    1,
                    Entry::Mint {
                        to: pk(3),
                        amount: 5,
                    },
                ),
            ],
        )
    }

    #[test]
    fn a_job_pays_contributors_and_verifiers_from_escrow_and_slashes_the_rejected() {
        let g = genesis();
        let b1 = block(
            1,
            Some(&g),
            vec![signed(
                1,
                Entry::JobSubmitted {
                    job: JOB,
                    escrow: 300,
                    manifest: String::new(),
                },
            )],
        );
        let b2 = block(
            2,
            Some(&b1),
            vec![
                signed(
                    4,
                    Entry::Verdict {
                        job: JOB,
                        round: 1,
                        subject: pk(3),
                        accepted: false,
                        reason: "sign flipped".into(),
                        fee: 2,
                    },
                ),
                signed(
                    4,
                    Entry::RoundResult {
                        job: JOB,
                        round: 1,
                        model_hash: [0; 32],
                        accepted: vec![(pk(2), 100)],
                        rejected: vec![pk(3)],
                    },
                ),
            ],
        );
        let mut state = CreditState::default();
        for b in [&g, &b1, &b2] {
            state.apply_block(b).expect("applies");
            assert!(state.check_conservation());
        }
        assert_eq!(state.balance(&pk(1)), 700);
        assert_eq!(state.balance(&pk(2)), 150);
        assert_eq!(state.balance(&pk(3)), 0, "slashed to zero (had 5)");
        assert_eq!(state.balance(&pk(4)), 2, "verifier fee");
        assert_eq!(state.escrow(&JOB), 300 - 2 - 100 + 5);
        assert_eq!(state.reputation(&pk(2)), REPUTATION_ACCEPTED);
        assert_eq!(state.reputation(&pk(3)), REPUTATION_REJECTED);
        assert_eq!(state.minted(), 1_055);
    }

    /// The submitter closes its job: the escrow left goes back to it, nobody else may close it,
    /// and nothing more is paid from the job.
    #[test]
    fn closing_a_job_returns_its_escrow_to_the_submitter_and_ends_its_payments() {
        let g = genesis();
        let b1 = block(
            1,
            Some(&g),
            vec![
                signed(
                    1,
                    Entry::JobSubmitted {
                        job: JOB,
                        escrow: 300,
                        manifest: String::new(),
                    },
                ),
                signed(
                    4,
                    Entry::RoundResult {
                        job: JOB,
                        round: 1,
                        model_hash: [0; 32],
                        accepted: vec![(pk(2), 100)],
                        rejected: Vec::new(),
                    },
                ),
            ],
        );
        let mut state = CreditState::default();
        for b in [&g, &b1] {
            state.apply_block(b).expect("applies");
        }
        let close_by = |author: u8, height: u64| {
            block(
                height,
                Some(&b1),
                vec![signed(author, Entry::JobClosed { job: JOB })],
            )
        };
        assert_eq!(
            state.apply_block(&close_by(2, 2)),
            Err(CreditError::NotSubmitter { index: 0 })
        );
        let unknown = block(
            2,
            Some(&b1),
            vec![signed(1, Entry::JobClosed { job: [7; 32] })],
        );
        assert_eq!(
            state.apply_block(&unknown),
            Err(CreditError::UnknownJob { index: 0 })
        );
        let b2 = close_by(1, 2);
        state.apply_block(&b2).expect("the submitter closes");
        assert!(state.job_closed(&JOB));
        assert_eq!(state.escrow(&JOB), 0);
        assert_eq!(
            state.balance(&pk(1)),
            1_000 - 300 + 200,
            "the 200 left came back"
        );
        assert!(state.check_conservation());
        let after = |entry: Entry| block(3, Some(&b2), vec![signed(4, entry)]);
        assert_eq!(
            state.apply_block(&after(Entry::RoundResult {
                job: JOB,
                round: 2,
                model_hash: [0; 32],
                accepted: Vec::new(),
                rejected: Vec::new(),
            })),
            Err(CreditError::JobClosed { index: 0 })
        );
        assert_eq!(
            state.apply_block(&after(Entry::Verdict {
                job: JOB,
                round: 2,
                subject: pk(2),
                accepted: true,
                reason: String::new(),
                fee: 0,
            })),
            Err(CreditError::JobClosed { index: 0 })
        );
        assert_eq!(
            state.apply_block(&block(
                3,
                Some(&b2),
                vec![signed(1, Entry::JobClosed { job: JOB })]
            )),
            Err(CreditError::JobClosed { index: 0 })
        );
    }

    #[test]
    fn a_block_that_overspends_is_refused_whole() {
        let g = genesis();
        let mut state = CreditState::default();
        state.apply_block(&g).expect("genesis");
        let before = state.clone();
        let bad = block(
            1,
            Some(&g),
            vec![
                signed(
                    2,
                    Entry::Transfer {
                        to: pk(3),
                        amount: 10,
                    },
                ),
                signed(
                    3,
                    Entry::Transfer {
                        to: pk(2),
                        amount: 1_000,
                    },
                ),
            ],
        );
        assert_eq!(
            state.apply_block(&bad),
            Err(CreditError::Insufficient {
                index: 1,
                balance: 15,
                needed: 1_000
            })
        );
        assert_eq!(state, before, "nothing of the refused block was applied");
        let overpay = block(
            1,
            Some(&g),
            vec![
                signed(
                    1,
                    Entry::JobSubmitted {
                        job: JOB,
                        escrow: 10,
                        manifest: String::new(),
                    },
                ),
                signed(
                    1,
                    Entry::RoundResult {
                        job: JOB,
                        round: 0,
                        model_hash: [0; 32],
                        accepted: vec![(pk(2), 11)],
                        rejected: vec![],
                    },
                ),
            ],
        );
        assert!(matches!(
            state.apply_block(&overpay),
            Err(CreditError::EscrowShort { .. })
        ));
        assert_eq!(state, before);
    }

    fn round_result(round: u64, paid: Credits) -> Entry {
        Entry::RoundResult {
            job: JOB,
            round,
            model_hash: [round as u8; 32],
            accepted: vec![(pk(2), paid)],
            rejected: vec![],
        }
    }

    #[test]
    fn a_round_has_at_most_one_result_even_within_one_block() {
        let g = genesis();
        let b1 = block(
            1,
            Some(&g),
            vec![signed(
                1,
                Entry::JobSubmitted {
                    job: JOB,
                    escrow: 100,
                    manifest: String::new(),
                },
            )],
        );
        let mut state = CreditState::default();
        state.apply_block(&g).expect("genesis");
        state.apply_block(&b1).expect("job");
        assert!(!state.round_recorded(&JOB, 1));
        // Two coordinators' results for round 1 in one block: the block is refused whole.
        let both = block(
            2,
            Some(&b1),
            vec![
                signed(4, round_result(1, 10)),
                signed(5, round_result(1, 20)),
            ],
        );
        assert_eq!(
            state.apply_block(&both),
            Err(CreditError::DuplicateRound { index: 1, round: 1 })
        );
        let first = block(2, Some(&b1), vec![signed(4, round_result(1, 10))]);
        state.apply_block(&first).expect("first result");
        assert!(state.round_recorded(&JOB, 1));
        // A later result for the same round is refused; another round is not.
        let again = block(3, Some(&first), vec![signed(5, round_result(1, 20))]);
        assert_eq!(
            state.apply_block(&again),
            Err(CreditError::DuplicateRound { index: 0, round: 1 })
        );
        let next = block(3, Some(&first), vec![signed(5, round_result(2, 20))]);
        state.apply_block(&next).expect("round 2");
        assert_eq!(state.escrow(&JOB), 70);
        assert_eq!(state.balance(&pk(2)), 80);
        assert!(state.check_conservation());
    }

    fn arbitrary_entry() -> impl Strategy<Value = (u8, Entry)> {
        let peer = 1u8..6;
        let job = (0u8..3).prop_map(|j| [j; 32]);
        let amount = 0u64..400;
        prop_oneof![
            (peer.clone(), peer.clone(), amount.clone())
                .prop_map(|(a, to, amount)| (a, Entry::Transfer { to: pk(to), amount })),
            (peer.clone(), job.clone(), amount.clone()).prop_map(|(a, job, escrow)| (
                a,
                Entry::JobSubmitted {
                    job,
                    escrow,
                    manifest: String::new()
                }
            )),
            (
                peer.clone(),
                job.clone(),
                prop::collection::vec((peer.clone(), amount.clone()), 0..3),
                prop::collection::vec(peer.clone(), 0..2)
            )
                .prop_map(|(a, job, acc, rej)| (
                    a,
                    Entry::RoundResult {
                        job,
                        round: 0,
                        model_hash: [0; 32],
                        accepted: acc.into_iter().map(|(p, x)| (pk(p), x)).collect(),
                        rejected: rej.into_iter().map(pk).collect(),
                    }
                )),
            (peer.clone(), job, amount, peer).prop_map(|(a, job, fee, s)| (
                a,
                Entry::Verdict {
                    job,
                    round: 0,
                    subject: pk(s),
                    accepted: true,
                    reason: String::new(),
                    fee,
                }
            )),
        ]
    }

    proptest! {
        #[test]
        fn replicas_agree_and_credits_are_conserved_whatever_is_proposed(
            blocks in prop::collection::vec(prop::collection::vec(arbitrary_entry(), 1..5), 1..12),
        ) {
            let g = genesis();
            let (mut a, mut b) = (CreditState::default(), CreditState::default());
            a.apply_block(&g).expect("genesis");
            b.apply_block(&g).expect("genesis");
            let mut previous = g;
            for (height, entries) in blocks.into_iter().enumerate() {
                let entries = entries.into_iter().map(|(author, e)| signed(author, e)).collect();
                let next = block(height as u64 + 1, Some(&previous), entries);
                let ra = a.apply_block(&next);
                let rb = b.apply_block(&next);
                prop_assert_eq!(ra.is_ok(), rb.is_ok());
                prop_assert_eq!(&a, &b);
                prop_assert!(a.check_conservation());
                previous = next;
            }
        }
    }
}
