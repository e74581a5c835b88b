#!/usr/bin/env bash
# The test command: installs the system packages the suite needs, then checks formatting,
# lints and runs every test: unit, frontend, binary, network namespaces (root), and QEMU
# guests end to end on QEMU 7.2 and again on QEMU 10.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh

export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all --check
echo "== import cycles between the files of each crate (none allowed)"
for src in */src; do python3 ci/module-graph.py "$src" >/dev/null || python3 ci/module-graph.py "$src"; done
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build --workspace --bins (the tests run the backend binary)"
cargo build --workspace --bins
echo "== cargo test --workspace (QEMU 7.2 guests)"
VNET_QEMU=7.2 cargo test --workspace -- --test-threads=2 --nocapture
echo "== benchmark, short mode (one second per case)"
cargo build --release -q -p vhost-net-backend -p integration --bins
# Guest memory on 2 MiB pages, as the issue's reference figures were taken; the bench falls
# back to 4 KiB pages (and says so) where none can be reserved.
hugepages=$(cat /proc/sys/vm/nr_hugepages)
sysctl -qw vm.nr_hugepages=512 || true
target/release/vnet-bench --seconds 1
sysctl -qw vm.nr_hugepages="$hugepages" || true
echo "== end-to-end guests on QEMU 10"
VNET_QEMU=10 cargo test -p integration --test guests -- --nocapture
VNET_QEMU=10 cargo test -p bridge-plugin --test guest
VNET_QEMU=10 cargo test -p qemu-configs --test three_tier on_the_switch -- --nocapture
