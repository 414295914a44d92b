#!/usr/bin/env bash
# Integration test: the deploy/ glance-api takes an image upload the way nova sends one.
#
# Brings glance up with deploy/services.sh, then with curl against the v2 API:
#   POST /v2/images -> 201 queued; PUT /file with a wrong Content-Type -> 415 (still queued);
#   PUT /file as application/octet-stream, chunked -> 204; GET -> active, size, md5 checksum and
#   sha512 os_hash_value of the bytes; GET /file -> the same bytes; DELETE -> 204; GET -> 404.
# When Ceph is up and glance runs with the rbd store, GET /v2/info/stores must list "rbd".
# Images it created are deleted on exit. Exits 77 (skip) when curl or python3 is missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=../../deploy/lib.sh
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034  # read by log() in lib.sh
SVC=test-glance

fail() { log "FAIL: $*"; exit 1; }

command -v curl > /dev/null || { log "SKIP: curl not installed"; exit 77; }
[ -x /usr/bin/python3 ] || { log "SKIP: /usr/bin/python3 missing"; exit 77; }

tmp=$(mktemp -d)
created=()
cleanup() {
    local id
    for id in "${created[@]}"; do
        curl -s -o /dev/null --max-time 20 -X DELETE "$GLANCE_URL/v2/images/$id" || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

"$root/deploy/services.sh" up glance
svc_load_env glance
[ -n "${GLANCE_URL:-}" ] || fail "no GLANCE_URL in $(svc_dir glance)/env"

# http METHOD PATH OUTFILE [CURL ARGS...]: prints the status code; the body goes to OUTFILE.
http() {
    local method=$1 path=$2 out=$3; shift 3
    curl -sS --max-time 120 -X "$method" -o "$out" -w '%{http_code}' "$@" "$GLANCE_URL$path"
}
# json FILE KEY: one top-level field of a JSON document ("" when absent or null).
json() {
    /usr/bin/python3 -c 'import json, sys
v = json.load(open(sys.argv[1])).get(sys.argv[2])
print("" if v is None else v)' "$1" "$2"
}
expect() { [ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"; }

# 3 MiB and a bit of random bytes: several 64 KiB chunks and an odd tail.
data=$tmp/data.raw
head -c $((3 * 1024 * 1024 + 4321)) /dev/urandom > "$data"
size=$(stat -c %s "$data")
md5=$(md5sum "$data" | cut -d' ' -f1)
sha512=$(sha512sum "$data" | cut -d' ' -f1)

# Create.
name="ca-test-glance-$$-$(date +%s)"
code=$(http POST /v2/images "$tmp/create.json" -H 'Content-Type: application/json' \
    -d "{\"name\": \"$name\", \"disk_format\": \"raw\", \"container_format\": \"bare\"}")
expect "POST /v2/images" "$code" 201
id=$(json "$tmp/create.json" id)
[ -n "$id" ] || fail "no id in the create response"
created+=("$id")
expect "status after create" "$(json "$tmp/create.json" status)" queued
log "created image $id (queued)"

# A wrong Content-Type is refused before any data is stored.
code=$(http PUT "/v2/images/$id/file" "$tmp/put415.out" \
    -H 'Content-Type: application/json' --data-binary '{"not": "an image"}')
expect "PUT /file with Content-Type application/json" "$code" 415
http GET "/v2/images/$id" "$tmp/after415.json" > /dev/null
expect "status after the 415" "$(json "$tmp/after415.json" status)" queued

# Upload chunked, as glanceclient does (a generator body: no Content-Length).
code=$(http PUT "/v2/images/$id/file" "$tmp/put.out" -v \
    -H 'Content-Type: application/octet-stream' -H 'Transfer-Encoding: chunked' \
    --data-binary @"$data" 2> "$tmp/put.trace")
expect "PUT /file (chunked)" "$code" 204
grep -qi '^> Transfer-Encoding: chunked' "$tmp/put.trace" || fail "curl did not send chunked"
! grep -qi '^> Content-Length' "$tmp/put.trace" || fail "curl sent a Content-Length"

code=$(http GET "/v2/images/$id" "$tmp/image.json")
expect "GET /v2/images/$id" "$code" 200
expect "status after upload" "$(json "$tmp/image.json" status)" active
expect "size" "$(json "$tmp/image.json" size)" "$size"
expect "checksum (md5)" "$(json "$tmp/image.json" checksum)" "$md5"
expect "os_hash_algo" "$(json "$tmp/image.json" os_hash_algo)" sha512
expect "os_hash_value" "$(json "$tmp/image.json" os_hash_value)" "$sha512"
log "uploaded $size bytes chunked: active, md5 and sha512 match"

# The default store is the file store under the deploy state directory.
[ -s "$GLANCE_FILE_STORE_DIR/$id" ] || fail "no $GLANCE_FILE_STORE_DIR/$id"

code=$(http GET "/v2/images/$id/file" "$tmp/download.raw")
expect "GET /file" "$code" 200
cmp -s "$data" "$tmp/download.raw" || fail "downloaded bytes differ from the uploaded ones"
log "download matches"

code=$(http DELETE "/v2/images/$id" "$tmp/delete.out")
expect "DELETE /v2/images/$id" "$code" 204
code=$(http GET "/v2/images/$id" "$tmp/gone.out")
expect "GET after DELETE" "$code" 404
[ ! -e "$GLANCE_FILE_STORE_DIR/$id" ] || fail "file store still holds $id after DELETE"
created=()
log "deleted: 404 afterwards, file store emptied"

# The rbd store, when both Ceph and glance say it is there.
if [ -x "$root/deploy/services/ceph.sh" ] \
    && timeout 120 "$root/deploy/services/ceph.sh" check > /dev/null 2>&1; then
    case ",$GLANCE_STORES," in
        *,rbd,*)
            code=$(http GET /v2/info/stores "$tmp/stores.json")
            expect "GET /v2/info/stores" "$code" 200
            /usr/bin/python3 -c 'import json, sys
ids = [s["id"] for s in json.load(open(sys.argv[1]))["stores"]]
sys.exit(0 if "rbd" in ids else "rbd not in stores: %s" % ids)' "$tmp/stores.json" \
                || fail "rbd store missing from /v2/info/stores"
            log "ceph is up: /v2/info/stores lists rbd"
            ;;
        *) log "ceph is up but GLANCE_STORES=$GLANCE_STORES (glance started before ceph?)" ;;
    esac
else
    log "ceph not up: rbd store not checked"
fi

log "PASS"
