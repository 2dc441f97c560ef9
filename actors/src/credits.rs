//! The CreditAccounting actor: balances, escrow, reputation and each peer's earnings history,
//! all derived from the finalized ledger and nothing else.
//!
//! On start it replays the stored chain; afterwards the ledger replica sends it every finalized
//! block in height order. Because the numbers are a deterministic fold
//! ([`loom_protocols::credits::CreditState`]), every replica reports the same balances for the same
//! height, and conservation (minted = balances + escrow) is checked after every block.

use std::collections::BTreeMap;

use loom_protocols::{
    PeerKey,
    credits::CreditState,
    ledger::{Block, Credits, Entry},
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::ledger::SharedLedgerStore;

/// What one peer earned, paid and lost, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCredits {
    /// The peer.
    pub peer: PeerKey,
    /// Its balance.
    pub balance: Credits,
    /// Its reputation.
    pub reputation: i64,
    /// Paid for accepted training contributions.
    pub earned_training: Credits,
    /// Paid for verification verdicts.
    pub earned_verifying: Credits,
    /// Put in escrow for jobs it submitted.
    pub escrowed: Credits,
    /// Escrow returned when it closed its jobs.
    #[serde(default)]
    pub refunded: Credits,
    /// Taken for rejected contributions.
    pub slashed: Credits,
    /// Accepted contributions.
    pub accepted: u64,
    /// Rejected contributions.
    pub rejected: u64,
    /// Received in transfers and mints.
    pub received: Credits,
    /// Sent in transfers.
    pub sent: Credits,
}

/// The accounting at one height.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditReport {
    /// The next height (blocks folded).
    pub next_height: u64,
    /// Everything ever minted.
    pub minted: u128,
    /// Sum of balances.
    pub balances_total: u128,
    /// Sum of escrow.
    pub escrow_total: u128,
    /// minted == balances + escrow.
    pub conserved: bool,
    /// Every peer the ledger mentions.
    pub peers: Vec<PeerCredits>,
}

/// The fold with per-peer history.
#[derive(Debug, Clone, Default)]
pub struct CreditBook {
    state: CreditState,
    next_height: u64,
    history: BTreeMap<PeerKey, PeerCredits>,
}

impl CreditBook {
    /// Folds the next finalized block. Blocks out of order are refused.
    pub fn apply(&mut self, block: &Block) -> Result<(), String> {
        if block.height != self.next_height {
            return Err(format!(
                "block {} while expecting {}",
                block.height, self.next_height
            ));
        }
        // The block applies whole or not at all; then each entry is replayed on the book's own
        // state to attribute it (the slashes need the balance before the entry).
        let mut whole = self.state.clone();
        whole.apply_block(block).map_err(|e| e.to_string())?;
        for signed in &block.entries {
            // What an entry takes depends on the state before it: the balances of the slashed,
            // the escrow a closed job returns.
            let slashed_before: Vec<(PeerKey, Credits)> = match &signed.entry {
                Entry::RoundResult { rejected, .. } => rejected
                    .iter()
                    .map(|p| (*p, self.state.balance(p)))
                    .collect(),
                Entry::JobClosed { job } => vec![(signed.author, self.state.escrow(job))],
                _ => Vec::new(),
            };
            self.state
                .apply_finalized_entry(&signed.author, &signed.entry)
                .map_err(|e| e.to_string())?;
            self.attribute(&slashed_before, &signed.author, &signed.entry);
        }
        debug_assert_eq!(self.state, whole);
        self.state = whole;
        self.next_height += 1;
        if !self.state.check_conservation() {
            return Err(format!(
                "credits not conserved after block {}",
                block.height
            ));
        }
        Ok(())
    }

    fn row(&mut self, peer: &PeerKey) -> &mut PeerCredits {
        self.history.entry(*peer).or_insert_with(|| PeerCredits {
            peer: *peer,
            ..PeerCredits::default()
        })
    }

    fn attribute(
        &mut self,
        slashed_before: &[(PeerKey, Credits)],
        author: &PeerKey,
        entry: &Entry,
    ) {
        match entry {
            Entry::Mint { to, amount } => self.row(to).received += amount,
            Entry::Transfer { to, amount } => {
                self.row(author).sent += amount;
                self.row(to).received += amount;
            }
            Entry::JobSubmitted { escrow, .. } => {
                self.row(author).escrowed += escrow;
            }
            Entry::RoundResult {
                accepted, rejected, ..
            } => {
                for (peer, amount) in accepted {
                    let row = self.row(peer);
                    row.earned_training += amount;
                    row.accepted += 1;
                }
                for peer in rejected {
                    let before = slashed_before
                        .iter()
                        .find(|(p, _)| p == peer)
                        .map_or(0, |(_, b)| *b);
                    let slashed = before.saturating_sub(self.state.balance(peer));
                    let row = self.row(peer);
                    row.slashed += slashed;
                    row.rejected += 1;
                }
            }
            Entry::Verdict { fee, .. } => self.row(author).earned_verifying += fee,
            Entry::JobClosed { .. } => {
                // The escrow the job held before it closed.
                let refund = slashed_before.first().map_or(0, |(_, escrow)| *escrow);
                self.row(author).refunded += refund;
            }
            Entry::Enroll { peer } => {
                self.row(peer);
            }
            Entry::CheckpointPublished { .. }
            | Entry::Ban { .. }
            | Entry::Genesis { .. }
            | Entry::JobJoined { .. }
            | Entry::RoundVote { .. } => {}
        }
    }

    /// The report, for every peer or one.
    pub fn report(&self, only: Option<&PeerKey>) -> CreditReport {
        let balances_total: u128 = self
            .history
            .keys()
            .map(|p| u128::from(self.state.balance(p)))
            .sum();
        let peers = self
            .history
            .values()
            .filter(|row| only.is_none_or(|p| *p == row.peer))
            .map(|row| PeerCredits {
                balance: self.state.balance(&row.peer),
                reputation: self.state.reputation(&row.peer),
                ..row.clone()
            })
            .collect();
        CreditReport {
            next_height: self.next_height,
            minted: self.state.minted(),
            balances_total,
            escrow_total: self.state.minted().saturating_sub(balances_total),
            conserved: self.state.check_conservation(),
            peers,
        }
    }

    /// The fold's state.
    pub fn state(&self) -> &CreditState {
        &self.state
    }
}

/// Messages of the CreditAccounting actor.
#[derive(Debug)]
pub enum CreditsMsg {
    /// The next finalized block.
    Finalized(Box<Block>),
    /// The report for every peer (`None`) or one.
    Report(Option<PeerKey>, RpcReplyPort<CreditReport>),
}

/// The actor.
#[derive(Debug, Default, Clone, Copy)]
pub struct CreditAccounting;

/// Its state.
#[derive(Debug)]
pub struct CreditAccountingState {
    store: SharedLedgerStore,
    book: CreditBook,
}

impl CreditAccountingState {
    /// Folds whatever the store has beyond the book.
    fn catch_up(&mut self) -> Result<(), String> {
        loop {
            let batch = self
                .store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .range(self.book.next_height, 256)
                .map_err(|e| e.to_string())?;
            if batch.is_empty() {
                return Ok(());
            }
            for (block, _) in &batch {
                self.book.apply(block)?;
            }
        }
    }
}

impl Actor for CreditAccounting {
    type Msg = CreditsMsg;
    type State = CreditAccountingState;
    type Arguments = SharedLedgerStore;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        store: SharedLedgerStore,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut state = CreditAccountingState {
            store,
            book: CreditBook::default(),
        };
        state.catch_up().map_err(ActorProcessingErr::from)?;
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            CreditsMsg::Finalized(block) => {
                if block.height == state.book.next_height {
                    if let Err(error) = state.book.apply(&block) {
                        tracing::error!(%error, "credit accounting");
                    }
                } else if block.height > state.book.next_height
                    && let Err(error) = state.catch_up()
                {
                    tracing::error!(%error, "credit accounting");
                }
                metrics::gauge!("loom_credits_minted").set(state.book.state().minted() as f64);
            }
            CreditsMsg::Report(peer, reply) => {
                let _ = reply.send(state.book.report(peer.as_ref()));
            }
        }
        Ok(())
    }
}
