//! TCP retransmits are counted per remote (address, port) when the link drops packets: an
//! nftables rule in the receiver's namespace drops a third of the TCP packets arriving there.
//!
//! The drop is on the receiving side on purpose: a packet dropped by netfilter on the sender's
//! own output path fails `tcp_transmit_skb` with an error, and TCP simply sends it again later
//! as a first transmission, not a retransmission.

mod common;

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
};

use common::{Pair, in_netns, nft_in, wait_for};
use loom_ebpf_probes::{ProbeConfig, Probes};

#[test]
fn retransmits_counted_on_lossy_link_ipv4() {
    retransmits("retransmits_counted_on_lossy_link_ipv4", 31, false);
}

#[test]
fn retransmits_counted_on_lossy_link_ipv6() {
    retransmits("retransmits_counted_on_lossy_link_ipv6", 32, true);
}

fn retransmits(test: &str, tag: u8, v6: bool) {
    let Some(pair) = Pair::new(test, tag) else {
        return;
    };
    let (rx_addr, tx_addr): (IpAddr, IpAddr) = if v6 {
        (pair.rx_v6.into(), pair.tx_v6.into())
    } else {
        (pair.rx_v4.into(), pair.tx_v4.into())
    };
    let mut config = ProbeConfig::new(&pair.rx_if);
    config.egress = false;
    let probes = in_netns(&pair.rx.name, || Probes::load(&config)).expect("load probes");

    let listener = in_netns(&pair.rx.name, || TcpListener::bind((rx_addr, 0))).expect("listen");
    let server: SocketAddr = listener.local_addr().expect("addr");
    let client = in_netns(&pair.tx.name, || {
        let s = socket2_free_connect(tx_addr, server);
        s.expect("connect")
    });
    let (mut accepted, _) = listener.accept().expect("accept");

    // From now on the receiving side loses a third of the TCP packets that reach it.
    let ns = &pair.rx.name;
    nft_in(ns, "add table inet loomt");
    nft_in(
        ns,
        "add chain inet loomt in { type filter hook input priority 0 ; policy accept ; }",
    );
    nft_in(
        ns,
        "add rule inet loomt in meta l4proto tcp numgen random mod 3 == 0 drop",
    );

    let mut writer = client.try_clone().expect("clone");
    let stopper = client.try_clone().expect("clone");
    let reader_stop = accepted.try_clone().expect("clone");
    std::thread::scope(|s| {
        let w = s.spawn(move || {
            let chunk = vec![0x5a; 64 * 1024];
            let mut sent = 0usize;
            // At most 64 MiB; normally stopped by the shutdown below long before.
            while sent < 64 << 20 {
                match writer.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            sent
        });
        let r = s.spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0usize;
            while let Ok(n) = accepted.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
            }
            got
        });

        let seen = wait_for(|| {
            let all = probes.retransmits().expect("read retransmits");
            all.iter()
                .find(|(remote, n)| *remote == server && *n > 0)
                .map(|(_, n)| *n)
        });
        let _ = stopper.shutdown(Shutdown::Both);
        let _ = reader_stop.shutdown(Shutdown::Both);
        let sent = w.join().expect("writer");
        let got = r.join().expect("reader");
        let n = seen.unwrap_or_else(|| {
            panic!(
                "{test}: no retransmits counted for {server} (sent {sent}, received {got}): {:?}",
                probes.retransmits()
            )
        });
        println!("{test}: {n} retransmits to {server}; {sent} bytes sent, {got} received");
        assert!(n > 0);
    });
}

/// `TcpStream::connect` from a bound local address is not in std; connect and check the
/// kernel picked the expected source address (the only one on that side of the link).
fn socket2_free_connect(local: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(to)?;
    assert_eq!(s.local_addr()?.ip(), local);
    Ok(s)
}
