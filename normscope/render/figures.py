"""Every figure normscope draws, from saved results alone (summary dicts, reference meta, run folders).

Figures are plain ``matplotlib.figure.Figure`` objects: pyplot is never imported and the backend is
never switched, so a notebook's own backend and open figures are left alone. One palette (Okabe-Ito:
readable by colour-blind readers and in greyscale print), one style, and widths for a two-column paper
(3.4 in one column, 7.0 in across both).

* run folders: ``profile_figure`` (profile.png), ``reference_figure`` (reference.png), ``sweep_figure`` (sweep.png);
* ``normscope report``: ``profiles``, ``inflation``, ``heatmap``, ``hinge_and_cosine``, ``image_grid``,
  ``monitor_figure`` (a training run's monitor log next to sweeps);
* ``save_png`` writes one PNG, ``save`` a PNG and an SVG.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
BASE_COLOR, TUNED_COLOR, FREE_COLOR = OKABE_ITO[0], OKABE_ITO[1], OKABE_ITO[2]
SINGLE, DOUBLE = 3.4, 7.0  # inches
SIGMA_LABEL = r"$\sigma$ (noise level; 1 = noise, 0 = data)"
NORM_LABEL = r"$\|v\|_2$ (latent units)"
INFLATION_LABEL = r"$\|v_{tuned}\| / \|v_{base}\| - 1$ (%)"
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "lines.linewidth": 1.2, "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "savefig.bbox": "tight", "svg.fonttype": "none", "svg.hashsalt": "normscope",
}


def _styled(draw):
    """Run a drawing or saving function under normscope's style (rcParams restored afterwards)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **subplots):
    """A styled Figure and its axes array (always 2-D), outside pyplot's figure manager."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplots)
    return fig, axes


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def _ci(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([np.nan if r["ratio_ci"][0] is None else r["ratio_ci"][0] for r in rows], dtype=float)
    hi = np.array([np.nan if r["ratio_ci"][1] is None else r["ratio_ci"][1] for r in rows], dtype=float)
    return lo, hi


# ---------------------------------------------------------------- panels shared by the figures


def _draw_norms(ax, rows: list[dict], band: str, line: str = "-", suffix: str = "") -> None:
    """Base and tuned mean norm per step against sigma; the band is +/- 1 std ("std") or the 95 % CI of the mean ("ci")."""
    sigma = _col(rows, "sigma")
    n = np.maximum(_col(rows, "n"), 1)
    for key, color, label in (("norm_base", BASE_COLOR, "base"), ("norm_tuned", TUNED_COLOR, "tuned")):
        mean, std = _col(rows, key), _col(rows, key + "_std")
        half = std if band == "std" else 1.96 * std / np.sqrt(n)
        ax.plot(sigma, mean, line, color=color, label=label + suffix)
        ax.fill_between(sigma, mean - half, mean + half, color=color, alpha=0.15, linewidth=0)


def _draw_inflation(ax, rows: list[dict], color: str, label: str, line: str = "-") -> None:
    """The per-step mean ratio - 1 (%) against sigma with its 95 % bootstrap CI band."""
    sigma = _col(rows, "sigma")
    lo, hi = _ci(rows)
    ax.plot(sigma, (_col(rows, "ratio") - 1) * 100, line, color=color, label=label)
    ax.fill_between(sigma, (lo - 1) * 100, (hi - 1) * 100, color=color, alpha=0.2, linewidth=0)


def _finish_sigma_axis(ax) -> None:
    ax.set_xlabel(SIGMA_LABEL)
    ax.invert_xaxis()  # sampling runs from noise (left) to data (right)


def _gate_line(ax, gate: float | None) -> None:
    ax.axhline(0, color="0.5", linewidth=0.6)
    if gate is not None:
        ax.axhline(gate * 100, color="0.1", linestyle="--", linewidth=0.9, label=f"gate {gate * 100:.1f} %")


# ---------------------------------------------------------------- run folders


@_styled
def profile_figure(summary: dict):
    """profile.png: both models' mean norms (+/- 1 std) and the per-step inflation with its 95 % CI, every mode."""
    fig, axes = _figure(SINGLE * 1.6, 4.6, 2, 1, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    for mode, branches in summary["modes"].items():
        rows = branches["guided"]["per_step"]
        headline = mode == summary["headline_mode"]
        line = "-" if headline else "--"
        _draw_norms(top, rows, "std", line, f" ({mode})")
        _draw_inflation(bottom, rows, TUNED_COLOR if headline else FREE_COLOR, mode, line)
    _gate_line(bottom, None)
    _mark_expert_switch(summary, (top, bottom))
    top.set_ylabel(NORM_LABEL)
    top.set_title(r"velocity norm per step (mean $\pm$ 1 std over samples)")
    top.legend()
    bottom.set_ylabel(INFLATION_LABEL)
    bottom.set_title("inflation per step (mean, 95% bootstrap CI)")
    bottom.legend()
    _finish_sigma_axis(bottom)
    return fig


def _mark_expert_switch(summary: dict, axes) -> None:
    """Two-expert pipelines (Wan2.2-A14B): a dotted line where the low-noise expert takes over (in the legend)."""
    boundary = summary.get("expert_boundary_step")
    if boundary is None:
        return
    sigmas = [row["sigma"] for row in summary["per_step"]]
    x = (sigmas[boundary - 1] + sigmas[boundary]) / 2
    labels = summary.get("experts") or ["", ""]
    text = f"{labels[0].replace('_', '-')} -> {labels[boundary].replace('_', '-')} expert".strip()
    for index, ax in enumerate(axes):
        ax.axvline(x, color="0.2", linestyle=":", linewidth=1.0, label=text if index == len(axes) - 1 else None)


@_styled
def reference_figure(meta: dict):
    """reference.png: the base's norm per step (mean, p5-p95 band) and the suggested tau(sigma)."""
    rows = meta["per_step"]["guided"]
    sigma = _col(rows, "sigma")
    fig, axes = _figure(SINGLE * 1.6, 2.6)
    ax = axes[0][0]
    ax.fill_between(sigma, _col(rows, "p5"), _col(rows, "p95"), color=BASE_COLOR, alpha=0.2, linewidth=0, label="p5-p95")
    ax.plot(sigma, _col(rows, "mean"), color=BASE_COLOR, label="mean")
    ax.plot(sigma, _col(rows, "tau"), "--", color=TUNED_COLOR, label=r"suggested $\tau(\sigma)$ (p95)")
    ax.set_ylabel(r"$\|v_{base}\|_2$ (latent units)")
    gate = meta["suggestions"]["gate"]["max_inflation"]
    ax.set_title(f"reference profile, {meta['n_samples']} samples; suggested gate {gate * 100:.1f} %")
    ax.legend()
    _finish_sigma_axis(ax)
    return fig


@_styled
def sweep_figure(table, gate: float | None):
    """sweep.png: inflation (%) against training step with its 95 % CI; the gate and its first crossing marked."""
    steps = table["step"].to_numpy(dtype=float)
    value = table["inflation"].to_numpy(dtype=float) * 100
    lo = table["ci_lo"].to_numpy(dtype=float) * 100
    hi = table["ci_hi"].to_numpy(dtype=float) * 100
    fig, axes = _figure(SINGLE * 1.6, 2.5)
    ax = axes[0][0]
    ax.plot(steps, value, "o-", color=TUNED_COLOR, label="inflation (95% CI)")
    ax.fill_between(steps, lo, hi, color=TUNED_COLOR, alpha=0.2, linewidth=0)
    _gate_line(ax, gate)
    crossing = np.flatnonzero(value > gate * 100) if gate is not None else np.array([], dtype=int)
    if crossing.size:
        first = crossing[0]
        ax.plot([steps[first]], [value[first]], "s", color="0.1", markersize=8, fillstyle="none",
                label=f"first crossing: step {int(steps[first])}")
    ax.set_xlabel("training step (checkpoint)")
    ax.set_ylabel(INFLATION_LABEL)
    ax.set_title("velocity-norm inflation over the training run")
    ax.legend()
    return fig


# ---------------------------------------------------------------- normscope report


@_styled
def profiles(run):
    """Base and tuned mean norms against sigma with 95 % CI bands of the mean, one panel per branch."""
    branches = [b for b in ("guided", "cond", "uncond") if b in run.branches()]
    fig, axes = _figure(DOUBLE if len(branches) > 1 else SINGLE, 2.3, 1, len(branches))
    for ax, branch in zip(axes[0], branches, strict=True):
        _draw_norms(ax, run.per_step(branch), "ci")
        ax.set_title(f"{branch} velocity ({run.mode})")
        _finish_sigma_axis(ax)
    axes[0][0].set_ylabel(NORM_LABEL)
    axes[0][0].legend()
    return fig


@_styled
def inflation(runs: list, gate: float | None = None):
    """Inflation per step (%) against sigma with its 95 % bootstrap CI; several runs overlaid; the gate drawn."""
    fig, axes = _figure(SINGLE if len(runs) == 1 else DOUBLE / 1.5, 2.4)
    ax = axes[0][0]
    for i, run in enumerate(runs):
        color = TUNED_COLOR if len(runs) == 1 else OKABE_ITO[i % len(OKABE_ITO)]
        label = _literal(run.name) if len(runs) > 1 else f"{run.mode}, mean and 95% CI"
        _draw_inflation(ax, run.per_step("guided"), color, label)
    _gate_line(ax, gate)
    ax.set_ylabel(INFLATION_LABEL)
    ax.set_title("velocity-norm inflation per step (guided)")
    _finish_sigma_axis(ax)
    ax.legend()
    return fig


@_styled
def heatmap(run):
    """Inflation (%) per prompt (rows, mean over seeds) and step (columns): which prompts inflate, and where."""
    from matplotlib.colors import TwoSlopeNorm

    table = run.prompt_step_table()
    values = (table.to_numpy() - 1) * 100
    limit = max(float(np.nanmax(np.abs(values))), 1e-6) if np.isfinite(values).any() else 1.0
    fig, axes = _figure(DOUBLE, min(0.6 + 0.16 * len(table), 9.0))
    ax = axes[0][0]
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit), interpolation="nearest")
    ax.set_yticks(range(len(table)), [_short(p) for p in table.index])
    steps = table.columns.to_numpy()
    ticks = np.arange(len(steps)) if len(steps) <= 12 else np.unique(np.linspace(0, len(steps) - 1, 8).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_title(f"inflation (%) by prompt and step, mean over seeds ({run.mode}, guided)")
    fig.colorbar(image, ax=ax, label="inflation (%)", fraction=0.03)
    return fig


@_styled
def hinge_and_cosine(run):
    """Paired mode: the fraction of samples with ||v_tuned|| > ||v_base||, and cosine(v_tuned, v_base); else None."""
    if "paired" not in run.summary["modes"]:
        return None
    rows = run.summary["modes"]["paired"]["guided"]["per_step"]
    sigma = _col(rows, "sigma")
    fig, axes = _figure(DOUBLE, 2.2, 1, 2)
    left, right = axes[0]
    left.plot(sigma, _col(rows, "hinge_rate") * 100, color=TUNED_COLOR)
    right.plot(sigma, _col(rows, "cosine"), color=BASE_COLOR)
    left.set_ylim(-2, 102)
    left.set_ylabel("samples with tuned > base (%)")
    left.set_title("hinge rate (where a NormGuard hinge is active)")
    right.set_ylabel(r"cos($v_{tuned}$, $v_{base}$)")
    right.set_title("direction agreement")
    for ax in (left, right):
        _finish_sigma_axis(ax)
    return fig


@_styled
def image_grid(run, limit: int = 16):
    """Final images of base and tuned (free mode), side by side per prompt and seed; None without images.

    With ``compare --rescale-to-base --save-images`` the rescaled tuned run's image joins each pair.
    """
    pairs = run.image_pairs()[:limit]
    if not pairs:
        return None
    from PIL import Image

    rescaled = [base.with_name(base.name.replace("-base.png", "-rescaled.png")) for _, base, _ in pairs]
    per = 3 if all(p.is_file() for p in rescaled) else 2
    cols = per * min(4 if per == 2 else 3, len(pairs))
    rows = -(-len(pairs) // (cols // per))
    fig, axes = _figure(DOUBLE, DOUBLE / cols * rows * 1.15, rows, cols)
    for ax in axes.flat:
        ax.axis("off")
    for i, ((label, base, tuned), extra) in enumerate(zip(pairs, rescaled, strict=True)):
        r, c = divmod(i, cols // per)
        panels = ((base, "base"), (tuned, "tuned"), (extra, "tuned, rescaled"))[:per]
        for j, (path, who) in enumerate(panels):
            ax = axes[r][per * c + j]
            ax.imshow(np.asarray(Image.open(path).convert("RGB")), interpolation="nearest")
            ax.set_title(f"{label}: {who}" if who == "base" else who, fontsize=6)
    return fig


def _literal(text: str) -> str:
    """User text (a prompt, a run folder's name) for matplotlib: '$' escaped, never read as mathtext."""
    return str(text).replace("$", r"\$")


def _short(text: str, width: int = 34) -> str:
    return _literal(text if len(text) <= width else text[: width - 1] + "…")


@_styled
def monitor_figure(entries: list[dict], meta: dict, sweeps: list[tuple[str, object]], gate: float | None = None):
    """A training run's monitor log: mean ratio − 1 (%) per sigma bucket against training step, the smoothed
    overall ratio, the gate; offline sweeps of the same run's checkpoints drawn at their steps (same regions)."""
    fig, axes = _figure(DOUBLE / 1.3, 2.6)
    ax = axes[0][0]
    steps = np.array([e["step"] for e in entries], dtype=float)
    buckets = [b[0] for b in meta.get("buckets", [])] or sorted(k.split("/", 1)[1] for k in entries[0] if k.startswith("ratio/"))
    colors = {name: OKABE_ITO[i % len(OKABE_ITO)] for i, name in enumerate(buckets)}
    for name in buckets:
        values = np.array([np.nan if e.get(f"ratio/{name}") is None else e[f"ratio/{name}"] for e in entries], dtype=float)
        ax.plot(steps, (values - 1) * 100, "-", color=colors[name], alpha=0.8, linewidth=0.9, label=f"monitor {name}")
    smoothed = np.array([e["smoothed"] for e in entries], dtype=float)
    ax.plot(steps, (smoothed - 1) * 100, "-", color="0.1", linewidth=1.6, label=f"monitor all, smoothed ({meta.get('smoothing', '?')} steps)")
    markers = ("s", "D", "^", "v")
    for i, (label, table) in enumerate(sweeps):
        marker = markers[i % len(markers)]
        x = table["step"].to_numpy(dtype=float)
        for name in buckets:
            if name in table.columns:
                ax.plot(x, table[name].to_numpy(dtype=float) * 100, marker, color=colors[name], markersize=5,
                        fillstyle="none", linestyle="none")
        value = table["inflation"].to_numpy(dtype=float) * 100
        err = np.vstack([value - table["ci_lo"].to_numpy(dtype=float) * 100, table["ci_hi"].to_numpy(dtype=float) * 100 - value])
        ax.errorbar(x, value, yerr=err, fmt=marker, color="0.1", markersize=5, capsize=2, fillstyle="none",
                    label=f"sweep {_literal(label)} (95% CI; coloured: regions)")
    _gate_line(ax, gate)
    crossing = (meta.get("first_crossing") or {}).get("step")
    if crossing is not None:
        ax.axvline(crossing, color="0.1", linestyle=":", linewidth=0.9, label=f"first crossing: step {crossing}")
    ax.set_xlabel("training step")
    ax.set_ylabel(r"$\|v_\theta\| / \|v_{ref}\| - 1$ (%)")
    ax.set_title("velocity-norm ratio during training, per sigma bucket")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ---------------------------------------------------------------- saving


@_styled
def save_png(fig, path: Path, dpi: int = 150) -> Path:
    """One PNG with no timestamp or software tag, so identical runs give identical files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    return path


@_styled
def frames_figure(profile, boundary_step: int | None, title: str):
    """frames.png: inflation (%) by latent frame (rows) and step (columns) of a video run; the expert switch dashed."""
    from matplotlib.colors import TwoSlopeNorm

    values = (profile.to_numpy(dtype=float) - 1) * 100
    finite = values[np.isfinite(values)]
    limit = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-6)
    fig, axes = _figure(DOUBLE, 0.9 + 0.22 * max(len(profile.index), 3))
    ax = axes[0][0]
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit), interpolation="nearest")
    steps = profile.columns.to_numpy()
    ticks = np.arange(len(steps)) if len(steps) <= 12 else np.unique(np.linspace(0, len(steps) - 1, 8).round().astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_yticks(range(len(profile.index)), [str(i) for i in profile.index])
    ax.set_xlabel("denoising step (0 = pure noise)")
    ax.set_ylabel("latent frame")
    if boundary_step is not None:
        ax.axvline(boundary_step - 0.5, color="0.1", linestyle="--", linewidth=1.2)
        ax.annotate("low-noise expert", (boundary_step - 0.45, 0.97), xycoords=("data", "axes fraction"),
                    va="top", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="inflation (%)", fraction=0.03)
    return fig


@_styled
def save(fig, folder: Path, name: str) -> list[Path]:
    """PNG (for the HTML) and SVG (for papers) of one figure."""
    png = save_png(fig, folder / f"{name}.png", dpi=200)
    svg = folder / f"{name}.svg"
    fig.savefig(svg, metadata={"Date": None})
    return [png, svg]
