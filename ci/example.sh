#!/usr/bin/env bash
# The main job: the three-tier example (examples/three-tier.toml) with three real QEMU
# guests. web1 serves on port 80, reachable from outside only through NAT on port 8080;
# app1 (8080) only from web; db1 (5432) only from app; everything else between the tiers is
# dropped and counted. It runs in a network namespace of its own ("vnet-3tier"), whose
# uplink is a veth to this host, so the host's own networking is left as it is; this host
# plays "outside". Ctrl-C takes it all down. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash ci/install-deps.sh example
cargo build --release -q -p qemu-configs -p bridge-plugin -p integration --bins

guest=$(target/release/vnet-guest image)
kernel=$(awk '$1 == "kernel" {print $2}' <<<"$guest")
initrd=$(awk '$1 == "initrd" {print $2}' <<<"$guest")
accel=$(awk '$1 == "accel" {print $2}' <<<"$guest")

ns=vnet-3tier
run_dir=${RUN_DIR:-/run/vnet-3tier}
mkdir -p -m 700 "$run_dir"
up_pid=
cleanup() {
    ip netns del "$ns" 2>/dev/null || true
    ip link del vnet-3t-out 2>/dev/null || true
}
stop() {
    # qemu-configs stops the guests and removes the networks itself.
    [ -n "$up_pid" ] && kill -TERM "$up_pid" 2>/dev/null && wait "$up_pid"
    exit 0
}
cleanup
trap cleanup EXIT
trap stop INT TERM HUP
ip netns add "$ns"
ip link add vnet-3t-out type veth peer name up0 netns "$ns"
ip addr add 198.51.100.1/30 dev vnet-3t-out
ip link set vnet-3t-out up
ip -n "$ns" addr add 198.51.100.2/30 dev up0
ip -n "$ns" link set up0 up
ip -n "$ns" link set lo up
ip -n "$ns" route add default via 198.51.100.1

sed -e "s|@KERNEL@|$kernel|" -e "s|@INITRD@|$initrd|" -e "s|@ACCEL@|$accel|" -e "s|@UPLINK@|up0|" \
    examples/three-tier.toml > "$run_dir/three-tier.toml"

cat <<INFO
three-tier: booting web1, app1, db1 ($accel) in namespace $ns.
  from this host, web through NAT:  printf 'GET / HTTP/1.0\r\n\r\n' | busybox nc -w 3 198.51.100.2 8080
  a guest's console:                socat - UNIX-CONNECT:$run_dir/state/web1.console
                                    (then e.g.: printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 10.10.3.10 5432   # denied)
  allowed and dropped, counted:     kill -USR1 \$(pgrep -f 'qemu-configs up')
  Ctrl-C stops the guests and removes the networks.
INFO
# In the background, so that this script's traps run at once and pass the signal on.
ip netns exec "$ns" target/release/qemu-configs up "$run_dir/three-tier.toml" \
    --state-dir "$run_dir/state" --helper "$PWD/target/release/qemu-bridge-plugin" &
up_pid=$!
wait "$up_pid"
