"""What the commands print on stdout: rich tables and one-line headlines, drawn from the result objects."""

from __future__ import annotations

from normscope.measure.sanity import sanity, sanity_line
from normscope.measure.stats import HINGE_RATE, N
from normscope.measure.table import COSINE, NORM_BASE, NORM_TUNED, RATIO, SIGMA, STEP
from normscope.render.numbers import num, pct
from normscope.render.safe import cell, cells, labelled

ESTIMATE_WORDS = {"sigma_integral": "sigma-integral", "step_mean": "step mean"}


def headline(summary: dict) -> str:
    """The one line a user reads: the headline estimate, its CI, and what it was measured on."""
    lo, hi = summary["inflation_ci"]
    mode = summary["headline_mode"]
    drive = f", {summary['drive']} drives" if mode == "paired" else ""
    steps = len(summary["per_step"])
    ci = summary["ci"]
    return (
        f"inflation {pct(summary['inflation'])}  95% CI [{pct(lo)}, {pct(hi)}]  "
        f"({ESTIMATE_WORDS[summary['headline']]}; {mode}{drive}, guided velocity, {summary['n_samples']} samples "
        f"x {steps} steps; CI resamples {ci['unit']}s)"
    )


def other_estimates(summary: dict) -> str:
    """The estimates that are not the headline, each with its CI, on one line."""
    parts = [f"{ESTIMATE_WORDS[name]} {pct(e['inflation'])} [{pct(e['inflation_ci'][0])}, {pct(e['inflation_ci'][1])}]"
             for name, e in summary["estimates"].items() if name != summary["headline"]]
    return "other estimate: " + "; ".join(parts)


def render_compare(summary: dict, console) -> None:
    """The per-step table, the headline and the other modes' headlines, on ``console`` (stdout)."""
    from rich.table import Table

    paired = summary["headline_mode"] == "paired"
    experts = summary.get("experts") or []
    show_experts = any(experts)  # two-expert pipelines (Wan2.2-A14B): which transformer ran each step
    table = Table(title=f"velocity norms per step — {summary['headline_mode']} mode, guided", title_justify="left")
    for name in ("step", "sigma", "||v_base||", "||v_tuned||", "ratio", "95% CI", "tuned>base"):
        table.add_column(name, justify="right")
    if paired:
        table.add_column("cosine", justify="right")
    if show_experts:
        table.add_column("expert")
    for index, row in enumerate(summary["per_step"]):
        lo, hi = row["ratio_ci"]
        cells = [
            str(row[STEP]), f"{row[SIGMA]:.3f}", num(row[NORM_BASE]), num(row[NORM_TUNED]),
            num(row[RATIO], 4), f"[{num(lo, 4)}, {num(hi, 4)}]",
            "n/a" if row[HINGE_RATE] is None else f"{row[HINGE_RATE] * 100:.0f} %",
        ]
        if paired:
            cells.append(num(row[COSINE], 4))
        if show_experts:
            cells.append(experts[index] if index < len(experts) else "")
        style = "yellow" if row[N] == 0 else None
        table.add_row(*map(cell, cells), style=style)
    console.print(table)
    regions = summary["regions"]
    console.print(
        "by region: near noise " + pct(regions["near_noise"]) + " · middle " + pct(regions["middle"])
        + " · near data " + pct(regions["near_data"])
    )
    for label, part in (summary.get("by_expert") or {}).items():
        lo, hi = part["inflation_ci"]
        console.print(f"{label.replace('_', '-')} expert (steps {part['steps'][0]}-{part['steps'][-1]}): "
                      f"inflation {pct(part['inflation'])}  95% CI [{pct(lo)}, {pct(hi)}]")
    for label, part in (summary.get("by_stream") or {}).items():  # LTX-2: video (the headline) and audio
        lo, hi = part["inflation_ci"]
        console.print(f"{label} stream: inflation {pct(part['inflation'])}  95% CI [{pct(lo)}, {pct(hi)}]"
                      + (" (headline)" if label == summary.get("stream") else ""))
    for mode, branches in summary["modes"].items():
        if mode != summary["headline_mode"]:
            g = branches["guided"]
            console.print(f"{mode} mode: inflation {pct(g['inflation'])}  95% CI [{pct(g['inflation_ci'][0])}, {pct(g['inflation_ci'][1])}]")
    console.print(other_estimates(summary))
    console.print(cell(headline(summary), "bold"))
    warning = sanity_warning(summary)
    if warning:
        console.print(labelled("warning:", "yellow", warning), highlight=False)


def sanity_warning(summary: dict) -> str | None:
    """The line that says a collapse or an explosion is a broken checkpoint, not a result (see measure/sanity.py)."""
    status = sanity(summary["inflation"])
    if status is None:
        return None
    name = str((summary.get("config") or {}).get("tuned") or "TUNED")
    return sanity_line(name, summary["inflation"], status)


def render_inspection(report: dict, console) -> None:
    """``normscope inspect`` as a two-column table."""
    from rich.table import Table

    table = Table(show_header=False, title=cell(f"normscope inspect {report['path']}"), title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("kind", report["kind"]),
        ("form", report["form"]),
        ("resolved", report["resolved"]),
        ("experts", ", ".join(report.get("experts", ["transformer"]))),
        ("architecture", report["architecture"]),
        ("transformer", (report["transformer_class"] or "unknown")
         + (f"  (families: {', '.join(report['families'])})" if report["families"] else "")),
        ("parameters", f"{report['parameters']:,}"),
        ("tensors", str(report["tensors"])),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in report["dtypes"].items())),
    ]
    if report["adapters"]:
        rows.append(("adapters", ", ".join(report["adapters"]) + f"  (taken: {report['adapter']})"))
    lora = report["lora"]
    if lora:
        alpha = f"{lora['alpha']:g} (scale {lora['scale']:g})" if lora["alpha_known"] else "unknown: scale 1.0 assumed"
        ranks = lora["ranks"]
        rows += [
            ("LoRA rank", str(lora["rank"]) + ("" if len(ranks) == 1 else f" (ranks {ranks[0]}..{ranks[-1]})")),
            ("LoRA alpha", alpha),
            ("target modules", f"{lora['n_target_modules']}: " + ", ".join(lora["target_modules"][:6])
             + (" ..." if lora["n_target_modules"] > 6 else "")),
        ]
    if report["pipeline_class"]:
        rows.append(("pipeline class", report["pipeline_class"] + (f"  (family {report['family']})" if report["family"] else "")))
    if report["pipeline"]:
        rows.append(("fits pipeline", "yes" if report["fits"] else "NO: " + "; ".join(report["problems"])))
    for note in report["notes"]:
        rows.append(("note", note))
    for name, value in rows:
        table.add_row(*cells(name, value))  # paths, adapter names and notes are literal text
    console.print(table)


def render_reference(meta: dict, console) -> None:
    """``normscope profile``: the per-step reference and the suggested thresholds with their justification."""
    from rich.table import Table

    table = Table(title=f"reference profile — {meta['n_samples']} samples, guided velocity", title_justify="left")
    for name in ("step", "sigma", "mean", "std", "p5", "p50", "p95 = tau"):
        table.add_column(name, justify="right")
    for row in meta["per_step"]["guided"]:
        table.add_row(*cells(row["step"], f"{row['sigma']:.3f}", *(num(row[k]) for k in ("mean", "std", "p5", "p50", "tau"))))
    console.print(table)
    gate = meta["suggestions"]["gate"]
    floor = gate["noise_floor"]
    spread = floor["prompt_subset_spread"]
    dtype = floor["dtype_difference"]
    console.print(
        "noise floor: prompt-subset spread " + ("n/a" if spread is None else f"{spread * 100:.3f} %")
        + " · bfloat16 vs float32 " + ("not measured" if dtype is None else f"{dtype * 100:.3f} %")
    )
    console.print("suggested tau(sigma): p95 of the base's norms per step (thresholds.csv)")
    console.print(cell(f"suggested gate: --max-inflation {gate['max_inflation']:.3f}", "bold")
                  + cell(f" (set by {gate['set_by']}; rule: {gate['rule']})"))


def render_sweep(table, gate: float | None, console) -> None:
    """``normscope sweep``: one row per checkpoint, in training order; the first crossing of the gate marked."""
    from rich.table import Table

    streams = [s for s in table["stream"].dropna().unique()] if "stream" in table else []  # LTX-2: the stream shown
    title = "inflation over the training run" + (f" ({streams[0]} stream)" if streams else "")
    view = Table(title=title, title_justify="left")
    for name in ("step", "inflation", "95% CI", "tuned>base", "near noise", "middle", "near data"):
        view.add_column(name, justify="right")
    first = None
    for row in table.to_dict(orient="records"):
        crossed = bool(row["crosses_gate"])
        if crossed and first is None:
            first = row["step"]
        view.add_row(
            *cells(row["step"], pct(row["inflation"]), f"[{pct(row['ci_lo'])}, {pct(row['ci_hi'])}]",
                   "n/a" if row["hinge_rate"] is None else f"{row['hinge_rate'] * 100:.0f} %",
                   pct(row["near_noise"]), pct(row["middle"]), pct(row["near_data"])),
            style="bold red" if crossed and row["step"] == first else None,
        )
    console.print(view)
    for row in table.to_dict(orient="records"):
        if isinstance(row.get("sanity"), str):
            console.print(labelled("warning:", "yellow", f"step {row['step']}: "
                                   f"{sanity_line(str(row['checkpoint']), row['inflation'], row['sanity'])}"), highlight=False)
    if gate is not None:
        console.print(f"gate {gate * 100:.1f} %: " + (f"first crossed at step {first}" if first is not None else "never crossed"))


def render_demo(result: dict, console) -> None:
    """``normscope demo``: reward and quality next to inflation, by region and driver, and over training."""
    from rich import box
    from rich.table import Table

    def p1(value) -> str:
        return "n/a" if value is None else f"{value * 100:+.1f}"

    table = Table(title="digits model: base vs RL checkpoints (step 40); inflation in %", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("model", "reward", "FD", "div", "sat %", "paired [95% CI]", "base drv", "free"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in result["rows"]:
        paired = row.get("paired")
        ci = f"{p1(paired)} [{p1(row['paired_ci'][0])}, {p1(row['paired_ci'][1])}]" if paired is not None else "0"
        rescaled = "applied" in row  # the inference-rescale row: other drivers were not run for it
        table.add_row(*cells(
            row["model"], f"{row['reward']:.3f}", f"{row['fd']:.2f}", f"{row['diversity']:.2f}",
            f"{row['out_of_range'] * 100:.1f}", ci,
            "" if rescaled else p1(row.get("paired_base_drives")) if paired is not None else "0",
            "" if rescaled else p1(row.get("free")) if paired is not None else "0",
        ))
    console.print(table)
    regions = Table(title="paired inflation by region of the trajectory (tuned drives)", title_justify="left")
    for name in ("model", "near noise", "middle", "near data"):
        regions.add_column(name, justify="right")
    for row in result["rows"][1:]:
        r = row["regions"]
        regions.add_row(*cells(row["model"], pct(r["near_noise"]), pct(r["middle"]), pct(r["near_data"])))
    console.print(regions)
    series = result["series"]
    console.print(f"{series['model']} over training: " + "  ".join(
        f"step {c['step']}: {pct(c['inflation'])}" for c in series["checkpoints"]))
    console.print("reward: tempered probability of the prompted digit (higher is better). FD: Frechet distance "
                  "of classifier features to real digits (lower is better). div: within-class diversity. sat: "
                  "out-of-range pixels. paired: tuned drives, base evaluated on the same inputs; base drv: the "
                  "base drives; free: each on its own trajectory. Inflation = sigma-integral of the "
                  "per-step mean ||v_tuned|| / ||v_base||, minus 1 (docs/compare.md). '+ inference rescale': the "
                  "same checkpoint sampled with its velocity rescaled at every step to the base's norm on the same "
                  "input (compare --rescale-to-base); its paired value is the unscaled tuned model's inflation on "
                  "that trajectory, the applied velocity's is 0 by construction. n/a: not run for that row (the DPO rows "
                  "measure paired inflation only, for time).")
