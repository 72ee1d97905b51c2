"""Load stage: a checkpoint path -> a diffusers pipeline and two velocity models (base, tuned).

A *velocity model* is anything that computes the transformer's output for the pipeline's inputs.
Capture only ever sees :class:`VelocityModel`, so new checkpoint kinds (LoRA adapters switched on
and off on one module, for instance) slot in here without touching the capture code.

Checkpoints are untrusted data: only safetensors files are read, never pickles, never remote code.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from normscope.config import Device, DType
from normscope.errors import CheckpointError, InputError

PIPELINE_INDEX = "model_index.json"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
KEY_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------- devices and dtypes


def resolve_device(device: Device) -> str:
    import torch

    if device is Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device is Device.cuda and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA device: use --device cpu or auto")
    return device.value


def resolve_dtype(dtype: DType, device: str):
    import torch

    if dtype is DType.auto:
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype.value)


# ---------------------------------------------------------------- checkpoints on disk


@dataclass(frozen=True)
class Checkpoint:
    """What a path holds, found without reading any weights."""

    path: Path
    kind: str  # "pipeline" | "transformer" | "state_dict"
    files: tuple[Path, ...] = field(default=())

    def identity(self) -> list:
        """Size and mtime of every weight file: enough to notice a changed checkpoint between runs."""
        return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]


def _transformer_files(folder: Path) -> tuple[Path, ...]:
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = tuple(folder / name for name in sorted(set(weight_map.values())))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard {missing[0]}, which is missing: copy every shard next to the index")
        return files
    return tuple(sorted(folder.glob("*.safetensors")))


def find_checkpoint(path: str | Path, role: str) -> Checkpoint:
    """Classify ``path`` as a pipeline folder, a transformer folder or a safetensors state dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{role} {path} does not exist: pass a pipeline folder, a transformer folder or a .safetensors file")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{role} {path} is a pickle file, which can run code when loaded: convert it with "
                "safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors')"
            )
        if path.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{role} {path} is not a .safetensors file: pass a safetensors state dict or a folder")
        return Checkpoint(path, "state_dict", (path,))
    if (path / PIPELINE_INDEX).is_file():
        files = _transformer_files(path / "transformer") if (path / "transformer").is_dir() else ()
        if not files:
            raise CheckpointError(f"{role} {path} is a pipeline folder without transformer/*.safetensors: save it with safe_serialization=True")
        return Checkpoint(path, "pipeline", files)
    files = _transformer_files(path)
    if files:
        return Checkpoint(path, "transformer", files)
    raise CheckpointError(
        f"no checkpoint found in {role} folder {path}: looked for {PIPELINE_INDEX}, "
        f"{WEIGHTS_INDEX} and *.safetensors — point at the folder that holds them"
    )


def find_pipeline_source(base: str | None, tuned: str, pipeline: str | None) -> str:
    """--pipeline if given; else BASE if it is a pipeline folder; else the nearest enclosing pipeline folder."""
    if pipeline:
        return pipeline
    candidates = [Path(p) for p in (base, tuned) if p]
    for candidate in candidates:
        if (candidate / PIPELINE_INDEX).is_file():
            return str(candidate)
    for candidate in candidates:
        for parent in candidate.resolve().parents:
            if (parent / PIPELINE_INDEX).is_file():
                return str(parent)
    raise InputError(
        "no pipeline to run the checkpoints in: pass --pipeline with a diffusers pipeline folder "
        "(one holding model_index.json) or a hub id"
    )


# ---------------------------------------------------------------- the pipeline


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' own loading bars; normscope shows its own progress."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), tlog.get_verbosity())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()  # e.g. "requires torchvision" notices about image processors normscope never uses
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype -> dtype rename across diffusers versions
            yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()
        tlog.set_verbosity(was[2])


def load_pipeline(source: str, dtype, device: str):
    """A diffusers pipeline from a local folder or a hub id, safetensors only, no remote code."""
    from diffusers import DiffusionPipeline

    local = Path(source)
    if not local.exists() and not HUB_ID.match(source):
        raise InputError(f"--pipeline {source} is neither a folder nor a hub id: pass a folder holding {PIPELINE_INDEX}")
    if local.exists() and not (local / PIPELINE_INDEX).is_file():
        raise InputError(f"--pipeline {source} has no {PIPELINE_INDEX}: pass the pipeline's top folder")
    try:
        with _quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, use_safetensors=True)
    except Exception as exc:  # diffusers raises many types; one line is what the user needs
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not local.exists():
            raise InputError(
                f"cannot fetch pipeline {source} from the hub ({reason[:160]}): download it where you are online "
                "and pass the folder with --pipeline"
            ) from None
        raise InputError(f"cannot load pipeline {source}: {reason[:200]}") from None
    check_pipeline(pipe, source)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_pipeline(pipe, source: str) -> None:
    """normscope follows flow-matching pipelines with a ``transformer``; refuse others clearly."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise InputError(f"pipeline {source} ({type(pipe).__name__}) has no transformer: normscope measures DiT flow pipelines such as SD3 and FLUX")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or "FlowMatch" not in type(scheduler).__name__:
        raise InputError(
            f"pipeline {source} samples with {type(scheduler).__name__}, not a FlowMatch scheduler: "
            "normscope measures flow-matching velocities"
        )
    transformer.eval()


# ---------------------------------------------------------------- velocity models


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


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in KEY_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _header(files: tuple[Path, ...], role: str) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """key -> (file, key as stored, shape), read from the safetensors headers alone."""
    from safetensors import safe_open

    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for stored in handle.keys():
                    found[_strip_prefix(stored)] = (path, stored, tuple(handle.get_slice(stored).get_shape()))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{role} file {path} is not a valid safetensors file ({reason[:120]}): re-save it with safetensors.torch.save_file"
            ) from None
    return found


def _first(items, count: int = 3) -> str:
    items = sorted(items)
    more = f" (+{len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def load_weights(module, checkpoint: Checkpoint, role: str) -> None:
    """Copy a full state dict into ``module`` in place, one file at a time, after checking it fits."""
    import torch
    from safetensors import safe_open

    header = _header(checkpoint.files, role)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = expected.keys() - header.keys()
    unexpected = header.keys() - expected.keys()
    mismatched = [f"{k} {header[k][2]} vs {expected[k]}" for k in expected.keys() & header.keys() if header[k][2] != expected[k]]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_first(mismatched, 2)})")
        raise CheckpointError(
            f"{role} {checkpoint.path} does not fit the pipeline's {type(module).__name__}: {'; '.join(parts)} — "
            "pass the --pipeline this checkpoint was trained from"
        )
    params = module.state_dict()
    with torch.no_grad():
        for path in checkpoint.files:
            with safe_open(str(path), framework="pt") as handle:
                for key, (file, stored, _) in header.items():
                    if file == path:
                        params[key].copy_(handle.get_tensor(stored))


def load_models(pipe, base: str | None, tuned: str, pipeline_source: str) -> tuple[VelocityModel, VelocityModel]:
    """The base and tuned velocity models; the pipeline's own transformer becomes the base.

    Two transformers are resident at the end (base in place, tuned a copy) and never more.
    """
    source_is_base = base is None or Path(base).resolve() == Path(pipeline_source).resolve()
    if source_is_base:
        base_model = VelocityModel("base", pipe.transformer, pipeline_source, "pipeline")
    else:
        base_ckpt = find_checkpoint(base, "BASE")
        load_weights(pipe.transformer, base_ckpt, "BASE")
        base_model = VelocityModel("base", pipe.transformer, str(base_ckpt.path), base_ckpt.kind)
    tuned_ckpt = find_checkpoint(tuned, "TUNED")
    module = copy.deepcopy(pipe.transformer)
    load_weights(module, tuned_ckpt, "TUNED")
    module.eval()
    return base_model, VelocityModel("tuned", module, str(tuned_ckpt.path), tuned_ckpt.kind)
