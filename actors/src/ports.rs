//! The interfaces through which actors reach the outside world.
//!
//! The node implements [`NetworkPort`] with a bounded channel into the swarm task and
//! [`HeartbeatSigner`] with the peer's libp2p identity; tests and the in-process simulation
//! implement them with in-memory buses.

use loom_protocols::{NatStatus, PeerKey, contribution::BlobHash};

/// Gossip topics of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Signed membership heartbeats.
    Membership,
    /// Latency probes.
    Probe,
    /// Training: commitments, round closes, model states.
    Training,
    /// The ledger: consensus messages, pending entries, tip announcements.
    Ledger,
}

impl Topic {
    /// The gossipsub topic string.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Membership => "loom/membership/1",
            Topic::Probe => "loom/probe/1",
            Topic::Training => "loom/train/1",
            Topic::Ledger => "loom/ledger/1",
        }
    }

    /// Every topic a peer subscribes to.
    pub const ALL: [Topic; 4] = [
        Topic::Membership,
        Topic::Probe,
        Topic::Training,
        Topic::Ledger,
    ];
}

/// Why a request to the network was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortError {
    /// The network's command queue is full; the request was dropped.
    #[error("network command queue is full")]
    Full,
    /// The network task is gone (restarting or shut down).
    #[error("network task is not running")]
    Closed,
}

/// Requests an actor can make of the network. Implementations never block.
pub trait NetworkPort: Send + Sync + 'static {
    /// Publishes `data` on `topic`.
    fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), PortError>;
    /// Suggests connecting to `peer` on `addrs`, learned from its heartbeat together with its
    /// own view of its reachability `nat`.
    fn connect_hint(
        &self,
        peer: PeerKey,
        addrs: Vec<String>,
        nat: NatStatus,
    ) -> Result<(), PortError>;
    /// Asks `peer` for the blob `hash`; the outcome reaches the job's exchanger as
    /// [`crate::ExchangerMsg::BlobFetched`].
    fn fetch_blob(&self, peer: PeerKey, hash: BlobHash) -> Result<(), PortError>;
    /// Asks `peer` for up to `limit` finalized ledger blocks from `from_height`; the outcome
    /// reaches the ledger replica as [`crate::ledger::LedgerMsg::Synced`]. Networks without a
    /// ledger (test buses of other actors) refuse it.
    fn fetch_ledger(&self, peer: PeerKey, from_height: u64, limit: u32) -> Result<(), PortError> {
        let _ = (peer, from_height, limit);
        Err(PortError::Closed)
    }
}

/// Signs with this peer's identity key.
pub trait HeartbeatSigner: Send + Sync + 'static {
    /// This peer's ed25519 public key.
    fn public_key(&self) -> PeerKey;
    /// An ed25519 signature over `message`.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}
