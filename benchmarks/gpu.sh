#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one run that prints one table (benchmarks/bench_gpu.py says what).
#
#   benchmarks/gpu.sh            # on a CUDA machine: mid-size SD3- and FLUX-architecture models, bfloat16 (< 12 min)
#   benchmarks/gpu.sh --smoke    # on a CPU: the same code on tiny sizes, to know the script is not broken
#
# Paste the printed table, with the device name it starts with, into docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 480 "$PYTHON" benchmarks/bench_gpu.py "$@"
# LoRA base + tuned as one doubled-batch call (peft adapter_names) vs two calls: the GPU row of
# docs/performance.md "LoRA: one doubled call". --smoke keeps the CPU tiny size.
if [ "${1:-}" = "--smoke" ]; then
  timeout 120 "$PYTHON" benchmarks/bench_lora_batch.py --batches 1,2 --repeats 3
else
  timeout 240 "$PYTHON" benchmarks/bench_lora_batch.py --device cuda --dtype bfloat16 --layers 8 --width 1536 \
    --size 64 --batches 1,4,8,16 --repeats 10
fi
