#!/usr/bin/env bash
# The main job on its embedded default: installs what is missing, builds loom-peer and runs the
# demo (a local mesh of peers on loopback finding each other). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --locked --bin loom-peer
exec ./target/debug/loom-peer demo "$@"
