"""The done-when case of issue 19: ``--preset flow_grpo-sd3.5m`` samples with flow_grpo's 128 text tokens.

On a random LoRA, the per-step norms and ratios normscope reports through the CLI equal an independent
computation (tests/oracle.py: the plain diffusers call at 128 tokens, with flow_grpo's "" negative prompt and
CFG 4.5) row by row, and differ from the same computation at the pipeline's default 256 tokens (SD3 has no text
attention mask: the padding changes the velocities). The per-family call options (issue 19) are checked the
same way: ``--skip-layers`` reaches SD3's skip-layer guidance.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_families_oracle import _plain, _save_peft_folder, _with_random_lora
from typer.testing import CliRunner

from normscope.cli import app
from normscope.measure.table import BRANCH, MODE, NORM_BASE, NORM_TUNED, PROMPT_ID, STEP
from tests.oracle import oracle_norms

runner = CliRunner()
PROMPTS = ("a red fox in snow", "two green apples")
STEPS, PX = 2, 16


def _oracle(pipe, **call) -> dict:
    """(branch, prompt_id, step) -> norm of the plain SD3 call (batched [uncond, cond])."""
    B = len(PROMPTS)
    steps = oracle_norms(pipe, prompt=list(PROMPTS), num_inference_steps=STEPS, height=PX, width=PX,
                         output_type="latent", generator=[torch.Generator().manual_seed(0) for _ in PROMPTS], **call)
    rows = {}
    for step, record in enumerate(steps):
        batched = record["calls_latent"][0]
        for i in range(B):
            rows[("uncond", i, step)], rows[("cond", i, step)] = batched[i], batched[B + i]
            rows[("guided", i, step)] = record["scheduler"][i]
    return rows


def _cli_frame(out, *args) -> tuple[pd.DataFrame, dict]:
    """The rows of norms.csv of a CLI compare run (free mode: each model on its own trajectory)."""
    result = runner.invoke(app, ["compare", *map(str, args), "--steps", str(STEPS), "--height", str(PX), "--width", str(PX),
                                 "--seeds", "0", *sum((["--prompt", p] for p in PROMPTS), []), "--mode", "free",
                                 "--device", "cpu", "--dtype", "float32", "--format", "json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "norms.csv"), json.loads(result.stdout)


def _rows(frame: pd.DataFrame, column: str) -> dict:
    free = frame[frame[MODE] == "free"]
    return {(r[BRANCH], r[PROMPT_ID], r[STEP]): r[column] for _, r in free.iterrows()}


@pytest.fixture(scope="module")
def sd3_lora(pipelines, tmp_path_factory):
    tuned = _with_random_lora(pipelines["sd3"], seed=11)
    return tuned, _save_peft_folder(tuned, tmp_path_factory.mktemp("preset") / "lora")


def test_flow_grpo_preset_samples_with_128_tokens_row_by_row(pipelines, sd3_lora, tmp_path):
    tuned_pipe, lora = sd3_lora
    folder = pipelines["sd3"]
    frame, summary = _cli_frame(tmp_path / "run", folder, lora, "--preset", "flow_grpo-sd3.5m")
    assert summary["config"]["resolved"]["max_sequence_length"] == 128
    flow_grpo = dict(guidance_scale=4.5, negative_prompt=[""] * len(PROMPTS))  # scripts/train_sd3.py:220-257
    base_128, tuned_128 = (_oracle(p, max_sequence_length=128, **flow_grpo) for p in (_plain(folder), tuned_pipe))
    base_256, tuned_256 = (_oracle(p, max_sequence_length=256, **flow_grpo) for p in (_plain(folder), tuned_pipe))
    got_base, got_tuned = _rows(frame, NORM_BASE), _rows(frame, NORM_TUNED)
    assert set(got_base) == set(base_128) and len(got_base) == 3 * len(PROMPTS) * STEPS
    for key in base_128:
        assert got_base[key] == pytest.approx(base_128[key], rel=2e-5), key
        assert got_tuned[key] == pytest.approx(tuned_128[key], rel=2e-5), key
        assert got_tuned[key] / got_base[key] == pytest.approx(tuned_128[key] / base_128[key], rel=4e-5), key
    # ... and not what the pipeline's default text length gives: the per-step ratios differ at 256 tokens.
    differ = [abs(got_tuned[k] / got_base[k] - tuned_256[k] / base_256[k]) for k in base_128]
    assert max(differ) > 1e-4


def test_preset_text_length_is_recorded_and_an_explicit_length_wins(pipelines, sd3_lora):
    _, lora = sd3_lora
    result = runner.invoke(app, ["compare", str(pipelines["sd3"]), str(lora), "--preset", "flow_grpo-sd3.5m",
                                 "--steps", "1", "--height", "16", "--width", "16", "--seeds", "0", "--prompt", "a fox",
                                 "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.stdout)["config"]["resolved"]
    assert (resolved["max_sequence_length"], resolved["negative_prompt"], resolved["guidance"]) == (128, "", 4.5)
    result = runner.invoke(app, ["compare", str(pipelines["sd3"]), str(lora), "--preset", "flow_grpo-sd3.5m",
                                 "--max-sequence-length", "24", "--steps", "1", "--height", "16", "--width", "16",
                                 "--seeds", "0", "--prompt", "a fox", "--device", "cpu", "--format", "json"])
    assert json.loads(result.stdout)["config"]["resolved"]["max_sequence_length"] == 24


def test_skip_layers_reaches_sd3_skip_layer_guidance_row_by_row(pipelines, sd3_lora, tmp_path):
    tuned_pipe, lora = sd3_lora
    folder = pipelines["sd3"]
    frame, summary = _cli_frame(tmp_path / "run", folder, lora, "--guidance", "4.5", "--max-sequence-length", "24", "--skip-layers", "0",
                          "--skip-layer-start", "0", "--skip-layer-stop", "1", "--skip-layer-scale", "2")
    slg = dict(guidance_scale=4.5, max_sequence_length=24, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
               skip_layer_guidance_stop=1.0, skip_layer_guidance_scale=2.0)
    base, tuned = _oracle(_plain(folder), **slg), _oracle(tuned_pipe, **slg)
    plain = _oracle(_plain(folder), guidance_scale=4.5, max_sequence_length=24)
    got_base, got_tuned = _rows(frame, NORM_BASE), _rows(frame, NORM_TUNED)
    for key in base:
        assert got_base[key] == pytest.approx(base[key], rel=2e-5), key
        assert got_tuned[key] == pytest.approx(tuned[key], rel=2e-5), key
    assert summary["config"]["resolved"]["skip_guidance_layers"] == [0]
    # the skip-layer term really acted: step 1's guided velocity is not the plain CFG one
    assert abs(base[("guided", 0, 1)] - plain[("guided", 0, 1)]) > 1e-4
