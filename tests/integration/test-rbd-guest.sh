#!/usr/bin/env bash
# Integration test: the rbd-backed test guest (deploy/services/rbd-guest.sh), nova's
# `images_type = rbd` layout: root disk vms/<uuid>_disk read by QEMU through librbd as client.nova.
#
# Brings the service up (idempotent: reuses a running guest; starts ceph and libvirt if needed),
# then checks: the domain runs on the rbd network disk with cephx auth through the libvirt
# secret, the image is format 2; qemu-ga answers; the writer's heartbeat advances; fsfreeze/thaw
# work. Then a crash-consistent point of the running guest: `rbd snap create` with the guest
# writing, `rbd export` of the snapshot, ca-imgcheck must accept it (holding every write the
# guest had completed before the snapshot, and none it could not have started); the snapshot is
# removed (also by the EXIT trap on failure).
#
# Prints "N passed, N failed". Exit 0 pass, 1 fail, 77 skip (not root).
# Env: CA_BUILD_DIR (ca-imgcheck from $CA_BUILD_DIR/tests/tools; built here with gcc if unset).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=SCRIPTDIR/../../deploy/lib.sh
. "$repo/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=test-rbd-guest

[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root (qemu:///system, ceph daemons)" >&2; exit 77; }

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok - $*"; }
bad() { failed=$((failed + 1)); echo "not ok - $*"; }
summary() { echo "$passed passed, $failed failed"; }
# fatal: a failure the rest cannot run without.
fatal() { bad "$*"; exit 1; }

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/ca-test-rbd-guest.XXXXXX")
snap=ca-test-rbd-guest-$$
snap_made=0
frozen=0
CEPH_CONF=
RBD_GUEST_UUID=
cleanup() {
    local rc=$?
    if [ "$frozen" = 1 ]; then
        virsh -q -c qemu:///system domfsthaw "$RBD_GUEST_UUID" > /dev/null 2>&1 || true
    fi
    if [ "$snap_made" = 1 ] && [ -n "$CEPH_CONF" ]; then
        timeout 60 rbd --conf "$CEPH_CONF" --id nova snap rm "$RBD_GUEST_DISK@$snap" \
            > /dev/null 2>&1 || echo "warning: could not remove $RBD_GUEST_DISK@$snap" >&2
    fi
    rm -rf "$tmp"
    summary
    [ "$rc" -eq 0 ] && [ "$failed" -gt 0 ] && rc=1
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${CA_BUILD_DIR:-}" ]; then
    imgcheck=$CA_BUILD_DIR/tests/tools/ca-imgcheck
    [ -x "$imgcheck" ] || fatal "$imgcheck not built (CA_BUILD_DIR=$CA_BUILD_DIR)"
else
    imgcheck=$tmp/ca-imgcheck
    gcc -std=gnu11 -O2 -Wall -Wextra -Wshadow -Wformat=2 -Werror -o "$imgcheck" \
        "$repo/tests/tools/imgcheck.c" || fatal "building ca-imgcheck failed"
fi

t0=$(svc_time_ms)
"$repo/deploy/services.sh" up rbd-guest || fatal "deploy/services.sh up rbd-guest failed"
pass "deploy/services.sh up rbd-guest ($(( $(svc_time_ms) - t0 )) ms)"

svc_load_env ceph
svc_load_env rbd-guest
for k in LIBVIRT_URI CEPH_CONF RBD_GUEST_NAME RBD_GUEST_UUID RBD_GUEST_DISK RBD_GUEST_POOL \
         RBD_GUEST_IMAGE RBD_GUEST_CONSOLE_LOG RBD_SECRET_UUID RBD_GUEST_MON_HOST \
         LAYOUT_RING_OFFSET; do
    [ -n "${!k:-}" ] || fatal "env key $k missing from $(svc_dir rbd-guest)/env"
done
[ "$RBD_GUEST_DISK" = "vms/${RBD_GUEST_UUID}_disk" ] ||
    fatal "RBD_GUEST_DISK is '$RBD_GUEST_DISK', not nova's vms/<uuid>_disk"
pass "env facts present (disk $RBD_GUEST_DISK)"

vsh() { timeout 60 virsh -q -c "$LIBVIRT_URI" "$@"; }
rbd_nova() { timeout 300 rbd --conf "$CEPH_CONF" --id nova "$@"; }
last_hb_seq() {
    tail -c 8192 "$RBD_GUEST_CONSOLE_LOG" | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' |
        tail -1 | cut -d= -f2
}
# wait_hb_beyond SEQ SECONDS: the newest heartbeat passes SEQ within SECONDS.
wait_hb_beyond() {
    local seq=$1 deadline=$((SECONDS + $2)) s
    while [ "$SECONDS" -le "$deadline" ]; do
        s=$(last_hb_seq)
        [ -n "$s" ] && [ "$s" -gt "$seq" ] && return 0
        sleep 0.1
    done
    return 1
}

# 1. The domain: running, the rbd network disk with cephx through our secret.
state=$(vsh domstate "$RBD_GUEST_UUID") || fatal "no domain with UUID $RBD_GUEST_UUID"
[ "$state" = running ] || fatal "guest is '$state', expected running"
[ "$(vsh domname "$RBD_GUEST_UUID")" = "$RBD_GUEST_NAME" ] || bad "domain name is not $RBD_GUEST_NAME"
xml=$(vsh dumpxml "$RBD_GUEST_UUID")
if grep -q "<source protocol='rbd' name='$RBD_GUEST_DISK'" <<< "$xml" &&
   grep -q "<auth username='nova'>" <<< "$xml" &&
   grep -q "<secret type='ceph' uuid='$RBD_SECRET_UUID'/>" <<< "$xml" &&
   grep -q "<driver name='qemu' type='raw' cache='writeback' discard='unmap'/>" <<< "$xml"; then
    pass "domain $RBD_GUEST_NAME runs on rbd:$RBD_GUEST_DISK (cephx user nova, secret $RBD_SECRET_UUID)"
else
    bad "domain disk is not the rbd network disk: $(grep -A12 "<disk " <<< "$xml" | head -14)"
fi
if vsh secret-dumpxml "$RBD_SECRET_UUID" 2> /dev/null | grep -q "<usage type='ceph'>"; then
    pass "libvirt secret $RBD_SECRET_UUID (usage ceph) defined"
else
    bad "no ceph-usage libvirt secret $RBD_SECRET_UUID"
fi
info=$(rbd_nova info "$RBD_GUEST_DISK") || fatal "rbd info $RBD_GUEST_DISK failed as client.nova"
if grep -q 'format: 2' <<< "$info" && grep -q 'exclusive-lock' <<< "$info"; then
    pass "$RBD_GUEST_DISK is format 2 with default features ($(sed -n 's/^[[:space:]]*features: //p' <<< "$info"))"
else
    bad "unexpected image info: $info"
fi

# 2. qemu-ga answers.
reply=$(vsh qemu-agent-command --timeout 10 "$RBD_GUEST_UUID" '{"execute":"guest-ping"}' || true)
if [ "$reply" = '{"return":{}}' ]; then pass "qemu-ga answers guest-ping"
else bad "qemu-ga guest-ping: '$reply'"; fi

# 3. The writer is writing.
s1=$(last_hb_seq)
[ -n "$s1" ] || fatal "no writer heartbeat (CA-HB) in $RBD_GUEST_CONSOLE_LOG"
wait_hb_beyond "$s1" 10 || fatal "writer heartbeat stuck at seq $s1 for 10 s"
pass "writer heartbeat advances ($s1 -> $(last_hb_seq))"

# 4. fsfreeze/thaw through libvirt (no -q: it would drop the "Froze N" line).
if out=$(timeout 60 virsh -c "$LIBVIRT_URI" domfsfreeze "$RBD_GUEST_UUID"); then
    frozen=1
    n=$(printf '%s\n' "$out" | sed -n 's/^Froze \([0-9]*\) filesystem.*/\1/p')
    st=$(vsh qemu-agent-command "$RBD_GUEST_UUID" '{"execute":"guest-fsfreeze-status"}' || true)
    out2=$(timeout 60 virsh -c "$LIBVIRT_URI" domfsthaw "$RBD_GUEST_UUID") && frozen=0
    st2=$(vsh qemu-agent-command "$RBD_GUEST_UUID" '{"execute":"guest-fsfreeze-status"}' || true)
    if [ "${n:-0}" -ge 1 ] && [ "$st" = '{"return":"frozen"}' ] && [ "$frozen" = 0 ] &&
       grep -q '^Thawed [1-9]' <<< "$out2" && [ "$st2" = '{"return":"thawed"}' ]; then
        pass "fsfreeze froze $n filesystem(s), thaw thawed them"
    else
        bad "fsfreeze/thaw: freeze '$out' status '$st', thaw '${out2:-}' status '$st2'"
    fi
else
    bad "domfsfreeze failed: $out"
fi
s=$(last_hb_seq)
wait_hb_beyond "$s" 10 || fatal "writer stopped after freeze/thaw (seq $s)"

# 5. A crash-consistent point of the running guest: rbd snap create while it writes. Every write
#    completed before (heartbeat 'before') must be in it; at most the one write in flight when
#    the snapshot was cut may be beyond what a heartbeat printed after it reports ('after').
before=$(last_hb_seq)
t0=$(svc_time_ms)
rbd_nova snap create --no-progress "$RBD_GUEST_DISK@$snap" > /dev/null || fatal "rbd snap create failed"
snap_made=1
snap_ms=$(( $(svc_time_ms) - t0 ))
s=$(last_hb_seq)
wait_hb_beyond "$s" 10 || fatal "writer stopped after rbd snap create (seq $s)"
after=$(last_hb_seq)
pass "rbd snap create $RBD_GUEST_DISK@$snap with the guest writing (${snap_ms} ms," \
     "heartbeats $before .. $after)"

t0=$(svc_time_ms)
rbd_nova export --no-progress "$RBD_GUEST_DISK@$snap" - > "$tmp/snap.raw" ||
    fatal "rbd export of the snapshot failed"
size=$(stat -c %s "$tmp/snap.raw")
pass "rbd export $RBD_GUEST_DISK@$snap -> $((size / 1048576)) MiB in $(( $(svc_time_ms) - t0 )) ms"

if out=$("$imgcheck" -m "$before" -M "$((after + 1))" "$tmp/snap.raw"); then
    pass "ca-imgcheck accepts the snapshot: $out"
else
    bad "ca-imgcheck rejects the snapshot (heartbeats $before .. $after): $out"
fi
rm -f "$tmp/snap.raw"

if rbd_nova snap rm --no-progress "$RBD_GUEST_DISK@$snap" > /dev/null 2>&1; then
    snap_made=0
fi
if [ "$snap_made" = 0 ] &&
   ! rbd_nova snap ls "$RBD_GUEST_DISK" 2> /dev/null | grep -qw "$snap"; then
    pass "snapshot $snap removed"
else
    bad "snapshot $snap still there"
fi

s=$(last_hb_seq)
wait_hb_beyond "$s" 10 || fatal "writer not running at the end (seq $s)"
pass "guest still writing at the end (seq $(last_hb_seq))"
[ "$failed" -eq 0 ] || exit 1
