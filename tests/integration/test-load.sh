#!/usr/bin/env bash
# Load: three agents on this machine (hosts load-<pid>-1..3, each its own state_path, scratch
# directory and log, max_concurrent_snapshots = 2), each with two shut-off libvirt guests of its
# own (defined, never started: ca-load-<pid>-1..6, a small qcow2 overlay each over the libvirt
# test guest's base image, with a 64 KiB marker of the guest's number at 64 MiB), so every job
# takes the cold path (read-only qemu-nbd) and the guests cost no CPU. 100 snapshot_instance
# casts from python3-nova's ComputeAPI (one process, as fast as it casts), round robin over the
# six guests, each to an image created beforehand as nova-api does. Asserted:
#   - every job ended in its agent's journal (done, or failed with its image deleted), none left
#     unfinished, each agent served exactly the casts sent to it;
#   - every done image is active with the size the agent sent; a sample of 10 is downloaded and
#     passes qemu-img check, ca-imgcheck (a consistent image of the guest's disk) and holds its
#     own guest's marker (the right disk was read);
#   - no agent ever ran more than 2 jobs at once (from its log's "snapshot to image X starting"
#     and "... done|failed|refused" lines and their timestamps), and the limit was reached;
#   - nothing leaked: scratch directories empty, no qemu-nbd on the test's overlays, the agents'
#     compute.<host> queues empty, the guests still shut off without a libvirt job.
# Reports the wall time from the first cast to the last job's end, casts/s and jobs/s.
#   CA_LOAD_CASTS (100), CA_LOAD_SAMPLE (10)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
SVC=test-load
build=${CA_BUILD_DIR:-$root/build/debug}
agent=${CA_AGENT:-$build/compute-agent}
check=$build/tests/tools/ca-imgcheck
[ -x "$agent" ] && [ -x "$check" ] || { echo "build first ($agent, $check)"; exit 77; }
for b in qemu-img qemu-io virsh curl; do
    command -v "$b" > /dev/null || { echo "$b missing"; exit 77; }
done
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py
ncasts=${CA_LOAD_CASTS:-100}
nsample=${CA_LOAD_SAMPLE:-10}
nagents=3
nguests=6          # guest n belongs to agent (n - 1) / 2 + 1

"$root/deploy/services.sh" up rabbitmq libvirt glance
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance
[ -r "${GUEST_BASE:-}" ] && [ -r "${GUEST_KERNEL:-}" ] && [ -r "${GUEST_INITRD:-}" ] \
    || { echo "no guest base image/kernel in the libvirt env"; exit 77; }

tmp=$(mktemp -d /var/tmp/ca-test-load.XXXXXX)
title="compute-agent load test $$"
pids=()
caster_pid=
images=()
doms=()
cleanup() {
    set +e
    for p in "${pids[@]}"; do pid_alive "$p" && kill -TERM "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait_for 20 "agent $p to exit" eval "! pid_alive $p"; done
    for p in "${pids[@]}"; do pid_alive "$p" && kill -KILL "$p" 2>/dev/null; done
    [ -n "$caster_pid" ] && pid_alive "$caster_pid" && kill -KILL "$caster_pid" 2>/dev/null
    for d in "${doms[@]}"; do    # only ours: name and title
        if [ "$(virsh -c "$LIBVIRT_URI" desc --title "$d" 2>/dev/null)" = "$title" ]; then
            virsh -c "$LIBVIRT_URI" destroy "$d" > /dev/null 2>&1
            virsh -c "$LIBVIRT_URI" undefine "$d" > /dev/null 2>&1
        fi
    done
    if [ "${#images[@]}" -gt 0 ]; then
        printf '%s\n' "${images[@]}" | xargs -P 4 -I{} curl -s -m 30 -o /dev/null -X DELETE "$GLANCE_URL/v2/images/{}"
    fi
    for a in $(seq 1 "$nagents"); do
        [ -n "${RABBITMQCTL:-}" ] && $RABBITMQCTL delete_queue "compute.load-$$-$a" > /dev/null 2>&1
    done
    if [ "${CA_KEEP:-0}" = 1 ]; then log "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'log "line $LINENO: a command failed (exit $?), stopping"' ERR

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }
now() { date +%s%3N; }
virsh_() { virsh -c "$LIBVIRT_URI" "$@"; }
agent_of() { echo $(( ($1 - 1) / 2 + 1 )); }

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$tmp/oslo.conf"

# ---- six shut-off guests -------------------------------------------------------------------
mkdir -p "$tmp/disks"
for n in $(seq 1 "$nguests"); do
    name=ca-load-$$-$n
    uuid=$(cat /proc/sys/kernel/random/uuid)
    disk=$tmp/disks/$name.qcow2
    qemu-img create -q -f qcow2 -F qcow2 -b "$GUEST_BASE" "$disk" \
        && qemu-io -f qcow2 -c "write -P $n 64M 64k" "$disk" > "$tmp/qemu-io.out" 2>&1 \
        || { bad "cannot make $disk: $(cat "$tmp/qemu-io.out" 2>/dev/null)"; exit 1; }
    cat > "$tmp/disks/$name.xml" <<EOF
<domain type='${GUEST_DOMTYPE:-qemu}'>
  <name>$name</name>
  <uuid>$uuid</uuid>
  <title>$title</title>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$GUEST_KERNEL</kernel>
    <initrd>$GUEST_INITRD</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    virsh_ define "$tmp/disks/$name.xml" > /dev/null || { bad "cannot define $name"; exit 1; }
    doms+=("$name")
    echo "$n $uuid $(agent_of "$n")" >> "$tmp/guests"
done
st=$(for d in "${doms[@]}"; do virsh_ domstate "$d" 2>&1 | head -1; done | sort -u || true)
[ "$st" = "shut off" ] && ok "$nguests guests defined, shut off" || bad "guest states: $st"

# ---- three agents ----------------------------------------------------------------------------
for a in $(seq 1 "$nagents"); do
    mkdir -p "$tmp/a$a/scratch"
    {
        printf '[DEFAULT]\nhost = load-%s-%s\nstate_path = %s/a%s/state\ntransport_url = %s\n' \
            "$$" "$a" "$tmp" "$a" "$TRANSPORT_URL"
        printf 'max_concurrent_snapshots = 2\ngraceful_shutdown_timeout = 60\n'
        printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/a%s/scratch\n' \
            "$LIBVIRT_URI" "$tmp" "$a"
        printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
        printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
        printf '[notifications]\nnotify_on_state_change = vm_and_task_state\n'
    } > "$tmp/a$a/agent.conf"
    "$agent" --config-file "$tmp/a$a/agent.conf" > "$tmp/a$a/agent.log" 2>&1 &
    pids+=($!)
done
for a in $(seq 1 "$nagents"); do
    wait_for 60 "agent $a ready" grep -q 'ready: connected to RabbitMQ' "$tmp/a$a/agent.log" \
        || { bad "agent $a not ready: $(tail -3 "$tmp/a$a/agent.log" | tr '\n' ' ')"; exit 1; }
done
ok "$nagents agents ready"

# ---- the images, as nova-api creates them (before the cast) -----------------------------------
t0=$(now)
for i in $(seq 0 $((ncasts - 1))); do
    n=$(( i % nguests + 1 ))
    read -r _ uuid a < <(awk -v n="$n" '$1 == n' "$tmp/guests")
    echo "$i $n $uuid $a"
done > "$tmp/plan0"
create_one() { # create_one I N UUID AGENT → "I N UUID AGENT IMAGE_ID"
    local id
    id=$(curl -sf -m 60 -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"ca-load-$$-$1\", \"container_format\": \"bare\", \"disk_format\": \"qcow2\",
        \"min_disk\": 1, \"instance_uuid\": \"$3\", \"image_type\": \"snapshot\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])') || return 1
    echo "$1 $2 $3 $4 $id"
}
export -f create_one
export GLANCE_URL py
xargs -P 4 -L 1 bash -c 'create_one "$@"' _ < "$tmp/plan0" | sort -n > "$tmp/plan" || true
mapfile -t images < <(awk '{print $5}' "$tmp/plan")
[ "${#images[@]}" -eq "$ncasts" ] && ok "$ncasts images created in $(( $(now) - t0 )) ms" \
    || { bad "only ${#images[@]} of $ncasts images created"; exit 1; }

# ---- the casts --------------------------------------------------------------------------------
cat > "$tmp/caster.py" <<'PY'
import json, os, sys, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import nova_client as nc
nc.nova_setup(sys.argv[2])
from nova.compute import rpcapi
api = rpcapi.ComputeAPI()
plan = [l.split() for l in open(sys.argv[3]) if l.strip()]
insts = {}
t0 = time.time()
for i, n, uuid, a, image_id in plan:
    if uuid not in insts:     # a shut-off instance, as nova sees a stopped server
        insts[uuid] = nc.build_instance('load-%s-%s' % (sys.argv[4], a), uuid, None, 'stopped',
                                        'keep', [], 4)
    api.snapshot_instance(nc.make_context(), insts[uuid], image_id)
t1 = time.time()
print(json.dumps({'casts': len(plan), 't_first_ms': int(t0 * 1000), 't_last_ms': int(t1 * 1000),
                  'casts_per_s': round(len(plan) / (t1 - t0), 1) if t1 > t0 else None}))
sys.stdout.flush()
nc.nova_cleanup()
os._exit(0)
PY
$py "$tmp/caster.py" "$client" "$tmp/oslo.conf" "$tmp/plan" "$$" > "$tmp/cast.json" 2> "$tmp/cast.err" &
caster_pid=$!
wait "$caster_pid" || { bad "casts failed: $(tail -3 "$tmp/cast.err")"; caster_pid=; exit 1; }
caster_pid=
read -r t_first t_last rate < <($py -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["t_first_ms"], d["t_last_ms"], d["casts_per_s"])' "$tmp/cast.json")
ok "$ncasts casts sent in $((t_last - t_first)) ms ($rate casts/s)"

# ---- wait for every job ------------------------------------------------------------------------
jq_db() { # jq_db AGENT SQL
    $py - "$tmp/a$1/state/compute-agent-journal.sqlite" "$2" <<'PY'
import sqlite3, sys
db = sqlite3.connect('file:%s?mode=ro' % sys.argv[1], uri=True, timeout=10)
for row in db.execute(sys.argv[2]):
    print('|'.join('' if v is None else str(v) for v in row))
PY
}
ended_count() {
    local a t=0
    for a in $(seq 1 "$nagents"); do
        t=$((t + $(jq_db "$a" "SELECT count(*) FROM jobs WHERE state IN ('done','failed') AND flatten_pool IS NULL")))
    done
    echo "$t"
}
all_ended() { [ "$(ended_count)" -ge "$ncasts" ]; }
progress=0
waited() {  # all_ended, with a progress line every 30 s
    if [ $((SECONDS - progress)) -ge 30 ]; then progress=$SECONDS; log "$(ended_count)/$ncasts jobs ended"; fi
    all_ended
}
wait_for 420 "all $ncasts jobs" waited || bad "only $(ended_count) of $ncasts jobs ended"
t_end=$(now)
# The last job's end by the agents' own clocks (their log lines are UTC with ms).
t_last_end=$(cat "$tmp"/a*/agent.log | $py -c '
import re, sys, calendar, time
last = 0
for l in sys.stdin:
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) .*snapshot to image \S+ (done|failed|refused)", l)
    if m:
        t = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) * 1000 + int(m.group(2))
        last = max(last, t)
print(last)')
[ "$t_last_end" -gt 0 ] || t_last_end=$t_end
wall=$((t_last_end - t_first))

# ---- every job ended, per agent --------------------------------------------------------------
for a in $(seq 1 "$nagents"); do
    sent=$(awk -v a="$a" '$4 == a' "$tmp/plan" | wc -l)
    got=$(jq_db "$a" "SELECT count(*) FROM jobs")
    fin=$(jq_db "$a" "SELECT count(*) FROM jobs WHERE state IN ('done','failed') AND flatten_pool IS NULL")
    [ "$got" -eq "$sent" ] && [ "$fin" -eq "$sent" ] && ok "agent $a: $sent casts journaled, all ended" \
        || bad "agent $a: $sent sent, $got journaled, $fin ended"
    unf=$(jq_db "$a" "SELECT job_id || ':' || state FROM jobs WHERE state NOT IN ('done','failed') OR flatten_pool IS NOT NULL")
    [ -z "$unf" ] && ok "agent $a: no unfinished job in the journal" || bad "agent $a: unfinished: $(tr '\n' ' ' <<<"$unf")"
done

# ---- images: status and size of all, a sample checked in full ------------------------------
# One line per cast: I GUEST AGENT IMAGE JOURNAL_STATE GLANCE_STATUS SIZE BYTES_SENT
$py - "$GLANCE_URL" "$tmp/plan" "$tmp" "$tmp"/a*/agent.log > "$tmp/images.txt" <<'PY'
import json, re, sqlite3, sys, urllib.request, urllib.error
from concurrent.futures import ThreadPoolExecutor
url, plan, tmp = sys.argv[1:4]
jstate = {}
for l in open(plan):
    a = l.split()[3]
    if a not in jstate:
        db = sqlite3.connect('file:%s/a%s/state/compute-agent-journal.sqlite?mode=ro' % (tmp, a),
                             uri=True, timeout=10)
        jstate[a] = dict(db.execute('SELECT job_id, state FROM jobs'))
sent = {}
for path in sys.argv[4:]:
    for l in open(path, errors='replace'):
        m = re.search(r'image (\S+) uploaded: \w+, (\d+) bytes sent', l)
        if m:
            sent[m.group(1)] = int(m.group(2))
def status(line):
    i, n, uuid, a, img = line.split()
    try:
        d = json.load(urllib.request.urlopen('%s/v2/images/%s' % (url, img), timeout=30))
        st, size = d['status'], d.get('size')
    except urllib.error.HTTPError as e:
        st, size = ('gone' if e.code == 404 else 'http-%d' % e.code), None
    return '%s %s %s %s %s %s %s %s' % (i, n, a, img, jstate[a].get('snap-' + img), st, size,
                                        sent.get(img))
with ThreadPoolExecutor(4) as ex:
    for out in ex.map(status, [l for l in open(plan) if l.strip()]):
        print(out)
PY
ndone=0 nfailed=0 nbad=0
while read -r i n a img js st size sent; do
    case "$js/$st" in
        done/active)
            if [ "$size" != None ] && [ "$size" = "$sent" ] && [ "$size" -gt 0 ]; then ndone=$((ndone + 1))
            else nbad=$((nbad + 1)); bad "image $img (guest $n): size $size, the agent sent $sent"; fi ;;
        failed/gone) nfailed=$((nfailed + 1)) ;;
        *) nbad=$((nbad + 1)); bad "image $img (guest $n, agent $a): job '$js', image $st" ;;
    esac
done < "$tmp/images.txt"
[ "$nbad" -eq 0 ] && ok "all $ncasts jobs settled: $ndone done (image active, size as sent), $nfailed failed (image deleted)" \
    || bad "$nbad of $ncasts jobs not settled"
if [ "$nfailed" -gt 0 ]; then
    log "failures: $(grep -ho 'snapshot to image [^ ]* failed: .*' "$tmp"/a*/agent.log | cut -d: -f2- | sort | uniq -c | sort -rn | head -3 | tr '\n' ' ')"
fi
[ "$ndone" -ge $((ncasts * 9 / 10)) ] && ok "$ndone of $ncasts snapshots done" || bad "only $ndone of $ncasts snapshots done"

checked=0
while read -r i n a img js st size sent; do
    [ "$checked" -lt "$nsample" ] || break
    [ "$st" = active ] || continue
    checked=$((checked + 1))
    f=$tmp/sample.qcow2
    if ! curl -sf -m 120 "$GLANCE_URL/v2/images/$img/file" -o "$f"; then bad "download of $img failed"; continue; fi
    why=
    qemu-img check -q "$f" > /dev/null 2>&1 || why="$why qemu-img check failed;"
    out=$("$check" -f qcow2 "$f" 2>&1) || why="$why ca-imgcheck: $out;"
    qemu-io -f qcow2 -r -c "read -P $n 64M 64k" "$f" > "$tmp/pattern.out" 2>&1 && ! grep -q 'verification failed' "$tmp/pattern.out" \
        || why="$why not guest $n's disk (marker missing);"
    [ -z "$why" ] && ok "image $img (guest $n, agent $a): qemu-img check, ca-imgcheck and guest marker" || bad "image $img:$why"
    rm -f "$f"
done < <(awk 'NR % 7 == 0' "$tmp/images.txt"; cat "$tmp/images.txt")   # every guest in turn
[ "$checked" -ge "$nsample" ] || [ "$checked" -eq "$ndone" ] || bad "only $checked images checked in full"

# ---- concurrency per agent, from its log ------------------------------------------------------
for a in $(seq 1 "$nagents"); do
    res=$($py - "$tmp/a$a/agent.log" <<'PY'
import re, sys, calendar, time
ev, starts, ends = [], set(), set()
for l in open(sys.argv[1], errors='replace'):
    m = re.match(r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) .*snapshot to image (\S+) '
                 r'(starting|done|failed|refused)', l)
    if not m:
        continue
    t = calendar.timegm(time.strptime(m.group(1), '%Y-%m-%d %H:%M:%S')) * 1000 + int(m.group(2))
    img, what = m.group(3), m.group(4)
    if what == 'starting':
        starts.add(img)
        ev.append((t, 1, img))
    else:
        ends.add(img)
        ev.append((t, 0, img))    # at the same ms, an end counts before a start
ev.sort()
cur = peak = 0
for t, kind, img in ev:
    cur += 1 if kind else -1
    peak = max(peak, cur)
print(peak, len(starts), len(ends), len(starts - ends))
PY
)
    read -r peak nstart nend open_ <<<"$res"
    sent=$(awk -v a="$a" '$4 == a' "$tmp/plan" | wc -l)
    [ "$peak" -le 2 ] && ok "agent $a: at most $peak jobs at once ($nstart started, $nend ended)" \
        || bad "agent $a: $peak jobs ran at once (max_concurrent_snapshots = 2)"
    [ "$peak" -eq 2 ] || bad "agent $a: never ran 2 jobs at once (peak $peak): the limit was not exercised"
    [ "$nstart" -eq "$sent" ] && [ "$open_" -eq 0 ] || bad "agent $a: $nstart starts for $sent casts, $open_ without an end"
    echo "$a $peak" >> "$tmp/peaks"
done

# ---- nothing leaked --------------------------------------------------------------------------
n=$(find "$tmp"/a*/scratch -mindepth 1 | wc -l)
[ "$n" -eq 0 ] && ok "no scratch file left" || bad "scratch left: $(find "$tmp"/a*/scratch -mindepth 1 | head -3 | tr '\n' ' ')"
nbd=$(ps -eo pid=,args= | grep '[q]emu-nbd' | grep -F "$tmp" || true)
[ -z "$nbd" ] && ok "no qemu-nbd left on the test's disks" || bad "qemu-nbd left: $nbd"
$RABBITMQCTL list_queues name messages 2>/dev/null > "$tmp/queues" || true
for a in $(seq 1 "$nagents"); do
    q=$(awk -v q="compute.load-$$-$a" '$1 == q {print $2}' "$tmp/queues")
    [ "$q" = 0 ] && ok "compute.load-$$-$a empty" || bad "compute.load-$$-$a holds '$q' messages"
done
gbad=0
for d in "${doms[@]}"; do
    s=$(virsh_ domstate "$d" 2>&1 | head -1 || true)
    # domjobinfo fails on a shut-off domain: that too means no job.
    j=$(virsh_ domjobinfo "$d" 2>/dev/null | awk -F: '/Job type/ {gsub(/ /, "", $2); print $2}' || true)
    [ "$s" = "shut off" ] && [ "${j:-None}" = None ] || { gbad=1; bad "guest $d: $s, job ${j:-?}"; }
done
[ "$gbad" -eq 0 ] && ok "guests still shut off, no libvirt job"
grep -h -E 'ERROR|WARNING' "$tmp"/a*/agent.log | grep -v 'non-running instance' | cut -c1-200 | sort | uniq -c | sort -rn | head -5 > "$tmp/warnings" || true
[ -s "$tmp/warnings" ] && log "agents' warnings/errors: $(tr '\n' ' ' < "$tmp/warnings")"

for a in $(seq 1 "$nagents"); do
    rc=0
    kill -TERM "${pids[a - 1]}"; wait "${pids[a - 1]}" || rc=$?
    [ "$rc" -eq 0 ] || bad "agent $a exit status $rc"
done
pids=()    # reaped: cleanup must not signal their PIDs

log "load: $ncasts casts over $nagents agents / $nguests shut-off guests: sent in $((t_last - t_first)) ms ($rate casts/s); all ended $wall ms after the first cast ($(awk -v n="$ncasts" -v w="$wall" 'BEGIN {printf "%.2f", n * 1000 / w}') jobs/s); $ndone done, $nfailed failed; peak concurrency per agent: $(awk '{printf "%s:%s ", $1, $2}' "$tmp/peaks")"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ] || exit 1
