#!/usr/bin/env bash
# SIGTERM on the real services (qcow2 test guest): the agent stops consuming at once, lets the
# running snapshot finish within [DEFAULT] graceful_shutdown_timeout and exits 0; a cast sent
# after the SIGTERM stays in RabbitMQ and is served by the next start. With a grace period too
# short for the running job, the agent still exits 0 at its end, and the next start recovers the
# job from the journal to an active, consistent image.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
SVC=test-shutdown
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

tmp=$(mktemp -d /var/tmp/ca-test-shutdown.XXXXXX)
host=shutdown-$$
agent_pid=
images=()
cleanup() {
    [ -n "$agent_pid" ] && pid_alive "$agent_pid" && kill -KILL "$agent_pid" 2>/dev/null
    for i in "${images[@]}"; do curl -s -X DELETE "$GLANCE_URL/v2/images/$i" > /dev/null || true; done
    [ -n "${RABBITMQCTL:-}" ] && { $RABBITMQCTL delete_queue "compute.$host" > /dev/null 2>&1 || true; }
    rm -rf "$tmp"
}
trap cleanup EXIT

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }

printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$tmp/oslo.conf"

start_agent() { # start_agent NAME GRACE_S [ENV...]
    local name=$1 grace=$2; shift 2
    mkdir -p "$tmp/scratch"
    {
        printf '[DEFAULT]\nhost = %s\nstate_path = %s/state\ntransport_url = %s\n' "$host" "$tmp" "$TRANSPORT_URL"
        printf 'graceful_shutdown_timeout = %s\n' "$grace"
        printf '[libvirt]\nconnection_uri = %s\nsnapshots_directory = %s/scratch\n' "$LIBVIRT_URI" "$tmp"
        printf '[glance]\napi_servers = %s\n' "$GLANCE_URL"
        printf '[oslo_messaging_notifications]\ndriver = noop\n'
    } > "$tmp/$name.conf"
    agent_log=$tmp/$name.log
    env "$@" "$agent" --config-file "$tmp/$name.conf" > "$agent_log" 2>&1 &
    agent_pid=$!
    wait_for 30 "agent ready" grep -q 'ready: connected to RabbitMQ' "$agent_log" \
        || { bad "agent $name not ready: $(tail -3 "$agent_log")"; return 1; }
}

create_image() {
    curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
        \"name\": \"$1\", \"container_format\": \"bare\", \"disk_format\": \"qcow2\",
        \"instance_uuid\": \"$GUEST_UUID\", \"image_type\": \"snapshot\",
        \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
image_status() { curl -sf "$GLANCE_URL/v2/images/$1" | $py -c 'import json,sys; print(json.load(sys.stdin)["status"])'; }
cast() {
    $py "$client" cast --config "$tmp/oslo.conf" --host "$host" --instance-uuid "$GUEST_UUID" \
        --image-id "$1" --quiet > "$tmp/cast.out" 2>&1 || { bad "cast failed: $(cat "$tmp/cast.out")"; return 1; }
}
queued() { $RABBITMQCTL list_queues name messages 2>/dev/null | awk -v q="compute.$host" '$1 == q {print $2}'; }
verify() { # verify IMG: active and consistent
    local out
    [ "$(image_status "$1")" = active ] || { bad "image $1 is $(image_status "$1")"; return; }
    curl -sf "$GLANCE_URL/v2/images/$1/file" -o "$tmp/img.qcow2"
    out=$("$check" -f qcow2 "$tmp/img.qcow2" 2>&1) && ok "image $1 active and consistent: $out" \
        || bad "checker: $out"
    rm -f "$tmp/img.qcow2"
}

# 1. Grace long enough: the running job finishes, a later cast waits for the next start.
start_agent graceful 60 CA_TEST_UPLOAD_PAUSE_MS=5000
img1=$(create_image shutdown-1); images+=("$img1")
img2=$(create_image shutdown-2); images+=("$img2")
cast "$img1"
wait_for 120 "upload paused" grep -q 'test: upload paused' "$agent_log" || bad "upload never paused"
t0=$(date +%s%3N)
kill -TERM "$agent_pid"
wait_for 10 "consumers cancelled" grep -q 'stopped consuming' "$agent_log" && ok "stopped consuming at SIGTERM" \
    || bad "no 'stopped consuming': $(tail -3 "$agent_log")"
cast "$img2"
rc=0; wait "$agent_pid" || rc=$?; agent_pid=
t1=$(date +%s%3N)
[ "$rc" -eq 0 ] && ok "exit status 0 after $((t1 - t0)) ms" || bad "exit status $rc"
grep -q "snapshot to image $img1 done" "$agent_log" && ok "running job finished within the grace period" \
    || bad "job 1: $(grep "$img1" "$agent_log" | tail -2)"
grep -q "$img2" "$agent_log" && bad "the cast sent after SIGTERM reached the stopping agent" \
    || ok "the cast sent after SIGTERM was not taken"
verify "$img1"
[ "$(queued)" = 1 ] && ok "that cast waits in compute.$host" || bad "compute.$host holds '$(queued)' messages"
start_agent next 60
wait_for 180 "job 2" grep -qE "snapshot to image $img2 (done|failed)" "$agent_log" || true
grep -q "snapshot to image $img2 done" "$agent_log" && ok "the next start served it" \
    || bad "job 2: $(grep "$img2" "$agent_log" | tail -2)"
verify "$img2"
kill -TERM "$agent_pid"; rc=0; wait "$agent_pid" || rc=$?; agent_pid=
[ "$rc" -eq 0 ] && ok "idle agent exits 0" || bad "idle agent exit status $rc"

# 2. Grace too short: exit 0 at its end, the job is recovered by the next start.
start_agent short 1 CA_TEST_UPLOAD_PAUSE_MS=30000
img3=$(create_image shutdown-3); images+=("$img3")
cast "$img3"
wait_for 120 "upload paused" grep -q 'test: upload paused' "$agent_log" || bad "upload never paused"
t0=$(date +%s%3N)
kill -TERM "$agent_pid"
rc=0; wait "$agent_pid" || rc=$?; agent_pid=
t1=$(date +%s%3N)
[ "$rc" -eq 0 ] && ok "exit status 0 after $((t1 - t0)) ms with a job still running" || bad "exit status $rc"
[ $((t1 - t0)) -lt 10000 ] && ok "grace period respected" || bad "took $((t1 - t0)) ms for a 1 s grace"
grep -q 'still running after graceful_shutdown_timeout' "$agent_log" && ok "logged the job left to the journal" \
    || bad "no log of the job left: $(tail -3 "$agent_log")"
t0=$(date +%s%3N)
start_agent recover 60
wait_for 180 "job 3 recovered" grep -qE "snapshot to image $img3 (done|failed)" "$agent_log" || true
t1=$(date +%s%3N)
grep -q "recovering job snap-$img3" "$agent_log" && ok "job recovered from the journal" \
    || bad "no recovery: $(grep -i journal "$agent_log" | tail -3)"
grep -q "snapshot to image $img3 done" "$agent_log" && ok "recovered job done in $((t1 - t0)) ms" \
    || bad "job 3: $(grep "$img3" "$agent_log" | tail -2)"
verify "$img3"
[ -z "$(find "$tmp/scratch" -mindepth 1)" ] && ok "no scratch file left" || bad "scratch: $(ls "$tmp/scratch")"
kill -TERM "$agent_pid"; rc=0; wait "$agent_pid" || rc=$?; agent_pid=
[ "$rc" -eq 0 ] || bad "exit status $rc"

log "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
