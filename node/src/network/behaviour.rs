//! The composed libp2p behaviour of a Loom peer and its construction from the configuration.

use std::time::Duration;

use libp2p::{
    PeerId, StreamProtocol, allow_block_list, autonat, connection_limits, dcutr, gossipsub,
    identify, identity::Keypair, kad, mdns, ping, relay, request_response, swarm::NetworkBehaviour,
    swarm::behaviour::toggle::Toggle,
};
use loom_actors::Topic;

use crate::config::NodeConfig;

/// Identify protocol name of the Loom mesh.
pub const IDENTIFY_PROTOCOL: &str = "/loom/id/1.0.0";
/// Kademlia protocol of the Loom mesh (kept apart from the public IPFS DHT).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/loom/kad/1.0.0");
/// Largest gossip message accepted or sent, in bytes.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;

/// Everything a Loom peer speaks.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Connection limits (total, per peer, pending).
    pub limits: connection_limits::Behaviour,
    /// Peers refused at connection time.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Peer info exchange; tells us our observed address.
    pub identify: identify::Behaviour,
    /// Liveness and RTT.
    pub ping: ping::Behaviour,
    /// Peer routing.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Heartbeats, probes, and later commitments.
    pub gossipsub: gossipsub::Behaviour,
    /// Asks others to dial us back to learn whether we are reachable.
    pub autonat_client: autonat::v2::client::Behaviour,
    /// Dials others back to tell them whether they are reachable.
    pub autonat_server: autonat::v2::server::Behaviour,
    /// Reservations on relays and circuits through them.
    pub relay_client: relay::client::Behaviour,
    /// Relay service (with `--relay-server`).
    pub relay_server: Toggle<relay::Behaviour>,
    /// Hole punching over relayed connections.
    pub dcutr: dcutr::Behaviour,
    /// LAN discovery.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Blob transfer (contributions and snapshots).
    pub blobs: request_response::Behaviour<super::blobs::BlobCodec>,
    /// Ledger catch-up (finalized blocks).
    pub ledger_sync: request_response::Behaviour<super::ledger_sync::LedgerSyncCodec>,
    /// Private fleets: enrollment tokens shown after the handshake.
    pub fleet: request_response::Behaviour<crate::fleet::FleetCodec>,
    /// Throughput measurements.
    pub speedtest: request_response::Behaviour<super::speedtest::SpeedtestCodec>,
}

/// Why the behaviour could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BehaviourError {
    /// Gossipsub configuration was rejected.
    #[error("gossipsub: {0}")]
    Gossipsub(String),
    /// mDNS could not start.
    #[error("mdns: {0}")]
    Mdns(std::io::Error),
}

impl Behaviour {
    /// Builds the behaviour for `keypair` under `config`.
    pub fn new(
        keypair: &Keypair,
        relay_client: relay::client::Behaviour,
        config: &NodeConfig,
    ) -> Result<Self, BehaviourError> {
        let peer_id = keypair.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.max_connections))
            .with_max_established_per_peer(Some(config.max_connections_per_peer))
            .with_max_pending_incoming(Some(64))
            .with_max_pending_outgoing(Some(64));
        let mut blocked = allow_block_list::Behaviour::default();
        for peer in &config.blocked {
            blocked.block_peer(*peer);
        }

        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(MAX_GOSSIP_BYTES)
            .heartbeat_interval(Duration::from_millis(500))
            .build()
            .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        let mut gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(keypair.clone()),
            gossip_config,
        )
        .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        for topic in Topic::ALL {
            gossipsub
                .subscribe(&gossipsub::IdentTopic::new(topic.as_str()))
                .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        }

        let mut kad = kad::Behaviour::with_config(
            peer_id,
            kad::store::MemoryStore::new(peer_id),
            kad::Config::new(KAD_PROTOCOL),
        );
        // Client mode until a public address is confirmed (set explicitly, see the network task).
        kad.set_mode(Some(kad::Mode::Client));

        let relay_server = config.relay_server.as_ref().map(|limits| {
            relay::Behaviour::new(
                peer_id,
                relay::Config {
                    max_reservations: limits.max_reservations,
                    max_reservations_per_peer: 4,
                    reservation_duration: Duration::from_secs(60 * 60),
                    max_circuits: limits.max_circuits,
                    max_circuits_per_peer: 16,
                    max_circuit_duration: limits.max_circuit_duration,
                    max_circuit_bytes: limits.max_circuit_bytes,
                    ..relay::Config::default()
                },
            )
        });
        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(BehaviourError::Mdns)?,
            )
        } else {
            None
        };

        Ok(Self {
            limits: connection_limits::Behaviour::new(limits),
            blocked,
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), keypair.public())
                    .with_agent_version(crate::agent()),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
            kad,
            gossipsub,
            autonat_client: autonat::v2::client::Behaviour::new(
                rand::make_rng::<rand::rngs::StdRng>(),
                autonat::v2::client::Config::default().with_probe_interval(Duration::from_secs(2)),
            ),
            autonat_server: autonat::v2::server::Behaviour::default(),
            relay_client,
            relay_server: relay_server.into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            mdns: mdns.into(),
            blobs: request_response::Behaviour::with_codec(
                super::blobs::BlobCodec,
                [(
                    super::blobs::BLOB_PROTOCOL,
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(120))
                    .with_max_concurrent_streams(64),
            ),
            ledger_sync: request_response::Behaviour::with_codec(
                super::ledger_sync::LedgerSyncCodec,
                [(
                    super::ledger_sync::LEDGER_SYNC_PROTOCOL,
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(10))
                    .with_max_concurrent_streams(16),
            ),
            fleet: request_response::Behaviour::with_codec(
                crate::fleet::FleetCodec,
                [(
                    crate::fleet::FLEET_PROTOCOL,
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(5))
                    .with_max_concurrent_streams(16),
            ),
            speedtest: request_response::Behaviour::with_codec(
                super::speedtest::SpeedtestCodec,
                [(
                    super::speedtest::SPEEDTEST_PROTOCOL,
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(120))
                    .with_max_concurrent_streams(2),
            ),
        })
    }

    /// This peer's id as known to the behaviour (for logs).
    pub fn local_peer_id(keypair: &Keypair) -> PeerId {
        keypair.public().to_peer_id()
    }
}
