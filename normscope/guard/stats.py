"""What to log next to the loss: ratio statistics of the velocities the loss already computed.

Buckets group samples by their noise level sigma; the default three are the regions ``normscope compare``
and ``sweep`` report (near noise sigma > 2/3, middle, near data sigma <= 1/3), so a training log and an
offline sweep read side by side.
"""

from __future__ import annotations

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


def summarize_ratios(ratio: torch.Tensor, sigma: torch.Tensor | None, norm: torch.Tensor, norm_ref: torch.Tensor,
                     margin: float = 0.0, buckets: Sequence[Bucket] = REGIONS) -> dict[str, float]:
    """The logged statistics from per-sample ratios (and sigmas): one host transfer."""
    values = {"n": torch.tensor(float(ratio.numel())), "ratio_mean": ratio.mean(),
              "ratio_std": ratio.std(correction=0), "ratio_max": ratio.max(),
              "hinge_rate": (ratio > 1.0 + margin).float().mean(), "norm_mean": norm.mean(), "norm_ref_mean": norm_ref.mean()}
    if sigma is not None:
        index = bucket_index(sigma, buckets)
        for i, (name, _, _) in enumerate(buckets):
            mask = index == i
            values[f"n/{name}"] = mask.sum().float()
            count = mask.sum().clamp_min(1)
            mean = torch.where(mask, ratio, 0).sum() / count
            values[f"ratio/{name}"] = mean
            values[f"std/{name}"] = (torch.where(mask, ratio - mean, 0).square().sum() / count).sqrt()
    keys = list(values)
    numbers = torch.stack([values[k].detach().double().cpu() for k in keys]).tolist()
    out = dict(zip(keys, numbers, strict=True))
    for name, _, _ in buckets if sigma is not None else ():
        if out[f"n/{name}"] == 0:
            out[f"ratio/{name}"] = out[f"std/{name}"] = None  # an empty bucket has no ratio, not a ratio of 0
    return out


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
