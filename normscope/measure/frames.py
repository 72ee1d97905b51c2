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

FRAME = "frame"
FRAME_AXIS = 2  # (B, C, F, H, W)
FRAME_COLUMNS = ("mode", "drive", "prompt_id", "seed", "step", "sigma", "expert", "branch", FRAME,
                 "norm_base", "norm_tuned", "ratio")


def frame_norms(v: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, F): the L2 norm of each latent frame of each sample, in float32."""
    return torch.linalg.vector_norm(v.transpose(1, FRAME_AXIS).flatten(2), dim=2, dtype=torch.float32)


class FrameNorms:
    """Capture observer: per-frame norms of every branch at every step, driver and (paired) other model.

    Records nothing for latents that are not 5-D, so it can be attached to any pipeline.
    """

    def __init__(self) -> None:
        self._steps: dict[str, list[torch.Tensor]] = {}

    def __call__(self, step_index, sigma, branch, expert, v_driver, v_other, family=None) -> None:
        if v_driver.ndim != 5:
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


def frame_table(mode: str, drive: str, samples: list[Sample], frames: dict[str, torch.Tensor],
                sigmas: np.ndarray, experts: list[str] | None,
                base_frames: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """Rows (sample, step, branch, frame) of one batch.

    Paired mode: ``frames`` holds driver and other. Free mode: ``frames`` is the tuned model's record and
    ``base_frames`` the base's, each on its own trajectory.
    """
    parts = []
    for branch, stats in frames.items():
        stats = stats.double().numpy()
        steps, _, batch, n_frames = stats.shape
        if base_frames is not None:
            tuned, base = stats[:, 0], base_frames[branch].double().numpy()[:, 0]
        elif drive == "tuned":
            tuned, base = stats[:, 0], stats[:, 1]
        else:
            base, tuned = stats[:, 0], stats[:, 1]
        # (steps, batch, frames) -> sample-major, then step, then frame
        order = (1, 0, 2)
        tuned, base = tuned.transpose(order).reshape(-1), base.transpose(order).reshape(-1)
        n = steps * batch * n_frames
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(np.isfinite(base) & np.isfinite(tuned) & (base > 0), tuned / base, np.nan)
        labels = np.asarray(experts if experts else [""] * steps, dtype=object)
        parts.append(pd.DataFrame({
            "mode": np.full(n, mode, dtype=object),
            "drive": np.full(n, drive if base_frames is None else "", dtype=object),
            "prompt_id": np.repeat([s.prompt_id for s in samples], steps * n_frames),
            "seed": np.repeat([s.seed for s in samples], steps * n_frames),
            "step": np.tile(np.repeat(np.arange(steps), n_frames), batch),
            "sigma": np.tile(np.repeat(np.asarray(sigmas, dtype=np.float64)[:steps], n_frames), batch),
            "expert": np.tile(np.repeat(labels, n_frames), batch),
            "branch": np.full(n, branch, dtype=object),
            FRAME: np.tile(np.arange(n_frames), steps * batch),
            "norm_base": base,
            "norm_tuned": tuned,
            "ratio": ratio,
        }))
    if not parts:
        return pd.DataFrame(columns=list(FRAME_COLUMNS))
    return pd.concat(parts, ignore_index=True)


def frame_profile(frames: pd.DataFrame, mode: str, branch: str = "guided") -> pd.DataFrame:
    """(frame x step) mean ratio over samples, for one mode and branch: the table behind the figure."""
    rows = frames[(frames["mode"] == mode) & (frames["branch"] == branch)]
    return rows.pivot_table(index=FRAME, columns="step", values="ratio", aggfunc="mean")
