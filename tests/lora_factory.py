"""Every checkpoint format the trainers write, produced with the real savers on the tiny pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from normscope.builders.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
RANK, ALPHA = 4, 8  # scale 2: a LoRA read without its alpha would run at half strength


def lora_config(rank=RANK, alpha=ALPHA, targets=SD3_TARGETS):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")


def randomize_lora(module, seed: int, adapter: str = "default", scale: float = 0.08) -> None:
    """peft initialises lora_B to zero (a no-op adapter); give it seeded weights so the LoRA does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if "lora_" in name and f".{adapter}." in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def sd3_with_lora(seed: int = 11, adapter_name: str = "default"):
    pipe = tiny_sd3_pipeline(seed=0)
    pipe.transformer.add_adapter(lora_config(), adapter_name=adapter_name)
    randomize_lora(pipe.transformer, seed, adapter_name)
    return pipe


def save_diffusers_lora(folder: Path, with_metadata: bool, seed: int = 11) -> Path:
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    pipe = sd3_with_lora(seed)
    layers = get_peft_model_state_dict(pipe.transformer)
    kwargs = {"transformer_lora_adapter_metadata": lora_config().to_dict()} if with_metadata else {}
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def save_peft_folder(folder: Path, extra: str | None = "old", seed: int = 11) -> Path:
    """peft's save_pretrained: the default adapter at the root, an extra named adapter in a subfolder."""
    from peft import get_peft_model

    model = get_peft_model(tiny_sd3_pipeline(seed=0).transformer, lora_config())
    randomize_lora(model, seed)
    if extra:
        model.add_adapter(extra, lora_config())
        randomize_lora(model, seed + 100, extra)
    model.save_pretrained(str(folder))
    return folder


def save_training_checkpoint(folder: Path) -> Path:
    """AWM's layout: checkpoint-N/lora_ema/ and lora_non_ema/, each with an extra ema/ adapter, plus optimizer files."""
    save_peft_folder(folder / "lora_ema", extra="ema", seed=21)
    save_peft_folder(folder / "lora_non_ema", extra="ema", seed=22)
    torch.save({"step": 100}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    return folder


def fused_state_dict(pipe_dir: Path, lora_dir_or_file: Path) -> dict:
    """The LoRA fused into full weights with peft's own merge: the reference for the one-module path."""
    from peft import PeftModel

    from normscope.builders.tiny import tiny_sd3_pipeline as _

    del _
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(str(pipe_dir / "transformer")).eval()
    merged = PeftModel.from_pretrained(transformer, str(lora_dir_or_file)).merge_and_unload()
    return {k: v.contiguous() for k, v in merged.state_dict().items()}


def kohya_flux_lora(path: Path, seed: int = 5, rank: int = 2, alpha: float = 1.0) -> Path:
    """A kohya/BFL FLUX LoRA written to diffusers' documented key scheme (lora_unet_<bfl module>)."""
    from safetensors.torch import save_file

    transformer = tiny_flux_pipeline(seed=0).transformer
    generator = torch.Generator().manual_seed(seed)
    modules = {
        "lora_unet_double_blocks_0_img_attn_proj": transformer.transformer_blocks[0].attn.to_out[0],
        "lora_unet_double_blocks_0_txt_attn_proj": transformer.transformer_blocks[0].attn.to_add_out,
        "lora_unet_single_blocks_0_linear2": transformer.single_transformer_blocks[0].proj_out,
    }
    state = {}
    for prefix, linear in modules.items():
        state[f"{prefix}.lora_down.weight"] = 0.2 * torch.randn(rank, linear.in_features, generator=generator)
        state[f"{prefix}.lora_up.weight"] = 0.2 * torch.randn(linear.out_features, rank, generator=generator)
        state[f"{prefix}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return path
