//! `loom-peer run`: builds the swarm, starts the actor tree under the root supervisor, serves
//! the control API and metrics, follows the ledger's jobs (and, with `--jobs auto`, trains the
//! ones it can: [`crate::train::pick_up`]), and runs until SIGINT/SIGTERM or until the supervisor
//! gives up.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use libp2p::identity::Keypair;
use loom_actors::{
    ChildSpec, HeartbeatSigner, MembershipActor, MembershipArgs, PeerSupervisor, SharedBlobs,
    SupervisorPolicy,
    credits::CreditAccounting,
    ledger::{GenesisPlan, LedgerArgs, LedgerConfig, LedgerReplica, SharedLedgerStore},
    ledger_store::{LedgerStore, LedgerStoreError},
    names,
};
use loom_protocols::{MembershipConfig, PeerKey, blobstore::BlobStore};
use ractor::Actor;

use crate::{
    config::NodeConfig,
    control, identity,
    network::{NetworkActor, NetworkArgs, NetworkHandle, PeerBytes, build_swarm},
    telemetry,
};

/// Signs heartbeats and commitments with the libp2p identity.
pub struct KeypairSigner(pub Keypair);

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

pub fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))
}

/// A started peer: the actor tree, the network handle and what the network shares.
pub struct NodeHandles {
    /// The root supervisor.
    pub supervisor: ractor::ActorRef<loom_actors::SupervisorMsg>,
    /// Resolves when the supervisor stops.
    pub supervisor_done: tokio::task::JoinHandle<()>,
    /// The network command queue.
    pub handle: NetworkHandle,
    /// Per-peer byte counters.
    pub peer_bytes: PeerBytes,
    /// Blobs this peer serves.
    pub blobs: SharedBlobs,
    /// The control API address.
    pub api: std::net::SocketAddr,
    /// The training status the control API reports.
    pub training: crate::status::TrainingSlot,
    /// Kernel telemetry (stopped with the node).
    pub kernel: crate::kernel::KernelTelemetry,
    /// Refused contributions per peer (the exchanger counts, the anomaly detector reads).
    pub rejections: loom_actors::SharedRejections,
    /// The jobs on the ledger, kept current by a task that follows the ledger store.
    pub jobs: crate::jobs::SharedJobBook,
}

/// The ledger database's file name in the data directory.
pub const LEDGER_FILE: &str = "ledger.redb";

/// This peer's ed25519 signing key, from its libp2p identity.
pub fn signing_key(keypair: &Keypair) -> anyhow::Result<ed25519_dalek::SigningKey> {
    let ed = keypair
        .clone()
        .try_into_ed25519()
        .map_err(|_| anyhow::anyhow!("the identity key is not ed25519"))?;
    let secret: [u8; 32] = ed
        .secret()
        .as_ref()
        .try_into()
        .map_err(|_| anyhow::anyhow!("the identity key is malformed"))?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&secret))
}

/// Blob store budget of a peer.
pub const BLOB_STORE_BYTES: usize = 1 << 30;

/// Builds the swarm, starts the network and membership actors under the root supervisor, and
/// serves the control API and metrics.
pub async fn start_node(config: &NodeConfig, keypair: &Keypair) -> anyhow::Result<NodeHandles> {
    if let Some(addr) = config.metrics_addr {
        telemetry::serve_metrics(addr)?;
    }
    let peer_bytes = PeerBytes::default();
    // Built here, before any actor, so a port in use is a clear error at start-up.
    let swarm = build_swarm(keypair, config, peer_bytes.clone())?;
    let handle = NetworkHandle::default();
    let blobs: SharedBlobs = Arc::new(Mutex::new(BlobStore::new(BLOB_STORE_BYTES)));

    let signing_key = signing_key(keypair)?;
    let me = signing_key.verifying_key().to_bytes();
    let fleet = match &config.fleet {
        Some(path) => Some(crate::fleet::load_membership(path, &me)?),
        None => None,
    };
    let bans: loom_actors::ledger::SharedBans = Arc::default();
    let listen_ips: Vec<std::net::IpAddr> = config
        .listen
        .iter()
        .filter_map(crate::network::defense::ip_of)
        .collect();
    let kernel = crate::kernel::start(config.ebpf, config.ebpf_iface.clone(), &listen_ips)
        .map_err(|e| anyhow::anyhow!("{e} (--ebpf on)"))?;
    let rejections = loom_actors::SharedRejections::default();
    let local_bans: crate::network::defense::SharedBanList =
        Arc::new(Mutex::new(crate::bans::BanList::load(&config.data_dir)?));
    let ledger_path = config.data_dir.join(LEDGER_FILE);
    let ledger: SharedLedgerStore = Arc::new(Mutex::new(LedgerStore::open(&ledger_path).map_err(
        |e| match e {
            LedgerStoreError::Open { reason, .. } if reason.contains("already open") => {
                anyhow::anyhow!(
                    "the ledger {} is in use by another loom-peer with the same --data-dir",
                    ledger_path.display()
                )
            }
            other => anyhow::anyhow!("{other}"),
        },
    )?));
    let network_args = NetworkArgs {
        keypair: keypair.clone(),
        config: config.clone(),
        handle: handle.clone(),
        peer_bytes: peer_bytes.clone(),
        blobs: blobs.clone(),
        ledger: Some(ledger.clone()),
        fleet: fleet.clone(),
        bans: bans.clone(),
        kernel: kernel.clone(),
        local_bans: local_bans.clone(),
        rejections: rejections.clone(),
        prebuilt: Arc::new(Mutex::new(Some(swarm))),
    };
    let ledger_args = LedgerArgs {
        store: ledger.clone(),
        signing_key,
        network: Arc::new(handle.clone()),
        genesis: match &config.genesis {
            Some(network) => GenesisPlan::Create {
                network: network.clone(),
                open_enrollment: true,
                mint: vec![(me, config.genesis_mint)],
                members: Vec::new(),
                fleet: fleet.as_ref().map(|f| f.fleet),
            },
            None => GenesisPlan::Join {
                authority: None,
                fleet: fleet.as_ref().map(|f| f.fleet),
            },
        },
        config: LedgerConfig {
            block_interval: config.block_interval,
            ..LedgerConfig::default()
        },
        credits: Some(names::CREDITS),
        bans,
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
        ChildSpec::actor("credits", names::CREDITS, CreditAccounting, ledger.clone()),
        ChildSpec::actor("ledger", names::LEDGER, LedgerReplica, ledger_args),
    ];
    let (supervisor, supervisor_done) = Actor::spawn(
        Some(names::SUPERVISOR.into()),
        PeerSupervisor,
        (SupervisorPolicy::default(), children),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot start the actor tree: {e}"))?;
    let training = crate::status::TrainingSlot::default();
    let jobs = crate::jobs::SharedJobBook::default();
    tokio::spawn(crate::jobs::follow_ledger(ledger.clone(), jobs.clone()));
    let api = control::serve(
        &config.data_dir,
        config.api_addr,
        control::ApiShared {
            network: handle.clone(),
            training: training.clone(),
            ledger: Some(ledger.clone()),
            bans: local_bans.clone(),
            jobs: jobs.clone(),
            me,
        },
    )
    .await?;
    Ok(NodeHandles {
        supervisor,
        supervisor_done,
        handle,
        peer_bytes,
        blobs,
        api,
        training,
        kernel,
        rejections,
        jobs,
    })
}

/// Stops the actor tree and removes the API address file.
pub async fn stop_node(config: &NodeConfig, node: NodeHandles) {
    node.supervisor.stop(Some("shutdown".into()));
    node.kernel.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(6), node.supervisor_done).await;
    let _ = std::fs::remove_file(config.data_dir.join(control::ADDR_FILE));
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate.recv() => {},
    }
    Ok(())
}

async fn run_async(config: NodeConfig, keypair: Keypair) -> anyhow::Result<()> {
    let peer_id = keypair.public().to_peer_id();
    let mut node = start_node(&config, &keypair).await?;
    tracing::info!(%peer_id, api = %node.api, "loom-peer running");
    let pick_up = (config.jobs == crate::config::JobsMode::Auto).then(|| {
        tokio::spawn(crate::train::pick_up(crate::train::NodeContext::of(
            &node,
            &config.data_dir,
            &keypair,
        )))
    });
    let outcome = tokio::select! {
        signal = termination() => signal,
        result = &mut node.supervisor_done => match result {
            Ok(()) => Err(anyhow::anyhow!("the actor tree stopped: a child kept failing")),
            Err(e) => Err(anyhow::anyhow!("the actor tree failed: {e}")),
        },
    };
    tracing::info!("shutting down");
    if let Some(task) = pick_up {
        task.abort();
    }
    stop_node(&config, node).await;
    outcome
}
