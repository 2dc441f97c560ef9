//! `loom-ebpf`: a small command-line front end to the probes, for checks and manual testing.
//!
//! - `loom-ebpf check [--iface X | --kernel-only]`: can the probes load here? Exit 0 with
//!   `ok: ...`, or exit 1 with one line `loom-ebpf: <reason>`.
//! - `loom-ebpf watch --iface X [--secs N] [--json]`: prints the counters every second.
//! - `loom-ebpf drop --iface X --addr A [--secs N]`: drops A's packets for N seconds, printing
//!   A's counters every second.

use std::{
    net::IpAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use loom_ebpf_probes::{ProbeConfig, ProbeError, Probes, XdpAttachMode, preflight};

#[derive(Parser)]
#[command(
    name = "loom-ebpf",
    about = "Loom eBPF probes: check, watch counters, drop list"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check whether the probes can load (exit 0) or not (exit 1, one-line reason).
    Check {
        /// Also attach to this interface (and detach again).
        #[arg(long)]
        iface: Option<String>,
        /// Skip the capability pre-check and let the kernel decide (verifies the programs).
        #[arg(long, conflicts_with = "iface")]
        kernel_only: bool,
    },
    /// Attach to an interface and print the counters every second.
    Watch {
        #[arg(long)]
        iface: String,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// XDP mode: auto, skb or native.
        #[arg(long, default_value = "auto")]
        xdp_mode: XdpAttachMode,
    },
    /// Put an address on the drop list for a while and print its counters.
    Drop {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        addr: IpAddr,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value = "auto")]
        xdp_mode: XdpAttachMode,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { iface, kernel_only } => check(iface.as_deref(), kernel_only),
        Command::Watch {
            iface,
            secs,
            json,
            xdp_mode,
        } => watch(&iface, xdp_mode, secs, json),
        Command::Drop {
            iface,
            addr,
            secs,
            xdp_mode,
        } => drop_addr(&iface, xdp_mode, addr, secs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the first line of the error (verifier logs are long).
            let msg = e.to_string();
            println!("loom-ebpf: {}", msg.lines().next().unwrap_or("error"));
            ExitCode::FAILURE
        }
    }
}

fn check(iface: Option<&str>, kernel_only: bool) -> Result<(), ProbeError> {
    let what = if kernel_only {
        Probes::verify_object()?
    } else {
        preflight()?;
        Probes::check(iface)?
    };
    println!("ok: {what}");
    Ok(())
}

fn load(iface: &str, xdp_mode: XdpAttachMode) -> Result<Probes, ProbeError> {
    let mut config = ProbeConfig::new(iface);
    config.xdp_mode = xdp_mode;
    Probes::load(&config)
}

fn watch(iface: &str, xdp_mode: XdpAttachMode, secs: u64, json: bool) -> Result<(), ProbeError> {
    let probes = load(iface, xdp_mode)?;
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        print_snapshot(&probes, json)?;
        if Instant::now() >= end {
            return Ok(());
        }
    }
}

fn print_snapshot(probes: &Probes, json: bool) -> Result<(), ProbeError> {
    let counters = probes.address_counters()?;
    let retransmits = probes.retransmits()?;
    let own = probes.process_send_bytes(std::process::id())?;
    if json {
        let addresses: Vec<_> = counters
            .iter()
            .map(|(a, c)| serde_json::json!({ "addr": a.to_string(), "counters": c }))
            .collect();
        let retrans: Vec<_> = retransmits
            .iter()
            .map(|(a, n)| serde_json::json!({ "remote": a.to_string(), "retransmits": n }))
            .collect();
        let line = serde_json::json!({
            "iface": probes.config().iface,
            "addresses": addresses,
            "retransmits": retrans,
            "drop_list": probes.drop_list()?.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        println!("{line}");
        return Ok(());
    }
    println!(
        "{:<40} {:>10} {:>12} {:>8} {:>10} {:>12} {:>9}",
        "address", "rx_pkts", "rx_bytes", "drops", "tx_pkts", "tx_bytes", "age_ms"
    );
    for (addr, c) in &counters {
        let age = c
            .last_seen_age_ms()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        println!(
            "{:<40} {:>10} {:>12} {:>8} {:>10} {:>12} {:>9}",
            addr.to_string(),
            c.rx_packets,
            c.rx_bytes,
            c.drops,
            c.tx_packets,
            c.tx_bytes,
            age
        );
    }
    for (remote, n) in &retransmits {
        println!("retransmits {remote} {n}");
    }
    if let Some(bytes) = own {
        println!("bytes sent by this process: {bytes}");
    }
    println!();
    Ok(())
}

fn drop_addr(
    iface: &str,
    xdp_mode: XdpAttachMode,
    addr: IpAddr,
    secs: u64,
) -> Result<(), ProbeError> {
    let mut probes = load(iface, xdp_mode)?;
    probes.drop_insert(addr)?;
    println!("dropping packets from {addr} on {iface} for {secs} s");
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let c = probes.counters_for(addr)?.unwrap_or_default();
        println!(
            "{addr}: drops {} ({} bytes), passed {}",
            c.drops, c.drop_bytes, c.rx_packets
        );
        if Instant::now() >= end {
            return Ok(());
        }
    }
}
