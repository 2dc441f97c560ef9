//! Credit accounting: balances, escrow and reputation as a deterministic function of the ledger.
//!
//! Every replica folds the same finalized blocks through [`CreditState::apply_block`] and gets the
//! same numbers. A block whose entries cannot all be applied (spending more than a balance, paying
//! more than a job's escrow, a duplicate job, a second result for a round, a result or verdict
//! outside its job's terms) is refused whole and leaves the state unchanged.
//! Credits are conserved: everything minted is either in a balance or in a job's escrow, which
//! [`CreditState::check_conservation`] verifies.
//!
//! Rules: a job's submitter moves its escrow out of its balance; accepted contributors are paid
//! from that escrow and gain reputation; a rejected contributor is slashed (up to
//! [`SLASH_CREDITS`], moved into the job's escrow) and loses reputation; a verifier is paid its fee
//! from the escrow and gains reputation.
//!
//! A job's terms ([`JobTerms`], on the ledger with the job) bound what its escrow pays: a round
//! result names a round of the job, at most `max_contributors` accepted and rejected peers, each
//! backed by its own signed commitment to the job and round, and pays each at most
//! `per_contribution`; a verdict, by a member of the job's committee, pays at most
//! `per_verdict`, once per verifier and subject of a
//! round, [`MAX_VERDICTS_PER_SUBJECT`] times per subject. So whoever records a round (the ledger
//! lets any committee member) can pay or slash only the round's own contributors, and no more
//! than the job would pay them.
//!
//! Which of them it pays and slashes is the job committee's to say. Peers join a job's committee
//! ([`Entry::JobJoined`], at most `max_contributors` members) and vote on each round they
//! applied ([`Entry::RoundVote`]: the model, the digest of the accepted set, the refused
//! contributors); a member's later vote on a round replaces its earlier one, so one vote per
//! member and round counts. A result is taken only when [`vote_quorum`] of
//! the committee (more than a third, so at least one honest member while fewer than a third
//! are byzantine) voted for its model hash and exact accepted set, and each peer it slashes was
//! refused in that many of those votes: a recorder can neither leave an aggregated contributor
//! unpaid nor slash one that no honest member refused. A round's votes are dropped once its
//! result is recorded (later votes on it are refused) or its job is closed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::{
    PeerKey,
    contribution::BlobHash,
    contribution::SignedCommitment,
    ledger::{
        Block, Credits, Entry, JobId, JobTerms, MAX_VERDICTS_PER_SUBJECT, accepted_digest,
        vote_quorum,
    },
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
    /// The entry breaks its job's terms, or its evidence does not back it.
    #[error("entry {index}: {what}")]
    OutsideTerms {
        /// Entry position.
        index: usize,
        /// What is wrong.
        what: &'static str,
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
    /// Each job's terms.
    terms: BTreeMap<JobId, JobTerms>,
    /// The (subject, verifier) pairs of the verdicts recorded per (job, round).
    verdicts: BTreeMap<(JobId, u64), BTreeSet<(PeerKey, PeerKey)>>,
    /// Each job's committee: the members whose round votes count.
    committees: BTreeMap<JobId, BTreeSet<PeerKey>>,
    /// The committee's votes on each (job, round) whose result is not recorded yet, by voter.
    votes: BTreeMap<(JobId, u64), BTreeMap<PeerKey, RoundVote>>,
    minted: u128,
}

/// Most votes of one member on unrecorded rounds of one job the state holds; a newer one drops
/// the member's vote on the oldest such round.
pub const MAX_PENDING_VOTES: usize = 64;

/// A committee member's vote on a round, as the ledger holds it until the round's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoundVote {
    /// The model the voter reached.
    pub model_hash: BlobHash,
    /// [`accepted_digest`] of the contributors it aggregated.
    pub accepted_digest: BlobHash,
    /// The contributors it refused.
    pub rejected: Vec<PeerKey>,
}

impl RoundVote {
    /// Whether `entry` is a [`Entry::RoundVote`] casting this vote.
    pub fn matches(&self, entry: &Entry) -> bool {
        matches!(entry, Entry::RoundVote { model_hash, accepted_digest, rejected, .. }
            if *model_hash == self.model_hash
                && *accepted_digest == self.accepted_digest
                && *rejected == self.rejected)
    }
}

/// Checks a round result against its job's terms and evidence: the round is one of the job's,
/// accepted and rejected peers are distinct, at most `max_contributors` each, paid at most
/// `per_contribution`, and each is backed by its own valid signed commitment to this job and
/// round.
fn check_round_result(
    terms: &JobTerms,
    job: &JobId,
    round: u64,
    accepted: &[(PeerKey, Credits)],
    rejected: &[PeerKey],
    evidence: &[SignedCommitment],
) -> Result<(), &'static str> {
    if round == 0 || round > terms.rounds {
        return Err("round result for a round outside the job's terms");
    }
    let limit = terms.max_contributors as usize;
    if accepted.len() > limit || rejected.len() > limit {
        return Err("round result with more contributors than the job's terms allow");
    }
    if accepted
        .iter()
        .any(|(_, amount)| *amount > terms.per_contribution)
    {
        return Err("round result pays more per contribution than the job's terms");
    }
    let peers: Vec<&PeerKey> = accepted
        .iter()
        .map(|(peer, _)| peer)
        .chain(rejected)
        .collect();
    if peers.iter().collect::<BTreeSet<_>>().len() != peers.len() {
        return Err("round result names a contributor twice");
    }
    if evidence.len() != peers.len() {
        return Err("round result without one signed commitment per contributor");
    }
    for (peer, signed) in peers.into_iter().zip(evidence) {
        let Ok(commitment) = signed.verify() else {
            return Err("round result evidence does not verify");
        };
        if commitment.author != *peer || commitment.job_id != *job || commitment.round != round {
            return Err("round result evidence is not the contributor's commitment to the round");
        }
    }
    Ok(())
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

    /// `job`'s terms, once it is on the ledger.
    pub fn terms(&self, job: &JobId) -> Option<&JobTerms> {
        self.terms.get(job)
    }

    /// The members of `job`'s committee.
    pub fn committee(&self, job: &JobId) -> impl Iterator<Item = &PeerKey> {
        self.committees.get(job).into_iter().flatten()
    }

    /// The votes on round `round` of `job` while its result is not recorded, by voter.
    pub fn round_votes(
        &self,
        job: &JobId,
        round: u64,
    ) -> impl Iterator<Item = (&PeerKey, &RoundVote)> {
        self.votes.get(&(*job, round)).into_iter().flatten()
    }

    /// What the committee's votes on round `round` of `job` let a result record for the model
    /// `model_hash` and the accepted set `accepted_digest`: `None` without [`vote_quorum`]
    /// matching votes, else the contributors at least that many of them refused (whom the result
    /// may slash).
    pub fn voted_result(
        &self,
        job: &JobId,
        round: u64,
        model_hash: &BlobHash,
        accepted_digest: &BlobHash,
    ) -> Option<BTreeSet<PeerKey>> {
        let quorum = vote_quorum(self.committees.get(job).map_or(0, BTreeSet::len));
        let matching: Vec<&RoundVote> = self
            .round_votes(job, round)
            .map(|(_, vote)| vote)
            .filter(|v| v.model_hash == *model_hash && v.accepted_digest == *accepted_digest)
            .collect();
        if matching.len() < quorum {
            return None;
        }
        let mut refusals: BTreeMap<PeerKey, usize> = BTreeMap::new();
        for peer in matching.iter().flat_map(|vote| &vote.rejected) {
            *refusals.entry(*peer).or_default() += 1;
        }
        Some(
            refusals
                .into_iter()
                .filter(|(_, count)| *count >= quorum)
                .map(|(peer, _)| peer)
                .collect(),
        )
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

    /// Applies entry `index` of a block being built on this state. On error the state may be
    /// partly changed: the caller folds the entries it kept again from a clean state.
    pub(crate) fn apply_entry_at(
        &mut self,
        index: usize,
        author: &PeerKey,
        entry: &Entry,
    ) -> Result<(), CreditError> {
        self.apply_entry(index, author, entry)
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

    /// Keeps at most [`MAX_PENDING_VOTES`] of `member`'s votes on unrecorded rounds of `job`,
    /// dropping its votes on the oldest rounds: a member voting on rounds far ahead cannot grow
    /// the state, and an honest member's votes on rounds that long unrecorded no longer matter.
    fn bound_pending_votes(&mut self, job: &JobId, member: &PeerKey) {
        let rounds: Vec<u64> = self
            .votes
            .range((*job, 0)..=(*job, u64::MAX))
            .filter(|(_, votes)| votes.contains_key(member))
            .map(|((_, round), _)| *round)
            .collect();
        for round in rounds
            .iter()
            .take(rounds.len().saturating_sub(MAX_PENDING_VOTES))
        {
            if let Some(votes) = self.votes.get_mut(&(*job, *round)) {
                votes.remove(member);
                if votes.is_empty() {
                    self.votes.remove(&(*job, *round));
                }
            }
        }
    }

    /// The terms of `job` while it is open (submitted, not closed).
    fn open_terms(&self, index: usize, job: &JobId) -> Result<&JobTerms, CreditError> {
        if self.closed.contains(job) {
            return Err(CreditError::JobClosed { index });
        }
        self.terms.get(job).ok_or(CreditError::UnknownJob { index })
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
            Entry::JobSubmitted {
                job, escrow, terms, ..
            } => {
                if self.escrow.contains_key(job) {
                    return Err(CreditError::DuplicateJob { index });
                }
                if !terms.is_valid() {
                    return Err(CreditError::OutsideTerms {
                        index,
                        what: "job terms outside the ledger's bounds",
                    });
                }
                self.debit(index, author, *escrow)?;
                self.escrow.insert(*job, *escrow);
                self.submitters.insert(*job, *author);
                self.terms.insert(*job, *terms);
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
                // No result of the job is taken any more: the votes of its unrecorded rounds go.
                self.votes.retain(|(voted_job, _), _| voted_job != job);
            }
            Entry::RoundResult {
                job,
                round,
                model_hash,
                accepted,
                rejected,
                evidence,
            } => {
                let terms = self.open_terms(index, job)?;
                check_round_result(terms, job, *round, accepted, rejected, evidence)
                    .map_err(|what| CreditError::OutsideTerms { index, what })?;
                if self.round_recorded(job, *round) {
                    return Err(CreditError::DuplicateRound {
                        index,
                        round: *round,
                    });
                }
                let digest = accepted_digest(accepted.iter().map(|(peer, _)| peer));
                let outside = |what| CreditError::OutsideTerms { index, what };
                let slashable =
                    self.voted_result(job, *round, model_hash, &digest)
                        .ok_or(outside(
                            "round result without a quorum of its job committee's votes",
                        ))?;
                if rejected.iter().any(|peer| !slashable.contains(peer)) {
                    return Err(outside(
                        "round result slashes a contributor too few committee votes refused",
                    ));
                }
                self.votes.remove(&(*job, *round));
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
            Entry::Verdict {
                job,
                round,
                subject,
                fee,
                ..
            } => {
                let terms = self.open_terms(index, job)?;
                let outside = |what| CreditError::OutsideTerms { index, what };
                if *round == 0 || *round > terms.rounds {
                    return Err(outside("verdict on a round outside the job's terms"));
                }
                if *fee > terms.per_verdict {
                    return Err(outside("verdict fee above the job's terms"));
                }
                if !self.committees.get(job).is_some_and(|m| m.contains(author)) {
                    return Err(outside("verdict by a peer outside the job's committee"));
                }
                let max_verdicts = 2 * terms.max_contributors as usize;
                let verdicts = self.verdicts.entry((*job, *round)).or_default();
                if verdicts.contains(&(*subject, *author)) {
                    return Err(outside(
                        "a second verdict by one verifier on one contribution",
                    ));
                }
                if verdicts.iter().filter(|(s, _)| s == subject).count() >= MAX_VERDICTS_PER_SUBJECT
                    || verdicts.len() >= max_verdicts
                {
                    return Err(outside(
                        "more verdicts on the round than the job's terms allow",
                    ));
                }
                verdicts.insert((*subject, *author));
                self.take_escrow(index, job, *fee)?;
                self.credit(index, author, *fee)?;
                self.add_reputation(author, REPUTATION_ACCEPTED);
            }
            Entry::JobJoined { job } => {
                let terms = self.open_terms(index, job)?;
                let limit = terms.max_contributors as usize;
                let members = self.committees.entry(*job).or_default();
                if members.contains(author) {
                    return Err(CreditError::OutsideTerms {
                        index,
                        what: "already a member of the job's committee",
                    });
                }
                if members.len() >= limit {
                    return Err(CreditError::OutsideTerms {
                        index,
                        what: "the job's committee is full",
                    });
                }
                members.insert(*author);
            }
            Entry::RoundVote {
                job,
                round,
                model_hash,
                accepted_digest,
                rejected,
            } => {
                let terms = *self.open_terms(index, job)?;
                let outside = |what| CreditError::OutsideTerms { index, what };
                if !self.committees.get(job).is_some_and(|m| m.contains(author)) {
                    return Err(outside("round vote by a peer outside the job's committee"));
                }
                if *round == 0 || *round > terms.rounds {
                    return Err(outside("round vote on a round outside the job's terms"));
                }
                if self.round_recorded(job, *round) {
                    return Err(CreditError::DuplicateRound {
                        index,
                        round: *round,
                    });
                }
                if rejected.len() > terms.max_contributors as usize
                    || rejected.iter().collect::<BTreeSet<_>>().len() != rejected.len()
                {
                    return Err(outside(
                        "round vote refusing more or other peers than a round has",
                    ));
                }
                // A member's later vote on a round replaces its earlier one (it rolled back
                // onto another branch of the round): one vote per member counts.
                self.votes.entry((*job, *round)).or_default().insert(
                    *author,
                    RoundVote {
                        model_hash: *model_hash,
                        accepted_digest: *accepted_digest,
                        rejected: rejected.clone(),
                    },
                );
                self.bound_pending_votes(job, author);
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
    use crate::ledger::SignedEntry;
    use crate::ledger::tests::{block, evidence, joins, pk, signed, terms, votes_for};
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
        let (mut state, b1) = with_job(terms());
        assert!(state.check_conservation());
        let result = Entry::RoundResult {
            job: JOB,
            round: 1,
            model_hash: [0; 32],
            accepted: vec![(pk(2), 100)],
            rejected: vec![pk(3)],
            evidence: evidence(JOB, 1, &[2, 3]),
        };
        let mut entries = joins(JOB, &[4]);
        entries.extend(votes_for(&result, &[4]));
        entries.push(signed(
            4,
            Entry::Verdict {
                job: JOB,
                round: 1,
                subject: pk(3),
                accepted: false,
                reason: "sign flipped".into(),
                fee: 2,
            },
        ));
        entries.push(signed(4, result));
        let b2 = block(2, Some(&b1), entries);
        state.apply_block(&b2).expect("applies");
        assert!(state.check_conservation());
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
        let result = Entry::RoundResult {
            job: JOB,
            round: 1,
            model_hash: [0; 32],
            accepted: vec![(pk(2), 100)],
            rejected: Vec::new(),
            evidence: evidence(JOB, 1, &[2]),
        };
        let mut entries = submitted_and_recorded(300, 4, result);
        // A vote on round 2, whose result never comes.
        entries.extend(votes_for(&round_result(2, 10), &[4]));
        let b1 = block(1, Some(&g), entries);
        let mut state = CreditState::default();
        for b in [&g, &b1] {
            state.apply_block(b).expect("applies");
        }
        assert_eq!(state.round_votes(&JOB, 2).count(), 1);
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
        assert_eq!(
            state.round_votes(&JOB, 2).count(),
            0,
            "a closed job's votes go"
        );
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
                evidence: Vec::new(),
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
        for entry in [
            Entry::JobJoined { job: JOB },
            Entry::RoundVote {
                job: JOB,
                round: 2,
                model_hash: [0; 32],
                accepted_digest: [0; 32],
                rejected: Vec::new(),
            },
        ] {
            assert_eq!(
                state.apply_block(&after(entry)),
                Err(CreditError::JobClosed { index: 0 })
            );
        }
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
        let result = Entry::RoundResult {
            job: JOB,
            round: 1,
            model_hash: [0; 32],
            accepted: vec![(pk(2), 11)],
            rejected: vec![],
            evidence: evidence(JOB, 1, &[2]),
        };
        let overpay = block(1, Some(&g), submitted_and_recorded(10, 1, result));
        assert!(matches!(
            state.apply_block(&overpay),
            Err(CreditError::EscrowShort { .. })
        ));
        assert_eq!(state, before);
    }

    /// `JOB` submitted by peer 1 with `escrow` under the default terms, then `recorder` joining
    /// the job's committee alone, voting for `result` and recording it.
    fn submitted_and_recorded(escrow: Credits, recorder: u8, result: Entry) -> Vec<SignedEntry> {
        let mut entries = vec![signed(
            1,
            Entry::JobSubmitted {
                job: JOB,
                escrow,
                manifest: String::new(),
                terms: terms(),
            },
        )];
        entries.extend(joins(JOB, &[recorder]));
        entries.extend(votes_for(&result, &[recorder]));
        entries.push(signed(recorder, result));
        entries
    }

    fn round_result(round: u64, paid: Credits) -> Entry {
        Entry::RoundResult {
            job: JOB,
            round,
            model_hash: [round as u8; 32],
            accepted: vec![(pk(2), paid)],
            rejected: vec![],
            evidence: evidence(JOB, round, &[2]),
        }
    }

    #[test]
    fn a_round_has_at_most_one_result_even_within_one_block() {
        let g = genesis();
        let mut entries = vec![signed(
            1,
            Entry::JobSubmitted {
                job: JOB,
                escrow: 100,
                manifest: String::new(),
                terms: terms(),
            },
        )];
        entries.extend(joins(JOB, &[4, 5]));
        let b1 = block(1, Some(&g), entries);
        let mut state = CreditState::default();
        state.apply_block(&g).expect("genesis");
        state.apply_block(&b1).expect("job");
        assert!(!state.round_recorded(&JOB, 1));
        // Two coordinators' results for round 1 in one block (both with the votes for their
        // model and accepted set): the block is refused whole.
        let vote = votes_for(&round_result(1, 10), &[4]);
        let both = block(
            2,
            Some(&b1),
            vec![
                vote[0].clone(),
                signed(4, round_result(1, 10)),
                signed(5, round_result(1, 20)),
            ],
        );
        assert_eq!(
            state.apply_block(&both),
            Err(CreditError::DuplicateRound { index: 2, round: 1 })
        );
        let first = block(
            2,
            Some(&b1),
            vec![vote[0].clone(), signed(4, round_result(1, 10))],
        );
        state.apply_block(&first).expect("first result");
        assert!(state.round_recorded(&JOB, 1));
        // A later result for the same round is refused; another round is not.
        let again = block(3, Some(&first), vec![signed(5, round_result(1, 20))]);
        assert_eq!(
            state.apply_block(&again),
            Err(CreditError::DuplicateRound { index: 0, round: 1 })
        );
        let mut entries = votes_for(&round_result(2, 20), &[5]);
        entries.push(signed(5, round_result(2, 20)));
        let next = block(3, Some(&first), entries);
        state.apply_block(&next).expect("round 2");
        assert_eq!(state.escrow(&JOB), 70);
        assert_eq!(state.balance(&pk(2)), 80);
        assert!(state.check_conservation());
    }

    /// A state with the genesis and `JOB` submitted by peer 1 with 300 in escrow under
    /// `terms`, and the job's block.
    fn with_job(terms: JobTerms) -> (CreditState, Block) {
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
                    terms,
                },
            )],
        );
        let mut state = CreditState::default();
        state.apply_block(&g).expect("genesis");
        state.apply_block(&b1).expect("job");
        (state, b1)
    }

    fn outside(state: &mut CreditState, previous: &Block, author: u8, entry: Entry) -> String {
        let before = state.clone();
        let result = state.apply_block(&block(2, Some(previous), vec![signed(author, entry)]));
        assert_eq!(*state, before, "a refused entry changes nothing");
        match result {
            Err(CreditError::OutsideTerms { what, .. }) => what.to_owned(),
            other => panic!("expected a refusal for the job's terms, got {other:?}"),
        }
    }

    /// Whoever records a round can pay only the round's own contributors, each backed by its
    /// signed commitment to the job and round, and no more than the job's terms: a member
    /// recording a result that pays itself without having contributed is refused.
    #[test]
    fn a_round_result_pays_only_committed_contributors_within_the_job_terms() {
        let (mut state, b1) = with_job(JobTerms {
            rounds: 4,
            max_contributors: 2,
            per_contribution: 50,
            per_verdict: 5,
        });
        let result = |round: u64, accepted: Vec<(u8, Credits)>, evidence| Entry::RoundResult {
            job: JOB,
            round,
            model_hash: [0; 32],
            accepted: accepted.into_iter().map(|(p, c)| (pk(p), c)).collect(),
            rejected: Vec::new(),
            evidence,
        };
        let cases = [
            (result(1, vec![(4, 50)], Vec::new()), "signed commitment"),
            (
                result(1, vec![(4, 50)], evidence(JOB, 2, &[4])),
                "contributor's commitment",
            ),
            (
                result(1, vec![(4, 50)], evidence([8; 32], 1, &[4])),
                "contributor's commitment",
            ),
            (
                result(1, vec![(4, 50)], evidence(JOB, 1, &[2])),
                "contributor's commitment",
            ),
            (
                result(1, vec![(4, 51)], evidence(JOB, 1, &[4])),
                "per contribution",
            ),
            (result(5, vec![(4, 50)], evidence(JOB, 5, &[4])), "outside"),
            (result(0, vec![(4, 50)], evidence(JOB, 0, &[4])), "outside"),
            (
                result(
                    1,
                    vec![(2, 1), (3, 1), (4, 1)],
                    evidence(JOB, 1, &[2, 3, 4]),
                ),
                "more contributors",
            ),
            (
                result(1, vec![(4, 1), (4, 1)], evidence(JOB, 1, &[4, 4])),
                "twice",
            ),
        ];
        for (entry, why) in cases {
            let what = outside(&mut state, &b1, 4, entry);
            assert!(what.contains(why), "{what} (expected {why})");
        }
        let mut tampered = evidence(JOB, 1, &[4]);
        tampered[0].signature[0] ^= 1;
        let what = outside(&mut state, &b1, 4, result(1, vec![(4, 50)], tampered));
        assert!(what.contains("does not verify"), "{what}");
        // Slashing needs the same evidence: nobody outside the round is slashed.
        let slash = Entry::RoundResult {
            job: JOB,
            round: 1,
            model_hash: [0; 32],
            accepted: vec![(pk(4), 50)],
            rejected: vec![pk(2)],
            evidence: evidence(JOB, 1, &[4]),
        };
        assert!(outside(&mut state, &b1, 4, slash).contains("signed commitment"));
        let paid = result(1, vec![(4, 50)], evidence(JOB, 1, &[4]));
        let mut entries = joins(JOB, &[5]);
        entries.extend(votes_for(&paid, &[5]));
        entries.push(signed(5, paid));
        let honest = block(2, Some(&b1), entries);
        state
            .apply_block(&honest)
            .expect("a result within the terms");
        assert_eq!(state.balance(&pk(4)), 50);
        assert_eq!(state.terms(&JOB).map(|t| t.rounds), Some(4));
    }

    /// A round result is taken only as the job's committee voted: a byzantine member cannot
    /// record a result leaving an aggregated contributor unpaid (or paying itself) on its own
    /// vote, nor slash a contributor fewer than a quorum of the voters refused; membership and
    /// votes are bounded, a member's new vote replaces its old one, and a round's votes end
    /// with its result.
    #[test]
    fn a_round_result_is_taken_only_as_its_committee_voted() {
        let (mut state, b1) = with_job(JobTerms {
            rounds: 4,
            max_contributors: 4,
            per_contribution: 50,
            per_verdict: 5,
        });
        let committee = block(2, Some(&b1), joins(JOB, &[2, 3, 4, 5]));
        state.apply_block(&committee).expect("four members join");
        assert_eq!(state.committee(&JOB).count(), 4);
        let join = Entry::JobJoined { job: JOB };
        assert!(outside(&mut state, &committee, 6, join.clone()).contains("full"));
        assert!(outside(&mut state, &committee, 2, join).contains("already"));
        let result = |accepted: &[u8], rejected: &[u8]| {
            let seeds: Vec<u8> = accepted.iter().chain(rejected).copied().collect();
            Entry::RoundResult {
                job: JOB,
                round: 1,
                model_hash: [1; 32],
                accepted: accepted.iter().map(|&p| (pk(p), 50)).collect(),
                rejected: rejected.iter().copied().map(pk).collect(),
                evidence: evidence(JOB, 1, &seeds),
            }
        };
        // Members 2, 3 and 4 aggregated 2, 3 and 4; only 2 refused 5. Member 5 votes for a
        // result that pays itself and 2, leaves 4 out and slashes 3.
        let mut votes = votes_for(&result(&[2, 3, 4], &[5]), &[2]);
        votes.extend(votes_for(&result(&[2, 3, 4], &[]), &[3, 4]));
        votes.extend(votes_for(&result(&[2, 5], &[3]), &[5]));
        let voted = block(3, Some(&committee), votes);
        state.apply_block(&voted).expect("votes");
        assert_eq!(state.round_votes(&JOB, 1).count(), 4);
        assert!(outside(&mut state, &voted, 5, result(&[2, 5], &[3])).contains("quorum"));
        assert!(outside(&mut state, &voted, 5, result(&[2, 3], &[])).contains("quorum"));
        assert!(outside(&mut state, &voted, 2, result(&[2, 3, 4], &[5])).contains("too few"));
        let vote = |round: u64, rejected: Vec<PeerKey>| Entry::RoundVote {
            job: JOB,
            round,
            model_hash: [1; 32],
            accepted_digest: [0; 32],
            rejected,
        };
        assert!(outside(&mut state, &voted, 6, vote(2, vec![])).contains("outside the job's"));
        assert!(outside(&mut state, &voted, 2, vote(5, vec![])).contains("outside the job's"));
        assert!(outside(&mut state, &voted, 2, vote(2, vec![pk(3), pk(3)])).contains("refusing"));
        // Member 3 votes again, now refusing 5 as well: its vote is replaced, and two matching
        // votes refuse 5.
        let revote = block(4, Some(&voted), votes_for(&result(&[2, 3, 4], &[5]), &[3]));
        state
            .apply_block(&revote)
            .expect("a member's vote replaced");
        assert_eq!(state.round_votes(&JOB, 1).count(), 4);
        let paid = block(5, Some(&revote), vec![signed(5, result(&[2, 3, 4], &[5]))]);
        state
            .apply_block(&paid)
            .expect("the result three members voted for, slashing whom two refused");
        assert_eq!(state.reputation(&pk(5)), REPUTATION_REJECTED);
        // Minted at genesis: 50 to peer 2, 5 to peer 3.
        assert_eq!(state.balance(&pk(2)), 100);
        assert_eq!(state.balance(&pk(3)), 55);
        assert_eq!(state.balance(&pk(4)), 50);
        assert_eq!(state.balance(&pk(5)), 0);
        assert_eq!(
            state.round_votes(&JOB, 1).count(),
            0,
            "a recorded round's votes end"
        );
        let late = block(6, Some(&paid), vec![signed(2, vote(1, vec![]))]);
        assert_eq!(
            state.apply_block(&late),
            Err(CreditError::DuplicateRound { index: 0, round: 1 })
        );
        assert!(state.check_conservation());
    }

    /// A member's votes on unrecorded rounds are bounded: voting on more rounds drops its votes
    /// on the oldest ones, not other members' votes.
    #[test]
    fn a_members_pending_votes_are_bounded() {
        let (mut state, b1) = with_job(JobTerms {
            rounds: 1_000,
            ..terms()
        });
        let vote = |round: u64| Entry::RoundVote {
            job: JOB,
            round,
            model_hash: [1; 32],
            accepted_digest: [2; 32],
            rejected: Vec::new(),
        };
        let mut entries = joins(JOB, &[2, 3]);
        entries.push(signed(3, vote(1)));
        entries.extend((1..=MAX_PENDING_VOTES as u64 + 10).map(|round| signed(2, vote(round))));
        state
            .apply_block(&block(2, Some(&b1), entries))
            .expect("votes");
        let voted_by = |state: &CreditState, member: u8, round: u64| {
            state
                .round_votes(&JOB, round)
                .any(|(voter, _)| *voter == pk(member))
        };
        let kept: Vec<u64> = (1..=MAX_PENDING_VOTES as u64 + 10)
            .filter(|round| voted_by(&state, 2, *round))
            .collect();
        assert_eq!(kept.len(), MAX_PENDING_VOTES);
        assert_eq!(kept.first(), Some(&11), "the oldest rounds' votes went");
        assert!(voted_by(&state, 3, 1), "another member's vote stays");
    }

    /// Verdicts pay at most the job's fee, once per verifier and contribution, and at most
    /// twice per contribution; terms outside the ledger's bounds are refused with the job.
    #[test]
    fn verdicts_are_bounded_by_the_job_terms() {
        let (mut state, b0) = with_job(JobTerms {
            rounds: 4,
            max_contributors: 3,
            per_contribution: 50,
            per_verdict: 5,
        });
        let verdict = |round: u64, subject: u8, fee: Credits| Entry::Verdict {
            job: JOB,
            round,
            subject: pk(subject),
            accepted: false,
            reason: "noise".into(),
            fee,
        };
        assert!(outside(&mut state, &b0, 4, verdict(1, 2, 5)).contains("committee"));
        let b1 = block(2, Some(&b0), joins(JOB, &[3, 4, 5]));
        state
            .apply_block(&b1)
            .expect("verifiers join the job's committee");
        assert!(outside(&mut state, &b1, 4, verdict(1, 2, 6)).contains("fee"));
        assert!(outside(&mut state, &b1, 4, verdict(9, 2, 5)).contains("outside"));
        let twice = block(
            2,
            Some(&b1),
            vec![signed(4, verdict(1, 2, 5)), signed(4, verdict(1, 2, 5))],
        );
        assert!(matches!(
            state.apply_block(&twice),
            Err(CreditError::OutsideTerms { index: 1, .. })
        ));
        let third = block(
            2,
            Some(&b1),
            vec![
                signed(4, verdict(1, 2, 5)),
                signed(5, verdict(1, 2, 5)),
                signed(3, verdict(1, 2, 5)),
            ],
        );
        assert!(matches!(
            state.apply_block(&third),
            Err(CreditError::OutsideTerms { index: 2, .. })
        ));
        let many = block(
            2,
            Some(&b1),
            (2..9)
                .map(|subject| signed(4, verdict(1, subject, 5)))
                .collect(),
        );
        assert!(matches!(
            state.apply_block(&many),
            Err(CreditError::OutsideTerms { index: 6, .. })
        ));
        let two = block(
            2,
            Some(&b1),
            vec![signed(4, verdict(1, 2, 5)), signed(5, verdict(1, 2, 5))],
        );
        state
            .apply_block(&two)
            .expect("two verifiers on one contribution");
        assert_eq!(state.balance(&pk(4)), 5);
        let zero_rounds = Entry::JobSubmitted {
            job: [8; 32],
            escrow: 1,
            manifest: String::new(),
            terms: JobTerms {
                rounds: 0,
                ..terms()
            },
        };
        assert!(outside(&mut state, &two, 1, zero_rounds).contains("bounds"));
    }

    fn arbitrary_entry() -> impl Strategy<Value = (u8, Entry)> {
        let peer = 1u8..6;
        let job = (0u8..3).prop_map(|j| [j; 32]);
        let amount = 0u64..400;
        prop_oneof![
            (peer.clone(), peer.clone(), amount.clone())
                .prop_map(|(a, to, amount)| (a, Entry::Transfer { to: pk(to), amount })),
            (peer.clone(), job.clone()).prop_map(|(a, job)| (a, Entry::JobJoined { job })),
            (
                peer.clone(),
                job.clone(),
                prop::collection::vec(peer.clone(), 0..3)
            )
                .prop_map(|(a, job, accepted)| (
                    a,
                    Entry::RoundVote {
                        job,
                        round: 1,
                        model_hash: [0; 32],
                        accepted_digest: accepted_digest(
                            &accepted.iter().map(|p| pk(*p)).collect::<Vec<_>>()
                        ),
                        rejected: Vec::new(),
                    }
                )),
            (peer.clone(), job.clone(), amount.clone()).prop_map(|(a, job, escrow)| (
                a,
                Entry::JobSubmitted {
                    job,
                    escrow,
                    manifest: String::new(),
                    terms: terms(),
                }
            )),
            (
                peer.clone(),
                job.clone(),
                prop::collection::vec((peer.clone(), amount.clone()), 0..3),
                prop::collection::vec(peer.clone(), 0..2)
            )
                .prop_map(|(a, job, acc, rej)| {
                    let seeds: Vec<u8> = acc
                        .iter()
                        .map(|(p, _)| *p)
                        .chain(rej.iter().copied())
                        .collect();
                    (
                        a,
                        Entry::RoundResult {
                            job,
                            round: 1,
                            model_hash: [0; 32],
                            accepted: acc.into_iter().map(|(p, x)| (pk(p), x)).collect(),
                            rejected: rej.into_iter().map(pk).collect(),
                            evidence: evidence(job, 1, &seeds),
                        },
                    )
                }),
            (peer.clone(), job, amount, peer).prop_map(|(a, job, fee, s)| (
                a,
                Entry::Verdict {
                    job,
                    round: 1,
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
