#!/usr/bin/env bash
# Integration test: the qcow2 disk backend (backends/qcow2.c) on the real test guest, driven by
# $CA_BUILD_DIR/tests/tools/view-check (open_view, read the view into a raw file, close_view).
#
# Cases: live backup-pull view of the running guest without and with quiesce; a paused guest
# (stays paused); a shut-off guest (cold path, then the guest is started again); managed save
# (--no-live: downtime reported, guest running and writing again; a paused guest comes back
# paused); quiesce required while the
# guest agent hangs (qemu-ga SIGSTOPped for a few seconds through guest-exec: the snapshot must
# fail cleanly and the late freeze must not leave the guest frozen) and quiesce try in the same
# situation (snapshot goes on, the skipped freeze reported); the block-copy fallback (forced with
# CA_TEST_FORCE_BLOCKCOPY=1, debug builds only); and a crashed agent (view abandoned without
# close_view) whose leftovers cleanup_job removes: a backup job, and a managed-saved guest.
#
# A managed save + restore restarts QEMU, which reopens the console log with append='off': the
# boot marker deploy/services.sh waits for is gone and a later 'up' would time out. So the
# managed-save cases run last and the guest is rebooted after them (also from the EXIT trap),
# and a guest found in that state at the start is rebooted first.
#
# Every image must pass ca-imgcheck with -m = the last heartbeat seen before the view was opened.
# After every case: no file of the job in the scratch dir, no domain job, no block job, the
# guest's filesystem thawed, the guest in the expected state and (running) its writer advancing.
# Exit 0 pass, 1 fail, 77 skip (not root, tools not built).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
. "$repo/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=test-qcow2-view

[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root (qemu:///system)" >&2; exit 77; }
build=${CA_BUILD_DIR:-$repo/build/debug}
viewcheck=$build/tests/tools/view-check
imgcheck=$build/tests/tools/ca-imgcheck
for t in "$viewcheck" "$imgcheck"; do
    [ -x "$t" ] || { echo "SKIP: $t not built (CA_BUILD_DIR=$build)" >&2; exit 77; }
done

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/ca-test-qcow2-view.XXXXXX")
scratch=$tmp/scratch
passed=0
failed=0
# What the cleanup must undo if a case dies halfway.
suspended=0
stopped=0
agent_stopped=0
saved=0
cleanup() {
    local s
    if [ -n "${GUEST_UUID:-}" ]; then
        s=$(virsh -q -c "$LIBVIRT_URI" domstate "$GUEST_UUID" 2> /dev/null | head -1 || true)
        if [ "$s" = "shut off" ] &&
           { [ "$stopped" = 1 ] || ls "$scratch"/*.managedsave > /dev/null 2>&1; }; then
            virsh -q -c "$LIBVIRT_URI" start "$GUEST_UUID" > /dev/null 2>&1 || true
        fi
        if [ "$suspended" = 1 ]; then
            virsh -q -c "$LIBVIRT_URI" resume "$GUEST_UUID" > /dev/null 2>&1 || true
        fi
        if [ "$agent_stopped" = 1 ]; then
            sleep 8 # the guest-exec'd shell sends SIGCONT itself
        fi
        virsh -q -c "$LIBVIRT_URI" domjobabort "$GUEST_UUID" > /dev/null 2>&1 || true
        virsh -q -c "$LIBVIRT_URI" domfsthaw "$GUEST_UUID" > /dev/null 2>&1 || true
        if [ "$saved" = 1 ]; then
            reboot_guest > /dev/null 2>&1 || true
        fi
    fi
    rm -rf "$tmp"
}
# reboot_guest: a fresh boot through deploy/ (console log restarted with its boot marker).
reboot_guest() {
    virsh -q -c "$LIBVIRT_URI" destroy "$GUEST_UUID" > /dev/null 2>&1 || true
    "$repo/deploy/services.sh" up libvirt > "$tmp/up.log" 2>&1 || { tail -5 "$tmp/up.log"; return 1; }
    saved=0
}
trap cleanup EXIT

svc_load_env libvirt
if [ -n "${GUEST_CONSOLE_LOG:-}" ] &&
   [ "$(timeout 10 virsh -q -c "$LIBVIRT_URI" domstate "$GUEST_UUID" 2> /dev/null | head -1)" = running ] &&
   ! grep -qa CA-GUEST-READY "$GUEST_CONSOLE_LOG"; then
    echo "# guest runs without its boot marker (restored from a save): rebooting it"
    virsh -q -c "$LIBVIRT_URI" destroy "$GUEST_UUID" > /dev/null 2>&1 || true
fi
"$repo/deploy/services.sh" up libvirt > "$tmp/up.log" 2>&1 ||
    { cat "$tmp/up.log" >&2; echo "FAIL: deploy/services.sh up libvirt failed" >&2; exit 1; }
svc_load_env libvirt
mkdir -p "$scratch"

vsh() { timeout 60 virsh -q -c "$LIBVIRT_URI" "$@"; }
dom_state() { vsh domstate "$GUEST_UUID" | head -1; }
last_hb_seq() {
    tail -c 8192 "$GUEST_CONSOLE_LOG" 2> /dev/null | tr -d '\r' | grep -a -o 'CA-HB seq=[0-9]*' |
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
agent_ping() {
    vsh qemu-agent-command --timeout 3 "$GUEST_UUID" '{"execute":"guest-ping"}' > /dev/null 2>&1
}
# jget KEY: a scalar from the flat JSON line in $out (strings without their quotes).
jget() {
    printf '%s\n' "$out" | tail -1 | sed -n "s/.*\"$1\":\(\"[^\"]*\"\|[^,}]*\).*/\1/p" |
        sed 's/^"\(.*\)"$/\1/'
}
# view ARGS...: run view-check on the guest; output in $out, exit status in $rc.
view() {
    rc=0
    out=$("$viewcheck" --uri "$LIBVIRT_URI" --uuid "$GUEST_UUID" --scratch "$scratch" "$@" \
          2> "$tmp/view.err") || rc=$?
}
# check_image MIN_SEQ: the raw view is one consistent moment holding at least MIN_SEQ, and the
# base pattern (only in the backing file) is there.
check_image() {
    local r
    r=$("$imgcheck" -m "$1" "$tmp/view.raw" 2>&1) || { echo "ca-imgcheck: $r"; return 1; }
    printf '%s\n' "$r" | grep -Eq "base_blocks=$((LAYOUT_BASE_LEN / LAYOUT_BLOCK_SIZE))( |$)" ||
        { echo "base pattern missing: $r"; return 1; }
    img_seq=$(printf '%s\n' "$r" | sed -n 's/.*highest_seq=\([0-9]*\).*/\1/p')
}
# invariants STATE: nothing left behind, guest in STATE (running: writer advancing).
invariants() {
    local want=$1 left st s
    left=$(ls -A "$scratch")
    [ -z "$left" ] || { echo "left in the scratch dir: $left"; return 1; }
    s=$(dom_state)
    [ "$s" = "$want" ] || { echo "guest is '$s', expected '$want'"; return 1; }
    [ "$want" = "shut off" ] && return 0
    st=$(vsh domjobinfo "$GUEST_UUID" | sed -n 's/^Job type: *//p' | tr -d ' ')
    [ "$st" = None ] || { echo "domain job still there: '$st'"; return 1; }
    # (not -q: quiet virsh drops the "No current block job" line)
    st=$(timeout 60 virsh -c "$LIBVIRT_URI" blockjob "$GUEST_UUID" "$GUEST_DISK_DEV" --info 2>&1)
    printf '%s\n' "$st" | grep -q "No current block job" ||
        { echo "block job on $GUEST_DISK_DEV still there: $st"; return 1; }
    [ "$want" = running ] || return 0
    st=$(vsh qemu-agent-command --timeout 10 "$GUEST_UUID" '{"execute":"guest-fsfreeze-status"}')
    [ "$st" = '{"return":"thawed"}' ] || { echo "fsfreeze status: $st"; return 1; }
    s=$(last_hb_seq)
    wait_hb_beyond "${s:-0}" 15 || { echo "writer heartbeat stuck at ${s:-none}"; return 1; }
}
# run_case NAME FUNCTION: one case; its function prints the reason and returns 1 on failure.
run_case() {
    local why r=0
    rm -f "$tmp/view.raw"
    # In this shell (not a subshell): the cleanup flags a case sets must reach the EXIT trap.
    "$2" > "$tmp/why" 2>&1 || r=$?
    why=$(cat "$tmp/why")
    if [ "$r" -eq 0 ]; then
        passed=$((passed + 1))
        echo "ok - $1${why:+: $why}"
    else
        failed=$((failed + 1))
        echo "not ok - $1: $why"
        if [ -s "$tmp/view.err" ]; then
            sed 's/^/    stderr: /' "$tmp/view.err" | tail -5
        fi
        recover
    fi
    return 0
}
# recover: after a failed case, bring the guest back to running and writing for the next one.
recover() {
    local s
    [ "$agent_stopped" = 1 ] && { agent_back || true; }
    if [ "$suspended" = 1 ] || [ "$(dom_state)" = paused ]; then
        vsh resume "$GUEST_UUID" > /dev/null 2>&1 || true
        suspended=0
    fi
    s=$(dom_state || true)
    if [ "$s" != running ]; then
        vsh start "$GUEST_UUID" > /dev/null 2>&1 || true
        stopped=0
    fi
    rm -f "$scratch"/*
    wait_running || echo "    (guest did not recover)"
}
# expect_ok PATH: view-check succeeded and took PATH.
expect_ok() {
    [ "$rc" -eq 0 ] || { echo "view-check exited $rc: $out"; return 1; }
    [ "$(jget path)" = "$1" ] || { echo "path '$(jget path)', expected '$1': $out"; return 1; }
}
summary() {
    echo "path=$(jget path) open=$(jget open_ms)ms setup=$(jget setup_ms)ms map=$(jget map_ms)ms" \
         "freeze=$(jget freeze_window_ms)ms downtime=$(jget downtime_ms)ms" \
         "alloc=$(jget allocated_bytes)/$(jget virtual_size) extents=$(jget extents)" \
         "read=$(jget read_mib_s)MiB/s close=$(jget close_ms)ms image_seq=${img_seq:-?}"
}

wait_running() {
    local deadline=$((SECONDS + 60)) s
    until s=$(last_hb_seq); [ "$(dom_state)" = running ] && agent_ping &&
          wait_hb_beyond "${s:-0}" 5; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

case_live() {
    local before
    before=$(last_hb_seq)
    view --out "$tmp/view.raw"
    expect_ok backup-pull || return 1
    check_image "$before" || return 1
    [ "$(jget allocated_bytes)" -lt "$(jget virtual_size)" ] ||
        { echo "allocated $(jget allocated_bytes) not below virtual $(jget virtual_size)"; return 1; }
    [ "$(jget frozen)" = false ] || { echo "frozen with quiesce none"; return 1; }
    invariants running || return 1
    summary
}

case_quiesce_required() {
    local before
    before=$(last_hb_seq)
    view --quiesce required --out "$tmp/view.raw"
    expect_ok backup-pull || return 1
    if ! { [ "$(jget frozen)" = true ] && [ "$(jget frozen_count)" -ge 1 ]; }; then
        echo "not frozen: $out"
        return 1
    fi
    if ! { [ "$(jget freeze_window_ms)" -ge 0 ] && [ "$(jget freeze_window_ms)" -lt 2000 ]; }; then
        echo "freeze window $(jget freeze_window_ms) ms"
        return 1
    fi
    check_image "$before" || return 1
    invariants running || return 1
    summary
}

case_paused() {
    local before
    before=$(last_hb_seq)
    vsh suspend "$GUEST_UUID" > /dev/null || { echo "suspend failed"; return 1; }
    suspended=1
    view --out "$tmp/view.raw"
    expect_ok backup-pull || return 1
    check_image "$before" || return 1
    invariants paused || return 1
    vsh resume "$GUEST_UUID" > /dev/null || { echo "resume failed"; return 1; }
    suspended=0
    invariants running || return 1
    summary
}

case_shutoff() {
    local before
    vsh destroy "$GUEST_UUID" > /dev/null || { echo "destroy failed"; return 1; }
    stopped=1
    before=$(last_hb_seq)
    view --quiesce required --out "$tmp/view.raw"
    expect_ok cold || return 1
    check_image "$before" || return 1
    invariants "shut off" || return 1
    local s
    s=$(summary)
    "$repo/deploy/services.sh" up libvirt > "$tmp/up.log" 2>&1 ||
        { tail -5 "$tmp/up.log"; echo "guest did not come back"; return 1; }
    stopped=0
    invariants running || return 1
    echo "$s"
}

case_managedsave() {
    local before
    before=$(last_hb_seq)
    saved=1
    view --no-live --out "$tmp/view.raw"
    expect_ok managedsave || return 1
    [ "$(jget downtime_ms)" -gt 0 ] || { echo "no downtime reported: $out"; return 1; }
    check_image "$before" || return 1
    invariants running || return 1
    summary
}

case_managedsave_paused() {
    local before
    before=$(last_hb_seq)
    vsh suspend "$GUEST_UUID" > /dev/null || { echo "suspend failed"; return 1; }
    suspended=1
    saved=1
    view --no-live --out "$tmp/view.raw"
    expect_ok managedsave || return 1
    check_image "$before" || return 1
    invariants paused || return 1
    vsh resume "$GUEST_UUID" > /dev/null || { echo "resume failed"; return 1; }
    suspended=0
    invariants running || return 1
    echo "restored paused; $(summary)"
}

# stop_agent SECONDS: SIGSTOP qemu-ga inside the guest; a guest-exec'd shell resumes it later.
stop_agent() {
    vsh qemu-agent-command "$GUEST_UUID" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"p=\$(pidof qemu-ga); kill -STOP \$p; sleep $1; kill -CONT \$p\"]}}" \
        > /dev/null || return 1
    agent_stopped=1
    sleep 0.5
}
agent_back() {
    local deadline=$((SECONDS + 30))
    until agent_ping; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
    agent_stopped=0
}

case_agent_hang_required() {
    local t0 t1
    stop_agent 6 || { echo "guest-exec failed"; return 1; }
    t0=$SECONDS
    view --quiesce required --agent-timeout 2 --out "$tmp/view.raw"
    t1=$SECONDS
    [ "$rc" -eq 1 ] || { echo "view-check exited $rc, expected a failure: $out"; return 1; }
    if ! { printf '%s\n' "$out" | grep -q '"stage":"open_view"' &&
           printf '%s\n' "$out" | grep -qi 'agent'; }; then
        echo "error does not name the agent: $out"
        return 1
    fi
    [ $((t1 - t0)) -le 40 ] || { echo "took $((t1 - t0)) s"; return 1; }
    [ ! -e "$tmp/view.raw" ] || { echo "an image was written"; return 1; }
    agent_back || { echo "agent did not come back"; return 1; }
    invariants running || return 1
    echo "failed cleanly in $((t1 - t0)) s: $(jget error)"
}

case_agent_hang_try() {
    local before t0 t1
    stop_agent 6 || { echo "guest-exec failed"; return 1; }
    before=$(last_hb_seq)
    t0=$SECONDS
    view --quiesce try --agent-timeout 2 --out "$tmp/view.raw"
    t1=$SECONDS
    expect_ok backup-pull || return 1
    [ "$(jget frozen)" = false ] || { echo "reported frozen: $out"; return 1; }
    [ -n "$(jget quiesce_error)" ] || { echo "no quiesce_error: $out"; return 1; }
    check_image "$before" || return 1
    agent_back || { echo "agent did not come back"; return 1; }
    invariants running || return 1
    echo "went on unfrozen in $((t1 - t0)) s: $(jget quiesce_error)"
}

case_blockcopy() {
    local before
    if grep -q '^CMAKE_BUILD_TYPE:STRING=Release' "$build/CMakeCache.txt" 2> /dev/null; then
        echo "skipped: CA_TEST_FORCE_BLOCKCOPY is ignored in release builds"
        return 0
    fi
    before=$(last_hb_seq)
    rc=0
    out=$(CA_TEST_FORCE_BLOCKCOPY=1 "$viewcheck" --uri "$LIBVIRT_URI" --uuid "$GUEST_UUID" \
          --scratch "$scratch" --quiesce try --out "$tmp/view.raw" 2> "$tmp/view.err") || rc=$?
    expect_ok blockcopy || return 1
    [ -n "$(jget path_reason)" ] || { echo "no path_reason: $out"; return 1; }
    [ "$(jget frozen)" = true ] || { echo "not frozen around the abort: $out"; return 1; }
    check_image "$before" || return 1
    invariants running || return 1
    summary
}

case_crash_backup() {
    local before st
    before=$(last_hb_seq)
    view --job-id crash-backup --abandon --out "$tmp/view.raw"
    [ "$rc" -eq 0 ] || { echo "abandoned view failed: $out"; return 1; }
    check_image "$before" || return 1
    st=$(vsh domjobinfo "$GUEST_UUID" | sed -n 's/^Operation: *//p' | tr -d ' ')
    [ "$st" = Backup ] || { echo "no backup job after the crash: '$st'"; return 1; }
    [ -e "$scratch/crash-backup.sock" ] || { echo "no socket after the crash"; return 1; }
    view --job-id crash-backup --cleanup
    [ "$rc" -eq 0 ] || { echo "cleanup_job failed: $out"; return 1; }
    invariants running || return 1
    view --job-id crash-backup --cleanup
    [ "$rc" -eq 0 ] || { echo "second cleanup_job failed: $out"; return 1; }
    echo "backup job and files removed in $(jget cleanup_ms) ms, second cleanup a no-op"
}

# nbd_dirs: libnbd's socket-activation directories (libnbd 1.14 always makes them in /tmp and
# removes them in nbd_close: a crashed client leaves its own behind).
nbd_dirs() { find /tmp -maxdepth 1 -name 'libnbd??????' -type d 2> /dev/null | sort; }

case_crash_managedsave() {
    local before d dirs
    before=$(last_hb_seq)
    saved=1
    dirs=$(nbd_dirs)
    view --job-id crash-save --abandon --no-live --out "$tmp/view.raw"
    # The crashed view's socket directory: new since, and nobody listening on it any more.
    for d in $(comm -13 <(printf '%s\n' "$dirs") <(nbd_dirs)); do
        ss -xl | grep -qF "$d/sock" || rm -rf "$d"
    done
    [ "$rc" -eq 0 ] || { echo "abandoned view failed: $out"; return 1; }
    check_image "$before" || return 1
    [ "$(dom_state)" = "shut off" ] || { echo "guest is '$(dom_state)' after the crash"; return 1; }
    view --job-id crash-save --cleanup
    [ "$rc" -eq 0 ] || { echo "cleanup_job failed: $out"; return 1; }
    invariants running || return 1
    echo "guest restored from its managed save in $(jget cleanup_ms) ms"
}

wait_running || { echo "FAIL: guest not running and writing" >&2; exit 1; }
case_reboot() {
    reboot_guest || { echo "guest did not boot again"; return 1; }
    invariants running
}

run_case "1 running guest, quiesce none: backup pull" case_live
run_case "2 running guest, quiesce required" case_quiesce_required
run_case "3 paused guest stays paused" case_paused
run_case "6a quiesce required, agent hung: clean failure" case_agent_hang_required
run_case "6b quiesce try, agent hung: goes on unfrozen" case_agent_hang_try
run_case "7 block-copy fallback (forced)" case_blockcopy
run_case "8a crash with a backup job open: cleanup_job" case_crash_backup
run_case "4 shut-off guest: cold path" case_shutoff
run_case "5 --no-live: managed save, restore" case_managedsave
run_case "5b --no-live on a paused guest: restored paused" case_managedsave_paused
run_case "8b crash with the guest managed-saved: cleanup_job" case_crash_managedsave
run_case "guest rebooted after the managed saves" case_reboot
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
