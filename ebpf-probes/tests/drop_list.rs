//! The XDP drop list: a listed source is dropped (and counted) while another passes; removing it
//! lets its traffic through again; the list is bounded.

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use common::{Netns, Pair, in_netns, privileged, recv_until, wait_for};
use loom_ebpf_probes::{ProbeConfig, ProbeError, Probes};

const K: u64 = 20;
const PAYLOAD: usize = 100;

/// Receives until `want` datagrams from `from` arrived (or the deadline passed); returns the
/// count per source of everything received meanwhile.
fn receive_until(sock: &UdpSocket, from: SocketAddr, want: u64) -> HashMap<SocketAddr, u64> {
    let mut counts: HashMap<SocketAddr, u64> = HashMap::new();
    recv_until(sock, |_, src| {
        *counts.entry(src).or_default() += 1;
        counts.get(&from).copied().unwrap_or(0) >= want
    });
    counts
}

#[test]
fn listed_address_is_dropped_others_pass() {
    let test = "listed_address_is_dropped_others_pass";
    let Some(pair) = Pair::new(test, 21) else {
        return;
    };
    let listed_v4 = pair.add_tx_v4(3);
    let (pass, listed): (IpAddr, IpAddr) = (pair.tx_v4.into(), listed_v4.into());

    let mut probes = in_netns(&pair.rx.name, || {
        Probes::load(&ProbeConfig::new(&pair.rx_if))
    })
    .expect("load probes");
    let rx = in_netns(&pair.rx.name, || UdpSocket::bind((pair.rx_v4, 0))).expect("bind rx");
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let rx_to = rx.local_addr().expect("rx addr");
    let (tx_pass, tx_listed) = in_netns(&pair.tx.name, || {
        (
            UdpSocket::bind((pass, 0)).expect("bind pass"),
            UdpSocket::bind((listed, 0)).expect("bind listed"),
        )
    });
    let pass_from = tx_pass.local_addr().expect("addr");
    let listed_from = tx_listed.local_addr().expect("addr");

    assert!(probes.drop_insert(listed).expect("insert"));
    assert!(!probes.drop_insert(listed).expect("insert again"));
    assert_eq!(probes.drop_list().expect("list"), vec![listed]);

    for _ in 0..K {
        tx_pass.send_to(&[1; PAYLOAD], rx_to).expect("send pass");
        tx_listed
            .send_to(&[2; PAYLOAD], rx_to)
            .expect("send listed");
    }
    // Every listed datagram went through XDP and was dropped ...
    let dropped = wait_for(|| {
        probes
            .counters_for(listed)
            .expect("counters")
            .filter(|c| c.drops >= K)
    })
    .unwrap_or_else(|| panic!("{test}: drops for {listed} did not reach {K}"));
    assert_eq!(dropped.drops, K);
    assert_eq!(dropped.drop_bytes, K * (PAYLOAD as u64 + 28));
    assert_eq!(dropped.rx_packets, 0);
    // ... and the other address's arrived.
    let counts = receive_until(&rx, pass_from, K);
    assert_eq!(
        counts.get(&pass_from).copied(),
        Some(K),
        "{test}: {counts:?}"
    );
    assert_eq!(
        counts.get(&listed_from),
        None,
        "{test}: listed datagrams arrived"
    );
    let passed = probes.counters_for(pass).expect("counters").expect("seen");
    assert_eq!((passed.rx_packets, passed.drops), (K, 0));

    // Off the list: its traffic arrives again.
    assert!(probes.drop_remove(listed).expect("remove"));
    assert!(!probes.drop_remove(listed).expect("remove again"));
    assert!(probes.drop_list().expect("list").is_empty());
    for _ in 0..K {
        tx_listed
            .send_to(&[3; PAYLOAD], rx_to)
            .expect("send listed");
    }
    let counts = receive_until(&rx, listed_from, K);
    assert_eq!(
        counts.get(&listed_from).copied(),
        Some(K),
        "{test}: {counts:?}"
    );
    let c = probes
        .counters_for(listed)
        .expect("counters")
        .expect("seen");
    assert_eq!((c.rx_packets, c.drops), (K, K));
}

#[test]
fn drop_list_is_bounded_and_interface_checked() {
    let test = "drop_list_is_bounded_and_interface_checked";
    if privileged(test).is_none() {
        return;
    }
    let ns = match Netns::create(format!("loomt-{}-22", std::process::id())) {
        Ok(ns) => ns,
        Err(e) => {
            println!("skipping {test}: needs root for network namespaces ({e})");
            return;
        }
    };
    let mut config = ProbeConfig::new("lo");
    config.drop_list_capacity = 3;
    let mut probes = in_netns(&ns.name, || Probes::load(&config)).expect("load on lo");
    assert_eq!(probes.drop_list_capacity(), 3);

    let addrs: Vec<IpAddr> = vec![
        Ipv4Addr::new(192, 0, 2, 1).into(),
        "2001:db8::1".parse().expect("literal"),
        Ipv4Addr::new(192, 0, 2, 2).into(),
        Ipv4Addr::new(192, 0, 2, 3).into(),
    ];
    for a in &addrs[..3] {
        assert!(probes.drop_insert(*a).expect("insert"));
    }
    match probes.drop_insert(addrs[3]) {
        Err(ProbeError::DropListFull { capacity: 3 }) => {}
        other => panic!("{test}: expected DropListFull, got {other:?}"),
    }
    // Re-inserting a listed address is not an insertion.
    assert!(!probes.drop_insert(addrs[1]).expect("re-insert"));
    let mut want = addrs[..3].to_vec();
    want.sort();
    assert_eq!(probes.drop_list().expect("list"), want);
    assert!(probes.drop_remove(addrs[0]).expect("remove"));
    assert!(probes.drop_insert(addrs[3]).expect("insert after remove"));

    // An interface that does not exist in this namespace.
    let missing = in_netns(&ns.name, || Probes::load(&ProbeConfig::new("nosuch0")));
    assert!(
        matches!(missing, Err(ProbeError::NoSuchInterface { ref iface }) if iface == "nosuch0"),
        "{test}: {missing:?}"
    );
}
