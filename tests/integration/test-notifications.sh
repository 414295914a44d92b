#!/usr/bin/env bash
# The agent's notifications on a real RabbitMQ, read by real oslo.messaging NotificationListeners
# and deserialized with nova's own versioned-notification classes (tests/integration/
# nova_client.py listen). ca-notify publishes what the agent builds for the captured cast through
# the agent's rpc thread (publisher confirms). Checks: the event types, publisher ids and
# priorities per notification_format; versioned payloads deserialize and round-trip in nova; the
# default queue per topic is declared (nothing is lost before a consumer exists); driver = noop
# publishes nothing; a publish started while the broker is down completes once it is back.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
SVC=test-notifications
build=${CA_BUILD_DIR:-$root/build/debug}
tool=$build/ca-notify
[ -x "$tool" ] || { echo "no $tool (build first)"; exit 77; }
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py
cast=$root/tests/fixtures/nova/wire-rabbitmq/snapshot_instance_cast.json

tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do pid_alive "$p" && kill "$p" 2>/dev/null || true; done
    [ -n "${RABBITMQCTL:-}" ] && $RABBITMQCTL delete_queue "ca-test-$$.info" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

"$root/deploy/services.sh" up rabbitmq
svc_load_env rabbitmq

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }

agent_conf() { # agent_conf FILE FORMAT DRIVER TOPICS
    cat > "$1" <<CONF
[DEFAULT]
host = notif-$$
transport_url = $TRANSPORT_URL
[oslo_messaging_notifications]
driver = $3
topics = $4
[notifications]
notification_format = $2
notify_on_state_change = vm_and_task_state
CONF
}
printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$tmp/oslo.conf"

listen() { # listen OUT COUNT TIMEOUT: start a listener in the background, wait until subscribed
    rm -f "$tmp/ready"
    $py "$client" listen --config "$tmp/oslo.conf" --pool "ca-test-pool-$$" --count "$2" \
        --timeout "$3" --out "$1" --ready-file "$tmp/ready" > "$1.log" 2>&1 &
    pids+=($!)
    wait_for 30 "listener ready" test -e "$tmp/ready"
}

# 1. Both formats: 4 legacy + 4 versioned, all as nova would send them.
agent_conf "$tmp/both.conf" both messagingv2 notifications
listen "$tmp/both.jsonl" 8 30
out=$("$tool" --config-file "$tmp/both.conf" --cast "$cast") && ok "$out" || bad "ca-notify failed: $out"
wait "${pids[-1]}" && ok "listener got 8 notifications" || bad "listener incomplete: $(tail -2 "$tmp/both.jsonl.log")"
check=$($py - "$tmp/both.jsonl" "notif-$$" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
host = sys.argv[2]
want = {
    'compute.instance.snapshot.start': ('compute.' + host, 'INFO', None),
    'compute.instance.update': ('compute.' + host, 'INFO', None),
    'compute.instance.snapshot.end': ('compute.' + host, 'INFO', None),
    'snapshot_instance': ('compute.' + host, 'ERROR', None),
    'instance.snapshot.start': ('nova-compute:' + host, 'INFO', 'InstanceActionSnapshotPayload'),
    'instance.snapshot.end': ('nova-compute:' + host, 'INFO', 'InstanceActionSnapshotPayload'),
    'instance.update': ('nova-compute:' + host, 'INFO', 'InstanceUpdatePayload'),
    'compute.exception': ('nova-compute:' + host, 'ERROR', 'ExceptionPayload'),
}
errors = []
got = {r['event_type']: r for r in recs}
if sorted(got) != sorted(want):
    errors.append('event types %s' % sorted(got))
for ev, (pub, prio, cls) in want.items():
    r = got.get(ev)
    if not r:
        continue
    if r['publisher_id'] != pub:
        errors.append('%s publisher %s' % (ev, r['publisher_id']))
    if r['priority'].upper() != prio:
        errors.append('%s priority %s' % (ev, r['priority']))
    if r['ctxt'].get('auth_token') is not None:
        errors.append('%s carries an auth token' % ev)
    if cls:
        v = r.get('versioned') or {}
        if not (v.get('deserialized') and v.get('roundtrip_equal') and v.get('class') == cls
                and not v.get('unknown_fields')):
            errors.append('%s does not deserialize as %s: %s' % (ev, cls, v))
    if ev == 'instance.snapshot.end' and r['payload']['nova_object.data'].get(
            'snapshot_image_id') != 'd2aae36f-785c-4518-8016-bc9534d9fc7f':
        errors.append('snapshot_image_id missing')
print('; '.join(errors) if errors else 'OK')
PY
)
[ "$check" = OK ] && ok "payloads, publishers, priorities, nova deserialization" || bad "$check"

# 2. unversioned (nova's default format): the 4 legacy only.
agent_conf "$tmp/legacy.conf" unversioned messagingv2 notifications
listen "$tmp/legacy.jsonl" 5 6
out=$("$tool" --config-file "$tmp/legacy.conf" --cast "$cast") && ok "$out" || bad "ca-notify failed: $out"
wait "${pids[-1]}" || true
n=$(wc -l < "$tmp/legacy.jsonl")
nv=$(grep -c '"nova_object.name"' "$tmp/legacy.jsonl" || true)
[ "$n" -eq 4 ] && [ "$nv" -eq 0 ] && ok "unversioned: 4 legacy, no versioned" || bad "unversioned: $n received, $nv versioned"

# 3. driver = noop: nothing on the bus.
agent_conf "$tmp/noop.conf" both noop notifications
out=$("$tool" --config-file "$tmp/noop.conf" --cast "$cast")
[ "$out" = "published 0 notifications, confirmed in 0 ms" ] || grep -q "^published 0 notifications" <<<"$out" \
    && ok "noop driver publishes nothing" || bad "noop: $out"

# 4. Nobody listening: the default queue <topic>.<priority> holds them (oslo's notifier does this).
agent_conf "$tmp/topic.conf" unversioned messagingv2 "ca-test-$$"
out=$("$tool" --config-file "$tmp/topic.conf" --cast "$cast" --events start,end) || bad "ca-notify: $out"
q=$($RABBITMQCTL list_queues name messages 2>/dev/null | awk -v q="ca-test-$$.info" '$1 == q {print $2}')
[ "$q" = 2 ] && ok "default queue ca-test-$$.info holds the 2 notifications" || bad "default queue has '$q'"

# 5. Broker down when publishing starts: the publish waits, reconnects, is confirmed.
"$root/deploy/services/rabbitmq.sh" stop
"$tool" --config-file "$tmp/topic.conf" --cast "$cast" --events start > "$tmp/late.out" 2>&1 &
late=$!
pids+=($late)
sleep 2
pid_alive "$late" && ok "publisher waits while the broker is down" || bad "publisher gave up: $(cat "$tmp/late.out")"
"$root/deploy/services/rabbitmq.sh" start
rc=0; wait "$late" || rc=$?
[ "$rc" -eq 0 ] && ok "confirmed after the broker came back: $(cat "$tmp/late.out")" || bad "late publish rc $rc: $(cat "$tmp/late.out")"
q=$($RABBITMQCTL list_queues name messages 2>/dev/null | awk -v q="ca-test-$$.info" '$1 == q {print $2}')
[ "${q:-0}" -ge 1 ] && ok "the late notification reached its queue" || bad "late notification lost ($q)"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
