"""Time and peak memory of a Wan compare against the plain pipeline call on the same config.

    python benchmarks/bench_video.py                      # CPU: Wan2.2-A14B layout (two experts), UniPC
    python benchmarks/bench_video.py --layers 4 --heads 12 --size 256 --frames 33 --device cuda --dtype bfloat16

Every variant runs on the same saved pipeline (tiny text encoder and VAE, two transformers made large enough
for their weights and activations to dominate). Peak memory (RSS on the CPU, ``max_memory_allocated`` on
CUDA) comes from one process per variant, above a process that has only imported torch and diffusers; the
times come from one process running the variants interleaved (best of ``--repeats`` rounds after a warm-up
round), so a busy machine slows them alike:

* plain  — the plain diffusers WanPipeline call, base weights, nothing hooked: the floor;
* paired — ``normscope compare`` in paired mode, TUNED a Flow-Factory checkpoint changing both experts
  (full weights: a second copy of each transformer);
* free   — ``normscope compare`` in free mode (two pipeline calls per batch: base, then tuned);
* lora   — paired mode, TUNED a diffusers LoRA with ``transformer.`` and ``transformer_2.`` keys (one copy
  of each transformer, the adapter on and off).

Times are of the sampling calls alone (loading excluded): ``plain`` is ``pipe(**kwargs)``; the others are
normscope's own ``run_paired`` / ``run_free`` with the per-frame observer attached, on models loaded by
``load_models``. The ratios are against ``plain``: paired mode computes the transformer twice per call
(driver and other model) and free mode samples twice, so 2.0 is the floor of both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SETUP = r"""
import json, os, resource, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, diffusers  # noqa: F401
root, args = sys.argv[1], json.loads(sys.argv[2])
cuda = args["device"] == "cuda"
dtype = getattr(torch, args["dtype"])
prompts = ["a red fox running through snow", "two green apples on a table"]
seeds = (0, 1)

def sync():
    if cuda:
        torch.cuda.synchronize()

def variant_call(variant):
    from normscope.config import ProbeConfig
    from normscope.load import load_models, load_pipeline
    from normscope.measure.frames import FrameNorms
    from normscope.measure.prompts import make_samples
    from normscope.measure.sampling import SilentReporter, run_free, run_paired, sampling_kwargs
    pipe = load_pipeline(root + "/pipe", dtype, args["device"])
    probe = ProbeConfig(prompts=tuple(prompts), seeds=seeds, steps=args["steps"], height=args["size"], width=args["size"],
                        num_frames=args["frames"], guidance=4.0, max_sequence_length=32)
    kwargs = sampling_kwargs(pipe, probe, make_samples(prompts, seeds))
    if variant == "plain":  # the user's own call: nothing hooked, nothing recorded
        def call():
            with torch.no_grad():
                pipe(**dict(kwargs, generator=[torch.Generator().manual_seed(s) for _ in prompts for s in seeds]))
        return call
    tuned = root + ("/lora.safetensors" if variant == "lora" else "/checkpoint-10")
    loaded = load_models(pipe, None, tuned, root + "/pipe")
    runner = run_free if variant == "free" else run_paired
    models = (loaded.base, loaded.tuned) if variant == "free" else (loaded.tuned, loaded.base)
    return lambda: runner(pipe, *models, kwargs, SilentReporter(), [FrameNorms()])

def timed(fn):
    sync(); start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start
"""

# Peak memory: one variant per process (loading included), above a process that only imported torch/diffusers.
MEMORY = SETUP + r"""
variant = sys.argv[3]
if variant != "import":
    call = variant_call(variant)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    call()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
print(json.dumps({"peak_mib": peak / 1024, "gpu_peak_mib": gpu}))
"""

# Time: every variant in one process, interleaved round by round after a warm-up round, best of the rounds,
# so that a busy machine slows all of them alike.
TIME = SETUP + r"""
variants = ("plain", "paired", "free", "lora")
calls = {v: variant_call(v) for v in variants}
best = {}
for round_ in range(args["repeats"] + 1):
    for v in variants:
        took = timed(calls[v])
        if round_:
            best[v] = min(best.get(v, took), took)
print(json.dumps(best))
"""


def build(root: Path, layers: int, heads: int) -> int:
    from normscope.builders.tiny_video import _transformer, save_tiny_video, tiny_wan_pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from video_factory import flow_factory_checkpoint, save_two_expert_lora

    overrides = dict(num_layers=layers, num_attention_heads=heads, attention_head_dim=64, ffn_dim=heads * 64 * 4)
    pipe = tiny_wan_pipeline(seed=0, sampler="unipc", two_experts=True)
    pipe.transformer = _transformer(0, **overrides)
    pipe.transformer_2 = _transformer(5, **overrides)
    save_tiny_video(pipe, root / "pipe")
    flow_factory_checkpoint(root / "pipe", root / "checkpoint-10", {"transformer": 1.05, "transformer_2": 1.05})
    save_two_expert_lora(pipe, root / "lora.safetensors")
    return sum(p.numel() for p in pipe.transformer.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    settings = json.dumps(vars(args))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = build(root, args.layers, args.heads)
        results = {}
        for variant in ("import", "plain", "paired", "free", "lora"):
            out = subprocess.run([sys.executable, "-c", MEMORY, str(root), settings, variant], capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        out = subprocess.run([sys.executable, "-c", TIME, str(root), settings], capture_output=True, text=True, check=True)
        for variant, seconds in json.loads(out.stdout.strip().splitlines()[-1]).items():
            results[variant]["best_s"] = seconds
    floor = results["import"]["peak_mib"]
    plain = results["plain"]
    print(f"each transformer: {params / 1e6:.2f}M params; latents {args.frames} frames at {args.size} px, {args.steps} steps, "
          f"4 samples, CFG 4, UniPC; device {args.device} {args.dtype}; import-only RSS {floor:.0f} MiB")
    print(f"{'variant':<8}{'call s':>9}{'vs plain':>10}{'peak MiB':>11}{'above import':>14}{'vs plain':>10}")
    for variant in ("plain", "paired", "free", "lora"):
        r = results[variant]
        call = r["best_s"]
        above = r["peak_mib"] - floor
        memory = r["gpu_peak_mib"] if r["gpu_peak_mib"] is not None else above
        plain_memory = plain["gpu_peak_mib"] if plain["gpu_peak_mib"] is not None else plain["peak_mib"] - floor
        print(f"{variant:<8}{call:>9.3f}{call / plain['best_s']:>10.2f}{r['peak_mib']:>11.0f}{memory:>14.0f}{memory / plain_memory:>10.2f}")


if __name__ == "__main__":
    main()
