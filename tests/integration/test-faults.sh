#!/usr/bin/env bash
# The agent under the faults of a real deployment (issue 6's list), on the shared services. Each
# case has its own agent (host faults-<pid>-<case>, own state_path and scratch directory) and
# ends with the same audit of what the fault may have left behind:
#   - the job ended in the agent's journal (done or failed, no flatten due);
#   - its Glance image is active (and then complete) or gone, never queued/saving;
#   - no scratch file, no libvirt block/backup job, the guest's filesystems thawed;
#   - no rbd snapshot or clone of the job unless an unfinished journal job or an active image
#     owns it;
#   - the last task_state this host reported (legacy instance.update) is None.
# Cases:
#   a. RabbitMQ restarted while a snapshot runs (held mid-upload by CA_TEST_UPLOAD_PAUSE_MS) and
#      two more casts wait in the agent: all three complete, and the held job's last
#      notifications (made while the broker was down) reach a listener that was away from the
#      broker's stop until after the jobs were over; then casts sent while the agent is stopped
#      (SIGTERM, exit 0) are served when it starts again.
#   b. glance-api stopped mid-upload, back ~10 s later: the job fails, and the image must end
#      deleted within 60 s of Glance's return (the agent retries the deletion).
#   c. The Ceph OSD stopped in the middle of the rbd guest's direct snapshot (the agent, started
#      by this test, is held with SIGSTOP the moment it journals rbd-protect:done, the OSD is
#      stopped, the agent continued): the job fails (or completes), and once the OSD is back no
#      snapshot or clone leaks (60 s, then an agent restart, then 60 s more).
#   d. Required quiesce while qemu-ga is SIGSTOPped inside the guest: the job fails within a
#      bounded time with InstanceQuiesceFailed notifications, and once qemu-ga runs again the
#      guest is thawed and keeps writing.
#   e. snapshots_directory on a full 1 MiB tmpfs: the job fails with a clear error, nothing is
#      left, the guest keeps running and writing.
#   f. A second agent on the same state_path is refused (exit 1, a clear message) while the
#      first keeps serving.
#   g. The cluster blocklists the agent's Ceph client (its address from the journal's sessions)
#      between two rbd jobs: the next job's direct snapshot fails with ESHUTDOWN, the agent says
#      the connection was shut down, rolls back and tries again on a new connection (journaled
#      as a new session): that job and the one after it are done.
# Prints one summary line per case (what happened, how long recovery took) and "N passed, M
# failed". CA_FAULT_CASES="a b c d e f g" runs a subset (default: all).
# The listener consumes the shared queues notifications.info/.error and
# versioned_notifications.info/.error, not a pool queue of its own: the agent declares those
# queues itself before it publishes (as oslo's notifier does), so what it publishes after a broker
# restart waits there even while the listener is still reconnecting. A pool queue is non-durable
# like the rest of the default topology: it dies with the broker and misses whatever is published
# before its listener re-declares it (nova's notifications included).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
. "$root/tests/integration/lib.sh"
SVC=test-faults
build=${CA_BUILD_DIR:-$root/build/debug}
agent=${CA_AGENT:-$build/compute-agent}
check=$build/tests/tools/ca-imgcheck
[ -x "$agent" ] && [ -x "$check" ] || { echo "build first ($agent, $check)"; exit 77; }
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py
cases=${CA_FAULT_CASES:-a b c d e f g}
[ "$(id -u)" = 0 ] || { echo "needs root (tmpfs mount, service restarts)"; exit 77; }
# The debug build carries the test switches (CA_TEST_UPLOAD_PAUSE_MS); a release build ignores them.
grep -aq CA_TEST_UPLOAD_PAUSE_MS "$agent" || { echo "$agent has no test switches (debug build needed)"; exit 77; }

"$root/deploy/services.sh" up rabbitmq ceph libvirt glance rbd-guest
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance
svc_load_env ceph
svc_load_env rbd-guest
case "$GLANCE_STORES" in *rbd*) ;; *) echo "glance has no rbd store ($GLANCE_STORES)"; exit 77 ;; esac
[ -n "${RABBITMQCTL:-}" ] || { echo "no rabbitmqctl in the rabbitmq env"; exit 77; }

tmp=$(mktemp -d /var/tmp/ca-test-faults.XXXXXX)
pids=()          # every agent this test started
listen_pid=
caster_pid=
watch_pid=
stopped_pid=     # an agent held with SIGSTOP
images=()
hosts=()
mounts=()
rmq_down=
glance_down=
osd_down=
blocklisted=     # a Ceph client address case g blocklisted
rbdc() { # bounded: the OSD may be down
    timeout 60 rbd --conf "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" \
        --client_mount_timeout=10 --rados_osd_op_timeout=20 "$@"
}
cephc() { timeout 60 ceph --conf "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" --connect-timeout 20 "$@"; }
virsh_() { virsh -c "$LIBVIRT_URI" "$@"; }
osd_block=$(svc_dir ceph)/osd/ceph-$(cat "$(svc_dir ceph)/osd-id")/block
# Restart the OSD as it was: ceph.sh start grows a stopped OSD to CA_CEPH_OSD_SIZE, which is
# not this test's business, so that is pinned to the block file's present size.
osd_start() { CA_CEPH_OSD_SIZE=$(stat -c %s "$osd_block") "$root/deploy/services/ceph.sh" start; }
# Stop only the OSD, the way ceph.sh stop does (under its lock, by its recorded PID).
osd_stop() { ( exec 9> "$(svc_dir ceph)/.lock"; flock -w 120 9; svc_stop_pid ceph osd 30 ) 9>&-; }

cleanup() {
    set +e
    [ -n "$stopped_pid" ] && kill -CONT "$stopped_pid" 2>/dev/null
    [ -n "$watch_pid" ] && kill -- -"$watch_pid" 2>/dev/null
    # Agents still running (the test broke off): SIGTERM lets them close what they hold on the
    # shared guests; SIGKILL after 20 s.
    for p in "${pids[@]}"; do pid_alive "$p" && kill -TERM "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait_for 20 "agent $p to exit" eval "! pid_alive $p"; done
    for p in "${pids[@]}"; do pid_alive "$p" && kill -KILL "$p" 2>/dev/null; done
    # Services first: the deletions below need them.
    [ -n "$rmq_down" ] && "$root/deploy/services/rabbitmq.sh" start > /dev/null 2>&1
    [ -n "$osd_down" ] && osd_start > /dev/null 2>&1
    [ -n "$glance_down" ] && "$root/deploy/services/glance.sh" start > /dev/null 2>&1
    [ -n "$blocklisted" ] && cephc osd blocklist rm "$blocklisted" > /dev/null 2>&1
    [ -n "$listen_pid" ] && pid_alive "$listen_pid" && kill "$listen_pid" 2>/dev/null
    [ -n "$caster_pid" ] && pid_alive "$caster_pid" && kill "$caster_pid" 2>/dev/null
    for h in "${hosts[@]}"; do $RABBITMQCTL delete_queue "compute.$h" > /dev/null 2>&1; done
    for i in "${images[@]}"; do
        curl -s -m 20 -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null
        # Whatever the agent left in Ceph for this test's images (a leak is reported, not kept).
        rbd_image_leftovers_remove "$i"
    done
    for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m"; done
    # The guests are shared: leave them running and answering.
    "$root/deploy/services.sh" check libvirt rbd-guest > /dev/null 2>&1 \
        || "$root/deploy/services.sh" up libvirt rbd-guest > /dev/null 2>&1
    if [ "${CA_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'log "line $LINENO: a command failed (exit $?), stopping"' ERR

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }
now() { date +%s%3N; }
summary() { printf '%s\n' "$*" >> "$tmp/summary"; log "$*"; }

# The cast client and the listener; they reconnect every second after a broker restart.
{
    printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' "$TRANSPORT_URL"
    printf '[oslo_messaging_rabbit]\nrabbit_retry_interval = 1\nrabbit_retry_backoff = 0\nrabbit_interval_max = 1\n'
} > "$tmp/oslo.conf"

# One python3-nova process casts for the whole test (importing nova costs seconds per process):
# it reads one JSON request per line and answers one line once ComputeAPI.snapshot_instance
# returned. The casts are nova's own, built by nova_client.py's helpers.
cat > "$tmp/caster.py" <<'PY'
import json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import nova_client as nc
nc.nova_setup(sys.argv[2])
from nova.compute import rpcapi
api = rpcapi.ComputeAPI()
print('ready', flush=True)
for line in sys.stdin:
    q = json.loads(line)
    try:
        inst = nc.build_instance(q['host'], q['uuid'], None, q.get('vm_state'), 'keep',
                                 q.get('sysmeta', []), q.get('power_state'))
        api.snapshot_instance(nc.make_context(), inst, q['image_id'])
        print('ok', flush=True)
    except Exception as e:
        print('error %s: %s' % (type(e).__name__, e), flush=True)
PY
coproc caster { exec $py "$tmp/caster.py" "$client" "$tmp/oslo.conf" 2> "$tmp/caster.err"; }
caster_pid=$caster_PID
read -r -t 120 line <&"${caster[0]}" && [ "$line" = ready ] || { echo "caster not ready: $(tail -3 "$tmp/caster.err")"; exit 1; }

start_listener() { # appends to notes.jsonl
    rm -f "$tmp/ready"
    $py "$client" listen --config "$tmp/oslo.conf" --count 0 --timeout 3600 \
        --no-check --out "$tmp/notes.jsonl" --ready-file "$tmp/ready" >> "$tmp/listen.log" 2>&1 &
    listen_pid=$!
    wait_for 30 "listener" test -e "$tmp/ready"
}
stop_listener() {
    kill "$listen_pid" 2>/dev/null
    wait_for 20 "listener $listen_pid to exit" eval "! pid_alive $listen_pid" || kill -9 "$listen_pid" 2>/dev/null
    listen_pid=
}
start_listener || { bad "listener not ready: $(tail -3 "$tmp/listen.log")"; exit 1; }

# ---- guests, agents, images ------------------------------------------------------------------
set_guest() { # set_guest qcow2|rbd
    if [ "$1" = qcow2 ]; then
        dom=$GUEST_NAME uuid=$GUEST_UUID fmt=qcow2 console=$GUEST_CONSOLE_LOG
    else
        dom=$RBD_GUEST_NAME uuid=$RBD_GUEST_UUID fmt=raw console=$RBD_GUEST_CONSOLE_LOG
    fi
}
host_of() { echo "faults-$$-$1"; }

# start_agent CASE [VAR=VALUE...]: the case's agent, configured by $scratch (default
# $tmp/CASE/scratch) and the ini lines in the array extra; sets agent_pid and agent_log.
extra=()
scratch=
starts=0
start_agent() {
    local name=$1; shift
    local d=$tmp/$name
    mkdir -p "$d/scratch"
    case " ${hosts[*]} " in *" $(host_of "$name") "*) ;; *) hosts+=("$(host_of "$name")") ;; esac
    {
        printf '[DEFAULT]\nhost = %s\nstate_path = %s/state\ntransport_url = %s\n' \
            "$(host_of "$name")" "$d" "$TRANSPORT_URL"
        printf 'max_concurrent_snapshots = 1\ngraceful_shutdown_timeout = 60\n'
        printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s\n' "$LIBVIRT_URI" \
            "${scratch:-$d/scratch}"
        printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
        printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
        printf '[notifications]\nnotification_format = both\nnotify_on_state_change = vm_and_task_state\n'
        for l in "${extra[@]}"; do printf '%s\n' "$l"; done
    } > "$d/agent.conf"
    agent_log=$d/agent.$((++starts)).log
    env "$@" "$agent" --config-file "$d/agent.conf" > "$agent_log" 2>&1 &
    agent_pid=$!
    pids+=("$agent_pid")
    wait_for 60 "agent ready" grep -q 'ready: connected to RabbitMQ' "$agent_log" \
        || { bad "agent $name not ready: $(tail -3 "$agent_log" | tr '\n' ' ')"; return 1; }
}

stop_agent() { # SIGTERM; returns the exit status
    local rc=0 p keep=()
    kill -TERM "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" || rc=$?
    # Reaped: its PID may be reused, cleanup must not signal it.
    for p in "${pids[@]}"; do [ "$p" = "$agent_pid" ] || keep+=("$p"); done
    pids=("${keep[@]}")
    agent_pid=
    return $rc
}

create_image() { # create_image VAR NAME: the new image's id into VAR (as nova-api creates it)
    local id
    id=$(curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"ca-faults-$$-$2\", \"container_format\": \"bare\", \"disk_format\": \"$fmt\",
        \"instance_uuid\": \"$uuid\", \"image_type\": \"snapshot\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])') || return 1
    images+=("$id")
    printf -v "$1" '%s' "$id"
}
image_status() { # active, queued, … "gone", or "unreachable"
    local out code
    out=$(curl -s -m 10 -w '\n%{http_code}' "$GLANCE_URL/v2/images/$1") || { echo unreachable; return; }
    code=$(tail -1 <<<"$out")
    case $code in
        404) echo gone ;;
        200) head -n -1 <<<"$out" | $py -c 'import json,sys; print(json.load(sys.stdin)["status"])' ;;
        *) echo "http-$code" ;;
    esac
}
image_settled() { local s; s=$(image_status "$1"); [ "$s" = gone ] || [ "$s" = active ]; }

cast() { # cast CASE IMAGE_ID [SYSMETA_KEY=VALUE...]: snapshot_instance to the case's host
    local name=$1 img=$2 sm='' reply; shift 2
    for kv in "$@"; do sm="$sm${sm:+,}\"$kv\""; done
    printf '{"host": "%s", "uuid": "%s", "image_id": "%s", "sysmeta": [%s]}\n' \
        "$(host_of "$name")" "$uuid" "$img" "$sm" >&"${caster[1]}"
    read -r -t 120 reply <&"${caster[0]}" || reply="no answer ($(tail -2 "$tmp/caster.err"))"
    [ "$reply" = ok ] || { bad "cast to $(host_of "$name") failed: $reply"; return 1; }
}

jq_db() { # jq_db CASE SQL: rows of the case's journal, '|'-separated
    $py - "$tmp/$1/state/compute-agent-journal.sqlite" "$2" <<'PY'
import sqlite3, sys
db = sqlite3.connect('file:%s?mode=ro' % sys.argv[1], uri=True, timeout=10)
for row in db.execute(sys.argv[2]):
    print('|'.join('' if v is None else str(v) for v in row))
PY
}
job_state() { jq_db "$1" "SELECT state || '/' || coalesce(flatten_pool,'') FROM jobs WHERE job_id = 'snap-$2'"; }
job_over() { local s; s=$(job_state "$1" "$2"); [ "$s" = done/ ] || [ "$s" = failed/ ]; }
unfinished_jobs() { jq_db "$1" "SELECT count(*) FROM jobs WHERE state NOT IN ('done','failed') OR flatten_pool IS NOT NULL"; }

# Notifications from the listener's file.
notes() { # notes HOST KIND [ARG]: facts about what HOST published
    $py - "$tmp/notes.jsonl" "$@" <<'PY'
import json, re, sys
path, host, kind = sys.argv[1:4]
arg = sys.argv[4] if len(sys.argv) > 4 else None
recs = []
for l in open(path):
    try:
        recs.append(json.loads(l))
    except ValueError:
        pass
legacy = [r for r in recs if r['publisher_id'] == 'compute.' + host]
versioned = [r for r in recs if r['publisher_id'] == 'nova-compute:' + host]
def vdata(r):
    p = r['payload']
    return p.get('nova_object.data', {}) if isinstance(p, dict) else {}
if kind == 'last-task-state':
    last = '-'
    for r in legacy:
        if r['event_type'] == 'compute.instance.update':
            last = str(r['payload'].get('new_task_state'))
    print(last)
elif kind == 'snapshot-end':        # when the versioned snapshot.end of image ARG arrived
    for r in versioned:
        if r['event_type'] == 'instance.snapshot.end' and vdata(r).get('snapshot_image_id') == arg:
            print(int(r['received_unix'] * 1000))
            break
elif kind == 'updates':             # how many instance.update went ARG (old>new)
    print(sum(1 for r in legacy if r['event_type'] == 'compute.instance.update' and
              '%s>%s' % (r['payload'].get('old_task_state'), r['payload'].get('new_task_state')) == arg))
elif kind == 'error':               # the exception classes in this host's error notifications
    out = set()
    for r in legacy:
        if r['event_type'] == 'snapshot_instance':
            m = re.search(r"'class': '(\w+)'", str(r['payload'].get('exception', '')))
            out.add('legacy:' + (m.group(1) if m else '?'))
    for r in versioned:
        if r['event_type'] == 'compute.exception':
            out.add('versioned:' + str(vdata(r).get('exception')))
    print(' '.join(sorted(out)))
PY
}
end_arrived() { [ -n "$(notes "$(host_of "$1")" snapshot-end "$2")" ]; }
task_state_none() { [ "$(notes "$(host_of "$1")" last-task-state)" = None ]; }

last_hb() { grep -a -o 'CA-HB seq=[0-9]*' "$console" | tail -1 | cut -d= -f2; }
hb_beyond() { local s; s=$(last_hb); [ -n "$s" ] && [ "$s" -gt "$1" ]; }

guest_clean() { # no frozen filesystem, no libvirt job, no block-copy mirror on $dom
    local st j
    st=$(virsh_ qemu-agent-command --timeout 10 "$dom" '{"execute":"guest-fsfreeze-status"}' 2>&1 || true)
    grep -q thawed <<<"$st" || { echo "fsfreeze status: $st"; return 1; }
    if ! wait_for 15 "no libvirt job" sh -c "virsh -c '$LIBVIRT_URI' domjobinfo '$dom' 2>/dev/null | grep -q 'Job type:[[:space:]]*None'"; then
        j=$(virsh_ domjobinfo "$dom" 2>&1 | head -2 | tr '\n' ' ')
        echo "libvirt job: $j"; return 1
    fi
    virsh_ dumpxml "$dom" 2>/dev/null | grep -q '<mirror' && { echo "block copy mirror left"; return 1; }
    return 0
}

rbd_leaks() { # rbd_leaks CASE IMG: the job's snapshot or clone that nothing owns (prints them)
    local name=$1 img=$2 out=
    [ "$(unfinished_jobs "$name")" = 0 ] || return 0   # an unfinished job owns them
    if rbdc snap ls "$RBD_GUEST_DISK" 2>/dev/null | awk '{print $2}' | grep -qx "snap-$img"; then
        out="snapshot $RBD_GUEST_DISK@snap-$img"
    fi
    if [ "$(image_status "$img")" != active ] && rbdc ls images 2>/dev/null | grep -qx "$img"; then
        out="$out clone images/$img"
    fi
    [ -z "$out" ] || { echo "$out"; return 1; }
}
no_rbd_leak() { rbd_leaks "$@" > /dev/null; }

# audit CASE IMG WANT: the common assertions after a case; WANT = done, failed or any.
audit() {
    local name=$1 img=$2 want=$3 s st n g
    # The end is journaled after the job's last log line and notifications.
    wait_for 30 "job $img ended in the journal" job_over "$name" "$img" || true
    s=$(job_state "$name" "$img")
    case "$want/$s" in
        done/done/ | failed/failed/ | any/done/ | any/failed/) ok "$name: job ${s%/} in the journal" ;;
        *) bad "$name: job state '$s' in the journal, expected $want" ;;
    esac
    st=$(image_status "$img")
    case "${s%/}/$st" in
        done/active) ok "$name: image active" ;;
        failed/gone) ok "$name: image deleted" ;;
        *) bad "$name: job '${s%/}', image $st" ;;
    esac
    n=$(find "${scratch:-$tmp/$name/scratch}" -mindepth 1 ! -name ca-fill 2>/dev/null | wc -l)
    [ "$n" -eq 0 ] && ok "$name: no scratch file" || bad "$name: scratch left: $(ls "${scratch:-$tmp/$name/scratch}")"
    g=$(guest_clean) && ok "$name: guest thawed, no libvirt job" || bad "$name: $g"
    if [ "$dom" = "$RBD_GUEST_NAME" ]; then
        g=$(rbd_leaks "$name" "$img") && ok "$name: no rbd snapshot or clone leaked" || bad "$name: leaked $g"
    fi
    [ "$(unfinished_jobs "$name")" = 0 ] && ok "$name: no unfinished job in the journal" \
        || bad "$name: unfinished jobs: $(jq_db "$name" "SELECT job_id, state FROM jobs WHERE state NOT IN ('done','failed') OR flatten_pool IS NOT NULL" | tr '\n' ' ')"
    wait_for 10 "task_state None" task_state_none "$name" && ok "$name: last task_state reported None" \
        || bad "$name: last task_state reported is $(notes "$(host_of "$name")" last-task-state)"
}

# ---- a. RabbitMQ restarted mid-job, with casts waiting; casts while the agent is stopped --------
case_a() {
    local i1 i2 i3 i4 i5 t_stop t_down t_pub t_up t_rec t_end t_listen rc q n l_lost l_pub
    set_guest qcow2
    extra=() scratch=
    start_agent a CA_TEST_UPLOAD_PAUSE_MS=10000 || return
    create_image i1 a-1 && create_image i2 a-2 && create_image i3 a-3 || { bad "a: images"; return; }
    cast a "$i1" image_hw_qemu_guest_agent=yes || return
    wait_for 120 "upload paused" grep -q "test: upload paused" "$agent_log" || { bad "a: upload never paused"; return; }
    cast a "$i2" && cast a "$i3" || return
    wait_for 20 "casts journaled" sh -c "[ \"\$(grep -c 'received snapshot_instance' '$agent_log')\" -ge 3 ]" \
        || bad "a: casts not received: $(grep -c 'received snapshot_instance' "$agent_log")"
    t_stop=$(now)
    rmq_down=1
    "$root/deploy/services/rabbitmq.sh" stop > "$tmp/rmq.log" 2>&1 || bad "a: rabbitmq stop failed"
    t_down=$(now)
    # The listener stays away until the jobs are over, so the agent publishes what it held
    # with nobody listening: those notifications must wait in the queues the agent declares.
    stop_listener
    wait_for 30 "agent notices" grep -q "lost RabbitMQ connection" "$agent_log" \
        && ok "a: agent noticed the broker going away" || bad "a: no 'lost RabbitMQ connection' line"
    # The held upload ends while the broker is down: its last notifications (instance.update
    # image_uploading -> None, snapshot.end) wait for it. The broker stays down 30 s from then
    # and takes seconds to start: longer than a publisher waits for a confirm (30 s), as a slow
    # restart here does anyway (25-35 s under load). What was not confirmed must still go out
    # once the agent is back.
    wait_for 60 "upload of $i1" grep -q "image $i1 uploaded" "$agent_log" || bad "a: $i1 not uploaded"
    t_pub=$(now)
    l_lost=$(grep -n "lost RabbitMQ connection" "$agent_log" | head -1 | cut -d: -f1)
    l_pub=$(grep -n "image $i1 uploaded" "$agent_log" | head -1 | cut -d: -f1)
    [ -n "$l_lost" ] && [ -n "$l_pub" ] && [ "$l_pub" -gt "$l_lost" ] \
        && ok "a: the held job finished its upload while the broker was down" \
        || bad "a: the held job finished before the broker went down (the pause was too short)"
    sleep 30
    # The services are shared: a start by anyone else would cut the outage short.
    if ss -Hltn "sport = :${RABBIT_PORT:-5672}" | grep -q .; then
        bad "a: RabbitMQ was started by another process during this test's outage (not by this test): the outage was not exercised"
    fi
    "$root/deploy/services/rabbitmq.sh" start >> "$tmp/rmq.log" 2>&1 && rmq_down= || { bad "a: rabbitmq start: $(tail -3 "$tmp/rmq.log")"; return; }
    t_up=$(now)
    wait_for 90 "reconnect" grep -q "reconnected to RabbitMQ" "$agent_log" \
        && ok "a: agent reconnected" || { bad "a: no reconnect: $(tail -3 "$agent_log" | tr '\n' ' ')"; return; }
    t_rec=$(now)
    for i in "$i1" "$i2" "$i3"; do
        wait_for 180 "job $i" job_over a "$i" || bad "a: job $i not over: $(job_state a "$i")"
    done
    t_listen=$(now)
    start_listener || { bad "a: listener not ready again: $(tail -3 "$tmp/listen.log")"; return; }
    for i in "$i1" "$i2" "$i3"; do
        [ "$(job_state a "$i")" = done/ ] && [ "$(image_status "$i")" = active ] \
            && ok "a: $i done and active" || bad "a: $i: job $(job_state a "$i"), image $(image_status "$i")"
        wait_for 30 "snapshot.end of $i" end_arrived a "$i" && ok "a: instance.snapshot.end of $i arrived" \
            || bad "a: no instance.snapshot.end of $i at the listener"
    done
    t_end=$(notes "$(host_of a)" snapshot-end "$i1")
    grep -q "notifications not confirmed" "$agent_log" \
        && bad "a: notifications given up: $(grep 'not confirmed' "$agent_log" | head -2 | tr '\n' ' ')" \
        || ok "a: no notification given up"
    summary "a: broker down $(( (t_up - t_stop) / 1000 )) s (stop $((t_down - t_stop)) ms, the held job published $(( (t_up - t_pub) / 1000 )) s before the broker was back); agent reconnected $((t_rec - t_up)) ms after the broker was back; the listener, away from the broker's stop until the 3 jobs were over ($(( (t_listen - t_up) / 1000 )) s after the broker was back), got the held job's snapshot.end $(( ${t_end:-0} - t_listen )) ms after it started"

    # Casts while the agent is stopped wait in its queue.
    rc=0; stop_agent || rc=$?
    [ "$rc" -eq 0 ] && ok "a: SIGTERM exit status 0" || bad "a: SIGTERM exit status $rc"
    create_image i4 a-4 && create_image i5 a-5 || { bad "a: images"; return; }
    cast a "$i4" && cast a "$i5" || return
    q=$($RABBITMQCTL list_queues name messages 2>/dev/null | awk -v q="compute.$(host_of a)" '$1 == q {print $2}')
    [ "$q" = 2 ] && ok "a: 2 casts wait in compute.$(host_of a)" || bad "a: queue holds '$q' messages"
    t_up=$(now)
    start_agent a || return
    for i in "$i4" "$i5"; do
        wait_for 120 "job $i" job_over a "$i" || bad "a: job $i not over: $(job_state a "$i")"
    done
    t_end=$(now)
    for i in "$i1" "$i2" "$i3" "$i4" "$i5"; do audit a "$i" done; done
    n=$(notes "$(host_of a)" updates "image_uploading>None")
    [ "$n" = 5 ] && ok "a: 5 instance.update image_uploading -> None for 5 jobs" \
        || bad "a: $n instance.update image_uploading -> None arrived for 5 jobs (one lost while the broker was down?)"
    rc=0; stop_agent || rc=$?
    [ "$rc" -eq 0 ] || bad "a: exit status $rc"
    summary "a: 2 casts sent while the agent was stopped served $((t_end - t_up)) ms after its start"
}

# ---- b. glance-api stopped mid-upload ------------------------------------------------------
case_b() {
    local img t_stop t_fail t_up t_gone st
    set_guest qcow2
    extra=() scratch=
    start_agent b CA_TEST_UPLOAD_PAUSE_MS=5000 || return
    create_image img b-1 || { bad "b: image"; return; }
    cast b "$img" image_hw_qemu_guest_agent=yes || return
    wait_for 120 "upload paused" grep -q "test: upload paused" "$agent_log" || { bad "b: upload never paused"; return; }
    glance_down=1
    t_stop=$(now)
    "$root/deploy/services/glance.sh" stop > "$tmp/glance.log" 2>&1 || bad "b: glance stop failed"
    wait_for 120 "job end" grep -qE "snapshot to image $img (done|failed)" "$agent_log" \
        || bad "b: job did not end: $(grep "$img" "$agent_log" | tail -2 | tr '\n' ' ')"
    t_fail=$(now)
    grep -q "snapshot to image $img failed: glance" "$agent_log" \
        && ok "b: failed with a clear error: $(grep -o "snapshot to image $img failed: .*" "$agent_log" | cut -c1-160)" \
        || bad "b: $(grep "$img" "$agent_log" | tail -2 | tr '\n' ' ')"
    pid_alive "$agent_pid" && ok "b: agent keeps running" || bad "b: agent died"
    # Glance stays down ~10 s in all.
    sleep $(( 10 - (t_fail - t_stop) / 1000 > 0 ? 10 - (t_fail - t_stop) / 1000 : 0 ))
    "$root/deploy/services/glance.sh" start >> "$tmp/glance.log" 2>&1 && glance_down= \
        || { bad "b: glance start: $(tail -3 "$tmp/glance.log")"; return; }
    t_up=$(now)
    if wait_for 60 "image $img deleted" image_settled "$img"; then
        t_gone=$(now)
        ok "b: image $(image_status "$img") $((t_gone - t_up)) ms after Glance came back"
    else
        st=$(image_status "$img")
        bad "b: image $img still $st 60 s after Glance came back (the agent did not retry the deletion: $(grep "$img" "$agent_log" | grep -i delet | tail -1))"
    fi
    audit b "$img" failed
    stop_agent || bad "b: exit status $?"
    summary "b: Glance down $(( (t_up - t_stop) / 1000 )) s; job failed $((t_fail - t_stop)) ms after the stop; image $(image_status "$img") ${t_gone:+$((t_gone - t_up)) ms after Glance returned}"
}

# ---- c. Ceph OSD stopped mid direct snapshot (rbd guest) -------------------------------------
job_clean() { job_over "$1" "$2" && no_rbd_leak "$1" "$2"; }
case_c() {
    local img t_stop t_fail t_up t_clean outcome why restarted=
    set_guest rbd
    extra=("[libvirt]" "images_type = rbd" "images_rbd_pool = $RBD_GUEST_POOL"
           "images_rbd_ceph_conf = $CEPH_CONF" "rbd_user = nova"
           "images_rbd_glance_pool = images" "images_rbd_flatten = background"
           "[DEFAULT]" "debug = journal,rbd" "graceful_shutdown_timeout = 10")
    scratch=
    start_agent c || return
    create_image img c-1 || { bad "c: image"; return; }
    # Hold the agent the moment its snapshot is protected, right before the clone.
    rm -f "$tmp/c.held"
    setsid bash -c 'tail -n0 -F "$1" 2>/dev/null | while IFS= read -r l; do
        case $l in *"job snap-$3: rbd-protect:done"*) kill -STOP "$2"; date +%s%3N > "$4"; exit 0 ;; esac
    done' c-watch "$agent_log" "$agent_pid" "$img" "$tmp/c.held" < /dev/null &
    watch_pid=$!
    sleep 0.5
    cast c "$img" image_hw_qemu_guest_agent=yes || return
    if ! wait_for 120 "the agent held at rbd-protect:done" test -s "$tmp/c.held"; then
        bad "c: the direct path never reached rbd-protect:done: $(grep -E "$img|direct" "$agent_log" | tail -2 | tr '\n' ' ')"
        kill -- -"$watch_pid" 2>/dev/null; watch_pid=
        return
    fi
    stopped_pid=$agent_pid
    kill -- -"$watch_pid" 2>/dev/null; watch_pid=
    osd_down=1
    t_stop=$(now)
    osd_stop || bad "c: OSD stop failed"
    log "c: OSD stopped in $(( $(now) - t_stop )) ms while the agent was held at rbd-protect:done"
    kill -CONT "$agent_pid"; stopped_pid=
    # The OSD stays down until the agent's Ceph call failed (its ops time out) or 60 s passed.
    wait_for 60 "the direct snapshot to fail" grep -qE "snapshot to image $img (done|failed)|direct snapshot failed|removing what the failed" "$agent_log" || true
    t_fail=$(now)
    why=$(grep -oE "(direct snapshot failed.*|removing what the failed direct snapshot made: .*|snapshot to image $img (done|failed).*)" "$agent_log" | head -1 | cut -c1-200)
    log "c: after $((t_fail - t_stop)) ms with the OSD down: ${why:-nothing yet}"
    osd_start > "$tmp/osd.log" 2>&1 && osd_down= || { bad "c: OSD start: $(tail -3 "$tmp/osd.log")"; return; }
    t_up=$(now)
    log "c: OSD back after $(( (t_up - t_stop) / 1000 )) s"
    if wait_for 60 "the job to end with nothing left in Ceph" job_clean c "$img"; then
        t_clean=$(now)
    else
        log "c: 60 s after the OSD returned: job $(job_state c "$img"), $(rbd_leaks c "$img" || true); restarting the agent"
        stop_agent || bad "c: exit status $?"
        start_agent c || return
        restarted=1
        if wait_for 60 "the job to end after a restart" job_clean c "$img"; then
            t_clean=$(now)
        fi
    fi
    outcome=$(grep -oE "snapshot to image $img (done|failed)" "$agent_log" "$tmp"/c/agent.*.log 2>/dev/null | awk '{print $NF}' | head -1)
    if [ -n "${t_clean:-}" ]; then
        ok "c: job ${outcome:-ended}, nothing left in Ceph $((t_clean - t_up)) ms after the OSD returned${restarted:+ (needed an agent restart)}"
    else
        bad "c: after the OSD returned, a restart and 60 s: job $(job_state c "$img"), $(rbd_leaks c "$img" || true)"
    fi
    wait_for 60 "rbd guest writes again" hb_beyond "$(last_hb)" && ok "c: rbd guest writes again" || bad "c: rbd guest stuck"
    audit c "$img" any
    stop_agent || bad "c: exit status $?"
    summary "c: OSD down $(( (t_up - t_stop) / 1000 )) s from rbd-protect:done; agent after $((t_fail - t_stop)) ms: ${why:-?}; job ${outcome:-?}, clean ${t_clean:+$((t_clean - t_up)) ms after the OSD returned}${restarted:+ after an agent restart}"
}

# ---- d. guest agent hung during a required quiesce -----------------------------------------
case_d() {
    local img t0 t_fail t_cont hb st errs
    set_guest qcow2
    extra=() scratch=
    start_agent d || return
    create_image img d-1 || { bad "d: image"; return; }
    # qemu-ga stopped for 25 s inside the guest (the guest's own shell resumes it).
    virsh_ qemu-agent-command "$dom" '{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","p=$(pidof qemu-ga); kill -STOP $p; sleep 25; kill -CONT $p"]}}' > /dev/null \
        || { bad "d: guest-exec failed"; return; }
    t_cont=$(( $(now) + 25000 ))
    agent_silent() { ! virsh_ qemu-agent-command --timeout 1 "$dom" '{"execute":"guest-ping"}' > /dev/null 2>&1; }
    wait_for 10 "qemu-ga to stop answering" agent_silent || bad "d: qemu-ga kept answering"
    t0=$(now)
    cast d "$img" image_os_require_quiesce=yes image_hw_qemu_guest_agent=yes || return
    wait_for 120 "job end" grep -qE "snapshot to image $img (done|failed)" "$agent_log" || true
    t_fail=$(now)
    if grep -q "snapshot to image $img failed: .*quiesce" "$agent_log"; then
        [ $((t_fail - t0)) -le 45000 ] && ok "d: failed in $((t_fail - t0)) ms: $(grep -o "snapshot to image $img failed: .*" "$agent_log" | cut -c1-160)" \
            || bad "d: failed only after $((t_fail - t0)) ms"
    else
        bad "d: $(grep "$img" "$agent_log" | tail -2 | tr '\n' ' ')"
    fi
    wait_for 20 "error notifications" quiesce_failed_sent d || true
    errs=$(notes "$(host_of d)" error)
    case "$errs" in "legacy:InstanceQuiesceFailed versioned:InstanceQuiesceFailed") ok "d: error notifications: $errs" ;;
                    *) bad "d: error notifications: '$errs'" ;; esac
    # qemu-ga runs again: whatever it had queued runs now; the guest must end thawed.
    wait_for $(( (t_cont - $(now)) / 1000 + 30 )) "qemu-ga back" virsh_ qemu-agent-command --timeout 2 "$dom" '{"execute":"guest-ping"}' \
        || bad "d: qemu-ga did not come back"
    sleep 3
    st=$(virsh_ qemu-agent-command --timeout 10 "$dom" '{"execute":"guest-fsfreeze-status"}' 2>&1 || true)
    grep -q thawed <<<"$st" && ok "d: guest thawed $(( $(now) - t_cont )) ms after qemu-ga resumed" || bad "d: guest left frozen: $st"
    hb=$(last_hb)
    wait_for 20 "guest writing" hb_beyond "$((hb + 20))" && ok "d: guest keeps writing (seq past $((hb + 20)))" || bad "d: guest stopped writing at $hb"
    audit d "$img" failed
    stop_agent || bad "d: exit status $?"
    summary "d: required quiesce with qemu-ga stopped: failed after $((t_fail - t0)) ms ($errs); guest thawed and writing after qemu-ga resumed"
}
quiesce_failed_sent() { notes "$(host_of "$1")" error | grep -q 'versioned:InstanceQuiesceFailed'; }

# ---- e. snapshots_directory full --------------------------------------------------------------
case_e() {
    local img mnt t0 t_fail hb why
    set_guest qcow2
    mnt=$tmp/e-scratch
    mkdir -p "$mnt"
    mount -t tmpfs -o size=1m,mode=0755 "ca-faults-$$" "$mnt" || { bad "e: cannot mount a tmpfs"; return; }
    mounts+=("$mnt")
    dd if=/dev/zero of="$mnt/ca-fill" bs=4k 2>/dev/null || true
    [ "$(df --output=avail -B1 "$mnt" | tail -1 | tr -d ' ')" = 0 ] && ok "e: $mnt is full" || bad "e: $mnt not full: $(df -h "$mnt" | tail -1)"
    extra=() scratch=$mnt
    start_agent e || { scratch=; return; }
    create_image img e-1 || { bad "e: image"; scratch=; return; }
    hb=$(last_hb)
    t0=$(now)
    cast e "$img" image_hw_qemu_guest_agent=yes || { scratch=; return; }
    wait_for 120 "job end" grep -qE "snapshot to image $img (done|failed)" "$agent_log" || true
    t_fail=$(now)
    why=$(grep -o "snapshot to image $img failed: .*" "$agent_log" | cut -d: -f2- || true)
    if [ -n "$why" ] && grep -qiE "no space|ENOSPC|is full|bytes free" <<<"${why//$mnt/SCRATCH}"; then
        ok "e: failed in $((t_fail - t0)) ms with a clear error:$why"
    else
        bad "e: job did not fail with an out-of-space error: ${why:-$(grep "$img" "$agent_log" | tail -2 | tr '\n' ' ')}"
    fi
    [ "$(virsh_ domstate "$dom" | head -1)" = running ] && ok "e: guest running" || bad "e: guest $(virsh_ domstate "$dom" | head -1)"
    wait_for 20 "guest writing" hb_beyond "$((hb + 50))" && ok "e: guest keeps writing (heartbeat past $((hb + 50)))" || bad "e: heartbeats stopped at $(last_hb)"
    audit e "$img" failed
    stop_agent || bad "e: exit status $?"
    scratch=
    summary "e: scratch full: failed after $((t_fail - t0)) ms:${why:- ?}"
}

# ---- f. a second agent on the same state_path -----------------------------------------------
case_f() {
    local first rc img log2 t0
    set_guest qcow2
    extra=() scratch=
    start_agent f || return
    first=$agent_pid
    # Same state_path, another host name.
    sed "s/^host = .*/host = $(host_of f2)/" "$tmp/f/agent.conf" > "$tmp/f/agent2.conf"
    hosts+=("$(host_of f2)")
    log2=$tmp/f/second.log
    t0=$(now)
    rc=0
    timeout 60 "$agent" --config-file "$tmp/f/agent2.conf" > "$log2" 2>&1 || rc=$?
    [ "$rc" -eq 1 ] && ok "f: second agent exits with status 1 in $(( $(now) - t0 )) ms" || bad "f: second agent exit status $rc"
    grep -q "another compute-agent is running on state_path $tmp/f/state" "$log2" \
        && ok "f: clear message: $(grep -o 'another compute-agent.*' "$log2")" || bad "f: message: $(tail -2 "$log2" | tr '\n' ' ')"
    grep -q 'connected to RabbitMQ' "$log2" && bad "f: the second agent connected to RabbitMQ" || ok "f: the second agent never consumed"
    pid_alive "$first" && ok "f: first agent still running" || bad "f: first agent died"
    # ... and still serves: a snapshot to it completes.
    create_image img f-1 || { bad "f: image"; return; }
    cast f "$img" || return
    wait_for 120 "job" job_over f "$img" || bad "f: job not over"
    audit f "$img" done
    stop_agent || bad "f: exit status $?"
    summary "f: second agent refused (exit $rc) in $(( $(now) - t0 )) ms; first agent kept serving"
}

# ---- g. the agent's Ceph client blocklisted ---------------------------------------------------
case_g() {
    local i1 i2 i3 sid t0 t_ok s rss
    set_guest rbd
    extra=("[libvirt]" "images_type = rbd" "images_rbd_pool = $RBD_GUEST_POOL"
           "images_rbd_ceph_conf = $CEPH_CONF" "rbd_user = nova"
           "images_rbd_glance_pool = images" "images_rbd_flatten = sync"
           "[DEFAULT]" "debug = journal,rbd")
    scratch=
    start_agent g || return
    create_image i1 g-1 && create_image i2 g-2 && create_image i3 g-3 || { bad "g: images"; return; }
    cast g "$i1" || return
    wait_for 120 "job $i1" job_over g "$i1" || bad "g: job $i1 not over"
    [ "$(job_state g "$i1")" = done/ ] && ok "g: a first direct snapshot done" || bad "g: $i1: $(job_state g "$i1")"
    # The client this run of the agent uses, as the journal has it: the cluster fences it now,
    # as Ceph does to a client whose exclusive lock another client breaks.
    sid=$(jq_db g "SELECT id FROM sessions ORDER BY seq DESC LIMIT 1")
    [ -n "$sid" ] || { bad "g: no Ceph session in the journal"; return; }
    cephc osd blocklist add "$sid" 600 > "$tmp/g.blocklist" 2>&1 || { bad "g: blocklist add: $(cat "$tmp/g.blocklist")"; return; }
    blocklisted=$sid
    t0=$(now)
    cast g "$i2" || return
    wait_for 180 "job $i2" job_over g "$i2" || bad "g: job $i2 not over: $(job_state g "$i2")"
    s=$(job_state g "$i2")
    [ "$s" = done/ ] && [ "$(image_status "$i2")" = active ] \
        && ok "g: the job cast after the blocklisting done in $(( $(now) - t0 )) ms" \
        || bad "g: $i2: job $s, image $(image_status "$i2")"
    grep -q "the connection was shut down" "$agent_log" \
        && ok "g: the agent noticed: $(grep -o 'rbd backend: the connection was shut down.*' "$agent_log" | head -1 | cut -c1-160)" \
        || bad "g: no 'connection was shut down' line: $(grep -E "$i2" "$agent_log" | tail -2 | tr '\n' ' ')"
    grep -q "trying again on the new connection" "$agent_log" \
        && ok "g: the direct snapshot was tried again on the new connection" \
        || bad "g: no retry on a new connection: $(grep -E "$i2" "$agent_log" | tail -2 | tr '\n' ' ')"
    # The next job runs on a new connection.
    t0=$(now)
    cast g "$i3" || return
    wait_for 120 "job $i3" job_over g "$i3" || bad "g: job $i3 not over"
    t_ok=$(now)
    [ "$(job_state g "$i3")" = done/ ] && [ "$(image_status "$i3")" = active ] \
        && ok "g: the next snapshot done on a new Ceph connection in $((t_ok - t0)) ms" \
        || bad "g: $i3: job $(job_state g "$i3"), image $(image_status "$i3")"
    [ "$(jq_db g "SELECT count(*) FROM sessions")" -ge 2 ] && ok "g: the new session is journaled" \
        || bad "g: sessions journaled: $(jq_db g "SELECT id FROM sessions" | tr '\n' ' ')"
    rss=$(awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$agent_pid/status" 2>/dev/null || echo '?')
    audit g "$i1" done
    audit g "$i2" done
    audit g "$i3" done
    cephc osd blocklist rm "$sid" > /dev/null 2>&1 && blocklisted=
    stop_agent || bad "g: exit status $?"
    summary "g: Ceph client blocklisted: the next job $(job_state g "$i2" | tr -d /) (tried again on a new connection), the one after it done in $((t_ok - t0)) ms; agent RSS after the 3 jobs (sync flatten) ${rss} MiB"
}

t_all=$(now)
for c in $cases; do
    t_case=$(now)
    "case_$c" || bad "$c: the case broke off"
    log "case $c took $(( ($(now) - t_case) / 1000 )) s"
done
[ -s "$tmp/summary" ] && cat "$tmp/summary"
grep -qF "$RABBIT_PASSWORD" "$tmp"/*/agent.*.log 2>/dev/null && bad "broker password in a log" || ok "no secret in the logs"
log "total $(( ($(now) - t_all) / 1000 )) s"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ] || exit 1
