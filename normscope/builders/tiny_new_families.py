"""Tiny real pipelines of the models the trainers tune now (issue 19): Wan video-to-video, HunyuanVideo,
Qwen-Image-2.1 and LTX-2, offline and seeded, for the oracle tests of their family rows.

Each builder returns the real diffusers pipeline class with 1-2-layer models and seeded random weights, built
from configs with tokenizers made in memory (nothing is fetched from a hub). Save them with ``tiny.save_tiny``.
``NEW_BUILDERS`` maps a key (the pipeline class name) to its builder, ``NEW_CALL`` gives call arguments that run
each one in about a second with guidance really on, and ``NEW_OUTPUT_PROJECTION`` names each transformer's final
output projection (tests scale it by 1.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from normscope.builders.tiny_video import NUM_FRAMES, SIZE, _t5_tokenizer, _transformer, _umt5_encoder, _wan_vae, scheduler

NEW_OUTPUT_PROJECTION: dict[str, tuple[str, ...]] = {
    "WanTransformer3DModel": ("proj_out.weight", "proj_out.bias"),
}


# ---------------------------------------------------------------- Wan video to video


def tiny_input_video(seed: int = 0, frames: int = NUM_FRAMES, size: int = SIZE) -> list:
    """A seeded random-walk video of ``frames`` RGB ``PIL.Image`` frames (the input of video-to-video)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    first = rng.integers(0, 256, size=(size, size, 3)).astype(np.int64)
    out = []
    for _ in range(frames):
        out.append(Image.fromarray(first.clip(0, 255).astype(np.uint8), mode="RGB"))
        first = first + rng.integers(-24, 25, size=first.shape)
    return out


def save_input_video(frames: list, path: str | Path) -> Path:
    """Write frames as a folder of PNGs (``frame_000.png``, ...) or, for a ``.gif``/``.webp`` path, one animated
    file (lossless WebP keeps every pixel)."""
    path = Path(path)
    if path.suffix.lower() in (".gif", ".webp"):
        options = {"lossless": True} if path.suffix.lower() == ".webp" else {}
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
        return path
    path.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        frame.save(path / f"frame_{i:03d}.png")
    return path


def tiny_wan_v2v_pipeline(seed: int = 0, sampler: str = "unipc"):
    """A ``WanVideoToVideoPipeline`` on the tiny Wan2.1 components (UniPC flow solver as the Wan repos ship)."""
    from diffusers import WanVideoToVideoPipeline

    return WanVideoToVideoPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_umt5_encoder(seed + 1),
        vae=_wan_vae(seed + 2),
        scheduler=scheduler(sampler),
        transformer=_transformer(seed),
    )


NEW_BUILDERS = {
    "WanVideoToVideoPipeline": tiny_wan_v2v_pipeline,
}

# Beyond prompt, generator, num_inference_steps and output_type. Wan V2V: strength 0.75 of 4 steps runs 3.
NEW_CALL: dict[str, dict] = {
    "WanVideoToVideoPipeline": dict(guidance_scale=4.0, height=SIZE, width=SIZE, max_sequence_length=16, strength=0.75),
}
