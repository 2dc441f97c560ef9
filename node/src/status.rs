//! The status report served by the control API and printed by `loom-peer status`.

use loom_protocols::{ConnectionKind, MemberState, NatStatus};
use serde::{Deserialize, Serialize};

/// One connection to a peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// How the connection was made.
    pub kind: ConnectionKind,
    /// The remote address of the connection.
    pub remote_addr: String,
    /// Whether we dialed it.
    pub outbound: bool,
    /// Seconds since it was established.
    pub age_secs: u64,
}

/// One connected peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its PeerId.
    pub peer_id: String,
    /// The best kind among its connections (hole-punched > direct > relayed).
    pub kind: ConnectionKind,
    /// Its connections.
    pub connections: Vec<ConnectionStatus>,
    /// Latest ping round-trip time, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Bytes received from it (libp2p substream payload).
    pub bytes_in: u64,
    /// Bytes sent to it.
    pub bytes_out: u64,
    /// Its agent string, from identify.
    pub agent: Option<String>,
}

/// A relay reservation held by this peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReservationStatus {
    /// The relay's PeerId.
    pub relay: String,
    /// The circuit address others can dial us on.
    pub circuit_addrs: Vec<String>,
}

/// Hole-punching outcomes since start.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HolePunchStats {
    /// Attempts that finished (successes + failures).
    pub attempts: u64,
    /// Direct connections made.
    pub successes: u64,
    /// Attempts that gave up.
    pub failures: u64,
}

/// Relay service counters (with `--relay-server`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelayServerStatus {
    /// Reservations currently held by others on this relay.
    pub reservations: u64,
    /// Circuits currently open through this relay.
    pub circuits: u64,
}

/// What the network task knows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkStatus {
    /// This peer.
    pub peer_id: String,
    /// Reachability.
    pub nat_status: NatStatus,
    /// Addresses we listen on.
    pub listen_addrs: Vec<String>,
    /// Confirmed external addresses.
    pub external_addrs: Vec<String>,
    /// Relay reservations held.
    pub relay_reservations: Vec<ReservationStatus>,
    /// Relay service, if enabled.
    pub relay_server: Option<RelayServerStatus>,
    /// Connected peers.
    pub peers: Vec<PeerStatus>,
    /// Hole punching.
    pub hole_punch: HolePunchStats,
    /// The private fleet gate, when the node runs in a fleet.
    #[serde(default)]
    pub fleet: Option<crate::network::fleet_gate::FleetStatus>,
    /// Kernel telemetry (eBPF): per-peer counters, drop list, anomaly flags.
    #[serde(default)]
    pub kernel: Option<crate::kernel::KernelStatus>,
}

/// One member of the live view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its PeerId.
    pub peer_id: String,
    /// Alive or suspect.
    pub state: MemberState,
    /// Milliseconds since its last heartbeat.
    pub silent_ms: u64,
    /// Its own view of its reachability.
    pub nat: NatStatus,
    /// The addresses it advertises.
    pub addrs: Vec<String>,
}

/// One supervised actor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActorStatus {
    /// Actor name.
    pub name: String,
    /// Running now.
    pub running: bool,
    /// Restarts so far.
    pub restarts: u64,
}

/// The full report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Software.
    pub agent: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Network view.
    pub network: NetworkStatus,
    /// Live view of the mesh.
    pub members: Vec<MemberStatus>,
    /// Actors.
    pub actors: Vec<ActorStatus>,
    /// The job this peer trains, if any (`loom-peer train`).
    #[serde(default)]
    pub training: Option<TrainingStatus>,
}

/// The job a peer trains and its last round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingStatus {
    /// Job id (hex).
    pub job_id: String,
    /// Job name.
    pub job: String,
    /// Rounds of the job.
    pub rounds: u64,
    /// The last round's report.
    pub last: loom_actors::RoundReport,
}

/// Where the train command leaves its latest status for the control API.
pub type TrainingSlot = std::sync::Arc<std::sync::Mutex<Option<TrainingStatus>>>;

impl StatusReport {
    /// A human-readable table.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let n = &self.network;
        let mut out = String::new();
        let _ = writeln!(out, "peer      {}", n.peer_id);
        let _ = writeln!(out, "agent     {}   up {}s", self.agent, self.uptime_secs);
        let _ = writeln!(out, "nat       {}", n.nat_status.as_str());
        for a in &n.listen_addrs {
            let _ = writeln!(out, "listen    {a}");
        }
        for a in &n.external_addrs {
            let _ = writeln!(out, "external  {a}");
        }
        for r in &n.relay_reservations {
            let _ = writeln!(out, "relay     reserved on {}", r.relay);
            for a in &r.circuit_addrs {
                let _ = writeln!(out, "          {a}");
            }
        }
        if let Some(s) = &n.relay_server {
            let _ = writeln!(
                out,
                "serving   relay: {} reservations, {} circuits",
                s.reservations, s.circuits
            );
        }
        if let Some(t) = &self.training {
            let r = &t.last;
            let _ = writeln!(
                out,
                "training  job {} ({}): round {}/{}  val loss {}  contributors {}  model {}",
                t.job,
                &t.job_id[..t.job_id.len().min(16)],
                r.round,
                t.rounds,
                r.val_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "-".into()),
                r.contributors,
                &r.model_hash[..r.model_hash.len().min(16)],
            );
        }
        let hp = &n.hole_punch;
        let _ = writeln!(
            out,
            "holepunch {} attempts, {} succeeded, {} failed",
            hp.attempts, hp.successes, hp.failures
        );
        let _ = writeln!(out, "\nPEERS ({})", n.peers.len());
        let _ = writeln!(
            out,
            "{:<54} {:<13} {:>9} {:>11} {:>11}",
            "peer", "kind", "rtt_ms", "bytes_in", "bytes_out"
        );
        for p in &n.peers {
            let rtt = p
                .rtt_ms
                .map(|r| format!("{r:.1}"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<54} {:<13} {:>9} {:>11} {:>11}",
                p.peer_id,
                p.kind.as_str(),
                rtt,
                p.bytes_in,
                p.bytes_out
            );
        }
        if let Some(k) = &n.kernel {
            if k.enabled {
                let _ = writeln!(
                    out,
                    "\nKERNEL (eBPF on {}, xdp {}, object {}; bytes are IP packet bytes, libp2p counts payload)",
                    k.iface.as_deref().unwrap_or("-"),
                    k.xdp_mode.as_deref().unwrap_or("-"),
                    k.object_source
                );
                let _ = writeln!(
                    out,
                    "{:<54} {:>11} {:>11} {:>11} {:>11} {:>7} {:>7}",
                    "peer", "rx_bytes", "libp2p_in", "tx_bytes", "libp2p_out", "retx", "drops"
                );
                for kp in &k.peers {
                    let libp2p = n.peers.iter().find(|p| p.peer_id == kp.peer_id);
                    let _ = writeln!(
                        out,
                        "{:<54} {:>11} {:>11} {:>11} {:>11} {:>7} {:>7}{}",
                        kp.peer_id,
                        kp.rx_bytes,
                        libp2p.map_or("-".into(), |p| p.bytes_in.to_string()),
                        kp.tx_bytes,
                        libp2p.map_or("-".into(), |p| p.bytes_out.to_string()),
                        kp.retransmits,
                        kp.drops,
                        if kp.shared_address {
                            "  (shared address)"
                        } else {
                            ""
                        }
                    );
                }
                if !k.drop_list.is_empty() {
                    let _ = writeln!(out, "drop list {}", k.drop_list.join(", "));
                }
                for f in &k.flags {
                    let _ = writeln!(out, "flagged   {} {} {}", f.peer_id, f.kind, f.detail);
                }
            } else {
                let _ = writeln!(
                    out,
                    "kernel    no eBPF telemetry: {}",
                    k.reason.as_deref().unwrap_or("not loaded")
                );
            }
        }
        let _ = writeln!(out, "\nLIVE VIEW ({})", self.members.len());
        for m in &self.members {
            let state = match m.state {
                MemberState::Alive => "alive",
                MemberState::Suspect => "suspect",
            };
            let _ = writeln!(
                out,
                "{:<54} {:<8} nat={:<8} last heard {} ms ago",
                m.peer_id,
                state,
                m.nat.as_str(),
                m.silent_ms
            );
        }
        let _ = writeln!(out, "\nACTORS");
        for a in &self.actors {
            let _ = writeln!(
                out,
                "{:<20} {:<8} restarts={}",
                a.name,
                if a.running { "running" } else { "down" },
                a.restarts
            );
        }
        out
    }
}
