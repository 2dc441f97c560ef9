//! Launches a mesh of real `loom-peer` processes on loopback: used by `loom-peer demo`, the
//! simulation harness and tests.
//!
//! Peer 0 listens on a fixed loopback port and every other peer bootstraps from it; each peer has
//! its own data directory under `root` (its log is `peer.log` there). Dropping the mesh kills the
//! processes and removes `root`.

use std::{
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use libp2p::{Multiaddr, PeerId};
use loom_protocols::MemberState;

use crate::{client::ControlClient, identity};

/// Why the mesh could not be started or did not form.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Filesystem or process failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A peer's identity could not be created.
    #[error("{0}")]
    Identity(#[from] identity::IdentityError),
    /// A peer's control API did not come up.
    #[error("{0}")]
    Client(#[from] crate::client::ClientError),
    /// A peer process exited.
    #[error("peer {index} exited early ({status}); see {log}")]
    Exited {
        /// Which peer.
        index: usize,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: String,
    },
    /// The mesh did not form in time.
    #[error("mesh did not form within {secs} s: {detail}")]
    Timeout {
        /// The timeout.
        secs: u64,
        /// Who saw how many.
        detail: String,
    },
}

/// How to launch the mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Number of peers.
    pub peers: usize,
    /// The `loom-peer` binary.
    pub bin: PathBuf,
    /// Directory for the peers' data dirs (created; removed on drop).
    pub root: PathBuf,
    /// Heartbeat interval passed to every peer.
    pub heartbeat_interval: String,
    /// `RUST_LOG` for the peers.
    pub log: String,
    /// Extra arguments for `run`.
    pub extra_args: Vec<String>,
    /// Further arguments for the first peer only (e.g. `--genesis`).
    pub first_peer_args: Vec<String>,
    /// The subcommand and its own arguments (`["run"]` for a plain mesh).
    pub subcommand: Vec<String>,
    /// Leave the data directories in place when the mesh is dropped.
    pub keep: bool,
}

impl MeshOptions {
    /// A plain mesh of `peers` running `loom-peer run` from `bin`, with data under `root`.
    pub fn run(peers: usize, bin: PathBuf, root: PathBuf) -> Self {
        Self {
            peers,
            bin,
            root,
            heartbeat_interval: "500ms".into(),
            log: "warn".into(),
            extra_args: Vec::new(),
            first_peer_args: Vec::new(),
            subcommand: vec!["run".into()],
            keep: false,
        }
    }
}

/// One launched peer.
#[derive(Debug)]
pub struct LocalPeer {
    /// Its PeerId.
    pub peer_id: PeerId,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its TCP listen address.
    pub addr: Multiaddr,
    child: Child,
}

/// A running local mesh.
#[derive(Debug)]
pub struct LocalMesh {
    /// The peers, in launch order.
    pub peers: Vec<LocalPeer>,
    /// When the first peer was launched.
    pub started: Instant,
    root: PathBuf,
    keep: bool,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MeshError {
    let what = what.into();
    move |source| MeshError::Io { what, source }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts one `loom-peer` with `options` on `data_dir`, listening on `addr` (TCP) and the same
/// port over QUIC, logging to `<data_dir>/peer.log` (appended).
fn spawn_peer_process(
    options: &MeshOptions,
    data_dir: &Path,
    addr: &Multiaddr,
    bootstrap: Option<&Multiaddr>,
) -> Result<Child, MeshError> {
    let port = addr
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap_or(0);
    let log = File::options()
        .create(true)
        .append(true)
        .open(data_dir.join("peer.log"))
        .map_err(io(format!("creating log in {}", data_dir.display())))?;
    let mut command = Command::new(&options.bin);
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args(&options.subcommand)
        .arg("--listen")
        .arg(format!("{addr},/ip4/127.0.0.1/udp/{port}/quic-v1"))
        .args([
            "--no-mdns",
            "--metrics-addr",
            "off",
            "--api-addr",
            "127.0.0.1:0",
        ])
        .arg("--heartbeat-interval")
        .arg(&options.heartbeat_interval)
        .args(&options.extra_args)
        .args(if bootstrap.is_none() {
            options.first_peer_args.as_slice()
        } else {
            &[]
        })
        .env("RUST_LOG", &options.log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(b) = bootstrap {
        command.arg("--bootstrap").arg(b.to_string());
    }
    command
        .spawn()
        .map_err(io(format!("starting {}", options.bin.display())))
}

impl LocalPeer {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl LocalMesh {
    /// Launches the peers.
    pub fn start(options: &MeshOptions) -> Result<Self, MeshError> {
        std::fs::create_dir_all(&options.root)
            .map_err(io(format!("creating {}", options.root.display())))?;
        let started = Instant::now();
        let mut mesh = LocalMesh {
            peers: Vec::with_capacity(options.peers),
            started,
            root: options.root.clone(),
            keep: options.keep,
        };
        for _ in 0..options.peers {
            mesh.add_peer(options)?;
        }
        Ok(mesh)
    }

    /// The first peer's dialable address, which the others bootstrap from.
    fn bootstrap_addr(&self) -> Option<Multiaddr> {
        self.peers.first().map(|p| {
            p.addr
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(p.peer_id))
        })
    }

    /// Launches one more peer (bootstrapping from the first), e.g. to join a running job.
    pub fn add_peer(&mut self, options: &MeshOptions) -> Result<usize, MeshError> {
        let index = self.peers.len();
        let bootstrap = self.bootstrap_addr();
        let data_dir = options.root.join(format!("peer-{index:02}"));
        std::fs::create_dir_all(&data_dir)
            .map_err(io(format!("creating {}", data_dir.display())))?;
        let peer_id = identity::load_or_create(&data_dir)?.public().to_peer_id();
        let port = free_port().map_err(io("finding a free port"))?;
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}")
            .parse()
            .map_err(|e| io("building address")(std::io::Error::other(e)))?;
        let child = spawn_peer_process(options, &data_dir, &addr, bootstrap.as_ref())?;
        self.peers.push(LocalPeer {
            peer_id,
            data_dir,
            addr,
            child,
        });
        Ok(index)
    }

    /// Restarts peer `index` (after [`LocalMesh::kill`]) with the same data directory and
    /// address, plus `extra` arguments.
    pub fn restart(
        &mut self,
        index: usize,
        options: &MeshOptions,
        extra: &[String],
    ) -> Result<(), MeshError> {
        let mut options = options.clone();
        options.extra_args.extend(extra.iter().cloned());
        let bootstrap = self.bootstrap_addr().filter(|_| index != 0);
        let peer = &mut self.peers[index];
        peer.child = spawn_peer_process(&options, &peer.data_dir, &peer.addr, bootstrap.as_ref())?;
        Ok(())
    }

    /// The exit status of peer `index`, if it has exited.
    pub fn try_wait(&mut self, index: usize) -> Option<std::process::ExitStatus> {
        self.peers[index].child.try_wait().ok().flatten()
    }

    /// The control client of peer `index`, waiting up to `timeout` for it to come up.
    pub fn client(&mut self, index: usize, timeout: Duration) -> Result<ControlClient, MeshError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            match ControlClient::wait_for(
                &self.peers[index].data_dir,
                remaining.min(Duration::from_millis(200)),
            ) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => return Err(e.into()),
                Err(_) => {}
            }
        }
    }

    /// Fails if any peer process has exited.
    pub fn check_alive(&mut self) -> Result<(), MeshError> {
        for (index, peer) in self.peers.iter_mut().enumerate() {
            if let Ok(Some(status)) = peer.child.try_wait() {
                return Err(MeshError::Exited {
                    index,
                    status: status.to_string(),
                    log: peer.data_dir.join("peer.log").display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Waits until every peer sees every other alive in its live view; returns the time from
    /// launch to formation.
    pub fn wait_formed(&mut self, timeout: Duration) -> Result<Duration, MeshError> {
        let n = self.peers.len();
        let deadline = self.started.max(Instant::now() - Duration::ZERO) + timeout;
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            clients.push(self.client(i, timeout)?);
        }
        loop {
            self.check_alive()?;
            let mut seen = Vec::with_capacity(n);
            for c in &clients {
                let alive = c
                    .status()
                    .map(|r| {
                        r.members
                            .iter()
                            .filter(|m| m.state == MemberState::Alive)
                            .count()
                    })
                    .unwrap_or(0);
                seen.push(alive);
            }
            if seen.iter().all(|&s| s + 1 >= n) {
                return Ok(self.started.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(MeshError::Timeout {
                    secs: timeout.as_secs(),
                    detail: format!("alive members seen per peer: {seen:?} (want {})", n - 1),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Kills peer `index` (SIGKILL). Its stale control API address file goes too, so a client
    /// made after a restart finds the new process, not the dead one's port.
    pub fn kill(&mut self, index: usize) {
        let _ = self.peers[index].child.kill();
        let _ = self.peers[index].child.wait();
        let _ = std::fs::remove_file(self.peers[index].data_dir.join(crate::control::ADDR_FILE));
    }
}

impl Drop for LocalMesh {
    fn drop(&mut self) {
        for peer in &mut self.peers {
            let _ = peer.child.kill();
            let _ = peer.child.wait();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
