#!/usr/bin/env bash
# The main job, end to end on this machine: install, build, bring up RabbitMQ, Ceph, libvirt with
# the test guest, and Glance on loopback, start the agent with a config written from the example,
# and show what is running. Services stay up afterwards for a look; `deploy/services.sh down` stops
# them. The snapshot itself (a real snapshot_instance cast) joins this script with the RPC and
# snapshot issues.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/deploy/lib.sh"
SVC=demo

"$root/deploy/install-packages.sh" all
cmake -S "$root" --preset release > /dev/null
cmake --build "$root/build/release" -j"$(nproc)"
agent=$root/build/release/compute-agent

"$root/deploy/services.sh" up --all
svc_load_env rabbitmq
svc_load_env libvirt
svc_load_env glance
svc_load_env ceph

demo_dir=$CA_DEPLOY_DIR/demo
mkdir -p "$demo_dir"
cat > "$demo_dir/local.conf" <<CONF
[DEFAULT]
host = demo-compute
state_path = $demo_dir/state
transport_url = $TRANSPORT_URL
[glance]
api_servers = $GLANCE_URL
CONF
chmod 600 "$demo_dir/local.conf"

svc_stop_pid demo agent
svc_spawn demo agent "$demo_dir/agent.log" "$agent" \
    --config-file "$root/deploy/compute-agent.conf.example" --config-file "$demo_dir/local.conf"
wait_for 30 "agent ready" grep -q 'ready: connected to RabbitMQ' "$demo_dir/agent.log" \
    || { cat "$demo_dir/agent.log"; die "agent did not become ready"; }

echo
echo "== agent ($("$agent" --version | head -1), pid $(svc_pid demo agent), log $demo_dir/agent.log)"
cat "$demo_dir/agent.log"
echo
echo "== services"
"$root/deploy/services.sh" status
echo
echo "== test guest (instance $GUEST_UUID)"
virsh -c "$LIBVIRT_URI" dominfo "$GUEST_NAME" | grep -E 'Name|UUID|State'
virsh -c "$LIBVIRT_URI" qemu-agent-command "$GUEST_NAME" '{"execute":"guest-ping"}'
echo
echo "== Glance images at $GLANCE_URL"
curl -sf "$GLANCE_URL/v2/images" | /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d["images"]), "images"); [print(" ", i["id"], i["status"], i.get("size")) for i in d["images"]]'
echo
echo "Stop the agent: kill $(svc_pid demo agent); stop the services: $root/deploy/services.sh down"
