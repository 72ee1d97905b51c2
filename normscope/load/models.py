"""The velocity models that capture runs: full weight copies, or one module with an adapter on and off."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from normscope.errors import CheckpointError
from normscope.load.formats import (
    EXPERT_ATTRS,
    FLOAT_DTYPES,
    PIPELINE_INDEX,
    Checkpoint,
    find_checkpoint,
    load_pickle,
    read_header,
    read_shapes,
    strip_prefixes,
)
from normscope.load.lora import attach_lora, check_base_weights, check_targets, detach_lora, read_lora


class VelocityModel:
    """The transformer(s) that compute one model's velocity; the unit that capture runs.

    ``module`` is the pipeline's ``transformer``; ``modules`` maps every expert attribute of the pipeline
    (Wan2.2-A14B: ``transformer`` and ``transformer_2``) to this model's module for it. ``active(pipe)``
    makes the pipeline sample with this model; calling the object (or ``expert(name)``) evaluates it on given
    inputs (used for the second model in paired mode).
    """

    def __init__(self, role: str, module, source: str, kind: str, experts: dict | None = None) -> None:
        self.role = role
        self.module = module
        self.modules = {"transformer": module, **(experts or {})}
        self.source = source
        self.kind = kind

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def expert(self, name: str):
        """A callable that evaluates this model's ``name`` expert (adapters set as this model needs them)."""
        if name not in self.modules:
            raise CheckpointError(
                f"the {self.role} model has no module for the pipeline's {name}: build it with "
                f"experts={{{name!r}: module}} (load_models does)"
            )
        module = self.modules[name]
        return lambda *args, **kwargs: self._evaluate(module, *args, **kwargs)

    def _evaluate(self, module, *args, **kwargs):
        return module(*args, **kwargs)

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[VelocityModel]:
        previous = {name: getattr(pipe, name) for name in self.modules}
        for name, module in self.modules.items():
            setattr(pipe, name, module)
        try:
            yield self
        finally:
            for name, module in previous.items():
                setattr(pipe, name, module)

    def describe(self) -> dict:
        return {"role": self.role, "source": self.source, "kind": self.kind}


class AdapterModel(VelocityModel):
    """Transformers with a LoRA: the tuned velocity with the adapter on, the base with it off.

    This is how the LoRA trainers compute v_ref (``with transformer.disable_adapter():``), and it keeps a
    single copy of each transformer in memory.
    """

    def __init__(self, role: str, module, source: str, kind: str, layers: list, enabled: bool, experts: dict | None = None) -> None:
        super().__init__(role, module, source, kind, experts)
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
        return self._evaluate(self.module, *args, **kwargs)

    def _evaluate(self, module, *args, **kwargs):
        with self.switched():
            return module(*args, **kwargs)

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[VelocityModel]:
        with super().active(pipe), self.switched():
            yield self


class DeviceSlot:
    """The one place on the execution device that offloaded models take turns in.

    A model takes the slot before it computes; whoever held it is parked first, so at no moment are two
    models' transformers on the device. The holder stays loaded until another model needs the slot: in free
    mode that is one copy per model per batch, in paired mode one per model per step.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.holder: OffloadedModel | None = None
        self.loads = 0  # host-to-device copies of a model's transformers (the cost of offloading)

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


def _tensor_slots(modules) -> list[tuple[object, str, bool]]:
    """(owner module, attribute, is_parameter) for every parameter and buffer, non-persistent ones included."""
    slots, seen = [], set()
    for module in modules:
        for owner in module.modules():
            if id(owner) in seen:
                continue
            seen.add(id(owner))
            slots += [(owner, name, True) for name, p in owner._parameters.items() if p is not None]
            slots += [(owner, name, False) for name, b in owner._buffers.items() if b is not None]
    return slots


class OffloadedModel(VelocityModel):
    """A full-weights model whose transformers live in host memory and visit the device only while it computes.

    Between uses the modules' tensors are on the ``meta`` device (no storage anywhere) and a host copy
    (pinned on CUDA, so copies run at full bus speed) holds the values; ``load`` copies them to the slot's
    device. Because parked weights are on ``meta``, where a model lives can be observed even when the
    execution device is the CPU: the invariant is tested without a GPU. An expert that base and tuned share
    (a checkpoint that leaves it out) is loaded with whichever model holds the slot.
    """

    def __init__(self, inner: VelocityModel, slot: DeviceSlot) -> None:
        import torch

        super().__init__(inner.role, inner.module, inner.source, inner.kind, inner.modules)
        self.inner = inner
        self.slot = slot
        self._slots = _tensor_slots(self.modules.values())
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
        """Back to ordinary modules whose weights are the host copies (the slot no longer manages them)."""
        if self.slot.holder is self:
            self.slot.holder = None
        self._put(self._host)

    def __call__(self, *args, **kwargs):
        self.slot.take(self)
        return self.inner(*args, **kwargs)

    def _evaluate(self, module, *args, **kwargs):
        self.slot.take(self)
        return self.inner._evaluate(module, *args, **kwargs)

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[VelocityModel]:
        # Loaded now, so the pipeline sees its execution device when the call starts; the pre-hooks take the
        # slot back for each of the pipeline's own forwards after a paired step has parked this model.
        self.slot.take(self)
        handles = [module.register_forward_pre_hook(lambda module, args: self.slot.take(self))
                   for module in {id(m): m for m in self.modules.values()}.values()]
        try:
            with self.inner.active(pipe):
                yield self
        finally:
            for handle in handles:
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
        """One copy of the transformers serves both (a LoRA switched on and off)."""
        return self.base.module is self.tuned.module

    @property
    def adapter_params(self) -> int:
        layers = getattr(self.tuned, "layers", [])
        return sum(p.numel() for layer in layers for name, p in layer.named_parameters() if "lora_" in name)

    def release(self) -> None:
        """Hand the pipeline's transformers back as loaded: adapter removed, offloaded weights in host memory."""
        for model in (self.base, self.tuned):
            if isinstance(model, OffloadedModel):
                model.restore()
        if isinstance(self.tuned, AdapterModel):
            for module in {id(m): m for m in self.tuned.modules.values()}.values():
                detach_lora(module)

    def place(self, device: str) -> None:
        """Put the transformers on the execution device (offloaded ones wait in host memory for their turn)."""
        for model in (self.base, self.tuned):
            if not isinstance(model, OffloadedModel):
                for module in model.modules.values():
                    module.to(device)


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
    header = read_header(weight_files, role)
    problems = fit_problems(_shapes(module), header) + _dtype_problems(module.state_dict(), header)
    _refuse_misfit(checkpoint, type(module).__name__, problems, role)
    params = module.state_dict()
    with torch.no_grad():
        for path in weight_files:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    for key, (file, stored, *_) in header.items():
                        if file == path:
                            params[key].copy_(handle.get_tensor(stored))
            else:
                for stored, tensor in load_pickle(path, role).items():
                    params[strip_prefixes(stored)].copy_(tensor)  # the header's keys, built the same way


def _refuse_misfit(checkpoint: Checkpoint, class_name: str, problems: list[str], role: str) -> None:
    if problems:
        raise CheckpointError(
            f"{role} {checkpoint.path} does not fit the pipeline's {class_name}: {'; '.join(problems)} — "
            "pass the --pipeline this checkpoint was trained from"
        )


def check_fit_before_load(source: str, ckpt: Checkpoint, role: str) -> None:
    """A full checkpoint's keys and shapes against the pipeline's transformer built on the meta device (no
    weights, no memory), so missing or unexpected keys are refused before the pipeline loads, not after.

    Only for a local pipeline folder whose transformer class diffusers names; anything else (a hub id, a
    class that cannot be built from its config) is left to ``load_weights``, which checks the same at the copy.
    """
    if ckpt.is_lora or not (Path(source) / PIPELINE_INDEX).is_file():
        return
    for expert in ckpt.experts:
        part = ckpt.part(expert)
        module = _meta_transformer(Path(source), expert)
        if part is None or module is None:
            continue
        header = read_shapes(tuple(f for f in part.files if f.suffix != ".json"), role)
        _refuse_misfit(part, type(module).__name__, fit_problems(_shapes(module), header), role)


def _meta_transformer(root: Path, expert: str):
    """The pipeline's ``expert`` module on the meta device, or None where it cannot be built from its config."""
    import json

    import diffusers
    import torch

    try:
        _, class_name = json.loads((root / PIPELINE_INDEX).read_text())[expert]
        cls = getattr(diffusers, class_name)
        config = cls.load_config(str(root / expert))
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception:  # noqa: BLE001 - a pipeline this cannot build is checked at the copy instead
        return None


def _shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _dtype_problems(own: dict, header: dict) -> list[str]:
    """Integer or bool tensors stored for the module's floating ones (a buffer the pre-load check lets pass)."""
    wrong = sorted(f"{key} {entry[3]}" for key, entry in header.items()
                   if key in own and own[key].is_floating_point() and entry[3] not in FLOAT_DTYPES)
    return [f"{len(wrong)} tensors stored as non-floating dtypes for floating ones ({_first(wrong, 2)})"] if wrong else []


def cast_notes(ckpt: Checkpoint, module, role: str) -> list[str]:
    """One line per floating dtype the checkpoint stores that the run casts to another (bf16 file, float32 run).

    The cast is said, not refused: bf16 -> float32 is exact, float32 -> bf16 rounds, and either way the run
    measures the weights as the chosen --dtype holds them. For a LoRA only its adapter tensors count (the frozen
    weights of a peft-wrapped state dict are compared, not loaded).
    """
    run = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if run is None:
        return []
    run_name = str(run).removeprefix("torch.")
    counts: dict[str, int] = {}
    for part in ckpt.parts or (ckpt,):
        header = read_header(tuple(f for f in part.files if f.suffix != ".json"), role)
        for key, entry in header.items():
            if part.is_lora and "lora_" not in key:
                continue
            if entry[3] in FLOAT_DTYPES and entry[3] != run_name:
                counts[entry[3]] = counts.get(entry[3], 0) + 1
    return [f"{role} {ckpt.given} stores {count} {dtype} tensors, cast to {run_name} for this run (--dtype)"
            for dtype, count in sorted(counts.items())]


def _first(items, count: int = 3) -> str:
    items = sorted(items)
    more = f" (+{len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def pipeline_experts(pipe) -> tuple[str, ...]:
    """The pipeline's denoiser attributes that hold a module (``transformer``; Wan2.2-A14B adds ``transformer_2``)."""
    return tuple(name for name in EXPERT_ATTRS if getattr(pipe, name, None) is not None)


def _check_experts(pipe, ckpt: Checkpoint, role: str) -> None:
    present = pipeline_experts(pipe)
    absent = [e for e in ckpt.experts if e not in present]
    if absent:
        raise CheckpointError(
            f"{role} {ckpt.path} holds weights for {', '.join(absent)}, which {type(pipe).__name__} does not have "
            f"(it has {', '.join(present)}): pass the --pipeline this checkpoint was trained from (a Wan2.2-A14B pipeline)"
        )


def _left_to_base(pipe, ckpt: Checkpoint, role: str) -> list[str]:
    """One note per expert the checkpoint does not change: that expert runs with the base's weights."""
    experts = pipeline_experts(pipe)
    if len(experts) < 2:
        return []
    return [f"{role} {ckpt.given} does not change {name}: it runs with the base's {name}"
            for name in experts if name not in ckpt.experts]


def load_base(pipe, base: str | None, pipeline_source: str, allow_pickle: bool = False) -> tuple[VelocityModel, Checkpoint | None]:
    """The base velocity model: the pipeline's own transformer(s), with BASE's full weights copied in if given."""
    experts = {name: getattr(pipe, name) for name in pipeline_experts(pipe)}
    if base is None or Path(base).resolve() == Path(pipeline_source).resolve():
        return VelocityModel("base", pipe.transformer, pipeline_source, "pipeline", experts), None
    ckpt = find_checkpoint(base, "BASE", allow_pickle=allow_pickle)
    if ckpt.is_lora or any(p.is_lora for p in ckpt.parts):
        raise CheckpointError(f"BASE {base} is a LoRA: pass it as TUNED (the base is then the pipeline's own transformer)")
    _check_experts(pipe, ckpt, "BASE")
    for name in ckpt.experts:
        load_weights(experts[name], ckpt.part(name), "BASE")
    return VelocityModel("base", pipe.transformer, str(ckpt.path), ckpt.kind, experts), ckpt


def _apply_tuned(pipe, ckpt: Checkpoint, modules: dict, copy_full: bool, role: str = "TUNED") -> tuple[dict, list, list[str]]:
    """TUNED's expert modules: a LoRA attached to the given module, full weights in a copy (or in place)."""
    _check_experts(pipe, ckpt, role)
    tuned: dict = dict(modules)
    layers: list = []
    notes: list[str] = []
    for name in ckpt.experts:
        part = ckpt.part(name)
        if part.is_lora:
            weights = read_lora(part, type(pipe), role, expert=name)
            check_targets(modules[name], weights, role, part.path)
            check_base_weights(modules[name], weights, role, part.path)
            layers.extend(attach_lora(modules[name], weights, role=role, where=part.path))
            notes.extend(weights.notes)
            continue
        module = copy.deepcopy(modules[name]) if copy_full else modules[name]
        load_weights(module, part, role)
        module.eval()
        tuned[name] = module
    notes.extend(cast_notes(ckpt, modules[ckpt.experts[0]], role))
    notes.extend(_left_to_base(pipe, ckpt, role))
    return tuned, layers, notes


def load_tuned_only(pipe, tuned: str, adapter: str | None = None, allow_pickle: bool = False) -> tuple[VelocityModel, Checkpoint, list[str]]:
    """TUNED alone, in the pipeline's transformer(s) itself (no base copy): for checks against a stored reference.

    Full weights are copied over the pipeline's transformer; a LoRA is attached to it and left on.
    """
    ckpt = find_checkpoint(tuned, "TUNED", adapter=adapter, allow_pickle=allow_pickle)
    notes = list(ckpt.notes)
    modules = {name: getattr(pipe, name) for name in pipeline_experts(pipe)}
    modules, layers, more = _apply_tuned(pipe, ckpt, modules, copy_full=False)
    notes.extend(more)
    if layers:
        model = AdapterModel("tuned", modules["transformer"], str(ckpt.path), ckpt.kind, layers, enabled=True, experts=modules)
    else:
        model = VelocityModel("tuned", modules["transformer"], str(ckpt.path), ckpt.kind, modules)
    return model, ckpt, notes


def load_models(
    pipe, base: str | None, tuned: str, pipeline_source: str, adapter: str | None = None, allow_pickle: bool = False,
    offload_to: str | None = None,
) -> LoadedModels:
    """The base and tuned velocity models; the pipeline's own transformer(s) become the base.

    Full checkpoints: base in place, tuned a copy of each expert it changes (never more). LoRA: one copy of
    each transformer, the adapter switched on for tuned and off for base. Experts the checkpoint leaves out
    are shared with the base, and a note says so.
    """
    base_model, base_ckpt = load_base(pipe, base, pipeline_source, allow_pickle)
    checkpoints: list[Checkpoint] = [base_ckpt] if base_ckpt else []
    notes: list[str] = cast_notes(base_ckpt, base_model.module, "BASE") if base_ckpt else []
    tuned_ckpt = find_checkpoint(tuned, "TUNED", adapter=adapter, allow_pickle=allow_pickle)
    checkpoints.append(tuned_ckpt)
    notes.extend(tuned_ckpt.notes)
    if tuned_ckpt.is_lora and offload_to is not None:
        notes.append("--offload has no effect for a LoRA: base and tuned already share one transformer")
        offload_to = None
    if offload_to is not None:
        for module in base_model.modules.values():
            module.to("cpu")  # the copy is made in host memory: never two transformers on the device
    modules, layers, more = _apply_tuned(pipe, tuned_ckpt, dict(base_model.modules), copy_full=True)
    notes.extend(more)
    if layers:
        shared = dict(base_model.modules)
        base_model = AdapterModel("base", shared["transformer"], base_model.source, base_model.kind, layers, enabled=False, experts=shared)
        tuned_model = AdapterModel("tuned", modules["transformer"], str(tuned_ckpt.path), tuned_ckpt.kind, layers, enabled=True, experts=modules)
    else:
        tuned_model = VelocityModel("tuned", modules["transformer"], str(tuned_ckpt.path), tuned_ckpt.kind, modules)
    if offload_to is not None:
        slot = DeviceSlot(offload_to)
        base_model, tuned_model = OffloadedModel(base_model, slot), OffloadedModel(tuned_model, slot)
    return LoadedModels(base_model, tuned_model, checkpoints, notes)
