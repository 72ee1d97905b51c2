#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one run that prints one table (benchmarks/bench_gpu.py says what).
#
#   benchmarks/gpu.sh            # on a CUDA machine: mid-size SD3- and FLUX-architecture models, bfloat16 (< 8 min)
#   benchmarks/gpu.sh --smoke    # on a CPU: the same code on tiny sizes, to know the script is not broken
#
# Paste the printed table, with the device name it starts with, into docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PYTHON" benchmarks/bench_gpu.py "$@"
