#!/usr/bin/env bash
# Measures loom-linkem: ping RTT and TCP goodput between two namespaces through the emulator,
# for each configured rate, against the configured delay and rate. Prints a table and writes JSON.
# Usage: linkem-bench.sh [--bin DIR] [--delay-ms MS] [--rates "50 100"] [--secs S] [--json FILE]
# Needs root. Exit 77 when it cannot run here.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN_DIR="$HERE/../target/debug"; DELAY_MS=25; RATES="50 100"; SECS=8; JSON=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN_DIR="$2"; shift 2 ;;
    --delay-ms) DELAY_MS="$2"; shift 2 ;;
    --rates) RATES="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --json) JSON="$2"; shift 2 ;;
    *) echo "linkem-bench: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "linkem-bench: SKIPPED: needs root" >&2; exit 77; }
LINKEM="$BIN_DIR/loom-linkem"
[ -x "$LINKEM" ] || { echo "linkem-bench: no $LINKEM (cargo build --bins)" >&2; exit 2; }
P="lb$$-"; SW="" PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true; done
  for n in sw h1 h2; do ip netns del "$P$n" 2>/dev/null || true; done
}
trap cleanup EXIT
for n in sw h1 h2; do ip netns add "$P$n"; ip -n "$P$n" link set lo up; done
ip link add eth0 netns "${P}h1" type veth peer name p1 netns "${P}sw"
ip link add eth0 netns "${P}h2" type veth peer name p2 netns "${P}sw"
ip -n "${P}h1" addr add 10.98.0.1/24 dev eth0
ip -n "${P}h2" addr add 10.98.0.2/24 dev eth0
for pair in "h1 eth0" "h2 eth0" "sw p1" "sw p2"; do
  set -- $pair
  ip -n "$P$1" link set "$2" up
  ip netns exec "$P$1" ethtool -K "$2" tso off gso off gro off tx off rx off >/dev/null 2>&1 || true
done
results=()
printf '%-10s %-10s %-14s %-16s %-8s\n' rate_mbit delay_ms rtt_ms_min goodput_mbit ratio
for rate in $RATES; do
  ip netns exec "${P}sw" "$LINKEM" "p1:$DELAY_MS:$rate" "p2:$DELAY_MS:$rate" & PIDS+=("$!")
  for _ in $(seq 1 50); do ip netns exec "${P}h1" ping -c 1 -W 1 10.98.0.2 >/dev/null 2>&1 && break; done
  rtt=$(ip netns exec "${P}h1" ping -c 5 -i 0.2 10.98.0.2 | awk -F'[/= ]+' '/min\/avg/ {print $7}')
  ip netns exec "${P}h2" python3 -c "
import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('10.98.0.2', 5001)); s.listen(1); c, _ = s.accept()
while c.recv(1 << 20): pass
c.close()" & server=$!
  sleep 0.3
  goodput=$(ip netns exec "${P}h1" python3 -c "
import socket, time; s = socket.socket(); s.connect(('10.98.0.2', 5001)); buf = b'x' * (1 << 20)
t = time.time(); sent = 0
while time.time() - t < $SECS: s.sendall(buf); sent += len(buf)
s.shutdown(socket.SHUT_WR); s.recv(1); print(f'{sent * 8 / (time.time() - t) / 1e6:.1f}')")
  wait "$server"
  kill -9 "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
  ratio=$(python3 -c "print(f'{$goodput / $rate:.3f}')")
  printf '%-10s %-10s %-14s %-16s %-8s\n' "$rate" "$DELAY_MS" "$rtt" "$goodput" "$ratio"
  results+=("{\"rate_mbit\": $rate, \"delay_ms_per_port\": $DELAY_MS, \"rtt_ms_min\": $rtt, \"tcp_goodput_mbit\": $goodput, \"goodput_over_rate\": $ratio}")
done
if [ -n "$JSON" ]; then
  (IFS=,; printf '[%s]\n' "${results[*]}") > "$JSON"
  echo "wrote $JSON"
fi
