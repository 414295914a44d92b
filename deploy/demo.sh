#!/usr/bin/env bash
# The main job, end to end on this machine: install, build, bring up RabbitMQ, Ceph, libvirt with
# the test guest, and Glance on loopback, start the agent, create the snapshot image in Glance the
# way nova-api does, cast snapshot_instance with python3-nova's own ComputeAPI, then show the
# task-state walk and notifications an oslo listener received, the active image, and prove it:
# the consistency checker passes on the downloaded image. Services stay up afterwards;
# `deploy/services.sh down` stops them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/deploy/lib.sh"
SVC=demo
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py

"$root/deploy/install-packages.sh" all
cmake -S "$root" --preset release > /dev/null
cmake --build "$root/build/release" -j"$(nproc)" --target compute-agent ca-imgcheck
agent=$root/build/release/compute-agent
check=$root/build/release/tests/tools/ca-imgcheck

"$root/deploy/services.sh" up --all
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance

demo_dir=$CA_DEPLOY_DIR/demo
mkdir -p "$demo_dir/scratch"
umask 077
cat > "$demo_dir/local.conf" <<CONF
[DEFAULT]
host = demo-compute
state_path = $demo_dir/state
transport_url = $TRANSPORT_URL
[libvirt]
connection_uri = $LIBVIRT_URI
snapshots_directory = $demo_dir/scratch
[glance]
api_servers = $GLANCE_URL
[oslo_messaging_notifications]
driver = messagingv2
[notifications]
notification_format = both
notify_on_state_change = vm_and_task_state
CONF
printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' \
    "$TRANSPORT_URL" > "$demo_dir/oslo.conf"

svc_stop_pid demo agent
svc_spawn demo agent "$demo_dir/agent.log" "$agent" \
    --config-file "$root/deploy/compute-agent.conf.example" --config-file "$demo_dir/local.conf"
wait_for 30 "agent ready" grep -q 'ready: connected to RabbitMQ' "$demo_dir/agent.log" \
    || { cat "$demo_dir/agent.log"; die "agent did not become ready"; }

# An oslo notification listener, as an operator's consumer would run.
rm -f "$demo_dir/notifications.jsonl" "$demo_dir/listener.ready"
$py "$client" listen --config "$demo_dir/oslo.conf" --pool demo-listener --count 12 --timeout 300 \
    --out "$demo_dir/notifications.jsonl" --ready-file "$demo_dir/listener.ready" \
    > "$demo_dir/listener.log" 2>&1 &
listener=$!
wait_for 30 "listener" test -e "$demo_dir/listener.ready"

# nova-api's part: create the image record, then cast to the compute host.
image=$(curl -sf -X POST "$GLANCE_URL/v2/images" -H 'Content-Type: application/json' -d "{
    \"name\": \"demo-snapshot-$(date +%H%M%S)\", \"container_format\": \"bare\",
    \"disk_format\": \"qcow2\", \"instance_uuid\": \"$GUEST_UUID\", \"image_type\": \"snapshot\",
    \"visibility\": \"private\"}" | $py -c 'import json,sys; print(json.load(sys.stdin)["id"])')
min_seq=$(grep -a -o 'CA-HB seq=[0-9]*' "$GUEST_CONSOLE_LOG" | tail -1 | cut -d= -f2)
echo "== cast snapshot_instance for instance $GUEST_UUID → image $image (guest writer at seq $min_seq)"
$py "$client" cast --config "$demo_dir/oslo.conf" --host demo-compute --instance-uuid "$GUEST_UUID" \
    --image-id "$image" --sysmeta image_hw_qemu_guest_agent=yes --quiet

wait_for 600 "snapshot" grep -qE "snapshot to image $image (done|failed|refused)" "$demo_dir/agent.log" \
    || die "no result in $demo_dir/agent.log"
wait "$listener" || true

echo
echo "== agent log"
grep -E "instance $GUEST_UUID|received" "$demo_dir/agent.log" | sed 's/^/  /'
echo
echo "== notifications received by an oslo listener"
$py - "$demo_dir/notifications.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    if not r['publisher_id'].endswith(':demo-compute') and r['publisher_id'] != 'compute.demo-compute':
        continue  # another agent on the same bus
    p = r['payload']
    extra = ''
    if r['event_type'] == 'compute.instance.update':
        extra = '%s -> %s' % (p.get('old_task_state'), p.get('new_task_state'))
    v = r.get('versioned')
    if v:
        extra += ' (%s %s, nova deserializes it: %s)' % (v.get('class'), v.get('version'), v.get('deserialized'))
    print('  %-36s %-26s %s' % (r['event_type'], r['publisher_id'], extra))
PY
echo
echo "== image $image in Glance"
curl -sf "$GLANCE_URL/v2/images/$image" | $py -c '
import json, sys
d = json.load(sys.stdin)
for k in ("status", "disk_format", "size", "checksum", "os_hash_algo", "image_location",
          "compute_agent_snapshot_path", "compute_agent_consistency", "compute_agent_freeze_window_ms",
          "compute_agent_allocated_bytes"):
    print("  %-32s %s" % (k, d.get(k)))
print("  %-32s %s..." % ("os_hash_value", (d.get("os_hash_value") or "")[:32]))'
echo
echo "== proof: download it and check it"
curl -sf "$GLANCE_URL/v2/images/$image/file" -o "$demo_dir/image.qcow2"
qemu-img check "$demo_dir/image.qcow2" | sed 's/^/  /'
"$check" -f qcow2 -m "$min_seq" "$demo_dir/image.qcow2" | sed 's/^/  /'
rm -f "$demo_dir/image.qcow2"
echo
echo "Agent pid $(svc_pid demo agent) (log $demo_dir/agent.log): stop it with kill $(svc_pid demo agent);"
echo "stop the services with $root/deploy/services.sh down"
