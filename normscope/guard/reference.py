"""The reference velocity v_ref on the same inputs, for every form of model a trainer holds.

``reference(model)`` is a context manager yielding the module to call for v_ref:

* a peft ``PeftModel``: its own ``disable_adapter()`` (what flow_grpo, DiffusionNFT and AWM do);
* a diffusers (or any) model with peft layers (``add_adapter``/``load_lora_adapter``), whose
  ``disable_adapters()``/``enable_adapters()`` are not context managers: every adapter layer is switched off,
  and each layer's previous state and every parameter's ``requires_grad`` are restored on exit (peft's
  ``enable_adapters`` turns gradients back on for the active adapter, which would silently train a frozen one);
* DDP / FSDP / DataParallel / DeepSpeed / ``torch.compile`` wrappers: the adapters are found on the unwrapped
  module, and the wrapper itself is yielded, so FSDP still gathers its shards for the forward;
* a full fine-tune: pass ``frozen=`` a frozen copy of the original weights (``frozen_copy(model)`` makes one
  before training starts, and before FSDP wraps the model); it is yielded as is.

The block runs under ``torch.no_grad()``, entered by ``reference`` itself: the reference is frozen, and a
caller who forgets the ``no_grad`` must not get a v_ref that carries a graph (memory, and a gradient into the
base weights through a penalty that forgot to detach). There is no form with gradients.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from normscope.errors import ConfigError


def _wrapped(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module a DDP / FSDP / DataParallel / torch.compile wrapper holds, or None if it is no wrapper."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules:
        return module._orig_mod
    if type(module).__name__ == "DeepSpeedEngine" and "module" in module._modules:  # no deepspeed import needed
        return module.module
    wrappers: tuple[type, ...] = (DistributedDataParallel, DataParallel)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers += (FullyShardedDataParallel,)
    except ImportError:  # torch built without distributed
        pass
    return module.module if isinstance(module, wrappers) else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / FSDP / DataParallel / DeepSpeed / torch.compile wrappers (any nesting)."""
    while (inner := _wrapped(model)) is not None:
        model = inner
    return model


def adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's adapter layers (LoRA and friends) and modules-to-save wrappers inside ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # no peft: no adapters
        return []
    return [m for m in unwrap(model).modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


@contextlib.contextmanager
def _layers_off(layers: list[torch.nn.Module], owner: torch.nn.Module) -> Iterator[None]:
    states = [(layer, not layer.disable_adapters) for layer in layers]
    grads = [(p, p.requires_grad) for p in owner.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, enabled in states:
            layer.enable_adapters(enabled)
        for p, flag in grads:
            p.requires_grad_(flag)


@contextlib.contextmanager
def reference(model: torch.nn.Module, frozen: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
    """Yield the module computing v_ref on the same inputs as ``model`` (adapters off, or the frozen copy).

    The block runs under ``torch.no_grad()`` whatever the caller's grad mode; the caller's mode is back on exit.
    """
    with torch.no_grad():
        with _reference_module(model, frozen) as ref:
            yield ref


@contextlib.contextmanager
def _reference_module(model: torch.nn.Module, frozen: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    if frozen is not None:
        if any(p.requires_grad for p in frozen.parameters()):
            raise ConfigError("the frozen reference has parameters with requires_grad=True: make it with normscope.guard.frozen_copy(model)")
        yield frozen
        return
    inner = unwrap(model)
    try:
        from peft import PeftModel
    except ImportError:
        PeftModel = ()  # noqa: N806
    if isinstance(inner, PeftModel):
        grads = [(p, p.requires_grad) for p in inner.parameters()]
        try:
            with inner.disable_adapter():
                yield model
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
        return
    layers = adapter_layers(inner)
    if not layers:
        raise ConfigError(
            f"{type(inner).__name__} has no peft adapter to switch off: for a full fine-tune pass "
            "frozen=normscope.guard.frozen_copy(model), made before training starts"
        )
    with _layers_off(layers, inner):
        yield model


def _is_fsdp(model: torch.nn.Module) -> bool:
    """Whether FSDP (the wrapper class, or FSDP2's ``fully_shard``) holds any part of ``model``."""
    try:
        import torch.distributed.fsdp as fsdp
    except ImportError:  # torch built without distributed
        return False
    kinds = tuple(c for c in (getattr(fsdp, "FullyShardedDataParallel", None), getattr(fsdp, "FSDPModule", None)) if c)
    return any(isinstance(m, kinds) for m in model.modules())


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model``'s current weights (unwrapped, eval mode, no gradients) for full fine-tunes.

    DDP, DataParallel, DeepSpeed and ``torch.compile`` wrappers are unwrapped. An FSDP-sharded model is refused:
    each rank holds a shard, a deepcopy fails inside torch, and gathering the full weights on every rank is
    what FSDP exists to avoid. Copy the model before wrapping it and shard the copy the same way
    (``FSDP(frozen_copy(model), **the_same_kwargs)``), as ``examples/integrations/dancegrpo_flux.patch`` does.
    """
    if _is_fsdp(model):
        raise ConfigError(
            "frozen_copy got an FSDP-sharded model: call frozen_copy(model) before FSDP wraps it, then shard the "
            "copy with the same arguments, e.g. ref = FSDP(frozen_copy(model), **fsdp_kwargs)"
        )
    frozen = copy.deepcopy(unwrap(model))
    frozen.requires_grad_(False)
    return frozen.eval()
