"""Hooks never outlive the call; non-finite velocities are counted; an interrupted run resumes."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import scaled_state_dict
from reporters import StopAfter
from safetensors.torch import save_file

from normscope.commands.compare import compare
from normscope.load import load_models, load_pipeline
from normscope.measure.capture import capture


class Boom(RuntimeError):
    pass


def test_hooks_are_removed_even_when_the_call_fails(pipelines, scaled):
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(scaled("sd3", 1.1)), str(pipelines["sd3"]))
    base, tuned = loaded.base, loaded.tuned
    with pytest.raises(Boom):
        with capture(pipe, tuned, base):
            assert pipe.transformer is tuned.module and tuned.module._forward_hooks
            raise Boom()
    assert pipe.transformer is base.module
    assert not tuned.module._forward_hooks and not base.module._forward_hooks
    assert "step" not in vars(pipe.scheduler)


@pytest.mark.parametrize("drive", ["base", "tuned"])
def test_nan_velocities_are_counted_and_end_the_run_in_one_line(drive, pipelines, tmp_path, config_for):
    """Non-finite values are found before the CFG-rule check: a NaN checkpoint is named, not the pipeline."""
    import json

    from normscope.errors import NoMeasurementError

    state = scaled_state_dict(pipelines["sd3"], 1.0)
    state["proj_out.bias"][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    with pytest.raises(NoMeasurementError, match=r"^TUNED produced NaN/Inf velocities at every step of every sample") as info:
        compare(config_for("sd3", path, drive=drive, out=tmp_path / "run", figure=False))
    assert "\n" not in str(info.value) and info.value.exit_code == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    guided_rows = 3 * 2 * 4  # prompts x seeds x steps
    assert summary["nonfinite"] == guided_rows
    assert summary == info.value.summary  # a notebook gets the CLI's message and the counts, not inflation=None
    assert summary["inflation"] is None and summary["inflation_ci"] == [None, None]


def test_interrupted_run_resumes_and_writes_the_same_bytes(scaled, config_for, tmp_path):
    tuned = scaled("sd3", 1.1)
    compare(config_for("sd3", tuned, batch_size=2, mode="both", out=tmp_path / "whole"))
    config = config_for("sd3", tuned, batch_size=2, mode="both", out=tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        compare(config, StopAfter(steps=9))  # two batches of 4 steps finish, the third dies
    assert len(list((tmp_path / "cut" / ".partial").glob("*.safetensors"))) == 2
    reporter = StopAfter(steps=10**6)
    compare(config, reporter)
    assert any("resuming: 2 finished" in n for n in reporter.notes)
    assert (tmp_path / "cut" / "norms.csv").read_bytes() == (tmp_path / "whole" / "norms.csv").read_bytes()
    assert not (tmp_path / "cut" / ".partial").exists()


def test_changed_options_start_afresh(scaled, config_for, tmp_path):
    tuned = scaled("sd3", 1.1)
    with pytest.raises(KeyboardInterrupt):
        compare(config_for("sd3", tuned, batch_size=2, out=tmp_path), StopAfter(steps=5))
    reporter = StopAfter(steps=10**6)
    compare(config_for("sd3", tuned, batch_size=2, steps=3, out=tmp_path), reporter)
    assert any("starting afresh" in n for n in reporter.notes)


def _interrupt_after_one_batch(config) -> None:
    with pytest.raises(KeyboardInterrupt):
        compare(config, StopAfter(steps=5))  # batch 1 (4 steps) is saved, batch 2 dies
    assert len(list((config.out / ".partial").glob("*.safetensors"))) == 1


def test_prompts_file_edited_in_place_does_not_reuse_old_batches(scaled, config_for, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\ntwo green apples\n")
    tuned = scaled("sd3", 1.1)
    config = config_for("sd3", tuned, prompts=(), prompts_file=prompts, batch_size=2, out=tmp_path / "run")
    _interrupt_after_one_batch(config)
    prompts.write_text("a sign that says OPEN\na blue car\n")  # same file, same length, other prompts
    reporter = StopAfter(steps=10**6)
    resumed = compare(config, reporter)
    assert any("starting afresh" in n for n in reporter.notes)
    fresh = compare(config_for("sd3", tuned, prompts=("a sign that says OPEN", "a blue car"), batch_size=2))
    assert resumed.frame.equals(fresh.frame)


def test_pipeline_transformer_rewritten_does_not_reuse_old_batches(pipelines, scaled, config_for, tmp_path):
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(pipelines["sd3"], pipe_dir)
    tuned = scaled("sd3", 1.1)
    config = config_for("sd3", tuned, base=None, pipeline=str(pipe_dir), batch_size=2, out=tmp_path / "run")
    _interrupt_after_one_batch(config)
    # BASE omitted: the pipeline's own transformer is the base; a new base under the same path
    save_file(scaled_state_dict(pipelines["sd3"], 1.05), str(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    reporter = StopAfter(steps=10**6)
    resumed = compare(config, reporter)
    assert any("starting afresh" in n for n in reporter.notes)
    fresh = compare(config_for("sd3", tuned, base=None, pipeline=str(pipe_dir), batch_size=2))
    assert resumed.frame.equals(fresh.frame)
    assert resumed.inflation == pytest.approx(1.1 / 1.05 - 1, abs=1e-4)


def test_unchanged_inputs_resume(scaled, config_for, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\ntwo green apples\n")
    config = config_for("sd3", scaled("sd3", 1.1), prompts=(), prompts_file=prompts, batch_size=2, out=tmp_path / "run")
    _interrupt_after_one_batch(config)
    prompts.write_text("a red fox in snow\ntwo green apples\n")  # rewritten with the same text: still valid
    reporter = StopAfter(steps=10**6)
    compare(config, reporter)
    assert any("resuming: 1 finished" in n for n in reporter.notes)


def test_offload_keeps_the_numbers_and_says_it_saves_nothing_on_cpu(scaled, config_for):
    plain = compare(config_for("sd3", scaled("sd3", 1.1), mode="both"))
    reporter = StopAfter(steps=10**6)
    offloaded = compare(config_for("sd3", scaled("sd3", 1.1), mode="both", offload=True), reporter)
    assert offloaded.frame.equals(plain.frame)
    assert any("saves nothing" in n for n in reporter.notes)


def test_offloaded_models_take_turns_and_are_handed_back(pipelines, scaled):
    from normscope.load.models import OffloadedModel

    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(scaled("sd3", 1.1)), str(pipelines["sd3"]), offload_to="cpu")
    assert isinstance(loaded.tuned, OffloadedModel) and isinstance(loaded.base, OffloadedModel)

    def where(model):
        return {p.device.type for p in model.module.parameters()}

    assert where(loaded.base) == where(loaded.tuned) == {"meta"}  # parked: no storage until a model computes
    with loaded.tuned.active(pipe):
        assert pipe.transformer is loaded.tuned.module
        assert where(loaded.tuned) == {"cpu"} and where(loaded.base) == {"meta"}
    assert pipe.transformer is loaded.base.module
    loaded.release()
    assert where(loaded.base) == where(loaded.tuned) == {"cpu"}


def test_only_the_main_process_resets_a_stale_store(tmp_path):
    from normscope.measure.distributed import Processes
    from normscope.runfolder.store import BatchStore

    barriers = []

    class Rank(Processes):
        def barrier(self) -> None:
            barriers.append(self.index)

    folder = tmp_path / ".partial"
    folder.mkdir()
    (folder / "meta.json").write_text('{"fingerprint": "old"}')
    batch = folder / "paired-00000.safetensors"
    batch.write_bytes(b"a batch of the old run")
    with pytest.raises(RuntimeError, match="main process"):  # rank 1 before rank 0 reset: it refuses, deletes nothing
        BatchStore(folder, "new", Rank(index=1, count=2))
    assert batch.exists()
    assert BatchStore(folder, "new", Rank(index=0, count=2)).reset and not batch.exists()
    batch.write_bytes(b"a batch rank 0 saved for the new run")
    assert not BatchStore(folder, "new", Rank(index=1, count=2)).reset and batch.exists()
    assert barriers == [1, 0, 1]  # every rank passes the barrier
