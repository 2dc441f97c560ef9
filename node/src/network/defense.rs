//! The swarm task's active defense: bans (local, from the ledger, automatic) enforced at every
//! layer, and the kernel telemetry fed with the node's own connection table.
//!
//! Every tick (250 ms) it gathers the banned peers: the local ban list (`loom-peer ban`, persisted in
//! `bans.json`), the peers banned or revoked on the ledger, and, with `--auto-ban`, the peers the
//! anomaly detector newly flagged (banned locally for [`AUTO_BAN_MS`]). A banned peer is blocked
//! in libp2p and disconnected, and every address it is known by goes on the XDP drop list: the
//! addresses of its connections and those it advertises in its heartbeats, which other peers keep
//! relaying, so the list follows it when its addresses change. Unbanning or expiry lifts all of it.
//! The kernel telemetry gets the table of which remote IPs belong to which peer, so its counters
//! are attributed per peer.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use libp2p::{Multiaddr, PeerId, Swarm, multiaddr::Protocol};

use super::{Behaviour, peer_id_of};
use crate::{
    bans::{BanList, BanSource},
    kernel::KernelTelemetry,
};

/// How long an automatic ban lasts, in milliseconds.
pub const AUTO_BAN_MS: u64 = 60 * 60 * 1000;
/// Most peers whose addresses are remembered.
const MAX_REMEMBERED: usize = 4_096;
/// Most addresses remembered per peer.
const MAX_ADDRS_PER_PEER: usize = 16;

/// The local ban list, shared with the control API.
pub type SharedBanList = Arc<Mutex<BanList>>;

/// The defense state of the swarm task.
pub struct Defense {
    kernel: KernelTelemetry,
    local: SharedBanList,
    ledger: loom_actors::ledger::SharedBans,
    auto_ban: bool,
    static_blocked: HashSet<PeerId>,
    rejections: loom_actors::SharedRejections,
    heard: HashMap<PeerId, Vec<IpAddr>>,
    banned: HashSet<PeerId>,
    sent_table: Vec<(String, Vec<IpAddr>)>,
    sent_dropped: Vec<(String, Vec<IpAddr>)>,
}

/// The IP address of a multiaddr, unless it goes through a relay.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl Defense {
    /// Defense with these sources of bans; `static_blocked` are the `--block` peers, never
    /// unblocked here; `rejections` are the exchanger's refused contributions per peer.
    pub fn new(
        kernel: KernelTelemetry,
        local: SharedBanList,
        ledger: loom_actors::ledger::SharedBans,
        auto_ban: bool,
        static_blocked: HashSet<PeerId>,
        rejections: loom_actors::SharedRejections,
    ) -> Self {
        Self {
            rejections,
            kernel,
            local,
            ledger,
            auto_ban,
            static_blocked,
            heard: HashMap::new(),
            banned: HashSet::new(),
            sent_table: Vec::new(),
            sent_dropped: Vec::new(),
        }
    }

    /// The kernel telemetry handle.
    pub fn kernel(&self) -> &KernelTelemetry {
        &self.kernel
    }

    fn remember(&mut self, peer: PeerId, ips: impl IntoIterator<Item = IpAddr>) {
        if self.heard.len() >= MAX_REMEMBERED && !self.heard.contains_key(&peer) {
            return;
        }
        let known = self.heard.entry(peer).or_default();
        for ip in ips {
            if !known.contains(&ip) {
                if known.len() >= MAX_ADDRS_PER_PEER {
                    known.remove(0);
                }
                known.push(ip);
            }
        }
    }

    /// A connection to `peer` at `addr` opened.
    pub fn on_connected(&mut self, peer: PeerId, addr: &Multiaddr) {
        if let Some(ip) = ip_of(addr) {
            self.remember(peer, [ip]);
        }
    }

    /// A heartbeat of `peer_key` advertised `addrs`.
    pub fn on_heartbeat(&mut self, peer_key: &loom_protocols::PeerKey, addrs: &[String]) {
        let Some(peer) = peer_id_of(peer_key) else {
            return;
        };
        let ips: Vec<IpAddr> = addrs
            .iter()
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .filter_map(|a| ip_of(&a))
            .filter(|ip| !ip.is_unspecified())
            .collect();
        self.remember(peer, ips);
    }

    /// Every tick: recompute the banned set, enforce it, and refresh the kernel's tables.
    /// `table` is the node's connection table (peer, remote address).
    pub fn on_tick(&mut self, swarm: &mut Swarm<Behaviour>, table: &[(PeerId, Multiaddr)]) {
        let now = loom_actors::unix_ms();
        let rejected: Vec<(String, u64)> = self
            .rejections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(key, count)| peer_id_of(key).map(|p| (p.to_string(), *count)))
            .collect();
        if !rejected.is_empty() {
            self.kernel.set_rejections(rejected);
        }
        if self.auto_ban {
            for candidate in self.kernel.take_auto_ban_candidates() {
                let mut list = self.local.lock().unwrap_or_else(|e| e.into_inner());
                match list.ban(
                    &candidate,
                    Some(Duration::from_millis(AUTO_BAN_MS)),
                    "flagged by the anomaly detector",
                    BanSource::Auto,
                    now,
                ) {
                    Ok(_) => {
                        tracing::warn!(peer = %candidate, "auto-banned a flagged peer");
                        metrics::counter!("loom_bans_total", "source" => "auto").increment(1);
                    }
                    Err(error) => tracing::warn!(%error, "auto-ban failed"),
                }
            }
        }
        let mut banned: HashSet<PeerId> = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active(now)
            .into_iter()
            .filter_map(|entry| entry.peer_id.parse().ok())
            .collect();
        banned.extend(
            self.ledger
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter_map(peer_id_of),
        );
        for peer in banned.difference(&self.banned) {
            tracing::info!(%peer, "banning peer");
            swarm.behaviour_mut().blocked.block_peer(*peer);
            let _ = swarm.disconnect_peer_id(*peer);
        }
        for peer in self.banned.difference(&banned) {
            if !self.static_blocked.contains(peer) {
                tracing::info!(%peer, "ban lifted");
                swarm.behaviour_mut().blocked.unblock_peer(*peer);
            }
        }
        self.banned = banned;
        metrics::gauge!("loom_banned_peers").set(self.banned.len() as f64);

        let mut by_peer: HashMap<PeerId, Vec<IpAddr>> = HashMap::new();
        for (peer, addr) in table {
            if let Some(ip) = ip_of(addr) {
                let ips = by_peer.entry(*peer).or_default();
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        for (peer, ips) in &by_peer {
            self.remember(*peer, ips.iter().copied());
        }
        // Never drop loopback, nor an address an unbanned peer is connected from (a NAT shared
        // with honest peers): those bans hold in libp2p only.
        let protected: HashSet<IpAddr> = by_peer
            .iter()
            .filter(|(peer, _)| !self.banned.contains(peer))
            .flat_map(|(_, ips)| ips.iter().copied())
            .collect();
        let mut table: Vec<(String, Vec<IpAddr>)> = by_peer
            .into_iter()
            .map(|(peer, mut ips)| {
                ips.sort();
                (peer.to_string(), ips)
            })
            .collect();
        table.sort();
        // Only changes wake the telemetry thread.
        if table != self.sent_table {
            self.kernel.set_peer_addresses(table.clone());
            self.sent_table = table;
        }
        let mut dropped: Vec<(String, Vec<IpAddr>)> = self
            .banned
            .iter()
            .map(|peer| {
                let ips = self
                    .heard
                    .get(peer)
                    .map(|ips| {
                        ips.iter()
                            .filter(|ip| !ip.is_loopback() && !protected.contains(ip))
                            .copied()
                            .collect()
                    })
                    .unwrap_or_default();
                (peer.to_string(), ips)
            })
            .collect();
        dropped.sort();
        if dropped != self.sent_dropped {
            self.kernel.set_dropped_peers(dropped.clone());
            self.sent_dropped = dropped;
        }
    }

    /// Whether `peer` is banned now.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains(peer)
    }
}
