//! The `loom-peer` node: configuration, identity, the libp2p network, the control API, job
//! manifests and training, and the local-mesh launcher. The binary (`main.rs`) is a thin command-line shell over this library,
//! which the simulation harness and the NAT lab reuse.

pub mod bans;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod demo;
pub mod fleet;
pub mod identity;
pub mod job_cli;
pub mod jobs;
pub mod kernel;
pub mod ledger_cli;
pub mod localmesh;
pub mod manifest;
pub mod network;
pub mod run;
pub mod status;
pub mod telemetry;
pub mod train;

/// The agent string this build announces.
pub fn agent() -> String {
    format!("loom-peer/{}", env!("CARGO_PKG_VERSION"))
}
