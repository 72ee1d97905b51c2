#!/usr/bin/env bash
# Stage 2 for every method x {plain, NormGuard} x 3 RL seeds; a finished run is skipped.
# Usage: bash examples/digits/run_all.sh   (18 runs, about 12 minutes on 2 quiet CPU cores)
# The same runs, with the evaluation, the tables and the figures: python -m examples.digits.reproduce
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../../.venv/bin/python}
export HF_HUB_OFFLINE=1
NORMGUARD_LAMBDA=0.2   # chosen once, before any run; not tuned. Absolute form for every method (rl.py's default)
mkdir -p work
for method in dpo awm nft; do
  for seed in 0 1 2; do
    for guard in 0 "$NORMGUARD_LAMBDA"; do
      name="$method"; [ "$guard" != 0 ] && name="$method-normguard"
      out="work/runs/$name-s$seed"
      [ -f "$out/train_log.json" ] && { echo "skip $out"; continue; }
      echo "run $out"
      "$PY" rl.py --method "$method" --seed "$seed" --normguard "$guard" --out "$out" > "work/$name-s$seed.log" 2>&1
    done
  done
done
