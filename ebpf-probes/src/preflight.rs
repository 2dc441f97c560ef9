//! Cheap checks that need no eBPF syscall: is kernel BTF present, and does this process hold the
//! capabilities the probes need (read from `CapEff` in `/proc/self/status`).

use std::path::Path;

use crate::ProbeError;

/// Where the kernel exposes its BTF; `tp_btf` programs and CO-RE relocations need it.
pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of a process (`CapEff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Reads `CapEff` from `/proc/self/status`.
    pub fn current() -> Result<Self, ProbeError> {
        let status =
            std::fs::read_to_string("/proc/self/status").map_err(|source| ProbeError::Io {
                what: "reading /proc/self/status".to_string(),
                source,
            })?;
        Self::parse_status(&status).ok_or_else(|| ProbeError::Io {
            what: "parsing CapEff in /proc/self/status".to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no CapEff line"),
        })
    }

    /// Parses the `CapEff:` line of a `/proc/<pid>/status` text.
    pub fn parse_status(status: &str) -> Option<Self> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))?
            .trim();
        u64::from_str_radix(hex, 16).ok().map(Self)
    }

    fn has(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    /// The privileges the probes need that this set lacks, as human-readable names.
    pub fn missing(self) -> Vec<&'static str> {
        let admin = self.has(CAP_SYS_ADMIN);
        let mut missing = Vec::new();
        if !(self.has(CAP_BPF) || admin) {
            missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
        }
        if !self.has(CAP_NET_ADMIN) {
            missing.push("CAP_NET_ADMIN");
        }
        if !(self.has(CAP_PERFMON) || admin) {
            missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
        }
        missing
    }
}

/// Checks, without touching eBPF, that the probes can plausibly load: kernel BTF is present and
/// the process holds CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN for BPF/PERFMON).
///
/// Returns [`ProbeError::Unsupported`] without BTF and [`ProbeError::NotPermitted`] without the
/// capabilities. Success does not guarantee [`crate::Probes::load`] succeeds (the kernel may
/// still refuse, e.g. in a container), but it is cheap enough for `--ebpf auto`.
pub fn preflight() -> Result<(), ProbeError> {
    check_btf()?;
    let missing = Capabilities::current()?.missing();
    if !missing.is_empty() {
        return Err(ProbeError::NotPermitted {
            reason: format!(
                "missing capabilities {}: run as root or grant them",
                missing.join(", ")
            ),
        });
    }
    Ok(())
}

pub(crate) fn check_btf() -> Result<(), ProbeError> {
    if Path::new(BTF_PATH).exists() {
        Ok(())
    } else {
        Err(ProbeError::Unsupported {
            reason: format!("no kernel BTF at {BTF_PATH} (needs CONFIG_DEBUG_INFO_BTF=y)"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        let caps = Capabilities::parse_status("Name:\tx\nCapEff:\t000001ffffffffff\n");
        assert_eq!(caps.map(Capabilities::missing), Some(vec![]));
    }

    #[test]
    fn nobody_misses_all() {
        let caps = Capabilities::parse_status("CapEff:\t0000000000000000\n").expect("parses");
        assert_eq!(caps.missing().len(), 3);
    }

    #[test]
    fn sys_admin_and_net_admin_suffice() {
        let caps = Capabilities((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN));
        assert!(caps.missing().is_empty());
    }
}
