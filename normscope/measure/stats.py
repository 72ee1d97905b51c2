"""Stats stage: per-step profiles, bootstrap confidence intervals and the headline inflation.

Definitions (also in docs/compare.md):

* per sample and step, ``ratio = ||v_tuned|| / ||v_base||`` (L2 over all latent elements, float32);
* per step, the mean ratio over (prompt, seed) samples;
* two estimates of inflation, both on the per-step mean ratios minus 1:

  - ``sigma_integral`` (the headline): the trapezoid integral of the per-step mean ratio over sigma,
    divided by the sigma span it covers, so each step counts by the stretch of noise level around it;
    it does not move when ``--steps`` or the scheduler's shift packs more steps near noise;
  - ``step_mean``: the plain mean over steps (every step counts the same);

* every CI is a percentile bootstrap that resamples **prompts** (clusters: all seeds and steps of a
  prompt move together), because seeds of one prompt are correlated; with a single prompt only the
  seeds vary, and they are resampled.

Non-finite norms are counted and left out of every mean; they never turn a mean into NaN silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from normscope.config import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI_LEVEL, HEADLINE_ESTIMATE
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
SIGMA_INTEGRAL, STEP_MEAN = "sigma_integral", "step_mean"
ESTIMATES = (SIGMA_INTEGRAL, STEP_MEAN)
BY_PROMPT, BY_SAMPLE = "prompt", "sample"  # what the bootstrap resamples
DEFINITIONS = {
    SIGMA_INTEGRAL: "inflation = trapezoid integral over sigma of (mean over prompt/seed samples of "
                    "||v_tuned|| / ||v_base||) - 1, divided by the sigma span of the steps",
    STEP_MEAN: "inflation = mean over denoising steps of (mean over prompt/seed samples of "
               "||v_tuned|| / ||v_base||) - 1",
}


def select(frame: pd.DataFrame, mode: str, branch: str) -> pd.DataFrame:
    return frame[(frame[MODE] == mode) & (frame[BRANCH] == branch)]


def sample_matrices(rows: pd.DataFrame, columns: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(samples, steps) matrices of several columns from one pivot, and each row's prompt id; NaN where missing."""
    wide = rows.pivot_table(index=list(SAMPLE_KEY), columns=STEP, values=list(columns), aggfunc="first", dropna=False)
    wide = wide.sort_index()
    prompts = wide.index.get_level_values(PROMPT_ID).to_numpy()
    return {column: wide[column].to_numpy(dtype=np.float64) for column in columns}, prompts


def sample_matrix(rows: pd.DataFrame, column: str = RATIO) -> np.ndarray:
    """(samples, steps) matrix of one column; NaN where a value is missing or non-finite."""
    return sample_matrices(rows, (column,))[0][column]


def bootstrap_weights(clusters: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """How often each sample is drawn in each resample, (resamples, samples), when whole clusters are drawn.

    ``clusters[i]`` names sample i's cluster (its prompt); a resample draws as many clusters as there are,
    with replacement, and takes every sample of a drawn cluster. With a single cluster nothing could vary,
    so the samples themselves are resampled (the seeds of that one prompt). Fixed seed: same data, same CI.
    """
    clusters = np.asarray(clusters)
    ids, index = np.unique(clusters, return_inverse=True)
    rng = np.random.default_rng(seed)
    if len(ids) < 2:
        ids, index = np.arange(len(clusters)), np.arange(len(clusters))
    counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=resamples)
    return counts[:, index].astype(np.float64)


def resample_unit(clusters: np.ndarray, by: str = BY_PROMPT) -> str:
    """What the bootstrap actually resampled: prompts, or samples (asked for, or only one prompt)."""
    return BY_PROMPT if by == BY_PROMPT and len(np.unique(clusters)) > 1 else BY_SAMPLE


def _weights(clusters: np.ndarray, by: str) -> np.ndarray:
    if by not in (BY_PROMPT, BY_SAMPLE):
        raise ValueError(f"by must be {BY_PROMPT!r} or {BY_SAMPLE!r}, got {by!r}")
    return bootstrap_weights(clusters if by == BY_PROMPT else np.arange(len(clusters)))


def sigma_weights(sigma: np.ndarray) -> np.ndarray:
    """Trapezoid weights of the steps over sigma, divided by the span, so they sum to 1.

    A single step (or steps that share one sigma) covers no span: each step then counts the same.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    gaps = np.abs(np.diff(sigma))
    span = gaps.sum()
    if sigma.size < 2 or span <= 0:
        return np.full(sigma.size, 1.0 / max(sigma.size, 1))
    weights = np.zeros(sigma.size)
    weights[:-1] += gaps / 2
    weights[1:] += gaps / 2
    return weights / span


def sigma_integral(step_means: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The trapezoid integral over sigma of per-step values, divided by the span; rows of ``(..., steps)``.

    Steps whose value is NaN (no finite sample) are left out and the trapezoid joins their neighbours.
    """
    values = np.atleast_2d(np.asarray(step_means, dtype=np.float64))
    out = np.full(values.shape[0], np.nan)
    finite = np.isfinite(values)
    for pattern in np.unique(finite, axis=0):
        if pattern.any():
            rows = (finite == pattern).all(axis=1)
            out[rows] = values[rows][:, pattern] @ sigma_weights(np.asarray(sigma)[pattern])
    return out if np.ndim(step_means) > 1 else out[0]


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


def step_profile(rows: pd.DataFrame, by: str = BY_PROMPT) -> pd.DataFrame:
    """Per-step statistics of one mode and branch: means, spread, mean ratio with its CI, hinge rate."""
    matrices, clusters = sample_matrices(rows, (RATIO, HINGE, NORM_BASE, NORM_TUNED, COSINE, MSE))
    ratio, hinge = matrices[RATIO], matrices[HINGE]
    lo, hi = _interval(_boot_step_means(ratio, _weights(clusters, by)))
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


def _step_sigmas(rows: pd.DataFrame) -> np.ndarray:
    return rows.groupby(STEP, sort=True)[SIGMA].first().to_numpy(dtype=np.float64)


def inflation_estimates(rows: pd.DataFrame, by: str = BY_PROMPT) -> dict[str, tuple[float, float, float]]:
    """Both estimates of inflation, ``{name: (value, ci_lo, ci_hi)}``, from one set of bootstrap resamples.

    ``by`` is what the bootstrap resamples: ``"prompt"`` (clusters; the default) or ``"sample"``.
    """
    matrices, clusters = sample_matrices(rows, (RATIO,))
    ratio = matrices[RATIO]
    if not np.isfinite(ratio).any():
        return {name: (float("nan"),) * 3 for name in ESTIMATES}
    sigma = _step_sigmas(rows)
    means = _nanmean(ratio, axis=0)
    boot = _boot_step_means(ratio, _weights(clusters, by))
    # Excesses (ratio - 1) are averaged, not ratios: weights that sum to 1 only to round-off then still give
    # exactly 0 for a model against itself.
    points = {SIGMA_INTEGRAL: sigma_integral(means - 1.0, sigma), STEP_MEAN: _nanmean(means - 1.0)}
    resampled = {SIGMA_INTEGRAL: sigma_integral(boot - 1.0, sigma), STEP_MEAN: _nanmean(boot - 1.0, axis=1)}
    out = {}
    for name in ESTIMATES:
        lo, hi = _interval(resampled[name])
        out[name] = (float(points[name]), float(lo), float(hi))
    return out


def inflation(rows: pd.DataFrame, estimate: str = HEADLINE_ESTIMATE, by: str = BY_PROMPT) -> tuple[float, float, float]:
    """One estimate of inflation (default: the headline, the sigma-integral) and its 95 % bootstrap CI."""
    return inflation_estimates(rows, by)[estimate]


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


def ci_method(frame: pd.DataFrame) -> dict:
    """How every CI in a summary was made: level, resamples, and what was resampled."""
    prompts = frame[PROMPT_ID].unique()
    return {"level": CI_LEVEL, "method": "percentile bootstrap", "resamples": BOOTSTRAP_RESAMPLES,
            "unit": resample_unit(prompts), "clusters": int(len(prompts))}


def mode_summary(frame: pd.DataFrame, mode: str) -> dict:
    """Inflation (both estimates), regions and per-step profiles of every branch captured in one mode."""
    branches = {}
    for branch in frame[frame[MODE] == mode][BRANCH].unique():
        rows = select(frame, mode, branch)
        profile = step_profile(rows)
        estimates = {name: {"inflation": _clean(value), "inflation_ci": [_clean(lo), _clean(hi)]}
                     for name, (value, lo, hi) in inflation_estimates(rows).items()}
        branches[branch] = {
            **estimates[HEADLINE_ESTIMATE],
            "estimates": estimates,
            "regions": region_inflation(profile),
            "hinge_rate": _clean(_nanmean(profile[HINGE_RATE].to_numpy())),
            NONFINITE: int(rows[RATIO].isna().sum()),
            "per_step": profile_records(profile),
        }
    return branches


def n_samples(frame: pd.DataFrame) -> int:
    return int(frame[[PROMPT_ID, SEED]].drop_duplicates().shape[0])
