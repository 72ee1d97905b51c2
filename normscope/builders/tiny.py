"""Tiny real diffusers pipelines built from configs, offline, with seeded random weights.

These are the same classes a user runs on SD3.5 or FLUX, shrunk to a few thousand parameters so
that tests, the benchmark and the demo exercise the real code path on a CPU in seconds. The
tokenizers are built from an in-memory vocabulary, so nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# The transformer width is the only size the benchmark varies; everything else is fixed.
TINY_SD3 = dict(
    sample_size=8,
    patch_size=1,
    in_channels=4,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    out_channels=4,
)
TINY_FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
)
TEXT_WIDTH = 32
MAX_SEQUENCE_LENGTH = 16


def _word_merges(word: str, end: str = "</w>") -> list[tuple[str, str]]:
    """BPE merges that build ``word`` (with its end-of-word mark) from single characters, left to right."""
    pieces = list(word[:-1]) + [word[-1] + end]
    merges, current = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def _clip_tokenizer(words: tuple[str, ...] = (), model_max_length: int = 77):
    """CLIP's byte-level BPE on single characters, plus whole-word merges for ``words``."""
    from transformers import CLIPTokenizer

    # CLIP's byte-level alphabet (GPT-2's bytes_to_unicode): every byte maps to one printable char.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for word in words:
        for left, right in _word_merges(word):
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _t5_tokenizer(words: tuple[str, ...] = ()):
    """A T5 (unigram) tokenizer on single characters, plus whole-word pieces for ``words``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    for ch in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        pieces.append((ch, -2.0))
        pieces.append(("\u2581" + ch, -2.0))
    pieces += [("\u2581" + word, -1.0) for word in words]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_encoder(seed: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TEXT_WIDTH, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
        hidden_act="gelu", projection_dim=TEXT_WIDTH,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=1000, d_model=TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int, latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, **extra,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, **transformer_overrides):
    """A StableDiffusion3Pipeline with a 1-layer SD3Transformer2DModel and all three text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**TINY_SD3, **transformer_overrides}).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        text_encoder=_clip_encoder(seed + 1, True),
        text_encoder_2=_clip_encoder(seed + 2, True),
        text_encoder_3=_t5_encoder(seed + 3),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        tokenizer_3=_t5_tokenizer(),
        vae=_vae(seed + 4, 4, use_quant_conv=False, use_post_quant_conv=False,
                 shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def flux1_components(seed: int = 0, **transformer_overrides) -> dict:
    """The components of a tiny FLUX.1 pipeline (FluxPipeline and FluxKontextPipeline take the same ones)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        **{**TINY_FLUX, "guidance_embeds": True, **transformer_overrides}
    ).eval()
    return dict(
        transformer=transformer,
        text_encoder=_clip_encoder(seed + 1, False),
        text_encoder_2=_t5_encoder(seed + 2),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_t5_tokenizer(),
        vae=_vae(seed + 4, 4, use_quant_conv=False, use_post_quant_conv=False,
                 shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=16, base_shift=0.5, max_image_seq_len=256, max_shift=1.15,
            use_dynamic_shifting=True,
        ),
    )


def tiny_flux_pipeline(seed: int = 0, **transformer_overrides):
    """A FluxPipeline (guidance-distilled, like FLUX.1-dev) with a tiny FluxTransformer2DModel."""
    from diffusers import FluxPipeline

    return FluxPipeline(**flux1_components(seed, **transformer_overrides))


def save_tiny(pipe, folder: str | Path) -> Path:
    """Save a tiny pipeline as a diffusers folder (safetensors), the way a user's pipeline lies on disk."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = folder / "model_index.json"
    data = json.loads(index.read_text())
    name = data.get("processor", [None, None])[1]
    if name in ("PilQwen2VLProcessor", "PilQwen3VLProcessor"):  # as the real Qwen-Image-Edit / -2.1 repos name it
        data["processor"] = ["transformers", name.removeprefix("Pil")]
        index.write_text(json.dumps(data, indent=2))
    return folder
