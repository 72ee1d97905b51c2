"""Table stage: captured records -> one tidy pandas frame, one row per mode/sample/step/branch.

Column names are constants shared by the statistics, outputs, figures and tests.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from normscope.measure.capture import BRANCHES, STREAM_SEP, CallRecord
from normscope.measure.prompts import Sample

MODE = "mode"
DRIVE = "drive"
PROMPT_ID = "prompt_id"
PROMPT = "prompt"
SEED = "seed"
STEP = "step"
TIMESTEP = "timestep"
SIGMA = "sigma"
BRANCH = "branch"
EXPERT = "expert"  # which transformer ran the step: high_noise / low_noise (Wan2.2-A14B), "" otherwise
STREAM = "stream"  # multi-stream families only (LTX-2: video, audio), right after EXPERT; absent otherwise
NORM_BASE = "norm_base"
NORM_TUNED = "norm_tuned"
RATIO = "ratio"
HINGE = "hinge"
COSINE = "cosine"
MSE = "mse"

COLUMNS = (MODE, DRIVE, PROMPT_ID, PROMPT, SEED, STEP, TIMESTEP, SIGMA, EXPERT, BRANCH,
           NORM_BASE, NORM_TUNED, RATIO, HINGE, COSINE, MSE)
SAMPLE_KEY = (PROMPT_ID, SEED)
RESCALED = "rescaled"  # compare --rescale-to-base: paired statistics on the rescaled tuned model's trajectory
MODE_ORDER = ("paired", "free", RESCALED)


def _base_columns(mode: str, drive: str, samples: list[Sample], record: CallRecord, branch: str) -> dict:
    steps, batch = record.steps, len(samples)
    return {
        MODE: np.full(steps * batch, mode, dtype=object),
        DRIVE: np.full(steps * batch, drive, dtype=object),
        PROMPT_ID: np.repeat([s.prompt_id for s in samples], steps),
        PROMPT: np.repeat(np.array([s.prompt for s in samples], dtype=object), steps),
        SEED: np.repeat([s.seed for s in samples], steps),
        STEP: np.tile(np.arange(steps) if record.step_index is None else record.step_index.numpy(), batch),
        TIMESTEP: np.tile(record.timesteps.double().numpy(), batch),
        SIGMA: np.tile(record.sigmas.double().numpy(), batch),
        EXPERT: np.tile(np.asarray(record.experts or [""] * steps, dtype=object), batch),
        BRANCH: np.full(steps * batch, branch, dtype=object),
    }


def _by_sample(stat: np.ndarray) -> np.ndarray:
    """(steps, batch) -> flat, sample-major, to match ``_base_columns``."""
    return np.ascontiguousarray(stat.T).reshape(-1).astype(np.float64)


def _finish(columns: dict) -> pd.DataFrame:
    base, tuned = columns[NORM_BASE], columns[NORM_TUNED]
    finite = np.isfinite(base) & np.isfinite(tuned) & (base > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        columns[RATIO] = np.where(finite, tuned / base, np.nan)
        columns[HINGE] = np.where(finite, np.maximum(tuned - base, 0.0), np.nan)
    columns.setdefault(COSINE, np.full(base.shape, np.nan))
    columns.setdefault(MSE, np.full(base.shape, np.nan))
    return pd.DataFrame({name: columns[name] for name in COLUMNS})


def stream_keys(record: CallRecord) -> list[tuple[str, str, str]]:
    """(stream, branch, key in record.stats) in stream then branch order; stream "" for one-stream families."""
    keys = [k for k in record.stats if STREAM_SEP in k]
    streams = [record.stream] + list(dict.fromkeys(k.split(STREAM_SEP)[0] for k in keys))
    out = []
    for i, stream in enumerate(streams):
        for branch in BRANCHES:
            key = f"{stream}{STREAM_SEP}{branch}" if i else branch
            if key in record.stats:
                out.append((stream if keys else "", branch, key))
    return out


def _with_stream(frame: pd.DataFrame, stream: str, multi: bool) -> pd.DataFrame:
    if multi:
        frame.insert(frame.columns.get_loc(EXPERT) + 1, STREAM, np.full(len(frame), stream, dtype=object))
    return frame


def paired_frame(record: CallRecord, samples: list[Sample], drive: str, mode: str = "paired") -> pd.DataFrame:
    """Rows of a paired-mode call: the driver's and the other model's velocity at the same inputs.

    ``mode="rescaled"``: the same statistics on the trajectory of the inference-rescale ablation.
    Multi-stream families (LTX-2) get a ``stream`` column and rows for every stream.
    """
    frames = []
    names = record.stat_names
    keys = stream_keys(record)
    multi = any(stream for stream, _, _ in keys)
    for stream, branch, key in keys:
        stats = record.stats[key].double().numpy()
        driver, other = stats[:, names.index("norm_driver")], stats[:, names.index("norm_other")]
        base, tuned = (other, driver) if drive == "tuned" else (driver, other)
        columns = _base_columns(mode, drive, samples, record, branch)
        columns[NORM_BASE] = _by_sample(base)
        columns[NORM_TUNED] = _by_sample(tuned)
        columns[COSINE] = _by_sample(stats[:, names.index("cosine")])
        columns[MSE] = _by_sample(stats[:, names.index("mse")])
        frames.append(_with_stream(_finish(columns), stream, multi))
    return pd.concat(frames, ignore_index=True)


def free_frame(base: CallRecord, tuned: CallRecord, samples: list[Sample]) -> pd.DataFrame:
    """Rows of free mode: each model on its own trajectory from the same noise, matched by step."""
    frames = []
    keys = stream_keys(base)
    multi = any(stream for stream, _, _ in keys)
    for stream, branch, key in keys:
        columns = _base_columns("free", "", samples, base, branch)
        columns[NORM_BASE] = _by_sample(base.stats[key][:, 0].double().numpy())
        columns[NORM_TUNED] = _by_sample(tuned.stats[key][:, 0].double().numpy())
        frames.append(_with_stream(_finish(columns), stream, multi))
    return pd.concat(frames, ignore_index=True)


def tidy(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate and sort into the canonical order (mode, prompt, seed, step, branch)."""
    frame = pd.concat(frames, ignore_index=True)
    mode_rank = frame[MODE].map({m: i for i, m in enumerate(MODE_ORDER)})
    branch_rank = frame[BRANCH].map({b: i for i, b in enumerate(BRANCHES)})
    keys = [branch_rank]
    if STREAM in frame.columns:  # the first stream's rows first (the order streams appear in)
        keys.append(frame[STREAM].map({s: i for i, s in enumerate(dict.fromkeys(frame[STREAM]))}))
    order = np.lexsort((*keys, frame[STEP], frame[SEED], frame[PROMPT_ID], mode_rank))
    return frame.iloc[order].reset_index(drop=True)
