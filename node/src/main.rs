//! `loom-peer`: the one binary of Loom. Parses the command line and reports any error as one
//! line on stderr with a non-zero exit status.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use loom_node::{
    cli::{Cli, Command, FleetCommand, JobCommand, LedgerCommand},
    client::ControlClient,
    config::{NodeConfig, default_data_dir},
    demo, fleet, identity, job_cli, ledger_cli, run, telemetry,
    train::{self, TrainOptions},
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    match cli.command {
        Command::Run(args) => {
            telemetry::init_logging();
            let config = NodeConfig::resolve(data_dir, *args)?;
            run::run(config)
        }
        Command::Id => {
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
            let keypair = identity::load_or_create(&data_dir)?;
            println!("{}", keypair.public().to_peer_id());
            Ok(())
        }
        Command::Status(args) => {
            let report = ControlClient::from_data_dir(&data_dir)?.status()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Train(args) => {
            telemetry::init_logging_quiet();
            let manifest = std::fs::read_to_string(&args.manifest)
                .with_context(|| format!("cannot read manifest {}", args.manifest.display()))?;
            let manifest_dir = args
                .manifest
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_default();
            let device = args.device.map(|d| match d {
                loom_node::cli::DeviceArg::Auto => loom_trainer::DeviceChoice::Auto,
                loom_node::cli::DeviceArg::Cpu => loom_trainer::DeviceChoice::Cpu,
                loom_node::cli::DeviceArg::Cuda => loom_trainer::DeviceChoice::Cuda,
            });
            let options = TrainOptions {
                manifest,
                manifest_dir,
                device,
                threads: args.threads,
                resume: args.resume,
                progress: args.progress,
                verbose: true,
            };
            let config = NodeConfig::resolve(data_dir, args.run)?;
            let summary = train::train(config, options)?;
            println!("{}", serde_json::to_string(&summary)?);
            Ok(())
        }
        Command::Demo(args) => demo::run(args),
        Command::Ledger(command) => match command {
            LedgerCommand::Show { limit, json } => ledger_cli::show(&data_dir, limit, json),
            LedgerCommand::Verify => ledger_cli::verify(&data_dir),
            LedgerCommand::Export { out } => ledger_cli::export(&data_dir, out.as_deref()),
        },
        Command::Credits(args) => ledger_cli::credits(&data_dir, args.peer.as_deref(), args.json),
        Command::Job(command) => match command {
            JobCommand::Submit { manifest, escrow } => {
                job_cli::submit(&data_dir, &manifest, escrow)
            }
            JobCommand::Status { id, json } => job_cli::status(&data_dir, &id, json),
            JobCommand::Watch { id } => job_cli::watch(&data_dir, &id),
            JobCommand::List { json } => job_cli::list(&data_dir, json),
            JobCommand::Close { id } => job_cli::close(&data_dir, &id),
        },
        Command::Fleet(command) => match command {
            FleetCommand::Init { key } => fleet::init(&key),
            FleetCommand::Enroll {
                peer,
                key,
                expires,
                out,
            } => {
                let expires = expires
                    .map(|text| {
                        humantime::parse_duration(&text)
                            .map_err(|e| anyhow::anyhow!("invalid --expires {text:?}: {e}"))
                    })
                    .transpose()?;
                fleet::enroll(&key, &peer, expires, out.as_deref())
            }
            FleetCommand::Revoke { peer, key, reason } => {
                let entry = fleet::revoke_entry(&key, &peer, &reason)?;
                ControlClient::from_data_dir(&data_dir)?.submit_entry(&entry)?;
                println!("revocation of {peer} submitted to the ledger");
                Ok(())
            }
        },
        Command::Ban(args) => {
            let for_secs = args
                .duration
                .as_deref()
                .map(|text| {
                    humantime::parse_duration(text)
                        .map(|d| d.as_secs().max(1))
                        .map_err(|e| anyhow::anyhow!("invalid --for {text:?}: {e}"))
                })
                .transpose()?;
            ControlClient::from_data_dir(&data_dir)?.ban(&args.peer, for_secs, &args.reason)?;
            println!("{} banned", args.peer);
            Ok(())
        }
        Command::Speedtest(args) => {
            let result =
                ControlClient::from_data_dir(&data_dir)?.speedtest(&args.peer, args.mb << 20)?;
            if args.json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "{} bytes from {} in {:.0} ms: {:.1} Mbit/s",
                    result.bytes, result.peer, result.elapsed_ms, result.mbit_per_s
                );
            }
            Ok(())
        }
        Command::Unban(args) => {
            ControlClient::from_data_dir(&data_dir)?.unban(&args.peer)?;
            println!("{} unbanned", args.peer);
            Ok(())
        }
        Command::Transfer(args) => {
            ControlClient::from_data_dir(&data_dir)?.transfer(&args.to, args.amount)?;
            println!(
                "transfer of {} credits to {} submitted",
                args.amount, args.to
            );
            Ok(())
        }
    }
}
