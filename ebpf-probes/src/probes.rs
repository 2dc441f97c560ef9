//! [`Probes`]: loads the embedded eBPF object with aya, attaches its programs (XDP ingress on one
//! interface, optional TC egress, the `tp_btf` tracepoints), owns the links (dropping the
//! [`Probes`] detaches everything) and reads and writes the maps.
//!
//! Nothing is pinned or shared: every [`Probes`] has its own maps, so several may be loaded at
//! once on different interfaces (the tracepoints then fire into each instance's maps).

use std::{
    collections::HashMap as StdHashMap,
    fmt,
    hash::Hash,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use aya::{
    Btf, Ebpf, EbpfLoader, Pod,
    maps::{HashMap, MapData, MapError},
    programs::{
        BtfTracePoint, Program, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, NlOptions, TcAttachOptions},
    },
};
use nix::time::{ClockId, clock_gettime};
use serde::Serialize;

use crate::{
    ProbeError,
    error::errno_in,
    layout::{
        ADDR_STATS, AddrCounters, AddrKey, DROP_BYTES, DROP_LIST, DROP_PACKETS, DropValue,
        LAST_RX_NS, LAST_TX_NS, PROG_RETRANS, PROG_SEND, PROG_TC, PROG_XDP, RETRANS, RX_BYTES,
        RX_PACKETS, RetransKey, SEND_BYTES, TP_RETRANS, TP_SEND, TX_BYTES, TX_PACKETS, addr_key,
        key_addr, retrans_addr,
    },
    preflight::{check_btf, preflight},
};

/// Default bound of the per-address counter map (LRU: the least recently used entry is evicted).
pub const DEFAULT_ADDRESS_CAPACITY: u32 = 16384;
/// Default bound of the drop list (a plain hash: inserting into a full list is an error).
pub const DEFAULT_DROP_LIST_CAPACITY: u32 = 4096;
/// Default bound of the retransmit map (LRU).
pub const DEFAULT_RETRANSMIT_CAPACITY: u32 = 16384;
/// Default bound of the per-process send-bytes map (LRU).
pub const DEFAULT_SEND_CAPACITY: u32 = 4096;

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// Let the kernel choose: native (driver) when the driver supports XDP, generic otherwise.
    #[default]
    Auto,
    /// Generic XDP (`XDP_FLAGS_SKB_MODE`): works on every interface, runs after GRO.
    Skb,
    /// Native XDP (`XDP_FLAGS_DRV_MODE`): fails on drivers without XDP support.
    Native,
}

impl XdpAttachMode {
    fn aya(self) -> XdpMode {
        match self {
            Self::Auto => XdpMode::Default,
            Self::Skb => XdpMode::Skb,
            Self::Native => XdpMode::Driver,
        }
    }
}

impl FromStr for XdpAttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "skb" | "generic" => Ok(Self::Skb),
            "native" | "driver" | "drv" => Ok(Self::Native),
            other => Err(format!(
                "unknown XDP mode `{other}` (expected auto, skb or native)"
            )),
        }
    }
}

impl fmt::Display for XdpAttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Skb => "skb",
            Self::Native => "native",
        })
    }
}

/// What to load and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Interface that carries the XDP program (and the TC egress program), in the calling
    /// thread's network namespace.
    pub iface: String,
    /// XDP attach mode.
    pub xdp_mode: XdpAttachMode,
    /// Attach the TC egress classifier (tx counters per destination address).
    pub egress: bool,
    /// Attach `tp_btf/tcp_retransmit_skb` (retransmits per remote address and port).
    pub retransmits: bool,
    /// Attach `tp_btf/sock_send_length` (bytes sent per process).
    pub send_lengths: bool,
    /// Bound of the per-address counter map (LRU).
    pub address_capacity: u32,
    /// Bound of the drop list.
    pub drop_list_capacity: u32,
    /// Bound of the retransmit map (LRU).
    pub retransmit_capacity: u32,
    /// Bound of the per-process send-bytes map (LRU).
    pub send_capacity: u32,
}

impl ProbeConfig {
    /// Everything on, default bounds, XDP mode `auto`.
    pub fn new(iface: impl Into<String>) -> Self {
        Self {
            iface: iface.into(),
            xdp_mode: XdpAttachMode::Auto,
            egress: true,
            retransmits: true,
            send_lengths: true,
            address_capacity: DEFAULT_ADDRESS_CAPACITY,
            drop_list_capacity: DEFAULT_DROP_LIST_CAPACITY,
            retransmit_capacity: DEFAULT_RETRANSMIT_CAPACITY,
            send_capacity: DEFAULT_SEND_CAPACITY,
        }
    }

    fn validate(&self) -> Result<(), ProbeError> {
        let bad = |reason: String| Err(ProbeError::InvalidConfig { reason });
        if self.iface.is_empty() || self.iface.len() > 15 {
            return bad(format!(
                "interface name `{}` must be 1 to 15 bytes",
                self.iface
            ));
        }
        if self
            .iface
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return bad(format!("interface name {:?} is not valid", self.iface));
        }
        for (name, cap) in [
            ("address_capacity", self.address_capacity),
            ("drop_list_capacity", self.drop_list_capacity),
            ("retransmit_capacity", self.retransmit_capacity),
            ("send_capacity", self.send_capacity),
        ] {
            if cap == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Counters for one remote address. Bytes are L3 bytes (IPv4 `tot_len`, IPv6 `payload_len + 40`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AddressCounters {
    /// Packets from this address that XDP passed to the stack.
    pub rx_packets: u64,
    /// L3 bytes of those packets.
    pub rx_bytes: u64,
    /// Packets from this address that XDP dropped because the address is on the drop list.
    pub drops: u64,
    /// L3 bytes of those packets.
    pub drop_bytes: u64,
    /// Packets sent to this address (TC egress; a GSO packet counts as its segments).
    pub tx_packets: u64,
    /// L3 bytes sent to this address (as the segments go on the wire).
    pub tx_bytes: u64,
    /// Milliseconds since the last packet from this address (passed or dropped); `None`: never.
    pub last_rx_age_ms: Option<u64>,
    /// Milliseconds since the last packet to this address; `None`: never.
    pub last_tx_age_ms: Option<u64>,
}

impl AddressCounters {
    /// Milliseconds since the last packet from or to this address; `None`: never.
    pub fn last_seen_age_ms(&self) -> Option<u64> {
        match (self.last_rx_age_ms, self.last_tx_age_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn from_raw(raw: &AddrCounters, now_ns: u64) -> Self {
        let age = |t: u64| (t != 0).then(|| now_ns.saturating_sub(t) / 1_000_000);
        Self {
            rx_packets: raw[RX_PACKETS],
            rx_bytes: raw[RX_BYTES],
            drops: raw[DROP_PACKETS],
            drop_bytes: raw[DROP_BYTES],
            tx_packets: raw[TX_PACKETS],
            tx_bytes: raw[TX_BYTES],
            last_rx_age_ms: age(raw[LAST_RX_NS]),
            last_tx_age_ms: age(raw[LAST_TX_NS]),
        }
    }
}

/// Loaded and attached probes. Dropping it detaches every program and frees the maps.
pub struct Probes {
    // Declared first so it is dropped first: the programs own their links.
    ebpf: Ebpf,
    addr_stats: HashMap<MapData, AddrKey, AddrCounters>,
    drop_list: HashMap<MapData, AddrKey, DropValue>,
    retrans: HashMap<MapData, RetransKey, u64>,
    send_bytes: HashMap<MapData, u32, u64>,
    config: ProbeConfig,
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Probes {
    /// Loads the object, attaches XDP to `config.iface` (and the other programs the config asks
    /// for) and returns the handle. Runs [`preflight`] first.
    ///
    /// The interface is looked up in the calling thread's network namespace.
    pub fn load(config: &ProbeConfig) -> Result<Self, ProbeError> {
        config.validate()?;
        preflight()?;
        let mut ebpf = open(config)?;

        let xdp: &mut Xdp = program_mut(&mut ebpf, PROG_XDP)?;
        xdp.load()
            .map_err(|e| ProbeError::program_load(PROG_XDP, e))?;
        xdp.attach(&config.iface, config.xdp_mode.aya())
            .map_err(|e| {
                ProbeError::attach(
                    PROG_XDP,
                    &format!("{} (xdp mode {})", config.iface, config.xdp_mode),
                    e,
                )
            })?;

        if config.egress {
            attach_egress(&mut ebpf, &config.iface)?;
        }
        if config.retransmits || config.send_lengths {
            let btf = kernel_btf()?;
            if config.retransmits {
                attach_tracepoint(&mut ebpf, PROG_RETRANS, TP_RETRANS, &btf)?;
            }
            if config.send_lengths {
                attach_tracepoint(&mut ebpf, PROG_SEND, TP_SEND, &btf)?;
            }
        }

        Ok(Self {
            addr_stats: take_map(&mut ebpf, ADDR_STATS)?,
            drop_list: take_map(&mut ebpf, DROP_LIST)?,
            retrans: take_map(&mut ebpf, RETRANS)?,
            send_bytes: take_map(&mut ebpf, SEND_BYTES)?,
            ebpf,
            config: config.clone(),
        })
    }

    /// Checks that the probes can load here: with `iface`, loads and attaches everything to it
    /// and detaches again; without, creates the maps and has the kernel verify every program
    /// without attaching anything. Returns a one-line description on success.
    pub fn check(iface: Option<&str>) -> Result<String, ProbeError> {
        preflight()?;
        match iface {
            Some(iface) => {
                drop(Self::load(&ProbeConfig::new(iface))?);
                Ok(format!(
                    "eBPF probes load and attach on {iface} (object: {})",
                    crate::OBJECT_SOURCE
                ))
            }
            None => Self::verify_object(),
        }
    }

    /// Creates the maps and has the kernel verify every program, attaching nothing and skipping
    /// [`preflight`]: the kernel alone decides (an `EPERM` becomes [`ProbeError::NotPermitted`]).
    pub fn verify_object() -> Result<String, ProbeError> {
        let config = ProbeConfig::new("lo");
        let mut ebpf = open(&config)?;
        let xdp: &mut Xdp = program_mut(&mut ebpf, PROG_XDP)?;
        xdp.load()
            .map_err(|e| ProbeError::program_load(PROG_XDP, e))?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, PROG_TC)?;
        tc.load()
            .map_err(|e| ProbeError::program_load(PROG_TC, e))?;
        let btf = kernel_btf()?;
        for (prog, tp) in [(PROG_RETRANS, TP_RETRANS), (PROG_SEND, TP_SEND)] {
            let p: &mut BtfTracePoint = program_mut(&mut ebpf, prog)?;
            p.load(tp, &btf)
                .map_err(|e| ProbeError::program_load(prog, e))?;
        }
        Ok(format!(
            "eBPF probes load (maps created, all programs verified; object: {})",
            crate::OBJECT_SOURCE
        ))
    }

    /// The configuration these probes were loaded with.
    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// Counters for every address seen (rx, drop or tx), sorted by address.
    pub fn address_counters(&self) -> Result<Vec<(IpAddr, AddressCounters)>, ProbeError> {
        let now = monotonic_ns()?;
        let entries = collect(&self.addr_stats, self.config.address_capacity, ADDR_STATS)?;
        let mut out: Vec<_> = entries
            .iter()
            .map(|(k, v)| (key_addr(k), AddressCounters::from_raw(v, now)))
            .collect();
        out.sort_by_key(|(a, _)| *a);
        Ok(out)
    }

    /// Counters for one address; `None` if it has not been seen (or was evicted).
    pub fn counters_for(&self, addr: IpAddr) -> Result<Option<AddressCounters>, ProbeError> {
        let now = monotonic_ns()?;
        Ok(get(&self.addr_stats, &addr_key(addr), ADDR_STATS)?
            .map(|raw| AddressCounters::from_raw(&raw, now)))
    }

    /// TCP retransmits per remote (address, port), sorted; empty when not attached.
    pub fn retransmits(&self) -> Result<Vec<(SocketAddr, u64)>, ProbeError> {
        let entries = collect(&self.retrans, self.config.retransmit_capacity, RETRANS)?;
        let mut out: Vec<_> = entries.iter().map(|(k, v)| (retrans_addr(k), *v)).collect();
        out.sort();
        Ok(out)
    }

    /// Bytes the process `pid` (a tgid) has passed to `sock_sendmsg` successfully since the
    /// probes were loaded; `None` if none were seen (or `send_lengths` is off).
    pub fn process_send_bytes(&self, pid: u32) -> Result<Option<u64>, ProbeError> {
        get(&self.send_bytes, &pid, SEND_BYTES)
    }

    /// Puts `addr` on the drop list: XDP drops its packets from now on. Returns `false` if it
    /// was already listed. [`ProbeError::DropListFull`] when the list is at its bound.
    pub fn drop_insert(&mut self, addr: IpAddr) -> Result<bool, ProbeError> {
        let key = addr_key(addr);
        if get(&self.drop_list, &key, DROP_LIST)?.is_some() {
            return Ok(false);
        }
        const E2BIG: i32 = nix::errno::Errno::E2BIG as i32;
        match self.drop_list.insert(key, 1, 0) {
            Ok(()) => Ok(true),
            Err(e) if errno_in(&e) == Some(E2BIG) => Err(ProbeError::DropListFull {
                capacity: self.config.drop_list_capacity,
            }),
            Err(e) => Err(ProbeError::map(DROP_LIST, e)),
        }
    }

    /// Takes `addr` off the drop list. Returns `false` if it was not listed.
    pub fn drop_remove(&mut self, addr: IpAddr) -> Result<bool, ProbeError> {
        const ENOENT: i32 = nix::errno::Errno::ENOENT as i32;
        match self.drop_list.remove(&addr_key(addr)) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) if errno_in(&e) == Some(ENOENT) => Ok(false),
            Err(e) => Err(ProbeError::map(DROP_LIST, e)),
        }
    }

    /// The addresses on the drop list, sorted.
    pub fn drop_list(&self) -> Result<Vec<IpAddr>, ProbeError> {
        let entries = collect(&self.drop_list, self.config.drop_list_capacity, DROP_LIST)?;
        let mut out: Vec<_> = entries.keys().map(key_addr).collect();
        out.sort();
        Ok(out)
    }

    /// The drop list's bound.
    pub fn drop_list_capacity(&self) -> u32 {
        self.config.drop_list_capacity
    }

    /// Names of the programs loaded into the kernel (for diagnostics).
    pub fn loaded_programs(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .ebpf
            .programs()
            .filter(|(_, p)| p.fd().is_ok())
            .map(|(n, _)| n.to_string())
            .collect();
        names.sort();
        names
    }
}

fn open(config: &ProbeConfig) -> Result<Ebpf, ProbeError> {
    check_btf()?;
    EbpfLoader::new()
        .map_max_entries(ADDR_STATS, config.address_capacity)
        .map_max_entries(DROP_LIST, config.drop_list_capacity)
        .map_max_entries(RETRANS, config.retransmit_capacity)
        .map_max_entries(SEND_BYTES, config.send_capacity)
        .load(crate::object_bytes())
        .map_err(ProbeError::load)
}

fn kernel_btf() -> Result<Btf, ProbeError> {
    Btf::from_sys_fs().map_err(|e| ProbeError::Unsupported {
        reason: format!("cannot read kernel BTF: {e}"),
    })
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ProbeError>
where
    &'a mut T: TryFrom<&'a mut Program>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| ProbeError::ObjectMismatch {
            what: format!("no program `{name}`"),
        })?;
    program.try_into().map_err(|_| ProbeError::ObjectMismatch {
        what: format!("program `{name}` has an unexpected type"),
    })
}

fn attach_egress(ebpf: &mut Ebpf, iface: &str) -> Result<(), ProbeError> {
    let tc: &mut SchedClassifier = program_mut(ebpf, PROG_TC)?;
    tc.load()
        .map_err(|e| ProbeError::program_load(PROG_TC, e))?;
    // TCX on kernels >= 6.6 (aya picks it), clsact + netlink filter otherwise or if TCX fails.
    let first = match tc.attach(iface, TcAttachType::Egress) {
        Ok(_) => return Ok(()),
        Err(e) => ProbeError::attach(PROG_TC, &format!("{iface} egress"), e),
    };
    if matches!(
        first,
        ProbeError::NotPermitted { .. } | ProbeError::NoSuchInterface { .. }
    ) {
        return Err(first);
    }
    // Already present (EEXIST) is fine; any other failure shows up in the attach below.
    let _ = tc::qdisc_add_clsact(iface);
    tc.attach_with_options(
        iface,
        TcAttachType::Egress,
        TcAttachOptions::Netlink(NlOptions::default()),
    )
    .map(|_| ())
    .map_err(|e| ProbeError::attach(PROG_TC, &format!("{iface} egress (clsact)"), e))
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    prog: &'static str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<(), ProbeError> {
    let p: &mut BtfTracePoint = program_mut(ebpf, prog)?;
    p.load(tracepoint, btf)
        .map_err(|e| ProbeError::program_load(prog, e))?;
    p.attach()
        .map(|_| ())
        .map_err(|e| ProbeError::attach(prog, &format!("tp_btf/{tracepoint}"), e))
}

fn take_map<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, ProbeError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| ProbeError::ObjectMismatch {
            what: format!("no map `{name}`"),
        })?;
    HashMap::try_from(map).map_err(|e| ProbeError::map(name, e))
}

fn get<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<Option<V>, ProbeError> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(ProbeError::map(name, e)),
    }
}

/// Reads every entry. Entries evicted or deleted meanwhile are skipped; a concurrent deletion can
/// restart the kernel's key walk, so the walk is bounded and deduplicated.
fn collect<K: Pod + Eq + Hash, V: Pod>(
    map: &HashMap<MapData, K, V>,
    capacity: u32,
    name: &'static str,
) -> Result<StdHashMap<K, V>, ProbeError> {
    let limit = (capacity as usize).saturating_mul(2).saturating_add(16);
    let mut out = StdHashMap::new();
    for item in map.iter().take(limit) {
        let (k, v) = item.map_err(|e| ProbeError::map(name, e))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
fn monotonic_ns() -> Result<u64, ProbeError> {
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(|e| ProbeError::Io {
        what: "clock_gettime(CLOCK_MONOTONIC)".to_string(),
        source: std::io::Error::from(e),
    })?;
    let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
    Ok(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_can_move_between_threads() {
        fn is_send<T: Send>() {}
        is_send::<Probes>();
    }

    #[test]
    fn config_validation() {
        assert!(ProbeConfig::new("eth0").validate().is_ok());
        assert!(ProbeConfig::new("").validate().is_err());
        assert!(
            ProbeConfig::new("a-very-long-interface")
                .validate()
                .is_err()
        );
        assert!(ProbeConfig::new("a\0b").validate().is_err());
        let mut c = ProbeConfig::new("eth0");
        c.drop_list_capacity = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn ages_and_last_seen() {
        let mut raw = [0u64; 8];
        raw[RX_PACKETS] = 3;
        raw[LAST_RX_NS] = 1_000_000_000;
        let c = AddressCounters::from_raw(&raw, 3_500_000_000);
        assert_eq!(c.rx_packets, 3);
        assert_eq!(c.last_rx_age_ms, Some(2500));
        assert_eq!(c.last_tx_age_ms, None);
        assert_eq!(c.last_seen_age_ms(), Some(2500));
    }

    #[test]
    fn xdp_mode_parses() {
        assert_eq!("auto".parse(), Ok(XdpAttachMode::Auto));
        assert_eq!("skb".parse(), Ok(XdpAttachMode::Skb));
        assert_eq!("native".parse(), Ok(XdpAttachMode::Native));
        assert!("x".parse::<XdpAttachMode>().is_err());
    }
}
