"""Shape and range checks for tensors a training loop hands to the guard and the monitor.

Nothing is repaired silently: a sigma outside [0, 1] (a 0-1000 timestep) or a tensor that would broadcast
into a wrong shape raises ``GuardInputError`` naming the value and the fix.
"""

from __future__ import annotations

import torch

from normscope.errors import GuardInputError


def check_velocity(v: torch.Tensor, name: str) -> None:
    """A batch of velocities: a floating tensor with a batch dimension and at least one latent dimension."""
    if not isinstance(v, torch.Tensor):
        raise GuardInputError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.ndim < 2:
        raise GuardInputError(f"{name} has shape {tuple(v.shape)}: pass the batch of velocities (B, ...), not per-sample norms")
    if not v.is_floating_point():
        raise GuardInputError(f"{name} has dtype {v.dtype}: velocities are floating point")


def check_pair(v_theta: torch.Tensor, v_ref: torch.Tensor) -> None:
    check_velocity(v_theta, "v_theta")
    check_velocity(v_ref, "v_ref")
    if v_theta.shape != v_ref.shape:
        raise GuardInputError(
            f"v_theta {tuple(v_theta.shape)} and v_ref {tuple(v_ref.shape)} must have the same shape: "
            "compute v_ref on the same inputs (and take the same CFG branch of both)"
        )


def per_sample(value, batch: int, name: str, device, dtype=torch.float32) -> torch.Tensor:
    """A scalar or one value per sample, as a (batch,) tensor.

    Accepted: a number, a 0-d tensor, shape (B,), or the trainer-style (B, 1, ..., 1). Anything else would
    broadcast against per-sample norms into a wrong shape, so it is refused.
    """
    t = torch.as_tensor(value, device=device).to(dtype)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape[0] == batch and all(s == 1 for s in t.shape[1:]):
        return t.reshape(batch)
    raise GuardInputError(
        f"{name} has shape {tuple(t.shape)} for a batch of {batch}: give one value per sample, shaped ({batch},) "
        f"or ({batch}, 1, ..., 1), or a single number"
    )


def check_sigma(sigma: torch.Tensor, name: str = "sigma") -> torch.Tensor:
    """Sigma (the noise level, 1 = pure noise) must be finite and in [0, 1]; it is never clamped."""
    if not bool(torch.isfinite(sigma).all()):
        raise GuardInputError(f"{name} holds non-finite values: pass the noise level sigma in [0, 1]")
    low, high = float(sigma.min()), float(sigma.max())
    if low < 0.0 or high > 1.0:
        hint = " (it looks like a 0-1000 timestep: divide by 1000)" if high > 1.0 and high <= 1000.0 else ""
        raise GuardInputError(f"{name} ranges over [{low:g}, {high:g}], outside [0, 1]{hint}")
    return sigma
