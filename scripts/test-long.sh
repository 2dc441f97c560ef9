#!/usr/bin/env bash
# The longer checks, beyond the README's test command: the consensus chaos simulation over 5,000
# seeds and 50 kill -9 cycles of the ledger on 5 peers, and any test marked #[ignore].
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
eval "$(bash scripts/setup-torch.sh)"
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --ignored --nocapture
cargo run --release --locked -p loom-simulations --bin loom-sim -- chaos --seeds 5000 --start 100000 \
  --json target/sim-chaos.json
./target/debug/loom-sim ledger --peers 5 --kills 50 --json target/sim-ledger.json
