//! Jobs on the ledger: the book of submitted jobs every node folds out of the finalized chain,
//! the checks a submission passes before it goes on the ledger, and the ledger entries a round's
//! coordinator submits to pay for the round.
//!
//! The [`JobBook`] follows the node's ledger store block by block (a task started with the node,
//! [`follow_ledger`]): for each `JobSubmitted` it keeps the manifest, the submitter and the
//! escrow; for each `RoundResult` and `Verdict` of a known job the round's record; and it folds
//! the same credit state as every replica, so the escrow that remains is the ledger's. The
//! control API answers `/v1/jobs` from it and the pick-up loop ([`crate::train::pick_up`]) finds
//! new jobs in it.
//!
//! Payment ([`round_entries`]): the coordinator of a round (its report says `closed_by_me`) pays
//! each accepted contributor `pay.per_contribution` and records the refused ones, then submits a
//! verdict per refused contribution with fee `pay.per_verdict`. Everything is clipped to the
//! escrow that remains, and verdict fees never touch the part of the escrow reserved for the
//! remaining rounds' contributions, so a round's result is never refused for a short escrow.
//! The result carries each paid or slashed contributor's signed commitment to the round (the
//! report's evidence), which every replica checks against the job's terms on the ledger; a
//! contributor whose commitment this peer does not hold is left out of the result (its verdict
//! still records why it was refused).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use loom_actors::{RoundReport, exchanger::hex, ledger::SharedLedgerStore};
use loom_protocols::{
    PeerKey,
    credits::CreditState,
    ledger::{
        Block, Credits, Entry, JobId, JobTerms, MAX_MANIFEST_BYTES, MAX_REASON_BYTES,
        accepted_digest,
    },
};
use serde::{Deserialize, Serialize};

use crate::{
    ledger_cli::{peer_name, unhex},
    manifest::{Manifest, ManifestError, Pay},
    status::TrainingStatus,
};

/// How often the book looks for newly finalized blocks.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);
/// Blocks read from the store at a time.
const FOLLOW_BATCH: usize = 64;

/// Why a job could not be submitted or found.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The manifest is longer than the ledger carries.
    #[error("manifest is {bytes} bytes, at most {max} fit on the ledger", max = MAX_MANIFEST_BYTES)]
    ManifestTooLarge {
        /// Its length.
        bytes: usize,
    },
    /// The manifest is invalid.
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    /// The escrow cannot pay every round.
    #[error("escrow {escrow} is less than rounds × replicas.max × pay.per_contribution = {needed}")]
    EscrowTooSmall {
        /// Offered.
        escrow: Credits,
        /// Needed.
        needed: Credits,
    },
    /// The submitter's balance is short.
    #[error("balance {balance} is less than the escrow {escrow}")]
    Balance {
        /// Balance on the ledger.
        balance: Credits,
        /// Escrow asked for.
        escrow: Credits,
    },
    /// The ledger cannot take entries from this node now.
    #[error("ledger {0}")]
    Ledger(String),
    /// The job is already on the ledger.
    #[error("job {0} is already on the ledger")]
    Duplicate(String),
    /// A job id (prefix) that is not hex.
    #[error("job id {0:?} is not a hex prefix of 1 to 64 digits")]
    BadId(String),
    /// No job has that id.
    #[error("no job on the ledger has an id starting with {0}")]
    Unknown(String),
    /// Only the submitter may close a job.
    #[error("job {0} was submitted by another peer; only its submitter may close it")]
    NotSubmitter(String),
    /// The job is closed already.
    #[error("job {0} is closed already")]
    Closed(String),
    /// More than one job has that prefix.
    #[error("job id prefix {prefix} matches {count} jobs; give more digits")]
    Ambiguous {
        /// The prefix.
        prefix: String,
        /// Jobs matching.
        count: usize,
    },
}

impl JobError {
    /// Whether the error is the caller's (a bad request) rather than the node's state.
    pub fn is_bad_request(&self) -> bool {
        !matches!(self, JobError::Ledger(_))
    }
}

/// A round's result as recorded on the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedRound {
    /// The round.
    pub round: u64,
    /// Hash of the model after it (hex).
    pub model_hash: String,
    /// Contributions accepted.
    pub accepted: usize,
    /// Contributions rejected.
    pub rejected: usize,
    /// Credits paid to the accepted contributors.
    pub paid: Credits,
    /// Who recorded it (PeerId).
    pub coordinator: String,
    /// The block that holds it.
    pub height: u64,
}

/// A verdict on a contribution, as recorded on the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedVerdict {
    /// The round.
    pub round: u64,
    /// Whose contribution (PeerId).
    pub subject: String,
    /// Who judged it (PeerId).
    pub verifier: String,
    /// Accepted or not.
    pub accepted: bool,
    /// Why.
    pub reason: String,
    /// Fee paid to the verifier.
    pub fee: Credits,
}

/// Everything the ledger says about one job.
#[derive(Debug, Clone)]
pub struct JobRecord {
    /// The job id.
    pub id: JobId,
    /// The manifest as submitted (emptied once the job is finished).
    pub manifest: String,
    /// The manifest parsed, when it parses and yields the terms the job has on the ledger.
    pub parsed: Option<Manifest>,
    /// The submitter.
    pub submitter: PeerKey,
    /// Escrow put up.
    pub escrow: Credits,
    /// The block that holds the submission.
    pub height: u64,
    /// Recorded rounds, by round.
    pub rounds: BTreeMap<u64, RecordedRound>,
    /// Verdicts, in ledger order.
    pub verdicts: Vec<RecordedVerdict>,
    /// Peers paid for accepted contributions.
    pub contributors: BTreeSet<PeerKey>,
    /// The block in which its submitter closed it, if it did.
    pub closed_height: Option<u64>,
}

impl JobRecord {
    /// Rounds the job trains (0 when its manifest does not parse).
    pub fn rounds_total(&self) -> u64 {
        self.parsed.as_ref().map_or(0, |m| m.rounds)
    }

    /// Whether the job's last round is recorded.
    pub fn finished(&self) -> bool {
        let total = self.rounds_total();
        total > 0 && self.rounds.contains_key(&total)
    }

    /// Whether peers should still train it: its manifest parses with the terms on the ledger,
    /// and it is neither finished nor closed.
    pub fn open(&self) -> bool {
        self.parsed.is_some() && !self.finished() && self.closed_height.is_none()
    }
}

/// One line of `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Job id (hex).
    pub id: String,
    /// The manifest's `job` name ("" when it does not parse).
    pub name: String,
    /// Submitter (PeerId).
    pub submitter: String,
    /// Escrow put up.
    pub escrow: Credits,
    /// Escrow that remains.
    pub escrow_remaining: Credits,
    /// Rounds the job trains.
    pub rounds: u64,
    /// Rounds recorded on the ledger.
    pub rounds_recorded: usize,
    /// The last round is recorded.
    pub finished: bool,
    /// Its submitter closed it (the escrow left went back to the submitter).
    #[serde(default)]
    pub closed: bool,
}

/// `GET /v1/jobs/<id>`: a job's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    /// The summary.
    #[serde(flatten)]
    pub summary: JobSummary,
    /// The block that holds the submission.
    pub submitted_height: u64,
    /// Payment terms (none when the manifest does not parse).
    pub pay: Option<Pay>,
    /// Rounds recorded on the ledger, by round.
    pub recorded: Vec<RecordedRound>,
    /// Verdicts recorded on the ledger.
    pub verdicts: Vec<RecordedVerdict>,
    /// Peers paid for contributions (PeerIds).
    pub contributors: Vec<String>,
    /// The job's committee: the peers whose round votes decide its results (PeerIds).
    #[serde(default)]
    pub committee: Vec<String>,
    /// This node's own progress, when it trains or trained the job.
    pub local: Option<TrainingStatus>,
}

/// Body of `POST /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitJobRequest {
    /// The manifest (YAML text).
    pub manifest: String,
    /// Credits to put in escrow [default: rounds × replicas.max × (per_contribution +
    /// per_verdict)].
    pub escrow: Option<Credits>,
    /// Directory a relative dataset path is taken from [default: the node's data directory].
    pub base_dir: Option<String>,
}

/// Answer of `POST /v1/jobs/<id>/close`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloseJobReply {
    /// The job id (hex).
    pub job_id: String,
    /// The escrow that goes back to the submitter once the entry is final.
    pub refund: Credits,
}

/// Answer of `POST /v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitJobReply {
    /// The job id (hex).
    pub job_id: String,
    /// The escrow put up.
    pub escrow: Credits,
}

/// The jobs on the finalized ledger, folded block by block.
#[derive(Debug, Default)]
pub struct JobBook {
    next_height: u64,
    credits: CreditState,
    jobs: BTreeMap<JobId, JobRecord>,
}

/// The book shared by the ledger follower, the control API and the job runners.
pub type SharedJobBook = Arc<Mutex<JobBook>>;

impl JobBook {
    /// The height of the next block to fold.
    pub fn next_height(&self) -> u64 {
        self.next_height
    }

    /// The credit state at the folded tip.
    pub fn credits(&self) -> &CreditState {
        &self.credits
    }

    /// A job's record.
    pub fn get(&self, id: &JobId) -> Option<&JobRecord> {
        self.jobs.get(id)
    }

    /// Every job, in id order.
    pub fn jobs(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values()
    }

    /// Folds the next finalized block (blocks out of order are refused).
    pub fn apply(&mut self, block: &Block) -> Result<(), String> {
        if block.height != self.next_height {
            return Err(format!(
                "block {} while expecting {}",
                block.height, self.next_height
            ));
        }
        self.credits
            .apply_block(block)
            .map_err(|e| format!("block {}: {e}", block.height))?;
        for signed in &block.entries {
            self.record(block.height, &signed.author, &signed.entry);
        }
        self.next_height += 1;
        Ok(())
    }

    fn record(&mut self, height: u64, author: &PeerKey, entry: &Entry) {
        match entry {
            Entry::JobSubmitted {
                job,
                escrow,
                manifest,
                terms,
            } => {
                self.jobs.insert(
                    *job,
                    JobRecord {
                        id: *job,
                        manifest: manifest.clone(),
                        // A manifest whose terms are not the ones on the ledger is not trained:
                        // its rounds could not be paid as it promises.
                        parsed: Manifest::parse(manifest)
                            .ok()
                            .filter(|m| m.ledger_terms() == *terms),
                        submitter: *author,
                        escrow: *escrow,
                        height,
                        rounds: BTreeMap::new(),
                        verdicts: Vec::new(),
                        contributors: BTreeSet::new(),
                        closed_height: None,
                    },
                );
            }
            Entry::JobClosed { job } => {
                if let Some(record) = self.jobs.get_mut(job) {
                    record.closed_height = Some(height);
                    record.manifest = String::new();
                }
            }
            Entry::RoundResult {
                job,
                round,
                model_hash,
                accepted,
                rejected,
                ..
            } => {
                if let Some(record) = self.jobs.get_mut(job) {
                    record.rounds.insert(
                        *round,
                        RecordedRound {
                            round: *round,
                            model_hash: hex(model_hash),
                            accepted: accepted.len(),
                            rejected: rejected.len(),
                            paid: accepted.iter().map(|(_, c)| *c).sum(),
                            coordinator: peer_name(author),
                            height,
                        },
                    );
                    record
                        .contributors
                        .extend(accepted.iter().map(|(peer, _)| *peer));
                    if record.finished() {
                        // Only unfinished jobs are picked up: the text is not needed any more.
                        record.manifest = String::new();
                    }
                }
            }
            Entry::Verdict {
                job,
                round,
                subject,
                accepted,
                reason,
                fee,
            } => {
                if let Some(record) = self.jobs.get_mut(job) {
                    record.verdicts.push(RecordedVerdict {
                        round: *round,
                        subject: peer_name(subject),
                        verifier: peer_name(author),
                        accepted: *accepted,
                        reason: reason.clone(),
                        fee: *fee,
                    });
                }
            }
            _ => {}
        }
    }

    /// The job whose hex id starts with `prefix`.
    pub fn resolve(&self, prefix: &str) -> Result<&JobRecord, JobError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.is_empty() || prefix.len() > 64 || !prefix.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(JobError::BadId(prefix));
        }
        let mut found = self
            .jobs
            .values()
            .filter(|r| hex(&r.id).starts_with(&prefix));
        match (found.next(), found.count()) {
            (None, _) => Err(JobError::Unknown(prefix)),
            (Some(record), 0) => Ok(record),
            (Some(_), more) => Err(JobError::Ambiguous {
                prefix,
                count: more + 1,
            }),
        }
    }

    /// The summary of a job.
    pub fn summary(&self, record: &JobRecord) -> JobSummary {
        JobSummary {
            id: hex(&record.id),
            name: record
                .parsed
                .as_ref()
                .map(|m| m.job.clone())
                .unwrap_or_default(),
            submitter: peer_name(&record.submitter),
            escrow: record.escrow,
            escrow_remaining: self.credits.escrow(&record.id),
            rounds: record.rounds_total(),
            rounds_recorded: record.rounds.len(),
            finished: record.finished(),
            closed: record.closed_height.is_some(),
        }
    }

    /// The status of a job, with this node's progress when it is the job `local` reports.
    pub fn status(&self, record: &JobRecord, local: Option<TrainingStatus>) -> JobStatus {
        let id = hex(&record.id);
        JobStatus {
            summary: self.summary(record),
            submitted_height: record.height,
            pay: record.parsed.as_ref().map(|m| m.pay),
            recorded: record.rounds.values().cloned().collect(),
            verdicts: record.verdicts.clone(),
            contributors: record.contributors.iter().map(peer_name).collect(),
            committee: self.credits.committee(&record.id).map(peer_name).collect(),
            local: local.filter(|l| l.job_id == id),
        }
    }
}

/// Folds every finalized block of `store` into `book`, then keeps following it until the
/// process ends.
pub async fn follow_ledger(store: SharedLedgerStore, book: SharedJobBook) {
    // A block the book cannot fold is reported once; the book then waits at that height.
    let mut stuck_at = None;
    loop {
        let from = book.lock().unwrap_or_else(|e| e.into_inner()).next_height;
        let reader = store.clone();
        let batch = tokio::task::spawn_blocking(move || {
            reader
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .range(from, FOLLOW_BATCH)
        })
        .await;
        let blocks = match batch {
            Ok(Ok(blocks)) => blocks,
            Ok(Err(error)) => {
                if stuck_at.replace(from) != Some(from) {
                    tracing::warn!(%error, "job book cannot read the ledger");
                }
                Vec::new()
            }
            Err(_) => return,
        };
        let mut full = blocks.len() == FOLLOW_BATCH;
        {
            let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
            for (block, _) in &blocks {
                if let Err(error) = book.apply(block) {
                    if stuck_at.replace(block.height) != Some(block.height) {
                        tracing::error!(%error, "job book refused a finalized block");
                    }
                    full = false;
                    break;
                }
            }
        }
        if !full {
            tokio::time::sleep(FOLLOW_INTERVAL).await;
        }
    }
}

/// A manifest checked for submission: its job id and the escrow to put up.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The manifest.
    pub manifest: Manifest,
    /// The job id.
    pub id: JobId,
    /// Escrow to put up.
    pub escrow: Credits,
}

/// Checks manifest text for submission as `loom-peer train` would (the dataset is loaded to
/// compute the job id; a relative file path is taken from `base`) and settles the escrow.
pub fn check_submission(
    text: &str,
    escrow: Option<Credits>,
    base: &Path,
) -> Result<Submission, JobError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(JobError::ManifestTooLarge { bytes: text.len() });
    }
    let manifest = Manifest::parse(text)?;
    let escrow = escrow.unwrap_or_else(|| manifest.default_escrow());
    let needed = manifest.min_escrow();
    if escrow < needed {
        return Err(JobError::EscrowTooSmall { escrow, needed });
    }
    let job = manifest.into_job(base)?;
    Ok(Submission {
        manifest: job.manifest,
        id: job.id,
        escrow,
    })
}

/// What a round costs and how it is paid, for [`round_entries`].
#[derive(Debug, Clone, Copy)]
pub struct RoundTerms {
    /// The job.
    pub job: JobId,
    /// The job's terms, as on the ledger (rounds, most contributors, pay).
    pub terms: JobTerms,
    /// Escrow left for this coordinator to spend (the ledger's, less its own pending entries).
    pub available: Credits,
}

impl RoundTerms {
    /// Most contributions a round counts.
    fn max_contributors(&self) -> usize {
        self.terms.max_contributors as usize
    }

    /// What the contributions of the rounds after `round` may need from the escrow: verdict
    /// fees never touch it.
    fn reserve_after(&self, round: u64) -> Credits {
        self.terms
            .rounds
            .saturating_sub(round)
            .saturating_mul(Credits::from(self.terms.max_contributors))
            .saturating_mul(self.terms.per_contribution)
    }
}

fn keys(hexes: impl Iterator<Item = String>, limit: usize) -> Vec<PeerKey> {
    let mut seen = BTreeSet::new();
    hexes
        .filter_map(|h| unhex(&h).and_then(|b| PeerKey::try_from(b.as_slice()).ok()))
        .filter(|k| seen.insert(*k))
        .take(limit)
        .collect()
}

fn clip_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// The model hash of `report`, when it names one.
pub fn report_model_hash(report: &RoundReport) -> Option<[u8; 32]> {
    unhex(&report.model_hash).and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
}

/// The contributors `report`'s round aggregated and the ones it refused (never both), at most
/// the terms' `max_contributors` each.
fn round_sets(terms: &RoundTerms, report: &RoundReport) -> (Vec<PeerKey>, Vec<PeerKey>) {
    let accepted = keys(report.accepted.iter().cloned(), terms.max_contributors());
    let refused = keys(
        report.refused.iter().map(|r| r.author.clone()),
        terms.max_contributors(),
    )
    .into_iter()
    .filter(|k| !accepted.contains(k))
    .collect();
    (accepted, refused)
}

/// What the committee's votes on the ledger (`credits`) let this peer record for `report`'s
/// round: `None` until a quorum voted for the model and accepted set it applied (or for a round
/// it did not apply), else whom the result may slash ([`CreditState::voted_result`]).
pub fn voted_result(
    credits: &CreditState,
    terms: &RoundTerms,
    report: &RoundReport,
) -> Option<BTreeSet<PeerKey>> {
    let Some(Entry::RoundVote {
        model_hash,
        accepted_digest,
        ..
    }) = vote_entry(terms, report)
    else {
        return None;
    };
    credits.voted_result(&terms.job, report.round, &model_hash, &accepted_digest)
}

/// This peer's vote on `report`'s round as a member of the job's committee: the model it
/// reached, the digest of the contributors it aggregated, and the ones it refused. `None` for a
/// round it did not apply itself (resynced past: its accepted set is unknown here).
pub fn vote_entry(terms: &RoundTerms, report: &RoundReport) -> Option<Entry> {
    if report.accepted.is_empty() {
        return None;
    }
    let model_hash = report_model_hash(report)?;
    let (accepted, rejected) = round_sets(terms, report);
    Some(Entry::RoundVote {
        job: terms.job,
        round: report.round,
        model_hash,
        accepted_digest: accepted_digest(&accepted),
        rejected,
    })
}

/// This peer's votes, after a resync, on the rounds of the loaded model's announced lineage
/// (`report.adopted`): the model and the accepted-set digest most announcers gave, refusing
/// nobody (it did not see those rounds' contributions).
pub fn adopted_votes(terms: &RoundTerms, report: &RoundReport) -> Vec<Entry> {
    report
        .adopted
        .iter()
        .filter(|adopted| (1..=terms.terms.rounds).contains(&adopted.round))
        .filter_map(|adopted| {
            let hash =
                |text: &str| unhex(text).and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok());
            Some(Entry::RoundVote {
                job: terms.job,
                round: adopted.round,
                model_hash: hash(&adopted.model_hash)?,
                accepted_digest: hash(&adopted.accepted_digest)?,
                rejected: Vec::new(),
            })
        })
        .collect()
}

/// Whether two round votes choose the same model and accepted set.
pub fn same_choice(a: &Entry, b: &Entry) -> bool {
    matches!(
        (a, b),
        (
            Entry::RoundVote { model_hash: ma, accepted_digest: da, .. },
            Entry::RoundVote { model_hash: mb, accepted_digest: db, .. },
        ) if ma == mb && da == db
    )
}

/// The entries the coordinator of `report`'s round submits: the round's result, then a verdict
/// per refused contribution; and the credits they take from the escrow in total. The result
/// slashes only the refused contributors in `slashable` (those a quorum of the job committee's
/// votes refused, [`CreditState::voted_result`]).
pub fn round_entries(
    terms: &RoundTerms,
    report: &RoundReport,
    slashable: &BTreeSet<PeerKey>,
) -> (Vec<Entry>, Credits) {
    let (accepted, refused) = round_sets(terms, report);
    let accepted: Vec<PeerKey> = accepted
        .into_iter()
        .filter(|k| report.evidence_of(k).is_some())
        .collect();
    let rejected: Vec<PeerKey> = refused
        .iter()
        .filter(|k| report.evidence_of(k).is_some() && slashable.contains(*k))
        .copied()
        .collect();
    let evidence = accepted
        .iter()
        .chain(&rejected)
        .filter_map(|k| report.evidence_of(k).cloned())
        .collect();
    let each = if accepted.is_empty() {
        0
    } else {
        terms
            .terms
            .per_contribution
            .min(terms.available / accepted.len() as Credits)
    };
    let paid = each * accepted.len() as Credits;
    let mut entries = vec![Entry::RoundResult {
        job: terms.job,
        round: report.round,
        model_hash: report_model_hash(report).unwrap_or([0; 32]),
        accepted: accepted.iter().map(|k| (*k, each)).collect(),
        rejected,
        evidence,
    }];
    // Verdict fees come from what the remaining rounds' contributions do not need.
    let reserve = terms.reserve_after(report.round);
    let mut budget = terms.available.saturating_sub(paid).saturating_sub(reserve);
    let mut spent = paid;
    for subject in &refused {
        let reason = report
            .refused
            .iter()
            .find(|r| unhex(&r.author).is_some_and(|b| b.as_slice() == subject.as_slice()))
            .map(|r| clip_reason(&r.reason))
            .unwrap_or_default();
        let fee = terms.terms.per_verdict.min(budget);
        budget -= fee;
        spent += fee;
        entries.push(Entry::Verdict {
            job: terms.job,
            round: report.round,
            subject: *subject,
            accepted: false,
            reason,
            fee,
        });
    }
    (entries, spent)
}

/// The verdicts this peer made as an assigned verifier of audits (`report.audits`), each paid
/// `pay.per_verdict` from what the remaining rounds' contributions do not need; and the credits
/// they take in total.
pub fn audit_entries(terms: &RoundTerms, report: &RoundReport) -> (Vec<Entry>, Credits) {
    let reserve = terms.reserve_after(report.round);
    let mut budget = terms.available.saturating_sub(reserve);
    let mut spent = 0;
    let mut entries = Vec::new();
    for audit in report.audits.iter().take(terms.max_contributors()) {
        let Some(subject) =
            unhex(&audit.subject).and_then(|b| PeerKey::try_from(b.as_slice()).ok())
        else {
            continue;
        };
        let fee = terms.terms.per_verdict.min(budget);
        budget -= fee;
        spent += fee;
        entries.push(Entry::Verdict {
            job: terms.job,
            round: audit.round,
            subject,
            accepted: audit.passed,
            reason: if audit.passed {
                String::new()
            } else {
                clip_reason(&format!(
                    "failed its audit: cosine {:.3} with the recomputation",
                    audit.cosine
                ))
            },
            fee,
        });
    }
    (entries, spent)
}

/// A one-member ledger for tests: signed entries, a genesis, blocks.
#[cfg(test)]
pub(crate) mod testing {
    use loom_protocols::{
        PeerKey,
        contribution::{Commitment, SignedCommitment},
        ledger::{Block, Credits, Entry, JobId, SignedEntry},
    };

    /// The member and its key.
    pub(crate) struct TestLedger {
        key: ed25519_dalek::SigningKey,
        /// The member.
        pub me: PeerKey,
    }

    impl TestLedger {
        /// A member from a key seed.
        pub(crate) fn new(seed: u8) -> Self {
            let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
            let me = key.verifying_key().to_bytes();
            Self { key, me }
        }

        /// `entry` signed by the member.
        pub(crate) fn sign(&self, entry: Entry) -> SignedEntry {
            SignedEntry::sign(entry, self.me, |m| {
                ed25519_dalek::Signer::sign(&self.key, m)
                    .to_bytes()
                    .to_vec()
            })
        }

        /// A genesis that mints `mint` to the member.
        pub(crate) fn genesis(&self, mint: Credits) -> Block {
            loom_protocols::ledger_state::make_genesis(
                &self.key,
                "t",
                true,
                None,
                &[self.me],
                &[(self.me, mint)],
                0,
            )
            .0
        }

        /// The signed commitment of the peer of key seed `seed` to `job`'s round `round`.
        pub(crate) fn commitment(seed: u8, job: JobId, round: u64) -> (PeerKey, SignedCommitment) {
            let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
            let author = key.verifying_key().to_bytes();
            let signed = Commitment {
                job_id: job,
                round,
                blob_hash: [seed; 32],
                blob_len: 1,
                author,
            }
            .seal(|m| ed25519_dalek::Signer::sign(&key, m).to_bytes().to_vec());
            (author, signed)
        }

        /// A block at `height` (the job book does not check the chain).
        pub(crate) fn block(&self, height: u64, entries: Vec<SignedEntry>) -> Block {
            Block {
                height,
                prev_hash: [0; 32],
                proposer: self.me,
                timestamp_unix_ms: height,
                entries,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loom_actors::RefusedContribution;

    const MANIFEST: &str = "\
job: book-test
replicas: {min: 1, max: 4}
model: {kind: mlp, hidden: 8, layers: 1, embed: 4, context: 4}
dataset: {source: builtin, seed: 5, chars: 5000}
strategy: {kind: diloco, inner_steps: 2}
rounds: 3
pay: {per_contribution: 5, per_verdict: 2}
";

    fn key(seed: u8) -> PeerKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .verifying_key()
            .to_bytes()
    }

    /// A report of `round` of job `[3; 32]` with the accepted and refused peers of the given
    /// key seeds, each with its signed commitment as evidence.
    fn report(round: u64, accepted: &[u8], refused: &[u8]) -> RoundReport {
        let mut seeds: Vec<u8> = accepted.iter().chain(refused).copied().collect();
        seeds.sort_unstable();
        seeds.dedup();
        RoundReport {
            round,
            evidence: seeds
                .iter()
                .map(|&seed| testing::TestLedger::commitment(seed, [3; 32], round))
                .collect(),
            model_hash: hex(&[round as u8; 32]),
            closed_by_me: true,
            accepted: accepted.iter().map(|s| hex(&key(*s))).collect(),
            refused: refused
                .iter()
                .map(|s| RefusedContribution {
                    author: hex(&key(*s)),
                    reason: "norm too large".into(),
                })
                .collect(),
            ..RoundReport::default()
        }
    }

    fn terms(available: Credits) -> RoundTerms {
        RoundTerms {
            job: [3; 32],
            terms: JobTerms {
                rounds: 3,
                max_contributors: 4,
                per_contribution: 5,
                per_verdict: 2,
            },
            available,
        }
    }

    /// Every peer a test round may slash.
    fn anyone() -> BTreeSet<PeerKey> {
        (0..8).map(key).collect()
    }

    #[test]
    fn a_round_pays_its_contributors_and_its_verdicts() {
        let (entries, spent) =
            round_entries(&terms(1_000), &report(1, &[1, 2, 2], &[3]), &anyone());
        assert_eq!(entries.len(), 2);
        match &entries[0] {
            Entry::RoundResult {
                round,
                accepted,
                rejected,
                model_hash,
                ..
            } => {
                assert_eq!(*round, 1);
                assert_eq!(accepted, &vec![(key(1), 5), (key(2), 5)], "deduplicated");
                assert_eq!(rejected, &vec![key(3)]);
                assert_eq!(model_hash, &[1; 32]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &entries[1],
            Entry::Verdict { subject, accepted: false, fee: 2, reason, .. }
                if *subject == key(3) && reason == "norm too large"
        ));
        assert_eq!(spent, 12);
        // A refusal too few of the committee's votes share is not slashed; its verdict stays.
        let (entries, _) =
            round_entries(&terms(1_000), &report(1, &[1, 2], &[3]), &BTreeSet::new());
        assert!(matches!(&entries[0], Entry::RoundResult { rejected, .. } if rejected.is_empty()));
        assert!(matches!(&entries[1], Entry::Verdict { subject, .. } if *subject == key(3)));
    }

    /// A member's vote names the model, the digest of the accepted set (whatever its order)
    /// and the refused contributors; a round this peer did not apply gets no vote.
    #[test]
    fn a_vote_names_the_model_the_accepted_set_and_the_refused() {
        let vote = vote_entry(&terms(1_000), &report(2, &[2, 1], &[3])).expect("a vote");
        assert_eq!(
            vote,
            Entry::RoundVote {
                job: [3; 32],
                round: 2,
                model_hash: [2; 32],
                accepted_digest: accepted_digest(&[key(1), key(2)]),
                rejected: vec![key(3)],
            }
        );
        assert_eq!(vote_entry(&terms(1_000), &report(2, &[], &[3])), None);
    }

    /// The result backs every peer it pays or slashes with the peer's commitment: one this
    /// peer holds no commitment of is neither paid nor slashed (a refused one still gets its
    /// verdict), and the replicas' credit fold takes the result.
    #[test]
    fn a_round_result_carries_the_contributors_commitments() {
        let mut partial = report(1, &[1, 2], &[3, 4]);
        partial
            .evidence
            .retain(|(author, _)| *author != key(2) && *author != key(4));
        let (entries, _) = round_entries(&terms(1_000), &partial, &anyone());
        let Entry::RoundResult {
            accepted,
            rejected,
            evidence,
            ..
        } = &entries[0]
        else {
            panic!("{entries:?}");
        };
        assert_eq!(accepted, &vec![(key(1), 5)]);
        assert_eq!(rejected, &vec![key(3)]);
        let authors: Vec<PeerKey> = evidence
            .iter()
            .map(|signed| signed.verify().expect("verifies").author)
            .collect();
        assert_eq!(authors, vec![key(1), key(3)]);
        let subjects: Vec<PeerKey> = entries[1..]
            .iter()
            .filter_map(|e| match e {
                Entry::Verdict { subject, .. } => Some(*subject),
                _ => None,
            })
            .collect();
        assert_eq!(subjects, vec![key(3), key(4)]);
        let ledger = testing::TestLedger::new(1);
        let mut book = JobBook::default();
        book.apply(&ledger.genesis(1_000)).expect("genesis");
        book.apply(&ledger.block(
            1,
            vec![ledger.sign(Entry::JobSubmitted {
                job: [3; 32],
                escrow: 100,
                manifest: MANIFEST.into(),
                terms: Manifest::parse(MANIFEST).expect("manifest").ledger_terms(),
            })],
        ))
        .expect("job");
        // Peer 1 is the committee, and voted for what the result records.
        let mut signed = vec![
            ledger.sign(Entry::JobJoined { job: [3; 32] }),
            ledger.sign(Entry::RoundVote {
                job: [3; 32],
                round: 1,
                model_hash: [1; 32],
                accepted_digest: accepted_digest(&[key(1)]),
                rejected: vec![key(3)],
            }),
        ];
        signed.extend(entries.into_iter().map(|e| ledger.sign(e)));
        book.apply(&ledger.block(2, signed))
            .expect("the replicas take the result");
        // Peer 1 is also the submitter and the verifier: 1 000 minted, 100 escrowed, 5 paid
        // for its contribution and two verdict fees of 2.
        assert_eq!(book.credits().balance(&key(1)), 1_000 - 100 + 5 + 2 * 2);
        assert_eq!(book.credits().escrow(&[3; 32]), 100 - 5 - 2 * 2);
    }

    /// A job whose manifest does not yield the terms it was put on the ledger with is listed
    /// but not trained.
    #[test]
    fn a_job_whose_terms_differ_from_its_manifest_is_not_trained() {
        let ledger = testing::TestLedger::new(1);
        let mut book = JobBook::default();
        book.apply(&ledger.genesis(1_000)).expect("genesis");
        let mut terms = Manifest::parse(MANIFEST).expect("manifest").ledger_terms();
        terms.per_contribution = 1;
        book.apply(&ledger.block(
            1,
            vec![ledger.sign(Entry::JobSubmitted {
                job: [5; 32],
                escrow: 100,
                manifest: MANIFEST.into(),
                terms,
            })],
        ))
        .expect("job");
        let record = book.get(&[5; 32]).expect("listed");
        assert!(record.parsed.is_none());
        assert!(!record.open());
    }

    #[test]
    fn audit_verdicts_pay_their_verifier_from_what_the_rounds_do_not_need() {
        let mut audited = report(1, &[], &[]);
        audited.audits = vec![
            loom_actors::exchanger::AuditRecord {
                round: 1,
                subject: hex(&key(2)),
                verifier: hex(&key(1)),
                cosine: 0.9,
                passed: true,
            },
            loom_actors::exchanger::AuditRecord {
                round: 1,
                subject: hex(&key(3)),
                verifier: hex(&key(1)),
                cosine: 0.1,
                passed: false,
            },
        ];
        let (entries, spent) = audit_entries(&terms(1_000), &audited);
        assert_eq!(spent, 4);
        assert!(matches!(
            &entries[0],
            Entry::Verdict { subject, accepted: true, fee: 2, reason, .. }
                if *subject == key(2) && reason.is_empty()
        ));
        assert!(matches!(
            &entries[1],
            Entry::Verdict { subject, accepted: false, fee: 2, reason, .. }
                if *subject == key(3) && reason.contains("0.100")
        ));
        // 2 rounds × 4 × 5 = 40 reserved: nothing left for fees.
        let (_, spent) = audit_entries(&terms(40), &audited);
        assert_eq!(spent, 0);
    }

    #[test]
    fn payments_are_clipped_to_the_escrow_and_verdicts_leave_the_reserve() {
        // Round 1 of 3 with 45 left: 2 × 5 paid, 2 rounds × 4 × 5 = 40 reserved, no fee left.
        let (entries, spent) = round_entries(&terms(45), &report(1, &[1, 2], &[3]), &anyone());
        assert_eq!(spent, 10);
        assert!(matches!(entries[1], Entry::Verdict { fee: 0, .. }));
        // Less escrow than the payments: each is clipped, the result still goes on the ledger.
        let (entries, spent) = round_entries(&terms(7), &report(3, &[1, 2], &[]), &anyone());
        assert_eq!(spent, 6);
        assert!(matches!(
            &entries[0],
            Entry::RoundResult { accepted, .. } if accepted.iter().all(|(_, c)| *c == 3)
        ));
        // Nothing left: a result that pays nothing.
        let (entries, spent) = round_entries(&terms(0), &report(3, &[1], &[]), &anyone());
        assert_eq!((entries.len(), spent), (1, 0));
        // Garbage keys are dropped, and one peer is never both accepted and refused.
        let mut odd = report(2, &[1], &[1, 4]);
        odd.accepted.push("zz".into());
        let (entries, _) = round_entries(&terms(100), &odd, &anyone());
        assert!(matches!(
            &entries[0],
            Entry::RoundResult { accepted, rejected, .. }
                if accepted.len() == 1 && rejected == &vec![key(4)]
        ));
    }

    #[test]
    fn the_book_follows_jobs_rounds_and_escrow() {
        let ledger = super::testing::TestLedger::new(1);
        let sign = |entry: Entry| ledger.sign(entry);
        let genesis = ledger.genesis(1_000);
        let job = [3; 32];
        let block = |height: u64, entries| ledger.block(height, entries);
        let mut book = JobBook::default();
        book.apply(&genesis).expect("genesis");
        assert!(book.apply(&block(5, vec![])).is_err(), "out of order");
        book.apply(&block(
            1,
            vec![sign(Entry::JobSubmitted {
                job,
                escrow: 100,
                manifest: MANIFEST.into(),
                terms: Manifest::parse(MANIFEST).expect("manifest").ledger_terms(),
            })],
        ))
        .expect("job");
        let round = report(3, &[2], &[5]);
        let (entries, _) = round_entries(&terms(100), &round, &anyone());
        let mut committee = vec![
            Entry::JobJoined { job },
            vote_entry(&terms(100), &round).expect("vote"),
        ];
        committee.extend(entries);
        book.apply(&block(2, committee.into_iter().map(sign).collect()))
            .expect("round 3");
        let record = book.resolve(&hex(&job)[..6]).expect("by prefix");
        assert!(record.finished(), "round 3 of 3 is recorded");
        let status = book.status(record, None);
        assert_eq!(status.summary.name, "book-test");
        assert_eq!(status.summary.escrow, 100);
        assert_eq!(status.summary.escrow_remaining, 100 - 5 - 2);
        assert_eq!(status.recorded[0].accepted, 1);
        assert_eq!(status.verdicts.len(), 1);
        assert_eq!(status.contributors, vec![peer_name(&key(2))]);
        assert_eq!(status.committee, vec![peer_name(&ledger.me)]);
        assert!(matches!(book.resolve("ff"), Err(JobError::Unknown(_))));
        assert!(matches!(book.resolve("xyz"), Err(JobError::BadId(_))));
        assert!(matches!(book.resolve(""), Err(JobError::BadId(_))));
        assert!(!record.open(), "finished");
        // The submitter closes it: the escrow left comes back and the book says so.
        let before = book.credits().balance(&ledger.me);
        book.apply(&block(3, vec![sign(Entry::JobClosed { job })]))
            .expect("closed");
        let record = book.get(&job).expect("still listed");
        assert_eq!(record.closed_height, Some(3));
        assert!(book.summary(record).closed);
        assert_eq!(book.summary(record).escrow_remaining, 0);
        assert_eq!(book.credits().balance(&ledger.me), before + 100 - 5 - 2);
    }

    #[test]
    fn a_closed_job_is_not_open_for_training() {
        let ledger = super::testing::TestLedger::new(1);
        let sign = |entry: Entry| ledger.sign(entry);
        let job = [4; 32];
        let mut book = JobBook::default();
        book.apply(&ledger.genesis(1_000)).expect("genesis");
        book.apply(&ledger.block(
            1,
            vec![sign(Entry::JobSubmitted {
                job,
                escrow: 100,
                manifest: MANIFEST.into(),
                terms: Manifest::parse(MANIFEST).expect("manifest").ledger_terms(),
            })],
        ))
        .expect("job");
        assert!(book.get(&job).expect("job").open());
        book.apply(&ledger.block(2, vec![sign(Entry::JobClosed { job })]))
            .expect("closed");
        let record = book.get(&job).expect("job");
        assert!(!record.open() && !record.finished());
        assert!(record.manifest.is_empty(), "no longer needed");
    }

    #[test]
    fn a_submission_is_checked_like_a_training_run() {
        let base = Path::new(".");
        let ok = check_submission(MANIFEST, None, base).expect("valid");
        assert_eq!(ok.escrow, 3 * 4 * (5 + 2));
        assert_eq!(ok.id, ok.manifest.job_id(&ok_fingerprint()));
        let short = check_submission(MANIFEST, Some(59), base).expect_err("short");
        assert_eq!(
            short.to_string(),
            "escrow 59 is less than rounds × replicas.max × pay.per_contribution = 60"
        );
        let bad = check_submission(&MANIFEST.replace("rounds: 3", "rounds: 0"), None, base)
            .expect_err("bad");
        assert!(bad.to_string().contains("`rounds`"), "{bad}");
        let long = format!("{MANIFEST}#{}\n", "x".repeat(MAX_MANIFEST_BYTES));
        assert!(matches!(
            check_submission(&long, None, base),
            Err(JobError::ManifestTooLarge { .. })
        ));
    }

    fn ok_fingerprint() -> [u8; 32] {
        loom_trainer::Dataset::builtin(5, 5000).fingerprint()
    }
}
