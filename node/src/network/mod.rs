//! The Network actor and the swarm task it owns.
//!
//! The libp2p swarm runs in its own tokio task ([`task::SwarmTask`]), fed by a bounded command
//! channel; the ractor [`NetworkActor`] only creates it, forwards requests into the channel with
//! `try_send` (never awaiting the swarm inside `handle`), and fails when the task dies so the
//! supervisor restarts both. Other actors reach the network through [`NetworkHandle`], which
//! survives restarts: it holds the current channel's sender.

pub mod behaviour;
pub mod blobs;
pub mod defense;
pub mod fleet_gate;
pub mod ledger_sync;
pub mod speedtest;
pub mod task;
pub mod transport;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use libp2p::{Multiaddr, PeerId, Swarm, identity::Keypair, relay};
use loom_actors::{NetworkPort, PortError, Topic};
use loom_protocols::PeerKey;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{mpsc, oneshot};

use crate::{config::NodeConfig, status::NetworkStatus};
pub use behaviour::Behaviour;
pub use transport::PeerBytes;

/// Capacity of the command channel into the swarm task.
pub const COMMAND_QUEUE: usize = 1024;

/// Requests to the swarm task.
#[derive(Debug)]
pub enum NetCommand {
    /// Publish on a gossip topic.
    Publish {
        /// Topic.
        topic: Topic,
        /// Payload.
        data: Vec<u8>,
    },
    /// Connect to a peer learned from its heartbeat, if useful.
    ConnectHint {
        /// The peer.
        peer: PeerId,
        /// Its advertised addresses.
        addrs: Vec<Multiaddr>,
        /// Whether it says it is publicly reachable.
        public: bool,
    },
    /// Dial an address now.
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    /// Report status.
    Status(RpcReplyPort<NetworkStatus>),
    /// Ask a peer for a blob; the answer goes to the exchanger.
    FetchBlob {
        /// The peer.
        peer: PeerId,
        /// Its key (for the answer).
        key: PeerKey,
        /// The blob.
        hash: loom_protocols::contribution::BlobHash,
    },
    /// Measure the throughput from a peer.
    Speedtest {
        /// The peer.
        peer: PeerId,
        /// Bytes to ask for.
        bytes: u32,
        /// The outcome.
        reply: oneshot::Sender<Result<speedtest::SpeedtestResult, String>>,
    },
    /// Ask a peer for finalized ledger blocks; the answer goes to the ledger replica.
    FetchLedger {
        /// The peer.
        peer: PeerId,
        /// Its key (for the answer).
        key: PeerKey,
        /// What to ask for.
        request: loom_protocols::ledger_sync::SyncRequest,
    },
}

/// A cloneable handle to the current swarm task's command channel.
#[derive(Debug, Clone, Default)]
pub struct NetworkHandle {
    sender: Arc<Mutex<Option<mpsc::Sender<NetCommand>>>>,
}

impl NetworkHandle {
    fn set(&self, sender: Option<mpsc::Sender<NetCommand>>) {
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = sender;
    }

    /// Queues a command without waiting.
    pub fn send(&self, command: NetCommand) -> Result<(), PortError> {
        let guard = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        let sender = guard.as_ref().ok_or(PortError::Closed)?;
        sender.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                metrics::counter!("loom_network_commands_dropped_total").increment(1);
                PortError::Full
            }
            mpsc::error::TrySendError::Closed(_) => PortError::Closed,
        })
    }
}

impl NetworkPort for NetworkHandle {
    fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), PortError> {
        self.send(NetCommand::Publish { topic, data })
    }

    fn connect_hint(
        &self,
        peer: PeerKey,
        addrs: Vec<String>,
        nat: loom_protocols::NatStatus,
    ) -> Result<(), PortError> {
        let Some(peer) = peer_id_of(&peer) else {
            return Ok(());
        };
        let addrs = addrs.iter().filter_map(|a| a.parse().ok()).collect();
        self.send(NetCommand::ConnectHint {
            peer,
            addrs,
            public: nat == loom_protocols::NatStatus::Public,
        })
    }

    fn fetch_blob(
        &self,
        key: PeerKey,
        hash: loom_protocols::contribution::BlobHash,
    ) -> Result<(), PortError> {
        let peer = peer_id_of(&key).ok_or(PortError::Closed)?;
        self.send(NetCommand::FetchBlob { peer, key, hash })
    }

    fn fetch_ledger(&self, key: PeerKey, from_height: u64, limit: u32) -> Result<(), PortError> {
        let peer = peer_id_of(&key).ok_or(PortError::Closed)?;
        self.send(NetCommand::FetchLedger {
            peer,
            key,
            request: loom_protocols::ledger_sync::SyncRequest { from_height, limit },
        })
    }
}

/// The PeerId of an ed25519 key.
pub fn peer_id_of(key: &PeerKey) -> Option<PeerId> {
    let public = libp2p::identity::ed25519::PublicKey::try_from_bytes(key).ok()?;
    Some(libp2p::identity::PublicKey::from(public).to_peer_id())
}

/// The ed25519 key inside a PeerId (PeerIds of ed25519 keys embed the key itself).
pub fn key_of(peer: &PeerId) -> Option<PeerKey> {
    let multihash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if multihash.code() != 0 {
        return None;
    }
    let public = libp2p::identity::PublicKey::try_decode_protobuf(multihash.digest()).ok()?;
    public.try_into_ed25519().ok().map(|k| k.to_bytes())
}

/// Why the swarm could not be built or could not listen.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// Transport set-up failed.
    #[error("transport: {0}")]
    Transport(#[from] transport::TransportError),
    /// Behaviour set-up failed.
    #[error("{0}")]
    Behaviour(#[from] behaviour::BehaviourError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why (e.g. address in use).
        reason: String,
    },
}

/// Builds the swarm and binds every listen address; errors name the failing address.
pub fn build_swarm(
    keypair: &Keypair,
    config: &NodeConfig,
    peer_bytes: PeerBytes,
) -> Result<Swarm<Behaviour>, NetworkError> {
    let peer_id = keypair.public().to_peer_id();
    let (relay_transport, relay_client) = relay::client::new(peer_id);
    let transport = transport::build(keypair, relay_transport, peer_bytes)?;
    let behaviour = Behaviour::new(keypair, relay_client, config)?;
    let mut swarm = Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(300)),
    );
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetworkError::Listen {
                addr: addr.clone(),
                reason: listen_reason(&e),
            })?;
    }
    for addr in &config.external_addresses {
        swarm.add_external_address(addr.clone());
    }
    Ok(swarm)
}

fn listen_reason(e: &libp2p::TransportError<std::io::Error>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(a) => format!("unsupported address {a}"),
        libp2p::TransportError::Other(io) => {
            // Surface the innermost cause ("Address already in use").
            let mut source: &dyn std::error::Error = io;
            while let Some(next) = source.source() {
                source = next;
            }
            source.to_string()
        }
    }
}

/// Everything the Network actor needs to (re)build its swarm.
#[derive(Clone)]
pub struct NetworkArgs {
    /// Identity.
    pub keypair: Keypair,
    /// Configuration.
    pub config: NodeConfig,
    /// The handle other actors hold.
    pub handle: NetworkHandle,
    /// Per-peer byte counters.
    pub peer_bytes: PeerBytes,
    /// Blobs this peer serves (shared with the exchanger).
    pub blobs: loom_actors::SharedBlobs,
    /// The ledger this peer serves catch-up requests from.
    pub ledger: Option<loom_actors::ledger::SharedLedgerStore>,
    /// This peer's private fleet, if any.
    pub fleet: Option<crate::fleet::FleetMembership>,
    /// Peers banned or revoked on the ledger.
    pub bans: loom_actors::ledger::SharedBans,
    /// Kernel telemetry and the XDP drop list.
    pub kernel: crate::kernel::KernelTelemetry,
    /// The local ban list.
    pub local_bans: defense::SharedBanList,
    /// Refused contributions per peer.
    pub rejections: loom_actors::SharedRejections,
    /// A swarm already built and listening (first start), taken once.
    pub prebuilt: Arc<Mutex<Option<Swarm<Behaviour>>>>,
}

impl std::fmt::Debug for NetworkArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkArgs").finish_non_exhaustive()
    }
}

/// Messages of the Network actor.
#[derive(Debug)]
pub enum NetworkMsg {
    /// The swarm task ended on its own (a bug or a panic): fail so the supervisor restarts us.
    TaskExited(String),
    /// Status of the network.
    Status(RpcReplyPort<NetworkStatus>),
}

/// State of the Network actor.
pub struct NetworkState {
    handle: NetworkHandle,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The Network actor.
#[derive(Debug, Default, Clone)]
pub struct NetworkActor;

impl Actor for NetworkActor {
    type Msg = NetworkMsg;
    type State = NetworkState;
    type Arguments = NetworkArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let prebuilt = args
            .prebuilt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let swarm = match prebuilt {
            Some(swarm) => swarm,
            None => build_swarm(&args.keypair, &args.config, args.peer_bytes.clone())?,
        };
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        args.handle.set(Some(tx));
        let task = task::SwarmTask::new(
            swarm,
            args.config.clone(),
            args.peer_bytes.clone(),
            task::TaskServices {
                blobs: args.blobs.clone(),
                ledger: args.ledger.clone(),
                fleet: args.fleet.clone(),
                bans: args.bans.clone(),
                defense: defense::Defense::new(
                    args.kernel.clone(),
                    args.local_bans.clone(),
                    args.bans.clone(),
                    args.config.auto_ban,
                    args.config.blocked.iter().copied().collect(),
                    args.rejections.clone(),
                ),
            },
        );
        let join = tokio::spawn(task.run(rx, shutdown_rx));
        // Watch the task: if it ends while we did not ask it to, tell the actor.
        let watched = tokio::spawn({
            let myself = myself.clone();
            async move {
                let why = match join.await {
                    Ok(()) => "swarm task returned".to_owned(),
                    Err(e) if e.is_cancelled() => return,
                    Err(e) => format!("swarm task panicked: {e}"),
                };
                let _ = myself.cast(NetworkMsg::TaskExited(why));
            }
        });
        Ok(NetworkState {
            handle: args.handle,
            shutdown: Some(shutdown_tx),
            task: Some(watched),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            NetworkMsg::TaskExited(why) => {
                if state.shutdown.is_some() {
                    return Err(why.into());
                }
            }
            NetworkMsg::Status(reply) => {
                // The swarm task answers the reply port itself.
                let _ = state.handle.send(NetCommand::Status(reply));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.handle.set(None);
        if let Some(shutdown) = state.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = state.task.take() {
            // Bounded shutdown: the task closes its listeners, then we give up waiting.
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("swarm task did not stop within 5 s");
            }
        }
        Ok(())
    }
}
