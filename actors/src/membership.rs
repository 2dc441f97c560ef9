//! The Membership actor: publishes this peer's signed heartbeat and keeps the live view.
//!
//! A thin shell around [`loom_protocols::MembershipView`]: every `heartbeat_interval` it ticks the
//! view (suspecting and failing silent peers), signs and publishes its own heartbeat through the
//! [`NetworkPort`], and hints the network to connect to peers it learned of. Heartbeats arrive
//! already verified by the network's gossip validator. It also records latency probes.

use std::{sync::Arc, time::Duration};

use loom_protocols::{
    Heartbeat, MemberState, MembershipConfig, MembershipEvent, MembershipView, NatStatus, PeerKey,
    Probe, ProbeLog, probe::ProbeSample,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::{HeartbeatSigner, NetworkPort, Topic, unix_ms, unix_us};

/// Probe samples kept per peer.
const PROBE_LOG_CAPACITY: usize = 10_000;

/// Everything the Membership actor starts from.
#[derive(Clone)]
pub struct MembershipArgs {
    /// Signs heartbeats with the peer's identity.
    pub signer: Arc<dyn HeartbeatSigner>,
    /// The network.
    pub network: Arc<dyn NetworkPort>,
    /// View timings and limits.
    pub config: MembershipConfig,
    /// How often to publish a heartbeat and tick the view.
    pub heartbeat_interval: Duration,
    /// This process's start time (unix ms).
    pub incarnation: u64,
    /// Software name and version.
    pub agent: String,
}

impl std::fmt::Debug for MembershipArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MembershipArgs")
            .field("heartbeat_interval", &self.heartbeat_interval)
            .finish()
    }
}

/// One member as reported to the control API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberSummary {
    /// The member's ed25519 key.
    pub peer_key: PeerKey,
    /// Alive or suspect.
    pub state: MemberState,
    /// Milliseconds since its last heartbeat arrived.
    pub silent_ms: u64,
    /// Addresses it advertises.
    pub addrs: Vec<String>,
    /// Its own view of its reachability.
    pub nat: NatStatus,
    /// Its software.
    pub agent: String,
}

/// Messages of the Membership actor.
#[derive(Debug)]
pub enum MembershipMsg {
    /// A verified heartbeat arrived from the network.
    Heartbeat(Heartbeat),
    /// A decoded probe arrived from the network.
    Probe(Probe),
    /// Time to tick the view and publish our heartbeat.
    Tick,
    /// The addresses and NAT status to advertise from now on.
    Advertise {
        /// Dialable addresses.
        addrs: Vec<String>,
        /// Our reachability.
        nat: NatStatus,
    },
    /// Publish a latency probe now; replies with its sequence number.
    SendProbe(RpcReplyPort<Result<u64, String>>),
    /// The live view.
    LiveView(RpcReplyPort<Vec<MemberSummary>>),
    /// Probe samples received so far.
    ProbeSamples(RpcReplyPort<Vec<ProbeSample>>),
}

/// Mutable state of the Membership actor.
pub struct MembershipState {
    args: MembershipArgs,
    view: MembershipView,
    started: std::time::Instant,
    seq: u64,
    probe_seq: u64,
    probes: ProbeLog,
    addrs: Vec<String>,
    nat: NatStatus,
}

impl MembershipState {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn publish_heartbeat(&mut self) {
        self.seq += 1;
        let heartbeat = Heartbeat {
            peer_key: self.args.signer.public_key(),
            incarnation: self.args.incarnation,
            seq: self.seq,
            sent_at_unix_ms: unix_ms(),
            addrs: self.addrs.clone(),
            nat: self.nat,
            agent: self.args.agent.clone(),
        };
        let signer = self.args.signer.clone();
        let sealed = heartbeat.seal(|m| signer.sign(m));
        match self
            .args
            .network
            .publish(Topic::Membership, sealed.to_bytes())
        {
            Ok(()) => metrics::counter!("loom_heartbeats_sent_total").increment(1),
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat not published");
                metrics::counter!("loom_heartbeats_dropped_total").increment(1);
            }
        }
    }

    fn on_event(&self, event: &MembershipEvent) {
        let (what, key) = match event {
            MembershipEvent::Joined(k) => ("joined", k),
            MembershipEvent::Recovered(k) => ("recovered", k),
            MembershipEvent::Suspected(k) => ("suspected", k),
            MembershipEvent::Failed(k) => ("failed", k),
            MembershipEvent::Restarted(k) => ("restarted", k),
            MembershipEvent::AddrsChanged(k) => ("addrs-changed", k),
        };
        tracing::info!(peer = %hex8(key), event = what, "membership");
        metrics::counter!("loom_membership_events_total", "event" => what).increment(1);
        if matches!(
            event,
            MembershipEvent::Joined(_)
                | MembershipEvent::Restarted(_)
                | MembershipEvent::AddrsChanged(_)
        ) && let Some(member) = self.view.get(key)
        {
            let _ = self.args.network.connect_hint(
                *key,
                member.heartbeat.addrs.clone(),
                member.heartbeat.nat,
            );
        }
    }
}

fn hex8(key: &PeerKey) -> String {
    key[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The Membership actor.
#[derive(Debug, Default, Clone)]
pub struct MembershipActor;

impl Actor for MembershipActor {
    type Msg = MembershipMsg;
    type State = MembershipState;
    type Arguments = MembershipArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.heartbeat_interval, || MembershipMsg::Tick);
        let view = MembershipView::new(args.signer.public_key(), args.config.clone());
        Ok(MembershipState {
            args,
            view,
            started: std::time::Instant::now(),
            seq: 0,
            probe_seq: 0,
            probes: ProbeLog::new(PROBE_LOG_CAPACITY),
            addrs: Vec::new(),
            nat: NatStatus::Unknown,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MembershipMsg::Heartbeat(heartbeat) => {
                let now = state.now_ms();
                match state.view.on_heartbeat(heartbeat, now) {
                    Ok(Some(event)) => state.on_event(&event),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "heartbeat not taken");
                        metrics::counter!("loom_heartbeats_refused_total").increment(1);
                    }
                }
                metrics::gauge!("loom_membership_alive_peers").set(state.view.alive_count() as f64);
            }
            MembershipMsg::Probe(probe) => {
                if let Some(sample) = state.probes.record(&probe, unix_us()) {
                    metrics::histogram!("loom_gossip_probe_latency_seconds")
                        .record(sample.latency_us as f64 / 1e6);
                }
            }
            MembershipMsg::Tick => {
                let now = state.now_ms();
                for event in state.view.tick(now) {
                    state.on_event(&event);
                }
                metrics::gauge!("loom_membership_alive_peers").set(state.view.alive_count() as f64);
                state.publish_heartbeat();
            }
            MembershipMsg::Advertise { addrs, nat } => {
                let changed = addrs != state.addrs || nat != state.nat;
                state.addrs = addrs;
                state.nat = nat;
                if changed {
                    // Tell the mesh at once rather than at the next tick.
                    state.publish_heartbeat();
                }
            }
            MembershipMsg::SendProbe(reply) => {
                state.probe_seq += 1;
                let probe = Probe {
                    origin: state.args.signer.public_key(),
                    seq: state.probe_seq,
                    sent_at_unix_us: unix_us(),
                };
                let result = state
                    .args
                    .network
                    .publish(Topic::Probe, probe.to_bytes())
                    .map(|()| probe.seq)
                    .map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            MembershipMsg::LiveView(reply) => {
                let now = state.now_ms();
                let list = state
                    .view
                    .members()
                    .map(|(key, m)| MemberSummary {
                        peer_key: *key,
                        state: m.state,
                        silent_ms: now.saturating_sub(m.last_heard_ms),
                        addrs: m.heartbeat.addrs.clone(),
                        nat: m.heartbeat.nat,
                        agent: m.heartbeat.agent.clone(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            MembershipMsg::ProbeSamples(reply) => {
                let _ = reply.send(state.probes.samples().copied().collect());
            }
        }
        Ok(())
    }
}
