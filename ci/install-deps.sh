#!/usr/bin/env bash
# System packages the tests need. Idempotent; needs root (CI runs as root).
set -euo pipefail

need=()
command -v cargo >/dev/null || { echo "cargo is required (Rust toolchain)" >&2; exit 1; }
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
