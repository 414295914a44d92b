#!/usr/bin/env bash
# Integration test of the agent's RPC layer against the real RabbitMQ from deploy/, driven by
# python3-nova itself (tests/integration/nova_client.py under Debian's /usr/bin/python3):
#   a. a snapshot_instance cast from nova's ComputeAPI (rpc 6.0) is received and parsed exactly;
#   b. the same with [upgrade_levels] compute = 5.0 arrives as rpc 5.0;
#   c. RPC calls get oslo-format failure replies at once: NoSuchMethod for an unknown method,
#      UnsupportedVersion for snapshot_instance 7.0 and 6.2 (nova 26 implements 6.1), as nova
#      sees them (RemoteError) and as oslo rebuilds them (the real exception classes);
#   f. the byte-exact captured cast published twice (same _unique_id) is received once;
#   g. invalid JSON, text/plain, a 5 MiB body and envelope "3.0" are each rejected with a logged
#      reason, the agent keeps serving, and the queue ends empty (no poison loop);
#   e. 1000 casts in a burst all arrive (METRIC lines: sender and agent-side rates), then 1000
#      more queued while the agent is stopped are all taken after its restart (intake rate);
#   d. after a broker restart the agent reconnects and receives 5 more casts.
# Notifications are tested elsewhere. Exits 77 when the agent binary or nova is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../../deploy/lib.sh
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034  # read by log() in lib.sh
SVC=test-rpc

agent=${CA_AGENT:-$root/build/debug/compute-agent}
[ -x "$agent" ] || { echo "no agent binary at $agent (set CA_AGENT)"; exit 77; }
PY=/usr/bin/python3
client=$root/tests/integration/nova_client.py
if ! $PY -c 'import nova.compute.rpcapi, oslo_messaging, amqp' 2> /dev/null; then
    echo "python3-nova / python3-oslo.messaging / python3-amqp missing under $PY"
    exit 77
fi

host=rpc-test-$$
queue=compute.$host
tmp=$(mktemp -d)
agent_pid=
alog=$tmp/agent.log

"$root/deploy/services.sh" up rabbitmq
svc_load_env rabbitmq

cleanup() {
    local i
    if [ -n "$agent_pid" ] && pid_alive "$agent_pid"; then
        kill -TERM "$agent_pid" 2> /dev/null || true
        for ((i = 0; i < 100; i++)); do pid_alive "$agent_pid" || break; sleep 0.1; done
        if pid_alive "$agent_pid"; then kill -KILL "$agent_pid" 2> /dev/null || true; fi
    fi
    # The agent's queue is not auto-delete: do not leave one per run on the broker.
    if [ -n "${RABBITMQCTL:-}" ]; then
        timeout 20 "$RABBITMQCTL" -q delete_queue "$queue" > /dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }
metric() { echo "METRIC $*"; }

# Agent config: the shipped example plus this machine's broker. Snapshot work must never touch
# real guests, Glance or the shared notification queues: the libvirt test driver (in-process,
# no daemon), a Glance address nothing listens on, no notifications.
cp "$root/deploy/compute-agent.conf.example" "$tmp/nova.conf"
cat > "$tmp/local.conf" << CONF
[DEFAULT]
host = $host
transport_url = $TRANSPORT_URL
state_path = $tmp/state
[libvirt]
connection_uri = test:///default
[glance]
api_servers = http://127.0.0.1:9
num_retries = 0
[oslo_messaging_notifications]
driver = noop
[oslo_messaging_rabbit]
rabbit_retry_interval = 1
rabbit_retry_backoff = 1
rabbit_interval_max = 2
CONF
# The clients' (nova's) config: same broker; no metrics thread lingering at exit.
cat > "$tmp/client.conf" << CONF
[DEFAULT]
transport_url = $TRANSPORT_URL
[oslo_messaging_metrics]
metrics_thread_stop_timeout = 1
[oslo_messaging_notifications]
driver = noop
CONF
chmod 0600 "$tmp"/*.conf
mkdir -p "$tmp/state"

novacli() { timeout 120 "$PY" "$client" "$@"; }
# jget FILE KEY: KEY of the last JSON line in FILE that has it.
jget() {
    "$PY" - "$1" "$2" << 'EOF'
import json, sys
val = None
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if sys.argv[2] in d:
        val = d[sys.argv[2]]
print('' if val is None else val)
EOF
}
received_re='INFO worker: received snapshot_instance \(rpc [0-9]+\.[0-9]+, envelope [0-9.]+\) for instance [^ ]+ image [^ ]+ vm_state [^ ]+ task_state [^ ]+ host [^ ]+ request [^ ]+$'
# n_lines PATTERN: lines of the agent log matching an extended regex.
n_lines() { grep -cE -- "$1" "$alog" 2> /dev/null || true; }
# received_for IMAGE_ID: the agent's received lines for one image id.
received_for() { grep -E -- "$received_re" "$alog" | grep -F " image $1 " || true; }
# wait_count SECS PATTERN N: until at least N log lines match.
wait_count() {
    local deadline=$((SECONDS + $1))
    while [ "$(n_lines "$2")" -lt "$3" ]; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}
agent_alive() { [ -n "$agent_pid" ] && pid_alive "$agent_pid"; }
# queue_depth: "messages unacked" of the agent's queue, as the broker sees it.
queue_depth() {
    timeout 20 "$RABBITMQCTL" -q list_queues name messages messages_unacknowledged 2> /dev/null \
        | awk -v q="$queue" '$1 == q { print $2, $3 }'
}

# ---------------------------------------------------------------------------------------------
ready_re='INFO main: ready: connected to RabbitMQ at .* consuming'
# start_agent: run the agent (log appended to $alog); true once it logs a new ready line.
start_agent() {
    local n0 t0
    n0=$(n_lines "$ready_re")
    t0=$(svc_time_ms)
    "$agent" --config-file "$tmp/nova.conf" --config-file "$tmp/local.conf" >> "$alog" 2>&1 &
    agent_pid=$!
    if wait_count 30 "$ready_re" $((n0 + 1)); then
        ok "agent ready and consuming in $(($(svc_time_ms) - t0)) ms"
    else
        bad "agent never logged 'ready: ... consuming'"
        tail -n 30 "$alog" >&2
        return 1
    fi
}
# stop_agent: SIGTERM, wait up to 15 s, expect exit status 0.
stop_agent() {
    local i rc=0
    kill -TERM "$agent_pid"
    for ((i = 0; i < 150; i++)); do pid_alive "$agent_pid" || break; sleep 0.1; done
    if pid_alive "$agent_pid"; then
        bad "agent still running 15 s after SIGTERM"
        kill -KILL "$agent_pid" 2> /dev/null || true
        return 1
    fi
    wait "$agent_pid" || rc=$?
    agent_pid=
    if [ "$rc" -eq 0 ]; then ok "agent exited 0 on SIGTERM (${i}00 ms)"; else bad "agent exit status $rc"; fi
}

log "starting agent for host $host"
: > "$alog"
if ! start_agent; then
    echo "$pass passed, $fail failed"
    exit 1
fi

# ---------------------------------------------------------------------------------------------
# a. One 6.0 cast from nova's own ComputeAPI.
uuid_a=$("$PY" -c 'import uuid; print(uuid.uuid4())')
if novacli cast --config "$tmp/client.conf" --host "$host" --instance-uuid "$uuid_a" \
    --display-name "rpc test a" > "$tmp/cast_a.out"; then
    img=$(jget "$tmp/cast_a.out" image_id)
    req=$(jget "$tmp/cast_a.out" request_id)
    sent_ver=$(jget "$tmp/cast_a.out" rpc_version)
    [ "$sent_ver" = 6.0 ] || bad "nova sent rpc version '$sent_ver', expected 6.0"
    expect="INFO worker: received snapshot_instance (rpc 6.0, envelope 2.0) for instance $uuid_a image $img vm_state active task_state image_snapshot_pending host $host request $req"
    if wait_for 10 "received line (a)" grep -qF " image $img " "$alog"; then
        line=$(received_for "$img")
        if [ "$(printf '%s\n' "$line" | grep -c .)" -eq 1 ] && [ "${line#*INFO worker: }" = "${expect#INFO worker: }" ]; then
            ok "6.0 cast received and parsed: uuid, image, rpc 6.0, envelope 2.0, vm/task state, host, request id"
        else
            bad "6.0 cast: log line differs. expected: '$expect' got: '$line'"
        fi
    else
        bad "6.0 cast (image $img) never received"
        grep -E 'worker|rpc' "$alog" | tail -n 5 >&2 || true
    fi
else
    bad "nova_client cast failed: $(cat "$tmp/cast_a.out")"
fi

# b. Pinned to 5.0: the same cast as nova sends it during an upgrade.
if novacli cast --config "$tmp/client.conf" --host "$host" --version-cap 5.0 > "$tmp/cast_b.out"; then
    img=$(jget "$tmp/cast_b.out" image_id)
    sent_ver=$(jget "$tmp/cast_b.out" rpc_version)
    [ "$sent_ver" = 5.0 ] || bad "nova pinned to 5.0 sent '$sent_ver'"
    if wait_for 10 "received line (b)" grep -qF " image $img " "$alog"; then
        line=$(received_for "$img")
        case "$line" in
            *"received snapshot_instance (rpc 5.0, envelope 2.0) for instance "*" task_state image_snapshot_pending host $host request req-"*)
                ok "5.0 cast received as rpc 5.0" ;;
            *) bad "5.0 cast: unexpected line '$line'" ;;
        esac
    else
        bad "5.0 cast (image $img) never received"
    fi
else
    bad "nova_client cast --version-cap 5.0 failed: $(cat "$tmp/cast_b.out")"
fi

# ---------------------------------------------------------------------------------------------
# c. Calls: oslo failure replies, fast. check_call NAME EXPECT_EXC EXPECT_REMOTE EXPECT_MSG ARGS...
check_call() {
    local name=$1 want_exc=$2 want_cls=$3 want_msg=$4 rc=0 exc cls msg el
    shift 4
    novacli call --config "$tmp/client.conf" --host "$host" --timeout 10 "$@" > "$tmp/call.out" || rc=$?
    exc=$(jget "$tmp/call.out" exception)
    cls=$(jget "$tmp/call.out" remote_class)
    msg=$(jget "$tmp/call.out" message)
    el=$(jget "$tmp/call.out" elapsed_s)
    if [ "$rc" -eq 3 ]; then
        bad "$name: no reply within 10 s (oslo timeout)"
    elif [ "$rc" -ne 0 ]; then
        bad "$name: client failed (rc $rc): $(tail -n 3 "$tmp/call.out")"
    elif [ "$exc" != "$want_exc" ] || [ "$cls" != "$want_cls" ] || [ "$msg" != "$want_msg" ]; then
        bad "$name: got $exc/$cls '$msg', expected $want_exc/$want_cls '$want_msg'"
    elif ! "$PY" -c "import sys; sys.exit(0 if float('$el') < 5 else 1)"; then
        bad "$name: reply took ${el}s"
    else
        ok "$name: $exc ($cls) '$msg' in ${el}s"
    fi
}
check_call "call reboot_instance (nova's view)" RemoteError NoSuchMethod \
    "Endpoint does not support RPC method reboot_instance" --method reboot_instance
check_call "call reboot_instance (oslo rebuilds it)" NoSuchMethod_Remote NoSuchMethod \
    "Endpoint does not support RPC method reboot_instance" --method reboot_instance \
    --allow-exmod oslo_messaging.rpc.dispatcher
check_call "call snapshot_instance 7.0" UnsupportedVersion_Remote UnsupportedVersion \
    "Endpoint does not support RPC version 7.0. Attempted method: snapshot_instance" \
    --method snapshot_instance --version 7.0 --snapshot-args \
    --allow-exmod oslo_messaging.rpc.dispatcher
# nova-compute 26 (Zed) serves 6.1 (ComputeManager) and 5.13 (_ComputeV5Proxy): a newer minor
# is refused by oslo's dispatcher just like a newer major.
check_call "call snapshot_instance 6.2" UnsupportedVersion_Remote UnsupportedVersion \
    "Endpoint does not support RPC version 6.2. Attempted method: snapshot_instance" \
    --method snapshot_instance --version 6.2 --snapshot-args \
    --allow-exmod oslo_messaging.rpc.dispatcher
# nova-compute's BaseRPCAPI (namespace baseapi, 1.1) answers ping with {"service", "arg"}.
rc=0
novacli call --config "$tmp/client.conf" --host "$host" --timeout 10 --namespace baseapi \
    --method ping --version 1.1 --args '{"arg": "hello"}' > "$tmp/ping.out" || rc=$?
if [ "$rc" -eq 0 ] && "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if d.get("result") == {"service": "compute", "arg": "hello"} else 1)' "$tmp/ping.out"; then
    ok "baseapi ping answered like nova-compute"
else
    bad "baseapi ping: rc $rc $(tail -n 3 "$tmp/ping.out")"
fi
if agent_alive; then ok "agent alive after calls"; else bad "agent died after calls"; fi

# ---------------------------------------------------------------------------------------------
# f. The byte-exact captured cast (only the instance host replaced), published twice.
fix_img=d2aae36f-785c-4518-8016-bc9534d9fc7f
dup0=$(n_lines duplicate)
if novacli raw --config "$tmp/client.conf" --host "$host" --kind fixture --set-host "$host" --count 2 \
    > "$tmp/raw_dup.out"; then
    if wait_for 10 "fixture received" grep -qF " image $fix_img " "$alog" \
        && wait_count 10 duplicate $((dup0 + 1)); then
        sleep 1
        n=$(received_for "$fix_img" | grep -c . || true)
        if [ "$n" -eq 1 ]; then
            ok "captured cast twice (same _unique_id): received once, '$(grep duplicate "$alog" | tail -n 1 | sed 's/^.*: //')'"
        else
            bad "captured cast twice: $n received lines"
        fi
        case "$(received_for "$fix_img")" in
            *"(rpc 6.0, envelope 2.0) for instance 178b0921-8f85-4257-88b6-2e743b5a975c image $fix_img vm_state active task_state image_snapshot_pending host $host request req-5b6c791d-5709-4f36-8fbe-c3e02869e35d")
                ok "captured cast parsed exactly" ;;
            *) bad "captured cast line: '$(received_for "$fix_img")'" ;;
        esac
    else
        bad "captured cast twice: received $(received_for "$fix_img" | grep -c . || true) times, $(($(n_lines duplicate) - dup0)) duplicate lines"
    fi
else
    bad "raw publish of the fixture failed: $(cat "$tmp/raw_dup.out")"
fi

# ---------------------------------------------------------------------------------------------
# g. Bad input straight onto the queue. bad_input NAME RAW-ARGS...
bad_input() {
    local name=$1 r0 img line
    shift
    r0=$(n_lines rejected)
    if ! novacli raw --config "$tmp/client.conf" --host "$host" --set-host "$host" "$@" > "$tmp/raw.out"; then
        bad "$name: publish failed: $(cat "$tmp/raw.out")"
        return
    fi
    img=$(jget "$tmp/raw.out" image_id)
    if wait_count 10 rejected $((r0 + 1)); then
        line=$(grep rejected "$alog" | tail -n 1)
        if [ "$(n_lines rejected)" -ne $((r0 + 1)) ]; then
            bad "$name: $(($(n_lines rejected) - r0)) rejected lines for one message"
        elif [[ "$line" =~ rejected.*[[:alpha:]]{3,}.*[[:alpha:]]{3,} ]]; then
            ok "$name rejected: ${line#*: }"
        else
            bad "$name: rejected without a reason: '$line'"
        fi
    else
        bad "$name: no 'rejected' log line"
    fi
    if [ -n "$img" ] && [ -n "$(received_for "$img")" ]; then
        bad "$name: accepted as a request"
    fi
}
bad_input "invalid JSON" --kind invalid-json
bad_input "content type text/plain" --kind valid --content-type text/plain
bad_input "5 MiB body" --kind huge
bad_input "envelope version 3.0" --kind envelope-3.0
if agent_alive; then ok "agent alive after bad input"; else bad "agent died on bad input"; tail -n 20 "$alog" >&2; fi
if novacli cast --config "$tmp/client.conf" --host "$host" > "$tmp/cast_g.out" \
    && img=$(jget "$tmp/cast_g.out" image_id) \
    && wait_for 10 "received after bad input" grep -qF " image $img " "$alog"; then
    ok "still serving: a valid cast after the bad input is received"
else
    bad "valid cast after bad input not received"
fi
depth=
for ((i = 0; i < 25; i++)); do
    depth=$(queue_depth)
    [ "$depth" = "0 0" ] && break
    sleep 0.2
done
if [ "$depth" = "0 0" ]; then
    ok "queue $queue empty (messages 0, unacked 0)"
else
    bad "queue $queue not empty: messages/unacked '$depth'"
fi

# ---------------------------------------------------------------------------------------------
# e. 1000 casts in a burst (one instance each, as 1000 users would).
burst=1000
r0=$(n_lines "$received_re")
if novacli cast --config "$tmp/client.conf" --host "$host" --count "$burst" --distinct-instances \
    > "$tmp/burst.out"; then
    grep '"image_id"' "$tmp/burst.out" | sed -E 's/.*"image_id": "([^"]+)".*/ image \1 /' > "$tmp/burst.ids"
    sender_rate=$(jget "$tmp/burst.out" casts_per_s)
    t_start=$(jget "$tmp/burst.out" t_start_unix)
    metric "casts_per_s=$sender_rate (sender, nova ComputeAPI, $burst casts in $(jget "$tmp/burst.out" elapsed_s) s)"
    wait_count 60 "$received_re" $((r0 + burst)) || true
    got=$(grep -E -- "$received_re" "$alog" | grep -F -f "$tmp/burst.ids" \
        | sed -E 's/.* image ([^ ]+) .*/\1/' | sort -u | wc -l)
    if [ "$got" -eq "$burst" ]; then
        last=$(grep -E -- "$received_re" "$alog" | grep -F -f "$tmp/burst.ids" | tail -n 1 | cut -c1-23)
        if last_s=$(date -u -d "$last" +%s.%N 2> /dev/null); then
            "$PY" -c "
s, l, n = $t_start, $last_s, $burst
print('METRIC agent_received_per_s=%.0f (last of %d logged %.3f s after the first cast was sent)' % (n / max(l - s, 1e-3), n, l - s))"
        fi
        ok "burst: all $burst casts received (distinct image ids)"
    else
        bad "burst: $got of $burst casts received"
    fi
else
    bad "burst cast failed: $(tail -n 3 "$tmp/burst.out")"
fi

# ---------------------------------------------------------------------------------------------
# e2. Backlog: 1000 casts queued while the agent is down (its queue outlives it, as
# nova-compute's does) are all consumed after a restart; measures the agent's own intake rate.
if agent_alive && stop_agent; then
    r0=$(n_lines "$received_re")
    if novacli cast --config "$tmp/client.conf" --host "$host" --count "$burst" --distinct-instances \
        > "$tmp/backlog.out"; then
        grep '"image_id"' "$tmp/backlog.out" | sed -E 's/.*"image_id": "([^"]+)".*/ image \1 /' > "$tmp/backlog.ids"
        log "queued while stopped: $(queue_depth | cut -d' ' -f1) messages on $queue"
        if start_agent; then
            t_ready=$(grep -E "$ready_re" "$alog" | tail -n 1 | cut -c1-23)
            wait_count 60 "$received_re" $((r0 + burst)) || true
            got=$(grep -E -- "$received_re" "$alog" | grep -F -f "$tmp/backlog.ids" \
                | sed -E 's/.* image ([^ ]+) .*/\1/' | sort -u | wc -l)
            if [ "$got" -eq "$burst" ]; then
                ok "backlog: all $burst casts queued while the agent was down received after restart"
                last=$(grep -E -- "$received_re" "$alog" | grep -F -f "$tmp/backlog.ids" | tail -n 1 | cut -c1-23)
                if a=$(date -u -d "$t_ready" +%s.%N 2> /dev/null) && b=$(date -u -d "$last" +%s.%N 2> /dev/null); then
                    "$PY" -c "
a, b, n = $a, $b, $burst
print('METRIC agent_backlog_per_s=%.0f (%d queued casts taken in %.3f s after ready)' % (n / max(b - a, 1e-3), n, b - a))"
                fi
            else
                bad "backlog: $got of $burst queued casts received after restart"
            fi
        fi
    else
        bad "backlog cast failed: $(tail -n 3 "$tmp/backlog.out")"
    fi
else
    bad "agent not running before the backlog test"
fi

# ---------------------------------------------------------------------------------------------
# d. Broker restart: reconnect, then 5 casts all arrive.
rc0=$(n_lines 'INFO main: reconnected')
"$root/deploy/services/rabbitmq.sh" stop
"$root/deploy/services/rabbitmq.sh" start
if wait_count 60 'INFO main: reconnected' $((rc0 + 1)); then
    ok "reconnected after broker restart"
    if novacli cast --config "$tmp/client.conf" --host "$host" --count 5 > "$tmp/cast_d.out"; then
        grep '"image_id"' "$tmp/cast_d.out" | sed -E 's/.*"image_id": "([^"]+)".*/ image \1 /' > "$tmp/d.ids"
        deadline=$((SECONDS + 15))
        while :; do
            got=$(grep -E -- "$received_re" "$alog" | grep -cF -f "$tmp/d.ids" || true)
            [ "$got" -ge 5 ] || [ "$SECONDS" -ge "$deadline" ] && break
            sleep 0.2
        done
        if [ "$got" -eq 5 ]; then ok "5 casts after the restart received"; else bad "after restart: $got of 5 received"; fi
    else
        bad "cast after restart failed: $(tail -n 3 "$tmp/cast_d.out")"
    fi
else
    bad "no 'INFO main: reconnected' line within 60 s of the broker restart"
    tail -n 10 "$alog" >&2
fi

# ---------------------------------------------------------------------------------------------
if agent_alive; then stop_agent || true; else bad "agent not running at the end"; fi
if grep -qE 'WARNING|ERROR|AddressSanitizer|runtime error' "$alog"; then
    log "warnings/errors in the agent log (not failures by themselves; ids masked):"
    grep -E 'WARNING|ERROR|AddressSanitizer|runtime error' "$alog" | cut -c25- \
        | sed -E 's/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/<uuid>/g; s/[0-9a-f]{32}/<hex>/g; s/[0-9]+/N/g' \
        | sort | uniq -c | sort -rn | head -n 10 >&2
fi
if grep -qF "$RABBIT_PASSWORD" "$alog"; then bad "broker password in the agent log"; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
