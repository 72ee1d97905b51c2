"""``compare --measure-steps K``: in paired mode the driving model runs every step, the other model only at K.

The K steps are stratified across sigma: the targets are K values evenly spaced from the first step's sigma to
the last's, and each takes the nearest step not yet taken (the first and the last step always measured). The
headline is then the trapezoid sigma-integral of the per-step mean ratio over the K measured steps (the same
``stats.sigma_integral`` that joins neighbours over a missing step), with the prompt bootstrap's CI as usual;
the CI covers the sampling of prompts and seeds, not the interpolation between measured steps (docs/performance.md
measures that error as a function of K). The driver's trajectory does not depend on which steps are measured,
so the K measured steps hold exactly the numbers a full run holds at those steps.
"""

from __future__ import annotations

import numpy as np


def plan_steps(sigmas, k: int) -> list[int]:
    """The K step indices (sorted) of a schedule with these per-step sigmas; all steps when K >= their number."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    n = sigmas.size
    if k >= n:
        return list(range(n))
    chosen = {0, n - 1}
    targets = np.linspace(sigmas[0], sigmas[-1], k)[1:-1]
    for target in targets:
        order = np.argsort(np.abs(sigmas - target), kind="stable")
        chosen.add(int(next(i for i in order if int(i) not in chosen)))
    return sorted(chosen)


def subsampled_headline(step_means: np.ndarray, sigma: np.ndarray, k: int) -> float:
    """The sigma-integral of ``ratio - 1`` from the K planned steps of a full run's per-step mean ratios."""
    from normscope.measure.stats import sigma_integral

    steps = plan_steps(sigma, k)
    return float(sigma_integral(np.asarray(step_means)[steps] - 1.0, np.asarray(sigma)[steps]))
