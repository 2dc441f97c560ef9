#!/usr/bin/env bash
# Installs what Loom needs on a fresh Debian machine: the system packages used by the build, the
# NAT lab and the tests, and PyTorch 2.13.0 for the trainer (scripts/setup-torch.sh). Safe to run again. Run as root (or with sudo available).
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGES=(build-essential pkg-config iproute2 nftables iptables ethtool python3 python3-venv iputils-ping
  clang libbpf-dev linux-libc-dev util-linux)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo (Rust 1.95) is required: https://rustup.rs" >&2; exit 1; }
# PyTorch for tch (cached outside the clone); prints nothing but the exports callers eval.
bash "$(dirname "$0")/setup-torch.sh" >/dev/null
echo "setup: ok"
