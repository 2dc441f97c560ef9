#!/usr/bin/env bash
# The project's test command: set-up, build, lints, the whole test suite (unit, integration,
# the loopback mesh harness, and the NAT lab in network namespaces when run as root).
# LOOM_NAT_LAB_REPEAT=N repeats the NAT lab N times.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
eval "$(bash scripts/setup-torch.sh)"
cargo fmt --all -- --check
cargo build --workspace --bins --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast -- --nocapture 2>&1 | tee target/test.log
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "TOTAL: %d passed, %d failed\n", p, f }' target/test.log
