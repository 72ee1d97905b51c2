"""Stage 3: reward, quality and normscope's inflation for the base and every RL run; the tables of README.md.

    python examples/digits/evaluate.py             # after train_base.py and run_all.sh; also ships the seed-0 runs
    python examples/digits/evaluate.py --rescale   # only the rows "RL + inference rescale"
    python examples/digits/evaluate.py --steps     # only the sampler-steps study (needs the rows above)

``python -m examples.digits.reproduce`` runs all of it after retraining every run, then writes the README's
tables and the figures.
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
METHODS = ("awm", "nft", "dpo")
NAMES = tuple(n for m in METHODS for n in (m, f"{m}-normguard"))
RL_SEEDS = (0, 1, 2)
FINAL = 40
SERIES_STEPS = (10, 20, 30, 40)
STEP_COUNTS = (2, 4, 10, 20)  # the sampler-steps study; fixed before any result (README)
SHIPPED = ASSETS / "runs"


def probe(**overrides) -> CompareConfig:
    fields = dict(
        tuned="", pipeline=str(ASSETS / "pipeline"), prompts=tuple(digit_prompt(d) for d in range(10)), seeds=PROBE_SEEDS,
        steps=SAMPLING["steps"], guidance=SAMPLING["guidance"], height=SAMPLING["height"], width=SAMPLING["width"],
        max_sequence_length=SAMPLING["max_sequence_length"], device="cpu", dtype="float32", batch_size=40,
    )
    fields.update(overrides)
    return CompareConfig(**fields)


def sample_metrics(lora: Path | None, classifier, real, rescale: bool = False, steps: int = SAMPLING["steps"]) -> dict:
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
        images = generate(pipe, digits, EVAL_SEEDS * 10, steps=steps)
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


def rescale_row(lora: Path, classifier, real, steps: int = SAMPLING["steps"], plain: dict | None = None) -> dict:
    """One plain checkpoint sampled with and without the inference rescale, and its compare --rescale-to-base."""
    summary = compare(probe(tuned=str(lora), mode="paired", rescale_to_base=True, steps=steps)).summary
    row = {"plain": plain or sample_metrics(lora, classifier, real, steps=steps),
           **sample_metrics(lora, classifier, real, rescale=True, steps=steps)}
    for mode in ("paired", "rescaled"):
        g = summary["modes"][mode]["guided"]
        row[mode] = {"inflation": g["inflation"], "ci": g["inflation_ci"], "estimates": g["estimates"],
                     "regions": g["regions"]}
    return row


def rescale_rows(results: dict | None = None) -> dict:
    """The rows "RL + inference rescale": the plain RL runs' final checkpoints sampled with the rescale, added to
    results.json (the other rows are left as they are)."""
    classifier, real = load_classifier(ASSETS)
    save = results is None
    results = results if results is not None else json.loads((ASSETS / "results.json").read_text())
    timings = results.setdefault("timings", {})
    with timed("rescale", timings):
        for name in METHODS:
            for seed in RL_SEEDS:
                plain = results["runs"][f"{name}-s{seed}"]
                plain = {k: plain[k] for k in ("reward", "fd", "diversity", "out_of_range", "accuracy")}
                row = rescale_row(checkpoint(name, seed), classifier, real, plain=plain)
                results.setdefault("rescaled", {})[f"{name}-s{seed}"] = row
                print(name, seed, {k: row[k] for k in ("reward", "fd", "diversity")}, flush=True)
    if save:
        write_json(WORK / "results.json", results)
        write_json(ASSETS / "results.json", results)
    return results


METRICS = ("reward", "fd", "diversity", "out_of_range", "accuracy")
VARIANTS = ("", "-normguard", "-rescale")  # plain, + NormGuard, plain + inference rescale


def steps_study(results: dict | None = None) -> dict:
    """Every arm at every sampler step count (STEP_COUNTS), same image seeds and probe; the 10-step entries are
    the rows above (the same computation), the others are computed here."""
    classifier, real = load_classifier(ASSETS)
    save = results is None
    results = results if results is not None else json.loads((ASSETS / "results.json").read_text())
    study = {"step_counts": list(STEP_COUNTS), "base": {}, "arms": {}}
    timings = results.setdefault("timings", {})
    with timed("steps_study", timings):
        for steps in STEP_COUNTS:
            study["base"][str(steps)] = results["base"] if steps == SAMPLING["steps"] else \
                sample_metrics(None, classifier, real, steps=steps)
        for method in METHODS:
            for seed in RL_SEEDS:
                for variant in VARIANTS:
                    arm = study["arms"].setdefault(f"{method}{variant}-s{seed}", {})
                    for steps in STEP_COUNTS:
                        if steps == SAMPLING["steps"]:  # reuse the main rows: identical computation
                            if variant == "-rescale":
                                r = results["rescaled"][f"{method}-s{seed}"]
                                entry = {**{k: r[k] for k in METRICS}, "inflation": r["rescaled"]["inflation"],
                                         "inflation_ci": r["rescaled"]["ci"]}
                            else:
                                r = results["runs"][f"{method}{variant}-s{seed}"]
                                entry = {**{k: r[k] for k in METRICS}, "inflation": r["paired"]["inflation"],
                                         "inflation_ci": r["paired"]["ci"]}
                        elif variant == "-rescale":
                            plain = {k: study["arms"][f"{method}-s{seed}"][str(steps)][k] for k in METRICS}
                            r = rescale_row(checkpoint(method, seed), classifier, real, steps=steps, plain=plain)
                            entry = {**{k: r[k] for k in METRICS}, "inflation": r["rescaled"]["inflation"],
                                     "inflation_ci": r["rescaled"]["ci"]}
                        else:
                            lora = checkpoint(f"{method}{variant}", seed)
                            summary = compare(probe(tuned=str(lora), mode="paired", steps=steps)).summary
                            entry = {**sample_metrics(lora, classifier, real, steps=steps),
                                     "inflation": summary["inflation"], "inflation_ci": summary["inflation_ci"]}
                        arm[str(steps)] = entry
                    print("steps", method + variant, seed, {s: round(arm[str(s)]["fd"], 2) for s in STEP_COUNTS}, flush=True)
    study["gains"] = gains(study)
    results["steps"] = study
    if save:
        write_json(WORK / "results.json", results)
        write_json(ASSETS / "results.json", results)
    return results


T95 = {2: 4.302653, 8: 2.306004}  # Student t, 97.5 % quantile, for 3 seeds and for 9 (method, seed) pairs


def mean_ci(values) -> dict:
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    half = T95[len(values) - 1] * float(values.std(ddof=1)) / np.sqrt(len(values))
    return {"mean": mean, "ci": [mean - half, mean + half], "values": values.tolist()}


def gains(study: dict) -> dict:
    """NormGuard's (and the rescale's) gain over the plain run at each step count, paired by RL seed.

    fd: FD(plain) - FD(arm); reward: reward(arm) - reward(plain); fd_rel: fd / FD(plain) (positive: the arm is
    better). Per method over 3 seeds and pooled over the 9 (method, seed) pairs, with Student-t 95 % CIs; and
    the pre-stated test of "largest with few steps": the pooled paired difference gain(2 steps) - gain(20 steps).
    """
    arms = study["arms"]

    def gain(variant: str, method: str, seed: int, steps: int, key: str) -> float:
        plain, other = arms[f"{method}-s{seed}"][str(steps)], arms[f"{method}{variant}-s{seed}"][str(steps)]
        if key == "fd":
            return plain["fd"] - other["fd"]
        if key == "fd_rel":
            return (plain["fd"] - other["fd"]) / plain["fd"]
        return other["reward"] - plain["reward"]

    out: dict = {}
    few, many = min(STEP_COUNTS), max(STEP_COUNTS)
    for variant, label in (("-normguard", "normguard"), ("-rescale", "rescale")):
        block: dict = {}
        for key in ("fd", "reward", "fd_rel"):
            per: dict = {}
            for steps in STEP_COUNTS:
                per[str(steps)] = {m: mean_ci([gain(variant, m, s, steps, key) for s in RL_SEEDS]) for m in METHODS}
                per[str(steps)]["pooled"] = mean_ci([gain(variant, m, s, steps, key) for m in METHODS for s in RL_SEEDS])
            diff = mean_ci([gain(variant, m, s, few, key) - gain(variant, m, s, many, key)
                            for m in METHODS for s in RL_SEEDS])
            lo, hi = diff["ci"]
            diff["verdict"] = "holds" if lo > 0 else "opposite" if hi < 0 else "not shown"
            block[key] = {"by_steps": per, "few_minus_many": diff}
        out[label] = block
    return out


def checkpoint(name: str, seed: int, step: int = FINAL) -> Path:
    return WORK / "runs" / f"{name}-s{seed}" / "checkpoints" / f"checkpoint-{step}" / "lora"


def main(results: dict | None = None, save: bool = True) -> dict:
    """The main rows (10 steps, every run and seed) and the training series (checkpoints 10..40, every seed)."""
    classifier, real = load_classifier(ASSETS)
    results = {"base": sample_metrics(None, classifier, real), "runs": {}, "series": {}, **(results or {})}
    timings = results.setdefault("timings", {})
    with timed("evaluate", timings):
        for name in NAMES:
            for seed in RL_SEEDS:
                lora = checkpoint(name, seed)
                log = json.loads((lora.parents[2] / "train_log.json").read_text())
                results["runs"][f"{name}-s{seed}"] = {
                    **sample_metrics(lora, classifier, real), **inflation(lora), "train_seconds": log["seconds"],
                }
                print(name, seed, {k: v for k, v in results["runs"][f"{name}-s{seed}"].items() if k in ("reward", "fd", "paired")}, flush=True)
    with timed("series", timings):
        for name in NAMES:
            series = []
            for step in SERIES_STEPS:
                by_seed = []
                for seed in RL_SEEDS:
                    if step == FINAL:  # the main row's paired compare: the same computation
                        paired = results["runs"][f"{name}-s{seed}"]["paired"]
                        by_seed.append({"inflation": paired["inflation"], "inflation_ci": paired["ci"]})
                    else:
                        summary = compare(probe(tuned=str(checkpoint(name, seed, step)))).summary
                        by_seed.append({k: summary[k] for k in ("inflation", "inflation_ci")})
                series.append({"step": step, **by_seed[0], "by_seed": [b["inflation"] for b in by_seed]})
            results["series"][name] = series  # inflation / inflation_ci: seed 0 (the shipped run); by_seed: 0, 1, 2
    if save:
        write_json(WORK / "results.json", results)
        write_json(ASSETS / "results.json", results)
        ship()
    return results


def ship() -> None:
    """The seed-0 runs' final checkpoints (AWM's whole series), laid out as the trainers write them, into the package."""
    shutil.rmtree(SHIPPED, ignore_errors=True)
    for name in NAMES:
        source = WORK / "runs" / f"{name}-s0"
        for ckpt in sorted((source / "checkpoints").iterdir()):
            if name != "awm" and ckpt.name != f"checkpoint-{FINAL}":
                continue  # keeps the package small: normscope demo shows AWM's series only (the rest: reproduce)
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
        if "-" not in name and f"{name}-s0" in results.get("rescaled", {}):
            runs = [results["rescaled"][f"{name}-s{s}"] for s in RL_SEEDS]
            rows.append(
                f"| {name} + inference rescale | {ms([r['reward'] for r in runs])} | {ms([r['fd'] for r in runs], fmt='.2f')} | "
                f"{ms([r['diversity'] for r in runs], fmt='.2f')} | {ms([r['out_of_range'] for r in runs], 100, '.1f', ' %')} | "
                f"{ms([r['rescaled']['inflation'] for r in runs], 100, '+.1f', ' %')} (applied: 0) | – | – |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    if "--rescale" in sys.argv[1:]:
        rescale_rows()
    elif "--steps" in sys.argv[1:]:
        steps_study()
    else:
        main()
    print(summarize_table(json.loads((WORK / "results.json").read_text())))
