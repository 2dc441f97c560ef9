//! Byte layouts of the eBPF maps' keys and values, mirrored from `bpf/loom_probes.bpf.c`, and
//! the conversions between them and Rust types.
//!
//! Keys and values are plain byte/`u64` arrays, for which aya already implements `Pod`, so this
//! crate needs no `unsafe impl Pod`. aya checks the key and value sizes against the object's map
//! definitions when a map is opened, which catches a C/Rust layout drift in size.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Map names in the object.
pub(crate) const ADDR_STATS: &str = "LOOM_ADDR_STATS";
pub(crate) const DROP_LIST: &str = "LOOM_DROP_LIST";
pub(crate) const RETRANS: &str = "LOOM_RETRANS";
pub(crate) const SEND_BYTES: &str = "LOOM_SEND_BYTES";

/// Program (function) names in the object.
pub(crate) const PROG_XDP: &str = "loom_xdp_ingress";
pub(crate) const PROG_TC: &str = "loom_tc_egress";
pub(crate) const PROG_RETRANS: &str = "loom_tcp_retransmit";
pub(crate) const PROG_SEND: &str = "loom_sock_send_length";
pub(crate) const TP_RETRANS: &str = "tcp_retransmit_skb";
pub(crate) const TP_SEND: &str = "sock_send_length";

/// `struct addr_key`: 16 address bytes, IPv4 mapped as `::ffff:a.b.c.d`.
pub(crate) type AddrKey = [u8; 16];

/// `struct addr_counters`: eight `u64`s, indexed by the constants below.
pub(crate) type AddrCounters = [u64; 8];
pub(crate) const RX_PACKETS: usize = 0;
pub(crate) const RX_BYTES: usize = 1;
pub(crate) const DROP_PACKETS: usize = 2;
pub(crate) const DROP_BYTES: usize = 3;
pub(crate) const TX_PACKETS: usize = 4;
pub(crate) const TX_BYTES: usize = 5;
pub(crate) const LAST_RX_NS: usize = 6;
pub(crate) const LAST_TX_NS: usize = 7;

/// `struct retrans_key`: 16 address bytes, `u16` port in host byte order, 2 bytes padding.
pub(crate) type RetransKey = [u8; 20];

/// Drop-list value: an opaque cookie (the kernel side only tests presence).
pub(crate) type DropValue = u64;

/// The map key for an address (IPv4 as `::ffff:a.b.c.d`).
pub(crate) fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address for a map key (`::ffff:a.b.c.d` becomes IPv4).
pub(crate) fn key_addr(key: &AddrKey) -> IpAddr {
    Ipv6Addr::from(*key).to_canonical()
}

/// The socket address for a retransmit key.
pub(crate) fn retrans_addr(key: &RetransKey) -> SocketAddr {
    let mut addr = [0u8; 16];
    addr.copy_from_slice(&key[..16]);
    let port = u16::from_ne_bytes([key[16], key[17]]);
    SocketAddr::new(key_addr(&addr), port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_is_mapped_and_back() {
        let a = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let k = addr_key(a);
        assert_eq!(&k[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k[12..], &[10, 1, 2, 3]);
        assert_eq!(key_addr(&k), a);
    }

    #[test]
    fn ipv6_round_trips() {
        let a: IpAddr = "fd00:1::2".parse().expect("literal");
        assert_eq!(key_addr(&addr_key(a)), a);
    }

    #[test]
    fn retrans_key_decodes_port_in_host_order() {
        let mut k = [0u8; 20];
        k[..16].copy_from_slice(&addr_key(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))));
        k[16..18].copy_from_slice(&8080u16.to_ne_bytes());
        assert_eq!(
            retrans_addr(&k),
            "192.0.2.7:8080".parse::<SocketAddr>().expect("literal")
        );
    }
}
