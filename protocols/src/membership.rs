//! Signed heartbeats and the live view of the mesh built from them.
//!
//! Every peer gossips a [`SignedHeartbeat`] each interval. [`MembershipView`] keeps the members
//! heard from, marks a member suspect when it has been silent for `suspect_after_ms` and drops it
//! (a failure) after `dead_after_ms`. Heartbeats are ordered by `(incarnation, seq)`, so a replay
//! of an old heartbeat cannot refresh a dead peer, and a restarted peer (larger incarnation) is
//! accepted at once. The view holds at most `max_members` peers.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{NatStatus, PeerKey, WireError, decode_bounded, encode};

/// Largest signed heartbeat accepted from the wire, in bytes.
pub const MAX_HEARTBEAT_BYTES: usize = 4 * 1024;
/// Most addresses one heartbeat may advertise.
pub const MAX_ADVERTISED_ADDRS: usize = 16;
/// Longest advertised address, in bytes.
pub const MAX_ADDR_BYTES: usize = 256;
/// Longest agent string, in bytes.
pub const MAX_AGENT_BYTES: usize = 64;
/// Domain separation for heartbeat signatures.
const HEARTBEAT_DOMAIN: &[u8] = b"loom/heartbeat/v1\0";

/// What a peer says about itself each interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's ed25519 public key.
    pub peer_key: PeerKey,
    /// Start time of the sender's process (unix ms): grows on every restart.
    pub incarnation: u64,
    /// Sequence number within the incarnation.
    pub seq: u64,
    /// Sender's wall clock when sent (unix ms), for propagation measurements.
    pub sent_at_unix_ms: u64,
    /// Addresses the sender can be dialed on (direct or `/p2p-circuit`), as multiaddr strings.
    pub addrs: Vec<String>,
    /// The sender's view of its own reachability.
    pub nat: NatStatus,
    /// Software name and version.
    pub agent: String,
}

impl Heartbeat {
    /// The bytes that are signed: a domain tag followed by the encoded heartbeat.
    pub fn signing_bytes(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEARTBEAT_DOMAIN.len() + body.len());
        out.extend_from_slice(HEARTBEAT_DOMAIN);
        out.extend_from_slice(body);
        out
    }

    /// Encodes this heartbeat and signs it with `sign` (an ed25519 signer over the given bytes).
    pub fn seal(&self, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> SignedHeartbeat {
        let body = encode(self);
        let signature = sign(&Self::signing_bytes(&body));
        SignedHeartbeat { body, signature }
    }

    fn validate_fields(&self) -> Result<(), HeartbeatRejected> {
        if self.addrs.len() > MAX_ADVERTISED_ADDRS {
            return Err(HeartbeatRejected::TooManyAddrs(self.addrs.len()));
        }
        if self
            .addrs
            .iter()
            .any(|a| a.len() > MAX_ADDR_BYTES || a.is_empty())
        {
            return Err(HeartbeatRejected::BadAddr);
        }
        if self.agent.len() > MAX_AGENT_BYTES {
            return Err(HeartbeatRejected::BadAgent);
        }
        Ok(())
    }
}

/// A heartbeat as it travels: the encoded body and the sender's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHeartbeat {
    /// `encode(&Heartbeat)`.
    pub body: Vec<u8>,
    /// ed25519 signature over `Heartbeat::signing_bytes(body)`.
    pub signature: Vec<u8>,
}

impl SignedHeartbeat {
    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes, bounds-checks and verifies a heartbeat received from the network.
    pub fn open(bytes: &[u8]) -> Result<Heartbeat, HeartbeatRejected> {
        let signed: SignedHeartbeat = decode_bounded(bytes, MAX_HEARTBEAT_BYTES)?;
        let heartbeat: Heartbeat = decode_bounded(&signed.body, MAX_HEARTBEAT_BYTES)?;
        heartbeat.validate_fields()?;
        let key =
            VerifyingKey::from_bytes(&heartbeat.peer_key).map_err(|_| HeartbeatRejected::BadKey)?;
        let signature = Signature::from_slice(&signed.signature)
            .map_err(|_| HeartbeatRejected::BadSignature)?;
        key.verify_strict(&Heartbeat::signing_bytes(&signed.body), &signature)
            .map_err(|_| HeartbeatRejected::BadSignature)?;
        Ok(heartbeat)
    }
}

/// Why a heartbeat was not taken into the view.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeartbeatRejected {
    /// Not decodable or over the size limit.
    #[error("undecodable heartbeat: {0}")]
    Wire(#[from] WireError),
    /// More advertised addresses than allowed.
    #[error("heartbeat advertises {0} addresses")]
    TooManyAddrs(usize),
    /// An empty or oversize address.
    #[error("heartbeat advertises an invalid address")]
    BadAddr,
    /// Oversize agent string.
    #[error("heartbeat agent string too long")]
    BadAgent,
    /// The public key is not a valid ed25519 point.
    #[error("heartbeat key is not a valid ed25519 key")]
    BadKey,
    /// The signature does not verify.
    #[error("heartbeat signature does not verify")]
    BadSignature,
    /// Not newer than the last heartbeat seen from this peer.
    #[error("stale heartbeat (replay or reorder)")]
    Stale,
    /// The view is full and this peer is new.
    #[error("membership view is full")]
    ViewFull,
}

/// Limits and timings of the live view.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Silence after which a member is suspect.
    pub suspect_after_ms: u64,
    /// Silence after which a member is dropped as failed.
    pub dead_after_ms: u64,
    /// Most members held.
    pub max_members: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            suspect_after_ms: 3_000,
            dead_after_ms: 10_000,
            max_members: 4_096,
        }
    }
}

/// Health of a member as seen from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Heard from recently.
    Alive,
    /// Silent for longer than `suspect_after_ms`.
    Suspect,
}

/// One member of the live view.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its latest heartbeat.
    pub heartbeat: Heartbeat,
    /// Local time the latest heartbeat arrived.
    pub last_heard_ms: u64,
    /// Current health.
    pub state: MemberState,
}

/// A change in the live view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A peer was heard from for the first time (or after being dropped).
    Joined(PeerKey),
    /// A suspect peer was heard from again.
    Recovered(PeerKey),
    /// A peer was silent for `suspect_after_ms`.
    Suspected(PeerKey),
    /// A peer was silent for `dead_after_ms` and was dropped.
    Failed(PeerKey),
    /// A peer restarted (its incarnation grew).
    Restarted(PeerKey),
    /// A peer advertises a different set of addresses (e.g. it got a relay reservation).
    AddrsChanged(PeerKey),
}

/// The live view of the mesh.
#[derive(Debug, Clone)]
pub struct MembershipView {
    local: PeerKey,
    config: MembershipConfig,
    members: BTreeMap<PeerKey, Member>,
}

impl MembershipView {
    /// An empty view for the peer `local` (its own heartbeats are ignored).
    pub fn new(local: PeerKey, config: MembershipConfig) -> Self {
        Self {
            local,
            config,
            members: BTreeMap::new(),
        }
    }

    /// Takes a verified heartbeat into the view.
    pub fn on_heartbeat(
        &mut self,
        heartbeat: Heartbeat,
        now_ms: u64,
    ) -> Result<Option<MembershipEvent>, HeartbeatRejected> {
        if heartbeat.peer_key == self.local {
            return Ok(None);
        }
        let key = heartbeat.peer_key;
        match self.members.get_mut(&key) {
            Some(member) => {
                let old = (member.heartbeat.incarnation, member.heartbeat.seq);
                let new = (heartbeat.incarnation, heartbeat.seq);
                if new <= old {
                    return Err(HeartbeatRejected::Stale);
                }
                let restarted = heartbeat.incarnation > member.heartbeat.incarnation;
                let was_suspect = member.state == MemberState::Suspect;
                let addrs_changed = heartbeat.addrs != member.heartbeat.addrs;
                member.heartbeat = heartbeat;
                member.last_heard_ms = now_ms;
                member.state = MemberState::Alive;
                Ok(if restarted {
                    Some(MembershipEvent::Restarted(key))
                } else if was_suspect {
                    Some(MembershipEvent::Recovered(key))
                } else if addrs_changed {
                    Some(MembershipEvent::AddrsChanged(key))
                } else {
                    None
                })
            }
            None => {
                if self.members.len() >= self.config.max_members {
                    return Err(HeartbeatRejected::ViewFull);
                }
                self.members.insert(
                    key,
                    Member {
                        heartbeat,
                        last_heard_ms: now_ms,
                        state: MemberState::Alive,
                    },
                );
                Ok(Some(MembershipEvent::Joined(key)))
            }
        }
    }

    /// Advances time: marks silent members suspect and drops failed ones.
    pub fn tick(&mut self, now_ms: u64) -> Vec<MembershipEvent> {
        let mut events = Vec::new();
        let config = &self.config;
        self.members.retain(|key, member| {
            let silent_ms = now_ms.saturating_sub(member.last_heard_ms);
            if silent_ms >= config.dead_after_ms {
                events.push(MembershipEvent::Failed(*key));
                return false;
            }
            if silent_ms >= config.suspect_after_ms && member.state == MemberState::Alive {
                member.state = MemberState::Suspect;
                events.push(MembershipEvent::Suspected(*key));
            }
            true
        });
        events
    }

    /// Members currently in the view (alive or suspect), ordered by key.
    pub fn members(&self) -> impl Iterator<Item = (&PeerKey, &Member)> {
        self.members.iter()
    }

    /// Number of members that are alive.
    pub fn alive_count(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.state == MemberState::Alive)
            .count()
    }

    /// A member by key.
    pub fn get(&self, key: &PeerKey) -> Option<&Member> {
        self.members.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn heartbeat(sk: &SigningKey, incarnation: u64, seq: u64) -> Heartbeat {
        Heartbeat {
            peer_key: sk.verifying_key().to_bytes(),
            incarnation,
            seq,
            sent_at_unix_ms: 0,
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            nat: NatStatus::Unknown,
            agent: "loom-peer/test".into(),
        }
    }

    fn sealed(sk: &SigningKey, hb: &Heartbeat) -> Vec<u8> {
        hb.seal(|m| sk.sign(m).to_bytes().to_vec()).to_bytes()
    }

    #[test]
    fn a_signed_heartbeat_round_trips() {
        let sk = key(1);
        let hb = heartbeat(&sk, 1, 1);
        assert_eq!(SignedHeartbeat::open(&sealed(&sk, &hb)), Ok(hb));
    }

    #[test]
    fn a_heartbeat_signed_by_another_key_is_rejected() {
        let hb = heartbeat(&key(1), 1, 1);
        let forged = sealed(&key(2), &hb);
        assert_eq!(
            SignedHeartbeat::open(&forged),
            Err(HeartbeatRejected::BadSignature)
        );
    }

    #[test]
    fn a_tampered_body_is_rejected() {
        let sk = key(1);
        let mut signed = heartbeat(&sk, 1, 1).seal(|m| sk.sign(m).to_bytes().to_vec());
        let last = signed.body.len() - 1;
        signed.body[last] ^= 1;
        assert!(SignedHeartbeat::open(&signed.to_bytes()).is_err());
    }

    #[test]
    fn oversize_and_overfull_heartbeats_are_rejected() {
        let sk = key(1);
        let mut hb = heartbeat(&sk, 1, 1);
        hb.addrs = vec!["/ip4/1.1.1.1/tcp/1".into(); MAX_ADVERTISED_ADDRS + 1];
        assert_eq!(
            SignedHeartbeat::open(&sealed(&sk, &hb)),
            Err(HeartbeatRejected::TooManyAddrs(MAX_ADVERTISED_ADDRS + 1))
        );
        assert!(matches!(
            SignedHeartbeat::open(&vec![0u8; MAX_HEARTBEAT_BYTES + 1]),
            Err(HeartbeatRejected::Wire(WireError::TooLarge { .. }))
        ));
    }

    #[test]
    fn members_go_suspect_then_fail_and_recover_when_heard() {
        let cfg = MembershipConfig {
            suspect_after_ms: 100,
            dead_after_ms: 300,
            max_members: 8,
        };
        let mut view = MembershipView::new([0; 32], cfg);
        let a = key(1);
        let ka = a.verifying_key().to_bytes();
        assert_eq!(
            view.on_heartbeat(heartbeat(&a, 1, 1), 0),
            Ok(Some(MembershipEvent::Joined(ka)))
        );
        assert_eq!(view.tick(99), vec![]);
        assert_eq!(view.tick(100), vec![MembershipEvent::Suspected(ka)]);
        assert_eq!(
            view.on_heartbeat(heartbeat(&a, 1, 2), 150),
            Ok(Some(MembershipEvent::Recovered(ka)))
        );
        assert_eq!(view.tick(449), vec![MembershipEvent::Suspected(ka)]);
        assert_eq!(view.tick(450), vec![MembershipEvent::Failed(ka)]);
        assert_eq!(view.members().count(), 0);
    }

    #[test]
    fn a_change_of_advertised_addresses_is_an_event() {
        let mut view = MembershipView::new([0; 32], MembershipConfig::default());
        let a = key(1);
        view.on_heartbeat(heartbeat(&a, 1, 1), 0).ok();
        assert_eq!(view.on_heartbeat(heartbeat(&a, 1, 2), 1), Ok(None));
        let mut moved = heartbeat(&a, 1, 3);
        moved.addrs.push("/ip4/1.2.3.4/tcp/1/p2p-circuit".into());
        assert_eq!(
            view.on_heartbeat(moved, 2),
            Ok(Some(MembershipEvent::AddrsChanged(
                a.verifying_key().to_bytes()
            )))
        );
    }

    #[test]
    fn replays_are_stale_and_restarts_are_accepted() {
        let mut view = MembershipView::new([0; 32], MembershipConfig::default());
        let a = key(1);
        let ka = a.verifying_key().to_bytes();
        view.on_heartbeat(heartbeat(&a, 5, 10), 0).ok();
        assert_eq!(
            view.on_heartbeat(heartbeat(&a, 5, 10), 1),
            Err(HeartbeatRejected::Stale)
        );
        assert_eq!(
            view.on_heartbeat(heartbeat(&a, 4, 99), 1),
            Err(HeartbeatRejected::Stale)
        );
        assert_eq!(
            view.on_heartbeat(heartbeat(&a, 6, 0), 2),
            Ok(Some(MembershipEvent::Restarted(ka)))
        );
    }

    #[test]
    fn the_view_is_bounded_and_ignores_the_local_peer() {
        let cfg = MembershipConfig {
            max_members: 2,
            ..MembershipConfig::default()
        };
        let local = key(9);
        let mut view = MembershipView::new(local.verifying_key().to_bytes(), cfg);
        assert_eq!(view.on_heartbeat(heartbeat(&local, 1, 1), 0), Ok(None));
        view.on_heartbeat(heartbeat(&key(1), 1, 1), 0).ok();
        view.on_heartbeat(heartbeat(&key(2), 1, 1), 0).ok();
        assert_eq!(
            view.on_heartbeat(heartbeat(&key(3), 1, 1), 0),
            Err(HeartbeatRejected::ViewFull)
        );
        assert_eq!(view.alive_count(), 2);
    }
}
