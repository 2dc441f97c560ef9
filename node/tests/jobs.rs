//! Jobs over the mesh end to end: a job submitted with `loom-peer job submit` goes on the
//! ledger, every running peer picks it up and trains it, the coordinators record each round with
//! its payments, `job watch` exits once the last round is on the ledger, and every peer folds the
//! same balances: the submitter paid the escrow, the trainers earned from it, nothing was lost.
//! A job no peer may run is logged once by each. Bad manifests, an escrow beyond the balance,
//! unknown job ids and a node that goes away are one line each.

#![allow(clippy::unwrap_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use loom_node::{
    client::ControlClient,
    demo::read_progress,
    localmesh::{LocalMesh, MeshOptions},
};

const BIN: &str = env!("CARGO_BIN_EXE_loom-peer");
const MINT: u64 = 1_000_000;

const MANIFEST: &str = "\
job: jobs-test
replicas: {min: 1, max: 8}
model: {kind: mlp, hidden: 32, layers: 1, embed: 8, context: 4}
dataset: {source: builtin, seed: 5, chars: 20000}
optimizer: {batch: 8, lr: 0.003}
strategy: {kind: diloco, inner_steps: 5}
compression: {kind: topk, ratio: 0.1, values: int8}
rounds: 4
round_deadline: 3s
seed: 9
eval_batches: 2
resources: {device: cpu, threads: 1}
pay: {per_contribution: 10, per_verdict: 1}
";

fn loom(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

/// The one line of a failed command, which must start with `error: `.
fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_owned()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn job_commands_without_a_node_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["job", "status", "abcd"],
        vec!["job", "watch", "abcd"],
        vec!["job", "list"],
        vec!["job", "close", "abcd"],
    ] {
        let line = one_line_error(&loom(dir.path(), &args));
        assert!(line.contains("no running loom-peer"), "{line}");
    }
    let manifest = write(dir.path(), "job.yaml", MANIFEST);
    let line = one_line_error(&loom(dir.path(), &["job", "submit", &manifest]));
    assert!(line.contains("no running loom-peer"), "{line}");
    let line = one_line_error(&loom(
        dir.path(),
        &["job", "submit", "/nonexistent/job.yaml"],
    ));
    assert!(line.contains("cannot read manifest"), "{line}");
    // A node that goes away: `watch` gives up with one line after its patience runs out.
    let gone = tempfile::tempdir().unwrap();
    let port = loom_node::localmesh::free_port().unwrap();
    std::fs::write(gone.path().join("api.addr"), format!("127.0.0.1:{port}")).unwrap();
    std::fs::write(gone.path().join("control.token"), "0".repeat(64)).unwrap();
    let started = Instant::now();
    let line = one_line_error(&loom(gone.path(), &["job", "watch", "abcd"]));
    assert!(line.contains("stopped answering"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_submitted_job_is_picked_up_trained_recorded_and_paid() {
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
    let options = MeshOptions {
        log: "info".into(),
        extra_args: vec!["--block-interval".into(), "200ms".into()],
        first_peer_args: vec!["--genesis".into(), "jobs-test".into()],
        keep: _guard.is_none(),
        ..MeshOptions::run(3, BIN.into(), root.join("mesh"))
    };
    let mut mesh = LocalMesh::start(&options).unwrap();
    mesh.wait_formed(Duration::from_secs(60)).unwrap();
    let clients: Vec<ControlClient> = (0..3)
        .map(|i| mesh.client(i, Duration::from_secs(10)).unwrap())
        .collect();
    wait_until(
        "every peer to be a ledger member",
        Duration::from_secs(60),
        || {
            clients
                .iter()
                .all(|c| c.ledger_status().is_ok_and(|s| s.member))
        },
    );
    let dirs: Vec<PathBuf> = mesh.peers.iter().map(|p| p.data_dir.clone()).collect();
    let manifest = write(root.as_path(), "job.yaml", MANIFEST);

    // Refusals: one line each, naming what is wrong.
    let bad = write(
        root.as_path(),
        "bad.yaml",
        &MANIFEST.replace("rounds: 4", "rounds: 0"),
    );
    let line = one_line_error(&loom(&dirs[0], &["job", "submit", &bad]));
    assert!(line.contains("`rounds`"), "{line}");
    let bad = write(
        root.as_path(),
        "bad.yaml",
        &MANIFEST.replace("per_verdict: 1}", "per_verdict: 1, per_round: 2}"),
    );
    let line = one_line_error(&loom(&dirs[0], &["job", "submit", &bad]));
    assert!(line.contains("per_round"), "{line}");
    let line = one_line_error(&loom(
        &dirs[0],
        &["job", "submit", &manifest, "--escrow", "2000000"],
    ));
    assert!(
        line.contains("balance 1000000 is less than the escrow 2000000"),
        "{line}"
    );
    let line = one_line_error(&loom(&dirs[1], &["job", "submit", &manifest]));
    assert!(line.contains("balance 0"), "{line}");
    let line = one_line_error(&loom(
        &dirs[0],
        &["job", "submit", &manifest, "--escrow", "100"],
    ));
    assert!(line.contains("escrow 100 is less than"), "{line}");
    let line = one_line_error(&loom(&dirs[0], &["job", "status", "0123abc"]));
    assert!(line.contains("no job on the ledger"), "{line}");
    let line = one_line_error(&loom(&dirs[0], &["job", "status", "not-hex"]));
    assert!(line.contains("not a hex prefix"), "{line}");

    // Submit on the peer the genesis minted credits to.
    let out = loom(&dirs[0], &["job", "submit", &manifest]);
    assert!(out.status.success(), "{out:?}");
    let job_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(job_id.len(), 64, "{job_id}");
    let escrow = 4 * 8 * (10 + 1);
    let prefix = &job_id[..12];
    wait_until(
        "the job to be on the ledger",
        Duration::from_secs(30),
        || clients[0].job(prefix).is_ok(),
    );
    let again = one_line_error(&loom(&dirs[0], &["job", "submit", &manifest]));
    assert!(again.contains("already on the ledger"), "{again}");

    let mut watch = Command::new(BIN)
        .arg("--data-dir")
        .arg(&dirs[1])
        .args(["job", "watch", prefix])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Every peer picks the job up and trains it to the last round, and keeps running.
    let progress: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.join("jobs").join(&job_id[..16]).join("progress.jsonl"))
        .collect();
    wait_until(
        "every peer to train the job's last round",
        Duration::from_secs(240),
        || {
            mesh.check_alive().unwrap();
            progress
                .iter()
                .all(|p| read_progress(p).iter().any(|l| l.finished && l.round == 4))
        },
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let watched = loop {
        if let Some(status) = watch.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = watch.kill();
            panic!("job watch did not exit");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let watch_out = watch.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&watch_out.stdout);
    assert!(
        watched.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&watch_out.stderr)
    );
    assert!(stdout.contains("round 4/4"), "{stdout}");
    assert!(
        stdout.lines().last().unwrap().contains("finished"),
        "{stdout}"
    );
    wait_until(
        "every peer to stop the job's actors",
        Duration::from_secs(30),
        || {
            dirs.iter().all(|d| {
                std::fs::read_to_string(d.join("peer.log")).is_ok_and(|l| l.contains("job done"))
            })
        },
    );

    // Every round is on the ledger, seen alike by every peer.
    for dir in &dirs {
        let out = loom(dir, &["job", "status", prefix, "--json"]);
        assert!(out.status.success(), "{out:?}");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["id"], job_id.as_str());
        assert_eq!(status["finished"], true, "{status}");
        assert_eq!(status["escrow"], escrow);
        let rounds: Vec<u64> = status["recorded"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["round"].as_u64().unwrap())
            .collect();
        assert_eq!(rounds, vec![1, 2, 3, 4], "{status}");
        assert!(!status["contributors"].as_array().unwrap().is_empty());
        // Every peer that trained it joined the job's committee, whose votes made each result.
        assert_eq!(
            status["committee"].as_array().map(Vec::len),
            Some(dirs.len()),
            "{status}"
        );
        // The model the ledger recorded for the last round is the one every peer finished on.
        let recorded_last = status["recorded"][3]["model_hash"]
            .as_str()
            .unwrap()
            .to_owned();
        for path in &progress {
            let finished = read_progress(path)
                .into_iter()
                .rfind(|l| l.finished)
                .expect("a finished line");
            assert_eq!(finished.model_hash, recorded_last, "{}", path.display());
        }
    }
    let local = loom(&dirs[2], &["job", "status", prefix]);
    let text = String::from_utf8_lossy(&local.stdout);
    assert!(
        text.contains("4 of 4 recorded on the ledger, finished"),
        "{text}"
    );
    assert!(text.contains("this node: round 4/4"), "{text}");
    let list = loom(&dirs[0], &["job", "list", "--json"]);
    let jobs: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1);

    // Every peer folds the same balances; credits flowed from the escrow to the trainers.
    let balances = |c: &ControlClient| -> Option<BTreeMap<String, (u64, u64)>> {
        let report = c.credits().ok()?;
        assert!(report.conserved);
        Some(
            report
                .peers
                .iter()
                .map(|p| {
                    (
                        loom_node::ledger_cli::peer_name(&p.peer),
                        (p.balance, p.earned_training),
                    )
                })
                .collect(),
        )
    };
    wait_until(
        "every peer to fold the same balances",
        Duration::from_secs(30),
        || {
            let all: Vec<_> = clients.iter().map(balances).collect();
            all.iter().all(|b| b.is_some() && *b == all[0])
        },
    );
    let report = clients[0].credits().unwrap();
    let status = clients[0].job(prefix).unwrap();
    let paid: u64 = status.recorded.iter().map(|r| r.paid).sum();
    let fees: u64 = status.verdicts.iter().map(|v| v.fee).sum();
    assert!(paid > 0, "contributors were paid");
    assert_eq!(status.summary.escrow_remaining, escrow - paid - fees);
    assert_eq!(
        report.escrow_total,
        u128::from(status.summary.escrow_remaining)
    );
    let row = |peer: &libp2p::PeerId| {
        report
            .peers
            .iter()
            .find(|p| loom_node::ledger_cli::peer_name(&p.peer) == peer.to_string())
            .cloned()
            .unwrap_or_default()
    };
    let submitter = row(&mesh.peers[0].peer_id);
    assert_eq!(submitter.escrowed, escrow);
    assert_eq!(
        submitter.balance,
        MINT - escrow + submitter.earned_training + submitter.earned_verifying
    );
    let earned: u64 = report.peers.iter().map(|p| p.earned_training).sum();
    assert_eq!(earned, paid);
    let trainers = mesh.peers[1..]
        .iter()
        .filter(|p| row(&p.peer_id).earned_training > 0)
        .count();
    assert!(trainers >= 1, "a peer other than the submitter earned");
    assert_eq!(
        report.balances_total + report.escrow_total,
        u128::from(MINT),
        "credits are conserved"
    );

    // A job no peer may run (its dataset is a file outside the peers' dataset directory) is
    // logged once by each and not trained.
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(500);
    let data = write(root.as_path(), "text.txt", &text);
    let unrunnable = MANIFEST
        .replace("job: jobs-test", "job: unrunnable")
        .replace(
            "source: builtin, seed: 5, chars: 20000",
            &format!("source: file, path: {data}, vocab: char"),
        );
    let manifest = write(root.as_path(), "unrunnable.yaml", &unrunnable);
    let out = loom(&dirs[0], &["job", "submit", &manifest]);
    assert!(out.status.success(), "{out:?}");
    let other = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    wait_until(
        "every peer to refuse the job it cannot run",
        Duration::from_secs(30),
        || {
            dirs.iter().all(|d| {
                std::fs::read_to_string(d.join("peer.log"))
                    .is_ok_and(|l| l.contains("job not picked up") && l.contains(&other))
            })
        },
    );
    for dir in &dirs {
        let log = std::fs::read_to_string(dir.join("peer.log")).unwrap();
        let refusals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("job not picked up"))
            .collect();
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(
            refusals[0].contains("not a plain relative path"),
            "{}",
            refusals[0]
        );
        assert!(!dir.join("jobs").join(&other[..16]).exists());
    }

    // Only the submitter may close a job; closing it returns the escrow left on every replica.
    let line = one_line_error(&loom(&dirs[1], &["job", "close", &other]));
    assert!(line.contains("only its submitter may close it"), "{line}");
    let other_escrow = clients[0].job(&other).unwrap().summary.escrow_remaining;
    assert!(other_escrow > 0);
    let out = loom(&dirs[0], &["job", "close", &other[..12]]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("{other_escrow} credits")), "{said}");
    wait_until(
        "every peer to fold the job's close",
        Duration::from_secs(30),
        || {
            clients.iter().all(|c| {
                c.job(&other)
                    .is_ok_and(|s| s.summary.closed && s.summary.escrow_remaining == 0)
            })
        },
    );
    let report = clients[0].credits().unwrap();
    assert!(report.conserved);
    let submitter_after = report
        .peers
        .iter()
        .find(|p| loom_node::ledger_cli::peer_name(&p.peer) == mesh.peers[0].peer_id.to_string())
        .cloned()
        .unwrap();
    assert_eq!(submitter_after.refunded, other_escrow);
    assert_eq!(
        submitter_after.balance,
        MINT - submitter_after.escrowed
            + submitter_after.refunded
            + submitter_after.earned_training
            + submitter_after.earned_verifying
    );
    let line = one_line_error(&loom(&dirs[0], &["job", "close", &other]));
    assert!(line.contains("closed already"), "{line}");
    mesh.check_alive().unwrap();
}
