#!/usr/bin/env bash
# Integration test: the deploy/ RabbitMQ answers real AMQP as user nova.
#
# Brings the broker up with deploy/services.sh, then on a temporary queue:
#   1. amqp-publish (librabbitmq, the agent's client library) sends a unique JSON payload with
#      content_type application/json; Python's py-amqp (what oslo.messaging uses) gets it back and
#      checks body and content_type;
#   2. py-amqp publishes a second payload and amqp-consume reads it back;
#   3. a login with a wrong password is refused with ACCESS_REFUSED.
# The queue is deleted on exit. Exits 77 (skip) when a client tool is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../../deploy/lib.sh
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034  # read by log() in lib.sh
SVC=test-rabbitmq

fail() { log "FAIL: $*"; exit 1; }

"$root/deploy/services.sh" up rabbitmq

for tool in amqp-publish amqp-consume amqp-declare-queue amqp-delete-queue; do
    command -v "$tool" > /dev/null || { log "SKIP: $tool not installed"; exit 77; }
done
/usr/bin/python3 -c 'import amqp' 2> /dev/null || { log "SKIP: python3-amqp missing"; exit 77; }

svc_load_env rabbitmq
[ -n "${RABBIT_PASSWORD:-}" ] || fail "no RABBIT_PASSWORD in $(svc_dir rabbitmq)/env"
[ "$RABBIT_USER" = nova ] || fail "RABBIT_USER is '$RABBIT_USER', expected nova"
[ "$TRANSPORT_URL" = "rabbit://nova:$RABBIT_PASSWORD@$RABBIT_HOST:$RABBIT_PORT/" ] \
    || fail "TRANSPORT_URL does not match the other facts"
env_mode=$(stat -c %a "$(svc_dir rabbitmq)/env")
[ "$env_mode" = 600 ] || fail "env file holds a password but has mode $env_mode"

queue="ca-test-$$-$(date +%s%N)"
tmp=$(mktemp -d)
# The password reaches the tools through an authfile on a pipe, never through argv.
authfile() { printf 'username:%s\npassword:%s\n' "$1" "$2"; }
amqp() {
    local cmd=$1; shift
    timeout 20 "$cmd" --server="$RABBIT_HOST" --port="$RABBIT_PORT" \
        --authfile=<(authfile "$RABBIT_USER" "$RABBIT_PASSWORD") "$@"
}
cleanup() {
    amqp amqp-delete-queue -q "$queue" > /dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT

# py_amqp get|put QUEUE [BODY]: get prints "content_type<TAB>body" of one message and acks it;
# put publishes BODY as application/json, persistent, to the default exchange.
py_amqp() {
    AMQP_PASSWORD=$RABBIT_PASSWORD timeout 20 /usr/bin/python3 - "$@" <<'EOF'
import os, sys, time
import amqp

mode, queue = sys.argv[1], sys.argv[2]
conn = amqp.Connection(host="%s:%s" % (os.environ["RABBIT_HOST"], os.environ["RABBIT_PORT"]),
                       userid=os.environ["RABBIT_USER"], password=os.environ["AMQP_PASSWORD"],
                       virtual_host="/", connect_timeout=10)
conn.connect()
ch = conn.channel()
if mode == "put":
    ch.basic_publish(amqp.Message(sys.argv[3], content_type="application/json",
                                  content_encoding="utf-8", delivery_mode=2),
                     exchange="", routing_key=queue)
else:
    msg = None
    for _ in range(50):
        msg = ch.basic_get(queue=queue, no_ack=False)
        if msg is not None:
            break
        time.sleep(0.1)
    if msg is None:
        sys.exit("no message on " + queue)
    ch.basic_ack(msg.delivery_tag)
    body = msg.body.decode() if isinstance(msg.body, bytes) else msg.body
    print("%s\t%s" % (msg.properties.get("content_type"), body))
ch.close()
conn.close()
EOF
}
export RABBIT_HOST RABBIT_PORT RABBIT_USER

amqp amqp-declare-queue -q "$queue" > /dev/null || fail "declare queue $queue"

# 1. librabbitmq publishes, py-amqp consumes.
payload1="{\"test\": \"rabbitmq\", \"nonce\": \"$(od -An -tx8 -N16 /dev/urandom | tr -d ' \n')\"}"
amqp amqp-publish -r "$queue" -C application/json -b "$payload1" || fail "amqp-publish"
got=$(py_amqp get "$queue") || fail "py-amqp basic_get"
[ "${got%%$'\t'*}" = application/json ] || fail "content_type came back as '${got%%$'\t'*}'"
[ "${got#*$'\t'}" = "$payload1" ] || fail "payload mismatch: sent '$payload1' got '${got#*$'\t'}'"
log "round trip 1 (amqp-publish -> py-amqp): ok, content_type application/json"

# 2. py-amqp publishes, amqp-consume consumes (and acks) exactly one message.
payload2="{\"test\": \"rabbitmq\", \"n\": 2, \"pid\": $$, \"t\": $(date +%s%N)}"
py_amqp put "$queue" "$payload2" || fail "py-amqp publish"
amqp amqp-consume -q "$queue" -c 1 -- cat > "$tmp/consumed" || fail "amqp-consume"
[ "$(cat "$tmp/consumed")" = "$payload2" ] \
    || fail "payload mismatch: sent '$payload2' got '$(cat "$tmp/consumed")'"
log "round trip 2 (py-amqp -> amqp-consume): ok"

# 3. A wrong password must be refused by the broker, not by some local error.
if timeout 20 amqp-publish --server="$RABBIT_HOST" --port="$RABBIT_PORT" \
    --authfile=<(authfile "$RABBIT_USER" "wrong-$RABBIT_PASSWORD") \
    -r "$queue" -b x 2> "$tmp/refused"; then
    fail "login with a wrong password succeeded"
fi
grep -q ACCESS_REFUSED "$tmp/refused" || fail "wrong password: $(cat "$tmp/refused")"
log "wrong password refused: ACCESS_REFUSED"

log "PASS"
