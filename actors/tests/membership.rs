//! Membership actors over an in-memory gossip bus: they find each other from signed heartbeats,
//! and a peer that stops is suspected, then dropped, by the others. The bus verifies heartbeats
//! exactly as the network's gossip validator does.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ed25519_dalek::{Signer, SigningKey};
use loom_actors::{
    HeartbeatSigner, MembershipActor, MembershipArgs, MembershipMsg, NetworkPort, PortError, Topic,
};
use loom_protocols::{MemberState, MembershipConfig, NatStatus, PeerKey, SignedHeartbeat};
use ractor::{Actor, ActorRef};

struct Key(SigningKey);

impl HeartbeatSigner for Key {
    fn public_key(&self) -> PeerKey {
        self.0.verifying_key().to_bytes()
    }
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).to_bytes().to_vec()
    }
}

#[derive(Default)]
struct Bus {
    members: Mutex<Vec<(PeerKey, ActorRef<MembershipMsg>)>>,
}

struct BusPort {
    me: PeerKey,
    bus: Arc<Bus>,
}

impl NetworkPort for BusPort {
    fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), PortError> {
        if topic != Topic::Membership {
            return Ok(());
        }
        let heartbeat = SignedHeartbeat::open(&data).map_err(|_| PortError::Closed)?;
        assert_eq!(
            heartbeat.peer_key, self.me,
            "actors sign with their own key"
        );
        for (key, actor) in self.bus.members.lock().expect("lock").iter() {
            if *key != self.me {
                let _ = actor.cast(MembershipMsg::Heartbeat(heartbeat.clone()));
            }
        }
        Ok(())
    }

    fn connect_hint(&self, _: PeerKey, _: Vec<String>, _: NatStatus) -> Result<(), PortError> {
        Ok(())
    }

    fn fetch_blob(&self, _: PeerKey, _: [u8; 32]) -> Result<(), PortError> {
        Err(PortError::Closed)
    }
}

async fn spawn(bus: &Arc<Bus>, seed: u8) -> (PeerKey, ActorRef<MembershipMsg>) {
    let key = SigningKey::from_bytes(&[seed; 32]);
    let me = key.verifying_key().to_bytes();
    let args = MembershipArgs {
        signer: Arc::new(Key(key)),
        network: Arc::new(BusPort {
            me,
            bus: bus.clone(),
        }),
        config: MembershipConfig {
            suspect_after_ms: 150,
            dead_after_ms: 400,
            max_members: 16,
        },
        heartbeat_interval: Duration::from_millis(50),
        incarnation: 1,
        agent: "test".into(),
    };
    let (actor, _) = Actor::spawn(None, MembershipActor, args)
        .await
        .expect("spawn");
    bus.members.lock().expect("lock").push((me, actor.clone()));
    (me, actor)
}

async fn alive(actor: &ActorRef<MembershipMsg>) -> Vec<PeerKey> {
    ractor::call_t!(actor, MembershipMsg::LiveView, 1_000)
        .expect("live view")
        .into_iter()
        .filter(|m| m.state == MemberState::Alive)
        .map(|m| m.peer_key)
        .collect()
}

async fn wait_until<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn peers_find_each_other_and_a_stopped_peer_is_dropped() {
    let bus = Arc::new(Bus::default());
    let (ka, a) = spawn(&bus, 1).await;
    let (kb, b) = spawn(&bus, 2).await;
    let (kc, c) = spawn(&bus, 3).await;
    wait_until(|| {
        let (a, b, c) = (a.clone(), b.clone(), c.clone());
        async move {
            alive(&a).await.len() == 2 && alive(&b).await.len() == 2 && alive(&c).await.len() == 2
        }
    })
    .await;
    assert!(alive(&a).await.contains(&kb) && alive(&a).await.contains(&kc));

    // c stops: a and b drop it; they keep each other.
    bus.members.lock().expect("lock").retain(|(k, _)| *k != kc);
    c.stop(None);
    wait_until(|| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let in_view = |v: Vec<loom_actors::MemberSummary>| v.iter().any(|m| m.peer_key == kc);
            !in_view(ractor::call_t!(a, MembershipMsg::LiveView, 1_000).expect("view"))
                && !in_view(ractor::call_t!(b, MembershipMsg::LiveView, 1_000).expect("view"))
        }
    })
    .await;
    assert_eq!(alive(&a).await, vec![kb]);
    assert_eq!(alive(&b).await, vec![ka]);
    a.stop(None);
    b.stop(None);
}
