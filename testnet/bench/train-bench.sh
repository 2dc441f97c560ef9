#!/usr/bin/env bash
# Training benchmark: Loom (4 `loom-peer train` peers, DiLoCo + top-k int8) against a PyTorch
# DDP-equivalent baseline (4 torchrun ranks, gloo all-reduce every step), both over the same
# emulated WAN: 4 host namespaces h1..h4 (10.99.0.1..4/24 on eth0) on a switch namespace running
# loom-linkem, every port DELAY ms one way and RATE Mbit/s on egress (default 25 ms / 100 Mbit/s,
# i.e. 50 ms RTT between any two hosts). Same model, data, hyper-parameters and token budget
# (DDP steps = rounds x inner steps). Bytes sent per host come from each namespace's eth0
# tx_bytes. Writes OUT/result.json, OUT/loss.svg (via report.py) and prints a table.
#
# Usage: train-bench.sh [--bin DIR] [--data FILE] [--rounds R] [--inner-steps H]
#          [--target-loss X] [--ratio R] [--outer-lr LR] [--outer-momentum M] [--out DIR] [--only loom|ddp|both] [--rate-mbit M] [--delay-ms MS]
#          [--python PY] [--timeout SECS] [--loss-check]
# Needs root. Exit 77 when it cannot run here (not root, tools missing).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BIN_DIR=""; DATA="$REPO/../shared/data/tinyshakespeare.txt"; ROUNDS=60; INNER=10; TARGET=2.3
OUT="$REPO/target/train-bench"; ONLY=both; RATE=100; DELAY=25; TIMEOUT=""
PY="${LOOM_CACHE_DIR:-$HOME/.cache/loom}/torch-2.13.0/bin/python"
# Model and optimizer, shared by both systems.
LAYERS=4; HEADS=4; WIDTH=128; CONTEXT=64; BATCH=12; NHOSTS=4
# Loom's exchange: SparseLoCo-style top-k with decayed error feedback and a plain outer step
# (momentum 0, learning rate 3: a sparse average divides each coordinate one peer sent by all the peers).
RATIO=0.03; OUTER_LR=3.0; OUTER_MOMENTUM=0.0
# --loss-check turns on the verifier's cheap check (manifest verification.loss_check).
LOSS_CHECK=false

die() { echo "train-bench: $*" >&2; exit 1; }
skip() { echo "train-bench: SKIPPED: $*" >&2; exit 77; }
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || [ "$1" = -h ] || [ "$1" = --help ] || [ "$1" = --loss-check ] || die "missing value for $1"
  case "$1" in
    --bin) BIN_DIR="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --inner-steps) INNER="$2"; shift 2 ;;
    --target-loss) TARGET="$2"; shift 2 ;;
    --ratio) RATIO="$2"; shift 2 ;;
    --outer-lr) OUTER_LR="$2"; shift 2 ;;
    --outer-momentum) OUTER_MOMENTUM="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --rate-mbit) RATE="$2"; shift 2 ;;
    --delay-ms) DELAY="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --loss-check) LOSS_CHECK=true; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
done
case "$ONLY" in loom|ddp|both) ;; *) die "--only must be loom, ddp or both (got $ONLY)" ;; esac
[[ "$DELAY" =~ ^[0-9]+$ ]] || die "--delay-ms must be a non-negative integer"
for v in ROUNDS INNER RATE; do
  [[ "${!v}" =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a positive integer"
done
[ "$(id -u)" -eq 0 ] || skip "needs root"
for tool in ip ethtool ping; do command -v "$tool" >/dev/null || skip "missing $tool"; done
[ -f "$DATA" ] || die "no data file $DATA (--data FILE)"
DATA="$(realpath "$DATA")"
STEPS=$((ROUNDS * INNER))
# Both systems evaluate every EVAL_STEPS optimizer steps (Loom: every EVAL_ROUNDS rounds).
EVAL_STEPS=60; EVAL_ROUNDS=$(( (EVAL_STEPS + INNER - 1) / INNER ))
# Default time limit per system: generous for 2-core machines (about 1.5 s per step plus a round
# deadline per round), override with --timeout.
[ -n "$TIMEOUT" ] || TIMEOUT=$((STEPS * 3 / 2 + ROUNDS * 60 + 120))

# Binaries: --bin DIR, else target/release, else target/debug (each binary on its own).
find_bin() {
  if [ -n "$BIN_DIR" ]; then echo "$BIN_DIR/$1"; return; fi
  for d in release debug; do [ -x "$REPO/target/$d/$1" ] && { echo "$REPO/target/$d/$1"; return; }; done
  echo "$REPO/target/release/$1"
}
LINKEM="$(find_bin loom-linkem)"; LOOM_PEER="$(find_bin loom-peer)"
[ -x "$LINKEM" ] || die "no loom-linkem at $LINKEM (cargo build --release --bins, or --bin DIR)"
if [ "$ONLY" != ddp ]; then
  [ -x "$LOOM_PEER" ] || die "no loom-peer at $LOOM_PEER (cargo build --release --bins, or --bin DIR)"
fi
if [ "$ONLY" != loom ]; then
  [ -x "$PY" ] || die "no python at $PY (run scripts/setup-torch.sh, or --python PY)"
  "$PY" -c 'import torch' 2>/dev/null || die "$PY cannot import torch (run scripts/setup-torch.sh)"
fi
ip netns add "tbprobe$$" 2>/dev/null || skip "cannot create network namespaces here"
ip netns del "tbprobe$$"

mkdir -p "$OUT"; OUT="$(realpath "$OUT")"
P="tb$$-"; NAMESPACES=(); PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true; done
  # Every process left inside a namespace goes too, or the namespace would outlive `ip netns del`.
  for ns in "${NAMESPACES[@]:-}"; do
    [ -n "$ns" ] || continue
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  PIDS=(); NAMESPACES=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM
nsx() { local ns="$1"; shift; ip netns exec "$P$ns" "$@"; }
no_offload() { nsx "$1" ethtool -K "$2" tso off gso off gro off tx off rx off >/dev/null 2>&1 || true; }
now() { date +%s.%N; }

# --- network ------------------------------------------------------------------------------------
echo "train-bench: building $NHOSTS hosts on loom-linkem, ${DELAY} ms one way + ${RATE} Mbit/s per port"
ip netns add "${P}sw"; NAMESPACES+=("${P}sw"); nsx sw ip link set lo up
PORTS=()
for i in $(seq 1 $NHOSTS); do
  ip netns add "${P}h$i"; NAMESPACES+=("${P}h$i"); nsx "h$i" ip link set lo up
  ip link add eth0 netns "${P}h$i" type veth peer name "p$i" netns "${P}sw"
  nsx "h$i" ip addr add "10.99.0.$i/24" dev eth0
  nsx "h$i" ip link set eth0 up
  nsx sw ip link set "p$i" up
  no_offload "h$i" eth0; no_offload sw "p$i"
  PORTS+=("p$i:$DELAY:$RATE")
done
nsx sw "$LINKEM" "${PORTS[@]}" >"$OUT/linkem.log" 2>&1 &
PIDS+=("$!"); disown "$!"
for i in $(seq 2 $NHOSTS); do
  ok=0
  for _ in $(seq 1 50); do nsx h1 ping -c 1 -W 1 "10.99.0.$i" >/dev/null 2>&1 && { ok=1; break; }; done
  [ "$ok" -eq 1 ] || die "h1 cannot ping 10.99.0.$i through loom-linkem (see $OUT/linkem.log)"
done
RTTS=()
for i in $(seq 2 $NHOSTS); do
  rtt=$(nsx h1 ping -c 5 -i 0.2 "10.99.0.$i" | awk -F'[/= ]+' '/min\/avg/ {print $7}')
  RTTS+=("$rtt")
  # Shaping must be in place: the minimum RTT is at least the two one-way delays.
  awk -v r="$rtt" -v d="$DELAY" 'BEGIN { exit !(r >= 1.8 * d && r <= 2 * d + 50) }' \
    || die "RTT h1->h$i is $rtt ms, expected about $((2 * DELAY)) ms: link emulation is not working"
done
echo "train-bench: RTT min h1->h2..h$NHOSTS: ${RTTS[*]} ms"

tx_bytes() { nsx "h$1" cat /sys/class/net/eth0/statistics/tx_bytes; }
snapshot_tx() { local i; for i in $(seq 1 $NHOSTS); do tx_bytes "$i"; done; }

# wait_all NAME LOGDIR PID... : waits for every pid (all must exit 0) within $TIMEOUT seconds.
wait_all() {
  local name="$1" logdir="$2"; shift 2
  local pending=("$@") watchdog done_pid rc
  sleep "$TIMEOUT" & watchdog=$!
  while [ ${#pending[@]} -gt 0 ]; do
    rc=0; done_pid=""
    wait -n -p done_pid "${pending[@]}" "$watchdog" || rc=$?
    if [ "$done_pid" = "$watchdog" ]; then
      echo "train-bench: $name log tails:" >&2
      for f in "$logdir"/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
      die "$name did not finish within ${TIMEOUT}s (logs in $logdir; --timeout SECS)"
    fi
    [ -n "$done_pid" ] || continue
    if [ "$rc" -ne 0 ]; then
      kill "$watchdog" 2>/dev/null || true
      echo "train-bench: $name process $done_pid exited with status $rc; log tails:" >&2
      for f in "$logdir"/*.log; do echo "== $f" >&2; tail -n 15 "$f" >&2; done
      exit 1
    fi
    local keep=() p
    for p in "${pending[@]}"; do [ "$p" = "$done_pid" ] || keep+=("$p"); done
    pending=("${keep[@]:-}"); [ -n "${pending[0]:-}" ] || pending=()
  done
  kill "$watchdog" 2>/dev/null || true
  wait "$watchdog" 2>/dev/null || true
}

LOOM_TX_BEFORE=""; LOOM_TX_AFTER=""; LOOM_T0=0; LOOM_T1=0
DDP_TX_BEFORE=""; DDP_TX_AFTER=""; DDP_T0=0; DDP_T1=0

# --- loom ---------------------------------------------------------------------------------------
run_loom() {
  local dir="$OUT/loom"; rm -rf "$dir"; mkdir -p "$dir"
  cat >"$dir/manifest.yaml" <<EOF
job: bench-shakespeare
replicas: {min: $NHOSTS, max: $NHOSTS}
model: {kind: transformer, layers: $LAYERS, heads: $HEADS, width: $WIDTH, context: $CONTEXT}
dataset: {source: file, path: $DATA, vocab: char}
optimizer: {batch: $BATCH, lr: 0.001, beta1: 0.9, beta2: 0.99, weight_decay: 0.1, grad_clip: 1.0}
strategy: {kind: diloco, inner_steps: $INNER, outer_lr: $OUTER_LR, outer_momentum: $OUTER_MOMENTUM}
compression: {kind: topk, ratio: $RATIO, values: int8, feedback_decay: 0.95}
rounds: $ROUNDS
round_deadline: 60s
checkpoint_every: 0
eval_every: $EVAL_ROUNDS
resources: {device: cpu, threads: 1}
verification: {loss_check: $LOSS_CHECK}
EOF
  local i peer1 pids=()
  for i in $(seq 1 $NHOSTS); do mkdir -p "$dir/h$i"; done
  peer1="$("$LOOM_PEER" --data-dir "$dir/h1" id 2>"$dir/id.log" | tail -n 1 | tr -d '[:space:]')" \
    || die "loom-peer id failed: $(tail -n 1 "$dir/id.log")"
  [[ "$peer1" =~ ^[1-9A-HJ-NP-Za-km-z]{40,}$ ]] || die "loom-peer id printed '$peer1', not a PeerId"
  echo "train-bench: loom: $NHOSTS peers, $ROUNDS rounds x $INNER inner steps (peer 1: $peer1)"
  LOOM_TX_BEFORE="$(snapshot_tx)"
  LOOM_T0=$(now)
  for i in $(seq 1 $NHOSTS); do
    local extra=()
    [ "$i" -eq 1 ] || extra=(--bootstrap "/ip4/10.99.0.1/tcp/4001/p2p/$peer1")
    # `ip netns exec` in the background directly: $! is the peer's own pid (ip and env exec).
    ip netns exec "${P}h$i" env RUST_LOG="${LOOM_BENCH_LOG:-info}" "$LOOM_PEER" \
      --data-dir "$dir/h$i" train --manifest "$dir/manifest.yaml" \
      --listen "/ip4/10.99.0.$i/tcp/4001" --no-mdns --metrics-addr off \
      --progress "$dir/progress-h$i.jsonl" "${extra[@]}" >"$dir/h$i.log" 2>&1 &
    pids+=("$!"); PIDS+=("$!")
    if [ "$i" -eq 1 ]; then sleep 1; fi  # peer 1 listening before the others dial it
  done
  wait_all loom "$dir" "${pids[@]}"
  LOOM_T1=$(now)
  LOOM_TX_AFTER="$(snapshot_tx)"
}

# --- ddp ----------------------------------------------------------------------------------------
run_ddp() {
  local dir="$OUT/ddp"; rm -rf "$dir"; mkdir -p "$dir"
  echo "train-bench: ddp: $NHOSTS ranks, $STEPS steps (gloo all-reduce every step)"
  local i pids=()
  DDP_TX_BEFORE="$(snapshot_tx)"
  DDP_T0=$(now)
  for i in $(seq 1 $NHOSTS); do
    ip netns exec "${P}h$i" env GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS=1 \
      "$PY" -m torch.distributed.run --nnodes "$NHOSTS" --nproc-per-node 1 --node-rank $((i - 1)) \
      --master-addr 10.99.0.1 --master-port 29500 "$HERE/ddp_train.py" \
      --data "$DATA" --steps "$STEPS" --eval-every "$((EVAL_ROUNDS * INNER))" --batch "$BATCH" --context "$CONTEXT" \
      --layers "$LAYERS" --heads "$HEADS" --width "$WIDTH" --threads 1 --target-loss "$TARGET" \
      --progress "$dir/progress-h$i.jsonl" >"$dir/h$i.log" 2>&1 &
    pids+=("$!"); PIDS+=("$!")
  done
  wait_all ddp "$dir" "${pids[@]}"
  DDP_T1=$(now)
  DDP_TX_AFTER="$(snapshot_tx)"
}

# Plain `if`s: a function called on the left of || or && would run with set -e disabled.
if [ "$ONLY" != ddp ]; then run_loom; fi
if [ "$ONLY" != loom ]; then run_ddp; fi

# --- report -------------------------------------------------------------------------------------
json_list() { local x out=""; for x in "$@"; do out="$out${out:+, }$x"; done; echo "[$out]"; }
system_json() {  # name before after t0 t1
  # shellcheck disable=SC2206
  local b=($2) a=($3) d=() i
  [ -n "$2" ] || { echo null; return; }
  for i in "${!b[@]}"; do d+=($((a[i] - b[i]))); done
  echo "{\"tx_bytes\": $(json_list "${d[@]}"), \"process_wall_s\": $(awk -v a="$4" -v b="$5" 'BEGIN { printf "%.3f", b - a }')}"
}
cat >"$OUT/meta.json" <<EOF
{
  "hosts": $NHOSTS, "delay_ms_per_port": $DELAY, "rate_mbit": $RATE, "rtt_ms_min": $(json_list "${RTTS[@]}"),
  "rounds": $ROUNDS, "inner_steps": $INNER, "ddp_steps": $STEPS, "target_loss": $TARGET,
  "topk_ratio": $RATIO, "outer_lr": $OUTER_LR, "outer_momentum": $OUTER_MOMENTUM,
  "model": {"layers": $LAYERS, "heads": $HEADS, "width": $WIDTH, "context": $CONTEXT},
  "batch": $BATCH, "data": "$DATA",
  "loom": $(system_json loom "$LOOM_TX_BEFORE" "$LOOM_TX_AFTER" "$LOOM_T0" "$LOOM_T1"),
  "ddp": $(system_json ddp "$DDP_TX_BEFORE" "$DDP_TX_AFTER" "$DDP_T0" "$DDP_T1")
}
EOF
python3 "$HERE/report.py" "$OUT"
