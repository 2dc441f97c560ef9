//! Command-line interface of `loom-peer`.
//!
//! Every option of `run` can also come from the environment (`LOOM_*`) or from the TOML file given
//! with `--config`; flags win over the environment, which wins over the file (see `config.rs`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// loom-peer: join a peer-to-peer training mesh.
#[derive(Debug, Parser)]
#[command(name = "loom-peer", version, about, long_about = None)]
pub struct Cli {
    /// Directory for the identity key, control token and state
    /// [default: the user's data directory, e.g. ~/.local/share/loom]
    #[arg(long, env = "LOOM_DATA_DIR", global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the peer: join the mesh and serve the local control API.
    Run(Box<RunArgs>),
    /// Print this peer's PeerId (creating the identity if there is none).
    Id,
    /// Show the running peer's connections, NAT status, addresses and relay reservations.
    Status(StatusArgs),
    /// Train a job (a YAML manifest) with every peer on the mesh that runs the same job.
    Train(Box<TrainArgs>),
    /// Train the built-in demo job on N local peers over loopback and summarise the run.
    Demo(DemoArgs),
    /// Read the ledger: show recent blocks, verify it from genesis, export it as JSON lines.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Balances, reputation and earnings from the ledger, for every peer or one.
    Credits(CreditsArgs),
    /// Send credits to another peer (a signed ledger entry submitted by the running node).
    Transfer(TransferArgs),
    /// Jobs on the ledger: submit one for the mesh to train, follow it, list them.
    #[command(subcommand)]
    Job(JobCommand),
    /// Private fleets: make a fleet key, enroll peers, revoke them.
    #[command(subcommand)]
    Fleet(FleetCommand),
    /// Ban a peer on the running node: its connections are closed, it is refused, and its
    /// addresses go on the XDP drop list.
    Ban(BanArgs),
    /// Lift a local ban.
    Unban(UnbanArgs),
    /// Measure the throughput from a connected peer to this one.
    Speedtest(SpeedtestArgs),
}

/// Options of `loom-peer speedtest`.
#[derive(Debug, Args)]
pub struct SpeedtestArgs {
    /// The peer's PeerId.
    pub peer: String,
    /// Megabytes to transfer (1 to 64).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub mb: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `loom-peer job` subcommands, all through the running node of --data-dir.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Put a job (a YAML manifest) on the ledger with credits in escrow; prints its id.
    Submit {
        /// The job manifest.
        manifest: PathBuf,
        /// Credits to put in escrow, at least rounds × replicas.max × pay.per_contribution
        /// [default: rounds × replicas.max × (per_contribution + per_verdict)].
        #[arg(long, value_name = "CREDITS")]
        escrow: Option<u64>,
    },
    /// A job's status: escrow, rounds recorded, verdicts, contributors, this node's progress.
    Status {
        /// The job id or a unique prefix of it.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until its last round is on the ledger (a progress bar on a terminal, a line
    /// per change otherwise).
    Watch {
        /// The job id or a unique prefix of it.
        id: String,
    },
    /// Close a job this node submitted: no more rounds are paid, and the escrow left goes back
    /// to this node once the entry is final.
    Close {
        /// The job id or a unique prefix of it.
        id: String,
    },
    /// The jobs on the ledger.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `loom-peer ban`.
#[derive(Debug, Args)]
pub struct BanArgs {
    /// The peer's PeerId.
    pub peer: String,
    /// How long, e.g. 1h [default: until unbanned].
    #[arg(long = "for", value_name = "DURATION")]
    pub duration: Option<String>,
    /// Why.
    #[arg(long, default_value = "banned by the operator")]
    pub reason: String,
}

/// Options of `loom-peer unban`.
#[derive(Debug, Args)]
pub struct UnbanArgs {
    /// The peer's PeerId.
    pub peer: String,
}

/// `loom-peer fleet` subcommands.
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Make a new fleet key (kept by the fleet's owner, never on the peers).
    Init {
        /// Where to write the key.
        #[arg(long, default_value = "fleet.key", value_name = "FILE")]
        key: PathBuf,
    },
    /// Enroll a peer: write the fleet file it runs with (`--fleet <file>`).
    Enroll {
        /// The peer's PeerId (`loom-peer id` on that machine).
        peer: String,
        /// The fleet key.
        #[arg(long, default_value = "fleet.key", value_name = "FILE")]
        key: PathBuf,
        /// Validity, e.g. 30d [default: never expires].
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// Output file [default: stdout].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revoke a peer: a ban entry signed by the fleet key, put on the ledger through the
    /// running node of --data-dir.
    Revoke {
        /// The peer's PeerId.
        peer: String,
        /// The fleet key.
        #[arg(long, default_value = "fleet.key", value_name = "FILE")]
        key: PathBuf,
        /// Why.
        #[arg(long, default_value = "revoked")]
        reason: String,
    },
}

/// `loom-peer ledger` subcommands.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Print the newest finalized blocks with their entries.
    Show {
        /// How many blocks.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Verify every block from genesis: chain, signatures, certificates, authorisations and
    /// credit conservation.
    Verify,
    /// Write every block as one JSON line.
    Export {
        /// Output file [default: stdout].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// Options of `loom-peer credits`.
#[derive(Debug, Args)]
pub struct CreditsArgs {
    /// Only this peer (a PeerId).
    pub peer: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `loom-peer transfer`.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// The receiver's PeerId.
    pub to: String,
    /// Credits to send.
    pub amount: u64,
}

/// Options of `loom-peer train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The job manifest (YAML).
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// Where to train: auto picks CUDA when present [default: the manifest's resources.device].
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// libtorch threads [default: the manifest's resources.threads].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Continue from the newest checkpoint of this job in the data directory.
    #[arg(long)]
    pub resume: bool,
    /// Progress file, one JSON line per round [default: <data-dir>/progress.jsonl].
    #[arg(long, value_name = "FILE")]
    pub progress: Option<PathBuf>,
    /// The node's options, as for `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// `--device` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CUDA when present, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device.
    Cuda,
}

/// Options of `loom-peer status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `loom-peer demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of local peers.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(2..=64))]
    pub peers: u16,
    /// Rounds to train [default: the demo manifest's].
    #[arg(long, value_name = "N")]
    pub rounds: Option<u64>,
    /// Where to write the loss plot (SVG).
    #[arg(long, value_name = "FILE", default_value = "loom-demo-loss.svg")]
    pub plot: PathBuf,
    /// Keep the peers' data directories (logs, checkpoints, progress files).
    #[arg(long)]
    pub keep: bool,
}

/// Options of `loom-peer run`. All are optional here: defaults live in `config.rs`.
#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// TOML configuration file (flags and LOOM_* variables override it).
    #[arg(long, env = "LOOM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Listen address, repeatable [default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1].
    #[arg(
        long,
        env = "LOOM_LISTEN",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub listen: Vec<String>,

    /// Bootstrap peer to join through, repeatable (e.g. /ip4/1.2.3.4/tcp/4001/p2p/12D3Koo...).
    #[arg(
        long,
        env = "LOOM_BOOTSTRAP",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub bootstrap: Vec<String>,

    /// An address this peer is known to be reachable on (public IP, port forward), repeatable.
    #[arg(
        long,
        env = "LOOM_EXTERNAL_ADDRESS",
        value_delimiter = ',',
        value_name = "MULTIADDR"
    )]
    pub external_address: Vec<String>,

    /// Disable mDNS discovery on the local network.
    #[arg(long, env = "LOOM_NO_MDNS")]
    pub no_mdns: bool,

    /// Serve as a relay for peers behind NATs (needs --external-address).
    #[arg(long, env = "LOOM_RELAY_SERVER")]
    pub relay_server: bool,

    /// Prometheus metrics endpoint, or "off" [default: 127.0.0.1:9464].
    #[arg(long, env = "LOOM_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Local control API address; port 0 picks a free port, written to <data-dir>/api.addr
    /// [default: 127.0.0.1:0].
    #[arg(long, env = "LOOM_API_ADDR", value_name = "ADDR")]
    pub api_addr: Option<String>,

    /// Most established connections in total [default: 256].
    #[arg(long, env = "LOOM_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<u32>,

    /// Most established connections per peer [default: 4].
    #[arg(long, env = "LOOM_MAX_CONNECTIONS_PER_PEER", value_name = "N")]
    pub max_connections_per_peer: Option<u32>,

    /// Peer refused at connection time, repeatable.
    #[arg(
        long,
        env = "LOOM_BLOCK",
        value_delimiter = ',',
        value_name = "PEER_ID"
    )]
    pub block: Vec<String>,

    /// Interval between membership heartbeats, e.g. 1s or 500ms [default: 1s].
    #[arg(long, env = "LOOM_HEARTBEAT_INTERVAL", value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,

    /// Relays to hold a reservation on when not publicly reachable [default: 2].
    #[arg(long, env = "LOOM_MAX_RELAY_RESERVATIONS", value_name = "N")]
    pub max_relay_reservations: Option<u32>,

    /// How long to wait for AutoNAT to confirm a public address before reserving relay slots
    /// [default: 3s].
    #[arg(long, env = "LOOM_RELAY_GRACE", value_name = "DURATION")]
    pub relay_grace: Option<String>,

    /// Relay server: longest circuit, e.g. 1h [default: 1h].
    #[arg(long, env = "LOOM_RELAY_MAX_CIRCUIT_DURATION", value_name = "DURATION")]
    pub relay_max_circuit_duration: Option<String>,

    /// Relay server: most bytes per circuit [default: 1073741824].
    #[arg(long, env = "LOOM_RELAY_MAX_CIRCUIT_BYTES", value_name = "BYTES")]
    pub relay_max_circuit_bytes: Option<u64>,

    /// Relay server: most reservations held [default: 512].
    #[arg(long, env = "LOOM_RELAY_MAX_RESERVATIONS", value_name = "N")]
    pub relay_max_reservations: Option<u32>,

    /// Relay server: most circuits at once [default: 256].
    #[arg(long, env = "LOOM_RELAY_MAX_CIRCUITS", value_name = "N")]
    pub relay_max_circuits: Option<u32>,

    /// Start a new ledger named NETWORK when this peer's ledger is empty: this peer signs its
    /// genesis and is its first committee member; others enroll themselves. Without it an empty
    /// ledger is fetched from peers.
    #[arg(long, env = "LOOM_GENESIS", value_name = "NETWORK")]
    pub genesis: Option<String>,

    /// Credits minted to this peer in a new genesis [default: 1000000].
    #[arg(long, env = "LOOM_GENESIS_MINT", value_name = "CREDITS")]
    pub genesis_mint: Option<u64>,

    /// Run in a private fleet: the fleet file (from `loom-peer fleet enroll`) holding the fleet
    /// key and this peer's enrollment token. Only enrolled peers are accepted.
    #[arg(long, env = "LOOM_FLEET", value_name = "FILE")]
    pub fleet: Option<PathBuf>,

    /// Kernel telemetry and the XDP drop list: auto loads the eBPF probes when permitted and
    /// otherwise runs without them (one log line says why); on fails when they cannot load
    /// [default: auto].
    #[arg(long, env = "LOOM_EBPF", value_name = "auto|on|off")]
    pub ebpf: Option<String>,

    /// Interface for the XDP probe [default: the interface of the listen address, else of the
    /// default route].
    #[arg(long, env = "LOOM_EBPF_IFACE", value_name = "IFACE")]
    pub ebpf_iface: Option<String>,

    /// Ban peers the anomaly detector flags (traffic or retransmit outliers, repeated rejected
    /// contributions) for an hour.
    #[arg(long, env = "LOOM_AUTO_BAN")]
    pub auto_ban: bool,

    /// Pause between ledger blocks, e.g. 500ms [default: 500ms].
    #[arg(long, env = "LOOM_BLOCK_INTERVAL", value_name = "DURATION")]
    pub block_interval: Option<String>,

    /// `run` only: train jobs submitted on the ledger that this machine can run, one at a time
    /// (auto), or none (off) [default: auto].
    #[arg(long, env = "LOOM_JOBS", value_name = "auto|off")]
    pub jobs: Option<String>,
}
