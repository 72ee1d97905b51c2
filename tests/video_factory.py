"""Tiny Wan pipelines on disk and the checkpoints the video trainers write for them (Flow-Factory, Pref-GRPO)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from normscope.builders.tiny_video import NUM_FRAMES, SIZE, save_tiny_video, tiny_wan_pipeline

# Wan 2.1 (one transformer) and Wan 2.2 A14B (two experts), each with both schedulers.
VIDEO_ARCHS = ("wan21-euler", "wan21-unipc", "wan22-euler", "wan22-unipc")
VIDEO_PROBE = dict(steps=4, height=SIZE, width=SIZE, num_frames=NUM_FRAMES, guidance=4.0, max_sequence_length=16)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]
RANK, ALPHA = 4, 8


def build_pipeline(arch: str, folder: Path) -> Path:
    version, sampler = arch.split("-")
    return save_tiny_video(tiny_wan_pipeline(seed=0, sampler=sampler, two_experts=version == "wan22"), folder)


def expert_state(pipe_dir: Path, expert: str = "transformer") -> dict:
    return load_file(str(pipe_dir / expert / "diffusion_pytorch_model.safetensors"))


def scaled(state: dict, factor: float) -> dict:
    return {k: (v * factor if k.startswith("proj_out.") else v).contiguous() for k, v in state.items()}


def flow_factory_checkpoint(pipe_dir: Path, folder: Path, factors: dict[str, float]) -> Path:
    """``checkpoint-N/<expert>/`` full transformer folders (config.json + safetensors), one per trained expert."""
    for expert, factor in factors.items():
        target = folder / expert
        target.mkdir(parents=True)
        (target / "config.json").write_text((pipe_dir / expert / "config.json").read_text())
        save_file(scaled(expert_state(pipe_dir, expert), factor), str(target / "diffusion_pytorch_model.safetensors"))
    return folder


def random_lora(module, seed: int) -> dict:
    """Seeded LoRA weights (module-relative peft keys) for ``module``'s LORA_TARGETS."""
    generator = torch.Generator().manual_seed(seed)
    named = dict(module.named_modules())
    state = {}
    for name in sorted(named):
        layer = named[name]
        if isinstance(layer, torch.nn.Linear) and (name.split(".")[-1] in LORA_TARGETS or name.endswith("to_out.0")):
            state[f"{name}.lora_A.weight"] = 0.2 * torch.randn(RANK, layer.in_features, generator=generator)
            state[f"{name}.lora_B.weight"] = 0.2 * torch.randn(layer.out_features, RANK, generator=generator)
    return state


def save_two_expert_lora(pipe, path: Path, seed: int = 7, experts=("transformer", "transformer_2")) -> tuple[Path, dict]:
    """A diffusers-format LoRA file with ``transformer.`` and ``transformer_2.`` keys and alpha in its header."""
    layers = {e: random_lora(getattr(pipe, e), seed + i) for i, e in enumerate(experts)}
    flat = {f"{e}.{k}": v.contiguous() for e, state in layers.items() for k, v in state.items()}
    meta = {f"{e}.{key}": value for e in experts for key, value in (("r", RANK), ("lora_alpha", ALPHA))}
    save_file(flat, str(path), metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    return path, layers


def fuse(state: dict, lora: dict) -> dict:
    """W + (alpha / r) B A by hand: the tuned weights a LoRA stands for, independent of peft and normscope."""
    fused = dict(state)
    for key in lora:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            delta = (ALPHA / RANK) * lora[f"{module}.lora_B.weight"] @ lora[key]
            fused[f"{module}.weight"] = (state[f"{module}.weight"] + delta).contiguous()
    return fused


# The other Wan layouts: TI2V-5B text-to-video (per-token timesteps), and image to video (2.1 with CLIP image
# embeddings, 2.2 A14B with two experts, TI2V-5B's image mode).
MORE_VIDEO = {
    "ti2v": dict(builder="t2v", expand_timesteps=True),
    "i2v21": dict(builder="i2v"),
    "i2v22": dict(builder="i2v", two_experts=True),
    "ti2v-image": dict(builder="i2v", expand_timesteps=True),
}


def build_more(name: str, folder: Path) -> Path:
    from normscope.builders.tiny_video import tiny_wan_i2v_pipeline

    options = dict(MORE_VIDEO[name])
    builder = tiny_wan_pipeline if options.pop("builder") == "t2v" else tiny_wan_i2v_pipeline
    return save_tiny_video(builder(seed=0, sampler="unipc", **options), folder)


def first_frame(path: Path) -> Path:
    """A 16x16 conditioning image with some structure (a gradient and a square)."""
    from PIL import Image, ImageDraw

    image = Image.linear_gradient("L").resize((SIZE, SIZE)).convert("RGB")
    ImageDraw.Draw(image).rectangle((4, 4, 10, 10), fill=(220, 40, 40))
    image.save(path)
    return path
