"""The GPU rows of the performance record, in one run that prints one table (``benchmarks/gpu.sh``).

    benchmarks/gpu.sh            # on a CUDA machine: mid-size SD3- and FLUX-architecture models, bfloat16
    benchmarks/gpu.sh --smoke    # anywhere (CPU): the same code on tiny sizes, to know the script works

For each architecture, a transformer built from a config (no download: random weights, the real diffusers
classes; tiny text encoders and VAE, which normscope encodes once and never decodes here) and a full-weights
TUNED (``proj_out`` x 1.1):

* free / plain: ``normscope`` free mode against the plain pipeline calls making the same latents;
* paired / two-forward: paired mode against the plain pipeline whose transformer is a bare two-forward
  wrapper (the least any paired measurement computes);
* peak ``torch.cuda.max_memory_allocated`` of a whole ``compare`` (paired and free) without and with
  ``--offload``, and the offloaded run's time against the plain one.

Timings are medians of ``--repeats`` interleaved runs after a warm-up. On the CPU the memory column is the
process's peak RSS so far (not resettable), so only the ratios of the smoke run mean anything.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_compare import median_times, timed  # noqa: E402  (this folder: the scripts share one timing method)
from safetensors.torch import save_file  # noqa: E402

from normscope.builders.tiny import save_tiny, tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from normscope.commands.compare import compare  # noqa: E402
from normscope.config import CompareConfig, ProbeConfig  # noqa: E402
from normscope.measure.prompts import default_prompts  # noqa: E402

# Mid-size: SD3.5-Medium's width with half its depth (1.00B parameters); FLUX.1's width with about a fifth of
# its blocks (2.54B).
FULL = {
    "sd3": dict(num_layers=12, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
                patch_size=2, sample_size=64),
    "flux": dict(num_layers=4, num_single_layers=8, num_attention_heads=24, attention_head_dim=128,
                 axes_dims_rope=[16, 56, 56]),
}
SMOKE = {
    "sd3": dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16, sample_size=8),
    "flux": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16),
}
BUILDERS = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}
GUIDANCE = {"sd3": 4.5, "flux": 3.5}


def peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def speed(arch: str, overrides: dict, args, device: str, dtype) -> tuple[dict, int]:
    """Free / plain and paired / two-forward on a pipeline held in memory (bench_compare's method and code)."""
    pipe = BUILDERS[arch](seed=0, **overrides).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    probe = ProbeConfig(steps=args.steps, height=args.size, width=args.size, max_sequence_length=32, guidance=GUIDANCE[arch])
    med = median_times(pipe, probe, args.samples, args.batch_size, args.repeats, device)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    return {"free/plain": med["normscope free"] / med["plain free"],
            "paired/floor": med["normscope paired"] / med["two-forward floor"]}, params


def memory(arch: str, overrides: dict, args, device: str, root: Path) -> dict:
    """Peak device memory and time of whole ``compare`` runs (paired, free) without and with --offload."""
    pipe = BUILDERS[arch](seed=0, **overrides).to(getattr(torch, args.dtype))  # saved as users' checkpoints are
    folder = save_tiny(pipe, root / arch)
    state = {k: (v * 1.1 if k.startswith("proj_out") else v).contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(state, str(root / f"{arch}-tuned.safetensors"))
    del pipe, state
    probe = dict(prompts=tuple(default_prompts()[: args.samples]), seeds=(0,), steps=args.steps, height=args.size,
                 width=args.size, max_sequence_length=32, guidance=GUIDANCE[arch], device=device, dtype=args.dtype,
                 batch_size=args.batch_size)
    out = {}
    for mode in ("paired", "free"):
        for offload in (False, True):
            config = CompareConfig(tuned=str(root / f"{arch}-tuned.safetensors"), pipeline=str(folder), mode=mode,
                                   offload=offload, figure=False, **probe)
            reset_peak(device)
            seconds = timed(lambda config=config: compare(config), device)
            out[(mode, offload)] = (peak_gib(device), seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (CPU is fine)")
    parser.add_argument("--arch", nargs="+", default=["sd3", "flux"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--samples", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--size", type=int, help="image side in pixels (the tiny VAE has factor 1: latent side)")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    defaults = dict(steps=2, samples=2, batch_size=2, size=16, repeats=1) if args.smoke else \
        dict(steps=20, samples=8, batch_size=8, size=64, repeats=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the tiny tokenizers truncate; that notice is not a result
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke to check the script on the CPU")
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    sizes = SMOKE if args.smoke else FULL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            ratios, params = speed(arch, sizes[arch], args, device, dtype)
            mem = memory(arch, sizes[arch], args, device, Path(tmp))
            rows.append((arch, params, ratios, mem))
    unit = "GiB alloc" if device == "cuda" else "GiB RSS"
    print(f"device: {name}; torch {torch.__version__}; {args.dtype}; {args.size}x{args.size} px, {args.steps} steps, "
          f"{args.samples} samples, batch {args.batch_size}, {args.repeats} repeats{' (SMOKE)' if args.smoke else ''}")
    header = (f"| arch | transformer | free / plain | paired / two-forward | paired peak {unit} | paired --offload peak "
              f"| free peak | free --offload peak | paired --offload time x | free --offload time x |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for arch, params, ratios, mem in rows:
        p0, p1, f0, f1 = mem[("paired", False)], mem[("paired", True)], mem[("free", False)], mem[("free", True)]
        print(f"| {arch} | {params / 1e6:.1f}M | {ratios['free/plain']:.3f} | {ratios['paired/floor']:.3f} | "
              f"{p0[0]:.2f} | {p1[0]:.2f} | {f0[0]:.2f} | {f1[0]:.2f} | {p1[1] / p0[1]:.2f} | {f1[1] / f0[1]:.2f} |")


if __name__ == "__main__":
    main()
