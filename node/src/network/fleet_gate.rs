//! The swarm task's fleet gate: which connected peers have proven membership of this node's
//! private fleet, and what happens to those that have not (see [`crate::fleet`]).
//!
//! Every connected peer starts as a stranger: none of its gossip is accepted, it is served
//! nothing, and it is asked for its token over `/loom/fleet/1`. A valid token for
//! the peer's authenticated key, not revoked on the ledger, makes it a member. A peer that
//! answers with no token, an invalid one, or not at all within the deadline is refused: its
//! connections are closed, it is blacklisted in gossipsub and blocked for [`REFUSAL_BLOCK_MS`].
//! Bootstrap peers configured by the operator (relays) are kept as transport but are
//! blacklisted in gossipsub from the start: they are sent no gossip.

use std::collections::{HashMap, HashSet};

use libp2p::{PeerId, Swarm, request_response};

use super::{Behaviour, key_of};
use crate::fleet::{FleetMembership, PROOF_DEADLINE_MS, proves_membership};

/// How long a refused peer stays blocked, in milliseconds.
pub const REFUSAL_BLOCK_MS: u64 = 60_000;
/// Most peers tracked as pending or refused.
const MAX_TRACKED: usize = 4_096;

/// Peers banned or revoked on the ledger, shared with the ledger replica.
pub use loom_actors::ledger::SharedBans;

/// What the gate reports.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FleetStatus {
    /// The fleet's key (hex).
    pub fleet: String,
    /// Connected peers that proved membership.
    pub members_connected: Vec<String>,
    /// Peers refused so far (connections closed).
    pub refused_total: u64,
    /// Peers refused recently.
    pub refused_recent: Vec<String>,
}

/// The gate.
pub struct FleetGate {
    membership: FleetMembership,
    transport_only: HashSet<PeerId>,
    verified: HashSet<PeerId>,
    pending: HashMap<PeerId, u64>,
    refused: HashMap<PeerId, u64>,
    refused_total: u64,
    bans: SharedBans,
}

impl FleetGate {
    /// A gate for `membership`; `transport_only` are the configured bootstrap peers.
    pub fn new(
        membership: FleetMembership,
        transport_only: HashSet<PeerId>,
        bans: SharedBans,
    ) -> Self {
        Self {
            membership,
            transport_only,
            verified: HashSet::new(),
            pending: HashMap::new(),
            refused: HashMap::new(),
            refused_total: 0,
            bans,
        }
    }

    /// Whether `peer` proved membership and is not banned.
    pub fn admits(&self, peer: &PeerId) -> bool {
        self.verified.contains(peer)
    }

    fn banned(&self, peer: &PeerId) -> bool {
        key_of(peer).is_none_or(|key| {
            self.bans
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&key)
        })
    }

    fn check(&self, peer: &PeerId, token: &[u8]) -> bool {
        let Some(key) = key_of(peer) else {
            return false;
        };
        proves_membership(&self.membership.fleet, &key, token) && !self.banned(peer)
    }

    /// A connection to `peer` was established.
    pub fn on_connected(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, now_ms: u64) {
        if self.verified.contains(&peer) || self.pending.contains_key(&peer) {
            return;
        }
        // Relays kept as transport never get gossip. Others are not blacklisted while they
        // prove membership (one round trip): gossipsub ignores the subscriptions of a
        // blacklisted peer for good, so a member would never hear its topics; their gossip is
        // refused by the validator until they are admitted.
        if self.transport_only.contains(&peer) {
            swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
        }
        if self.pending.len() >= MAX_TRACKED {
            self.refuse(swarm, peer, now_ms, "too many unproven peers");
            return;
        }
        self.pending.insert(peer, now_ms + PROOF_DEADLINE_MS);
        swarm
            .behaviour_mut()
            .fleet
            .send_request(&peer, self.membership.token.clone());
    }

    /// The last connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: &PeerId) {
        self.verified.remove(peer);
        self.pending.remove(peer);
    }

    fn admit(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId) {
        self.pending.remove(&peer);
        if self.verified.insert(peer) {
            tracing::info!(%peer, "fleet member proved its enrollment");
            metrics::counter!("loom_fleet_members_admitted_total").increment(1);
        }
        swarm
            .behaviour_mut()
            .gossipsub
            .remove_blacklisted_peer(&peer);
    }

    fn refuse(&mut self, swarm: &mut Swarm<Behaviour>, peer: PeerId, now_ms: u64, why: &str) {
        self.pending.remove(&peer);
        self.verified.remove(&peer);
        swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
        if self.transport_only.contains(&peer) {
            return;
        }
        tracing::info!(%peer, why, "refusing a peer that is not in the fleet");
        metrics::counter!("loom_fleet_refused_total").increment(1);
        self.refused_total += 1;
        if self.refused.len() < MAX_TRACKED {
            self.refused.insert(peer, now_ms + REFUSAL_BLOCK_MS);
        }
        swarm.behaviour_mut().blocked.block_peer(peer);
        let _ = swarm.disconnect_peer_id(peer);
    }

    /// An event of the `/loom/fleet/1` protocol.
    pub fn on_event(
        &mut self,
        swarm: &mut Swarm<Behaviour>,
        event: request_response::Event<Vec<u8>, Vec<u8>>,
        now_ms: u64,
    ) {
        match event {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if self.check(&peer, &request) {
                    let _ = swarm
                        .behaviour_mut()
                        .fleet
                        .send_response(channel, self.membership.token.clone());
                    self.admit(swarm, peer);
                } else {
                    let _ = swarm
                        .behaviour_mut()
                        .fleet
                        .send_response(channel, Vec::new());
                    self.refuse(swarm, peer, now_ms, "invalid or missing enrollment token");
                }
            }
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { response, .. },
                ..
            } => {
                if self.check(&peer, &response) {
                    self.admit(swarm, peer);
                } else {
                    self.refuse(swarm, peer, now_ms, "invalid or missing enrollment token");
                }
            }
            request_response::Event::OutboundFailure { peer, error, .. } => {
                if !self.verified.contains(&peer) {
                    tracing::debug!(%peer, %error, "fleet proof request failed");
                    self.refuse(swarm, peer, now_ms, "no enrollment proof");
                }
            }
            request_response::Event::InboundFailure { .. }
            | request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Periodic: refuse peers past their deadline, drop revoked members, lift expired blocks.
    pub fn on_tick(&mut self, swarm: &mut Swarm<Behaviour>, now_ms: u64) {
        let late: Vec<PeerId> = self
            .pending
            .iter()
            .filter(|(_, deadline)| **deadline <= now_ms)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in late {
            self.refuse(swarm, peer, now_ms, "no enrollment proof in time");
        }
        let revoked: Vec<PeerId> = self
            .verified
            .iter()
            .filter(|peer| self.banned(peer))
            .copied()
            .collect();
        for peer in revoked {
            self.refuse(swarm, peer, now_ms, "revoked on the ledger");
        }
        let expired: Vec<PeerId> = self
            .refused
            .iter()
            .filter(|(_, until)| **until <= now_ms)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in expired {
            self.refused.remove(&peer);
            if !self.banned(&peer) {
                swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
        }
    }

    /// Whether dialing `peer` is pointless (refused recently).
    pub fn refused_recently(&self, peer: &PeerId) -> bool {
        self.refused.contains_key(peer)
    }

    /// The gate's report.
    pub fn status(&self) -> FleetStatus {
        FleetStatus {
            fleet: crate::ledger_cli::hex(&self.membership.fleet),
            members_connected: self.verified.iter().map(|p| p.to_string()).collect(),
            refused_total: self.refused_total,
            refused_recent: self.refused.keys().map(|p| p.to_string()).collect(),
        }
    }
}
