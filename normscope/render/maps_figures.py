"""Report figures of where inflation lives: ratio maps per sigma region, spectrum ratios, channel ratios.

Drawn from a run folder's maps.safetensors alone (written by ``compare --maps``) and from a sweep table, in
the style of ``normscope.render.figures``: plain ``Figure`` objects, pyplot never imported.
"""

from __future__ import annotations

import numpy as np

from normscope.render.figures import DOUBLE, OKABE_ITO, SINGLE, _figure, _styled

REGION_TITLES = {"near_noise": r"near noise ($\sigma > 2/3$)", "middle": "middle",
                 "near_data": r"near data ($\sigma \leq 1/3$)"}


def ratio_maps(maps) -> object | None:
    """Heatmaps of the mean ||v_tuned|| / ||v_base|| per latent position, one panel per sigma region.

    Video runs show the frame with the largest deviation from 1 of each region. The colour scale is shared
    and centred on 1, so a uniformly inflated model shows three evenly coloured panels.
    """
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
    return _draw_ratio_maps(panels, max(spread, 1e-3))


@_styled
def _draw_ratio_maps(panels, spread: float):
    from matplotlib.colors import TwoSlopeNorm

    fig, axes = _figure(DOUBLE if len(panels) > 1 else SINGLE, 2.4, 1, len(panels))
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        image = ax.imshow(values, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 1 - spread, 1 + spread), interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[0]), label=r"$\|v_{tuned}\| / \|v_{base}\|$ per position", fraction=0.03)
    fig.suptitle("where the velocity inflates: mean ratio per latent position (norm over channels)", fontsize=8)
    return fig


@_styled
def spectrum_ratio(maps) -> object | None:
    """Power of v_tuned over power of v_base by spatial frequency, per region; patch frequency marked."""
    regions = maps.regions
    if not regions:
        return None
    freqs = np.array(maps.frequencies())
    fig, axes = _figure(DOUBLE, 2.4, 1, 2)
    left, right = axes[0]
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


@_styled
def channel_ratio(maps) -> object | None:
    """Per latent channel: ||v_tuned|| / ||v_base|| (norm over positions), per region."""
    regions = maps.regions
    if not regions:
        return None
    fig, axes = _figure(SINGLE, 2.2)
    ax = axes[0][0]
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


@_styled
def sweep_where(table):
    """sweep_where.png: inflation, grid score and image signals per checkpoint, to see which moves first.

    Left: inflation (%) and, on its own axis, the grid score with its CI. Right: each image signal's
    tuned - base divided by its largest magnitude over the sweep, so signals of different units share an axis.
    """
    steps = table["step"].to_numpy()
    signals = [c for c in table.columns if c.endswith("_diff")]
    fig, axes = _figure(DOUBLE, 2.4, 1, 2)
    left, right = axes[0]
    left.plot(steps, table["inflation"].astype(float) * 100, color=OKABE_ITO[1], marker="o", label="inflation")
    left.set_xlabel("training step")
    left.set_ylabel("inflation (%)", color=OKABE_ITO[1])
    if "grid_score" in table:
        twin = left.twinx()
        twin.plot(steps, table["grid_score"].astype(float).to_numpy(), color=OKABE_ITO[0], marker="s", label="grid score")
        twin.fill_between(steps, table["grid_lo"].astype(float), table["grid_hi"].astype(float), color=OKABE_ITO[0],
                          alpha=0.2, linewidth=0)
        twin.set_ylabel("grid score (1 = no grid)", color=OKABE_ITO[0])
        twin.spines["right"].set_visible(True)
    left.set_title("inflation and grid score")
    for i, column in enumerate(signals):
        values = table[column].astype(float).to_numpy()
        scale = np.nanmax(np.abs(values)) if np.isfinite(values).any() else 1.0
        right.plot(steps, values / (scale or 1.0), color=OKABE_ITO[i % len(OKABE_ITO)], marker=".",
                   label=column.removesuffix("_diff").replace("_", " "))
    right.axhline(0, color="0.5", linewidth=0.6)
    right.set_xlabel("training step")
    right.set_ylabel("tuned − base / max |tuned − base|")
    right.set_title("image signals")
    if signals:
        right.legend(fontsize=5, ncol=2)
    return fig
