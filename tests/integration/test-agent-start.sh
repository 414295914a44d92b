#!/usr/bin/env bash
# The agent against the real RabbitMQ from deploy/: it starts from the example config, fails over
# past a dead broker to the live one, logs that it is ready, shows up on the broker with its
# connection name, never logs the password, survives a broker restart (reconnects), keeps
# retrying (without exiting) on a wrong password, and exits 0 promptly on SIGTERM in every state.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
. "$root/deploy/lib.sh"
SVC=test-agent-start

agent=${CA_AGENT:-$root/build/debug/compute-agent}
[ -x "$agent" ] || { echo "no agent binary at $agent (set CA_AGENT)"; exit 77; }

tmp=$(mktemp -d)
agent_pid=
cleanup() {
    if [ -n "$agent_pid" ] && pid_alive "$agent_pid"; then kill -KILL "$agent_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

"$root/deploy/services.sh" up rabbitmq
svc_load_env rabbitmq

pass=0 fail=0
ok() { pass=$((pass + 1)); log "ok: $*"; }
bad() { fail=$((fail + 1)); log "FAIL: $*"; }

# Config = the shipped example + this machine's broker, with a dead broker listed first.
dead_port=1
cp "$root/deploy/compute-agent.conf.example" "$tmp/nova.conf"
cat > "$tmp/local.conf" <<CONF
[DEFAULT]
host = agent-test-$$
state_path = $tmp/state
transport_url = rabbit://nova:x@127.0.0.1:$dead_port,${TRANSPORT_URL#rabbit://}
[oslo_messaging_rabbit]
heartbeat_timeout_threshold = 10
rabbit_retry_interval = 1
rabbit_retry_backoff = 1
rabbit_interval_max = 2
CONF

start_agent() { # start_agent LOGFILE CONFIG...
    local logf=$1; shift
    local args=()
    for c in "$@"; do args+=(--config-file "$c"); done
    "$agent" "${args[@]}" > "$logf" 2>&1 &
    agent_pid=$!
}

stop_agent() { # stop_agent LOGFILE: SIGTERM, wait <= 10 s, expect exit status 0
    local logf=$1 rc i
    kill -TERM "$agent_pid"
    for ((i = 0; i < 100; i++)); do pid_alive "$agent_pid" || break; sleep 0.1; done
    if pid_alive "$agent_pid"; then
        bad "agent still running 10 s after SIGTERM"
        kill -KILL "$agent_pid"
    fi
    rc=0; wait "$agent_pid" || rc=$?
    agent_pid=
    [ "$rc" -eq 0 ] && ok "exit status 0 after SIGTERM (${i}00 ms)" || bad "exit status $rc after SIGTERM"
    grep -q 'INFO main: stopped' "$logf" && ok "logged stop" || bad "no stop line in log"
}

# 1. Failover to the live broker, ready line, visible on the broker.
t0=$(svc_time_ms)
start_agent "$tmp/agent.log" "$tmp/nova.conf" "$tmp/local.conf"
if wait_for 30 "agent ready" grep -q 'INFO main: ready: connected to RabbitMQ at nova@127.0.0.1:5672' "$tmp/agent.log"; then
    ok "ready in $(( $(svc_time_ms) - t0 )) ms after failing over past 127.0.0.1:$dead_port"
else
    bad "agent never logged ready"; cat "$tmp/agent.log"
fi
if wait_for 10 "connection on broker" sh -c "$RABBITMQCTL list_connections client_properties 2>/dev/null | grep -q 'compute-agent:agent-test-$$'"; then
    ok "broker lists connection compute-agent:agent-test-$$"
else
    bad "broker does not list the agent's connection"
fi
rss=$(svc_rss_kb "$agent_pid")
log "agent RSS idle: ${rss} KiB"

# 2. Broker restart: the agent notices and reconnects by itself.
"$root/deploy/services/rabbitmq.sh" stop
wait_for 30 "lost line" grep -q 'WARNING main: lost RabbitMQ connection' "$tmp/agent.log" \
    && ok "noticed broker stop" || bad "no 'lost' line after broker stop"
pid_alive "$agent_pid" && ok "agent survives broker outage" || bad "agent exited with the broker down"
"$root/deploy/services/rabbitmq.sh" start
if wait_for 60 "reconnect" grep -q 'INFO main: reconnected to RabbitMQ at nova@127.0.0.1:5672' "$tmp/agent.log"; then
    ok "reconnected after broker restart"
else
    bad "no reconnect after broker restart"; tail -20 "$tmp/agent.log"
fi
stop_agent "$tmp/agent.log"
if grep -qF "$RABBIT_PASSWORD" "$tmp/agent.log"; then bad "password in the log"; else ok "password never logged"; fi

# 3. Wrong password: a clear error, keeps retrying, SIGTERM during the backoff still exits 0.
cat > "$tmp/badpw.conf" <<CONF
[DEFAULT]
host = agent-test-badpw
transport_url = rabbit://nova:definitely-wrong-pw@127.0.0.1:5672/
[oslo_messaging_rabbit]
rabbit_retry_interval = 1
rabbit_retry_backoff = 1
rabbit_interval_max = 2
CONF
start_agent "$tmp/badpw.log" "$tmp/badpw.conf"
wait_for 20 "refusal" grep -q 'ERROR main: no RabbitMQ broker reachable (last: amqp login on nova@127.0.0.1:5672: broker refused: 403 ACCESS_REFUSED' "$tmp/badpw.log" \
    && ok "wrong password reported" || { bad "wrong password not reported"; cat "$tmp/badpw.log"; }
sleep 2
pid_alive "$agent_pid" && ok "keeps retrying with a wrong password" || bad "exited on a wrong password"
stop_agent "$tmp/badpw.log"
grep -q 'definitely-wrong-pw' "$tmp/badpw.log" && bad "wrong password logged" || ok "wrong password not logged"

# 4. A queue declared differently by "the deployment" (durable, while this config says not): the
#    broker refuses our declaration with 406, and the log says which options to align.
/usr/bin/python3 - "$RABBIT_PASSWORD" <<'PY'
import sys, amqp
c = amqp.Connection(host='127.0.0.1:5672', userid='nova', password=sys.argv[1], virtual_host='/')
c.connect()
c.channel().queue_declare('compute.agent-test-406', durable=True, auto_delete=False)
c.close()
PY
cat > "$tmp/406.conf" <<CONF
[DEFAULT]
host = agent-test-406
transport_url = $TRANSPORT_URL
[oslo_messaging_rabbit]
rabbit_retry_interval = 1
rabbit_retry_backoff = 1
rabbit_interval_max = 2
CONF
start_agent "$tmp/406.log" "$tmp/406.conf"
if wait_for 20 "406" grep -q "406 PRECONDITION_FAILED.*amqp_durable_queues, amqp_auto_delete, rabbit_quorum_queue and rabbit_ha_queues must match the deployment" "$tmp/406.log"; then
    ok "inequivalent declaration explained (406)"
else
    bad "no clear 406 message"; tail -3 "$tmp/406.log"
fi
stop_agent "$tmp/406.log"
$RABBITMQCTL delete_queue compute.agent-test-406 > /dev/null 2>&1 || true

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
