//! Wire types and pure state machines of Loom.
//!
//! Nothing in this crate does I/O, reads a clock or draws randomness: time (`now_ms`), random
//! values and input come in as arguments and actions come out, so every machine here can be driven
//! by a real node, by an in-process simulation or by a test on virtual time.

pub mod anomaly;
pub mod backoff;
pub mod blobstore;
pub mod compress;
pub mod connection;
pub mod consensus;
pub mod contribution;
pub mod credits;
pub mod data;
pub mod fleet;
pub mod gossip_watch;
pub mod ledger;
pub mod ledger_state;
pub mod ledger_sync;
pub mod membership;
pub mod outer;
pub mod probe;
pub mod ratelimit;
pub mod robust;
pub mod round;
pub mod round_chain;
pub mod snapshot;
pub mod verify;
pub mod wire;

pub use backoff::Backoff;
pub use connection::{ConnectionKind, NatStatus, NatTracker, RelayPlanner};
pub use membership::{
    Heartbeat, HeartbeatRejected, MemberState, MembershipConfig, MembershipEvent, MembershipView,
    SignedHeartbeat,
};
pub use probe::{Probe, ProbeLog, ProbeSample, quantile};
pub use ratelimit::RateLimiter;
pub use wire::{WireError, decode_bounded, encode};

/// An ed25519 public key: the identity of a peer inside the protocols (the network layer maps it
/// to and from a libp2p `PeerId`).
pub type PeerKey = [u8; 32];
