#!/usr/bin/env bash
# Every map of the README's "where the mixture wins" table, in the order they were run; resumable: re-run after an
# interruption and each step continues where it stopped (finished base runs and map points are skipped).
#   nohup nice -n 10 bash benchmarks/map_all.sh RUNS_DIR > map_all.log 2>&1 &
set -euo pipefail
RUNS=${1:-runs}
cd "$(dirname "$0")"
run() { python -m smalltalk run --threads 1 --no-progress --until shard "$@"; }
map() { python map.py --threads 1 --batches 8,32 --lrs 0.01,0.02 --split-fractions 0.5,0.8 "$@"; }

# 42k-parameter experts (the `cpu` preset's), E = 4 and 8, up to 100 tokens per expert parameter.
run --config cpu --out "$RUNS/cpu-base"
map --base-run "$RUNS/cpu-base" --out "$RUNS/map-42k-e4" --size 42k --budgets 2,8,30,100
run --config cpu --num-experts 8 --name cpu-e8 --out "$RUNS/cpu-base-e8"
map --base-run "$RUNS/cpu-base-e8" --out "$RUNS/map-42k-e8" --size 42k --budgets 2,8,30,100
# 1M-parameter experts on the whole corpus, E = 4, up to 50 tokens per expert parameter.
run --config configs/map-full-e4.yaml --out "$RUNS/map-full-e4"
map --base-run "$RUNS/map-full-e4" --out "$RUNS/map-1m-e4" --size 1m --budgets 2,6,20,50
python map_fit.py
