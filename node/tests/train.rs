//! `loom-peer train` end to end over loopback libp2p: separate processes train one job, agree on
//! every round's model hash, survive a `kill -9` of one of them (which resumes from its
//! checkpoint and catches up), and refuse bad manifests with one line naming the field.

#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use loom_node::{
    demo::{Progress, read_progress},
    localmesh::{LocalMesh, MeshOptions},
};

const BIN: &str = env!("CARGO_BIN_EXE_loom-peer");

const MANIFEST: &str = "\
job: loopback-test
replicas: {min: 1, max: 8}
model: {kind: mlp, hidden: 32, layers: 1, embed: 8, context: 4}
dataset: {source: builtin, seed: 5, chars: 20000}
optimizer: {batch: 8, lr: 0.003}
strategy: {kind: diloco, inner_steps: 5}
compression: {kind: topk, ratio: 0.1, values: int8}
rounds: 14
round_deadline: 3s
checkpoint_every: 2
seed: 9
eval_batches: 2
resources: {device: cpu, threads: 1}
";

fn write_manifest(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("job.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn last_round(path: &Path) -> Option<u64> {
    read_progress(path).last().map(|p| p.round)
}

#[test]
fn bad_manifests_get_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (bad, needle) in [
        (
            MANIFEST.replace("ratio: 0.1", "ratio: 2.0"),
            "compression.ratio",
        ),
        (format!("{MANIFEST}colour: blue\n"), "colour"),
        (MANIFEST.replace("rounds: 14\n", ""), "rounds"),
        (MANIFEST.replace("hidden: 32", "hidden: 0"), "model.hidden"),
        (
            MANIFEST.replace(
                "source: builtin, seed: 5, chars: 20000",
                "source: file, path: /nonexistent/x.txt, vocab: char",
            ),
            "dataset",
        ),
    ] {
        let manifest = write_manifest(dir.path(), &bad);
        let out = Command::new(BIN)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["train", "--manifest"])
            .arg(&manifest)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line expected: {stderr}");
        assert!(lines[0].starts_with("error: "), "{stderr}");
        assert!(lines[0].contains(needle), "expected {needle:?} in {stderr}");
    }
}

#[test]
fn three_processes_agree_every_round_and_a_killed_peer_resumes_from_its_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    // LOOM_TEST_KEEP=1 leaves the peers' directories (logs, progress) for inspection.
    let (_guard, root) = if std::env::var_os("LOOM_TEST_KEEP").is_some() {
        let kept = root.keep();
        eprintln!("keeping {}", kept.display());
        (None, kept)
    } else {
        let path = root.path().to_path_buf();
        (Some(root), path)
    };
    let manifest = write_manifest(root.as_path(), MANIFEST);
    let options = MeshOptions {
        subcommand: vec![
            "train".into(),
            "--manifest".into(),
            manifest.display().to_string(),
        ],
        log: "info".into(),
        keep: _guard.is_none(),
        ..MeshOptions::run(3, BIN.into(), root.as_path().join("mesh"))
    };
    let mut mesh = LocalMesh::start(&options).unwrap();
    let progress: Vec<PathBuf> = mesh
        .peers
        .iter()
        .map(|p| p.data_dir.join("progress.jsonl"))
        .collect();
    wait_until("peer 2 to pass round 5", Duration::from_secs(180), || {
        last_round(&progress[2]).is_some_and(|r| r >= 5)
    });
    // `loom-peer status` (the control API) reports the job while it trains.
    let status = mesh
        .client(0, Duration::from_secs(10))
        .unwrap()
        .status()
        .unwrap();
    let training = status.training.clone().expect("training status");
    assert_eq!(training.job, "loopback-test");
    assert_eq!(training.rounds, 14);
    assert!(status.render().contains("training  job loopback-test"));
    mesh.kill(2);
    let killed_at = last_round(&progress[2]).unwrap();
    let checkpoints = std::fs::read_dir(
        std::fs::read_dir(mesh.peers[2].data_dir.join("jobs"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("checkpoints"),
    )
    .unwrap()
    .count();
    assert!(checkpoints >= 2, "checkpoints and their `latest` pointer");
    mesh.restart(2, &options, &["--resume".to_owned()]).unwrap();
    wait_until("every peer to finish", Duration::from_secs(300), || {
        (0..3).all(|i| mesh.try_wait(i).is_some())
    });
    for i in 0..3 {
        let status = mesh.try_wait(i).unwrap();
        let log =
            std::fs::read_to_string(mesh.peers[i].data_dir.join("peer.log")).unwrap_or_default();
        assert!(status.success(), "peer {i} exited with {status}: {log}");
    }
    let lines: Vec<Vec<Progress>> = progress.iter().map(|p| read_progress(p)).collect();
    let log2 = std::fs::read_to_string(mesh.peers[2].data_dir.join("peer.log")).unwrap();
    assert!(log2.contains("resuming after round"), "{log2}");
    // Every round that two peers both report has the same hash on both.
    let by_peer: Vec<BTreeMap<u64, &str>> = lines
        .iter()
        .map(|l| l.iter().map(|p| (p.round, p.model_hash.as_str())).collect())
        .collect();
    for round in 1..=14u64 {
        let hashes: Vec<&str> = by_peer
            .iter()
            .filter_map(|m| m.get(&round).copied())
            .collect();
        assert!(
            hashes.windows(2).all(|w| w[0] == w[1]),
            "round {round}: {hashes:?}"
        );
    }
    for (i, peer) in by_peer.iter().enumerate() {
        assert!(peer.contains_key(&14), "peer {i} reached the last round");
    }
    // The restarted peer reported rounds after the one it was killed at.
    assert!(lines[2].iter().any(|p| p.round > killed_at));
    let first = lines[0].first().and_then(|p| p.val_loss).unwrap();
    let last = lines[0].last().and_then(|p| p.val_loss).unwrap();
    assert!(last < first, "validation loss {first} -> {last}");
    // The job's round chain ran over the real gossip: the surviving peers saw rounds decided.
    for (i, peer) in lines.iter().enumerate().take(2) {
        let decided = peer.last().map_or(0, |p| p.chain_decided);
        eprintln!("peer {i}: {decided} rounds decided by the round chain");
        assert!(decided > 0, "peer {i} saw no round decided");
    }
}
