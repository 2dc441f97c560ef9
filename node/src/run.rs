//! `loom-peer run`: builds the swarm, starts the actor tree under the root supervisor, serves
//! the control API and metrics, and runs until SIGINT/SIGTERM or until the supervisor gives up.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use libp2p::identity::Keypair;
use loom_actors::{
    ChildSpec, HeartbeatSigner, MembershipActor, MembershipArgs, PeerSupervisor, SupervisorPolicy,
    names,
};
use loom_protocols::{MembershipConfig, PeerKey};
use ractor::Actor;

use crate::{
    config::NodeConfig,
    control, identity,
    network::{NetworkActor, NetworkArgs, NetworkHandle, PeerBytes, build_swarm},
    telemetry,
};

/// Signs heartbeats with the libp2p identity.
struct KeypairSigner(Keypair);

impl HeartbeatSigner for KeypairSigner {
    fn public_key(&self) -> PeerKey {
        self.0
            .public()
            .try_into_ed25519()
            .map(|k| k.to_bytes())
            .unwrap_or([0; 32])
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message).unwrap_or_default()
    }
}

/// Runs the peer until it is told to stop.
pub fn run(config: NodeConfig) -> anyhow::Result<()> {
    create_data_dir(&config.data_dir)?;
    let keypair = identity::load_or_create(&config.data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(config, keypair))
}

fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

async fn run_async(config: NodeConfig, keypair: Keypair) -> anyhow::Result<()> {
    let peer_id = keypair.public().to_peer_id();
    if let Some(addr) = config.metrics_addr {
        telemetry::serve_metrics(addr)?;
    }
    let peer_bytes = PeerBytes::default();
    // Built here, before any actor, so a port in use is a clear error at start-up.
    let swarm = build_swarm(&keypair, &config, peer_bytes.clone())?;
    let handle = NetworkHandle::default();

    let network_args = NetworkArgs {
        keypair: keypair.clone(),
        config: config.clone(),
        handle: handle.clone(),
        peer_bytes,
        prebuilt: Arc::new(Mutex::new(Some(swarm))),
    };
    let membership_args = MembershipArgs {
        signer: Arc::new(KeypairSigner(keypair.clone())),
        network: Arc::new(handle.clone()),
        config: MembershipConfig {
            suspect_after_ms: 3 * config.heartbeat_interval.as_millis() as u64,
            dead_after_ms: 10 * config.heartbeat_interval.as_millis() as u64,
            ..MembershipConfig::default()
        },
        heartbeat_interval: config.heartbeat_interval,
        incarnation: loom_actors::unix_ms(),
        agent: crate::agent(),
    };
    let children = vec![
        ChildSpec::actor("network", names::NETWORK, NetworkActor, network_args),
        ChildSpec::actor(
            "membership",
            names::MEMBERSHIP,
            MembershipActor,
            membership_args,
        ),
    ];
    let (supervisor, supervisor_done) = Actor::spawn(
        Some(names::SUPERVISOR.into()),
        PeerSupervisor,
        (SupervisorPolicy::default(), children),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the actor tree: {e}"))?;

    let api = control::serve(&config.data_dir, config.api_addr, handle).await?;
    tracing::info!(%peer_id, %api, "loom-peer running");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
        result = supervisor_done => match result {
            Ok(()) => Err(anyhow::anyhow!("the actor tree stopped: a child kept failing")),
            Err(e) => Err(anyhow::anyhow!("the actor tree failed: {e}")),
        },
    };
    tracing::info!("shutting down");
    supervisor.stop(Some("shutdown".into()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::fs::remove_file(config.data_dir.join(control::ADDR_FILE));
    outcome
}
