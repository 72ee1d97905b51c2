"""Per-latent-frame velocity norms of video pipelines (Wan): a capture observer and its tidy table.

A video latent is (B, C, F, H, W). The headline ratio is over the whole latent video; here each latent frame
f gets its own norm ||v[:, :, f]|| (L2 over channels and pixels, float32), so inflation can be read by frame
and step. The per-frame norms of a velocity combine exactly to its whole norm:
``||v||^2 = sum_f ||v[:, :, f]||^2``.

Statistics stay on the device until the pipeline call ends, as for the whole-latent norms.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from normscope.measure.prompts import Sample
from normscope.measure.table import MODE_ORDER

FRAME = "frame"
FRAME_AXIS = 2  # (B, C, F, H, W)
VIDEO_LAYOUT = "bcfhw"
FRAME_COLUMNS = ("mode", "drive", "prompt_id", "seed", "step", "sigma", "expert", "branch", FRAME,
                 "norm_base", "norm_tuned", "ratio")


def frame_norms(v: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F): the L2 norm of each latent frame of each sample, in float32."""
    return torch.linalg.vector_norm(v.transpose(1, FRAME_AXIS).flatten(2), dim=2, dtype=torch.float32)


class FrameNorms:
    """Capture observer (a ``CollectingObserver``): per-frame norms of every branch at every step, of the
    driver and (paired mode) the other model. Records nothing unless the family's latents are video
    (``latent_layout`` ``bcfhw``), so it can be attached to any pipeline.
    """

    name = "frames"

    def __init__(self) -> None:
        self._steps: dict[str, list[torch.Tensor]] = {}

    def __call__(self, step_index, sigma, branch, expert, v_driver, v_other, family=None) -> None:
        if (family is not None and family.latent_layout != VIDEO_LAYOUT) or v_driver.ndim != 5:
            return
        norms = [frame_norms(v_driver)]
        if v_other is not None:
            norms.append(frame_norms(v_other))
        self._steps.setdefault(branch, []).append(torch.stack(norms))

    def collect(self) -> dict[str, torch.Tensor]:
        """branch -> (steps, 1 or 2 [driver, other], batch, frames) on the CPU; empty for image latents."""
        out = {branch: torch.stack(items).cpu() for branch, items in self._steps.items()}
        self._steps = {}
        return out


def _rows(mode: str, drive: str, samples: list[Sample], record, branch: str, base: np.ndarray, tuned: np.ndarray) -> pd.DataFrame:
    """(steps, batch, frames) norms of one branch -> rows, sample-major, then step, then frame."""
    steps, batch, n_frames = tuned.shape
    base = base.transpose(1, 0, 2).reshape(-1)
    tuned = tuned.transpose(1, 0, 2).reshape(-1)
    n = steps * batch * n_frames
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isfinite(base) & np.isfinite(tuned) & (base > 0), tuned / base, np.nan)
    per_step = steps * n_frames
    return pd.DataFrame({
        "mode": np.full(n, mode, dtype=object),
        "drive": np.full(n, drive, dtype=object),
        "prompt_id": np.repeat([s.prompt_id for s in samples], per_step),
        "seed": np.repeat([s.seed for s in samples], per_step),
        "step": np.tile(np.repeat(np.arange(steps), n_frames), batch),
        "sigma": np.tile(np.repeat(record.sigmas.double().numpy()[:steps], n_frames), batch),
        "expert": np.tile(np.repeat(np.asarray(record.experts or [""] * steps, dtype=object), n_frames), batch),
        "branch": np.full(n, branch, dtype=object),
        FRAME: np.tile(np.arange(n_frames), steps * batch),
        "norm_base": base,
        "norm_tuned": tuned,
        "ratio": ratio,
    })


def _finish(parts: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(FRAME_COLUMNS))


def paired_frames(record, samples: list[Sample], drive: str, mode: str = "paired") -> pd.DataFrame:
    """Per-frame rows of a paired-mode call (``record.observed["frames"]``: driver and other); ``mode`` labels
    them (``rescaled`` for the inference-rescale ablation, also a driver with the base evaluated beside it)."""
    parts = []
    for branch, stats in record.observed.get(FrameNorms.name, {}).items():
        stats = stats.double().numpy()
        driver, other = stats[:, 0], stats[:, 1]
        base, tuned = (other, driver) if drive == "tuned" else (driver, other)
        parts.append(_rows(mode, drive, samples, record, branch, base, tuned))
    return _finish(parts)


def free_frames(base, tuned, samples: list[Sample]) -> pd.DataFrame:
    """Per-frame rows of free mode: each model's record from its own trajectory."""
    parts = []
    tuned_frames = tuned.observed.get(FrameNorms.name, {})
    for branch, stats in base.observed.get(FrameNorms.name, {}).items():
        parts.append(_rows("free", "", samples, base, branch, stats[:, 0].double().numpy(),
                           tuned_frames[branch][:, 0].double().numpy()))
    return _finish(parts)


def tidy_frames(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """All batches in the canonical order (mode, prompt, seed, step, branch, frame)."""
    frame = _finish([f for f in frames if len(f)])
    if frame.empty:
        return frame
    mode_rank = frame["mode"].map({m: i for i, m in enumerate(MODE_ORDER)})
    branch_rank = frame["branch"].map({b: i for i, b in enumerate(("guided", "cond", "uncond", "combined"))})
    order = np.lexsort((frame[FRAME], branch_rank, frame["step"], frame["seed"], frame["prompt_id"], mode_rank))
    return frame.iloc[order].reset_index(drop=True)


def frame_profile(frames: pd.DataFrame, mode: str, branch: str = "guided") -> pd.DataFrame:
    """(frame x step) mean ratio over samples, for one mode and branch: the table behind the figure."""
    rows = frames[(frames["mode"] == mode) & (frames["branch"] == branch)]
    return rows.pivot_table(index=FRAME, columns="step", values="ratio", aggfunc="mean")
