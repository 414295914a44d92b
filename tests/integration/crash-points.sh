#!/usr/bin/env bash
# kill -9 at every step of a snapshot job, then restart: the journal must leave nothing stuck or
# leaked. For each path (qcow2 live snapshot of the libvirt test guest; rbd direct snapshot of the
# rbd test guest, background flatten) a reference job runs first and its journaled steps
# (resource:state, in order) become the list of injection points: every point, not a sample.
# For each point, with a fresh state_path and host name:
#   1. the agent runs with CA_TEST_CRASH_AT=<point> (debug builds only) and must die by SIGKILL
#      right after journaling that step, while python3-nova's ComputeAPI cast is being served;
#   2. the agent is started again (no fault) and recovers the job from the journal;
#   3. asserted: the job ended in the journal (done or failed, no flatten due), no frozen
#      filesystem in the guest, no libvirt block/backup job, no scratch file, no rbd snapshot or
#      clone the journal does not own, the Glance image either active and correct by the
#      checker or gone (never queued/saving), the last task_state reported (legacy
#      instance.update from this host) None, and a failed job's error notifications sent;
#   4. a second restart finds nothing to reconcile (reconciling twice changes nothing).
# Prints one line per point and a table: the outcome and how long the recovery took.
# Run through test-crash-qcow2.sh and test-crash-rbd.sh (one ctest each), or directly:
#
#   CA_CRASH_PATHS="qcow2 rbd" (default both), CA_CRASH_POINTS="freeze:done ..." (default all),
#   CA_KEEP=1 keeps the temporary directory (agent logs, journals) for a look
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
. "$root/tests/integration/lib.sh"
SVC=test-crash-${CA_CRASH_PATHS:-all}
SVC=${SVC// /-}
build=${CA_BUILD_DIR:-$root/build/debug}
agent=${CA_AGENT:-$build/compute-agent}
check=$build/tests/tools/ca-imgcheck
[ -x "$agent" ] && [ -x "$check" ] || { echo "build first ($agent, $check)"; exit 77; }
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py
paths=${CA_CRASH_PATHS:-qcow2 rbd}

case " $paths " in *" rbd "*) "$root/deploy/services.sh" up rabbitmq ceph libvirt glance rbd-guest ;;
                  *) "$root/deploy/services.sh" up rabbitmq libvirt glance ;; esac
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance
case " $paths " in *" rbd "*)
    svc_load_env ceph
    svc_load_env rbd-guest
    case "$GLANCE_STORES" in *rbd*) ;; *) echo "glance has no rbd store ($GLANCE_STORES)"; exit 77 ;; esac
esac

tmp=$(mktemp -d /var/tmp/ca-test-crash.XXXXXX)
agent_pid=
listen_pid=
images=()
hosts=()
cleanup() {
    [ -n "$agent_pid" ] && pid_alive "$agent_pid" && kill -KILL "$agent_pid" 2>/dev/null
    [ -n "$listen_pid" ] && pid_alive "$listen_pid" && kill "$listen_pid" 2>/dev/null
    for i in "${images[@]}"; do
        curl -s -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null || true
        # What a case that broke off (reported as a failure) left in Ceph for its image: the
        # clone, then the temporary snapshot on the shared disk, so that later runs start clean.
        case " $paths " in *" rbd "*) rbd_image_leftovers_remove "$i" ;; esac
    done
    for h in "${hosts[@]}"; do
        [ -n "${RABBITMQCTL:-}" ] && $RABBITMQCTL delete_queue "compute.$h" > /dev/null 2>&1
    done
    if [ "${CA_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }
virsh_() { virsh -c "$LIBVIRT_URI" "$@"; }
rbdc() { rbd --conf "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" "$@"; }

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$tmp/oslo.conf"

# One listener for the whole test; each case has its own host, so publisher_id tells them apart.
rm -f "$tmp/ready"
$py "$client" listen --config "$tmp/oslo.conf" --pool "ca-crash-$$" --count 0 --timeout 3600 \
    --no-check --out "$tmp/notes.jsonl" --ready-file "$tmp/ready" > "$tmp/listen.log" 2>&1 &
listen_pid=$!
wait_for 30 "listener" test -e "$tmp/ready" || { bad "listener not ready"; exit 1; }

# ---- per-path settings ------------------------------------------------------------------------
set_path() { # set_path qcow2|rbd
    kind=$1
    if [ "$kind" = qcow2 ]; then
        dom=$GUEST_NAME uuid=$GUEST_UUID fmt=qcow2
        extra=()
    else
        dom=$RBD_GUEST_NAME uuid=$RBD_GUEST_UUID fmt=raw
        extra=("[libvirt]" "images_type = rbd" "images_rbd_pool = $RBD_GUEST_POOL"
               "images_rbd_ceph_conf = $CEPH_CONF" "rbd_user = nova"
               "images_rbd_glance_pool = images" "images_rbd_flatten = background")
    fi
}

start_agent() { # start_agent CASE [ENV...]: host and state_path belong to the case
    local name=$1; shift
    mkdir -p "$tmp/$name/scratch"
    {
        printf '[DEFAULT]\nhost = %s\nstate_path = %s/%s/state\ntransport_url = %s\n' \
            "crash-$$-$name" "$tmp" "$name" "$TRANSPORT_URL"
        printf 'graceful_shutdown_timeout = 30\ndebug = rbd,qcow2,journal\n'
        printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/%s/scratch\n' \
            "$LIBVIRT_URI" "$tmp" "$name"
        printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
        printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
        printf '[notifications]\nnotify_on_state_change = vm_and_task_state\n'
        for l in "${extra[@]}"; do printf '%s\n' "$l"; done
    } > "$tmp/$name/agent.conf"
    agent_log=$tmp/$name/agent.$((++starts)).log
    env "$@" "$agent" --config-file "$tmp/$name/agent.conf" > "$agent_log" 2>&1 &
    agent_pid=$!
    wait_for 60 "agent ready" grep -q 'ready: connected to RabbitMQ' "$agent_log" \
        || { bad "agent $name not ready: $(tail -3 "$agent_log")"; return 1; }
}
starts=0

stop_agent() { # SIGTERM: must exit 0
    local rc=0
    kill -TERM "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" || rc=$?
    agent_pid=
    return $rc
}

create_image() {
    curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"$1\", \"container_format\": \"bare\", \"disk_format\": \"$fmt\",
        \"instance_uuid\": \"$uuid\", \"image_type\": \"snapshot\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
image_status() { # active, queued, … or "gone"
    local out
    out=$(curl -s -w '\n%{http_code}' "$GLANCE_URL/v2/images/$1")
    if [ "$(tail -1 <<<"$out")" = 404 ]; then echo gone; return; fi
    head -n -1 <<<"$out" | $py -c 'import json,sys; print(json.load(sys.stdin)["status"])'
}

cast() { # cast CASE IMAGE_ID
    $py "$client" cast --config "$tmp/oslo.conf" --host "crash-$$-$1" --instance-uuid "$uuid" \
        --image-id "$2" --quiet --sysmeta image_hw_qemu_guest_agent=yes > "$tmp/cast.out" 2>&1 \
        || { bad "cast failed: $(cat "$tmp/cast.out")"; return 1; }
}

jq_db() { # jq_db CASE SQL: rows of the case's journal, '|'-separated
    $py - "$tmp/$1/state/compute-agent-journal.sqlite" "$2" <<'PY'
import sqlite3, sys
db = sqlite3.connect('file:%s?mode=ro' % sys.argv[1], uri=True, timeout=10)
for row in db.execute(sys.argv[2]):
    print('|'.join('' if v is None else str(v) for v in row))
PY
}
job_over() { # the job ended and nothing is due
    local s
    s=$(jq_db "$1" "SELECT state, coalesce(flatten_pool,'') FROM jobs WHERE job_id = 'snap-$2'")
    [ "$s" = "done|" ] || [ "$s" = "failed|" ]
}

last_task_state() { # the new_task_state of this host's last legacy instance.update, or "-"
    $py - "$tmp/notes.jsonl" "compute.crash-$$-$1" <<'PY'
import json, sys
last = '-'
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r['event_type'] == 'compute.instance.update' and r['publisher_id'] == sys.argv[2]:
        last = str(r['payload'].get('new_task_state'))
print(last)
PY
}
error_sent() { # this host published the legacy error event and the versioned compute.exception
    grep -F "\"compute.crash-$$-$1\"" "$tmp/notes.jsonl" | grep -q '"event_type": "snapshot_instance"' &&
        grep -F "crash-$$-$1" "$tmp/notes.jsonl" | grep -q '"event_type": "compute.exception"'
}

guest_clean() { # no frozen filesystem, no libvirt job on the domain
    local st j
    st=$(virsh_ qemu-agent-command "$dom" '{"execute":"guest-fsfreeze-status"}' 2>&1 || true)
    grep -q thawed <<<"$st" || { echo "fsfreeze status: $st"; return 1; }
    if ! wait_for 15 "no libvirt job" sh -c "virsh -c '$LIBVIRT_URI' domjobinfo '$dom' 2>/dev/null | grep -q 'Job type:[[:space:]]*None'"; then
        j=$(virsh_ domjobinfo "$dom" 2>&1 | head -2 | tr '\n' ' ')
        echo "libvirt job: $j"; return 1
    fi
    j=$(virsh_ dumpxml "$dom" 2>/dev/null || true)
    if grep -q '<mirror' <<<"$j"; then echo "block copy mirror left"; return 1; fi
    return 0
}

rbd_clean() { # rbd: no temporary snapshot on the disk, no clone but the active image's
    local img=$1 status=$2 snaps clone
    # This job's temporary snapshot (other jobs may share the disk).
    snaps=$(rbdc snap ls "$RBD_GUEST_DISK" 2>/dev/null | awk -v s="snap-$img" 'NR > 1 && $2 == s {print $2}')
    [ -z "$snaps" ] || { echo "temporary snapshot left: $snaps"; return 1; }
    clone=$(rbdc ls images 2>/dev/null | grep -Fx "$img" || true)
    if [ "$status" = active ]; then
        [ -n "$clone" ] || { echo "active image without its clone"; return 1; }
    else
        [ -z "$clone" ] || { echo "clone images/$img left for a $status image"; return 1; }
    fi
    return 0
}

verify_image() { # verify_image IMG: the active image holds a consistent point in time
    local img=$1 out
    curl -sf "$GLANCE_URL/v2/images/$img/file" -o "$tmp/img.$fmt" || { echo "download failed"; return 1; }
    out=$("$check" -f "$fmt" "$tmp/img.$fmt" 2>&1) || { rm -f "$tmp/img.$fmt"; echo "checker: $out"; return 1; }
    rm -f "$tmp/img.$fmt"
}

# ---- the reference job: its steps are the injection points ------------------------------------
reference_points() { # reference_points KIND → points, one per line
    local name=ref-$1 img
    hosts+=("crash-$$-$name")
    start_agent "$name" || return 1
    img=$(create_image "$name"); images+=("$img")
    cast "$name" "$img" || return 1
    wait_for 300 "reference job" job_over "$name" "$img" || { bad "reference job did not end: $(tail -3 "$agent_log")"; return 1; }
    stop_agent || bad "reference agent exit status $?"
    [ "$(image_status "$img")" = active ] || { bad "reference image is $(image_status "$img")"; return 1; }
    jq_db "$name" "SELECT resource || ':' || state FROM steps WHERE job_id = 'snap-$img' ORDER BY seq" \
        | awk '!seen[$0]++' > "$tmp/points.$1"
    curl -s -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null
    [ -s "$tmp/points.$1" ] || { bad "no journaled steps for the $1 reference job"; return 1; }
}

crash_at() { # crash_at KIND POINT INDEX (the case's name is short: it names a unix socket)
    local kind=$1 point=$2 name=$1-$3 img rc st t0 t1 why outcome
    hosts+=("crash-$$-$name")
    start_agent "$name" CA_TEST_CRASH_AT="$point" || return
    img=$(create_image "$name"); images+=("$img")
    cast "$name" "$img" || return
    rc=0
    died_or_over() { ! kill -0 "$agent_pid" 2>/dev/null || job_over "$name" "$img"; }
    wait_for 300 "the agent to die at $point" died_or_over || true
    pid_alive "$agent_pid" && kill -KILL "$agent_pid"
    wait "$agent_pid" 2>/dev/null || rc=$?
    agent_pid=
    if [ "$rc" -ne 137 ] || ! grep -q "killed at $point" "$agent_log"; then
        bad "$point: agent did not die at the point (exit $rc): $(tail -2 "$agent_log" | tr '\n' ' ')"
        return
    fi
    t0=$(date +%s%3N)
    start_agent "$name" || return
    if ! wait_for 300 "recovery" job_over "$name" "$img"; then
        bad "$point: job not ended after the restart: $(grep -E "$img|snap-$img" "$agent_log" | tail -3 | tr '\n' ' ')"
        stop_agent || true
        return
    fi
    t1=$(date +%s%3N)
    st=$(image_status "$img")
    outcome=$(jq_db "$name" "SELECT state FROM jobs WHERE job_id = 'snap-$img'")
    why=""
    case "$outcome/$st" in
        done/active)
            why=$(verify_image "$img") || { bad "$point: $why"; why=x; } ;;
        failed/gone)
            error_sent "$name" || { bad "$point: failed without the error notifications"; why=x; } ;;
        *) bad "$point: job $outcome but the image is $st"; why=x ;;
    esac
    local ts; ts=$(last_task_state "$name")
    [ "$ts" = None ] || { bad "$point: last task_state reported is $ts"; why=x; }
    local g; g=$(guest_clean) || { bad "$point: $g"; why=x; }
    local n; n=$(find "$tmp/$name/scratch" -mindepth 1 | wc -l)
    [ "$n" -eq 0 ] || { bad "$point: scratch left: $(ls "$tmp/$name/scratch")"; why=x; }
    if [ "$kind" = rbd ]; then
        g=$(rbd_clean "$img" "$st") || { bad "$point: $g"; why=x; }
    fi
    # Reconciling again finds nothing.
    stop_agent || { bad "$point: agent exit status $?"; why=x; }
    start_agent "$name" || return
    stop_agent || true
    if grep -q 'unfinished job' "$agent_log"; then bad "$point: second start reconciled again"; why=x; fi
    [ -z "$why" ] && ok "$point: $outcome, image $st, recovered in $((t1 - t0)) ms"
    printf '| %s | %s | %s | %s | %d |\n' "$kind" "$point" "$outcome" "$st" "$((t1 - t0))" >> "$tmp/table"
    curl -s -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null
}

for kind in $paths; do
    set_path "$kind"
    reference_points "$kind" || continue
    log "$kind: $(wc -l < "$tmp/points.$kind") injection points: $(tr '\n' ' ' < "$tmp/points.$kind")"
    idx=0
    while read -r -u 3 point; do
        idx=$((idx + 1))
        if [ -n "${CA_CRASH_POINTS:-}" ] && ! grep -qw -- "$point" <<<"$CA_CRASH_POINTS"; then continue; fi
        crash_at "$kind" "$point" "$idx" || bad "$point: the case broke off (see above)"
    done 3< "$tmp/points.$kind"
done

if [ -s "$tmp/table" ]; then
    echo "| path | killed at | job | image | recovery ms (restart → job ended) |"
    echo "|---|---|---|---|---:|"
    cat "$tmp/table"
fi
log "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
