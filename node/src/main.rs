//! `loom-peer`: the one binary of Loom. Parses the command line and reports any error as one
//! line on stderr with a non-zero exit status.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use loom_node::{
    cli::{Cli, Command},
    client::ControlClient,
    config::{NodeConfig, default_data_dir},
    demo, identity, run, telemetry,
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
        Command::Demo(args) => demo::run(args),
    }
}
