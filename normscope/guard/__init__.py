"""NormGuard in any trainer: the hinge penalty on velocity-norm inflation (arXiv 2606.27771) and its reference.

A few lines in a training step::

    from normscope.guard import normguard_penalty, normguard_stats, reference

    v_theta = transformer(x_t, t, c)[0]
    with torch.no_grad(), reference(transformer) as ref:   # LoRA: adapter off; DDP/FSDP unwrapped
        v_ref = ref(x_t, t, c)[0]
    loss = base_loss + lam * normguard_penalty(v_theta, v_ref, form="relative")
    log(normguard_stats(v_theta, v_ref, sigma))

Without a reference forward, a profile's tau(sigma) serves (``load_tau`` + ``static_normguard_penalty``).
See docs/normguard.md for the recipe profile -> tau -> guard -> monitor -> check.
"""

from normscope.guard.checks import check_sigma
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
    "COND", "GUIDED", "REGIONS", "UNCOND", "Form", "TauTable", "adapter_layers", "cfg_branch", "check_sigma",
    "elements_per_sample", "frozen_copy", "grid_buckets", "load_tau", "normguard_penalty", "normguard_stats",
    "per_element_rms", "per_sample_norm", "per_sample_ratio", "reference", "static_normguard_penalty",
    "tau_at", "unwrap",
]
