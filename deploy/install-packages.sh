#!/usr/bin/env bash
# Installs every Debian 12 package the agent needs to build and the deploy/ services need to run.
# Idempotent: a second run with everything present does no apt work. A policy-rc.d that exits 101
# keeps apt from starting the services it installs; deploy/ starts them itself, on loopback.
#
# Usage: deploy/install-packages.sh [build|services|all]   (default: all)
set -euo pipefail

what=${1:-all}

BUILD_PKGS=(
    build-essential cmake pkg-config git
    librabbitmq-dev libjansson-dev libvirt-dev librados-dev librbd-dev
    libcurl4-openssl-dev libssl-dev libsqlite3-dev libinih-dev libnbd-dev zlib1g-dev
    clang libclang-rt-14-dev valgrind
)
SERVICE_PKGS=(
    rabbitmq-server amqp-tools
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
    qemu-system-x86 qemu-utils qemu-guest-agent qemu-block-extra
    busybox-static cpio e2fsprogs kmod libnbd-bin
    ceph-mon ceph-osd ceph-common
    glance-api
    python3-nova python3-oslo.messaging python3-libvirt
    curl procps iproute2 file
    gcc libc6-dev
    python3-matplotlib          # bench/rbd-bench.sh draws its chart
)

case "$what" in
    build) pkgs=("${BUILD_PKGS[@]}") ;;
    services) pkgs=("${SERVICE_PKGS[@]}") ;;
    all) pkgs=("${BUILD_PKGS[@]}" "${SERVICE_PKGS[@]}") ;;
    *) echo "usage: $0 [build|services|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-packages: all ${#pkgs[@]} packages present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-packages: need root to install: ${missing[*]}" >&2
    exit 1
fi

# Nothing installed here may start a daemon: we have no init system and want our own instances.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
# An update first: apt-cache and install find nothing useful on a machine that never updated.
stamp=/var/lib/apt/periodic/compute-agent-update-stamp
if [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +360 2>/dev/null)" ]; then
    apt-get update -q
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi
echo "install-packages: installing ${missing[*]}"
apt-get install -y -q --no-install-recommends "${missing[@]}"
