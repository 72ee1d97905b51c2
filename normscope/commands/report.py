"""The report job (``normscope report``): figures, report.html and report.md from saved run folders only.

No model is loaded: everything comes from each run folder's summary.json, norms.csv and images/.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from normscope.config import check_finite
from normscope.errors import InputError
from normscope.render.files import IMAGES_DIR, NORMS_CSV, SUMMARY_JSON
from normscope.render.numbers import pct
from normscope.render.safe import md_text

FIGURES_DIR = "figures"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


@dataclass(kw_only=True)
class ReportConfig:
    """``normscope report RUN_DIR... --out DIR``; ``gate`` draws a threshold line (fraction, 0.05 = 5 %).

    ``monitors`` are training-run folders (or their monitor.jsonl) written by ``normscope.monitor``; ``sweeps``
    are ``normscope sweep --out`` folders, drawn on each monitor figure at their checkpoints' steps.
    """

    runs: tuple[Path, ...] = ()
    out: Path
    gate: float | None = None
    title: str = "normscope report"
    monitors: tuple[Path, ...] = ()
    sweeps: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        self.runs = tuple(Path(r) for r in self.runs)
        self.monitors = tuple(Path(m) for m in self.monitors)
        self.sweeps = tuple(Path(s) for s in self.sweeps)
        self.out = Path(self.out)
        check_finite("gate", self.gate)
        if not self.runs and not self.monitors:
            raise InputError("normscope report needs at least one run folder (written by compare --out) or a --monitor log")
        if self.sweeps and not self.monitors:
            raise InputError("--sweep is drawn next to a training run's monitor log: add --monitor RUN_DIR")


class Run:
    """One saved compare run folder."""

    def __init__(self, folder: Path) -> None:
        from normscope.runfolder import MANIFEST, verified_files

        self.folder = folder
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder: pass run folders written by normscope compare --out")
        if not any((folder / name).exists() for name in (MANIFEST, SUMMARY_JSON, NORMS_CSV)):
            raise InputError(f"{folder} is not a normscope run folder (no {MANIFEST}, {SUMMARY_JSON} or {NORMS_CSV}): pass folders written by normscope compare --out")
        # Only files the run published, each with the digest it had then: never a half-written or stray file.
        self.files = verified_files(folder, f"rerun normscope compare --out {folder} (a rerun resumes its finished batches)",
                                    kind="compare")
        if SUMMARY_JSON not in self.files or NORMS_CSV not in self.files:
            raise InputError(f"{folder} is not a normscope run folder (no {SUMMARY_JSON} and {NORMS_CSV}): pass folders written by normscope compare --out")
        try:
            self.summary = json.loads((folder / SUMMARY_JSON).read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{folder / SUMMARY_JSON} is not valid JSON ({exc.msg}): rerun normscope compare") from None
        self.name = folder.resolve().name
        self.mode = self.summary["headline_mode"]

    @cached_property
    def frame(self) -> pd.DataFrame:
        return pd.read_csv(self.folder / NORMS_CSV, keep_default_na=False, na_values={"ratio": [""], "cosine": [""], "mse": [""], "hinge": [""], "norm_base": [""], "norm_tuned": [""]})

    def branches(self) -> list[str]:
        return list(self.summary["modes"][self.mode])

    def per_step(self, branch: str) -> list[dict]:
        return self.summary["modes"][self.mode][branch]["per_step"]

    def prompt_step_table(self) -> pd.DataFrame:
        rows = self.frame[(self.frame["mode"] == self.mode) & (self.frame["branch"] == "guided")]
        table = rows.pivot_table(index=["prompt_id", "prompt"], columns="step", values="ratio", aggfunc="mean")
        return table.set_axis(table.index.get_level_values("prompt"), axis=0)

    @cached_property
    def maps(self):
        """The spatial and spectral aggregates of ``compare --maps`` (None when the run has none)."""
        from normscope.measure.maps import MAPS_FILE, Maps

        return Maps.load(self.files[MAPS_FILE]) if MAPS_FILE in self.files else None

    def image_pairs(self) -> list[tuple[str, Path, Path]]:
        pairs = []
        for name in sorted(n for n in self.files if n.startswith(f"{IMAGES_DIR}/") and n.endswith("-base.png")):
            base = self.files[name]
            tuned = base.with_name(base.name.replace("-base.png", "-tuned.png"))
            if f"{IMAGES_DIR}/{tuned.name}" in self.files:
                prompt_id, seed = base.name.split("-")[:2]
                pairs.append((f"p{int(prompt_id)} s{seed}", base, tuned))
        return pairs


def _run_rows(runs: list[Run]) -> list[dict]:
    rows = []
    for run in runs:
        s = run.summary
        # Run folders written before the sigma-integral headline hold the step mean as their only estimate.
        estimate = s.get("headline", "step_mean")
        step_mean = s.get("estimates", {}).get("step_mean", {}).get("inflation", s["inflation"])
        rows.append({
            "run": run.name, "mode": run.mode, "inflation": pct(s["inflation"]),
            "95% CI": f"[{pct(s['inflation_ci'][0])}, {pct(s['inflation_ci'][1])}]",
            "estimate": estimate.replace("_", " "), "step mean": pct(step_mean),
            "near noise": pct(s["regions"]["near_noise"]), "middle": pct(s["regions"]["middle"]),
            "near data": pct(s["regions"]["near_data"]), "samples": s["n_samples"], "steps": len(s["per_step"]),
            "non-finite": s["nonfinite"],
        })
    return rows


def report(config: ReportConfig) -> dict[str, Path]:
    """Write figures (PNG + SVG), report.html (self-contained) and report.md into ``config.out``."""
    from normscope.monitor import read_monitor_log
    from normscope.render import figures as rf
    from normscope.render import maps_figures as mf
    from normscope.render.video import save_strips

    runs = [Run(folder) for folder in config.runs]
    names = [r.name for r in runs]
    for i, run in enumerate(runs):  # legends need distinct names
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({i + 1})"
    figures_dir = config.out / FIGURES_DIR
    sections: list[tuple[str, str, Path]] = []  # (title, caption, png)

    def add(fig, name: str, title: str, caption: str) -> None:
        if fig is None:
            return
        png, _ = rf.save(fig, figures_dir, name)
        sections.append((title, caption, png))

    if len(runs) > 1:
        add(rf.inflation(runs, config.gate), "inflation_overlay", "Inflation per step, all runs",
            "Mean per-sample ratio ||v_tuned|| / ||v_base|| − 1 per step with its 95 % bootstrap CI, guided velocity.")
    for run in runs:
        prefix = _slug(run.name)
        add(rf.profiles(run), f"{prefix}_profiles", f"{run.name}: norm profiles",
            "Mean velocity norm of base and tuned per step, 95 % CI of the mean, per branch.")
        add(rf.inflation([run], config.gate), f"{prefix}_inflation", f"{run.name}: inflation per step",
            "Per-step mean ratio − 1 with its 95 % bootstrap CI" + (f"; dashed: the gate ({config.gate * 100:.1f} %)." if config.gate is not None else "."))
        add(rf.heatmap(run), f"{prefix}_heatmap", f"{run.name}: inflation by prompt and step",
            "Mean over seeds of the per-sample ratio − 1; red inflates, blue deflates.")
        add(rf.hinge_and_cosine(run), f"{prefix}_hinge_cosine", f"{run.name}: hinge rate and cosine",
            "Paired mode: where a NormGuard hinge would be active, and how far the two velocity fields point apart.")
        add(rf.image_grid(run), f"{prefix}_images", f"{run.name}: images, base vs tuned",
            "Final images of free-mode sampling from the same noise (compare --save-images); with --rescale-to-base "
            "also the tuned model's run with its velocity rescaled to the base's norm at every step.")
        # video runs (Wan): inflation by latent frame and step, and the saved videos as frame strips
        profile = _frame_profile(run)
        if profile is not None:
            add(rf.frames_figure(profile, run.summary.get("expert_boundary_step"),
                                 f"{run.name}: inflation by latent frame and step ({run.mode}, guided)"),
                f"{prefix}_frames", f"{run.name}: inflation by latent frame",
                "Mean over samples of the per-frame ratio − 1; the dashed line marks the switch to the low-noise expert.")
        strips = save_strips(run.folder / IMAGES_DIR, figures_dir / f"{prefix}_videos.png")
        if strips is not None:
            sections.append((f"{run.name}: videos, base vs tuned", "Each sample's decoded frames from the same noise "
                             "(free mode, compare --save-images): base above, tuned below.", strips))
        if run.maps is not None:
            add(mf.ratio_maps(run.maps), f"{prefix}_maps", f"{run.name}: where the velocity inflates",
                "Mean ||v_tuned|| / ||v_base|| per latent position (norm over channels) per sigma region, paired mode, "
                "guided velocity; shared colour scale centred on 1 (docs/maps.md).")
            add(mf.spectrum_ratio(run.maps), f"{prefix}_spectrum", f"{run.name}: spectrum ratio and grid score",
                "Radially averaged power of v_tuned over v_base by spatial frequency (left; a uniform scale s is flat at "
                "s²) and the power of v_tuned − v_base relative to v_base (right); dashed: the patch frequency and its "
                "harmonics. Grid score: power of v_tuned − v_base at the patch lattice over its neighbours, 95 % CI over prompts.")
            add(mf.channel_ratio(run.maps), f"{prefix}_channels", f"{run.name}: per-channel ratio",
                "||v_tuned|| / ||v_base|| of each latent channel (norm over positions) per sigma region.")
    sweeps = [_sweep_table(folder) for folder in config.sweeps]
    for folder in config.monitors:
        entries, meta = read_monitor_log(folder)
        if not entries:
            raise InputError(f"{folder}: the monitor log is empty (no training step was logged)")
        name = (folder if folder.is_dir() else folder.parent).resolve().name
        gate = config.gate if config.gate is not None else meta.get("gate")
        add(rf.monitor_figure(entries, meta, sweeps, gate), f"{_slug(name)}_monitor", f"{name}: norm ratio during training",
            "Mean ||v_θ|| / ||v_ref|| − 1 per sigma bucket at each training step, from the velocities the loss computed "
            "(normscope.monitor); black: the smoothed ratio over all samples"
            + ("; squares: offline sweeps of the saved checkpoints (black: headline inflation with 95 % CI; coloured: its sigma regions)" if sweeps else "")
            + ("; dashed: the gate." if gate is not None else "."))
    rows = _run_rows(runs) or [{"monitor log": str(m)} for m in config.monitors]
    signals = _signal_rows(runs)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / REPORT_HTML).write_text(_html(config.title, rows, sections, runs, signals))
    (config.out / REPORT_MD).write_text(_markdown(config.title, rows, sections, config.out, signals))
    return {"html": config.out / REPORT_HTML, "markdown": config.out / REPORT_MD, "figures": figures_dir}


def _signal_rows(runs: list[Run]) -> list[dict]:
    """One row per run and image signal (compare --maps in free mode): tuned − base and its CI."""
    from normscope.render.maps_text import SIGNAL_LABELS, fmt

    rows = []
    for run in runs:
        maps = run.summary.get("maps")
        if maps:
            score, ci = maps["grid_score"], maps["grid_score_ci"] or [None, None]
            rows.append({"run": run.name, "signal": "grid score (latent, v_tuned − v_base)", "base": "", "tuned": "",
                         "tuned − base": fmt(score), "95% CI": "" if score is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"})
        for row in (run.summary.get("image_signals") or {}).get("signals", []):
            label, unit = SIGNAL_LABELS.get(row["signal"], (row["signal"], ""))
            signed = row["signal"] != "grid_score"
            rows.append({"run": run.name, "signal": label, "base": fmt(row["base"], unit) if signed else "",
                         "tuned": fmt(row["tuned"], unit) if signed else "",
                         "tuned − base": fmt(row["difference"], unit, signed),
                         "95% CI": f"[{fmt(row['ci'][0], unit, signed)}, {fmt(row['ci'][1], unit, signed)}]"})
    return rows


def _table_md(rows: list[dict]) -> list[str]:
    header = list(rows[0])
    return ["| " + " | ".join(md_text(h) for h in header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(md_text(r[h]) for h in header) + " |" for r in rows]


def _table_html(rows: list[dict]) -> str:
    header = list(rows[0])
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(str(r[h]))}</td>" for h in header) + "</tr>" for r in rows)
    return table + "</table>"


def _frame_profile(run: Run):
    """(latent frame x step) mean ratio of the headline mode from the run's frames.csv; None for image runs."""
    from normscope.measure.frames import frame_profile
    from normscope.render.files import FRAMES_CSV

    if FRAMES_CSV not in run.files:
        return None
    frames = pd.read_csv(run.folder / FRAMES_CSV, keep_default_na=False, na_values={"ratio": [""]})
    profile = frame_profile(frames, run.mode)
    return None if profile.empty else profile


def _sweep_table(folder: Path) -> tuple[str, pd.DataFrame]:
    from normscope.commands.sweep import SWEEP_CSV

    path = folder / SWEEP_CSV
    if not path.is_file():
        raise InputError(f"--sweep {folder} holds no {SWEEP_CSV}: pass a folder written by normscope sweep --out")
    return folder.resolve().name, pd.read_csv(path)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _markdown(title: str, rows: list[dict], sections, out: Path, signals: list[dict] = ()) -> str:
    lines = [f"# {md_text(title)}", "", *_table_md(rows)]
    lines += ["", "Inflation = integral over sigma (trapezoid, divided by the sigma span) of the per-step mean over samples of "
              "||v_tuned|| / ||v_base||, minus 1, guided velocity (estimate: sigma integral; older run folders: the step "
              "mean); step mean = the plain mean over steps. CIs: 95 % percentile bootstrap over prompts.", ""]
    if signals:
        lines += ["## Grid score and image signals", "", *_table_md(signals), "",
                  "Image signals of the final images of free mode (same noise), tuned − base, 95 % CI resampling "
                  "prompts; see docs/maps.md.", ""]
    for section_title, caption, png in sections:
        target = quote(png.relative_to(out).as_posix())  # a figure file named after a run: percent-encoded
        lines += [f"## {md_text(section_title)}", "", f"![{md_text(section_title)}]({target})", "", md_text(caption), ""]
    return "\n".join(lines)


def _html(title: str, rows: list[dict], sections, runs: list[Run], signals: list[dict] = ()) -> str:
    table = _table_html(rows)
    body = []
    if signals:
        body.append("<h2>Grid score and image signals</h2>" + _table_html(signals)
                    + "<p>Image signals of the final images of free mode (same noise), tuned − base, 95 % CI "
                    "resampling prompts.</p>")
    for section_title, caption, png in sections:
        data = base64.b64encode(png.read_bytes()).decode()
        body.append(f'<figure><h2>{html.escape(section_title)}</h2><img alt="{html.escape(section_title)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    configs = "".join(
        f"<details><summary>{html.escape(run.name)}: configuration</summary><pre>"
        f"{html.escape(json.dumps(run.summary.get('config', {}), indent=2))}</pre></details>" for run in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1000px; margin: 2em auto; color: #222; padding: 0 1em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9em; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
{table}
<p>Inflation = integral over sigma (trapezoid, divided by the sigma span) of the per-step mean over prompt/seed samples
of ||v<sub>tuned</sub>|| / ||v<sub>base</sub>||, minus 1, on the guided velocity (estimate: sigma integral; older run
folders: the step mean); step mean = the plain mean over steps. CIs are 95 % percentile bootstrap over prompts
(all seeds of a prompt together).</p>
{''.join(body)}
{configs}
</body></html>
"""
