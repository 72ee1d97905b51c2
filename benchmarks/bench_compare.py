"""Speed record of `normscope compare`, as ratios against floors measured in the same run.

    python benchmarks/bench_compare.py                 # CPU tiny config
    python benchmarks/bench_compare.py --layers 8 --size 512 --width 1536 --dtype bfloat16 --device cuda

* free mode   vs the plain diffusers pipeline call producing the same latents, for both models;
* paired mode vs the plain pipeline whose transformer is a bare two-forward wrapper (driver + other on
  the same inputs, nothing recorded): the least any paired measurement must compute.

Each variant runs ``--repeats`` times, interleaved, after a warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from normscope.builders.tiny import tiny_sd3_pipeline  # noqa: E402
from normscope.config import ProbeConfig  # noqa: E402
from normscope.load import VelocityModel  # noqa: E402
from normscope.measure.prompts import default_prompts, make_samples  # noqa: E402
from normscope.measure.sampling import SilentReporter, run_free, run_paired, sampling_kwargs  # noqa: E402


class TwoForward(torch.nn.Module):
    """The floor of paired mode: the other model's forward plus the driver's, on the same inputs."""

    def __init__(self, driver, other):
        super().__init__()
        self.driver, self.other = driver, other
        self.config, self.dtype, self.device = driver.config, driver.dtype, driver.device

    def forward(self, *args, **kwargs):
        self.other(*args, **kwargs)
        return self.driver(*args, **kwargs)

    def __getattr__(self, name):  # whatever else the pipeline asks of its transformer (FLUX: cache_context)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.driver, name)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_times(pipe, probe: ProbeConfig, n_samples: int, batch_size: int, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of the four variants (interleaved, after a warm-up) on ``pipe`` with a x1.1 TUNED copy:
    ``plain free`` / ``normscope free`` and ``two-forward floor`` / ``normscope paired``."""
    base_module = pipe.transformer
    tuned_module = copy.deepcopy(base_module)
    with torch.no_grad():
        tuned_module.proj_out.weight.mul_(1.1)
    base = VelocityModel("base", base_module, "bench", "pipeline")
    tuned = VelocityModel("tuned", tuned_module, "bench", "copy")
    samples = make_samples(default_prompts()[:n_samples], (0,))
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
    reporter = SilentReporter()

    def plain_free():
        for batch in batches:
            for module in (base_module, tuned_module):
                pipe.transformer = module
                pipe(**sampling_kwargs(pipe, probe, batch))
        pipe.transformer = base_module

    def normscope_free():
        for batch in batches:
            run_free(pipe, base, tuned, sampling_kwargs(pipe, probe, batch), reporter)

    def plain_paired():
        pipe.transformer = TwoForward(tuned_module, base_module)
        try:
            for batch in batches:
                pipe(**sampling_kwargs(pipe, probe, batch))
        finally:
            pipe.transformer = base_module

    def normscope_paired():
        for batch in batches:
            run_paired(pipe, tuned, base, sampling_kwargs(pipe, probe, batch), reporter)

    variants = {"plain free": plain_free, "normscope free": normscope_free,
                "two-forward floor": plain_paired, "normscope paired": normscope_paired}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in variants.items():
                times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--width", type=int, default=32, help="transformer width (heads x 8)")
    parser.add_argument("--size", type=int, default=32, help="latent side in pixels of the tiny VAE (factor 1)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    pipe = tiny_sd3_pipeline(
        seed=0, num_layers=args.layers, num_attention_heads=args.width // 8, caption_projection_dim=args.width,
        sample_size=args.size,
    ).to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    probe = ProbeConfig(steps=args.steps, height=args.size, width=args.size, max_sequence_length=64, guidance=4.5)
    med = median_times(pipe, probe, args.samples, args.batch_size, args.repeats, args.device)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"device={args.device} dtype={args.dtype} transformer={params / 1e6:.2f}M params layers={args.layers} "
          f"width={args.width} latent={args.size}x{args.size} steps={args.steps} samples={args.samples} "
          f"batch={args.batch_size} repeats={args.repeats} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'variant':<20}{'median s':>10}{'ratio':>8}")
    for floor, ours in (("plain free", "normscope free"), ("two-forward floor", "normscope paired")):
        print(f"{floor:<20}{med[floor]:>10.3f}{1.0:>8.3f}")
        print(f"{ours:<20}{med[ours]:>10.3f}{med[ours] / med[floor]:>8.3f}")
    print(f"peak memory: {peak_memory_mb(args.device):.0f} MiB ({'CUDA allocated' if args.device == 'cuda' else 'process RSS'})")


if __name__ == "__main__":
    main()
