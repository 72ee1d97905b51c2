"""How a number reads in every text output (terminal, CI annotations, reports): one formatter each."""

from __future__ import annotations

import math


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a signed percentage (0.0123 -> '+1.23 %'); None or NaN -> 'n/a'."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value * 100:+.{digits}f} %"


def num(value: float | None, digits: int = 4) -> str:
    """A norm or ratio: fixed-point, or scientific once it reaches 1e4; None -> 'n/a'."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"
