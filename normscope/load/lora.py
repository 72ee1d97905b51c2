"""Any LoRA form -> one peft adapter attached to the pipeline's own transformer.

The forms differ only in key names and in where rank and alpha live:

* peft folder: ``base_model.model.<module>.lora_A.weight``; rank, alpha and patterns in adapter_config.json;
* diffusers file: ``transformer.<module>.lora_A.weight``; alpha in the safetensors header metadata
  ``lora_adapter_metadata`` (newer diffusers), or in a DanceGRPO ``lora_config.json`` sidecar;
* kohya / BFL FLUX: converted by the pipeline class's own ``lora_state_dict`` (diffusers folds alpha in);
* bare peft weights without adapter_config.json (Pref-GRPO ``adapter_model.safetensors``): rank and alpha
  from its ``lora_config.json`` (``{"lora_params": {"lora_rank", "lora_alpha", ...}}``);
* the whole peft-wrapped model (flow_grpo's FSDP ``model.safetensors``): ``<module>.lora_A.<adapter>.weight``
  next to ``<module>.base_layer.weight`` and every frozen weight. The frozen weights are kept
  (``LoraWeights.base_state``) so that ``check_base_weights`` can prove the LoRA was trained on the
  pipeline's own transformer.

Without any alpha information the LoRA runs at scale 1.0 (alpha = rank), and a note says so: a DanceGRPO
LoRA without its sidecar would otherwise silently run at half its trained strength.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from normscope.errors import CheckpointError
from normscope.load.formats import EXPERT_ATTRS, LORA_SIDECAR, PEFT_CONFIG, Checkpoint, read_tensors, strip_prefixes
from normscope.load.integrity import (
    ALPHA_KEYS,
    METADATA_KEY,
    RANK_KEYS,
    adapter_config_values,
    alpha_value,
    first_value,
    header_metadata,
    metadata_values,
    rank_value,
    sidecar_values,
)

ADAPTER_NAME = "normscope_tuned"


@dataclass
class LoraWeights:
    """Module-relative peft keys (``<module>.lora_A.weight``) and the LoraConfig that goes with them."""

    state_dict: dict
    config: dict
    notes: list[str] = field(default_factory=list)
    alpha_known: bool = True
    # Where the frozen weights stored with the LoRA are (peft-wrapped state dicts only): the file and, for each
    # bare module key, the key as stored. Read one tensor at a time when checked, never all at once.
    base_file: Path | None = None
    base_keys: dict[str, str] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted({k.split(".lora_")[0] for k in self.state_dict if ".lora_" in k})

    @property
    def ranks(self) -> dict[str, int]:
        return {k.split(".lora_A")[0]: int(v.shape[0]) for k, v in self.state_dict.items() if ".lora_A." in k}


def _lora_config_fields() -> set[str]:
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig) if f.init}


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _config_from_weights(state: dict, alpha: float | None) -> tuple[dict, bool]:
    """r (most common rank, with a rank_pattern for the rest), alpha, and exact target modules."""
    ranks = {k.split(".lora_A")[0]: int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if not ranks:
        raise CheckpointError("the LoRA holds no lora_A weights")
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {f"^{re.escape(m)}$": rank for m, rank in ranks.items() if rank != r}
    known = alpha is not None
    lora_alpha = float(alpha) if known else float(r)
    alpha_pattern = {}
    if not known and rank_pattern:
        alpha_pattern = {pattern: float(rank) for pattern, rank in rank_pattern.items()}
    target = "^(" + "|".join(re.escape(m) for m in sorted(ranks)) + ")$"
    config = {"r": r, "lora_alpha": lora_alpha, "target_modules": target, "rank_pattern": rank_pattern,
              "alpha_pattern": alpha_pattern, "init_lora_weights": False}
    return config, known


def _alpha_from_metadata(metadata: dict, path: Path, role: str, expert: str = "transformer") -> float | None:
    values = metadata_values(metadata, path, role)
    value = first_value(values, (f"{expert}.lora_alpha", "transformer.lora_alpha", "lora_alpha"))
    return alpha_value(value, f"{path} header metadata {METADATA_KEY}", role)


def _sidecar_values(ckpt: Checkpoint, role: str) -> dict:
    """A trainer's lora_config.json next to the weights: DanceGRPO's flat form or Pref-GRPO's ``lora_params``."""
    return sidecar_values(ckpt.path.parent / LORA_SIDECAR, role)


def _alpha_from_sidecar(ckpt: Checkpoint, role: str) -> float | None:
    return alpha_value(first_value(_sidecar_values(ckpt, role), ALPHA_KEYS), ckpt.path.parent / LORA_SIDECAR, role)


def _check_sidecar_rank(ckpt: Checkpoint, config: dict, role: str) -> None:
    """A sidecar rank that disagrees with the tensors means the sidecar belongs to another LoRA: refuse."""
    rank = rank_value(first_value(_sidecar_values(ckpt, role), RANK_KEYS), ckpt.path.parent / LORA_SIDECAR, role)
    if rank is not None and not config.get("rank_pattern") and int(rank) != config["r"]:
        raise CheckpointError(
            f"{role} {ckpt.path.parent / LORA_SIDECAR} says rank {int(rank)} but the weights in {ckpt.path.name} have "
            f"rank {config['r']}: the config belongs to another LoRA — put the matching {LORA_SIDECAR} next to it"
        )


def _adapter_config_next_to(ckpt: Checkpoint, role: str) -> dict | None:
    """An adapter_config.json beside a single weights file (some trainers copy it there): its LoraConfig fields."""
    path = (ckpt.path if ckpt.path.is_dir() else ckpt.path.parent) / PEFT_CONFIG
    raw = adapter_config_values(path, role)
    if raw is None:
        return None
    allowed = _lora_config_fields()
    return {k: v for k, v in raw.items() if k in allowed}


_WRAPPED_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")


def _bare_key(stored: str) -> str:
    return _strip({strip_prefixes(stored): None}, "base_model.model.").popitem()[0]


def _split_wrapped(path: Path, role: str) -> tuple[dict, dict, str, list[str]]:
    """A peft-wrapped model's state dict -> (LoRA weights, frozen keys {bare name: stored key}, adapter, notes).

    Only the LoRA tensors are read: the frozen weights are the whole model (tens of GB for Qwen-Image).
    """
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            stored_keys = list(handle.keys())
            lora_keys = [k for k in stored_keys if _WRAPPED_LORA.match(_bare_key(k))]
            state = {_bare_key(k): handle.get_tensor(k) for k in lora_keys}
    else:
        everything = read_tensors(path, role)[0]
        stored_keys = list(everything)
        state = {_bare_key(k): v for k, v in everything.items() if _WRAPPED_LORA.match(_bare_key(k))}
    if any(".lora_magnitude_vector." in k or ".lora_embedding_" in k for k in map(_bare_key, stored_keys)):
        raise CheckpointError(
            f"{role} {path} holds DoRA or embedding LoRA weights, which normscope does not read from a wrapped "
            "model state dict: save the adapter with PeftModel.save_pretrained and pass that folder"
        )
    by_adapter: dict[str, dict] = {}
    for key, tensor in state.items():
        match = _WRAPPED_LORA.match(key)
        by_adapter.setdefault(match["adapter"], {})[f"{match['module']}.{match['part']}.weight"] = tensor
    frozen = {_bare_key(k).replace(".base_layer.", "."): k for k in stored_keys if not _WRAPPED_LORA.match(_bare_key(k))}
    notes: list[str] = []
    names = sorted(by_adapter)
    if len(names) == 1:
        adapter = names[0]
    elif "default" in names:
        adapter = "default"
        notes.append(f"{role} {path} holds adapters {', '.join(names)}: took 'default'")
    else:
        raise CheckpointError(
            f"{role} {path} holds several adapters ({', '.join(names)}) and none is 'default': save the one to "
            "measure with PeftModel.save_pretrained and pass that folder"
        )
    return by_adapter[adapter], frozen, adapter, notes


def _expert_keys(state: dict, expert: str) -> dict:
    """One expert's keys of a diffusers LoRA, its ``<expert>.`` prefix removed (unprefixed keys: all of them)."""
    prefixes = {k.split(".", 1)[0] for k in state}
    if not prefixes & set(EXPERT_ATTRS):
        return state
    prefix = f"{expert}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_lora(ckpt: Checkpoint, pipeline_class, role: str = "TUNED", expert: str = "transformer") -> LoraWeights:
    """The LoRA in ``ckpt`` for one expert (``transformer``, or Wan2.2's ``transformer_2``) as module-relative
    peft weights plus a LoraConfig dict."""
    ckpt = ckpt.part(expert) or ckpt
    weights_file = ckpt.files[0]
    notes: list[str] = []
    if ckpt.kind == "peft_wrapped":
        state, frozen, adapter, notes = _split_wrapped(weights_file, role)
        weights = _with_alpha(ckpt, state, header_metadata(weights_file, role), role, weights_file, notes,
                              what=f"peft-wrapped model state dict (adapter '{adapter}')")
        weights.base_file, weights.base_keys = weights_file, frozen
        return weights
    state, metadata = read_tensors(weights_file, role)
    if ckpt.kind == "peft" and not ckpt.path.is_dir():  # bare peft weights: no adapter_config.json beside them
        state = _strip(state, "base_model.model.")
        return _with_alpha(ckpt, state, metadata, role, weights_file, notes, what="peft weights")
    if ckpt.kind == "peft":
        state = _strip(state, "base_model.model.")
        config_file = ckpt.path / "adapter_config.json" if ckpt.path.is_dir() else None
        raw = adapter_config_values(config_file, role) if config_file is not None else None
        if raw is not None:
            allowed = _lora_config_fields()
            config = {k: v for k, v in raw.items() if k in allowed}
            config["init_lora_weights"] = False
            return LoraWeights(state, config, notes, True)
        config, known = _config_from_weights(state, None)
    elif ckpt.kind == "kohya":
        if pipeline_class is None or not hasattr(pipeline_class, "lora_state_dict"):
            raise CheckpointError(f"{role} {weights_file} is a kohya LoRA, which needs a pipeline class with lora_state_dict to convert it: pass --pipeline")
        try:
            converted = pipeline_class.lora_state_dict(state)
        except Exception as exc:
            raise CheckpointError(f"{role} {weights_file}: diffusers could not convert this kohya LoRA for {pipeline_class.__name__} ({str(exc)[:120]}): pass the --pipeline it was trained for") from None
        converted = converted[0] if isinstance(converted, tuple) else converted
        state = _strip(converted, "transformer.")
        if not any(".lora_A." in k for k in state):
            modules = sorted({k.split(".")[0] for k in read_tensors(weights_file, role)[0]})
            more = f" (+{len(modules) - 3} more)" if len(modules) > 3 else ""
            raise CheckpointError(
                f"{role} kohya LoRA {weights_file} does not fit {pipeline_class.__name__}: its modules "
                f"({', '.join(modules[:3])}{more}) have no counterpart there — pass the --pipeline it was trained for"
            )
        config, known = _config_from_weights(state, None)
        known = True  # diffusers folds kohya's alpha into the weights
    else:  # diffusers_lora
        state = _expert_keys(state, expert)
        what = "LoRA" if expert == EXPERT_ATTRS[0] else f"LoRA ({expert})"
        return _with_alpha(ckpt, state, metadata, role, weights_file, notes, what=what, expert=expert)
    if not known:
        notes.append(
            f"{role} LoRA {weights_file} carries no alpha (no header metadata, no {LORA_SIDECAR}): scale 1.0 assumed "
            f"(alpha = rank {config['r']}); if it was trained with another alpha the numbers are off"
        )
    return LoraWeights(state, config, notes, known)


def _with_alpha(ckpt: Checkpoint, state: dict, metadata: dict, role: str, weights_file, notes: list[str],
                what: str, expert: str = "transformer") -> LoraWeights:
    """Rank from the tensors; alpha from an adapter_config.json beside the file, the header metadata or a
    trainer's lora_config.json, in that order; else alpha = rank, said in a note."""
    beside = _adapter_config_next_to(ckpt, role)
    if beside is not None:
        config, _ = _config_from_weights(state, None)
        config.update({k: v for k, v in beside.items() if k != "target_modules"}, init_lora_weights=False)
        notes.append(f"{role} {what}: rank and alpha from {PEFT_CONFIG} beside it")
        return LoraWeights(state, config, notes, True)
    alpha, source = _alpha_from_metadata(metadata, weights_file, role, expert), "header metadata"
    if alpha is None:
        alpha, source = _alpha_from_sidecar(ckpt, role), LORA_SIDECAR
    config, known = _config_from_weights(state, alpha)
    _check_sidecar_rank(ckpt, config, role)
    if known:
        notes.append(f"{role} {what}: alpha {alpha:g} from {source}")
    else:
        notes.append(
            f"{role} {what} in {weights_file} carries no alpha (no {PEFT_CONFIG}, no header metadata, no "
            f"{LORA_SIDECAR}): scale 1.0 assumed (alpha = rank {config['r']}); if it was trained with another "
            "alpha the numbers are off"
        )
    return LoraWeights(state, config, notes, known)


def check_base_weights(module, weights: LoraWeights, role: str, where) -> None:
    """Refuse a LoRA stored with frozen weights that are not the pipeline's own (it was trained on another base).

    Compared in the coarser of the two dtypes, so a bf16 checkpoint of a float32 base still matches exactly.
    """
    import torch
    from safetensors import safe_open

    if weights.base_file is None:
        return
    own = module.state_dict()
    unknown = sorted(k for k in weights.base_keys if k not in own)
    differ = []
    with contextlib.ExitStack() as stack:
        if weights.base_file.suffix == ".safetensors":
            get = stack.enter_context(safe_open(str(weights.base_file), framework="pt")).get_tensor
        else:
            get = read_tensors(weights.base_file, role)[0].__getitem__
        for key, stored_key in weights.base_keys.items():
            if key not in own:
                continue
            stored, mine = get(stored_key), own[key].detach().to("cpu")
            if stored.shape != mine.shape:
                differ.append(key)
                continue
            if stored.element_size() == mine.element_size() and stored.dtype != mine.dtype:
                same = torch.allclose(stored.float(), mine.float(), rtol=1e-2, atol=1e-3)  # bf16 vs fp16
            else:
                coarse = stored.dtype if stored.element_size() < mine.element_size() else mine.dtype
                same = torch.equal(stored.to(coarse), mine.to(coarse))
            if not same:
                differ.append(key)
    if unknown or differ:
        what = []
        if differ:
            what.append(f"{len(differ)} of {len(weights.base_keys)} frozen weights differ ({', '.join(sorted(differ)[:2])})")
        if unknown:
            what.append(f"{len(unknown)} are not in the pipeline's {type(module).__name__} ({', '.join(unknown[:2])})")
        raise CheckpointError(
            f"{role} {where} was not trained on this pipeline's transformer: {'; '.join(what)} — pass the --pipeline "
            "it was trained from"
        )


def check_targets(module, weights: LoraWeights, role: str, where) -> None:
    """Refuse a LoRA whose modules or shapes the transformer does not have, naming them."""
    import torch

    named = dict(module.named_modules())
    missing = [m for m in weights.modules if m not in named]
    wrong = []
    for key, tensor in weights.state_dict.items():
        name = key.split(".lora_")[0]
        target = named.get(name)
        if not isinstance(target, torch.nn.Linear):
            continue
        if ".lora_A." in key and tensor.shape[1] != target.in_features:
            wrong.append(f"{name} in {tensor.shape[1]} vs {target.in_features}")
        if ".lora_B." in key and tensor.shape[0] != target.out_features:
            wrong.append(f"{name} out {tensor.shape[0]} vs {target.out_features}")
    if missing or wrong:
        detail = []
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            detail.append(f"{len(missing)} target modules it lacks ({', '.join(missing[:3])}{more})")
        if wrong:
            detail.append(f"{len(wrong)} shape mismatches ({', '.join(wrong[:2])})")
        raise CheckpointError(
            f"{role} LoRA {where} does not fit the pipeline's {type(module).__name__}: {'; '.join(detail)} — "
            "pass the --pipeline it was trained for"
        )


def attach_lora(module, weights: LoraWeights, adapter_name: str = ADAPTER_NAME, role: str = "TUNED", where="") -> list:
    """Inject the adapter into ``module`` (peft) and load its weights; returns the adapter layers."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = LoraConfig(**weights.config)
    inject_adapter_in_model(config, module, adapter_name=adapter_name)
    result = set_peft_model_state_dict(module, weights.state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise CheckpointError(f"the LoRA has weights peft could not place ({', '.join(unexpected[:3])}): its adapter config does not match its weights")
    # peft only warns about adapter weights the file lacks: they would stay at their random init
    missing = sorted(k for k in getattr(result, "missing_keys", []) if ".lora_" in k and f".{adapter_name}" in k)
    if missing:
        modules = sorted({k.split(".lora_")[0] for k in missing})
        more = f" (+{len(modules) - 3} more)" if len(modules) > 3 else ""
        raise CheckpointError(
            f"{role} LoRA {where}: its config targets {len(modules)} modules the weights have no tensors for "
            f"({', '.join(modules[:3])}{more}), which would be left at their random init — put the adapter_config.json "
            "saved with these weights next to them"
        )
    module.eval()
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def detach_lora(module, adapter_name: str = ADAPTER_NAME) -> None:
    """Remove the adapter and peft's wrappers: ``module`` is again the plain transformer it was before.

    A sweep swaps one LoRA checkpoint for the next on the same transformer: without this, each checkpoint
    would need a freshly loaded pipeline.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:  # the wrapper goes, and its adapter weights with it
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    config = getattr(module, "peft_config", None)
    if isinstance(config, dict):
        config.pop(adapter_name, None)
        if not config:
            del module.peft_config
