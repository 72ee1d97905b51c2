"""FLUX.1-Kontext samples at --height/--width: the family row names ``max_area`` and sampling passes it.

Without it the pipeline rescales any size to its default ``max_area`` (1024^2), keeping only the aspect ratio.
"""

from __future__ import annotations

import json

import torch

from normscope.builders.tiny_families import tiny_reference_image
from normscope.commands.profile import ProfileConfig, profile
from normscope.config import ProbeConfig
from normscope.load.families import family_named
from normscope.load.pipeline import load_pipeline
from normscope.measure.sampling import sampled_size


def test_kontext_row_names_the_area_argument():
    assert family_named("flux-kontext").area_arg == "max_area"
    assert family_named("flux").area_arg is None


def test_kontext_latent_follows_height_and_width(family_pipelines, tmp_path):
    folder = family_pipelines("FluxKontextPipeline")
    tiny_reference_image(0).save(tmp_path / "ref.png")
    config = ProfileConfig(base=str(folder), out=tmp_path / "ref", prompts=("a red fox",), seeds=(0,), steps=2,
                           height=32, width=16, max_sequence_length=24, device="cpu", dtype="float32",
                           dtype_check=False, figure=False, image=tmp_path / "ref.png")
    reference = profile(config)
    meta = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert (meta["config"]["resolved"]["height"], meta["config"]["resolved"]["width"]) == (32, 16)
    vae_factor = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    channels = json.loads((folder / "transformer" / "config.json").read_text())["in_channels"]
    # packed latents: one token per 2x2 patch of the (H / f, W / f) latent, in_channels values per token
    tokens = (32 // (2 * vae_factor)) * (16 // (2 * vae_factor))
    # the transformer also reads the reference image's tokens, resized to the sample size (issue 19): as many again
    assert reference.meta["latent_elements"] == 2 * tokens * channels


def test_kontext_default_size_is_the_pipelines_area(family_pipelines):
    pipe = load_pipeline(str(family_pipelines("FluxKontextPipeline")), torch.float32, "cpu")
    # no size given: the pipeline's default size at its default max_area (1024^2), square
    assert sampled_size(pipe, ProbeConfig(device="cpu")) == (1024, 1024)
    # one side given: the other is the pipeline default, the area is their product, each side a multiple of 16
    height, width = sampled_size(pipe, ProbeConfig(device="cpu", height=48))
    default = pipe.default_sample_size * pipe.vae_scale_factor
    assert (height, width) == (48 // 16 * 16, default // 16 * 16)
