//! The ractor actors of one Loom peer.
//!
//! Each actor is a thin shell around a state machine from `loom-protocols`: it owns the state,
//! feeds it time and input, and carries out the actions it returns. Actors never touch the libp2p
//! swarm directly: they talk to the network through the [`NetworkPort`] the node hands them, which
//! is a bounded queue in front of the swarm task.

pub mod credits;
pub mod exchanger;
pub mod learner;
pub mod ledger;
pub mod ledger_store;
pub mod membership;
pub mod ports;
pub mod supervisor;
pub mod trainer;

pub use exchanger::{
    Aggregation, CheckpointSink, ExchangerActor, ExchangerArgs, ExchangerMsg, JobPlan,
    LossCheckRecord, RefusedContribution, RoundReport, SharedBlobs, SharedRejections, Strategy,
};
pub use learner::{Learner, LearnerError, ShardKey, StepReport};
pub use membership::{MemberSummary, MembershipActor, MembershipArgs, MembershipMsg};
pub use ports::{HeartbeatSigner, NetworkPort, PortError, Topic};
pub use supervisor::{ChildSpec, ChildStatus, PeerSupervisor, SupervisorMsg, SupervisorPolicy};
pub use trainer::{LearnerSlot, TrainerActor, TrainerMsg, Work};

/// Registry names of the actors of one peer.
pub mod names {
    /// The root supervisor.
    pub const SUPERVISOR: &str = "loom.supervisor";
    /// The network actor (owns the swarm task).
    pub const NETWORK: &str = "loom.network";
    /// The membership actor (live view).
    pub const MEMBERSHIP: &str = "loom.membership";
    /// The trainer actor.
    pub const TRAINER: &str = "loom.trainer";
    /// The gradient exchanger actor of the running job.
    pub const EXCHANGER: &str = "loom.exchanger";
    /// The ledger replica.
    pub const LEDGER: &str = "loom.ledger";
    /// The credit accounting actor.
    pub const CREDITS: &str = "loom.credits";
}

/// A short printable form of a peer key (first 8 hex digits).
pub fn short(key: &loom_protocols::PeerKey) -> String {
    key[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the unix epoch from the system clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the unix epoch from the system clock.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
