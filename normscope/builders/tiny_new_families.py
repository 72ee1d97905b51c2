"""Tiny real pipelines of the models the trainers tune now (issue 19): Wan video-to-video, HunyuanVideo,
Qwen-Image-2.1 and LTX-2 (video + audio), offline and seeded, for the oracle tests of their family rows.

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

from normscope.builders.tiny_video import (
    NUM_FRAMES,
    SIZE,
    _t5_tokenizer,
    _transformer,
    _umt5_encoder,
    _wan_vae,
    scheduler,
)

NEW_OUTPUT_PROJECTION: dict[str, tuple[str, ...]] = {
    "WanTransformer3DModel": ("proj_out.weight", "proj_out.bias"),
    "HunyuanVideoTransformer3DModel": ("proj_out.weight", "proj_out.bias"),
    "QwenImage21Transformer2DModel": ("proj_out.weight",),  # no bias
    # both streams' output projections: x1.1 scales the video and the audio velocity
    "LTX2VideoTransformer3DModel": ("proj_out.weight", "proj_out.bias", "audio_proj_out.weight", "audio_proj_out.bias"),
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


# ---------------------------------------------------------------- Qwen-Image-2.1

QWEN21_TEXT_WIDTH = 32
QWEN21_SIZE = 32  # px: the pipeline rounds sizes to multiples of 32 (16x VAE, 2x2 slots); 2x2 latent tokens
# The processor's chat format as the pipeline uses it (system turn of text parts), Qwen's <|im_start|> turns.
QWEN21_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{ part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{ '<|im_end|>\\n' }}{%- endfor %}"
)


def qwen21_processor():
    """The text side of Qwen-Image-2.1's processor without torchvision.

    The real pipeline ships a ``Qwen3VLProcessor``, whose video-processor slot transformers 5 fills only with
    torchvision installed, on construction and on load. For a text prompt the pipeline only calls the
    processor's ``apply_chat_template`` (the system turn, to count the tokens it drops), ``tokenizer.encode`` and
    ``__call__(text=..., padding=True, padding_side="left")``, which any transformers processor over the same
    tokenizer answers the same way. The tiny pipeline stores a ``LlavaProcessor`` (tokenizer + Pillow
    ``CLIPImageProcessorPil``, no video slot) over the tiny Qwen BPE with Qwen's chat format: text-to-image only
    (image-conditioned generation needs the real Qwen3-VL image processor)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from normscope.builders.tiny_families import qwen_tokenizer

    return LlavaProcessor(image_processor=CLIPImageProcessorPil(crop_size=32, size=32), tokenizer=qwen_tokenizer(),
                          chat_template=QWEN21_CHAT_TEMPLATE, image_token="<|image_pad|>", patch_size=14)


def _qwen3_vl_encoder(seed: int, tokenizer):
    """A tiny ``Qwen3VLForConditionalGeneration`` (2 text layers of width 32, 1 vision block)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from normscope.builders.tiny_families import QWEN_VOCAB

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=QWEN_VOCAB, hidden_size=QWEN21_TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True},
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=QWEN21_TEXT_WIDTH,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_qwen_image21_pipeline(seed: int = 0, causal_condition: bool = True):
    """A ``QwenImage21Pipeline`` (Qwen-Image-2.1): tiny single-stream ``QwenImage21Transformer2DModel`` with the
    causal condition (so the pipeline's KV cache is on: prefill at the first step, cached prefix after), Qwen3-VL
    text encoder, 16x ``AutoencoderKLQwenImage21``."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )

    processor = qwen21_processor()
    torch.manual_seed(seed)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        context_in_dim=QWEN21_TEXT_WIDTH, mlp_ratio=2, axes_dims_rope=(2, 2, 4), causal_condition=causal_condition,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage21(
        base_dim=4, decoder_base_dim=4, z_dim=8, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, False, False, False], latents_mean=[0.0] * 8, latents_std=[1.0] * 8,
    ).eval()
    return QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
            use_dynamic_shifting=True, time_shift_type="exponential",
        ),
        vae=vae,
        text_encoder=_qwen3_vl_encoder(seed + 1, processor.tokenizer),
        processor=processor,
        transformer=transformer,
    )


# ---- issue 19: Qwen-Image-2.1 with condition images (a processor that reads images, without torchvision)
QWEN21_VL_PIXELS = 28 * 28  # the tiny vision tower's images: 2x2 patches of 14 px, one merged token per image


def qwen21_vl_processor():
    """A ``Qwen3VLProcessor`` (the real pipeline's class) on Pillow's ``Qwen2VLImageProcessorPil``, without the
    (torchvision) video processor (``normscope.load.qwen_processor``): the tiny Qwen BPE, Qwen's chat format, and the
    tiny vision tower's 14 px patches merged 2x2, images capped at QWEN21_VL_PIXELS."""
    from transformers import Qwen2VLImageProcessorPil

    from normscope.builders.tiny_families import qwen_tokenizer
    from normscope.load.qwen_processor import pil_processor

    images = Qwen2VLImageProcessorPil(min_pixels=QWEN21_VL_PIXELS, max_pixels=QWEN21_VL_PIXELS, patch_size=14,
                                      merge_size=2, temporal_patch_size=2)
    return pil_processor(images, qwen_tokenizer(), "Qwen3VLProcessor", QWEN21_CHAT_TEMPLATE)


def tiny_qwen_image21_vision_pipeline(seed: int = 0):
    """``tiny_qwen_image21_pipeline`` (the same weights for the same seed) whose processor reads condition images
    (``qwen21_vl_processor``); saved, its model_index names ``Qwen3VLProcessor`` as the real repos do, and normscope's
    loader (or ``tiny_families.load_qwen_edit_pipeline``) rebuilds the PIL processor without torchvision."""
    pipe = tiny_qwen_image21_pipeline(seed)
    pipe.register_modules(processor=qwen21_vl_processor())
    return pipe


# ---------------------------------------------------------------- LTX-2

LTX2_TEXT_WIDTH = 32  # the connectors' attention width (4 heads x 8): the Gemma hidden size must match it
LTX2_SIZE = 32  # px (the pipeline needs multiples of 32): the tiny video VAE halves it; 3 latent frames of 16x16 tokens


def _gemma3_encoder(seed: int, tokenizer):
    """A tiny ``Gemma3ForConditionalGeneration`` (2 text layers of width 32, 1 SigLIP vision layer)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from normscope.builders.tiny_families import QWEN_VOCAB

    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(
            vocab_size=QWEN_VOCAB, hidden_size=LTX2_TEXT_WIDTH, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256, sliding_window=16,
            pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=ids("<|image_pad|>"), boi_token_index=ids("<|vision_start|>"),
        eoi_token_index=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).eval()


def tiny_ltx2_pipeline(seed: int = 0, num_layers: int = 2):
    """An ``LTX2Pipeline`` (LTX-2: text to video + audio): tiny ``LTX2VideoTransformer3DModel`` (video and audio
    streams), Gemma-3 text encoder with the tiny Qwen BPE (left padding, as the pipeline sets), text connectors,
    video and audio VAEs and vocoder, sizes as in diffusers' own LTX-2 tests. STG perturbs the blocks the call
    names (``spatio_temporal_guidance_blocks``, [28] by default: pass [1] for a 2-layer tiny model)."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    from normscope.builders.tiny_families import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    text_encoder = _gemma3_encoder(seed + 1, tokenizer)
    layers = text_encoder.config.text_config.num_hidden_layers
    torch.manual_seed(seed)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=num_layers, qk_norm="rms_norm_across_heads",
        caption_channels=LTX2_TEXT_WIDTH, rope_double_precision=False, rope_type="split",
    ).eval()
    torch.manual_seed(seed + 2)
    connectors = LTX2TextConnectors(
        caption_channels=LTX2_TEXT_WIDTH, text_proj_in_factor=layers + 1, video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8, video_connector_num_layers=1, video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
    ).eval()
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(seed + 4)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()
    torch.manual_seed(seed + 5)
    vocoder = LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    ).eval()
    return LTX2Pipeline(
        transformer=transformer, vae=vae, audio_vae=audio_vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder, tokenizer=tokenizer, connectors=connectors, vocoder=vocoder,
    )


NEW_BUILDERS = {
    "WanVideoToVideoPipeline": tiny_wan_v2v_pipeline,
    "HunyuanVideoPipeline": tiny_hunyuan_video_pipeline,
    "QwenImage21Pipeline": tiny_qwen_image21_pipeline,
    "LTX2Pipeline": tiny_ltx2_pipeline,
}

# Beyond prompt, generator, num_inference_steps and output_type. Wan V2V: strength 0.75 of 4 steps runs 3.
NEW_CALL: dict[str, dict] = {
    "WanVideoToVideoPipeline": dict(guidance_scale=4.0, height=SIZE, width=SIZE, max_sequence_length=16, strength=0.75),
    # embedded guidance 6 (a transformer input) and true CFG 4 with a negative prompt: two calls per step
    "HunyuanVideoPipeline": dict(guidance_scale=6.0, true_cfg_scale=4.0, negative_prompt=" ", height=SIZE, width=SIZE,
                                 num_frames=NUM_FRAMES, max_sequence_length=16),
    # true CFG needs true_cfg_scale > 1 AND a negative prompt (the pipeline's default is 1: no guidance)
    "QwenImage21Pipeline": dict(true_cfg_scale=4.0, negative_prompt=" ", height=QWEN21_SIZE, width=QWEN21_SIZE),
    # CFG (video 3, audio 7 by default), STG on block 1 of 2, modality isolation: three calls per step
    "LTX2Pipeline": dict(height=LTX2_SIZE, width=LTX2_SIZE, num_frames=NUM_FRAMES, frame_rate=25.0, max_sequence_length=16,
                         spatio_temporal_guidance_blocks=[1]),
}
