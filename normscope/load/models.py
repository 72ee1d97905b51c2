"""The velocity models that capture runs: full weight copies, or one module with an adapter on and off."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from normscope.errors import CheckpointError
from normscope.load.formats import Checkpoint, find_checkpoint, load_pickle, read_shapes, strip_prefixes
from normscope.load.lora import attach_lora, check_targets, detach_lora, read_lora


class VelocityModel:
    """A transformer that computes one model's velocity; the unit that capture runs.

    ``active(pipe)`` makes the pipeline sample with this model; calling the object evaluates it on
    given inputs (used for the second model in paired mode).
    """

    def __init__(self, role: str, module, source: str, kind: str) -> None:
        self.role = role
        self.module = module
        self.source = source
        self.kind = kind

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[VelocityModel]:
        previous = pipe.transformer
        pipe.transformer = self.module
        try:
            yield self
        finally:
            pipe.transformer = previous

    def describe(self) -> dict:
        return {"role": self.role, "source": self.source, "kind": self.kind}


class AdapterModel(VelocityModel):
    """One transformer with a LoRA: the tuned velocity with the adapter on, the base with it off.

    This is how the LoRA trainers compute v_ref (``with transformer.disable_adapter():``), and it keeps a
    single transformer in memory.
    """

    def __init__(self, role: str, module, source: str, kind: str, layers: list, enabled: bool) -> None:
        super().__init__(role, module, source, kind)
        self.layers = layers
        self.enabled = enabled

    @contextlib.contextmanager
    def switched(self) -> Iterator[None]:
        previous = [not layer.disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer.enable_adapters(self.enabled)
        try:
            yield
        finally:
            for layer, was in zip(self.layers, previous, strict=True):
                layer.enable_adapters(was)

    def __call__(self, *args, **kwargs):
        with self.switched():
            return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[VelocityModel]:
        with super().active(pipe), self.switched():
            yield self


class DeviceSlot:
    """The one place on the execution device that offloaded transformers take turns in.

    A model takes the slot before it computes; whoever held it is parked first, so at no moment are two
    transformers' weights on the device. The holder stays loaded until another model needs the slot: in free
    mode that is one copy per model per batch, in paired mode one per model per step.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.holder: OffloadedModel | None = None
        self.loads = 0  # host-to-device copies of a whole transformer (the cost of offloading)

    def take(self, model: OffloadedModel) -> None:
        if self.holder is model:
            return
        if self.holder is not None:
            self.holder.park()
        self.holder = None
        model.load()
        self.holder = model
        self.loads += 1

    def release(self) -> None:
        if self.holder is not None:
            self.holder.park()
            self.holder = None


def _tensor_slots(module) -> list[tuple[object, str, bool]]:
    """(owner module, attribute, is_parameter) for every parameter and buffer, non-persistent ones included."""
    slots = []
    for owner in module.modules():
        slots += [(owner, name, True) for name, p in owner._parameters.items() if p is not None]
        slots += [(owner, name, False) for name, b in owner._buffers.items() if b is not None]
    return slots


class OffloadedModel(VelocityModel):
    """A full-weights model whose weights live in host memory and visit the device only while it computes.

    Between uses the module's tensors are on the ``meta`` device (no storage anywhere) and a host copy
    (pinned on CUDA, so copies run at full bus speed) holds the values; ``load`` copies them to the slot's
    device. Because parked weights are on ``meta``, where a transformer lives can be observed even when
    the execution device is the CPU: the invariant is tested without a GPU.
    """

    def __init__(self, inner: VelocityModel, slot: DeviceSlot) -> None:
        import torch

        super().__init__(inner.role, inner.module, inner.source, inner.kind)
        self.inner = inner
        self.slot = slot
        self._slots = _tensor_slots(self.module)
        pin = slot.device.startswith("cuda")
        self._host = []
        for owner, name, is_param in self._slots:
            tensor = (owner._parameters if is_param else owner._buffers)[name].detach().to("cpu")
            self._host.append(tensor.pin_memory() if pin else tensor)
        self._device = torch.device(slot.device)
        self.park()

    def _put(self, tensors) -> None:
        import torch

        for (owner, name, is_param), tensor in zip(self._slots, tensors, strict=True):
            if is_param:
                owner._parameters[name] = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[name] = tensor

    def load(self) -> None:
        self._put([t.to(self._device, non_blocking=True) for t in self._host])

    def park(self) -> None:
        import torch

        self._put([torch.empty(t.shape, dtype=t.dtype, device="meta") for t in self._host])

    @property
    def on_device(self) -> bool:
        return self.slot.holder is self

    def restore(self) -> None:
        """Back to an ordinary module whose weights are the host copies (the slot no longer manages it)."""
        if self.slot.holder is self:
            self.slot.holder = None
        self._put(self._host)

    def __call__(self, *args, **kwargs):
        self.slot.take(self)
        return self.inner(*args, **kwargs)

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[VelocityModel]:
        # Loaded now, so the pipeline sees its execution device when the call starts; the pre-hook takes the
        # slot back for each of the pipeline's own forwards after a paired step has parked it.
        self.slot.take(self)
        handle = self.module.register_forward_pre_hook(lambda module, args: self.slot.take(self))
        try:
            with self.inner.active(pipe):
                yield self
        finally:
            handle.remove()


@dataclass
class LoadedModels:
    base: VelocityModel
    tuned: VelocityModel
    checkpoints: list[Checkpoint]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"base": self.base.describe(), "tuned": self.tuned.describe(),
                "checkpoints": [c.describe() for c in self.checkpoints], "notes": self.notes}

    @property
    def shared(self) -> bool:
        """One transformer serves both (a LoRA switched on and off)."""
        return self.base.module is self.tuned.module

    @property
    def adapter_params(self) -> int:
        layers = getattr(self.tuned, "layers", [])
        return sum(p.numel() for layer in layers for name, p in layer.named_parameters() if "lora_" in name)

    def release(self) -> None:
        """Hand the pipeline's transformer back as it was loaded: adapter removed, offloaded weights in host memory."""
        for model in (self.base, self.tuned):
            if isinstance(model, OffloadedModel):
                model.restore()
        if isinstance(self.tuned, AdapterModel):
            detach_lora(self.tuned.module)

    def place(self, device: str) -> None:
        """Put the transformers on the execution device (offloaded ones wait in host memory for their turn)."""
        for model in (self.base, self.tuned):
            if not isinstance(model, OffloadedModel):
                model.module.to(device)


def fit_problems(expected: dict[str, tuple[int, ...]], header: dict) -> list[str]:
    """What keeps a full state dict from loading: missing and unexpected keys, shape mismatches."""
    missing = expected.keys() - header.keys()
    unexpected = header.keys() - expected.keys()
    mismatched = [f"{k} {header[k][2]} vs {expected[k]}" for k in expected.keys() & header.keys() if header[k][2] != expected[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches ({_first(mismatched, 2)})")
    return parts


def load_weights(module, checkpoint: Checkpoint, role: str) -> None:
    """Copy a full state dict into ``module`` in place, one file at a time, after checking it fits."""
    import torch
    from safetensors import safe_open

    weight_files = tuple(f for f in checkpoint.files if f.suffix != ".json")
    header = read_shapes(weight_files, role)
    problems = fit_problems({k: tuple(v.shape) for k, v in module.state_dict().items()}, header)
    if problems:
        raise CheckpointError(
            f"{role} {checkpoint.path} does not fit the pipeline's {type(module).__name__}: {'; '.join(problems)} — "
            "pass the --pipeline this checkpoint was trained from"
        )
    params = module.state_dict()
    with torch.no_grad():
        for path in weight_files:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    for key, (file, stored, _) in header.items():
                        if file == path:
                            params[key].copy_(handle.get_tensor(stored))
            else:
                for stored, tensor in load_pickle(path, role).items():
                    params[strip_prefixes(stored)].copy_(tensor)  # the header's keys, built the same way


def _first(items, count: int = 3) -> str:
    items = sorted(items)
    more = f" (+{len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def load_base(pipe, base: str | None, pipeline_source: str, allow_pickle: bool = False) -> tuple[VelocityModel, Checkpoint | None]:
    """The base velocity model: the pipeline's own transformer, with BASE's full weights copied in if given."""
    if base is None or Path(base).resolve() == Path(pipeline_source).resolve():
        return VelocityModel("base", pipe.transformer, pipeline_source, "pipeline"), None
    ckpt = find_checkpoint(base, "BASE", allow_pickle=allow_pickle)
    if ckpt.is_lora:
        raise CheckpointError(f"BASE {base} is a LoRA: pass it as TUNED (the base is then the pipeline's own transformer)")
    load_weights(pipe.transformer, ckpt, "BASE")
    return VelocityModel("base", pipe.transformer, str(ckpt.path), ckpt.kind), ckpt


def load_tuned_only(pipe, tuned: str, adapter: str | None = None, allow_pickle: bool = False) -> tuple[VelocityModel, Checkpoint, list[str]]:
    """TUNED alone, in the pipeline's transformer itself (no base copy): for checks against a stored reference.

    Full weights are copied over the pipeline's transformer; a LoRA is attached to it and left on.
    """
    ckpt = find_checkpoint(tuned, "TUNED", adapter=adapter, allow_pickle=allow_pickle)
    notes = list(ckpt.notes)
    if ckpt.is_lora:
        weights = read_lora(ckpt, type(pipe))
        check_targets(pipe.transformer, weights, "TUNED", ckpt.path)
        layers = attach_lora(pipe.transformer, weights)
        notes.extend(weights.notes)
        return AdapterModel("tuned", pipe.transformer, str(ckpt.path), ckpt.kind, layers, enabled=True), ckpt, notes
    load_weights(pipe.transformer, ckpt, "TUNED")
    return VelocityModel("tuned", pipe.transformer, str(ckpt.path), ckpt.kind), ckpt, notes


def load_models(
    pipe, base: str | None, tuned: str, pipeline_source: str, adapter: str | None = None, allow_pickle: bool = False,
    offload_to: str | None = None,
) -> LoadedModels:
    """The base and tuned velocity models; the pipeline's own transformer becomes the base.

    Full checkpoints: base in place, tuned a copy (two transformers, never more). LoRA: one transformer,
    the adapter switched on for tuned and off for base.
    """
    base_model, base_ckpt = load_base(pipe, base, pipeline_source, allow_pickle)
    checkpoints: list[Checkpoint] = [base_ckpt] if base_ckpt else []
    notes: list[str] = []
    tuned_ckpt = find_checkpoint(tuned, "TUNED", adapter=adapter, allow_pickle=allow_pickle)
    checkpoints.append(tuned_ckpt)
    notes.extend(tuned_ckpt.notes)
    if tuned_ckpt.is_lora:
        if offload_to is not None:
            notes.append("--offload has no effect for a LoRA: base and tuned already share one transformer")
        weights = read_lora(tuned_ckpt, type(pipe))
        check_targets(pipe.transformer, weights, "TUNED", tuned_ckpt.path)
        layers = attach_lora(pipe.transformer, weights)
        notes.extend(weights.notes)
        module = pipe.transformer
        base_model = AdapterModel("base", module, base_model.source, base_model.kind, layers, enabled=False)
        tuned_model = AdapterModel("tuned", module, str(tuned_ckpt.path), tuned_ckpt.kind, layers, enabled=True)
        return LoadedModels(base_model, tuned_model, checkpoints, notes)
    if offload_to is not None:
        pipe.transformer.to("cpu")  # the copy is made in host memory: never two transformers on the device
    module = copy.deepcopy(pipe.transformer)
    load_weights(module, tuned_ckpt, "TUNED")
    module.eval()
    tuned_model = VelocityModel("tuned", module, str(tuned_ckpt.path), tuned_ckpt.kind)
    if offload_to is not None:
        slot = DeviceSlot(offload_to)
        base_model, tuned_model = OffloadedModel(base_model, slot), OffloadedModel(tuned_model, slot)
    return LoadedModels(base_model, tuned_model, checkpoints, notes)
