//! `loom-solo`: one learner training alone, as a sanity check of the trainer and a benchmark to
//! read distributed runs against. Trains with `train_inner` in chunks of `--eval-every` steps on
//! a fixed shard (seed 1, peer zero), printing the validation and training loss after each chunk,
//! and optionally writes the curve as JSON.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use loom_actors::{Learner, ShardKey};
use loom_trainer::{Dataset, DeviceChoice, LearnerConfig, ModelSpec, TchLearner, Vocab};
use serde::Serialize;

const USAGE: &str = "usage: loom-solo [--data FILE | --builtin SEED] [--builtin-chars N] \
[--vocab char|byte] [--iters 2000] [--eval-every 250] [--model transformer|mlp] \
[--layers 4 --heads 4 --width 128 --context 64 --batch 12] [--hidden 256 --embed 16] \
[--lr 1e-3] [--eval-batches 16] [--device auto|cpu|cuda] [--threads N] [--json OUT]";

#[derive(Debug)]
struct Options {
    data: Option<String>,
    builtin_seed: u64,
    builtin_chars: usize,
    vocab: Vocab,
    iters: u64,
    eval_every: u64,
    mlp: bool,
    layers: usize,
    heads: usize,
    width: usize,
    context: usize,
    hidden: usize,
    embed: usize,
    config: LearnerConfig,
    json: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            data: None,
            builtin_seed: 42,
            builtin_chars: 1_000_000,
            vocab: Vocab::Char,
            iters: 2000,
            eval_every: 250,
            mlp: false,
            layers: 4,
            heads: 4,
            width: 128,
            context: 64,
            hidden: 256,
            embed: 16,
            config: LearnerConfig::default(),
            json: None,
        }
    }
}

fn parse<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value
        .parse()
        .map_err(|_| format!("{flag}: cannot read {value:?}"))
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    while let Some(flag) = args.next() {
        let value = args.next();
        match flag.as_str() {
            "--data" => options.data = Some(parse(&flag, value)?),
            "--builtin" => {
                options.builtin_seed = parse(&flag, value)?;
                options.data = None;
            }
            "--builtin-chars" => options.builtin_chars = parse(&flag, value)?,
            "--vocab" => {
                options.vocab = match parse::<String>(&flag, value)?.as_str() {
                    "char" => Vocab::Char,
                    "byte" => Vocab::Byte,
                    other => return Err(format!("--vocab: {other:?} is not char or byte")),
                }
            }
            "--iters" => options.iters = parse(&flag, value)?,
            "--eval-every" => options.eval_every = parse(&flag, value)?,
            "--model" => {
                options.mlp = match parse::<String>(&flag, value)?.as_str() {
                    "transformer" => false,
                    "mlp" => true,
                    other => return Err(format!("--model: {other:?} is not transformer or mlp")),
                }
            }
            "--layers" => options.layers = parse(&flag, value)?,
            "--heads" => options.heads = parse(&flag, value)?,
            "--width" => options.width = parse(&flag, value)?,
            "--context" => options.context = parse(&flag, value)?,
            "--hidden" => options.hidden = parse(&flag, value)?,
            "--embed" => options.embed = parse(&flag, value)?,
            "--batch" => options.config.batch = parse(&flag, value)?,
            "--lr" => options.config.lr = parse(&flag, value)?,
            "--eval-batches" => options.config.eval_batches = parse(&flag, value)?,
            "--threads" => options.config.threads = parse(&flag, value)?,
            "--device" => {
                options.config.device = match parse::<String>(&flag, value)?.as_str() {
                    "auto" => DeviceChoice::Auto,
                    "cpu" => DeviceChoice::Cpu,
                    "cuda" => DeviceChoice::Cuda,
                    other => return Err(format!("--device: {other:?} is not auto, cpu or cuda")),
                }
            }
            "--json" => options.json = Some(parse(&flag, value)?),
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if options.eval_every == 0 {
        return Err("--eval-every must be at least 1".into());
    }
    options.config.model = if options.mlp {
        ModelSpec::Mlp {
            hidden: options.hidden,
            layers: options.layers,
            embed: options.embed,
            context: options.context,
        }
    } else {
        ModelSpec::Transformer {
            layers: options.layers,
            heads: options.heads,
            width: options.width,
            context: options.context,
        }
    };
    Ok(options)
}

#[derive(Debug, Serialize)]
struct Point {
    iter: u64,
    val_loss: f32,
    train_loss: Option<f32>,
    wall_s: f64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    config: &'a LearnerConfig,
    data: String,
    param_count: usize,
    entropy_rate_nats: Option<f64>,
    points: Vec<Point>,
    final_val_loss: f32,
    wall_s: f64,
    compute_s: f64,
    s_per_iter: f64,
}

fn run(options: Options) -> Result<(), String> {
    let dataset = match &options.data {
        Some(path) => Dataset::from_file(path, options.vocab).map_err(|e| e.to_string())?,
        None => Dataset::builtin(options.builtin_seed, options.builtin_chars),
    };
    let description = dataset.describe();
    let entropy_rate_nats = dataset.entropy_rate_nats();
    let mut learner =
        TchLearner::new(options.config.clone(), Arc::new(dataset)).map_err(|e| e.to_string())?;
    eprintln!("data: {description}");
    if let Some(h) = entropy_rate_nats {
        eprintln!("loss floor (entropy rate): {h:.4} nats");
    }
    eprintln!(
        "model: {} ({} parameters) on {:?}, libtorch threads {}",
        options.config.model.describe(),
        learner.param_count(),
        learner.device(),
        tch::get_num_threads()
    );
    let shard = ShardKey {
        seed: 1,
        peer: [0; 32],
    };
    let start = Instant::now();
    let mut points = Vec::new();
    let mut compute_s = 0.0;
    println!("iter val_loss train_loss elapsed_s tokens_per_s");
    let val_loss = learner.validation_loss().map_err(|e| e.to_string())?;
    println!("0 {val_loss:.4} - {:.1} -", start.elapsed().as_secs_f64());
    points.push(Point {
        iter: 0,
        val_loss,
        train_loss: None,
        wall_s: start.elapsed().as_secs_f64(),
    });
    let mut iter = 0u64;
    let mut final_val_loss = val_loss;
    while iter < options.iters {
        let steps = options.eval_every.min(options.iters - iter);
        let steps = u32::try_from(steps).map_err(|_| "--eval-every is too large".to_string())?;
        let report = learner
            .train_inner(iter, steps, shard)
            .map_err(|e| e.to_string())?;
        iter += u64::from(steps);
        compute_s += report.compute_s;
        let val_loss = learner.validation_loss().map_err(|e| e.to_string())?;
        let wall_s = start.elapsed().as_secs_f64();
        println!(
            "{iter} {val_loss:.4} {:.4} {wall_s:.1} {:.0}",
            report.loss_mean,
            report.tokens as f64 / report.compute_s.max(1e-9)
        );
        points.push(Point {
            iter,
            val_loss,
            train_loss: Some(report.loss_mean),
            wall_s,
        });
        final_val_loss = val_loss;
    }
    let wall_s = start.elapsed().as_secs_f64();
    let s_per_iter = if options.iters > 0 {
        compute_s / options.iters as f64
    } else {
        0.0
    };
    eprintln!(
        "{} iterations in {wall_s:.1} s ({compute_s:.1} s training, {s_per_iter:.4} s/iter)",
        options.iters
    );
    if let Some(path) = &options.json {
        let report = Report {
            config: &options.config,
            data: description,
            param_count: learner.param_count(),
            entropy_rate_nats,
            points,
            final_val_loss,
            wall_s,
            compute_s,
            s_per_iter,
        };
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args(std::env::args().skip(1)).and_then(run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("loom-solo: {}", message.lines().next().unwrap_or_default());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> impl Iterator<Item = String> {
        line.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn arguments_parse_into_a_config() {
        let options = parse_args(args(
            "--builtin 5 --iters 10 --eval-every 5 --layers 2 --heads 2 --width 32 --context 16 --batch 3 --threads 1 --vocab byte",
        ))
        .expect("args");
        assert_eq!(options.builtin_seed, 5);
        assert_eq!(options.iters, 10);
        assert_eq!(options.vocab, Vocab::Byte);
        assert_eq!(options.config.batch, 3);
        assert_eq!(options.config.threads, 1);
        assert_eq!(
            options.config.model,
            ModelSpec::Transformer {
                layers: 2,
                heads: 2,
                width: 32,
                context: 16
            }
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(parse_args(args("--iters many")).is_err());
        assert!(parse_args(args("--iters")).is_err());
        assert!(parse_args(args("--vocab word")).is_err());
        assert!(parse_args(args("--frobnicate 1")).is_err());
        assert!(parse_args(args("--eval-every 0")).is_err());
    }
}
