#!/usr/bin/env bash
# Integration test: the agent's Glance v2 client (backends/glance.c) against the deploy/ glance-api,
# through tests/tools/glance-client-check.
#
# Happy path, as nova does a snapshot: create the image like nova-api (POST with nova's
# properties), PATCH the snapshot properties and formats, stream 64 MiB of a deterministic
# pseudo-random sequence in odd-sized reads (chunked), then check independently that glance holds
# those bytes: GET /file hashed with md5sum/sha512sum/sha256sum equals the generator's output
# hashed the same way, equals the client's digests and glance's checksum/os_hash_value. Same
# again with Content-Length (exact size). Then a re-upload to the active image (409 -> -EBUSY,
# nothing pulled), delete (-ENOENT afterwards).
# Error paths: upload to an unknown id; image deleted by another thread half-way (410, "image
# deleted"); read callback failing mid-stream (its error returned, image back to queued); source
# shorter/longer than its declared size; a dead api_server first (failover); all servers dead
# (num_retries rounds, then -ECONNREFUSED); a server that stops reading mid-upload (low-speed
# abort, -ETIMEDOUT, not retried); one that never answers (metadata timeout, failover); one that
# answers 503 (failover; alone: -EIO retryable); the token never in messages; a refused location;
# with Ceph and glance's rbd store, nova's direct-snapshot location (rbd://) makes the image active.
# 415 is not reachable through the client (it always sends application/octet-stream);
# tests/integration/test-glance.sh covers glance's 415 with curl.
# Finally the upload throughput of a 1 GiB stream into the file store is measured and printed.
#
# Env: CA_BUILD_DIR (built here under build/glance-client-check if unset), CA_GLANCE_BENCH_MIB
# (size of the throughput run, default 1024; 0 skips it). Prints "N passed, N failed".
# Exit 0 pass, 1 fail, 77 skip (glance or curl unavailable).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../../deploy/lib.sh
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034  # read by log() in lib.sh
SVC=test-glance-client

tmp=$(mktemp -d)
created=()
rbd_image=
cleanup() {
    local id
    for id in "${created[@]}"; do
        curl -s -o /dev/null --max-time 20 -X DELETE \
            "${GLANCE_URL:-http://127.0.0.1:9292}/v2/images/$id" || true
    done
    if [ -n "$rbd_image" ]; then
        rbd_admin snap unprotect "$rbd_image@snap" > /dev/null 2>&1 || true
        rbd_admin snap purge "$rbd_image" > /dev/null 2>&1 || true
        rbd_admin rm "$rbd_image" > /dev/null 2>&1 || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v curl > /dev/null || { log "SKIP: curl not installed"; exit 77; }

build=${CA_BUILD_DIR:-}
if [ -z "$build" ]; then
    build=$root/build/glance-client-check
    log "CA_BUILD_DIR unset: building glance-client-check in $build"
    if ! { cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Debug \
        && cmake --build "$build" --target glance-client-check -j2; } > "$tmp/cmake.log" 2>&1; then
        tail -n 30 "$tmp/cmake.log" >&2
        log "FAIL: build"
        exit 1
    fi
fi
check=$build/tests/tools/glance-client-check
[ -x "$check" ] || { log "FAIL: $check not built"; exit 1; }

if ! "$root/deploy/services.sh" up glance > "$tmp/up.log" 2>&1; then
    tail -n 20 "$tmp/up.log" >&2
    log "SKIP: glance-api could not be brought up"
    exit 77
fi
svc_load_env glance
[ -n "${GLANCE_URL:-}" ] || { log "FAIL: no GLANCE_URL in $(svc_dir glance)/env"; exit 1; }
export GLANCE_URL

passed=0
failed=0
pass() { passed=$((passed + 1)); log "ok: $*"; }
failc() { failed=$((failed + 1)); log "FAIL: $*"; }

# run CASE [ARGS...]: one driver case; its "ok"/"FAIL" line decides.
run() {
    local out
    if out=$("$check" "$@" 2>&1); then
        pass "$out"
    else
        failc "$1: ${out:-exit status $?}"
    fi
}

# glance_field ID KEY: one field of the image document.
glance_field() {
    curl -s --max-time 30 "$GLANCE_URL/v2/images/$1" | /usr/bin/python3 -c 'import json, sys
v = json.load(sys.stdin).get(sys.argv[1])
print("" if v is None else v)' "$2"
}

# upload_and_verify LABEL SIZE SEED [exact]: the happy path plus the independent checks.
upload_and_verify() {
    local label=$1 size=$2 seed=$3 mode=${4:-} id res bytes md5 sha256 algo hash secs
    local g_md5 g_sha256 g_sha512 f_md5 f_sha512 f_size
    if ! id=$("$check" create "ca-test-client-$label-$$" 2>&1); then
        failc "$label create: $id"; return 1
    fi
    created+=("$id")
    run update "$id"
    if ! res=$("$check" upload "$id" "$size" "$seed" ${mode:+"$mode"} 2>&1); then
        failc "$label upload: $res"; return 1
    fi
    read -r bytes md5 sha256 algo hash secs <<< "$res"
    # The generator's own stream, hashed by coreutils.
    "$check" gen "$size" "$seed" > "$tmp/gen.raw"
    g_md5=$(md5sum < "$tmp/gen.raw" | cut -d' ' -f1)
    g_sha256=$(sha256sum < "$tmp/gen.raw" | cut -d' ' -f1)
    g_sha512=$(sha512sum < "$tmp/gen.raw" | cut -d' ' -f1)
    rm -f "$tmp/gen.raw"
    # What glance serves back.
    curl -sS --max-time 300 -o "$tmp/file.raw" "$GLANCE_URL/v2/images/$id/file"
    f_size=$(stat -c %s "$tmp/file.raw")
    f_md5=$(md5sum < "$tmp/file.raw" | cut -d' ' -f1)
    f_sha512=$(sha512sum < "$tmp/file.raw" | cut -d' ' -f1)
    rm -f "$tmp/file.raw"
    local bad=
    [ "$bytes" = "$size" ] && [ "$f_size" = "$size" ] || bad+=" size(sent $bytes, stored $f_size)"
    [ "$md5" = "$g_md5" ] || bad+=" client-md5"
    [ "$sha256" = "$g_sha256" ] || bad+=" client-sha256"
    [ "$algo" = sha512 ] && [ "$hash" = "$g_sha512" ] || bad+=" client-sha512($algo)"
    [ "$f_md5" = "$g_md5" ] && [ "$f_sha512" = "$g_sha512" ] || bad+=" stored-bytes"
    [ "$(glance_field "$id" checksum)" = "$g_md5" ] || bad+=" glance-checksum"
    [ "$(glance_field "$id" os_hash_value)" = "$g_sha512" ] || bad+=" glance-os_hash_value"
    [ "$(glance_field "$id" status)" = active ] || bad+=" status"
    if [ -n "$bad" ]; then
        failc "$label: mismatch:$bad"
        return 1
    fi
    pass "$label: $size bytes ${mode:-chunked} in $secs s; md5/sha256/sha512 of generator =" \
        "client = GET /file = glance's checksum/os_hash_value ($g_sha512)"
    echo "$id"
}

# Happy path, chunked, 64 MiB, then the active image's error and delete cases.
if id=$(upload_and_verify chunked $((64 * 1024 * 1024)) 20261122 | tail -n 1) && [ -n "$id" ]; then
    run reupload "$id"
    run delete "$id"
fi
upload_and_verify exact $((5 * 1024 * 1024 + 12345)) 77 exact > /dev/null || true

run missing
run deleted-mid-upload
run source-fails
run short-source
run long-source
run failover
run all-dead
run stalled-upload
run hung-server
run unavailable
run token-not-leaked
run bad-location

# nova's rbd direct snapshot: an rbd:// location (glance's rbd store reads the size from RBD).
rbd_admin() { timeout 60 rbd --conf "$CEPH_CONF" --id admin --keyring "$CEPH_ADMIN_KEYRING" "$@"; }
if [[ ",${GLANCE_STORES:-}," == *,rbd,* ]] && command -v rbd > /dev/null \
    && svc_load_env ceph && [ -n "${CEPH_CONF:-}" ] && [ -n "${CEPH_FSID:-}" ] \
    && [ -r "${CEPH_ADMIN_KEYRING:-}" ]; then
    rbd_image="${CEPH_IMAGES_POOL:-images}/ca-test-client-$$-$RANDOM"
    if rbd_admin create --size 8M "$rbd_image" > "$tmp/rbd.log" 2>&1 \
        && rbd_admin snap create "$rbd_image@snap" >> "$tmp/rbd.log" 2>&1 \
        && rbd_admin snap protect "$rbd_image@snap" >> "$tmp/rbd.log" 2>&1; then
        loc_url="rbd://$CEPH_FSID/$rbd_image/snap"
        if out=$("$check" location "$loc_url" $((8 * 1024 * 1024)) 2>&1); then
            # Deleting the image makes glance delete the RBD image behind it.
            loc_id=$(head -n 1 <<< "$out")
            created+=("$loc_id")
            pass "$(tail -n 1 <<< "$out")"
        else
            failc "location: $out"
        fi
    else
        log "note: rbd location case skipped, could not prepare an RBD snapshot:" \
            "$(tail -n 3 "$tmp/rbd.log")"
    fi
else
    log "note: rbd location case skipped (glance stores '${GLANCE_STORES:-}', Ceph not usable)"
fi

bench=${CA_GLANCE_BENCH_MIB:-1024}
if [ "$bench" -gt 0 ]; then
    run throughput "$bench"
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
