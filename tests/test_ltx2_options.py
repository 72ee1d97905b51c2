"""LTX-2's guidance settings and Wan V2V's strength as options (issue 19): each reaches the pipeline call through
the CLI or the compare API (not raw call dictionaries), the rows equal the independent oracles of
test_new_families.py (a forward hook and the scheduler's own step on the plain diffusers call) at non-default
values, STG off removes a transformer call per step (counted by a global forward hook, outside normscope), V2V's
strength runs int(steps x strength) steps, and every wrong use stops before any weight loads (exit 2, one line).
"""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
from test_families_oracle import _plain, _save_peft_folder, _with_random_lora
from test_new_families import LTX2_PROBE, PROMPTS, STREAMS, _ltx2_scaled, _video_inputs, check_stream_rows, ltx2_oracle
from typer.testing import CliRunner

from normscope.builders.tiny import save_tiny
from normscope.builders.tiny_new_families import NEW_BUILDERS, tiny_ltx2_pipeline
from normscope.cli import app
from normscope.commands.compare import compare
from normscope.config import CompareConfig
from normscope.measure.table import BRANCH, MODE, NORM_BASE, NORM_TUNED, RATIO, STEP, STREAM
from tests.oracle import oracle_norms

runner = CliRunner()
B = len(PROMPTS)
PROMPT_ARGS = sum((["--prompt", p] for p in PROMPTS), [])
LTX2_CLI = ["--guidance", "3", "--height", "32", "--width", "32", "--num-frames", "5", "--max-sequence-length", "16",
            "--steps", "2", "--seeds", "0", *PROMPT_ARGS, "--device", "cpu", "--dtype", "float32",
            "--batch-size", str(B), "--format", "json"]


@pytest.fixture(scope="module")
def ltx2(tmp_path_factory):
    """The tiny LTX-2 pipeline of test_new_families.py (2 transformer blocks), saved once for this module."""
    return save_tiny(tiny_ltx2_pipeline(seed=0), tmp_path_factory.mktemp("ltx2") / "ltx2")


@pytest.fixture(scope="module")
def v2v(tmp_path_factory):
    """The tiny Wan V2V pipeline of test_new_families.py and its input video."""
    root = tmp_path_factory.mktemp("wan-v2v")
    return save_tiny(NEW_BUILDERS["WanVideoToVideoPipeline"](seed=0), root / "wan-v2v"), _video_inputs(root / "inputs")


def _cli(*args):
    return runner.invoke(app, [*map(str, args)])


def _one_line(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---------------------------------------------------------------- LTX-2


def test_ltx2_x1_1_is_exact_on_every_stream_and_branch_through_the_cli_options(ltx2, tmp_path):
    tuned = _ltx2_scaled(ltx2, tmp_path / "x1.1.safetensors")
    out = tmp_path / "run"
    result = _cli("compare", ltx2, tuned, "--pipeline", ltx2, *LTX2_CLI, "--mode", "both", "--out", out,
                  "--guidance-rescale", 0, "--audio-guidance-rescale", 0, "--stg-blocks", 1, "--frame-rate", 25)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "norms.csv", keep_default_na=False)
    paired = frame[frame[MODE] == "paired"]
    assert set(zip(paired[STREAM], paired[BRANCH], strict=True)) == {(s, b) for s in STREAMS for b in ("guided", "cond", "uncond")}
    assert len(paired) == 2 * 3 * B * 2
    assert np.allclose(paired[RATIO], 1.1, rtol=2e-6, atol=0)
    first = frame[(frame[MODE] == "free") & (frame[STEP] == 0)]
    assert len(first) and np.allclose(first[RATIO], 1.1, rtol=2e-6, atol=0)
    resolved = json.loads(result.stdout)["config"]["resolved"]
    assert (resolved["guidance_rescale"], resolved["audio_guidance_rescale"]) == (0.0, 0.0)
    assert (resolved["spatio_temporal_guidance_blocks"], resolved["frame_rate"]) == ([1], 25.0)


# Non-default value of every LTX-2 option, and the same values written out by hand for the plain call.
OPTIONS = dict(stg_scale=0.5, modality_scale=2.0, guidance_rescale=0.3, audio_guidance=5.0, audio_stg_scale=0.25,
               audio_modality_scale=1.5, audio_guidance_rescale=0.2, stg_blocks=(1,), frame_rate=25.0)
CALL = dict(stg_scale=0.5, modality_scale=2.0, guidance_rescale=0.3, audio_guidance_scale=5.0, audio_stg_scale=0.25,
            audio_modality_scale=1.5, audio_guidance_rescale=0.2, spatio_temporal_guidance_blocks=[1], frame_rate=25.0)


def test_ltx2_rows_equal_the_oracle_at_non_default_option_values(ltx2, tmp_path):
    tuned_pipe = _with_random_lora(ltx2, seed=7)
    lora = _save_peft_folder(tuned_pipe, tmp_path / "lora")
    probe = {k: v for k, v in LTX2_PROBE.items() if k != "stg_blocks"}
    result = compare(CompareConfig(tuned=str(lora), base=str(ltx2), pipeline=str(ltx2), prompts=PROMPTS, seeds=(0,),
                                   device="cpu", dtype="float32", batch_size=B, mode="both", **probe, **OPTIONS))
    # the oracle asserts the applied velocity is its formula with these scales: the values reached the pipeline
    scales = ((3.0, 0.5, 2.0), (5.0, 0.25, 1.5))
    base_rows = ltx2_oracle(_plain(ltx2), CALL, rescale=(0.3, 0.2), scales=scales)
    tuned_rows = ltx2_oracle(tuned_pipe, CALL, rescale=(0.3, 0.2), scales=scales)
    default_rows = ltx2_oracle(_plain(ltx2), {"spatio_temporal_guidance_blocks": [1], "frame_rate": 25.0})
    frame = result.frame
    free, paired = frame[frame[MODE] == "free"], frame[frame[MODE] == "paired"]

    n = 2 * 4 * B * 2  # streams x (guided, cond, uncond, combined) x samples x steps
    assert check_stream_rows(free, NORM_BASE, base_rows) == n
    assert check_stream_rows(free, NORM_TUNED, tuned_rows) == n
    assert check_stream_rows(paired, NORM_TUNED, tuned_rows) == n
    assert check_stream_rows(paired, NORM_BASE, base_rows, steps={0}) == n // 2
    # the options matter: the pipeline's defaults give other guided norms on both streams
    for stream in STREAMS:
        key = (stream, "guided", 0, 1)
        assert abs(base_rows[key] - default_rows[key]) > 1e-4 * abs(default_rows[key]), stream
    resolved = result.summary["config"]["resolved"]
    assert {k: resolved[k] for k in CALL} == CALL


def test_ltx2_no_cross_timestep_reaches_the_call_and_equals_the_oracle(ltx2, tmp_path):
    """--no-cross-timestep (Flow-Factory's evaluation: use_cross_timestep=False) reaches the call (summary.json) and
    gives the plain call's norms with use_cross_timestep=False on both streams."""
    result = _cli("compare", ltx2, ltx2, *LTX2_CLI, "--mode", "free", "--stg-blocks", 1, "--frame-rate", 25,
                  "--no-cross-timestep", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["resolved"]["use_cross_timestep"] is False
    frame = pd.read_csv(tmp_path / "run" / "norms.csv", keep_default_na=False)
    off = ltx2_oracle(_plain(ltx2), {"spatio_temporal_guidance_blocks": [1], "frame_rate": 25.0,
                                     "use_cross_timestep": False})
    on = ltx2_oracle(_plain(ltx2), {"spatio_temporal_guidance_blocks": [1], "frame_rate": 25.0})
    assert check_stream_rows(frame, NORM_BASE, off) == 2 * 4 * B * 2  # streams x 4 branches x samples x steps
    # LTX2Pipeline's text-to-video+audio call steps both streams with the same sigmas, so the other stream's timestep
    # (use_cross_timestep) equals the own one and both settings give the same norms here: the preset carries the
    # trainer's value so the call is the trainer's, whatever the pipeline does with it
    assert all(off[k] == pytest.approx(on[k], rel=1e-6) for k in off)


def _count_ltx2_calls(run) -> list[bool]:
    """Every LTX-2 transformer call made while ``run()`` runs, as 'was it an STG call' flags: a global forward hook
    on every module, filtered by class, outside normscope."""
    from diffusers import LTX2VideoTransformer3DModel

    calls: list[bool] = []

    def hook(module, args, kwargs, output):
        if isinstance(module, LTX2VideoTransformer3DModel):
            calls.append(kwargs.get("spatio_temporal_guidance_blocks") is not None)

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls


def test_stg_off_removes_one_transformer_call_per_step_and_model(ltx2, tmp_path):
    common = ["compare", ltx2, ltx2, *LTX2_CLI, "--mode", "free"]
    results = {}
    on = _count_ltx2_calls(lambda: results.setdefault("on", _cli(*common, "--stg-blocks", 1)))
    off = _count_ltx2_calls(lambda: results.setdefault("off", _cli(*common, "--stg-scale", 0, "--audio-stg-scale", 0)))
    assert results["on"].exit_code == 0 and results["off"].exit_code == 0, (results["on"].output, results["off"].output)
    steps, models = 2, 2  # free mode: each model samples its own 2-step trajectory
    assert len(on) == 3 * steps * models and sum(on) == steps * models  # CFG, STG, modality per step
    assert len(off) == 2 * steps * models and sum(off) == 0  # CFG, modality
    # --stg-scale 0 alone leaves the audio stream's STG (1.0) on: the STG call still runs
    alone = _count_ltx2_calls(lambda: results.setdefault("alone", _cli(*common, "--stg-scale", 0, "--stg-blocks", 1)))
    assert results["alone"].exit_code == 0 and sum(alone) == steps * models


def test_ltx2_stg_blocks_are_checked_against_the_transformer_before_loading(ltx2, no_weight_loads):
    common = ["compare", ltx2, ltx2, *LTX2_CLI]
    _one_line(_cli(*common, "--stg-blocks", "1,2"), "--stg-blocks [1, 2]", "block 2", "has 2 blocks")
    _one_line(_cli(*common, "--stg-blocks", "a"), "--stg-blocks 'a' is not a list of block indices")
    _one_line(_cli(*common, "--stg-blocks", "1", "--guidance-rescale", "1.5"), "--guidance-rescale must be in 0..1")
    _one_line(_cli(*common, "--stg-blocks", "1", "--audio-guidance-rescale", "-0.1"), "--audio-guidance-rescale")
    _one_line(_cli(*common, "--stg-blocks", "1", "--stg-scale", "nan"), "--stg-scale must be a finite number")
    _one_line(_cli(*common, "--stg-blocks", "1", "--frame-rate", "0"), "--frame-rate must be positive")
    # a V2V option on LTX-2: refused, naming the family that takes it
    _one_line(_cli(*common, "--stg-blocks", "1", "--strength", "0.5"), "--strength", "ltx2", "it is for wan-v2v")


def test_ltx2_default_stg_blocks_past_a_small_transformer_are_measured_as_the_pipeline_samples(ltx2, tmp_path):
    """The pipeline's default STG block [28] on the 2-block tiny model perturbs nothing (its STG call equals the cond
    call): the pipeline runs that way without complaint, so normscope measures it (x1.1 still exact everywhere) and
    says so in one note; an explicit --stg-blocks past the last block is refused (test above)."""
    tuned = _ltx2_scaled(ltx2, tmp_path / "x1.1.safetensors")
    result = _cli("compare", ltx2, tuned, "--pipeline", ltx2, *LTX2_CLI, "--mode", "paired", "--out", tmp_path / "run",
                  "--guidance-rescale", 0, "--audio-guidance-rescale", 0, "--frame-rate", 25)
    assert result.exit_code == 0, result.output
    assert "default STG blocks [28] are past this transformer's 2 blocks" in result.stderr
    frame = pd.read_csv(tmp_path / "run" / "norms.csv", keep_default_na=False)
    assert set(frame[STREAM]) == set(STREAMS) and np.allclose(frame[RATIO], 1.1, rtol=2e-6, atol=0)
    summary = json.loads(result.stdout)
    assert summary["config"]["resolved"]["spatio_temporal_guidance_blocks"] == [28]


# ---------------------------------------------------------------- Wan video to video


def test_wan_v2v_strength_runs_int_steps_x_strength_and_equals_the_plain_pipeline(v2v, tmp_path):
    folder, inputs = v2v
    out = tmp_path / "run"
    result = _cli("compare", folder, folder, "--steps", 4, "--strength", 0.5, "--height", 16, "--width", 16,
                  "--max-sequence-length", 16, "--guidance", 4, "--seeds", 0, *PROMPT_ARGS, "--device", "cpu",
                  "--dtype", "float32", "--batch-size", B, "--mode", "free", "--video", inputs["video"],
                  "--format", "json", "--out", out)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "norms.csv", keep_default_na=False)
    assert sorted(set(frame[STEP])) == [0, 1]  # int(4 x 0.5) = 2 steps run
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["config"]["resolved"]["strength"], summary["config"]["resolved"]["steps_run"]) == (0.5, 2)
    from normscope.measure.sampling import read_video

    records = oracle_norms(_plain(folder), prompt=list(PROMPTS), num_inference_steps=4, strength=0.5,
                           guidance_scale=4.0, height=16, width=16, max_sequence_length=16, output_type="latent",
                           generator=[torch.Generator().manual_seed(0) for _ in PROMPTS],
                           video=[read_video(inputs["video"]) for _ in PROMPTS])
    assert len(records) == 2
    want = {}
    for step, record in enumerate(records):
        cond, uncond = record["calls_latent"]  # cond call, then uncond call
        for i in range(B):
            want[("guided", i, step)] = record["scheduler"][i]
            want[("cond", i, step)] = cond[i]
            want[("uncond", i, step)] = uncond[i]
    rows = frame[frame[MODE] == "free"]
    assert len(rows) == len(want)
    for row in rows.itertuples(index=False):
        assert getattr(row, NORM_BASE) == pytest.approx(want[(getattr(row, BRANCH), row.prompt_id, getattr(row, STEP))], rel=2e-5)
    # the pipeline's own strength (0.8) runs 3 steps from another sigma: the option matters
    default = oracle_norms(_plain(folder), prompt=list(PROMPTS), num_inference_steps=4, guidance_scale=4.0, height=16,
                           width=16, max_sequence_length=16, output_type="latent",
                           generator=[torch.Generator().manual_seed(0) for _ in PROMPTS],
                           video=[read_video(inputs["video"]) for _ in PROMPTS])
    assert len(default) == 3


def test_wan_v2v_options_are_refused_before_loading(v2v, no_weight_loads):
    folder, inputs = v2v
    common = ["compare", folder, folder, "--steps", "4", "--height", "16", "--width", "16", "--seeds", "0",
              "--prompt", "a fox", "--device", "cpu", "--video", inputs["video"]]
    _one_line(_cli(*common, "--strength", "0"), "--strength", "0 < s <= 1")
    _one_line(_cli(*common, "--strength", "1.5"), "--strength", "0 < s <= 1")
    _one_line(_cli(*common, "--strength", "0.2"), "--strength 0.2 of --steps 4", "0 steps")
    # LTX-2 options on Wan V2V: refused, naming the family that takes them
    for flag, value in (("--stg-scale", "1"), ("--stg-blocks", "1"), ("--modality-scale", "2"),
                        ("--guidance-rescale", "0.5"), ("--audio-guidance", "5"), ("--audio-stg-scale", "1"),
                        ("--audio-modality-scale", "2"), ("--audio-guidance-rescale", "0.5"), ("--frame-rate", "24")):
        _one_line(_cli(*common, flag, value), flag, "wan-v2v", "it is for ltx2")


def test_profile_stores_the_options_and_a_stored_check_reads_them_back():
    from normscope.commands.profile import PROBE_FIELDS, probe_from_reference
    from normscope.config import VIDEO_CALL_SETTINGS, Device, DType, ProbeConfig

    probe = ProbeConfig(prompts=("a fox",), seeds=(0,), steps=4, **OPTIONS)
    stored = {k: probe.to_dict()[k] for k in PROBE_FIELDS}
    assert stored["stg_blocks"] == [1] and stored["audio_guidance"] == 5.0
    reference = mock.Mock(probe=stored, meta={"samples": [{"prompt": "a fox", "prompt_id": 0}]})
    back = probe_from_reference(reference, Device.cpu, DType.float32, 1)
    assert {k: getattr(back, k) for k in VIDEO_CALL_SETTINGS} == {k: getattr(probe, k) for k in VIDEO_CALL_SETTINGS}
