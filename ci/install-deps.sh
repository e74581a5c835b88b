#!/usr/bin/env bash
# System packages the tests need, installed from Debian's registry (run as root; CI does).
# Idempotent: a second run installs nothing new.
#  - qemu-system-x86 (7.2), busybox-static, iperf3, ethtool, iputils-ping: guests and the
#    guest image built from them (integration::guest_image);
#  - nftables, iproute2, util-linux (setpriv), libcap2-bin (setcap): bridge-plugin and its
#    namespace tests;
#  - dpdk-dev (dpdk-testpmd) with the vhost PMD: the benchmark's reference backend;
#  - QEMU 10 from bookworm-backports, unpacked beside 7.2 under target/vnet-cache/qemu10
#    (VNET_QEMU=10 selects it).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (Rust toolchain)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
packages=(qemu-system-x86 busybox-static iperf3 ethtool iputils-ping socat nftables iproute2 util-linux libcap2-bin
          dpdk-dev librte-net-vhost23 librte-mempool-ring23)
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

# QEMU 10's shared libraries come from bookworm itself.
q10libs=()
for lib in $(apt-cache show qemu-system-x86/bookworm-backports | sed -n 's/^Depends: //p' | head -1 \
        | tr ',' '\n' | sed 's/ *(.*//; s/^ *//; s/ *|.*//' | grep '^lib'); do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "install ok installed" || q10libs+=("$lib")
done
if [ ${#q10libs[@]} -gt 0 ]; then
    echo "== installing QEMU 10's libraries: ${q10libs[*]}"
    apt-get install -y -qq --no-install-recommends "${q10libs[@]}" >/dev/null
fi

q10=target/vnet-cache/qemu10
if [ ! -x "$q10/usr/bin/qemu-system-x86_64" ]; then
    echo "== unpacking QEMU 10 (bookworm-backports) into $q10"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q qemu-system-x86/bookworm-backports \
        qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports >/dev/null)
    mkdir -p "$q10"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$q10"; done
    rm -rf "$tmp"
fi
if ldd "$q10/usr/bin/qemu-system-x86_64" | grep "not found"; then
    echo "QEMU 10 lacks the libraries above" >&2
    exit 1
fi
"$q10/usr/bin/qemu-system-x86_64" --version | head -1
qemu-system-x86_64 --version | head -1
