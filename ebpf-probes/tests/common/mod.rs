//! Test fixtures: network namespaces joined by a veth pair, created with `ip`, removed on drop;
//! running code inside a namespace (a scoped thread that `setns`es); polling with a deadline.
//!
//! Names carry the process id and a per-test tag, so tests (and test processes) can run in
//! parallel. Every test needs root; without it (or when `ip netns` fails) it prints
//! `skipping: ...` and passes.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

/// How long a test waits for an expected event before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Finds a system tool in the usual sbin/bin directories (cargo's PATH may lack /usr/sbin).
pub fn tool(name: &str) -> Option<String> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| format!("{d}/{name}"))
        .find(|p| Path::new(p).exists())
}

/// Runs a command; returns stderr on failure.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS`, panicking with the command and its stderr on failure.
pub fn ip(args: &[&str]) {
    let ip = tool("ip").expect("iproute2 `ip` not found");
    if let Err(e) = run(&ip, args) {
        panic!("{e}");
    }
}

/// `ip ARGS`, returning stdout; panics on failure.
pub fn ip_output(args: &[&str]) -> String {
    let ip = tool("ip").expect("iproute2 `ip` not found");
    let out = Command::new(&ip).args(args).output().expect("run ip");
    assert!(out.status.success(), "`ip {}` failed", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nft ARGS` inside namespace `ns`, panicking on failure.
pub fn nft_in(ns: &str, rules: &str) {
    let ip = tool("ip").expect("iproute2 `ip` not found");
    let nft = tool("nft").expect("nft not found: install nftables");
    if let Err(e) = run(&ip, &["netns", "exec", ns, &nft, rules]) {
        panic!("{e}");
    }
}

/// Polls `f` every 20 ms until it returns `Some` or [`DEADLINE`] passes.
pub fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
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

/// Receives datagrams on `sock` (which needs a read timeout) and hands each to `on_datagram`
/// until it returns `true` or [`DEADLINE`] passes; returns whether it returned `true`.
pub fn recv_until(
    sock: &std::net::UdpSocket,
    mut on_datagram: impl FnMut(usize, std::net::SocketAddr) -> bool,
) -> bool {
    let end = Instant::now() + DEADLINE;
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        if let Ok((n, from)) = sock.recv_from(&mut buf)
            && on_datagram(n, from)
        {
            return true;
        }
    }
    false
}

/// Runs `f` on a thread that has joined network namespace `ns`. Sockets created there stay in
/// that namespace; interfaces are looked up there.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
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

/// A network namespace, deleted (with its interfaces and nft rules) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Self, String> {
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

/// Returns `None` (after printing why) when this process cannot create namespaces.
pub fn privileged(test: &str) -> Option<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("skipping {test}: needs root for network namespaces");
        return None;
    }
    if tool("ip").is_none() {
        println!("skipping {test}: needs iproute2 (`ip`) for network namespaces");
        return None;
    }
    Some(())
}

/// Two namespaces joined by a veth pair: `rx` (carries the probes on `rx_if`) and `tx` (the
/// traffic source on `tx_if`), with IPv4 `10.<tag>.<p>.1/24` / `.2` and IPv6
/// `fd00:<tag>:<p>::1/64` / `::2`, static neighbour entries both ways (no ARP/ND traffic).
pub struct Pair {
    pub rx: Netns,
    pub tx: Netns,
    pub rx_if: String,
    pub tx_if: String,
    pub rx_v4: Ipv4Addr,
    pub tx_v4: Ipv4Addr,
    pub rx_v6: Ipv6Addr,
    pub tx_v6: Ipv6Addr,
    tag: u8,
    p: u8,
}

/// MAC address for side `side` of the pair.
fn mac(tag: u8, p: u8, side: u8) -> String {
    format!("02:4c:{tag:02x}:{p:02x}:00:{side:02x}")
}

impl Pair {
    /// Creates the pair for test `tag` (a small number unique among this crate's tests).
    /// `None` (after printing `skipping: ...`) when namespaces cannot be created here.
    pub fn new(test: &str, tag: u8) -> Option<Self> {
        privileged(test)?;
        let pid = std::process::id();
        // A byte of the pid keeps concurrent test processes apart in the addresses too.
        let p = (pid % 251) as u8;
        let rx = match Netns::create(format!("loomt-{pid}-{tag}-rx")) {
            Ok(ns) => ns,
            Err(e) => {
                println!("skipping {test}: needs root for network namespaces ({e})");
                return None;
            }
        };
        let tx = Netns::create(format!("loomt-{pid}-{tag}-tx")).expect("second netns");
        let rx_if = format!("lr{tag}x{pid}");
        let tx_if = format!("lt{tag}x{pid}");
        assert!(rx_if.len() <= 15 && tx_if.len() <= 15);
        let pair = Self {
            rx_v4: Ipv4Addr::new(10, tag, p, 1),
            tx_v4: Ipv4Addr::new(10, tag, p, 2),
            rx_v6: Ipv6Addr::new(0xfd00, tag.into(), p.into(), 0, 0, 0, 0, 1),
            tx_v6: Ipv6Addr::new(0xfd00, tag.into(), p.into(), 0, 0, 0, 0, 2),
            rx,
            tx,
            rx_if,
            tx_if,
            tag,
            p,
        };
        let (rx_mac, tx_mac) = (mac(tag, p, 1), mac(tag, p, 2));
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
            &pair.tx_if,
            "address",
            &tx_mac,
            "netns",
            &pair.tx.name,
        ]);
        for (ns, dev, v4, v6, peer_v4, peer_v6, peer_mac) in [
            (
                &pair.rx.name,
                &pair.rx_if,
                pair.rx_v4,
                pair.rx_v6,
                pair.tx_v4,
                pair.tx_v6,
                &tx_mac,
            ),
            (
                &pair.tx.name,
                &pair.tx_if,
                pair.tx_v4,
                pair.tx_v6,
                pair.rx_v4,
                pair.rx_v6,
                &rx_mac,
            ),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            for peer in [peer_v4.to_string(), peer_v6.to_string()] {
                ip(&[
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    &peer,
                    "lladdr",
                    peer_mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]);
            }
        }
        Some(pair)
    }

    /// Adds another IPv4 address (`10.<tag>.<p>.<host>`) to the tx side.
    pub fn add_tx_v4(&self, host: u8) -> Ipv4Addr {
        let addr = Ipv4Addr::new(10, self.tag, self.p, host);
        ip(&[
            "-n",
            &self.tx.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &self.tx_if,
        ]);
        // The rx side answers nothing here, but give it a static entry all the same.
        ip(&[
            "-n",
            &self.rx.name,
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac(self.tag, self.p, 2),
            "dev",
            &self.rx_if,
            "nud",
            "permanent",
        ]);
        addr
    }
}

/// Convenience: an `IpAddr` from anything convertible.
pub fn ipa(a: impl Into<IpAddr>) -> IpAddr {
    a.into()
}
