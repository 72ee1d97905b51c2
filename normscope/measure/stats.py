"""Stats stage: per-step profiles, bootstrap confidence intervals and the headline inflation.

Definitions (also in docs/compare.md):

* per sample and step, ``ratio = ||v_tuned|| / ||v_base||`` (L2 over all latent elements, float32);
* per step, the mean ratio over (prompt, seed) samples, with a percentile bootstrap CI that
  resamples samples;
* **inflation** = mean over steps of the per-step mean ratio, minus 1, on the guided velocity of
  the first mode run; its CI resamples whole samples (all steps of a sample move together).

Non-finite norms are counted and left out of every mean; they never turn a mean into NaN silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from normscope.config import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL
from normscope.measure.table import (
    BRANCH,
    COSINE,
    HINGE,
    MODE,
    MSE,
    NORM_BASE,
    NORM_TUNED,
    PROMPT_ID,
    RATIO,
    SAMPLE_KEY,
    SEED,
    SIGMA,
    STEP,
    TIMESTEP,
)

# Keys of the per-step profile; the same names are used in summary.json.
N = "n"
RATIO_LO, RATIO_HI = "ratio_lo", "ratio_hi"
HINGE_RATE = "hinge_rate"
NONFINITE = "nonfinite"
REGIONS = (("near_noise", 2 / 3, 1.01), ("middle", 1 / 3, 2 / 3), ("near_data", -0.01, 1 / 3))


def select(frame: pd.DataFrame, mode: str, branch: str) -> pd.DataFrame:
    return frame[(frame[MODE] == mode) & (frame[BRANCH] == branch)]


def sample_matrices(rows: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """(samples, steps) matrices of several columns from one pivot; NaN where a value is missing."""
    wide = rows.pivot_table(index=list(SAMPLE_KEY), columns=STEP, values=list(columns), aggfunc="first", dropna=False)
    wide = wide.sort_index()
    return {column: wide[column].to_numpy(dtype=np.float64) for column in columns}


def sample_matrix(rows: pd.DataFrame, column: str = RATIO) -> np.ndarray:
    """(samples, steps) matrix of one column; NaN where a value is missing or non-finite."""
    return sample_matrices(rows, (column,))[column]


def bootstrap_weights(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """How often each of ``n`` samples is drawn in each resample: (resamples, n), fixed seed."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _boot_step_means(matrix: np.ndarray, weights: np.ndarray) -> np.ndarray:
    finite = np.isfinite(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ np.where(finite, matrix, 0.0)) / (weights @ finite)


def _interval(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1 - CI_LEVEL) / 2 * 100
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps give a NaN interval, reported as n/a
        lo, hi = np.nanpercentile(values, [alpha, 100 - alpha], axis=axis)
    return lo, hi


def _nanmean(values: np.ndarray, axis: int = 0) -> np.ndarray:
    finite = np.isfinite(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)[()]  # [()]: 0-d -> scalar


def step_profile(rows: pd.DataFrame) -> pd.DataFrame:
    """Per-step statistics of one mode and branch: means, spread, mean ratio with its CI, hinge rate."""
    matrices = sample_matrices(rows, (RATIO, HINGE, NORM_BASE, NORM_TUNED, COSINE, MSE))
    ratio, hinge = matrices[RATIO], matrices[HINGE]
    weights = bootstrap_weights(ratio.shape[0])
    lo, hi = _interval(_boot_step_means(ratio, weights))
    firsts = rows.groupby(STEP, sort=True)[[TIMESTEP, SIGMA]].first()
    finite = np.isfinite(ratio)

    def mean(column: str) -> np.ndarray:
        return _nanmean(np.where(finite, matrices[column], np.nan))

    def std(column: str) -> np.ndarray:
        centred = np.where(finite, matrices[column], np.nan) - mean(column)
        with np.errstate(invalid="ignore"):
            return np.sqrt(_nanmean(centred**2))

    profile = pd.DataFrame({
        STEP: firsts.index.to_numpy(),
        TIMESTEP: firsts[TIMESTEP].to_numpy(),
        SIGMA: firsts[SIGMA].to_numpy(),
        N: finite.sum(axis=0),
        NONFINITE: (~finite).sum(axis=0),
        NORM_BASE: mean(NORM_BASE),
        "norm_base_std": std(NORM_BASE),
        NORM_TUNED: mean(NORM_TUNED),
        "norm_tuned_std": std(NORM_TUNED),
        RATIO: _nanmean(ratio),
        RATIO_LO: lo,
        RATIO_HI: hi,
        HINGE_RATE: _nanmean(np.where(finite, (hinge > 0).astype(np.float64), np.nan)),
        HINGE: _nanmean(hinge),
        COSINE: mean(COSINE),
        MSE: mean(MSE),
    })
    return profile


def inflation(rows: pd.DataFrame) -> tuple[float, float, float]:
    """Headline inflation and its bootstrap CI: mean over steps of the per-step mean ratio, minus 1."""
    ratio = sample_matrix(rows, RATIO)
    if not np.isfinite(ratio).any():
        return float("nan"), float("nan"), float("nan")
    point = float(_nanmean(_nanmean(ratio, axis=0)) - 1.0)
    boot = _nanmean(_boot_step_means(ratio, bootstrap_weights(ratio.shape[0])), axis=1) - 1.0
    lo, hi = _interval(boot)
    return point, float(lo), float(hi)


def region_inflation(profile: pd.DataFrame) -> dict[str, float | None]:
    """Inflation restricted to the steps near noise (sigma > 2/3), in the middle, and near data (< 1/3)."""
    out: dict[str, float | None] = {}
    for name, lo, hi in REGIONS:
        part = profile[(profile[SIGMA] > lo) & (profile[SIGMA] <= hi)][RATIO].to_numpy()
        value = _nanmean(part) if part.size else np.nan
        out[name] = None if not np.isfinite(value) else float(value - 1.0)
    return out


def _clean(value):
    """JSON-safe: NaN/inf become None, numpy scalars become Python numbers."""
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def profile_records(profile: pd.DataFrame) -> list[dict]:
    """The per-step profile as the list of objects stored under ``per_step`` in summary.json."""
    records = []
    for row in profile.to_dict(orient="records"):
        row = {k: _clean(v) for k, v in row.items()}
        row["ratio_ci"] = [row.pop(RATIO_LO), row.pop(RATIO_HI)]
        records.append(row)
    return records


def mode_summary(frame: pd.DataFrame, mode: str) -> dict:
    """Inflation, regions and per-step profiles of every branch captured in one mode."""
    branches = {}
    for branch in frame[frame[MODE] == mode][BRANCH].unique():
        rows = select(frame, mode, branch)
        profile = step_profile(rows)
        value, lo, hi = inflation(rows)
        branches[branch] = {
            "inflation": _clean(value),
            "inflation_ci": [_clean(lo), _clean(hi)],
            "regions": region_inflation(profile),
            "hinge_rate": _clean(_nanmean(profile[HINGE_RATE].to_numpy())),
            NONFINITE: int(rows[RATIO].isna().sum()),
            "per_step": profile_records(profile),
        }
    return branches


def n_samples(frame: pd.DataFrame) -> int:
    return int(frame[[PROMPT_ID, SEED]].drop_duplicates().shape[0])
