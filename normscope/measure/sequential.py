"""Decide as soon as the data decide: an anytime-valid confidence sequence over prompt clusters.

``check --until-decided``, ``sweep --until-decided`` and ``compare --precision P`` run the samples seed-major
(every prompt with its first seed, then every prompt with its second seed, ...) and after every batch (with
several processes: every round of gathered batches) update a confidence sequence (CS) for the headline
inflation. A CS holds the true value at *every* look at once with probability >= 1 - alpha, so stopping at the
first look where it lies wholly above or below the gate keeps the error rate <= alpha, however many looks
are taken. A bootstrap CI re-read after every batch does not (see docs/compare.md for the simulation).

The method (docs/compare.md "Sequential decisions" states it in full):

* The unit is the prompt (a cluster). Each sample's statistic is its own sigma-integral of ``ratio - 1``; the
  headline is the mean of these over samples (exactly, when no step is non-finite), which with every prompt
  at the same seeds is the mean over prompts of the per-prompt means.
* Pass k (k = 1, 2, ...) is the k-th seed of every prompt. In pass k the observations are, prompt by prompt,
  Z_p = the mean of the prompt's first k samples: independent across prompts, each with mean mu (the
  population headline). On them runs the Robbins normal-mixture boundary with the plug-in standard deviation
  (the "asymptotic confidence sequence" of Waudby-Smith, Arnold, Wu and Ramdas, Ann. Statist. 2024, Thm 2.2):

      Zbar_t +- sd_t * sqrt( 2 (t rho^2 + 1) / (t^2 rho^2) * log( sqrt(t rho^2 + 1) / alpha_k ) )

  with rho chosen to make the boundary tightest at ``T_STAR`` prompts (Howard, Ramdas, McAuliffe and Sekhon,
  Ann. Statist. 2021, the normal-mixture boundary and its tuning), and sd_t widened at few prompts by
  t_{t-1,0.975} / z_{0.975} (``small_sample_factor``; it tends to 1).
* Each pass has its own CS at level alpha_k = alpha * 6 / (pi^2 k^2) (the sum over all k is alpha), so the
  union over passes of "a CS ever misses mu" has probability <= alpha (a union bound). The interval reported
  is the intersection of every look's interval so far.
* No decision before ``MIN_CLUSTERS`` prompts are in a pass's CS: the plug-in standard deviation of a handful
  of prompts is too unreliable.

Assumptions: the prompts are exchangeable draws from the population the gate is about (the same assumption
the fixed design's prompt bootstrap makes); the per-prompt statistic has a finite variance, and the number of
prompts at a look is large enough for the plug-in boundary to hold (asymptotic validity). The tests check the
error rate by simulation, including skewed and heavy-tailed per-prompt distributions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from normscope.measure.prompts import Sample

ALPHA = 0.05
MIN_CLUSTERS = 10  # prompts in a pass's CS before it may decide (8 let a very skewed case reach 9 %: docs/compare.md)
T_STAR = 16  # prompts at which the boundary is tightest
METHOD = ("anytime-valid confidence sequence over prompts: Robbins normal-mixture boundary with plug-in sd "
          "(Waudby-Smith et al. 2024), one per seed pass at alpha*6/(pi^2 k^2), intersected")

ABOVE, BELOW, PRECISE, UNDECIDED = "above", "below", "precise", "undecided"


def seed_major(prompts: list[str], seeds: Iterable[int],
               images: list[str | tuple[str, ...] | None] | None = None) -> list[Sample]:
    """Every prompt with the first seed, then every prompt with the second seed, ...: the first batches span
    the prompts, and a larger plan (more seeds) only appends samples. ``images``: one image path per prompt."""
    images = images or [None] * len(prompts)
    return [Sample(i, prompt, seed, images[i]) for seed in seeds for i, prompt in enumerate(prompts)]


def seed_major_order(samples: list[Sample]) -> list[Sample]:
    """Given samples (a stored reference's) in ``seed_major``'s order: every prompt with the first seed, then the
    second, ... (seeds in the order they first appear)."""
    rank = {seed: i for i, seed in enumerate(dict.fromkeys(s.seed for s in samples))}
    return sorted(samples, key=lambda s: (rank[s.seed], s.prompt_id))


def pass_alpha(k: int, alpha: float = ALPHA) -> float:
    """The error budget of pass k (1-based): alpha * 6 / (pi^2 k^2), summing to alpha over all passes."""
    return alpha * 6.0 / (math.pi ** 2 * k * k)


def _rho(alpha: float, t_star: int = T_STAR) -> float:
    """The mixture scale that makes the normal-mixture boundary tightest at t_star observations (Howard et al.)."""
    a = -2.0 * math.log(alpha)
    return math.sqrt((a + math.log(a + 1.0)) / t_star)


def radius_factor(t: int, alpha: float, t_star: int = T_STAR) -> float:
    """The CS half-width in units of the plug-in sd: sqrt(2 (t rho^2 + 1) / (t^2 rho^2) log(sqrt(t rho^2 + 1) / alpha))."""
    rho2 = _rho(alpha, t_star) ** 2
    return math.sqrt(2.0 * (t * rho2 + 1.0) / (t * t * rho2) * math.log(math.sqrt(t * rho2 + 1.0) / alpha))


Z975 = 1.959963984540054


def small_sample_factor(t: int) -> float:
    """t_{t-1, 0.975} / z_{0.975} (Cornish-Fisher to 1/nu^3: within 1e-3 for nu >= 5): widens the plug-in sd at
    few prompts, tends to 1, so the asymptotic guarantee is untouched. In simulation it cuts the worst case
    (very skewed prompts, a look every 2 samples) from 9.4 % to 6.7 % false decisions (docs/compare.md)."""
    nu, z = t - 1, Z975
    if nu < 1:
        return math.inf
    q = (z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3))
    return q / z


def cs_interval(values: np.ndarray, alpha: float, t_star: int = T_STAR) -> tuple[float, float]:
    """The CS of one pass after its t observations (t >= 2): mean +- sd * small-sample factor * radius_factor."""
    values = np.asarray(values, dtype=np.float64)
    t = values.size
    centre = float(values.mean())
    sd = float(values.std(ddof=1)) if t > 1 else float("inf")
    half = sd * small_sample_factor(t) * radius_factor(t, alpha, t_star)
    return centre - half, centre + half


@dataclass
class Look:
    samples: int
    passes: int
    lo: float
    hi: float
    decision: str

    def to_dict(self) -> dict:
        return {"samples": self.samples, "pass": self.passes, "cs": [_num(self.lo), _num(self.hi)],
                "decision": self.decision}


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class Sequential:
    """The stopping rule: ``gate`` (stop when the CS is wholly above or below it) or ``precision`` (stop when
    the CS half-width is at most it); ``update`` after every batch (round) with the statistics so far."""

    gate: float | None = None
    precision: float | None = None
    alpha: float = ALPHA
    min_clusters: int = MIN_CLUSTERS
    lo: float = -math.inf
    hi: float = math.inf
    looks: list[Look] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.gate is None) == (self.precision is None):
            raise ValueError("a sequential rule needs a gate or a precision (one of them)")

    def update(self, stats: dict[tuple[int, int], float], seeds: list[int]) -> str:
        """``stats[(prompt_id, seed)]`` = each measured sample's statistic; ``seeds`` in plan order. Returns the
        decision (ABOVE, BELOW, PRECISE or UNDECIDED) after folding in every pass's CS at this look."""
        rank = {seed: i for i, seed in enumerate(seeds)}
        by_prompt: dict[int, list[tuple[int, float]]] = {}
        for (prompt, seed), value in stats.items():
            by_prompt.setdefault(prompt, []).append((rank[seed], value))
        deepest = 0
        for k in range(1, len(seeds) + 1):
            # Z_p = mean of the prompt's first k seeds, for the prompts that have all of them
            z = [np.mean([v for r, v in sorted(items)[:k]]) for items in by_prompt.values()
                 if len(items) >= k and {r for r, _ in items} >= set(range(k))]
            if not z:
                break
            deepest = k
            if len(z) < max(self.min_clusters, 2) or not np.all(np.isfinite(z)):
                continue
            lo, hi = cs_interval(np.asarray(z), pass_alpha(k, self.alpha))
            self.lo, self.hi = max(self.lo, lo), min(self.hi, hi)
        decision = self.decision()
        self.looks.append(Look(len(stats), deepest, self.lo, self.hi, decision))
        return decision

    def decision(self) -> str:
        if self.lo > self.hi:  # the passes' intervals disagree: they cannot all hold; decide nothing
            return UNDECIDED
        if self.gate is not None:
            if self.lo > self.gate:
                return ABOVE
            if self.hi < self.gate:
                return BELOW
            return UNDECIDED
        return PRECISE if (self.hi - self.lo) / 2 <= self.precision else UNDECIDED

    @property
    def decided(self) -> bool:
        return bool(self.looks) and self.looks[-1].decision != UNDECIDED

    def summary(self, used: int, planned: int) -> dict:
        decision = self.looks[-1].decision if self.looks else UNDECIDED
        return {
            "rule": "gate" if self.gate is not None else "precision",
            "gate": self.gate,
            "precision": self.precision,
            "alpha": self.alpha,
            "method": METHOD,
            "min_clusters": self.min_clusters,
            "decision": decision,
            "decided": decision != UNDECIDED,
            # plan used up without a decision: the verdict is the fixed design's, and the question was close
            "close": decision == UNDECIDED and used >= planned,
            "samples_used": used,
            "samples_planned": planned,
            "cs": [_num(self.lo), _num(self.hi)],
            "looks": [look.to_dict() for look in self.looks],
        }


def sample_statistics(rows) -> dict[tuple[int, int], float]:
    """Each sample's own sigma-integral of ``ratio - 1`` from the guided rows of one mode (a tidy frame)."""
    from normscope.measure.stats import sigma_integral
    from normscope.measure.table import PROMPT_ID, RATIO, SEED, SIGMA, STEP

    wide = rows.pivot_table(index=[PROMPT_ID, SEED], columns=STEP, values=RATIO, aggfunc="first",
                            dropna=False).sort_index()
    sigma = rows.groupby(STEP, sort=True)[SIGMA].first().reindex(wide.columns).to_numpy(dtype=np.float64)
    values = np.atleast_1d(sigma_integral(wide.to_numpy(dtype=np.float64) - 1.0, sigma))
    return {(int(p), int(s)): float(v) for (p, s), v in zip(wide.index, values, strict=True)}


def decided_line(summary: dict) -> str:
    """The terminal line: "decided after 12 of 64 samples (above the gate)", or the plan-used-up one."""
    used, planned = summary["samples_used"], summary["samples_planned"]
    if summary["decided"]:
        decision = summary["decision"]
        what = ("above the gate" if decision == ABOVE else "below the gate" if decision == BELOW
                else f"anytime-valid interval half-width <= {summary['precision']:g}")
        return f"decided after {used} of {planned} samples ({what})"
    if summary["close"]:
        return (f"undecided after all {planned} samples: the fixed-design verdict stands, and the question was close "
                "(the anytime-valid interval still holds the gate)")
    return f"stopped after {used} of {planned} samples, undecided"


def check_sequential_options(config) -> None:
    """Refuse (exit 2) sequential and --measure-steps settings that do not fit a CompareConfig."""
    from normscope.config import Mode, check_finite
    from normscope.errors import ConfigError

    check_finite("until_decided", config.until_decided)
    check_finite("precision", config.precision)
    if config.measure_steps is not None:
        if isinstance(config.measure_steps, bool) or int(config.measure_steps) != config.measure_steps or config.measure_steps < 2:
            raise ConfigError(f"--measure-steps must be a whole number of steps >= 2 (the first and the last are always "
                              f"measured), got {config.measure_steps}")
        config.measure_steps = int(config.measure_steps)
        if Mode(config.mode) is not Mode.paired or config.rescale_to_base or config.maps:
            raise ConfigError("--measure-steps skips the other model's forwards on the paired trajectory: it needs "
                              "--mode paired (and no --rescale-to-base or --maps)")
    if config.until_decided is None and config.precision is None:
        return
    if config.until_decided is not None and config.precision is not None:
        raise ConfigError("stop on a gate (--until-decided) or on a precision (--precision), not both")
    if config.precision is not None and not config.precision > 0:
        raise ConfigError(f"--precision is the half-width to reach, a positive fraction (0.01 = 1 point of inflation), "
                          f"got {config.precision}")
    if Mode(config.mode) is Mode.both or config.rescale_to_base or config.maps or config.scorer or config.save_images:
        raise ConfigError("sequential runs (--until-decided, --precision) measure one mode and only the headline: drop "
                          "--mode both, --rescale-to-base, --maps, --scorer and --save-images")


def batch_key(mode: str, batch: list[Sample]) -> str:
    """A stored batch's key in a sequential run: its mode and its samples (so a larger plan finds it again)."""
    import hashlib

    text = ";".join(f"{s.prompt_id}:{s.seed}" for s in batch)
    return f"{mode}-seq-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def rule_for(config) -> Sequential | None:
    """The stopping rule of a CompareConfig, or None for the fixed design."""
    if config.until_decided is not None:
        return Sequential(gate=config.until_decided)
    if config.precision is not None:
        return Sequential(precision=config.precision)
    return None


def run_until_decided(rule: Sequential, mode: str, groups: list, measure, keep, procs, seeds: list[int],
                      reporter) -> int:
    """Measure ``groups`` in rounds of one batch per process, update ``rule`` on the gathered rounds and stop at
    the first decision; returns the samples used. Every rank gathers the same batches and takes the same
    decision from them, so every rank stops after the same round."""
    from normscope.measure.capture import GUIDED
    from normscope.measure.stats import select

    stats: dict[tuple[int, int], float] = {}
    used = 0
    for start in range(0, len(groups), procs.count):
        indices = list(range(start, min(start + procs.count, len(groups))))
        results = procs.map(len(indices), lambda j, indices=indices: measure(mode, indices[j]))
        for index, (records, _extra) in zip(indices, results, strict=True):
            rows = keep(mode, index, records, _extra)
            stats.update(sample_statistics(select(rows, mode, GUIDED)))
            used += len(groups[index])
        if rule.update(stats, seeds) != UNDECIDED:
            break
    return used
