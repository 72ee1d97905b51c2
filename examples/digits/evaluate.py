"""Stage 3: reward, quality and normscope's inflation for the base and every RL run; the tables of README.md.

    python examples/digits/evaluate.py            # after train_base.py and run_all.sh; also ships the seed-0 runs
    python examples/digits/evaluate.py --worker   # next to run_all.sh: evaluates each run as soon as it is trained

Every run's measurements are cached in work/eval/NAME-sSEED.json (delete them to measure again): the main row
(10 steps; reward, quality, inflation paired / base drives / free), the training series, the sampler-steps study
(STEP_COUNTS) and, for the plain runs, the inference-rescale rows at every step count.

``python -m examples.digits.reproduce`` runs all of it after retraining every run, then writes the README's
tables and the figures.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import ASSETS, WORK, write_json

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


METRICS = ("reward", "fd", "diversity", "out_of_range", "accuracy")
VARIANTS = ("", "-normguard", "-rescale")  # plain, + NormGuard, plain + inference rescale


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


def evaluate_run(name: str, seed: int, classifier, real) -> dict:
    """Everything measured on one RL run (cached in WORK/eval/NAME-sSEED.json): the main row (10 steps), the
    training series (checkpoints 10..40), and the sampler-steps study; for a plain run also the inference rescale
    at every step count."""
    cache = WORK / "eval" / f"{name}-s{seed}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    started, cpu = time.perf_counter(), time.process_time()
    lora = checkpoint(name, seed)
    log = json.loads((lora.parents[2] / "train_log.json").read_text())
    row = {**sample_metrics(lora, classifier, real), **inflation(lora), "train_seconds": log["seconds"]}
    paired = {"inflation": row["paired"]["inflation"], "inflation_ci": row["paired"]["ci"]}
    out: dict = {"row": row, "series": {}, "steps": {}}
    for step in SERIES_STEPS:
        if step == FINAL:  # the main row's paired compare: the same computation
            out["series"][str(step)] = paired
            continue
        summary = compare(probe(tuned=str(checkpoint(name, seed, step)))).summary
        out["series"][str(step)] = {k: summary[k] for k in ("inflation", "inflation_ci")}
    plain = "-normguard" not in name
    if plain:
        out["rescaled"], out["rescale_steps"] = {}, {}
    for steps in STEP_COUNTS:
        if steps == SAMPLING["steps"]:  # the main row, reused
            out["steps"][str(steps)] = {**{k: row[k] for k in METRICS}, **paired}
        elif not plain:
            summary = compare(probe(tuned=str(lora), mode="paired", steps=steps)).summary
            out["steps"][str(steps)] = {**sample_metrics(lora, classifier, real, steps=steps),
                                        "inflation": summary["inflation"], "inflation_ci": summary["inflation_ci"]}
        if plain:  # one compare --rescale-to-base gives the plain paired and the rescaled trajectories
            r = rescale_row(lora, classifier, real, steps=steps,
                            plain={k: row[k] for k in METRICS} if steps == SAMPLING["steps"] else None)
            if steps == SAMPLING["steps"]:
                out["rescaled"] = r
            else:
                out["steps"][str(steps)] = {**r["plain"], "inflation": r["paired"]["inflation"],
                                            "inflation_ci": r["paired"]["ci"]}
            out["rescale_steps"][str(steps)] = {**{k: r[k] for k in METRICS}, "inflation": r["rescaled"]["inflation"],
                                                "inflation_ci": r["rescaled"]["ci"]}
    out["seconds"], out["cpu_seconds"] = round(time.perf_counter() - started, 1), round(time.process_time() - cpu, 1)
    write_json(cache, out)
    print(name, seed, f"{out['seconds']} s", {k: round(row[k], 3) for k in ("reward", "fd")},
          f"paired {row['paired']['inflation']:+.3f}", flush=True)
    return out


def evaluate_base(classifier, real) -> dict:
    cache = WORK / "eval" / "base.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    started, cpu = time.perf_counter(), time.process_time()
    out = {str(steps): sample_metrics(None, classifier, real, steps=steps) for steps in STEP_COUNTS}
    out["seconds"], out["cpu_seconds"] = round(time.perf_counter() - started, 1), round(time.process_time() - cpu, 1)
    write_json(cache, out)
    return out


def runs_in_order() -> list[tuple[str, int]]:
    return [(name, seed) for name in NAMES for seed in RL_SEEDS]


def worker(poll: float = 20.0) -> None:
    """Evaluate every run as soon as its training has finished (run next to run_all.sh); then assemble."""
    classifier, real = load_classifier(ASSETS)
    evaluate_base(classifier, real)
    pending = runs_in_order()
    while pending:
        ready = [(n, s) for n, s in pending if (checkpoint(n, s).parents[2] / "train_log.json").is_file()]
        for name, seed in ready:
            evaluate_run(name, seed, classifier, real)
            pending.remove((name, seed))
        if pending and not ready:
            time.sleep(poll)


def assemble() -> dict:
    """results.json from every run's measurements (computing what is not cached yet)."""
    classifier, real = load_classifier(ASSETS)
    base = evaluate_base(classifier, real)
    results: dict = {"base": base[str(SAMPLING["steps"])], "runs": {}, "series": {}, "rescaled": {},
                     "timings": {"evaluate": base["seconds"], "evaluate_cpu": base["cpu_seconds"]}}
    study: dict = {"step_counts": list(STEP_COUNTS), "base": {str(s): base[str(s)] for s in STEP_COUNTS}, "arms": {}}
    for name, seed in runs_in_order():
        e = evaluate_run(name, seed, classifier, real)
        results["runs"][f"{name}-s{seed}"] = e["row"]
        study["arms"][f"{name}-s{seed}"] = e["steps"]
        if "rescaled" in e:
            results["rescaled"][f"{name}-s{seed}"] = e["rescaled"]
            study["arms"][f"{name}-rescale-s{seed}"] = e["rescale_steps"]
        results["timings"]["evaluate"] += e["seconds"]
        results["timings"]["evaluate_cpu"] += e["cpu_seconds"]
    for name in NAMES:  # inflation / inflation_ci: seed 0 (the shipped run); by_seed: seeds 0, 1, 2
        per_seed = [evaluate_run(name, seed, classifier, real)["series"] for seed in RL_SEEDS]
        results["series"][name] = [{"step": step, **per_seed[0][str(step)],
                                    "by_seed": [p[str(step)]["inflation"] for p in per_seed]} for step in SERIES_STEPS]
    study["gains"] = gains(study)
    results["steps"] = study
    results["timings"] = {k: round(v, 1) for k, v in results["timings"].items()}
    return results


def main() -> dict:
    results = assemble()
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
    if "--worker" in sys.argv[1:]:
        worker()
    main()
    print(summarize_table(json.loads((WORK / "results.json").read_text())))
