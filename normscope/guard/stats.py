"""What to log next to the loss: ratio statistics of the velocities the loss already computed.

Buckets group samples by their noise level sigma; the default three are the regions ``normscope compare``
and ``sweep`` report (near noise sigma > 2/3, middle, near data sigma <= 1/3), so a training log and an
offline sweep read side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normscope.guard.checks import check_sigma, per_sample
from normscope.guard.penalty import per_sample_norm, per_sample_ratio

Bucket = tuple[str, float, float]  # (name, low, high]: sigma in (low, high]
REGIONS: tuple[Bucket, ...] = (("near_noise", 2 / 3, 1.01), ("middle", 1 / 3, 2 / 3), ("near_data", -0.01, 1 / 3))


def grid_buckets(sigmas: Sequence[float]) -> tuple[Bucket, ...]:
    """One bucket per sampler sigma (edges halfway between neighbours), named ``sigma=0.900``."""
    grid = sorted(float(s) for s in sigmas)
    edges = [-0.01] + [(a + b) / 2 for a, b in zip(grid, grid[1:], strict=False)] + [1.01]
    return tuple((f"sigma={s:.3f}", edges[i], edges[i + 1]) for i, s in enumerate(grid))[::-1]


def bucket_index(sigma: torch.Tensor, buckets: Sequence[Bucket]) -> torch.Tensor:
    """The bucket of each sigma (-1: none)."""
    index = torch.full(sigma.shape, -1, dtype=torch.long, device=sigma.device)
    for i, (_, low, high) in enumerate(buckets):
        index[(sigma > low) & (sigma <= high)] = i
    return index


def ratio_tensors(ratio: torch.Tensor, sigma: torch.Tensor | None, norm: torch.Tensor, norm_ref: torch.Tensor,
                  margin: float = 0.0, buckets: Sequence[Bucket] = REGIONS) -> dict[str, torch.Tensor]:
    """The logged statistics as 0-d tensors on the ratios' device (no host sync), over the finite samples only.

    A sample whose ratio is NaN or infinite (a NaN element in v_theta or v_ref, or a zero reference norm) is
    counted in ``n_nonfinite`` and left out of every mean, so one bad element cannot turn the step's mean
    into NaN (and hide a gate crossing); ``n`` counts the finite samples the numbers summarise.
    """
    finite = torch.isfinite(ratio) & torch.isfinite(norm) & torch.isfinite(norm_ref)
    count = finite.sum()
    denominator = count.clamp_min(1).to(torch.float64)
    kept = torch.where(finite, ratio, 0).double()
    mean = kept.sum() / denominator
    values = {
        "n": count.double(), "n_nonfinite": (~finite).sum().double(), "ratio_mean": mean,
        "ratio_std": (torch.where(finite, ratio.double() - mean, 0).square().sum() / denominator).sqrt(),
        "ratio_max": torch.where(finite, ratio.double(), -torch.inf).max(),
        "hinge_rate": (finite & (ratio > 1.0 + margin)).sum().double() / denominator,
        "norm_mean": torch.where(finite, norm, 0).double().sum() / denominator,
        "norm_ref_mean": torch.where(finite, norm_ref, 0).double().sum() / denominator,
    }
    if sigma is not None:
        index = bucket_index(sigma, buckets)
        for i, (name, _, _) in enumerate(buckets):
            mask = (index == i) & finite
            n = mask.sum().clamp_min(1).double()
            bucket_mean = torch.where(mask, ratio.double(), 0).sum() / n
            values[f"n/{name}"] = mask.sum().double()
            values[f"ratio/{name}"] = bucket_mean
            values[f"std/{name}"] = (torch.where(mask, ratio.double() - bucket_mean, 0).square().sum() / n).sqrt()
    return values


def to_host(values: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """One device-to-host transfer for all the statistics; a non-finite number becomes None (JSON ``null``)."""
    keys = list(values)
    numbers = torch.stack([values[k].detach().double().reshape(()) for k in keys]).cpu().tolist()
    return {k: (v if math.isfinite(v) else None) for k, v in zip(keys, numbers, strict=True)}


def summarize_ratios(ratio: torch.Tensor, sigma: torch.Tensor | None, norm: torch.Tensor, norm_ref: torch.Tensor,
                     margin: float = 0.0, buckets: Sequence[Bucket] = REGIONS) -> dict[str, float | None]:
    """The logged statistics from per-sample ratios (and sigmas): one host transfer.

    A statistic with nothing finite to summarise (an empty bucket, a step whose samples are all NaN) is None,
    not 0 and not NaN.
    """
    out = to_host(ratio_tensors(ratio, sigma, norm, norm_ref, margin, buckets))
    blank_empty(out, buckets if sigma is not None else ())
    return out


def blank_empty(entry: dict, buckets: Sequence[Bucket]) -> None:
    """None for the statistics with no finite sample behind them (the whole batch, or one sigma bucket)."""
    if entry["n"] == 0:
        for key in ("ratio_mean", "ratio_std", "ratio_max", "hinge_rate", "norm_mean", "norm_ref_mean"):
            entry[key] = None
    for name, _, _ in buckets:
        if entry[f"n/{name}"] == 0:
            entry[f"ratio/{name}"] = entry[f"std/{name}"] = None


@torch.no_grad()
def normguard_stats(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    sigma: torch.Tensor | float | None = None,
    margin: float = 0.0,
    buckets: Sequence[Bucket] = REGIONS,
) -> dict[str, float]:
    """Mean/std/max of ``||v_theta|| / ||v_ref||``, the hinge rate (share of samples above ``1 + margin``),
    the mean norms, and with ``sigma`` the mean ratio per sigma bucket (``ratio/near_noise``, ...)."""
    ratio = per_sample_ratio(v_theta, v_ref)
    s = None
    if sigma is not None:
        s = check_sigma(per_sample(sigma, ratio.shape[0], "sigma", ratio.device, torch.float64))
    return summarize_ratios(ratio, s, per_sample_norm(v_theta), per_sample_norm(v_ref), margin, buckets)
