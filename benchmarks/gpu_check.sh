#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (device tool `run`), under 8 minutes on one H200:
#   here, once:   python benchmarks/gpu_check.py --make-corpus .device/corpus      (a 2 MB corpus subset)
#   device run:   bash benchmarks/gpu_check.sh            with carry [".device"], timeout_s 540
# It uses the machine's own python3 and torch (nothing can be installed there): the project runs from src/
# via PYTHONPATH. Results (gpu_check.json / .md and each benchmark's files) go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
exec python3 benchmarks/gpu_check.py --out "$OUT" "$@"
