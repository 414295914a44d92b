#!/usr/bin/env bash
# RPC benchmark on the real RabbitMQ from deploy/: how fast the agent accepts casts and how long a
# cast takes from the sender's publish to the agent handing it to the worker, plus the agent's
# RSS. The casts come from python3-nova's own ComputeAPI (tests/integration/nova_client.py). The
# jobs they start fail fast on purpose (test:///default, no Glance): this measures the RPC layer.
#
#   bench/rpc-bench.sh [BUILD_DIR]     (default build/release; built if missing)
#
# Prints a small table. Numbers depend on the machine; the sender (Python) is usually the limit
# for the burst rate, so the backlog rate (casts queued while the agent was down, then drained) is
# the agent's own intake rate.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/deploy/lib.sh"
SVC=rpc-bench
build=${1:-$root/build/release}
if [ ! -x "$build/compute-agent" ]; then
    cmake -S "$root" --preset release > /dev/null && cmake --build "$root/build/release" -j"$(nproc)" --target compute-agent > /dev/null
    build=$root/build/release
fi
py=/usr/bin/python3
client=$root/tests/integration/nova_client.py
"$root/deploy/services.sh" up rabbitmq > /dev/null
svc_load_env rabbitmq

tmp=$(mktemp -d)
host=bench-$$
agent_pid=
trap '[ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null; $RABBITMQCTL delete_queue "compute.$host" >/dev/null 2>&1; rm -rf "$tmp"' EXIT
cat > "$tmp/agent.conf" <<CONF
[DEFAULT]
host = $host
transport_url = $TRANSPORT_URL
state_path = $tmp
max_concurrent_snapshots = 0
[libvirt]
connection_uri = test:///default
[glance]
api_servers = http://127.0.0.1:9
num_retries = 0
[oslo_messaging_notifications]
driver = noop
CONF
printf '[DEFAULT]\ntransport_url = %s\n[oslo_messaging_metrics]\nmetrics_thread_stop_timeout = 1\n' "$TRANSPORT_URL" > "$tmp/oslo.conf"

start() { "$build/compute-agent" --config-file "$tmp/agent.conf" > "$tmp/agent.log" 2>&1 & agent_pid=$!;
          wait_for 30 ready grep -q 'ready: connected' "$tmp/agent.log"; }
start
sleep 1
rss_idle=$(svc_rss_kb "$agent_pid")

# Latency: 300 casts, 20 ms apart (the agent is idle between them).
$py "$client" cast --config "$tmp/oslo.conf" --host "$host" --count 300 --interval-ms 20 > "$tmp/lat.jsonl"
sleep 2
lat=$($py - "$tmp/lat.jsonl" "$tmp/agent.log" <<'PY'
import json, re, sys, datetime
sent = {}
for l in open(sys.argv[1]):
    d = json.loads(l)
    if 'image_id' in d:
        sent[d['image_id']] = d['t_unix']
lat = []
rx = re.compile(r'^(\S+ \S+) INFO worker: received snapshot_instance .* image (\S+) ')
for l in open(sys.argv[2]):
    m = rx.match(l)
    if m and m.group(2) in sent:
        t = datetime.datetime.strptime(m.group(1), '%Y-%m-%d %H:%M:%S.%f').replace(
            tzinfo=datetime.timezone.utc).timestamp()
        lat.append((t - sent[m.group(2)]) * 1000)
lat.sort()
n = len(lat)
print('%d %.1f %.1f %.1f' % (n, lat[n // 2], lat[min(n - 1, int(n * 0.99))], lat[-1]))
PY
)
read -r n p50 p99 pmax <<<"$lat"

# Burst: 1000 casts as fast as the sender goes.
$py "$client" cast --config "$tmp/oslo.conf" --host "$host" --count 1000 --quiet > "$tmp/burst.json"
burst=$($py -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["casts_per_s"])' "$tmp/burst.json")
wait_for 120 "burst received" sh -c "[ \$(grep -c 'received snapshot_instance' '$tmp/agent.log') -ge 1300 ]"
rss_busy=$(svc_rss_kb "$agent_pid")

# Backlog: 2000 casts queued while the agent is down, then drained.
kill -TERM "$agent_pid"; wait "$agent_pid" || true; agent_pid=
$py "$client" cast --config "$tmp/oslo.conf" --host "$host" --count 2000 --quiet > /dev/null
t0=$(svc_time_ms)
start
wait_for 120 "backlog drained" sh -c "[ \$(grep -c 'received snapshot_instance' '$tmp/agent.log') -ge 2000 ]"
t1=$(svc_time_ms)
backlog_rate=$(( 2000 * 1000 / (t1 - t0) ))
rss_after=$(svc_rss_kb "$agent_pid")

cat <<TABLE
| measure | value |
|---|---|
| cast → worker latency, p50 / p99 / max ($n casts, 20 ms apart) | $p50 / $p99 / $pmax ms |
| burst: casts/s sent by nova's ComputeAPI (all received) | $burst |
| backlog: casts/s taken by the agent (2000 queued, incl. connect) | $backlog_rate |
| agent RSS idle / after 1300 casts / after a 2000-cast backlog | $rss_idle / $rss_busy / $rss_after KiB |
TABLE
