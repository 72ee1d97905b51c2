"""Outputs stage: files in the run folder, and the terminal rendering of a result."""

from __future__ import annotations

import io
import json
from pathlib import Path

from normscope.measure.stats import HINGE_RATE, N
from normscope.measure.table import COSINE, NORM_BASE, NORM_TUNED, RATIO, SIGMA, STEP

NORMS_CSV = "norms.csv"
SUMMARY_JSON = "summary.json"
PROFILE_PNG = "profile.png"
IMAGES_DIR = "images"
FRAMES_CSV = "frames.csv"  # video pipelines: per latent frame
FRAMES_PNG = "frames.png"


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"


def write_run(result, out: Path, figure: bool = True) -> list[Path]:
    """norms.csv (byte-identical for identical inputs), summary.json and profile.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / NORMS_CSV, out / SUMMARY_JSON]
    result.frame.to_csv(written[0], index=False, lineterminator="\n")
    written[1].write_text(summary_json(result.summary))
    if figure:
        from normscope.render.figures import save_profile_figure

        written.append(save_profile_figure(result.summary, out / PROFILE_PNG))
    frames = getattr(result, "frames", None)
    if frames is not None and len(frames):
        written.append(out / FRAMES_CSV)
        frames.to_csv(written[-1], index=False, lineterminator="\n")
        if figure:
            from normscope.measure.frames import frame_profile
            from normscope.render.figures import save_frames_figure

            mode = result.summary["headline_mode"]
            written.append(save_frames_figure(
                frame_profile(frames, mode), result.summary.get("expert_boundary_step"), out / FRAMES_PNG,
                f"inflation by latent frame and step ({mode} mode, guided)"))
    return written


def per_step_csv(summary: dict) -> str:
    """The headline per-step profile as CSV text (``--format csv``)."""
    rows = summary["per_step"]
    columns = [c for c in rows[0] if c != "ratio_ci"] + ["ratio_lo", "ratio_hi"]
    buffer = io.StringIO()
    buffer.write(",".join(columns) + "\n")
    for row in rows:
        values = {**row, "ratio_lo": row["ratio_ci"][0], "ratio_hi": row["ratio_ci"][1]}
        buffer.write(",".join("" if values[c] is None else repr(values[c]) for c in columns) + "\n")
    return buffer.getvalue()


def _pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value * 100:+.2f} %"


def headline(summary: dict) -> str:
    lo, hi = summary["inflation_ci"]
    mode = summary["headline_mode"]
    drive = f", {summary['drive']} drives" if mode == "paired" else ""
    steps = len(summary["per_step"])
    return (
        f"inflation {_pct(summary['inflation'])}  95% CI [{_pct(lo)}, {_pct(hi)}]  "
        f"({mode}{drive}, guided velocity, {summary['n_samples']} samples x {steps} steps)"
    )


def render(summary: dict, console) -> None:
    """The per-step table, the headline and the other modes' headlines, on ``console`` (stdout)."""
    from rich.table import Table

    paired = summary["headline_mode"] == "paired"
    experts = summary.get("experts") or []
    show_experts = any(experts)
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
            str(row[STEP]), f"{row[SIGMA]:.3f}", _num(row[NORM_BASE]), _num(row[NORM_TUNED]),
            _num(row[RATIO], 4), f"[{_num(lo, 4)}, {_num(hi, 4)}]",
            "n/a" if row[HINGE_RATE] is None else f"{row[HINGE_RATE] * 100:.0f} %",
        ]
        if paired:
            cells.append(_num(row[COSINE], 4))
        if show_experts:
            cells.append(experts[index] if index < len(experts) else "")
        style = "yellow" if row[N] == 0 else None
        table.add_row(*cells, style=style)
    console.print(table)
    regions = summary["regions"]
    console.print(
        "by region: near noise " + _pct(regions["near_noise"]) + " · middle " + _pct(regions["middle"])
        + " · near data " + _pct(regions["near_data"])
    )
    for label, part in (summary.get("by_expert") or {}).items():
        console.print(f"{label.replace('_', '-')} expert (steps {part['steps'][0]}-{part['steps'][-1]}): "
                      f"inflation {_pct(part['inflation'])}")
    for mode, branches in summary["modes"].items():
        if mode != summary["headline_mode"]:
            g = branches["guided"]
            console.print(f"{mode} mode: inflation {_pct(g['inflation'])}  95% CI [{_pct(g['inflation_ci'][0])}, {_pct(g['inflation_ci'][1])}]")
    console.print(f"[bold]{headline(summary)}[/bold]")


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def render_inspection(report: dict, console) -> None:
    """``normscope inspect`` as a two-column table."""
    from rich.table import Table

    table = Table(show_header=False, title=f"normscope inspect {report['path']}", title_justify="left")
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
        table.add_row(name, value)
    console.print(table)


def render_reference(meta: dict, console) -> None:
    """``normscope profile``: the per-step reference and the suggested thresholds with their justification."""
    from rich.table import Table

    table = Table(title=f"reference profile — {meta['n_samples']} samples, guided velocity", title_justify="left")
    for name in ("step", "sigma", "mean", "std", "p5", "p50", "p95 = tau"):
        table.add_column(name, justify="right")
    for row in meta["per_step"]["guided"]:
        table.add_row(str(row["step"]), f"{row['sigma']:.3f}", *(_num(row[k]) for k in ("mean", "std", "p5", "p50", "tau")))
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
    console.print(f"[bold]suggested gate: --max-inflation {gate['max_inflation']:.3f}[/bold] "
                  f"(set by {gate['set_by']}; rule: {gate['rule']})")


def render_sweep(table, gate: float | None, console) -> None:
    """``normscope sweep``: one row per checkpoint, in training order; the first crossing of the gate marked."""
    from rich.table import Table

    view = Table(title="inflation over the training run", title_justify="left")
    for name in ("step", "inflation", "95% CI", "tuned>base", "near noise", "middle", "near data"):
        view.add_column(name, justify="right")
    first = None
    for row in table.to_dict(orient="records"):
        crossed = bool(row["crosses_gate"])
        if crossed and first is None:
            first = row["step"]
        view.add_row(
            str(row["step"]), _pct(row["inflation"]), f"[{_pct(row['ci_lo'])}, {_pct(row['ci_hi'])}]",
            "n/a" if row["hinge_rate"] is None else f"{row['hinge_rate'] * 100:.0f} %",
            _pct(row["near_noise"]), _pct(row["middle"]), _pct(row["near_data"]),
            style="bold red" if crossed and row["step"] == first else None,
        )
    console.print(view)
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
        table.add_row(
            row["model"], f"{row['reward']:.3f}", f"{row['fd']:.2f}", f"{row['diversity']:.2f}",
            f"{row['out_of_range'] * 100:.1f}", ci, p1(row.get("paired_base_drives")) if paired is not None else "0",
            p1(row.get("free")) if paired is not None else "0",
        )
    console.print(table)
    regions = Table(title="paired inflation by region of the trajectory (tuned drives)", title_justify="left")
    for name in ("model", "near noise", "middle", "near data"):
        regions.add_column(name, justify="right")
    for row in result["rows"][1:]:
        r = row["regions"]
        regions.add_row(row["model"], _pct(r["near_noise"]), _pct(r["middle"]), _pct(r["near_data"]))
    console.print(regions)
    series = result["series"]
    console.print(f"{series['model']} over training: " + "  ".join(
        f"step {c['step']}: {_pct(c['inflation'])}" for c in series["checkpoints"]))
    console.print("reward: tempered probability of the prompted digit (higher is better). FD: Frechet distance "
                  "of classifier features to real digits (lower is better). div: within-class diversity. sat: "
                  "out-of-range pixels. paired: tuned drives, base evaluated on the same inputs; base drv: the "
                  "base drives; free: each on its own trajectory. Inflation = mean over steps of "
                  "||v_tuned|| / ||v_base|| - 1.")
