"""NormGuard: the training-time hinge penalty on velocity-norm inflation (arXiv 2606.27771).

Add it to any velocity-local loss (flow matching, AWM, DiffusionNFT, Diffusion-DPO, GRPO variants)::

    with torch.no_grad(), transformer.disable_adapter():     # LoRA: the frozen reference is the same module
        v_ref = transformer(x_t, t, c)
    v_theta = transformer(x_t, t, c)
    loss = base_loss + lam * normguard_penalty(v_theta, v_ref)

The penalty is active only where ``||v_theta|| > (1 + margin) ||v_ref||`` (per sample, L2 over all
latent elements, reduced in float32 whatever the input dtype); below it, both value and gradient are zero.
``static_normguard_penalty`` takes a per-sigma reference norm tau(sigma) instead of a reference forward,
e.g. the ``tau`` column of ``normscope profile``'s thresholds.csv.
"""

from __future__ import annotations

import torch


def per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over all but the batch dimension, in float32 (float64 stays float64)."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    return torch.linalg.vector_norm(v.flatten(1).to(dtype), dim=1)


def _hinge(excess: torch.Tensor, squared: bool, reduction: str) -> torch.Tensor:
    penalty = torch.relu(excess)
    if squared:
        penalty = penalty.square()
    if reduction == "mean":
        return penalty.mean()
    if reduction == "sum":
        return penalty.sum()
    if reduction == "none":
        return penalty
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def normguard_penalty(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    margin: float = 0.0,
    squared: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """``relu(||v_theta|| - (1 + margin) ||v_ref||)`` per sample (squared if asked), reduced over the batch.

    ``v_ref`` is detached: the reference is frozen. ``margin`` is a relative tolerance (0.02 lets the
    tuned norm exceed the reference by 2 % for free).
    """
    if v_theta.shape != v_ref.shape:
        raise ValueError(f"v_theta {tuple(v_theta.shape)} and v_ref {tuple(v_ref.shape)} must have the same shape")
    reference = per_sample_norm(v_ref.detach()) * (1.0 + margin)
    return _hinge(per_sample_norm(v_theta) - reference, squared, reduction)


def tau_at(sigma: torch.Tensor, sigmas: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """tau(sigma) by linear interpolation in a profile's (sigma, tau) table (any order; clamped at the ends)."""
    order = torch.argsort(sigmas)
    xs, ys = sigmas[order].double(), taus[order].double()
    s = sigma.double().clamp(xs[0], xs[-1])
    index = torch.searchsorted(xs, s).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    weight = torch.where(x1 > x0, (s - x0) / (x1 - x0), torch.zeros_like(s))
    return (y0 + weight * (y1 - y0)).float()


def static_normguard_penalty(
    v_theta: torch.Tensor,
    tau: torch.Tensor | float,
    margin: float = 0.0,
    squared: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """``relu(||v_theta|| - (1 + margin) tau)`` with a stored per-sample reference norm (no reference forward)."""
    tau = torch.as_tensor(tau, dtype=torch.promote_types(v_theta.dtype, torch.float32), device=v_theta.device)
    return _hinge(per_sample_norm(v_theta) - tau * (1.0 + margin), squared, reduction)
