"""summary.json records what the pipeline really sampled (issue 19): pipelines round each side down to a multiple
of one latent patch and Wan rounds num_frames to 4k + 1; the requested values are kept apart and one stderr
line says so. What was sampled is read back from the plain diffusers call's own latents, not from normscope."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from normscope.cli import app

runner = CliRunner()


def _compare(folder, *args):
    result = runner.invoke(app, ["compare", str(folder), str(folder), "--steps", "1", "--seeds", "0", "--prompt", "a fox",
                                 "--device", "cpu", "--dtype", "float32", "--format", "json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["config"]["resolved"], " ".join(result.stderr.split())


def _latents(folder, **call):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=["a fox"], num_inference_steps=1, output_type="latent",
                   generator=[torch.Generator().manual_seed(0)], **call)
    return pipe, (out.frames if hasattr(out, "frames") else out.images)


def test_wan_records_the_sampled_frames(video_pipelines):
    """Wan rounds num_frames to 4k + 1 (its sides must be multiples of 16: it refuses other sizes itself)."""
    folder = video_pipelines["wan21-euler"]
    resolved, stderr = _compare(folder, "--height", 16, "--width", 16, "--num-frames", 7, "--guidance", 4,
                                "--max-sequence-length", 16)
    pipe, latents = _latents(folder, height=16, width=16, num_frames=7, guidance_scale=4.0, max_sequence_length=16)
    _, _, frames, h, w = latents.shape  # what diffusers sampled: (B, C, F', H/8, W/8)
    sampled = dict(height=h * pipe.vae_scale_factor_spatial, width=w * pipe.vae_scale_factor_spatial,
                   num_frames=(frames - 1) * pipe.vae_scale_factor_temporal + 1)
    assert sampled == dict(height=16, width=16, num_frames=5)
    assert {k: resolved[k] for k in sampled} == sampled
    assert resolved["requested"] == dict(num_frames=7)
    assert "wan: the pipeline samples 5 frames, not the 7 frames asked for" in stderr
    resolved, stderr = _compare(folder, "--height", 16, "--width", 16, "--num-frames", 5, "--guidance", 4,
                                "--max-sequence-length", 16)
    assert "requested" not in resolved and "the pipeline samples" not in stderr


def test_an_image_pipeline_records_the_rounded_size(pipelines):
    folder = pipelines["flux"]
    resolved, stderr = _compare(folder, "--height", 21, "--width", 37, "--max-sequence-length", 24)
    pipe, latents = _latents(folder, height=21, width=37, max_sequence_length=24)
    patch = pipe.vae_scale_factor * 2  # FLUX packs 2x2 latent pixels per token
    tokens = latents.shape[1]
    assert tokens == (resolved["height"] // patch) * (resolved["width"] // patch)
    assert (resolved["height"], resolved["width"]) == (21 // patch * patch, 37 // patch * patch)
    assert resolved["requested"] == dict(height=21, width=37)
    assert "the pipeline samples" in stderr and "not the 21x37 px asked for" in stderr


def test_wan_sizes_off_its_patch_are_refused_before_loading(video_pipelines, monkeypatch):
    """WanPipeline raises for a side that is not a multiple of 16: normscope says so before any weight loads."""
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)
    folder = video_pipelines["wan21-euler"]
    result = runner.invoke(app, ["compare", str(folder), str(folder), "--steps", "1", "--seeds", "0", "--prompt", "a fox",
                                 "--device", "cpu", "--height", "20", "--width", "32", "--num-frames", "5"])
    assert result.exit_code == 2, result.output
    assert "--height 20 is not a multiple of 16" in result.stderr
    assert "use 16 or 32" in result.stderr and "Traceback" not in result.output
