"""The independent computation that row-by-row tests compare normscope against.

It runs the plain diffusers pipeline call, with nothing from normscope in the path: a forward hook on
``pipe.transformer`` (and ``pipe.transformer_2`` where present) records the per-sample L2 norm of every
transformer output, in call order, and a thin wrapper around ``pipe.scheduler.step`` records the norm
of the velocity the scheduler receives. Norms are float32 over all non-batch dimensions.

Why a forward hook and not a module put in the transformer's place: assigning a new object to a
pipeline component rewrites the pipeline's config and changes what ``pipe.transformer.dtype``,
``.config`` and ``.cache_context`` answer; a hook leaves the pipeline exactly as the user's call sees it,
and is removed in ``finally``.

This module must not import normscope (except the tiny builders in tests), or it stops being independent.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def _output_tensor(output):
    """The velocity out of a transformer's return value: a tuple, an output dataclass or a list (Z-Image)."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


def _per_sample_norms(velocity) -> torch.Tensor:
    """Float32 L2 norm of each sample over all its other dimensions; a list holds one tensor per sample."""
    if isinstance(velocity, (list, tuple)):
        return torch.stack([v.detach().float().norm() for v in velocity])
    return velocity.detach().float().flatten(1).norm(dim=1)


def _latent_part(velocity, sample: torch.Tensor):
    """The transformer output restricted to the sample's own tokens.

    Kontext, FLUX.2 and Qwen-Image-Edit concatenate reference-image tokens after the latent tokens and
    the pipeline slices ``[:, :latents.size(1)]`` before the scheduler; other outputs are returned whole.
    """
    if (isinstance(velocity, torch.Tensor) and velocity.dim() == 3 and sample.dim() == 3
            and velocity.shape[1] > sample.shape[1]):
        return velocity[:, : sample.shape[1]]
    return velocity


@contextmanager
def _recording(pipe, keep_outputs: bool):
    steps: list[dict] = []
    pending: list[tuple[str, object]] = []
    handles = []

    def hook_for(name: str):
        def hook(module, args, kwargs, output):
            velocity = _output_tensor(output)
            if isinstance(velocity, (list, tuple)):
                velocity = [v.detach().float().clone() for v in velocity]
            else:
                velocity = velocity.detach().float().clone()
            pending.append((name, velocity))

        return hook

    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            handles.append(module.register_forward_hook(hook_for(name), with_kwargs=True))

    scheduler = pipe.scheduler
    original_step = scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        record = {
            "modules": [name for name, _ in pending],
            "calls": [_per_sample_norms(v).tolist() for _, v in pending],
            "calls_latent": [_per_sample_norms(_latent_part(v, sample)).tolist() for _, v in pending],
            "scheduler": _per_sample_norms(model_output).tolist(),
            "timestep": float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep),
        }
        if keep_outputs:
            record["outputs"] = [v for _, v in pending]
            record["scheduler_input"] = model_output.detach().float().clone()
        steps.append(record)
        pending.clear()
        return original_step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step  # an instance attribute: deleting it restores the class method
    try:
        yield steps
    finally:
        del scheduler.step
        for handle in handles:
            handle.remove()


def oracle_norms(pipe, keep_outputs: bool = False, **call) -> list[dict]:
    """Run ``pipe(**call)`` unchanged and return what the transformer produced and the scheduler received.

    One dict per scheduler step, in order:
      ``modules``      which component made each transformer call ("transformer" / "transformer_2"),
      ``calls``        per call, the per-sample norms of the whole output (batch as the pipeline built it:
                       SD3 and Z-Image batch [uncond, cond]; Qwen-Image calls cond, then uncond),
      ``calls_latent`` the same restricted to the latent tokens (reference tokens sliced off),
      ``scheduler``    the per-sample norms of the velocity ``scheduler.step`` received,
      ``timestep``     the step's timestep;
    with ``keep_outputs`` also ``outputs`` (the raw float32 outputs) and ``scheduler_input``.

    ``ZImagePipeline`` writes the chat-templated prompt back into the list it is given: pass a fresh list
    per call, as normscope's own sampling does.
    """
    with torch.no_grad(), _recording(pipe, keep_outputs) as steps:
        pipe(**call)
    return steps
