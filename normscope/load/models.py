"""The velocity models that capture runs: full weight copies, or one module with an adapter on and off."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from normscope.errors import CheckpointError
from normscope.load.formats import EXPERT_ATTRS, Checkpoint, find_checkpoint, load_pickle, read_shapes, strip_prefixes
from normscope.load.lora import attach_lora, check_base_weights, check_targets, read_lora


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


class OffloadedModel(VelocityModel):
    """A full-weights model whose transformers live on the CPU and visit ``device`` only while they compute.

    Keeps one model's weights on the device at a time, at the price of a host-device copy of the
    weights per use: once per batch for the model that drives (or samples, in free mode), once per step for
    the second model of paired mode.
    """

    def __init__(self, inner: VelocityModel, device: str) -> None:
        super().__init__(inner.role, inner.module, inner.source, inner.kind, inner.modules)
        self.inner = inner
        self.device = device
        for module in self.modules.values():
            module.to("cpu")

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        for module in self.modules.values():
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.modules.values():
                module.to("cpu")

    def __call__(self, *args, **kwargs):
        with self.on_device():
            return self.inner(*args, **kwargs)

    def _evaluate(self, module, *args, **kwargs):
        with self.on_device():
            return self.inner._evaluate(module, *args, **kwargs)

    @contextlib.contextmanager
    def active(self, pipe) -> Iterator[VelocityModel]:
        with self.inner.active(pipe), self.on_device():
            yield self


@dataclass
class LoadedModels:
    base: VelocityModel
    tuned: VelocityModel
    checkpoints: list[Checkpoint]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"base": self.base.describe(), "tuned": self.tuned.describe(),
                "checkpoints": [c.describe() for c in self.checkpoints], "notes": self.notes}


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
            layers.extend(attach_lora(modules[name], weights))
            notes.extend(weights.notes)
            continue
        module = copy.deepcopy(modules[name]) if copy_full else modules[name]
        load_weights(module, part, role)
        module.eval()
        tuned[name] = module
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
    notes: list[str] = []
    tuned_ckpt = find_checkpoint(tuned, "TUNED", adapter=adapter, allow_pickle=allow_pickle)
    checkpoints.append(tuned_ckpt)
    notes.extend(tuned_ckpt.notes)
    if tuned_ckpt.is_lora and offload_to is not None:
        notes.append("--offload has no effect for a LoRA: base and tuned already share one transformer")
        offload_to = None
    if offload_to is not None:
        for module in base_model.modules.values():
            module.to("cpu")  # the copy is made on the CPU: never two transformers on the device
    modules, layers, more = _apply_tuned(pipe, tuned_ckpt, dict(base_model.modules), copy_full=True)
    notes.extend(more)
    if layers:
        shared = dict(base_model.modules)
        base_model = AdapterModel("base", shared["transformer"], base_model.source, base_model.kind, layers, enabled=False, experts=shared)
        tuned_model = AdapterModel("tuned", modules["transformer"], str(tuned_ckpt.path), tuned_ckpt.kind, layers, enabled=True, experts=modules)
    else:
        tuned_model = VelocityModel("tuned", modules["transformer"], str(tuned_ckpt.path), tuned_ckpt.kind, modules)
    if offload_to is not None:
        base_model, tuned_model = OffloadedModel(base_model, offload_to), OffloadedModel(tuned_model, offload_to)
    return LoadedModels(base_model, tuned_model, checkpoints, notes)
