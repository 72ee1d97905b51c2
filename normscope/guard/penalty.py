"""The NormGuard hinge in three forms, and the CFG branch a trainer asks to be penalised.

Per sample (L2 over all latent elements, reduced in float32 whatever the input dtype):

* ``relative`` (the default): ``relu(||v_theta|| / ||v_ref|| - 1 - margin)``: unit-free, the same number at any
  resolution and in every family, and every sample weighs the same whatever its noise level (the reference
  norm changes with sigma, so the other forms weight the sigmas where ||v_ref|| is large more). A sample whose
  reference norm is 0 has no relative excess: it adds 0 (and no gradient), never ``inf``/NaN;
* ``absolute``: ``relu(||v_theta|| - (1 + margin) ||v_ref||)``, in norm units: lambda and tau change with the
  resolution (a norm grows with the square root of the latent size) and between families; the digits
  example's shipped results used it, so ``examples/digits/rl.py`` asks for it by name;
* ``rms``: ``relu(rms(v_theta) - (1 + margin) rms(v_ref))`` with ``rms(v) = ||v|| / sqrt(elements per sample)``:
  in the velocity's own units per element, so lambda does not depend on the resolution.

Value and gradient are zero at or below the reference; above it the gradient is radial (it shrinks the
norm, not the direction). ``margin`` is a number or one value per sample (a per-sigma schedule).
"""

from __future__ import annotations

from enum import Enum

import torch

from normscope.errors import GuardInputError
from normscope.guard.checks import check_pair, check_velocity, per_sample

GUIDED, COND, UNCOND = "guided", "cond", "uncond"


class Form(str, Enum):
    """How the excess over the reference is measured."""

    absolute = "absolute"
    relative = "relative"
    rms = "rms"


def _reduce_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.promote_types(v.dtype, torch.float32)


def per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over all but the batch dimension, in float32 (float64 stays float64)."""
    return torch.linalg.vector_norm(v.flatten(1).to(_reduce_dtype(v)), dim=1)


def elements_per_sample(v: torch.Tensor) -> int:
    """How many latent elements one sample holds (the ``n`` of ``rms = ||v|| / sqrt(n)``)."""
    return int(v[0].numel())


def per_element_rms(v: torch.Tensor) -> torch.Tensor:
    """Root mean square over all but the batch dimension: ``||v|| / sqrt(elements per sample)``."""
    return per_sample_norm(v) / elements_per_sample(v) ** 0.5


def _relative_excess(norm: torch.Tensor, norm_ref: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """``norm / norm_ref - 1 - margin``, 0 (with no gradient) where ``norm_ref`` is 0: finite everywhere."""
    usable = norm_ref > 0
    safe = torch.where(usable, norm_ref, torch.ones_like(norm_ref))  # no inf in the unused branch's gradient
    return torch.where(usable, norm / safe - 1.0 - margin, torch.zeros_like(norm))


def per_sample_ratio(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """``||v_theta|| / ||v_ref||`` per sample (no gradient to the reference)."""
    check_pair(v_theta, v_ref)
    return per_sample_norm(v_theta) / per_sample_norm(v_ref.detach())


def cfg_branch(v: torch.Tensor, branch: str, guidance_scale: float | None = None) -> torch.Tensor:
    """One branch of a classifier-free-guidance batch ``[uncond, cond]`` (SD3-style concatenation).

    ``branch`` is ``"cond"``, ``"uncond"``, or ``"guided"`` (``uncond + w (cond - uncond)``, needs
    ``guidance_scale``). Apply it to v_theta and v_ref alike, so only the branch the trainer optimises is
    penalised: flow_grpo trains on the guided velocity, DiffusionNFT and AWM on cond alone.
    """
    check_velocity(v, "v")
    if v.shape[0] % 2:
        raise GuardInputError(f"a CFG batch holds [uncond, cond] halves, but its batch is {v.shape[0]} (odd): pass the transformer's CFG output")
    uncond, cond = v.chunk(2)
    if branch == COND:
        return cond
    if branch == UNCOND:
        return uncond
    if branch == GUIDED:
        if guidance_scale is None:
            raise GuardInputError("cfg_branch(..., 'guided') needs guidance_scale (the w of uncond + w (cond - uncond))")
        return uncond + guidance_scale * (cond - uncond)
    raise GuardInputError(f"branch must be 'guided', 'cond' or 'uncond', got {branch!r}")


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
    raise GuardInputError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _margin(margin, v: torch.Tensor) -> torch.Tensor:
    return per_sample(margin, v.shape[0], "margin", v.device, _reduce_dtype(v))


def normguard_penalty(
    v_theta: torch.Tensor,
    v_ref: torch.Tensor,
    margin: float | torch.Tensor = 0.0,
    squared: bool = False,
    reduction: str = "mean",
    form: Form | str = Form.relative,
) -> torch.Tensor:
    """The hinge on the excess of ``v_theta`` over the reference velocity ``v_ref`` (same inputs, same shape).

    ``v_ref`` is detached: the reference is frozen. ``margin`` is a relative tolerance (0.02 lets the tuned
    norm exceed the reference by 2 % for free), a number or one per sample.
    """
    check_pair(v_theta, v_ref)
    form = Form(form)
    margin = _margin(margin, v_theta)
    v_ref = v_ref.detach()
    if form is Form.relative:
        excess = _relative_excess(per_sample_norm(v_theta), per_sample_norm(v_ref), margin)
    elif form is Form.rms:
        excess = per_element_rms(v_theta) - (1.0 + margin) * per_element_rms(v_ref)
    else:
        excess = per_sample_norm(v_theta) - (1.0 + margin) * per_sample_norm(v_ref)
    return _hinge(excess, squared, reduction)


def static_normguard_penalty(
    v_theta: torch.Tensor,
    tau: torch.Tensor | float,
    margin: float | torch.Tensor = 0.0,
    squared: bool = False,
    reduction: str = "mean",
    form: Form | str = Form.relative,
) -> torch.Tensor:
    """The hinge against a stored reference ``tau`` (no reference forward), a number or one per sample.

    ``tau`` is in the form's unit: a per-sample L2 norm for ``absolute`` (``relu(||v|| - (1 + margin) tau)``),
    a per-element RMS for ``rms`` (``relu(rms(v) - (1 + margin) tau)``) and ``relative``
    (``relu(rms(v) / tau - 1 - margin)``). ``TauTable`` gives both units from a profile's reference.json.
    """
    check_velocity(v_theta, "v_theta")
    form = Form(form)
    dtype = _reduce_dtype(v_theta)
    tau = per_sample(tau, v_theta.shape[0], "tau", v_theta.device, dtype)
    margin = _margin(margin, v_theta)
    if form is Form.absolute:
        excess = per_sample_norm(v_theta) - (1.0 + margin) * tau
    elif form is Form.rms:
        excess = per_element_rms(v_theta) - (1.0 + margin) * tau
    else:
        excess = _relative_excess(per_element_rms(v_theta), tau, margin)
    return _hinge(excess, squared, reduction)
