#!/usr/bin/env bash
# Every configuration of docs/search_efficiency.md, one log each (its last line is the bench's JSON line):
#   bash bench/search_efficiency_all.sh [LOG_DIR]        (default runs/search_efficiency)
# A configuration whose log already ends in its JSON line is skipped, so an interrupted run resumes. The PPM-guided
# row needs round 3 of the miniature reproduction (bash recipes/tiny/reproduce.sh a runs/repro). --max_samples is
# just above the k each comparison needs: sample k of a problem is the same whatever the maximum is.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/search_efficiency}
mkdir -p "$out"
run() {
    local name=$1
    shift
    if [ -s "$out/$name.log" ] && tail -n 1 "$out/$name.log" | grep -q '^{"bench"'; then
        echo "$name: done before"
        return
    fi
    echo "$name: running"
    .venv/bin/python bench/search_efficiency.py "$@" > "$out/$name.log" 2>&1
    tail -n 1 "$out/$name.log" | grep -q '^{"bench"' || { echo "$name failed: see $out/$name.log"; exit 1; }
}
run chains_8x5 --task chains --max_samples 12
run chains_16x2 --task chains --rollouts 16 --candidates 2 --max_samples 6
run tiny_8x5 --max_samples 24
run tiny_16x2 --rollouts 16 --candidates 2 --max_samples 8
if [ -d runs/repro/round_3/ppm ]; then
    run tiny_ppm_8x5 --policy runs/repro/round_3/policy --ppm runs/repro/round_3/ppm --split validation --max_samples 26
else
    echo "tiny_ppm_8x5: skipped (no runs/repro/round_3: run bash recipes/tiny/reproduce.sh a runs/repro first)"
fi
echo "all done: $out"
