"""Cost of ``compare --maps`` against the same compare without it, on the bundled digits model.

    python benchmarks/bench_maps.py                    # CPU: digits model (4-layer SD3, 2x2 patches), AWM LoRA
    python benchmarks/bench_maps.py --device cuda --repeats 5

Variants, interleaved after a warm-up (each pair run back to back, in alternating order), median of
``--repeats`` of wall time and of the process's CPU time (on a shared machine the CPU time is the less
disturbed number: other users' processes slow the wall clock, not the work done):

* paired mode with and without ``--maps`` (maps, channel ratios, spectra, grid energies on the device);
* both modes with and without ``--maps`` (adds the VAE decode of free mode's final images and the image
  signals, computed on the host with scikit-image).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from normscope.commands.compare import compare  # noqa: E402
from normscope.commands.demo import lora_path, probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per digit prompt (10 prompts)")
    args = parser.parse_args()
    seeds = tuple(range(args.seeds))
    variants = {
        (mode, maps): probe(lora_path("awm"), mode=mode, maps=maps, seeds=seeds, device=args.device, figure=False)
        for mode in ("paired", "both") for maps in (False, True)
    }
    compare(variants[("paired", True)])  # warm-up: imports, first allocations
    wall = {key: [] for key in variants}
    cpu = {key: [] for key in variants}
    for repeat in range(args.repeats):
        for mode in ("paired", "both"):
            for maps in ((False, True) if repeat % 2 == 0 else (True, False)):
                start, start_cpu = time.perf_counter(), time.process_time()
                compare(variants[(mode, maps)])
                wall[(mode, maps)].append(time.perf_counter() - start)
                cpu[(mode, maps)].append(time.process_time() - start_cpu)
    for mode in ("paired", "both"):
        line = [f"{mode:7s}"]
        for name, times in (("wall", wall), ("cpu", cpu)):
            off, on = statistics.median(times[(mode, False)]), statistics.median(times[(mode, True)])
            line.append(f"{name}: without {off:6.2f} s, with maps {on:6.2f} s, ratio {on / off:.3f}")
        print(" | ".join(line))


if __name__ == "__main__":
    main()
