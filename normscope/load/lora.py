"""Any LoRA form -> one peft adapter attached to the pipeline's own transformer.

The forms differ only in key names and in where rank and alpha live:

* peft folder: ``base_model.model.<module>.lora_A.weight``; rank, alpha and patterns in adapter_config.json;
* diffusers file: ``transformer.<module>.lora_A.weight``; alpha in the safetensors header metadata
  ``lora_adapter_metadata`` (newer diffusers), or in a DanceGRPO ``lora_config.json`` sidecar;
* kohya / BFL FLUX: converted by the pipeline class's own ``lora_state_dict`` (diffusers folds alpha in).

Without any alpha information the LoRA runs at scale 1.0 (alpha = rank), and a note says so: a DanceGRPO
LoRA without its sidecar would otherwise silently run at half its trained strength.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field

from normscope.errors import CheckpointError
from normscope.load.formats import EXPERT_ATTRS, LORA_SIDECAR, Checkpoint, read_tensors

ADAPTER_NAME = "normscope_tuned"
METADATA_KEY = "lora_adapter_metadata"


@dataclass
class LoraWeights:
    """Module-relative peft keys (``<module>.lora_A.weight``) and the LoraConfig that goes with them."""

    state_dict: dict
    config: dict
    notes: list[str] = field(default_factory=list)
    alpha_known: bool = True

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


def _alpha_from_metadata(metadata: dict, expert: str = "transformer") -> float | None:
    text = metadata.get(METADATA_KEY)
    if not text:
        return None
    values = json.loads(text)
    for key in (f"{expert}.lora_alpha", "transformer.lora_alpha", "lora_alpha"):
        if values.get(key) is not None:
            return float(values[key])
    return None


def _alpha_from_sidecar(ckpt: Checkpoint) -> float | None:
    sidecar = ckpt.path.parent / LORA_SIDECAR
    if not sidecar.is_file():
        return None
    values = json.loads(sidecar.read_text())
    for key in ("lora_alpha", "alpha", "network_alpha"):
        if values.get(key) is not None:
            return float(values[key])
    return None


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
    state, metadata = read_tensors(weights_file, role)
    notes: list[str] = []
    if ckpt.kind == "peft":
        state = _strip(state, "base_model.model.")
        config_file = ckpt.path / "adapter_config.json" if ckpt.path.is_dir() else None
        if config_file is not None and config_file.is_file():
            raw = json.loads(config_file.read_text())
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
        alpha = _alpha_from_metadata(metadata, expert)
        source = "header metadata"
        if alpha is None:
            alpha, source = _alpha_from_sidecar(ckpt), LORA_SIDECAR
        config, known = _config_from_weights(state, alpha)
        if known:
            where = f" ({expert})" if expert != EXPERT_ATTRS[0] else ""
            notes.append(f"{role} LoRA{where} alpha {alpha:g} from {source}")
    if not known:
        notes.append(
            f"{role} LoRA {weights_file} carries no alpha (no header metadata, no {LORA_SIDECAR}): scale 1.0 assumed "
            f"(alpha = rank {config['r']}); if it was trained with another alpha the numbers are off"
        )
    return LoraWeights(state, config, notes, known)


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


def attach_lora(module, weights: LoraWeights, adapter_name: str = ADAPTER_NAME) -> list:
    """Inject the adapter into ``module`` (peft) and load its weights; returns the adapter layers."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = LoraConfig(**weights.config)
    inject_adapter_in_model(config, module, adapter_name=adapter_name)
    result = set_peft_model_state_dict(module, weights.state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise CheckpointError(f"the LoRA has weights peft could not place ({', '.join(unexpected[:3])}): its adapter config does not match its weights")
    module.eval()
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
