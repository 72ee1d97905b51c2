"""Samples and forwards a sequential decision uses against the fixed design, and what --measure-steps costs in
accuracy: the rows of docs/performance.md "Sequential decisions" and "--measure-steps".

    python benchmarks/bench_sequential.py            # the digits series (normscope demo's checkpoints), CPU
    python benchmarks/bench_sequential.py --families # also the tiny families' --measure-steps error

For every checkpoint of the bundled digits runs (AWM at steps 10-40, NFT, and both with NormGuard) against the
gate: the fixed design (10 digit prompts x 4 seeds, paired) and ``--until-decided`` (seed-major, batches of 10:
one look per seed pass), their verdicts, samples and transformer forwards. Then, from the fixed runs' per-step
mean ratios, the headline from K steps (``--measure-steps K``: exactly what a K-step run holds, tested in
tests/test_measure_steps.py) against all steps.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from normscope.commands.compare import compare  # noqa: E402
from normscope.commands.demo import lora_path, probe  # noqa: E402
from normscope.measure.stats import select, step_profile  # noqa: E402
from normscope.measure.subsample import subsampled_headline  # noqa: E402

SERIES = [("awm", 10), ("awm", 20), ("awm", 30), ("awm", 40), ("awm-normguard", 40), ("nft", 40),
          ("nft-normguard", 40)]


def forwards(summary: dict, k: int | None = None) -> int:
    """Transformer forwards of paired mode (one call holds the CFG batch): the driver at every step, the other
    at every step or at K."""
    steps = summary["config"]["steps"]
    return summary["samples_used"] * (steps + (k or steps))


def verdict(summary: dict, gate: float) -> str:
    from normscope.commands.check import verdict as check_verdict

    return check_verdict(summary, gate)


def digits(gate: float, ks: list[int]) -> None:
    print("| checkpoint | fixed: inflation, verdict | samples fixed | samples sequential | forwards fixed | forwards sequential | sequential verdict, interval |")
    print("|---|---|---|---|---|---|---|")
    errors = {k: [] for k in ks}
    for name, step in SERIES:
        lora = lora_path(name, step)
        fixed = compare(probe(lora)).summary
        seq = compare(probe(lora, batch_size=10, until_decided=gate)).summary
        s = seq["sequential"]
        lo, hi = s["cs"]
        interval = "n/a" if lo is None or hi is None else f"[{lo * 100:+.1f} %, {hi * 100:+.1f} %]"
        print(f"| {name} checkpoint-{step} | {fixed['inflation'] * 100:+.2f} %, {verdict(fixed, gate)} | "
              f"{fixed['samples_used']} | {seq['samples_used']} | {forwards(fixed)} | {forwards(seq)} | "
              f"{verdict(seq, gate)} ({s['decision']}{', close' if s['close'] else ''}), {interval} |", flush=True)
        result = compare(probe(lora))
        profile = step_profile(select(result.frame, "paired", "guided"))
        for k in ks:
            errors[k].append(subsampled_headline(profile["ratio"].to_numpy(), profile["sigma"].to_numpy(), k)
                             - result.inflation)
    print()
    accuracy_table("digits series (7 checkpoints, 10 steps)", errors)


def accuracy_table(title: str, errors: dict[int, list[float]]) -> None:
    print(f"{title}: headline from K steps minus all steps, in points of inflation")
    print("| K | mean abs error | max abs error |")
    print("|---|---|---|")
    for k, values in errors.items():
        values = np.abs(values) * 100
        print(f"| {k} | {values.mean():.3f} | {values.max():.3f} |")
    print(flush=True)


def families(ks: list[int], steps: int = 10) -> None:
    """The tiny families (random weights): each against itself with proj_out x 1.1 is too regular to matter,
    so a seeded random LoRA-like perturbation of every linear layer gives an uneven per-step profile."""
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    from normscope.builders.tiny import save_tiny, tiny_flux_pipeline, tiny_sd3_pipeline
    from normscope.builders.tiny_families import FAMILY_BUILDERS
    from normscope.config import CompareConfig

    builders = {"StableDiffusion3Pipeline": tiny_sd3_pipeline, "FluxPipeline": tiny_flux_pipeline,
                **{k: v for k, v in FAMILY_BUILDERS.items() if k != "FluxKontextPipeline"}}

    errors = {k: [] for k in ks}
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, build in builders.items():
            try:
                folder = save_tiny(build(seed=0), Path(tmp) / key)
            except Exception as exc:  # noqa: BLE001 - a family this environment cannot build is left out, said so
                print(f"{key}: not built ({type(exc).__name__})")
                continue
            weights = sorted((folder / "transformer").glob("*.safetensors"))
            if len(weights) != 1:
                continue
            state = load_file(str(weights[0]))
            g = torch.Generator().manual_seed(0)
            tuned = {k: (v * (1 + 0.2 * torch.randn(v.shape, generator=g)) if v.ndim == 2 else v).contiguous()
                     for k, v in state.items()}
            path = Path(tmp) / f"{key}-tuned.safetensors"
            save_file(tuned, str(path))
            try:
                result = compare(CompareConfig(tuned=str(path), pipeline=str(folder), prompts=("a red fox", "two apples",
                                 "a blue car", "a sign"), seeds=(0, 1), steps=steps, device="cpu", dtype="float32",
                                 height=16, width=16, max_sequence_length=16))
            except Exception as exc:  # noqa: BLE001
                print(f"{key}: compare failed ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            profile = step_profile(select(result.frame, "paired", "guided"))
            names.append(key)
            for k in ks:
                errors[k].append(subsampled_headline(profile["ratio"].to_numpy(), profile["sigma"].to_numpy(), k)
                                 - result.inflation)
    accuracy_table(f"tiny families ({', '.join(names)}; {steps} steps)", errors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gate", type=float, default=0.05)
    parser.add_argument("--families", action="store_true")
    args = parser.parse_args()
    ks = [2, 3, 4, 5, 6, 8]
    digits(args.gate, ks)
    if args.families:
        families(ks)


if __name__ == "__main__":
    main()
