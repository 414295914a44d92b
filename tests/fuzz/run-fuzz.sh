#!/usr/bin/env bash
# Build the libFuzzer targets with clang (ASan+UBSan) and run each for a while, growing its corpus
# in tests/fuzz/corpus/<target>/. Whatever crashes is left as crash-* in build/fuzz: add it to the
# corpus once fixed. Usage: tests/fuzz/run-fuzz.sh [SECONDS-PER-TARGET]   (default 60)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
secs=${1:-60}
cmake -S "$root" --preset fuzz > /dev/null
cmake --build "$root/build/fuzz" -j"$(nproc)" --target fuzz-envelope fuzz-config
cd "$root/build/fuzz"
for t in envelope config; do
    mkdir -p "new-$t"
    dict=()
    [ "$t" = envelope ] && dict=(-dict="$root/tests/fuzz/json.dict")
    ./fuzz-$t -max_total_time="$secs" -max_len=65536 "${dict[@]}" "new-$t" "$root/tests/fuzz/corpus/$t"
    # Keep only inputs that add coverage to the checked-in corpus.
    ./fuzz-$t -merge=1 "$root/tests/fuzz/corpus/$t" "new-$t"
    rm -rf "new-$t"
done
