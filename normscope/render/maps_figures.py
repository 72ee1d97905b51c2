"""Report figures of where inflation lives: ratio maps per sigma region, spectrum ratios, channel ratios.

Drawn from a run folder's maps.safetensors alone (written by ``compare --maps``), in the report's style.
"""

from __future__ import annotations

import numpy as np

from normscope.render.report_figures import DOUBLE, OKABE_ITO, SINGLE, style

REGION_TITLES = {"near_noise": r"near noise ($\sigma > 2/3$)", "middle": "middle",
                 "near_data": r"near data ($\sigma \leq 1/3$)"}


def ratio_maps(maps) -> object | None:
    """Heatmaps of the mean ||v_tuned|| / ||v_base|| per latent position, one panel per sigma region.

    Video runs show the frame with the largest deviation from 1 of each region. The colour scale is shared
    and centred on 1, so a uniformly inflated model shows three evenly coloured panels.
    """
    from matplotlib.colors import TwoSlopeNorm

    regions = maps.regions
    if not regions:
        return None
    panels = []
    for region in regions:
        values = maps.ratio_map(region).numpy()
        title = REGION_TITLES[region]
        if values.ndim == 3:  # (frames, H, W)
            frame = int(np.nanargmax(np.nanmax(np.abs(values - 1), axis=(1, 2))))
            values, title = values[frame], f"{title}, frame {frame}"
        panels.append((title, values))
    spread = max(float(np.nanmax(np.abs(v - 1))) for _, v in panels)
    spread = max(spread, 1e-3)
    with style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(DOUBLE if len(panels) > 1 else SINGLE, 2.4), squeeze=False)
        for ax, (title, values) in zip(axes[0], panels, strict=True):
            image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 1 - spread, 1 + spread), interpolation="nearest")
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(image, ax=list(axes[0]), label=r"$\|v_{tuned}\| / \|v_{base}\|$ per position", fraction=0.03)
        fig.suptitle("where the velocity inflates: mean ratio per latent position (norm over channels)", fontsize=8)
        return fig


def spectrum_ratio(maps) -> object | None:
    """Power of v_tuned over power of v_base by spatial frequency, per region; patch frequency marked."""
    regions = maps.regions
    if not regions:
        return None
    freqs = np.array(maps.frequencies())
    with style() as plt:
        fig, (left, right) = plt.subplots(1, 2, figsize=(DOUBLE, 2.4))
        fig.subplots_adjust(wspace=0.4)
        for i, region in enumerate(regions):
            color = OKABE_ITO[i % len(OKABE_ITO)]
            left.plot(freqs[1:], maps.spectrum_ratio(region).numpy()[1:], color=color, marker=".", label=REGION_TITLES[region])
            diff = maps.spectrum(region, "power_diff").numpy()[1:]
            base = maps.spectrum(region, "power_base").numpy()[1:]
            right.semilogy(freqs[1:], diff / np.maximum(base, 1e-30), color=color, marker=".", label=REGION_TITLES[region])
        for ax in (left, right):
            for k, f in enumerate(maps.patch_frequencies()):
                ax.axvline(f, color="0.2", linestyle="--", linewidth=0.8, label="patch frequency (ring)" if k == 0 else None)
            ax.set_xlabel("spatial frequency (cycles per latent pixel)")
        left.axhline(1.0, color="0.5", linewidth=0.6)
        left.set_ylabel("power tuned / power base")
        left.set_title("spectrum ratio (uniform x s gives s² everywhere)")
        right.set_ylabel(r"power of $v_{tuned} - v_{base}$ / power base")
        right.set_title("what the tuned model adds, by frequency")
        left.legend(frameon=False)
        score = maps.summary()
        if score["grid_score"] is not None:
            lo, hi = score["grid_score_ci"]
            right.text(0.02, 0.95, f"grid score {score['grid_score']:.2f} [{lo:.2f}, {hi:.2f}]",
                       transform=right.transAxes, va="top", fontsize=7)
        return fig


def channel_ratio(maps) -> object | None:
    """Per latent channel: ||v_tuned|| / ||v_base|| (norm over positions), per region."""
    regions = maps.regions
    if not regions:
        return None
    with style() as plt:
        fig, ax = plt.subplots(figsize=(SINGLE, 2.2))
        width = 0.8 / len(regions)
        for i, region in enumerate(regions):
            values = maps.channel_ratio(region).numpy()
            ax.bar(np.arange(len(values)) + i * width, values - 1, width=width, bottom=1,
                   color=OKABE_ITO[i % len(OKABE_ITO)], label=REGION_TITLES[region])
        ax.axhline(1.0, color="0.5", linewidth=0.6)
        ax.set_xlabel("latent channel")
        ax.set_ylabel("norm ratio tuned / base")
        ax.set_title("per-channel ratio")
        ax.legend(frameon=False)
        return fig
