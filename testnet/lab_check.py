"""Decides the NAT lab's claims from the peers' own status reports.

Usage: lab_check.py IDS_JSON A_JSON B_JSON C_JSON PUB_JSON RELAY_JSON
Prints one line per claim and exits 0 when all hold.
"""
import json
import sys


def main() -> int:
    ids = json.loads(sys.argv[1])
    names = ["a", "b", "c", "pub", "relay"]
    st = {}
    for name, text in zip(names, sys.argv[2:]):
        try:
            st[name] = json.loads(text)
        except json.JSONDecodeError:
            st[name] = {}

    def peers(n):
        return {p["peer_id"]: p for p in st[n].get("network", {}).get("peers", [])}

    def alive(n, who):
        return any(m["peer_id"] == ids[who] and m["state"] == "alive" for m in st[n].get("members", []))

    ok = True
    ab, ba = peers("a").get(ids["b"]), peers("b").get(ids["a"])
    kinds = (ab or {}).get("kind"), (ba or {}).get("kind")
    punched = ab is not None and ba is not None and "hole-punched" in kinds and "relayed" not in kinds
    rtt = (ab or {}).get("rtt_ms")
    print(f"(a) a<->b hole-punched direct: {punched} kinds a->b={kinds[0]} b->a={kinds[1]} rtt_ms={rtt}")
    ok &= punched and rtt is not None

    cp = peers("c")
    seen = [(w, cp[ids[w]]["kind"]) for w in ("a", "b") if ids[w] in cp]
    via_relay = bool(seen) and all(k == "relayed" for _, k in seen)
    c_ok = via_relay and ids["relay"] in cp and alive("a", "c") and alive("c", "a")
    print(f"(b) c behind symmetric NAT reachable via relay: {c_ok} c->{seen} relay-connected={ids['relay'] in cp}")
    ok &= c_ok

    pp = peers("pub")
    nat = st["pub"].get("network", {}).get("nat_status")
    # Direct paths: dialed directly, or first met through the relay and upgraded by DCUtR (which
    # happens when the NATed side learned of pub before AutoNAT had confirmed pub as public).
    direct = [
        w for w in ("relay", "a", "b", "c") if ids[w] in pp and pp[ids[w]]["kind"] in ("direct", "hole-punched")
    ]
    pub_ok = nat == "public" and "relay" in direct and len(direct) >= 2
    print(f"(c) pub public and directly connected: {pub_ok} nat={nat} direct-to={direct}")
    ok &= pub_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
