#!/usr/bin/env bash
# The snapshot path end to end on the real services: python3-nova's ComputeAPI casts
# snapshot_instance for the test guest (a running TCG guest writing sequence-numbered blocks),
# the agent takes the point in time through libvirt, streams the image into Glance, and reports
# like nova-compute. Checked for each case: the image (active, format, qemu-img check, the
# consistency checker with the last heartbeat seen before the cast as a lower bound), the
# task-state walk and snapshot notifications an oslo listener received, the agent's log, and that
# nothing is left behind (scratch files, libvirt jobs, frozen filesystems).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
SVC=test-snapshot
build=${CA_BUILD_DIR:-$root/build/debug}
agent=${CA_AGENT:-$build/compute-agent}
check=$build/tests/tools/ca-imgcheck
[ -x "$agent" ] && [ -x "$check" ] || { echo "build first ($agent, $check)"; exit 77; }
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py

"$root/deploy/services.sh" up rabbitmq libvirt glance
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance

tmp=$(mktemp -d /var/tmp/ca-test-snapshot.XXXXXX)
host=snap-$$
agent_pid=
listen_pid=
images=()
hbw=
cleanup() {
    [ -n "$hbw" ] && kill -- -"$hbw" 2>/dev/null
    [ -n "$agent_pid" ] && pid_alive "$agent_pid" && kill -KILL "$agent_pid" 2>/dev/null
    [ -n "$listen_pid" ] && pid_alive "$listen_pid" && kill "$listen_pid" 2>/dev/null
    for i in "${images[@]}"; do curl -s -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null || true; done
    [ -n "${RABBITMQCTL:-}" ] && $RABBITMQCTL delete_queue "compute.$host" > /dev/null 2>&1
    [ "$(virsh -c "$LIBVIRT_URI" domstate "$GUEST_NAME" 2>/dev/null | head -1)" = running ] \
        || "$root/deploy/services.sh" up libvirt > /dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }
virsh_() { virsh -c "$LIBVIRT_URI" "$@"; }

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$tmp/oslo.conf"

start_agent() { # start_agent NAME [extra ini lines...]
    local name=$1; shift
    [ -n "$agent_pid" ] && stop_agent
    mkdir -p "$tmp/scratch"
    {
        printf '[DEFAULT]\nhost = %s\nstate_path = %s/state\ntransport_url = %s\n' "$host" "$tmp" "$TRANSPORT_URL"
        printf 'max_concurrent_snapshots = 1\n'
        printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/scratch\n' "$LIBVIRT_URI" "$tmp"
        printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
        printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
        printf '[notifications]\nnotification_format = both\nnotify_on_state_change = vm_and_task_state\n'
        for l in "$@"; do printf '%s\n' "$l"; done
    } > "$tmp/$name.conf"
    agent_log=$tmp/$name.log
    env ${AGENT_ENV:-} "$agent" --config-file "$root/deploy/compute-agent.conf.example" \
        --config-file "$tmp/$name.conf" > "$agent_log" 2>&1 &
    agent_pid=$!
    wait_for 30 "agent ready" grep -q 'ready: connected to RabbitMQ' "$agent_log" \
        || { bad "agent $name not ready"; cat "$agent_log"; return 1; }
}

stop_agent() {
    kill -TERM "$agent_pid" 2>/dev/null || true
    local rc=0; wait "$agent_pid" || rc=$?
    [ "$rc" -eq 0 ] || bad "agent exit status $rc"
    agent_pid=
}

create_image() { # create_image NAME → prints the id (as nova-api's compute_utils.create_image)
    curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"$1\", \"container_format\": \"bare\", \"disk_format\": \"qcow2\",
        \"min_disk\": 1, \"min_ram\": 0, \"instance_uuid\": \"$GUEST_UUID\",
        \"image_type\": \"snapshot\", \"base_image_ref\": \"155d900f-4e14-4e4c-a73d-069cbf4541e6\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}

image_field() { curl -sf "$GLANCE_URL/v2/images/$1" | $py -c "import json,sys; print(json.load(sys.stdin).get('$2'))"; }

last_hb() { grep -a -o 'CA-HB seq=[0-9]*' "$GUEST_CONSOLE_LOG" | tail -1 | cut -d= -f2; }

listen() { # listen OUT COUNT
    rm -f "$tmp/ready"
    $py "$client" listen --config "$tmp/oslo.conf" --pool "ca-snap-$$" --count "$2" --timeout 120 \
        --out "$1" --ready-file "$tmp/ready" > "$1.log" 2>&1 &
    listen_pid=$!
    wait_for 30 "listener" test -e "$tmp/ready"
}

cast() { # cast IMAGE_ID [nova_client cast options...]
    local img=$1; shift
    $py "$client" cast --config "$tmp/oslo.conf" --host "$host" --instance-uuid "$GUEST_UUID" \
        --image-id "$img" --quiet "$@" > "$tmp/cast.out" 2>&1 || { bad "cast failed: $(cat "$tmp/cast.out")"; return 1; }
}

wait_done() { # wait_done IMAGE_ID: the agent logged the end of that job (done or failed)
    wait_for 300 "snapshot of $1" grep -qE "snapshot to image $1 (done|failed|refused)|image $1 not found|disappeared" "$agent_log"
}

leftovers() { # nothing left behind by the job
    local n
    n=$(find "$tmp/scratch" -mindepth 1 2>/dev/null | wc -l)
    [ "$n" -eq 0 ] && ok "no scratch file left" || bad "scratch dir holds: $(ls "$tmp/scratch")"
    # An aborted backup job may take a moment to wind down after the view was closed.
    if wait_for 15 "no libvirt job" sh -c "virsh -c '$LIBVIRT_URI' domjobinfo '$GUEST_NAME' 2>/dev/null | grep -q 'Job type:[[:space:]]*None'"; then
        ok "no libvirt job left"
    elif [ "$(virsh_ domstate "$GUEST_NAME" | head -1)" = 'shut off' ]; then
        ok "no libvirt job (guest shut off)"
    else
        bad "libvirt job left: $(virsh_ domjobinfo "$GUEST_NAME" | head -2 | tr '\n' ' ')"
    fi
    if [ "$(virsh_ domstate "$GUEST_NAME" | head -1)" = running ]; then
        st=$(virsh_ qemu-agent-command "$GUEST_NAME" '{"execute":"guest-fsfreeze-status"}' 2>&1 || true)
        grep -q thawed <<<"$st" && ok "guest filesystems thawed" || bad "fsfreeze status: $st"
    fi
}

verify_image() { # verify_image IMAGE_ID FORMAT MIN_SEQ
    local img=$1 fmt=$2 min=$3 st
    st=$(image_field "$img" status)
    [ "$st" = active ] && ok "image $img active" || { bad "image $img is $st"; return; }
    [ "$(image_field "$img" disk_format)" = "$fmt" ] && ok "disk_format $fmt" || bad "disk_format $(image_field "$img" disk_format)"
    curl -sf "$GLANCE_URL/v2/images/$img/file" -o "$tmp/img.$fmt"
    if [ "$fmt" = qcow2 ]; then
        qemu-img check -q "$tmp/img.qcow2" && ok "qemu-img check clean" || bad "qemu-img check failed"
    fi
    out=$("$check" -f "$fmt" -m "$min" "$tmp/img.$fmt" 2>&1) && ok "consistent point in time: $out" \
        || bad "checker: $out"
    rm -f "$tmp/img.$fmt"
}

states_seen() { # the task_state walk in this agent's legacy instance.update notifications
    $py - "$1" "compute.$host" <<'PY'
import json, sys
walk = []
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r['event_type'] == 'compute.instance.update' and r['publisher_id'] == sys.argv[2]:
        p = r['payload']
        walk.append('%s>%s' % (p.get('old_task_state'), p.get('new_task_state')))
print(' '.join(walk))
PY
}

# Host-side arrival times of the guest's heartbeat lines (every 100 ms): the longest gap shows
# how long the guest stood still.
# It runs in its own session so hb_stop can end the whole pipeline (a tail left behind would keep
# ctest's output pipe open).
hb_watch() { # hb_watch OUT: sets hbw
    setsid bash -c 'tail -n0 -F "$1" 2>/dev/null | while IFS= read -r l; do
        case $l in *CA-HB*) date +%s%3N ;; esac
    done > "$2"' hb-watch "$GUEST_CONSOLE_LOG" "$1" < /dev/null &
    hbw=$!
}
hb_stop() { kill -- -"$hbw" 2>/dev/null || true; wait "$hbw" 2>/dev/null || true; hbw=; }
max_gap() { awk 'NR > 1 && $1 - p > m {m = $1 - p} {p = $1} END {print m + 0}' "$1"; }

# ------------------------------------------------------------------------------------------
# 1. Live snapshot of the running, writing guest; qemu-guest-agent announced (freeze if it can).
start_agent live
listen "$tmp/n1.jsonl" 12
img=$(create_image live-1); images+=("$img")
hb_watch "$tmp/hb.idle"
sleep 4
hb_stop
idle_gap=$(max_gap "$tmp/hb.idle")
hb_watch "$tmp/hb.snap"
min=$(last_hb)
cast "$img" --sysmeta image_hw_qemu_guest_agent=yes
wait_done "$img"
hb_stop
snap_gap=$(max_gap "$tmp/hb.snap")
log "guest heartbeat: longest gap idle ${idle_gap} ms, during the snapshot ${snap_gap} ms"
[ "$snap_gap" -gt 0 ] && [ "$snap_gap" -le $((idle_gap * 2 + 300)) ] \
    && ok "guest never stood still (longest heartbeat gap ${snap_gap} ms, idle ${idle_gap} ms)" \
    || bad "heartbeat gap ${snap_gap} ms during the snapshot (idle ${idle_gap} ms)"
grep -q "snapshot to image $img done" "$agent_log" && ok "agent: snapshot done" || { bad "agent: $(grep "$img" "$agent_log" | tail -2)"; }
grep -q "point in time taken via backup-pull" "$agent_log" && ok "live path: backup pull" || bad "path: $(grep 'point in time' "$agent_log")"
verify_image "$img" qcow2 "$min"
[ "$(image_field "$img" compute_agent_consistency)" = filesystem ] && ok "recorded: filesystem-consistent" \
    || bad "consistency property: $(image_field "$img" compute_agent_consistency)"
[ "$(image_field "$img" image_location)" = snapshot ] && ok "nova's image properties set" || bad "image_location missing"
wait "$listen_pid" || true
walk=$(states_seen "$tmp/n1.jsonl")
want="image_snapshot_pending>image_snapshot image_snapshot>image_pending_upload image_pending_upload>image_uploading image_uploading>None"
[ "$walk" = "$want" ] && ok "task states: $walk" || bad "task states: '$walk'"
for ev in compute.instance.snapshot.start compute.instance.snapshot.end instance.snapshot.start instance.snapshot.end; do
    grep -q "\"event_type\": \"$ev\"" "$tmp/n1.jsonl" && ok "notification $ev" || bad "no $ev"
done
leftovers

# 2. Unexpected task state (the cast says None): refused, image deleted, error notifications.
listen "$tmp/n2.jsonl" 2
img=$(create_image unexpected); images+=("$img")
cast "$img" --task-state None
wait_done "$img"
grep -q "snapshot to image $img refused: Unexpected task state" "$agent_log" && ok "unexpected task state refused" \
    || bad "unexpected state: $(grep "$img" "$agent_log" | tail -1)"
gone() { [ "$(curl -s -o /dev/null -w '%{http_code}' "$GLANCE_URL/v2/images/$1")" = 404 ]; }
wait_for 10 "image deleted" gone "$img" && ok "its image was deleted" || bad "image $img still there"
wait "$listen_pid" || true
grep -q '"event_type": "snapshot_instance"' "$tmp/n2.jsonl" && grep -q '"event_type": "compute.exception"' "$tmp/n2.jsonl" \
    && ok "error notifications (legacy + compute.exception)" || bad "error notifications missing"

# 3. The image does not exist: task_state back to None, a warning, no error notification.
cast "$(cat /proc/sys/kernel/random/uuid)"
sleep 3
grep -q "not found during snapshot" "$agent_log" && ok "missing image handled as nova (ImageNotFound)" \
    || bad "missing image: $(tail -3 "$agent_log")"

# 4. Quiesce required: the guest's filesystems are frozen around the point in time.
img=$(create_image quiesced); images+=("$img")
min=$(last_hb)
cast "$img" --sysmeta image_os_require_quiesce=yes --sysmeta image_hw_qemu_guest_agent=yes
wait_done "$img"
grep -q "snapshot to image $img done" "$agent_log" && ok "quiesced snapshot done" || bad "quiesced: $(grep "$img" "$agent_log" | tail -1)"
verify_image "$img" qcow2 "$min"
fw=$(image_field "$img" compute_agent_freeze_window_ms)
[ "${fw:--1}" -ge 0 ] 2>/dev/null && ok "freeze window recorded: ${fw} ms" || bad "freeze window: $fw"
leftovers

# 5. raw and compressed formats.
start_agent raw '[libvirt]' 'snapshot_image_format = raw'
img=$(create_image raw-1); images+=("$img")
min=$(last_hb)
cast "$img"
wait_done "$img"
verify_image "$img" raw "$min"
start_agent compressed '[libvirt]' 'snapshot_compression = True'
img=$(create_image comp-1); images+=("$img")
min=$(last_hb)
cast "$img"
wait_done "$img"
verify_image "$img" qcow2 "$min"
leftovers

# 6. Two snapshots with max_concurrent_snapshots = 1: the second starts after the first ended.
a=$(create_image serial-a); images+=("$a")
b=$(create_image serial-b); images+=("$b")
cast "$a"; cast "$b"
wait_done "$a"; wait_done "$b"
la=$(grep -n "snapshot to image $a done" "$agent_log" | cut -d: -f1)
lb=$(grep -n "snapshot to image $b starting" "$agent_log" | cut -d: -f1)
[ -n "$la" ] && [ -n "$lb" ] && [ "$lb" -gt "$la" ] && ok "serialized by max_concurrent_snapshots = 1" \
    || bad "not serialized (done a at $la, start b at $lb)"

# 6a. A paused guest: still the live path, and it stays paused (nova snapshots paused guests live).
virsh_ suspend "$GUEST_NAME" > /dev/null
min=$(last_hb)
img=$(create_image paused); images+=("$img")
cast "$img" --vm-state paused --power-state 3
wait_done "$img"
grep -q "snapshot to image $img done" "$agent_log" && ok "paused guest snapshotted" || bad "paused: $(grep "$img" "$agent_log" | tail -1)"
[ "$(virsh_ domstate "$GUEST_NAME" | head -1)" = paused ] && ok "guest still paused afterwards" || bad "guest state changed: $(virsh_ domstate "$GUEST_NAME")"
virsh_ resume "$GUEST_NAME" > /dev/null
verify_image "$img" qcow2 "$min"
leftovers

# 6b. Quiesce required while the guest agent hangs (qemu-ga SIGSTOPped inside the guest for longer
#     than the agent timeout): the snapshot fails, its image is deleted, the error notifications go
#     out, and the guest ends thawed. qemu-ga stays stopped 30 s: the cast, the job's start and
#     the 10 s freeze timeout must all fit in that, even on a loaded machine (14 s was too short
#     with a benchmark running alongside).
listen "$tmp/n6.jsonl" 8
img=$(create_image hung-agent); images+=("$img")
virsh_ qemu-agent-command "$GUEST_NAME" '{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","p=$(pidof qemu-ga); kill -STOP $p; sleep 30; kill -CONT $p"]}}' > /dev/null
# The guest-exec'd shell runs asynchronously: cast only once the agent really stopped answering.
agent_silent() { ! virsh_ qemu-agent-command --timeout 1 "$GUEST_NAME" '{"execute":"guest-ping"}' > /dev/null 2>&1; }
wait_for 10 "qemu-ga to stop answering" agent_silent || bad "qemu-ga kept answering"
cast "$img" --sysmeta image_os_require_quiesce=yes --sysmeta image_hw_qemu_guest_agent=yes
wait_done "$img"
grep -q "snapshot to image $img failed" "$agent_log" && ok "required quiesce with a hung guest agent fails the snapshot" \
    || bad "hung agent: $(grep "$img" "$agent_log" | tail -1)"
wait_for 10 "image deleted" gone "$img" && ok "its image was deleted" || bad "image $img still there"
wait "$listen_pid" || true
grep -q '"event_type": "compute.exception"' "$tmp/n6.jsonl" && ok "error notifications sent" || bad "no error notifications"
grep -q '"new_task_state": null' "$tmp/n6.jsonl" && ok "task_state back to None" || bad "task_state not reset"
wait_for 45 "qemu-ga back" virsh_ qemu-agent-command "$GUEST_NAME" '{"execute":"guest-ping"}' || true
leftovers

# 6c. The image deleted while it uploads (a test-only pause holds the upload): task_state back to
#     None, a warning, no error notification — nova's ImageNotFound handling.
AGENT_ENV=CA_TEST_UPLOAD_PAUSE_MS=4000 start_agent pause
img=$(create_image deleted-mid-upload); images+=("$img")
cast "$img"
wait_for 120 "upload paused" grep -q "test: upload paused" "$agent_log"
curl -sf -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null
wait_done "$img"
grep -q "image $img not found during snapshot" "$agent_log" && ok "image deleted mid-upload: stopped cleanly" \
    || bad "deleted mid-upload: $(grep "$img" "$agent_log" | tail -2)"
grep -q "task_state image_uploading -> None" "$agent_log" && ok "task_state back to None" || bad "no reset to None"
leftovers

# 6d. Glance stopped while the image uploads: the snapshot fails cleanly and the agent goes on.
AGENT_ENV=CA_TEST_UPLOAD_PAUSE_MS=4000 start_agent pause2
img=$(create_image glance-down); images+=("$img")
cast "$img"
wait_for 120 "upload paused" grep -q "test: upload paused" "$agent_log"
"$root/deploy/services/glance.sh" stop > /dev/null 2>&1
wait_done "$img"
grep -q "snapshot to image $img failed: glance" "$agent_log" && ok "Glance down mid-upload: snapshot failed with a clear error" \
    || bad "glance down: $(grep "$img" "$agent_log" | tail -2)"
pid_alive "$agent_pid" && ok "agent keeps serving" || bad "agent died"
"$root/deploy/services.sh" up glance > /dev/null 2>&1
st=$(image_field "$img" status 2>/dev/null || echo gone)
[ "$st" != active ] && ok "no active image from the failed upload (status: $st)" || bad "image active after a failed upload"
leftovers

# 7. Cold path: disable_libvirt_livesnapshot on the running guest (managed save, read, restore).
start_agent cold '[workarounds]' 'disable_libvirt_livesnapshot = True'
img=$(create_image managedsave); images+=("$img")
min=$(last_hb)
cast "$img"
wait_done "$img"
grep -q "point in time taken via managedsave" "$agent_log" && ok "managedsave path" || bad "path: $(grep 'point in time' "$agent_log" | tail -1)"
grep -q "guest downtime [0-9]* ms (managedsave)" "$agent_log" && ok "$(grep -o 'guest downtime [0-9]* ms' "$agent_log" | tail -1)" \
    || bad "no downtime report"
verify_image "$img" qcow2 "$min"
[ "$(virsh_ domstate "$GUEST_NAME" | head -1)" = running ] && ok "guest running again" || bad "guest not running after managedsave"
leftovers

# 8. Shut-off guest: read its disk chain directly.
virsh_ destroy "$GUEST_NAME" > /dev/null
min=$(last_hb)
img=$(create_image shutoff); images+=("$img")
cast "$img" --vm-state stopped --power-state 4
wait_done "$img"
grep -q "point in time taken via cold" "$agent_log" && ok "cold path for a shut-off guest" || bad "path: $(grep 'point in time' "$agent_log" | tail -1)"
verify_image "$img" qcow2 "$min"
stop_agent
"$root/deploy/services.sh" up libvirt > /dev/null

grep -qF "$RABBIT_PASSWORD" "$tmp"/*.log && bad "broker password in a log" || ok "no secret in the logs"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
