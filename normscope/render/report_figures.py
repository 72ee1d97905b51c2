"""Figures for reports, drawn from saved run folders (summary.json, norms.csv, images/) only.

Print-ready: labelled axes with units, the Okabe-Ito colour-blind-safe palette, one consistent style,
widths for a two-column paper (3.4 in one column, 7.0 in across both).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
BASE_COLOR, TUNED_COLOR = OKABE_ITO[0], OKABE_ITO[1]
SINGLE, DOUBLE = 3.4, 7.0  # inches
SIGMA_LABEL = r"$\sigma$ (noise level; 1 = noise, 0 = data)"
NORM_LABEL = r"$\|v\|_2$ (latent units)"
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "lines.linewidth": 1.2, "axes.spines.top": False, "axes.spines.right": False,
    "savefig.bbox": "tight", "svg.fonttype": "none", "svg.hashsalt": "normscope",
}


@contextmanager
def style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        yield plt


def _col(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def _ci(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.array([np.nan if r["ratio_ci"][0] is None else r["ratio_ci"][0] for r in rows])
    hi = np.array([np.nan if r["ratio_ci"][1] is None else r["ratio_ci"][1] for r in rows])
    return lo, hi


def profiles(run) -> object:
    """Base and tuned mean norms against sigma with 95 % CI bands of the mean, one panel per branch."""
    branches = [b for b in ("guided", "cond", "uncond") if b in run.branches()]
    with style() as plt:
        fig, axes = plt.subplots(1, len(branches), figsize=(DOUBLE if len(branches) > 1 else SINGLE, 2.3), squeeze=False)
        for ax, branch in zip(axes[0], branches, strict=True):
            rows = run.per_step(branch)
            sigma = _col(rows, "sigma")
            n = np.maximum(_col(rows, "n"), 1)
            for key, color, label in (("norm_base", BASE_COLOR, "base"), ("norm_tuned", TUNED_COLOR, "tuned")):
                mean, half = _col(rows, key), 1.96 * _col(rows, key + "_std") / np.sqrt(n)
                ax.plot(sigma, mean, color=color, label=label)
                ax.fill_between(sigma, mean - half, mean + half, color=color, alpha=0.2, linewidth=0)
            ax.set_title(f"{branch} velocity ({run.mode})")
            ax.set_xlabel(SIGMA_LABEL)
            ax.invert_xaxis()
        axes[0][0].set_ylabel(NORM_LABEL)
        axes[0][0].legend(frameon=False)
        return fig


def inflation(runs: list, gate: float | None = None) -> object:
    """Inflation per step (%) against sigma with its 95 % bootstrap CI; several runs overlaid; the gate drawn."""
    with style() as plt:
        fig, ax = plt.subplots(figsize=(SINGLE if len(runs) == 1 else DOUBLE / 1.5, 2.4))
        for i, run in enumerate(runs):
            rows = run.per_step("guided")
            sigma = _col(rows, "sigma")
            lo, hi = _ci(rows)
            color = TUNED_COLOR if len(runs) == 1 else OKABE_ITO[i % len(OKABE_ITO)]
            label = run.name if len(runs) > 1 else f"{run.mode}, mean and 95% CI"
            ax.plot(sigma, (_col(rows, "ratio") - 1) * 100, color=color, label=label)
            ax.fill_between(sigma, (lo - 1) * 100, (hi - 1) * 100, color=color, alpha=0.2, linewidth=0)
        ax.axhline(0, color="0.5", linewidth=0.6)
        if gate is not None:
            ax.axhline(gate * 100, color="0.1", linestyle="--", linewidth=0.9, label=f"gate {gate * 100:.1f} %")
        ax.set_xlabel(SIGMA_LABEL)
        ax.set_ylabel(r"$\|v_{tuned}\| / \|v_{base}\| - 1$ (%)")
        ax.set_title("velocity-norm inflation per step (guided)")
        ax.invert_xaxis()
        ax.legend(frameon=False)
        return fig


def heatmap(run) -> object:
    """Inflation (%) per prompt (rows, mean over seeds) and step (columns): which prompts inflate, and where."""
    from matplotlib.colors import TwoSlopeNorm

    table = run.prompt_step_table()
    values = (table.to_numpy() - 1) * 100
    limit = max(float(np.nanmax(np.abs(values))), 1e-6) if np.isfinite(values).any() else 1.0
    with style() as plt:
        height = min(0.6 + 0.16 * len(table), 9.0)
        fig, ax = plt.subplots(figsize=(DOUBLE, height))
        image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit), interpolation="nearest")
        ax.set_yticks(range(len(table)), [_short(p) for p in table.index])
        steps = table.columns.to_numpy()
        ticks = np.arange(len(steps)) if len(steps) <= 12 else np.unique(np.linspace(0, len(steps) - 1, 8).round().astype(int))
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
        ax.set_xlabel("denoising step (0 = pure noise)")
        ax.set_title(f"inflation (%) by prompt and step, mean over seeds ({run.mode}, guided)")
        fig.colorbar(image, ax=ax, label="inflation (%)", fraction=0.03)
        return fig


def hinge_and_cosine(run) -> object | None:
    """Paired mode: the fraction of samples with ||v_tuned|| > ||v_base||, and cosine(v_tuned, v_base)."""
    if "paired" not in run.summary["modes"]:
        return None
    rows = run.summary["modes"]["paired"]["guided"]["per_step"]
    sigma = _col(rows, "sigma")
    with style() as plt:
        fig, (left, right) = plt.subplots(1, 2, figsize=(DOUBLE, 2.2))
        left.plot(sigma, _col(rows, "hinge_rate") * 100, color=TUNED_COLOR)
        left.set_ylim(-2, 102)
        left.set_ylabel("samples with tuned > base (%)")
        left.set_title("hinge rate (where a NormGuard hinge is active)")
        right.plot(sigma, _col(rows, "cosine"), color=BASE_COLOR)
        right.set_ylabel(r"cos($v_{tuned}$, $v_{base}$)")
        right.set_title("direction agreement")
        for ax in (left, right):
            ax.set_xlabel(SIGMA_LABEL)
            ax.invert_xaxis()
        return fig


def image_grid(run, limit: int = 16) -> object | None:
    """Final images of base and tuned (free mode), side by side per prompt and seed."""
    pairs = run.image_pairs()[:limit]
    if not pairs:
        return None
    from PIL import Image

    with style() as plt:
        cols = 2 * min(4, len(pairs))
        rows = -(-len(pairs) // (cols // 2))
        fig, axes = plt.subplots(rows, cols, figsize=(DOUBLE, DOUBLE / cols * rows * 1.15), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for i, (label, base, tuned) in enumerate(pairs):
            r, c = divmod(i, cols // 2)
            for j, (path, who) in enumerate(((base, "base"), (tuned, "tuned"))):
                ax = axes[r][2 * c + j]
                ax.imshow(np.asarray(Image.open(path).convert("RGB")), interpolation="nearest")
                ax.set_title(f"{label}: {who}" if who == "base" else who, fontsize=6)
        return fig


def _short(text: str, width: int = 34) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def save(fig, folder: Path, name: str) -> list[Path]:
    """PNG (for the HTML) and SVG (for papers) of one figure."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    with plt.rc_context(STYLE):
        fig.savefig(paths[0], dpi=200, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return paths
