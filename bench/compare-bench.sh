#!/usr/bin/env bash
# The agent against nova's own snapshot pipeline, on the real services from deploy/ (RabbitMQ,
# libvirt/QEMU, Glance), on one guest of the bench's own, plus the roofline of this machine, the
# RPC intake at 1 and 3 agents and the agent's memory.
#
#   bench/compare-bench.sh [BUILD_DIR]         (default build/release; built if missing)
#   CA_BENCH_SMOKE=1 bench/compare-bench.sh    (1 pair, 1 GiB, short RPC phase: a CI check)
#
# Contenders, alternating agent, nova, agent, nova ... on the same guest (CA_BENCH_PAIRS pairs):
#   agent: a real snapshot_instance cast from python3-nova's ComputeAPI
#          (tests/integration/nova_client.py, image_hw_qemu_guest_agent=yes), as snapshot-bench.sh;
#          a shut-off guest is cast with vm_state stopped, power_state 4 (the agent's cold path).
#   nova:  bench/compare_bench.py nova-live / nova-cold, nova's own sequence (nova 26 as
#          installed: driver.py snapshot() / _live_snapshot()) run by a script: a tempdir in the
#          snapshots dir; live: qemu-img create of a qcow2 delta backed by the disk's backing file,
#          the domain undefined, virDomainBlockRebase COPY | SHALLOW | REUSE_EXT into the delta,
#          polled every 0.5 s until the mirror is ready, fsFreeze, blockJobAbort, the domain
#          redefined, fsThaw; cold: nothing; then qemu-img convert -t none -O qcow2 to a temp file,
#          nova's PATCH of the image's metadata, glanceclient's chunked PUT (64 KiB reads), the
#          image GET, the tempdir removed.
# Cases: live (guest running and writing) and cold (guest shut off), each with CA_BENCH_SIZES_GIB
# of random data written into the guest's overlay (8 GiB virtual). Per run: wall time per phase,
# peak bytes in the contender's snapshots dir (100 ms samples) and the machine's /tmp + /var/tmp
# growth, bytes sent to Glance, freeze window, the guest's longest heartbeat gap, CPU seconds of
# the contender (agent; or the script + its qemu-img children), glance-api and the guest's QEMU.
# Roofline per size (guest shut off): nbdcopy of the disk exported by qemu-nbd -r to null:, and a
# curl chunked PUT of the same number of bytes the agent sent; bound = the slower of the two.
# RPC: 1 and 3 agents (host names of their own, test:///default so the jobs fail at once):
# cast -> received latency p50/p99 (casts 20 ms apart overall), a burst (senders in parallel)
# and a backlog drained (casts queued while the agents were stopped).
# Memory: the agent's VmRSS idle and VmHWM per phase (a fresh agent per case and size).
#
# Output: bench/results/compare-<date>.md (header with versions, load, wall time; the summary
# table; details), bench/results/compare-<date>.png (ratios ours/nova's, fraction of the
# roofline) and bench/results/compare-<date>.json (the summary's figures, for bench/summarize.py),
# all from bench/compare_bench.py. Smoke mode writes them into its state dir (removed at the end),
# or as compare-<date>-smoke.* into CA_BENCH_RESULTS_DIR if that is set. Everything the bench
# creates (domain, images, agents, queues, temp files) is removed by an EXIT trap, also on failure.
#
# Environment: CA_BENCH_PAIRS (5; or one number per size, e.g. "5 3"), CA_BENCH_SIZES_GIB
# ("1 4"), CA_BENCH_CASES ("live cold"), CA_BENCH_VIRTUAL_GIB (8), CA_BENCH_IDLE_S (3),
# CA_BENCH_ROOF_REPS (3), CA_BENCH_RPC ("1 3": agent counts, "" skips), CA_BENCH_SMOKE,
# CA_BENCH_KEEP (1: keep the state dir's logs), CA_BENCH_RESULTS_DIR (bench/results),
# CA_BENCH_DATE (today, UTC: the date in the file names). Disk: about 3x the largest size free.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=compare-bench
t_wall0=$(date +%s)
# The tree the agent is built from, named now: commits made while the bench runs are not in it.
agent_rev=$(git -C "$root" rev-parse --short HEAD 2> /dev/null || echo unknown)
git -C "$root" diff --quiet HEAD -- '*.c' '*.h' CMakeLists.txt 2> /dev/null || agent_rev="$agent_rev+local changes"
build=${1:-$root/build/release}
if [ ! -x "$build/compute-agent" ]; then
    log "building the release agent"
    cmake -S "$root" --preset release > /dev/null &&
        cmake --build "$root/build/release" -j"$(nproc)" --target compute-agent > /dev/null
    build=$root/build/release
fi
agent=$build/compute-agent
if [ "${CA_BENCH_SMOKE:-0}" = 1 ]; then
    : "${CA_BENCH_PAIRS:=1}" "${CA_BENCH_SIZES_GIB:=1}" "${CA_BENCH_ROOF_REPS:=1}"
    : "${CA_BENCH_RPC_CASTS:=60}"
fi
read -r -a pairs_per_size <<< "${CA_BENCH_PAIRS:-5}"
read -r -a sizes <<< "${CA_BENCH_SIZES_GIB:-1 4}"
cases=${CA_BENCH_CASES-live cold}
virt_gib=${CA_BENCH_VIRTUAL_GIB:-8}
idle_s=${CA_BENCH_IDLE_S:-3}
roof_reps=${CA_BENCH_ROOF_REPS:-3}
rpc_counts=${CA_BENCH_RPC-1 3}
rpc_casts=${CA_BENCH_RPC_CASTS:-300}
py=/usr/bin/python3
helper=$root/bench/compare_bench.py
client=$root/tests/integration/nova_client.py

NAME=ca-compare-bench-guest
UUID=c0a7e2b4-6d1f-4e3a-8b5c-2f9d0e1a3c57
TITLE="compute-agent compare bench guest"
MEM_MB=256
QEMU_BIN=/usr/bin/qemu-system-x86_64
DATA_OFF_MB=128

"$root/deploy/services.sh" up rabbitmq libvirt glance > /dev/null
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance
for s in "${sizes[@]}"; do
    [ $((DATA_OFF_MB + s * 1024)) -le $((virt_gib * 1024)) ] ||
        die "$s GiB of data at ${DATA_OFF_MB} MiB does not fit a ${virt_gib} GiB disk"
done
vsh() { timeout 120 virsh -q -c "$LIBVIRT_URI" "$@"; }
if vsh dominfo "$UUID" > /dev/null 2>&1; then
    die "the domain $NAME ($UUID) exists (an earlier bench killed hard?): check it, then" \
        "'virsh destroy $UUID; virsh undefine $UUID --checkpoints-metadata' if it is a leftover"
fi

bench=$(mktemp -d /var/tmp/ca-compare-bench.XXXXXX)
host=cmpbench-$$
agent_pid='' defined=0
rpc_pids=() rpc_hosts=()
stop_pid() { # stop_pid PID: SIGTERM one process of ours, SIGKILL after 10 s
    local p=$1 i
    [ -n "$p" ] || return 0
    kill -TERM "$p" 2> /dev/null || true
    for ((i = 0; i < 100; i++)); do pid_alive "$p" || break; sleep 0.1; done
    pid_alive "$p" && kill -KILL "$p" 2> /dev/null
    wait "$p" 2> /dev/null || true
}
cleanup() {
    set +e
    stop_pid "$agent_pid"
    for p in "${rpc_pids[@]}"; do stop_pid "$p"; done
    if [ -r "$bench/images.txt" ]; then
        while read -r i; do
            # Retried: another job may be restarting Glance right now.
            [ -n "$i" ] && curl -s -o /dev/null --retry 5 --retry-all-errors --retry-delay 2 \
                -X DELETE "$GLANCE_URL/v2/images/$i"
        done < "$bench/images.txt"
    fi
    if [ "$defined" = 1 ] || vsh dominfo "$UUID" > /dev/null 2>&1; then
        vsh destroy "$UUID" > /dev/null 2>&1
        vsh undefine "$UUID" --managed-save --snapshots-metadata --checkpoints-metadata > /dev/null 2>&1 ||
            log "undefine $NAME failed"
    fi
    if [ -n "${RABBITMQCTL:-}" ]; then
        for h in "$host" "${rpc_hosts[@]}"; do
            $RABBITMQCTL delete_queue "compute.$h" > /dev/null 2>&1
        done
    fi
    if [ "${CA_BENCH_KEEP:-0}" = 1 ]; then
        rm -rf "$bench"/*.qcow2 "$bench/rand.bin" "$bench"/snapshots-nova "$bench"/scratch-agent
        log "kept $bench (logs; disk images removed)"
    else
        rm -rf "$bench"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the bench guest (as snapshot-bench.sh's, with its own name and UUID) ------------------------

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
qemu-img convert -U -q -O qcow2 "$GUEST_BASE" "$base"
qemu-img resize -q "$base" "${virt_gib}G"
head -c 64M /dev/urandom > "$bench/rand.bin"
: > "$bench/images.txt"

last_hb() { tail -c 8192 "$console" 2> /dev/null | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' | tail -1 | cut -d= -f2; }
hb_beyond() { local s; s=$(last_hb); [ -n "$s" ] && [ "$s" -gt "$1" ]; }
ga_ping() { vsh qemu-agent-command --timeout 5 "$UUID" '{"execute":"guest-ping"}' > /dev/null 2>&1; }

make_disk() { # make_disk GIB: a fresh overlay over the grown base with GIB of random data
    local gib=$1 cmds=() i
    rm -f "$disk"
    qemu-img create -q -f qcow2 -F qcow2 -b "$base" "$disk"
    for ((i = 0; i < gib * 16; i++)); do
        cmds+=(-c "write -q -s $bench/rand.bin $((DATA_OFF_MB + i * 64))M 64M")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$disk"
    sync -f "$disk"
}
boot_guest() {
    local t0
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
remove_guest() {
    vsh destroy "$UUID" > /dev/null 2>&1 || true
    vsh undefine "$UUID" --managed-save --snapshots-metadata --checkpoints-metadata > /dev/null 2>&1 || true
    defined=0
    rm -f "$disk"
}

# --- the agent ------------------------------------------------------------------------------------

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$bench/oslo.conf"
{
    printf '[DEFAULT]\nhost = %s\nstate_path = %s/state\ntransport_url = %s\n' "$host" "$bench" "$TRANSPORT_URL"
    printf 'max_concurrent_snapshots = 1\n'
    printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/scratch-agent\n' "$LIBVIRT_URI" "$bench"
    printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
    printf '[oslo_messaging_notifications]\ndriver = messagingv2\n'
    printf '[notifications]\nnotification_format = both\nnotify_on_state_change = vm_and_task_state\n'
} > "$bench/agent.conf"
mkdir -p "$bench/scratch-agent" "$bench/snapshots-nova"
proc_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

write_conf() { # the facts compare_bench.py needs, as JSON
    $py - "$bench/conf.json" <<EOF
import json, sys
json.dump({'bench': '$bench', 'glance': '$GLANCE_URL', 'uuid': '$UUID', 'virt_gib': $virt_gib,
           'images_file': '$bench/images.txt', 'console': '$console', 'disk': '$disk',
           'agent_scratch': '$bench/scratch-agent', 'nova_snapdir': '$bench/snapshots-nova',
           'deploy_dir': '$CA_DEPLOY_DIR', 'glance_pidfile': '$(svc_dir glance)/pids/api.pid',
           'qemu_pidfile': '/run/libvirt/qemu/$NAME.pid', 'agent_pid': '${agent_pid:-0}',
           'agent_log': '${agent_log:-}', 'py': '$py', 'client': '$client',
           'oslo_conf': '$bench/oslo.conf', 'host': '$host', 'uri': '$LIBVIRT_URI',
           'idle_s': $idle_s}, open(sys.argv[1], 'w'))
EOF
}
write_conf
agent_phase='' idle_kb=0
start_agent() { # start_agent PHASE: a fresh agent for one case and size
    agent_phase=$1
    agent_log=$bench/agent-$1.log
    "$agent" --config-file "$root/deploy/compute-agent.conf.example" \
        --config-file "$bench/agent.conf" > "$agent_log" 2>&1 &
    agent_pid=$!
    wait_for 30 "agent ready" grep -q 'ready: connected to RabbitMQ' "$agent_log" ||
        { cat "$agent_log" >&2; die "agent not ready"; }
    sleep 1
    idle_kb=$(proc_kb "$agent_pid" VmRSS)
    write_conf
}
stop_agent() {
    printf '{"phase": "%s", "idle_kb": %s, "hwm_kb": %s}\n' "$agent_phase" "$idle_kb" \
        "$(proc_kb "$agent_pid" VmHWM)" >> "$bench/mem.jsonl"
    stop_pid "$agent_pid"
    agent_pid=''
}

# --- runs -----------------------------------------------------------------------------------------

retries=0
run_one() { # run_one CONTENDER MODE GIB PAIR: one measured snapshot, redone if something
    local i out left   # outside the bench got in the way (a broker or Glance restart by other jobs)
    for ((i = 1; i <= 3; i++)); do
        pid_alive "$agent_pid" || die "the agent died: $(tail -3 "$agent_log")"
        if out=$($py "$helper" run "$bench/conf.json" "$@" 2> "$bench/run.err"); then
            echo "$out" >> "$bench/runs.jsonl"
            log "$1 $2 $3 GiB #$4: $($py -c 'import json,sys; d=json.loads(sys.argv[1]); print("%.1f s total, %.0f MiB sent, temp peak %.0f MiB, freeze %s ms, hb gap %s ms, cpu %.1f s" % (d["total_ms"]/1000, d["sent"]/2**20, d["temp_peak"]/2**20, d.get("freeze_ms"), d.get("hb_gap_ms"), d["cpu_total_s"]))' "$out")"
            left=$(find "$bench/scratch-agent" "$bench/snapshots-nova" -mindepth 1 | head -5)
            [ -z "$left" ] || log "temp files left after the run: $left"
            return 0
        fi
        retries=$((retries + 1))
        log "run $* failed (attempt $i): $(tail -3 "$bench/run.err")"
        "$root/deploy/services.sh" up rabbitmq glance > /dev/null 2>&1 || true
        if [ "$2" = live ] && [ "$(vsh domstate "$UUID" 2> /dev/null | head -1)" != running ]; then
            die "the bench guest is not running any more"
        fi
        sleep 5
    done
    die "run $* failed 3 times"
}

agent_sent() { # the bytes the agent sent for GIB (its last live or cold run), else allocated
    $py - "$bench/runs.jsonl" "$1" <<'EOF'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
a = [r for r in runs if r['contender'] == 'agent' and r['gib'] == int(sys.argv[2])]
print(a[-1]['sent'] if a else 0)
EOF
}

t_start=$(date -u '+%Y-%m-%d %H:%M UTC')
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$bench/runs.jsonl"
: > "$bench/roofline.jsonl"
: > "$bench/mem.jsonl"
: > "$bench/rpc.jsonl"
for idx in "${!sizes[@]}"; do
    gib=${sizes[idx]}
    np=${pairs_per_size[idx]:-${pairs_per_size[0]}}
    free_gib=$(df -P --block-size=1G "$bench" | awk 'NR == 2 {print $4}')
    [ "$free_gib" -ge $((gib * 3 + 4)) ] || die "only $free_gib GiB free under $bench"
    t0=$(svc_time_ms)
    make_disk "$gib"
    log "overlay: $gib GiB of random data written in $(($(svc_time_ms) - t0)) ms"
    for mode in $cases; do
        if [ "$mode" = live ]; then
            boot_guest
        else
            vsh destroy "$UUID" > /dev/null 2>&1 || true
            [ "$(vsh domstate "$UUID" | head -1)" = "shut off" ] || die "the bench guest is not shut off"
        fi
        start_agent "$mode-${gib}g"
        for ((p = 1; p <= np; p++)); do
            run_one agent "$mode" "$gib" "$p"
            run_one nova "$mode" "$gib" "$p"
        done
        stop_agent
        if [ "$mode" = cold ] || [[ " $cases " != *" cold "* ]]; then
            vsh destroy "$UUID" > /dev/null 2>&1 || true
            write_conf
            log "roofline for $gib GiB"
            for ((i = 1; i <= 3; i++)); do   # redone if Glance is restarted meanwhile
                "$root/deploy/services.sh" up glance > /dev/null 2>&1 || true
                $py "$helper" roofline "$bench/conf.json" "$gib" "$(agent_sent "$gib")" \
                    "$roof_reps" >> "$bench/roofline.jsonl" 2> "$bench/run.err" && break
                retries=$((retries + 1))
                log "roofline for $gib GiB failed (attempt $i): $(tail -1 "$bench/run.err")"
                [ "$i" -lt 3 ] || die "roofline for $gib GiB failed 3 times"
            done
        fi
    done
    remove_guest
done

# --- RPC: 1 and 3 agents --------------------------------------------------------------------------

rpc_phase() { # rpc_phase N
    local n=$1 i dir pids=() logs=() rss=() per=$((rpc_casts / $1)) t0 total lat burst backlog
    for ((i = 1; i <= n; i++)); do
        rpc_hosts+=("cmprpc-$$-$n-$i")
        dir=$bench/rpc-$n-$i
        mkdir -p "$dir"
        cat > "$dir/agent.conf" <<CONF
[DEFAULT]
host = cmprpc-$$-$n-$i
transport_url = $TRANSPORT_URL
state_path = $dir
max_concurrent_snapshots = 0
[libvirt]
connection_uri = test:///default
[glance]
api_servers = http://127.0.0.1:9
num_retries = 0
[oslo_messaging_notifications]
driver = noop
CONF
    done
    rpc_start() { # rpc_start TAG
        local i
        rpc_pids=() logs=()
        for ((i = 1; i <= n; i++)); do
            "$agent" --config-file "$bench/rpc-$n-$i/agent.conf" > "$bench/rpc-$n-$i/$1.log" 2>&1 &
            rpc_pids+=($!)
            logs+=("$bench/rpc-$n-$i/$1.log")
        done
        for ((i = 1; i <= n; i++)); do
            wait_for 30 "rpc agent ready" grep -q 'ready: connected' "${logs[i - 1]}" ||
                die "rpc agent $i not ready"
        done
    }
    rpc_send() { # rpc_send OUT COUNT_PER_HOST INTERVAL_MS: one sender per agent, in parallel
        local i spids=()
        for ((i = 1; i <= n; i++)); do
            $py "$client" cast --config "$bench/oslo.conf" --host "cmprpc-$$-$n-$i" --count "$2" \
                --interval-ms "$3" > "$1.$i" 2> /dev/null &
            spids+=($!)
        done
        for i in "${spids[@]}"; do wait "$i"; done
        cat "$1".? > "$1"
    }
    rpc_start run
    sleep 1
    for p in "${rpc_pids[@]}"; do rss+=("$(proc_kb "$p" VmRSS)"); done
    # Latency: the same overall rate at any agent count (50 casts/s).
    rpc_send "$bench/rpc-$n-lat.jsonl" "$per" $((20 * n))
    sleep 2
    lat=$($py "$helper" rpc-latency "$bench/rpc-$n-lat.jsonl" "${logs[@]}")
    # Burst: the senders as fast as they go.
    rpc_send "$bench/rpc-$n-burst.jsonl" $((3 * per)) 0
    wait_for 120 "burst received" sh -c "[ \$(cat ${logs[*]} | grep -c 'received snapshot_instance') -ge $((4 * per * n)) ]" || true
    burst=$($py "$helper" received-span first "$bench/rpc-$n-burst.jsonl" "${logs[@]}")
    for ((i = 0; i < n; i++)); do
        hwm[i]=$(proc_kb "${rpc_pids[i]}" VmHWM)
    done
    for p in "${rpc_pids[@]}"; do stop_pid "$p"; done
    rpc_pids=()
    # Backlog: queued while the agents are down, then drained.
    total=$((per * 6 * n))
    rpc_send "$bench/rpc-$n-backlog.jsonl" $((per * 6)) 0
    t0=$(date +%s%3N)
    rpc_start backlog
    wait_for 180 "backlog drained" sh -c "[ \$(cat ${logs[*]} | grep -c 'received snapshot_instance') -ge $total ]" || true
    backlog=$($py "$helper" received-span "$t0" "$bench/rpc-$n-backlog.jsonl" "${logs[@]}")
    local rsspairs=()
    for ((i = 0; i < n; i++)); do
        h=$(proc_kb "${rpc_pids[i]}" VmHWM)
        [ "${hwm[i]}" -gt "$h" ] && h=${hwm[i]}
        rsspairs+=("[${rss[i]}, $h]")
    done
    for p in "${rpc_pids[@]}"; do stop_pid "$p"; done
    rpc_pids=()
    printf '{"agents": %d, "lat": %s, "burst": %s, "burst_n": %d, "backlog": %s, "backlog_n": %d, "rss": [%s]}\n' \
        "$n" "$lat" "$burst" $((3 * per * n)) "$backlog" "$total" "$(IFS=,; echo "${rsspairs[*]}")" >> "$bench/rpc.jsonl"
    log "rpc, $n agents: $(tail -1 "$bench/rpc.jsonl")"
}
declare -a hwm
# Other jobs on this machine restart RabbitMQ now and then: make sure it is up.
[ -z "$rpc_counts" ] || "$root/deploy/services.sh" up rabbitmq > /dev/null
for n in $rpc_counts; do
    rpc_phase "$n"
done

# --- results --------------------------------------------------------------------------------------

date_=${CA_BENCH_DATE:-$(date -u +%F)}
results=${CA_BENCH_RESULTS_DIR:-$root/bench/results}
stem=$results/compare-$date_
if [ "${CA_BENCH_SMOKE:-0}" = 1 ]; then
    # A smoke run never overwrites real results: its state dir, or -smoke files in a results dir
    # given explicitly.
    stem=$bench/compare-smoke
    [ -n "${CA_BENCH_RESULTS_DIR:-}" ] && stem=$results/compare-$date_-smoke
fi
mkdir -p "$(dirname "$stem")"
out=$stem.md png=$stem.png
{
    echo "# compare-bench $t_start"
    echo
    echo "$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)," \
        "guest domain type $GUEST_DOMTYPE, $($QEMU_BIN --version | head -1 | sed 's/ (.*//')," \
        "libvirt $(virsh -c "$LIBVIRT_URI" version 2> /dev/null | sed -n 's/^Using library: libvirt //p')," \
        "python3-nova $(dpkg-query -W -f='${Version}' python3-nova 2> /dev/null)," \
        "agent $(basename "$build") build of $agent_rev (the tree at the bench's start)." \
        "Guest disk: a qcow2 overlay, ${virt_gib} GiB virtual, the data written at ${DATA_OFF_MB} MiB;" \
        "writer ${GUEST_WRITER_WPS} writes/s, heartbeat ${GUEST_HB_MS} ms; image_hw_qemu_guest_agent=yes;" \
        "qcow2 uncompressed into Glance's file store. Pairs per size (${sizes[*]} GiB): ${pairs_per_size[*]}," \
        "agent then nova in each pair. Runs redone after outside interference: $retries." \
        "Load average at start $load_start, at the end $(cut -d' ' -f1-3 /proc/loadavg)" \
        "(the machine is shared: other jobs ran meanwhile). Wall time $(( ($(date +%s) - t_wall0) / 60 )) min."
    echo
} > "$out"
$py "$helper" table "$bench/conf.json" "$out" "$png"
log "saved $out, $png and $stem.json"
