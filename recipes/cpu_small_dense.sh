#!/usr/bin/env bash
# A dense `cpu-small` LM on the full sample corpus, on CPU: prepare -> train -> evaluate -> generate -> export.
# Resumable: re-run the same command after an interruption (prepare is idempotent, train resumes).
# Usage: recipes/cpu_small_dense.sh [MAX_STEPS]   (default: the cpu-small preset's 500 steps, ~9 min on 2 idle
# cores; the cosine schedule spans MAX_STEPS, so another MAX_STEPS is another run: runs/cpu-small-dense-STEPS)
set -euo pipefail
STEPS=${1:-500}
SUFFIX=$([ "$STEPS" = 500 ] && echo "" || echo "-$STEPS")
DATA=runs/data-cpu
RUN=runs/cpu-small-dense$SUFFIX
OUT=benchmarks/results/cpu_small_dense${SUFFIX//-/_}
mkdir -p "$OUT"
smalltalk prepare --preset cpu --out "$DATA"
smalltalk train --data "$DATA" --model-preset cpu-small --train-preset cpu-small --out "$RUN" \
    --max-steps "$STEPS" --threads 2 --no-progress
smalltalk evaluate "$RUN/model" --data "$DATA" --split test --max-seqs 1024 --json "$OUT/test_eval.json"
for prompt in "The history of the" "def load_config(path):" "Le jeune homme" "Natalia sold clips to"; do
    echo "### prompt: $prompt"
    smalltalk generate "$RUN/model" --prompt "$prompt" --max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 0
    echo
done > "$OUT/samples.md"
smalltalk export "$RUN/model" --out "$RUN/hf"
cp "$RUN/metrics.jsonl" "$OUT/metrics.jsonl"
echo "done: $OUT"
