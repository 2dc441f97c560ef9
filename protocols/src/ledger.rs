//! The replicated ledger's data: signed entries, hash-chained blocks, quorum certificates, and
//! the verification every replica runs on what it receives.
//!
//! A block is final when a quorum certificate carries the Tendermint precommits of more than two
//! thirds of the committee for its hash at one (height, round): the precommits that made the
//! consensus engine ([`crate::consensus`]) decide it. Replicas verify, for each block: the height follows, `prev_hash` is the
//! hash of the previous block, every entry is signed by its author, and the certificate is a valid
//! quorum of distinct committee members. Agreement on *which* block is final at a height comes
//! from the consensus engine; this module only checks what it produced.

use std::collections::BTreeSet;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{
    PeerKey, WireError,
    contribution::{BlobHash, SignedCommitment},
    decode_bounded, encode,
};

/// Largest encoded block accepted from the wire, in bytes.
pub const MAX_BLOCK_BYTES: usize = 4 * 1024 * 1024;
/// Most entries in one block.
pub const MAX_ENTRIES_PER_BLOCK: usize = 10_000;
/// Longest free-text reason in an entry, in bytes.
pub const MAX_REASON_BYTES: usize = 256;
/// Longest job manifest carried by [`Entry::JobSubmitted`], in bytes.
pub const MAX_MANIFEST_BYTES: usize = 32 * 1024;
/// Most rounds a job's terms may name.
pub const MAX_JOB_ROUNDS: u64 = 1_000_000;
/// Most contributors per round a job's terms may name.
pub const MAX_JOB_CONTRIBUTORS: u32 = 256;
/// Most credits a job's terms may pay per accepted contribution or per verdict.
pub const MAX_JOB_PAY: Credits = 1_000_000_000;
/// Most verdicts on one contributor of one round (the coordinator's refusal and an audit).
pub const MAX_VERDICTS_PER_SUBJECT: usize = 2;
const ENTRY_DOMAIN: &[u8] = b"loom/ledger-entry/v1\0";
const ACCEPTED_DOMAIN: &[u8] = b"loom/round-accepted/v1\0";
const VOTE_DOMAIN: &[u8] = b"loom/consensus-vote/v1\0";
const CHAIN_VOTE_DOMAIN: &[u8] = b"loom/chain-vote/v1\0";

/// Credits, in the smallest unit.
pub type Credits = u64;
/// A job's id (hash of its manifest).
pub type JobId = [u8; 32];

/// What a job pays and for how long, as its submitter put it on the ledger. Every replica checks
/// the job's round results and verdicts against them, so nobody (a byzantine coordinator
/// included) can take more out of the escrow than the terms allow for a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTerms {
    /// Rounds of the job: results are recorded for rounds `1..=rounds`.
    pub rounds: u64,
    /// Most accepted (and most rejected) contributors in one round.
    pub max_contributors: u32,
    /// Most credits paid per accepted contribution.
    pub per_contribution: Credits,
    /// Most credits paid per verdict.
    pub per_verdict: Credits,
}

impl JobTerms {
    /// Whether the terms are within the ledger's bounds (at least one round and contributor).
    pub fn is_valid(&self) -> bool {
        (1..=MAX_JOB_ROUNDS).contains(&self.rounds)
            && (1..=MAX_JOB_CONTRIBUTORS).contains(&self.max_contributors)
            && self.per_contribution <= MAX_JOB_PAY
            && self.per_verdict <= MAX_JOB_PAY
    }
}

/// The digest a [`Entry::RoundVote`] names the accepted set by: blake3 over a domain tag and the
/// distinct keys in ascending order, so every peer that applied one close gets one digest.
pub fn accepted_digest<'a>(accepted: impl IntoIterator<Item = &'a PeerKey>) -> BlobHash {
    let keys: BTreeSet<&PeerKey> = accepted.into_iter().collect();
    let mut hasher = blake3::Hasher::new();
    hasher.update(ACCEPTED_DOMAIN);
    for key in keys {
        hasher.update(key);
    }
    *hasher.finalize().as_bytes()
}

/// Matching votes a round result needs from a job committee of `members`: more than a third, so
/// that at least one is an honest member's while fewer than a third of the committee is
/// byzantine (`f + 1` of `3f + 1`). Zero members need one vote, which nobody can cast.
pub fn vote_quorum(members: usize) -> usize {
    members / 3 + 1
}

/// What an entry records. The author of the signed entry is the actor of the record (the
/// submitter of a job, the sender of a transfer, the coordinator of a round, the verifier).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// Genesis only: credits created for `to`.
    Mint {
        /// Receiver.
        to: PeerKey,
        /// Amount.
        amount: Credits,
    },
    /// A peer joined (fleet enrollment or open mesh).
    Enroll {
        /// The peer.
        peer: PeerKey,
    },
    /// A job was submitted; `escrow` credits move from the author into the job's escrow.
    JobSubmitted {
        /// The job.
        job: JobId,
        /// Credits put in escrow.
        escrow: Credits,
        /// The job's manifest (YAML), at most [`MAX_MANIFEST_BYTES`]; peers that pick the job
        /// up parse it and check that it yields `job` and `terms`.
        manifest: String,
        /// What the job pays and for how long; its results and verdicts are checked against them.
        terms: JobTerms,
    },
    /// A round's outcome, proposed by its coordinator: payouts from the job's escrow to accepted
    /// contributors, and rejected contributors (slashed). At most one per (job, round) is ever
    /// on the ledger. Every accepted or rejected contributor is backed by its own signed
    /// commitment of a contribution to this job and round (`evidence`), so a result can pay or
    /// slash only peers that took part in the round, within the job's terms. It is taken only
    /// with [`vote_quorum`] of the job committee's [`Entry::RoundVote`]s for its model and
    /// exact accepted set already on the ledger, each rejected peer refused in that many of them.
    RoundResult {
        /// The job.
        job: JobId,
        /// The round.
        round: u64,
        /// Hash of the model after the round.
        model_hash: BlobHash,
        /// (contributor, credits) for accepted contributions.
        accepted: Vec<(PeerKey, Credits)>,
        /// Contributors whose contribution was rejected.
        rejected: Vec<PeerKey>,
        /// The signed commitments of the accepted contributors, in the order of `accepted`,
        /// then of the rejected ones, in the order of `rejected`.
        evidence: Vec<SignedCommitment>,
    },
    /// A verifier's verdict on a contribution; the verifier is paid `fee` from the job's escrow.
    Verdict {
        /// The job.
        job: JobId,
        /// The round.
        round: u64,
        /// Whose contribution.
        subject: PeerKey,
        /// Accepted or not.
        accepted: bool,
        /// Why (empty when accepted).
        reason: String,
        /// Credits paid to the verifier.
        fee: Credits,
    },
    /// Credits from the author to `to`.
    Transfer {
        /// Receiver.
        to: PeerKey,
        /// Amount.
        amount: Credits,
    },
    /// A checkpoint was published.
    CheckpointPublished {
        /// The job.
        job: JobId,
        /// The round it follows.
        round: u64,
        /// Its blake3 hash.
        hash: BlobHash,
    },
    /// A peer is banned until `until_unix_ms` (0: for good), or revoked.
    Ban {
        /// The peer.
        peer: PeerKey,
        /// End of the ban.
        until_unix_ms: u64,
        /// Why.
        reason: String,
    },
    /// Genesis only, first entry: names the ledger and says who may enroll peers. Its author is
    /// the ledger's authority (a private fleet's key, or the first peer of an open mesh).
    Genesis {
        /// The network's name.
        network: String,
        /// Whether any peer may enroll itself (open mesh) or only the authority enrolls.
        open_enrollment: bool,
        /// A private fleet's key: it may also enroll, ban and revoke peers.
        fleet: Option<PeerKey>,
    },
    /// The submitter closes its job: the escrow left goes back to it, and no round result or
    /// verdict of the job is accepted after.
    JobClosed {
        /// The job.
        job: JobId,
    },
    /// The author joins the job's committee: the peers whose [`Entry::RoundVote`]s decide which
    /// round results the ledger takes. At most the terms' `max_contributors` members.
    JobJoined {
        /// The job.
        job: JobId,
    },
    /// A committee member's vote on a round of a job: the model it reached, the accepted set of
    /// the close it applied ([`accepted_digest`]) and the contributors it refused. A round
    /// result is taken only when [`vote_quorum`] members voted for its model and accepted set,
    /// and slashes only contributors that many of them refused.
    RoundVote {
        /// The job.
        job: JobId,
        /// The round.
        round: u64,
        /// Hash of the model after the round, as the voter has it.
        model_hash: BlobHash,
        /// [`accepted_digest`] of the contributors the voter aggregated.
        accepted_digest: BlobHash,
        /// Contributors the voter refused in the round (at most the terms' `max_contributors`).
        rejected: Vec<PeerKey>,
    },
}

/// An entry with its author's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEntry {
    /// The record.
    pub entry: Entry,
    /// Its author.
    pub author: PeerKey,
    /// ed25519 over the domain tag, the author and the encoded entry.
    pub signature: Vec<u8>,
}

fn entry_signing_bytes(entry: &Entry, author: &PeerKey) -> Vec<u8> {
    let mut out = ENTRY_DOMAIN.to_vec();
    out.extend_from_slice(author);
    out.extend_from_slice(&encode(entry));
    out
}

fn verify(key: &PeerKey, message: &[u8], signature: &[u8]) -> bool {
    let (Ok(key), Ok(signature)) = (
        VerifyingKey::from_bytes(key),
        Signature::from_slice(signature),
    ) else {
        return false;
    };
    key.verify_strict(message, &signature).is_ok()
}

impl SignedEntry {
    /// Signs `entry` as `author` with `sign`.
    pub fn sign(entry: Entry, author: PeerKey, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> Self {
        let signature = sign(&entry_signing_bytes(&entry, &author));
        Self {
            entry,
            author,
            signature,
        }
    }

    /// Whether the signature is the author's and free-text fields are within bounds.
    pub fn is_valid(&self) -> bool {
        let reason_ok = match &self.entry {
            Entry::Verdict { reason, .. } | Entry::Ban { reason, .. } => {
                reason.len() <= MAX_REASON_BYTES
            }
            Entry::Genesis { network, .. } => network.len() <= MAX_REASON_BYTES,
            Entry::RoundVote { rejected, .. } => rejected.len() <= MAX_JOB_CONTRIBUTORS as usize,
            _ => true,
        };
        reason_ok
            && verify(
                &self.author,
                &entry_signing_bytes(&self.entry, &self.author),
                &self.signature,
            )
    }
}

/// A block of entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Height (genesis is 0).
    pub height: u64,
    /// Hash of the previous block (zeros for genesis).
    pub prev_hash: BlobHash,
    /// The proposer.
    pub proposer: PeerKey,
    /// Proposer's clock (unix ms), informative only.
    pub timestamp_unix_ms: u64,
    /// The entries, in order.
    pub entries: Vec<SignedEntry>,
}

impl Block {
    /// The block's hash: blake3 of its encoding.
    pub fn hash(&self) -> BlobHash {
        *blake3::hash(&encode(self)).as_bytes()
    }

    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a block from the network (bounded).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode_bounded(bytes, MAX_BLOCK_BYTES)
    }
}

/// The two votes of Tendermint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum VoteKind {
    /// First vote of a round: the member saw a valid proposal (or votes nil).
    Prevote,
    /// Second vote of a round: the member saw a quorum of prevotes for the value (or votes nil).
    Precommit,
}

/// The precommits of committee members for one block at one (height, round): the proof that
/// consensus decided it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumCertificate {
    /// The height.
    pub height: u64,
    /// The consensus round in which the block was decided.
    pub round: u32,
    /// The certified block.
    pub block_hash: BlobHash,
    /// (member, signature over [`precommit_bytes`]).
    pub votes: Vec<(PeerKey, Vec<u8>)>,
}

/// The bytes a committee member signs for a ledger consensus vote: a domain tag, the kind, the
/// height, the round and the value (`None`: nil).
pub fn vote_bytes(kind: VoteKind, height: u64, round: u32, value: Option<&BlobHash>) -> Vec<u8> {
    chain_vote_bytes(None, kind, height, round, value)
}

/// The bytes a committee member signs for a vote of the consensus instance `chain` (`None`: the
/// ledger's; another instance, such as a job's round chain, has its own id in the domain, so a
/// vote of one instance never counts in another, nil votes included).
pub fn chain_vote_bytes(
    chain: Option<&BlobHash>,
    kind: VoteKind,
    height: u64,
    round: u32,
    value: Option<&BlobHash>,
) -> Vec<u8> {
    let mut out = match chain {
        None => VOTE_DOMAIN.to_vec(),
        Some(chain) => [CHAIN_VOTE_DOMAIN, chain.as_slice()].concat(),
    };
    out.push(match kind {
        VoteKind::Prevote => 1,
        VoteKind::Precommit => 2,
    });
    out.extend_from_slice(&height.to_le_bytes());
    out.extend_from_slice(&round.to_le_bytes());
    match value {
        Some(hash) => {
            out.push(1);
            out.extend_from_slice(hash);
        }
        None => out.push(0),
    }
    out
}

/// The bytes a committee member signs to precommit `block_hash` at (`height`, `round`): what a
/// [`QuorumCertificate`] carries signatures over.
pub fn precommit_bytes(height: u64, round: u32, block_hash: &BlobHash) -> Vec<u8> {
    vote_bytes(VoteKind::Precommit, height, round, Some(block_hash))
}

/// Why a block or chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    /// The height does not follow the previous block.
    #[error("block at height {got}, expected {expected}")]
    Height {
        /// Expected height.
        expected: u64,
        /// Height found.
        got: u64,
    },
    /// `prev_hash` is not the previous block's hash.
    #[error("block {height} does not chain to the previous block")]
    Chain {
        /// The height.
        height: u64,
    },
    /// Too many entries.
    #[error("block {height} has {count} entries")]
    TooManyEntries {
        /// The height.
        height: u64,
        /// Entries.
        count: usize,
    },
    /// An entry's signature does not verify.
    #[error("block {height}: entry {index} is not validly signed by its author")]
    BadEntry {
        /// The height.
        height: u64,
        /// Entry position.
        index: usize,
    },
    /// A mint outside the genesis block.
    #[error("block {height}: mint outside genesis")]
    MintAfterGenesis {
        /// The height.
        height: u64,
    },
    /// The certificate is for another block.
    #[error("certificate does not match block {height}")]
    CertificateMismatch {
        /// The height.
        height: u64,
    },
    /// Not enough distinct, valid committee votes.
    #[error("block {height}: {valid} valid votes of a committee of {committee}, need {needed}")]
    NoQuorum {
        /// The height.
        height: u64,
        /// Valid distinct votes.
        valid: usize,
        /// Committee size.
        committee: usize,
        /// Votes needed.
        needed: usize,
    },
}

/// Votes needed for a quorum of a committee of `n`: more than two thirds.
pub fn quorum(n: usize) -> usize {
    n * 2 / 3 + 1
}

/// Checks a certificate against a block and a committee.
pub fn verify_certificate(
    block: &Block,
    certificate: &QuorumCertificate,
    committee: &BTreeSet<PeerKey>,
) -> Result<(), LedgerError> {
    verify_certificate_in(None, block.height, &block.hash(), certificate, committee)
}

/// Checks a certificate of the consensus instance `chain` (`None`: the ledger's) for the value
/// `value_hash` decided at `height`: it names them, and holds valid precommits of a quorum of
/// distinct members of `committee`.
pub fn verify_certificate_in(
    chain: Option<&BlobHash>,
    height: u64,
    value_hash: &BlobHash,
    certificate: &QuorumCertificate,
    committee: &BTreeSet<PeerKey>,
) -> Result<(), LedgerError> {
    if certificate.height != height || certificate.block_hash != *value_hash {
        return Err(LedgerError::CertificateMismatch { height });
    }
    let message = chain_vote_bytes(
        chain,
        VoteKind::Precommit,
        height,
        certificate.round,
        Some(value_hash),
    );
    let voters: BTreeSet<&PeerKey> = certificate
        .votes
        .iter()
        .filter(|(member, sig)| committee.contains(member) && verify(member, &message, sig))
        .map(|(member, _)| member)
        .collect();
    let needed = quorum(committee.len());
    if voters.len() < needed {
        return Err(LedgerError::NoQuorum {
            height,
            valid: voters.len(),
            committee: committee.len(),
            needed,
        });
    }
    Ok(())
}

/// Checks that `block` may follow `previous` (or be genesis when `previous` is `None`) and that
/// all its entries are validly signed.
pub fn verify_block(block: &Block, previous: Option<&Block>) -> Result<(), LedgerError> {
    let (expected, prev_hash) = match previous {
        Some(p) => (p.height + 1, p.hash()),
        None => (0, [0; 32]),
    };
    if block.height != expected {
        return Err(LedgerError::Height {
            expected,
            got: block.height,
        });
    }
    if block.prev_hash != prev_hash {
        return Err(LedgerError::Chain {
            height: block.height,
        });
    }
    if block.entries.len() > MAX_ENTRIES_PER_BLOCK {
        return Err(LedgerError::TooManyEntries {
            height: block.height,
            count: block.entries.len(),
        });
    }
    for (index, entry) in block.entries.iter().enumerate() {
        if !entry.is_valid() {
            return Err(LedgerError::BadEntry {
                height: block.height,
                index,
            });
        }
        if block.height > 0 && matches!(entry.entry, Entry::Mint { .. }) {
            return Err(LedgerError::MintAfterGenesis {
                height: block.height,
            });
        }
    }
    Ok(())
}

/// Verifies a whole chain of finalized blocks from genesis.
pub fn verify_chain(
    chain: &[(Block, QuorumCertificate)],
    committee: &BTreeSet<PeerKey>,
) -> Result<(), LedgerError> {
    let mut previous: Option<&Block> = None;
    for (block, certificate) in chain {
        verify_block(block, previous)?;
        verify_certificate(block, certificate, committee)?;
        previous = Some(block);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    pub(crate) fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    pub(crate) fn pk(seed: u8) -> PeerKey {
        key(seed).verifying_key().to_bytes()
    }

    pub(crate) fn signed(seed: u8, entry: Entry) -> SignedEntry {
        let sk = key(seed);
        SignedEntry::sign(entry, pk(seed), |m| sk.sign(m).to_bytes().to_vec())
    }

    /// Generous terms for tests: 100 rounds, 8 contributors, 1 000 per contribution, 100 per
    /// verdict.
    pub(crate) fn terms() -> JobTerms {
        JobTerms {
            rounds: 100,
            max_contributors: 8,
            per_contribution: 1_000,
            per_verdict: 100,
        }
    }

    /// The signed commitments of the peers of seeds `seeds` to `job`'s round `round`.
    pub(crate) fn evidence(job: JobId, round: u64, seeds: &[u8]) -> Vec<SignedCommitment> {
        seeds
            .iter()
            .map(|&seed| {
                let sk = key(seed);
                crate::contribution::Commitment {
                    job_id: job,
                    round,
                    blob_hash: [seed; 32],
                    blob_len: 1,
                    author: pk(seed),
                }
                .seal(|m| sk.sign(m).to_bytes().to_vec())
            })
            .collect()
    }

    /// Peers `seeds` joining `job`'s committee.
    pub(crate) fn joins(job: JobId, seeds: &[u8]) -> Vec<SignedEntry> {
        seeds
            .iter()
            .map(|&seed| signed(seed, Entry::JobJoined { job }))
            .collect()
    }

    /// Committee members `seeds` voting for what `result` (a round result) records.
    pub(crate) fn votes_for(result: &Entry, seeds: &[u8]) -> Vec<SignedEntry> {
        let Entry::RoundResult {
            job,
            round,
            model_hash,
            accepted,
            rejected,
            ..
        } = result
        else {
            panic!("votes are for round results");
        };
        let vote = Entry::RoundVote {
            job: *job,
            round: *round,
            model_hash: *model_hash,
            accepted_digest: accepted_digest(accepted.iter().map(|(peer, _)| peer)),
            rejected: rejected.clone(),
        };
        seeds
            .iter()
            .map(|&seed| signed(seed, vote.clone()))
            .collect()
    }

    pub(crate) fn block(height: u64, prev: Option<&Block>, entries: Vec<SignedEntry>) -> Block {
        Block {
            height,
            prev_hash: prev.map(Block::hash).unwrap_or([0; 32]),
            proposer: pk(1),
            timestamp_unix_ms: 0,
            entries,
        }
    }

    fn certify(block: &Block, voters: &[u8]) -> QuorumCertificate {
        certify_round(block, 0, voters)
    }

    fn certify_round(block: &Block, round: u32, voters: &[u8]) -> QuorumCertificate {
        let message = precommit_bytes(block.height, round, &block.hash());
        QuorumCertificate {
            height: block.height,
            round,
            block_hash: block.hash(),
            votes: voters
                .iter()
                .map(|s| (pk(*s), key(*s).sign(&message).to_bytes().to_vec()))
                .collect(),
        }
    }

    fn committee() -> BTreeSet<PeerKey> {
        [1, 2, 3, 4].iter().map(|s| pk(*s)).collect()
    }

    /// A genesis minting 100 to peer 1, then a block where peer 1 sends 5 to peer 2.
    fn genesis_and_transfer() -> (Block, Block) {
        let genesis = block(
            0,
            None,
            vec![signed(
                1,
                Entry::Mint {
                    to: pk(1),
                    amount: 100,
                },
            )],
        );
        let next = block(
            1,
            Some(&genesis),
            vec![signed(
                1,
                Entry::Transfer {
                    to: pk(2),
                    amount: 5,
                },
            )],
        );
        (genesis, next)
    }

    #[test]
    fn a_certified_chain_verifies() {
        let (genesis, next) = genesis_and_transfer();
        let chain = vec![
            (genesis.clone(), certify(&genesis, &[1, 2, 3])),
            (next.clone(), certify(&next, &[2, 3, 4])),
        ];
        assert_eq!(verify_chain(&chain, &committee()), Ok(()));
        let bytes = next.to_bytes();
        assert_eq!(Block::from_bytes(&bytes), Ok(next));
    }

    #[test]
    fn a_quorum_needs_more_than_two_thirds_of_distinct_members() {
        assert_eq!(quorum(4), 3);
        assert_eq!(quorum(7), 5);
        let genesis = block(0, None, vec![]);
        let two = certify(&genesis, &[1, 2]);
        assert!(matches!(
            verify_certificate(&genesis, &two, &committee()),
            Err(LedgerError::NoQuorum { valid: 2, .. })
        ));
        let repeated = certify(&genesis, &[1, 1, 2]);
        assert!(verify_certificate(&genesis, &repeated, &committee()).is_err());
        let outsider = certify(&genesis, &[1, 2, 9]);
        assert!(verify_certificate(&genesis, &outsider, &committee()).is_err());
    }

    #[test]
    fn a_certificate_holds_precommits_of_its_own_round_only() {
        let genesis = block(0, None, vec![]);
        let round_three = certify_round(&genesis, 3, &[1, 2, 3]);
        assert_eq!(
            verify_certificate(&genesis, &round_three, &committee()),
            Ok(())
        );
        // The same signatures presented as another round's precommits do not verify.
        let relabelled = QuorumCertificate {
            round: 2,
            ..round_three
        };
        assert!(matches!(
            verify_certificate(&genesis, &relabelled, &committee()),
            Err(LedgerError::NoQuorum { valid: 0, .. })
        ));
        // Prevotes are not precommits.
        let hash = genesis.hash();
        let prevotes = QuorumCertificate {
            height: 0,
            round: 0,
            block_hash: hash,
            votes: [1, 2, 3]
                .iter()
                .map(|s| {
                    let message = vote_bytes(VoteKind::Prevote, 0, 0, Some(&hash));
                    (pk(*s), key(*s).sign(&message).to_bytes().to_vec())
                })
                .collect(),
        };
        assert!(verify_certificate(&genesis, &prevotes, &committee()).is_err());
    }

    #[test]
    fn tampering_breaks_the_chain_or_the_signatures() {
        let (genesis, next) = genesis_and_transfer();
        // A changed amount no longer matches the author's signature.
        let mut forged = next.clone();
        if let Entry::Transfer { amount, .. } = &mut forged.entries[0].entry {
            *amount = 50;
        }
        assert_eq!(
            verify_block(&forged, Some(&genesis)),
            Err(LedgerError::BadEntry {
                height: 1,
                index: 0
            })
        );
        // A changed genesis breaks the link from the next block.
        let mut other_genesis = genesis.clone();
        other_genesis.timestamp_unix_ms = 1;
        assert_eq!(
            verify_block(&next, Some(&other_genesis)),
            Err(LedgerError::Chain { height: 1 })
        );
        // The certificate of the original block does not certify the forgery.
        assert!(verify_certificate(&forged, &certify(&next, &[1, 2, 3]), &committee()).is_err());
        // Minting is for genesis only.
        let mint = block(
            1,
            Some(&genesis),
            vec![signed(
                1,
                Entry::Mint {
                    to: pk(1),
                    amount: 1,
                },
            )],
        );
        assert_eq!(
            verify_block(&mint, Some(&genesis)),
            Err(LedgerError::MintAfterGenesis { height: 1 })
        );
    }
}
