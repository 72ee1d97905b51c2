"""The tiny pipelines of the newer families: real classes, offline, deterministic, and the oracle on them."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from normscope.builders.tiny_families import (
    FAMILY_BUILDERS,
    NEEDS_IMAGE,
    OUTPUT_PROJECTION,
    QWEN_IMAGE_TEMPLATE_TOKENS,
    TINY_CALL,
    qwen_tokenizer,
    tiny_reference_image,
)
from tests.oracle import oracle_norms

FAMILIES = sorted(FAMILY_BUILDERS)
PROMPTS = ["a red fox in snow", "two green apples", "a sign that says OPEN"]
# Transformer calls per step with guidance on, and whether each call carries [cond, uncond] in one batch.
CALLS_PER_STEP = {
    "QwenImagePipeline": 2, "ZImagePipeline": 1, "Flux2Pipeline": 1, "Flux2KleinPipeline": 1,
    "Flux2KleinPipeline-base": 2, "FluxKontextPipeline": 1,
}
BATCHED_CFG = {"ZImagePipeline"}


def load(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)


def call_args(key: str, seeds=(0, 1, 2), steps: int = 2) -> dict:
    args = dict(prompt=PROMPTS[: len(seeds)], num_inference_steps=steps, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds], **TINY_CALL[key])
    if key in NEEDS_IMAGE:
        args["image"] = [tiny_reference_image(s) for s in seeds]
    return args


def test_qwen_template_encodes_to_the_dropped_prefix_length():
    from normscope.builders.tiny_families import tiny_qwen_image_pipeline

    pipe = tiny_qwen_image_pipeline()
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert pipe.prompt_template_encode_start_idx == QWEN_IMAGE_TEMPLATE_TOKENS
    assert len(qwen_tokenizer()(prefix).input_ids) == QWEN_IMAGE_TEMPLATE_TOKENS
    # ... so what the pipeline keeps is exactly the prompt's own tokens (and the closing template)
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red fox")).input_ids
    kept = pipe.tokenizer.decode(ids[QWEN_IMAGE_TEMPLATE_TOKENS:])
    assert kept.startswith("a red fox<|im_end|>")


@pytest.mark.parametrize("key", FAMILIES)
def test_family_pipeline_saves_loads_offline_and_is_deterministic(key, family_pipelines):
    folder = family_pipelines(key)
    pipe = load(folder)
    expected_class = key.split("-")[0]
    assert type(pipe).__name__ == expected_class
    for name in ("transformer", "text_encoder", "vae"):
        assert sum(p.numel() for p in getattr(pipe, name).parameters()) < 400_000, name
    first = pipe(**call_args(key)).images
    again = load(folder)(**call_args(key)).images
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)  # same seed, fresh load -> the same latents, bit for bit
    other = pipe(**call_args(key, seeds=(3, 4, 5))).images
    assert not torch.equal(first, other)


@pytest.mark.parametrize("key", FAMILIES)
def test_oracle_sees_the_family_call_pattern(key, family_pipelines):
    pipe = load(family_pipelines(key))
    steps = oracle_norms(pipe, keep_outputs=True, **call_args(key))
    assert len(steps) == 2
    plain = [{k: v for k, v in step.items() if k not in ("outputs", "scheduler_input")} for step in steps]
    assert plain == oracle_norms(pipe, **call_args(key))  # repeatable to the last bit
    for step in steps:
        assert len(step["calls"]) == CALLS_PER_STEP[key]
        batch = 6 if key in BATCHED_CFG else 3
        assert all(len(norms) == batch for norms in step["calls"])
        assert len(step["scheduler"]) == 3
        values = [v for norms in step["calls"] + [step["scheduler"]] for v in norms]
        assert all(math.isfinite(v) and v > 0 for v in values)
        if key in NEEDS_IMAGE:  # reference tokens ride along in the output and are sliced off
            assert all(a > b for a, b in zip(step["calls"][0], step["calls_latent"][0], strict=True))
        _check_guidance_rule(key, step)


def _check_guidance_rule(key: str, step: dict) -> None:
    """What the scheduler receives, recomputed by hand from the raw outputs with each pipeline's rule."""
    out = step["outputs"]
    received = step["scheduler_input"]
    if key == "QwenImagePipeline":
        cond, uncond = out  # cond first, then uncond
        combined = uncond + 4.0 * (cond - uncond)
        expected = combined * cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
        # the renormalisation makes every token's norm equal to cond's: the sample norms agree too
        assert torch.allclose(torch.tensor(step["scheduler"]), torch.tensor(step["calls"][0]), rtol=1e-5)
    elif key == "ZImagePipeline":
        stacked = torch.stack(out[0]).squeeze(2)  # a list of (C, 1, H, W): [cond..., uncond...]
        cond, uncond = stacked[:3], stacked[3:]
        expected = -(cond + 4.0 * (cond - uncond))  # Z-Image's rule, and its output is negated
    elif key == "Flux2KleinPipeline-base":
        cond, uncond = out
        expected = uncond + 4.0 * (cond - uncond)
    else:  # distilled guidance: one call, the scheduler gets its latent tokens as they are
        expected = out[0][:, : received.shape[1]] if received.dim() == 3 else out[0]
    assert torch.allclose(received, expected.reshape(received.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", FAMILIES)
def test_output_projection_names_scale_the_output(key, family_pipelines, tmp_path):
    """Scaling the listed output projection by 1.1 scales every transformer output by exactly 1.1."""
    from diffusers import DiffusionPipeline

    folder = family_pipelines(key)
    pipe = load(folder)
    names = OUTPUT_PROJECTION[type(pipe.transformer).__name__]
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    assert set(names) <= set(state), f"{names} not in the transformer's state dict"
    assert not any(k.endswith(".bias") and k.rsplit(".", 1)[0] + ".weight" in names and k not in names
                   for k in state), "the projection has a bias the table does not list"
    scaled = tmp_path / "scaled"
    shutil.copytree(folder, scaled)
    save_file({k: (v * 1.1 if k in names else v).contiguous() for k, v in state.items()},
              str(scaled / "transformer" / "diffusion_pytorch_model.safetensors"))
    tuned = DiffusionPipeline.from_pretrained(str(scaled), local_files_only=True)
    base_steps = oracle_norms(pipe, **call_args(key, steps=2))
    tuned_steps = oracle_norms(tuned, **call_args(key, steps=2))
    for base_call, tuned_call in zip(base_steps[0]["calls"], tuned_steps[0]["calls"], strict=True):
        ratio = torch.tensor(tuned_call) / torch.tensor(base_call)
        assert torch.allclose(ratio, torch.full_like(ratio, 1.1), rtol=1e-5)
