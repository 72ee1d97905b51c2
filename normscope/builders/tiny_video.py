"""Tiny real Wan video pipelines (2.1 T2V, 2.2 A14B two experts, 2.2 TI2V-5B), offline, seeded.

The same diffusers classes a user runs on Wan2.1-T2V-1.3B or Wan2.2-A14B, shrunk to one transformer layer
and a three-channel VAE so that a call at 16x16 px, 5 frames (2 latent frames) and 2-4 steps takes well under
a second on a CPU. Each comes with FlowMatchEuler or with the UniPC multistep solver in flow mode that the Wan
model repos ship (``scheduler_config.json``: ``flow_prediction``, ``use_flow_sigmas``, ``flow_shift`` 3.0).

Image to video (``WanImageToVideoPipeline``) is built too: Wan2.1 I2V with a tiny ``CLIPVisionModel`` and a
locally constructed ``CLIPImageProcessor``, Wan2.2 I2V-A14B (two experts) and TI2V-5B's image mode; running them
needs a conditioning image (``--image``) and the ``ftfy`` package (diffusers' I2V pipeline imports it).

TI2V-5B's own VAE (48 latent channels, 16x spatial compression) is not reproduced: the tiny TI2V pipelines use
the 16-channel Wan2.1 VAE, which changes nothing that normscope sees (``expand_timesteps`` gives every latent
token its own timestep; the first frame's tokens get 0 in image mode).
"""

from __future__ import annotations

from pathlib import Path

import torch

from normscope.builders.tiny import _t5_tokenizer, save_tiny

TEXT_WIDTH = 32
NUM_FRAMES = 5  # (5 - 1) / 4 + 1 = 2 latent frames
SIZE = 16  # px; the VAE divides by 8, so latents are (B, 16, 2, 2, 2)
# Wan2.2-A14B switches experts at boundary_ratio * 1000 (0.875 for T2V, 0.9 for I2V): `transformer` while
# t >= boundary. With 4 steps the tiny pipelines' timesteps are [999, 900, 750, 500] (UniPC, flow_shift 3) and
# [1000, 858, 602, 9] (Euler): 0.9 gives the high-noise expert 2 resp. 1 steps and the low-noise one the rest.
TINY_BOUNDARY_RATIO = 0.9
TINY_WAN = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=16,
    out_channels=16,
    text_dim=TEXT_WIDTH,
    freq_dim=32,
    ffn_dim=32,
    num_layers=1,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
SCHEDULERS = ("euler", "unipc")


def scheduler(kind: str, flow_shift: float = 3.0):
    """FlowMatchEuler, or the UniPC multistep solver in flow mode as the Wan repos configure it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    if kind == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000,
        )
    raise ValueError(f"scheduler {kind!r} is not one of {SCHEDULERS}")


def _umt5_encoder(seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=1000, d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def _wan_vae(seed: int, z_dim: int = 16, **extra):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim, **extra,
    ).eval()


def _transformer(seed: int, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_WAN, **overrides}).eval()


def tiny_wan_pipeline(seed: int = 0, sampler: str = "unipc", two_experts: bool = False, expand_timesteps: bool = False,
                      boundary_ratio: float = TINY_BOUNDARY_RATIO):
    """A ``WanPipeline``: Wan2.1 T2V, or with ``two_experts`` Wan2.2-A14B (``transformer`` for high noise,
    ``transformer_2`` for low noise, switching at ``boundary_ratio``), or with ``expand_timesteps`` the
    Wan2.2 TI2V-5B layout (one timestep per latent token)."""
    from diffusers import WanPipeline

    return WanPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_umt5_encoder(seed + 1),
        vae=_wan_vae(seed + 2),
        scheduler=scheduler(sampler),
        transformer=_transformer(seed),
        transformer_2=_transformer(seed + 5) if two_experts else None,
        boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=expand_timesteps,
    )


def tiny_wan_i2v_pipeline(seed: int = 0, sampler: str = "unipc", two_experts: bool = False, expand_timesteps: bool = False,
                          boundary_ratio: float = TINY_BOUNDARY_RATIO):
    """A ``WanImageToVideoPipeline``. Wan2.1 I2V: image embeddings from a tiny ``CLIPVisionModel`` (with a
    locally constructed ``CLIPImageProcessor``), the first frame's latents and mask concatenated to the noise
    (36 input channels); with ``two_experts`` Wan2.2 I2V-A14B (no image encoder, ``boundary_ratio``); with
    ``expand_timesteps`` Wan2.2 TI2V-5B's image-to-video mode (the first latent frame replaced by the
    image's latents, timestep 0 on its tokens, 16 input channels)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vision = processor = None
    if not (two_experts or expand_timesteps):  # only Wan2.1 I2V's transformer takes image embeddings
        torch.manual_seed(seed + 3)
        vision = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=TEXT_WIDTH, projection_dim=TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, intermediate_size=37, patch_size=8,
        )).eval()
        processor = CLIPImageProcessor(crop_size=32, size=32)
    channels = {} if expand_timesteps else {"in_channels": 36}
    image_dim = {"image_dim": TEXT_WIDTH} if vision is not None else {}
    return WanImageToVideoPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_umt5_encoder(seed + 1),
        vae=_wan_vae(seed + 2),
        scheduler=scheduler(sampler),
        transformer=_transformer(seed, **channels, **image_dim),
        transformer_2=_transformer(seed + 5, **channels) if two_experts else None,
        image_encoder=vision,
        image_processor=processor,
        boundary_ratio=boundary_ratio if two_experts else None,
        expand_timesteps=expand_timesteps,
    )


def save_tiny_video(pipe, folder: str | Path) -> Path:
    """Save a tiny Wan pipeline as a diffusers folder (safetensors)."""
    return save_tiny(pipe, folder)
