#!/usr/bin/env bash
# A second test guest whose root disk is a Ceph RBD image, set up the way nova-compute does it with
# `[libvirt] images_type = rbd`: the instance disk is vms/<uuid>_disk (format 2, default
# features), imported from the same base content as the libvirt service's qcow2 guest; QEMU reads
# it directly through librbd as client.nova, whose key sits in a libvirt secret (usage ceph).
#
#   deploy/services/rbd-guest.sh install   ceph + libvirt installed, guest build present
#   deploy/services/rbd-guest.sh start     ceph + libvirt up (via services.sh), the rbd image
#                                          (imported once), the secret, then define + start the
#                                          domain and wait until the guest is ready
#   deploy/services/rbd-guest.sh check     domain running, qemu-ga answers
#   deploy/services/rbd-guest.sh stop      destroy + undefine the domain, remove the secret; the
#                                          rbd image is kept (the writer resumes on it)
#   deploy/services/rbd-guest.sh purge     stop, then delete the rbd image and the state dir
#   deploy/services/rbd-guest.sh status    one line
#   deploy/services/rbd-guest.sh domain-xml NAME UUID TITLE POOL/IMAGE CONSOLE [CMDLINE...]
#                                          print the XML of another guest like this one (same
#                                          kernel, initramfs, cmdline, secret and monitor) on
#                                          another rbd image, CMDLINE appended to the kernel's:
#                                          tests boot guests from clones with it; defines nothing
#
# The guest is the libvirt service's guest (deploy/guest: same kernel, initramfs, cmdline,
# layout.h, writer, qemu-ga, console markers) with another name and UUID and an rbd disk:
#   <disk type='network'> <driver type='raw' cache='writeback' discard='unmap'/>
#   <source protocol='rbd' name='vms/<uuid>_disk'><host name='127.0.0.1' port='6789'/></source>
#   <auth username='nova'><secret type='ceph' uuid='...'/></auth>
# The monitor is the v1 (port 6789) address of ceph.conf's mon_host, as nova lists it. QEMU gets
# no ceph.conf: like on a compute node without /etc/ceph/ceph.conf, everything it needs (monitor,
# user, key) comes from the domain XML. Only this script's domain and secret are touched; ceph
# and libvirt are left running by stop.
#
# Facts go into $(svc_dir rbd-guest)/env: RBD_GUEST_NAME, RBD_GUEST_UUID, RBD_GUEST_DISK
# (vms/<uuid>_disk), RBD_GUEST_POOL, RBD_GUEST_IMAGE, RBD_GUEST_CONSOLE_LOG, RBD_SECRET_UUID,
# RBD_SECRET_USAGE, RBD_GUEST_MON_HOST, RBD_GUEST_DOMTYPE, RBD_GUEST_DISK_DEV, RBD_GUEST_LAYOUT_H,
# RBD_GUEST_WRITER_WPS, RBD_GUEST_HB_MS, RBD_GUEST_BOOT_MS, RBD_GUEST_IMPORT_MS, LIBVIRT_URI,
# CEPH_CONF, and the LAYOUT_* constants (ca-imgcheck checks an `rbd export` of the disk).
#
# Environment: CA_GUEST_WPS (200), CA_GUEST_HB_MS (100), CA_GUEST_BOOT_TIMEOUT (180 s).
set -euo pipefail
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=rbd-guest
# shellcheck source=SCRIPTDIR/../lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

REPO=$(cd "$CA_DEPLOY_ROOT/.." && pwd)
STATE=$(svc_dir rbd-guest)
URI=qemu:///system
GUEST_NAME=instance-00000002
GUEST_UUID=7a2e5b1c-3d4f-4e6a-8b9c-0d1e2f3a4b5c
GUEST_TITLE="compute-agent rbd test guest"
GUEST_MEM_MB=256
GUEST_WPS=${CA_GUEST_WPS:-200}
GUEST_HB_MS=${CA_GUEST_HB_MS:-100}
BOOT_TIMEOUT=${CA_GUEST_BOOT_TIMEOUT:-180}
SECRET_UUID=3c8e1f2a-9b7d-4e5c-a1f0-6d2b4c8e9a71
SECRET_USAGE="compute-agent rbd-guest client.nova secret"
POOL=vms
IMAGE=${GUEST_UUID}_disk
RBD_DISK=$POOL/$IMAGE
INST=$STATE/instances/$GUEST_UUID
CONSOLE=$INST/console.log
BUILD=$(svc_dir libvirt)/guest
QEMU_BIN=/usr/bin/qemu-system-x86_64
# Same as deploy/services/libvirt.sh.
KCMDLINE="console=ttyS0 quiet panic=-1 cryptomgr.notests"

build_fact() { sed -n "s/^$1=//p" "$BUILD/build.env"; }
vsh() { timeout 60 virsh -q -c "$URI" "$@"; }
libvirtd_answers() { timeout 10 virsh -q -c "$URI" version > /dev/null 2>&1; }
dom_state() { vsh domstate "$GUEST_UUID" 2> /dev/null | head -1; }
dom_exists() { vsh dominfo "$GUEST_UUID" > /dev/null 2>&1; }
agent_ping() {
    vsh qemu-agent-command --timeout 5 "$GUEST_UUID" '{"execute":"guest-ping"}' > /dev/null 2>&1
}
last_hb_seq() {
    tail -c 8192 "$CONSOLE" 2> /dev/null | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' |
        tail -1 | cut -d= -f2
}
hb_beyond() { local s; s=$(last_hb_seq); [ -n "$s" ] && [ "$s" -gt "$1" ]; }
qemu_pid() {
    local pid
    pid=$(cat "/run/libvirt/qemu/$GUEST_NAME.pid" 2> /dev/null) || return 1
    pid_alive "$pid" && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "guest=$GUEST_NAME," &&
        echo "$pid"
}

# Ceph, as client.nova with nothing but the cluster's conf (as nova's rbd_utils does it).
load_ceph() {
    CEPH_CONF=
    svc_load_env ceph
    [ -r "${CEPH_CONF:-}" ] || die "no readable CEPH_CONF in $(svc_dir ceph)/env"
}
rbd_nova() { timeout 300 rbd --conf "$CEPH_CONF" --id nova "$@"; }
image_exists() { rbd_nova info "$RBD_DISK" > /dev/null 2>&1; }

# mon_v1 HOSTVAR PORTVAR: the v1 monitor address from ceph.conf's mon_host
# ("[v2:127.0.0.1:3300,v1:127.0.0.1:6789]"). QEMU's rbd driver hands libvirt's <host> entries to
# librados as plain host:port, which librados reads as msgr v1 unless the port is 3300.
mon_v1() {
    local line
    line=$(sed -n 's/^[[:space:]]*mon_host[[:space:]]*=[[:space:]]*//p' "$CEPH_CONF" | head -1)
    if [[ "$line" =~ v1:([0-9.]+):([0-9]+) ]]; then
        MON_HOST=${BASH_REMATCH[1]}
        MON_PORT=${BASH_REMATCH[2]}
    else
        die "no v1 monitor address in mon_host = '$line' ($CEPH_CONF)"
    fi
}

# --- dependencies -----------------------------------------------------------------------------

guest_build_present() {
    [ -r "$BUILD/build.env" ] && [ -r "$BUILD/base.qcow2" ] &&
        [ -r "$(build_fact GUEST_KERNEL)" ] && [ -r "$(build_fact GUEST_INITRD)" ]
}

# ensure_deps: ceph healthy and libvirtd answering with the guest build present; otherwise bring
# them up through services.sh. A libvirt that already answers is not "started" again: its start
# would also wait on (and possibly resume) the first guest, which tests may be holding paused.
ensure_deps() {
    local need=()
    "$CA_DEPLOY_ROOT/services/ceph.sh" check > /dev/null 2>&1 || need+=(ceph)
    if ! libvirtd_answers || ! guest_build_present || [ ! -r "$(svc_dir libvirt)/env" ]; then
        need+=(libvirt)
    fi
    if [ ${#need[@]} -gt 0 ]; then
        log "bringing up ${need[*]}"
        "$CA_DEPLOY_ROOT/services.sh" up "${need[@]}" || die "services.sh up ${need[*]} failed"
    fi
    guest_build_present || die "no guest build in $BUILD (deploy/services/libvirt.sh install)"
    # A changed /init, writer or kernel reaches the next boot without stopping any guest (the
    # base image, which running guests sit on, is left alone: --keep-base).
    if ! "$REPO/deploy/guest/build.sh" --check "$BUILD"; then
        "$REPO/deploy/guest/build.sh" --keep-base "$BUILD" ||
            log "WARNING: the guest build in $BUILD is stale, booting what is there"
    fi
}

# --- the rbd image ----------------------------------------------------------------------------

# ensure_image: vms/<uuid>_disk from the base image's content, once. Imported under a temporary
# name and renamed, so an interrupted import never passes for the instance disk.
ensure_image() {
    local stamp t0 tmpname raw have
    stamp=$(cat "$BUILD/base.qcow2.stamp" 2> /dev/null || echo unknown)
    if image_exists; then
        have=$(rbd_nova image-meta get "$RBD_DISK" ca.base-stamp 2> /dev/null || true)
        if [ "$have" != "$stamp" ]; then
            log "WARNING: $RBD_DISK was imported from another base build ($have, now $stamp);" \
                "'$0 purge' then start to re-import"
        fi
        return 0
    fi
    t0=$(svc_time_ms)
    tmpname=$IMAGE.importing
    raw=$STATE/import.raw
    mkdir -p "$STATE"
    rbd_nova rm "$POOL/$tmpname" > /dev/null 2>&1 || true
    rm -f "$raw"
    # Nova's images_type=rbd path for a non-rbd Glance image: fetch, convert to raw, rbd import.
    qemu-img convert -q -f qcow2 -O raw "$BUILD/base.qcow2" "$raw"
    rbd_nova import --image-format 2 --no-progress "$raw" "$POOL/$tmpname" > /dev/null ||
        { rm -f "$raw"; die "rbd import into $POOL/$tmpname failed"; }
    rm -f "$raw"
    rbd_nova image-meta set "$POOL/$tmpname" ca.base-stamp "$stamp" > /dev/null
    rbd_nova rename "$POOL/$tmpname" "$RBD_DISK" ||
        die "rbd rename $POOL/$tmpname -> $RBD_DISK failed"
    svc_set_env rbd-guest RBD_GUEST_IMPORT_MS "$(($(svc_time_ms) - t0))"
    log "imported $BUILD/base.qcow2 as $RBD_DISK in $(($(svc_time_ms) - t0)) ms"
}

# --- the libvirt secret -----------------------------------------------------------------------

secret_xml() {
    cat <<EOF
<secret ephemeral='no' private='yes'>
  <uuid>$SECRET_UUID</uuid>
  <description>client.nova key for the compute-agent rbd test guest</description>
  <usage type='ceph'>
    <name>$SECRET_USAGE</name>
  </usage>
</secret>
EOF
}

secret_ours() {
    vsh secret-dumpxml "$SECRET_UUID" 2> /dev/null | grep -qF "<name>$SECRET_USAGE</name>"
}

# ensure_secret: define the secret (once) and (re)set its value to client.nova's current key: a
# recreated cluster has new keys. The key goes to virsh on stdin, never on a command line.
ensure_secret() {
    local key
    mkdir -p "$STATE"
    if ! secret_ours; then
        secret_xml > "$STATE/secret.xml"
        vsh secret-define "$STATE/secret.xml" > /dev/null ||
            die "virsh secret-define failed (another secret with UUID $SECRET_UUID or usage" \
                "'$SECRET_USAGE'?)"
        touch "$STATE/secret.defined"
    fi
    key=$(ceph-authtool "$CEPH_NOVA_KEYRING" --name client.nova --print-key 2> /dev/null) ||
        key=${CEPH_NOVA_KEY:-}
    [ -n "$key" ] || die "no key for client.nova"
    # Without --plain virsh base64-decodes the file: a cephx key is already base64.
    printf '%s' "$key" | vsh secret-set-value "$SECRET_UUID" --file /dev/stdin > /dev/null ||
        die "virsh secret-set-value failed"
}

# --- the domain -------------------------------------------------------------------------------

domain_xml() {
    local type=$1 cmdline=$2
    cat <<EOF
<domain type='$type'>
  <name>$GUEST_NAME</name>
  <uuid>$GUEST_UUID</uuid>
  <title>$GUEST_TITLE</title>
  <memory unit='MiB'>$GUEST_MEM_MB</memory>
  <currentMemory unit='MiB'>$GUEST_MEM_MB</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$(build_fact GUEST_KERNEL)</kernel>
    <initrd>$(build_fact GUEST_INITRD)</initrd>
    <cmdline>$cmdline</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$QEMU_BIN</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback' discard='unmap'/>
      <source protocol='rbd' name='$RBD_DISK'>
        <host name='$MON_HOST' port='$MON_PORT'/>
      </source>
      <auth username='nova'>
        <secret type='ceph' uuid='$SECRET_UUID'/>
      </auth>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='$CONSOLE' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# wait_guest_ready [booting]: as libvirt.sh: the ready marker after a fresh boot, then qemu-ga
# and an advancing writer.
wait_guest_ready() {
    local s
    if [ "${1:-}" = booting ]; then
        wait_for "$BOOT_TIMEOUT" "the guest's ready marker in $CONSOLE" \
            grep -qa CA-GUEST-READY "$CONSOLE" || return 1
    fi
    wait_for 60 "qemu-ga to answer guest-ping" agent_ping || return 1
    wait_for 60 "a writer heartbeat" hb_beyond 0 || return 1
    s=$(last_hb_seq)
    wait_for 30 "the writer to advance past seq $s" hb_beyond "$s" || return 1
}

start_guest() {
    local domtype=$1 state t0 cmdline
    state=$(dom_state || true)
    case "$state" in
        running) ;;
        paused)
            # shellcheck disable=SC2016 # expanded by eval, on each poll
            if ! wait_for 30 "the paused guest to be resumed" \
                    eval '[ "$(dom_state)" != paused ]'; then
                log "guest was left paused, resuming"
                vsh resume "$GUEST_UUID" > /dev/null
            fi
            ;;
        *)
            if vsh dominfo "$GUEST_NAME" > /dev/null 2>&1 && ! dom_exists; then
                die "a domain named $GUEST_NAME with another UUID exists; not touching it"
            fi
            mkdir -p "$INST"
            cmdline="$KCMDLINE ca.wps=$GUEST_WPS ca.hb_ms=$GUEST_HB_MS"
            domain_xml "$domtype" "$cmdline" > "$STATE/domain.xml"
            vsh define "$STATE/domain.xml" > /dev/null || die "virsh define failed"
            touch "$STATE/domain.defined"
            : > "$CONSOLE"
            t0=$(svc_time_ms)
            vsh start "$GUEST_UUID" > /dev/null || die "virsh start $GUEST_NAME failed"
            log "guest $GUEST_NAME started ($domtype, disk rbd:$RBD_DISK), waiting for it to boot"
            wait_guest_ready booting || { tail -20 "$CONSOLE" >&2; return 1; }
            svc_set_env rbd-guest RBD_GUEST_BOOT_MS "$(($(svc_time_ms) - t0))"
            log "guest up in $(($(svc_time_ms) - t0)) ms" \
                "($(grep -a -m1 -o 'CA-GUEST-READY uptime=[0-9.]*' "$CONSOLE")," \
                "$(grep -a -m1 -o 'resume_after=[0-9]*' "$CONSOLE" || true))"
            return 0
            ;;
    esac
    wait_guest_ready || { tail -20 "$CONSOLE" >&2; return 1; }
}

write_env() {
    local domtype=$1 k v
    svc_set_env rbd-guest LIBVIRT_URI "$URI"
    svc_set_env rbd-guest CEPH_CONF "$CEPH_CONF"
    svc_set_env rbd-guest RBD_GUEST_NAME "$GUEST_NAME"
    svc_set_env rbd-guest RBD_GUEST_UUID "$GUEST_UUID"
    svc_set_env rbd-guest RBD_GUEST_DOMTYPE "$domtype"
    svc_set_env rbd-guest RBD_GUEST_POOL "$POOL"
    svc_set_env rbd-guest RBD_GUEST_IMAGE "$IMAGE"
    svc_set_env rbd-guest RBD_GUEST_DISK "$RBD_DISK"
    svc_set_env rbd-guest RBD_GUEST_DISK_DEV vda
    svc_set_env rbd-guest RBD_GUEST_MON_HOST "$MON_HOST:$MON_PORT"
    svc_set_env rbd-guest RBD_GUEST_CONSOLE_LOG "$CONSOLE"
    svc_set_env rbd-guest RBD_SECRET_UUID "$SECRET_UUID"
    svc_set_env rbd-guest RBD_SECRET_USAGE "$SECRET_USAGE"
    svc_set_env rbd-guest RBD_GUEST_LAYOUT_H "$REPO/deploy/guest/layout.h"
    svc_set_env rbd-guest RBD_GUEST_WRITER_WPS "$GUEST_WPS"
    svc_set_env rbd-guest RBD_GUEST_HB_MS "$GUEST_HB_MS"
    svc_set_env rbd-guest RBD_GUEST_DISK_MB "$(build_fact GUEST_DISK_MB)"
    while IFS='=' read -r k v; do
        case "$k" in LAYOUT_*) svc_set_env rbd-guest "$k" "$v" ;; esac
    done < "$BUILD/build.env"
}

guest_domtype() {
    local t=${CA_GUEST_DOMTYPE:-}
    if [ -z "$t" ]; then
        t=$(GUEST_DOMTYPE=; svc_load_env libvirt; echo "${GUEST_DOMTYPE:-}")
    fi
    echo "${t:-qemu}"
}

do_install() {
    "$CA_DEPLOY_ROOT/services/ceph.sh" install
    "$CA_DEPLOY_ROOT/services/libvirt.sh" install
}

do_start() {
    local domtype
    ensure_deps
    load_ceph
    mon_v1
    domtype=$(guest_domtype)
    case "$(dom_state || true)" in
        running | paused) ;;
        *)
            ensure_image
            ensure_secret
            ;;
    esac
    write_env "$domtype"
    start_guest "$domtype"
}

# --- check / stop / status --------------------------------------------------------------------

do_check() {
    libvirtd_answers || { log "check: libvirtd does not answer on $URI"; return 1; }
    [ "$(dom_state)" = running ] ||
        { log "check: guest $GUEST_NAME is '$(dom_state || true)', not running"; return 1; }
    agent_ping || { log "check: qemu-ga in $GUEST_NAME does not answer guest-ping"; return 1; }
}

do_stop() {
    if ! libvirtd_answers; then
        log "libvirtd does not answer on $URI: nothing to stop"
        return 0
    fi
    # Ours: defined by this script (marker), or carrying its fixed UUID and title.
    if dom_exists && { [ -f "$STATE/domain.defined" ] ||
                       [ "$(vsh desc --title "$GUEST_UUID" 2> /dev/null)" = "$GUEST_TITLE" ]; }; then
        if [ "$(dom_state)" != "shut off" ]; then
            vsh destroy "$GUEST_UUID" > /dev/null || log "destroy $GUEST_NAME failed"
        fi
        vsh undefine "$GUEST_UUID" --managed-save --snapshots-metadata \
            --checkpoints-metadata > /dev/null || log "undefine $GUEST_NAME failed"
        log "guest $GUEST_NAME destroyed and undefined${1:+ (rbd image kept: $RBD_DISK)}"
    fi
    rm -f "$STATE/domain.defined"
    if secret_ours; then
        vsh secret-undefine "$SECRET_UUID" > /dev/null || log "secret-undefine $SECRET_UUID failed"
        log "secret $SECRET_UUID removed"
    fi
    rm -f "$STATE/secret.defined"
}

do_purge() {
    do_stop
    if "$CA_DEPLOY_ROOT/services/ceph.sh" check > /dev/null 2>&1; then
        load_ceph
        rbd_nova rm "$POOL/$IMAGE.importing" > /dev/null 2>&1 || true
        if image_exists; then
            # Unprotected snapshots only: a protected one has clones (an agent test's image in
            # pool images); those are not ours to delete.
            rbd_nova snap purge "$RBD_DISK" > /dev/null 2>&1 || true
            if rbd_nova rm --no-progress "$RBD_DISK" > /dev/null 2>&1; then
                log "rbd image $RBD_DISK removed"
            else
                log "could not remove $RBD_DISK (protected snapshots with clones?):" \
                    "$(rbd_nova snap ls "$RBD_DISK" 2>&1 | tail -n +2 | tr -s ' ' | head -3)"
            fi
        fi
    else
        log "ceph is not up: rbd image $RBD_DISK (if any) left in place"
    fi
    case "$STATE" in
        */rbd-guest) rm -rf "$STATE" ;;
        *) die "refusing to delete '$STATE'" ;;
    esac
    log "purged $STATE"
}

# do_domain_xml NAME UUID TITLE POOL/IMAGE CONSOLE [CMDLINE...]: see the header.
do_domain_xml() {
    [ $# -ge 5 ] || die "usage: $0 domain-xml NAME UUID TITLE POOL/IMAGE CONSOLE [CMDLINE...]"
    guest_build_present || die "no guest build in $BUILD (deploy/services/libvirt.sh install)"
    load_ceph
    mon_v1
    secret_ours || die "no libvirt secret $SECRET_UUID: '$0 start' first"
    GUEST_NAME=$1 GUEST_UUID=$2 GUEST_TITLE=$3 RBD_DISK=$4 CONSOLE=$5
    shift 5
    domain_xml "$(guest_domtype)" "$KCMDLINE ca.wps=$GUEST_WPS ca.hb_ms=$GUEST_HB_MS${*:+ $*}"
}

do_status() {
    local state seq pid
    if ! libvirtd_answers; then
        echo "rbd-guest: down (libvirtd does not answer)"
        return 3
    fi
    state=$(dom_state || true)
    seq=
    [ "$state" = running ] && seq=$(last_hb_seq || true)
    pid=$(qemu_pid || true)
    [ -n "$pid" ] && pid="$pid $(($(svc_rss_kb "$pid") / 1024)) MiB RSS"
    [ -n "$seq" ] && seq=", writer seq $seq"
    echo "rbd-guest: $GUEST_NAME ${state:-undefined} on rbd:$RBD_DISK${pid:+, qemu $pid}$seq"
    [ "$state" = running ] || return 3
}

lock() {
    mkdir -p "$STATE"
    exec 9> "$STATE/.lock"
    flock -w 600 9 || die "could not lock $STATE/.lock within 600 s"
}

case "${1:-}" in
    install) do_install ;;
    start) lock; do_start ;;
    check) do_check ;;
    stop) lock; do_stop keep ;;
    purge) lock; do_purge ;;
    status) do_status ;;
    domain-xml) shift; do_domain_xml "$@" ;;
    *) echo "usage: $0 install|start|check|stop|purge|status|domain-xml" >&2; exit 2 ;;
esac
