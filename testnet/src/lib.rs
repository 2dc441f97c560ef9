//! The NAT lab and testnet deployment files of Loom.
//!
//! The lab itself is `nat-lab.sh` (network namespaces, NAT routers, real `loom-peer` processes)
//! with its verdict logic in `lab_check.py`; this crate exists so that `cargo test` drives it
//! (see `tests/nat_lab.rs`) and to locate the files from Rust.

pub mod linkem;

use std::path::PathBuf;

/// The lab script.
pub fn nat_lab_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("nat-lab.sh")
}

/// The `loom-peer` binary the lab runs: `LOOM_PEER_BIN`, else the workspace's debug build.
pub fn loom_peer_bin() -> PathBuf {
    std::env::var_os("LOOM_PEER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/loom-peer")
        })
}

/// Exit status of the lab when it cannot run here (not root, tools missing).
pub const SKIPPED_EXIT: i32 = 77;
