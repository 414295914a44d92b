#!/usr/bin/env bash
# RBD snapshot benchmark on the real services from deploy/ (RabbitMQ, Ceph, libvirt/QEMU, Glance
# with its rbd store): time from python3-nova's snapshot_instance cast to the image being active
# in Glance, for a Ceph instance disk with DATA GiB written, three contenders taking turns:
#
#   a  the direct path, [libvirt] images_rbd_flatten = background: snapshot + protect + clone into
#      Glance's pool + snap + protect, location registered, image active; the clone is flattened
#      afterwards (the time until that flatten ends is recorded too);
#   b  nova's sequence: the same direct path with images_rbd_flatten = sync (snapshot, protect,
#      clone, synchronous flatten, snapshot, protect, register), as nova's rbd direct_snapshot;
#   c  the streamed fallback: the base image has no rbd location and images_rbd_glance_pool is
#      unset, so the agent streams its rbd snapshot (extents from rbd_diff_iterate2) into Glance's
#      file store (format: the agent's default, the disk's own = raw, as nova uploads an rbd disk;
#      CA_BENCH_STREAM_FORMAT=qcow2 sets snapshot_image_format).
#
#   bench/rbd-bench.sh [BUILD_DIR]     (default build/release; built if missing)
#
# The casts are made exactly as tests/integration/test-snapshot-rbd.sh makes them (nova_client.py
# under /usr/bin/python3, image_hw_qemu_guest_agent=yes so the guest is frozen through qemu-ga),
# each image created first as nova-api does. The bench guest is its own: domain ca-rbd-bench-guest
# (fixed UUID, title "compute-agent rbd bench guest"), the test guest's kernel, initramfs and
# command line (writer and heartbeats running), its disk vms/<uuid>_disk in Ceph as nova lays it
# out (imported from the test guest's base, grown to CA_BENCH_VIRTUAL_GIB), attached as a libvirt
# rbd network disk through a libvirt secret of its own. DATA GiB of random data (a 64 MiB
# /dev/urandom block, repeated) is written at 128 MiB, clear of the writer's ring (16-48 MiB) and
# ext2 (64-96 MiB), with the guest stopped; sizes go up, so each size only adds to the previous
# one. The shared test guests (instance-00000001/2) are never touched.
#
# Per size, three release agents (one per contender, each its own host name and config) start
# fresh; then rounds a b c a b c ... (CA_BENCH_PAIRS rounds; c, which streams the whole virtual
# disk and takes minutes, only in the first CA_BENCH_FALLBACK_ROUNDS of them). Each run: the image is created,
# CA_BENCH_IDLE_S of idle, a watcher starts (every 100 ms: GET the image from Glance until it is
# active; the agent's CPU ticks and VmRSS, ceph-osd, glance-api and whole-machine CPU), the cast
# goes out, the bench waits for the agent's "done" line (and, for a, its "flattened" line), then
# deletes the image through Glance (which removes the rbd clone), waits until the OSD holds no
# more data than before the run (a's clone, whose snapshot predates its flatten, is freed by the
# OSD's snapshot trimming after the DELETE returns) and checks that nothing of the run is left in
# Ceph (no clone, no temporary snapshot on the instance disk).
#
# Measured per run: cast (the sender's time.time() before snapshot_instance) -> first Glance GET
# that shows the image active (the primary figure; 100 ms polls, so up to ~100 ms late), and ->
# the agent's "snapshot to image ... done" log line; for a, cast -> "image ... flattened"; the
# backend step, freeze window, upload time, bytes streamed (the agent's log lines), the clone's
# allocation after the flatten (rbd du), agent/ceph-osd/glance-api CPU seconds and machine busy %
# from cast to active, the agent's VmRSS at the cast and its peak (100 ms samples), VmHWM per
# size, the time Glance's DELETE of the image takes and the wait for the OSD's room. Reported per size and contender: median (min-max); and the
# median (min-max) over rounds of the pairwise ratios b/a and c/a of cast -> active.
# Output: markdown on stdout, saved with a header (machine, versions, load) as
# bench/results/rbd-<date>.md, plus bench/results/rbd-<date>.png (matplotlib) with the times and
# ratios and bench/results/rbd-<date>.json (the same figures, for bench/summarize.py). A run
# broken or held up from outside (a broker or Glance restarted by another job: the
# agent's log shows it losing RabbitMQ during the run) is redone; so is a run whose job failed in
# the agent (recorded in the results, and that agent restarted first). After 3 attempts the run
# is given up and named in the header.
#
# Ceph capacity: a size needs about DATA (the disk) + DATA (one flattened clone) + 1.5 GiB free
# on the OSD, plus the 5% its full ratio keeps back. CA_BENCH_CEPH chooses the cluster:
#   shared   the one deploy/services.sh runs (a size that does not fit is skipped, and named in
#            the header; an OSD made with the old 10G default grows to CA_CEPH_OSD_SIZE, 24G, the
#            next time deploy/services/ceph.sh starts it);
#   private  the bench's own: deploy/services/ceph.sh with CA_DEPLOY_DIR in the bench's state dir
#            (mon on 127.0.0.1:13300/16789, a CA_BENCH_OSD_SIZE (24G) sparse OSD) and its own
#            glance-api (deploy/services/glance.sh, GLANCE_INSTANCE=rbdbench on 127.0.0.1:19292)
#            with the rbd store in that cluster; both purged at the end;
#   auto     (default) shared if its OSD has room for the largest size, else private.
# Host disk: Glance's file store needs CA_BENCH_VIRTUAL_GIB free (contender c, raw); a private
# cluster's OSD file soon takes its whole size (bluestore spreads writes over the device and never
# punches holes into a file), so private needs CA_BENCH_OSD_SIZE more.
#
# CA_BENCH_BUDGET_MIN (0: none): no round starts once the bench has run that long; the results
# cover the rounds done (a size not reached is skipped), and the header says so.
#
# Environment: CA_BENCH_PAIRS (5), CA_BENCH_FALLBACK_ROUNDS (2), CA_BENCH_SIZES_GIB ("1 8"; e.g. "1 4 8"), CA_BENCH_VIRTUAL_GIB
# (10), CA_BENCH_IDLE_S (5), CA_BENCH_STREAM_FORMAT (empty: agent default), CA_BENCH_CEPH (auto),
# CA_BENCH_OSD_SIZE (24G), CA_BENCH_BUDGET_MIN (0), CA_BENCH_KEEP (1: keep the state dir's logs),
# CA_BENCH_RESULTS_DIR (bench/results), CA_BENCH_DATE (today, UTC: the date in the file names),
# CA_BENCH_SMOKE (1: 1 round, 1 GiB, a 2 GiB virtual disk; files named rbd-<date>-smoke.*).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=rbd-bench
build=${1:-$root/build/release}
if [ ! -x "$build/compute-agent" ]; then
    log "building the release agent"
    cmake -S "$root" --preset release > /dev/null &&
        cmake --build "$root/build/release" -j"$(nproc)" --target compute-agent > /dev/null
    build=$root/build/release
fi
if [ "${CA_BENCH_SMOKE:-0}" = 1 ]; then
    # The smallest run: the streamed contender sends the whole virtual disk.
    : "${CA_BENCH_PAIRS:=1}" "${CA_BENCH_SIZES_GIB:=1}" "${CA_BENCH_VIRTUAL_GIB:=2}"
fi
pairs=${CA_BENCH_PAIRS:-5}
# The streamed fallback (c) is no contender of nova's: it gets fewer rounds than the a/b pairs.
fallback_rounds=${CA_BENCH_FALLBACK_ROUNDS:-2}
sizes=${CA_BENCH_SIZES_GIB:-"1 8"}
virt_gib=${CA_BENCH_VIRTUAL_GIB:-10}
idle_s=${CA_BENCH_IDLE_S:-5}
stream_fmt=${CA_BENCH_STREAM_FORMAT:-}
ceph_mode=${CA_BENCH_CEPH:-auto}
priv_osd_size=${CA_BENCH_OSD_SIZE:-24G}
budget_min=${CA_BENCH_BUDGET_MIN:-0}
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py

NAME=ca-rbd-bench-guest
UUID=5d0c7e2a-8f41-4b6e-a3d9-1c2b3e4f5a6d
TITLE="compute-agent rbd bench guest"
SECRET_UUID=9e4b2c6d-0a1f-4d3e-8b5c-7f6a5e4d3c2b
SECRET_USAGE="compute-agent rbd-bench client.nova secret"
MEM_MB=256
QEMU_BIN=/usr/bin/qemu-system-x86_64
DATA_OFF_MB=128
POOL=vms
DISK=$POOL/${UUID}_disk
CONTENDERS=(a b c)
# The private cluster and Glance (CA_BENCH_CEPH=private).
PRIV_MON_PORT=13300
PRIV_MON_V1_PORT=16789
PRIV_GLANCE=rbdbench
PRIV_GLANCE_PORT=19292

case "$pairs" in '' | *[!0-9]* | 0) die "CA_BENCH_PAIRS must be a positive integer" ;; esac
case "$fallback_rounds" in '' | *[!0-9]*) die "CA_BENCH_FALLBACK_ROUNDS must be a number" ;; esac
# shellcheck disable=SC2086 # split on purpose
sizes=$(printf '%s\n' $sizes | sort -n -u | tr '\n' ' ')
for s in $sizes; do
    case "$s" in *[!0-9]* | 0) die "CA_BENCH_SIZES_GIB: '$s' is not a positive integer" ;; esac
    [ $((DATA_OFF_MB + s * 1024)) -le $((virt_gib * 1024)) ] ||
        die "$s GiB of data at ${DATA_OFF_MB} MiB does not fit a ${virt_gib} GiB disk"
done
case "$stream_fmt" in '' | raw | qcow2) ;; *) die "CA_BENCH_STREAM_FORMAT: raw or qcow2" ;; esac
case "$ceph_mode" in shared | private | auto) ;; *) die "CA_BENCH_CEPH: shared, private or auto" ;; esac
case "$budget_min" in *[!0-9]* | '') die "CA_BENCH_BUDGET_MIN must be minutes (0: none)" ;; esac
max_gib=0
for s in $sizes; do max_gib=$s; done

# run_logged LOG CMD...: CMD's output to LOG, shown only if it fails.
run_logged() {
    local l=$1; shift
    "$@" > "$l" 2>&1 || { tail -20 "$l" >&2; return 1; }
}
svc_log=$(mktemp /var/tmp/ca-rbd-bench-services.XXXXXX)
if [ "$ceph_mode" = private ]; then
    run_logged "$svc_log" "$root/deploy/services.sh" up rabbitmq libvirt ||
        { rm -f "$svc_log"; die "deploy/services.sh up failed"; }
else
    run_logged "$svc_log" "$root/deploy/services.sh" up rabbitmq ceph libvirt glance ||
        { rm -f "$svc_log"; die "deploy/services.sh up failed"; }
fi
rm -f "$svc_log"
svc_load_env rabbitmq
svc_load_env libvirt

vsh() { timeout 120 virsh -q -c "$LIBVIRT_URI" "$@"; }
rbdn() { timeout 600 rbd --conf "$CEPH_CONF" --id nova "$@"; }
# osd_space: "FREE TOTAL" bytes of the OSD's device, as bluestore's allocator sees it (no mgr here,
# so no `ceph osd df`: the OSD's admin socket answers).
osd_space() {
    timeout 30 ceph --conf "$CEPH_CONF" --name client.admin daemon "osd.$osd_id" \
        bluestore bluefs device info 2> /dev/null |
        $py -c 'import json,sys; d=json.load(sys.stdin)["dev"]; print(d["free"], d["total"])'
}
# osd_allocated: bytes of object data bluestore holds (its metadata in BlueFS left out: RocksDB
# grows and compacts on its own schedule).
osd_allocated() {
    timeout 30 ceph --conf "$CEPH_CONF" --name client.admin daemon "osd.$osd_id" \
        perf dump bluestore 2> /dev/null |
        $py -c 'import json,sys; print(json.load(sys.stdin)["bluestore"]["bluestore_allocated"])'
}
# need_bytes GIB WRITTEN: the room a size needs: the data not yet on the disk, one flattened
# clone of all of it, 1.5 GiB to spare, and the 5% the OSD's full ratio keeps back of TOTAL.
need_bytes() { echo $(( (($1 - $2 + $1) * 2 + 3) * 512 * 1024 * 1024 + $3 / 20 )); }

ceph_note=
if [ "$ceph_mode" != private ]; then
    svc_load_env ceph
    svc_load_env glance
    ceph_dir=$(svc_dir ceph)
    glance_dir=$(svc_dir glance)
    osd_id=$(cat "$ceph_dir/osd-id")
    read -r free total < <(osd_space) || die "cannot ask osd.$osd_id for its free space"
    need=$(need_bytes "$max_gib" 0 "$total")
    ceph_note="the shared cluster (deploy/services.sh), osd.$osd_id $((total >> 30)) GiB"
    if [ "$ceph_mode" = auto ] && [ "$free" -lt "$need" ]; then
        log "the shared osd.$osd_id has $((free >> 20)) MiB free of $((total >> 20)) MiB," \
            "$max_gib GiB needs $((need >> 20)) MiB: using a cluster of the bench's own"
        ceph_mode=private
        ceph_note="the bench's own cluster (the shared osd.$osd_id had $((free >> 20)) MiB free of $((total >> 20)) MiB, $max_gib GiB needs $((need >> 20)) MiB)"
    else
        case "$GLANCE_STORES" in *rbd*) ;; *) die "Glance has no rbd store ($GLANCE_STORES)" ;; esac
    fi
fi

if vsh dominfo "$NAME" > /dev/null 2>&1 || vsh dominfo "$UUID" > /dev/null 2>&1; then
    die "a domain $NAME or $UUID exists (an earlier bench killed hard?): check it, then" \
        "'virsh destroy $NAME; virsh undefine $NAME' if it is a leftover"
fi
if [ "$ceph_mode" != private ] && rbdn info "$DISK" > /dev/null 2>&1; then
    die "$DISK exists (an earlier bench killed hard?): check 'rbd snap ls $DISK' and the clones" \
        "in pool images, then unprotect/remove its snapshots and 'rbd rm $DISK'"
fi
if [ "$ceph_mode" = private ]; then
    for p in $PRIV_MON_PORT $PRIV_MON_V1_PORT $PRIV_GLANCE_PORT; do
        ! ss -Hltn "sport = :$p" 2> /dev/null | grep -q . || die "port 127.0.0.1:$p is taken"
    done
    # The OSD file at its full size, Glance's copy of one image (c), 2 GiB for everyone else.
    host_need=$(( $(numfmt --from=iec "$priv_osd_size") / 1073741824 + virt_gib + 2 ))
    host_free=$(df -P --block-size=1G /var/tmp | awk 'NR == 2 {print $4}')
    [ "$host_free" -ge "$host_need" ] ||
        die "a private cluster needs $host_need GiB free under /var/tmp, there are $host_free"
fi
if vsh secret-dumpxml "$SECRET_UUID" > /dev/null 2>&1 &&
        ! vsh secret-dumpxml "$SECRET_UUID" | grep -qF "<name>$SECRET_USAGE</name>"; then
    die "libvirt secret $SECRET_UUID exists and is not the bench's"
fi

bench=$(mktemp -d /var/tmp/ca-rbd-bench.XXXXXX)
# A copy: the other engineer may rebuild build/release while the bench runs.
cp "$build/compute-agent" "$bench/compute-agent"
agent=$bench/compute-agent
priv=$bench/deploy
priv_up=0
priv_ceph() { # priv_ceph CMD: deploy/services/ceph.sh on the bench's own cluster
    CA_DEPLOY_DIR=$priv CA_CEPH_MON_PORT=$PRIV_MON_PORT CA_CEPH_MON_V1_PORT=$PRIV_MON_V1_PORT \
        CA_CEPH_OSD_SIZE=$priv_osd_size "$root/deploy/services/ceph.sh" "$@"
}
priv_glance() { # priv_glance CMD: deploy/services/glance.sh, the bench's own glance-api
    CA_DEPLOY_DIR=$priv GLANCE_INSTANCE=$PRIV_GLANCE GLANCE_PORT=$PRIV_GLANCE_PORT \
        "$root/deploy/services/glance.sh" "$@"
}
declare -A agent_pid=() agent_log=() host=()
for c in "${CONTENDERS[@]}"; do
    agent_pid[$c]=''
    host[$c]=rbdbench-$c-$$
done
watcher='' defined=0 secret_defined=0 disk_made=0
images=()

stop_bg() { # stop_bg PID: a background helper of ours
    [ -n "$1" ] || return 0
    { kill "$1"; wait "$1"; } 2> /dev/null || true
}
stop_agent() { # stop_agent CONTENDER
    local pid=${agent_pid[$1]} i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2> /dev/null || true
    for ((i = 0; i < 100; i++)); do pid_alive "$pid" || break; sleep 0.1; done
    pid_alive "$pid" && kill -KILL "$pid" 2> /dev/null
    wait "$pid" 2> /dev/null || true
    agent_pid[$1]=''
}
temp_snaps() { rbdn snap ls "$DISK" 2> /dev/null | awk 'NR > 1 {print $2}'; }
# rbd_purge POOL/IMAGE: unprotect and remove every snapshot, then the image (what Glance or the
# agent would have done, had the run finished).
rbd_purge() {
    local s
    rbdn info "$1" > /dev/null 2>&1 || return 0
    for s in $(rbdn snap ls "$1" 2> /dev/null | awk 'NR > 1 {print $2}'); do
        rbdn snap unprotect "$1@$s" > /dev/null 2>&1
        rbdn snap rm --no-progress "$1@$s" > /dev/null 2>&1
    done
    rbdn rm --no-progress "$1" > /dev/null 2>&1 || log "could not remove $1"
}
# disk_snaps_purge: the temporary snapshots a failed run left on the instance disk (its clone,
# if any, is gone with the image by now).
disk_snaps_purge() {
    local s
    for s in $(temp_snaps); do
        rbdn snap unprotect "$DISK@$s" > /dev/null 2>&1
        rbdn snap rm --no-progress "$DISK@$s" > /dev/null 2>&1 || log "could not remove $DISK@$s"
    done
}
cleanup() {
    set +e
    stop_bg "$watcher"
    for c in "${CONTENDERS[@]}"; do stop_agent "$c"; done
    for i in "${images[@]}"; do
        [ -n "$i" ] || continue
        curl -s -m 300 -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null
        rbd_purge "images/$i"
    done
    if [ "$defined" = 1 ]; then
        vsh destroy "$UUID" > /dev/null 2>&1
        vsh undefine "$UUID" --managed-save --snapshots-metadata --checkpoints-metadata > /dev/null 2>&1 ||
            log "undefine $NAME failed"
    fi
    [ "$disk_made" = 1 ] && rbd_purge "$DISK"
    [ "$secret_defined" = 1 ] && vsh secret-undefine "$SECRET_UUID" > /dev/null 2>&1
    for c in "${CONTENDERS[@]}"; do
        [ -n "${RABBITMQCTL:-}" ] && $RABBITMQCTL delete_queue "compute.${host[$c]}" > /dev/null 2>&1
    done
    if [ "$priv_up" = 1 ]; then
        priv_glance purge > /dev/null 2>&1 || log "could not purge the bench's glance-api"
        priv_ceph purge > /dev/null 2>&1 || log "could not purge the bench's Ceph cluster"
    fi
    if [ "${CA_BENCH_KEEP:-0}" = 1 ]; then
        rm -f "$bench"/*.raw "$bench/rand.bin" "$bench/compute-agent"
        log "kept $bench (logs)"
    else
        rm -rf "$bench"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the bench's own Ceph and Glance (CA_BENCH_CEPH=private) ------------------------------------

priv_start() {
    local t0
    t0=$(svc_time_ms)
    priv_up=1
    mkdir -p "$priv"
    run_logged "$bench/priv-ceph.log" priv_ceph start || die "the bench's Ceph cluster did not start"
    run_logged "$bench/priv-glance.log" priv_glance start || die "the bench's glance-api did not start"
    CA_DEPLOY_DIR=$priv svc_load_env ceph
    CA_DEPLOY_DIR=$priv svc_load_env "glance-$PRIV_GLANCE"
    case "$GLANCE_STORES" in *rbd*) ;; *) die "the bench's glance-api has no rbd store" ;; esac
    ceph_dir=$priv/ceph
    glance_dir=$priv/glance-$PRIV_GLANCE
    osd_id=$(cat "$ceph_dir/osd-id")
    [ -n "$ceph_note" ] || ceph_note="the bench's own cluster"
    ceph_note="$ceph_note: deploy/services/ceph.sh with CA_DEPLOY_DIR under the bench's state dir, mon on 127.0.0.1:$PRIV_MON_PORT, a $priv_osd_size OSD, and its own glance-api (deploy/services/glance.sh, GLANCE_INSTANCE=$PRIV_GLANCE, 127.0.0.1:$PRIV_GLANCE_PORT)"
    log "the bench's own Ceph ($priv_osd_size OSD) and glance-api ($GLANCE_URL) up in" \
        "$(($(svc_time_ms) - t0)) ms"
}

# --- the bench guest ----------------------------------------------------------------------------

mon_v1() { # the v1 monitor address from ceph.conf's mon_host, as rbd-guest.sh uses it
    local line
    line=$(sed -n 's/^[[:space:]]*mon_host[[:space:]]*=[[:space:]]*//p' "$CEPH_CONF" | head -1)
    [[ "$line" =~ v1:([0-9.]+):([0-9]+) ]] || die "no v1 monitor address in $CEPH_CONF"
    MON_HOST=${BASH_REMATCH[1]}
    MON_PORT=${BASH_REMATCH[2]}
}

secret_xml() {
    cat <<EOF
<secret ephemeral='no' private='yes'>
  <uuid>$SECRET_UUID</uuid>
  <description>client.nova key for the compute-agent rbd bench guest</description>
  <usage type='ceph'>
    <name>$SECRET_USAGE</name>
  </usage>
</secret>
EOF
}

# domain_xml TYPE: as deploy/services/rbd-guest.sh's domain, for the bench guest's name, UUID,
# title, console, disk and secret.
domain_xml() {
    cat <<EOF
<domain type='$1'>
  <name>$NAME</name>
  <uuid>$UUID</uuid>
  <title>$TITLE</title>
  <memory unit='MiB'>$MEM_MB</memory>
  <currentMemory unit='MiB'>$MEM_MB</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$GUEST_KERNEL</kernel>
    <initrd>$GUEST_INITRD</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 cryptomgr.notests ca.wps=$GUEST_WRITER_WPS ca.hb_ms=$GUEST_HB_MS</cmdline>
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
      <source protocol='rbd' name='$DISK'>
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
      <source path='$console' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

console=$bench/console.log
written_gib=0
last_hb() { tail -c 8192 "$console" 2> /dev/null | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' | tail -1 | cut -d= -f2; }
hb_beyond() { local s; s=$(last_hb); [ -n "$s" ] && [ "$s" -gt "$1" ]; }
ga_ping() { vsh qemu-agent-command --timeout 5 "$UUID" '{"execute":"guest-ping"}' > /dev/null 2>&1; }

# make_disk: vms/<uuid>_disk from the test guest's base, as nova imports a non-rbd image (convert
# to raw, rbd import), grown to the virtual size.
make_disk() {
    local t0
    t0=$(svc_time_ms)
    qemu-img convert -U -q -f qcow2 -O raw "$GUEST_BASE" "$bench/base.raw"
    disk_made=1
    rbdn import --image-format 2 --no-progress "$bench/base.raw" "$DISK" > /dev/null
    rm -f "$bench/base.raw"
    rbdn resize --no-progress --size "${virt_gib}G" "$DISK" > /dev/null
    head -c 64M /dev/urandom > "$bench/rand.bin"
    log "instance disk $DISK made (${virt_gib} GiB virtual) in $(($(svc_time_ms) - t0)) ms"
}

# grow_data GIB: the guest stopped, random data written up to GIB GiB at DATA_OFF_MB (only what
# the previous size did not write), then the guest booted and its writer running.
grow_data() {
    local gib=$1 cmds=() i t0
    vsh destroy "$UUID" > /dev/null 2>&1 || true
    t0=$(svc_time_ms)
    for ((i = written_gib * 16; i < gib * 16; i++)); do
        cmds+=(-c "write -q -s $bench/rand.bin $((DATA_OFF_MB + i * 64))M 64M")
    done
    if [ ${#cmds[@]} -gt 0 ]; then
        timeout 3600 qemu-io -f raw "${cmds[@]}" "rbd:$DISK:id=nova:conf=$CEPH_CONF" ||
            die "writing data into $DISK failed"
        log "$((gib - written_gib)) GiB of random data written into $DISK in" \
            "$(($(svc_time_ms) - t0)) ms"
    fi
    written_gib=$gib
    domain_xml "$GUEST_DOMTYPE" > "$bench/domain.xml"
    vsh define "$bench/domain.xml" > /dev/null
    defined=1
    : > "$console"
    t0=$(svc_time_ms)
    vsh start "$UUID" > /dev/null
    wait_for 180 "the bench guest's ready marker" grep -qa CA-GUEST-READY "$console" &&
        wait_for 60 "qemu-ga in the bench guest" ga_ping &&
        wait_for 30 "a writer heartbeat" hb_beyond 0 ||
        { tail -20 "$console" >&2; die "bench guest did not come up"; }
    log "bench guest up in $(($(svc_time_ms) - t0)) ms ($GUEST_DOMTYPE, disk rbd:$DISK)"
}

# --- Glance -------------------------------------------------------------------------------------

json_field() { $py -c "import json,sys; print(json.load(sys.stdin).get('$1'))"; }
image_json() { curl -sf -m 30 "$GLANCE_URL/v2/images/$1"; }

create_image() { # create_image NAME BASE_ID → the id (as nova-api's compute_utils.create_image)
    curl -sf -m 30 -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"$1\", \"container_format\": \"bare\", \"disk_format\": \"raw\",
        \"min_disk\": $virt_gib, \"min_ram\": 0, \"instance_uuid\": \"$UUID\",
        \"image_type\": \"snapshot\", \"base_image_ref\": \"$2\",
        \"visibility\": \"private\"}" | json_field id
}

# The base images the instance was booted from, as nova's direct path finds Glance's pool: one in
# Ceph (an rbd location, so a and b go direct), one in the file store (no rbd location, so c
# streams).
make_bases() {
    local id
    head -c 1M /dev/zero > "$bench/base1m.raw"
    id=$(cat /proc/sys/kernel/random/uuid)
    images+=("$id")
    rbdn import --image-format 2 --no-progress "$bench/base1m.raw" "images/$id" > /dev/null
    rbdn snap create --no-progress "images/$id@snap" > /dev/null
    rbdn snap protect "images/$id@snap"
    curl -sf -m 30 -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"id\": \"$id\", \"name\": \"rbd-bench-base-rbd\", \"container_format\": \"bare\",
        \"disk_format\": \"raw\"}" > /dev/null
    curl -sf -m 60 -X PATCH "$GLANCE_URL/v2/images/$id" \
        -H 'Content-Type: application/openstack-images-v2.1-json-patch' -d "[{\"op\": \"add\",
        \"path\": \"/locations/-\", \"value\": {\"url\": \"rbd://$CEPH_FSID/images/$id/snap\",
        \"metadata\": {}}}]" > /dev/null
    [ "$(image_json "$id" | json_field status)" = active ] || die "rbd base image $id not active"
    base_rbd=$id
    id=$(curl -sf -m 30 -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' \
        -d '{"name": "rbd-bench-base-file", "container_format": "bare", "disk_format": "raw"}' |
        json_field id)
    images+=("$id")
    curl -sf -m 60 -X PUT "$GLANCE_URL/v2/images/$id/file" \
        -H 'Content-Type: application/octet-stream' --data-binary "@$bench/base1m.raw" > /dev/null
    [ "$(image_json "$id" | json_field status)" = active ] || die "file base image $id not active"
    base_file=$id
    rm -f "$bench/base1m.raw"
    log "base images: $base_rbd (rbd location), $base_file (file store)"
}

# --- the agents ---------------------------------------------------------------------------------

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$bench/oslo.conf"
write_agent_conf() { # write_agent_conf CONTENDER
    local c=$1
    {
        printf '[DEFAULT]\nhost = %s\nstate_path = %s/state-%s\n' "${host[$c]}" "$bench" "$c"
        printf 'transport_url = %s\nmax_concurrent_snapshots = 1\n' "$TRANSPORT_URL"
        printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/scratch-%s\n' \
            "$LIBVIRT_URI" "$bench" "$c"
        printf 'images_type = rbd\nimages_rbd_pool = %s\nimages_rbd_ceph_conf = %s\nrbd_user = nova\n' \
            "$POOL" "$CEPH_CONF"
        case $c in
            a) printf 'images_rbd_flatten = background\n' ;;
            b) printf 'images_rbd_flatten = sync\n' ;;
            c) [ -n "$stream_fmt" ] && printf 'snapshot_image_format = %s\n' "$stream_fmt" ;;
        esac
        printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
        printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
        printf '[notifications]\nnotification_format = both\nnotify_on_state_change = vm_and_task_state\n'
    } > "$bench/agent-$c.conf"
    mkdir -p "$bench/scratch-$c"
}
start_agent() { # start_agent CONTENDER GIB
    local c=$1 l=$bench/agent-$1-$2.log
    agent_log[$c]=$l
    local ready   # read by the eval below
    # shellcheck disable=SC2034
    ready=$(grep -c 'ready: connected to RabbitMQ' "$l" 2> /dev/null || true)
    "$agent" --config-file "$root/deploy/compute-agent.conf.example" \
        --config-file "$bench/agent-$c.conf" >> "$l" 2>&1 &
    agent_pid[$c]=$!
    # shellcheck disable=SC2016 # expanded by eval, on each poll
    wait_for 30 "agent $c ready" eval '[ "$(grep -c "ready: connected to RabbitMQ" "$l")" -gt "${ready:-0}" ]' ||
        { cat "$l" >&2; die "agent $c not ready"; }
}
proc_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

# --- one run ------------------------------------------------------------------------------------

# attempt CONTENDER GIB N: one snapshot, measured. Returns 1 if the run did not give an active
# image, or gave one late because of something outside the bench (the machine is shared: a test
# restarting RabbitMQ loses the cast or holds up the job's notifications, one stopping Glance
# fails the job), or the agent's job failed (its error goes to failures.jsonl and into the
# results). The run is then redone. A run that took the wrong path stops the bench.
attempt() {
    local c=$1 gib=$2 n=$3 img r base l=${agent_log[$1]} pid=${agent_pid[$1]} t0 del_ms load why
    local alloc0 alloc1 reclaim_ms
    alloc0=$(osd_allocated) || die "cannot ask osd.$osd_id for its allocation"
    base=$base_rbd
    [ "$c" = c ] && base=$base_file
    img=$(create_image "rbd-bench-$c-${gib}g-$n" "$base") || { log "cannot create an image"; return 1; }
    images+=("$img")
    r=$bench/run-$c-$gib-$n
    sleep "$idle_s"
    load=$(cut -d' ' -f1 /proc/loadavg)
    $py "$bench/bench.py" watch "$r.watch" "$img" "$GLANCE_URL" "$pid" \
        "$(cat "$ceph_dir/pids/osd.pid" 2> /dev/null || echo 0)" \
        "$(cat "$glance_dir/pids/api.pid" 2> /dev/null || echo 0)" 2> "$r.watch.err" &
    watcher=$!
    sleep 0.5
    if ! $py "$client" cast --config "$bench/oslo.conf" --host "${host[$c]}" --instance-uuid "$UUID" \
            --image-id "$img" --sysmeta image_hw_qemu_guest_agent=yes \
            --sysmeta "image_base_image_ref=$base" > "$r.cast" 2>&1; then
        log "cast failed: $(tail -1 "$r.cast")"
    elif ! wait_for 60 "the job for $img to start" grep -q "snapshot to image $img starting" "$l"; then
        log "cast for $img lost (broker restarted meanwhile?)"
    else
        wait_for 1800 "snapshot of $img" grep -qE "snapshot to image $img (done|failed|refused)|image $img not found|disappeared" "$l" ||
            die "snapshot of $img did not finish"
        if [ "$c" = a ] && grep -q "snapshot to image $img done" "$l"; then
            wait_for 1800 "background flatten of $img" grep -qE "image $img flattened|background flatten of image $img" "$l" ||
                die "background flatten of $img did not finish"
        fi
    fi
    sleep 0.3
    stop_bg "$watcher"
    watcher=''
    pid_alive "$pid" || die "agent $c died: $(tail -3 "$l")"
    if ! grep -q "snapshot to image $img done" "$l" ||
            { [ "$c" = a ] && ! grep -q "image $img flattened" "$l"; }; then
        if grep -qE "snapshot to image $img (failed|refused)|background flatten of image $img" "$l"; then
            why=$(grep -E "snapshot to image $img (failed|refused)|background flatten of image $img" "$l" |
                tail -1 | sed 's/^.*image [0-9a-f-]*\( failed\)\{0,1\}: //')
            log "run $c $gib GiB #$n failed in the agent: $why"
            $py -c 'import json,sys; print(json.dumps(dict(zip(("contender", "gib", "round", "load1", "reason"), (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])))))' \
                "$c" "$gib" "$n" "$load" "$why" >> "$bench/failures.jsonl"
            agent_failed=1
        elif grep -q "$img" "$l"; then
            log "run $c $gib GiB #$n failed: $(grep "$img" "$l" | tail -1 | cut -c1-300)"
        fi
        curl -s -m 300 -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null || true
        rbd_purge "images/$img"
        disk_snaps_purge
        return 1
    fi
    image_json "$img" > "$r.image"
    if [ "$c" != c ]; then
        rbdn du --format json "images/$img" > "$r.du" 2> /dev/null || echo '{}' > "$r.du"
    fi
    t0=$(svc_time_ms)
    curl -sf -m 600 -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null || log "could not delete image $img"
    del_ms=$(($(svc_time_ms) - t0))
    images=("${images[@]/$img/}")
    # The OSD frees a deleted clone's objects later, by snapshot trimming (a's clone has a
    # snapshot from before its flatten): wait until its data is back to where it was, so that
    # the next run neither shares the OSD with the trimming nor runs out of space.
    t0=$(svc_time_ms)
    while alloc1=$(osd_allocated) && [ "$alloc1" -gt $((alloc0 + 268435456)) ]; do
        [ $(($(svc_time_ms) - t0)) -lt 600000 ] ||
            { log "osd.$osd_id still holds $(((alloc1 - alloc0) >> 20)) MiB more than before the run after 600 s, going on"; break; }
        sleep 2
    done
    reclaim_ms=$(($(svc_time_ms) - t0))
    $py "$bench/bench.py" run "$c" "$gib" "$n" "$img" "$r" "$l" "$del_ms" "$load" "$reclaim_ms" > "$r.json" ||
        die "run $c $gib GiB #$n: $(cat "$r.json")"
    if grep -q '"broker_lost": true' "$r.json"; then
        # Another job restarted RabbitMQ during the run: the job waited for the broker (its
        # notifications are confirmed), so its times are not the agent's.
        log "run $c $gib GiB #$n: the agent lost RabbitMQ during the run (restarted by another job?)"
        return 1
    fi
    cat "$r.json" >> "$bench/runs.jsonl"
    # Nothing of the run may stay in Ceph: the clone went with the image, the temporary
    # snapshot on the instance disk with the flatten (a, b) or the view (c).
    if rbdn info "images/$img" > /dev/null 2>&1; then
        log "images/$img still exists after Glance deleted the image: removing it"
        rbd_purge "images/$img"
    fi
    [ -z "$(temp_snaps)" ] || die "snapshots left on $DISK after run $c #$n: $(temp_snaps | tr '\n' ' ')"
    log "run $c $gib GiB #$n: $(tail -1 "$bench/runs.jsonl" | cut -c1-300)"
}

retries=0
agent_failed=0
given_up=()
# run_one CONTENDER GIB N: up to 3 attempts. After a failure in the agent, that agent is restarted
# first: a job whose librados calls timed out can leave the agent's cluster handle unusable
# (ESHUTDOWN on every later call), which would fail every later run too. A run that fails 3 times
# is given up (named in the header), and the bench goes on.
run_one() {
    local i
    for ((i = 1; i <= 3; i++)); do
        agent_failed=0
        attempt "$1" "$2" "$3" && return 0
        retries=$((retries + 1))
        if [ "$agent_failed" = 1 ]; then
            log "restarting agent $1"
            stop_agent "$1"
            start_agent "$1" "$2"
        fi
        [ "$i" -lt 3 ] || break
        log "redoing run $1 $2 GiB #$3 (attempt $((i + 1)))"
        if [ "$priv_up" = 1 ]; then
            "$root/deploy/services.sh" up rabbitmq > /dev/null 2>&1 || true
            priv_ceph start > /dev/null 2>&1 || true
            priv_glance start > /dev/null 2>&1 || true
        else
            "$root/deploy/services.sh" up rabbitmq ceph glance > /dev/null 2>&1 || true
        fi
        sleep 5
    done
    log "run $1 $2 GiB #$3 failed 3 times: given up"
    given_up+=("$1 at $2 GiB round $3")
}

cat > "$bench/bench.py" <<'PY'
import datetime, http.client, json, os, re, statistics, sys, time, urllib.parse

def ticks(pid):
    try:
        f = open('/proc/%s/stat' % pid).read().rsplit(')', 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return -1

def rss_kb(pid):
    try:
        for l in open('/proc/%s/status' % pid):
            if l.startswith('VmRSS:'):
                return int(l.split()[1])
    except OSError:
        pass
    return -1

def machine_ticks():
    v = [int(x) for x in open('/proc/stat').readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])

def watch(out, image, glance_url, agent_pid, osd_pid, glance_pid):
    """Every 100 ms until killed, one line: ms, the image's status in Glance (GET on a kept-alive
    connection, until it is active; '-' afterwards), the agent's CPU ticks and VmRSS (KiB),
    ceph-osd's and glance-api's CPU ticks, the machine's busy and total ticks."""
    u = urllib.parse.urlsplit(glance_url)
    conn = None
    active = False
    with open(out, 'w') as f:
        t_next = time.monotonic()
        while True:
            status = '-'
            if not active:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=5)
                    conn.request('GET', '/v2/images/' + image)
                    resp = conn.getresponse()
                    body = resp.read()
                    status = json.loads(body).get('status', '?') if resp.status == 200 else \
                        'http%d' % resp.status
                except (OSError, ValueError, http.client.HTTPException):
                    status = 'error'
                    conn = None
                active = status == 'active'
            busy, total = machine_ticks()
            f.write('%.1f %s %d %d %d %d %d %d\n' % (
                time.time() * 1000, status, ticks(agent_pid), rss_kb(agent_pid), ticks(osd_pid),
                ticks(glance_pid), busy, total))
            f.flush()
            t_next += 0.1
            time.sleep(max(0.0, t_next - time.monotonic()))

def ts(line):
    return datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S.%f').replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000

EXPECT = {'a': ('rbd-direct', 'background'), 'b': ('rbd-direct', 'sync'), 'c': ('rbd-snapshot', None)}

def run(c, gib, n, img, prefix, log, del_ms, load, reclaim_ms=None):
    t_cast = None
    for l in open(prefix + '.cast'):
        try:
            d = json.loads(l)
        except ValueError:
            continue
        if d.get('image_id') == img:
            t_cast = d['t_unix'] * 1000
    r = {'contender': c, 'gib': int(gib), 'round': int(n), 'image': img,
         'glance_delete_ms': int(del_ms), 'load1': float(load),
         'reclaim_ms': int(reclaim_ms) if reclaim_ms is not None else None}
    lines = open(log, errors='replace').read().splitlines()
    i0 = next(i for i, l in enumerate(lines) if 'snapshot to image %s starting' % img in l)
    t_start = ts(lines[i0])
    r['cast_to_start_ms'] = t_start - t_cast
    t_done = t_pit = None
    for l in lines[i0:]:
        m = re.search(r'point in time taken via (\S+) in (\d+) ms \(clone \S+, flatten (\S+), '
                      r'freeze window (-?\d+) ms\)', l)
        if m and 'path' not in r:
            r.update(path=m.group(1), backend_ms=int(m.group(2)), flatten=m.group(3),
                     freeze_ms=int(m.group(4)))
        m = m or re.search(r'point in time taken via (\S+) in (\d+) ms .*freeze window (-?\d+) '
                           r'ms, (\d+) of (\d+) bytes allocated', l)
        if m and 'path' not in r:
            r.update(path=m.group(1), backend_ms=int(m.group(2)), freeze_ms=int(m.group(3)),
                     allocated=int(m.group(4)), virtual=int(m.group(5)))
        if m and t_pit is None:
            # The job's own time before the backend step: Glance GETs of the image (and, for
            # the direct path's pool, the base image), the first task-state change.
            t_pit = ts(l)
            r['pre_backend_ms'] = t_pit - r['backend_ms'] - t_start
        m = re.search(r'image %s uploaded: (\S+), (\d+) bytes sent \((\d+) read of (\d+) virtual\) '
                      r'in (\d+) ms' % img, l)
        if m:
            r.update(format=m.group(1), sent=int(m.group(2)), read=int(m.group(3)),
                     upload_ms=int(m.group(5)))
        m = re.search(r'image %s registered at (\S+) \((\d+) bytes, nothing streamed\)' % img, l)
        if m:
            r.update(location=m.group(1), sent=0, virtual=int(m.group(2)))
            if t_pit is not None:
                # PATCH of nova's properties, add the location (Glance opens the clone in RBD
                # for its size), GET: the image is active.
                r['register_ms'] = ts(l) - t_pit
        m = re.search(r'snapshot to image %s done in (\d+) ms' % img, l)
        if m and t_done is None:
            r['job_ms'] = int(m.group(1))
            t_done = ts(l)
            r['cast_to_done_ms'] = t_done - t_cast
            if c != 'a':
                break
        m = re.search(r'image %s flattened in (\d+) ms' % img, l)
        if m:
            r['flatten_ms'] = int(m.group(1))
            t_flat = ts(l)
            r['cast_to_flattened_ms'] = t_flat - t_cast
            break
    # Did the agent lose its broker, or get it back, between the cast and the end of the run?
    t_last = r.get('cast_to_flattened_ms', r.get('cast_to_done_ms'))
    r['broker_lost'] = t_last is not None and any(
        ('lost RabbitMQ connection' in l or 'reconnected to RabbitMQ' in l) and
        t_cast <= ts(l) <= t_cast + t_last for l in lines)
    path, flatten = EXPECT[c]
    r['path_ok'] = r.get('path') == path and (flatten is None or r.get('flatten') == flatten)
    im = json.load(open(prefix + '.image'))
    r['glance_status'] = im.get('status')
    r['glance_size'] = im.get('size')
    r['disk_format'] = im.get('disk_format')
    r['image_path'] = im.get('compute_agent_snapshot_path')
    if os.path.exists(prefix + '.du'):
        try:
            du = json.load(open(prefix + '.du'))
            # The flattened data shows up in the clone or in its snapshot (for a, whose
            # snapshot predates the flatten, in both): the larger is what was copied.
            r['clone_used'] = max((x.get('used_size', 0) for x in du.get('images', [])),
                                  default=None)
        except ValueError:
            pass
    smp = []
    for l in open(prefix + '.watch'):
        s = l.split()
        if len(s) == 8:
            smp.append([float(s[0]), s[1]] + [int(x) for x in s[2:]])
    t_active = next((s[0] for s in smp if s[1] == 'active'), None)
    r['cast_to_active_ms'] = t_active - t_cast if t_active is not None else None
    r['polls_before_cast'] = sum(1 for s in smp if s[0] < t_cast)

    def at(t):  # the last sample at or before t, else the first
        before = [s for s in smp if s[0] <= t]
        return before[-1] if before else smp[0]

    def after(t):  # the first sample at or after t, else the last
        return next((s for s in smp if s[0] >= t), smp[-1])

    def cpu(t1, t2, i):
        a, b = at(t1), after(t2)
        return (b[i] - a[i]) / 100 if a[i] >= 0 and b[i] >= 0 else None

    if t_active is not None:
        r['cpu_agent_s'] = cpu(t_cast, t_active, 2)
        r['cpu_osd_s'] = cpu(t_cast, t_active, 4)
        r['cpu_glance_s'] = cpu(t_cast, t_active, 5)
        a, b = at(t_cast), after(t_active)
        r['machine_busy_pct'] = round(100 * (b[6] - a[6]) / (b[7] - a[7])) if b[7] > a[7] else None
    t_end = t_cast + r.get('cast_to_flattened_ms', r.get('cast_to_done_ms', 0))
    if c == 'a' and 'cast_to_flattened_ms' in r:
        r['cpu_agent_flatten_s'] = cpu(t_cast, t_end, 2)
        r['cpu_osd_flatten_s'] = cpu(t_cast, t_end, 4)
    # The agent keeps what a flatten grew it by (later runs start high), so each run gives its
    # VmRSS at the cast and its peak.
    r['rss_cast_kb'] = at(t_cast)[3]
    if t_active is not None:
        r['rss_peak_kb'] = max((s[3] for s in smp if t_cast - 200 <= s[0] <= t_active), default=None)
    if c == 'a':
        r['rss_peak_flatten_kb'] = max((s[3] for s in smp if t_cast - 200 <= s[0] <= t_end + 200),
                                       default=None)
    for k in list(r):
        if k.endswith('_ms') and isinstance(r[k], float):
            r[k] = round(r[k])
    print(json.dumps(r))
    if not r['path_ok']:
        sys.exit('contender %s took path %s (flatten %s), expected %s %s' % (
            c, r.get('path'), r.get('flatten'), path, flatten or ''))
    if r['glance_status'] != 'active' or r['cast_to_active_ms'] is None:
        sys.exit('image %s is %s' % (img, r['glance_status']))

NAMES = {'a': 'a: direct, background flatten', 'b': "b: nova's sequence (sync flatten)",
         'c': 'c: streamed fallback'}

def med(v):
    v = [x for x in v if x is not None]
    return (statistics.median(v), min(v), max(v)) if v else None

def fmt3(m, fmt='%.0f'):
    if m is None:
        return '-'
    if m[1] == m[2]:
        return fmt % m[0]
    return (fmt + ' (' + fmt + '–' + fmt + ')') % m

def table(runs_file, rss_file, out_md, out_png, failures_file=None):
    runs = [json.loads(l) for l in open(runs_file)]
    rss = [json.loads(l) for l in open(rss_file)]
    fails = [json.loads(l) for l in open(failures_file)] if failures_file and \
        os.path.exists(failures_file) else []

    def failed(g, c):
        f = [x for x in fails if x['gib'] == g and x['contender'] == c]
        if not f:
            return '0'
        why = sorted({x['reason'][:90] for x in f})
        return '%d (load %s: %s)' % (len(f), ', '.join('%.0f' % x['load1'] for x in f),
                                     '; '.join(why))
    sizes = sorted({r['gib'] for r in runs})
    MiB = 2 ** 20
    by = {(g, c): [r for r in runs if r['gib'] == g and r['contender'] == c]
          for g in sizes for c in 'abc'}

    def cell(g, c, key, scale=1.0, fmt='%.0f'):
        v = [r.get(key) for r in by[(g, c)]]
        v = [x / scale for x in v if x is not None]
        return fmt3(med(v), fmt) if v else '-'

    text = []
    for g in sizes:
        for r in by[(g, 'c')]:
            if r.get('upload_ms'):
                r['mibps'] = r['sent'] / MiB / (r['upload_ms'] / 1000)
        rows = [
            ('runs (path)', lambda c: '%d (%s)' % (len(by[(g, c)]), ', '.join(sorted(
                {r['path'] + ('/' + r['flatten'] if r.get('flatten') else '') for r in by[(g, c)]})))),
            ('failed attempts in the agent, redone', lambda c: failed(g, c)),
            ('runs disturbed by a RabbitMQ restart (agent lost the broker; now redone)',
             lambda c: str(sum(1 for r in by[(g, c)] if r.get('broker_lost')))),
            ('**cast → image active (Glance GET every 100 ms), s**',
             lambda c: '**%s**' % cell(g, c, 'cast_to_active_ms', 1000, '%.2f')),
            ('cast → agent\'s "done" line, s', lambda c: cell(g, c, 'cast_to_done_ms', 1000, '%.2f')),
            ('cast → background flatten finished, s',
             lambda c: cell(g, c, 'cast_to_flattened_ms', 1000, '%.2f')),
            ('cast → job start, ms', lambda c: cell(g, c, 'cast_to_start_ms')),
            ('job start → backend step (Glance GETs of image and base, task state), ms',
             lambda c: cell(g, c, 'pre_backend_ms')),
            ('backend step, ms (a, b: freeze, snap, thaw → protect → clone [→ flatten] → snap → '
             'protect; c: freeze, rbd snapshot, thaw + extent map)', lambda c: cell(g, c, 'backend_ms')),
            ('freeze window (qemu-ga), ms', lambda c: cell(g, c, 'freeze_ms')),
            ('register in Glance (PATCH, add location, GET), ms', lambda c: cell(g, c, 'register_ms')),
            ('upload (encode + PUT + Glance verify), s', lambda c: cell(g, c, 'upload_ms', 1000, '%.1f')),
            ('upload throughput, MiB/s sent', lambda c: cell(g, c, 'mibps')),
            ('bytes streamed to Glance, MiB', lambda c: cell(g, c, 'sent', MiB, '%.1f')),
            ('bytes read from the rbd snapshot, MiB', lambda c: cell(g, c, 'read', MiB, '%.1f')),
            ('data copied into the clone by the flatten (rbd du), MiB',
             lambda c: cell(g, c, 'clone_used', MiB, '%.1f')),
            ('image size in Glance, MiB', lambda c: cell(g, c, 'glance_size', MiB, '%.1f')),
            ('agent CPU, cast → active, s', lambda c: cell(g, c, 'cpu_agent_s', 1, '%.2f')),
            ('agent CPU, cast → flatten finished, s', lambda c: cell(g, c, 'cpu_agent_flatten_s', 1, '%.2f')),
            ('ceph-osd CPU, cast → active, s', lambda c: cell(g, c, 'cpu_osd_s', 1, '%.2f')),
            ('ceph-osd CPU, cast → flatten finished, s', lambda c: cell(g, c, 'cpu_osd_flatten_s', 1, '%.2f')),
            ('glance-api CPU, cast → active, s', lambda c: cell(g, c, 'cpu_glance_s', 1, '%.2f')),
            ('whole machine busy, cast → active, % of 2 cores' if os.cpu_count() == 2 else
             'whole machine busy, cast → active, % of all cores', lambda c: cell(g, c, 'machine_busy_pct')),
            ('agent VmRSS at the cast, MiB', lambda c: cell(g, c, 'rss_cast_kb', 1024, '%.1f')),
            ('agent peak VmRSS, cast → active (100 ms samples), MiB',
             lambda c: cell(g, c, 'rss_peak_kb', 1024, '%.1f')),
            ('agent peak VmRSS, cast → flatten finished, MiB',
             lambda c: cell(g, c, 'rss_peak_flatten_kb', 1024, '%.1f')),
            ('agent VmRSS at the cast → peak, first round, MiB', lambda c: next(
                ('%.1f → %.1f' % (r['rss_cast_kb'] / 1024,
                                  r.get('rss_peak_flatten_kb', r.get('rss_peak_kb')) / 1024)
                 for r in by[(g, c)] if r['round'] == 1 and r.get('rss_cast_kb')), '-')),
            ('agent VmRSS idle / VmHWM after the size\'s runs, MiB', lambda c: next(
                ('%.1f / %.1f' % (x['idle_kb'] / 1024, x['hwm_kb'] / 1024) for x in rss
                 if x['gib'] == g and x['contender'] == c), '-')),
            ('Glance DELETE of the image (removes the clone), s',
             lambda c: cell(g, c, 'glance_delete_ms', 1000, '%.2f')),
            ('then until the OSD has its room back (snapshot trimming), s',
             lambda c: cell(g, c, 'reclaim_ms', 1000, '%.1f')),
            ('load average (1 min) at the cast', lambda c: cell(g, c, 'load1', 1, '%.1f')),
        ]
        text.append('### %d GiB written\n' % g)
        text.append('| measure | ' + ' | '.join(NAMES[c] for c in 'abc') + ' |')
        text.append('|---|---:|---:|---:|')
        for name, f in rows:
            text.append('| %s | %s |' % (name, ' | '.join(f(c) for c in 'abc')))
        text.append('')

    # Pairwise ratios, round by round.
    ratios = {}
    for g in sizes:
        for key in ('cast_to_active_ms', 'cast_to_done_ms'):
            for c in 'bc':
                v = []
                for ra in by[(g, 'a')]:
                    rc = next((x for x in by[(g, c)] if x['round'] == ra['round']), None)
                    if rc and ra.get(key) and rc.get(key) is not None:
                        v.append(rc[key] / ra[key])
                ratios[(g, key, c)] = v
    text.append('### Ratios to a (median (min–max) over rounds of b/a and c/a)\n')
    text.append('| data written | rounds | a: cast → active, s | b/a | c/a | b/a by "done" line | '
                'c/a by "done" line | a\'s background flatten finished / b active |')
    text.append('|---:|---:|---:|---:|---:|---:|---:|---:|')
    for g in sizes:
        fl = []
        for ra in by[(g, 'a')]:
            rb = next((x for x in by[(g, 'b')] if x['round'] == ra['round']), None)
            if rb and ra.get('cast_to_flattened_ms') and rb.get('cast_to_active_ms'):
                fl.append(ra['cast_to_flattened_ms'] / rb['cast_to_active_ms'])
        text.append('| %d GiB | %d | %s | %s | %s | %s | %s | %s |' % (
            g, len(ratios[(g, 'cast_to_active_ms', 'b')]),
            cell(g, 'a', 'cast_to_active_ms', 1000, '%.2f'),
            fmt3(med(ratios[(g, 'cast_to_active_ms', 'b')]), '%.1f'),
            fmt3(med(ratios[(g, 'cast_to_active_ms', 'c')]), '%.1f'),
            fmt3(med(ratios[(g, 'cast_to_done_ms', 'b')]), '%.1f'),
            fmt3(med(ratios[(g, 'cast_to_done_ms', 'c')]), '%.1f'),
            fmt3(med(fl), '%.2f')))
    text.append('')
    # The same figures for bench/summarize.py, next to the markdown.
    def js(m):
        return {'median': m[0], 'min': m[1], 'max': m[2]} if m else None
    summary = {'bench': 'rbd', 'sizes': []}
    for g in sizes:
        per = {}
        for c in 'abc':
            rs = by[(g, c)]
            per[c] = {k: js(med([r.get(k) for r in rs])) for k in (
                'cast_to_active_ms', 'cast_to_done_ms', 'cast_to_flattened_ms', 'freeze_ms',
                'backend_ms', 'upload_ms', 'sent', 'clone_used', 'cpu_agent_s',
                'cpu_agent_flatten_s', 'cpu_osd_s', 'cpu_glance_s', 'rss_peak_kb')}
            per[c]['runs'] = len(rs)
            per[c]['name'] = NAMES[c]
            per[c]['rss'] = next(({'idle_kb': x['idle_kb'], 'hwm_kb': x['hwm_kb']} for x in rss
                                  if x['gib'] == g and x['contender'] == c), None)
        summary['sizes'].append({
            'gib': g, 'rounds': len(ratios[(g, 'cast_to_active_ms', 'b')]), 'contenders': per,
            'ratio_b_a': js(med(ratios[(g, 'cast_to_active_ms', 'b')])),
            'ratio_a_b': js(med([1 / x for x in ratios[(g, 'cast_to_active_ms', 'b')] if x])),
            'ratio_c_a': js(med(ratios[(g, 'cast_to_active_ms', 'c')])),
            'ratio_b_a_done': js(med(ratios[(g, 'cast_to_done_ms', 'b')])),
            'ratio_c_a_done': js(med(ratios[(g, 'cast_to_done_ms', 'c')]))})
    with open(os.path.splitext(out_md)[0] + '.json', 'w') as f:
        json.dump(summary, f, indent=1)
        f.write('\n')
    png_note = chart(sizes, by, ratios, out_png)
    if png_note:
        text.append(png_note + '\n')
    s = '\n'.join(text) + '\n'
    sys.stdout.write(s)
    with open(out_md, 'a') as f:
        f.write(s)

def chart(sizes, by, ratios, out_png):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return '(no chart: python3-matplotlib is not installed; deploy/install-packages.sh services)'
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.4))
    w = 0.8 / 4
    colors = {'a': '#2b7bba', 'b': '#e08a1e', 'c': '#6a9f3a'}
    xs = range(len(sizes))
    series = [('a', 'cast_to_active_ms', NAMES['a'] + ': active', {}),
              ('a', 'cast_to_flattened_ms', NAMES['a'] + ': flatten finished',
               {'hatch': '//', 'fill': False, 'edgecolor': colors['a']}),
              ('b', 'cast_to_active_ms', NAMES['b'], {}),
              ('c', 'cast_to_active_ms', NAMES['c'], {})]
    for i, (c, key, label, style) in enumerate(series):
        m = [med([r.get(key) for r in by[(g, c)]]) for g in sizes]
        ys = [x[0] / 1000 if x else 0 for x in m]
        lo = [(x[0] - x[1]) / 1000 if x else 0 for x in m]
        hi = [(x[2] - x[0]) / 1000 if x else 0 for x in m]
        if not style:
            style = {'color': colors[c]}
        bars = ax1.bar([x + (i - 1.5) * w for x in xs], ys, w, yerr=[lo, hi], capsize=3,
                       label=label, **style)
        for b, y, h in zip(bars, ys, hi):
            ax1.annotate('%.1f' % y if y < 10 else '%.0f' % y,
                         (b.get_x() + b.get_width() / 2, y + h), textcoords='offset points',
                         xytext=(0, 3), ha='center', fontsize=7)
    ax1.set_yscale('log')
    ax1.set_xticks(list(xs), ['%d GiB written' % g for g in sizes])
    ax1.set_ylabel('seconds after the cast (median, min–max)')
    ax1.set_title('Time to an active image')
    ax1.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.1), ncol=2)
    w = 0.8 / 2
    for i, c in enumerate('bc'):
        m = [med(ratios[(g, 'cast_to_active_ms', c)]) for g in sizes]
        ys = [x[0] if x else 0 for x in m]
        lo = [x[0] - x[1] if x else 0 for x in m]
        hi = [x[2] - x[0] if x else 0 for x in m]
        bars = ax2.bar([x + (i - 0.5) * w for x in xs], ys, w, yerr=[lo, hi], capsize=3,
                       color=colors[c], label='%s/a' % c)
        for b, y, h in zip(bars, ys, hi):
            ax2.annotate('%.1f×' % y, (b.get_x() + b.get_width() / 2, y + h),
                         textcoords='offset points', xytext=(0, 3), ha='center', fontsize=8)
    ax2.axhline(1, color='grey', linewidth=0.8)
    ax2.set_yscale('log')
    ax2.set_xticks(list(xs), ['%d GiB written' % g for g in sizes])
    ax2.set_ylabel('ratio to a, per round (median, min–max)')
    ax2.set_title('b/a and c/a, cast → active')
    ax2.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return '![cast → active and ratios](%s)' % os.path.basename(out_png)

if sys.argv[1] == 'watch':
    watch(*sys.argv[2:8])
elif sys.argv[1] == 'run':
    run(*sys.argv[2:11])
else:
    table(*sys.argv[2:7])
PY

# --- the bench ----------------------------------------------------------------------------------

t_start_s=$SECONDS
# The tree the agent was built from, named now: commits made while the bench runs are not in it.
rev_start=$(git -C "$root" rev-parse --short HEAD 2> /dev/null || echo unknown)
dirty=$(git -C "$root" status --porcelain -- worker backends rpc common 2> /dev/null |
    awk '{print $2}' | cut -d/ -f1 | sort -u | tr '\n' ' ')
t_start=$(date -u '+%Y-%m-%d %H:%M UTC')
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$bench/runs.jsonl"
: > "$bench/rss.jsonl"
: > "$bench/failures.jsonl"
skipped=()
budget_note=()
# over_budget: the bench has run for CA_BENCH_BUDGET_MIN minutes (never with 0).
over_budget() { [ "$budget_min" -gt 0 ] && [ $((SECONDS - t_start_s)) -ge $((budget_min * 60)) ]; }
[ "$ceph_mode" = private ] && priv_start
mon_v1
key=$(ceph-authtool "$CEPH_NOVA_KEYRING" --name client.nova --print-key 2> /dev/null) ||
    key=${CEPH_NOVA_KEY:-}
[ -n "$key" ] || die "no key for client.nova"
if ! vsh secret-dumpxml "$SECRET_UUID" > /dev/null 2>&1; then
    secret_xml > "$bench/secret.xml"
    vsh secret-define "$bench/secret.xml" > /dev/null
fi
secret_defined=1
# Without --plain virsh base64-decodes the file: a cephx key is already base64.
printf '%s' "$key" | vsh secret-set-value "$SECRET_UUID" --file /dev/stdin > /dev/null
make_bases
for c in "${CONTENDERS[@]}"; do write_agent_conf "$c"; done
osd_total=
for gib in $sizes; do
    if over_budget; then
        budget_note+=("$gib GiB: not reached")
        continue
    fi
    read -r free total < <(osd_space) || die "cannot ask osd.$osd_id for its free space"
    osd_total=$total
    need=$(need_bytes "$gib" "$written_gib" "$total")
    if [ "$free" -lt "$need" ]; then
        log "skipping $gib GiB: osd.$osd_id has $((free >> 20)) MiB free of $((total >> 20)) MiB," \
            "needs $((need >> 20)) MiB (instance disk + one flattened clone + 5% full ratio);" \
            "CA_BENCH_CEPH=private runs a cluster of the bench's own"
        skipped+=("$gib GiB (osd.$osd_id: $((free >> 20)) MiB free of $((total >> 20)) MiB, needs $((need >> 20)) MiB)")
        continue
    fi
    gfree=$(df -P --block-size=1G "$GLANCE_FILE_STORE_DIR" | awk 'NR == 2 {print $4}')
    [ "$gfree" -ge $((virt_gib + 2)) ] || die "only $gfree GiB free for Glance's file store"
    [ "$disk_made" = 1 ] || make_disk
    grow_data "$gib"
    for c in "${CONTENDERS[@]}"; do start_agent "$c" "$gib"; done
    sleep 1
    declare -A idle_kb=()
    for c in "${CONTENDERS[@]}"; do idle_kb[$c]=$(proc_kb "${agent_pid[$c]}" VmRSS); done
    for ((n = 1; n <= pairs; n++)); do
        if over_budget; then
            budget_note+=("$gib GiB: $((n - 1)) of $pairs rounds")
            break
        fi
        for c in "${CONTENDERS[@]}"; do
            [ "$c" = c ] && [ "$n" -gt "$fallback_rounds" ] && continue
            run_one "$c" "$gib" "$n"
        done
    done
    for c in "${CONTENDERS[@]}"; do
        printf '{"gib": %s, "contender": "%s", "idle_kb": %s, "hwm_kb": %s}\n' "$gib" "$c" \
            "${idle_kb[$c]}" "$(proc_kb "${agent_pid[$c]}" VmHWM)" >> "$bench/rss.jsonl"
        stop_agent "$c"
    done
done
[ -s "$bench/runs.jsonl" ] || die "no size fitted: ${skipped[*]}"
vsh destroy "$UUID" > /dev/null 2>&1 || true

stamp=${CA_BENCH_DATE:-$(date -u +%F)}
# A smoke run never overwrites real results.
[ "${CA_BENCH_SMOKE:-0}" = 1 ] && stamp=$stamp-smoke
results=${CA_BENCH_RESULTS_DIR:-$root/bench/results}
mkdir -p "$results"
out=$results/rbd-$stamp.md
png=$results/rbd-$stamp.png
elapsed=$((SECONDS - t_start_s))
stream_desc="raw (the agent's default for a raw disk, as nova uploads it)"
[ -n "$stream_fmt" ] && stream_desc="$stream_fmt (snapshot_image_format)"
case "$(cd "$build" && pwd)" in
    "$root"/*)
        agent_rev="release build of $rev_start (the tree at the bench's start)"
        [ -n "$dirty" ] && agent_rev="$agent_rev with uncommitted changes in ${dirty% }"
        ;;
    *) agent_rev="release build in $build" ;;
esac
{
    echo "# rbd-bench $t_start"
    echo
    echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)," \
        "guest domain type $GUEST_DOMTYPE, $($QEMU_BIN --version | head -1 | sed 's/ (.*//')," \
        "libvirt $(virsh -c "$LIBVIRT_URI" version 2> /dev/null | sed -n 's/^Using library: libvirt //p')," \
        "$(ceph --version | awk '{print "ceph", $3, $5}'), one bluestore OSD on a file" \
        "($((osd_total >> 30)) GiB), Glance $(dpkg-query -W -f='${Version}' glance-api 2> /dev/null)." \
        "Ceph and Glance: $ceph_note." \
        "Agent: $agent_rev. Instance disk ${virt_gib} GiB virtual (rbd, default features)," \
        "random data at ${DATA_OFF_MB} MiB, guest writer ${GUEST_WRITER_WPS} writes/s;" \
        "image_hw_qemu_guest_agent=yes (frozen through qemu-ga); contender c streams" \
        "$stream_desc into Glance's" \
        "file store. $pairs rounds a b (c in the first $((fallback_rounds < pairs ? fallback_rounds : pairs)) of them) per size, median (min–max). Runs redone: $retries" \
        "(outside interference, or the agent's job failed: see the failed attempts row). Load average at start $load_start, at the end" \
        "$(cut -d' ' -f1-3 /proc/loadavg) (other jobs share the 2 cores). Bench wall time" \
        "$((elapsed / 60)) min $((elapsed % 60)) s."
    if [ ${#skipped[@]} -gt 0 ]; then
        echo
        echo "Skipped, not enough room on the OSD: ${skipped[*]}."
    fi
    if [ ${#given_up[@]} -gt 0 ]; then
        echo
        echo "Runs given up after 3 failed attempts: ${given_up[*]}."
    fi
    if [ ${#budget_note[@]} -gt 0 ]; then
        echo
        echo "Stopped by CA_BENCH_BUDGET_MIN=$budget_min: ${budget_note[*]}."
    fi
    echo
} > "$out"
echo
$py "$bench/bench.py" table "$bench/runs.jsonl" "$bench/rss.jsonl" "$out" "$png" "$bench/failures.jsonl"
log "saved $out, $png and ${out%.md}.json ($((elapsed / 60)) min $((elapsed % 60)) s)"
