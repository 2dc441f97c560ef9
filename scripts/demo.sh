#!/usr/bin/env bash
# The main job on its embedded default: installs what is missing (system packages, PyTorch in a
# cached virtualenv), builds loom-peer and runs the demo: 4 local peers on loopback train the
# built-in job together. Extra arguments go to `loom-peer demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
eval "$(bash scripts/setup-torch.sh)"
cargo build --locked --bin loom-peer
exec ./target/debug/loom-peer demo "$@"
