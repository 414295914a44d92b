#!/usr/bin/env bash
# The project's test command (README, CI): install what is missing, build the asan and debug
# presets, run the unit tests under ASan+UBSan and under valgrind, then the integration tests
# (ASan build) against the real services from deploy/, which are torn down afterwards even when a
# test fails. Prints ctest's summary; exits non-zero if anything failed.
#
#   tests/run.sh            everything
#   tests/run.sh unit       unit tests only (no services)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
what=${1:-all}

"$root/deploy/install-packages.sh" all

jobs=$(nproc)
cmake --preset asan > /dev/null
cmake --build --preset asan -j"$jobs"
cmake --preset debug > /dev/null
cmake --build --preset debug -j"$jobs"

rc=0
ctest --preset asan -L unit || rc=1

# valgrind over the C unit tests of the plain debug build (ASan and valgrind do not mix).
for t in build/debug/test-*; do
    [ -x "$t" ] || continue
    if ! valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
        "$t" > "build/debug/$(basename "$t").valgrind.log" 2>&1; then
        echo "valgrind: $(basename "$t") failed:"; cat "build/debug/$(basename "$t").valgrind.log"
        rc=1
    else
        echo "valgrind: $(basename "$t") clean"
    fi
done

if [ "$what" = all ]; then
    # Integration tests start what they need through deploy/services.sh (idempotent); whatever
    # ran, stop it all at the end, pass or fail.
    trap '"$root/deploy/services.sh" down || true' EXIT
    ctest --preset asan -L integration || rc=1
fi
exit $rc
