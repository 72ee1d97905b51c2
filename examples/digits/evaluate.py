"""Stage 3: reward, quality and normscope's inflation for the base and every RL run; the tables of README.md.

    python examples/digits/evaluate.py             # after train_base.py and run_all.sh; also ships the seed-0 runs
    python examples/digits/evaluate.py --rescale   # only the rows "RL + inference rescale" (needs awm/nft runs)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from common import ASSETS, WORK, timed, write_json

from normscope.builders.digits import SAMPLING, digit_prompt, generate, load_classifier, quality, reward
from normscope.commands.compare import compare
from normscope.config import CompareConfig

EVAL_SEEDS = list(range(50_000, 50_016))  # 16 images per digit for reward and quality
PROBE_SEEDS = (0, 1, 2, 3)  # normscope's probe: 10 prompts x 4 seeds = 40 samples
NAMES = ("awm", "awm-normguard", "nft", "nft-normguard")
RL_SEEDS = (0, 1, 2)
FINAL = 40
SHIPPED = ASSETS / "runs"


def probe(**overrides) -> CompareConfig:
    fields = dict(
        tuned="", pipeline=str(ASSETS / "pipeline"), prompts=tuple(digit_prompt(d) for d in range(10)), seeds=PROBE_SEEDS,
        steps=SAMPLING["steps"], guidance=SAMPLING["guidance"], height=SAMPLING["height"], width=SAMPLING["width"],
        max_sequence_length=SAMPLING["max_sequence_length"], device="cpu", dtype="float32", batch_size=40,
    )
    fields.update(overrides)
    return CompareConfig(**fields)


def sample_metrics(lora: Path | None, classifier, real, rescale: bool = False) -> dict:
    """Reward and quality of 160 images; ``rescale``: the tuned velocity rescaled at every step to the base's norm
    on the same input (normscope's capture, the same hook ``compare --rescale-to-base`` uses)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import PeftModel

    from normscope.guard import adapter_layers
    from normscope.load import AdapterModel
    from normscope.measure.capture import capture

    pipe = StableDiffusion3Pipeline.from_pretrained(str(ASSETS / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    sampling = contextlib.nullcontext()
    if lora is not None:
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(lora)).eval()
        if rescale:  # one module, the adapter on for the tuned model and off for the base
            layers = adapter_layers(pipe.transformer)
            tuned = AdapterModel("tuned", pipe.transformer, str(lora), "lora", layers, enabled=True)
            base = AdapterModel("base", pipe.transformer, "pipeline", "pipeline", layers, enabled=False)
            sampling = capture(pipe, tuned, base, rescale_to_other=True)
    digits = [d for d in range(10) for _ in EVAL_SEEDS]
    with sampling:
        images = generate(pipe, digits, EVAL_SEEDS * 10)
    labels = torch.tensor(digits)
    return {"reward": float(reward(images, labels, classifier).mean()), **quality(images, labels, classifier, real)}


def inflation(lora: Path) -> dict:
    out = {}
    for key, overrides in (("paired", dict(mode="paired")), ("paired_base_drives", dict(mode="paired", drive="base")),
                           ("free", dict(mode="free"))):
        summary = compare(probe(tuned=str(lora), **overrides)).summary
        out[key] = {"inflation": summary["inflation"], "ci": summary["inflation_ci"], "regions": summary["regions"],
                    "hinge_rate": summary["hinge_rate"]}
    return out


def rescale_rows() -> None:
    """The rows "RL + inference rescale": the plain RL runs' final checkpoints sampled with the rescale, added to
    results.json (the other rows are left as they are)."""
    classifier, real = load_classifier(ASSETS)
    results = json.loads((ASSETS / "results.json").read_text())
    timings: dict = {}
    with timed("rescale", timings):
        for name in ("awm", "nft"):
            for seed in RL_SEEDS:
                lora = checkpoint(name, seed)
                summary = compare(probe(tuned=str(lora), mode="paired", rescale_to_base=True)).summary
                row = {"plain": sample_metrics(lora, classifier, real), **sample_metrics(lora, classifier, real, rescale=True)}
                for mode in ("paired", "rescaled"):
                    g = summary["modes"][mode]["guided"]
                    row[mode] = {"inflation": g["inflation"], "ci": g["inflation_ci"], "estimates": g["estimates"],
                                 "regions": g["regions"]}
                results.setdefault("rescaled", {})[f"{name}-s{seed}"] = row
                print(name, seed, {k: row[k] for k in ("reward", "fd", "diversity")}, flush=True)
    results.setdefault("timings", {}).update(timings)
    write_json(WORK / "results.json", results)
    write_json(ASSETS / "results.json", results)


def checkpoint(name: str, seed: int, step: int = FINAL) -> Path:
    return WORK / "runs" / f"{name}-s{seed}" / "checkpoints" / f"checkpoint-{step}" / "lora"


def main() -> None:
    classifier, real = load_classifier(ASSETS)
    results: dict = {"base": sample_metrics(None, classifier, real), "runs": {}, "series": {}}
    timings: dict = {}
    with timed("evaluate", timings):
        for name in NAMES:
            for seed in RL_SEEDS:
                lora = checkpoint(name, seed)
                log = json.loads((lora.parents[2] / "train_log.json").read_text())
                results["runs"][f"{name}-s{seed}"] = {
                    **sample_metrics(lora, classifier, real), **inflation(lora), "train_seconds": log["seconds"],
                }
                print(name, seed, {k: v for k, v in results["runs"][f"{name}-s{seed}"].items() if k in ("reward", "fd", "paired")}, flush=True)
            results["series"][name] = [
                {"step": step, **{k: v for k, v in compare(probe(tuned=str(checkpoint(name, 0, step)))).summary.items()
                                  if k in ("inflation", "inflation_ci")}}
                for step in (10, 20, 30, 40)
            ]
    results["timings"] = timings
    write_json(WORK / "results.json", results)
    write_json(ASSETS / "results.json", results)
    ship()


def ship() -> None:
    """The seed-0 runs' final checkpoints (AWM's whole series), laid out as the trainers write them, into the package."""
    shutil.rmtree(SHIPPED, ignore_errors=True)
    for name in NAMES:
        source = WORK / "runs" / f"{name}-s0"
        for ckpt in sorted((source / "checkpoints").iterdir()):
            if name != "awm" and ckpt.name != f"checkpoint-{FINAL}":
                continue  # keeps the package small: normscope demo shows AWM's series only
            target = SHIPPED / name / "checkpoints" / ckpt.name / "lora"
            shutil.copytree(ckpt / "lora", target, ignore=shutil.ignore_patterns("README.md"))
        shutil.copy(source / "train_log.json", SHIPPED / name / "train_log.json")


def summarize_table(results: dict) -> str:
    """Markdown: mean +- std over the 3 RL seeds for every method."""
    rows = ["| model | reward | FD to real (lower better) | diversity | out-of-range px | inflation paired (tuned drives) | paired (base drives) | free |",
            "|---|---|---|---|---|---|---|---|"]
    b = results["base"]
    rows.append(f"| base | {b['reward']:.3f} | {b['fd']:.2f} | {b['diversity']:.2f} | {b['out_of_range'] * 100:.1f} % | 0 | 0 | 0 |")
    for name in NAMES:
        runs = [results["runs"][f"{name}-s{s}"] for s in RL_SEEDS]

        def ms(values, scale=1.0, fmt=".3f", unit=""):
            values = np.array(values) * scale
            return f"{values.mean():{fmt}}{unit} ± {values.std(ddof=1):{fmt}}{unit}"

        rows.append(
            f"| {name} | {ms([r['reward'] for r in runs])} | {ms([r['fd'] for r in runs], fmt='.2f')} | "
            f"{ms([r['diversity'] for r in runs], fmt='.2f')} | {ms([r['out_of_range'] for r in runs], 100, '.1f', ' %')} | "
            f"{ms([r['paired']['inflation'] for r in runs], 100, '+.1f', ' %')} | "
            f"{ms([r['paired_base_drives']['inflation'] for r in runs], 100, '+.1f', ' %')} | "
            f"{ms([r['free']['inflation'] for r in runs], 100, '+.1f', ' %')} |"
        )
        if name in ("awm", "nft") and "rescaled" in results:
            runs = [results["rescaled"][f"{name}-s{s}"] for s in RL_SEEDS]
            rows.append(
                f"| {name} + inference rescale | {ms([r['reward'] for r in runs])} | {ms([r['fd'] for r in runs], fmt='.2f')} | "
                f"{ms([r['diversity'] for r in runs], fmt='.2f')} | {ms([r['out_of_range'] for r in runs], 100, '.1f', ' %')} | "
                f"{ms([r['rescaled']['estimates']['step_mean']['inflation'] for r in runs], 100, '+.1f', ' %')} (applied: 0) | – | – |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    if "--rescale" in sys.argv[1:]:
        rescale_rows()
    else:
        main()
    print(summarize_table(json.loads((WORK / "results.json").read_text())))
