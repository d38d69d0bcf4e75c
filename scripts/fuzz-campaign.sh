#!/usr/bin/env bash
# Runs every fuzz target (or those named) for a time budget each, with the
# checked-in seeds and a persistent working corpus, and prints libFuzzer's
# final line per target: the figures docs/fuzzing.md records.
#
#   scripts/fuzz-campaign.sh [--seconds N] [--runs N] [--corpus DIR] [target ...]
#
# Defaults: 1800 s per target, no limit on runs (with --runs, a target
# stops at whichever limit it reaches first), corpus fuzz/corpus/<target>
# (not checked in).
# Stops at the first target that finds something, and names the artifact.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=1800
runs=-1
corpus=fuzz/corpus
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --corpus) corpus="$2"; shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
if [ ${#targets[@]} -eq 0 ]; then
    listed=$(RUSTC_BOOTSTRAP=1 cargo fuzz list)
    mapfile -t targets <<<"$listed"
fi
if [ ${#targets[@]} -eq 0 ] || [ -z "${targets[0]}" ]; then
    echo "no fuzz targets" >&2
    exit 1
fi

for t in "${targets[@]}"; do
    mkdir -p "$corpus/$t" "fuzz/logs"
    log="fuzz/logs/$t.log"
    echo "== $t: ${seconds} s, log $log"
    start=$(date +%s)
    dict=()
    [ -f "fuzz/dicts/$t.dict" ] && dict=(-dict="fuzz/dicts/$t.dict")
    # One input may take at most 60 s: a hang is a finding too.
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "$corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -runs="$runs" -timeout=60 -print_final_stats=1 \
        ${dict[@]+"${dict[@]}"} >"$log" 2>&1; then
        tail -n 40 "$log"
        if ls "fuzz/artifacts/$t/"* >/dev/null 2>&1; then
            echo "!! $t found something: see fuzz/artifacts/$t/" >&2
        else
            echo "!! $t failed to run: see $log" >&2
        fi
        exit 1
    fi
    end=$(date +%s)
    # The last status line has the final cov/ft counters; the final stats
    # have the executions.
    status=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    executed=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}')
    speed=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}')
    echo "$t: $((end - start)) s, executions $executed, exec/s $speed, last: $status"
done
