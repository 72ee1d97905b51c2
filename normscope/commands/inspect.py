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
from normscope.load.families import FAMILIES, family_for
from normscope.load.formats import (
    PICKLE_SUFFIXES,
    PIPELINE_INDEX,
    find_checkpoint,
    load_pickle,
    read_shapes,
    strip_prefixes,
)
from normscope.load.lora import read_lora

SD3, FLUX, OTHER = "SD3", "FLUX", "other"
# Transformer class -> the short architecture name the report shows.
ARCHITECTURES = {
    "SD3Transformer2DModel": SD3, "FluxTransformer2DModel": FLUX, "Flux2Transformer2DModel": "FLUX.2",
    "QwenImageTransformer2DModel": "Qwen-Image", "ZImageTransformer2DModel": "Z-Image",
    "WanTransformer3DModel": "Wan",
}
# Key fragments only one transformer class has, most specific first: names the class of a bare file.
KEY_SIGNATURES = (
    ("Flux2Transformer2DModel", ("double_stream_modulation_img.", "single_stream_modulation.")),
    ("ZImageTransformer2DModel", ("all_final_layer.", "cap_embedder.", "noise_refiner.")),
    ("QwenImageTransformer2DModel", ("img_in.", "txt_norm.", ".img_mod.", ".txt_mlp.")),
    ("WanTransformer3DModel", ("condition_embedder.", "patch_embedding.")),
    ("FluxTransformer2DModel", ("single_transformer_blocks.", "double_blocks", "single_blocks", "x_embedder.")),
    ("SD3Transformer2DModel", ("pos_embed.", "context_embedder.", ".add_q_proj.")),
)


@dataclass(kw_only=True)
class InspectConfig:
    """``normscope inspect PATH``: ``pipeline`` adds a fit check against that pipeline's transformer."""

    path: str
    pipeline: str | None = None
    adapter: str | None = None
    allow_pickle: bool = False


def guess_transformer_class(keys) -> str | None:
    """The diffusers transformer class a state dict belongs to, from key fragments only that class has."""
    keys = list(keys)
    for class_name, fragments in KEY_SIGNATURES:
        if any(fragment in key for key in keys for fragment in fragments):
            return class_name
    return None


def guess_architecture(keys, class_name: str | None = None) -> str:
    """SD3, FLUX, FLUX.2, Qwen-Image, Z-Image, Wan or other, from a transformer class name or from key names."""
    class_name = class_name or guess_transformer_class(keys)
    return ARCHITECTURES.get(class_name or "", OTHER)


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


def _class_name(folder: Path, config_name: str = "config.json") -> str | None:
    config = folder / config_name
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


def _family_name(pipeline_class: str | None, notes: list[str]) -> str | None:
    """The family-table row of a pipeline class; a class without a row is noted, not an error here."""
    if not pipeline_class:
        return None
    try:
        return family_for(pipeline_class).name
    except InputError as exc:
        notes.append(str(exc))
        return None


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
    # The folder's config, else key names; a LoRA's keys name only its target modules, which several
    # classes share (add_q_proj, to_q ...), so a LoRA's class is not guessed — its fit is checked instead.
    guessable = not ckpt.is_lora or ckpt.kind in ("peft_wrapped", "kohya")
    transformer_class = class_name or (guess_transformer_class(header) if guessable else None)
    report = {
        **ckpt.describe(),
        "transformer_class": transformer_class,
        # the family-table rows whose transformer this is (Kontext shares FLUX.1's class, Edit Qwen-Image's)
        "families": [f.name for f in FAMILIES if f.transformer_class == transformer_class],
        "pipeline_class": _class_name(ckpt.path, PIPELINE_INDEX) if ckpt.kind == "pipeline" else None,
        "family": None,
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
        report["pipeline_class"] = getattr(pipeline_class, "__name__", None)
    report["family"] = _family_name(report["pipeline_class"], report["notes"])
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
        if weights.base_keys:
            report["notes"].append(
                f"holds the {len(weights.base_keys)} frozen weights too: compare and check refuse it unless they equal "
                "the pipeline's own transformer"
            )
        if model is not None:
            from normscope.load.lora import check_targets

            try:
                check_targets(model, weights, "PATH", ckpt.path)
                frozen = {bare: header[strip_prefixes(stored)] for bare, stored in weights.base_keys.items()}
                problems = fit_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, frozen) if frozen else []
                report.update(fits=not problems, problems=problems)
            except CheckpointError as exc:
                report.update(fits=False, problems=[str(exc)])
    elif model is not None:
        problems = fit_problems({k: tuple(v.shape) for k, v in model.state_dict().items()}, header)
        report.update(fits=not problems, problems=problems)
    if model is not None and transformer_class and transformer_class != type(model).__name__:
        report["fits"] = False
        report["problems"] = [*report["problems"], f"it is a {transformer_class}, the pipeline's transformer is a "
                              f"{type(model).__name__} (family {report['family']})"]
    return report
