// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
//
// Loom eBPF probes: one object, loaded by the `loom-ebpf-probes` crate (aya 0.14).
//
//   xdp                        loom_xdp_ingress       rx counters per source address, drop list
//   classifier                 loom_tc_egress         tx counters per destination (TCX egress)
//   tp_btf/tcp_retransmit_skb  loom_tcp_retransmit    retransmits per remote (address, port)
//   tp_btf/sock_send_length    loom_sock_send_length  bytes passed to sock_sendmsg per tgid
//
// Byte definition everywhere: the L3 (IP) packet length, i.e. the IPv4 `tot_len`
// or the IPv6 `payload_len + 40`. Link-layer headers, FCS and padding are not
// counted. A UDP datagram with P payload bytes over IPv4 without options is
// P + 8 + 20 bytes, over IPv6 without extension headers P + 8 + 40 bytes.
//
// Address keys are 16 bytes: IPv6 addresses as they are, IPv4 addresses mapped
// as ::ffff:a.b.c.d (RFC 4291 section 2.5.5.2).
//
// The layouts of the map keys and values are mirrored in src/maps.rs; keep the
// two in sync (the Rust side checks the sizes when it opens the maps).
//
// Built by build.rs, and by bpf/build-object.sh for the committed fallback (from bpf/):
//   clang -O2 -g -target bpf -Wall -Werror -fdebug-prefix-map=$PWD=. -D__TARGET_ARCH_x86 \
//         -I/usr/include/x86_64-linux-gnu -c loom_probes.bpf.c -o loom_probes.bpf.o

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/types.h>
#include <linux/udp.h>

#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define ADDR_MAP_ENTRIES 16384
#define DROP_MAP_ENTRIES 4096
#define RETRANS_MAP_ENTRIES 16384
#define SEND_MAP_ENTRIES 4096

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8

/* 16-byte address key: IPv6, or IPv4 mapped as ::ffff:a.b.c.d. */
struct addr_key {
	__u8 addr[16];
};

/* Counters per remote address. All fields are u64, see src/maps.rs. */
struct addr_counters {
	__u64 rx_packets;   /* packets passed by XDP (not dropped)               */
	__u64 rx_bytes;     /* L3 bytes of those packets                         */
	__u64 drop_packets; /* packets dropped by XDP because of the drop list   */
	__u64 drop_bytes;   /* L3 bytes of those packets                         */
	__u64 tx_packets;   /* packets sent to this address (TC egress, GSO segs) */
	__u64 tx_bytes;     /* L3 bytes sent to this address (wire segments)     */
	__u64 last_rx_ns;   /* bpf_ktime_get_ns() of the last rx or drop, 0: none */
	__u64 last_tx_ns;   /* bpf_ktime_get_ns() of the last tx, 0: none        */
};

/* Retransmit key: remote address and remote port (host byte order). */
struct retrans_key {
	__u8 addr[16];
	__u16 port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ADDR_MAP_ENTRIES);
	__type(key, struct addr_key);
	__type(value, struct addr_counters);
} LOOM_ADDR_STATS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DROP_MAP_ENTRIES);
	__type(key, struct addr_key);
	__type(value, __u64); /* userspace-defined cookie; unused by the kernel side */
} LOOM_DROP_LIST SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, RETRANS_MAP_ENTRIES);
	__type(key, struct retrans_key);
	__type(value, __u64);
} LOOM_RETRANS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SEND_MAP_ENTRIES);
	__type(key, __u32);   /* tgid */
	__type(value, __u64); /* bytes */
} LOOM_SEND_BYTES SEC(".maps");

/* ---- helpers ----------------------------------------------------------- */

static __always_inline void key_from_v4(struct addr_key *k, __be32 a)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->addr[10] = 0xff;
	k->addr[11] = 0xff;
	__builtin_memcpy(&k->addr[12], &a, 4);
}

static __always_inline struct addr_counters *counters_for(const struct addr_key *k)
{
	struct addr_counters *c = bpf_map_lookup_elem(&LOOM_ADDR_STATS, k);
	if (c)
		return c;
	struct addr_counters zero = {};
	/* BPF_NOEXIST: another CPU may have inserted it meanwhile; look up again. */
	bpf_map_update_elem(&LOOM_ADDR_STATS, k, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&LOOM_ADDR_STATS, k);
}

/* ---- XDP ingress ------------------------------------------------------- */

SEC("xdp")
int loom_xdp_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct addr_key key;
	__u64 bytes;
	__u16 proto;
	void *l3;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	proto = eth->h_proto;
	l3 = eth + 1;

	/* Up to two VLAN tags (802.1Q / 802.1ad). */
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q_) && proto != bpf_htons(ETH_P_8021AD_))
			break;
		struct {
			__be16 tci;
			__be16 proto;
		} *vlan = l3;
		if ((void *)(vlan + 1) > data_end)
			return XDP_PASS;
		proto = vlan->proto;
		l3 = vlan + 1;
	}

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = l3;
		if ((void *)(ip + 1) > data_end)
			return XDP_PASS;
		key_from_v4(&key, ip->saddr);
		bytes = bpf_ntohs(ip->tot_len);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = l3;
		if ((void *)(ip6 + 1) > data_end)
			return XDP_PASS;
		__builtin_memcpy(key.addr, &ip6->saddr, 16);
		bytes = (__u64)bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr);
	} else {
		return XDP_PASS;
	}

	int drop = bpf_map_lookup_elem(&LOOM_DROP_LIST, &key) != NULL;
	struct addr_counters *c = counters_for(&key);
	if (c) {
		if (drop) {
			__sync_fetch_and_add(&c->drop_packets, 1);
			__sync_fetch_and_add(&c->drop_bytes, bytes);
		} else {
			__sync_fetch_and_add(&c->rx_packets, 1);
			__sync_fetch_and_add(&c->rx_bytes, bytes);
		}
		c->last_rx_ns = bpf_ktime_get_ns();
	}
	return drop ? XDP_DROP : XDP_PASS;
}

/* ---- TC egress --------------------------------------------------------- */

/* TC_ACT_UNSPEC is TCX_NEXT for TCX links and "continue" for clsact filters: the packet is
 * only observed, never changed or dropped. aya 0.14 knows this section as "classifier". */
SEC("classifier")
int loom_tc_egress(struct __sk_buff *skb)
{
	struct addr_key key;
	__u32 off = 0;
	__u64 l3_len, hdr_len;
	__u8 l4proto;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		/* On Ethernet-like devices the network header follows a 14-byte MAC header. */
		off = ETH_HLEN;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
			return TC_ACT_UNSPEC;
		key_from_v4(&key, ip.daddr);
		l3_len = bpf_ntohs(ip.tot_len);
		hdr_len = (__u64)ip.ihl * 4;
		l4proto = ip.protocol;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		off = ETH_HLEN;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return TC_ACT_UNSPEC;
		__builtin_memcpy(key.addr, &ip6.daddr, 16);
		l3_len = (__u64)bpf_ntohs(ip6.payload_len) + sizeof(struct ipv6hdr);
		hdr_len = sizeof(struct ipv6hdr);
		l4proto = ip6.nexthdr;
	} else {
		return TC_ACT_UNSPEC;
	}

	/* BIG TCP / jumbograms leave the length field at 0: use the skb length. */
	if (l3_len == sizeof(struct ipv6hdr) || l3_len == 0) {
		if (skb->len > off)
			l3_len = skb->len - off;
	}

	__u64 segs = skb->gso_segs;
	if (segs > 1) {
		/* A GSO super-packet leaves as `segs` packets that each carry the
		 * L3+L4 headers: count the bytes that go on the wire. */
		if (l4proto == IPPROTO_TCP) {
			struct tcphdr th;
			if (bpf_skb_load_bytes(skb, off + hdr_len, &th, sizeof(th)) == 0)
				hdr_len += (__u64)th.doff * 4;
		} else if (l4proto == IPPROTO_UDP) {
			hdr_len += sizeof(struct udphdr);
		}
		l3_len += (segs - 1) * hdr_len;
	} else {
		segs = 1;
	}

	struct addr_counters *c = counters_for(&key);
	if (c) {
		__sync_fetch_and_add(&c->tx_packets, segs);
		__sync_fetch_and_add(&c->tx_bytes, l3_len);
		c->last_tx_ns = bpf_ktime_get_ns();
	}
	return TC_ACT_UNSPEC;
}

/* ---- TCP retransmits --------------------------------------------------- */

/* Minimal CO-RE declarations: field names match the kernel's, the loader
 * relocates the offsets against /sys/kernel/btf/vmlinux. */
struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct sk_buff;

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(loom_tcp_retransmit, const struct sock *sk, const struct sk_buff *skb, int err)
{
	struct retrans_key key = {};
	unsigned short family = BPF_CORE_READ(sk, __sk_common.skc_family);

	if (family == AF_INET) {
		__be32 a = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &a, 4);
	} else if (family == AF_INET6) {
		BPF_CORE_READ_INTO(&key.addr, sk, __sk_common.skc_v6_daddr);
	} else {
		return 0;
	}
	key.port = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));

	__u64 *v = bpf_map_lookup_elem(&LOOM_RETRANS, &key);
	if (v) {
		__sync_fetch_and_add(v, 1);
	} else {
		__u64 one = 1;
		if (bpf_map_update_elem(&LOOM_RETRANS, &key, &one, BPF_NOEXIST) != 0) {
			v = bpf_map_lookup_elem(&LOOM_RETRANS, &key);
			if (v)
				__sync_fetch_and_add(v, 1);
		}
	}
	return 0;
}

/* ---- bytes sent per process -------------------------------------------- */

SEC("tp_btf/sock_send_length")
int BPF_PROG(loom_sock_send_length, struct sock *sk, int ret, int flags)
{
	if (ret <= 0)
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u64 n = (__u64)ret;
	__u64 *v = bpf_map_lookup_elem(&LOOM_SEND_BYTES, &tgid);
	if (v) {
		__sync_fetch_and_add(v, n);
	} else if (bpf_map_update_elem(&LOOM_SEND_BYTES, &tgid, &n, BPF_NOEXIST) != 0) {
		v = bpf_map_lookup_elem(&LOOM_SEND_BYTES, &tgid);
		if (v)
			__sync_fetch_and_add(v, n);
	}
	return 0;
}
