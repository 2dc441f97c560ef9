//! Private fleets end to end over loopback: `fleet init` and `fleet enroll` make the files, a hub
//! and a member started with `--fleet` admit each other, a stranger that reaches the hub is
//! refused (its connection closed, counted), a revocation put on the ledger by the fleet key
//! closes the revoked member out, and bad fleet files are one clear error.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_loom-peer");

fn loom(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("loom-peer runs")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, args: &[String]) -> Node {
    let log = std::fs::File::create(dir.join("peer.log")).expect("log");
    Node(
        Command::new(BIN)
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "warn,loom_node::network::fleet_gate=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn"),
    )
}

fn id(dir: &Path) -> String {
    String::from_utf8_lossy(&loom(dir, &["id"]).stdout)
        .trim()
        .to_owned()
}

fn status(dir: &Path) -> Option<serde_json::Value> {
    let out = loom(dir, &["status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("json"))
}

fn fleet_members(report: &serde_json::Value) -> Vec<String> {
    report["network"]["fleet"]["members_connected"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_args(port: u16, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "run".into(),
        "--listen".into(),
        format!("/ip4/127.0.0.1/tcp/{port}"),
        "--no-mdns".into(),
        "--metrics-addr".into(),
        "off".into(),
        "--block-interval".into(),
        "200ms".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

#[test]
fn members_admit_each_other_strangers_are_refused_and_revocation_closes_a_member_out() {
    let owner = tempfile::tempdir().expect("tempdir");
    let (hub, member, stranger) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let key = owner.path().join("fleet.key");
    let key_arg = key.to_str().expect("utf8").to_owned();
    let init = loom(owner.path(), &["fleet", "init", "--key", &key_arg]);
    assert!(init.status.success(), "{init:?}");
    let again = loom(owner.path(), &["fleet", "init", "--key", &key_arg]);
    assert!(
        !again.status.success(),
        "a fleet key must never be overwritten"
    );

    let (hub_id, member_id, stranger_id) = (id(hub.path()), id(member.path()), id(stranger.path()));
    let enroll = |peer: &str, dir: &Path| {
        let file = dir.join("fleet.toml");
        let out = loom(
            owner.path(),
            &[
                "fleet",
                "enroll",
                peer,
                "--key",
                &key_arg,
                "--out",
                file.to_str().expect("utf8"),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        file.to_str().expect("utf8").to_owned()
    };
    let hub_fleet = enroll(&hub_id, hub.path());
    let member_fleet = enroll(&member_id, member.path());

    // A fleet file made for another peer is refused at start-up with one line.
    let wrong = loom(
        stranger.path(),
        &[
            "run",
            "--no-mdns",
            "--metrics-addr",
            "off",
            "--fleet",
            &hub_fleet,
        ],
    );
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(stderr.contains("names another peer"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let hub_port = free_port();
    let _hub = spawn(
        hub.path(),
        &run_args(
            hub_port,
            &[
                "--fleet".into(),
                hub_fleet.clone(),
                "--genesis".into(),
                "fleet-test".into(),
            ],
        ),
    );
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{hub_port}/p2p/{hub_id}");
    let _member = spawn(
        member.path(),
        &run_args(
            free_port(),
            &[
                "--fleet".into(),
                member_fleet,
                "--bootstrap".into(),
                bootstrap.clone(),
            ],
        ),
    );
    let _stranger = spawn(
        stranger.path(),
        &run_args(free_port(), &["--bootstrap".into(), bootstrap]),
    );

    wait_for(
        "hub and member to admit each other",
        Duration::from_secs(30),
        || {
            status(hub.path()).is_some_and(|r| fleet_members(&r).contains(&member_id))
                && status(member.path()).is_some_and(|r| fleet_members(&r).contains(&hub_id))
        },
    );
    wait_for(
        "the stranger to be refused",
        Duration::from_secs(30),
        || {
            status(hub.path()).is_some_and(|r| {
                r["network"]["fleet"]["refused_total"].as_u64().unwrap_or(0) >= 1
                    && !r["network"]["peers"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p["peer_id"] == stranger_id.as_str()))
            })
        },
    );
    // The member joins the fleet's ledger (its genesis names the fleet) and enrolls.
    wait_for(
        "the member to join the fleet ledger",
        Duration::from_secs(30),
        || {
            let out = loom(member.path(), &["ledger", "verify"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("fleet-test")
        },
    );

    // Revocation: a ban signed by the fleet key, through the hub's node.
    let revoke = loom(
        hub.path(),
        &["fleet", "revoke", &member_id, "--key", &key_arg],
    );
    assert!(revoke.status.success(), "{revoke:?}");
    wait_for(
        "the revoked member to be closed out",
        Duration::from_secs(30),
        || {
            status(hub.path()).is_some_and(|r| !fleet_members(&r).contains(&member_id))
                && loom(hub.path(), &["ledger", "show", "--json"])
                    .stdout
                    .windows(3)
                    .any(|w| w == b"ban")
        },
    );
}

#[test]
fn a_missing_or_malformed_fleet_file_is_one_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = loom(
        dir.path(),
        &["run", "--no-mdns", "--fleet", "/nonexistent/fleet.toml"],
    );
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(stderr.contains("cannot read fleet file"), "{stderr}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "fleet = \"zz\"\ntoken = \"00\"\n").expect("write");
    let out = loom(
        dir.path(),
        &["run", "--no-mdns", "--fleet", bad.to_str().expect("utf8")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad fleet key"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
