"""--shift: the scheduler's timestep shift when a trainer overrides the shipped one (issue 19).

Known answers: diffusers' static shift maps a sigma grid g to s g / (1 + (s - 1) g). The grid is written here by
hand from diffusers 0.42's set_timesteps (FlowMatchEuler: linspace over its shifted training range; UniPC in flow
mode: linspace(1, 1/1000, N + 1)[:-1]); what the transformer saw is recorded by a forward hook on a plain diffusers
call whose scheduler was replaced by hand, never by normscope's capture.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reporters import StopAfter
from typer.testing import CliRunner
from video_factory import VIDEO_PROBE, build_pipeline, flow_factory_checkpoint

from normscope.cli import app
from normscope.commands.compare import compare
from normscope.config import CompareConfig, ProbeConfig
from normscope.errors import ConfigError
from normscope.load.families import PRESETS
from normscope.load.scheduler_shift import SHIFT_ATTRIBUTES
from normscope.measure.table import MODE, RATIO, SIGMA, STEP, TIMESTEP

runner = CliRunner()
STEPS = 3
SD3_PROBE = dict(steps=STEPS, height=16, width=16, max_sequence_length=24, guidance=4.5)


def shifted(grid: np.ndarray, s: float) -> np.ndarray:
    return s * grid / (1 + (s - 1) * grid)


def sd3_sigmas(s: float, steps: int = STEPS) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(steps): its range ends at the shifted 1/1000, and the
    linspace over that range is shifted again (diffusers 0.42, set_timesteps steps 1-2)."""
    sigma_min = shifted(np.array(1 / 1000), s)
    return shifted(np.linspace(1.0, float(sigma_min), steps), s)


def unipc_sigmas(s: float, steps: int = STEPS) -> np.ndarray:
    """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s): linspace(1, 1/1000, N + 1)[:-1] shifted, and a
    first sigma of 1 lowered by 1e-6 (diffusers 0.42 does so to keep log(alpha) finite)."""
    sigmas = shifted(np.linspace(1.0, 1 / 1000, steps + 1)[:-1], s)
    sigmas[0] -= 1e-6 if abs(sigmas[0] - 1) < 1e-6 else 0.0
    return sigmas


def hooked_timesteps(folder, shift: float, attribute: str, **call) -> np.ndarray:
    """The timesteps the transformer receives in a plain diffusers call, the scheduler's shift replaced by hand."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **{attribute: shift})
    seen = []
    handle = pipe.transformer.register_forward_hook(
        lambda _m, args, kwargs, _out: seen.append(float(kwargs["timestep"].flatten()[0])), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(prompt=["a fox"], num_inference_steps=STEPS, output_type="latent",
                 generator=[torch.Generator().manual_seed(0)], **call)
    finally:
        handle.remove()
    return np.array(seen)


def steps_of(frame, mode: str = "paired"):
    rows = frame[frame[MODE] == mode].drop_duplicates(STEP).sort_values(STEP)
    return rows[TIMESTEP].to_numpy(), rows[SIGMA].to_numpy()


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A tiny Wan 2.1 with the UniPC flow solver as the Wan repos ship it (flow_shift 3), and its proj_out x1.1."""
    root = tmp_path_factory.mktemp("shift-wan")
    folder = build_pipeline("wan21-unipc", root / "wan21-unipc")
    return folder, flow_factory_checkpoint(folder, root / "ckpt" / "checkpoint-1", {"transformer": 1.1})


# ---------------------------------------------------------------- known answers


@pytest.mark.parametrize("s", [1.0, 5.0])
def test_sd3_samples_the_hand_shifted_grid(s, pipelines, scaled):
    folder = pipelines["sd3"]
    hand = sd3_sigmas(s)
    assert not np.allclose(hand, sd3_sigmas(3.0), atol=1e-3)  # the shipped shift (3) samples another grid
    hooked = hooked_timesteps(folder, s, "shift", height=16, width=16, max_sequence_length=24, guidance_scale=4.5)
    assert np.allclose(hooked, hand * 1000, rtol=1e-6)
    result = compare(CompareConfig(tuned=str(scaled("sd3", 1.1)), base=str(folder), pipeline=str(folder), shift=s,
                                   prompts=("a fox",), seeds=(0,), device="cpu", dtype="float32", mode="both",
                                   rescale_to_base=True, **SD3_PROBE))
    for mode in ("paired", "free", "rescaled"):  # every mode samples with the shift
        timesteps, sigmas = steps_of(result.frame, mode)
        assert np.allclose(sigmas, hand, rtol=1e-6), mode
        assert np.allclose(timesteps, hooked, rtol=1e-6), mode
    assert np.allclose(result.frame[result.frame[MODE] == "paired"][RATIO], 1.1, rtol=1e-5)  # x1.1 stays exactly 1.1
    recorded = result.summary["config"]["resolved"]
    assert recorded["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert recorded["scheduler_shift"] == dict(attribute="shift", shift=s, dynamic=False, overridden=True)


def test_sd3_without_shift_keeps_and_records_the_shipped_one(pipelines):
    folder = pipelines["sd3"]
    result = compare(CompareConfig(tuned=str(folder), base=str(folder), pipeline=str(folder), prompts=("a fox",),
                                   seeds=(0,), device="cpu", dtype="float32", **SD3_PROBE))
    assert np.allclose(steps_of(result.frame)[1], sd3_sigmas(3.0), rtol=1e-6)
    assert result.summary["config"]["resolved"]["scheduler_shift"] == dict(attribute="shift", shift=3.0, dynamic=False,
                                                                           overridden=False)
    assert result.inflation == 0.0


@pytest.mark.parametrize("s", [1.0, 5.0])
def test_wan_unipc_samples_the_hand_shifted_grid(s, wan):
    folder, ckpt = wan
    hand = unipc_sigmas(s)
    call = dict(height=VIDEO_PROBE["height"], width=VIDEO_PROBE["width"], num_frames=VIDEO_PROBE["num_frames"],
                guidance_scale=4.0, max_sequence_length=16)
    hooked = hooked_timesteps(folder, s, "flow_shift", **call)[::2]  # Wan calls cond, then uncond, each step
    assert np.array_equal(hooked, np.trunc(hand * 1000))  # UniPC hands the transformer int64 timesteps
    probe = dict(VIDEO_PROBE, steps=STEPS)
    result = compare(CompareConfig(tuned=str(ckpt), pipeline=str(folder), shift=s, prompts=("a fox",), seeds=(0,),
                                   device="cpu", dtype="float32", mode="both", **probe))
    for mode in ("paired", "free"):
        timesteps, sigmas = steps_of(result.frame, mode)
        assert np.allclose(sigmas, hand, rtol=1e-6), mode
        assert np.array_equal(timesteps, hooked), mode
    assert np.allclose(result.frame[result.frame[MODE] == "paired"][RATIO], 1.1, rtol=1e-5)  # free: own trajectories
    assert result.summary["config"]["resolved"]["scheduler_shift"] == dict(attribute="flow_shift", shift=s,
                                                                           dynamic=False, overridden=True)
    # two samples per call: with one, tiny Wan's base against itself is ~1e-7 off zero with or without --shift
    itself = compare(CompareConfig(tuned=str(folder), base=str(folder), pipeline=str(folder), shift=s,
                                   prompts=("a fox", "a cat"), seeds=(0,), device="cpu", dtype="float32", **probe))
    assert itself.inflation == 0.0 and (itself.frame[RATIO] == 1.0).all()


def test_ltx2_shifts_the_audio_scheduler_it_copies_too(tmp_path):
    """LTX-2 deep-copies pipe.scheduler for the audio latents inside the call: with --shift, both streams sample
    exactly as a folder whose scheduler_config.json holds that shift (written by hand; diffusers loads it itself)."""
    import shutil

    from normscope.builders.tiny import save_tiny
    from normscope.builders.tiny_new_families import tiny_ltx2_pipeline
    from normscope.measure.table import NORM_BASE, NORM_TUNED, STREAM

    folder = save_tiny(tiny_ltx2_pipeline(seed=0), tmp_path / "ltx2")
    by_hand = tmp_path / "ltx2-shift2"
    shutil.copytree(folder, by_hand)
    config = by_hand / "scheduler" / "scheduler_config.json"
    shipped = json.loads(config.read_text())
    assert shipped["shift"] == 1.0 and not shipped["use_dynamic_shifting"]
    config.write_text(json.dumps({**shipped, "shift": 2.0}))
    probe = dict(guidance=3.0, height=32, width=32, num_frames=5, max_sequence_length=16, steps=2, prompts=("a fox",),
                 seeds=(0,), device="cpu", dtype="float32")
    ours = compare(CompareConfig(tuned=str(folder), pipeline=str(folder), shift=2.0, **probe)).frame
    theirs = compare(CompareConfig(tuned=str(by_hand), pipeline=str(by_hand), **probe)).frame
    assert set(ours[STREAM]) == {"video", "audio"}
    for column in (TIMESTEP, SIGMA, NORM_BASE, NORM_TUNED):
        assert np.array_equal(ours[column].to_numpy(), theirs[column].to_numpy()), column
    hand = shifted(np.linspace(1.0, 1 / 2, 2), 2.0)  # LTX2Pipeline passes sigmas = linspace(1, 1/N, N)
    assert np.allclose(steps_of(ours)[1], hand, rtol=1e-6)
    plain = compare(CompareConfig(tuned=str(folder), pipeline=str(folder), **probe)).frame  # the test can fail
    assert not np.array_equal(plain[NORM_BASE].to_numpy(), ours[NORM_BASE].to_numpy())


@pytest.mark.parametrize("name", sorted(SHIFT_ATTRIBUTES))
def test_every_table_row_names_the_attribute_its_scheduler_shifts_with(name):
    """For each scheduler class of the table, the named attribute really moves diffusers' schedule: the rebuilt
    scheduler samples what the class built with that value by hand samples."""
    import diffusers

    from normscope.load.scheduler_shift import scheduler_shift
    from normscope.load.scheduler_shift import shifted as rebuilt

    rule = SHIFT_ATTRIBUTES[name]
    flags = {rule.needs: True, "prediction_type": "flow_prediction"} if rule.needs else {}
    cls = getattr(diffusers, name)
    shipped = cls(**flags, **{rule.attribute: 3.0})
    ours, by_hand = rebuilt(shipped, 1.5), cls(**flags, **{rule.attribute: 1.5})
    for scheduler in (shipped, ours, by_hand):
        scheduler.set_timesteps(4)
    assert torch.equal(ours.sigmas, by_hand.sigmas) and not torch.equal(ours.sigmas, shipped.sigmas)
    assert scheduler_shift(ours, 1.5)["shift"] == 1.5 and scheduler_shift(shipped)["shift"] == 3.0


# ---------------------------------------------------------------- refusals, before any weight loads


def test_dynamic_shifting_refuses_shift_before_loading(pipelines, no_weight_loads):
    folder = pipelines["flux"]  # FLUX computes its shift from the image size (use_dynamic_shifting)
    result = runner.invoke(app, ["compare", str(folder), str(folder), "--shift", "2", "--steps", "1", "--seeds", "0",
                                 "--prompt", "a fox", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    line = " ".join(result.stderr.split())
    assert "--shift 2 does not apply" in line and "use_dynamic_shifting" in line and "drop --shift" in line


def test_a_scheduler_without_a_known_shift_is_refused(pipelines, tmp_path, no_weight_loads):
    import shutil

    folder = tmp_path / "sd3-ddim"
    shutil.copytree(pipelines["sd3"], folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "DDIMScheduler"}))
    result = runner.invoke(app, ["profile", str(folder), "--out", str(tmp_path / "ref"), "--shift", "2",
                                 "--device", "cpu"])
    assert result.exit_code == 2 and "has no static shift" in result.stderr, result.output


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_shift_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="--shift must be a finite number > 0"):
        ProbeConfig(shift=value)


def test_cli_refuses_zero_shift_in_one_line():
    result = runner.invoke(app, ["compare", "a", "b", "--shift", "0"])
    assert result.exit_code == 2 and "--shift must be a finite number > 0" in result.stderr


# ---------------------------------------------------------------- run folders, references, presets


def test_resume_with_another_shift_measures_again(pipelines, scaled, tmp_path):
    folder = pipelines["sd3"]
    config = dict(tuned=str(scaled("sd3", 1.1)), base=str(folder), pipeline=str(folder), prompts=("a fox", "a cat"),
                  seeds=(0,), device="cpu", dtype="float32", batch_size=1, out=tmp_path / "run", **SD3_PROBE)
    with pytest.raises(KeyboardInterrupt):
        compare(CompareConfig(shift=1.0, **config), StopAfter(STEPS + 1))  # one batch saved, the second dies
    assert len(list((tmp_path / "run" / ".partial").glob("*.safetensors"))) == 1
    reporter = StopAfter(10**6)
    result = compare(CompareConfig(shift=5.0, **config), reporter)
    assert any("starting afresh" in n for n in reporter.notes) and not any("resuming" in n for n in reporter.notes)
    assert np.allclose(steps_of(result.frame)[1], sd3_sigmas(5.0), rtol=1e-6)  # no batch of the shift-1 run reused
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["shift"] == 5.0 and summary["config"]["resolved"]["scheduler_shift"]["shift"] == 5.0


def test_profile_stores_the_shift_and_check_compares_like_with_like(pipelines, scaled, tmp_path):
    folder = pipelines["sd3"]
    common = ["--prompt", "a fox", "--seeds", "0", "--steps", str(STEPS), "--height", "16", "--width", "16",
              "--max-sequence-length", "24", "--guidance", "4.5", "--device", "cpu", "--dtype", "float32"]
    made = runner.invoke(app, ["profile", str(folder), "--out", str(tmp_path / "ref"), "--shift", "5", "--no-dtype-check",
                               *common])
    assert made.exit_code == 0, made.output
    reference = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert reference["config"]["probe"]["shift"] == 5.0
    assert reference["config"]["resolved"]["scheduler_shift"]["shift"] == 5.0
    assert np.allclose([row["sigma"] for row in reference["per_step"]["guided"]], sd3_sigmas(5.0), rtol=1e-6)
    same_weights = str(scaled("sd3", 1.0))
    other = runner.invoke(app, ["check", same_weights, "--reference", str(tmp_path / "ref"), "--shift", "3"])
    assert other.exit_code == 2 and "--shift 3.0 (reference: 5.0)" in " ".join(other.stderr.split()), other.output
    same = runner.invoke(app, ["check", same_weights, "--reference", str(tmp_path / "ref"), "--format", "json",
                               "--device", "cpu", "--dtype", "float32"])
    assert same.exit_code == 0, same.output  # the stored probe's shift is sampled again: the base against itself
    assert json.loads(same.stdout)["checkpoints"][0]["inflation"] == 0.0


def test_live_check_samples_with_the_shift(pipelines, scaled):
    from normscope.commands.check import CheckConfig, check

    folder = pipelines["sd3"]
    result = check(CheckConfig(paths=(str(folder), str(scaled("sd3", 1.1))), pipeline=str(folder), max_inflation=0.05,
                               shift=5.0, prompts=("a fox",), seeds=(0,), device="cpu", dtype="float32", **SD3_PROBE))
    summary = result.checkpoints[0].summary
    assert summary["config"]["resolved"]["scheduler_shift"]["shift"] == 5.0
    assert np.allclose([row["sigma"] for row in summary["per_step"]], sd3_sigmas(5.0), rtol=1e-6)
    assert result.checkpoints[0].inflation == pytest.approx(0.1, abs=1e-4) and result.exit_code == 1


@pytest.mark.parametrize("mode", ["free", "paired"])
def test_sweep_samples_with_the_shift_and_a_new_shift_measures_again(mode, pipelines, tmp_path):
    from normscope.builders.tiny import tiny_sd3_pipeline
    from normscope.commands.sweep import SweepConfig, sweep

    pipe = tiny_sd3_pipeline(seed=0)
    with torch.no_grad():
        pipe.transformer.proj_out.weight.mul_(1.1)
        pipe.transformer.proj_out.bias.mul_(1.1)
    pipe.transformer.save_pretrained(tmp_path / "run" / "checkpoint-10" / "transformer")
    common = dict(run_dir=tmp_path / "run", out=tmp_path / "sweep", pipeline=str(pipelines["sd3"]), mode=mode,
                  prompts=("a fox",), seeds=(0,), device="cpu", dtype="float32", **SD3_PROBE)
    for s in (5.0, 1.0):  # the second sweep, in the same --out, must not reuse anything of the first
        notes = StopAfter(10**6)
        table = sweep(SweepConfig(shift=s, **common), notes)
        assert not any("finished earlier" in n or "base profile reused" in n for n in notes.notes), s
        summary = json.loads((tmp_path / "sweep" / "checkpoint-10" / "summary.json").read_text())
        assert summary["config"]["resolved"]["scheduler_shift"]["shift"] == s
        sigmas = np.array([row["sigma"] for row in summary["per_step"]])
        assert np.allclose(sigmas, sd3_sigmas(s), rtol=1e-6)
        if mode == "paired":
            assert table["inflation"].iloc[0] == pytest.approx(0.1, abs=1e-4)
        else:
            base = json.loads((tmp_path / "sweep" / "base" / "reference.json").read_text())
            assert base["config"]["probe"]["shift"] == s


def test_flow_factory_wan_preset_carries_its_shift():
    assert PRESETS["flow-factory-wan2.1"].shift == 3.0
    assert "t2v.yaml:91" in PRESETS["flow-factory-wan2.1"].source
    assert ProbeConfig(preset="flow-factory-wan2.1").shift == 3.0
    assert ProbeConfig(preset="flow-factory-wan2.1", shift=5.0).shift == 5.0  # an explicit option wins
