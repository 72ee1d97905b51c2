"""Tiny real pipelines of the newer image families RL trainers tune: Qwen-Image, Z-Image, FLUX.2-dev,
FLUX.2-klein (distilled and base) and FLUX.1-Kontext.

Each builder returns the real diffusers pipeline class with 1-layer models of width 16-32 and seeded
random weights, built from configs with tokenizers made in memory, so nothing is fetched from a hub.
Save them with ``tiny.save_tiny``; ``DiffusionPipeline.from_pretrained(folder)`` loads them offline.
``FAMILY_BUILDERS`` maps each pipeline class name to its builder, ``OUTPUT_PROJECTION`` names each
transformer's final output projection (tests scale it by 1.1 for the +10 % known answer) and
``TINY_CALL`` gives call arguments that run each pipeline in well under a second.

Qwen-Image-Edit(-Plus) has no builder: the pipeline encodes every prompt through a ``Qwen2VLProcessor``,
which transformers 5 cannot construct without torchvision (its video-processor slot requires it), and it
resizes the reference image to about 1024x1024 before the VAE whatever the output size (seconds a call).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .tiny import _vae, flux1_components

# Final output projection of each transformer class: ``<name>.weight`` (and ``.bias`` where present)
# in the transformer's state dict. Scaling these by k scales the transformer output by exactly k.
OUTPUT_PROJECTION: dict[str, tuple[str, ...]] = {
    "QwenImageTransformer2DModel": ("proj_out.weight", "proj_out.bias"),
    "ZImageTransformer2DModel": ("all_final_layer.2-1.linear.weight", "all_final_layer.2-1.linear.bias"),
    "Flux2Transformer2DModel": ("proj_out.weight",),  # FLUX.2's proj_out has no bias
    "FluxTransformer2DModel": ("proj_out.weight", "proj_out.bias"),
    "SD3Transformer2DModel": ("proj_out.weight", "proj_out.bias"),
}

# Words that get whole-word tokens in the tiny Qwen tokenizers: the system-prompt templates of the
# pipelines (their token counts are fixed, see ``QWEN_IMAGE_TEMPLATE_TOKENS``) and the test prompts.
_TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text "
    "spatial relationships of objects and background key features input then explain how user's "
    "instruction should alter or modify Generate a new that meets requirements while maintaining "
    "consistency with original where appropriate"
)
_PROMPT_WORDS = "a red fox in snow two green apples sign says OPEN cat dog blue sky photo"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
# QwenImagePipeline drops the first 34 tokens of every encoded prompt: its system template must encode
# to exactly that many, or the user's prompt is cut (real Qwen2.5-VL tokenizer: 34).
QWEN_IMAGE_TEMPLATE_TOKENS = 34
QWEN_TEXT_WIDTH = 32
QWEN_VOCAB = 1024


def qwen_tokenizer(corpus: str = _TEMPLATE_WORDS + " " + _PROMPT_WORDS):
    """A byte-level BPE ``Qwen2Tokenizer`` trained here on ``corpus`` with Qwen's own pre-tokenizer.

    Every byte is a token, so any text encodes; the training runs until every word of the corpus (with
    and without a leading space) is one token, so the pipelines' system templates encode to the real
    tokenizer's counts. Training is deterministic for a given corpus.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_VOCAB - 2 * len(QWEN_SPECIAL_TOKENS), min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[QWEN_SPECIAL_TOKENS[0]],
    )
    words = corpus.split()
    lines = [" ".join(words), *words]  # each word both after a space and at a line start
    bpe.train_from_iterator(lines, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab = dict(state["vocab"])
    for token in QWEN_SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=4096)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tokenizer


def _qwen25_vl_encoder(seed: int, tokenizer):
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` (1 text layer, 1 vision block, width 32)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=QWEN_VOCAB, hidden_size=QWEN_TEXT_WIDTH, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=QWEN_TEXT_WIDTH,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()


def _qwen_transformer(seed: int):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=QWEN_TEXT_WIDTH, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()


def tiny_qwen_image_pipeline(seed: int = 0):
    """A QwenImagePipeline: tiny QwenImageTransformer2DModel, Qwen2.5-VL encoder, local BPE tokenizer."""
    from diffusers import QwenImagePipeline

    tokenizer = qwen_tokenizer()
    return QwenImagePipeline(
        transformer=_qwen_transformer(seed),
        text_encoder=_qwen25_vl_encoder(seed + 1, tokenizer),
        tokenizer=tokenizer,
        vae=_qwen_vae(seed + 2),
        scheduler=_qwen_scheduler(),
    )


def _qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen-Image's shipped scheduler: dynamic exponential shift, schedule ending at sigma 0.02.
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )


# Qwen3's chat template, reduced to what the pipelines use (user turns, generation prompt, thinking off).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def qwen3_tokenizer():
    """The tiny Qwen BPE with Qwen3's thinking tokens and chat template (Z-Image, FLUX.2-klein)."""
    from tokenizers import AddedToken

    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def _qwen3_config(tokenizer, num_layers: int, width: int = 16):
    from transformers import Qwen3Config

    ids = tokenizer.convert_tokens_to_ids
    return Qwen3Config(
        vocab_size=QWEN_VOCAB, hidden_size=width, intermediate_size=24, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )


def tiny_z_image_pipeline(seed: int = 0):
    """A ZImagePipeline: tiny ZImageTransformer2DModel, ``Qwen3Model`` encoder, FLUX-style 4-channel VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = qwen3_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32],
    )
    # The constructor leaves the padding embeddings at zero; a trained model's are not (and a zero pad
    # token would make padded positions indistinguishable from a zero input).
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3Model(_qwen3_config(tokenizer, num_layers=2)).eval()
    return ZImagePipeline(
        transformer=transformer.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=_vae(seed + 2, 4, use_quant_conv=False, use_post_quant_conv=False,
                 shift_factor=0.1159, scaling_factor=0.3611),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
    )


def _flux2_transformer(seed: int, guidance_embeds: bool, joint_attention_dim: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def _flux2_vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1, latent_channels=4, norm_num_groups=1, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    ).eval()
    # Running statistics of the latent batch norm: a trained VAE's are not the identity.
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _flux2_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
        use_dynamic_shifting=True, time_shift_type="exponential",
    )


# FLUX.2-klein reads hidden states 9, 18 and 27 of its Qwen3 encoder by default: 28 layers keep the
# pipeline's default ``text_encoder_out_layers`` valid (each layer is width 16, a few thousand weights).
KLEIN_TEXT_LAYERS = 28


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = True):
    """A Flux2KleinPipeline (distilled: 1 call/step; base: real CFG, 2 calls) with a 28-layer tiny Qwen3."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM

    tokenizer = qwen3_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, num_layers=KLEIN_TEXT_LAYERS)).eval()
    return Flux2KleinPipeline(
        transformer=_flux2_transformer(seed, guidance_embeds=False, joint_attention_dim=3 * 16),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=_flux2_vae(seed + 2),
        scheduler=_flux2_scheduler(),
        is_distilled=is_distilled,
    )


def tiny_reference_image(seed: int = 0, size: int = 16):
    """A seeded random RGB ``PIL.Image`` to condition the editing pipelines (Kontext, Qwen-Image-Edit)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def tiny_flux_kontext_pipeline(seed: int = 0):
    """A FluxKontextPipeline (FLUX.1-Kontext-dev: distilled guidance, reference-image tokens) on FLUX.1's components."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**flux1_components(seed))


# Mistral's chat format, reduced to what Flux2Pipeline sends (a system turn and a user turn of text parts).
MISTRAL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set parts = message['content'] if message['content'] is not string "
    "else [{'type': 'text', 'text': message['content']}] %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{%- else %}[INST]{%- endif %}"
    "{%- for part in parts %}{%- if part['type'] == 'text' %}{{ part['text'] }}{%- else %}[IMG]{%- endif %}"
    "{%- endfor %}"
    "{%- if message['role'] == 'system' %}[/SYSTEM_PROMPT]{%- else %}[/INST]{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_SPECIAL_TOKENS = ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]",
                          "[IMG_END]")
# FLUX.2-dev reads hidden states 10, 20 and 30 of its Mistral-3 encoder: 30 layers of width 16.
FLUX2_TEXT_LAYERS = 30


def mistral_tokenizer():
    """The tiny byte-level BPE with Mistral's special tokens and chat format (FLUX.2-dev's text side).

    The real FLUX.2-dev ships a ``PixtralProcessor`` here; that class needs torchvision, which is not
    installed with normscope. For text prompts the pipeline only calls ``apply_chat_template`` on it,
    which a tokenizer answers the same way, so the tiny pipeline stores the tokenizer itself.
    """
    from tokenizers import AddedToken

    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in MISTRAL_SPECIAL_TOKENS])
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def tiny_flux2_pipeline(seed: int = 0):
    """A Flux2Pipeline (FLUX.2-dev: distilled guidance, 1 call/step) with a tiny Mistral-3 encoder."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = mistral_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral", vocab_size=QWEN_VOCAB, hidden_size=16, intermediate_size=24,
            num_hidden_layers=FLUX2_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=1024, pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            model_type="pixtral", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
            num_attention_heads=2, image_size=32, patch_size=8, head_dim=8,
        ),
        image_token_index=ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(
        transformer=_flux2_transformer(seed, guidance_embeds=True, joint_attention_dim=3 * 16),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=_flux2_vae(seed + 2),
        scheduler=_flux2_scheduler(),
    )


def tiny_flux2_klein_base_pipeline(seed: int = 0):
    """A Flux2KleinPipeline of a FLUX.2-klein *base* model: real CFG, two transformer calls per step."""
    return tiny_flux2_klein_pipeline(seed, is_distilled=False)


# Pipeline class name (as in model_index.json) -> builder. Klein's distilled and base models share
# the class; the base builder is listed under its own key.
FAMILY_BUILDERS = {
    "QwenImagePipeline": tiny_qwen_image_pipeline,
    "ZImagePipeline": tiny_z_image_pipeline,
    "Flux2Pipeline": tiny_flux2_pipeline,
    "Flux2KleinPipeline": tiny_flux2_klein_pipeline,
    "Flux2KleinPipeline-base": tiny_flux2_klein_base_pipeline,
    "FluxKontextPipeline": tiny_flux_kontext_pipeline,
}

# Call arguments that run each tiny pipeline at 16x16 px with guidance on (besides prompt, generator,
# num_inference_steps, output_type). Qwen-Image needs ``true_cfg_scale`` AND a negative prompt for CFG;
# Kontext would otherwise resize its reference image and the output to about 1024x1024.
TINY_CALL: dict[str, dict] = {
    "QwenImagePipeline": dict(true_cfg_scale=4.0, negative_prompt=" ", height=16, width=16),
    "ZImagePipeline": dict(guidance_scale=4.0, height=16, width=16),
    "Flux2Pipeline": dict(guidance_scale=4.0, height=16, width=16),
    # klein pads every prompt to max_sequence_length through its 28 encoder layers: 64 holds the chat template
    # and a test prompt (about 20 tokens) at an eighth of the default's cost
    "Flux2KleinPipeline": dict(guidance_scale=1.0, height=16, width=16, max_sequence_length=64),
    "Flux2KleinPipeline-base": dict(guidance_scale=4.0, height=16, width=16, max_sequence_length=64),
    "FluxKontextPipeline": dict(guidance_scale=2.5, height=16, width=16, max_area=16 * 16, _auto_resize=False,
                                max_sequence_length=24),
}
# Families whose call takes a reference image (one per prompt: ``image=[tiny_reference_image(), ...]``).
NEEDS_IMAGE = frozenset({"FluxKontextPipeline"})


# ------------------------------------------------------------------ Qwen-Image-Edit / Edit-Plus (issue 19)
# The edit pipelines add a Qwen2VLProcessor (the VL encoder reads the condition image) and resize the condition
# image to about 1024^2 for the VAE whatever is asked (Edit-Plus: 384^2 for the VL encoder). So the tiny VAE here
# downsamples by 8, as the real one does (1024^2 -> 64x64 packed tokens, not 256x256), and the image processor
# caps the VL encoder's pixels. The processor is built from transformers' PIL classes (Qwen2VLImageProcessorPil,
# no video processor): the default Qwen2VLImageProcessor needs torchvision, which normscope does not depend on.
QWEN_EDIT_VL_PIXELS = 56 * 56  # at most 4 merged 28x28 patches for the VL encoder: the test stays small


def qwen_vl_processor(tokenizer):
    """The edit pipelines' processor on the PIL image processor, without torchvision
    (``normscope.load.qwen_processor``), pixels capped at QWEN_EDIT_VL_PIXELS."""
    from transformers import Qwen2VLImageProcessorPil

    from normscope.load.qwen_processor import pil_processor

    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=QWEN_EDIT_VL_PIXELS, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    return pil_processor(images, tokenizer)


def load_qwen_edit_pipeline(folder, **kwargs):
    """Load a saved Qwen-Image-Edit(-Plus) folder with diffusers, its processor built from the PIL classes when
    torchvision is missing (what normscope's loader does; tests' plain calls use it too)."""
    import json
    from pathlib import Path

    from diffusers import DiffusionPipeline

    from normscope.load.qwen_processor import processor_override

    index = json.loads((Path(folder) / "model_index.json").read_text())
    return DiffusionPipeline.from_pretrained(str(folder), **processor_override(folder, index), **kwargs)


def _qwen_edit_vae(seed: int):
    """The tiny Qwen VAE with three downsamplings (factor 8, as the real one): the edit pipelines encode the
    condition image at about 1024^2 whatever is asked."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, False, False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    ).eval()


def tiny_qwen_image_edit_pipeline(seed: int = 0, plus: bool = False):
    """A QwenImageEditPipeline (or with ``plus`` a QwenImageEditPlusPipeline: 2509/2511) on Qwen-Image's tiny
    transformer and encoder, with a PIL-based Qwen2VLProcessor (see ``qwen_vl_processor``)."""
    import diffusers

    tokenizer = qwen_tokenizer()
    cls = diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline
    return cls(
        transformer=_qwen_transformer(seed),
        text_encoder=_qwen25_vl_encoder(seed + 1, tokenizer),
        tokenizer=tokenizer,
        processor=qwen_vl_processor(tokenizer),
        vae=_qwen_edit_vae(seed + 2),
        scheduler=_qwen_scheduler(),
    )


def tiny_qwen_image_edit_plus_pipeline(seed: int = 0):
    return tiny_qwen_image_edit_pipeline(seed, plus=True)


# Kept apart from FAMILY_BUILDERS: the generic builder tests load folders with diffusers alone (which needs
# torchvision for these) and call them with three prompts (the edit calls encode a 1024^2 condition image each).
EDIT_BUILDERS = {
    "QwenImageEditPipeline": tiny_qwen_image_edit_pipeline,
    "QwenImageEditPlusPipeline": tiny_qwen_image_edit_plus_pipeline,
}
