#!/usr/bin/env bash
# The main job: build the switch and serve two example VM ports (web1, web2 on one segment)
# plus a control socket, until Ctrl-C. Attach VMs with the QEMU line from README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-/tmp/vnet}
mkdir -p "$RUN_DIR"
cargo build --release -q -p vhost-net-backend
exec target/release/vhost-net-backend \
    --port "name=web1,socket=$RUN_DIR/web1.sock,vlan=10" \
    --port "name=web2,socket=$RUN_DIR/web2.sock,vlan=10" \
    --control-socket "$RUN_DIR/control.sock" "$@"
