//! Connection kinds, NAT status and the relay-reservation plan of one peer.
//!
//! The network layer feeds in what libp2p observed (AutoNAT v2 results, confirmed external
//! addresses, relays met and identified) and asks [`RelayPlanner::poll`] which relays to reserve a
//! slot on. Everything is keyed by plain values and driven by `now_ms`, so the policy is tested
//! here without sockets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::Backoff;

/// How a connection to a remote peer was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectionKind {
    /// Dialed or accepted on a plain address, no relay involved.
    Direct,
    /// Carried through a relay circuit (`/p2p-circuit`).
    Relayed,
    /// A direct connection made by hole punching (DCUtR) after meeting through a relay.
    HolePunched,
}

impl ConnectionKind {
    /// The label used in metrics and in `loom-peer status`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::Direct => "direct",
            ConnectionKind::Relayed => "relayed",
            ConnectionKind::HolePunched => "hole-punched",
        }
    }

    /// Every kind, for exporting one gauge per kind.
    pub const ALL: [ConnectionKind; 3] = [
        ConnectionKind::Direct,
        ConnectionKind::Relayed,
        ConnectionKind::HolePunched,
    ];
}

/// Whether this peer can be dialed from the public internet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatStatus {
    /// No probe has answered yet.
    Unknown,
    /// At least one external address was confirmed reachable by a dial-back.
    Public,
    /// Probes of our observed addresses failed and none is confirmed.
    Private,
}

impl NatStatus {
    /// The label used in metrics and in `loom-peer status`.
    pub fn as_str(self) -> &'static str {
        match self {
            NatStatus::Unknown => "unknown",
            NatStatus::Public => "public",
            NatStatus::Private => "private",
        }
    }
}

/// Derives [`NatStatus`] from AutoNAT v2 results and the swarm's confirmed external addresses.
#[derive(Debug, Default, Clone)]
pub struct NatTracker {
    confirmed: BTreeSet<String>,
    failed: BTreeSet<String>,
}

/// Most distinct failed addresses remembered (observed addresses are remote input).
const MAX_FAILED_ADDRS: usize = 64;

impl NatTracker {
    /// An external address was confirmed reachable.
    pub fn on_confirmed(&mut self, addr: &str) {
        self.failed.remove(addr);
        self.confirmed.insert(addr.to_owned());
    }

    /// A confirmed external address expired.
    pub fn on_expired(&mut self, addr: &str) {
        self.confirmed.remove(addr);
    }

    /// A dial-back test of `addr` failed.
    pub fn on_probe_failed(&mut self, addr: &str) {
        if self.confirmed.contains(addr) || self.failed.len() >= MAX_FAILED_ADDRS {
            return;
        }
        self.failed.insert(addr.to_owned());
    }

    /// The current status.
    pub fn status(&self) -> NatStatus {
        if !self.confirmed.is_empty() {
            NatStatus::Public
        } else if !self.failed.is_empty() {
            NatStatus::Private
        } else {
            NatStatus::Unknown
        }
    }

    /// Confirmed external addresses.
    pub fn confirmed(&self) -> impl Iterator<Item = &str> {
        self.confirmed.iter().map(String::as_str)
    }
}

/// What the planner wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayAction<R> {
    /// Listen on `/p2p-circuit` through this relay (ask it for a reservation).
    Reserve(R),
}

#[derive(Debug, Clone)]
enum SlotState {
    /// A reservation was requested and has not been answered.
    Pending,
    /// The relay accepted the reservation.
    Active,
    /// The last attempt failed; retry after `retry_at_ms`.
    Failed { retry_at_ms: u64 },
}

#[derive(Debug, Clone)]
struct RelaySlot {
    state: SlotState,
    backoff: Backoff,
    failures: u32,
}

/// Decides when and on which relays this peer reserves a slot.
///
/// Policy: a peer that is not known to be public reserves on up to `max_reservations` relays
/// once `grace_ms` has passed since it first met a relay (time for AutoNAT to confirm a public
/// address). A relay is usable once identify has told us our observed address through it: DCUtR
/// fixes its address candidates when the relayed connection opens, so reserving earlier would
/// leave hole punching without candidates. Failed reservations are retried with backoff, at most
/// `max_attempts` times per relay.
#[derive(Debug, Clone)]
pub struct RelayPlanner<R: Ord + Clone> {
    max_reservations: usize,
    grace_ms: u64,
    max_attempts: u32,
    first_relay_at_ms: Option<u64>,
    usable: BTreeSet<R>,
    slots: BTreeMap<R, RelaySlot>,
}

/// Most relays tracked at once (relays are learned from remote peers).
const MAX_TRACKED_RELAYS: usize = 32;

impl<R: Ord + Clone> RelayPlanner<R> {
    /// A planner holding at most `max_reservations` slots.
    pub fn new(max_reservations: usize, grace_ms: u64, max_attempts: u32) -> Self {
        Self {
            max_reservations,
            grace_ms,
            max_attempts,
            first_relay_at_ms: None,
            usable: BTreeSet::new(),
            slots: BTreeMap::new(),
        }
    }

    /// A connected peer offers the relay protocol and identify reported our observed address.
    pub fn on_relay_usable(&mut self, relay: R, now_ms: u64) {
        if self.usable.len() >= MAX_TRACKED_RELAYS && !self.usable.contains(&relay) {
            return;
        }
        self.first_relay_at_ms.get_or_insert(now_ms);
        self.usable.insert(relay);
    }

    /// The relay went away (all connections closed).
    pub fn on_relay_gone(&mut self, relay: &R) {
        self.usable.remove(relay);
        self.slots.remove(relay);
    }

    /// The relay accepted (or renewed) our reservation.
    pub fn on_reservation_accepted(&mut self, relay: &R) {
        if let Some(slot) = self.slots.get_mut(relay) {
            slot.state = SlotState::Active;
            slot.backoff.reset();
            slot.failures = 0;
        }
    }

    /// The reservation on `relay` failed or its listener closed; `jitter_unit` in `[0, 1)`.
    pub fn on_reservation_failed(&mut self, relay: &R, now_ms: u64, jitter_unit: f64) {
        if let Some(slot) = self.slots.get_mut(relay) {
            slot.failures += 1;
            let delay = slot.backoff.next_delay_ms(jitter_unit);
            slot.state = SlotState::Failed {
                retry_at_ms: now_ms + delay,
            };
        }
    }

    /// Relays with an accepted reservation.
    pub fn active(&self) -> impl Iterator<Item = &R> {
        self.slots
            .iter()
            .filter(|(_, s)| matches!(s.state, SlotState::Active))
            .map(|(r, _)| r)
    }

    /// What to do now, given the current NAT status.
    pub fn poll(&mut self, nat: NatStatus, now_ms: u64) -> Vec<RelayAction<R>> {
        let mut actions = Vec::new();
        if nat == NatStatus::Public {
            return actions;
        }
        let Some(first) = self.first_relay_at_ms else {
            return actions;
        };
        if nat == NatStatus::Unknown && now_ms < first + self.grace_ms {
            return actions;
        }
        // Retry failed slots whose backoff elapsed.
        for (relay, slot) in self.slots.iter_mut() {
            if let SlotState::Failed { retry_at_ms } = slot.state
                && now_ms >= retry_at_ms
                && slot.failures < self.max_attempts
                && self.usable.contains(relay)
            {
                slot.state = SlotState::Pending;
                actions.push(RelayAction::Reserve(relay.clone()));
            }
        }
        let held = self
            .slots
            .values()
            .filter(|s| !matches!(s.state, SlotState::Failed { .. }))
            .count();
        let wanted = self.max_reservations.saturating_sub(held);
        let fresh: Vec<R> = self
            .usable
            .iter()
            .filter(|r| !self.slots.contains_key(*r))
            .take(wanted)
            .cloned()
            .collect();
        for relay in fresh {
            self.slots.insert(
                relay.clone(),
                RelaySlot {
                    state: SlotState::Pending,
                    backoff: Backoff::new(1_000, 60_000),
                    failures: 0,
                },
            );
            actions.push(RelayAction::Reserve(relay));
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_status_follows_probes_and_confirmations() {
        let mut nat = NatTracker::default();
        assert_eq!(nat.status(), NatStatus::Unknown);
        nat.on_probe_failed("/ip4/1.2.3.4/tcp/1");
        assert_eq!(nat.status(), NatStatus::Private);
        nat.on_confirmed("/ip4/1.2.3.4/tcp/2");
        assert_eq!(nat.status(), NatStatus::Public);
        nat.on_expired("/ip4/1.2.3.4/tcp/2");
        assert_eq!(nat.status(), NatStatus::Private);
    }

    #[test]
    fn a_public_peer_reserves_nothing() {
        let mut p = RelayPlanner::new(2, 1_000, 5);
        p.on_relay_usable("r1", 0);
        assert!(p.poll(NatStatus::Public, 10_000).is_empty());
    }

    #[test]
    fn an_unknown_peer_waits_for_the_grace_period() {
        let mut p = RelayPlanner::new(2, 1_000, 5);
        p.on_relay_usable("r1", 0);
        assert!(p.poll(NatStatus::Unknown, 999).is_empty());
        assert_eq!(
            p.poll(NatStatus::Unknown, 1_000),
            vec![RelayAction::Reserve("r1")]
        );
        // Pending: not requested twice.
        assert!(p.poll(NatStatus::Unknown, 2_000).is_empty());
    }

    #[test]
    fn a_private_peer_reserves_at_once_up_to_the_limit() {
        let mut p = RelayPlanner::new(2, 60_000, 5);
        for r in ["a", "b", "c"] {
            p.on_relay_usable(r, 0);
        }
        assert_eq!(
            p.poll(NatStatus::Private, 1),
            vec![RelayAction::Reserve("a"), RelayAction::Reserve("b")]
        );
        p.on_reservation_accepted(&"a");
        assert_eq!(p.active().collect::<Vec<_>>(), vec![&"a"]);
    }

    #[test]
    fn failed_reservations_retry_with_backoff_then_give_up() {
        let mut p = RelayPlanner::new(1, 0, 2);
        p.on_relay_usable("a", 0);
        assert_eq!(p.poll(NatStatus::Private, 0).len(), 1);
        p.on_reservation_failed(&"a", 0, 0.0);
        assert!(p.poll(NatStatus::Private, 999).is_empty());
        assert_eq!(
            p.poll(NatStatus::Private, 1_000),
            vec![RelayAction::Reserve("a")]
        );
        p.on_reservation_failed(&"a", 1_000, 0.0);
        // Second failure reaches max_attempts: never again.
        assert!(p.poll(NatStatus::Private, 100_000).is_empty());
    }

    #[test]
    fn a_lost_relay_frees_its_slot_for_another() {
        let mut p = RelayPlanner::new(1, 0, 3);
        p.on_relay_usable("a", 0);
        p.on_relay_usable("b", 0);
        assert_eq!(
            p.poll(NatStatus::Private, 0),
            vec![RelayAction::Reserve("a")]
        );
        p.on_relay_gone(&"a");
        assert_eq!(
            p.poll(NatStatus::Private, 1),
            vec![RelayAction::Reserve("b")]
        );
    }
}
