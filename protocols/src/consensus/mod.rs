//! Agreement: Tendermint, as implemented by Malachite's core (`arc-malachitebft-core-consensus`),
//! run sans-I/O for Loom.
//!
//! The engine decides any [`ConsensusValue`]: the ledger's blocks (the default, described
//! below), or a job's round closes ([`crate::round_chain`]). An instance other than the ledger's
//! is named by a chain id ([`ConsensusConfig::with_chain`]) that its votes and proposals sign
//! over, so no signature counts in two instances.
//!
//! Each height of the ledger is decided by the committee (the enrolled, equal-weight members,
//! sorted by key). The proposer of (height, round) is the member at `(height + round) mod n`:
//! Tendermint's round-robin, which is how the peers elect the coordinator of a height by gossip.
//! A proposer that is down, cut off or byzantine costs a round: the others time out, prevote and
//! precommit nil, and the next member in the rotation proposes. Safety holds with fewer than a
//! third of the committee byzantine, whatever the network does; liveness once messages arrive in
//! bounded time again.
//!
//! - [`ConsensusEngine`]: the state machine. Messages, timer expiries and the proposer's block go
//!   in; [`ConsensusAction`]s come out (broadcast, arm a timer, build a block, decided, new round).
//! - [`ConsensusMessage`]: the signed proposals, votes and polka certificates on the wire,
//!   bounded on decode.
//! - A decision comes with a [`QuorumCertificate`](crate::ledger::QuorumCertificate): the
//!   precommits of more than two thirds of the committee for the block at its (height, round),
//!   which any replica checks with [`verify_decided`] when it catches up.
//!
//! What the host owes the engine, beyond carrying out its actions:
//! - Gossip: forward each message the engine accepted ([`ConsensusEngine::handle_message`]
//!   returned `Ok`) to the other members, once (gossipsub's validated forwarding does). Tendermint
//!   is live only if what one correct member received, every correct member receives; a byzantine
//!   member that sends different votes to different halves is otherwise never exposed.
//! - Durability: store [`ConsensusEngine::wal`] before sending a call's broadcasts, and
//!   [`ConsensusEngine::recover`] from it after a restart; otherwise a restarted member may vote
//!   against what it voted before or forget its lock, and count against the byzantine budget.
//! - Catch-up: a member that missed a decision fetches decided (block, certificate) pairs from
//!   others, checks them with [`verify_decided`], and starts the next height.
//!
//! `context` maps Loom's types onto Malachite's `Context`, `effects` answers the core's effects,
//! `engine` drives the core, `types` holds the vocabulary of the API.

mod context;
mod effects;
mod engine;
mod message;
mod types;

#[cfg(test)]
mod tests;

pub use engine::{ConsensusEngine, MAX_WAL_ENTRIES};
pub use message::{
    ConsensusMessage, MAX_CONSENSUS_MESSAGE_BYTES, chain_proposal_bytes, proposal_bytes,
};
pub use types::{
    Committee, ConsensusAction, ConsensusConfig, ConsensusError, ConsensusValue, FUTURE_HEIGHTS,
    MAX_BUFFERED_PER_MEMBER, SigningWatermark, TimeoutKey, TimeoutKind, WalEntry,
    max_message_bytes, verify_decided,
};

pub use crate::ledger::VoteKind;
