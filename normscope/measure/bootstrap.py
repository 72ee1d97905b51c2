"""Cluster bootstrap: confidence intervals that resample whole prompts, not single samples.

The seeds (and steps) of one prompt are not independent draws: a prompt that makes a face makes a face at
every seed. Resampling prompts with replacement, and taking all of a drawn prompt's samples along, gives an
honest interval for an aggregate over prompts.
"""

from __future__ import annotations

import numpy as np

from normscope.config import CI_LEVEL


def cluster_weights(clusters) -> np.ndarray:
    """(resamples, samples) draw counts when whole prompts are resampled: the headline's own bootstrap
    (``stats.bootstrap_weights``, fixed seed; one prompt only: its samples are resampled)."""
    from normscope.measure.stats import bootstrap_weights

    return bootstrap_weights(np.asarray(clusters))


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(finite, [alpha, 100 - alpha])
    return float(lo), float(hi)


def mean_ci(values, clusters) -> tuple[float, float, float]:
    """Mean of per-sample ``values`` and its cluster-bootstrap CI (non-finite values left out)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return float("nan"), float("nan"), float("nan")
    weights = cluster_weights(clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (weights @ np.where(finite, values, 0.0)) / (weights @ finite)
    return (float(values[finite].mean()), *_interval(boot))


def ratio_ci(numerator, denominator, clusters) -> tuple[float, float, float]:
    """sum(numerator) / sum(denominator) over samples and its cluster-bootstrap CI (a ratio of means)."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    if den.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    weights = cluster_weights(clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (weights @ num) / (weights @ den)
    return (float(num.sum() / den.sum()), *_interval(boot))
