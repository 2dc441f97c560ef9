//! `loom-peer demo`: N local peers on loopback train the built-in job together.
//!
//! Starts N `loom-peer train` processes (this same binary) on the embedded demo manifest (a
//! small character transformer on text from a seeded Markov source), draws one progress bar per
//! peer while they train, and ends with a summary: the validation loss curve (an SVG plot and a
//! terminal sparkline, with the source's entropy rate as the floor), the bytes each peer sent
//! against what dense fp32 exchange would have sent, and whether every peer held the same model
//! hash after every round.

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Deserialize;

use crate::{
    cli::DemoArgs,
    localmesh::{LocalMesh, MeshOptions},
    manifest::{DEMO_MANIFEST, DatasetSpec, Manifest},
    train::human_bytes,
};

/// Longest a demo may run.
const DEMO_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The fields of a progress line the demo reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Progress {
    /// Round the model is after.
    pub round: u64,
    /// Validation loss.
    pub val_loss: Option<f32>,
    /// Bytes sent over every connection.
    pub bytes_sent: u64,
    /// Update blob bytes published.
    pub update_bytes: u64,
    /// Dense fp32 reference.
    pub dense_fp32_bytes: u64,
    /// Model hash (hex).
    pub model_hash: String,
    /// Accepted contributions.
    pub contributors: usize,
    /// Seconds since start.
    pub wall_s: f64,
    /// Compute seconds.
    pub compute_s: f64,
    /// Done.
    pub finished: bool,
    /// Rounds the job's round chain decided so far, as known to the peer.
    #[serde(default)]
    pub chain_decided: u64,
    /// Coordinators the round chain skipped so far.
    #[serde(default)]
    pub chain_coordinator_changes: u64,
}

/// Reads a peer's progress file (missing: empty).
pub fn read_progress(path: &Path) -> Vec<Progress> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let bin = std::env::current_exe().context("cannot locate the loom-peer binary")?;
    let root = std::env::temp_dir().join(format!("loom-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let mut manifest_text = DEMO_MANIFEST.to_owned();
    let mut manifest = Manifest::parse(DEMO_MANIFEST)?;
    if let Some(rounds) = args.rounds {
        manifest_text = manifest_text.replace(
            &format!("rounds: {}", manifest.rounds),
            &format!("rounds: {rounds}"),
        );
        manifest = Manifest::parse(&manifest_text)?;
    }
    let manifest_path = root.join("demo.yaml");
    std::fs::write(&manifest_path, &manifest_text)
        .with_context(|| format!("cannot write {}", manifest_path.display()))?;
    let floor = match manifest.dataset {
        DatasetSpec::Builtin { seed, .. } => {
            Some(loom_protocols::data::MarkovSource::new(seed).entropy_rate_nats())
        }
        _ => None,
    };
    let n = args.peers as usize;
    println!(
        "Training job `{}` on {n} local peers over loopback: {} rounds of DiLoCo, top-k compressed updates",
        manifest.job, manifest.rounds
    );
    if let Some(floor) = floor {
        println!(
            "Data: text from a seeded Markov source; its entropy rate {floor:.4} nats is the best loss possible."
        );
    }
    println!("(data, logs and checkpoints in {})\n", root.display());
    let options = MeshOptions {
        subcommand: vec![
            "train".into(),
            "--manifest".into(),
            manifest_path.display().to_string(),
            "--threads".into(),
            "1".into(),
            "--device".into(),
            "cpu".into(),
        ],
        keep: args.keep,
        ..MeshOptions::run(n, bin, root.clone())
    };
    let mut mesh = LocalMesh::start(&options)?;
    let started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut drawn = false;
    let mut last_printed = vec![u64::MAX; n];
    loop {
        let progress: Vec<Vec<Progress>> = mesh
            .peers
            .iter()
            .map(|p| read_progress(&p.data_dir.join("progress.jsonl")))
            .collect();
        let mut done = 0;
        for index in 0..n {
            if let Some(status) = mesh.try_wait(index) {
                if !status.success() {
                    let log = mesh.peers[index].data_dir.join("peer.log");
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                    anyhow::bail!(
                        "peer {index} exited with {status}; last log lines:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                done += 1;
            }
        }
        if tty {
            if drawn {
                print!("\x1b[{n}A");
            }
            for (index, lines) in progress.iter().enumerate() {
                println!("\x1b[2K{}", bar(index, lines, manifest.rounds));
            }
            drawn = true;
            let _ = std::io::stdout().flush();
        } else {
            for (index, lines) in progress.iter().enumerate() {
                let round = lines.last().map(|l| l.round).unwrap_or(u64::MAX);
                if round != last_printed[index] && round != u64::MAX {
                    println!("{}", bar(index, lines, manifest.rounds));
                    last_printed[index] = round;
                }
            }
        }
        if done == n {
            break;
        }
        if started.elapsed() > DEMO_TIMEOUT {
            anyhow::bail!(
                "the demo did not finish within {} s",
                DEMO_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let progress: Vec<Vec<Progress>> = mesh
        .peers
        .iter()
        .map(|p| read_progress(&p.data_dir.join("progress.jsonl")))
        .collect();
    println!();
    print!(
        "{}",
        summary(&progress, floor, &args.plot, started.elapsed())?
    );
    Ok(())
}

fn bar(index: usize, lines: &[Progress], rounds: u64) -> String {
    const WIDTH: usize = 30;
    let Some(last) = lines.last() else {
        return format!("peer {index}  [{}]  starting", " ".repeat(WIDTH));
    };
    let filled = ((last.round as f64 / rounds.max(1) as f64) * WIDTH as f64).round() as usize;
    let filled = filled.min(WIDTH);
    format!(
        "peer {index}  [{}{}]  round {:>3}/{rounds}  val loss {}  sent {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        last.round,
        last.val_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into()),
        human_bytes(last.bytes_sent),
    )
}

/// A unicode sparkline of `values`.
pub fn sparkline(values: &[f32]) -> String {
    const TICKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    values
        .iter()
        .map(|&v| {
            let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.0 };
            TICKS[((t * 7.0).round() as usize).min(7)]
        })
        .collect()
}

/// An SVG line plot of `(x, y)` series with axis labels.
pub fn svg_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    floor: Option<f64>,
) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let points = series.iter().flat_map(|(_, s)| s.iter());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if let Some(f) = floor {
        y_min = y_min.min(f);
    }
    if x_min >= x_max {
        x_max = x_min + 1.0;
    }
    if y_min >= y_max {
        y_max = y_min + 1.0;
    }
    let sx = |x: f64| left + (x - x_min) / (x_max - x_min) * (w - left - right);
    let sy = |y: f64| top + (y_max - y) / (y_max - y_min) * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n",
        w / 2.0
    );
    svg += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=5 {
        let fx = x_min + (x_max - x_min) * i as f64 / 5.0;
        let fy = y_min + (y_max - y_min) * i as f64 / 5.0;
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{fy:.3}</text>\n",
            sx(fx),
            h - bottom + 16.0,
            trim_number(fx),
            left - 6.0,
            sy(fy) + 4.0
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{y_label}</text>\n",
        (left + w - right) / 2.0,
        h - 10.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0
    );
    if let Some(f) = floor {
        svg += &format!(
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"gray\" stroke-dasharray=\"5,4\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"gray\">entropy rate {f:.3}</text>\n",
            w - right,
            w - right - 4.0,
            sy(f) - 4.0,
            y = sy(f)
        );
    }
    const COLOURS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>\n",
            path.join(" "),
            left + 10.0,
            top + 16.0 * (i as f64 + 1.0)
        );
    }
    svg += "</svg>\n";
    svg
}

fn trim_number(x: f64) -> String {
    if x.abs() >= 100.0 || x.fract().abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// The end-of-run summary of a demo (or any local run) from the peers' progress files.
pub fn summary(
    progress: &[Vec<Progress>],
    floor: Option<f64>,
    plot: &Path,
    elapsed: Duration,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let reference = progress.first().cloned().unwrap_or_default();
    let curve: Vec<(u64, f32)> = reference
        .iter()
        .filter_map(|p| p.val_loss.map(|l| (p.round, l)))
        .collect();
    let losses: Vec<f32> = curve.iter().map(|(_, l)| *l).collect();
    out += &format!("Finished in {:.1} s.\n\n", elapsed.as_secs_f64());
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        out += &format!(
            "Validation loss by round  {}  {first:.4} -> {last:.4}{}\n",
            sparkline(&losses),
            floor
                .map(|f| format!(
                    "  (floor {f:.4}, {:.1}% above it)",
                    (f64::from(*last) / f - 1.0) * 100.0
                ))
                .unwrap_or_default()
        );
        let series = [(
            "validation loss (peer 0)",
            curve
                .iter()
                .map(|(r, l)| (*r as f64, f64::from(*l)))
                .collect::<Vec<_>>(),
        )];
        std::fs::write(
            plot,
            svg_plot(
                "Loom demo: validation loss",
                "round",
                "loss (nats/token)",
                &series,
                floor,
            ),
        )
        .with_context(|| format!("cannot write {}", plot.display()))?;
        out += &format!("Loss plot written to {}\n", plot.display());
    }
    out +=
        "\nBytes sent per peer (all traffic) against dense fp32 exchange of every step's update:\n";
    for (index, lines) in progress.iter().enumerate() {
        if let Some(last) = lines.last() {
            let ratio = last.dense_fp32_bytes as f64 / last.bytes_sent.max(1) as f64;
            out += &format!(
                "  peer {index}: sent {:>10}  updates {:>10}  dense fp32 {:>10}  ({ratio:.0}x less)  compute {:.0}% of wall\n",
                human_bytes(last.bytes_sent),
                human_bytes(last.update_bytes),
                human_bytes(last.dense_fp32_bytes),
                100.0 * last.compute_s / last.wall_s.max(1e-9),
            );
        }
    }
    if let Some(last) = reference.last()
        && last.round > 1
    {
        out += &format!(
            "\nRound chain (each round's close decided by Tendermint among the round's members): \
             peer 0 saw {} of rounds 2-{} decided, {} coordinator changes\n",
            last.chain_decided, last.round, last.chain_coordinator_changes
        );
    }
    let mut by_round: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for lines in progress {
        for line in lines {
            by_round
                .entry(line.round)
                .or_default()
                .push(line.model_hash.as_str());
        }
    }
    let complete: Vec<(&u64, &Vec<&str>)> = by_round
        .iter()
        .filter(|(_, hashes)| hashes.len() == progress.len())
        .collect();
    let agreeing = complete
        .iter()
        .filter(|(_, hashes)| hashes.iter().all(|h| *h == hashes[0]))
        .count();
    let finals: Vec<&str> = progress
        .iter()
        .filter_map(|l| l.last().map(|p| p.model_hash.as_str()))
        .collect();
    out += &format!(
        "\nModel hashes: identical on all {} peers after {agreeing} of {} rounds; final hash {}\n",
        progress.len(),
        complete.len(),
        if !finals.is_empty() && finals.iter().all(|h| *h == finals[0]) {
            format!("{} on every peer", &finals[0][..16.min(finals[0].len())])
        } else {
            format!("DIFFERS: {finals:?}")
        }
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sparkline_spans_the_range() {
        assert_eq!(sparkline(&[3.0, 2.0, 1.0]), "█▅▁");
        assert_eq!(sparkline(&[1.0, 1.0]), "▁▁");
    }

    #[test]
    fn the_plot_is_an_svg_with_every_series() {
        let svg = svg_plot(
            "t",
            "x",
            "y",
            &[("a", vec![(0.0, 3.0), (1.0, 2.0)]), ("b", vec![(0.0, 2.5)])],
            Some(1.5),
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("entropy rate"));
    }
}
