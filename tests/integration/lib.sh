#!/usr/bin/env bash
# Helpers shared by the integration tests; sourced after deploy/lib.sh (not a test itself: ctest
# runs tests/integration/test-*.sh only).

# rbd_image_leftovers_remove IMG: for a test's cleanup, remove what a snapshot job for Glance image
# IMG may have left in Ceph: its clone images/IMG (with its snapshots), then its temporary
# snapshot snap-IMG on the rbd test guest's disk. Needs the ceph and rbd-guest env (svc_load_env).
# Errors are ignored: a leak is the test's to report, the cleanup only keeps later runs clean.
rbd_image_leftovers_remove() {
    local img=$1
    local rbd_=(rbd --conf "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING")
    if "${rbd_[@]}" info "images/$img" > /dev/null 2>&1; then
        "${rbd_[@]}" snap unprotect "images/$img@snap" > /dev/null 2>&1 || true
        "${rbd_[@]}" snap purge "images/$img" > /dev/null 2>&1 || true
        "${rbd_[@]}" rm --no-progress "images/$img" > /dev/null 2>&1 || true
    fi
    if "${rbd_[@]}" snap ls "$RBD_GUEST_DISK" 2> /dev/null | awk '{print $2}' | grep -qx "snap-$img"; then
        "${rbd_[@]}" snap unprotect "$RBD_GUEST_DISK@snap-$img" > /dev/null 2>&1 || true
        "${rbd_[@]}" snap rm --no-progress "$RBD_GUEST_DISK@snap-$img" > /dev/null 2>&1 || true
    fi
    return 0
}
