//! Drives the NAT lab's three scenarios (`testnet/nat-lab.sh --scenario`): `nat` (two peers
//! behind endpoint-independent NATs end up hole-punched, a peer behind a symmetric NAT stays
//! reachable through the relay, a public peer connects directly), `defense` (kernel byte counts
//! per peer agree with libp2p's, a ban drops the peer at XDP, an unban lets it back) and `fleet`
//! (strangers refused through the relay, enrolled peers train together through it). Needs root (network namespaces); without it the test says SKIPPED loudly.
//! `LOOM_NAT_LAB_REPEAT` sets the number of runs (default 1).

use std::process::Command;

#[test]
fn nat_lab_hole_punches_and_falls_back_to_the_relay() {
    run_lab("nat");
}

#[test]
fn nat_lab_kernel_counts_agree_and_a_ban_drops_at_xdp() {
    run_lab("defense");
}

#[test]
fn nat_lab_private_fleet_refuses_strangers_and_trains_through_the_relay() {
    run_lab("fleet");
}

/// One lab at a time: they share the machine's two cores with real training.
static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_lab(scenario: &str) {
    let _one_at_a_time = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let bin = loom_testnet::loom_peer_bin();
    assert!(
        bin.exists(),
        "no loom-peer binary at {} (build it first: cargo build --bins)",
        bin.display()
    );
    let repeat = std::env::var("LOOM_NAT_LAB_REPEAT").unwrap_or_else(|_| "1".into());
    let output = Command::new("bash")
        .arg(loom_testnet::nat_lab_script())
        .arg("--bin")
        .arg(&bin)
        .arg("--repeat")
        .arg(&repeat)
        .arg("--scenario")
        .arg(scenario)
        .env("LOOM_LAB_LOG", "warn")
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    match output.status.code() {
        Some(0) => assert!(stdout.contains(&format!("{repeat}/{repeat} runs passed"))),
        Some(loom_testnet::SKIPPED_EXIT) => {
            eprintln!(
                "SKIPPED: NAT lab cannot run here (needs root / CAP_NET_ADMIN and ip, nft, tc)"
            );
            if std::env::var_os("CI").is_some() {
                panic!("the NAT lab must run in CI, which runs as root");
            }
        }
        other => panic!("NAT lab failed (exit {other:?})"),
    }
}
