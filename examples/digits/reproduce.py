"""Every claim of the NormGuard paper, measured on the bundled digits model, in one command.

    python -m examples.digits.reproduce            # or: make reproduce
    python -m examples.digits.reproduce --work DIR --no-ship   # elsewhere, leaving the package untouched
    python -m examples.digits.reproduce --verify --work EMPTY_DIR  # retrain all 18 runs from scratch, compare
        every checkpoint bit for bit with the package and with examples/digits/work, re-evaluate one run

1. retrains every RL run from the shipped base (AWM, NFT, DPO x {plain, NormGuard} x RL seeds 0, 1, 2; rl.py's
   defaults, one subprocess per run exactly as run_all.sh starts them; a run whose train_log.json exists in the
   work folder is kept, so point ``--work`` at an empty folder for a run from scratch);
2. checks the retrained seed-0 checkpoints against the ones in the package, tensor by tensor (bit for bit);
3. evaluates everything (evaluate.py: the main rows, the training series, the inference-rescale rows, the
   sampler-steps study and the NormGuard gain vs steps with CIs over the RL seeds);
4. writes normscope/data/digits/results.json, ships the seed-0 checkpoints, rewrites the generated tables of
   examples/digits/README.md (between ``<!-- reproduce:NAME -->`` markers) and the figures in
   examples/digits/figures/, and states its wall and CPU time.

The base itself (VAE, classifier, flow model) is not retrained here: train_base.py does that and needs
scikit-learn's digits; the RL runs and every number of the README start from the shipped base.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the example's scripts import each other by bare name (common, rl, evaluate)

import evaluate as ev  # noqa: E402
import numpy as np  # noqa: E402
from common import ASSETS, write_json  # noqa: E402

NORMGUARD_LAMBDA = 0.2  # as run_all.sh: chosen once, before any run; absolute form (rl.py's default) for every method
README = HERE / "README.md"
FIGURES = HERE / "figures"
LABELS = {"awm": "AWM", "nft": "NFT", "dpo": "DPO"}


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_name(method: str, guard: float, seed: int) -> str:
    return f"{method}{'-normguard' if guard else ''}-s{seed}"


def train_all(work: Path, python: str = sys.executable, only: tuple[str, ...] | None = None) -> dict:
    """Every RL run (or those named in ``only``), one ``rl.py`` subprocess each (as run_all.sh); finished runs are
    kept. Returns wall and CPU seconds (this process's children) of what it trained."""
    started, cpu = time.perf_counter(), cpu_seconds()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    trained = []
    for method in ev.METHODS:
        for seed in ev.RL_SEEDS:
            for guard in (0.0, NORMGUARD_LAMBDA):
                out = work / "runs" / run_name(method, guard, seed)
                if only is not None and out.name not in only:
                    continue
                if (out / "train_log.json").is_file():
                    print(f"keep {out}", flush=True)
                    continue
                print(f"train {out}", flush=True)
                (work / "logs").mkdir(parents=True, exist_ok=True)
                with open(work / "logs" / f"{out.name}.log", "w") as log:
                    subprocess.run([python, str(HERE / "rl.py"), "--method", method, "--seed", str(seed),
                                    "--normguard", str(guard), "--out", str(out)], cwd=HERE, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, check=True)
                trained.append(out.name)
    return {"wall": round(time.perf_counter() - started, 1), "cpu": round(cpu_seconds() - cpu, 1), "runs": trained}


def max_diff(a_path: Path, b_path: Path) -> float:
    """Max |difference| between two safetensors files (0.0: the same tensors bit for bit; inf: other keys)."""
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(a_path)), load_file(str(b_path))
    if a.keys() != b.keys():
        return float("inf")
    if all(torch.equal(a[k], b[k]) for k in a):
        return 0.0
    return max(float((a[k] - b[k]).abs().max()) for k in a) or float("nan")  # nan: equal values, other bits


def verify(work: Path, reference: Path = ev.WORK) -> dict:
    """Retrain everything into ``work`` (meant to be empty) and compare it with what the shipped numbers came from:
    every checkpoint against ``reference`` (the work folder the results were measured on) and the package's,
    bit for bit; then one run's evaluation against results.json. Written to WORK/verify.json after every run."""
    started = time.perf_counter()
    report: dict = {"train": {"wall": 0.0, "cpu": 0.0, "runs": []}, "work": {}}
    if (work / "verify.json").is_file():  # an interrupted verification: keep what it measured
        report = {k: v for k, v in json.loads((work / "verify.json").read_text()).items() if k in ("train", "work")}
    runs = [(n, s) for m in ev.METHODS for s in ev.RL_SEEDS for n in (m, f"{m}-normguard")]
    runs.sort(key=lambda r: (not r[0].startswith("dpo"), r[1] != 0))  # the new DPO runs first, then the seed-0 runs
    for name, seed in runs:
        step = train_all(work, only=(f"{name}-s{seed}",))
        for key in ("wall", "cpu"):
            report["train"][key] = round(report["train"][key] + step[key], 1)
        report["train"]["runs"] += step["runs"]
        for fresh in sorted((work / "runs" / f"{name}-s{seed}").glob("checkpoints/checkpoint-*/lora/adapter_model.safetensors")):
            rel = fresh.relative_to(work)
            if (reference / rel).is_file():
                report["work"][str(rel.parents[1].relative_to("runs"))] = max_diff(fresh, reference / rel)
        report["package"] = compare_checkpoints(work)
        write_json(work / "verify.json", report)
    # the evaluation from the fresh checkpoints: one run's main row against results.json
    results = json.loads((ASSETS / "results.json").read_text())
    ev.WORK = work
    classifier, real = ev.load_classifier(ASSETS)
    row = {**ev.sample_metrics(ev.checkpoint("dpo", 1), classifier, real), **ev.inflation(ev.checkpoint("dpo", 1))}
    shipped = results["runs"]["dpo-s1"]
    report["dpo-s1 evaluation"] = {k: [row[k], shipped[k]] for k in ("reward", "fd", "diversity")}
    report["dpo-s1 evaluation"]["paired inflation"] = [row["paired"]["inflation"], shipped["paired"]["inflation"]]
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["all_identical"] = all(v == 0.0 for v in [*report["package"].values(), *report["work"].values()]) and \
        all(a == b for a, b in report["dpo-s1 evaluation"].values())
    write_json(work / "verify.json", report)
    return report


def compare_checkpoints(work: Path, assets: Path = ASSETS) -> dict:
    """Max |difference| per shipped seed-0 checkpoint between the package and the retrained run (0.0: bit for bit)."""
    out = {}
    for shipped in sorted((assets / "runs").glob("*/checkpoints/checkpoint-*/lora/adapter_model.safetensors")):
        name, ckpt = shipped.parents[3].name, shipped.parents[1].name
        fresh = work / "runs" / f"{name}-s0" / "checkpoints" / ckpt / "lora" / "adapter_model.safetensors"
        out[f"{name}/{ckpt}"] = max_diff(shipped, fresh) if fresh.is_file() else None
    return out


# ---------------------------------------------------------------- tables


def pct(x: float, digits: int = 1) -> str:
    return f"{x * 100:+.{digits}f} %"


def ci_text(block: dict, scale: float = 1.0, fmt: str = "+.2f") -> str:
    lo, hi = block["ci"]
    return f"{block['mean'] * scale:{fmt}} [{lo * scale:{fmt}}, {hi * scale:{fmt}}]"


def steps_tables(results: dict) -> str:
    study = results["steps"]
    counts = study["step_counts"]
    arms = [("base", None)] + [(f"{m}{v}", (m, v)) for m in ev.METHODS for v in ev.VARIANTS]
    label = lambda m, v: LABELS[m] + {"": "", "-normguard": " + NormGuard", "-rescale": " + inference rescale"}[v]  # noqa: E731
    out = []
    for key, title, scale, fmt in (("fd", "FD to real digits (lower better)", 1, ".2f"), ("reward", "reward", 1, ".3f"),
                                   ("inflation", "paired inflation (tuned drives, %)", 100, "+.1f"),
                                   ("diversity", "within-class diversity", 1, ".2f"),
                                   ("out_of_range", "out-of-range pixels (%)", 100, ".1f")):
        rows = [f"| {title} | " + " | ".join(f"{s} steps" for s in counts) + " |", "|---|" + "---|" * len(counts)]
        for name, mv in arms:
            cells = []
            for s in counts:
                if mv is None:
                    cells.append("0" if key == "inflation" else f"{study['base'][str(s)][key] * scale:{fmt}}")
                    continue
                values = np.array([study["arms"][f"{name}-s{seed}"][str(s)][key] for seed in ev.RL_SEEDS]) * scale
                cells.append(f"{values.mean():{fmt}} ± {values.std(ddof=1):{fmt.lstrip('+')}}")
            rows.append(f"| {'base' if mv is None else label(*mv)} | " + " | ".join(cells) + " |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def gains_table(results: dict) -> str:
    g = results["steps"]["gains"]
    counts = results["steps"]["step_counts"]
    out = []
    for arm, arm_label in (("normguard", "NormGuard"), ("rescale", "inference rescale")):
        for key, title, scale, fmt in (("fd", "FD(plain) − FD", 1, "+.2f"), ("reward", "reward − reward(plain)", 1, "+.3f"),
                                       ("fd_rel", "relative FD gain (%)", 100, "+.1f")):
            rows = [f"| {arm_label}: {title} | " + " | ".join([*(LABELS[m] + " (3 seeds)" for m in ev.METHODS),
                                                                "pooled (9 pairs)"]) + " |", "|---|---|---|---|---|"]
            for s in counts:
                per = g[arm][key]["by_steps"][str(s)]
                rows.append(f"| {s} steps | " + " | ".join(ci_text(per[m], scale, fmt) for m in (*ev.METHODS, "pooled")) + " |")
            d = g[arm][key]["few_minus_many"]
            rows.append(f"| gain({counts[0]}) − gain({counts[-1]}) | | | | {ci_text(d, scale, fmt)}: **{d['verdict']}** |")
            out.append("\n".join(rows))
    return "\n\n".join(out)


def series_table(results: dict) -> str:
    rows = ["| run (paired inflation, 10 steps) | " + " | ".join(f"checkpoint {s}" for s in ev.SERIES_STEPS) + " |",
            "|---|" + "---|" * len(ev.SERIES_STEPS)]
    for name in ev.NAMES:
        cells = []
        for point in results["series"][name]:
            v = np.array(point["by_seed"]) * 100
            cells.append(f"{v.mean():+.1f} ({v.min():+.1f} … {v.max():+.1f})")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def claims_table(results: dict) -> str:
    """The paper's five claims | what this model shows | the number (all from results.json)."""
    runs, base = results["runs"], results["base"]
    seeds = ev.RL_SEEDS
    infl = {m: np.array([runs[f"{m}-s{s}"]["paired"]["inflation"] for s in seeds]) for m in ev.NAMES}
    d_reward = {m: np.mean([runs[f"{m}-s{s}"]["reward"] for s in seeds]) - base["reward"] for m in ev.NAMES}
    d_fd = {m: np.mean([runs[f"{m}-s{s}"]["fd"] for s in seeds]) - base["fd"] for m in ev.NAMES}
    g = results["steps"]["gains"]
    ten = str(ev.SAMPLING["steps"])
    inside = [m for m in ev.METHODS if 0.05 <= infl[m].mean() <= 0.15]
    row1 = ("RL post-training (DiffusionNFT, AWM, DPO) inflates the per-step velocity norm by 5–15 %",
            ("inside 5–15 % for " + ", ".join(LABELS[m] for m in inside) if inside else "outside 5–15 % for every method")
            + ("; outside for " + ", ".join(LABELS[m] for m in ev.METHODS if m not in inside) if 0 < len(inside) < 3 else ""),
            "; ".join(f"{LABELS[m]} {pct(infl[m].mean())} (seeds {pct(infl[m].min())} … {pct(infl[m].max())})"
                      for m in ev.METHODS) + " — paired, tuned drives, 10 steps")
    worse = [m for m in ev.METHODS if d_fd[m] > 0 and d_reward[m] > 0]
    row2 = ("the inflation degrades quality although the reward rises",
            ("reward up and FD worse for " + ", ".join(LABELS[m] for m in worse)) if worse else "not seen",
            "; ".join(f"{LABELS[m]} reward {d_reward[m]:+.3f}, FD {d_fd[m]:+.2f} vs base" for m in ev.METHODS))
    r = g["rescale"]["fd"]["by_steps"][ten]["pooled"]
    row3 = ("rescaling the velocity at inference does not fix it",
            "**not reproduced**: the rescale improves FD (CI above 0), the model stays inflated" if r["ci"][0] > 0 else
            "reproduced: no FD gain shown (CI contains 0 or is below)",
            f"FD gain of the rescale at 10 steps, pooled: {ci_text(r)}")
    n = g["normguard"]["fd"]["by_steps"][ten]["pooled"]
    nr = g["normguard"]["reward"]["by_steps"][ten]["pooled"]
    guarded = "; ".join(f"{LABELS[m]} {pct(infl[m].mean())} → {pct(infl[m + '-normguard'].mean())}" for m in ev.METHODS)
    big = [m for m in ev.METHODS if infl[m].mean() >= 0.05]
    inflated = ", ".join(LABELS[m] for m in big) or "none"
    row4 = ("a training-time hinge (NormGuard) fixes it",
            ("FD better with NormGuard (CI above 0)" if n["ci"][0] > 0 else
             "FD worse with NormGuard (CI below 0)" if n["ci"][1] < 0 else "FD gain not shown (CI contains 0)")
            + (f", inflation cut to under half of the plain run's where RL inflated it by ≥ 5 % ({inflated})" if all(
                abs(infl[m + "-normguard"].mean()) < 0.5 * infl[m].mean() for m in big) else
               f", inflation not cut to under half where RL inflated it by ≥ 5 % ({inflated})"),
            f"FD gain pooled {ci_text(n)}, reward change {ci_text(nr, fmt='+.3f')}; inflation {guarded}")
    few = g["normguard"]["fd"]["few_minus_many"]
    c = results["steps"]["step_counts"]
    by = g["normguard"]["fd"]["by_steps"]
    row5 = ("the gains are largest with few-step inference",
            {"holds": "holds here", "opposite": "**the opposite** here: the gain is smaller with few steps",
             "not shown": "**not shown** here (CI of the difference contains 0)"}[few["verdict"]],
            "FD gain pooled: " + ", ".join(f"{s} steps {by[str(s)]['pooled']['mean']:+.2f}" for s in c)
            + f"; gain({c[0]}) − gain({c[-1]}) = {ci_text(few)}")
    rows = ["| the paper's claim | what this model shows | the number |", "|---|---|---|"]
    rows += [f"| {a} | {b} | {n} |" for a, b, n in (row1, row2, row3, row4, row5)]
    return "\n".join(rows)


def update_readme(blocks: dict[str, str], readme: Path = README) -> None:
    text = readme.read_text()
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- reproduce:{name} -->\n).*?(\n<!-- /reproduce:{name} -->)", re.S)
        if not pattern.search(text):
            raise KeyError(f"README has no <!-- reproduce:{name} --> block")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    readme.write_text(text)


# ---------------------------------------------------------------- figures


def figures(results: dict, folder: Path = FIGURES) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    counts = results["steps"]["step_counts"]
    colors = {"awm": "tab:blue", "nft": "tab:orange", "dpo": "tab:green", "pooled": "black"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for row, (arm, arm_label) in enumerate((("normguard", "NormGuard"), ("rescale", "inference rescale"))):
        for ax, key, title in zip(axes[row], ("fd", "reward"), ("FD(plain) − FD", "reward − reward(plain)"), strict=True):
            for i, m in enumerate((*ev.METHODS, "pooled")):
                per = [results["steps"]["gains"][arm][key]["by_steps"][str(s)][m] for s in counts]
                x = np.array(counts) * (1 + 0.05 * (i - 1.5))
                mean = np.array([p["mean"] for p in per])
                lo, hi = np.array([p["ci"][0] for p in per]), np.array([p["ci"][1] for p in per])
                ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], marker="o", ms=3, capsize=2, color=colors[m],
                            lw=2 if m == "pooled" else 1, label=LABELS.get(m, "pooled (9 pairs)"))
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xscale("log")
            ax.set_xticks(counts, [str(s) for s in counts])
            ax.minorticks_off()
            ax.set_title(f"{arm_label}: {title}", fontsize=10)
    for ax in axes[1]:
        ax.set_xlabel("sampler steps")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("digits model: gain over the plain RL run vs sampler steps (95 % CI over RL seeds)", fontsize=10)
    fig.tight_layout()
    paths = [folder / "gain_vs_steps.png"]
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(ev.METHODS), figsize=(12, 3.6), sharey=True)
    for ax, m in zip(axes, ev.METHODS, strict=True):
        for name, style in ((m, "-"), (f"{m}-normguard", "--")):
            steps = [p["step"] for p in results["series"][name]]
            v = np.array([p["by_seed"] for p in results["series"][name]]) * 100
            ax.plot(steps, v.mean(1), style, marker="o", color=colors[m], label=name)
            ax.fill_between(steps, v.min(1), v.max(1), color=colors[m], alpha=0.15)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(LABELS[m])
        ax.set_xlabel("RL iteration (checkpoint)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("paired inflation, % (mean; band: 3 seeds)")
    fig.tight_layout()
    paths.append(folder / "inflation_vs_training.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- the command


def render(results: dict) -> dict[str, str]:
    return {"main": ev.summarize_table(results), "steps": steps_tables(results), "gains": gains_table(results),
            "series": series_table(results), "claims": claims_table(results)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ev.WORK, help="where the runs are trained (default examples/digits/work)")
    parser.add_argument("--no-ship", dest="ship", action="store_false",
                        help="leave the package, README and figures as they are; write WORK/results.json and WORK/figures")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the README tables and figures from results.json")
    parser.add_argument("--verify", action="store_true", help="retrain into --work and compare (see the module's doc)")
    args = parser.parse_args(argv)
    if args.verify:
        if args.work.resolve() == ev.WORK.resolve():
            parser.error("--verify needs --work pointing at another (empty) folder")
        report = verify(args.work)
        print(json.dumps(report, indent=1))
        return report
    if args.render_only:
        results = json.loads((ASSETS / "results.json").read_text())
        update_readme(render(results))
        figures(results)
        return results
    started, cpu = time.perf_counter(), cpu_seconds()
    ev.WORK = args.work  # evaluate.checkpoint() reads it
    train = train_all(args.work)
    identical = compare_checkpoints(args.work)
    print("retrained seed-0 checkpoints vs the package (max |diff|):", json.dumps(identical), flush=True)
    results = ev.assemble()  # every run's measurements, cached in WORK/eval/
    results["timings"].update({"train": train["wall"], "train_cpu": train["cpu"]})
    results["timings"]["reproduce"] = round(time.perf_counter() - started, 1)
    results["timings"]["reproduce_cpu"] = round(cpu_seconds() - cpu, 1)
    results["reproduced_checkpoints"] = identical
    write_json(args.work / "results.json", results)
    if args.ship:
        write_json(ASSETS / "results.json", results)
        ev.ship()
        update_readme(render(results))
        figures(results)
    else:
        figures(results, args.work / "figures")
    t = results["timings"]
    print(f"reproduce: {t['reproduce']} s wall, {t['reproduce_cpu']} s CPU (training {train['wall']} s wall, "
          f"{train['cpu']} s CPU) on {os.cpu_count()} cores", flush=True)
    return results


if __name__ == "__main__":
    main()
