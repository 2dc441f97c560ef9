//! The swarm task: drives the libp2p swarm, classifies connections, plans relay reservations,
//! validates gossip and hands verified messages to the actors.
//!
//! It owns every piece of network state (connection table, RTTs, NAT tracker, relay planner,
//! dial backoff) and is the only code that touches the swarm. Everything it keeps per remote peer
//! is bounded: by the connection limits, or by explicit caps on the maps below.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, autonat, dcutr, gossipsub, identify, kad, mdns,
    multiaddr::Protocol,
    ping, relay, request_response,
    swarm::{ConnectionId, SwarmEvent, dial_opts::DialOpts, dial_opts::PeerCondition},
};
use loom_actors::{ExchangerMsg, MembershipMsg, Topic, ledger::LedgerMsg, names};
use loom_protocols::{
    Backoff, ConnectionKind, NatTracker, PeerKey, Probe, RateLimiter, RelayPlanner,
    SignedHeartbeat,
    connection::RelayAction,
    contribution::BlobHash,
    gossip_watch::GossipWatchdog,
    ledger::{Block, QuorumCertificate},
    ledger_sync::{
        LedgerGossip, MAX_SYNC_BLOCKS, MAX_SYNC_RESPONSE_BYTES, SyncRequest, SyncResponse,
    },
    round::TrainMessage,
};
use ractor::ActorRef;
use tokio::sync::{mpsc, oneshot};

use super::{
    Behaviour, NetCommand, PeerBytes,
    behaviour::BehaviourEvent,
    blobs::{BlobReply, MAX_BLOB_BYTES},
};
use crate::{
    config::NodeConfig,
    status::{
        ConnectionStatus, HolePunchStats, NetworkStatus, PeerStatus, RelayServerStatus,
        ReservationStatus,
    },
};

/// Peers we keep dial backoff state for.
const MAX_DIAL_BACKOFF_ENTRIES: usize = 1024;
/// Dial attempts per peer before we stop trying (until it is hinted again after a success).
const MAX_DIAL_ATTEMPTS: u32 = 8;
/// Recently hole-punched connection ids remembered before their establishment event arrives.
const MAX_PENDING_PUNCHED: usize = 256;
/// Gossip messages accepted per author per second (heartbeats and probes together), and burst.
const GOSSIP_RATE_PER_AUTHOR: f64 = 20.0;
const GOSSIP_BURST_PER_AUTHOR: u32 = 40;
/// Ledger gossip per author per second, and burst: a committee member sends a proposal, two
/// votes and re-sends per height, at up to five heights a second, plus its tip and entries. Kept
/// apart from the other topics so a busy ledger never starves heartbeats, and the reverse.
const LEDGER_GOSSIP_RATE_PER_AUTHOR: f64 = 60.0;
const LEDGER_GOSSIP_BURST_PER_AUTHOR: u32 = 120;
/// Authors the rate limiter tracks at once.
const MAX_RATE_LIMITED_AUTHORS: usize = 8192;
/// Shortest silence after which a connected peer's connections are reset.
const GOSSIP_SILENCE_MIN_MS: u64 = 5_000;
/// Ticks a reset peer is waited for to disconnect before it is dialled again anyway.
const REDIAL_WAIT_TICKS: u64 = 20;
/// Redundant connections younger than this are left alone (an AutoNAT dial-back or a DCUtR
/// upgrade may still be using them).
const DEDUP_AFTER: Duration = Duration::from_secs(5);
/// How long the larger PeerId of a pair waits before dialing a newly learned address itself.
const YIELD_DIAL: Duration = Duration::from_secs(5);
/// Agent strings remembered (one per connected peer at most).
const MAX_AGENTS: usize = 4096;
const MAX_BLOB_REQUESTS: usize = 512;
/// Ledger catch-up requests in flight at once.
const MAX_LEDGER_REQUESTS: usize = 16;

struct Connection {
    peer: PeerId,
    kind: ConnectionKind,
    remote_addr: Multiaddr,
    outbound: bool,
    since: Instant,
    rtt: Option<Duration>,
}

struct DialState {
    backoff: Backoff,
    next_at: Instant,
    addrs: Vec<Multiaddr>,
}

/// The swarm task.
pub struct SwarmTask {
    swarm: Swarm<Behaviour>,
    config: NodeConfig,
    peer_bytes: PeerBytes,
    started: Instant,
    connections: HashMap<ConnectionId, Connection>,
    punched: HashSet<ConnectionId>,
    nat: NatTracker,
    planner: RelayPlanner<PeerId>,
    relay_addrs: HashMap<PeerId, Multiaddr>,
    circuit_listeners: HashMap<libp2p::core::transport::ListenerId, PeerId>,
    circuit_addrs: BTreeMap<PeerId, Vec<Multiaddr>>,
    dial_state: HashMap<PeerId, DialState>,
    agents: HashMap<PeerId, String>,
    hole_punch: HolePunchStats,
    relay_server: Option<RelayServerStatus>,
    bootstrap_peers: Vec<(PeerId, Multiaddr)>,
    advertised: Vec<String>,
    kad_server: bool,
    loopback_only: bool,
    ticks: u64,
    gossip_limiter: RateLimiter<PeerId>,
    ledger_gossip_limiter: RateLimiter<PeerId>,
    blobs: loom_actors::SharedBlobs,
    blob_requests: HashMap<request_response::OutboundRequestId, (BlobHash, PeerKey)>,
    ledger: Option<loom_actors::ledger::SharedLedgerStore>,
    ledger_requests: HashMap<request_response::OutboundRequestId, PeerKey>,
    fleet: Option<super::fleet_gate::FleetGate>,
    defense: super::defense::Defense,
    speedtests: HashMap<request_response::OutboundRequestId, PendingSpeedtest>,
    speedtest_limiter: super::speedtest::SpeedtestLimiter,
    /// Connected peers that stopped being heard on gossip, to reset.
    gossip_watch: GossipWatchdog<PeerId>,
    /// Peers whose connections were reset, to dial again once they are closed.
    redial_after_reset: HashMap<PeerId, (u64, Vec<Multiaddr>)>,
}

/// A speedtest in flight: the serving peer, when it was asked, and where the answer goes.
type PendingSpeedtest = (
    PeerId,
    Instant,
    oneshot::Sender<Result<super::speedtest::SpeedtestResult, String>>,
);

/// What the swarm task shares with the rest of the node.
pub struct TaskServices {
    /// Blobs this peer serves.
    pub blobs: loom_actors::SharedBlobs,
    /// The ledger it serves catch-up requests from.
    pub ledger: Option<loom_actors::ledger::SharedLedgerStore>,
    /// Its private fleet, if any.
    pub fleet: Option<crate::fleet::FleetMembership>,
    /// Peers banned or revoked on the ledger.
    pub bans: loom_actors::ledger::SharedBans,
    /// Bans and kernel telemetry.
    pub defense: super::defense::Defense,
}

impl SwarmTask {
    /// A task around an already listening swarm.
    pub fn new(
        swarm: Swarm<Behaviour>,
        config: NodeConfig,
        peer_bytes: PeerBytes,
        services: TaskServices,
    ) -> Self {
        let TaskServices {
            blobs,
            ledger,
            fleet,
            bans,
            defense,
        } = services;
        let bootstrap_peers = config
            .bootstrap
            .iter()
            .filter_map(|a| match a.iter().last() {
                Some(Protocol::P2p(peer)) => Some((peer, a.clone())),
                _ => None,
            })
            .collect::<Vec<(PeerId, Multiaddr)>>();
        // In a fleet the configured bootstrap peers, or the relays of configured circuit
        // addresses, are kept as transport even though they show no token.
        let transport_only = config
            .bootstrap
            .iter()
            .filter_map(|a| {
                a.iter().find_map(|p| match p {
                    Protocol::P2p(peer) => Some(peer),
                    _ => None,
                })
            })
            .collect();
        let fleet = fleet
            .map(|membership| super::fleet_gate::FleetGate::new(membership, transport_only, bans));
        let relay_server = config
            .relay_server
            .as_ref()
            .map(|_| RelayServerStatus::default());
        let loopback_only = config.listen.iter().all(is_loopback);
        let mut nat = NatTracker::default();
        for addr in &config.external_addresses {
            nat.on_confirmed(&addr.to_string());
        }
        Self {
            planner: RelayPlanner::new(
                config.max_relay_reservations,
                config.relay_grace.as_millis() as u64,
                MAX_DIAL_ATTEMPTS,
            ),
            swarm,
            peer_bytes,
            started: Instant::now(),
            connections: HashMap::new(),
            punched: HashSet::new(),
            nat,
            relay_addrs: HashMap::new(),
            circuit_listeners: HashMap::new(),
            circuit_addrs: BTreeMap::new(),
            dial_state: HashMap::new(),
            agents: HashMap::new(),
            hole_punch: HolePunchStats::default(),
            relay_server,
            bootstrap_peers,
            advertised: Vec::new(),
            kad_server: false,
            loopback_only,
            ticks: 0,
            gossip_watch: {
                // Membership calls a peer dead after 10 silent heartbeat intervals; a connection
                // that stays up that long without one is reset.
                let silence_ms =
                    (10 * config.heartbeat_interval.as_millis() as u64).max(GOSSIP_SILENCE_MIN_MS);
                GossipWatchdog::new(silence_ms, 3 * silence_ms, MAX_RATE_LIMITED_AUTHORS)
            },
            redial_after_reset: HashMap::new(),
            gossip_limiter: RateLimiter::new(
                GOSSIP_RATE_PER_AUTHOR,
                GOSSIP_BURST_PER_AUTHOR,
                MAX_RATE_LIMITED_AUTHORS,
            ),
            ledger_gossip_limiter: RateLimiter::new(
                LEDGER_GOSSIP_RATE_PER_AUTHOR,
                LEDGER_GOSSIP_BURST_PER_AUTHOR,
                MAX_RATE_LIMITED_AUTHORS,
            ),
            blobs,
            blob_requests: HashMap::new(),
            ledger,
            ledger_requests: HashMap::new(),
            fleet,
            defense,
            speedtests: HashMap::new(),
            speedtest_limiter: Default::default(),
            config,
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Runs until `shutdown` fires or the command channel closes.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<NetCommand>,
        mut shutdown: oneshot::Receiver<()>,
    ) {
        if self.relay_server.is_some() && self.config.external_addresses.is_empty() {
            tracing::warn!(
                "--relay-server without --external-address: the relay cannot advertise itself and reservations will fail"
            );
        }
        for addr in self.config.bootstrap.clone() {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::warn!(%addr, error = %e, "bootstrap dial failed");
            }
        }
        self.update_peer_gauges();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut slow_tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tick.tick() => self.on_tick(),
                _ = slow_tick.tick() => self.on_slow_tick(),
            }
        }
        tracing::debug!("swarm task stopping");
    }

    fn on_command(&mut self, command: NetCommand) {
        match command {
            NetCommand::FetchBlob { peer, key, hash } => {
                if self.blob_requests.len() >= MAX_BLOB_REQUESTS {
                    deliver_blob(hash, key, Err("too many blob requests in flight".into()));
                    return;
                }
                let id = self.swarm.behaviour_mut().blobs.send_request(&peer, hash);
                self.blob_requests.insert(id, (hash, key));
            }
            NetCommand::Speedtest { peer, bytes, reply } => {
                if self.speedtests.len() >= 4 {
                    let _ = reply.send(Err("too many speedtests in flight".into()));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .speedtest
                    .send_request(&peer, bytes);
                self.speedtests.insert(id, (peer, Instant::now(), reply));
            }
            NetCommand::FetchLedger { peer, key, request } => {
                if self.ledger_requests.len() >= MAX_LEDGER_REQUESTS {
                    deliver_ledger(key, Err("too many ledger requests in flight".into()));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .ledger_sync
                    .send_request(&peer, request);
                self.ledger_requests.insert(id, key);
            }
            NetCommand::Publish { topic, data } => {
                let topic_hash = gossipsub::IdentTopic::new(topic.as_str());
                match self.swarm.behaviour_mut().gossipsub.publish(topic_hash, data) {
                    Ok(_) => {
                        metrics::counter!("loom_gossip_messages_total", "direction" => "out", "topic" => topic.as_str()).increment(1)
                    }
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                        metrics::counter!("loom_gossip_unsent_total", "reason" => "no-peers").increment(1)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "publish failed");
                        metrics::counter!("loom_gossip_unsent_total", "reason" => "error").increment(1)
                    }
                }
            }
            NetCommand::ConnectHint {
                peer,
                addrs,
                public,
            } => self.connect_hint(peer, addrs, public),
            NetCommand::Dial(addr, reply) => {
                let result = self.swarm.dial(addr).map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            NetCommand::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Dials a peer we learned of from its heartbeat, unless connected or backing off.
    /// `remote_public`: the peer says it is publicly reachable (or is on our LAN), so we can
    /// dial it directly.
    fn connect_hint(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, remote_public: bool) {
        if peer == *self.swarm.local_peer_id() || self.swarm.is_connected(&peer) {
            return;
        }
        let connected_peers = self.swarm.connected_peers().count();
        if connected_peers >= self.config.max_connections as usize / 2 {
            return;
        }
        let now = Instant::now();
        let addrs: Vec<Multiaddr> = addrs
            .into_iter()
            .filter(|a| self.loopback_only || !is_loopback(a))
            .filter(|a| !is_unspecified(a))
            .take(loom_protocols::membership::MAX_ADVERTISED_ADDRS)
            .collect();
        if addrs.is_empty() {
            return;
        }
        if self.dial_state.len() >= MAX_DIAL_BACKOFF_ENTRIES && !self.dial_state.contains_key(&peer)
        {
            return;
        }
        let state = self.dial_state.entry(peer).or_insert_with(|| DialState {
            backoff: Backoff::new(1_000, 60_000),
            next_at: now,
            addrs: Vec::new(),
        });
        if state.addrs != addrs {
            // New addresses (say, a fresh relay reservation): worth a try soon. Both sides learn
            // each other's addresses at about the same time, and two relayed connections dialed
            // at once make DCUtR race itself and fail. So: a public peer is dialed at once
            // (directly); a public peer lets private peers dial it; between two private peers
            // the smaller PeerId dials first. The one that yields still dials after `YIELD_DIAL`
            // if nobody connected.
            let local_public = self.nat.status() == loom_protocols::NatStatus::Public;
            let dial_first = remote_public || (!local_public && *self.swarm.local_peer_id() < peer);
            state.addrs = addrs.clone();
            state.backoff.reset();
            state.next_at = if dial_first { now } else { now + YIELD_DIAL };
        }
        if now < state.next_at || state.backoff.attempt() >= MAX_DIAL_ATTEMPTS {
            return;
        }
        state.next_at = now + Duration::from_millis(state.backoff.next_delay_ms(rand::random()));
        // `Disconnected`, not `...AndNotDialing`: a dial still pending on stale addresses must
        // not hold back one on fresh addresses.
        tracing::debug!(%peer, ?addrs, "dialing hinted peer");
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::Disconnected)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "hinted dial failed");
        }
    }

    /// Keeps one connection per peer. Crossing dials and AutoNAT dial-backs (which gossipsub
    /// then keeps alive) leave pairs of peers with several connections, each costing timers,
    /// keep-alives and duplicate gossip. Only the larger PeerId of a pair closes, so the two
    /// sides never close different connections: it keeps the oldest direct connection, and
    /// drops relayed ones once a direct path exists (freeing the relay's circuit).
    fn close_redundant_connections(&mut self) {
        let local = *self.swarm.local_peer_id();
        let mut by_peer: HashMap<PeerId, Vec<(ConnectionId, &Connection)>> = HashMap::new();
        for (id, conn) in &self.connections {
            if conn.peer < local {
                by_peer.entry(conn.peer).or_default().push((*id, conn));
            }
        }
        let mut to_close = Vec::new();
        for conns in by_peer.values_mut() {
            if conns.len() < 2 || conns.iter().any(|(_, c)| c.since.elapsed() < DEDUP_AFTER) {
                continue;
            }
            conns.sort_by_key(|(_, c)| c.since);
            let keep = conns
                .iter()
                .find(|(_, c)| c.kind != ConnectionKind::Relayed)
                .or_else(|| conns.first())
                .map(|(id, _)| *id);
            to_close.extend(
                conns
                    .iter()
                    .map(|(id, _)| *id)
                    .filter(|id| Some(*id) != keep),
            );
        }
        for id in to_close {
            metrics::counter!("loom_redundant_connections_closed_total").increment(1);
            self.swarm.close_connection(id);
        }
    }

    /// Retries hinted peers we are still not connected to, once their backoff elapsed.
    fn retry_hinted_dials(&mut self) {
        let now = Instant::now();
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .dial_state
            .iter()
            .filter(|(peer, s)| {
                now >= s.next_at
                    && s.backoff.attempt() < MAX_DIAL_ATTEMPTS
                    && !self.swarm.is_connected(peer)
            })
            .take(8)
            .map(|(peer, s)| (*peer, s.addrs.clone()))
            .collect();
        for (peer, addrs) in due {
            // Same addresses as before: the dial-order rule does not apply again.
            self.connect_hint(peer, addrs, false);
        }
    }

    fn on_tick(&mut self) {
        let now_ms = self.now_ms();
        let nat = self.nat.status();
        for action in self.planner.poll(nat, now_ms) {
            let RelayAction::Reserve(relay) = action;
            let Some(addr) = self.relay_addrs.get(&relay).cloned() else {
                continue;
            };
            let circuit = strip_p2p(addr)
                .with(Protocol::P2p(relay))
                .with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::info!(%relay, "requesting relay reservation");
                    metrics::counter!("loom_relay_reservations_total", "outcome" => "requested")
                        .increment(1);
                    self.circuit_listeners.insert(id, relay);
                }
                Err(e) => {
                    tracing::warn!(%circuit, error = %e, "cannot listen on relay circuit");
                    self.planner
                        .on_reservation_failed(&relay, now_ms, rand::random());
                }
            }
        }
        // Kademlia answers queries only when reachable.
        let public = nat == loom_protocols::NatStatus::Public;
        if public != self.kad_server {
            self.kad_server = public;
            let mode = if public {
                kad::Mode::Server
            } else {
                kad::Mode::Client
            };
            self.swarm.behaviour_mut().kad.set_mode(Some(mode));
            tracing::info!(?mode, "kademlia mode");
        }
        if let Some(fleet) = self.fleet.as_mut() {
            fleet.on_tick(&mut self.swarm, now_ms);
        }
        {
            // Every tick (250 ms): a ban reaches the XDP drop list within a tick.
            let table: Vec<(PeerId, Multiaddr)> = self
                .connections
                .values()
                .map(|c| (c.peer, c.remote_addr.clone()))
                .collect();
            self.defense.on_tick(&mut self.swarm, &table);
        }
        self.retry_hinted_dials();
        self.advertise();
        self.ticks += 1;
        if self.ticks.is_multiple_of(8) {
            self.close_redundant_connections();
        }
        if self.ticks.is_multiple_of(4) {
            for peer in self.gossip_watch.poll(now_ms) {
                self.reset_gossip(peer, "connected but not heard on gossip");
            }
        }
        self.redial_reset_peers();
    }

    /// Closes every connection to `peer` and dials it again once they are closed: both ends
    /// then start their gossip with `peer` afresh (see `GossipWatchdog`).
    fn reset_gossip(&mut self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, why, "resetting the connections to a peer");
        metrics::counter!("loom_gossip_connection_resets_total").increment(1);
        // Where it listens: the addresses this peer dialled it on, and any it was told of.
        let mut addrs: Vec<Multiaddr> = self
            .connections
            .values()
            .filter(|c| c.peer == peer && c.outbound)
            .map(|c| c.remote_addr.clone())
            .collect();
        if let Some(state) = self.dial_state.get(&peer) {
            addrs.extend(state.addrs.iter().cloned());
        }
        addrs.dedup();
        addrs.truncate(8);
        let _ = self.swarm.disconnect_peer_id(peer);
        if self.redial_after_reset.len() < MAX_RATE_LIMITED_AUTHORS {
            self.redial_after_reset.insert(peer, (self.ticks, addrs));
        }
    }

    /// Dials the reset peers whose connections have closed (or that are still up after
    /// `REDIAL_WAIT_TICKS`: the dial then does nothing).
    fn redial_reset_peers(&mut self) {
        let ticks = self.ticks;
        let due: Vec<PeerId> = self
            .redial_after_reset
            .iter()
            .filter(|(peer, (at, _))| {
                !self.swarm.is_connected(peer) || ticks >= *at + REDIAL_WAIT_TICKS
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in due {
            let Some((_, addrs)) = self.redial_after_reset.remove(&peer) else {
                continue;
            };
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(error) = self.swarm.dial(opts) {
                tracing::debug!(%peer, %error, "cannot dial a reset peer again");
            }
        }
    }

    fn on_slow_tick(&mut self) {
        // Keep a connection to the bootstrap peers (they are usually our relays too).
        for (peer, addr) in self.bootstrap_peers.clone() {
            if !self.swarm.is_connected(&peer) {
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![addr])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                let _ = self.swarm.dial(opts);
            }
        }
        if self.swarm.connected_peers().next().is_some() {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
        let swarm = &self.swarm;
        self.peer_bytes.retain(|p| swarm.is_connected(p));
        self.dial_state
            .retain(|_, s| s.next_at + Duration::from_secs(600) > Instant::now());
    }

    /// Publishes the addresses we can be reached on to the Membership actor when they change.
    fn advertise(&mut self) {
        let mut addrs: Vec<String> = self.nat.confirmed().map(str::to_owned).collect();
        for circuits in self.circuit_addrs.values() {
            addrs.extend(circuits.iter().map(|a| a.to_string()));
        }
        // LAN/loopback listen addresses help peers on the same network.
        for addr in self.swarm.listeners() {
            if is_unspecified(addr) || is_circuit(addr) {
                continue;
            }
            if is_loopback(addr) && !self.loopback_only {
                continue;
            }
            addrs.push(addr.to_string());
        }
        addrs.sort();
        addrs.dedup();
        addrs.truncate(loom_protocols::membership::MAX_ADVERTISED_ADDRS);
        if addrs == self.advertised {
            return;
        }
        self.advertised = addrs.clone();
        if let Some(membership) = membership() {
            let _ = membership.cast(MembershipMsg::Advertise {
                addrs,
                nat: self.nat.status(),
            });
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!(%address, "listening");
                if let Some(relay) = self.circuit_listeners.get(&listener_id) {
                    self.circuit_addrs
                        .entry(*relay)
                        .or_default()
                        .push(with_p2p(address, *self.swarm.local_peer_id()));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(relay) = self.circuit_listeners.remove(&listener_id) {
                    tracing::info!(%relay, ?reason, "relay listener closed");
                    self.circuit_addrs.remove(&relay);
                    let now = self.now_ms();
                    self.planner
                        .on_reservation_failed(&relay, now, rand::random());
                    metrics::counter!("loom_relay_reservations_total", "outcome" => "closed")
                        .increment(1);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let remote_addr = endpoint.get_remote_address().clone();
                // The listening side of a circuit sees only `/p2p/<src>` as remote address; its
                // local address is the circuit listen address.
                let relayed = is_circuit(&remote_addr)
                    || matches!(&endpoint, libp2p::core::ConnectedPoint::Listener { local_addr, .. } if is_circuit(local_addr));
                let has_relayed = self
                    .connections
                    .values()
                    .any(|c| c.peer == peer_id && c.kind == ConnectionKind::Relayed);
                let kind = if relayed {
                    ConnectionKind::Relayed
                } else if self.punched.remove(&connection_id) || has_relayed {
                    // Made by DCUtR, or a direct connection that appeared while we only met this
                    // peer through a relay (the other side of a punch).
                    ConnectionKind::HolePunched
                } else {
                    ConnectionKind::Direct
                };
                tracing::info!(peer = %peer_id, kind = kind.as_str(), addr = %remote_addr, "connected");
                let now_ms = self.now_ms();
                self.gossip_watch.on_connected(&peer_id, now_ms);
                self.connections.insert(
                    connection_id,
                    Connection {
                        peer: peer_id,
                        kind,
                        remote_addr,
                        outbound: endpoint.is_dialer(),
                        since: Instant::now(),
                        rtt: None,
                    },
                );
                if let Some(state) = self.dial_state.get_mut(&peer_id) {
                    state.backoff.reset();
                }
                if let Some(fleet) = self.fleet.as_mut() {
                    let now_ms = self.started.elapsed().as_millis() as u64;
                    fleet.on_connected(&mut self.swarm, peer_id, now_ms);
                }
                if let Some(c) = self.connections.get(&connection_id) {
                    self.defense.on_connected(peer_id, &c.remote_addr);
                }
                self.update_peer_gauges();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, num_established, ?cause, "connection closed");
                self.connections.remove(&connection_id);
                if num_established == 0 {
                    self.gossip_watch.on_disconnected(&peer_id);
                }
                if num_established == 0
                    && let Some(fleet) = self.fleet.as_mut()
                {
                    fleet.on_disconnected(&peer_id);
                }
                if num_established == 0 {
                    self.agents.remove(&peer_id);
                    if self.relay_addrs.remove(&peer_id).is_some() {
                        self.planner.on_relay_gone(&peer_id);
                        self.circuit_addrs.remove(&peer_id);
                    }
                }
                self.update_peer_gauges();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, error = %error, "dial failed");
                metrics::counter!("loom_dial_failures_total").increment(1);
            }
            // A relay reservation confirms our circuit address: reachable, but not public.
            SwarmEvent::ExternalAddrConfirmed { address } if !is_circuit(&address) => {
                tracing::info!(%address, "external address confirmed");
                self.nat.on_confirmed(&address.to_string());
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                self.nat.on_expired(&address.to_string());
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                connection_id,
            }) => {
                if self.agents.len() < MAX_AGENTS || self.agents.contains_key(&peer_id) {
                    let mut agent = info.agent_version.clone();
                    agent.truncate(64);
                    self.agents.insert(peer_id, agent);
                }
                let kad_capable = info.protocols.contains(&super::behaviour::KAD_PROTOCOL);
                for addr in info.listen_addrs.iter().take(16) {
                    if kad_capable && (self.loopback_only || !is_loopback(addr)) {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
                let offers_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
                if offers_relay && !self.relay_addrs.contains_key(&peer_id) {
                    // Reserve through the address we reached it on, if direct.
                    // Reserve through the address we dialed it on, or one it listens on.
                    let addr = self.connections.get(&connection_id).and_then(|conn| {
                        if conn.kind == ConnectionKind::Relayed {
                            None
                        } else if conn.outbound {
                            Some(conn.remote_addr.clone())
                        } else {
                            info.listen_addrs
                                .iter()
                                .find(|a| {
                                    !is_unspecified(a)
                                        && (self.loopback_only || !is_loopback(a))
                                        && !is_circuit(a)
                                })
                                .cloned()
                        }
                    });
                    if let Some(addr) = addr {
                        tracing::info!(relay = %peer_id, %addr, "relay available");
                        self.relay_addrs.insert(peer_id, addr);
                        let now = self.now_ms();
                        self.planner.on_relay_usable(peer_id, now);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                connection,
                result: Ok(rtt),
                ..
            }) => {
                if let Some(conn) = self.connections.get_mut(&connection) {
                    conn.rtt = Some(rtt);
                    metrics::histogram!("loom_ping_rtt_seconds", "kind" => conn.kind.as_str())
                        .record(rtt.as_secs_f64());
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Gossipsub(gossipsub::Event::SlowPeer {
                peer_id,
                failed_messages,
            }) => {
                tracing::warn!(peer = %peer_id, ?failed_messages, "gossip to a slow peer dropped");
                metrics::counter!("loom_gossip_slow_peer_total").increment(1);
                if self.gossip_watch.on_overflow(&peer_id, self.now_ms()) {
                    self.reset_gossip(peer_id, "its gossip queue overflowed");
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Unsubscribed { peer_id, topic }) => {
                tracing::debug!(peer = %peer_id, %topic, "peer left a gossip topic");
            }
            BehaviourEvent::AutonatClient(autonat::v2::client::Event {
                tested_addr,
                result,
                ..
            }) => match result {
                Ok(()) => {
                    tracing::info!(addr = %tested_addr, "autonat: reachable");
                    metrics::counter!("loom_autonat_probes_total", "outcome" => "reachable")
                        .increment(1);
                }
                Err(e) => {
                    tracing::info!(addr = %tested_addr, error = %e, "autonat: not reachable");
                    metrics::counter!("loom_autonat_probes_total", "outcome" => "unreachable")
                        .increment(1);
                    if has_ip(&tested_addr) && !is_circuit(&tested_addr) {
                        self.nat.on_probe_failed(&tested_addr.to_string());
                    }
                }
            },
            BehaviourEvent::RelayClient(event) => match event {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal,
                    ..
                } => {
                    tracing::info!(relay = %relay_peer_id, renewal, "relay reservation accepted");
                    self.planner.on_reservation_accepted(&relay_peer_id);
                    metrics::counter!("loom_relay_reservations_total", "outcome" => "accepted")
                        .increment(1);
                }
                relay::client::Event::OutboundCircuitEstablished { .. } => {
                    metrics::counter!("loom_relay_circuits_total", "direction" => "out")
                        .increment(1);
                }
                relay::client::Event::InboundCircuitEstablished { .. } => {
                    metrics::counter!("loom_relay_circuits_total", "direction" => "in")
                        .increment(1);
                }
            },
            BehaviourEvent::RelayServer(event) => self.on_relay_server_event(event),
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => {
                self.hole_punch.attempts += 1;
                metrics::counter!("loom_hole_punch_attempts_total").increment(1);
                match result {
                    Ok(connection_id) => {
                        tracing::info!(peer = %remote_peer_id, "hole punch succeeded");
                        self.hole_punch.successes += 1;
                        metrics::counter!("loom_hole_punch_successes_total").increment(1);
                        match self.connections.get_mut(&connection_id) {
                            Some(conn) => conn.kind = ConnectionKind::HolePunched,
                            None => {
                                if self.punched.len() < MAX_PENDING_PUNCHED {
                                    self.punched.insert(connection_id);
                                }
                            }
                        }
                        self.update_peer_gauges();
                    }
                    Err(e) => {
                        tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed");
                        self.hole_punch.failures += 1;
                        metrics::counter!("loom_hole_punch_failures_total").increment(1);
                    }
                }
            }
            BehaviourEvent::Blobs(event) => self.on_blob_event(event),
            BehaviourEvent::LedgerSync(event) => self.on_ledger_sync_event(event),
            BehaviourEvent::Speedtest(event) => self.on_speedtest_event(event),
            BehaviourEvent::Fleet(event) => {
                let now_ms = self.now_ms();
                match self.fleet.as_mut() {
                    Some(fleet) => fleet.on_event(&mut self.swarm, event, now_ms),
                    None => {
                        // Not in a fleet: answer proofs with no token.
                        if let request_response::Event::Message {
                            message: request_response::Message::Request { channel, .. },
                            ..
                        } = event
                        {
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .fleet
                                .send_response(channel, Vec::new());
                        }
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found.into_iter().take(32) {
                    self.connect_hint(peer, vec![addr], true);
                }
            }
            _ => {}
        }
    }

    fn on_blob_event(&mut self, event: request_response::Event<BlobHash, BlobReply>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let stranger = self.fleet.as_ref().is_some_and(|f| !f.admits(&peer));
                let held = self
                    .blobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&request);
                let reply = match held {
                    Some(bytes) if bytes.len() as u64 <= MAX_BLOB_BYTES && !stranger => {
                        metrics::counter!("loom_blob_bytes_served_total")
                            .increment(bytes.len() as u64);
                        BlobReply::Found(bytes)
                    }
                    _ => BlobReply::Missing,
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .blobs
                    .send_response(channel, reply);
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((hash, key)) = self.blob_requests.remove(&request_id) {
                    let result = match response {
                        BlobReply::Found(bytes) => {
                            metrics::counter!("loom_blob_bytes_fetched_total")
                                .increment(bytes.len() as u64);
                            Ok(std::sync::Arc::try_unwrap(bytes).unwrap_or_else(|b| (*b).clone()))
                        }
                        BlobReply::Missing => Err("peer does not hold the blob".to_owned()),
                    };
                    deliver_blob(hash, key, result);
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((hash, key)) = self.blob_requests.remove(&request_id) {
                    deliver_blob(hash, key, Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { error, .. } => {
                tracing::debug!(%error, "blob request from a peer failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_ledger_sync_event(&mut self, event: request_response::Event<SyncRequest, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let stranger = self.fleet.as_ref().is_some_and(|f| !f.admits(&peer));
                let limit = (request.limit as usize).min(MAX_SYNC_BLOCKS);
                let blocks = match &self.ledger {
                    Some(_) if stranger => Vec::new(),
                    Some(store) => store
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .range(request.from_height, limit)
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                // Keep the response under its bound: fewer blocks when they are large.
                let mut response = SyncResponse { blocks };
                let mut bytes = response.to_bytes();
                while bytes.len() > MAX_SYNC_RESPONSE_BYTES && !response.blocks.is_empty() {
                    response.blocks.truncate(response.blocks.len() / 2);
                    bytes = response.to_bytes();
                }
                metrics::counter!("loom_ledger_sync_served_blocks_total")
                    .increment(response.blocks.len() as u64);
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .ledger_sync
                    .send_response(channel, bytes);
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(key) = self.ledger_requests.remove(&request_id) {
                    let result = SyncResponse::from_bytes(&response)
                        .map(|r| r.blocks)
                        .map_err(|e| e.to_string());
                    deliver_ledger(key, result);
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some(key) = self.ledger_requests.remove(&request_id) {
                    deliver_ledger(key, Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { error, .. } => {
                tracing::debug!(%error, "ledger sync request from a peer failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_speedtest_event(&mut self, event: request_response::Event<u32, Vec<u8>>) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let stranger = self.fleet.as_ref().is_some_and(|f| !f.admits(&peer));
                let now_ms = self.now_ms();
                let bytes = if !stranger && self.speedtest_limiter.allow(peer, request, now_ms) {
                    super::speedtest::filler(request as usize)
                } else {
                    Vec::new()
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .speedtest
                    .send_response(channel, bytes);
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((peer, started, reply)) = self.speedtests.remove(&request_id) {
                    let elapsed = started.elapsed().as_secs_f64();
                    let result = if response.is_empty() {
                        Err("the peer declined (cooldown or budget)".to_owned())
                    } else {
                        Ok(super::speedtest::SpeedtestResult {
                            peer: peer.to_string(),
                            bytes: response.len() as u64,
                            elapsed_ms: elapsed * 1e3,
                            mbit_per_s: response.len() as f64 * 8.0 / elapsed.max(1e-9) / 1e6,
                        })
                    };
                    let _ = reply.send(result);
                }
            }
            request_response::Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((_, _, reply)) = self.speedtests.remove(&request_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            request_response::Event::InboundFailure { .. }
            | request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_relay_server_event(&mut self, event: relay::Event) {
        let Some(stats) = self.relay_server.as_mut() else {
            return;
        };
        let (name, delta_res, delta_circ): (&str, i64, i64) = match event {
            relay::Event::ReservationReqAccepted { renewed, .. } => {
                ("reservation-accepted", if renewed { 0 } else { 1 }, 0)
            }
            relay::Event::ReservationReqDenied { .. } => ("reservation-denied", 0, 0),
            relay::Event::ReservationTimedOut { .. } => ("reservation-timed-out", -1, 0),
            relay::Event::ReservationClosed { .. } => ("reservation-closed", -1, 0),
            relay::Event::CircuitReqAccepted { .. } => ("circuit-accepted", 0, 1),
            relay::Event::CircuitReqDenied { .. } => ("circuit-denied", 0, 0),
            relay::Event::CircuitClosed { .. } => ("circuit-closed", 0, -1),
            _ => ("other", 0, 0),
        };
        tracing::debug!(event = name, "relay server");
        metrics::counter!("loom_relay_server_events_total", "event" => name).increment(1);
        stats.reservations = stats.reservations.saturating_add_signed(delta_res);
        stats.circuits = stats.circuits.saturating_add_signed(delta_circ);
        metrics::gauge!("loom_relay_server_reservations").set(stats.reservations as f64);
        metrics::gauge!("loom_relay_server_circuits").set(stats.circuits as f64);
    }

    fn on_gossip(
        &mut self,
        source: PeerId,
        message_id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
        let topic =
            if message.topic == gossipsub::IdentTopic::new(Topic::Membership.as_str()).hash() {
                Topic::Membership
            } else if message.topic == gossipsub::IdentTopic::new(Topic::Probe.as_str()).hash() {
                Topic::Probe
            } else if message.topic == gossipsub::IdentTopic::new(Topic::Training.as_str()).hash() {
                Topic::Training
            } else if message.topic == gossipsub::IdentTopic::new(Topic::Ledger.as_str()).hash() {
                Topic::Ledger
            } else {
                self.report(&message_id, &source, Err("unknown-topic"));
                return;
            };
        // In a fleet only members' forwards count; a stranger's message never gets further.
        if let Some(fleet) = &self.fleet
            && !fleet.admits(&source)
        {
            metrics::counter!("loom_fleet_gossip_rejected_total").increment(1);
            self.report(&message_id, &source, Err("not-in-fleet"));
            return;
        }
        // Valid messages are cheap to make: cap each author's rate before anything reaches an
        // actor's mailbox. Over the rate the message is ignored (not forwarded, not penalised).
        let now_ms = self.now_ms();
        if let Some(author) = message.source
            && !(if topic == Topic::Ledger {
                &mut self.ledger_gossip_limiter
            } else {
                &mut self.gossip_limiter
            })
            .allow(&author, now_ms)
        {
            metrics::counter!("loom_gossip_rate_limited_total").increment(1);
            tracing::debug!(author = %author, topic = topic.as_str(), "gossip over its author's rate; ignored");
            self.swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &message_id,
                    &source,
                    gossipsub::MessageAcceptance::Ignore,
                );
            return;
        }
        let verdict = match validate_gossip(topic, &message.data, message.source) {
            Ok(payload) => {
                if let Some(author) = message.source {
                    self.gossip_watch.on_heard(&author, now_ms);
                }
                match payload {
                    GossipPayload::Heartbeat(hb) => {
                        self.defense.on_heartbeat(&hb.peer_key, &hb.addrs);
                        if let Some(m) = membership() {
                            let _ = m.cast(MembershipMsg::Heartbeat(hb));
                        }
                    }
                    GossipPayload::Probe(probe) => {
                        if let Some(m) = membership() {
                            let _ = m.cast(MembershipMsg::Probe(probe));
                        }
                    }
                    GossipPayload::Ledger => {
                        if let Some(ledger) = ledger() {
                            let _ = ledger.cast(LedgerMsg::Gossip(message.data));
                        }
                    }
                    GossipPayload::Training { from } => {
                        if let Some(exchanger) = exchanger() {
                            let _ = exchanger.cast(ExchangerMsg::Gossip {
                                from,
                                data: message.data,
                            });
                        }
                    }
                }
                Ok(())
            }
            Err(reason) => {
                tracing::debug!(%source, reason, "gossip rejected");
                Err(reason)
            }
        };
        if verdict.is_ok() {
            metrics::counter!("loom_gossip_messages_total", "direction" => "in", "topic" => topic.as_str()).increment(1);
        }
        self.report(&message_id, &source, verdict);
    }

    fn report(
        &mut self,
        id: &gossipsub::MessageId,
        source: &PeerId,
        verdict: Result<(), &'static str>,
    ) {
        let acceptance = match verdict {
            Ok(()) => gossipsub::MessageAcceptance::Accept,
            Err(reason) => {
                metrics::counter!("loom_gossip_rejected_total", "reason" => reason).increment(1);
                gossipsub::MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(id, source, acceptance);
    }

    fn peer_kind(&self, peer: &PeerId) -> Option<ConnectionKind> {
        self.connections
            .values()
            .filter(|c| c.peer == *peer)
            .map(|c| c.kind)
            .max_by_key(|k| match k {
                ConnectionKind::HolePunched => 2,
                ConnectionKind::Direct => 1,
                ConnectionKind::Relayed => 0,
            })
    }

    fn update_peer_gauges(&self) {
        let mut counts: BTreeMap<ConnectionKind, u64> = BTreeMap::new();
        for peer in self.swarm.connected_peers() {
            if let Some(kind) = self.peer_kind(peer) {
                *counts.entry(kind).or_default() += 1;
            }
        }
        for kind in ConnectionKind::ALL {
            metrics::gauge!("loom_peers", "kind" => kind.as_str())
                .set(counts.get(&kind).copied().unwrap_or(0) as f64);
        }
    }

    fn status(&self) -> NetworkStatus {
        let mut peers: Vec<PeerStatus> = self
            .swarm
            .connected_peers()
            .filter_map(|peer| {
                let kind = self.peer_kind(peer)?;
                let conns: Vec<&Connection> = self
                    .connections
                    .values()
                    .filter(|c| c.peer == *peer)
                    .collect();
                // RTT of the best connection with a measurement.
                let rtt_ms = conns
                    .iter()
                    .filter(|c| c.kind == kind)
                    .find_map(|c| c.rtt)
                    .or_else(|| conns.iter().find_map(|c| c.rtt))
                    .map(|d| d.as_secs_f64() * 1e3);
                let (bytes_in, bytes_out) = self.peer_bytes.get(peer);
                Some(PeerStatus {
                    peer_id: peer.to_string(),
                    kind,
                    connections: conns
                        .iter()
                        .map(|c| ConnectionStatus {
                            kind: c.kind,
                            remote_addr: c.remote_addr.to_string(),
                            outbound: c.outbound,
                            age_secs: c.since.elapsed().as_secs(),
                        })
                        .collect(),
                    rtt_ms,
                    bytes_in,
                    bytes_out,
                    agent: self.agents.get(peer).cloned(),
                })
            })
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        NetworkStatus {
            fleet: self.fleet.as_ref().map(|f| f.status()),
            kernel: Some(self.defense.kernel().snapshot()),
            peer_id: self.swarm.local_peer_id().to_string(),
            nat_status: self.nat.status(),
            listen_addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
            external_addrs: self
                .swarm
                .external_addresses()
                .filter(|a| !is_circuit(a))
                .map(|a| a.to_string())
                .collect(),
            relay_reservations: self
                .planner
                .active()
                .map(|relay| ReservationStatus {
                    relay: relay.to_string(),
                    circuit_addrs: self
                        .circuit_addrs
                        .get(relay)
                        .map(|v| v.iter().map(|a| a.to_string()).collect())
                        .unwrap_or_default(),
                })
                .collect(),
            relay_server: self.relay_server.clone(),
            peers,
            hole_punch: self.hole_punch.clone(),
        }
    }
}

/// A gossip message that passed validation.
#[derive(Debug, PartialEq)]
pub enum GossipPayload {
    /// A verified heartbeat signed by the message's author.
    Heartbeat(loom_protocols::Heartbeat),
    /// A probe from the message's author.
    Probe(Probe),
    /// A training message (commitment, close, state) from `from`.
    Training {
        /// The author's key.
        from: PeerKey,
    },
    /// A ledger message (consensus, entry, tip) from its author.
    Ledger,
}

/// Validates a gossip message: bounded decode, signature, and the payload's key must be the
/// gossip author's (no relaying someone else's heartbeat as your own). Returns the reason label
/// used in `loom_gossip_rejected_total` on failure.
pub fn validate_gossip(
    topic: Topic,
    data: &[u8],
    author: Option<PeerId>,
) -> Result<GossipPayload, &'static str> {
    match topic {
        Topic::Membership => {
            let hb = SignedHeartbeat::open(data).map_err(|_| "invalid-heartbeat")?;
            if super::peer_id_of(&hb.peer_key) != author {
                return Err("heartbeat-author-mismatch");
            }
            Ok(GossipPayload::Heartbeat(hb))
        }
        Topic::Probe => {
            let probe = Probe::from_bytes(data).map_err(|_| "invalid-probe")?;
            if super::peer_id_of(&probe.origin) != author {
                return Err("probe-author-mismatch");
            }
            Ok(GossipPayload::Probe(probe))
        }
        Topic::Training => {
            let message = TrainMessage::from_bytes(data).map_err(|_| "invalid-training")?;
            let claimed = message.claimed_author().ok_or("invalid-training")?;
            if super::peer_id_of(&claimed) != author {
                return Err("training-author-mismatch");
            }
            Ok(GossipPayload::Training { from: claimed })
        }
        Topic::Ledger => {
            let message = LedgerGossip::from_bytes(data).map_err(|_| "invalid-ledger")?;
            if super::peer_id_of(&message.claimed_author()) != author {
                return Err("ledger-author-mismatch");
            }
            Ok(GossipPayload::Ledger)
        }
    }
}

fn ledger() -> Option<ActorRef<LedgerMsg>> {
    ractor::registry::where_is(names::LEDGER).map(Into::into)
}

fn deliver_ledger(from: PeerKey, result: Result<Vec<(Block, QuorumCertificate)>, String>) {
    if let Some(ledger) = ledger() {
        let _ = ledger.cast(LedgerMsg::Synced { from, result });
    }
}

fn exchanger() -> Option<ActorRef<ExchangerMsg>> {
    ractor::registry::where_is(names::EXCHANGER).map(Into::into)
}

fn deliver_blob(hash: BlobHash, from: PeerKey, result: Result<Vec<u8>, String>) {
    if let Some(exchanger) = exchanger() {
        let _ = exchanger.cast(ExchangerMsg::BlobFetched { hash, from, result });
    }
}

fn membership() -> Option<ActorRef<MembershipMsg>> {
    ractor::registry::where_is(names::MEMBERSHIP).map(Into::into)
}

fn is_loopback(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| p == Protocol::P2pCircuit)
}

fn has_ip(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::Ip4(_) | Protocol::Ip6(_)))
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

/// The address ending in `/p2p/<peer>` (added unless already there).
fn with_p2p(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(p)) if p == peer => addr,
        _ => addr.with(Protocol::P2p(peer)),
    }
}

/// The address without a trailing `/p2p/<id>`.
fn strip_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use loom_protocols::{Heartbeat, NatStatus};

    fn heartbeat(keypair: &Keypair) -> Vec<u8> {
        let key = keypair
            .public()
            .try_into_ed25519()
            .expect("ed25519")
            .to_bytes();
        Heartbeat {
            peer_key: key,
            incarnation: 1,
            seq: 1,
            sent_at_unix_ms: 0,
            addrs: vec![],
            nat: NatStatus::Unknown,
            agent: "test".into(),
        }
        .seal(|m| keypair.sign(m).expect("sign"))
        .to_bytes()
    }

    #[test]
    fn a_heartbeat_from_its_author_is_accepted() {
        let k = Keypair::generate_ed25519();
        let author = Some(k.public().to_peer_id());
        assert!(matches!(
            validate_gossip(Topic::Membership, &heartbeat(&k), author),
            Ok(GossipPayload::Heartbeat(_))
        ));
    }

    #[test]
    fn a_heartbeat_republished_by_another_author_is_rejected() {
        let k = Keypair::generate_ed25519();
        let other = Some(Keypair::generate_ed25519().public().to_peer_id());
        assert_eq!(
            validate_gossip(Topic::Membership, &heartbeat(&k), other),
            Err("heartbeat-author-mismatch")
        );
    }

    #[test]
    fn garbage_and_oversize_payloads_are_rejected() {
        let author = Some(Keypair::generate_ed25519().public().to_peer_id());
        assert_eq!(
            validate_gossip(Topic::Membership, b"garbage", author),
            Err("invalid-heartbeat")
        );
        let huge = vec![7u8; 200 * 1024];
        assert_eq!(
            validate_gossip(Topic::Membership, &huge, author),
            Err("invalid-heartbeat")
        );
        assert_eq!(
            validate_gossip(Topic::Probe, &huge, author),
            Err("invalid-probe")
        );
    }
}
