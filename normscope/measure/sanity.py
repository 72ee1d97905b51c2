"""Is an inflation a plausible result at all? A collapse or an explosion is a broken checkpoint, not a measurement.

RL fine-tuning inflates the velocity by +5-15 % (the paper's effect); a NormGuard run lands near 0. A tuned
model whose velocity is halved (or zero: a zeroed output projection reads -100 %) did not learn to deflate,
it is broken, and a gate on *maximum* inflation would pass it. Above +100 % (the velocity more than doubled)
the number is no longer RL inflation either: wrong weights, a wrong scale, an overflow.

``normscope check`` turns a collapse into an error verdict (exit 3) and an explosion into a failure said to be
implausible (exit 1, whatever the gate); compare warns; sweep marks the row.
"""

from __future__ import annotations

import math

MIN_INFLATION = -0.5  # default floor: below it the tuned velocity is less than half the base's
MAX_PLAUSIBLE_INFLATION = 1.0  # above it the tuned velocity is more than twice the base's
COLLAPSED, EXPLODED = "collapsed", "exploded"


def sanity(inflation: float | None, min_inflation: float = MIN_INFLATION) -> str | None:
    """``"collapsed"`` below ``min_inflation``, ``"exploded"`` above +100 %, else None (also for no measurement)."""
    if inflation is None or not math.isfinite(inflation):
        return None
    if inflation < min_inflation:
        return COLLAPSED
    if inflation > MAX_PLAUSIBLE_INFLATION:
        return EXPLODED
    return None


def sanity_line(name: str, inflation: float, status: str) -> str:
    """The one line that says why the number is not a result."""
    if status == COLLAPSED:
        return (f"{name}'s velocity is {abs(inflation) * 100:.0f} % below the base's: the model collapsed (zero output?) "
                "— a broken checkpoint, not a pass")
    return (f"{name}'s velocity is {inflation * 100:.0f} % above the base's: implausible for RL inflation (+5-15 %) "
            "— a broken checkpoint (wrong weights, scale or an overflow?), not a measurement of inflation")


__all__ = ["COLLAPSED", "EXPLODED", "MAX_PLAUSIBLE_INFLATION", "MIN_INFLATION", "sanity", "sanity_line"]
