"""Simulated sequential runs: the false-decision rate of the confidence sequence vs a bootstrap CI re-read
after every batch (docs/compare.md "Sequential decisions"; tests/test_sequential.py runs it).

A run: ``prompts`` x ``seeds`` per-sample statistics X[p, s] = mu + prompt effect + seed noise, taken
seed-major in batches of ``batch``; after every batch a rule may stop with "above" or "below" the gate. A
false decision: "above" when mu <= gate, or "below" when mu >= gate.
"""

from __future__ import annotations

import numpy as np

from normscope.measure.sequential import ABOVE, BELOW, UNDECIDED, Sequential

DISTRIBUTIONS = ("normal", "skewed", "heavy", "very-skewed")


def prompt_effects(rng: np.random.Generator, n: int, sd: float, kind: str) -> np.ndarray:
    """Mean-zero prompt effects with standard deviation ``sd``: normal, skewed (lognormal, sigma 0.5: skewness
    1.8), very skewed (lognormal, sigma 1: skewness 6.2, one prompt in 16 carries much of the mean) or heavy
    tailed (Student t, 3 degrees of freedom)."""
    if kind == "normal":
        return rng.normal(0.0, sd, n)
    if kind in ("skewed", "very-skewed"):
        s = 0.5 if kind == "skewed" else 1.0
        raw = rng.lognormal(0.0, s, n)
        mean, var = np.exp(s * s / 2), (np.exp(s * s) - 1) * np.exp(s * s)
        return (raw - mean) / np.sqrt(var) * sd
    if kind == "heavy":
        return rng.standard_t(3, n) / np.sqrt(3.0) * sd
    raise ValueError(kind)


def simulate_run(rng, mu: float, gate: float, prompts: int = 16, seeds: int = 4, batch: int = 8,
                 prompt_sd: float = 0.02, seed_sd: float = 0.01, kind: str = "normal",
                 boot: int = 400, min_clusters: int | None = None) -> dict[str, tuple[str, int]]:
    """One simulated run under both rules; {rule: (decision, samples used)}."""
    x = mu + prompt_effects(rng, prompts, prompt_sd, kind)[:, None] + rng.normal(0.0, seed_sd, (prompts, seeds))
    order = [(p, s) for s in range(seeds) for p in range(prompts)]
    seq = Sequential(gate=gate) if min_clusters is None else Sequential(gate=gate, min_clusters=min_clusters)
    out = {}
    seq_done = boot_done = False
    weights_rng = np.random.default_rng(rng.integers(2**32))
    for end in range(batch, len(order) + batch, batch):
        taken = order[:min(end, len(order))]
        if not seq_done:
            decision = seq.update({(p, s): float(x[p, s]) for p, s in taken}, list(range(seeds)))
            if decision != UNDECIDED or end >= len(order):
                out["cs"], seq_done = (decision, len(taken)), True
        if not boot_done:
            decision = _bootstrap_decision(x, taken, gate, boot, weights_rng)
            if decision != UNDECIDED or end >= len(order):
                out["bootstrap"], boot_done = (decision, len(taken)), True
        if seq_done and boot_done:
            break
    return out


def _bootstrap_decision(x: np.ndarray, taken, gate: float, boot: int, rng) -> str:
    """The fixed design's 95 % prompt-cluster percentile bootstrap of the sample mean, on the samples so far."""
    prompts = np.array([p for p, _ in taken])
    values = np.array([x[p, s] for p, s in taken])
    ids, index = np.unique(prompts, return_inverse=True)
    if len(ids) < 2:
        return UNDECIDED
    counts = rng.multinomial(len(ids), np.full(len(ids), 1.0 / len(ids)), size=boot)[:, index].astype(float)
    means = counts @ values / counts.sum(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return ABOVE if lo > gate else BELOW if hi < gate else UNDECIDED


def false_decision(decision: str, mu: float, gate: float) -> bool:
    return (decision == ABOVE and mu <= gate) or (decision == BELOW and mu >= gate)


def error_rates(runs: int, mu: float, gate: float = 0.05, seed: int = 0, **kwargs) -> dict[str, dict]:
    """False-decision rate and mean samples used of both rules over ``runs`` simulated runs."""
    rng = np.random.default_rng(seed)
    tallies = {"cs": [0, 0], "bootstrap": [0, 0]}
    for _ in range(runs):
        for rule, (decision, used) in simulate_run(rng, mu, gate, **kwargs).items():
            tallies[rule][0] += false_decision(decision, mu, gate)
            tallies[rule][1] += used
    return {rule: {"false_rate": wrong / runs, "mean_samples": used / runs} for rule, (wrong, used) in tallies.items()}
