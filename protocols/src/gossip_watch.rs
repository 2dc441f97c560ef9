//! A watchdog over gossip delivery, per connected peer: which connections to reset because the
//! peer at the other end is connected yet no longer heard.
//!
//! Gossip is best effort, and a connection can go on existing while the gossip carried over it
//! has stopped in one direction (a stream handler that gave up, a send queue that is never
//! drained). Tendermint, the heartbeats and the training rounds all need messages to arrive
//! eventually, so such a connection is worse than none: nobody redials a peer that still counts
//! as connected. A peer that was heard on gossip before (its own heartbeats, which it publishes
//! every heartbeat interval) and has been silent for `silence_ms` while connected, or whose
//! outgoing gossip queue overflowed, has its connections closed and is dialled again, which
//! gives both ends fresh gossip state. Each peer is reset at most once per `reset_every_ms`.
//!
//! Sans-I/O: time comes in as `now_ms`; the caller closes and redials.

use std::{collections::HashMap, hash::Hash};

/// What is known of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Watched {
    /// When a gossip message it authored last arrived.
    last_heard_ms: Option<u64>,
    /// Since when it has been connected (None: not connected).
    connected_since_ms: Option<u64>,
    /// When its connections were last reset.
    last_reset_ms: Option<u64>,
}

impl Watched {
    /// Whether its connections were reset less than `period_ms` before `now_ms`.
    fn reset_within(&self, period_ms: u64, now_ms: u64) -> bool {
        self.last_reset_ms
            .is_some_and(|r| now_ms.saturating_sub(r) < period_ms)
    }
}

/// The watchdog.
#[derive(Debug, Clone)]
pub struct GossipWatchdog<K: Eq + Hash + Clone> {
    silence_ms: u64,
    reset_every_ms: u64,
    max_peers: usize,
    peers: HashMap<K, Watched>,
}

impl<K: Eq + Hash + Clone> GossipWatchdog<K> {
    /// A watchdog that resets a peer silent for `silence_ms` while connected, at most once per
    /// `reset_every_ms`, tracking at most `max_peers` peers.
    pub fn new(silence_ms: u64, reset_every_ms: u64, max_peers: usize) -> Self {
        Self {
            silence_ms: silence_ms.max(1),
            reset_every_ms,
            max_peers: max_peers.max(1),
            peers: HashMap::new(),
        }
    }

    /// A gossip message authored by `peer` arrived.
    pub fn on_heard(&mut self, peer: &K, now_ms: u64) {
        if let Some(watched) = self.slot(peer) {
            watched.last_heard_ms = Some(now_ms);
        }
    }

    /// A connection to `peer` was established.
    pub fn on_connected(&mut self, peer: &K, now_ms: u64) {
        if let Some(watched) = self.slot(peer) {
            watched.connected_since_ms.get_or_insert(now_ms);
        }
    }

    /// The last connection to `peer` closed.
    pub fn on_disconnected(&mut self, peer: &K) {
        if let Some(watched) = self.peers.get_mut(peer) {
            watched.connected_since_ms = None;
        }
    }

    /// Gossip queued for `peer` was dropped because its queue was full: whether to reset it now
    /// (not if it was reset within `reset_every_ms`).
    pub fn on_overflow(&mut self, peer: &K, now_ms: u64) -> bool {
        let reset_every_ms = self.reset_every_ms;
        match self.peers.get_mut(peer) {
            Some(watched)
                if watched.connected_since_ms.is_some()
                    && !watched.reset_within(reset_every_ms, now_ms) =>
            {
                watched.last_reset_ms = Some(now_ms);
                true
            }
            _ => false,
        }
    }

    /// The connected peers to reset now: heard before, silent for `silence_ms` since the later
    /// of the last message, the connection and the last reset, and not reset within
    /// `reset_every_ms`.
    pub fn poll(&mut self, now_ms: u64) -> Vec<K> {
        let mut reset = Vec::new();
        for (peer, watched) in &mut self.peers {
            let (Some(heard), Some(connected)) =
                (watched.last_heard_ms, watched.connected_since_ms)
            else {
                continue;
            };
            let quiet_since = heard.max(connected).max(watched.last_reset_ms.unwrap_or(0));
            if now_ms.saturating_sub(quiet_since) >= self.silence_ms
                && !watched.reset_within(self.reset_every_ms, now_ms)
            {
                watched.last_reset_ms = Some(now_ms);
                reset.push(peer.clone());
            }
        }
        reset
    }

    /// Peers tracked.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is tracked.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The entry of `peer`, made if there is room (disconnected peers make room).
    fn slot(&mut self, peer: &K) -> Option<&mut Watched> {
        if !self.peers.contains_key(peer) && self.peers.len() >= self.max_peers {
            self.peers.retain(|_, w| w.connected_since_ms.is_some());
            if self.peers.len() >= self.max_peers {
                return None;
            }
        }
        Some(self.peers.entry(peer.clone()).or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connected_peer_heard_before_and_then_silent_is_reset_once_per_period() {
        let mut watch = GossipWatchdog::new(5_000, 30_000, 16);
        watch.on_connected(&"a", 0);
        watch.on_heard(&"a", 1_000);
        assert!(watch.poll(5_999).is_empty(), "silent for less than 5 s");
        watch.on_heard(&"a", 5_000);
        assert!(watch.poll(9_999).is_empty(), "heard again");
        assert_eq!(watch.poll(10_000), vec!["a"]);
        assert!(watch.poll(20_000).is_empty(), "reset 10 s ago");
        assert_eq!(watch.poll(40_000), vec!["a"], "still silent a period later");
    }

    #[test]
    fn peers_never_heard_or_not_connected_are_left_alone() {
        let mut watch = GossipWatchdog::new(5_000, 30_000, 16);
        watch.on_connected(&"quiet", 0);
        assert!(
            watch.poll(60_000).is_empty(),
            "never heard: not a gossiping peer"
        );
        watch.on_connected(&"gone", 0);
        watch.on_heard(&"gone", 0);
        watch.on_disconnected(&"gone");
        assert!(watch.poll(60_000).is_empty(), "not connected");
        watch.on_connected(&"gone", 70_000);
        assert!(
            watch.poll(74_999).is_empty(),
            "a new connection gets its own grace"
        );
        assert_eq!(watch.poll(75_000), vec!["gone"]);
    }

    #[test]
    fn an_overflow_resets_a_connected_peer_at_most_once_per_period() {
        let mut watch = GossipWatchdog::new(5_000, 30_000, 16);
        assert!(!watch.on_overflow(&"a", 0), "unknown peer");
        watch.on_connected(&"a", 0);
        assert!(watch.on_overflow(&"a", 1_000));
        assert!(!watch.on_overflow(&"a", 2_000));
        watch.on_heard(&"a", 2_000);
        assert!(watch.poll(20_000).is_empty(), "reset 19 s ago");
        assert!(watch.on_overflow(&"a", 31_000));
    }

    #[test]
    fn the_table_is_bounded_and_disconnected_peers_make_room() {
        let mut watch = GossipWatchdog::new(5_000, 30_000, 2);
        watch.on_connected(&1, 0);
        watch.on_connected(&2, 0);
        watch.on_connected(&3, 0);
        assert_eq!(watch.len(), 2);
        watch.on_disconnected(&1);
        watch.on_connected(&3, 0);
        assert_eq!(watch.len(), 2);
        watch.on_heard(&3, 0);
        assert_eq!(watch.poll(5_000), vec![3]);
    }
}
