#!/usr/bin/env bash
# Integration test: the one-node Ceph from deploy/services/ceph.sh does what the rbd backend
# needs, with the same credentials the agent uses.
#
# As client.nova: import known bytes into vms, snapshot, protect, clone into images (Nova's direct
# snapshot), overwrite the parent's head, check the clone still reads the snapshot's bytes, check
# unprotect is refused while the clone exists, then tear down in the order clone v1 requires and
# check nothing of ours is left. As client.glance: reading vms works, writing to it is refused.
#
# Exit 0 pass, 1 fail, 77 skip (not root: the services need it).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)

fail() { echo "FAIL test-ceph-rbd: $*" >&2; exit 1; }
note() { echo "test-ceph-rbd: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "SKIP test-ceph-rbd: needs root to run the Ceph daemons" >&2
    exit 77
fi

tag="ca-test-$$-$RANDOM"
parent="$tag-disk"
clone="$tag-snap"
snap=snap
tmp=$(mktemp -d)
CEPH_CONF=

# Registered before anything starts. Uses the admin identity so it can clean up even when a
# nova-side step is what failed; each step may fail because the object is already gone.
cleanup() {
    local rc=$?
    if [ -n "$CEPH_CONF" ]; then
        rbd_as admin rm "images/$clone" > /dev/null 2>&1 || true
        rbd_as admin snap unprotect "vms/$parent@$snap" > /dev/null 2>&1 || true
        rbd_as admin snap purge "vms/$parent" > /dev/null 2>&1 || true
        rbd_as admin rm "vms/$parent" > /dev/null 2>&1 || true
        rbd_as admin rm "vms/$tag-glance" > /dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# rbd_as USER ARGS...: rbd with nothing but the conf file and an identity, as a real client
# would run it, bounded so a broken cluster fails the test instead of hanging it.
rbd_as() {
    local user=$1; shift
    timeout 120 rbd --conf "$CEPH_CONF" --id "$user" "$@"
}

# expect_fail WHAT PATTERN CMD...: CMD must fail, and its error output must match PATTERN.
expect_fail() {
    local what=$1 pattern=$2 out; shift 2
    if out=$("$@" 2>&1); then
        fail "$what: expected failure, but it succeeded"
    fi
    grep -Eq "$pattern" <<< "$out" || fail "$what: failed, but not with /$pattern/: $out"
    note "ok: $what refused ($(grep -Eo "$pattern" <<< "$out" | head -1))"
}

"$root/deploy/services.sh" up ceph || fail "deploy/services.sh up ceph failed"
# shellcheck source=SCRIPTDIR/../../deploy/lib.sh
. "$root/deploy/lib.sh"
svc_load_env ceph
[ -r "${CEPH_CONF:-}" ] || fail "env file has no readable CEPH_CONF"
for v in CEPH_FSID CEPH_NOVA_USER CEPH_NOVA_KEYRING CEPH_NOVA_KEY CEPH_GLANCE_USER \
    CEPH_GLANCE_KEYRING CEPH_VMS_POOL CEPH_IMAGES_POOL CEPH_ADMIN_KEYRING; do
    [ -n "${!v:-}" ] || fail "env file lacks $v"
done
if [ "$CEPH_NOVA_USER" != nova ] || [ "$CEPH_GLANCE_USER" != glance ]; then
    fail "unexpected user names: $CEPH_NOVA_USER, $CEPH_GLANCE_USER"
fi
if [ "$CEPH_VMS_POOL" != vms ] || [ "$CEPH_IMAGES_POOL" != images ]; then
    fail "unexpected pool names: $CEPH_VMS_POOL, $CEPH_IMAGES_POOL"
fi
grep -q "key = $CEPH_NOVA_KEY" "$CEPH_NOVA_KEYRING" || fail "CEPH_NOVA_KEY is not nova's key"

# Known bytes: 6 MiB of random data (not a multiple of the 4 MiB object size on purpose).
head -c $((6 * 1024 * 1024)) /dev/urandom > "$tmp/src"

note "as nova: import vms/$parent, snapshot, protect, clone into images/$clone"
rbd_as nova import --no-progress "$tmp/src" "vms/$parent" || fail "import into vms as nova"
rbd_as nova snap create --no-progress "vms/$parent@$snap" || fail "snap create as nova"
rbd_as nova snap protect "vms/$parent@$snap" || fail "snap protect as nova"
rbd_as nova clone "vms/$parent@$snap" "images/$clone" || fail "clone into images as nova"

# Change the parent's head after the snapshot: the clone must not see it.
rbd_as nova bench --io-type write --io-size 65536 --io-total 1048576 --io-pattern seq \
    "vms/$parent" > /dev/null || fail "overwrite parent head as nova"
rbd_as nova export --no-progress "vms/$parent" "$tmp/head" || fail "export parent head"
if cmp -s "$tmp/src" "$tmp/head"; then
    fail "writing to the parent's head changed nothing: the next check would prove nothing"
fi

rbd_as nova export --no-progress "images/$clone" "$tmp/clone" || fail "export clone as nova"
cmp "$tmp/src" "$tmp/clone" || fail "clone images/$clone differs from the snapshot's bytes"
note "ok: clone reads the snapshot's $(stat -c %s "$tmp/clone") bytes, not the changed head"

# Glance owns images and reads vms (a clone's parent lives there), but must not write to vms.
rbd_as glance info "images/$clone" > /dev/null || fail "glance cannot read images/$clone"
rbd_as glance export --no-progress "images/$clone" "$tmp/clone-glance" ||
    fail "glance cannot read the clone (needs read on its parent in vms)"
cmp -s "$tmp/src" "$tmp/clone-glance" || fail "glance reads different bytes from the clone"
rbd_as glance ls vms > /dev/null || fail "glance cannot list vms (read-only access expected)"
expect_fail "glance creating an image in vms" 'Operation not permitted|Permission denied' \
    rbd_as glance create --size 4M "vms/$tag-glance"
expect_fail "glance writing to vms/$parent" 'Operation not permitted|Permission denied' \
    rbd_as glance bench --io-type write --io-size 4096 --io-total 4096 "vms/$parent"
expect_fail "glance snapshotting vms/$parent" 'Operation not permitted|Permission denied' \
    rbd_as glance snap create "vms/$parent@glance"

# Clone v1: the protected parent snapshot cannot be unprotected while the clone exists.
expect_fail "unprotect with a child" "\\(16\\) Device or resource busy" \
    rbd_as nova snap unprotect "vms/$parent@$snap"
rbd_as nova children "vms/$parent@$snap" | grep -q "images/$clone" ||
    fail "images/$clone is not listed as a child of vms/$parent@$snap"

note "as nova: tear down clone, unprotect, snap rm, rm"
rbd_as nova rm --no-progress "images/$clone" || fail "rm clone as nova"
rbd_as nova snap unprotect "vms/$parent@$snap" || fail "unprotect after the clone is gone"
rbd_as nova snap rm --no-progress "vms/$parent@$snap" || fail "snap rm as nova"
[ -z "$(rbd_as nova snap ls "vms/$parent")" ] || fail "snapshots left on vms/$parent"
rbd_as nova rm --no-progress "vms/$parent" || fail "rm parent as nova"

for pool in vms images; do
    left=$(rbd_as nova ls "$pool") || fail "rbd ls $pool"
    if grep -q "^$tag" <<< "$left"; then
        fail "images left in $pool: $(grep "^$tag" <<< "$left" | tr '\n' ' ')"
    fi
    trash=$(rbd_as nova trash ls "$pool") || fail "rbd trash ls $pool"
    if grep -q "$tag" <<< "$trash"; then
        fail "images left in the trash of $pool"
    fi
done

echo "PASS test-ceph-rbd"
