//! Agreement on the ledger: Tendermint, as implemented by Malachite's core
//! (`arc-malachitebft-core-consensus`), run sans-I/O for Loom.
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
//! - [`ConsensusMessage`]: the signed proposals and votes on the wire, bounded on decode.
//! - A decision comes with a [`QuorumCertificate`](crate::ledger::QuorumCertificate): the
//!   precommits of more than two thirds of the committee for the block at its (height, round),
//!   which any replica checks with [`verify_decided`] when it catches up.
//!
//! `context` maps Loom's types onto Malachite's `Context`; `engine` answers the core's effects.

mod context;
mod engine;
mod message;

#[cfg(test)]
mod tests;

pub use engine::{
    Committee, ConsensusAction, ConsensusConfig, ConsensusEngine, ConsensusError, FUTURE_HEIGHTS,
    MAX_BUFFERED_PER_MEMBER, SigningWatermark, TimeoutKey, TimeoutKind, verify_decided,
};
pub use message::{ConsensusMessage, MAX_CONSENSUS_MESSAGE_BYTES, proposal_bytes};

pub use crate::ledger::VoteKind;
