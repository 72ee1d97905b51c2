"""The velocity models that capture runs: full weight copies, or one module with an adapter on and off."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from normscope.errors import CheckpointError
from normscope.load.formats import Checkpoint, find_checkpoint, load_pickle, read_shapes, strip_prefixes
from normscope.load.lora import attach_lora, check_base_weights, check_targets, read_lora


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


class OffloadedModel(VelocityModel):
    """A full-weights model whose transformer lives on the CPU and visits ``device`` only while it computes.

    Keeps one transformer's weights on the device at a time, at the price of a host-device copy of the
    weights per use: once per batch for the model that drives (or samples, in free mode), once per step for
    the second model of paired mode.
    """

    def __init__(self, inner: VelocityModel, device: str) -> None:
        super().__init__(inner.role, inner.module, inner.source, inner.kind)
        self.inner = inner
        self.device = device
        self.module.to("cpu")

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        self.module.to(self.device)
        try:
            yield
        finally:
            self.module.to("cpu")

    def __call__(self, *args, **kwargs):
        with self.on_device():
            return self.inner(*args, **kwargs)

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
        check_base_weights(pipe.transformer, weights, "TUNED", ckpt.path)
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
        check_base_weights(pipe.transformer, weights, "TUNED", tuned_ckpt.path)
        layers = attach_lora(pipe.transformer, weights)
        notes.extend(weights.notes)
        module = pipe.transformer
        base_model = AdapterModel("base", module, base_model.source, base_model.kind, layers, enabled=False)
        tuned_model = AdapterModel("tuned", module, str(tuned_ckpt.path), tuned_ckpt.kind, layers, enabled=True)
        return LoadedModels(base_model, tuned_model, checkpoints, notes)
    if offload_to is not None:
        pipe.transformer.to("cpu")  # the copy is made on the CPU: never two transformers on the device
    module = copy.deepcopy(pipe.transformer)
    load_weights(module, tuned_ckpt, "TUNED")
    module.eval()
    tuned_model = VelocityModel("tuned", module, str(tuned_ckpt.path), tuned_ckpt.kind)
    if offload_to is not None:
        base_model, tuned_model = OffloadedModel(base_model, offload_to), OffloadedModel(tuned_model, offload_to)
    return LoadedModels(base_model, tuned_model, checkpoints, notes)
