#!/usr/bin/env bash
# Snapshot benchmark on the real services from deploy/ (RabbitMQ, libvirt/QEMU, Glance): the agent
# (release build) snapshots a running, writing guest of its own while python3-nova's ComputeAPI
# casts snapshot_instance, exactly as tests/integration/test-snapshot.sh drives it, and the cost of
# each phase is measured.
#
#   bench/snapshot-bench.sh [BUILD_DIR]     (default build/release; built if missing)
#
# The bench guest: domain ca-bench-guest (its own UUID, title "compute-agent snapshot bench
# guest"), the test guest's kernel, initramfs and command line (GUEST_KERNEL/GUEST_INITRD from
# $(svc_dir libvirt)/env, writer and heartbeats running), its disk a qcow2 overlay over a new base
# made in the bench's state dir (a copy of the test guest's base, virtual size grown to
# CA_BENCH_VIRTUAL_GIB). Before each boot, DATA GiB of random data (a 64 MiB /dev/urandom block,
# repeated) is written into the overlay at 128 MiB, clear of the writer's ring (16-48 MiB) and ext2
# (64-96 MiB). The shared test guest (instance-00000001) is never touched (services.sh up only
# starts it if it is down, as for every test).
#
# For each DATA size, CA_BENCH_RUNS snapshots (image_hw_qemu_guest_agent=yes, so the guest's
# filesystem is frozen around the point in time) by one agent, each image deleted from Glance
# once measured. Reported per size, median (min-max) over the runs:
#   - cast -> job start: the sender's time.time() before snapshot_instance to the agent's
#     "snapshot to image ... starting" log line; total: the same to its "... done" line;
#   - point in time (view open, incl. freeze), freeze window, upload (encode + chunked PUT +
#     Glance's checksum check), bytes sent / read / allocated / virtual: the agent's log lines;
#     the rest of the job: the job's time minus point in time and upload;
#   - peak temporary bytes on the host, sampled every 100 ms from the cast to done: the agent's
#     snapshots_directory (libvirt's backup scratch file: only blocks the guest overwrote), files
#     under /tmp or /var/tmp held open by the agent, glance-api, libvirtd or the bench QEMU, and
#     the whole machine's /tmp + /var/tmp growth (deploy state, where Glance's store lives, and
#     the bench's own dir left out; other jobs show up there, so the biggest grower is named);
#   - CPU of the agent, glance-api and the bench QEMU (% of one core, CPU s per GiB sent) and of
#     the whole machine over the job;
#   - the guest's longest heartbeat gap (host-side arrival times of its "CA-HB" console lines,
#     every 100 ms): idle (before the cast), over the job, from job start to the view ready;
#   - agent RSS: VmRSS idle (before the first snapshot) and VmHWM after the last run.
# Output: a markdown table on stdout, also saved as bench/results/snapshot-<date>.md. A run broken
# from outside (another job restarting RabbitMQ or Glance) is redone and counted in the header.
#
# Environment: CA_BENCH_RUNS (3), CA_BENCH_SIZES_GIB ("1 4"), CA_BENCH_VIRTUAL_GIB (8),
# CA_BENCH_IDLE_S (5), CA_BENCH_KEEP (1: keep the state dir for a look at the logs).
# Needs about DATA + DATA GiB free (the overlay plus the image in Glance's file store).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=snapshot-bench
build=${1:-$root/build/release}
if [ ! -x "$build/compute-agent" ]; then
    log "building the release agent"
    cmake -S "$root" --preset release > /dev/null &&
        cmake --build "$root/build/release" -j"$(nproc)" --target compute-agent > /dev/null
    build=$root/build/release
fi
agent=$build/compute-agent
runs=${CA_BENCH_RUNS:-3}
sizes=${CA_BENCH_SIZES_GIB:-"1 4"}
virt_gib=${CA_BENCH_VIRTUAL_GIB:-8}
idle_s=${CA_BENCH_IDLE_S:-5}
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py

NAME=ca-bench-guest
UUID=b3c4e1a0-5e7d-4f2a-9c1b-8d0e6f2a7b91
TITLE="compute-agent snapshot bench guest"
MEM_MB=256
QEMU_BIN=/usr/bin/qemu-system-x86_64
DATA_OFF_MB=128

"$root/deploy/services.sh" up rabbitmq libvirt glance > /dev/null
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance
for s in $sizes; do
    [ $((DATA_OFF_MB + s * 1024)) -le $((virt_gib * 1024)) ] ||
        die "$s GiB of data at ${DATA_OFF_MB} MiB does not fit a ${virt_gib} GiB disk"
done
vsh() { timeout 120 virsh -q -c "$LIBVIRT_URI" "$@"; }
if vsh dominfo "$NAME" > /dev/null 2>&1; then
    die "a domain named $NAME exists (an earlier bench killed hard?): check it, then" \
        "'virsh destroy $NAME; virsh undefine $NAME --checkpoints-metadata' if it is a leftover"
fi

bench=$(mktemp -d /var/tmp/ca-snapshot-bench.XXXXXX)
host=snapbench-$$
agent_pid='' hbw='' smp='' defined=0
images=()
stop_bg() { # stop_bg PID: a background helper of ours and its children (tail | while read)
    [ -n "$1" ] || return 0
    { pkill -P "$1"; kill "$1"; wait "$1"; } 2> /dev/null || true
}
stop_agent() {
    [ -n "$agent_pid" ] || return 0
    kill -TERM "$agent_pid" 2> /dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do pid_alive "$agent_pid" || break; sleep 0.1; done
    pid_alive "$agent_pid" && kill -KILL "$agent_pid" 2> /dev/null
    wait "$agent_pid" 2> /dev/null || true
    agent_pid=
}
cleanup() {
    set +e
    stop_bg "$hbw"
    stop_bg "$smp"
    stop_agent
    for i in "${images[@]}"; do
        [ -n "$i" ] && curl -s -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null
    done
    if [ "$defined" = 1 ]; then
        vsh destroy "$UUID" > /dev/null 2>&1
        vsh undefine "$UUID" --managed-save --snapshots-metadata --checkpoints-metadata > /dev/null 2>&1 ||
            log "undefine $NAME failed"
    fi
    [ -n "${RABBITMQCTL:-}" ] && $RABBITMQCTL delete_queue "compute.$host" > /dev/null 2>&1
    if [ "${CA_BENCH_KEEP:-0}" = 1 ]; then
        rm -f "$bench"/*.qcow2 "$bench/rand.bin"
        log "kept $bench (logs; disk images removed)"
    else
        rm -rf "$bench"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the bench guest ----------------------------------------------------------------------------

# domain_xml TYPE: as deploy/services/libvirt.sh's domain_xml, for the bench guest's name, UUID,
# title, console and disk.
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
    <serial type='file'>
      <source path='$console' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

base=$bench/base.qcow2
disk=$bench/disk.qcow2
console=$bench/console.log
# The new base: the test guest's base (pattern region + ext2, which the guest's init mounts and
# fsfreeze freezes), copied and grown; the test guest keeps its own.
qemu-img convert -U -q -O qcow2 "$GUEST_BASE" "$base"
qemu-img resize -q "$base" "${virt_gib}G"
head -c 64M /dev/urandom > "$bench/rand.bin"

last_hb() { tail -c 8192 "$console" 2> /dev/null | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' | tail -1 | cut -d= -f2; }
hb_beyond() { local s; s=$(last_hb); [ -n "$s" ] && [ "$s" -gt "$1" ]; }
ga_ping() { vsh qemu-agent-command --timeout 5 "$UUID" '{"execute":"guest-ping"}' > /dev/null 2>&1; }

boot_guest() { # boot_guest DATA_GIB: fresh overlay, DATA GiB written, boot, wait for the writer
    local gib=$1 cmds=() i t0
    rm -f "$disk"
    qemu-img create -q -f qcow2 -F qcow2 -b "$base" "$disk"
    for ((i = 0; i < gib * 16; i++)); do
        cmds+=(-c "write -q -s $bench/rand.bin $((DATA_OFF_MB + i * 64))M 64M")
    done
    t0=$(svc_time_ms)
    qemu-io -f qcow2 "${cmds[@]}" "$disk"
    sync -f "$disk"
    log "overlay: $gib GiB of random data written in $(($(svc_time_ms) - t0)) ms"
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
    log "bench guest up in $(($(svc_time_ms) - t0)) ms ($GUEST_DOMTYPE)"
}

shutdown_guest() {
    vsh destroy "$UUID" > /dev/null 2>&1 || true
    rm -f "$disk"
}

# --- the agent ----------------------------------------------------------------------------------

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$bench/oslo.conf"
{
    printf '[DEFAULT]\nhost = %s\nstate_path = %s/state\ntransport_url = %s\n' "$host" "$bench" "$TRANSPORT_URL"
    printf 'max_concurrent_snapshots = 1\n'
    printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/scratch\n' "$LIBVIRT_URI" "$bench"
    printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
    printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
    printf '[notifications]\nnotification_format = both\nnotify_on_state_change = vm_and_task_state\n'
} > "$bench/agent.conf"
mkdir -p "$bench/scratch"

start_agent() { # start_agent LOG
    "$agent" --config-file "$root/deploy/compute-agent.conf.example" \
        --config-file "$bench/agent.conf" > "$1" 2>&1 &
    agent_pid=$!
    wait_for 30 "agent ready" grep -q 'ready: connected to RabbitMQ' "$1" ||
        { cat "$1" >&2; die "agent not ready"; }
}
proc_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

create_image() { # create_image NAME → the id (as nova-api's compute_utils.create_image)
    curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"$1\", \"container_format\": \"bare\", \"disk_format\": \"qcow2\",
        \"min_disk\": $virt_gib, \"min_ram\": 0, \"instance_uuid\": \"$UUID\",
        \"image_type\": \"snapshot\", \"base_image_ref\": \"155d900f-4e14-4e4c-a73d-069cbf4541e6\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
image_json() { curl -sf "$GLANCE_URL/v2/images/$1"; }

# --- samplers -----------------------------------------------------------------------------------

hb_watch() { # hb_watch OUT: host arrival time (ms) of each heartbeat line, until stopped
    tail -n0 -F "$console" 2> /dev/null | while IFS= read -r l; do
        case $l in *CA-HB*) date +%s%3N ;; esac
    done > "$1"
}
# tmp_sample OUT: every 100 ms temporary bytes and CPU ticks (see sample() in bench.py).
tmp_sample() {
    exec $py "$bench/bench.py" sample "$1" "$bench/scratch" "$CA_DEPLOY_DIR" "$bench" "$agent_pid" \
        "$(cat "$(svc_dir glance)/pids/api.pid" 2> /dev/null || echo 0)" \
        "$(cat "/run/libvirt/qemu/$NAME.pid" 2> /dev/null || echo 0)" \
        "$(cat "$(svc_dir libvirt)/pids/libvirtd.pid" 2> /dev/null || echo 0)"
}

# --- one run ------------------------------------------------------------------------------------

# attempt GIB N: one snapshot, measured. Returns 1 if something outside the bench got in the way
# (the machine is shared: a test restarting RabbitMQ loses the cast, one stopping Glance fails
# the upload); the run is then redone.
attempt() {
    local gib=$1 n=$2 img r
    img=$(create_image "bench-${gib}g-$n") || { log "cannot create an image in Glance"; return 1; }
    images+=("$img")
    r=$bench/run-$gib-$n
    hb_watch "$r.hb" 2> /dev/null & hbw=$!
    tmp_sample "$r.tmp" 2> /dev/null & smp=$!
    sleep "$idle_s"
    if ! $py "$client" cast --config "$bench/oslo.conf" --host "$host" --instance-uuid "$UUID" \
            --image-id "$img" --sysmeta image_hw_qemu_guest_agent=yes > "$r.cast" 2>&1; then
        log "cast failed: $(tail -1 "$r.cast")"
    elif ! wait_for 60 "the job for $img to start" grep -q "snapshot to image $img starting" "$agent_log"; then
        log "cast for $img lost (broker restarted meanwhile?)"
    else
        wait_for 900 "snapshot of $img" grep -qE "snapshot to image $img (done|failed|refused)|image $img not found|disappeared" "$agent_log" ||
            die "snapshot of $img did not finish"
    fi
    sleep 0.3
    stop_bg "$hbw"; hbw=''
    stop_bg "$smp"; smp=''
    pid_alive "$agent_pid" || die "the agent died: $(tail -3 "$agent_log")"
    if ! grep -q "snapshot to image $img done" "$agent_log"; then
        grep -q "snapshot to image $img" "$agent_log" &&
            log "run $gib/$n failed: $(grep "$img" "$agent_log" | tail -1 | cut -c1-300)"
        curl -s -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null || true
        return 1
    fi
    image_json "$img" > "$r.image"
    $py "$bench/bench.py" run "$agent_log" "$img" "$r" "$gib" "$n" >> "$bench/runs.jsonl"
    curl -sf -X DELETE "$GLANCE_URL/v2/images/$img" > /dev/null ||
        log "could not delete image $img"
    images=("${images[@]/$img/}")
    [ -z "$(ls -A "$bench/scratch")" ] || log "scratch dir not empty after the job: $(ls "$bench/scratch")"
    log "run $gib GiB #$n: $(tail -1 "$bench/runs.jsonl" | cut -c1-400)"
}

retries=0
run_one() { # run_one GIB N
    local i
    for ((i = 1; i <= 4; i++)); do
        attempt "$1" "$2" && return 0
        retries=$((retries + 1))
        log "redoing run $1 GiB #$2 (attempt $((i + 1)))"
        "$root/deploy/services.sh" up rabbitmq glance > /dev/null 2>&1 || true
        sleep 5
    done
    die "run $1 GiB #$2 failed 4 times"
}

cat > "$bench/bench.py" <<'PY'
import datetime, json, os, re, statistics, sys, time

def dir_bytes(path, exclude=(), dev=None):
    """Allocated bytes of the regular files under path (one filesystem, symlinks not followed)."""
    total = 0
    try:
        it = os.scandir(path)
    except OSError:
        return 0
    with it:
        for e in it:
            p = e.path
            if p in exclude:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if dev is not None and st.st_dev != dev:
                continue
            if e.is_dir(follow_symlinks=False):
                total += dir_bytes(p, exclude, st.st_dev)
            elif e.is_file(follow_symlinks=False):
                total += st.st_blocks * 512
    return total

def top_entries(exclude):
    """{entry: allocated bytes} for each entry directly under /tmp and /var/tmp."""
    d = {}
    for top in ('/tmp', '/var/tmp'):
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            p = os.path.join(top, name)
            if p in exclude:
                continue
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                d[p] = dir_bytes(p, exclude, st.st_dev)
            elif os.path.isfile(p) and not os.path.islink(p):
                d[p] = st.st_blocks * 512
    return d

def cpu_ticks(pid):
    try:
        f = open('/proc/%s/stat' % pid).read().rsplit(')', 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return -1

def held_tmp_bytes(pids, skip):
    """Allocated bytes of the regular files under /tmp or /var/tmp (not under skip) that the
    processes pids hold open, each file counted once."""
    seen, total = set(), 0
    for pid in pids:
        fd_dir = '/proc/%s/fd' % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            p = os.path.join(fd_dir, fd)
            try:
                target = os.readlink(p)
                if not target.startswith(('/tmp/', '/var/tmp/')) or \
                        any(target.startswith(d + '/') for d in skip):
                    continue
                st = os.stat(p)
            except OSError:
                continue
            if os.path.isfile(p) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total

def machine_ticks():
    """(busy, total) jiffies of all CPUs since boot."""
    v = [int(x) for x in open('/proc/stat').readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])

def sample(out, scratch, deploy_dir, bench_dir, agent_pid, glance_pid, qemu_pid, libvirtd_pid):
    """Every 100 ms until killed, one line: ms, the scratch dir's bytes, /tmp + /var/tmp bytes
    (deploy state and the bench dir excluded), bytes of files under /tmp or /var/tmp held open
    by the agent, glance-api, libvirtd or the bench guest's QEMU (deploy state and the bench dir
    excluded: Glance's store and the scratch dir are there), the /tmp or /var/tmp entry that grew
    most since the first sample (path=bytes, or -), and the CPU ticks used so far by the agent,
    glance-api and the bench guest's QEMU."""
    skip = [deploy_dir.rstrip('/'), bench_dir.rstrip('/')]
    exclude = set(skip)
    pids = [p for p in (agent_pid, glance_pid, qemu_pid, libvirtd_pid) if p not in ('', '0')]
    base = None
    with open(out, 'w') as f:
        t_next = time.monotonic()
        while True:
            ent = top_entries(exclude)
            if base is None:
                base = ent
            grew = max(((v - base.get(k, 0), k) for k, v in ent.items()), default=(0, '-'))
            top = '%s=%d' % (grew[1], grew[0]) if grew[0] > 0 else '-'
            busy, total = machine_ticks()
            f.write('%d %d %d %d %s %d %d %d %d %d\n' % (
                time.time() * 1000, dir_bytes(scratch), sum(ent.values()),
                held_tmp_bytes(pids, skip), top.replace(' ', '_'),
                cpu_ticks(agent_pid), cpu_ticks(glance_pid), cpu_ticks(qemu_pid), busy, total))
            f.flush()
            t_next += 0.1
            time.sleep(max(0.0, t_next - time.monotonic()))

def ts(line):
    return datetime.datetime.strptime(line[:23], '%Y-%m-%d %H:%M:%S.%f').replace(
        tzinfo=datetime.timezone.utc).timestamp() * 1000

def run(log, img, prefix, gib, n):
    t_cast = None
    for l in open(prefix + '.cast'):
        try:
            d = json.loads(l)
        except ValueError:
            continue
        if d.get('image_id') == img:
            t_cast = d['t_unix'] * 1000
    lines = open(log, errors='replace').read().splitlines()
    i0 = next(i for i, l in enumerate(lines) if 'snapshot to image %s starting' % img in l)
    r = {'gib': gib, 'run': n, 'image': img, 'cast_to_start_ms': ts(lines[i0]) - t_cast}
    for l in lines[i0:]:
        m = re.search(r'point in time taken via (\S+) in (\d+) ms .*freeze window (-?\d+) ms, '
                      r'(\d+) of (\d+) bytes allocated', l)
        if m and 'pit_ms' not in r:
            r.update(path=m.group(1), pit_ms=int(m.group(2)), freeze_ms=int(m.group(3)),
                     allocated=int(m.group(4)), virtual=int(m.group(5)))
        m = re.search(r'image %s uploaded: (\S+), (\d+) bytes sent \((\d+) read of (\d+) virtual\) '
                      r'in (\d+) ms' % img, l)
        if m:
            r.update(format=m.group(1), sent=int(m.group(2)), read=int(m.group(3)),
                     upload_ms=int(m.group(5)))
        m = re.search(r'task_state (\S+) -> (\S+)', l)
        if m:
            r.setdefault('task_states', []).append([m.group(1), m.group(2), round(ts(l) - t_cast)])
        m = re.search(r'snapshot to image %s done in (\d+) ms' % img, l)
        if m:
            r['job_ms'] = int(m.group(1))
            t_done = ts(l)
            r['total_ms'] = t_done - t_cast
            break
    r['other_ms'] = r['job_ms'] - r['pit_ms'] - r['upload_ms']
    im = json.load(open(prefix + '.image'))
    r['glance_status'] = im.get('status')
    r['glance_size'] = im.get('size')
    # Guest heartbeats: the longest gap overlapping [cast, done], and before the cast (idle).
    hb = [int(x) for x in open(prefix + '.hb').read().split()]
    gaps = [(b - a, a, b) for a, b in zip(hb, hb[1:])]
    r['hb_gap_snap_ms'] = max([g for g, a, b in gaps if b >= t_cast and a <= t_done], default=None)
    r['hb_gap_idle_ms'] = max([g for g, a, b in gaps if b < t_cast], default=None)
    r['hb_count_snap'] = sum(1 for x in hb if t_cast <= x <= t_done)
    # ... and around the point in time: job start to the view ready (task_state
    # image_pending_upload), which holds the freeze.
    t_start = t_cast + r['cast_to_start_ms']
    t_view = next((t_cast + t for o, nw, t in r.get('task_states', []) if nw == 'image_pending_upload'), None)
    if t_view is not None:
        r['hb_gap_pit_ms'] = max([g for g, a, b in gaps if b >= t_start and a <= t_view], default=None)
    # Temporary bytes and CPU: sampled every 100 ms.
    smp = [l.split() for l in open(prefix + '.tmp')]
    smp = [[int(x) for x in s[:4]] + [s[4]] + [int(x) for x in s[5:]] for s in smp if len(s) == 10]
    before = [s for s in smp if s[0] < t_cast]
    during = [s for s in smp if t_cast <= s[0] <= t_done + 200]
    base = statistics.median(s[2] for s in before) if before else smp[0][2]
    r['scratch_peak'] = max((s[1] for s in during), default=0)
    peak = max(during, key=lambda s: s[2], default=None)
    r['tmp_growth_peak'] = max(0, peak[2] - base) if peak else 0
    r['tmp_growth_top'] = peak[4] if peak and r['tmp_growth_peak'] > 1024 * 1024 else '-'
    r['held_tmp_peak'] = max((s[3] for s in during), default=0)
    r['samples'] = len(during)
    # CPU over the job, in % of one core (ticks of 10 ms).
    inside = [s for s in smp if t_cast <= s[0] <= t_done]
    if len(inside) >= 2:
        dt = (inside[-1][0] - inside[0][0]) / 1000
        for i, k in ((5, 'cpu_agent_pct'), (6, 'cpu_glance_pct'), (7, 'cpu_qemu_pct')):
            if inside[0][i] >= 0 and inside[-1][i] >= 0 and dt > 0:
                cpu_s = (inside[-1][i] - inside[0][i]) / 100
                r[k] = round(cpu_s / dt * 100)
                r[k.replace('_pct', '_s_per_gib')] = round(cpu_s / (r['sent'] / 2**30), 2)
        busy = inside[-1][8] - inside[0][8]
        total = inside[-1][9] - inside[0][9]
        r['machine_busy_pct'] = round(100 * busy / total) if total > 0 else None
    for k in ('cast_to_start_ms', 'total_ms'):
        r[k] = round(r[k])
    print(json.dumps(r))

def table(runs_file, rss_file, out):
    runs = [json.loads(l) for l in open(runs_file)]
    rss = {int(json.loads(l)['gib']): json.loads(l) for l in open(rss_file)}
    sizes = sorted({int(r['gib']) for r in runs})
    by = {g: [r for r in runs if int(r['gib']) == g] for g in sizes}
    MiB = 1024 * 1024

    def cell(g, key, scale=1, fmt='%.0f'):
        v = [r[key] for r in by[g] if r.get(key) is not None]
        if not v:
            return '-'
        v = [x / scale for x in v]
        med, lo, hi = statistics.median(v), min(v), max(v)
        if len(v) == 1 or lo == hi:
            return fmt % med
        return (fmt + ' (' + fmt + '–' + fmt + ')') % (med, lo, hi)

    for g in sizes:
        for r in by[g]:
            r['mibps'] = r['sent'] / MiB / (r['upload_ms'] / 1000) if r['upload_ms'] else None
    rows = [
        ('runs (live path)', lambda g: '%d (%s)' % (len(by[g]), ', '.join(sorted({r['path'] for r in by[g]})))),
        ('cast → job start, ms', lambda g: cell(g, 'cast_to_start_ms')),
        ('point in time (view open, incl. freeze), ms', lambda g: cell(g, 'pit_ms')),
        ('freeze window, ms', lambda g: cell(g, 'freeze_ms')),
        ('upload (encode + PUT + Glance verify), ms', lambda g: cell(g, 'upload_ms')),
        ('rest of the job (image GET/PATCH, task states, view close), ms', lambda g: cell(g, 'other_ms')),
        ('**total cast → done, ms**', lambda g: '**%s**' % cell(g, 'total_ms')),
        ('upload throughput, MiB/s sent', lambda g: cell(g, 'mibps')),
        ('bytes sent to Glance, MiB', lambda g: cell(g, 'sent', MiB, '%.1f')),
        ('bytes read from the view, MiB', lambda g: cell(g, 'read', MiB, '%.1f')),
        ('allocated at the point in time, MiB', lambda g: cell(g, 'allocated', MiB, '%.1f')),
        ('virtual size, MiB', lambda g: cell(g, 'virtual', MiB)),
        ('peak scratch file (snapshots_directory), MiB', lambda g: cell(g, 'scratch_peak', MiB, '%.2f')),
        ('peak /tmp + /var/tmp growth, whole machine, MiB', lambda g: cell(g, 'tmp_growth_peak', MiB, '%.2f')),
        ('peak /tmp + /var/tmp files held open by agent, glance-api, libvirtd, bench QEMU, MiB',
         lambda g: cell(g, 'held_tmp_peak', MiB, '%.2f')),
        ('CPU during the job, % of one core: agent', lambda g: cell(g, 'cpu_agent_pct')),
        ('CPU during the job, % of one core: glance-api', lambda g: cell(g, 'cpu_glance_pct')),
        ('CPU during the job, % of one core: bench guest QEMU', lambda g: cell(g, 'cpu_qemu_pct')),
        ('CPU seconds per GiB sent: agent', lambda g: cell(g, 'cpu_agent_s_per_gib', 1, '%.2f')),
        ('CPU seconds per GiB sent: glance-api', lambda g: cell(g, 'cpu_glance_s_per_gib', 1, '%.2f')),
        ('whole machine CPU busy during the job, % of all cores', lambda g: cell(g, 'machine_busy_pct')),
        ('guest longest heartbeat gap, idle, ms', lambda g: cell(g, 'hb_gap_idle_ms')),
        ('guest longest heartbeat gap, during the snapshot, ms', lambda g: cell(g, 'hb_gap_snap_ms')),
        ('guest longest heartbeat gap, job start → view ready (incl. freeze), ms',
         lambda g: cell(g, 'hb_gap_pit_ms')),
        ('agent RSS idle / VmHWM after the runs, MiB',
         lambda g: '%.1f / %.1f' % (rss[g]['idle_kb'] / 1024, rss[g]['hwm_kb'] / 1024)),
    ]
    hdr = '| measure | ' + ' | '.join('%d GiB written' % g for g in sizes) + ' |'
    lines = [hdr, '|---|' + '---:|' * len(sizes)]
    for name, f in rows:
        lines.append('| %s | %s |' % (name, ' | '.join(f(g) for g in sizes)))
    bad = [r for r in runs if r.get('glance_status') != 'active' or r.get('glance_size') != r.get('sent')]
    text = '\n'.join(lines) + '\n'
    grew = {}
    for r in runs:
        if r.get('tmp_growth_top', '-') != '-':
            path = r['tmp_growth_top'].rsplit('=', 1)[0]
            grew[path] = max(grew.get(path, 0), r['tmp_growth_peak'])
    if grew:
        text += ('\nThe whole-machine /tmp + /var/tmp growth grew past 1 MiB in %d of %d runs; the '
                 'largest grower at each peak (other jobs on this machine write there too): %s.\n'
                 % (sum(1 for r in runs if r.get('tmp_growth_top', '-') != '-'), len(runs),
                    ', '.join('%s (%.0f MiB)' % (k, v / MiB) for k, v in sorted(grew.items()))))
    sys.stdout.write(text)
    if out:
        with open(out, 'a') as f:
            f.write(text)

if sys.argv[1] == 'run':
    run(*sys.argv[2:7])
elif sys.argv[1] == 'sample':
    sample(*sys.argv[2:10])
else:
    table(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
PY

# --- the bench ----------------------------------------------------------------------------------

t_start=$(date -u '+%Y-%m-%d %H:%M UTC')
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$bench/runs.jsonl"
: > "$bench/rss.jsonl"
for gib in $sizes; do
    free_gib=$(df -P --block-size=1G "$bench" | awk 'NR == 2 {print $4}')
    [ "$free_gib" -ge $((gib * 2 + 4)) ] || die "only $free_gib GiB free under $bench"
    boot_guest "$gib"
    agent_log=$bench/agent-$gib.log
    start_agent "$agent_log"
    sleep 1
    idle_kb=$(proc_kb "$agent_pid" VmRSS)
    for ((n = 1; n <= runs; n++)); do
        run_one "$gib" "$n"
    done
    hwm_kb=$(proc_kb "$agent_pid" VmHWM)
    printf '{"gib": %s, "idle_kb": %s, "hwm_kb": %s}\n' "$gib" "$idle_kb" "$hwm_kb" >> "$bench/rss.jsonl"
    stop_agent
    shutdown_guest
done

mkdir -p "$root/bench/results"
out=$root/bench/results/snapshot-$(date -u +%F).md
{
    echo "# snapshot-bench $t_start"
    echo
    echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)," \
        "guest domain type $GUEST_DOMTYPE, $($QEMU_BIN --version | head -1 | sed 's/ (.*//')," \
        "libvirt $(virsh -c "$LIBVIRT_URI" version 2> /dev/null | sed -n 's/^Using library: libvirt //p')," \
        "agent $(basename "$build") build; guest disk ${virt_gib} GiB virtual, random data at ${DATA_OFF_MB} MiB," \
        "writer ${GUEST_WRITER_WPS} writes/s, heartbeat ${GUEST_HB_MS} ms; $runs runs per size," \
        "median (min–max); image_hw_qemu_guest_agent=yes; qcow2 uncompressed; Glance file store." \
        "Runs redone after outside interference (broker or Glance restarted by other jobs): $retries." \
        "Load average at start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
} > "$out"
echo
$py "$bench/bench.py" table "$bench/runs.jsonl" "$bench/rss.jsonl" "$out"
log "saved $out"
