//! The node's kernel telemetry (`kernel.rs`) against real eBPF probes: two network namespaces
//! joined by a veth pair, the telemetry started with `--ebpf on` semantics on the receiving end.
//!
//! - UDP datagrams from the other namespace are attributed to the fake peer that owns the source
//!   address, exactly: `rx_bytes == N * (payload + 28)`; an address shared by two peers counts
//!   in full for both, marked `shared_address`.
//! - Putting the peer on the drop list stops its datagrams before the socket (a datagram from an
//!   unlisted address, sent after them, arrives; none of the listed ones do) and its `drops`
//!   reach N; clearing the list lets its traffic through again.
//! - `shutdown` detaches the XDP program.
//! - A peer flooding the link, or one with repeated rejected contributions, is flagged and
//!   offered once as an auto-ban candidate; quiet peers are not flagged.
//! - `auto` on a missing interface runs disabled with the reason; `on` fails.
//!
//! Needs root, iproute2 and a kernel that runs the probes (see `ebpf-probes/README.md`). Without
//! root (or when namespaces cannot be made) each test prints `skipping <test>: ...` and passes.
//! Events are awaited by polling with a 30 s deadline; nothing relies on a sleep being long
//! enough.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use loom_node::kernel;

use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kernel::{EbpfMode, KernelStatus, KernelTelemetry, PeerKernelStats};
use loom_protocols::anomaly::AnomalyConfig;
use nix::sched::{CloneFlags, setns};

const DEADLINE: Duration = Duration::from_secs(30);
const N: u64 = 20;
const PAYLOAD: usize = 200;
/// IPv4 header (20) + UDP header (8).
const OVERHEAD: u64 = 28;
const PEER: &str = "12D3KooWKernelTestPeerAaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const NAT_PEER: &str = "12D3KooWKernelTestPeerBbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// Finds a system tool in the usual sbin/bin directories (cargo's PATH may lack /usr/sbin).
fn tool(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> String {
    let ip = tool("ip").expect("iproute2 `ip` not found");
    run(&ip, args).unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `f` every 20 ms until it returns `Some` or the deadline passes.
fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a thread that has joined network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {ns}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A network namespace, deleted (with its interfaces) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: String) -> Result<Self, String> {
        let ip = tool("ip").ok_or("iproute2 `ip` not found")?;
        let _ = run(&ip, &["netns", "del", &name]);
        run(&ip, &["netns", "add", &name])?;
        let ns = Self { name };
        run(&ip, &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(ip) = tool("ip") {
            let _ = run(&ip, &["netns", "del", &self.name]);
        }
    }
}

/// Two namespaces joined by a veth pair, IPv4 only, static neighbour entries (no ARP traffic).
/// The tx side has two addresses: `tx_v4` (the peer's) and `other_v4` (never listed).
struct Pair {
    rx: Netns,
    tx: Netns,
    rx_if: String,
    rx_v4: Ipv4Addr,
    tx_v4: Ipv4Addr,
    other_v4: Ipv4Addr,
}

impl Pair {
    /// `None` (after printing `skipping ...`) when namespaces cannot be made here.
    fn new(test: &str, tag: u8) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            println!("skipping {test}: needs root for network namespaces and eBPF");
            return None;
        }
        if tool("ip").is_none() {
            println!("skipping {test}: needs iproute2 (`ip`) for network namespaces");
            return None;
        }
        let pid = std::process::id();
        let p = (pid % 251) as u8;
        let rx = match Netns::create(format!("loomk-{pid}-{tag}-rx")) {
            Ok(ns) => ns,
            Err(e) => {
                println!("skipping {test}: cannot create network namespaces ({e})");
                return None;
            }
        };
        let tx = Netns::create(format!("loomk-{pid}-{tag}-tx")).expect("second netns");
        let rx_if = format!("kr{tag}x{pid}");
        let tx_if = format!("kt{tag}x{pid}");
        assert!(rx_if.len() <= 15 && tx_if.len() <= 15);
        let rx_mac = format!("02:4b:{tag:02x}:{p:02x}:00:01");
        let tx_mac = format!("02:4b:{tag:02x}:{p:02x}:00:02");
        let pair = Self {
            rx_v4: Ipv4Addr::new(10, tag, p, 1),
            tx_v4: Ipv4Addr::new(10, tag, p, 2),
            other_v4: Ipv4Addr::new(10, tag, p, 3),
            rx,
            tx,
            rx_if,
        };
        ip(&[
            "link",
            "add",
            "name",
            &pair.rx_if,
            "address",
            &rx_mac,
            "netns",
            &pair.rx.name,
            "type",
            "veth",
            "peer",
            "name",
            &tx_if,
            "address",
            &tx_mac,
            "netns",
            &pair.tx.name,
        ]);
        let (rx_ns, tx_ns) = (pair.rx.name.clone(), pair.tx.name.clone());
        let (rx_if, rx_v4) = (pair.rx_if.clone(), pair.rx_v4);
        ip(&[
            "-n",
            &rx_ns,
            "addr",
            "add",
            &format!("{rx_v4}/24"),
            "dev",
            &rx_if,
        ]);
        for a in [pair.tx_v4, pair.other_v4] {
            ip(&[
                "-n",
                &tx_ns,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                &tx_if,
            ]);
            ip(&[
                "-n",
                &rx_ns,
                "neigh",
                "replace",
                &a.to_string(),
                "lladdr",
                &tx_mac,
                "dev",
                &rx_if,
                "nud",
                "permanent",
            ]);
        }
        ip(&[
            "-n",
            &tx_ns,
            "neigh",
            "replace",
            &rx_v4.to_string(),
            "lladdr",
            &rx_mac,
            "dev",
            &tx_if,
            "nud",
            "permanent",
        ]);
        ip(&["-n", &rx_ns, "link", "set", &rx_if, "up"]);
        ip(&["-n", &tx_ns, "link", "set", &tx_if, "up"]);
        Some(pair)
    }
}

fn peer<'a>(status: &'a KernelStatus, id: &str) -> Option<&'a PeerKernelStats> {
    status.peers.iter().find(|p| p.peer_id == id)
}

/// Waits until `pred` holds for a snapshot; panics with the last snapshot otherwise.
fn wait_status(
    t: &KernelTelemetry,
    what: &str,
    pred: impl Fn(&KernelStatus) -> bool,
) -> KernelStatus {
    let mut last = KernelStatus::default();
    wait_for(|| {
        last = t.snapshot();
        pred(&last).then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("timed out waiting for {what}; last status: {last:#?}"))
}

/// Receives on `sock` (which has a read timeout) until `done` says so or the deadline passes;
/// returns the number of datagrams per source.
fn receive(
    sock: &UdpSocket,
    done: impl Fn(&HashMap<SocketAddr, u64>) -> bool,
) -> HashMap<SocketAddr, u64> {
    let end = Instant::now() + DEADLINE;
    let mut counts: HashMap<SocketAddr, u64> = HashMap::new();
    let mut buf = [0u8; 2048];
    while Instant::now() < end && !done(&counts) {
        if let Ok((_, from)) = sock.recv_from(&mut buf) {
            *counts.entry(from).or_default() += 1;
        }
    }
    counts
}

fn send_n(sock: &UdpSocket, to: SocketAddr, n: u64) {
    for i in 0..n {
        sock.send_to(&[i as u8; PAYLOAD], to).expect("send");
    }
}

#[test]
fn kernel_telemetry_attributes_traffic_and_drops_banned_peers() {
    let test = "kernel_telemetry_attributes_traffic_and_drops_banned_peers";
    let Some(pair) = Pair::new(test, 41) else {
        return;
    };
    let (peer_ip, other_ip): (IpAddr, IpAddr) = (pair.tx_v4.into(), pair.other_v4.into());

    let telemetry = in_netns(&pair.rx.name, || {
        kernel::start(EbpfMode::On, Some(pair.rx_if.clone()), &[])
    })
    .unwrap_or_else(|e| panic!("{test}: {e}"));
    let s = telemetry.snapshot();
    assert!(s.enabled, "{s:?}");
    assert_eq!(s.iface.as_deref(), Some(pair.rx_if.as_str()));
    assert!(s.programs.iter().any(|p| p.contains("xdp")), "{s:?}");
    assert!(!s.object_source.is_empty());
    telemetry.set_peer_addresses(vec![(PEER.to_string(), vec![peer_ip])]);

    let rx = in_netns(&pair.rx.name, || UdpSocket::bind((pair.rx_v4, 0))).expect("bind rx");
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let rx_to = rx.local_addr().expect("rx addr");
    let (tx_peer, tx_other) = in_netns(&pair.tx.name, || {
        (
            UdpSocket::bind((peer_ip, 0)).expect("bind peer"),
            UdpSocket::bind((other_ip, 0)).expect("bind other"),
        )
    });
    let peer_from = tx_peer.local_addr().expect("addr");
    let other_from = tx_other.local_addr().expect("addr");
    let one_batch = N * (PAYLOAD as u64 + OVERHEAD);

    // 1. Traffic is attributed to the peer that owns the address, exactly.
    send_n(&tx_peer, rx_to, N);
    let got = receive(&rx, |c| c.get(&peer_from) == Some(&N));
    assert_eq!(got.get(&peer_from), Some(&N), "{test}: {got:?}");
    let s = wait_status(&telemetry, "the peer's rx counters", |s| {
        peer(s, PEER).is_some_and(|p| p.rx_bytes >= one_batch)
    });
    let p = peer(&s, PEER).expect("peer");
    assert_eq!((p.rx_packets, p.rx_bytes), (N, one_batch), "{p:?}");
    assert_eq!(p.addrs, vec![peer_ip.to_string()]);
    assert_eq!((p.drops, p.shared_address, p.dropped), (0, false, false));
    assert!(p.last_seen_age_ms.is_some());
    // This process sent the datagrams (from another namespace: the tracepoint is host-wide).
    let s = wait_status(&telemetry, "process send bytes", |s| {
        s.process_send_bytes
            .is_some_and(|b| b >= N * PAYLOAD as u64)
    });
    assert!(s.last_error.is_none(), "{s:?}");

    // 2. One address behind which two peers sit (NAT): both get its counters, marked shared.
    telemetry.set_peer_addresses(vec![
        (PEER.to_string(), vec![peer_ip]),
        (NAT_PEER.to_string(), vec![peer_ip]),
    ]);
    let s = wait_status(&telemetry, "the shared address", |s| {
        [PEER, NAT_PEER]
            .iter()
            .all(|id| peer(s, id).is_some_and(|p| p.shared_address && p.rx_bytes == one_batch))
    });
    assert_eq!(s.peers.len(), 2);
    telemetry.set_peer_addresses(vec![(PEER.to_string(), vec![peer_ip])]);

    // 3. Banned: the peer's address goes on the drop list and its datagrams stop before the
    // socket. A datagram from the unlisted address, sent after them on the same link, arrives;
    // none of the peer's do.
    telemetry.set_dropped_peers(vec![(PEER.to_string(), vec![peer_ip])]);
    wait_status(&telemetry, "the drop list", |s| {
        s.drop_list == vec![peer_ip.to_string()]
    });
    send_n(&tx_peer, rx_to, N);
    tx_other.send_to(b"marker", rx_to).expect("send marker");
    let got = receive(&rx, |c| c.contains_key(&other_from));
    assert_eq!(got.get(&other_from), Some(&1), "{test}: {got:?}");
    assert_eq!(
        got.get(&peer_from),
        None,
        "{test}: dropped datagrams arrived"
    );
    let s = wait_status(&telemetry, "the peer's drops", |s| {
        peer(s, PEER).is_some_and(|p| p.drops >= N)
    });
    let p = peer(&s, PEER).expect("peer");
    assert_eq!((p.drops, p.drop_bytes), (N, one_batch), "{p:?}");
    assert_eq!((p.rx_packets, p.rx_bytes), (N, one_batch), "{p:?}");
    assert!(p.dropped);
    assert_eq!(s.drop_pending, 0);
    // The unlisted address belongs to no peer.
    assert!(s.unattributed.addresses >= 1, "{s:?}");

    // 4. Unbanned: off the list, its traffic arrives again.
    telemetry.set_dropped_peers(vec![]);
    wait_status(&telemetry, "an empty drop list", |s| s.drop_list.is_empty());
    send_n(&tx_peer, rx_to, N);
    let got = receive(&rx, |c| c.get(&peer_from) == Some(&N));
    assert_eq!(got.get(&peer_from), Some(&N), "{test}: {got:?}");
    let s = wait_status(&telemetry, "the second batch", |s| {
        peer(s, PEER).is_some_and(|p| p.rx_packets >= 2 * N)
    });
    let p = peer(&s, PEER).expect("peer");
    assert_eq!(
        (p.rx_packets, p.rx_bytes, p.drops),
        (2 * N, 2 * one_batch, N)
    );
    assert!(!p.dropped);

    // 5. Shutdown detaches the programs.
    let link = ip(&["-n", &pair.rx.name, "link", "show", "dev", &pair.rx_if]);
    assert!(link.contains("xdp"), "{test}: XDP not attached: {link}");
    let clone = telemetry.clone();
    telemetry.shutdown();
    let s = clone.snapshot();
    assert!(!s.enabled);
    assert_eq!(s.reason.as_deref(), Some("shut down"));
    let link = ip(&["-n", &pair.rx.name, "link", "show", "dev", &pair.rx_if]);
    assert!(!link.contains("xdp"), "{test}: XDP still attached: {link}");
}

#[test]
fn anomalies_flag_peers_and_feed_auto_ban() {
    let test = "anomalies_flag_peers_and_feed_auto_ban";
    let Some(pair) = Pair::new(test, 42) else {
        return;
    };
    let options = kernel::KernelOptions {
        poll_interval: Duration::from_millis(200),
        anomaly: AnomalyConfig {
            flag_after: 2,
            rejection_threshold: 3,
            ..AnomalyConfig::default()
        },
        ..kernel::KernelOptions::default()
    };
    let telemetry = in_netns(&pair.rx.name, || {
        kernel::start_with(EbpfMode::On, Some(pair.rx_if.clone()), &[], options)
    })
    .unwrap_or_else(|e| panic!("{test}: {e}"));
    let flooder: IpAddr = pair.tx_v4.into();
    // Four connected peers: one floods, the others are quiet (two never send at all).
    let quiet = ["quiet-1", "quiet-2", "quiet-3"];
    telemetry.set_peer_addresses(vec![
        (PEER.to_string(), vec![flooder]),
        (quiet[0].to_string(), vec![pair.other_v4.into()]),
        (
            quiet[1].to_string(),
            vec![Ipv4Addr::new(192, 0, 2, 1).into()],
        ),
        (
            quiet[2].to_string(),
            vec![Ipv4Addr::new(192, 0, 2, 2).into()],
        ),
    ]);
    let rx = in_netns(&pair.rx.name, || UdpSocket::bind((pair.rx_v4, 0))).expect("bind rx");
    let rx_to = rx.local_addr().expect("rx addr");
    let tx = in_netns(&pair.tx.name, || UdpSocket::bind((flooder, 0))).expect("bind tx");

    // Flood (well over the 256 KiB/s gate) until the detector flags the peer.
    let end = Instant::now() + DEADLINE;
    let mut flagged = None;
    while Instant::now() < end {
        for _ in 0..100 {
            let _ = tx.send_to(&[7u8; 1400], rx_to);
        }
        let s = telemetry.snapshot();
        if let Some(f) = s.flags.iter().find(|f| f.peer_id == PEER) {
            flagged = Some(f.clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let flag = flagged.unwrap_or_else(|| panic!("{test}: the flooder was never flagged"));
    assert_eq!(flag.kind, "traffic_outlier", "{flag:?}");
    assert!(flag.detail.starts_with("z="), "{flag:?}");
    let s = telemetry.snapshot();
    assert!(
        s.flags.iter().all(|f| f.peer_id == PEER),
        "{test}: quiet peers flagged: {:?}",
        s.flags
    );
    assert_eq!(telemetry.take_auto_ban_candidates(), vec![PEER.to_string()]);
    assert!(telemetry.take_auto_ban_candidates().is_empty());

    // Rejected contributions: a quiet peer with enough of them is flagged too.
    telemetry.set_rejections(vec![(quiet[1].to_string(), 5)]);
    wait_status(&telemetry, "the rejections flag", |s| {
        s.flags
            .iter()
            .any(|f| f.peer_id == quiet[1] && f.kind == "repeated_rejections")
    });
    assert_eq!(
        telemetry.take_auto_ban_candidates(),
        vec![quiet[1].to_string()]
    );
}

#[test]
fn a_missing_interface_disables_auto_and_fails_on() {
    let test = "a_missing_interface_disables_auto_and_fails_on";
    let root = nix::unistd::geteuid().is_root();

    let auto = kernel::start(EbpfMode::Auto, Some("nonexistent0".to_string()), &[])
        .expect("auto never fails");
    let s = auto.snapshot();
    assert!(!s.enabled, "{test}: {s:?}");
    let reason = s.reason.expect("a reason");
    assert!(!reason.is_empty());
    if root {
        assert!(reason.contains("nonexistent0"), "{test}: {reason}");
    } else {
        println!("{test}: not root, so the reason is the missing privilege: {reason}");
    }
    // A disabled handle answers everything.
    auto.set_peer_addresses(vec![(PEER.to_string(), vec![Ipv4Addr::LOCALHOST.into()])]);
    auto.set_dropped_peers(vec![(PEER.to_string(), vec![Ipv4Addr::LOCALHOST.into()])]);
    assert!(auto.snapshot().peers.is_empty());
    assert!(auto.take_auto_ban_candidates().is_empty());

    let err = kernel::start(EbpfMode::On, Some("nonexistent0".to_string()), &[])
        .expect_err("on must fail");
    let msg = err.to_string();
    assert!(msg.starts_with("eBPF probes not loaded: "), "{test}: {msg}");
    if root {
        assert!(msg.contains("nonexistent0"), "{test}: {msg}");
    }

    let off = kernel::start(EbpfMode::Off, Some("nonexistent0".to_string()), &[])
        .expect("off never fails");
    assert_eq!(off.snapshot().reason.as_deref(), Some("off"));
}

/// `loom-peer` started without the capabilities BPF needs: `--ebpf auto` runs normally and its
/// status says why there is no kernel telemetry; `--ebpf on` refuses to start with one line.
#[test]
fn the_node_runs_without_bpf_permission_and_on_refuses() {
    let Some(setpriv) = tool("setpriv") else {
        println!("skipping the_node_runs_without_bpf_permission_and_on_refuses: no setpriv");
        return;
    };
    let bin = env!("CARGO_BIN_EXE_loom-peer");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf8").to_owned();
    // Same user (so the libtorch it links stays readable), no capabilities at all.
    let drop_caps = [
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--no-new-privs",
    ];
    let refused = Command::new(&setpriv)
        .args(drop_caps)
        .args([
            bin,
            "--data-dir",
            &data,
            "run",
            "--no-mdns",
            "--metrics-addr",
            "off",
        ])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--ebpf", "on"])
        .env("RUST_LOG", "error")
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "--ebpf on started without permission"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("eBPF"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let mut node = Command::new(&setpriv)
        .args(drop_caps)
        .args([
            bin,
            "--data-dir",
            &data,
            "run",
            "--no-mdns",
            "--metrics-addr",
            "off",
        ])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--ebpf", "auto"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let status = wait_for(|| {
        let out = Command::new(bin)
            .args(["--data-dir", &data, "status", "--json"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
            .flatten()
    });
    let _ = node.kill();
    let _ = node.wait();
    let status = status.expect("the node runs and answers status without BPF permission");
    let kernel = &status["network"]["kernel"];
    assert_eq!(kernel["enabled"], false, "{kernel}");
    let reason = kernel["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        reason.contains("permi") || reason.contains("cap") || reason.contains("root"),
        "{reason}"
    );
}
