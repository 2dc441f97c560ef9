//! Resolved configuration of a running peer: flags > environment > TOML file > defaults.
//!
//! clap already gives flags precedence over `LOOM_*` variables; this module layers the result
//! over the optional TOML file and fills in defaults, validating every value so that a bad
//! multiaddr, duration or file is one clear error before anything starts.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;

use crate::cli::RunArgs;

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("bad config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid {option} {value:?}: {reason}")]
    Invalid {
        /// Which option.
        option: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// The TOML file: every key is optional and mirrors a `run` flag in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<Vec<String>>,
    bootstrap: Option<Vec<String>>,
    external_address: Option<Vec<String>>,
    mdns: Option<bool>,
    relay_server: Option<bool>,
    metrics_addr: Option<String>,
    api_addr: Option<String>,
    max_connections: Option<u32>,
    max_connections_per_peer: Option<u32>,
    block: Option<Vec<String>>,
    heartbeat_interval: Option<String>,
    max_relay_reservations: Option<u32>,
    relay_grace: Option<String>,
    relay_max_circuit_duration: Option<String>,
    relay_max_circuit_bytes: Option<u64>,
    relay_max_reservations: Option<u32>,
    relay_max_circuits: Option<u32>,
    genesis: Option<String>,
    genesis_mint: Option<u64>,
    block_interval: Option<String>,
    fleet: Option<PathBuf>,
    ebpf: Option<String>,
    ebpf_iface: Option<String>,
    auto_ban: Option<bool>,
    jobs: Option<String>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default(),
        })
    }
}

/// Relay server limits.
#[derive(Debug, Clone)]
pub struct RelayLimits {
    /// Longest circuit.
    pub max_circuit_duration: Duration,
    /// Most bytes relayed per circuit.
    pub max_circuit_bytes: u64,
    /// Most reservations.
    pub max_reservations: usize,
    /// Most circuits.
    pub max_circuits: usize,
}

/// The validated configuration of `loom-peer run`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers.
    pub bootstrap: Vec<Multiaddr>,
    /// Known external addresses.
    pub external_addresses: Vec<Multiaddr>,
    /// mDNS on.
    pub mdns: bool,
    /// Relay limits when serving as a relay.
    pub relay_server: Option<RelayLimits>,
    /// Metrics endpoint, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Control API address.
    pub api_addr: SocketAddr,
    /// Connection limit.
    pub max_connections: u32,
    /// Per-peer connection limit.
    pub max_connections_per_peer: u32,
    /// Blocked peers.
    pub blocked: Vec<PeerId>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Relay reservations to hold when private.
    pub max_relay_reservations: usize,
    /// Wait before reserving when NAT status is unknown.
    pub relay_grace: Duration,
    /// Name of a new ledger to create when ours is empty.
    pub genesis: Option<String>,
    /// Credits minted to this peer in a new genesis.
    pub genesis_mint: u64,
    /// Pause between ledger blocks.
    pub block_interval: Duration,
    /// The private fleet file.
    pub fleet: Option<PathBuf>,
    /// Kernel telemetry mode.
    pub ebpf: crate::kernel::EbpfMode,
    /// Interface for the XDP probe.
    pub ebpf_iface: Option<String>,
    /// Ban flagged peers automatically.
    pub auto_ban: bool,
    /// Whether `run` trains jobs submitted on the ledger.
    pub jobs: JobsMode,
}

/// Whether a running node picks up jobs from the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobsMode {
    /// Train every job this machine can run, one at a time.
    #[default]
    Auto,
    /// Train none.
    Off,
}

impl std::str::FromStr for JobsMode {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            _ => Err(()),
        }
    }
}

fn multiaddrs(option: &'static str, values: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    values
        .iter()
        .map(|v| {
            v.parse::<Multiaddr>().map_err(|e| ConfigError::Invalid {
                option,
                value: v.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

fn duration(option: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value).map_err(|e| ConfigError::Invalid {
        option,
        value: value.to_owned(),
        reason: e.to_string(),
    })?;
    if d.is_zero() {
        return Err(ConfigError::Invalid {
            option,
            value: value.to_owned(),
            reason: "must be greater than zero".into(),
        });
    }
    Ok(d)
}

fn socket_addr(option: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|e: std::net::AddrParseError| ConfigError::Invalid {
            option,
            value: value.to_owned(),
            reason: e.to_string(),
        })
}

fn positive(option: &'static str, value: u32) -> Result<u32, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            option,
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(value)
}

fn pick<T>(flag: Vec<T>, file: Option<Vec<T>>) -> Vec<T> {
    if flag.is_empty() {
        file.unwrap_or_default()
    } else {
        flag
    }
}

/// Default listen addresses.
pub const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"];

/// The default data directory.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("loom")
}

impl NodeConfig {
    /// Resolves flags (already merged with the environment by clap) over the config file.
    pub fn resolve(data_dir: PathBuf, args: RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut listen = pick(args.listen, file.listen);
        if listen.is_empty() {
            listen = DEFAULT_LISTEN.iter().map(|s| s.to_string()).collect();
        }
        let metrics = args
            .metrics_addr
            .or(file.metrics_addr)
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_addr = if metrics == "off" {
            None
        } else {
            Some(socket_addr("--metrics-addr", &metrics)?)
        };
        let api = args
            .api_addr
            .or(file.api_addr)
            .unwrap_or_else(|| "127.0.0.1:0".into());
        let blocked = pick(args.block, file.block)
            .into_iter()
            .map(|v| {
                v.parse::<PeerId>().map_err(|e| ConfigError::Invalid {
                    option: "--block",
                    value: v.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        let relay_server = if args.relay_server || file.relay_server.unwrap_or(false) {
            Some(RelayLimits {
                max_circuit_duration: duration(
                    "--relay-max-circuit-duration",
                    &args
                        .relay_max_circuit_duration
                        .or(file.relay_max_circuit_duration)
                        .unwrap_or_else(|| "1h".into()),
                )?,
                max_circuit_bytes: args
                    .relay_max_circuit_bytes
                    .or(file.relay_max_circuit_bytes)
                    .unwrap_or(1 << 30),
                max_reservations: positive(
                    "--relay-max-reservations",
                    args.relay_max_reservations
                        .or(file.relay_max_reservations)
                        .unwrap_or(512),
                )? as usize,
                max_circuits: positive(
                    "--relay-max-circuits",
                    args.relay_max_circuits
                        .or(file.relay_max_circuits)
                        .unwrap_or(256),
                )? as usize,
            })
        } else {
            None
        };
        Ok(Self {
            data_dir,
            listen: multiaddrs("--listen", &listen)?,
            bootstrap: multiaddrs("--bootstrap", &pick(args.bootstrap, file.bootstrap))?,
            external_addresses: multiaddrs(
                "--external-address",
                &pick(args.external_address, file.external_address),
            )?,
            mdns: !args.no_mdns && file.mdns.unwrap_or(true),
            relay_server,
            metrics_addr,
            api_addr: socket_addr("--api-addr", &api)?,
            max_connections: positive(
                "--max-connections",
                args.max_connections.or(file.max_connections).unwrap_or(256),
            )?,
            max_connections_per_peer: positive(
                "--max-connections-per-peer",
                args.max_connections_per_peer
                    .or(file.max_connections_per_peer)
                    .unwrap_or(4),
            )?,
            blocked,
            heartbeat_interval: duration(
                "--heartbeat-interval",
                &args
                    .heartbeat_interval
                    .or(file.heartbeat_interval)
                    .unwrap_or_else(|| "1s".into()),
            )?,
            max_relay_reservations: args
                .max_relay_reservations
                .or(file.max_relay_reservations)
                .unwrap_or(2) as usize,
            relay_grace: duration(
                "--relay-grace",
                &args
                    .relay_grace
                    .or(file.relay_grace)
                    .unwrap_or_else(|| "3s".into()),
            )?,
            genesis: match args.genesis.or(file.genesis) {
                Some(name) if name.is_empty() || name.len() > 64 => {
                    return Err(ConfigError::Invalid {
                        option: "--genesis",
                        value: name,
                        reason: "must be 1 to 64 bytes".into(),
                    });
                }
                other => other,
            },
            genesis_mint: args.genesis_mint.or(file.genesis_mint).unwrap_or(1_000_000),
            fleet: args.fleet.or(file.fleet),
            ebpf: {
                let text = args.ebpf.or(file.ebpf).unwrap_or_else(|| "auto".into());
                text.parse().map_err(|_| ConfigError::Invalid {
                    option: "--ebpf",
                    value: text.clone(),
                    reason: "must be auto, on or off".into(),
                })?
            },
            ebpf_iface: args.ebpf_iface.or(file.ebpf_iface),
            auto_ban: args.auto_ban || file.auto_ban.unwrap_or(false),
            jobs: {
                let text = args.jobs.or(file.jobs).unwrap_or_else(|| "auto".into());
                text.parse().map_err(|_| ConfigError::Invalid {
                    option: "--jobs",
                    value: text.clone(),
                    reason: "must be auto or off".into(),
                })?
            },
            block_interval: duration(
                "--block-interval",
                &args
                    .block_interval
                    .or(file.block_interval)
                    .unwrap_or_else(|| "500ms".into()),
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("loom.toml");
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "listen = [\"/ip4/127.0.0.1/tcp/5000\"]\nmdns = false\nmax_connections = 9\n",
        );
        let args = RunArgs {
            config: Some(path),
            max_connections: Some(3),
            ..RunArgs::default()
        };
        let c = NodeConfig::resolve(dir.path().into(), args).expect("resolve");
        assert_eq!(
            c.listen,
            vec!["/ip4/127.0.0.1/tcp/5000".parse::<Multiaddr>().expect("ma")]
        );
        assert!(!c.mdns);
        assert_eq!(c.max_connections, 3);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
    }

    #[test]
    fn jobs_default_to_auto_and_refuse_other_words() {
        let c = NodeConfig::resolve(".".into(), RunArgs::default()).expect("resolve");
        assert_eq!(c.jobs, JobsMode::Auto);
        let off = RunArgs {
            jobs: Some("off".into()),
            ..RunArgs::default()
        };
        assert_eq!(
            NodeConfig::resolve(".".into(), off).expect("off").jobs,
            JobsMode::Off
        );
        let bad = RunArgs {
            jobs: Some("sometimes".into()),
            ..RunArgs::default()
        };
        let err = NodeConfig::resolve(".".into(), bad).expect_err("bad");
        assert!(err.to_string().starts_with("invalid --jobs"), "{err}");
    }

    #[test]
    fn a_bad_multiaddr_names_the_option() {
        let args = RunArgs {
            bootstrap: vec!["/ip4/999.1.1.1/tcp/1".into()],
            ..RunArgs::default()
        };
        let err = NodeConfig::resolve(".".into(), args).expect_err("bad");
        assert!(err.to_string().starts_with("invalid --bootstrap"), "{err}");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "mdns = true\nlisen = []\n");
        let args = RunArgs {
            config: Some(path),
            ..RunArgs::default()
        };
        let err = NodeConfig::resolve(".".into(), args).expect_err("bad");
        let text = err.to_string();
        assert!(text.contains("lisen") && text.contains("line 2"), "{text}");
    }
}
