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
    "HunyuanVideoTransformer3DModel": ("proj_out.weight", "proj_out.bias"),
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


# ---------------------------------------------------------------- HunyuanVideo

HUNYUAN_TEXT_WIDTH = 32
HUNYUAN_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def hunyuan_tokenizer():
    """The tiny byte-level BPE (``Qwen2Tokenizer`` class, trained here) standing in for HunyuanVideo's Llama-3
    tokenizer: Llama-3's header tokens, a ``<|begin_of_text|>`` BOS and every word of the pipeline's prompt
    template as one token, so the template's prefix before the user prompt encodes to 96 tokens against the
    real tokenizer's 95 (``crop_start``): the cropped embeddings keep the template's last token ("\n\n").
    The Qwen2 class rather than ``LlamaTokenizerFast``: transformers 5 reloads a Llama tokenizer in another
    format (the ids change between save and load)."""
    import re

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import AddedToken

    from normscope.builders.tiny_families import _PROMPT_WORDS, qwen_tokenizer

    template = re.sub(r"<\|[a-z_]+\|>", " ", DEFAULT_PROMPT_TEMPLATE["template"])
    words = sorted(set(re.findall(r"[A-Za-z]+", template)))
    tokenizer = qwen_tokenizer(" ".join(words) + " " + _PROMPT_WORDS)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in HUNYUAN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken("\n\n", special=False, normalized=False)])
    tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.add_bos_token = True
    tokenizer.update_post_processor()
    return tokenizer


def _llama_encoder(seed: int, tokenizer):
    """A tiny ``LlamaModel`` (3 layers: the pipeline reads the third hidden state from the end)."""
    from transformers import LlamaConfig, LlamaModel

    from normscope.builders.tiny_families import QWEN_VOCAB

    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=QWEN_VOCAB + 16, hidden_size=HUNYUAN_TEXT_WIDTH, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>"), pad_token_id=ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    return LlamaModel(config).eval()


def tiny_hunyuan_video_pipeline(seed: int = 0):
    """A ``HunyuanVideoPipeline`` (DanceGRPO's video model): tiny guidance-distilled
    ``HunyuanVideoTransformer3DModel`` (the guidance scale is a transformer input), Llama and CLIP text encoders,
    a 4-channel ``AutoencoderKLHunyuanVideo`` with HunyuanVideo's 8x spatial, 4x temporal compression."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    from normscope.builders.tiny import _clip_encoder, _clip_tokenizer

    tokenizer = hunyuan_tokenizer()
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=HUNYUAN_TEXT_WIDTH,
        pooled_projection_dim=HUNYUAN_TEXT_WIDTH, rope_axes_dim=(2, 2, 4),
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
        mid_block_add_attention=False,
    ).eval()
    return HunyuanVideoPipeline(
        text_encoder=_llama_encoder(seed + 1, tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_encoder(seed + 3, False),
        tokenizer_2=_clip_tokenizer(),
    )


NEW_BUILDERS = {
    "WanVideoToVideoPipeline": tiny_wan_v2v_pipeline,
    "HunyuanVideoPipeline": tiny_hunyuan_video_pipeline,
}

# Beyond prompt, generator, num_inference_steps and output_type. Wan V2V: strength 0.75 of 4 steps runs 3.
NEW_CALL: dict[str, dict] = {
    "WanVideoToVideoPipeline": dict(guidance_scale=4.0, height=SIZE, width=SIZE, max_sequence_length=16, strength=0.75),
    # embedded guidance 6 (a transformer input) and true CFG 4 with a negative prompt: two calls per step
    "HunyuanVideoPipeline": dict(guidance_scale=6.0, true_cfg_scale=4.0, negative_prompt=" ", height=SIZE, width=SIZE,
                                 num_frames=NUM_FRAMES, max_sequence_length=16),
}
