#!/usr/bin/env bash
# Integration test: ca-imgcheck (tests/tools/imgcheck.c) against the live test guest.
#
# With the guest running and writing, takes a consistent image (virsh suspend, qemu-img convert
# -U of the overlay, which reads through the base, virsh resume) and checks it: must pass, and
# its highest sequence must be at least the last heartbeat seen before the suspend. Then, in
# copies: one flipped byte in a written ring block must fail; one corrupted base-pattern block
# must fail; one ring slot taken from an earlier image (a snapshot mixing two moments) must
# fail. The checker is $CA_BUILD_DIR/tests/tools/ca-imgcheck, or built here with gcc.
# Exit 0 pass, 1 fail, 77 skip (not root).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
. "$repo/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=test-checker

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok - $*"; }

[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root (qemu:///system)" >&2; exit 77; }

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/ca-test-checker.XXXXXX")
suspended=0
cleanup() {
    if [ "$suspended" = 1 ]; then
        virsh -q -c "$LIBVIRT_URI" resume "$GUEST_UUID" > /dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

if [ -n "${CA_BUILD_DIR:-}" ]; then
    imgcheck=$CA_BUILD_DIR/tests/tools/ca-imgcheck
    [ -x "$imgcheck" ] || fail "$imgcheck not built (CA_BUILD_DIR=$CA_BUILD_DIR)"
else
    imgcheck=$tmp/ca-imgcheck
    gcc -std=gnu11 -O2 -Wall -Wextra -Wshadow -Wformat=2 -Werror -o "$imgcheck" \
        "$repo/tests/tools/imgcheck.c" || fail "building ca-imgcheck failed"
fi

"$repo/deploy/services.sh" up libvirt || fail "deploy/services.sh up libvirt failed"
svc_load_env libvirt
vsh() { timeout 60 virsh -q -c "$LIBVIRT_URI" "$@"; }
last_hb_seq() {
    tail -c 8192 "$GUEST_CONSOLE_LOG" | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' |
        tail -1 | cut -d= -f2
}

# snapshot OUT: a consistent raw image of the running guest's disk; sets pause_ms.
snapshot() {
    local t0 t1
    t0=$(svc_time_ms)
    vsh suspend "$GUEST_UUID" > /dev/null || fail "virsh suspend failed"
    suspended=1
    # -U: QEMU still holds the image lock while paused; nothing writes it until resume.
    qemu-img convert -U -f qcow2 -O raw "$GUEST_DISK" "$1" || fail "qemu-img convert failed"
    vsh resume "$GUEST_UUID" > /dev/null || fail "virsh resume failed"
    suspended=0
    t1=$(svc_time_ms)
    pause_ms=$((t1 - t0))
}
# flip_byte FILE OFFSET: invert one byte in place.
flip_byte() {
    local b
    b=$(od -An -tu1 -j "$2" -N1 "$1" | tr -d ' ')
    # shellcheck disable=SC2059 # the format is the octal escape of the new byte
    printf "\\$(printf '%03o' $((b ^ 0xff)))" |
        dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
# expect_fail IMAGE PATTERN WHAT: the checker must exit 1 and name the damage.
expect_fail() {
    local out rc=0
    out=$("$imgcheck" "$1") || rc=$?
    [ "$rc" -eq 1 ] || fail "$3: ca-imgcheck exited $rc, expected 1: $out"
    printf '%s\n' "$out" | grep -Eq -- "$2" || fail "$3: report does not mention '$2': $out"
    pass "$3 detected: $(printf '%s\n' "$out" | head -1)"
}

[ "$(vsh domstate "$GUEST_UUID")" = running ] || fail "guest not running"
before=$(last_hb_seq)
[ -n "$before" ] || fail "no writer heartbeat in $GUEST_CONSOLE_LOG"

# 1. A consistent image passes, and holds at least what the guest reported before the pause.
snapshot "$tmp/a.raw"
out=$("$imgcheck" -m "$before" "$tmp/a.raw") || fail "consistent image rejected: $out"
highest_a=$(printf '%s\n' "$out" | sed -n 's/.*highest_seq=\([0-9]*\).*/\1/p')
[ "${highest_a:-0}" -gt 0 ] || fail "no writes in the image: $out"
pass "consistent image accepted (paused ${pause_ms} ms): $out"

# 2. A flipped data byte in a written ring block fails.
# (awk reads to the end: exiting early would SIGPIPE the checker under pipefail)
slot=$("$imgcheck" -v "$tmp/a.raw" | awk '/^ring slot [0-9]+: seq/ && $5 > 0 { n++ }
                                        n == 100 && !done { s = $3; sub(":", "", s); print s;
                                                            done = 1 }')
[ -n "$slot" ] || fail "could not find a written ring slot"
cp --sparse=always "$tmp/a.raw" "$tmp/bad-ring.raw"
flip_byte "$tmp/bad-ring.raw" $((LAYOUT_RING_OFFSET + slot * LAYOUT_BLOCK_SIZE + 1000))
expect_fail "$tmp/bad-ring.raw" "ring slot $slot " "flipped byte in ring slot $slot"
rm -f "$tmp/bad-ring.raw"

# 3. A corrupted base-pattern block fails (the pattern lives only in the backing file).
cp --sparse=always "$tmp/a.raw" "$tmp/bad-base.raw"
flip_byte "$tmp/bad-base.raw" $((LAYOUT_BASE_OFFSET + 7 * LAYOUT_BLOCK_SIZE + 123))
expect_fail "$tmp/bad-base.raw" "base block 7 " "corrupted base block 7"
rm -f "$tmp/bad-base.raw"

# 4. Mixing two moments fails: image B with one slot taken from the older image A, for a slot
#    B rewrote after A (not B's newest write: losing only that looks like an earlier moment).
s=$(last_hb_seq)
deadline=$((SECONDS + 20))
until [ "$(last_hb_seq)" -gt $((highest_a + 50)) ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "writer did not advance past $((highest_a + 50))"
    sleep 0.2
done
snapshot "$tmp/b.raw"
out=$("$imgcheck" -m "$((highest_a + 50))" "$tmp/b.raw") || fail "second image rejected: $out"
highest_b=$(printf '%s\n' "$out" | sed -n 's/.*highest_seq=\([0-9]*\).*/\1/p')
pass "second image accepted (paused ${pause_ms} ms), highest_seq $highest_b (heartbeat was $s)"
slot=$("$imgcheck" -v "$tmp/b.raw" |
       awk -v lo="$highest_a" -v hi="$highest_b" \
           '/^ring slot [0-9]+: seq/ && !done { s = $3; sub(":", "", s);
                                       if ($5 > lo && $5 < hi - 1) { print s; done = 1 } }')
[ -n "$slot" ] || fail "no slot rewritten between the two images"
dd if="$tmp/a.raw" of="$tmp/b.raw" bs="$LAYOUT_BLOCK_SIZE" count=1 conv=notrunc status=none \
    skip=$((LAYOUT_RING_OFFSET / LAYOUT_BLOCK_SIZE + slot)) \
    seek=$((LAYOUT_RING_OFFSET / LAYOUT_BLOCK_SIZE + slot))
# (stale if A held an older write there, never-written if A predates the writer's first lap)
expect_fail "$tmp/b.raw" "ring slot $slot .*(stale|never-written)" "slot $slot from an older image"

# 5. -f qcow2 reads a qcow2 image itself.
qemu-img convert -f raw -O qcow2 "$tmp/a.raw" "$tmp/a.qcow2"
out=$("$imgcheck" -f qcow2 "$tmp/a.qcow2") || fail "-f qcow2 rejected a good image: $out"
pass "-f qcow2: $out"

s=$(last_hb_seq)
deadline=$((SECONDS + 10))
until [ "$(last_hb_seq)" -gt "$s" ]; do
    [ "$SECONDS" -lt "$deadline" ] || fail "writer not running after the snapshots"
    sleep 0.2
done
echo "PASS: test-checker"
