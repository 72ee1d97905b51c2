"""NormGuard in one call: the reference forward, run safely, and the penalty against it.

``normguard_loss(model, v_theta, *inputs, **forward_kwargs)`` is for trainers that have no reference forward
of their own (flow_grpo without KL, DanceGRPO): it calls the model on the inputs the policy forward used
with the adapters off (or the ``frozen`` copy), under ``torch.no_grad()`` by construction, and returns the
penalty with the v_ref the monitor logs. Trainers that already compute v_ref (flow_grpo's KL, DiffusionNFT,
AWM, Diffusion-DPO) pass it to ``normguard_penalty`` instead: the forward is the costly part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normscope.errors import GuardInputError
from normscope.guard.penalty import Form, cfg_branch, normguard_penalty, per_sample_ratio
from normscope.guard.reference import reference


@dataclass(frozen=True)
class GuardTerm:
    """The penalty (carries the graph to v_theta), and the detached reference velocity and ratios."""

    penalty: torch.Tensor
    v_ref: torch.Tensor
    ratio: torch.Tensor  # ||v_theta|| / ||v_ref|| per sample, detached

    def __iter__(self):  # penalty, v_ref = normguard_loss(...)
        return iter((self.penalty, self.v_ref))


def velocity(output) -> torch.Tensor:
    """The velocity in a model's output: a tensor, the first item of a tuple (``return_dict=False``), or ``.sample``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise GuardInputError(f"the model returned {type(output).__name__}: expected a tensor, a tuple starting with one, or an output with .sample")


def normguard_loss(
    model: torch.nn.Module,
    v_theta: torch.Tensor,
    *inputs,
    frozen: torch.nn.Module | None = None,
    form: Form | str = Form.relative,
    margin: float | torch.Tensor = 0.0,
    branch: str | None = None,
    guidance_scale: float | None = None,
    **forward_kwargs,
) -> GuardTerm:
    """Run the reference on ``model(*inputs, **forward_kwargs)`` and return the hinge of ``v_theta`` above it.

    ``v_theta`` is the velocity the trainer trains, computed from the same inputs. When the model's output is
    a CFG batch ``[uncond, cond]`` and ``v_theta`` one branch of it, ``branch`` (``"cond"``, ``"uncond"`` or
    ``"guided"`` with ``guidance_scale``) takes the same branch of the reference output. ``frozen`` is the
    frozen copy of a full fine-tune (``frozen_copy``); for a LoRA the adapters are switched off.
    """
    with reference(model, frozen=frozen) as ref:
        v_ref = velocity(ref(*inputs, **forward_kwargs))
        if branch is not None:
            v_ref = cfg_branch(v_ref, branch, guidance_scale)
    v_ref = v_ref.detach()
    if v_ref.shape != v_theta.shape:
        hint = " (pass branch= to take v_theta's CFG branch of the reference output)" if branch is None else ""
        raise GuardInputError(f"the reference output {tuple(v_ref.shape)} does not match v_theta {tuple(v_theta.shape)}{hint}")
    penalty = normguard_penalty(v_theta, v_ref, margin=margin, form=form)
    return GuardTerm(penalty=penalty, v_ref=v_ref, ratio=per_sample_ratio(v_theta.detach(), v_ref))
