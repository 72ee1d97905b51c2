"""NormGuard in any trainer: the hinge penalty on velocity-norm inflation (arXiv 2606.27771) and its reference.

One call in a training step (the reference forward runs under no_grad with the adapters off)::

    from normscope.guard import normguard_loss

    v_theta = transformer(x_t, t, c)[0]
    guard = normguard_loss(transformer, v_theta, x_t, t, c)   # LoRA: adapter off; DDP/FSDP/DeepSpeed unwrapped
    loss = base_loss + lam * guard.penalty                    # relative form by default
    monitor.log(step, v_theta, guard.v_ref, sigma=sigma)

A trainer that already runs the reference (KL terms) passes its v_ref: ``normguard_penalty(v_theta, v_ref)``.

Without a reference forward, a profile's tau(sigma) serves (``load_tau`` + ``static_normguard_penalty``).
See docs/normguard.md for the recipe profile -> tau -> guard -> monitor -> check.
"""

from normscope.guard.checks import check_sigma
from normscope.guard.loss import GuardTerm, normguard_loss, velocity
from normscope.guard.penalty import (
    COND,
    GUIDED,
    UNCOND,
    Form,
    cfg_branch,
    elements_per_sample,
    normguard_penalty,
    per_element_rms,
    per_sample_norm,
    per_sample_ratio,
    static_normguard_penalty,
)
from normscope.guard.reference import adapter_layers, frozen_copy, reference, unwrap
from normscope.guard.stats import REGIONS, grid_buckets, normguard_stats
from normscope.guard.tau import TauTable, load_tau, tau_at

__all__ = [
    "COND", "GUIDED", "REGIONS", "UNCOND", "Form", "GuardTerm", "TauTable", "normguard_loss", "velocity", "adapter_layers", "cfg_branch", "check_sigma",
    "elements_per_sample", "frozen_copy", "grid_buckets", "load_tau", "normguard_penalty", "normguard_stats",
    "per_element_rms", "per_sample_norm", "per_sample_ratio", "reference", "static_normguard_penalty",
    "tau_at", "unwrap",
]
