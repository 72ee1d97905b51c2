"""Settings of one family's call as CLI options (issue 19): Wan2.2's --guidance-2, Z-Image's --cfg-normalization
and --cfg-truncation (SD3's --skip-layers is checked row by row in test_presets_oracle.py). Each reaches the
pipeline exactly as the plain diffusers call with that keyword (tests/oracle.py), and each is refused before any
weight loads (exit 2, one line) where the family's pipeline does not take it."""

from __future__ import annotations

import json

import pytest
import torch
from test_families_refusals import PROBE, one_line, run
from typer.testing import CliRunner

from normscope.cli import app
from normscope.measure.table import BRANCH, MODE, NORM_BASE, PROMPT_ID, STEP
from tests.oracle import oracle_norms

runner = CliRunner()
PROMPTS = ("a red fox in snow", "two green apples")


def _plain(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _guided_oracle(folder, steps: int, **call) -> dict:
    records = oracle_norms(_plain(folder), prompt=list(PROMPTS), num_inference_steps=steps, output_type="latent",
                           generator=[torch.Generator().manual_seed(0) for _ in PROMPTS], **call)
    return {(i, s): value for s, r in enumerate(records) for i, value in enumerate(r["scheduler"])}


def _guided_normscope(folder, tmp_path, steps: int, *args) -> tuple[dict, dict]:
    """Base vs itself in free mode through the CLI: the guided norms of the base's own trajectory, and resolved."""
    import pandas as pd

    out = tmp_path / "run"
    result = runner.invoke(app, ["compare", str(folder), str(folder), "--steps", str(steps), "--seeds", "0",
                                 *sum((["--prompt", p] for p in PROMPTS), []), "--mode", "free", "--device", "cpu",
                                 "--dtype", "float32", "--format", "json", "--out", str(out), *map(str, args)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "norms.csv")
    guided = frame[(frame[MODE] == "free") & (frame[BRANCH] == "guided")]
    return ({(r[PROMPT_ID], r[STEP]): r[NORM_BASE] for _, r in guided.iterrows()},
            json.loads(result.stdout)["config"]["resolved"])


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=2e-5), key


def test_guidance_2_guides_wan22s_low_noise_expert(video_pipelines, tmp_path):
    folder = video_pipelines["wan22-euler"]
    call = dict(height=16, width=16, num_frames=5, guidance_scale=4.0, max_sequence_length=16)
    got, resolved = _guided_normscope(folder, tmp_path, 4, "--height", 16, "--width", 16, "--num-frames", 5,
                                      "--guidance", 4, "--max-sequence-length", 16, "--guidance-2", 1.5)
    want = _guided_oracle(folder, 4, guidance_scale_2=1.5, **call)
    _same(got, want)
    assert resolved["guidance_scale_2"] == 1.5
    default = _guided_oracle(folder, 4, **call)  # unset: the pipeline guides both experts with guidance_scale
    assert max(abs(want[k] - default[k]) for k in want) > 1e-4


def test_cfg_normalization_and_truncation_reach_z_image(family_pipelines, tmp_path):
    folder = family_pipelines("ZImagePipeline")
    call = dict(height=16, width=16, guidance_scale=4.0)
    got, resolved = _guided_normscope(folder, tmp_path, 3, "--height", 16, "--width", 16, "--guidance", 4,
                                      "--cfg-normalization", 0.9, "--cfg-truncation", 0.5)
    want = _guided_oracle(folder, 3, cfg_normalization=0.9, cfg_truncation=0.5, **call)
    _same(got, want)
    assert (resolved["cfg_normalization"], resolved["cfg_truncation"]) == (0.9, 0.5)
    plain = _guided_oracle(folder, 3, **call)
    assert max(abs(want[k] - plain[k]) for k in want) > 1e-4  # both settings changed what was sampled


@pytest.mark.parametrize("args, needles", [
    (["--guidance-2", "3"], ["--guidance-2 sets guidance_scale_2", "sd3 pipelines", "it is for wan"]),
    (["--cfg-normalization", "1"], ["--cfg-normalization sets cfg_normalization", "it is for z-image"]),
    (["--cfg-truncation", "0.5"], ["--cfg-truncation", "it is for z-image"]),
    (["--skip-layer-scale", "2"], ["only with --skip-layers"]),
    (["--skip-layers", "7,x"], ["--skip-layers '7,x' is not a list of block indices"]),
    (["--skip-layers", "0", "--skip-layer-stop", "1.5"], ["--skip-layer-stop is a fraction"]),
    (["--cfg-truncation", "nan"], ["--cfg-truncation must be a finite number"]),
    (["--guidance-2", "-1"], ["--guidance-2 must be a finite number >= 0"]),
])
def test_a_setting_the_family_cannot_take_is_refused_before_loading(args, needles, pipelines, no_weight_loads):  # noqa: F811
    one_line(run("compare", pipelines["sd3"], pipelines["sd3"], *PROBE, *args), 2, *needles)


def test_guidance_2_on_a_one_transformer_wan_is_refused_before_loading(video_pipelines, no_weight_loads):  # noqa: F811
    one_line(run("compare", video_pipelines["wan21-euler"], video_pipelines["wan21-euler"], *PROBE, "--num-frames", 5,
                 "--guidance-2", 3), 2, "--guidance-2 guides Wan2.2's second expert", "no boundary_ratio")
