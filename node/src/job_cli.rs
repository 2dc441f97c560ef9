//! `loom-peer job submit | status | watch | list`: jobs on the ledger, through the control API
//! of the running node of the data directory, rendered for people (tables, a progress bar) and
//! programs (`--json`).

use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    client::{ClientError, ControlClient},
    jobs::{JobStatus, SubmitJobRequest},
};

/// How often `watch` asks the node.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long `watch` tolerates a node that does not answer before it gives up.
const WATCH_PATIENCE: Duration = Duration::from_secs(10);
/// Width of the progress bar, in characters.
const BAR_WIDTH: u64 = 10;

/// `job submit`: puts the manifest's job on the ledger and prints its id.
pub fn submit(data_dir: &Path, manifest: &Path, escrow: Option<u64>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("cannot read manifest {}", manifest.display()))?;
    let client = ControlClient::from_data_dir(data_dir)?;
    // Relative dataset paths are the manifest's, as with `loom-peer train`.
    let dir = manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base_dir =
        std::fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let reply = client.submit_job(&SubmitJobRequest {
        manifest: text,
        escrow,
        base_dir: Some(base_dir.display().to_string()),
    })?;
    println!("{}", reply.job_id);
    Ok(())
}

/// `job close`: closes a job this node submitted; prints the escrow that goes back.
pub fn close(data_dir: &Path, id: &str) -> anyhow::Result<()> {
    let reply = ControlClient::from_data_dir(data_dir)?.close_job(id)?;
    println!(
        "job {} closed: {} credits of escrow go back to this node once the entry is final",
        reply.job_id, reply.refund
    );
    Ok(())
}

/// `job list`: the jobs on the ledger.
pub fn list(data_dir: &Path, json: bool) -> anyhow::Result<()> {
    let jobs = ControlClient::from_data_dir(data_dir)?.jobs()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(());
    }
    println!(
        "{:<16}  {:<24} {:>9} {:>19}  state",
        "job", "name", "rounds", "escrow left/put up"
    );
    for job in &jobs {
        println!(
            "{:<16}  {:<24} {:>9} {:>19}  {}",
            &job.id[..16],
            job.name,
            format!("{}/{}", job.rounds_recorded, job.rounds),
            format!("{}/{}", job.escrow_remaining, job.escrow),
            if job.finished { "finished" } else { "open" }
        );
    }
    println!("{} jobs", jobs.len());
    Ok(())
}

/// `job status`: one job, as a table or JSON.
pub fn status(data_dir: &Path, id: &str, json: bool) -> anyhow::Result<()> {
    let status = ControlClient::from_data_dir(data_dir)?.job(id)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(())
}

/// The highest round recorded on the ledger.
fn rounds_done(status: &JobStatus) -> u64 {
    status.recorded.iter().map(|r| r.round).max().unwrap_or(0)
}

/// A job's status for people.
pub fn render_status(status: &JobStatus) -> String {
    use std::fmt::Write as _;
    let s = &status.summary;
    let mut out = String::new();
    let _ = writeln!(out, "job       {}  {}", s.id, s.name);
    let _ = writeln!(
        out,
        "submitted by {} in block {}",
        s.submitter, status.submitted_height
    );
    let _ = writeln!(
        out,
        "escrow    {} put up, {} left{}",
        s.escrow,
        s.escrow_remaining,
        status
            .pay
            .map(|p| format!(
                "; pays {} per contribution, {} per verdict",
                p.per_contribution, p.per_verdict
            ))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "rounds    {} of {} recorded on the ledger{}",
        s.rounds_recorded,
        s.rounds,
        if s.finished {
            ", finished"
        } else if s.closed {
            ", closed by its submitter"
        } else {
            ""
        }
    );
    if !status.recorded.is_empty() {
        let _ = writeln!(
            out,
            "\n{:>6} {:>9} {:>9} {:>8}  {:<16} coordinator",
            "round", "accepted", "rejected", "paid", "model"
        );
        for r in &status.recorded {
            let _ = writeln!(
                out,
                "{:>6} {:>9} {:>9} {:>8}  {:<16} {}",
                r.round,
                r.accepted,
                r.rejected,
                r.paid,
                &r.model_hash[..r.model_hash.len().min(16)],
                r.coordinator
            );
        }
    }
    if !status.verdicts.is_empty() {
        let _ = writeln!(out, "\nVERDICTS");
        for v in &status.verdicts {
            let _ = writeln!(
                out,
                "round {:>4}  {} {} by {} (fee {}): {}",
                v.round,
                v.subject,
                if v.accepted { "accepted" } else { "refused" },
                v.verifier,
                v.fee,
                v.reason
            );
        }
    }
    if !status.contributors.is_empty() {
        let _ = writeln!(out, "\nCONTRIBUTORS ({})", status.contributors.len());
        for c in &status.contributors {
            let _ = writeln!(out, "{c}");
        }
    }
    if !status.committee.is_empty() {
        let _ = writeln!(out, "\nCOMMITTEE ({})", status.committee.len());
        for member in &status.committee {
            let _ = writeln!(out, "{member}");
        }
    }
    if let Some(local) = &status.local {
        let _ = writeln!(
            out,
            "\nthis node: round {}/{}  val {}  contributors {}{}",
            local.last.round,
            local.rounds,
            local
                .last
                .val_loss
                .map_or_else(|| "-".to_owned(), |l| format!("{l:.4}")),
            local.last.contributors,
            if local.last.finished { "  done" } else { "" }
        );
    }
    out
}

/// The progress line of `watch`: `[#####.....] round 7/14  val 2.31  contributors 3`.
pub fn render_progress(status: &JobStatus) -> String {
    let total = status.summary.rounds;
    let done = rounds_done(status).min(total);
    let filled = (done * BAR_WIDTH).checked_div(total).unwrap_or(0);
    let bar: String = (0..BAR_WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    let val = status
        .local
        .as_ref()
        .and_then(|l| l.last.val_loss)
        .map_or_else(|| "-".to_owned(), |l| format!("{l:.2}"));
    let contributors = status
        .recorded
        .iter()
        .max_by_key(|r| r.round)
        .map(|r| r.accepted)
        .or_else(|| status.local.as_ref().map(|l| l.last.contributors))
        .unwrap_or(0);
    format!("[{bar}] round {done}/{total}  val {val}  contributors {contributors}")
}

/// `job watch`: follows the job until its last round is on the ledger or it is closed.
pub fn watch(data_dir: &Path, id: &str) -> anyhow::Result<()> {
    let client = ControlClient::from_data_dir(data_dir)?;
    let mut out = std::io::stdout().lock();
    let tty = out.is_terminal();
    let mut shown = String::new();
    let mut failing_since: Option<Instant> = None;
    let end_line = |out: &mut std::io::StdoutLock, shown: &str| {
        if tty && !shown.is_empty() {
            let _ = writeln!(out);
        }
    };
    loop {
        match client.job(id) {
            Ok(status) => {
                failing_since = None;
                let line = render_progress(&status);
                if line != shown {
                    if tty {
                        write!(out, "\r\x1b[2K{line}")?;
                        out.flush()?;
                    } else {
                        writeln!(out, "{line}")?;
                    }
                    shown = line;
                }
                if status.summary.finished {
                    end_line(&mut out, &shown);
                    writeln!(
                        out,
                        "job {} finished: {} rounds on the ledger",
                        &status.summary.id[..16],
                        status.summary.rounds_recorded
                    )?;
                    return Ok(());
                }
                if status.summary.closed {
                    end_line(&mut out, &shown);
                    writeln!(
                        out,
                        "job {} closed by its submitter after {} rounds on the ledger",
                        &status.summary.id[..16],
                        status.summary.rounds_recorded
                    )?;
                    return Ok(());
                }
            }
            Err(refused @ ClientError::Refused(_)) => {
                end_line(&mut out, &shown);
                return Err(refused.into());
            }
            Err(error) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= WATCH_PATIENCE {
                    end_line(&mut out, &shown);
                    anyhow::bail!("the node stopped answering: {error}");
                }
            }
        }
        std::thread::sleep(WATCH_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobSummary, RecordedRound};

    fn status(rounds: u64, recorded: &[u64]) -> JobStatus {
        JobStatus {
            summary: JobSummary {
                id: "ab".repeat(32),
                name: "t".into(),
                submitter: "p".into(),
                escrow: 10,
                escrow_remaining: 5,
                rounds,
                rounds_recorded: recorded.len(),
                finished: recorded.contains(&rounds),
                closed: false,
            },
            submitted_height: 3,
            pay: None,
            recorded: recorded
                .iter()
                .map(|&round| RecordedRound {
                    round,
                    model_hash: "cd".repeat(32),
                    accepted: 3,
                    rejected: 0,
                    paid: 30,
                    coordinator: "c".into(),
                    height: 4,
                })
                .collect(),
            verdicts: Vec::new(),
            contributors: Vec::new(),
            committee: Vec::new(),
            local: None,
        }
    }

    #[test]
    fn the_progress_bar_follows_the_recorded_rounds() {
        assert_eq!(
            render_progress(&status(14, &[1, 2, 3, 4, 5, 6, 7])),
            "[#####.....] round 7/14  val -  contributors 3"
        );
        assert_eq!(
            render_progress(&status(4, &[])),
            "[..........] round 0/4  val -  contributors 0"
        );
        assert_eq!(
            render_progress(&status(0, &[])),
            "[..........] round 0/0  val -  contributors 0"
        );
        let text = render_status(&status(2, &[1, 2]));
        assert!(
            text.contains("2 of 2 recorded on the ledger, finished"),
            "{text}"
        );
    }
}
