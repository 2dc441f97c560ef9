//! The user-space link emulator forwards frames between namespaces and delays them: two hosts
//! behind 15 ms ports ping each other in at least 30 ms. Needs root (network namespaces); without
//! it the test says SKIPPED, and in CI (which runs as root) a skip is a failure.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Namespaces and the switch process, removed on drop (also when the test fails).
struct Lab {
    prefix: String,
    switch: Option<Child>,
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.switch.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in ["sw", "h1", "h2"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(name)])
                .status();
        }
    }
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn linkem_bin() -> PathBuf {
    let peer = loom_testnet::loom_peer_bin();
    peer.with_file_name("loom-linkem")
}

#[test]
fn linkem_forwards_and_delays_frames_between_namespaces() {
    let prefix = format!("lk{}-", std::process::id());
    if !sh(&["ip", "netns", "add", &format!("{prefix}probe")]) {
        eprintln!("SKIPPED: needs root / CAP_NET_ADMIN for network namespaces");
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: this must not skip"
        );
        return;
    }
    sh(&["ip", "netns", "del", &format!("{prefix}probe")]);
    let bin = linkem_bin();
    assert!(
        bin.exists(),
        "no loom-linkem at {} (cargo build --bins)",
        bin.display()
    );
    let mut lab = Lab {
        prefix,
        switch: None,
    };
    let (sw, h1, h2) = (lab.ns("sw"), lab.ns("h1"), lab.ns("h2"));
    for ns in [&sw, &h1, &h2] {
        assert!(sh(&["ip", "netns", "add", ns]));
        assert!(sh(&["ip", "-n", ns, "link", "set", "lo", "up"]));
    }
    for (host, port, addr) in [(&h1, "p1", "10.99.0.1/24"), (&h2, "p2", "10.99.0.2/24")] {
        assert!(sh(&[
            "ip", "link", "add", "eth0", "netns", host, "type", "veth", "peer", "name", port,
            "netns", &sw,
        ]));
        assert!(sh(&["ip", "-n", host, "addr", "add", addr, "dev", "eth0"]));
        for (ns, dev) in [(host.as_str(), "eth0"), (sw.as_str(), port)] {
            assert!(sh(&["ip", "-n", ns, "link", "set", dev, "up"]));
            sh(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                "off", "tx", "off", "rx", "off",
            ]);
        }
    }
    lab.switch = Some(
        Command::new("ip")
            .args(["netns", "exec", &sw])
            .arg(&bin)
            .args(["p1:15", "p2:15"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start loom-linkem"),
    );
    // Wait for the path to work (the switch needs a moment to open its sockets), then measure.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sh(&[
        "ip",
        "netns",
        "exec",
        &h1,
        "ping",
        "-c",
        "1",
        "-W",
        "1",
        "10.99.0.2",
    ]) {
        assert!(
            Instant::now() < deadline,
            "no connectivity through loom-linkem"
        );
    }
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h1,
            "ping",
            "-c",
            "5",
            "-i",
            "0.2",
            "10.99.0.2",
        ])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let summary = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .expect("ping summary");
    let min_ms: f64 = summary
        .split('=')
        .nth(1)
        .and_then(|v| v.trim().split('/').next())
        .and_then(|v| v.parse().ok())
        .expect("min rtt");
    assert!(out.status.success(), "pings lost: {text}");
    assert!(
        min_ms >= 30.0,
        "round trip {min_ms} ms: the 2 × 15 ms delay was not applied"
    );
}
