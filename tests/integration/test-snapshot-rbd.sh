#!/usr/bin/env bash
# Snapshots of a guest whose root disk is in Ceph ([libvirt] images_type = rbd), end to end:
# python3-nova's ComputeAPI casts, the agent takes the direct path (rbd snapshot + clone into
# Glance's pool, the image registered by its rbd:// location, nothing streamed) or, when Glance's
# pool is unknown, streams the rbd snapshot. Checked: the image active with the right location,
# the clone's data a consistent point in time (ca-imgcheck on `rbd export images/<id>@snap`),
# the flatten policy (parent link, temporary snapshot removed), the guest never stopping, and
# nothing left in Ceph after a failure. A new guest booted from a clone of the image (as nova
# boots an rbd image) reads the snapshot's bytes; with a Glance that has only the file store (a
# second glance-api of the test's own) the agent streams the image live instead.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
. "$root/tests/integration/lib.sh"
SVC=test-snapshot-rbd
build=${CA_BUILD_DIR:-$root/build/debug}
agent=${CA_AGENT:-$build/compute-agent}
check=$build/tests/tools/ca-imgcheck
[ -x "$agent" ] && [ -x "$check" ] || { echo "build first ($agent, $check)"; exit 77; }
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py

"$root/deploy/services.sh" up rabbitmq ceph glance rbd-guest
svc_load_env rabbitmq
svc_load_env ceph
svc_load_env glance
svc_load_env rbd-guest
case "$GLANCE_STORES" in *rbd*) ;; *) echo "glance has no rbd store ($GLANCE_STORES)"; exit 77 ;; esac

tmp=$(mktemp -d /var/tmp/ca-test-snapshot-rbd.XXXXXX)
host=rbdsnap-$$
agent_pid=
hbw=
dsw=
images=()
glance=$GLANCE_URL              # the Glance the agent and the image helpers use
cg_uuid='' cg_clone='' fg_port=''     # clone guest (1b), file-store-only Glance (6)
cg_title="compute-agent test clone guest"
rbdc() { rbd --conf "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" "$@"; }
rbdn() { rbd --conf "$CEPH_CONF" --id nova "$@"; }      # nova's own user, as nova clones
vsh() { timeout 60 virsh -q -c "$LIBVIRT_URI" "$@"; }
fg() { # the test's own glance-api: file store only, own state dir, DB and port
    GLANCE_INSTANCE=rbdtest-$$ GLANCE_PORT=$fg_port GLANCE_WANT_STORES=file \
        "$root/deploy/services/glance.sh" "$@"
}
cleanup() {
    set +e      # every step runs even if an earlier one fails (no queue, no domain, ...)
    [ -n "$hbw" ] && kill -- -"$hbw" 2>/dev/null
    [ -n "$dsw" ] && kill -- -"$dsw" 2>/dev/null
    [ -n "$agent_pid" ] && pid_alive "$agent_pid" && kill -KILL "$agent_pid" 2>/dev/null
    # The clone guest (only ours: its UUID and title), then its disk, then the images it came from.
    if [ -n "$cg_uuid" ] && [ "$(vsh desc --title "$cg_uuid" 2>/dev/null)" = "$cg_title" ]; then
        vsh destroy "$cg_uuid" > /dev/null 2>&1 || true
        vsh undefine "$cg_uuid" > /dev/null 2>&1 || true
    fi
    [ -n "$cg_clone" ] && { rbdc rm --no-progress "$cg_clone" > /dev/null 2>&1 || true; }
    # Then what the run left in Ceph for its images (already reported as a failure).
    for i in "${images[@]}"; do
        curl -s -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null || true
        rbd_image_leftovers_remove "$i"
    done
    [ -n "$fg_port" ] && { fg purge > /dev/null 2>&1 || true; }
    [ -n "${RABBITMQCTL:-}" ] && $RABBITMQCTL delete_queue "compute.$host" > /dev/null 2>&1
    rm -rf "$tmp"
}
trap cleanup EXIT

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$tmp/oslo.conf"

start_agent() { # start_agent NAME [extra ini lines...]
    local name=$1; shift
    [ -n "$agent_pid" ] && { kill -TERM "$agent_pid"; wait "$agent_pid" || true; agent_pid=; }
    mkdir -p "$tmp/scratch"
    {
        printf '[DEFAULT]\nhost = %s\nstate_path = %s/state\ntransport_url = %s\n' "$host" "$tmp" "$TRANSPORT_URL"
        printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/scratch\n' "$LIBVIRT_URI" "$tmp"
        printf 'images_type = rbd\nimages_rbd_pool = %s\nimages_rbd_ceph_conf = %s\nrbd_user = nova\n' \
            "$RBD_GUEST_POOL" "$CEPH_CONF"
        printf '[glance]\napi_servers = %s\n' "$glance"
        printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
        printf '[notifications]\nnotify_on_state_change = vm_and_task_state\n'
        for l in "$@"; do printf '%s\n' "$l"; done
    } > "$tmp/$name.conf"
    agent_log=$tmp/$name.log
    env ${AGENT_ENV:-} "$agent" --config-file "$tmp/$name.conf" > "$agent_log" 2>&1 &
    agent_pid=$!
    wait_for 30 "agent ready" grep -q 'ready: connected to RabbitMQ' "$agent_log" \
        || { bad "agent $name not ready"; cat "$agent_log"; return 1; }
}

create_image() {
    curl -sf -X POST "$glance/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"$1\", \"container_format\": \"bare\", \"disk_format\": \"raw\",
        \"instance_uuid\": \"$RBD_GUEST_UUID\", \"image_type\": \"snapshot\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
image_json() { curl -sf "$glance/v2/images/$1"; }
image_field() { image_json "$1" | $py -c "import json,sys; print(json.load(sys.stdin).get('$2'))"; }
last_hb() { grep -a -o 'CA-HB seq=[0-9]*' "$RBD_GUEST_CONSOLE_LOG" | tail -1 | cut -d= -f2; }

cast() { # cast IMAGE_ID [nova_client cast options...]
    local img=$1; shift
    $py "$client" cast --config "$tmp/oslo.conf" --host "$host" --instance-uuid "$RBD_GUEST_UUID" \
        --image-id "$img" --quiet --sysmeta image_hw_qemu_guest_agent=yes "$@" > "$tmp/cast.out" 2>&1 \
        || { bad "cast failed: $(cat "$tmp/cast.out")"; return 1; }
}
wait_done() {
    wait_for 300 "snapshot of $1" grep -qE "snapshot to image $1 (done|failed|refused)" "$agent_log"
}
# The temporary snapshots of this test's images on the shared disk (other runs' jobs are not ours).
temp_snaps() {
    rbdc snap ls "$RBD_GUEST_DISK" 2>/dev/null \
        | awk -v ours=" ${images[*]} " 'NR > 1 && $2 ~ /^snap-/ && index(ours, " " substr($2, 6) " ") {print $2}'
}

foreign=$(rbdc snap ls "$RBD_GUEST_DISK" 2>/dev/null | awk 'NR > 1 && $2 ~ /^snap-/ {print $2}' | tr '\n' ' ')
[ -z "$foreign" ] || log "note: snapshots of jobs from other runs on $RBD_GUEST_DISK (not checked here): $foreign"

check_clone() { # check_clone IMAGE_ID MIN_SEQ: the clone's snapshot holds a consistent point
    local img=$1 min=$2 out
    rbdc export "images/$img@snap" "$tmp/clone.raw" > /dev/null 2>&1 || { bad "cannot export images/$img@snap"; return; }
    out=$("$check" -f raw -m "$min" "$tmp/clone.raw" 2>&1) && ok "clone is a consistent point in time: $out" \
        || bad "checker on the clone: $out"
    rm -f "$tmp/clone.raw"
}

# A base image whose rbd location tells the agent where Glance keeps images (nova's way).
base=$(cat /proc/sys/kernel/random/uuid)
head -c 1048576 /dev/zero > "$tmp/base.raw"
rbdc import --image-format 2 "$tmp/base.raw" "images/$base" > /dev/null 2>&1
rbdc snap create "images/$base@snap" && rbdc snap protect "images/$base@snap"
curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{\"id\": \"$base\",
    \"name\": \"rbd-base\", \"container_format\": \"bare\", \"disk_format\": \"raw\"}" > /dev/null
curl -sf -X PATCH "$GLANCE_URL/v2/images/$base" -H 'Content-Type: application/openstack-images-v2.1-json-patch' \
    -d "[{\"op\": \"add\", \"path\": \"/locations/-\", \"value\": {\"url\": \"rbd://$CEPH_FSID/images/$base/snap\", \"metadata\": {}}}]" > /dev/null
images+=("$base")
[ "$(image_field "$base" status)" = active ] && ok "base image $base registered by rbd location" || bad "base image not active"

# 1. Direct, background flatten (the default): active at once, then flattened, temp snap gone.
start_agent background
img=$(create_image direct-bg); images+=("$img")
min=$(last_hb)
cast "$img" --sysmeta "image_base_image_ref=$base"
wait_done "$img"
grep -q "snapshot to image $img done" "$agent_log" && ok "direct snapshot done" || bad "direct: $(grep "$img" "$agent_log" | tail -2)"
grep -q "point in time taken via rbd-direct" "$agent_log" && ok "direct path ran" || bad "path: $(grep 'point in time\|direct snapshot not possible' "$agent_log" | tail -1)"
loc=$(image_json "$img" | $py -c 'import json,sys; d=json.load(sys.stdin); print((d.get("locations") or [{}])[0].get("url"))')
[ "$loc" = "rbd://$CEPH_FSID/images/$img/snap" ] && ok "location $loc" || bad "location '$loc'"
[ "$(image_field "$img" status)" = active ] && ok "image active" || bad "image $(image_field "$img" status)"
[ "$(image_field "$img" compute_agent_consistency)" = filesystem ] \
    && ok "guest filesystems frozen for the rbd snapshot (freeze window $(image_field "$img" compute_agent_freeze_window_ms) ms)" \
    || bad "not quiesced: $(grep 'not frozen' "$agent_log" | tail -1)"
check_clone "$img" "$min"
wait_for 120 "flatten" grep -q "image $img flattened" "$agent_log" && ok "background flatten finished" || bad "no flatten: $(grep "$img" "$agent_log" | tail -1)"
rbdc info "images/$img" | grep -q parent && bad "clone still has a parent" || ok "clone independent of the instance disk"
[ -z "$(temp_snaps)" ] && ok "temporary snapshot on the instance disk removed" || bad "left: $(temp_snaps)"
grep -q "snapshot.end\|snapshot to image $img done" "$agent_log"

# 1b. A new guest booted from that image reads the same data. Nova boots an rbd-backed image by
#     cloning its snapshot into the instance pool (a clone of the clone) and handing QEMU the rbd
#     disk; the new guest (own name, UUID, console; same kernel, initramfs and cmdline as the rbd
#     guest, with ca.disksum=1) prints the md5 of its disk's base and ring regions before anything
#     writes to it, and its writer the highest sequence number it finds there.
region=$((LAYOUT_RING_OFFSET + LAYOUT_RING_LEN))
rbdc export --no-progress "images/$img@snap" "$tmp/snap.raw" > /dev/null 2>&1 || bad "cannot export images/$img@snap"
want_sum=$(head -c "$region" "$tmp/snap.raw" | md5sum | cut -d' ' -f1)
want_seq=$("$check" -f raw "$tmp/snap.raw" 2>&1 | sed -n 's/.* highest_seq=\([0-9]*\) .*/\1/p')
rm -f "$tmp/snap.raw"
cg_name=ca-clone-$$
cg_console=$tmp/clone-console.log
cg_disk_name=$RBD_GUEST_POOL/$(cat /proc/sys/kernel/random/uuid)_disk
rbdn clone "images/$img@snap" "$cg_disk_name" && cg_clone=$cg_disk_name \
    && ok "image cloned for a new instance as client.nova ($cg_clone)" || bad "rbd clone images/$img@snap failed"
cg_uuid=$(cat /proc/sys/kernel/random/uuid)
cg_qemu=
if [ -n "$cg_clone" ] && "$root/deploy/services/rbd-guest.sh" domain-xml "$cg_name" "$cg_uuid" "$cg_title" \
        "$cg_clone" "$cg_console" ca.disksum=1 > "$tmp/clone.xml" && vsh define "$tmp/clone.xml" > /dev/null \
        && vsh start "$cg_uuid" > /dev/null; then
    cg_qemu=$(cat "/run/libvirt/qemu/$cg_name.pid" 2>/dev/null || true)
    wait_for 150 "the clone guest's ready marker" grep -qa CA-GUEST-READY "$cg_console" \
        && ok "new guest $cg_name booted from the clone (qemu $cg_qemu, $(grep -a -m1 -o 'CA-GUEST-READY uptime=[0-9.]*' "$cg_console"))" \
        || bad "clone guest did not boot: $(tail -5 "$cg_console" 2>/dev/null | tr -d '\r')"
else
    bad "clone guest not defined/started"
fi
got_sum=$(grep -a -m1 -o 'CA-DISK-SUM off=0 len=[0-9]* md5=[0-9a-f]*' "$cg_console" 2>/dev/null || true)
[ -n "$want_sum" ] && [ "$got_sum" = "CA-DISK-SUM off=0 len=$region md5=$want_sum" ] \
    && ok "new guest reads the snapshot's bytes (base + ring, $region bytes, md5 $want_sum)" \
    || bad "new guest read '${got_sum:-nothing}', the snapshot holds md5=$want_sum (initramfs rebuilt? deploy/guest/build.sh)"
# The writer prints its start line once it has scanned the whole ring (some seconds under TCG).
wait_for 60 "the clone guest's writer to start" grep -qa 'CA-WRITER start' "$cg_console" || true
got_seq=$(grep -a -m1 -o 'CA-WRITER start dev=/dev/vda resume_after=[0-9]* invalid=[0-9]*' "$cg_console" 2>/dev/null || true)
[ -n "$want_seq" ] && [ "$got_seq" = "CA-WRITER start dev=/dev/vda resume_after=$want_seq invalid=0" ] \
    && ok "new guest finds the snapshot's newest write on its disk (seq $want_seq, no invalid block)" \
    || bad "new guest's writer: '${got_seq:-nothing}', ca-imgcheck on the snapshot: highest_seq=${want_seq:-?}"
cg_hb_beyond() {
    local s_
    s_=$(grep -a -o 'CA-HB seq=[0-9]*' "$cg_console" | tail -1 | cut -d= -f2)
    [ -n "$s_" ] && [ "$s_" -gt "$1" ]
}
wait_for 30 "the clone guest's writer" cg_hb_beyond "$((${want_seq:-0} + 50))" \
    && ok "new guest writes on its own disk (past seq $((${want_seq:-0} + 50)))" || bad "clone guest's writer does not advance"
vsh destroy "$cg_uuid" > /dev/null 2>&1 || true; vsh undefine "$cg_uuid" > /dev/null 2>&1 || true
vsh dominfo "$cg_uuid" > /dev/null 2>&1 && bad "domain $cg_name still defined" || ok "clone guest stopped and undefined"
[ -n "$cg_qemu" ] && ! pid_alive "$cg_qemu" && ok "its qemu ($cg_qemu) is gone" || bad "qemu '${cg_qemu}' of the clone guest alive or unknown"
rbdc export --no-progress "images/$img@snap" "$tmp/snap.raw" > /dev/null 2>&1
[ "$(head -c "$region" "$tmp/snap.raw" 2>/dev/null | md5sum | cut -d' ' -f1)" = "$want_sum" ] \
    && ok "the image is untouched by the new guest's writes" || bad "images/$img@snap changed under its clone"
rm -f "$tmp/snap.raw"
rbdn rm --no-progress "$cg_clone" > /dev/null 2>&1 && ! rbdc ls "$RBD_GUEST_POOL" | grep -qx "${cg_clone#*/}" \
    && { ok "the clone of the clone removed ($cg_clone)"; cg_clone=; } || bad "cannot remove $cg_clone"
[ -z "$(rbdc children "images/$img@snap" 2>&1)" ] && ok "no child left on images/$img@snap" \
    || bad "children left: $(rbdc children "images/$img@snap" 2>&1)"
curl -sf -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null && ! rbdc ls images | grep -qx "$img" \
    && ok "Glance deletes the image and its rbd image (nothing leaked)" || bad "image $img or images/$img left"

# 2. Direct, never flatten: the clone keeps its parent (and so does the temp snapshot).
start_agent never '[libvirt]' 'images_rbd_flatten = never'
img=$(create_image direct-never); images+=("$img")
min=$(last_hb)
cast "$img" --sysmeta "image_base_image_ref=$base"
wait_done "$img"
grep -q "snapshot to image $img done" "$agent_log" && ok "direct (never) done" || bad "never: $(grep "$img" "$agent_log" | tail -2)"
rbdc info "images/$img" | grep -q "parent: $RBD_GUEST_POOL/" && ok "clone keeps its parent (never)" || bad "no parent with never"
check_clone "$img" "$min"
# Deleting that image through Glance removes the clone; then the temp snapshot can go.
curl -sf -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null && ok "Glance deletes the clone" || bad "delete failed"
# With "never" the temporary snapshot is the clone's parent for the image's whole life; once the
# image is gone it has no child left and can be removed (by the operator, or a later issue's GC).
for s_ in $(temp_snaps); do
    rbdc snap unprotect "$RBD_GUEST_DISK@$s_" && rbdc snap rm "$RBD_GUEST_DISK@$s_" > /dev/null 2>&1 \
        && ok "temporary snapshot $s_ removable once the image is deleted" || bad "cannot remove $s_"
done

# 3. Direct, sync flatten (nova's behaviour), found through images_rbd_glance_pool (no base).
start_agent sync '[libvirt]' 'images_rbd_flatten = sync' 'images_rbd_glance_pool = images'
img=$(create_image direct-sync); images+=("$img")
min=$(last_hb)
cast "$img"
wait_done "$img"
grep -q "snapshot to image $img done" "$agent_log" && ok "direct (sync, pool from config) done" || bad "sync: $(grep "$img" "$agent_log" | tail -2)"
rbdc info "images/$img" | grep -q parent && bad "sync: clone still has a parent" || ok "sync: flattened before active"
check_clone "$img" "$min"

# 4. Fallback: Glance's pool unknown → the rbd snapshot is streamed (raw); the guest keeps running
#    (its heartbeat lines keep arriving: no cold path, no pause).
hb_watch() { # hb_watch OUT: sets hbw; own session so hb_stop ends the whole pipeline
    setsid bash -c 'tail -n0 -F "$1" 2>/dev/null | while IFS= read -r l; do
        case $l in *CA-HB*) date +%s%3N ;; esac
    done > "$2"' hb-watch "$RBD_GUEST_CONSOLE_LOG" "$1" < /dev/null &
    hbw=$!
}
hb_stop() { kill -- -"$hbw" 2>/dev/null || true; wait "$hbw" 2>/dev/null || true; hbw=; }
max_gap() { awk 'NR > 1 && $1 - p > m {m = $1 - p} {p = $1} END {print m + 0}' "$1"; }
start_agent stream
img=$(create_image streamed); images+=("$img")
min=$(last_hb)
hb_watch "$tmp/hb.stream"
cast "$img"
wait_done "$img"
hb_stop
gap=$(max_gap "$tmp/hb.stream")
[ "$gap" -gt 0 ] && [ "$gap" -lt 1500 ] && ok "guest never paused while streaming (longest heartbeat gap $gap ms)" \
    || bad "heartbeat gap $gap ms while streaming"
grep -q "direct snapshot not possible" "$agent_log" && grep -q "point in time taken via rbd-snapshot" "$agent_log" \
    && ok "fallback streams the rbd snapshot" || bad "fallback: $(grep 'point in time\|not possible' "$agent_log" | tail -2)"
[ "$(image_field "$img" disk_format)" = raw ] && ok "streamed image is raw" || bad "format $(image_field "$img" disk_format)"
why=$(image_field "$img" compute_agent_snapshot_path_reason)
[ -n "$why" ] && [ "$why" != None ] && ok "the image records why it was streamed: $why" || bad "no path reason on the image"
curl -sf "$GLANCE_URL/v2/images/$img/file" -o "$tmp/stream.raw"
out=$("$check" -f raw -m "$min" "$tmp/stream.raw" 2>&1) && ok "streamed image consistent: $out" || bad "checker: $out"
rm -f "$tmp/stream.raw"
[ "$(virsh -c "$LIBVIRT_URI" domstate "$RBD_GUEST_NAME")" = running ] && ok "guest running throughout" || bad "guest not running"
[ -z "$(temp_snaps)" ] && ok "no rbd snapshot left after streaming" || bad "left: $(temp_snaps)"

# 5. A failure inside the direct path (test-only fault after the clone): the image is deleted and
#    nothing of the run stays in Ceph.
AGENT_ENV=CA_TEST_RBD_FAIL_AT=clone-snap start_agent fault
img=$(create_image fault); images+=("$img")
cast "$img" --sysmeta "image_base_image_ref=$base"
wait_done "$img"
grep -q "snapshot to image $img failed" "$agent_log" && ok "injected fault fails the snapshot" || bad "fault: $(grep "$img" "$agent_log" | tail -2)"
rbdc ls images | grep -qx "$img" && bad "clone images/$img left behind" || ok "no clone left"
[ -z "$(temp_snaps)" ] && ok "no temporary snapshot left" || bad "left: $(temp_snaps)"
code=$(curl -s -o /dev/null -w '%{http_code}' "$GLANCE_URL/v2/images/$img")
[ "$code" = 404 ] && ok "image deleted" || bad "image still there ($code)"

# 6. A Glance with the file store only (a second glance-api of the test's own, on another port,
#    with its own state dir and DB): the base image has no rbd location, so the agent cannot clone
#    into Glance's pool, says why, and streams the rbd snapshot live; the guest never pauses.
fg_port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if fg start > "$tmp/glance-fileonly.log" 2>&1; then
    glance=$(svc_load_env "glance-rbdtest-$$"; echo "$GLANCE_URL")
    ok "second glance-api up on $glance (pid $(cat "$(svc_dir "glance-rbdtest-$$")/pids/api.pid"))"
else
    bad "second glance-api did not start: $(tail -3 "$tmp/glance-fileonly.log")"
fi
stores=$(curl -sf "$glance/v2/info/stores" | $py -c 'import json,sys; print(",".join(s["id"] for s in json.load(sys.stdin)["stores"]))' || true)
[ "$glance" != "$GLANCE_URL" ] && [ "$stores" = file ] && ok "it has the file store only" || bad "stores of $glance: '$stores'"
fbase=$(cat /proc/sys/kernel/random/uuid)
curl -sf -X POST "$glance/v2/images" -H 'Content-Type: application/json' -d "{\"id\": \"$fbase\",
    \"name\": \"file-base\", \"container_format\": \"bare\", \"disk_format\": \"raw\"}" > /dev/null || true
curl -sf -X PUT "$glance/v2/images/$fbase/file" -H 'Content-Type: application/octet-stream' \
    --data-binary @"$tmp/base.raw" > /dev/null || true
floc=$(image_json "$fbase" | $py -c 'import json,sys; print(" ".join(l["url"] for l in json.load(sys.stdin).get("locations") or []))' || true)
[ "$(image_field "$fbase" status)" = active ] && [[ "$floc" == file://* ]] && [[ "$floc" != *rbd://* ]] \
    && ok "base image $fbase active with a file location only" || bad "base image: $(image_field "$fbase" status) at '$floc'"
start_agent fileonly
fimg=$(create_image streamed-fileonly)
min=$(last_hb)
hb_watch "$tmp/hb.fileonly"
setsid bash -c 'while :; do virsh -q -c "$1" domstate "$2" 2>&1 | head -1; sleep 0.2; done > "$3"' \
    ds-watch "$LIBVIRT_URI" "$RBD_GUEST_UUID" "$tmp/ds.fileonly" < /dev/null &
dsw=$!
cast "$fimg" --sysmeta "image_base_image_ref=$fbase"
wait_done "$fimg"
hb_stop
kill -- -"$dsw" 2>/dev/null || true; wait "$dsw" 2>/dev/null || true; dsw=
max=$(last_hb)
grep -q "snapshot to image $fimg done" "$agent_log" && ok "snapshot into the file-only Glance done" \
    || bad "file-only: $(grep "$fimg" "$agent_log" | tail -2)"
why_log=$(grep -o "direct snapshot not possible (.*)" "$agent_log" | head -1)
[[ "$why_log" == *"no rbd location on base image $fbase"* ]] \
    && ok "agent logs why the direct path was not possible: $why_log" || bad "agent's log: '${why_log:-nothing}'"
grep -q "point in time taken via rbd-snapshot" "$agent_log" && ok "agent streamed the rbd snapshot" \
    || bad "path: $(grep 'point in time' "$agent_log" | tail -1)"
[ "$(image_field "$fimg" status)" = active ] && ok "image active in the file-only Glance" || bad "image $(image_field "$fimg" status)"
path=$(image_field "$fimg" compute_agent_snapshot_path)
[ "$path" = rbd-snapshot ] && ok "image records the streamed path ($path)" || bad "compute_agent_snapshot_path '$path'"
why=$(image_field "$fimg" compute_agent_snapshot_path_reason)
[[ "$why" == *"no rbd location on base image $fbase"* ]] && ok "image records why: $why" || bad "path reason '$why'"
floc=$(image_json "$fimg" | $py -c 'import json,sys; print(" ".join(l["url"] for l in json.load(sys.stdin).get("locations") or []))' || true)
[[ "$floc" == file://* ]] && ok "image data in the file store ($floc)" || bad "image location '$floc'"
code=$(curl -s -o /dev/null -w '%{http_code}' "$GLANCE_URL/v2/images/$fimg")
[ "$code" = 404 ] && ok "the shared Glance was not used" || bad "image $fimg on $GLANCE_URL ($code)"
curl -sf "$glance/v2/images/$fimg/file" -o "$tmp/fileonly.raw" || true
out=$("$check" -f raw -m "$min" -M "$max" "$tmp/fileonly.raw" 2>&1) && ok "downloaded image consistent (seq $min..$max): $out" \
    || bad "checker on the downloaded image: $out"
rm -f "$tmp/fileonly.raw"
gap=$(max_gap "$tmp/hb.fileonly")
[ "$(wc -l < "$tmp/hb.fileonly")" -gt 10 ] && [ "$gap" -gt 0 ] && [ "$gap" -lt 2000 ] \
    && ok "guest never paused during the job ($(wc -l < "$tmp/hb.fileonly") heartbeats, longest gap $gap ms)" \
    || bad "heartbeats during the job: $(wc -l < "$tmp/hb.fileonly"), longest gap $gap ms"
states=$(sort "$tmp/ds.fileonly" | uniq -c | tr -s ' ' | paste -sd, -)
[ -s "$tmp/ds.fileonly" ] && [ -z "$(grep -vx running "$tmp/ds.fileonly")" ] \
    && ok "domain state sampled during the job: always running ($states )" || bad "domain states during the job: $states"
[ -z "$(temp_snaps)" ] && ok "no rbd snapshot left after streaming to the file-only Glance" || bad "left: $(temp_snaps)"
glance=$GLANCE_URL
fg purge > /dev/null 2>&1 && ! ss -Hltn "sport = :$fg_port" | grep -q . && ok "second glance-api stopped and purged" \
    || bad "second glance-api still on port $fg_port"
fg_port=

kill -TERM "$agent_pid"; wait "$agent_pid" || true; agent_pid=
grep -qF "$CEPH_NOVA_KEY" "$tmp"/*.log 2>/dev/null && bad "cephx key in a log" || ok "no cephx key in the logs"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
