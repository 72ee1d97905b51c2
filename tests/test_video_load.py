"""Two-expert checkpoints (Wan2.2-A14B): which experts a checkpoint changes, and what the others run with."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner
from video_factory import flow_factory_checkpoint, save_two_expert_lora

from normscope.cli import app
from normscope.errors import CheckpointError
from normscope.load import find_checkpoint, load_models, load_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def wan22(video_pipelines):
    return video_pipelines["wan22-euler"]


def test_flow_factory_folder_resolves_one_part_per_expert(wan22, tmp_path):
    both = find_checkpoint(flow_factory_checkpoint(wan22, tmp_path / "both" / "checkpoint-10", {"transformer": 1.1, "transformer_2": 1.1}), "TUNED")
    assert both.experts == ("transformer", "transformer_2") and both.kind == "transformer"
    assert [p.path.name for p in both.parts] == ["transformer", "transformer_2"]
    low = find_checkpoint(flow_factory_checkpoint(wan22, tmp_path / "low" / "checkpoint-10", {"transformer_2": 1.1}), "TUNED")
    assert low.experts == ("transformer_2",) and low.part("transformer") is None
    # the expert's folder passed alone belongs to that expert
    assert find_checkpoint(tmp_path / "low" / "checkpoint-10" / "transformer_2", "TUNED").experts == ("transformer_2",)


def test_expert_left_out_comes_from_the_base_and_is_said(wan22, tmp_path):
    ckpt = flow_factory_checkpoint(wan22, tmp_path / "checkpoint-10", {"transformer_2": 1.1})
    pipe = load_pipeline(str(wan22), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(ckpt), str(wan22))
    assert loaded.tuned.modules["transformer"] is loaded.base.modules["transformer"] is pipe.transformer
    assert loaded.tuned.modules["transformer_2"] is not pipe.transformer_2
    assert any("does not change transformer:" in note for note in loaded.notes)


def test_lora_with_transformer_2_keys_keeps_one_copy_of_each_expert(wan22, tmp_path):
    pipe = load_pipeline(str(wan22), torch.float32, "cpu")
    path, _ = save_two_expert_lora(pipe, tmp_path / "pytorch_lora_weights.safetensors")
    assert find_checkpoint(path, "TUNED").experts == ("transformer", "transformer_2")
    loaded = load_models(pipe, None, str(path), str(wan22))
    for expert in ("transformer", "transformer_2"):
        assert loaded.tuned.modules[expert] is loaded.base.modules[expert] is getattr(pipe, expert)
    assert any(".lora_A." in name for name, _ in pipe.transformer_2.named_parameters())
    assert any("alpha 8 from header metadata" in note for note in loaded.notes)


def test_second_expert_refused_on_a_one_transformer_pipeline(video_pipelines, tmp_path):
    wan21 = video_pipelines["wan21-euler"]
    ckpt = flow_factory_checkpoint(video_pipelines["wan22-euler"], tmp_path / "checkpoint-10", {"transformer_2": 1.1})
    pipe = load_pipeline(str(wan21), torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="transformer_2, which WanPipeline does not have"):
        load_models(pipe, None, str(ckpt), str(wan21))


def test_inspect_lists_the_experts_a_checkpoint_touches(wan22, tmp_path):
    ckpt = flow_factory_checkpoint(wan22, tmp_path / "checkpoint-10", {"transformer_2": 1.1})
    result = runner.invoke(app, ["inspect", str(ckpt), "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"experts": [\n    "transformer_2"\n  ]' in result.stdout


def test_image_to_video_refusals_are_one_line(video_pipelines, tmp_path, monkeypatch):
    from video_factory import build_more, first_frame

    i2v = build_more("i2v22", tmp_path / "i2v")
    probe = ["--steps", "2", "--height", "16", "--width", "16", "--num-frames", "5", "--prompt", "a fox", "--seeds", "0",
             "--device", "cpu", "--dtype", "float32"]
    cases = [
        ([str(i2v), str(i2v)], "edits or animates an image and none was given: pass --image FILE"),
        ([str(video_pipelines["wan21-euler"]), str(video_pipelines["wan21-euler"]), "--image", str(first_frame(tmp_path / "f.png"))],
         "WanPipeline does not take an image: drop --image"),
        ([str(i2v), str(i2v), "--image", str(tmp_path / "missing.png")], "--image"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["compare", *args, *probe])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ftfy" else real(name, *a))
    result = runner.invoke(app, ["compare", str(i2v), str(i2v), *probe, "--image", str(tmp_path / "f.png")])
    assert result.exit_code == 2 and "imports ftfy when it runs and ftfy is not installed: pip install ftfy" in result.output
