"""What a Wan run leaves behind: frames.csv and frames.png, the expert column, videos, and the report's strips."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner
from video_factory import flow_factory_checkpoint

from normscope.cli import app
from normscope.render.video import read_video

runner = CliRunner()
PROBE = ["--steps", "4", "--height", "16", "--width", "16", "--num-frames", "5", "--max-sequence-length", "16",
         "--guidance", "4", "--seeds", "0", "--prompt", "a red fox", "--prompt", "a blue car", "--device", "cpu",
         "--dtype", "float32"]


@pytest.fixture(scope="module")
def run(video_pipelines, tmp_path_factory):
    """A Wan2.2 (two experts, UniPC) run whose checkpoint changes only the low-noise expert."""
    pipe = video_pipelines["wan22-unipc"]
    root = tmp_path_factory.mktemp("video-run")
    tuned = flow_factory_checkpoint(pipe, root / "checkpoint-10", {"transformer_2": 1.1})
    out = root / "run"
    result = runner.invoke(app, ["compare", str(tuned), "--pipeline", str(pipe), *PROBE, "--mode", "both",
                                 "--save-images", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result


def test_run_folder_has_per_frame_table_and_figure(run):
    out, result = run
    frames = pd.read_csv(out / "frames.csv", keep_default_na=False)
    assert list(frames.columns) == ["mode", "drive", "prompt_id", "seed", "step", "sigma", "expert", "branch", "frame",
                                    "norm_base", "norm_tuned", "ratio"]
    # 2 modes x 2 samples x 4 steps x 3 branches x 2 latent frames
    assert len(frames) == 2 * 2 * 4 * 3 * 2
    assert set(frames["expert"]) == {"high_noise", "low_noise"}
    assert (frames[frames["expert"] == "high_noise"]["ratio"] == 1.0).all()
    assert Image.open(out / "frames.png").size[0] > 100
    norms = pd.read_csv(out / "norms.csv", keep_default_na=False)
    assert "expert" in norms.columns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experts"] == ["high_noise", "high_noise", "low_noise", "low_noise"]
    assert summary["expert_boundary_step"] == 2
    assert summary["config"]["num_frames"] == 5 and summary["config"]["resolved"]["num_frames"] == 5
    assert any("does not change transformer:" in n for n in summary["notes"])
    # the terminal table names the expert of each step, and the base-kept expert is said on stderr
    assert "low_noise" in result.stdout and "high-noise expert (steps 0-1): inflation +0.00 %" in result.stdout


def test_save_images_writes_each_samples_video(run):
    out, _ = run
    videos = sorted((out / "images").glob("*.webp"))
    assert [v.name for v in videos] == ["000-0-base.webp", "000-0-tuned.webp", "001-0-base.webp", "001-0-tuned.webp"]
    frames = read_video(videos[0])
    assert len(frames) == 5 and frames[0].size == (16, 16)
    # lossless: the frames read back are the pipeline's own decoded frames; the low-noise expert changed them
    base, tuned = (np.stack([np.asarray(f) for f in read_video(v)]) for v in videos[:2])
    assert base.shape == tuned.shape == (5, 16, 16, 3) and not np.array_equal(base, tuned)


def test_report_shows_frame_strips_and_inflation_by_frame(run, tmp_path):
    out, _ = run
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    figures = tmp_path / "report" / "figures"
    strips = Image.open(figures / "run_videos.png")
    assert strips.size == (5 * 96 + 4 * 2, 4 * 96 + 6)  # 5 frames side by side; base and tuned rows for 2 samples
    assert (figures / "run_frames.png").is_file()
    html = (tmp_path / "report" / "report.html").read_text()
    assert "videos, base vs tuned" in html and "inflation by latent frame" in html


def test_profile_stored_check_and_sweep_follow_wan(video_pipelines, tmp_path):
    """The other jobs run the same capture: a stored reference keeps --num-frames, and a sweep sees each expert."""
    from normscope.commands.check import CheckConfig, check
    from normscope.commands.profile import ProfileConfig, profile
    from normscope.commands.sweep import SweepConfig, sweep

    pipe = video_pipelines["wan22-euler"]
    probe = dict(prompts=("a red fox",), seeds=(0, 1), steps=3, height=16, width=16, num_frames=5, guidance=4.0,
                 max_sequence_length=16, device="cpu", dtype="float32")
    profile(ProfileConfig(base=str(pipe), out=tmp_path / "ref", **probe))
    run = tmp_path / "run"
    for step, factor in ((10, 1.0), (20, 1.1)):
        flow_factory_checkpoint(pipe, run / f"checkpoint-{step}", {"transformer": factor, "transformer_2": factor})
    result = check(CheckConfig(paths=(str(run / "checkpoint-10"), str(run / "checkpoint-20")), reference=tmp_path / "ref",
                               pipeline=str(pipe), max_inflation=0.05, device="cpu", dtype="float32"))
    same, inflated = result.checkpoints
    assert same.inflation == 0.0 and same.summary["config"]["num_frames"] == 5
    # free mode against the stored base: the first step sees the scaled field exactly
    assert inflated.summary["per_step"][0]["ratio"] == pytest.approx(1.1, rel=1e-5)
    assert result.exit_code == 1
    table = sweep(SweepConfig(run_dir=run, pipeline=str(pipe), out=tmp_path / "sweep", **probe))
    assert list(table["step"]) == [10, 20]
    assert table["inflation"].iloc[0] == 0.0 and table["inflation"].iloc[1] > 0.05


def test_interrupted_video_run_resumes_with_frames_and_experts(video_pipelines, tmp_path):
    """The per-frame norms and the expert of each step are stored with every finished batch."""
    from reporters import StopAfter

    from normscope.commands.compare import compare
    from normscope.config import CompareConfig

    pipe = video_pipelines["wan22-unipc"]
    tuned = flow_factory_checkpoint(pipe, tmp_path / "checkpoint-10", {"transformer_2": 1.1})
    fields = dict(tuned=str(tuned), pipeline=str(pipe), prompts=("a red fox", "a blue car"), seeds=(0, 1), steps=4,
                  height=16, width=16, num_frames=5, guidance=4.0, max_sequence_length=16, device="cpu",
                  dtype="float32", batch_size=2, mode="both", figure=False)
    compare(CompareConfig(out=tmp_path / "whole", **fields))
    config = CompareConfig(out=tmp_path / "cut", **fields)
    with pytest.raises(KeyboardInterrupt):
        compare(config, StopAfter(steps=9))  # two paired batches of 4 steps finish, the third call dies
    assert len(list((tmp_path / "cut" / ".partial").glob("*.safetensors"))) == 2
    compare(config, StopAfter(steps=10**6))
    for name in ("norms.csv", "frames.csv"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_scheduler_step_is_wrapped_with_its_signature_and_restored(video_pipelines):
    """UniPC's step keeps its signature inside capture (pipelines inspect it) and is the class's again after."""
    import inspect

    import torch

    from normscope.load import load_models, load_pipeline
    from normscope.measure.capture import capture

    pipe = load_pipeline(str(video_pipelines["wan22-unipc"]), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(video_pipelines["wan22-unipc"]), str(video_pipelines["wan22-unipc"]))
    before = inspect.signature(pipe.scheduler.step)
    with capture(pipe, loaded.tuned, loaded.base):
        assert "step" in vars(pipe.scheduler)
        assert inspect.signature(pipe.scheduler.step) == before
        assert pipe.transformer_2 is loaded.tuned.modules["transformer_2"]
    assert "step" not in vars(pipe.scheduler)
    assert pipe.transformer_2 is loaded.base.modules["transformer_2"]
    assert not pipe.transformer._forward_hooks and not pipe.transformer_2._forward_hooks


def test_rescale_ablation_on_video_has_frames_and_its_video(video_pipelines, tmp_path):
    """--rescale-to-base on Wan: the rescaled run is paired (tuned drives, rescaled), so +10 % on every frame."""
    from normscope.commands.compare import compare
    from normscope.config import CompareConfig

    pipe = video_pipelines["wan22-unipc"]
    tuned = flow_factory_checkpoint(pipe, tmp_path / "checkpoint-10", {"transformer": 1.1, "transformer_2": 1.1})
    result = compare(CompareConfig(tuned=str(tuned), pipeline=str(pipe), prompts=("a red fox",), seeds=(0,), steps=4,
                                   height=16, width=16, num_frames=5, guidance=4.0, max_sequence_length=16, device="cpu",
                                   dtype="float32", rescale_to_base=True, save_images=True, mode="free", out=tmp_path / "run",
                                   figure=False))
    rescaled = result.frames[result.frames["mode"] == "rescaled"]
    assert len(rescaled) and np.allclose(rescaled["ratio"], 1.1, rtol=1e-5, atol=0)
    assert len(read_video(tmp_path / "run" / "images" / "000-0-rescaled.webp")) == 5
