#!/usr/bin/env bash
# The benchmarks end to end on a fresh machine, in one command (as root):
#
#   bench/run.sh                      the full run: 1 h 07 min on 2 cores with nothing else running (2026-11-22)
#   CA_BENCH_SMOKE=1 bench/run.sh     the smallest run of both benches (a check of the pipeline)
#
# Installs the packages (deploy/install-packages.sh all, idempotent), builds the release agent
# (incremental: nothing to do if it is up to date), brings the services up (deploy/services.sh up
# rabbitmq ceph libvirt glance), then runs bench/compare-bench.sh (qcow2: the agent against
# nova's own sequence, roofline, RPC, memory) and bench/rbd-bench.sh (Ceph RBD: cast -> image
# active), and bench/summarize.py on the JSON both write. Results:
#   bench/results/compare-<date>.{md,png,json}, rbd-<date>.{md,png,json}   each bench's detail
#   bench/results/<date>.md, <date>.png                                     the summary table, chart
# A smoke run writes the same files with -smoke in their names into CA_BENCH_RESULTS_DIR
# (default /var/tmp/ca-bench-smoke), never into bench/results. If one bench fails the other
# still runs; the exit status is then non-zero and the last lines say which failed.
#
# Environment, passed through to both benches: CA_BENCH_PAIRS (5), CA_BENCH_SIZES_GIB (compare
# "1 4", rbd "1 4 8"; CA_BENCH_RBD_SIZES_GIB sets rbd's alone), CA_BENCH_SMOKE, CA_BENCH_KEEP,
# CA_BENCH_CEPH, CA_BENCH_BUDGET_MIN and the rest of each bench's CA_BENCH_* (see their headers);
# CA_BENCH_RESULTS_DIR (bench/results), CA_BENCH_DATE (today, UTC; the date in the file names).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/deploy/lib.sh"
# shellcheck disable=SC2034 # read by lib.sh log()
SVC=bench-run
t0=$(date +%s)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
export CA_BENCH_DATE=${CA_BENCH_DATE:-$(date -u +%F)}
stem=$CA_BENCH_DATE
if [ "${CA_BENCH_SMOKE:-0}" = 1 ]; then
    export CA_BENCH_SMOKE=1
    export CA_BENCH_RESULTS_DIR=${CA_BENCH_RESULTS_DIR:-/var/tmp/ca-bench-smoke}
    stem=$CA_BENCH_DATE-smoke
    # rbd-bench.sh's smoke mode: 1 round, 1 GiB, a 2 GiB virtual disk.
    rbd_sizes=${CA_BENCH_RBD_SIZES_GIB:-${CA_BENCH_SIZES_GIB:-1}}
else
    rbd_sizes=${CA_BENCH_RBD_SIZES_GIB:-${CA_BENCH_SIZES_GIB:-1 4 8}}
fi
results=${CA_BENCH_RESULTS_DIR:-$root/bench/results}
export CA_BENCH_RESULTS_DIR=$results
mkdir -p "$results" || die "cannot create $results"
build=$root/build/release

elapsed() { local s=$(($(date +%s) - t0)); printf '%d h %02d min %02d s' $((s / 3600)) $((s % 3600 / 60)) $((s % 60)); }

log "installing packages (deploy/install-packages.sh all)"
bash "$root/deploy/install-packages.sh" all || die "deploy/install-packages.sh failed"
log "building the release agent"
{ [ -f "$build/CMakeCache.txt" ] || cmake -S "$root" --preset release > /dev/null; } &&
    cmake --build "$build" -j"$(nproc)" --target compute-agent > /dev/null ||
    die "the release build failed"
log "bringing the services up"
"$root/deploy/services.sh" up rabbitmq ceph libvirt glance || die "deploy/services.sh up failed"

failed=()
log "compare-bench.sh ($(elapsed) so far)"
if ! bash "$root/bench/compare-bench.sh" "$build"; then
    failed+=("compare-bench.sh")
    log "compare-bench.sh failed; going on with rbd-bench.sh"
fi
log "rbd-bench.sh, sizes $rbd_sizes GiB ($(elapsed) so far)"
if ! CA_BENCH_SIZES_GIB=$rbd_sizes bash "$root/bench/rbd-bench.sh" "$build"; then
    failed+=("rbd-bench.sh")
    log "rbd-bench.sh failed"
fi

if [ ${#failed[@]} -eq 0 ]; then
    status="Both benches completed."
else
    status="Failed: ${failed[*]} (its rows are missing or come from an earlier file of the same date)."
fi
[ "${CA_BENCH_SMOKE:-0}" = 1 ] && status="Smoke run (1 pair, 1 GiB). $status"
wall=$(($(date +%s) - t0))
# A failed bench's JSON (if any) is from an earlier run of the same date: left out.
skip=${failed[*]//-bench.sh/}
CA_SUMMARY_SKIP=${skip:-} /usr/bin/python3 "$root/bench/summarize.py" "$results" "$stem" "$wall" \
    "$load_start" "$status" ||
    failed+=("summarize.py")
echo
log "total wall time $(elapsed)"
if [ ${#failed[@]} -gt 0 ]; then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "results: $results/$stem.md"
