//! The `loom-peer` binary end to end: bad input gives one clear line and a non-zero exit, the
//! identity persists, and a running node answers `status` and stops on SIGTERM.

use std::{
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_loom-peer");

fn loom(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("loom-peer runs")
}

/// Asserts a failure with exactly one line on stderr starting with `prefix`.
fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success");
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn run_args(port: u16) -> Vec<String> {
    vec![
        "run".into(),
        "--listen".into(),
        format!("/ip4/127.0.0.1/tcp/{port}"),
        "--no-mdns".into(),
        "--metrics-addr".into(),
        "off".into(),
    ]
}

/// A plain HTTP/1.0 GET on loopback; returns the body.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn the_identity_is_created_once_and_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = loom(dir.path(), &["id"]);
    let b = loom(dir.path(), &["id"]);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stdout).starts_with("12D3KooW"));
}

#[test]
fn a_malformed_multiaddr_is_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = loom(dir.path(), &["run", "--listen", "/ip4/300.1.1.1/tcp/1"]);
    assert_one_line_error(&out, "invalid --listen");
    let out = loom(dir.path(), &["run", "--bootstrap", "not-an-address"]);
    assert_one_line_error(&out, "invalid --bootstrap");
}

#[test]
fn a_corrupt_identity_file_is_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("identity.key"), b"not a key").expect("write");
    let mut perms = std::fs::metadata(dir.path().join("identity.key"))
        .expect("meta")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(dir.path().join("identity.key"), perms).expect("chmod");
    let out = loom(dir.path(), &["id"]);
    assert_one_line_error(&out, "is corrupt");
}

#[test]
fn a_port_in_use_is_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let args = run_args(port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = loom(dir.path(), &args);
    assert_one_line_error(&out, "in use");
}

#[test]
fn a_bad_config_file_is_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("loom.toml");
    std::fs::write(&config, "max_connections = \"many\"\n").expect("write");
    let out = loom(
        dir.path(),
        &["run", "--config", config.to_str().expect("utf8")],
    );
    assert_one_line_error(&out, "bad config file");
    let out = loom(dir.path(), &["run", "--config", "/nonexistent/loom.toml"]);
    assert_one_line_error(&out, "cannot read config file");
}

#[test]
fn status_without_a_running_node_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = loom(dir.path(), &["status"]);
    assert_one_line_error(&out, "no running loom-peer");
}

#[test]
fn a_running_node_reports_status_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let metrics_port = free_port();
    let mut args = run_args(port);
    args.retain(|a| a != "--metrics-addr" && a != "off");
    args.extend(["--metrics-addr".into(), format!("127.0.0.1:{metrics_port}")]);
    let mut node = spawn_node(dir.path(), &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let out = loom(dir.path(), &["status", "--json"]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json");
        }
        assert!(Instant::now() < deadline, "status never answered");
        std::thread::sleep(Duration::from_millis(100));
    };
    let listen = report["network"]["listen_addrs"].to_string();
    assert!(listen.contains(&format!("/tcp/{port}")), "{report}");
    assert_eq!(report["network"]["nat_status"], "unknown");
    let actors = report["actors"].as_array().expect("actors");
    assert!(actors.iter().all(|a| a["running"] == true), "{report}");
    let table = loom(dir.path(), &["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("LIVE VIEW"));
    // Prometheus metrics: peers by kind from the start, heartbeats once the first tick ran.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = http_get(metrics_port, "/metrics");
        if body.contains("loom_peers{kind=\"hole-punched\"} 0")
            && body.contains("loom_heartbeats_sent_total")
        {
            break;
        }
        assert!(Instant::now() < deadline, "metrics never showed up: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A wrong token is refused.
    std::fs::write(dir.path().join("control.token"), "0".repeat(64)).expect("write");
    let out = loom(dir.path(), &["status"]);
    assert_one_line_error(&out, "401");
    // SIGTERM: clean exit.
    let pid = node.0.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = node.0.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "node did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node process that is killed when the guard drops, also when a test fails half-way.
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_node(dir: &Path, args: &[String]) -> Node {
    Node(
        Command::new(BIN)
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    )
}

fn status_json(dir: &Path) -> Option<serde_json::Value> {
    let out = loom(dir, &["status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("json"))
}

fn connected_to(report: &serde_json::Value, peer: &str) -> bool {
    report["network"]["peers"]
        .as_array()
        .is_some_and(|peers| peers.iter().any(|p| p["peer_id"] == peer))
}

#[test]
fn a_blocked_peer_is_refused_and_others_are_not() {
    let (hub_dir, ok_dir, bad_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let id = |dir: &Path| {
        String::from_utf8_lossy(&loom(dir, &["id"]).stdout)
            .trim()
            .to_owned()
    };
    let (hub_id, ok_id, bad_id) = (id(hub_dir.path()), id(ok_dir.path()), id(bad_dir.path()));
    let hub_port = free_port();
    let mut hub_args = run_args(hub_port);
    hub_args.extend(["--block".into(), bad_id.clone()]);
    let _hub = spawn_node(hub_dir.path(), &hub_args);
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{hub_port}/p2p/{hub_id}");
    let mut peers = Vec::new();
    for dir in [ok_dir.path(), bad_dir.path()] {
        let mut args = run_args(free_port());
        args.extend(["--bootstrap".into(), bootstrap.clone()]);
        peers.push(spawn_node(dir, &args));
    }
    // The allowed peer connects; by then the blocked one has tried too.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(report) = status_json(hub_dir.path())
            && connected_to(&report, &ok_id)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the allowed peer never connected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give the blocked peer's bootstrap dials (immediate, then every 10 s) time to be refused.
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        let hub_view = status_json(hub_dir.path()).expect("hub status");
        assert!(
            !connected_to(&hub_view, &bad_id),
            "blocked peer got in: {hub_view}"
        );
        if let Some(bad_view) = status_json(bad_dir.path()) {
            assert!(
                !connected_to(&bad_view, &hub_id),
                "blocked peer sees the hub: {bad_view}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
