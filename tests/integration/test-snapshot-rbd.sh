#!/usr/bin/env bash
# Snapshots of a guest whose root disk is in Ceph ([libvirt] images_type = rbd), end to end:
# python3-nova's ComputeAPI casts, the agent takes the direct path (rbd snapshot + clone into
# Glance's pool, the image registered by its rbd:// location, nothing streamed) or, when Glance's
# pool is unknown, streams the rbd snapshot. Checked: the image active with the right location,
# the clone's data a consistent point in time (ca-imgcheck on `rbd export images/<id>@snap`),
# the flatten policy (parent link, temporary snapshot removed), the guest never stopping, and
# nothing left in Ceph after a failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
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
images=()
rbdc() { rbd --conf "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" "$@"; }
cleanup() {
    [ -n "$hbw" ] && kill -- -"$hbw" 2>/dev/null
    [ -n "$agent_pid" ] && pid_alive "$agent_pid" && kill -KILL "$agent_pid" 2>/dev/null
    for i in "${images[@]}"; do curl -s -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null || true; done
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
        printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
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
    curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"$1\", \"container_format\": \"bare\", \"disk_format\": \"raw\",
        \"instance_uuid\": \"$RBD_GUEST_UUID\", \"image_type\": \"snapshot\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
image_json() { curl -sf "$GLANCE_URL/v2/images/$1"; }
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
temp_snaps() { rbdc snap ls "$RBD_GUEST_DISK" 2>/dev/null | awk 'NR > 1 && $2 ~ /^snap-/ {print $2}'; }

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

kill -TERM "$agent_pid"; wait "$agent_pid" || true; agent_pid=
grep -qF "$CEPH_NOVA_KEY" "$tmp"/*.log 2>/dev/null && bad "cephx key in a log" || ok "no cephx key in the logs"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
