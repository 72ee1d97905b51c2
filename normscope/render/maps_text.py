"""Terminal rendering of ``compare --maps``: the grid score, the maps' range per region, the image-signal table."""

from __future__ import annotations

import functools

from normscope.render.safe import cell, cells

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
            table.add_row(*cells(label, fmt(row["base"], unit) if signed else "", fmt(row["tuned"], unit) if signed else "",
                                 fmt(row["difference"], unit, signed),
                                 f"[{fmt(lo, unit, signed)}, {fmt(hi, unit, signed)}]"))
        console.print(table)


def render_demo_where(result: dict, console) -> None:
    """``normscope demo``: grid score and image signals of each RL checkpoint next to its inflation."""
    from rich import box
    from rich.table import Table

    table = Table(title="where it lives: grid score (latent) and image signals, tuned − base (free mode)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    columns = (("grid score [95% CI]", None), ("reward", "score_diff"), ("out of range", "out_of_range_diff"),
               ("saturation", "saturation_diff"), ("edges", "edge_density_diff"), ("high freq", "high_freq_energy_diff"),
               ("pixel grid", "pixel_grid_score"))
    table.add_column("model", no_wrap=True)
    for name, _ in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for row in result["rows"][1:]:
        if row.get("grid_score") is None and all(row.get(key) is None for _, key in columns[1:]):
            continue  # a row measured without maps or images (the rescale ablation): nothing to show here
        grid = "n/a" if row.get("grid_score") is None else f"{row['grid_score']:.2f} [{fmt(row['grid_lo'])}, {fmt(row['grid_hi'])}]"
        cells = [grid]
        for _, key in columns[1:]:
            unit = "%" if key in ("out_of_range_diff", "edge_density_diff", "high_freq_energy_diff") else ""
            cells.append(fmt(row.get(key), unit, signed=key != "pixel_grid_score"))
        table.add_row(*map(cell, [row["model"], *cells]))
    console.print(table)
    if result["report"]:
        console.print(cell(f"maps, spectra and the image-signal table of every checkpoint: {result['report']}"))


def render_sweep_where(table, console) -> None:
    """``sweep --maps``: grid score and image signals per checkpoint, next to inflation (which moves first?)."""
    from rich.table import Table

    signals = [c for c in table.columns if c.endswith("_diff") or c == "pixel_grid_score"]
    if "grid_score" not in table and not signals:
        return
    view = Table(title="grid score and image signals over the training run (tuned − base)", title_justify="left")
    for name in ("step", "inflation", "grid score", "95% CI", *(s.removesuffix("_diff").replace("_", " ") for s in signals)):
        view.add_column(name, justify="right")
    def cell(row, key, unit=""):
        v = row.get(key)
        return fmt(None if v is None or v != v else v, unit, signed=key.endswith("_diff") or key == "inflation")

    for row in table.to_dict(orient="records"):
        value = functools.partial(cell, row)
        cells = [str(row["step"]), value("inflation", "%"), value("grid_score"),
                 f"[{value('grid_lo')}, {value('grid_hi')}]"]
        cells += [value(s, "%" if s.removesuffix("_diff") in ("out_of_range", "edge_density", "high_freq_energy") else "")
                  for s in signals]
        view.add_row(*map(cell, cells))
    console.print(view)
