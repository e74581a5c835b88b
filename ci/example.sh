#!/usr/bin/env bash
# The main job: the three-tier example (examples/three-tier.toml) on our own switch, with five
# real QEMU guests: web1 and web2 behind a load balancer, reachable from outside only on
# port 8080; app1 and app2 (8080) only from web; db1 (5432) only from app; everything else
# between the tiers is dropped and counted. The guests get their addresses by DHCP from the
# switch. It runs in a network namespace of its own ("vnet-3tier") whose uplink is a veth to
# this host, so the host's own networking is left as it is; this host plays "outside".
# Once the guests are up it prints the reachability matrix measured from inside them beside
# the policy. Ctrl-C takes it all down. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== system packages (QEMU, busybox, the guest kernel)"
bash ci/install-deps.sh example
echo "== building (the first build takes a few minutes)"
cargo build --release -q -p qemu-configs -p vhost-net-backend -p bridge-plugin -p integration --bins
echo "== the guest image"
guest=$(target/release/vnet-guest image)
kernel=$(awk '$1 == "kernel" {print $2}' <<<"$guest")
initrd=$(awk '$1 == "initrd" {print $2}' <<<"$guest")
accel=$(awk '$1 == "accel" {print $2}' <<<"$guest")

ns=vnet-3tier
run_dir=${RUN_DIR:-/run/vnet-3tier}
state=$run_dir/state
mkdir -p -m 700 "$run_dir"
up_pid=
cleanup() {
    # qemu-configs stops the guests, then the switch, which removes the host side.
    if [ -n "$up_pid" ] && kill -TERM "$up_pid" 2>/dev/null; then
        wait "$up_pid" || true
    fi
    up_pid=
    ip netns del "$ns" 2>/dev/null || true
    ip link del vnet-3t-out 2>/dev/null || true
}
stop() {
    cleanup
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

sed -e "s|@KERNEL@|$kernel|" -e "s|@INITRD@|$initrd|" -e "s|@ACCEL@|$accel|" \
    examples/three-tier.toml > "$run_dir/three-tier.toml"
vms=$(awk -F'"' '/^\[\[vm\]\]/ {getline; print $2}' "$run_dir/three-tier.toml")

echo "== booting $(echo $vms) ($accel) on the switch in namespace $ns"
# In the background, so that this script's traps run at once and pass the signal on.
ip netns exec "$ns" target/release/qemu-configs up "$run_dir/three-tier.toml" \
    --state-dir "$state" &
up_pid=$!
for vm in $vms; do
    until grep -qs READY "$state/$vm.log"; do
        kill -0 "$up_pid" 2>/dev/null || { echo "qemu-configs up stopped"; exit 1; }
        sleep 1
    done
    echo "   $vm is up"
done
echo "== waiting for the load balancer's health checks to pass"
for _ in $(seq 30); do
    n=$(ip netns exec "$ns" target/release/vhost-net-backend ctl --socket "$state/switch.ctl" \
        --json balancers | grep -o '"state":"up"' | wc -l || true)
    [ "$n" -ge 2 ] && break
    sleep 1
done
echo "== reachability measured from inside the guests, beside the policy"
ip netns exec "$ns" target/release/qemu-configs verify "$run_dir/three-tier.toml" \
    --state-dir "$state" || echo "(some cells differ from the policy: see above)"

cat <<INFO

three-tier is up on the switch. Try:
  from this host, web through the balancer:  printf 'GET / HTTP/1.0\r\n\r\n' | busybox nc -w 3 198.51.100.2 8080
  the switch:                                ip netns exec $ns target/release/vhost-net-backend ctl --socket $state/switch.ctl stats|rules|flows|leases|balancers
  a guest's console:                         socat - UNIX-CONNECT:$state/web1.console
  the flow log:                              $state/flows.log
Ctrl-C stops the guests, then the switch.
INFO
wait "$up_pid" || true
up_pid=
