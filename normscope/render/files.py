"""The run folder's files: norms.csv, summary.json, profile.png (and the per-step CSV text of ``--format csv``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

NORMS_CSV = "norms.csv"
SUMMARY_JSON = "summary.json"
PROFILE_PNG = "profile.png"
IMAGES_DIR = "images"
FRAMES_CSV = "frames.csv"  # video pipelines: per latent frame
FRAMES_PNG = "frames.png"


def summary_json(summary: dict) -> str:
    """summary.json's text: strict JSON (no NaN; missing values are null)."""
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"


def write_run(result, out: Path, figure: bool = True) -> list[Path]:
    """norms.csv (byte-identical for identical inputs), summary.json and profile.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / NORMS_CSV, out / SUMMARY_JSON]
    result.frame.to_csv(written[0], index=False, lineterminator="\n")
    written[1].write_text(summary_json(result.summary))
    if figure:
        from normscope.render.figures import profile_figure, save_png

        written.append(save_png(profile_figure(result.summary), out / PROFILE_PNG))
    frames = getattr(result, "frames", None)
    if frames is not None and len(frames):
        written.append(out / FRAMES_CSV)
        frames.to_csv(written[-1], index=False, lineterminator="\n")
        if figure:
            from normscope.measure.frames import frame_profile
            from normscope.render.figures import frames_figure

            mode = result.summary["headline_mode"]
            fig = frames_figure(frame_profile(frames, mode), result.summary.get("expert_boundary_step"),
                                f"inflation by latent frame and step ({mode} mode, guided)")
            written.append(save_png(fig, out / FRAMES_PNG))
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
