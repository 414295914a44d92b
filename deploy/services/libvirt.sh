#!/usr/bin/env bash
# libvirt + QEMU for the compute agent, with one running test guest that looks like a nova
# instance (fixed UUID, qcow2 overlay over a qcow2 base, qemu-ga channel) and writes a strictly
# sequential history to its disk, so snapshots of it can be checked (tests/tools/imgcheck.c).
#
#   deploy/services/libvirt.sh install   packages, libvirt-qemu user, dirs, qemu.conf, guest build
#   deploy/services/libvirt.sh start     virtlogd + libvirtd (PIDs recorded), then the guest
#   deploy/services/libvirt.sh check     libvirtd answers, guest running, qemu-ga answers
#   deploy/services/libvirt.sh stop      destroy + undefine the guest, stop libvirtd and virtlogd
#   deploy/services/libvirt.sh status    one line
#
# No libvirt-daemon-system here (RUNBOOK "libvirt + QEMU"): the daemons run in the foreground
# under setsid, qemu.conf runs QEMU as root without a security driver, and the KVM question is
# settled by really booting (KVM can be advertised and hang): the answer is cached in the state
# dir (delete domtype there, or set CA_GUEST_DOMTYPE=kvm|qemu, to redo or force it).
#
# Facts for tests and the agent go into $(svc_dir libvirt)/env: LIBVIRT_URI, GUEST_NAME,
# GUEST_UUID, GUEST_DOMTYPE, GUEST_BASE, GUEST_DISK, GUEST_DISK_DEV, GUEST_CONSOLE_LOG,
# GUEST_LAYOUT_H, GUEST_WRITER_WPS, GUEST_HB_MS, GUEST_BOOT_MS, and the LAYOUT_* constants.
#
# Environment: CA_GUEST_WPS (200), CA_GUEST_HB_MS (100), CA_GUEST_DISK_MB (256),
# CA_GUEST_DOMTYPE (probe), CA_GUEST_BOOT_TIMEOUT (120 s), CA_KVM_PROBE_TIMEOUT (10 s).
set -euo pipefail
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=libvirt
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/lib.sh"

REPO=$(cd "$CA_DEPLOY_ROOT/.." && pwd)
STATE=$(svc_dir libvirt)
URI=qemu:///system
GUEST_NAME=instance-00000001
GUEST_UUID=6f1d7a4c-2b1e-4c55-9a6e-0c1f2d3e4a5b
GUEST_TITLE="compute-agent test guest"
GUEST_MEM_MB=256
GUEST_WPS=${CA_GUEST_WPS:-200}
GUEST_HB_MS=${CA_GUEST_HB_MS:-100}
BOOT_TIMEOUT=${CA_GUEST_BOOT_TIMEOUT:-120}
KVM_PROBE_TIMEOUT=${CA_KVM_PROBE_TIMEOUT:-10}
PROBE_NAME=ca-kvm-probe
BUILD=$STATE/guest
INST=$STATE/instances/$GUEST_UUID
DISK=$INST/disk
CONSOLE=$INST/console.log
QEMU_BIN=/usr/bin/qemu-system-x86_64
# quiet: every console byte is an emulated UART write; cryptomgr.notests: the crypto self-tests
# cost ~0.7 s of a TCG boot.
KCMDLINE="console=ttyS0 quiet panic=-1 cryptomgr.notests"

# build_fact KEY: a value from the guest build's build.env (deploy/guest/build.sh).
build_fact() { sed -n "s/^$1=//p" "$BUILD/build.env"; }
vsh() { timeout 60 virsh -q -c "$URI" "$@"; }
libvirtd_answers() { timeout 10 virsh -q -c "$URI" version > /dev/null 2>&1; }
dom_state() { vsh domstate "$GUEST_UUID" 2> /dev/null | head -1; }
dom_exists() { vsh dominfo "$GUEST_UUID" > /dev/null 2>&1; }
agent_ping() {
    vsh qemu-agent-command --timeout 5 "$GUEST_UUID" '{"execute":"guest-ping"}' > /dev/null 2>&1
}
# last_hb_seq: the writer's newest heartbeat sequence number on the console (empty if none).
last_hb_seq() {
    tail -c 8192 "$CONSOLE" 2> /dev/null | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' |
        tail -1 | cut -d= -f2
}
hb_beyond() { local s; s=$(last_hb_seq); [ -n "$s" ] && [ "$s" -gt "$1" ]; }

# --- install ----------------------------------------------------------------------------------

QEMU_CONF_BODY='# Written by compute-agent deploy/services/libvirt.sh (no libvirt-daemon-system here):
# QEMU runs as root without a security driver and libvirt never chowns images, so test
# images stay owned by whoever made them. stdio_handler="file" keeps QEMU logs going even
# if virtlogd is gone.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"'

host_setup() {
    # libvirtd looks this user up before it reads qemu.conf.
    getent group libvirt-qemu > /dev/null || groupadd -r libvirt-qemu
    getent passwd libvirt-qemu > /dev/null ||
        useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
    mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/lib/libvirt/images \
        /var/cache/libvirt/qemu /run/libvirt
    if [ "$(cat /etc/libvirt/qemu.conf 2> /dev/null)" != "$QEMU_CONF_BODY" ]; then
        if [ -f /etc/libvirt/qemu.conf ] && [ ! -f /etc/libvirt/qemu.conf.ca-orig ]; then
            cp -p /etc/libvirt/qemu.conf /etc/libvirt/qemu.conf.ca-orig
        fi
        mkdir -p /etc/libvirt
        printf '%s\n' "$QEMU_CONF_BODY" > /etc/libvirt/qemu.conf.tmp
        mv /etc/libvirt/qemu.conf.tmp /etc/libvirt/qemu.conf
        log "wrote /etc/libvirt/qemu.conf (original kept as qemu.conf.ca-orig)"
        if svc_pid libvirt libvirtd > /dev/null; then
            log "libvirtd is running with the old qemu.conf: stop and start to apply it"
        fi
    fi
}

# guest_qemu_alive: the guest's QEMU process exists (asked without libvirtd, which may be
# starting, or gone while QEMU lives on).
guest_qemu_alive() {
    local pid
    pid=$(cat "/run/libvirt/qemu/$GUEST_NAME.pid" 2> /dev/null) || return 1
    pid_alive "$pid" && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "guest=$GUEST_NAME,"
}

build_guest() {
    if "$REPO/deploy/guest/build.sh" --check "$BUILD"; then
        return 0
    fi
    if [ -f "$BUILD/base.qcow2" ] && guest_qemu_alive; then
        # The running guest's overlay sits on base.qcow2; the kernel, initramfs and writer are
        # read at boot only and may be brought up to date under it (next boots use them).
        "$REPO/deploy/guest/build.sh" --keep-base "$BUILD" ||
            log "guest base image inputs changed but the guest is running: 'stop' then" \
                "'start' to rebuild"
        return 0
    fi
    "$REPO/deploy/guest/build.sh" "$BUILD"
}

have_binaries() {
    local b
    for b in libvirtd virtlogd virsh "$QEMU_BIN" qemu-img qemu-ga busybox cpio mke2fs depmod \
             modprobe gcc apt-get dpkg-deb; do
        command -v "$b" > /dev/null || return 1
    done
}

do_install() {
    "$CA_DEPLOY_ROOT/install-packages.sh" services
    host_setup
    build_guest
}

# --- start ------------------------------------------------------------------------------------

# spawn_daemon NAME: run daemon NAME in the foreground of its own session, PID recorded. The
# shell in between closes fd 9 (this script's lock, see lock()) and execs, keeping the PID.
spawn_daemon() {
    # shellcheck disable=SC2016 # $@ belongs to the inner shell
    svc_spawn libvirt "$1" "$STATE/logs/$1.log" sh -c 'exec 9>&-; exec "$@"' sh "$1"
}

# start_daemons: spawn virtlogd and libvirtd unless running; does not wait for them.
start_daemons() {
    mkdir -p "$STATE/logs"
    if svc_pid libvirt libvirtd > /dev/null; then
        :
    elif libvirtd_answers; then
        log "a libvirtd this script did not start answers on $URI: using it, will not stop it"
        return 0
    fi
    if ! svc_pid libvirt virtlogd > /dev/null; then
        spawn_daemon virtlogd
        log "virtlogd started (pid $(cat "$STATE/pids/virtlogd.pid"))"
    fi
    if ! svc_pid libvirt libvirtd > /dev/null; then
        spawn_daemon libvirtd
        log "libvirtd started (pid $(cat "$STATE/pids/libvirtd.pid"))"
    fi
}

# wait_daemons: libvirtd answers. Its first start probes QEMU's capabilities (~8 s, overlapped
# with the guest build); later starts read the cache (~0.5 s).
wait_daemons() {
    if ! wait_for 90 "libvirtd to answer on $URI" libvirtd_answers; then
        tail -5 "$STATE/logs/libvirtd.log" >&2 || true
        return 1
    fi
}

# domain_xml TYPE NAME UUID CMDLINE CONSOLE [DISK]: a direct-kernel-boot domain definition.
domain_xml() {
    local type=$1 name=$2 uuid=$3 cmdline=$4 console=$5 disk=${6:-}
    cat <<EOF
<domain type='$type'>
  <name>$name</name>
  ${uuid:+<uuid>$uuid</uuid>}
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
EOF
    if [ -n "$disk" ]; then
        cat <<EOF
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' io='native'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
EOF
    fi
    cat <<EOF
    <serial type='file'>
      <source path='$console' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# guest_domtype: kvm or qemu, cached per host kernel and QEMU version. KVM counts only if a KVM
# boot of the guest kernel reaches the probe marker on the console within KVM_PROBE_TIMEOUT.
guest_domtype() {
    local key cache=$STATE/domtype xml t0 result=qemu
    if [ -n "${CA_GUEST_DOMTYPE:-}" ]; then
        echo "$CA_GUEST_DOMTYPE"
        return 0
    fi
    key="$(uname -r) $("$QEMU_BIN" --version | head -1)"
    if [ -f "$cache" ] && [ "$(sed -n 2p "$cache")" = "$key" ]; then
        head -1 "$cache"
        return 0
    fi
    if [ -c /dev/kvm ] && vsh domcapabilities --virttype kvm > /dev/null 2>&1; then
        log "probing KVM by booting the guest kernel (up to ${KVM_PROBE_TIMEOUT}s)"
        vsh destroy "$PROBE_NAME" > /dev/null 2>&1 || true
        rm -f "$STATE/kvm-probe.console"
        xml=$STATE/kvm-probe.xml
        domain_xml kvm "$PROBE_NAME" "" "$KCMDLINE ca.probe=1" \
            "$STATE/kvm-probe.console" > "$xml"
        t0=$(svc_time_ms)
        if vsh create "$xml" > /dev/null 2>&1 &&
           wait_for "$KVM_PROBE_TIMEOUT" "the KVM probe guest" \
               grep -qa CA-PROBE-READY "$STATE/kvm-probe.console"; then
            result=kvm
        fi
        vsh destroy "$PROBE_NAME" > /dev/null 2>&1 || true
        log "KVM probe: $result after $(($(svc_time_ms) - t0)) ms"
    else
        log "no usable /dev/kvm: TCG"
    fi
    printf '%s\n%s\n' "$result" "$key" > "$cache"
    echo "$result"
}

# ensure_overlay: the instance disk, a qcow2 overlay over the base; recreated (history lost)
# only when the base was rebuilt.
ensure_overlay() {
    local stamp
    stamp=$(cat "$BUILD/base.qcow2.stamp")
    mkdir -p "$INST"
    if [ -f "$DISK" ] && [ "$(cat "$INST/disk.base-stamp" 2> /dev/null)" = "$stamp" ]; then
        return 0
    fi
    rm -f "$DISK"
    qemu-img create -q -f qcow2 -F qcow2 -b "$BUILD/base.qcow2" "$DISK"
    echo "$stamp" > "$INST/disk.base-stamp"
    log "created overlay $DISK over $BUILD/base.qcow2"
}

# wait_guest_ready [booting]: after a fresh boot, the init's ready marker first; a guest that was
# already running (possibly restored from a managed save, whose console file QEMU reopened) is
# ready when its agent answers and its writer advances.
wait_guest_ready() {
    local s
    if [ "${1:-}" = booting ]; then
        wait_for "$BOOT_TIMEOUT" "the guest's ready marker in $CONSOLE" \
            grep -qa CA-GUEST-READY "$CONSOLE" || return 1
    fi
    wait_for 60 "qemu-ga to answer guest-ping" agent_ping || return 1
    wait_for 30 "a writer heartbeat" hb_beyond 0 || return 1
    s=$(last_hb_seq)
    wait_for 30 "the writer to advance past seq $s" hb_beyond "$s" || return 1
}

start_guest() {
    local domtype=$1 state t0 cmdline
    state=$(dom_state || true)
    case "$state" in
        running)
            ;;
        paused)
            # Maybe a test's short pause (suspend + copy): give it time before calling the
            # pause a leftover and resuming.
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
            ensure_overlay
            cmdline="$KCMDLINE ca.wps=$GUEST_WPS ca.hb_ms=$GUEST_HB_MS"
            domain_xml "$domtype" "$GUEST_NAME" "$GUEST_UUID" "$cmdline" "$CONSOLE" "$DISK" \
                > "$STATE/domain.xml"
            vsh define "$STATE/domain.xml" > /dev/null
            touch "$STATE/domain.defined"
            : > "$CONSOLE"
            t0=$(svc_time_ms)
            vsh start "$GUEST_UUID" > /dev/null
            log "guest $GUEST_NAME started ($domtype), waiting for it to boot"
            wait_guest_ready booting || { tail -20 "$CONSOLE" >&2; return 1; }
            svc_set_env libvirt GUEST_BOOT_MS "$(($(svc_time_ms) - t0))"
            log "guest up in $(($(svc_time_ms) - t0)) ms ($(grep -a -m1 -o 'CA-GUEST-READY uptime=[0-9.]*' "$CONSOLE"))"
            return 0
            ;;
    esac
    wait_guest_ready || { tail -20 "$CONSOLE" >&2; return 1; }
}

write_env() {
    local domtype=$1 k v
    svc_set_env libvirt LIBVIRT_URI "$URI"
    svc_set_env libvirt GUEST_NAME "$GUEST_NAME"
    svc_set_env libvirt GUEST_UUID "$GUEST_UUID"
    svc_set_env libvirt GUEST_DOMTYPE "$domtype"
    svc_set_env libvirt GUEST_BASE "$BUILD/base.qcow2"
    svc_set_env libvirt GUEST_DISK "$DISK"
    svc_set_env libvirt GUEST_DISK_DEV vda
    svc_set_env libvirt GUEST_CONSOLE_LOG "$CONSOLE"
    svc_set_env libvirt GUEST_LAYOUT_H "$REPO/deploy/guest/layout.h"
    svc_set_env libvirt GUEST_WRITER_WPS "$GUEST_WPS"
    svc_set_env libvirt GUEST_HB_MS "$GUEST_HB_MS"
    # build.env: GUEST_KERNEL, GUEST_INITRD, GUEST_KERNEL_VERSION, GUEST_KERNEL_DEB,
    # GUEST_DISK_MB, LAYOUT_*.
    while IFS='=' read -r k v; do
        [ -n "$k" ] && svc_set_env libvirt "$k" "$v"
    done < "$BUILD/build.env"
}

do_start() {
    local domtype
    if ! have_binaries; then
        "$CA_DEPLOY_ROOT/install-packages.sh" services
    fi
    host_setup
    start_daemons
    build_guest
    wait_daemons
    domtype=$(guest_domtype)
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
    if libvirtd_answers; then
        vsh destroy "$PROBE_NAME" > /dev/null 2>&1 || true
        # Ours: defined by this script (marker), or carrying its fixed UUID and title (the
        # marker is gone if the state dir was wiped under a running guest).
        if dom_exists && { [ -f "$STATE/domain.defined" ] ||
                           [ "$(vsh desc --title "$GUEST_UUID" 2> /dev/null)" = "$GUEST_TITLE" ]; }; then
            if [ "$(dom_state)" != "shut off" ]; then
                vsh destroy "$GUEST_UUID" > /dev/null || log "destroy $GUEST_NAME failed"
            fi
            # Snapshot/checkpoint metadata and managed saves left by tests would block undefine.
            vsh undefine "$GUEST_UUID" --managed-save --snapshots-metadata \
                --checkpoints-metadata > /dev/null || log "undefine $GUEST_NAME failed"
            log "guest $GUEST_NAME destroyed and undefined (disk kept: $DISK)"
        fi
        rm -f "$STATE/domain.defined"
    fi
    svc_stop_pid libvirt libvirtd 15
    svc_stop_pid libvirt virtlogd
}

do_status() {
    local d l state="" seq
    d=$(svc_pid libvirt libvirtd || true)
    l=$(svc_pid libvirt virtlogd || true)
    if libvirtd_answers; then
        state=$(dom_state || true)
        seq=$(last_hb_seq || true)
        echo "libvirt: up (libvirtd ${d:-not ours}, virtlogd ${l:-none}), guest $GUEST_NAME" \
             "${state:-undefined}${seq:+, writer seq $seq}"
    else
        echo "libvirt: down${d:+ (libvirtd pid $d not answering)}"
    fi
}

# One start/stop/install at a time (tests running in parallel all call 'up').
lock() {
    mkdir -p "$STATE"
    exec 9> "$STATE/.lock"
    flock 9
}

case "${1:-}" in
    install) lock; do_install ;;
    start) lock; do_start ;;
    check) do_check ;;
    stop) lock; do_stop ;;
    status) do_status ;;
    *) echo "usage: $0 install|start|check|stop|status" >&2; exit 2 ;;
esac
