"""``normscope inspect``: what normscope sees in a checkpoint, without running a model.

Reads only file names, JSON configs and safetensors headers (LoRA tensors are small and are read to get
ranks). With a pipeline, the fit check builds the pipeline's transformer on the meta device: no weights
are allocated.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from normscope.errors import CheckpointError, InputError
from normscope.load.formats import PICKLE_SUFFIXES, PIPELINE_INDEX, find_checkpoint, load_pickle, read_shapes
from normscope.load.lora import read_lora

SD3, FLUX, OTHER = "SD3", "FLUX", "other"


@dataclass(kw_only=True)
class InspectConfig:
    """``normscope inspect PATH``: ``pipeline`` adds a fit check against that pipeline's transformer."""

    path: str
    pipeline: str | None = None
    adapter: str | None = None
    allow_pickle: bool = False


def guess_architecture(keys, class_name: str | None = None) -> str:
    """SD3, FLUX or other, from a transformer class name or from key names."""
    if class_name:
        if "SD3" in class_name:
            return SD3
        if "Flux" in class_name:
            return FLUX
    keys = list(keys)
    if any("double_blocks" in k or "single_blocks" in k or "single_transformer_blocks" in k for k in keys):
        return FLUX
    if any("context_embedder" in k or "pos_embed" in k or "add_q_proj" in k for k in keys):
        return SD3
    return OTHER


def _dtypes(files) -> Counter:
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    counts: Counter = Counter()
    for path in files:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            counts.update(str(t.dtype).removeprefix("torch.") for t in load_pickle(path, "PATH").values())
            continue
        with safe_open(str(path), framework="pt") as handle:
            counts.update(names.get(handle.get_slice(k).get_dtype(), handle.get_slice(k).get_dtype()) for k in handle.keys())
    return counts


def _class_name(folder: Path) -> str | None:
    config = folder / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("_class_name")
    return None


def _meta_transformer(pipeline: str):
    """The pipeline's transformer class and an instance on the meta device (no memory), plus its pipeline class."""
    import diffusers
    import torch

    root = Path(pipeline)
    if not (root / PIPELINE_INDEX).is_file():
        raise InputError(f"--pipeline {pipeline} has no {PIPELINE_INDEX}: pass a local pipeline folder for the fit check")
    index = json.loads((root / PIPELINE_INDEX).read_text())
    pipeline_class = getattr(diffusers, index.get("_class_name", ""), None)
    library, class_name = index["transformer"]
    cls = getattr(diffusers, class_name)
    config = cls.load_config(str(root / "transformer"))
    with torch.device("meta"):
        model = cls.from_config(config)
    return model, pipeline_class


def inspect_checkpoint(config: InspectConfig) -> dict:
    """Kind, architecture, parameter count, dtypes, LoRA rank/alpha/targets, adapters, and the fit."""
    from normscope.load.models import fit_problems

    ckpt = find_checkpoint(config.path, "PATH", config.adapter, config.allow_pickle)
    parts = ckpt.parts or (ckpt,)
    header: dict = {}
    parameters = tensors = 0
    for part in parts:  # experts' key names coincide: count each part's tensors on its own
        part_header = read_shapes(tuple(f for f in part.files if f.suffix != ".json"), "PATH")
        header.update(part_header)
        tensors += len(part_header)
        for _, _, shape in part_header.values():
            count = 1
            for dim in shape:
                count *= dim
            parameters += count
    weight_files = tuple(f for f in ckpt.files if f.suffix != ".json")
    first = parts[0]
    class_name = _class_name(first.path / "transformer" if first.kind == "pipeline" else first.path) if first.path.is_dir() else None
    report = {
        **ckpt.describe(),
        "architecture": guess_architecture(header, class_name),
        "parameters": parameters,
        "tensors": tensors,
        "dtypes": dict(sorted(_dtypes(weight_files).items())),
        "lora": None,
        "pipeline": config.pipeline,
        "fits": None,
        "problems": [],
    }
    if len(parts) > 1 or ckpt.experts != ("transformer",):
        report["notes"] = report["notes"] + [
            f"changes {', '.join(ckpt.experts)}; a two-expert pipeline (Wan2.2-A14B) runs the others with the base's weights"
        ]
    ckpt = next((p for p in parts if p.is_lora), first)
    model = pipeline_class = None
    if config.pipeline:
        model, pipeline_class = _meta_transformer(config.pipeline)
    if ckpt.is_lora:
        try:
            weights = read_lora(ckpt, pipeline_class, "PATH", expert=ckpt.experts[0])
        except CheckpointError as exc:
            if model is None:
                raise
            report.update(fits=False, problems=[str(exc)])
            return report
        ranks = sorted(set(weights.ranks.values()))
        alpha = weights.config.get("lora_alpha") if weights.alpha_known else None
        report["lora"] = {
            "rank": weights.config.get("r"),
            "ranks": ranks,
            "alpha": alpha,
            "alpha_known": weights.alpha_known,
            "scale": None if alpha is None else alpha / weights.config["r"],
            "target_modules": weights.modules,
            "n_target_modules": len(weights.modules),
        }
        report["notes"] = report["notes"] + weights.notes
        if model is not None:
            from normscope.load.lora import check_targets

            try:
                check_targets(model, weights, "PATH", ckpt.path)
                report["fits"] = True
            except CheckpointError as exc:
                report.update(fits=False, problems=[str(exc)])
    elif model is not None:
        problems = fit_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, header)
        report.update(fits=not problems, problems=problems)
    return report
