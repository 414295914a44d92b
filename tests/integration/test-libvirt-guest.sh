#!/usr/bin/env bash
# Integration test: the libvirt service and its test guest (deploy/services/libvirt.sh).
#
# Brings the service up (idempotent: reuses a running guest), then asserts: the guest domain is
# running, qemu-ga answers guest-ping, the in-guest writer is writing (its heartbeat sequence on
# the serial console advances), and fsfreeze/thaw work through libvirt with at least one
# filesystem frozen (with none, libvirt skips the thaw). Exit 0 pass, 1 fail, 77 skip (not root:
# the system libvirtd needs it).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
. "$repo/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=test-libvirt-guest

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok - $*"; }

[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root (qemu:///system)" >&2; exit 77; }

frozen=0
cleanup() {
    if [ "$frozen" = 1 ]; then
        virsh -q -c "$LIBVIRT_URI" domfsthaw "$GUEST_UUID" > /dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

"$repo/deploy/services.sh" up libvirt || fail "deploy/services.sh up libvirt failed"
svc_load_env libvirt
for k in LIBVIRT_URI GUEST_NAME GUEST_UUID GUEST_DOMTYPE GUEST_DISK GUEST_BASE GUEST_CONSOLE_LOG; do
    [ -n "${!k:-}" ] || fail "env key $k missing from $(svc_dir libvirt)/env"
done
vsh() { timeout 60 virsh -q -c "$LIBVIRT_URI" "$@"; }
last_hb_seq() {
    tail -c 8192 "$GUEST_CONSOLE_LOG" | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' |
        tail -1 | cut -d= -f2
}
# wait_hb_beyond SEQ SECONDS: the newest heartbeat passes SEQ within SECONDS.
wait_hb_beyond() {
    local seq=$1 deadline=$((SECONDS + $2)) s
    while [ "$SECONDS" -le "$deadline" ]; do
        s=$(last_hb_seq)
        [ -n "$s" ] && [ "$s" -gt "$seq" ] && return 0
        sleep 0.2
    done
    return 1
}

# 1. The domain is the fixed-UUID instance, running, with the disk the env names.
state=$(vsh domstate "$GUEST_UUID") || fail "no domain with UUID $GUEST_UUID"
[ "$state" = running ] || fail "guest is '$state', expected running"
[ "$(vsh domname "$GUEST_UUID")" = "$GUEST_NAME" ] || fail "domain name is not $GUEST_NAME"
vsh domblklist "$GUEST_UUID" | grep -q "$GUEST_DISK" ||
    fail "domain disk is not $GUEST_DISK: $(vsh domblklist "$GUEST_UUID")"
qemu-img info -U "$GUEST_DISK" | grep -q "backing file: $GUEST_BASE" ||
    fail "$GUEST_DISK is not an overlay of $GUEST_BASE"
pass "domain $GUEST_NAME ($GUEST_UUID, $GUEST_DOMTYPE) running on $GUEST_DISK"

# 2. qemu-ga answers.
reply=$(vsh qemu-agent-command --timeout 10 "$GUEST_UUID" '{"execute":"guest-ping"}') ||
    fail "qemu-ga guest-ping failed"
[ "$reply" = '{"return":{}}' ] || fail "unexpected guest-ping reply: $reply"
pass "qemu-ga answers guest-ping"

# 3. The writer is writing: two reads of the console show an advancing heartbeat sequence.
s1=$(last_hb_seq)
[ -n "$s1" ] || fail "no writer heartbeat (CA-HB) in $GUEST_CONSOLE_LOG"
wait_hb_beyond "$s1" 10 || fail "writer heartbeat stuck at seq $s1 for 10 s"
s2=$(last_hb_seq)
pass "writer heartbeat advances ($s1 -> $s2)"

# 4. fsfreeze/thaw through libvirt, with at least one filesystem really frozen.
# (no -q: virsh -q drops the "Froze N filesystem(s)" line)
out=$(timeout 60 virsh -c "$LIBVIRT_URI" domfsfreeze "$GUEST_UUID") || fail "domfsfreeze failed"
frozen=1
n=$(printf '%s\n' "$out" | sed -n 's/^Froze \([0-9]*\) filesystem.*/\1/p')
[ -n "$n" ] && [ "$n" -ge 1 ] || fail "domfsfreeze froze no filesystem: '$out'"
st=$(vsh qemu-agent-command "$GUEST_UUID" '{"execute":"guest-fsfreeze-status"}')
[ "$st" = '{"return":"frozen"}' ] || fail "fsfreeze status after freeze: $st"
out=$(timeout 60 virsh -c "$LIBVIRT_URI" domfsthaw "$GUEST_UUID") || fail "domfsthaw failed"
frozen=0
printf '%s\n' "$out" | grep -q '^Thawed [1-9]' || fail "domfsthaw thawed nothing: '$out'"
st=$(vsh qemu-agent-command "$GUEST_UUID" '{"execute":"guest-fsfreeze-status"}')
[ "$st" = '{"return":"thawed"}' ] || fail "fsfreeze status after thaw: $st"
s3=$(last_hb_seq)
wait_hb_beyond "$s3" 10 || fail "writer stopped after freeze/thaw (seq $s3)"
pass "fsfreeze froze $n filesystem(s), thaw thawed them, writer still running"

echo "PASS: test-libvirt-guest"
