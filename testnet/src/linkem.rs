//! A link emulator: a learning Ethernet switch in user space that delays and rate-limits every
//! frame it forwards, for kernels built without `netem`.
//!
//! It runs inside the lab's WAN namespace in place of a kernel bridge, with one raw
//! (`AF_PACKET`) socket per port. A frame received on one port goes to the port its destination
//! MAC was last seen on (every other port for broadcast, multicast and unknown destinations), and
//! leaves that port `delay` after it arrived, no earlier than the port's serialisation of the
//! frames before it at `rate` allows. Each port's queue holds at most [`QUEUE_FRAMES`] frames;
//! beyond that frames are dropped, as a router's queue would.
//!
//! The lab turns segmentation and checksum offloads off on every veth, so frames are real
//! Ethernet frames of at most the MTU.

#![allow(unsafe_code)] // AF_PACKET sockets through libc; each call is commented.

use std::{
    collections::{HashMap, VecDeque},
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

/// Frames queued per egress port before tail drop.
pub const QUEUE_FRAMES: usize = 4096;
/// Departures closer than this are not slept for (timer granularity).
const SLEEP_GRANULARITY: Duration = Duration::from_micros(50);
/// Largest frame handled (standard MTU plus headers, with room for VLAN tags).
const MAX_FRAME: usize = 2048;

/// One switch port.
#[derive(Debug, Clone)]
pub struct PortSpec {
    /// Interface name.
    pub iface: String,
    /// One-way delay added to frames leaving through this port.
    pub delay: Duration,
    /// Egress rate in bits per second (0: unlimited).
    pub rate_bps: u64,
}

impl PortSpec {
    /// Parses `IFACE[:DELAY_MS[:RATE_MBIT]]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split(':');
        let iface = parts.next().unwrap_or_default().to_owned();
        if iface.is_empty() || iface.len() > 15 {
            return Err(format!("bad interface name in {text:?}"));
        }
        let number = |what: &str, v: Option<&str>| -> Result<f64, String> {
            v.map(|v| {
                v.parse::<f64>()
                    .map_err(|e| format!("bad {what} in {text:?}: {e}"))
            })
            .unwrap_or(Ok(0.0))
        };
        let delay_ms = number("delay", parts.next())?;
        let rate_mbit = number("rate", parts.next())?;
        if !(0.0..=60_000.0).contains(&delay_ms) || !(0.0..=100_000.0).contains(&rate_mbit) {
            return Err(format!("out of range in {text:?}"));
        }
        Ok(Self {
            iface,
            delay: Duration::from_secs_f64(delay_ms / 1e3),
            rate_bps: (rate_mbit * 1e6) as u64,
        })
    }
}

/// A raw socket bound to one interface.
struct RawPort {
    fd: OwnedFd,
    ifindex: i32,
}

fn last_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl RawPort {
    fn open(iface: &str) -> io::Result<Self> {
        let name = CString::new(iface).map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            return Err(last_error(&format!("no interface {iface}")));
        }
        let protocol = (libc::ETH_P_ALL as u16).to_be() as i32;
        // SAFETY: plain socket(2) call; the result is checked and owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
        if raw < 0 {
            return Err(last_error("socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Do not hand our own transmissions back to us.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_error("PACKET_IGNORE_OUTGOING"));
        }
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol as u16;
        addr.sll_ifindex = ifindex;
        // SAFETY: bind with a pointer to a live sockaddr_ll and its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_error(&format!("bind to {iface}")));
        }
        Ok(Self { fd, ifindex })
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv into a live, writable buffer of the given length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(last_error("recv"));
        }
        Ok(n as usize)
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: sendto from a live buffer with a pointer to a live sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(last_error("sendto"));
        }
        Ok(())
    }
}

/// Frames waiting to leave one port, with the time each may leave.
struct Egress {
    queue: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    ready: Condvar,
    spec: PortSpec,
}

/// Counters of a running switch.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames forwarded.
    pub forwarded: std::sync::atomic::AtomicU64,
    /// Frames dropped at a full queue.
    pub dropped: std::sync::atomic::AtomicU64,
}

/// Runs the switch until an I/O error stops one of its ports (it normally runs until killed).
pub fn run(specs: Vec<PortSpec>) -> io::Result<()> {
    if specs.len() < 2 {
        return Err(io::Error::other("a switch needs at least two ports"));
    }
    let ports: Vec<Arc<RawPort>> = specs
        .iter()
        .map(|s| RawPort::open(&s.iface).map(Arc::new))
        .collect::<io::Result<_>>()?;
    let egress: Vec<Arc<Egress>> = specs
        .iter()
        .map(|spec| {
            Arc::new(Egress {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                spec: spec.clone(),
            })
        })
        .collect();
    let macs: Arc<Mutex<HashMap<[u8; 6], usize>>> = Arc::default();
    let counters = Arc::new(Counters::default());
    let mut threads = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let (port, egress) = (port.clone(), egress[index].clone());
        let counters = counters.clone();
        threads.push(thread::spawn(move || sender(&port, &egress, &counters)));
    }
    for (index, port) in ports.iter().enumerate() {
        let (port, egress, macs) = (port.clone(), egress.clone(), macs.clone());
        let counters = counters.clone();
        threads.push(thread::spawn(move || {
            receiver(index, &port, &egress, &macs, &counters)
        }));
    }
    for t in threads {
        match t.join() {
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("a switch thread panicked")),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

fn receiver(
    index: usize,
    port: &RawPort,
    egress: &[Arc<Egress>],
    macs: &Mutex<HashMap<[u8; 6], usize>>,
    counters: &Counters,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let n = port.recv(&mut buf)?;
        if n < 14 {
            continue;
        }
        let arrived = Instant::now();
        let frame = &buf[..n];
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        src.copy_from_slice(&frame[6..12]);
        let out: Option<usize> = {
            let mut table = macs.lock().unwrap_or_else(|e| e.into_inner());
            if src[0] & 1 == 0 && table.len() < 4096 {
                table.insert(src, index);
            }
            if dst[0] & 1 == 0 {
                table.get(&dst).copied()
            } else {
                None
            }
        };
        let targets: Vec<usize> = match out {
            Some(o) if o != index => vec![o],
            Some(_) => Vec::new(),
            None => (0..egress.len()).filter(|&o| o != index).collect(),
        };
        for o in targets {
            let e = &egress[o];
            let mut queue = e.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() >= QUEUE_FRAMES {
                counters
                    .dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            queue.push_back((arrived + e.spec.delay, frame.to_vec()));
            e.ready.notify_one();
        }
    }
}

fn sender(port: &RawPort, egress: &Egress, counters: &Counters) -> io::Result<()> {
    let mut next_free = Instant::now();
    loop {
        let (due, frame) = {
            let mut queue = egress.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(front) = queue.pop_front() {
                    break front;
                }
                queue = egress.ready.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
        };
        // The schedule advances from each frame's planned departure, not from when the sleep
        // actually ended: timer overshoot is caught up by the next frames instead of adding up
        // (which would cap the throughput well below the rate).
        let leave = due.max(next_free);
        let now = Instant::now();
        if leave > now + SLEEP_GRANULARITY {
            thread::sleep(leave - now);
        }
        if egress.spec.rate_bps > 0 {
            let wire_bits = (frame.len() as u64 + 24) * 8; // preamble, FCS, gap
            next_free =
                leave + Duration::from_secs_f64(wire_bits as f64 / egress.spec.rate_bps as f64);
        }
        match port.send(&frame) {
            Ok(()) => {
                counters
                    .forwarded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // A frame the interface refuses (e.g. too large) is dropped, like on a real link.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse_and_bad_ones_are_refused() {
        let p = PortSpec::parse("p1:12.5:100").expect("parses");
        assert_eq!(p.iface, "p1");
        assert_eq!(p.delay, Duration::from_micros(12_500));
        assert_eq!(p.rate_bps, 100_000_000);
        let bare = PortSpec::parse("eth0").expect("parses");
        assert_eq!((bare.delay, bare.rate_bps), (Duration::ZERO, 0));
        assert!(PortSpec::parse("p1:x").is_err());
        assert!(PortSpec::parse(":5").is_err());
        assert!(PortSpec::parse("p1:-3").is_err());
        assert!(PortSpec::parse("averyveryverylongname").is_err());
    }
}
