"""normscope sweep: checkpoints in training order, the base profiled once, resumable."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from normscope.builders.tiny import tiny_sd3_pipeline
from normscope.cli import app
from normscope.commands.compare import compare
from normscope.commands.sweep import SweepConfig, sweep

runner = CliRunner()
PROBE = dict(prompts=("a red fox", "two apples", "a blue car"), seeds=(0, 1), steps=3, height=16, width=16,
             max_sequence_length=24, guidance=4.5, device="cpu", dtype="float32")
FACTORS = {50: 1.0, 150: 1.1, 100: 1.05}  # written out of order: the sweep must sort by step


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's folder: checkpoints/checkpoint-N/transformer/ written by save_pretrained."""
    import torch

    root = tmp_path_factory.mktemp("run")
    for step, factor in FACTORS.items():
        pipe = tiny_sd3_pipeline(seed=0)
        with torch.no_grad():
            pipe.transformer.proj_out.weight.mul_(factor)
            pipe.transformer.proj_out.bias.mul_(factor)
        pipe.transformer.save_pretrained(root / "checkpoints" / f"checkpoint-{step}" / "transformer")
        (root / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"ignored")
    return root


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.notes, self.left = [], stop_after

    def begin(self, total):
        pass

    def note(self, message):
        self.notes.append(message)

    def advance(self, steps=1):
        if self.left is not None:
            self.left -= steps
            if self.left < 0:
                raise KeyboardInterrupt


def test_free_sweep_orders_by_step_marks_the_gate_and_resumes(run_dir, pipelines, tmp_path):
    config = SweepConfig(run_dir=run_dir, out=tmp_path, pipeline=str(pipelines["sd3"]), gate=0.07, **PROBE)
    table = sweep(config, Recorder())
    assert list(table["step"]) == [50, 100, 150]
    assert table["inflation"].iloc[0] == 0.0
    assert table["inflation"].iloc[0] < table["inflation"].iloc[1] < table["inflation"].iloc[2]
    assert list(table["crosses_gate"]) == [False, False, True]
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["first_crossing"]["step"] == 150
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "base" / "reference.json").is_file()
    again = Recorder()
    rerun = sweep(config, again)
    assert rerun["inflation"].tolist() == table["inflation"].tolist()
    assert sum("finished earlier, skipped" in n for n in again.notes) == 3
    assert any("base profile reused" in n for n in again.notes)


def test_free_sweep_equals_a_live_free_compare(run_dir, pipelines, tmp_path):
    table = sweep(SweepConfig(run_dir=run_dir, out=tmp_path, pipeline=str(pipelines["sd3"]), **PROBE))
    live = compare(__import__("normscope.config", fromlist=["CompareConfig"]).CompareConfig(
        base=str(pipelines["sd3"]), tuned=str(run_dir / "checkpoints" / "checkpoint-100"), mode="free", **PROBE))
    assert table["inflation"].iloc[1] == pytest.approx(live.inflation, abs=1e-6)


def test_paired_sweep_known_answers(run_dir, pipelines, tmp_path):
    table = sweep(SweepConfig(run_dir=run_dir, out=tmp_path, pipeline=str(pipelines["sd3"]), mode="paired", **PROBE))
    assert table["inflation"].tolist() == pytest.approx([0.0, 0.05, 0.1], abs=1e-4)


def test_killed_sweep_loses_at_most_the_checkpoint_in_flight(run_dir, pipelines, tmp_path):
    config = SweepConfig(run_dir=run_dir, out=tmp_path, pipeline=str(pipelines["sd3"]), **PROBE)
    # base profile (1 batch x 3 steps) + checkpoint-50 (3 steps) finish; checkpoint-100 dies midway
    with pytest.raises(KeyboardInterrupt):
        sweep(config, Recorder(stop_after=7))
    assert (tmp_path / "checkpoint-50" / "summary.json").is_file()
    assert not (tmp_path / "checkpoint-100" / "summary.json").exists()
    notes = Recorder()
    sweep(config, notes)
    assert any(n.startswith("checkpoint-50: finished earlier") for n in notes.notes)
    assert not any(n.startswith("checkpoint-100: finished earlier") for n in notes.notes)


def test_cli_sweep_and_bad_run_dir(run_dir, pipelines, tmp_path):
    args = ["sweep", str(run_dir), "--out", str(tmp_path), "--pipeline", str(pipelines["sd3"]), "--steps", "3",
            "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0", "--prompt", "a fox",
            "--device", "cpu", "--gate", "0.07", "--format", "csv"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith("step,checkpoint,inflation")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["sweep", str(empty), "--out", str(tmp_path / "o"), "--pipeline", str(pipelines["sd3"])])
    assert result.exit_code == 2 and "no checkpoint-N folders" in result.stderr


class Counter:
    """A Reporter that counts: the totals it was told and the steps it was advanced."""

    def __init__(self) -> None:
        self.totals, self.advanced = [], 0

    def begin(self, total_steps):
        self.totals.append(total_steps)

    def advance(self, steps=1):
        self.advanced += steps

    def note(self, message):
        pass


@pytest.mark.parametrize("mode, maps, calls", [("free", False, 1), ("paired", False, 1), ("paired", True, 3)])
def test_sweep_progress_total_is_the_number_of_advances(run_dir, pipelines, tmp_path, mode, maps, calls):
    counter = Counter()
    sweep(SweepConfig(run_dir=run_dir, out=tmp_path, pipeline=str(pipelines["sd3"]), mode=mode, batch_size=4,
                      maps=maps, **PROBE), counter)
    # 6 samples in batches of 4 = 2 batches of 3 steps, each making `calls` pipeline calls per checkpoint (3 of
    # them; --maps adds free mode's two), and, free, one for the base profile
    assert counter.totals == [2 * 3 * (3 * calls + (mode == "free"))]
    assert counter.advanced == counter.totals[0]


@pytest.mark.parametrize("mode", ["free", "paired"])
def test_wan_sweep_progress_counts_each_step_once(video_pipelines, tmp_path, mode):
    """Two experts and UniPC: still one advance per denoising step of each call."""
    from video_factory import VIDEO_PROBE, flow_factory_checkpoint

    pipe_dir = video_pipelines["wan22-unipc"]
    for step, factor in ((10, 1.05), (20, 1.1)):
        flow_factory_checkpoint(pipe_dir, tmp_path / "run" / "checkpoints" / f"checkpoint-{step}",
                                {"transformer": factor, "transformer_2": factor})
    counter = Counter()
    sweep(SweepConfig(run_dir=tmp_path / "run", out=tmp_path / "out", pipeline=str(pipe_dir), mode=mode,
                      prompts=("a red fox",), seeds=(0,), device="cpu", dtype="float32", **VIDEO_PROBE), counter)
    assert counter.totals == [VIDEO_PROBE["steps"] * (2 + (mode == "free"))]
    assert counter.advanced == counter.totals[0]


@pytest.mark.parametrize("mode", ["free", "paired"])
def test_editing_the_prompts_file_in_place_redoes_the_sweep(run_dir, pipelines, tmp_path, mode):
    """Resume keys on the prompt texts, not the file's path: old numbers never stand under new prompts."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\ntwo apples\n")
    probe = {k: v for k, v in PROBE.items() if k != "prompts"}
    config = SweepConfig(run_dir=run_dir, out=tmp_path / "sweep", pipeline=str(pipelines["sd3"]), mode=mode,
                         prompts_file=prompts, **probe)
    sweep(config, Recorder())
    prompts.write_text("a blue car\na sign that says OPEN\n")  # same path, other texts
    again = Recorder()
    rerun = sweep(config, again)
    assert not any("finished earlier, skipped" in n for n in again.notes)
    assert not any("base profile reused" in n for n in again.notes)
    fresh = sweep(SweepConfig(run_dir=run_dir, out=tmp_path / "fresh", pipeline=str(pipelines["sd3"]), mode=mode,
                              prompts_file=prompts, **probe), Recorder())
    assert rerun["inflation"].tolist() == fresh["inflation"].tolist()


def test_a_half_published_checkpoint_folder_is_measured_again_not_skipped(run_dir, pipelines, tmp_path):
    """A kill between the new summary.json landing and the manifest being written leaves a folder with no finished
    run: the rerun measures that checkpoint again instead of trusting its summary."""
    config = SweepConfig(run_dir=run_dir, out=tmp_path, pipeline=str(pipelines["sd3"]), **PROBE)
    first = sweep(config)
    (tmp_path / "checkpoint-50" / "manifest.json").unlink()
    notes = Recorder()
    again = sweep(config, notes)
    assert not any(n.startswith("checkpoint-50: finished earlier") for n in notes.notes)
    assert any(n.startswith("checkpoint-100: finished earlier") for n in notes.notes)
    assert (tmp_path / "checkpoint-50" / "manifest.json").is_file()
    assert again["inflation"].tolist() == first["inflation"].tolist()
