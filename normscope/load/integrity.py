"""What a checkpoint must satisfy before anything loads, read from safetensors headers and JSON files alone.

A broken checkpoint is refused in one line (exit 2) naming the file and the fix, in a second, instead of being
measured wrong after minutes of loading:

* every weight file opens (not zero bytes, not cut short) and every shard-index entry is in the shard it names;
* weights are floating point: int8, uint8, bool ... and float8 hold quantised values whose scale normscope
  cannot know, and a plain cast measures other weights (an int8 file read as +105 270 %);
* every LoRA down-projection (``lora_A``, kohya's ``lora_down``) has its up-projection and vice versa, with
  the same rank: peft would leave the missing half at its random init and every run would measure other noise;
* LoRA configs (``adapter_config.json``, a trainer's ``lora_config.json``, the header metadata
  ``lora_adapter_metadata``) are JSON, with a numeric alpha and a positive integer rank that fits the tensors.

What only the load can see (adapter_config.json naming modules the file has no tensors for) is refused by
``attach_lora``, from peft's missing keys.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from normscope.errors import CheckpointError
from normscope.load.formats import (
    FLOAT_DTYPES,
    LORA_SIDECAR,
    PEFT_CONFIG,
    WEIGHTS_INDEX,
    Checkpoint,
    _weight_map,
    read_header,
    read_json,
)

METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights: the LoraConfig as JSON in the header
# A LoRA's down-projection and the up-projection it needs, in each key scheme normscope reads.
LORA_PAIRS = {"lora_A": "lora_B", "lora_down": "lora_up", "lora_embedding_A": "lora_embedding_B"}
_SECOND_HALF = {second: first for first, second in LORA_PAIRS.items()}
# ``<module>.<half>[.<adapter>]`` once ``.weight`` is removed (peft-wrapped state dicts name the adapter)
_LORA_TENSOR = re.compile(r"^(?P<module>.+?)\.(?P<half>lora_embedding_[AB]|lora_[AB]|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?$")
ALPHA_KEYS = ("lora_alpha", "alpha", "network_alpha")
RANK_KEYS = ("lora_rank", "rank", "r")


def check_checkpoint(ckpt: Checkpoint, role: str) -> None:
    """Refuse ``ckpt`` if its files, dtypes, LoRA halves or configs are broken (headers and JSON only)."""
    for part in ckpt.parts or (ckpt,):
        weights = tuple(f for f in part.files if f.suffix != ".json")
        for folder in {f.parent for f in weights}:
            check_shard_index(folder, role)
        header = read_header(weights, role)
        check_dtypes(header, role, lora=part.is_lora)
        if part.is_lora:
            check_lora_halves(header, role, part.path)
            check_lora_configs(part, header, role)


# ---------------------------------------------------------------- files and dtypes


def check_shard_index(folder: Path, role: str) -> None:
    """Every tensor the index names must be in the shard it names: else diffusers would leave it at random init."""
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        return
    weight_map = _weight_map(index, role)
    for shard in sorted(set(weight_map.values())):
        stored = {entry[1] for entry in read_header((folder / shard,), role).values()}
        absent = sorted(key for key, name in weight_map.items() if name == shard and key not in stored)
        if absent:
            more = f" (+{len(absent) - 1} more)" if len(absent) > 1 else ""
            raise CheckpointError(
                f"{role} {index} puts {absent[0]}{more} in {shard}, which does not hold it: the index and the shards "
                "come from different saves — copy the folder again from one save_pretrained"
            )


def check_dtypes(header: dict, role: str, lora: bool) -> None:
    """Refuse weights that are not floating point (int8, uint8, bool, float8 ...): their scale is unknown here.

    float8 is refused too: whether a per-tensor scale applies (and where it is kept) is a convention of the tool
    that wrote the file, and even unscaled, float8's 3-bit mantissa would be measured as the tuning's effect.
    Integer buffers of a full state dict (not ``.weight``/``.bias``) are left to the load, which compares them
    with the module's own dtype; a kohya LoRA's scalar ``.alpha`` may be an integer.
    """
    for key, (path, stored, _, dtype) in sorted(header.items()):
        if dtype in FLOAT_DTYPES or key.endswith(".alpha"):
            continue
        if not lora and key.rsplit(".", 1)[-1] not in ("weight", "bias"):
            continue
        raise CheckpointError(
            f"{role} {path}: tensor {stored} is stored as {dtype}, not floating point — normscope cannot know its "
            "quantisation scale, and a plain cast would measure other weights: dequantise it to bfloat16 or float32 "
            "with the tool that quantised it and pass that file"
        )


# ---------------------------------------------------------------- LoRA halves


def lora_halves(header: dict) -> dict[tuple[str, str | None, str], dict[str, tuple[int, ...]]]:
    """(module, adapter, down-projection name) -> {half: shape} for every LoRA weight in ``header``."""
    halves: dict[tuple[str, str | None, str], dict[str, tuple[int, ...]]] = {}
    for key, entry in header.items():
        match = _LORA_TENSOR.match(key.removesuffix(".weight"))
        if key.endswith(".bias") or not match:
            continue
        half = match["half"]
        first = half if half in LORA_PAIRS else _SECOND_HALF[half]
        halves.setdefault((match["module"], match["adapter"], first), {})[half] = entry[2]
    return halves


def tensor_ranks(header: dict) -> dict[str, int]:
    """module -> rank (the down-projection's first dimension)."""
    return {module: found[first][0] for (module, _, first), found in lora_halves(header).items()
            if first in found and len(found[first]) >= 1}


def check_lora_halves(header: dict, role: str, where: Path) -> None:
    """Every lora_A needs its lora_B (lora_down its lora_up) and the other way round, with the same rank."""
    lone: dict[tuple[str, str], list[str]] = {}
    ranks = []
    for (module, _, first), found in sorted(lora_halves(header).items(), key=lambda item: item[0][0]):
        second = LORA_PAIRS[first]
        if first not in found or second not in found:
            have, lacks = (second, first) if first not in found else (first, second)
            lone.setdefault((have, lacks), []).append(module)
            continue
        down, up = found[first], found[second]
        if len(down) >= 2 and len(up) >= 2 and down[0] != up[1]:
            ranks.append(f"{module} {first} rank {down[0]} vs {second} rank {up[1]}")
    if lone:
        (have, lacks), modules = next(iter(sorted(lone.items())))
        raise CheckpointError(
            f"{role} LoRA {where} has {len(modules)} {have} without its {lacks} ({_first(modules)}): tensors were lost "
            "(a filtered state dict or a save cut short) and peft would start them at random — re-save the adapter "
            "from the trainer's checkpoint"
        )
    if ranks:
        raise CheckpointError(
            f"{role} LoRA {where} has {len(ranks)} LoRA pairs whose ranks differ ({_first(ranks, 1)}): its halves come "
            "from different adapters — re-save the adapter from the trainer's checkpoint"
        )


def _first(items, count: int = 3) -> str:
    items = sorted(items)
    more = f" (+{len(items) - count} more)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


# ---------------------------------------------------------------- LoRA configs


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def alpha_value(value, where, role: str) -> float | None:
    """A LoRA alpha from a config: None stays None (absent, said in a note later); anything but a number is refused."""
    if value is None:
        return None
    number = _number(value)
    if number is None or not math.isfinite(number):
        raise CheckpointError(
            f"{role} {where}: alpha {value!r} is not a number — write the lora_alpha the LoRA was trained with, "
            "or remove it (then scale 1.0 is assumed and said)"
        )
    return number


def rank_value(value, where, role: str) -> int | None:
    """A LoRA rank from a config: None stays None; anything but a positive integer is refused."""
    if value is None:
        return None
    number = _number(value)
    if number is None or not math.isfinite(number) or number != int(number) or number < 1:
        raise CheckpointError(
            f"{role} {where}: rank {value!r} is not a positive integer — write the rank of the LoRA's tensors "
            "(lora_A's first dimension), or remove it"
        )
    return int(number)


def first_value(values: dict, keys: tuple[str, ...]):
    return next((values[k] for k in keys if values.get(k) is not None), None)


def header_metadata(path: Path, role: str) -> dict:
    """A safetensors file's header metadata (empty for pickles)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def metadata_values(metadata: dict, path: Path, role: str) -> dict:
    """The LoraConfig that diffusers keeps in the header metadata ``lora_adapter_metadata`` (empty if none)."""
    text = metadata.get(METADATA_KEY)
    if not text:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{role} {path}: header metadata {METADATA_KEY} is not valid JSON ({exc.msg}): re-save the LoRA with "
            "save_lora_weights, or drop the metadata and put the alpha in a lora_config.json beside it"
        ) from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{role} {path}: header metadata {METADATA_KEY} is not a JSON object: re-save the LoRA with save_lora_weights")
    return values


def sidecar_values(path: Path, role: str) -> dict:
    """A trainer's lora_config.json: DanceGRPO's flat form or Pref-GRPO's ``lora_params`` (empty if absent)."""
    if not path.is_file():
        return {}
    values = read_json(path, role, "fix or remove it")
    if not isinstance(values, dict):
        return {}
    nested = values.get("lora_params")
    return {**values, **nested} if isinstance(nested, dict) else values


def adapter_config_values(path: Path, role: str) -> dict | None:
    """adapter_config.json (peft), refused unless it is a JSON object; None if absent."""
    if not path.is_file():
        return None
    values = read_json(path, role, "re-save the adapter with PeftModel.save_pretrained")
    if not isinstance(values, dict):
        raise CheckpointError(f"{role} {path} is not a JSON object: re-save the adapter with PeftModel.save_pretrained")
    return values


def check_lora_configs(ckpt: Checkpoint, header: dict, role: str) -> None:
    """Rank and alpha wherever a LoRA form keeps them: numbers, and a rank that agrees with the tensors."""
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    weights = next((f for f in ckpt.files if f.suffix != ".json"), None)
    if weights is not None:
        _check_metadata(metadata_values(header_metadata(weights, role), weights, role), weights, role)
    config_path = folder / PEFT_CONFIG
    config = adapter_config_values(config_path, role)
    if config is not None:
        _check_adapter_config(config, config_path, tensor_ranks(header), role)
    if ckpt.path.is_file():
        sidecar = folder / LORA_SIDECAR
        values = sidecar_values(sidecar, role)
        alpha_value(first_value(values, ALPHA_KEYS), sidecar, role)
        rank_value(first_value(values, RANK_KEYS), sidecar, role)


def _check_metadata(values: dict, path: Path, role: str) -> None:
    where = f"{path} header metadata {METADATA_KEY}"
    for key, value in values.items():
        name = key.rsplit(".", 1)[-1]
        if name == "lora_alpha":
            alpha_value(value, where, role)
        elif name == "r":
            rank_value(value, where, role)


def _check_adapter_config(config: dict, path: Path, ranks: dict[str, int], role: str) -> None:
    r = rank_value(config.get("r"), path, role)
    alpha_value(config.get("lora_alpha"), path, role)
    for pattern in ("rank_pattern", "alpha_pattern"):
        values = config.get(pattern) or {}
        if not isinstance(values, dict):
            raise CheckpointError(f"{role} {path}: {pattern} is not a JSON object: re-save the adapter with PeftModel.save_pretrained")
        check = rank_value if pattern == "rank_pattern" else alpha_value
        for value in values.values():
            check(value, path, role)
    if r is None or config.get("rank_pattern"):
        return
    other = sorted({rank for rank in ranks.values() if rank != r})
    if other:
        module = next(m for m, rank in sorted(ranks.items()) if rank == other[0])
        raise CheckpointError(
            f"{role} {path} says r {r} but the weights have rank {other[0]} ({module}): the config belongs to another "
            f"adapter — put the matching {PEFT_CONFIG} next to the weights"
        )
