"""Figures, drawn from a summary dict alone so that saved runs can be re-plotted without a model."""

from __future__ import annotations

from pathlib import Path

# Okabe-Ito: readable by colour-blind readers and in greyscale print.
BASE_COLOR = "#0072B2"
TUNED_COLOR = "#D55E00"
FREE_COLOR = "#009E73"


def _series(per_step: list[dict], key: str):
    import numpy as np

    return np.array([np.nan if row[key] is None else row[key] for row in per_step], dtype=float)


def save_profile_figure(summary: dict, path: Path) -> Path:
    """profile.png: both models' mean norms (+/- 1 std) and the mean ratio with its 95% CI, against sigma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True, constrained_layout=True)
    for mode, branches in summary["modes"].items():
        rows = branches["guided"]["per_step"]
        sigma = _series(rows, "sigma")
        style = "-" if mode == summary["headline_mode"] else "--"
        for key, color, label in (("norm_base", BASE_COLOR, "base"), ("norm_tuned", TUNED_COLOR, "tuned")):
            mean, std = _series(rows, key), _series(rows, key + "_std")
            top.plot(sigma, mean, style, color=color, label=f"{label} ({mode})")
            top.fill_between(sigma, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        ratio = _series(rows, "ratio")
        lo = np.array([np.nan if r["ratio_ci"][0] is None else r["ratio_ci"][0] for r in rows])
        hi = np.array([np.nan if r["ratio_ci"][1] is None else r["ratio_ci"][1] for r in rows])
        color = TUNED_COLOR if mode == summary["headline_mode"] else FREE_COLOR
        bottom.plot(sigma, (ratio - 1) * 100, style, color=color, label=f"{mode}")
        bottom.fill_between(sigma, (lo - 1) * 100, (hi - 1) * 100, color=color, alpha=0.2, linewidth=0)
    bottom.axhline(0.0, color="0.4", linewidth=0.8)
    _mark_expert_switch(summary, (top, bottom))
    top.set_ylabel(r"$\|v\|_2$ (latent units)")
    top.set_title("velocity norm per step (mean $\\pm$ 1 std over samples)", fontsize=10)
    top.legend(fontsize=8, frameon=False)
    bottom.set_ylabel(r"$\|v_{tuned}\| / \|v_{base}\| - 1$  (%)")
    bottom.set_xlabel(r"$\sigma$  (1 = noise, 0 = data)")
    bottom.set_title("inflation per step (mean, 95% bootstrap CI)", fontsize=10)
    bottom.legend(fontsize=8, frameon=False)
    bottom.invert_xaxis()  # sampling runs from noise (left) to data (right)
    fig.savefig(path, dpi=150, metadata={"Software": None})
    plt.close(fig)
    return path


def _mark_expert_switch(summary: dict, axes) -> None:
    """Two-expert pipelines (Wan2.2-A14B): a dashed line where the low-noise expert takes over, each side named."""
    boundary = summary.get("expert_boundary_step")
    if boundary is None:
        return
    sigmas = [row["sigma"] for row in summary["per_step"]]
    x = (sigmas[boundary - 1] + sigmas[boundary]) / 2
    labels = summary.get("experts") or []
    for ax in axes:
        ax.axvline(x, color="0.2", linestyle=":", linewidth=1.0)
    top = axes[0]
    for text, align in ((labels[0] if labels else "", "left"), (labels[boundary] if labels else "", "right")):
        top.annotate(f"{text.replace('_', '-')} expert", (x, 1.0), xycoords=("data", "axes fraction"),
                     xytext=(-3 if align == "left" else 3, -2), textcoords="offset points",
                     ha="right" if align == "left" else "left", va="top", fontsize=7, color="0.2")


def save_reference_figure(meta: dict, path: Path) -> Path:
    """reference.png: the base's norm per step (mean, p5-p95 band) and the suggested tau(sigma)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = meta["per_step"]["guided"]
    sigma = _series(rows, "sigma")
    fig, ax = plt.subplots(figsize=(6.4, 3.4), constrained_layout=True)
    ax.fill_between(sigma, _series(rows, "p5"), _series(rows, "p95"), color=BASE_COLOR, alpha=0.2, linewidth=0, label="p5-p95")
    ax.plot(sigma, _series(rows, "mean"), color=BASE_COLOR, label="mean")
    ax.plot(sigma, _series(rows, "tau"), "--", color=TUNED_COLOR, label=r"suggested $\tau(\sigma)$ (p95)")
    ax.set_xlabel(r"$\sigma$  (1 = noise, 0 = data)")
    ax.set_ylabel(r"$\|v_{base}\|_2$ (latent units)")
    gate = meta["suggestions"]["gate"]["max_inflation"]
    ax.set_title(f"reference profile, {meta['n_samples']} samples; suggested gate {gate * 100:.1f} %", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.invert_xaxis()
    fig.savefig(path, dpi=150, metadata={"Software": None})
    plt.close(fig)
    return path


def save_sweep_figure(table, gate: float | None, path: Path) -> Path:
    """sweep.png: inflation (%) against training step with its 95 % CI; the gate and its first crossing marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = table["step"].to_numpy(dtype=float)
    value = table["inflation"].to_numpy(dtype=float) * 100
    lo = table["ci_lo"].to_numpy(dtype=float) * 100
    hi = table["ci_hi"].to_numpy(dtype=float) * 100
    fig, ax = plt.subplots(figsize=(6.4, 3.2), constrained_layout=True)
    ax.plot(steps, value, "o-", color=TUNED_COLOR, label="inflation (95% CI)")
    ax.fill_between(steps, lo, hi, color=TUNED_COLOR, alpha=0.2, linewidth=0)
    ax.axhline(0, color="0.5", linewidth=0.6)
    if gate is not None:
        ax.axhline(gate * 100, color="0.1", linestyle="--", linewidth=0.9, label=f"gate {gate * 100:.1f} %")
        crossing = np.flatnonzero(value > gate * 100)
        if crossing.size:
            first = crossing[0]
            ax.plot([steps[first]], [value[first]], "s", color="0.1", markersize=8, fillstyle="none",
                    label=f"first crossing: step {int(steps[first])}")
    ax.set_xlabel("training step (checkpoint)")
    ax.set_ylabel(r"$\|v_{tuned}\| / \|v_{base}\| - 1$  (%)")
    ax.set_title("velocity-norm inflation over the training run", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(path, dpi=150, metadata={"Software": None})
    plt.close(fig)
    return path



def save_frames_figure(profile, boundary_step: int | None, path: Path, title: str) -> Path:
    """frames.png: inflation (%) by latent frame (rows) and step (columns); the expert switch marked.

    Drawn on a plain ``Figure`` (no pyplot), so a notebook's backend and open figures are left alone.
    """
    import numpy as np
    from matplotlib.figure import Figure

    values = (profile.to_numpy(dtype=float) - 1) * 100
    finite = values[np.isfinite(values)]
    limit = max(float(np.abs(finite).max()) if finite.size else 0.0, 0.1)
    fig = Figure(figsize=(6.4, 1.2 + 0.3 * max(len(profile.index), 4)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(profile.columns)), [str(c) for c in profile.columns], fontsize=7)
    ax.set_yticks(range(len(profile.index)), [str(i) for i in profile.index], fontsize=7)
    ax.set_xlabel("denoising step (noise -> data)")
    ax.set_ylabel("latent frame")
    if boundary_step is not None:
        ax.axvline(boundary_step - 0.5, color="0.1", linestyle="--", linewidth=1.2)
        ax.annotate("low-noise expert ->", (boundary_step - 0.45, 0.97), xycoords=("data", "axes fraction"),
                    fontsize=7, va="top", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0})
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=r"$\|v_{tuned}\| / \|v_{base}\| - 1$  (%)")
    fig.savefig(path, dpi=150, metadata={"Software": None})
    return path
