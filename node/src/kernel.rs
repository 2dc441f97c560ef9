//! Kernel telemetry and the XDP drop list of the node, built on `loom-ebpf-probes`.
//!
//! [`start`] loads the eBPF probes on one interface (named, or the one that carries the listen
//! addresses, or the default route's: [`default_interface`]) according to [`EbpfMode`]:
//! `off` never loads them, `auto` runs without them (one `warn` line saying why) when the host
//! cannot load them, `on` makes that an error. The result is a [`KernelTelemetry`] handle, cheap to
//! clone and shared by the node's tasks; a disabled handle answers every call and reports why it
//! is disabled.
//!
//! The loaded [`Probes`] live on a dedicated thread (`loom-kernel`). Every poll interval (1 s)
//! it reads the per-address counters and the TCP retransmits, turns them into per-address rates,
//! attributes them to peers through the node's connection table ([`KernelTelemetry::set_peer_addresses`]),
//! feeds the per-peer rates and rejection counts into an
//! [`AnomalyDetector`](loom_protocols::anomaly::AnomalyDetector), exports metrics and publishes a
//! [`KernelStatus`] for [`KernelTelemetry::snapshot`]. Changes of the connection table, of the
//! drop list ([`KernelTelemetry::set_dropped_peers`]) and of the rejection counts are handed to
//! the thread through shared state (latest value wins) and a bounded wake-up channel, and applied
//! at once. Dropping the last handle, or [`KernelTelemetry::shutdown`], stops the thread, which
//! drops the probes and so detaches the programs.
//!
//! Attribution: kernel counters are per remote address. An address that belongs to several peers
//! (peers behind one NAT) is attributed in full to each of them and they are marked
//! `shared_address`. The addresses of dropped (banned) peers are attributed to them too, so their
//! `drops` show even after they left the connection table.
//!
//! Bounds: at most [`MAX_PEERS`] peers with [`MAX_ADDRS_PER_PEER`] addresses each are attributed,
//! per-peer metrics are exported for at most [`MAX_METRIC_PEERS`] peers (the ones in the current
//! table), the drop list holds at most the probes' capacity (a full list is logged once and the
//! rest stays pending), and the thread never removes an address from the kernel list that it did
//! not insert. Per-peer gauges of peers that left the table keep their last value in the
//! recorder: the Prometheus exporter's idle timeout is what drops them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt, fs,
    net::IpAddr,
    str::FromStr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

pub use loom_ebpf_probes::XdpAttachMode;
use loom_ebpf_probes::{AddressCounters, OBJECT_SOURCE, ProbeConfig, ProbeError, Probes};
use loom_protocols::anomaly::{AnomalyConfig, AnomalyDetector, AnomalyEvent, PeerSample};
use serde::{Deserialize, Serialize};

/// How often the thread reads the kernel counters.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most peers attributed (connection table and dropped peers, each).
pub const MAX_PEERS: usize = 4096;
/// Most addresses attributed to one peer.
pub const MAX_ADDRS_PER_PEER: usize = 16;
/// Most peers with per-peer metrics.
pub const MAX_METRIC_PEERS: usize = 256;
/// Most auto-ban candidates kept until [`KernelTelemetry::take_auto_ban_candidates`].
pub const MAX_AUTO_BAN_CANDIDATES: usize = 1024;

/// Whether to load the eBPF probes: `auto` (if the host allows), `on` (required) or `off`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EbpfMode {
    /// Load them when the host allows; otherwise run without kernel telemetry (one warning).
    #[default]
    Auto,
    /// Load them or fail.
    On,
    /// Never load them.
    Off,
}

impl FromStr for EbpfMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown eBPF mode `{other}` (expected auto, on or off)"
            )),
        }
    }
}

impl fmt::Display for EbpfMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// Why the probes could not be started.
#[derive(Debug)]
pub enum KernelError {
    /// No interface was named and none could be picked.
    NoInterface,
    /// The probes failed to load or attach on `iface`.
    Probe {
        /// The interface.
        iface: String,
        /// What the probes crate reported.
        source: ProbeError,
    },
    /// The telemetry thread could not be started.
    Thread(std::io::Error),
}

impl KernelError {
    /// The reason alone, without the leading "eBPF probes not loaded".
    pub fn reason(&self) -> String {
        match self {
            Self::NoInterface => "no network interface to attach to (none named, none carries \
                                  the listen addresses, and there is no default route)"
                .to_string(),
            Self::Probe {
                source: source @ ProbeError::NoSuchInterface { .. },
                ..
            } => source.to_string(),
            Self::Probe { iface, source } => format!("{source} (interface {iface})"),
            Self::Thread(e) => format!("cannot start the kernel telemetry thread: {e}"),
        }
    }

    /// True when the host cannot run the probes (no privileges, no BTF, missing hook), as opposed
    /// to a configuration problem or a bug.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Probe { source, .. } if source.is_unavailable())
    }
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "eBPF probes not loaded: {}", self.reason())
    }
}

impl std::error::Error for KernelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::NoInterface => None,
            Self::Probe { source, .. } => Some(source),
            Self::Thread(e) => Some(e),
        }
    }
}

/// Tuning of [`start_with`]; [`start`] uses the defaults.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// How often the counters are read.
    pub poll_interval: Duration,
    /// How XDP is attached.
    pub xdp_mode: XdpAttachMode,
    /// Bound of the kernel drop list.
    pub drop_list_capacity: u32,
    /// Anomaly detection over the per-peer rates.
    pub anomaly: AnomalyConfig,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            poll_interval: POLL_INTERVAL,
            xdp_mode: XdpAttachMode::Auto,
            drop_list_capacity: loom_ebpf_probes::DEFAULT_DROP_LIST_CAPACITY,
            anomaly: AnomalyConfig::default(),
        }
    }
}

/// Kernel counters of one peer (the sum over its addresses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerKernelStats {
    /// The peer (libp2p `PeerId` string).
    pub peer_id: String,
    /// Its remote addresses.
    pub addrs: Vec<String>,
    /// L3 bytes received from it (passed by XDP).
    pub rx_bytes: u64,
    /// Packets received from it (passed by XDP).
    pub rx_packets: u64,
    /// L3 bytes sent to it.
    pub tx_bytes: u64,
    /// Packets sent to it.
    pub tx_packets: u64,
    /// Packets from it dropped by the drop list.
    pub drops: u64,
    /// L3 bytes of those packets.
    pub drop_bytes: u64,
    /// TCP retransmits towards its addresses (all ports).
    pub retransmits: u64,
    /// Received bytes per second over the last poll interval.
    pub rx_bytes_per_s: f64,
    /// Retransmits per second over the last poll interval.
    pub retransmits_per_s: f64,
    /// One of its addresses also belongs to another peer (NAT): the counters are the address's.
    pub shared_address: bool,
    /// Its addresses are on the drop list (it is banned).
    pub dropped: bool,
    /// Milliseconds since a packet from or to it was last seen; `None`: never.
    pub last_seen_age_ms: Option<u64>,
}

/// Counters of addresses that belong to no known peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AddressTotals {
    /// L3 bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// L3 bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Number of such addresses.
    pub addresses: u64,
}

/// An anomaly flag raised on a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerFlag {
    /// The peer.
    pub peer_id: String,
    /// `traffic_outlier`, `retransmit_outlier` or `repeated_rejections`.
    pub kind: String,
    /// The measurement, in words.
    pub detail: String,
}

/// What the kernel telemetry knows, for the status API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KernelStatus {
    /// The probes are loaded and polled.
    pub enabled: bool,
    /// Why they are not (`off`, or the load error).
    pub reason: Option<String>,
    /// The interface carrying XDP.
    pub iface: Option<String>,
    /// How XDP was attached: `auto` (the kernel chose), `skb` (generic) or `native`.
    pub xdp_mode: Option<String>,
    /// Where the eBPF object came from (`clang` or `committed`).
    pub object_source: String,
    /// The programs loaded.
    pub programs: Vec<String>,
    /// Per-peer counters, by peer id.
    pub peers: Vec<PeerKernelStats>,
    /// Counters of addresses of no known peer.
    pub unattributed: AddressTotals,
    /// The kernel drop list.
    pub drop_list: Vec<String>,
    /// Bound of the drop list.
    pub drop_list_capacity: u32,
    /// Addresses of dropped peers not (yet) on the kernel list (it is full, or inserting failed).
    pub drop_pending: u64,
    /// Bytes this process passed to `sock_sendmsg` since the probes were loaded.
    pub process_send_bytes: Option<u64>,
    /// Anomaly flags currently raised.
    pub flags: Vec<PeerFlag>,
    /// The latest error of the telemetry thread (reading maps, changing the drop list).
    pub last_error: Option<String>,
    /// Polls done so far.
    pub polls: u64,
}

/// The interface that carries the first specific (not unspecified) listen address, else the
/// interface of the IPv4 default route, else of the IPv6 default route, else `None`.
pub fn default_interface(listen_ips: &[IpAddr]) -> Option<String> {
    let wanted: Vec<IpAddr> = listen_ips
        .iter()
        .map(IpAddr::to_canonical)
        .filter(|ip| !ip.is_unspecified())
        .collect();
    if !wanted.is_empty()
        && let Ok(addrs) = nix::ifaddrs::getifaddrs()
    {
        let local: Vec<(IpAddr, String)> = addrs
            .filter_map(|ifa| {
                let a = ifa.address?;
                let ip = a
                    .as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))?;
                Some((ip.to_canonical(), ifa.interface_name))
            })
            .collect();
        for ip in &wanted {
            if let Some((_, name)) = local.iter().find(|(a, _)| a == ip) {
                return Some(name.clone());
            }
        }
    }
    let v4 = fs::read_to_string("/proc/net/route").ok();
    let v6 = fs::read_to_string("/proc/net/ipv6_route").ok();
    v4.as_deref()
        .and_then(ipv4_default_route)
        .or_else(|| v6.as_deref().and_then(ipv6_default_route))
}

const RTF_UP: u32 = 0x1;
const RTF_REJECT: u32 = 0x200;

/// The interface of the lowest-metric IPv4 default route in `/proc/net/route` text.
fn ipv4_default_route(text: &str) -> Option<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let dest = u32::from_str_radix(f[1], 16).ok()?;
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            let metric: u32 = f[6].parse().ok()?;
            let mask = u32::from_str_radix(f[7], 16).ok()?;
            (dest == 0 && mask == 0 && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| (metric, f[0].to_string()))
        })
        .min()
        .map(|(_, iface)| iface)
}

/// The interface of the lowest-metric IPv6 default route in `/proc/net/ipv6_route` text.
fn ipv6_default_route(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let dest_zero = f[0].len() == 32 && f[0].bytes().all(|b| b == b'0');
            let plen = u8::from_str_radix(f[1], 16).ok()?;
            let metric = u32::from_str_radix(f[5], 16).ok()?;
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            let iface = f[9];
            (dest_zero
                && plen == 0
                && flags & RTF_UP != 0
                && flags & RTF_REJECT == 0
                && iface != "lo")
                .then(|| (metric, iface.to_string()))
        })
        .min()
        .map(|(_, iface)| iface)
}

/// Starts kernel telemetry with the default [`KernelOptions`]; see [`start_with`].
pub fn start(
    mode: EbpfMode,
    iface: Option<String>,
    listen_ips: &[IpAddr],
) -> Result<KernelTelemetry, KernelError> {
    start_with(mode, iface, listen_ips, KernelOptions::default())
}

/// Starts kernel telemetry: `off` returns a disabled handle (reason `off`); otherwise loads the
/// probes on `iface` (or [`default_interface`]) in the calling thread's network namespace and
/// starts the telemetry thread. On failure, `auto` logs one warning and returns a disabled handle
/// carrying the reason; `on` returns the error.
pub fn start_with(
    mode: EbpfMode,
    iface: Option<String>,
    listen_ips: &[IpAddr],
    options: KernelOptions,
) -> Result<KernelTelemetry, KernelError> {
    if mode == EbpfMode::Off {
        return Ok(KernelTelemetry::disabled_on("off", iface));
    }
    let chosen = iface.or_else(|| default_interface(listen_ips));
    let result = match &chosen {
        None => Err(KernelError::NoInterface),
        Some(name) => load_and_spawn(name, &options),
    };
    match result {
        Ok(t) => Ok(t),
        Err(e) if mode == EbpfMode::Auto => {
            let reason = e.reason();
            tracing::warn!("eBPF probes not loaded: {reason}; running without kernel telemetry");
            Ok(KernelTelemetry::disabled_on(reason, chosen))
        }
        Err(e) => Err(e),
    }
}

fn load_and_spawn(iface: &str, options: &KernelOptions) -> Result<KernelTelemetry, KernelError> {
    let mut config = ProbeConfig::new(iface);
    config.xdp_mode = options.xdp_mode;
    config.drop_list_capacity = options.drop_list_capacity.max(1);
    let loaded = match Probes::load(&config) {
        // Some drivers (virtio_net with too few queues, for one) refuse native XDP instead of
        // letting the kernel fall back: try generic (skb) XDP before giving up.
        Err(first @ ProbeError::Attach { .. }) if config.xdp_mode == XdpAttachMode::Auto => {
            config.xdp_mode = XdpAttachMode::Skb;
            let retry = Probes::load(&config);
            match &retry {
                Ok(_) => tracing::info!(
                    iface,
                    "native XDP refused ({first}); using generic (skb) XDP"
                ),
                Err(e) => tracing::debug!(iface, "generic (skb) XDP failed too: {e}"),
            }
            retry
        }
        other => other,
    };
    let probes = loaded.map_err(|source| KernelError::Probe {
        iface: iface.to_string(),
        source,
    })?;
    let status = KernelStatus {
        enabled: true,
        reason: None,
        iface: Some(iface.to_string()),
        xdp_mode: Some(config.xdp_mode.to_string()),
        object_source: OBJECT_SOURCE.to_string(),
        programs: probes.loaded_programs(),
        drop_list_capacity: probes.drop_list_capacity(),
        ..KernelStatus::default()
    };
    let shared = Arc::new(Mutex::new(Shared {
        status,
        ..Shared::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let (wake_tx, wake_rx) = mpsc::sync_channel(1);
    let mut worker = Worker::new(probes, Arc::clone(&shared), options);
    let thread_stop = Arc::clone(&stop);
    let handle = thread::Builder::new()
        .name("loom-kernel".to_string())
        .spawn(move || worker.run(&wake_rx, &thread_stop))
        .map_err(KernelError::Thread)?;
    metrics::gauge!("loom_kernel_probe_enabled").set(1.0);
    tracing::info!(
        iface,
        object = OBJECT_SOURCE,
        "eBPF probes loaded: kernel telemetry and drop list active"
    );
    Ok(KernelTelemetry {
        inner: Arc::new(Inner {
            shared,
            wake: Some(wake_tx),
            stop,
            worker: Mutex::new(Some(handle)),
        }),
    })
}

/// Handle on the kernel telemetry: `Clone + Send + Sync`; the last handle dropped stops the
/// telemetry thread and detaches the probes.
#[derive(Clone)]
pub struct KernelTelemetry {
    inner: Arc<Inner>,
}

impl fmt::Debug for KernelTelemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = lock(&self.inner.shared);
        f.debug_struct("KernelTelemetry")
            .field("enabled", &s.status.enabled)
            .field("iface", &s.status.iface)
            .field("reason", &s.status.reason)
            .finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<Mutex<Shared>>,
    wake: Option<SyncSender<()>>,
    stop: Arc<AtomicBool>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn poke(&self) {
        if let Some(tx) = &self.wake {
            // Full: a wake-up is already pending. Disconnected: the thread is gone.
            match tx.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
            }
        }
    }

    fn stop(&self) {
        let handle = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = handle else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        self.poke();
        if handle.join().is_err() {
            tracing::error!("the kernel telemetry thread panicked");
        }
        let mut s = lock(&self.shared);
        s.status.enabled = false;
        s.status.reason = Some("shut down".to_string());
        metrics::gauge!("loom_kernel_probe_enabled").set(0.0);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// State shared between the handles and the thread.
#[derive(Default)]
struct Shared {
    status: KernelStatus,
    pending_peers: Option<Vec<(String, Vec<IpAddr>)>>,
    pending_dropped: Option<Vec<(String, Vec<IpAddr>)>>,
    pending_rejections: Option<Vec<(String, u64)>>,
    candidates: Vec<String>,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KernelTelemetry {
    /// A handle without probes that reports `reason` as why.
    pub fn disabled(reason: impl Into<String>) -> Self {
        Self::disabled_on(reason, None)
    }

    fn disabled_on(reason: impl Into<String>, iface: Option<String>) -> Self {
        metrics::gauge!("loom_kernel_probe_enabled").set(0.0);
        let status = KernelStatus {
            enabled: false,
            reason: Some(reason.into()),
            iface,
            object_source: OBJECT_SOURCE.to_string(),
            ..KernelStatus::default()
        };
        Self {
            inner: Arc::new(Inner {
                shared: Arc::new(Mutex::new(Shared {
                    status,
                    ..Shared::default()
                })),
                wake: None,
                stop: Arc::new(AtomicBool::new(true)),
                worker: Mutex::new(None),
            }),
        }
    }

    /// Whether the probes are loaded and polled.
    pub fn is_enabled(&self) -> bool {
        lock(&self.inner.shared).status.enabled
    }

    /// The current status (as of the latest poll or change).
    pub fn snapshot(&self) -> KernelStatus {
        lock(&self.inner.shared).status.clone()
    }

    /// Replaces the node's connection table: which remote addresses belong to which peer.
    /// At most [`MAX_PEERS`] peers and [`MAX_ADDRS_PER_PEER`] addresses each are kept.
    pub fn set_peer_addresses(&self, table: Vec<(String, Vec<IpAddr>)>) {
        if self.inner.wake.is_none() {
            return;
        }
        lock(&self.inner.shared).pending_peers = Some(table);
        self.inner.poke();
    }

    /// Replaces the desired drop list: every current address of every banned peer. The thread
    /// inserts what is missing from the kernel list and removes what it inserted and is no longer
    /// wanted; failures show in [`KernelStatus::last_error`] and [`KernelStatus::drop_pending`].
    pub fn set_dropped_peers(&self, peers: Vec<(String, Vec<IpAddr>)>) {
        if self.inner.wake.is_none() {
            return;
        }
        lock(&self.inner.shared).pending_dropped = Some(peers);
        self.inner.poke();
    }

    /// Replaces the cumulative counts of rejected contributions per peer (fed into anomaly
    /// detection at the next poll).
    pub fn set_rejections(&self, counts: Vec<(String, u64)>) {
        if self.inner.wake.is_none() {
            return;
        }
        lock(&self.inner.shared).pending_rejections = Some(counts);
        self.inner.poke();
    }

    /// Peers flagged by anomaly detection since the previous call (each once), for `--auto-ban`.
    pub fn take_auto_ban_candidates(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.inner.shared).candidates)
    }

    /// Stops the telemetry thread and detaches the probes (also done when the last handle is
    /// dropped). The status then reads disabled, reason `shut down`.
    pub fn shutdown(&self) {
        self.inner.stop();
    }
}

/// One entry of the attribution table.
#[derive(Debug, Clone, Default)]
struct PeerEntry {
    addrs: Vec<IpAddr>,
    connected: bool,
    dropped: bool,
}

/// The thread that owns the probes.
struct Worker {
    probes: Probes,
    shared: Arc<Mutex<Shared>>,
    interval: Duration,
    detector: AnomalyDetector<String>,
    started: Instant,
    last_poll: Instant,
    polls: u64,
    connected: Vec<(String, Vec<IpAddr>)>,
    dropped: Vec<(String, Vec<IpAddr>)>,
    rejections: BTreeMap<String, u64>,
    peers: BTreeMap<String, PeerEntry>,
    by_addr: HashMap<IpAddr, Vec<String>>,
    /// Addresses this thread put on the kernel drop list.
    inserted: BTreeSet<IpAddr>,
    drop_pending: u64,
    drop_full_logged: bool,
    counters: HashMap<IpAddr, AddressCounters>,
    retrans: HashMap<IpAddr, u64>,
    rates: HashMap<IpAddr, (f64, f64)>,
    process_send_bytes: Option<u64>,
    last_error: Option<String>,
    metric_peers: BTreeSet<String>,
}

impl Worker {
    fn new(probes: Probes, shared: Arc<Mutex<Shared>>, options: &KernelOptions) -> Self {
        let now = Instant::now();
        Self {
            probes,
            shared,
            interval: options.poll_interval.max(Duration::from_millis(10)),
            detector: AnomalyDetector::new(options.anomaly.clone()),
            started: now,
            last_poll: now,
            polls: 0,
            connected: Vec::new(),
            dropped: Vec::new(),
            rejections: BTreeMap::new(),
            peers: BTreeMap::new(),
            by_addr: HashMap::new(),
            inserted: BTreeSet::new(),
            drop_pending: 0,
            drop_full_logged: false,
            counters: HashMap::new(),
            retrans: HashMap::new(),
            rates: HashMap::new(),
            process_send_bytes: None,
            last_error: None,
            metric_peers: BTreeSet::new(),
        }
    }

    fn run(&mut self, wake: &mpsc::Receiver<()>, stop: &AtomicBool) {
        let mut next_poll = Instant::now() + self.interval;
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let timeout = next_poll.saturating_duration_since(Instant::now());
            match wake.recv_timeout(timeout) {
                Ok(()) => {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if self.take_pending() {
                        self.apply_drops();
                    }
                    self.publish();
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.take_pending();
                    self.apply_drops();
                    self.poll();
                    self.publish();
                    let now = Instant::now();
                    next_poll += self.interval;
                    if next_poll <= now {
                        next_poll = now + self.interval;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for peer in std::mem::take(&mut self.metric_peers) {
            for kind in loom_protocols::anomaly::AnomalyKind::ALL {
                metrics::gauge!("loom_peer_flagged", "peer" => peer.clone(), "kind" => kind.as_str())
                    .set(0.0);
            }
        }
        tracing::info!("kernel telemetry stopped; eBPF probes detached");
        // Dropping `self.probes` (with the worker) detaches the programs.
    }

    /// Moves pending inputs in; true when the drop list wish changed.
    fn take_pending(&mut self) -> bool {
        let (peers, dropped, rejections) = {
            let mut s = lock(&self.shared);
            (
                s.pending_peers.take(),
                s.pending_dropped.take(),
                s.pending_rejections.take(),
            )
        };
        let drops_changed = dropped.is_some();
        let table_changed = peers.is_some() || drops_changed;
        if let Some(p) = peers {
            self.connected = bound_table(p);
        }
        if let Some(d) = dropped {
            self.dropped = bound_table(d);
        }
        if let Some(r) = rejections {
            self.rejections = r.into_iter().take(MAX_PEERS).collect();
        }
        if table_changed {
            self.rebuild_attribution();
        }
        drops_changed
    }

    fn rebuild_attribution(&mut self) {
        let mut peers: BTreeMap<String, PeerEntry> = BTreeMap::new();
        for (list, is_dropped) in [(&self.connected, false), (&self.dropped, true)] {
            for (peer, addrs) in list {
                let e = peers.entry(peer.clone()).or_default();
                if is_dropped {
                    e.dropped = true;
                } else {
                    e.connected = true;
                }
                for a in addrs {
                    if !e.addrs.contains(a) && e.addrs.len() < MAX_ADDRS_PER_PEER {
                        e.addrs.push(*a);
                    }
                }
            }
        }
        let mut by_addr: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for (peer, e) in &mut peers {
            e.addrs.sort();
            for a in &e.addrs {
                by_addr.entry(*a).or_default().push(peer.clone());
            }
        }
        self.peers = peers;
        self.by_addr = by_addr;
    }

    fn record_error(&mut self, what: &str, e: &ProbeError) {
        let msg = format!("{what}: {e}");
        if self.last_error.as_deref() != Some(msg.as_str()) {
            tracing::warn!("kernel telemetry: {msg}");
        }
        self.last_error = Some(msg);
    }

    fn apply_drops(&mut self) {
        let desired: BTreeSet<IpAddr> = self
            .dropped
            .iter()
            .flat_map(|(_, addrs)| addrs.iter().copied())
            .collect();
        let stale: Vec<IpAddr> = self.inserted.difference(&desired).copied().collect();
        for a in stale {
            match self.probes.drop_remove(a) {
                Ok(_) => {
                    self.inserted.remove(&a);
                    tracing::info!(addr = %a, "address removed from the XDP drop list");
                }
                Err(e) => self.record_error(&format!("removing {a} from the drop list"), &e),
            }
        }
        let missing: Vec<IpAddr> = desired.difference(&self.inserted).copied().collect();
        let mut pending = 0u64;
        let mut full = false;
        for a in missing {
            if full {
                pending += 1;
                continue;
            }
            match self.probes.drop_insert(a) {
                Ok(true) => {
                    self.inserted.insert(a);
                    tracing::info!(addr = %a, "address added to the XDP drop list");
                }
                // Already listed, not by this thread: leave it alone (and never remove it).
                Ok(false) => {}
                Err(ProbeError::DropListFull { capacity }) => {
                    full = true;
                    pending += 1;
                    if !self.drop_full_logged {
                        tracing::warn!(
                            capacity,
                            "the XDP drop list is full; further banned addresses are not dropped \
                             in the kernel"
                        );
                        self.drop_full_logged = true;
                    }
                }
                Err(e) => {
                    pending += 1;
                    self.record_error(&format!("adding {a} to the drop list"), &e);
                }
            }
        }
        if !full {
            self.drop_full_logged = false;
        }
        self.drop_pending = pending;
    }

    fn poll(&mut self) {
        let now = Instant::now();
        let dt = now
            .saturating_duration_since(self.last_poll)
            .as_secs_f64()
            .max(0.001);
        self.last_poll = now;
        self.polls += 1;

        match self.probes.address_counters() {
            Ok(list) => {
                let mut counters = HashMap::with_capacity(list.len());
                let mut rates = HashMap::with_capacity(list.len());
                for (addr, c) in list {
                    let addr = addr.to_canonical();
                    let rx_delta = match self.counters.get(&addr) {
                        Some(prev) if prev.rx_bytes <= c.rx_bytes => c.rx_bytes - prev.rx_bytes,
                        // New, or evicted and re-created since the last poll.
                        _ => c.rx_bytes,
                    };
                    rates.insert(addr, (rx_delta as f64 / dt, 0.0));
                    counters.insert(addr, c);
                }
                self.counters = counters;
                self.rates = rates;
            }
            Err(e) => self.record_error("reading address counters", &e),
        }
        match self.probes.retransmits() {
            Ok(list) => {
                let mut retrans: HashMap<IpAddr, u64> = HashMap::new();
                for (sa, n) in list {
                    let v = retrans.entry(sa.ip().to_canonical()).or_default();
                    *v = v.saturating_add(n);
                }
                for (addr, &n) in &retrans {
                    // A decrease is an evicted port entry, not new retransmits.
                    let prev = self.retrans.get(addr).copied().unwrap_or(0);
                    let rate = n.saturating_sub(prev) as f64 / dt;
                    self.rates.entry(*addr).or_insert((0.0, 0.0)).1 = rate;
                }
                self.retrans = retrans;
            }
            Err(e) => self.record_error("reading retransmits", &e),
        }
        match self.probes.process_send_bytes(std::process::id()) {
            Ok(v) => self.process_send_bytes = v,
            Err(e) => self.record_error("reading process send bytes", &e),
        }

        // Anomaly detection over the connected peers.
        let samples: Vec<PeerSample<String>> = self
            .peers
            .iter()
            .filter(|(_, e)| e.connected)
            .map(|(peer, e)| {
                let (rx, rt) = e.addrs.iter().fold((0.0, 0.0), |acc, a| {
                    let r = self.rates.get(a).copied().unwrap_or((0.0, 0.0));
                    (acc.0 + r.0, acc.1 + r.1)
                });
                PeerSample {
                    peer: peer.clone(),
                    rx_bytes_per_s: rx,
                    retransmits_per_s: rt,
                    rejections: self.rejections.get(peer).copied().unwrap_or(0),
                }
            })
            .collect();
        let now_ms = u64::try_from(now.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        let events = self.detector.observe(now_ms, &samples);
        let mut newly_flagged = Vec::new();
        for ev in events {
            match ev {
                AnomalyEvent::Flagged { peer, flag } => {
                    tracing::warn!(
                        peer = %peer,
                        kind = flag.kind().as_str(),
                        "peer flagged by anomaly detection: {}",
                        flag.detail()
                    );
                    metrics::gauge!("loom_peer_flagged", "peer" => peer.clone(), "kind" => flag.kind().as_str())
                        .set(1.0);
                    newly_flagged.push(peer);
                }
                AnomalyEvent::Cleared { peer, kind } => {
                    tracing::info!(peer = %peer, kind = kind.as_str(), "anomaly flag cleared");
                    metrics::gauge!("loom_peer_flagged", "peer" => peer, "kind" => kind.as_str())
                        .set(0.0);
                }
            }
        }
        if !newly_flagged.is_empty() {
            let mut s = lock(&self.shared);
            for peer in newly_flagged {
                if !s.candidates.contains(&peer) && s.candidates.len() < MAX_AUTO_BAN_CANDIDATES {
                    s.candidates.push(peer);
                }
            }
        }
    }

    /// Builds the status from the latest counters and the current tables, and exports metrics.
    fn publish(&mut self) {
        let drop_list = match self.probes.drop_list() {
            Ok(list) => list.iter().map(IpAddr::to_string).collect(),
            Err(e) => {
                self.record_error("reading the drop list", &e);
                lock(&self.shared).status.drop_list.clone()
            }
        };
        let mut peers = Vec::with_capacity(self.peers.len());
        for (peer, e) in &self.peers {
            let mut st = PeerKernelStats {
                peer_id: peer.clone(),
                addrs: e.addrs.iter().map(IpAddr::to_string).collect(),
                dropped: e.dropped,
                ..PeerKernelStats::default()
            };
            for a in &e.addrs {
                if self.by_addr.get(a).is_some_and(|p| p.len() > 1) {
                    st.shared_address = true;
                }
                if let Some(c) = self.counters.get(a) {
                    st.rx_bytes = st.rx_bytes.saturating_add(c.rx_bytes);
                    st.rx_packets = st.rx_packets.saturating_add(c.rx_packets);
                    st.tx_bytes = st.tx_bytes.saturating_add(c.tx_bytes);
                    st.tx_packets = st.tx_packets.saturating_add(c.tx_packets);
                    st.drops = st.drops.saturating_add(c.drops);
                    st.drop_bytes = st.drop_bytes.saturating_add(c.drop_bytes);
                    st.last_seen_age_ms = match (st.last_seen_age_ms, c.last_seen_age_ms()) {
                        (Some(x), Some(y)) => Some(x.min(y)),
                        (x, y) => x.or(y),
                    };
                }
                if let Some(&n) = self.retrans.get(a) {
                    st.retransmits = st.retransmits.saturating_add(n);
                }
                if let Some(&(rx, rt)) = self.rates.get(a) {
                    st.rx_bytes_per_s += rx;
                    st.retransmits_per_s += rt;
                }
            }
            peers.push(st);
        }
        let mut unattributed = AddressTotals::default();
        for (addr, c) in &self.counters {
            if !self.by_addr.contains_key(addr) {
                unattributed.rx_bytes = unattributed.rx_bytes.saturating_add(c.rx_bytes);
                unattributed.rx_packets = unattributed.rx_packets.saturating_add(c.rx_packets);
                unattributed.tx_bytes = unattributed.tx_bytes.saturating_add(c.tx_bytes);
                unattributed.tx_packets = unattributed.tx_packets.saturating_add(c.tx_packets);
                unattributed.addresses += 1;
            }
        }
        let flags: Vec<PeerFlag> = self
            .detector
            .flags()
            .into_iter()
            .map(|(peer_id, f)| PeerFlag {
                peer_id,
                kind: f.kind().as_str().to_string(),
                detail: f.detail(),
            })
            .collect();

        self.export_metrics(&peers, &unattributed, drop_list.len());

        let mut s = lock(&self.shared);
        let st = &mut s.status;
        st.peers = peers;
        st.unattributed = unattributed;
        st.drop_list = drop_list;
        st.drop_pending = self.drop_pending;
        st.process_send_bytes = self.process_send_bytes;
        st.flags = flags;
        st.last_error = self.last_error.clone();
        st.polls = self.polls;
    }

    fn export_metrics(
        &mut self,
        peers: &[PeerKernelStats],
        unattributed: &AddressTotals,
        drop_list_len: usize,
    ) {
        let mut exported = BTreeSet::new();
        for p in peers.iter().take(MAX_METRIC_PEERS) {
            let peer = p.peer_id.clone();
            for (name, v) in [
                ("loom_kernel_rx_bytes", p.rx_bytes as f64),
                ("loom_kernel_rx_packets", p.rx_packets as f64),
                ("loom_kernel_tx_bytes", p.tx_bytes as f64),
                ("loom_kernel_tx_packets", p.tx_packets as f64),
                ("loom_kernel_drops", p.drops as f64),
                ("loom_kernel_drop_bytes", p.drop_bytes as f64),
                ("loom_kernel_retransmits", p.retransmits as f64),
                ("loom_kernel_rx_bytes_per_second", p.rx_bytes_per_s),
                ("loom_kernel_retransmits_per_second", p.retransmits_per_s),
            ] {
                metrics::gauge!(name, "peer" => peer.clone()).set(v);
            }
            exported.insert(peer);
        }
        // Peers that left the table: zero their flags (the exporter's idle timeout drops the
        // rest of their series).
        for gone in self.metric_peers.difference(&exported) {
            for kind in loom_protocols::anomaly::AnomalyKind::ALL {
                metrics::gauge!("loom_peer_flagged", "peer" => gone.clone(), "kind" => kind.as_str())
                    .set(0.0);
            }
        }
        self.metric_peers = exported;
        metrics::gauge!("loom_kernel_unattributed_rx_bytes").set(unattributed.rx_bytes as f64);
        metrics::gauge!("loom_kernel_unattributed_tx_bytes").set(unattributed.tx_bytes as f64);
        metrics::gauge!("loom_kernel_unattributed_addresses").set(unattributed.addresses as f64);
        metrics::gauge!("loom_kernel_drop_list_size").set(drop_list_len as f64);
        metrics::gauge!("loom_kernel_drop_pending").set(self.drop_pending as f64);
        if let Some(b) = self.process_send_bytes {
            metrics::gauge!("loom_kernel_process_send_bytes").set(b as f64);
        }
    }
}

/// Canonical addresses (IPv4-mapped IPv6 as IPv4), no unspecified/multicast ones, at most
/// [`MAX_ADDRS_PER_PEER`] per peer and [`MAX_PEERS`] peers (a repeated peer's lists are merged).
fn bound_table(table: Vec<(String, Vec<IpAddr>)>) -> Vec<(String, Vec<IpAddr>)> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for (peer, addrs) in table {
        if peer.is_empty() || (!out.contains_key(&peer) && out.len() >= MAX_PEERS) {
            continue;
        }
        let list = out.entry(peer).or_default();
        for a in addrs {
            let a = a.to_canonical();
            if a.is_unspecified() || a.is_multicast() || list.contains(&a) {
                continue;
            }
            if list.len() < MAX_ADDRS_PER_PEER {
                list.push(a);
            }
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn the_handle_is_shareable() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<KernelTelemetry>();
    }

    #[test]
    fn ebpf_mode_parses_and_prints() {
        for (s, m) in [
            ("auto", EbpfMode::Auto),
            ("on", EbpfMode::On),
            ("off", EbpfMode::Off),
        ] {
            assert_eq!(s.parse::<EbpfMode>(), Ok(m));
            assert_eq!(m.to_string(), s);
        }
        assert_eq!("ON".parse::<EbpfMode>(), Ok(EbpfMode::On));
        assert!("yes".parse::<EbpfMode>().is_err());
        assert_eq!(EbpfMode::default(), EbpfMode::Auto);
    }

    #[test]
    fn default_routes_are_parsed() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth1\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
                  eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(ipv4_default_route(v4).as_deref(), Some("eth0"));
        assert_eq!(ipv4_default_route("Iface\tDestination\n"), None);
        assert_eq!(ipv4_default_route("garbage\nx y z\n"), None);

        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                  fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00450003     wlan0\n";
        assert_eq!(ipv6_default_route(v6).as_deref(), Some("wlan0"));
        assert_eq!(ipv6_default_route(""), None);
    }

    #[test]
    fn loopback_listen_address_picks_lo() {
        let lo = default_interface(&[IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(lo.as_deref(), Some("lo"));
        // Mapped form is the same address.
        let mapped = default_interface(&[IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())]);
        assert_eq!(mapped.as_deref(), Some("lo"));
    }

    #[test]
    fn unspecified_listen_addresses_fall_back_to_the_default_route() {
        let want = fs::read_to_string("/proc/net/route")
            .ok()
            .as_deref()
            .and_then(ipv4_default_route)
            .or_else(|| {
                fs::read_to_string("/proc/net/ipv6_route")
                    .ok()
                    .as_deref()
                    .and_then(ipv6_default_route)
            });
        assert_eq!(
            default_interface(&[IpAddr::V4(Ipv4Addr::UNSPECIFIED)]),
            want
        );
        assert_eq!(default_interface(&[]), want);
    }

    #[test]
    fn tables_are_bounded_and_canonical() {
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        let many: Vec<IpAddr> = (0..40u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
            .collect();
        let t = bound_table(vec![
            (
                "a".into(),
                vec![
                    mapped,
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                ],
            ),
            ("b".into(), many),
            (String::new(), vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]),
        ]);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].1, vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]);
        assert_eq!(t[1].1.len(), MAX_ADDRS_PER_PEER);
        let big: Vec<(String, Vec<IpAddr>)> = (0..MAX_PEERS + 10)
            .map(|i| (format!("p{i}"), vec![]))
            .collect();
        assert_eq!(bound_table(big).len(), MAX_PEERS);
    }

    #[test]
    fn off_gives_a_disabled_handle_that_answers_everything() {
        let t = start(EbpfMode::Off, None, &[]).expect("off never fails");
        assert!(!t.is_enabled());
        let s = t.snapshot();
        assert_eq!(s.reason.as_deref(), Some("off"));
        assert_eq!(s.object_source, OBJECT_SOURCE);
        t.set_peer_addresses(vec![("p".into(), vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])]);
        t.set_dropped_peers(vec![("p".into(), vec![IpAddr::V4(Ipv4Addr::LOCALHOST)])]);
        t.set_rejections(vec![("p".into(), 9)]);
        assert!(t.take_auto_ban_candidates().is_empty());
        assert!(t.snapshot().peers.is_empty());
        let t2 = t.clone();
        t.shutdown();
        drop(t);
        assert!(!t2.is_enabled());
    }

    #[test]
    fn status_round_trips_through_json() {
        let s = KernelStatus {
            enabled: true,
            iface: Some("eth0".into()),
            peers: vec![PeerKernelStats {
                peer_id: "12D3Koo".into(),
                rx_bytes: 5,
                rx_bytes_per_s: 1.5,
                ..PeerKernelStats::default()
            }],
            flags: vec![PeerFlag {
                peer_id: "12D3Koo".into(),
                kind: "traffic_outlier".into(),
                detail: "z=9".into(),
            }],
            ..KernelStatus::default()
        };
        let json = serde_json::to_string(&s).expect("serialize");
        let back: KernelStatus = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, s);
        // Older/newer peers may omit fields.
        let partial: KernelStatus = serde_json::from_str(r#"{"enabled":false}"#).expect("partial");
        assert!(!partial.enabled);
    }

    #[test]
    fn errors_say_why() {
        let e = KernelError::NoInterface;
        assert!(
            e.to_string()
                .starts_with("eBPF probes not loaded: no network interface")
        );
        assert!(!e.is_unavailable());
        let e = KernelError::Probe {
            iface: "eth0".into(),
            source: ProbeError::NotPermitted {
                reason: "need CAP_BPF".into(),
            },
        };
        assert!(e.is_unavailable());
        assert_eq!(
            e.to_string(),
            "eBPF probes not loaded: not permitted: need CAP_BPF (interface eth0)"
        );
    }
}
