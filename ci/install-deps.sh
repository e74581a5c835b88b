#!/usr/bin/env bash
# System packages the tests need, installed from Debian's registry (run as root; CI does).
# Idempotent: a second run installs nothing new.
#  - qemu-system-x86, busybox-static, iperf3, ethtool, iputils-ping: guests and the guest
#    image built from them (integration::guest_image);
#  - nftables, iproute2, util-linux (setpriv), libcap2-bin (setcap): bridge-plugin and its
#    namespace tests;
#  - dpdk-dev (dpdk-testpmd) with the vhost PMD (reference backend) and the virtio PMD (a
#    foreign frontend: tests/foreign_frontend.rs, vnet-bench), and openvswitch-switch-dpdk (OVS-DPDK,
#    plain and with a conntrack firewall): the benchmark's reference backends;
#  - the tests run guests on QEMU 7.2 (bookworm) and QEMU 10 (bookworm-backports): the
#    system QEMU is bookworm's 7.2 unless the machine already has QEMU 10's qemu-utils
#    (which breaks 7.2's qemu-system-common), and the other version is unpacked beside it
#    under target/vnet-cache/qemu<VERSION> (VNET_QEMU=7.2|10 selects one).
# `install-deps.sh example` installs only what the three-tier example needs (no DPDK, no
# second QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (Rust toolchain)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
packages=(busybox-static iperf3 ethtool iputils-ping socat nftables iproute2 util-linux libcap2-bin)
if [ "${1:-}" != example ]; then
    # libvirt-clients: virt-xml-validate (and xmllint, which it runs), for rendered libvirt domains;
    # tcpdump reads back the switch's capture files.
    packages+=(tcpdump dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23 openvswitch-switch-dpdk libvirt-clients libxml2-utils)
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

backports=/etc/apt/sources.list.d/vnet-bookworm-backports.sources
need_update=0
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    need_update=1
fi
# The guest image needs the current cloud kernel's package name from the lists.
if [ ${#missing[@]} -gt 0 ] || [ $need_update = 1 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The system QEMU: bookworm's 7.2, or backports' 10 where the machine's qemu-utils is 10
# already (bookworm's qemu-system-common is older than that qemu-utils accepts).
if ! command -v qemu-system-x86_64 >/dev/null; then
    if dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '^1:7\.2'; then
        release=bookworm
    elif dpkg-query -W -f='${Status}' qemu-utils 2>/dev/null | grep -q "install ok installed"; then
        release=bookworm-backports
    else
        release=bookworm
    fi
    echo "== installing qemu-system-x86 from $release"
    apt-get install -y -qq --no-install-recommends -t "$release" qemu-system-x86 >/dev/null
fi
system_version=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\.[0-9]*\).*/\1/p')

# The other version, unpacked with its own firmware and modules; its shared libraries come
# from bookworm itself.
unpack_qemu() {
    local version=$1 release=$2 dir=target/vnet-cache/qemu$1
    if [[ $system_version == "$version" || $system_version == "$version".* ]] \
            || [ -x "$dir/usr/bin/qemu-system-x86_64" ]; then
        return
    fi
    local libs=() lib
    for lib in $(apt-cache show "qemu-system-x86/$release" | sed -n 's/^Depends: //p' | head -1 \
            | tr ',' '\n' | sed 's/ *(.*//; s/^ *//; s/ *|.*//' | grep '^lib'); do
        dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "install ok installed" || libs+=("$lib")
    done
    if [ ${#libs[@]} -gt 0 ]; then
        echo "== installing QEMU $version's libraries: ${libs[*]}"
        apt-get install -y -qq --no-install-recommends "${libs[@]}" >/dev/null
    fi
    echo "== unpacking QEMU $version ($release) into $dir"
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q "qemu-system-x86/$release" \
        "qemu-system-common/$release" "qemu-system-data/$release" >/dev/null)
    mkdir -p "$dir"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dir"; done
    rm -rf "$tmp"
    if ldd "$dir/usr/bin/qemu-system-x86_64" | grep "not found"; then
        echo "QEMU $version lacks the libraries above" >&2
        exit 1
    fi
}
if [ "${1:-}" != example ]; then
    unpack_qemu 7.2 bookworm
    unpack_qemu 10 bookworm-backports
fi
echo "system QEMU: $(qemu-system-x86_64 --version | head -1)"
for dir in target/vnet-cache/qemu*; do
    [ -x "$dir/usr/bin/qemu-system-x86_64" ] || continue
    echo "$dir: $(QEMU_MODULE_DIR="$dir/usr/lib/x86_64-linux-gnu/qemu" "$dir/usr/bin/qemu-system-x86_64" --version | head -1)"
done
