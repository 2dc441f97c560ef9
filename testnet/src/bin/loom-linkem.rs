//! `loom-linkem PORT...`: runs the user-space link emulator (see `loom_testnet::linkem`).
//! Each PORT is `IFACE[:DELAY_MS[:RATE_MBIT]]`; delay and rate apply to frames leaving through it.

use std::process::ExitCode;

use loom_testnet::linkem::{PortSpec, run};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: loom-linkem IFACE[:DELAY_MS[:RATE_MBIT]] IFACE[...] ...");
        return ExitCode::from(2);
    }
    let specs = match args
        .iter()
        .map(|a| PortSpec::parse(a))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(specs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
