//! Loom eBPF probes: kernel-side per-address network telemetry and an XDP drop list.
//!
//! This crate owns the eBPF object built from `bpf/loom_probes.bpf.c` (compiled by clang in
//! `build.rs`, or the committed fallback object) and the aya 0.14 loader around it:
//!
//! - an XDP program counting, per remote (source) address, rx packets/bytes, drops and the last
//!   time a packet was seen, and dropping packets from addresses on the drop list;
//! - an optional TC egress classifier counting tx packets/bytes per destination address;
//! - `tp_btf/tcp_retransmit_skb`: TCP retransmits per remote (address, port);
//! - `tp_btf/sock_send_length`: bytes handed to `sock_sendmsg` per process (tgid).
//!
//! Bytes are L3 bytes: the IPv4 `tot_len`, or the IPv6 `payload_len + 40`. See `README.md`.
//!
//! Entry points: [`preflight`] (cheap: BTF present, capabilities held), [`Probes::load`] (load and
//! attach; everything detaches when the [`Probes`] is dropped) and [`Probes::check`].

mod error;
mod layout;
mod preflight;
mod probes;

pub use error::ProbeError;
pub use preflight::{BTF_PATH, Capabilities, preflight};
pub use probes::{
    AddressCounters, DEFAULT_ADDRESS_CAPACITY, DEFAULT_DROP_LIST_CAPACITY,
    DEFAULT_RETRANSMIT_CAPACITY, DEFAULT_SEND_CAPACITY, ProbeConfig, Probes, XdpAttachMode,
};

/// Where the embedded eBPF object came from: `"clang"` (compiled by `build.rs`) or
/// `"committed"` (the fallback `bpf/loom_probes.bpf.o`).
pub const OBJECT_SOURCE: &str = env!("LOOM_EBPF_OBJECT_SOURCE");

/// The embedded eBPF object (ELF, 8-byte aligned as aya requires).
pub fn object_bytes() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/loom_probes.bpf.o"))
}
