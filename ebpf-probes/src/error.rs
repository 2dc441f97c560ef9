//! The crate's error type, [`ProbeError`], and the mapping of aya errors onto it (an `EPERM`
//! anywhere in an aya error chain becomes [`ProbeError::NotPermitted`]).

use std::error::Error as StdError;

use aya::{EbpfError, maps::MapError, programs::ProgramError};

/// Everything that can go wrong loading, attaching or reading the probes.
///
/// [`ProbeError::NotPermitted`] and [`ProbeError::Unsupported`] describe the environment (no
/// privileges, no BTF, a kernel without the hook): a caller in `--ebpf auto` mode runs without
/// probes on those ([`ProbeError::is_unavailable`]); the other variants are real failures.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Not root, or missing CAP_BPF / CAP_NET_ADMIN / CAP_PERFMON (the kernel said `EPERM`).
    #[error("not permitted: {reason}")]
    NotPermitted {
        /// One line saying what was refused and which privilege is missing.
        reason: String,
    },
    /// The kernel cannot run the probes: no BTF at `/sys/kernel/btf/vmlinux`, or a missing hook.
    #[error("unsupported: {reason}")]
    Unsupported {
        /// One line saying what is missing.
        reason: String,
    },
    /// The configured interface does not exist (in this network namespace).
    #[error("no such network interface `{iface}`")]
    NoSuchInterface {
        /// The interface name from the configuration.
        iface: String,
    },
    /// The configuration cannot be used.
    #[error("invalid probe configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// The embedded object lacks a program or map this crate expects (a build mismatch).
    #[error("the eBPF object does not match this crate: {what}")]
    ObjectMismatch {
        /// What is missing or has the wrong type.
        what: String,
    },
    /// Parsing the object, relocating it or creating its maps failed.
    #[error("loading the eBPF object failed: {source}")]
    Load {
        /// The aya error.
        #[source]
        source: Box<EbpfError>,
    },
    /// The kernel refused a program (the verifier log is in the source).
    #[error("loading eBPF program `{program}` failed: {source}")]
    ProgramLoad {
        /// Program (function) name in the object.
        program: &'static str,
        /// The aya error.
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching a loaded program failed.
    #[error("attaching eBPF program `{program}` to {target} failed: {source}")]
    Attach {
        /// Program (function) name in the object.
        program: &'static str,
        /// Interface or hook it was attached to.
        target: String,
        /// The aya error.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map operation failed.
    #[error("eBPF map `{map}`: {source}")]
    Map {
        /// Map name in the object.
        map: &'static str,
        /// The aya error.
        #[source]
        source: Box<MapError>,
    },
    /// The drop list holds its maximum number of addresses.
    #[error("the drop list is full ({capacity} addresses)")]
    DropListFull {
        /// The configured capacity.
        capacity: u32,
    },
    /// Reading a system file (capabilities, clock) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ProbeError {
    /// True when the environment cannot run probes (no privileges, no BTF, missing hook), as
    /// opposed to a bug or a bad configuration: `--ebpf auto` runs without probes on these.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::NotPermitted { .. } | Self::Unsupported { .. })
    }

    pub(crate) fn load(source: EbpfError) -> Self {
        if let Some(reason) = eperm_reason(&source, "creating eBPF maps") {
            return Self::NotPermitted { reason };
        }
        Self::Load {
            source: Box::new(source),
        }
    }

    pub(crate) fn program_load(program: &'static str, source: ProgramError) -> Self {
        if let Some(reason) = eperm_reason(&source, &format!("loading eBPF program `{program}`")) {
            return Self::NotPermitted { reason };
        }
        if let ProgramError::Btf(e) = &source {
            return Self::Unsupported {
                reason: format!("eBPF program `{program}`: kernel BTF lacks its hook ({e})"),
            };
        }
        Self::ProgramLoad {
            program,
            source: Box::new(source),
        }
    }

    pub(crate) fn attach(program: &'static str, target: &str, source: ProgramError) -> Self {
        if let ProgramError::UnknownInterface { name } = &source {
            return Self::NoSuchInterface {
                iface: name.clone(),
            };
        }
        if let Some(reason) = eperm_reason(&source, &format!("attaching `{program}` to {target}")) {
            return Self::NotPermitted { reason };
        }
        Self::Attach {
            program,
            target: target.to_string(),
            source: Box::new(source),
        }
    }

    pub(crate) fn map(map: &'static str, source: MapError) -> Self {
        if let Some(reason) = eperm_reason(&source, &format!("accessing eBPF map `{map}`")) {
            return Self::NotPermitted { reason };
        }
        Self::Map {
            map,
            source: Box::new(source),
        }
    }
}

/// The first OS error number in an error's source chain.
pub(crate) fn errno_in(err: &(dyn StdError + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(code) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        cur = e.source();
    }
    None
}

/// If an `EPERM` is anywhere in the chain, the one-line reason for [`ProbeError::NotPermitted`].
fn eperm_reason(err: &(dyn StdError + 'static), doing: &str) -> Option<String> {
    const EPERM: i32 = nix::errno::Errno::EPERM as i32;
    (errno_in(err) == Some(EPERM)).then(|| {
        format!(
            "{doing} was refused with EPERM (operation not permitted): run as root or grant \
             CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        )
    })
}
