"""Sweep against naive per-checkpoint compares, and 1 against 2 processes, each measured in one run.

    python benchmarks/bench_scale.py [--checkpoints 4] [--layers 4]

* sweep: ``normscope sweep`` (free mode, the base profiled once) over N full-weight checkpoints against N
  separate ``compare --mode free`` runs (base + tuned each time). Goal: <= (N + 1) / (2N).
* LoRA sweep: the same over N peft LoRA checkpoints (r=32 on attention), where the sweep loads the pipeline
  once and swaps adapters on its one transformer; the pipeline loads are counted (sweep.json).
* processes: ``compare --mode free`` on 32 samples in one process against ``accelerate launch`` with 2 CPU
  processes (``--multi_gpu --num_processes 2`` with cpu=True), as throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from normscope.builders.tiny import save_tiny, tiny_sd3_pipeline  # noqa: E402
from normscope.commands.compare import compare  # noqa: E402
from normscope.commands.sweep import SweepConfig, sweep  # noqa: E402
from normscope.config import CompareConfig  # noqa: E402

PROBE = dict(prompts=tuple(f"prompt number {i}" for i in range(8)), seeds=(0, 1), steps=8, height=32, width=32,
             max_sequence_length=32, guidance=4.5, device="cpu", dtype="float32", batch_size=8)


def build(root: Path, checkpoints: int, layers: int) -> Path:
    from peft import LoraConfig, get_peft_model

    pipe = tiny_sd3_pipeline(seed=0, num_layers=layers, num_attention_heads=8, caption_projection_dim=64, sample_size=32)
    save_tiny(pipe, root / "pipe")
    for k in range(checkpoints):
        model = get_peft_model(tiny_sd3_pipeline(seed=0, num_layers=layers, num_attention_heads=8,
                                                 caption_projection_dim=64, sample_size=32).transformer,
                               LoraConfig(r=32, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.01 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(str(root / "lora-run" / f"checkpoint-{(k + 1) * 100}" / "lora"))
    for k in range(checkpoints):
        with torch.no_grad():
            pipe.transformer.proj_out.weight.mul_(1.02)
        pipe.transformer.save_pretrained(root / "run" / f"checkpoint-{(k + 1) * 100}" / "transformer")
    return root


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--skip-processes", action="store_true", help="only the two sweep rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp), args.checkpoints, args.layers)
        pipe = str(root / "pipe")
        ckpts = sorted((root / "run").iterdir())
        naive = timed(lambda: [compare(CompareConfig(tuned=str(c), pipeline=pipe, mode="free", **PROBE)) for c in ckpts])
        swept = timed(lambda: sweep(SweepConfig(run_dir=root / "run", out=root / "sweep", pipeline=pipe, **PROBE)))
        n = args.checkpoints
        print(f"sweep of {n} checkpoints: naive {naive:.1f} s, sweep {swept:.1f} s, ratio {swept / naive:.3f} "
              f"(goal <= (N+1)/(2N) = {(n + 1) / (2 * n):.3f})")

        loras = sorted((root / "lora-run").iterdir())
        naive = timed(lambda: [compare(CompareConfig(tuned=str(c / "lora"), pipeline=pipe, mode="free", **PROBE))
                               for c in loras])
        swept = timed(lambda: sweep(SweepConfig(run_dir=root / "lora-run", out=root / "lora-sweep", pipeline=pipe,
                                                **PROBE)))
        loads = json.loads((root / "lora-sweep" / "sweep.json").read_text())["pipeline_loads"]
        print(f"sweep of {n} LoRA checkpoints: naive {naive:.1f} s ({n} pipeline loads), sweep {swept:.1f} s "
              f"({loads} pipeline load), ratio {swept / naive:.3f} (goal <= (N+1)/(2N) = {(n + 1) / (2 * n):.3f})")
        if args.skip_processes:
            return

        cli = ["compare", str(ckpts[0]), "--pipeline", pipe, "--mode", "free", "--steps", "8", "--height", "32",
               "--width", "32", "--max-sequence-length", "32", "--seeds", "0-3", "--batch-size", "4",
               "--device", "cpu", "--format", "json"] + sum((["--prompt", p] for p in PROBE["prompts"]), [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        one = timed(lambda: subprocess.run([sys.executable, "-m", "normscope", *cli], env=env, check=True, capture_output=True))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "normscope"]
        two = timed(lambda: subprocess.run([*launch, *cli], env=env, check=True, capture_output=True))
        print(f"32 samples, free mode, whole command: 1 process (2 threads) {one:.1f} s, 2 processes (1 thread each) "
              f"{two:.1f} s, throughput x{one / two:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
