"""Terminal rendering of ``compare --maps``: the grid score, the maps' range per region, the image-signal table."""

from __future__ import annotations

SIGNAL_LABELS = {
    "out_of_range": ("out of range (pre-clip)", "%"), "saturation": ("saturation", ""),
    "colourfulness": ("colourfulness", ""), "brightness": ("brightness", ""),
    "colour_entropy": ("colour entropy (bits)", ""), "edge_density": ("edge density", "%"),
    "high_freq_energy": ("high-frequency energy", "%"), "grid_score": ("grid score (pixels, tuned - base)", ""),
    "score": ("score (--scorer)", ""),
}


def fmt(value, unit: str = "", signed: bool = False) -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value * 100:+.2f} %" if signed else f"{value * 100:.2f} %"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def grid_line(maps: dict) -> str:
    """One line: the latent grid score with its CI, or why there is none."""
    if maps["grid_score"] is None:
        reason = "patch period 1: no patch frequency" if maps["patch_period"] < 2 else "v_tuned - v_base is zero"
        return f"grid score: n/a ({reason})"
    lo, hi = maps["grid_score_ci"]
    return (f"grid score {maps['grid_score']:.3g}  95% CI [{fmt(lo)}, {fmt(hi)}]  (power of v_tuned - v_base at the "
            f"{maps['patch_period']}x{maps['patch_period']} patch lattice / its neighbours; ~1 = no grid)")


def render_where(summary: dict, console) -> None:
    """Below compare's table: where the inflation lives (maps) and what the images show (signals)."""
    from rich.table import Table

    maps = summary.get("maps")
    if maps:
        parts = [f"{region.replace('_', ' ')} {fmt(r['map_min'])}..{fmt(r['map_max'])}"
                 for region, r in maps["regions"].items()]
        console.print("ratio map range by region: " + " · ".join(parts))
        console.print(grid_line(maps))
    signals = summary.get("image_signals")
    if signals:
        table = Table(title="image signals of free mode (final images, same noise)", title_justify="left")
        for name in ("signal", "base", "tuned", "tuned - base", "95% CI"):
            table.add_column(name, justify="right")
        for row in signals["signals"]:
            label, unit = SIGNAL_LABELS.get(row["signal"], (row["signal"], ""))
            lo, hi = row["ci"]
            signed = row["signal"] != "grid_score"  # already a tuned-vs-base quantity, ~1 = nothing
            table.add_row(label, fmt(row["base"], unit), fmt(row["tuned"], unit), fmt(row["difference"], unit, signed),
                          f"[{fmt(lo, unit, signed)}, {fmt(hi, unit, signed)}]")
        console.print(table)
