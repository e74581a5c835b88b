#!/usr/bin/env bash
# The test command: installs the system packages the suite needs, then checks formatting,
# lints and runs every test (unit, frontend, binary, and QEMU end-to-end once present).
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test --workspace"
cargo test --workspace -- --test-threads=2
