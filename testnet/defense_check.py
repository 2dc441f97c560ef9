"""Decides the NAT lab's defense and fleet claims from the peers' own status reports.

Usage: defense_check.py IDS_JSON CHECK STATUS_JSON SELF OTHER
       defense_check.py IDS_JSON trained JOBS_DIR_A JOBS_DIR_C
Prints one line and exits 0 when the claim holds.
"""
import glob
import json
import sys


def peer(status, pid):
    for p in status.get("network", {}).get("peers", []):
        if p["peer_id"] == pid:
            return p
    return None


def kernel_peer(status, pid):
    for p in (status.get("network", {}).get("kernel") or {}).get("peers", []):
        if p["peer_id"] == pid:
            return p
    return None


def main() -> int:
    ids = json.loads(sys.argv[1])
    check = sys.argv[2]
    if check == "trained":
        summaries = []
        for jobs in sys.argv[3:5]:
            path = glob.glob(f"{jobs}/*/summary.json")
            if not path:
                print(f"trained: no summary in {jobs}")
                return 1
            with open(path[0]) as f:
                summaries.append(json.load(f))
        hashes = [s.get("last", s).get("model_hash") for s in summaries]
        rounds = [s.get("last", s).get("round") for s in summaries]
        ok = hashes[0] is not None and hashes[0] == hashes[1]
        print(f"fleet members trained together: {ok} rounds={rounds} final model hashes equal={hashes[0] == hashes[1]}")
        return 0 if ok else 1
    try:
        status = json.loads(sys.argv[3])
    except json.JSONDecodeError:
        status = {}
    me, other = sys.argv[4], sys.argv[5]
    oid = ids[other]
    p = peer(status, oid)
    k = kernel_peer(status, oid)
    kernel = status.get("network", {}).get("kernel") or {}
    if check == "connected":
        ok = p is not None and kernel.get("enabled", False)
        print(f"{me}<->{other} connected: {p is not None} kind={(p or {}).get('kind')}; kernel telemetry on {me}: {kernel.get('enabled')} ({kernel.get('iface')}, xdp {kernel.get('xdp_mode')}, object {kernel.get('object_source')}) {kernel.get('reason') or ''}")
        return 0 if ok else 1
    if check == "bytes-agree":
        if p is None or k is None:
            print(f"bytes-agree: {other} not in {me}'s peers or kernel table")
            return 1
        libp2p_in, kernel_rx = p["bytes_in"], k["rx_bytes"]
        ratio = kernel_rx / max(libp2p_in, 1)
        ok = libp2p_in > 8_000_000 and 0.9 <= ratio <= 1.1
        print(
            f"kernel vs libp2p bytes from {other} on {me}: kernel {kernel_rx} (IP packets: headers, framing and retransmits included), "
            f"libp2p {libp2p_in} (payload): ratio {ratio:.4f} ({(ratio - 1) * 100:+.2f} %), {k['rx_packets']} packets, {k['retransmits']} retransmits: {ok}"
        )
        return 0 if ok else 1
    if check == "drop-listed":
        listed = set(kernel.get("drop_list", []))
        addrs = set((k or {}).get("addrs", []))
        ok = bool(listed) and (not addrs or bool(listed & addrs)) and p is None
        print(f"{other} banned on {me}: disconnected={p is None} drop list {sorted(listed)} (its addresses {sorted(addrs)}): {ok}")
        return 0 if ok else 1
    if check == "dropping":
        drops = (k or {}).get("drops", 0)
        ok = drops > 0 and p is None
        print(f"{other}'s packets dropped at XDP on {me}: {drops} drops, {(k or {}).get('drop_bytes', 0)} bytes, connected={p is not None}: {ok}")
        return 0 if ok else 1
    if check == "reconnected":
        ok = p is not None and not kernel.get("drop_list")
        print(f"{other} unbanned on {me}: reconnected={p is not None} kind={(p or {}).get('kind')} drop list {kernel.get('drop_list')}: {ok}")
        return 0 if ok else 1
    fleet = status.get("network", {}).get("fleet") or {}
    if check == "fleet-admitted":
        members = fleet.get("members_connected", [])
        ok = oid in members and p is not None
        print(f"{me} admitted fleet member {other}: {ok} kind={(p or {}).get('kind')}")
        return 0 if ok else 1
    if check == "fleet-refused":
        refused = fleet.get("refused_total", 0)
        ok = refused >= 1 and p is None and oid not in fleet.get("members_connected", [])
        print(f"{me} refused stranger {other}: {ok} refusals={refused} connected={p is not None}")
        return 0 if ok else 1
    print(f"unknown check {check}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
