"""Shared pieces of the digits example: data split, the tiny SD3 pipeline, prompt embeddings, timing."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from normscope.builders.digits import DIGIT_WORDS, SAMPLING, digit_prompt, real_to_images  # noqa: E402

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"  # intermediate results (git-ignored)
ASSETS = HERE.parents[1] / "normscope" / "data" / "digits"  # what ships in the package
torch.set_num_threads(max(1, os.cpu_count() or 1))


def split_digits(seed: int = 0):
    """Half of the 1,797 digits train the generator, the other half the reward classifier (held out)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    half = len(order) // 2
    gen, held = order[:half], order[half:]
    return (real_to_images(data.images[gen]), torch.from_numpy(data.target[gen])), \
           (real_to_images(data.images[held]), torch.from_numpy(data.target[held]))


WORDS = ("a", "handwritten", "digit", *DIGIT_WORDS)  # whole-word tokens: short text sequences, fast training
CLIP_LENGTH = 16


def build_pipeline(vae, seed: int = 0):
    """A StableDiffusion3Pipeline: tiny frozen CLIP/CLIP/T5 text encoders, the trained VAE, a 4-layer transformer.

    Sequence lengths are what keeps this trainable on a CPU: 16 CLIP + 8 T5 text tokens and 16 image tokens
    (8x8x4 latents in 2x2 patches).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from normscope.builders import tiny

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=tiny.TEXT_WIDTH, caption_projection_dim=64, pooled_projection_dim=2 * tiny.TEXT_WIDTH,
        out_channels=4, pos_embed_max_size=8,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        text_encoder=tiny._clip_encoder(seed + 1, True), text_encoder_2=tiny._clip_encoder(seed + 2, True),
        text_encoder_3=tiny._t5_encoder(seed + 3), tokenizer=tiny._clip_tokenizer(WORDS, CLIP_LENGTH),
        tokenizer_2=tiny._clip_tokenizer(WORDS, CLIP_LENGTH), tokenizer_3=tiny._t5_tokenizer(WORDS), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )


@torch.no_grad()
def prompt_embeddings(pipe):
    """(prompt_embeds, pooled) for the ten digit prompts and for the empty prompt (CFG's unconditional)."""
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=SAMPLING["max_sequence_length"])
    return embeds, pooled


@contextmanager
def timed(name: str, log: dict):
    start = time.perf_counter()
    yield
    log[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}] {log[name]} s", flush=True)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
