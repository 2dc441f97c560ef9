//! The state every replica folds out of the finalized chain: the tip, the ledger's authority and
//! enrollment rule, the committee that certifies the next height, and the credit balances.
//!
//! The fold is deterministic, so every replica holding the same blocks computes the same
//! committee and the same balances. Before a block counts it is checked in full: it chains to the
//! tip ([`crate::ledger::verify_block`]), its timestamp does not go back, every entry is authorised
//! (only the genesis author may enroll peers in a closed ledger or ban peers, round results and
//! verdicts come from committee members, a submitted job's manifest is at most
//! [`MAX_MANIFEST_BYTES`]), its credit effects apply (a round's result at most once, within its
//! job's terms and backed by its contributors' signed commitments)
//! ([`crate::credits::CreditState::apply_block`]), and its certificate is a quorum of the
//! committee that the previous block left ([`crate::ledger::verify_certificate`]). The genesis block is
//! certified by its own author alone; its first entry is [`Entry::Genesis`].

use std::collections::BTreeSet;

use ed25519_dalek::{Signer, SigningKey};

use crate::{
    PeerKey,
    contribution::BlobHash,
    credits::{CreditError, CreditState},
    ledger::{
        Block, Credits, Entry, LedgerError, MAX_ENTRIES_PER_BLOCK, MAX_MANIFEST_BYTES,
        QuorumCertificate, SignedEntry, precommit_bytes, verify_block, verify_certificate,
    },
};

/// Why a block was refused by the fold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerStateError {
    /// The chain or the certificate does not verify.
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    /// The block's credit effects cannot apply.
    #[error("block {height}: {source}")]
    Credits {
        /// The block.
        height: u64,
        /// What failed.
        source: CreditError,
    },
    /// The genesis block is malformed.
    #[error("genesis: {0}")]
    Genesis(&'static str),
    /// An entry's author may not make it.
    #[error("block {height}: entry {index} ({what}) is not authorised")]
    Unauthorized {
        /// The block.
        height: u64,
        /// The entry.
        index: usize,
        /// What kind of entry.
        what: &'static str,
    },
    /// A submitted job's manifest is longer than [`MAX_MANIFEST_BYTES`].
    #[error("block {height}: entry {index} carries a manifest of {bytes} bytes (at most {max})", max = MAX_MANIFEST_BYTES)]
    ManifestTooLarge {
        /// The block.
        height: u64,
        /// The entry.
        index: usize,
        /// The manifest's length.
        bytes: usize,
    },
    /// The block's timestamp is before its predecessor's.
    #[error("block {height}: timestamp goes back")]
    TimeGoesBack {
        /// The block.
        height: u64,
    },
}

/// What the chain so far says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerState {
    network: String,
    authority: PeerKey,
    open_enrollment: bool,
    fleet: Option<PeerKey>,
    tip: Block,
    enrolled: BTreeSet<PeerKey>,
    committee: BTreeSet<PeerKey>,
    credits: CreditState,
}

/// Builds and certifies a genesis block signed by `authority`: it names the network, enrolls
/// `members` and mints `mint` credits.
pub fn make_genesis(
    authority: &SigningKey,
    network: &str,
    open_enrollment: bool,
    fleet: Option<PeerKey>,
    members: &[PeerKey],
    mint: &[(PeerKey, Credits)],
    timestamp_unix_ms: u64,
) -> (Block, QuorumCertificate) {
    let author = authority.verifying_key().to_bytes();
    let sign = |entry: Entry| {
        SignedEntry::sign(entry, author, |message| {
            authority.sign(message).to_bytes().to_vec()
        })
    };
    let mut entries = vec![sign(Entry::Genesis {
        network: network.to_string(),
        open_enrollment,
        fleet,
    })];
    entries.extend(mint.iter().map(|(to, amount)| {
        sign(Entry::Mint {
            to: *to,
            amount: *amount,
        })
    }));
    entries.extend(
        members
            .iter()
            .map(|peer| sign(Entry::Enroll { peer: *peer })),
    );
    let block = Block {
        height: 0,
        prev_hash: [0; 32],
        proposer: author,
        timestamp_unix_ms,
        entries,
    };
    let certificate = certify(&block, &[authority]);
    (block, certificate)
}

/// A certificate for `block` signed by each of `signers` (the genesis author alone, or a
/// committee in tests and simulations).
pub fn certify(block: &Block, signers: &[&SigningKey]) -> QuorumCertificate {
    let hash = block.hash();
    let message = precommit_bytes(block.height, 0, &hash);
    QuorumCertificate {
        height: block.height,
        round: 0,
        block_hash: hash,
        votes: signers
            .iter()
            .map(|key| {
                (
                    key.verifying_key().to_bytes(),
                    key.sign(&message).to_bytes().to_vec(),
                )
            })
            .collect(),
    }
}

impl LedgerState {
    /// Starts the fold from a certified genesis block.
    pub fn from_genesis(
        block: &Block,
        certificate: &QuorumCertificate,
    ) -> Result<Self, LedgerStateError> {
        verify_block(block, None)?;
        let Some(first) = block.entries.first() else {
            return Err(LedgerStateError::Genesis("no entries"));
        };
        let Entry::Genesis {
            network,
            open_enrollment,
            fleet,
        } = &first.entry
        else {
            return Err(LedgerStateError::Genesis("first entry is not Genesis"));
        };
        let authority = first.author;
        if block.entries.iter().any(|e| e.author != authority) {
            return Err(LedgerStateError::Genesis("entries by more than one author"));
        }
        if block.entries[1..]
            .iter()
            .any(|e| matches!(e.entry, Entry::Genesis { .. }))
        {
            return Err(LedgerStateError::Genesis("more than one Genesis entry"));
        }
        verify_certificate(block, certificate, &BTreeSet::from([authority]))?;
        let mut credits = CreditState::default();
        credits
            .apply_block(block)
            .map_err(|source| LedgerStateError::Credits { height: 0, source })?;
        let enrolled: BTreeSet<PeerKey> = block
            .entries
            .iter()
            .filter_map(|e| match e.entry {
                Entry::Enroll { peer } => Some(peer),
                _ => None,
            })
            .collect();
        let mut state = Self {
            network: network.clone(),
            authority,
            open_enrollment: *open_enrollment,
            fleet: *fleet,
            tip: block.clone(),
            enrolled,
            committee: BTreeSet::new(),
            credits,
        };
        state.committee = state.compute_committee();
        Ok(state)
    }

    /// The network's name.
    pub fn network(&self) -> &str {
        &self.network
    }

    /// The genesis author.
    pub fn authority(&self) -> &PeerKey {
        &self.authority
    }

    /// Whether peers enroll themselves.
    pub fn open_enrollment(&self) -> bool {
        self.open_enrollment
    }

    /// The private fleet's key, when the ledger belongs to one.
    pub fn fleet(&self) -> Option<&PeerKey> {
        self.fleet.as_ref()
    }

    /// Peers banned or revoked at the tip's time.
    pub fn banned(&self) -> BTreeSet<PeerKey> {
        self.credits
            .bans()
            .filter(|(peer, _)| self.is_banned(peer))
            .map(|(peer, _)| *peer)
            .collect()
    }

    /// Whether `peer` is banned or revoked at the tip's time.
    pub fn is_banned(&self, peer: &PeerKey) -> bool {
        match self.credits.banned_until(peer) {
            None => false,
            Some(0) => true,
            Some(until) => until > self.tip.timestamp_unix_ms,
        }
    }

    /// The last finalized block.
    pub fn tip(&self) -> &Block {
        &self.tip
    }

    /// The height the next block must have.
    pub fn next_height(&self) -> u64 {
        self.tip.height + 1
    }

    /// Hash of the last finalized block.
    pub fn tip_hash(&self) -> BlobHash {
        self.tip.hash()
    }

    /// Peers enrolled so far (banned ones included).
    pub fn enrolled(&self) -> &BTreeSet<PeerKey> {
        &self.enrolled
    }

    /// Whether `peer` is enrolled and not banned at the tip.
    pub fn is_member(&self, peer: &PeerKey) -> bool {
        self.committee.contains(peer)
    }

    /// The committee that certifies the next height: enrolled peers not banned at the tip's time.
    pub fn committee(&self) -> &BTreeSet<PeerKey> {
        &self.committee
    }

    /// Balances, escrow and reputation.
    pub fn credits(&self) -> &CreditState {
        &self.credits
    }

    fn compute_committee(&self) -> BTreeSet<PeerKey> {
        self.enrolled
            .iter()
            .filter(|peer| !self.is_banned(peer))
            .copied()
            .collect()
    }

    fn authorise(
        &self,
        height: u64,
        index: usize,
        signed: &SignedEntry,
    ) -> Result<(), LedgerStateError> {
        let author = &signed.author;
        let governs = *author == self.authority || self.fleet.as_ref() == Some(author);
        let (allowed, what) = match &signed.entry {
            Entry::Genesis { .. } => (false, "genesis"),
            Entry::Mint { .. } => (false, "mint"),
            Entry::Enroll { peer } => (
                governs || (self.open_enrollment && author == peer),
                "enroll",
            ),
            Entry::Ban { .. } => (governs, "ban"),
            Entry::RoundResult { .. } => (self.committee.contains(author), "round result"),
            Entry::Verdict { .. } => (self.committee.contains(author), "verdict"),
            Entry::JobJoined { .. } => (self.committee.contains(author), "job committee join"),
            Entry::RoundVote { .. } => (self.committee.contains(author), "round vote"),
            // The credit fold checks that a job is closed by its submitter.
            Entry::JobSubmitted { .. }
            | Entry::JobClosed { .. }
            | Entry::Transfer { .. }
            | Entry::CheckpointPublished { .. } => (true, ""),
        };
        if allowed {
            Ok(())
        } else {
            Err(LedgerStateError::Unauthorized {
                height,
                index,
                what,
            })
        }
    }

    /// Checks everything about a proposed next block except its certificate, and returns the
    /// credit state it leads to.
    pub fn check_block(&self, block: &Block) -> Result<CreditState, LedgerStateError> {
        verify_block(block, Some(&self.tip))?;
        if block.timestamp_unix_ms < self.tip.timestamp_unix_ms {
            return Err(LedgerStateError::TimeGoesBack {
                height: block.height,
            });
        }
        for (index, signed) in block.entries.iter().enumerate() {
            self.check_entry(block.height, index, signed)?;
        }
        let mut credits = self.credits.clone();
        credits
            .apply_block(block)
            .map_err(|source| LedgerStateError::Credits {
                height: block.height,
                source,
            })?;
        Ok(credits)
    }

    /// The checks of one entry that do not depend on the entries before it in its block: its
    /// author may make it, and a manifest is within bounds.
    fn check_entry(
        &self,
        height: u64,
        index: usize,
        signed: &SignedEntry,
    ) -> Result<(), LedgerStateError> {
        self.authorise(height, index, signed)?;
        if let Entry::JobSubmitted { manifest, .. } = &signed.entry
            && manifest.len() > MAX_MANIFEST_BYTES
        {
            return Err(LedgerStateError::ManifestTooLarge {
                height,
                index,
                bytes: manifest.len(),
            });
        }
        Ok(())
    }

    /// A builder of the next block, proposed by `proposer` at `now_unix_ms` (never before the
    /// tip's time).
    pub fn block_builder(&self, proposer: PeerKey, now_unix_ms: u64) -> BlockBuilder<'_> {
        BlockBuilder {
            state: self,
            credits: self.credits.clone(),
            block: Block {
                height: self.next_height(),
                prev_hash: self.tip_hash(),
                proposer,
                timestamp_unix_ms: self.tip.timestamp_unix_ms.max(now_unix_ms),
                entries: Vec::new(),
            },
        }
    }

    /// Applies the next finalized block after checking it and its certificate.
    pub fn apply(
        &mut self,
        block: &Block,
        certificate: &QuorumCertificate,
    ) -> Result<(), LedgerStateError> {
        let credits = self.check_block(block)?;
        verify_certificate(block, certificate, &self.committee)?;
        self.credits = credits;
        for signed in &block.entries {
            if let Entry::Enroll { peer } = signed.entry {
                self.enrolled.insert(peer);
            }
        }
        self.tip = block.clone();
        self.committee = self.compute_committee();
        Ok(())
    }
}

/// The next block, built entry by entry: each entry is checked once, against the state the
/// entries kept before it leave (the checks of [`LedgerState::check_block`], which the built
/// block passes), so building a block of `n` entries costs `n` entry checks, not `n²`.
#[derive(Debug)]
pub struct BlockBuilder<'a> {
    state: &'a LedgerState,
    /// The credit state after the entries kept so far.
    credits: CreditState,
    block: Block,
}

impl BlockBuilder<'_> {
    /// The block so far.
    pub fn block(&self) -> &Block {
        &self.block
    }

    /// Appends `entry` when it applies after the entries kept so far; otherwise the block is
    /// left as it was and the error says why.
    pub fn try_push(&mut self, entry: SignedEntry) -> Result<(), LedgerStateError> {
        let height = self.block.height;
        let index = self.block.entries.len();
        if index >= MAX_ENTRIES_PER_BLOCK {
            return Err(LedgerError::TooManyEntries {
                height,
                count: index + 1,
            }
            .into());
        }
        if !entry.is_valid() {
            return Err(LedgerError::BadEntry { height, index }.into());
        }
        if matches!(entry.entry, Entry::Mint { .. }) {
            return Err(LedgerError::MintAfterGenesis { height }.into());
        }
        self.state.check_entry(height, index, &entry)?;
        if let Err(source) = self
            .credits
            .apply_entry_at(index, &entry.author, &entry.entry)
        {
            // A refused entry may have changed part of the state: fold the kept ones again.
            let mut credits = self.state.credits.clone();
            for (index, kept) in self.block.entries.iter().enumerate() {
                credits
                    .apply_entry_at(index, &kept.author, &kept.entry)
                    .map_err(|source| LedgerStateError::Credits { height, source })?;
            }
            self.credits = credits;
            return Err(LedgerStateError::Credits { height, source });
        }
        self.block.entries.push(entry);
        Ok(())
    }

    /// The block built.
    pub fn finish(self) -> Block {
        self.block
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::{key, pk, signed};

    fn certify_for_tests(block: &Block, seeds: &[u8]) -> QuorumCertificate {
        let keys: Vec<SigningKey> = seeds.iter().map(|s| key(*s)).collect();
        certify(block, &keys.iter().collect::<Vec<_>>())
    }

    fn genesis(open: bool) -> (LedgerState, Block) {
        let (block, cert) = make_genesis(
            &key(9),
            "test",
            open,
            None,
            &[pk(1), pk(2), pk(3), pk(4)],
            &[(pk(1), 100)],
            1_000,
        );
        (
            LedgerState::from_genesis(&block, &cert).expect("genesis"),
            block,
        )
    }

    fn next(state: &LedgerState, entries: Vec<SignedEntry>) -> Block {
        Block {
            height: state.next_height(),
            prev_hash: state.tip_hash(),
            proposer: pk(1),
            timestamp_unix_ms: state.tip().timestamp_unix_ms + 10,
            entries,
        }
    }

    #[test]
    fn genesis_sets_committee_and_balances() {
        let (state, _) = genesis(false);
        assert_eq!(state.committee().len(), 4);
        assert!(!state.is_member(&pk(9)));
        assert_eq!(state.credits().balance(&pk(1)), 100);
        assert_eq!(state.network(), "test");
        assert!(state.credits().check_conservation());
    }

    #[test]
    fn genesis_without_its_entry_or_with_bad_certificate_is_refused() {
        let (mut block, cert) = make_genesis(&key(9), "test", false, None, &[pk(1)], &[], 0);
        let other = make_genesis(&key(8), "test", false, None, &[pk(1)], &[], 0).1;
        assert!(LedgerState::from_genesis(&block, &other).is_err());
        block.entries.remove(0);
        assert!(LedgerState::from_genesis(&block, &cert).is_err());
    }

    #[test]
    fn blocks_need_a_quorum_of_the_committee() {
        let (mut state, _) = genesis(false);
        let block = next(
            &state,
            vec![signed(
                1,
                Entry::Transfer {
                    to: pk(2),
                    amount: 5,
                },
            )],
        );
        assert!(
            state
                .apply(&block, &certify_for_tests(&block, &[1, 2]))
                .is_err()
        );
        assert!(
            state
                .apply(&block, &certify_for_tests(&block, &[9, 8, 7]))
                .is_err()
        );
        state
            .apply(&block, &certify_for_tests(&block, &[1, 2, 3]))
            .expect("quorum of 3 of 4");
        assert_eq!(state.credits().balance(&pk(2)), 5);
        assert_eq!(state.next_height(), 2);
    }

    #[test]
    fn closed_ledger_refuses_self_enrollment_open_one_accepts() {
        let (closed, _) = genesis(false);
        let block = next(&closed, vec![signed(5, Entry::Enroll { peer: pk(5) })]);
        assert!(matches!(
            closed.check_block(&block),
            Err(LedgerStateError::Unauthorized { .. })
        ));
        let (mut open, _) = genesis(true);
        let block = next(&open, vec![signed(5, Entry::Enroll { peer: pk(5) })]);
        open.apply(&block, &certify_for_tests(&block, &[1, 2, 3]))
            .expect("self-enrollment in an open ledger");
        assert!(open.is_member(&pk(5)));
        assert_eq!(open.committee().len(), 5);
    }

    #[test]
    fn a_ban_by_the_authority_removes_a_member_until_it_expires() {
        let (mut state, _) = genesis(false);
        let forged = next(
            &state,
            vec![signed(
                1,
                Entry::Ban {
                    peer: pk(4),
                    until_unix_ms: 0,
                    reason: String::new(),
                },
            )],
        );
        assert!(state.check_block(&forged).is_err());
        let ban = next(
            &state,
            vec![signed(
                9,
                Entry::Ban {
                    peer: pk(4),
                    until_unix_ms: 2_000,
                    reason: "test".into(),
                },
            )],
        );
        state
            .apply(&ban, &certify_for_tests(&ban, &[1, 2, 3]))
            .expect("ban");
        assert!(!state.is_member(&pk(4)));
        let mut later = next(&state, vec![]);
        later.timestamp_unix_ms = 2_000;
        state
            .apply(&later, &certify_for_tests(&later, &[1, 2, 3]))
            .expect("later");
        assert!(state.is_member(&pk(4)));
    }

    #[test]
    fn a_fleet_key_may_revoke_members() {
        let (block, cert) = make_genesis(
            &key(9),
            "f",
            false,
            Some(pk(7)),
            &[pk(1), pk(2), pk(3), pk(4)],
            &[],
            0,
        );
        let mut state = LedgerState::from_genesis(&block, &cert).expect("genesis");
        assert_eq!(state.fleet(), Some(&pk(7)));
        let revoke = next(
            &state,
            vec![signed(
                7,
                Entry::Ban {
                    peer: pk(4),
                    until_unix_ms: 0,
                    reason: "revoked".into(),
                },
            )],
        );
        state
            .apply(&revoke, &certify_for_tests(&revoke, &[1, 2, 3]))
            .expect("revoke");
        assert!(state.is_banned(&pk(4)));
        assert!(!state.is_member(&pk(4)));
    }

    fn job(manifest_bytes: usize) -> Entry {
        Entry::JobSubmitted {
            job: [7; 32],
            escrow: 10,
            manifest: "x".repeat(manifest_bytes),
            terms: crate::ledger::tests::terms(),
        }
    }

    #[test]
    fn a_job_manifest_is_bounded() {
        let (mut state, _) = genesis(false);
        let too_long = next(&state, vec![signed(1, job(MAX_MANIFEST_BYTES + 1))]);
        assert_eq!(
            state.check_block(&too_long),
            Err(LedgerStateError::ManifestTooLarge {
                height: 1,
                index: 0,
                bytes: MAX_MANIFEST_BYTES + 1
            })
        );
        let longest = next(&state, vec![signed(1, job(MAX_MANIFEST_BYTES))]);
        state
            .apply(&longest, &certify_for_tests(&longest, &[1, 2, 3]))
            .expect("a manifest of the largest size");
        assert_eq!(state.credits().escrow(&[7; 32]), 10);
    }

    #[test]
    fn a_second_result_for_a_round_is_refused() {
        let (mut state, _) = genesis(false);
        let submit = next(&state, vec![signed(1, job(10))]);
        state
            .apply(&submit, &certify_for_tests(&submit, &[1, 2, 3]))
            .expect("job");
        let result = |coordinator: u8, paid: Credits| {
            signed(
                coordinator,
                Entry::RoundResult {
                    job: [7; 32],
                    round: 1,
                    model_hash: [coordinator; 32],
                    accepted: vec![(pk(3), paid)],
                    rejected: vec![],
                    evidence: crate::ledger::tests::evidence([7; 32], 1, &[3]),
                },
            )
        };
        let mut entries = crate::ledger::tests::joins([7; 32], &[2]);
        entries.extend(crate::ledger::tests::votes_for(&result(2, 1).entry, &[2]));
        entries.push(result(2, 1));
        let first = next(&state, entries);
        state
            .apply(&first, &certify_for_tests(&first, &[1, 2, 3]))
            .expect("first result");
        let second = next(&state, vec![result(3, 2)]);
        assert!(matches!(
            state.check_block(&second),
            Err(LedgerStateError::Credits {
                source: CreditError::DuplicateRound { round: 1, .. },
                ..
            })
        ));
        assert_eq!(state.credits().balance(&pk(3)), 1);
        // Only ledger committee members join a job's committee or vote on its rounds.
        for entry in [
            Entry::JobJoined { job: [7; 32] },
            Entry::RoundVote {
                job: [7; 32],
                round: 2,
                model_hash: [0; 32],
                accepted_digest: [0; 32],
                rejected: Vec::new(),
            },
        ] {
            let outsider = next(&state, vec![signed(9, entry)]);
            assert!(matches!(
                state.check_block(&outsider),
                Err(LedgerStateError::Unauthorized { .. })
            ));
        }
    }

    /// A block built entry by entry keeps exactly the entries that apply after the ones before
    /// it, says why the others do not, and the whole block then passes the replicas' check
    /// with the same credits.
    #[test]
    fn a_block_built_entry_by_entry_keeps_what_applies() {
        let (state, _) = genesis(false);
        let transfer = |from: u8, to: u8, amount: Credits| {
            signed(from, Entry::Transfer { to: pk(to), amount })
        };
        let mut builder = state.block_builder(pk(1), 0);
        builder
            .try_push(transfer(1, 2, 60))
            .expect("peer 1 holds 100");
        assert!(matches!(
            builder.try_push(transfer(1, 3, 50)),
            Err(LedgerStateError::Credits { .. })
        ));
        builder
            .try_push(transfer(2, 3, 60))
            .expect("peer 2 holds what it was sent");
        assert!(matches!(
            builder.try_push(signed(
                2,
                Entry::Ban {
                    peer: pk(3),
                    until_unix_ms: 0,
                    reason: String::new(),
                }
            )),
            Err(LedgerStateError::Unauthorized { .. })
        ));
        assert_eq!(builder.block().entries.len(), 2);
        let mut forged = transfer(1, 3, 1);
        forged.signature[0] ^= 1;
        assert!(matches!(
            builder.try_push(forged),
            Err(LedgerStateError::Ledger(LedgerError::BadEntry { .. }))
        ));
        builder.try_push(transfer(1, 4, 40)).expect("the 40 left");
        let block = builder.finish();
        let kept: Vec<Credits> = block
            .entries
            .iter()
            .filter_map(|e| match e.entry {
                Entry::Transfer { amount, .. } => Some(amount),
                _ => None,
            })
            .collect();
        assert_eq!(kept, vec![60, 60, 40]);
        let credits = state.check_block(&block).expect("the built block passes");
        assert_eq!(credits.balance(&pk(1)), 0);
        assert_eq!(credits.balance(&pk(3)), 60);
        assert_eq!(credits.balance(&pk(4)), 40);
    }

    #[test]
    fn refused_blocks_leave_the_state_unchanged() {
        let (mut state, _) = genesis(false);
        let before = state.clone();
        let overspend = next(
            &state,
            vec![signed(
                2,
                Entry::Transfer {
                    to: pk(1),
                    amount: 1,
                },
            )],
        );
        assert!(
            state
                .apply(&overspend, &certify_for_tests(&overspend, &[1, 2, 3]))
                .is_err()
        );
        let mut back = next(&state, vec![]);
        back.timestamp_unix_ms = 0;
        assert!(
            state
                .apply(&back, &certify_for_tests(&back, &[1, 2, 3]))
                .is_err()
        );
        assert_eq!(state, before);
    }
}
