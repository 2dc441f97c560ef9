#!/usr/bin/env bash
# NAT lab: real loom-peer processes in network namespaces behind NAT routers.
#
# Topology (all addresses exist only inside namespaces this script creates):
#
#   WAN 198.51.100.0/24 (a bridge in namespace <p>wan)
#     relay   198.51.100.10   bootstrap + relay server (+ AutoNAT server)
#     pub     198.51.100.20   a peer with a public address
#     r1      198.51.100.101  endpoint-independent NAT  -> LAN 10.0.1.0/24 -> peer a 10.0.1.2
#     r2      198.51.100.102  endpoint-independent NAT  -> LAN 10.0.2.0/24 -> peer b 10.0.2.2
#     r3      198.51.100.103  symmetric NAT (fully-random) -> LAN 10.0.3.0/24 -> peer c 10.0.3.2
#
# Routers SNAT their LAN to their WAN address and drop new inbound connections on the WAN side
# (what a home router does); r3 randomises the source port per mapping, so hole punching must
# fail there. Every WAN link is delayed: `tc netem` where the kernel has it, else the WAN segment
# is loom-linkem (a user-space switch that delays frames per port) instead of a kernel bridge.
# No namespace has a default route out of the lab, so no packet leaves it.
#
# The lab asserts from what the nodes themselves report (`loom-peer status --json`):
#   (a) a and b end up with a direct hole-punched connection (its RTT is printed);
#   (b) c, behind the symmetric NAT, stays reachable through the relay;
#   (c) pub has a public address and connects directly.
#
# Scenarios (--scenario):
#   nat      (default) the claims above;
#   defense  a and b run with --ebpf on: after a speedtest from b, a's kernel byte count for b
#            agrees with its libp2p count within 10 % (IP/TCP or UDP/QUIC headers, framing,
#            retransmits); a bans b: b's addresses reach a's XDP drop list (time printed) and its
#            packets are counted as drops; a unbans b and they connect again;
#   fleet    a and c are enrolled in a private fleet, b is not: b dials both through the relay
#            and is refused by both; a and c (c behind the symmetric NAT, so through the relay)
#            train testnet/lab-job.yaml together and end with the same model.
#
# Usage: nat-lab.sh [--bin PATH] [--scenario nat|defense|fleet] [--repeat N] [--timeout SECS]
#                   [--delay-ms MS] [--keep]
# Exit status: 0 when every run passed, 1 when any failed, 77 when it cannot run here (not root,
# tools missing): callers must report that as skipped, never as passed.
set -euo pipefail

BIN=""
REPEAT=1
TIMEOUT=45
DELAY_MS=10
KEEP=0
SCENARIO=nat
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN="$2"; shift 2 ;;
    --repeat) REPEAT="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --delay-ms) DELAY_MS="$2"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --scenario) SCENARIO="$2"; shift 2 ;;
    -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
    *) echo "nat-lab: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$BIN" ] || BIN="$HERE/../target/debug/loom-peer"
BIN="$(realpath "$BIN" 2>/dev/null || echo "$BIN")"

skip() { echo "nat-lab: SKIPPED: $*" >&2; exit 77; }
[ "$(id -u)" -eq 0 ] || skip "needs root (CAP_NET_ADMIN) to create network namespaces"
for tool in ip nft tc python3; do
  command -v "$tool" >/dev/null || skip "missing $tool (run scripts/setup.sh)"
done
[ -x "$BIN" ] || { echo "nat-lab: no loom-peer binary at $BIN (cargo build first)" >&2; exit 2; }
ip netns add loomlab-probe-$$ 2>/dev/null || skip "cannot create network namespaces here"
ip netns del loomlab-probe-$$

P="ll$$-"           # namespace prefix, unique per invocation
LINKEM="$(dirname "$BIN")/loom-linkem"
WORK=""
NAMESPACES=()
PIDS=()

cleanup() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true; done
  # Every process still inside a lab namespace goes too: a namespace whose processes survive
  # would live on, invisible, after `ip netns del`.
  for ns in "${NAMESPACES[@]:-}"; do
    [ -n "$ns" ] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ -n "$WORK" ] && [ "$KEEP" -eq 0 ] && [ "${FAILED:-0}" -eq 0 ]; then rm -rf "$WORK"; fi
  PIDS=(); NAMESPACES=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

nsx() { local ns="$1"; shift; ip netns exec "$P$ns" "$@"; }

mkns() {
  ip netns add "$P$1"
  NAMESPACES+=("$P$1")
  nsx "$1" ip link set lo up
}

# Link delay: tc netem where the kernel has it; otherwise the WAN segment is loom-linkem, a
# user-space switch that delays frames per egress port, instead of a kernel bridge.
NETEM=unknown
detect_netem() {
  ip netns add "${P}probe"
  if ip netns exec "${P}probe" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
    NETEM=yes
  else
    NETEM=missing
  fi
  ip netns del "${P}probe"
}
LINKEM_PORTS=()
# Segmentation and checksum offloads off: loom-linkem forwards real frames of at most the MTU.
no_offload() { nsx "$1" ethtool -K "$2" tso off gso off gro off tx off rx off >/dev/null 2>&1 || true; }

# Connect namespace $1 to the WAN segment with address $2 (/24), interface "wan"; $4: the one-way
# delay in ms of frames travelling towards $1.
wan_link() {
  local ns="$1" addr="$2" idx="$3" delay_ms="$4"
  ip link add "wan" netns "$P$ns" type veth peer name "p$idx" netns "${P}wan"
  nsx "$ns" ip addr add "$addr/24" dev wan
  nsx "$ns" ip link set wan up
  if [ "$LINK_MODE" = linkem ]; then
    nsx wan ip link set "p$idx" up
    no_offload wan "p$idx"
    no_offload "$ns" wan
    LINKEM_PORTS+=("p$idx:$delay_ms")
  else
    nsx wan ip link set "p$idx" master br0 up
    [ "$LINK_MODE" = netem ] && [ "$delay_ms" -gt 0 ] && \
      nsx "$ns" tc qdisc add dev wan root netem delay "${delay_ms}ms"
  fi
  return 0
}

# Router $1 with WAN address $2, LAN prefix $3 (e.g. 10.0.1), NAT kind $4 (eim|symmetric), peer ns $5.
router() {
  local r="$1" wan_ip="$2" lan="$3" kind="$4" peer="$5" idx="$6"
  mkns "$r"
  mkns "$peer"
  wan_link "$r" "$wan_ip" "$idx" "$DELAY_MS"
  ip link add "lan" netns "$P$r" type veth peer name "eth0" netns "$P$peer"
  nsx "$r" ip addr add "$lan.1/24" dev lan
  nsx "$r" ip link set lan up
  nsx "$peer" ip addr add "$lan.2/24" dev eth0
  nsx "$peer" ip link set eth0 up
  nsx "$peer" ip route add default via "$lan.1"
  nsx "$r" sysctl -qw net.ipv4.ip_forward=1
  local flags=""
  [ "$kind" = symmetric ] && flags="fully-random"
  nsx "$r" nft -f - <<EOF
table ip nat {
  chain postrouting {
    type nat hook postrouting priority 100;
    ip saddr $lan.0/24 oifname "wan" snat to $wan_ip $flags
  }
}
table ip filter {
  chain input {
    type filter hook input priority 0;
    iifname "wan" ct state new drop
  }
  chain forward {
    type filter hook forward priority 0;
    iifname "wan" ct state new drop
  }
}
EOF
}

build_lab() {
  LINKEM_PORTS=()
  mkns wan
  if [ "$LINK_MODE" != linkem ]; then
    nsx wan ip link add br0 type bridge
    nsx wan ip link set br0 up
  fi
  mkns relay
  wan_link relay 198.51.100.10 1 "$((DELAY_MS / 2))"
  mkns pub
  wan_link pub 198.51.100.20 2 "$((DELAY_MS / 2))"
  router r1 198.51.100.101 10.0.1 eim a 3
  router r2 198.51.100.102 10.0.2 eim b 4
  router r3 198.51.100.103 10.0.3 symmetric c 5
  if [ "$LINK_MODE" = linkem ]; then
    # The LAN links too: the routers forward what they receive there onto the WAN.
    for x in a b c; do no_offload "$x" eth0; done
    for r in r1 r2 r3; do no_offload "$r" lan; done
    ip netns exec "${P}wan" "$LINKEM" "${LINKEM_PORTS[@]}" >"$WORK/linkem.log" 2>&1 &
    PIDS+=("$!")
    disown "$!"
  fi
}

# start_peer NS extra-args...   (start_peer_cmd NS SUBCOMMAND... -- extra-args...)
start_peer() { local ns="$1"; shift; start_peer_cmd "$ns" run -- "$@"; }
start_peer_cmd() {
  local ns="$1"; shift
  local sub=()
  while [ "$1" != "--" ]; do sub+=("$1"); shift; done
  shift
  local dir="$WORK/$ns"
  mkdir -p "$dir"
  # `ip netns exec` itself in the background (not the nsx function, which would fork a
  # subshell): $! is then the peer's own pid, since ip and env exec into it.
  ip netns exec "$P$ns" env RUST_LOG="${LOOM_LAB_LOG:-info}" "$BIN" --data-dir "$dir" "${sub[@]}" \
    --listen /ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1 \
    --no-mdns --metrics-addr off --api-addr 127.0.0.1:0 --heartbeat-interval 500ms \
    --relay-grace 1s "$@" >"$dir/peer.log" 2>&1 &
  PIDS+=("$!")
  disown "$!"
}

status_json() { nsx "$1" "$BIN" --data-dir "$WORK/$1" status --json 2>/dev/null || echo '{}'; }

# Prints the verdict of a scenario and the logs on failure; returns its status.
finish() {
  local result="$1" verdict="$2" secs
  secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  echo "$verdict" | sed "s/^/  run $run: /"
  if [ "$result" -eq 0 ]; then
    echo "run $run: PASS in ${secs}s"
  else
    echo "run $run: FAIL after ${secs}s (logs in $WORK)"
    for ns in relay pub a b c; do
      [ -f "$WORK/$ns/peer.log" ] || continue
      echo "--- $ns: last log lines"; tail -n 15 "$WORK/$ns/peer.log" | sed 's/^/    /'
    done
    FAILED=1
  fi
  return "$result"
}

# wait_for SECS PYTHON-EXPRESSION-SCRIPT: polls `python3 $HERE/defense_check.py <check>` until it
# exits 0 or the time is up; its last output is in $verdict.
wait_check() {
  local secs="$1"; shift
  local until=$(( $(date +%s) + secs ))
  while :; do
    verdict=$("$@") && return 0
    [ "$(date +%s)" -ge "$until" ] && return 1
    sleep 0.2
  done
}

check() { python3 "$HERE/defense_check.py" "$ids" "$@"; }

scenario_defense() {
  for ns in pub c; do start_peer "$ns" --bootstrap "$relay_addr"; done
  for ns in a b; do start_peer "$ns" --bootstrap "$relay_addr" --ebpf on --ebpf-iface eth0; done
  local lines=()
  wait_check "$TIMEOUT" eval 'check connected "$(status_json a)" a b' || {
    finish 1 "a and b never connected: $verdict"; return 1; }
  lines+=("$verdict")
  # A bulk transfer from b to a, then a's kernel and libp2p byte counts for b.
  local speed
  speed=$(nsx a "$BIN" --data-dir "$WORK/a" speedtest "${ID[b]}" --mb 16 --json 2>&1) || {
    sleep 11; speed=$(nsx a "$BIN" --data-dir "$WORK/a" speedtest "${ID[b]}" --mb 16 --json 2>&1); } || {
    finish 1 "speedtest failed: $speed"; return 1; }
  lines+=("speedtest b->a: $speed")
  wait_check 10 eval 'check bytes-agree "$(status_json a)" a b' || { finish 1 "$(printf '%s\n' "${lines[@]}" "$verdict")"; return 1; }
  lines+=("$verdict")
  # Ban: b's addresses on a's drop list, b's packets dropped.
  local t_ban t_listed
  t_ban=$(date +%s.%N)
  nsx a "$BIN" --data-dir "$WORK/a" ban "${ID[b]}" --reason "lab" >/dev/null
  wait_check 10 eval 'check drop-listed "$(status_json a)" a b' || { finish 1 "$(printf '%s\n' "${lines[@]}" "$verdict")"; return 1; }
  t_listed=$(python3 -c "import time; print(f'{time.time() - $t_ban:.2f}')")
  lines+=("$verdict; on the drop list ${t_listed}s after the ban")
  # b keeps trying (its dials, its QUIC packets): they are dropped at XDP and counted.
  wait_check "$TIMEOUT" eval 'check dropping "$(status_json a)" a b' || { finish 1 "$(printf '%s\n' "${lines[@]}" "$verdict")"; return 1; }
  lines+=("$verdict")
  nsx a "$BIN" --data-dir "$WORK/a" unban "${ID[b]}" >/dev/null
  wait_check "$TIMEOUT" eval 'check reconnected "$(status_json a)" a b' || { finish 1 "$(printf '%s\n' "${lines[@]}" "$verdict")"; return 1; }
  lines+=("$verdict")
  finish 0 "$(printf '%s\n' "${lines[@]}")"
}

scenario_fleet() {
  local key="$WORK/fleet.key"
  "$BIN" --data-dir "$WORK/relay" fleet init --key "$key" >/dev/null
  for ns in a c; do
    "$BIN" fleet enroll "${ID[$ns]}" --key "$key" --out "$WORK/$ns.fleet" 2>/dev/null
  done
  local job="$HERE/lab-job.yaml" lines=()
  local FLEET_A="--fleet $WORK/a.fleet" FLEET_C="--fleet $WORK/c.fleet"
  [ -n "${LAB_NOFLEET:-}" ] && FLEET_A="" && FLEET_C=""
  start_peer pub --bootstrap "$relay_addr"
  # Members know each other's PeerIds (the owner enrolled them) and reach each other through the
  # relay's circuits; the relay itself is not enrolled and carries only relayed bytes.
  local via="/ip4/198.51.100.10/tcp/4001/p2p/${ID[relay]}/p2p-circuit/p2p"
  start_peer_cmd a train --manifest "$job" -- --bootstrap "$relay_addr" --bootstrap "$via/${ID[c]}" \
    $FLEET_A --genesis lab-fleet
  start_peer_cmd c train --manifest "$job" -- --bootstrap "$relay_addr" --bootstrap "$via/${ID[a]}" \
    $FLEET_C
  # The stranger dials both members through the relay.
  start_peer b --bootstrap "$relay_addr" \
    --bootstrap "/ip4/198.51.100.10/tcp/4001/p2p/${ID[relay]}/p2p-circuit/p2p/${ID[a]}" \
    --bootstrap "/ip4/198.51.100.10/tcp/4001/p2p/${ID[relay]}/p2p-circuit/p2p/${ID[c]}"
  wait_check "$TIMEOUT" eval 'check fleet-admitted "$(status_json a)" a c' || { finish 1 "$verdict"; return 1; }
  lines+=("$verdict")
  wait_check "$TIMEOUT" eval 'check fleet-refused "$(status_json a)" a b && check fleet-refused "$(status_json c)" c b' || {
    finish 1 "$(printf '%s\n' "${lines[@]}" "$verdict")"; return 1; }
  lines+=("$(check fleet-refused "$(status_json a)" a b)" "$(check fleet-refused "$(status_json c)" c b)")
  # Training to the end: both summaries, the same final model.
  local until=$(( $(date +%s) + TIMEOUT * 4 ))
  until [ -f "$WORK/a/jobs"/*/summary.json ] 2>/dev/null && [ -f "$WORK/c/jobs"/*/summary.json ] 2>/dev/null; do
    if [ "$(date +%s)" -ge "$until" ]; then
      for ns in a c; do status_json "$ns" >"$WORK/$ns/status-at-failure.json"; done
      finish 1 "$(printf '%s\n' "${lines[@]}" "training did not finish (status in $WORK/{a,c}/status-at-failure.json)")"
      return 1
    fi
    sleep 1
  done
  verdict=$(python3 "$HERE/defense_check.py" "$ids" trained "$WORK/a/jobs" "$WORK/c/jobs") || {
    finish 1 "$(printf '%s\n' "${lines[@]}" "$verdict")"; return 1; }
  lines+=("$verdict")
  finish 0 "$(printf '%s\n' "${lines[@]}")"
}

run_once() {
  local run="$1" t0 deadline
  t0=$(date +%s.%N)
  WORK="$(mktemp -d /tmp/loom-nat-lab.XXXXXX)"
  build_lab
  declare -A ID
  for ns in relay pub a b c; do
    mkdir -p "$WORK/$ns"
    ID[$ns]="$("$BIN" --data-dir "$WORK/$ns" id)"
  done
  local relay_addr="/ip4/198.51.100.10/tcp/4001/p2p/${ID[relay]}"
  start_peer relay --relay-server \
    --external-address /ip4/198.51.100.10/tcp/4001,/ip4/198.51.100.10/udp/4001/quic-v1
  local ids
  ids=$(printf '{"relay":"%s","pub":"%s","a":"%s","b":"%s","c":"%s"}' \
    "${ID[relay]}" "${ID[pub]}" "${ID[a]}" "${ID[b]}" "${ID[c]}")
  deadline=$(( $(date +%s) + TIMEOUT ))
  local verdict="" result=1
  case "$SCENARIO" in
    defense) scenario_defense; return $? ;;
    fleet) scenario_fleet; return $? ;;
  esac
  for ns in pub a b c; do start_peer "$ns" --bootstrap "$relay_addr"; done
  while :; do
    sleep 1
    verdict=$(python3 "$HERE/lab_check.py" "$ids" "$(status_json a)" "$(status_json b)" "$(status_json c)" \
      "$(status_json pub)" "$(status_json relay)") && result=0 || result=$?
    if [ "$result" -eq 0 ]; then
      # Hold: c must stay connected through the relay and a<->b stay direct, also after the
      # peers have closed redundant connections (every 2 s, once older than 5 s).
      sleep 6
      verdict=$(python3 "$HERE/lab_check.py" "$ids" "$(status_json a)" "$(status_json b)" "$(status_json c)" \
        "$(status_json pub)" "$(status_json relay)") && result=0 || result=$?
      [ "$result" -eq 0 ] && break
    fi
    [ "$(date +%s)" -ge "$deadline" ] && break
  done
  local secs
  secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  echo "$verdict" | sed "s/^/  run $run: /"
  if [ "$result" -eq 0 ]; then
    echo "run $run: PASS in ${secs}s"
  else
    echo "run $run: FAIL after ${secs}s (logs in $WORK)"
    for ns in relay pub a b c; do
      echo "--- $ns: last log lines"; tail -n 15 "$WORK/$ns/peer.log" | sed 's/^/    /'
    done
    FAILED=1   # keep the failed run's logs
  fi
  return "$result"
}

detect_netem
if [ "$DELAY_MS" -eq 0 ]; then
  LINK_MODE=plain
elif [ "$NETEM" = yes ]; then
  LINK_MODE=netem
elif [ -x "$LINKEM" ] && command -v ethtool >/dev/null; then
  LINK_MODE=linkem
else
  LINK_MODE=plain
  echo "nat-lab: WARNING: no netem in this kernel and no loom-linkem/ethtool: links are NOT delayed" >&2
fi
echo "nat-lab: link delay ${DELAY_MS} ms per router link via ${LINK_MODE}"

passed=0
for run in $(seq 1 "$REPEAT"); do
  # Each run in a subshell with `set -e` in force (it is ignored inside `if`), and its own
  # cleanup trap, so a failed set-up step fails the run and nothing is left behind.
  set +e
  ( set -e; trap cleanup EXIT; run_once "$run" )
  rc=$?
  set -e
  [ "$rc" -eq 0 ] && passed=$((passed + 1))
done
echo "nat-lab: $passed/$REPEAT runs passed"
[ "$passed" -eq "$REPEAT" ]
