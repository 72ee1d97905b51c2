"""Time and peak memory of a Wan compare against the plain pipeline call on the same config.

    python benchmarks/bench_video.py                      # CPU: Wan2.2-A14B layout (two experts), UniPC
    python benchmarks/bench_video.py --layers 4 --heads 12 --size 256 --frames 33 --device cuda --dtype bfloat16

Each variant runs in its own process on the same saved pipeline (tiny text encoder and VAE, two transformers
made large enough for their weights and activations to dominate) and reports the wall time of its pipeline
call(s) (best of ``--repeats`` after a warm-up) and its peak memory (RSS on the CPU, ``max_memory_allocated``
on CUDA) above a process that has only imported torch and diffusers:

* plain  — the plain diffusers WanPipeline call, base weights, nothing hooked: the floor;
* paired — ``normscope compare`` in paired mode, TUNED a Flow-Factory checkpoint changing both experts
  (full weights: a second copy of each transformer);
* free   — ``normscope compare`` in free mode (two pipeline calls per batch: base, then tuned);
* lora   — paired mode, TUNED a diffusers LoRA with ``transformer.`` and ``transformer_2.`` keys (one copy
  of each transformer, the adapter on and off).

The ratios are against ``plain``; paired mode computes twice the transformer calls of a plain call by
definition (driver and other model), so 2.0 is its floor, and free mode's floor is 2.0 as well.
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

CHILD = r"""
import json, os, resource, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, diffusers  # noqa: F401
variant, root, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cuda = args["device"] == "cuda"
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dtype = getattr(torch, args["dtype"])
prompts = ["a red fox running through snow", "two green apples on a table"]
seeds = (0, 1)
call = dict(num_inference_steps=args["steps"], height=args["size"], width=args["size"], num_frames=args["frames"],
            guidance_scale=4.0, max_sequence_length=32, output_type="latent")
times = []

def sync():
    if cuda:
        torch.cuda.synchronize()

if variant == "import":
    pass
elif variant == "plain":
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(root + "/pipe", torch_dtype=dtype).to(args["device"])
    pipe.set_progress_bar_config(disable=True)
    batch = [p for p in prompts for _ in seeds]
    for i in range(args["repeats"] + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(); start = time.perf_counter()
        with torch.no_grad():
            pipe(prompt=batch, generator=[torch.Generator().manual_seed(s) for _ in prompts for s in seeds], **call)
        sync(); times.append(time.perf_counter() - start)
else:
    from normscope.commands.compare import compare
    from normscope.config import CompareConfig
    tuned = root + ("/lora.safetensors" if variant == "lora" else "/checkpoint-10")
    mode = "free" if variant == "free" else "paired"
    config = CompareConfig(tuned=tuned, pipeline=root + "/pipe", prompts=tuple(prompts), seeds=seeds, steps=args["steps"],
                           height=args["size"], width=args["size"], num_frames=args["frames"], guidance=4.0,
                           max_sequence_length=32, device=args["device"], dtype=args["dtype"], mode=mode, figure=False)
    for i in range(args["repeats"] + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync(); start = time.perf_counter()
        compare(config)  # includes loading: measured separately below and subtracted
        sync(); total = time.perf_counter() - start
        times.append(total)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
print(json.dumps({"variant": variant, "best_s": min(times[1:]) if len(times) > 1 else None,
                  "peak_mib": peak / 1024, "baseline_mib": baseline / 1024, "gpu_peak_mib": gpu}))
"""

LOAD_ONLY = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from normscope.load import load_models, load_pipeline
root, args, variant = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
tuned = root + ("/lora.safetensors" if variant == "lora" else "/checkpoint-10")
times = []
for _ in range(args["repeats"] + 1):
    start = time.perf_counter()
    pipe = load_pipeline(root + "/pipe", getattr(torch, args["dtype"]), args["device"])
    load_models(pipe, None, tuned, root + "/pipe")
    times.append(time.perf_counter() - start)
print(json.dumps({"load_s": min(times[1:])}))
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
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    settings = json.dumps(vars(args))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = build(root, args.layers, args.heads)
        results = {}
        for variant in ("import", "plain", "paired", "free", "lora"):
            out = subprocess.run([sys.executable, "-c", CHILD, variant, str(root), settings], capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            if variant in ("paired", "lora"):
                load = subprocess.run([sys.executable, "-c", LOAD_ONLY, str(root), settings, variant], capture_output=True, text=True, check=True)
                results[variant]["load_s"] = json.loads(load.stdout.strip().splitlines()[-1])["load_s"]
        results["free"]["load_s"] = results["paired"]["load_s"]
    floor = results["import"]["peak_mib"]
    plain = results["plain"]
    print(f"each transformer: {params / 1e6:.2f}M params; latents {args.frames} frames at {args.size} px, {args.steps} steps, "
          f"4 samples, CFG 4, UniPC; device {args.device} {args.dtype}; import-only RSS {floor:.0f} MiB")
    print(f"{'variant':<8}{'call s':>9}{'vs plain':>10}{'peak MiB':>11}{'above import':>14}{'vs plain':>10}")
    for variant in ("plain", "paired", "free", "lora"):
        r = results[variant]
        call = r["best_s"] - r.get("load_s", 0.0)
        above = r["peak_mib"] - floor
        memory = r["gpu_peak_mib"] if r["gpu_peak_mib"] is not None else above
        plain_memory = plain["gpu_peak_mib"] if plain["gpu_peak_mib"] is not None else plain["peak_mib"] - floor
        print(f"{variant:<8}{call:>9.3f}{call / plain['best_s']:>10.2f}{r['peak_mib']:>11.0f}{memory:>14.0f}{memory / plain_memory:>10.2f}")


if __name__ == "__main__":
    main()
