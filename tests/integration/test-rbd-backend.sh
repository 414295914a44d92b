#!/usr/bin/env bash
# Integration test: the rbd disk backend (backends/rbd.c) against the one-node Ceph of
# deploy/services/ceph.sh, driven by $CA_BUILD_DIR/tests/tools/rbd-check as client.nova, without
# libvirt (no guest: quiesce is exercised only as "no quiesce_ops"; the worker's rbd test freezes
# a real guest).
#
# The instance disk vms/<uuid>_disk is a 1 GiB image holding a few MiB of random data at known
# offsets (one range crosses a 4 MiB object boundary, one is the disk's last MiB), imported from
# a sparse raw file. Cases:
#   owns            the disk exists / another UUID's does not
#   view            open_view → raw file equal to the source, DATA extents cover every written
#                   range and nothing outside the objects written, the snapshot gone after close;
#                   quiesce try (no quiesce_ops: reason recorded) and required (fails, nothing left)
#   cleanup_job     removes a leftover (protected) job snapshot; twice is fine
#   direct never    images/<id>@snap protected, its bytes equal the source, parent link kept,
#                   the clone listed as a child of the temporary snapshot; undo removes both; twice
#   direct background  parent link until flatten; flatten: no parent on the clone nor on its
#                   snapshot (deep-flatten), temporary snapshot gone, no snapshot left on the disk
#                   (so `rbd rm` of it would work), data unchanged; flatten again is a no-op; a
#                   flatten interrupted after flattening (fault) is finished by the next call
#   direct sync     flat at once, temporary snapshot already gone, data equal
#   parent without deep-flatten (layering only): the clone gets deep-flatten, flatten frees it
#   rollback        CA_TEST_RBD_FAIL_AT=snap|protect|clone|flatten|clone-snap|clone-protect: the
#                   call fails, nothing of it is left in images or on the disk
#   refusals        wrong fsid → -EXDEV, unknown pool → -EOPNOTSUPP, a pool client.nova may not
#                   write → -EACCES, an existing image id → -EEXIST and that image untouched, a
#                   dead cluster (mon ports closed) → -ETIMEDOUT from open within ~15 s
#   timing          a disk with CA_TEST_RBD_BENCH_GIB GiB written (default "1"; e.g. "1 4"):
#                   direct without flatten, with sync flatten, view read throughput (METRIC lines).
#                   A sync flatten doubles the data: 4 GiB needs > 8 GiB free in the OSD, more
#                   than deploy/'s 10 GiB OSD has beside other users (use a private cluster:
#                   CA_DEPLOY_DIR, CA_CEPH_MON_PORT, CA_CEPH_MON_V1_PORT, CA_CEPH_OSD_SIZE=24G)
# Every case also checks that nothing of it is left in Ceph. Prints "N passed, N failed".
# Exit 0 pass, 1 fail, 77 skip (not root, tool not built). A release-built tool ignores the fault
# switch: the fault cases are then skipped (and said so).
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=SCRIPTDIR/../../deploy/lib.sh
. "$repo/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=test-rbd-backend

[ "$(id -u)" -eq 0 ] || { echo "SKIP: needs root to run the Ceph daemons" >&2; exit 77; }
build=${CA_BUILD_DIR:-$repo/build/debug}
tool=$build/tests/tools/rbd-check
[ -x "$tool" ] || { echo "SKIP: $tool not built (CA_BUILD_DIR=$build)" >&2; exit 77; }
for b in rbd ceph jq cmp; do
    command -v "$b" > /dev/null || { echo "SKIP: $b missing" >&2; exit 77; }
done
py=/usr/bin/python3
[ -x "$py" ] || { echo "SKIP: $py missing" >&2; exit 77; }

MiB=$((1024 * 1024))
tag="ca-rbdb-$$"
uuid=$(cat /proc/sys/kernel/random/uuid)
uuid2=$(cat /proc/sys/kernel/random/uuid)   # layering-only parent
uuid_b=$(cat /proc/sys/kernel/random/uuid)  # timing disk
noperm_pool="$tag-noperm"
tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/ca-test-rbd-backend.XXXXXX")
CEPH_CONF=
passed=0
failed=0

# rbd_admin ARGS: as client.admin, bounded (cleanup must work whatever state nova left).
rbd_admin() { timeout 300 rbd --conf "$CEPH_CONF" --name client.admin "$@"; }
# purge POOL/IMAGE: unprotect every snapshot, remove them, remove the image; quiet, best effort.
purge() {
    local s
    for s in $(rbd_admin snap ls --format json "$1" 2> /dev/null |
               jq -r '.[].name' 2> /dev/null); do
        rbd_admin snap unprotect "$1@$s" > /dev/null 2>&1 || true
    done
    rbd_admin snap purge --no-progress "$1" > /dev/null 2>&1 || true
    rbd_admin rm --no-progress "$1" > /dev/null 2>&1 || true
}
# Registered before anything starts: clones first (they pin the disks' snapshots), then disks.
cleanup() {
    local rc=$? i
    if [ -n "$CEPH_CONF" ]; then
        for i in $(rbd_admin ls images 2> /dev/null | grep "^$tag-" || true); do
            purge "images/$i"
        done
        for i in "$uuid" "$uuid2" "$uuid_b"; do purge "vms/${i}_disk"; done
        if rbd_admin ls "$noperm_pool" > /dev/null 2>&1; then
            timeout 60 ceph --conf "$CEPH_CONF" --name client.admin osd pool rm "$noperm_pool" \
                "$noperm_pool" --yes-i-really-really-mean-it > /dev/null 2>&1 || true
        fi
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$repo/deploy/services.sh" up ceph > "$tmp/up.log" 2>&1 ||
    { cat "$tmp/up.log" >&2; echo "FAIL: deploy/services.sh up ceph failed" >&2; exit 1; }
svc_load_env ceph
[ -r "${CEPH_CONF:-}" ] || { echo "FAIL: no CEPH_CONF in the ceph env file" >&2; exit 1; }
user=${CEPH_NOVA_USER:-nova}
vms=${CEPH_VMS_POOL:-vms}
images=${CEPH_IMAGES_POOL:-images}

pass() { passed=$((passed + 1)); echo "ok - $*"; }
failc() { failed=$((failed + 1)); echo "not ok - $*"; }
metric() { echo "METRIC $*"; }
# rbd_nova ARGS: rbd as the agent's user, bounded.
rbd_nova() { timeout 300 rbd --conf "$CEPH_CONF" --id "$user" "$@"; }
# rc UUID ARGS...: run rbd-check; its JSON line in $out, exit status in $rcode.
rc() {
    local u=$1; shift
    rcode=0
    out=$("$tool" --conf "$CEPH_CONF" --id "$user" --pool "$vms" --uuid "$u" "$@" \
          2> "$tmp/rc.err") || rcode=$?
}
j() { jq -r "$1" <<< "$out"; }
# snaps POOL/IMAGE: snapshot names, one a line.
snaps() { rbd_nova snap ls --format json "$1" | jq -r '.[].name'; }
# protected POOL/IMAGE SNAP: "true" or "false".
protected() {
    rbd_nova snap ls --format json "$1" | jq -r ".[] | select(.name==\"$2\") | .protected"
}
# parent_of SPEC: "pool/image@snap" of its parent, "" if none.
parent_of() {
    rbd_nova info --format json "$1" |
        jq -r '.parent | if . then "\(.pool)/\(.image)@\(.snapshot)" else "" end'
}
exists() { rbd_nova info "$1" > /dev/null 2>&1; }
# nothing_left DISK_UUID JOB IMAGE_ID: no snapshot JOB on the disk, no image IMAGE_ID in images.
nothing_left() {
    local s
    s=$(snaps "$vms/${1}_disk") || { echo "cannot list snapshots of $vms/${1}_disk"; return 1; }
    if grep -qx "$2" <<< "$s"; then echo "snapshot $vms/${1}_disk@$2 left"; return 1; fi
    if [ -n "$3" ] && rbd_nova ls "$images" | grep -qx "$3"; then
        echo "image $images/$3 left"; return 1
    fi
    return 0
}
# export_eq SPEC FILE: rbd export of SPEC equals FILE.
export_eq() {
    rm -f "$tmp/export.raw"
    rbd_nova export --no-progress "$1" "$tmp/export.raw" > /dev/null 2>&1 || return 1
    cmp -s "$tmp/export.raw" "$2"
    local r=$?
    rm -f "$tmp/export.raw"
    return $r
}

# ---- the instance disk ---------------------------------------------------------------------------
# Written ranges in MiB: offset length.
ranges=("0 1" "102 3" "513 1" "1023 1")
truncate -s 1G "$tmp/src.raw"
for r in "${ranges[@]}"; do
    read -r off len <<< "$r"
    head -c $((len * MiB)) /dev/urandom |
        dd of="$tmp/src.raw" bs=1M seek="$off" conv=notrunc status=none
done
rbd_nova import --no-progress "$tmp/src.raw" "$vms/${uuid}_disk" > /dev/null ||
    { echo "FAIL: rbd import as $user" >&2; exit 1; }
echo "# instance disk $vms/${uuid}_disk: 1 GiB, written (MiB): ${ranges[*]}"

# ---- owns ----------------------------------------------------------------------------------------
rc "$uuid" owns
if [ "$rcode" = 0 ] && [ "$(j .owns)" = true ]; then pass "owns: disk exists"
else failc "owns: $out"; fi
rc "$(cat /proc/sys/kernel/random/uuid)" owns
if [ "$rcode" = 0 ] && [ "$(j .owns)" = false ]; then pass "owns: other UUID not ours"
else failc "owns other: $out"; fi

# ---- view ----------------------------------------------------------------------------------------
# extents_ok: every written range inside one DATA extent; every DATA byte inside an object
# (4 MiB) that holds written data.
extents_ok() {
    RANGES="${ranges[*]}" "$py" -c '
import json, os, sys
v = json.loads(sys.argv[1]); M = 1 << 20; O = 4 * M
nums = [int(x) * M for x in os.environ["RANGES"].split()]
w = list(zip(nums[0::2], nums[1::2]))
data = v["data"]
for o, l in w:
    if not any(a <= o and o + l <= a + b for a, b in data):
        sys.exit("written range %d+%d not inside one DATA extent: %s" % (o, l, data))
objs = set()
for o, l in w:
    objs.update(range(o // O, (o + l - 1) // O + 1))
for a, b in data:
    for k in range(a // O, (a + b - 1) // O + 1):
        if k not in objs:
            sys.exit("DATA extent %d+%d reaches object %d, never written" % (a, b, k))
' "$out"
}
rc "$uuid" --job-id "$tag-v1" view --out "$tmp/view.raw" --extents
if [ "$rcode" != 0 ]; then
    failc "view: $out $(tail -3 "$tmp/rc.err")"
else
    if cmp -s "$tmp/view.raw" "$tmp/src.raw"; then pass "view: raw equals the source"
    else failc "view: raw differs from the source"; fi
    if msg=$(extents_ok 2>&1); then
        pass "view: $(j .data_extents) DATA extents ($(j .allocated_bytes) bytes)" \
            "cover the written ranges only"
    else failc "view extents: $msg"; fi
    [ "$(j .path)" = rbd-snapshot ] && [ "$(j .virtual_size)" = $((1024 * MiB)) ] &&
        pass "view: path rbd-snapshot, virtual size 1 GiB" || failc "view info: $out"
    echo "# view: setup $(j .setup_ms) ms, map $(j .map_ms) ms, read $(j .read_ms) ms," \
        "close $(j .close_ms) ms"
fi
if msg=$(nothing_left "$uuid" "$tag-v1" ""); then pass "view: snapshot removed by close_view"
else failc "view: $msg"; fi
rm -f "$tmp/view.raw"

rc "$uuid" --job-id "$tag-v2" --quiesce try view --out "$tmp/view.raw"
if [ "$rcode" = 0 ] && [ "$(j .frozen)" = false ] && [ -n "$(j .quiesce_error)" ] &&
   cmp -s "$tmp/view.raw" "$tmp/src.raw"; then
    pass "view quiesce try without quiesce_ops: taken, reason recorded ($(j .quiesce_error))"
else failc "view quiesce try: $out"; fi
rc "$uuid" --job-id "$tag-v3" --quiesce required view --out "$tmp/view.raw"
if [ "$rcode" = 1 ] && [ "$(j .stage)" = open_view ] && nothing_left "$uuid" "$tag-v3" ""; then
    pass "view quiesce required without quiesce_ops: refused, nothing left"
else failc "view quiesce required: $out"; fi
rm -f "$tmp/view.raw"

# The fault switch exists only in builds without NDEBUG: a release tool ignores it, and the cases
# that need it are skipped (said so, not counted).
faults=1
CA_TEST_RBD_FAIL_AT=snap rc "$uuid" --job-id "$tag-v4" view --out "$tmp/view.raw"
if [ "$rcode" = 0 ]; then
    faults=0
    echo "# SKIP fault cases: $tool ignores CA_TEST_RBD_FAIL_AT (release build)"
elif [ "$(j .code)" = -5 ] && nothing_left "$uuid" "$tag-v4" ""; then
    pass "view fault after snap: fails, snapshot rolled back"
else failc "view fault snap: $out"; fi
rm -f "$tmp/view.raw"

# ---- cleanup_job ---------------------------------------------------------------------------------
rbd_nova snap create "$vms/${uuid}_disk@$tag-c1" > /dev/null 2>&1 &&
    rbd_nova snap protect "$vms/${uuid}_disk@$tag-c1"
rc "$uuid" --job-id "$tag-c1" cleanup
r1=$rcode
rc "$uuid" --job-id "$tag-c1" cleanup
if [ "$r1" = 0 ] && [ "$rcode" = 0 ] && nothing_left "$uuid" "$tag-c1" ""; then
    pass "cleanup_job: leftover protected snapshot removed, second call a no-op"
else failc "cleanup_job: $out"; fi

# ---- direct, flatten never -----------------------------------------------------------------------
id="$tag-never"
rc "$uuid" --job-id "$tag-d1" direct --image-id "$id" --target-pool "$images" --fsid "$CEPH_FSID" \
    --flatten never
if [ "$rcode" != 0 ]; then
    failc "direct never: $out $(tail -3 "$tmp/rc.err")"
else
    loc="rbd://$CEPH_FSID/$images/$id/snap"
    [ "$(j .location)" = "$loc" ] && [ "$(j .size)" = $((1024 * MiB)) ] &&
        [ "$(j .flatten_pending)" = false ] && [ "$(j .path)" = rbd-direct ] &&
        [ "$(j .parent_snap)" = "$vms/${uuid}_disk@$tag-d1" ] &&
        pass "direct never: result $loc, size, parent_snap" || failc "direct never result: $out"
    [ "$(protected "$images/$id" snap)" = true ] &&
        pass "direct never: $images/$id@snap protected" ||
        failc "direct never: $images/$id@snap not protected"
    export_eq "$images/$id@snap" "$tmp/src.raw" && pass "direct never: @snap equals the source" ||
        failc "direct never: @snap differs from the source"
    [ "$(parent_of "$images/$id")" = "$vms/${uuid}_disk@$tag-d1" ] &&
        rbd_nova children "$vms/${uuid}_disk@$tag-d1" | grep -qx "$images/$id" &&
        pass "direct never: clone of $vms/${uuid}_disk@$tag-d1 (protected:" \
            "$(protected "$vms/${uuid}_disk" "$tag-d1"))" ||
        failc "direct never: parent link $(parent_of "$images/$id")"
    echo "# direct never: $(j .direct_ms) ms"
fi
rc "$uuid" --job-id "$tag-d1" undo --image-id "$id" --target-pool "$images"
r1=$rcode
rc "$uuid" --job-id "$tag-d1" undo --image-id "$id" --target-pool "$images"
if [ "$r1" = 0 ] && [ "$rcode" = 0 ] && msg=$(nothing_left "$uuid" "$tag-d1" "$id"); then
    pass "direct_undo: clone and temporary snapshot removed, second call a no-op"
else failc "direct_undo: $out ${msg:-}"; fi

# ---- direct, flatten background, then flatten ----------------------------------------------------
id="$tag-bg"
rc "$uuid" --job-id "$tag-d2" direct --image-id "$id" --target-pool "$images" --flatten background
if [ "$rcode" = 0 ] && [ "$(j .flatten_pending)" = true ] &&
   [ "$(parent_of "$images/$id")" = "$vms/${uuid}_disk@$tag-d2" ]; then
    pass "direct background: active as a clone, flatten pending ($(j .direct_ms) ms)"
else failc "direct background: $out"; fi
rc "$uuid" --job-id "$tag-d2" flatten --image-id "$id" --target-pool "$images"
if [ "$rcode" = 0 ] && [ "$(j .progress_calls)" -gt 0 ]; then
    pass "flatten: done in $(j .flatten_ms) ms, $(j .progress_calls) progress calls"
else failc "flatten: $out"; fi
[ -z "$(parent_of "$images/$id")" ] && [ -z "$(parent_of "$images/$id@snap")" ] &&
    pass "flatten: neither the clone nor its snapshot refers to the parent (deep-flatten)" ||
    failc "flatten: parent still $(parent_of "$images/$id") / $(parent_of "$images/$id@snap")"
if [ -z "$(snaps "$vms/${uuid}_disk")" ] &&
   [ -z "$(rbd_nova children --all "$vms/${uuid}_disk" 2>&1 | grep -v '^$' || true)" ]; then
    pass "flatten: no snapshot, no child left on the disk (rbd rm would work)"
else failc "flatten: disk still has $(snaps "$vms/${uuid}_disk" | tr '\n' ' ')"; fi
export_eq "$images/$id@snap" "$tmp/src.raw" && export_eq "$images/$id" "$tmp/src.raw" &&
    pass "flatten: clone and @snap still equal the source" || failc "flatten: data changed"
rc "$uuid" --job-id "$tag-d2" flatten --image-id "$id" --target-pool "$images"
[ "$rcode" = 0 ] && pass "flatten again: no-op" || failc "flatten again: $out"
rc "$uuid" --job-id "$tag-d2" undo --image-id "$id" --target-pool "$images"
[ "$rcode" = 0 ] && nothing_left "$uuid" "$tag-d2" "$id" > /dev/null && pass "undo after flatten" ||
    failc "undo after flatten: $out"

# A flatten failing after flattening (fault) leaves the temporary snapshot; the next call ends it.
id="$tag-bg2"
if [ "$faults" = 1 ]; then
    rc "$uuid" --job-id "$tag-d3" direct --image-id "$id" --target-pool "$images" \
        --flatten background
    CA_TEST_RBD_FAIL_AT=flatten rc "$uuid" --job-id "$tag-d3" flatten --image-id "$id" \
        --target-pool "$images"
    r1=$rcode
    left=$(snaps "$vms/${uuid}_disk")
    rc "$uuid" --job-id "$tag-d3" flatten --image-id "$id" --target-pool "$images"
    if [ "$r1" = 1 ] && grep -qx "$tag-d3" <<< "$left" && [ "$rcode" = 0 ] &&
       [ -z "$(snaps "$vms/${uuid}_disk")" ]; then
        pass "flatten interrupted after flattening: resumed by the next call"
    else failc "flatten resume: first rc $r1, left '$left', then $out"; fi
    rc "$uuid" --job-id "$tag-d3" undo --image-id "$id" --target-pool "$images"
fi

# ---- direct, flatten sync ------------------------------------------------------------------------
id="$tag-sync"
rc "$uuid" --job-id "$tag-d4" direct --image-id "$id" --target-pool "$images" --flatten sync
if [ "$rcode" = 0 ] && [ "$(j .flatten_pending)" = false ] && [ -z "$(j .parent_snap)" ] &&
   [ -z "$(parent_of "$images/$id")" ] && [ -z "$(snaps "$vms/${uuid}_disk")" ] &&
   [ "$(protected "$images/$id" snap)" = true ]; then
    pass "direct sync: flat, temporary snapshot gone, @snap protected ($(j .direct_ms) ms)"
else failc "direct sync: $out"; fi
export_eq "$images/$id@snap" "$tmp/src.raw" && pass "direct sync: @snap equals the source" ||
    failc "direct sync: data differs"
rc "$uuid" --job-id "$tag-d4" undo --image-id "$id" --target-pool "$images"
[ "$rcode" = 0 ] && nothing_left "$uuid" "$tag-d4" "$id" > /dev/null && pass "direct sync: undo" ||
    failc "direct sync undo: $out"

# ---- a parent without deep-flatten ------------------------------------------------------------
rbd_nova import --no-progress --image-feature layering "$tmp/src.raw" "$vms/${uuid2}_disk" \
    > /dev/null || failc "import layering-only disk"
id="$tag-nodf"
rc "$uuid2" --job-id "$tag-d5" direct --image-id "$id" --target-pool "$images" --flatten background
feat=$(rbd_nova info --format json "$images/$id" 2> /dev/null | jq -r '.features | join(",")')
rc "$uuid2" --job-id "$tag-d5" flatten --image-id "$id" --target-pool "$images"
if [ "$rcode" = 0 ] && grep -q deep-flatten <<< "$feat" && [ -z "$(snaps "$vms/${uuid2}_disk")" ] &&
   [ -z "$(parent_of "$images/$id@snap")" ]; then
    pass "layering-only parent: clone made with $feat, flatten frees the parent snapshot"
else failc "layering-only parent: features '$feat', $out"; fi
rc "$uuid2" --job-id "$tag-d5" undo --image-id "$id" --target-pool "$images"
purge "$vms/${uuid2}_disk"

# ---- rollback at every step ----------------------------------------------------------------------
steps="snap protect clone flatten clone-snap clone-protect"
[ "$faults" = 1 ] || steps=
for step in $steps; do
    id="$tag-fault-$step"
    CA_TEST_RBD_FAIL_AT=$step rc "$uuid" --job-id "$tag-f-$step" direct --image-id "$id" \
        --target-pool "$images" --flatten sync
    if [ "$rcode" = 1 ] && [ "$(j .code)" = -5 ] &&
       msg=$(nothing_left "$uuid" "$tag-f-$step" "$id") &&
       [ -z "$(snaps "$vms/${uuid}_disk")" ] &&
       ! rbd_nova ls "$images" | grep -q "^$tag-fault"; then
        pass "rollback after '$step': nothing left"
    else failc "rollback after '$step': $out ${msg:-}"; fi
done

# ---- refusals ------------------------------------------------------------------------------------
rc "$uuid" --job-id "$tag-r1" direct --image-id "$tag-x1" --target-pool "$images" \
    --fsid 00000000-0000-0000-0000-000000000000
[ "$(j .code)" = -18 ] && nothing_left "$uuid" "$tag-r1" "$tag-x1" > /dev/null &&
    pass "wrong fsid: -EXDEV, nothing made" || failc "wrong fsid: $out"
rc "$uuid" --job-id "$tag-r2" direct --image-id "$tag-x2" --target-pool "$tag-nopool"
[ "$(j .code)" = -95 ] && nothing_left "$uuid" "$tag-r2" "" > /dev/null &&
    pass "unknown target pool: -EOPNOTSUPP, nothing made" || failc "unknown pool: $out"
if timeout 60 ceph --conf "$CEPH_CONF" --name client.admin osd pool create "$noperm_pool" 8 8 \
       replicated > /dev/null 2>&1 && rbd_admin pool init "$noperm_pool" > /dev/null 2>&1; then
    rc "$uuid" --job-id "$tag-r3" direct --image-id "$tag-x3" --target-pool "$noperm_pool"
    if [ "$(j .code)" = -13 ] && nothing_left "$uuid" "$tag-r3" "" > /dev/null &&
       [ -z "$(rbd_admin ls "$noperm_pool")" ]; then
        pass "pool without write permission: -EACCES (worker streams), nothing left"
    else failc "no-permission pool: $out"; fi
    timeout 60 ceph --conf "$CEPH_CONF" --name client.admin osd pool rm "$noperm_pool" \
        "$noperm_pool" --yes-i-really-really-mean-it > /dev/null 2>&1
else
    failc "could not create pool $noperm_pool as admin"
fi
# A dead cluster (nothing listens on the mon ports) fails within the timeouts set before connect.
# The copy keeps the name ceph.conf: librados derives $cluster (keyring path) from it.
mkdir -p "$tmp/dead"
sed -e 's/^\(mon_host = \).*/\1[v2:127.0.0.1:1,v1:127.0.0.1:2]/' "$CEPH_CONF" \
    > "$tmp/dead/ceph.conf"
t0=$(svc_time_ms)
rcode=0
out=$("$tool" --conf "$tmp/dead/ceph.conf" --id "$user" --pool "$vms" --uuid "$uuid" owns \
      2> "$tmp/rc.err") || rcode=$?
ms=$(( $(svc_time_ms) - t0 ))
if [ "$rcode" = 1 ] && [ "$(j .stage)" = open ] && [ "$(j .code)" = -110 ] &&
   [ "$ms" -le 20000 ]; then
    pass "dead cluster: open fails with -ETIMEDOUT after $ms ms"
else failc "dead cluster: $out after $ms ms"; fi

id="$tag-exists"
rc "$uuid" --job-id "$tag-r4" direct --image-id "$id" --target-pool "$images" --flatten sync
rc "$uuid" --job-id "$tag-r5" direct --image-id "$id" --target-pool "$images" --flatten never
if [ "$rcode" = 1 ] && [ "$(j .code)" = -17 ] && [ "$(protected "$images/$id" snap)" = true ] &&
   export_eq "$images/$id@snap" "$tmp/src.raw" &&
   nothing_left "$uuid" "$tag-r5" "" > /dev/null; then
    pass "existing image id: -EEXIST, the existing image untouched, nothing left"
else failc "existing image id: $out"; fi
rc "$uuid" --job-id "$tag-r4" undo --image-id "$id" --target-pool "$images"

# ---- timing --------------------------------------------------------------------------------------
for gib in ${CA_TEST_RBD_BENCH_GIB:-1}; do
    rbd_nova create --size "${gib}G" "$vms/${uuid_b}_disk" > /dev/null
    t0=$(svc_time_ms)
    rbd_nova bench --io-type write --io-size 4M --io-threads 4 --io-total "${gib}G" \
        --io-pattern seq "$vms/${uuid_b}_disk" > /dev/null || failc "bench write ${gib} GiB"
    echo "# ${gib} GiB written in $(( $(svc_time_ms) - t0 )) ms"
    for pol in never sync; do
        rc "$uuid_b" --job-id "$tag-t-$pol" direct --image-id "$tag-t-$pol" \
            --target-pool "$images" --flatten "$pol"
        if [ "$rcode" = 0 ]; then
            metric "rbd_direct_${pol}_ms=$(j .direct_ms) written_gib=$gib"
        else failc "timing direct $pol at $gib GiB: $out"; fi
        rc "$uuid_b" --job-id "$tag-t-$pol" undo --image-id "$tag-t-$pol" --target-pool "$images"
    done
    rc "$uuid_b" --job-id "$tag-t-view" view --out "$tmp/bench.raw"
    if [ "$rcode" = 0 ] && [ "$(j .allocated_bytes)" = $((gib * 1024 * MiB)) ]; then
        metric "rbd_view_read_mib_s=$(j .read_mib_s) written_gib=$gib" \
            "(read $(j .read_ms) ms, map $(j .map_ms) ms)"
    else failc "timing view at $gib GiB: $out"; fi
    rm -f "$tmp/bench.raw"
    purge "$vms/${uuid_b}_disk"
done
pass "timing runs"

# ---- nothing of ours anywhere --------------------------------------------------------------------
left=$(rbd_nova ls "$images" | grep "^$tag-" || true)
s=$(snaps "$vms/${uuid}_disk")
if [ -z "$left" ] && [ -z "$s" ]; then pass "nothing left in $images, no snapshot on the disk"
else failc "left: images '$left', snapshots '$s'"; fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
