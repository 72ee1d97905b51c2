"""The CLI through Typer's CliRunner: outputs, formats and the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from normscope.builders.tiny import save_tiny, tiny_sd3_pipeline
from normscope.cli import app

runner = CliRunner()
PROBE = ["--steps", "3", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0,1",
         "--prompt", "a red fox", "--prompt", "a blue car", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compare_writes_the_run_folder_and_a_table(pipelines, scaled, tmp_path):
    result = run("compare", pipelines["sd3"], scaled("sd3", 1.1), *PROBE, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "inflation +10.00 %" in result.stdout
    stdout = " ".join(result.stdout.split())
    assert "(sigma-integral;" in stdout and "CI resamples prompts" in stdout  # the headline says what it is
    assert "other estimate: step mean +10.00 %" in stdout
    for name in ("norms.csv", "summary.json", "profile.png"):
        assert (tmp_path / name).stat().st_size > 0
    header = (tmp_path / "norms.csv").read_text().splitlines()[0].split(",")
    for column in ("mode", "prompt_id", "prompt", "seed", "step", "timestep", "sigma", "branch",
                   "norm_base", "norm_tuned", "ratio", "hinge", "cosine", "mse"):
        assert column in header
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["inflation"] == pytest.approx(0.1, abs=1e-4)
    for key in ("inflation_ci", "nonfinite", "per_step", "config", "versions"):
        assert key in summary
    assert summary["headline"] == "sigma_integral" and set(summary["estimates"]) == {"sigma_integral", "step_mean"}
    assert summary["ci"]["unit"] == "prompt" and summary["ci"]["clusters"] == 2  # two --prompt in PROBE
    for key in ("step", "sigma", "ratio", "ratio_ci", "hinge_rate", "norm_base", "norm_tuned"):
        assert key in summary["per_step"][0]


def test_json_and_csv_formats_go_to_stdout(pipelines, scaled):
    out = run("compare", pipelines["flux"], scaled("flux", 0.9), *PROBE, "--format", "json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["inflation"] == pytest.approx(-0.1, abs=1e-4)
    out = run("compare", pipelines["flux"], scaled("flux", 0.9), *PROBE, "--format", "csv")
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("step,") and len(lines) == 4


def test_tuned_inside_a_pipeline_folder_finds_its_pipeline(pipelines):
    transformer_dir = pipelines["sd3"] / "transformer"
    result = run("compare", transformer_dir, transformer_dir, *PROBE, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["pipeline_source"] == str(pipelines["sd3"])


def test_sharded_transformer_folder_is_accepted(pipelines, tmp_path):
    pipe = tiny_sd3_pipeline(seed=0)
    with __import__("torch").no_grad():
        pipe.transformer.proj_out.weight.mul_(1.1)
        pipe.transformer.proj_out.bias.mul_(1.1)
    pipe.transformer.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    result = run("compare", pipelines["sd3"], tmp_path / "sharded", *PROBE, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["inflation"] == pytest.approx(0.1, abs=1e-4)


def _one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    assert text.startswith("error:")
    for needle in needles:
        assert needle in text, text
    return text


def test_missing_path(pipelines, tmp_path):
    _one_error_line(run("compare", pipelines["sd3"], tmp_path / "nope.safetensors", *PROBE), "does not exist")


def test_truncated_safetensors(pipelines, scaled, tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(scaled("sd3", 1.1).read_bytes()[:1000])
    _one_error_line(run("compare", pipelines["sd3"], bad, *PROBE), "not a valid safetensors file")


def test_weights_of_another_architecture_name_the_keys(pipelines, scaled):
    _one_error_line(run("compare", pipelines["sd3"], scaled("flux", 1.1), *PROBE),
                    "does not fit", "missing keys", "unexpected keys", "--pipeline")


def test_shape_mismatch_is_named(pipelines, tmp_path):
    from conftest import scaled_state_dict
    from safetensors.torch import save_file

    state = scaled_state_dict(pipelines["sd3"], 1.0)
    state["proj_out.bias"] = state["proj_out.bias"][:2].contiguous()
    save_file(state, str(tmp_path / "wrong.safetensors"))
    _one_error_line(run("compare", pipelines["sd3"], tmp_path / "wrong.safetensors", *PROBE),
                    "shape mismatches", "proj_out.bias")


def test_pickles_are_refused(pipelines, tmp_path):
    evil = tmp_path / "model.bin"
    evil.write_bytes(b"not read")
    _one_error_line(run("compare", pipelines["sd3"], evil, *PROBE), "pickle")


def test_empty_prompt_file(pipelines, scaled, tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    _one_error_line(run("compare", pipelines["sd3"], scaled("sd3", 1.1), "--prompts", empty, "--steps", "2"),
                    "holds no prompts")


def test_no_pipeline_anywhere(scaled):
    _one_error_line(run("compare", scaled("sd3", 1.1), scaled("sd3", 1.1), *PROBE), "--pipeline")


def test_offline_hub_id_says_it_cannot_be_fetched(scaled, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_error_line(run("compare", scaled("sd3", 1.1), scaled("sd3", 1.1), "--pipeline", "someone/not-here", *PROBE),
                    "cannot fetch")


def test_nan_weights_exit_3(pipelines, tmp_path):
    from conftest import scaled_state_dict
    from safetensors.torch import save_file

    state = scaled_state_dict(pipelines["sd3"], 1.0)
    state["proj_out.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    result = run("compare", pipelines["sd3"], tmp_path / "nan.safetensors", *PROBE, "--drive", "base")
    assert result.exit_code == 3, result.output
    assert "NaN/Inf" in result.stderr


def test_help_is_instant_and_imports_no_torch():
    code = "import sys; from normscope.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    # the top-level API: every job's config and function, imported only when first used
    code = ("import sys, normscope; assert 'torch' not in sys.modules; "
            "from normscope import CompareConfig, compare, ProfileConfig, profile, CheckConfig, check, SweepConfig, sweep, "
            "ReportConfig, report, InspectConfig, inspect_checkpoint, DemoConfig, run_demo; "
            "import normscope.commands.compare as c, normscope.commands.check as k; "
            "assert compare is c.compare and check is k.check and callable(run_demo)")
    subprocess.run([sys.executable, "-c", code], check=True)
    result = run("--help")
    assert result.exit_code == 0 and "compare" in result.stdout


def test_demo_runs_on_the_bundled_digits_model(tmp_path):
    result = run("demo", "--out", tmp_path, "--format", "json")
    assert result.exit_code == 0, result.output
    demo = json.loads(result.stdout)
    rows = {row["model"]: row for row in demo["rows"]}
    assert set(rows) == {"base", "awm", "awm-normguard", "nft", "nft-normguard", "dpo", "dpo-normguard",
                         "awm + inference rescale"}
    for name in ("awm", "awm-normguard", "nft", "nft-normguard", "dpo", "dpo-normguard"):
        for file in ("summary.json", "norms.csv", "profile.png"):
            assert (tmp_path / name / file).is_file()
        assert rows[name]["paired_ci"][0] <= rows[name]["paired"] <= rows[name]["paired_ci"][1]
    rescaled = rows["awm + inference rescale"]  # same weights, other samples; the model stays inflated
    assert rescaled["applied"] == 0.0 and rescaled["paired"] > 0.02 and rescaled["reward"] != rows["awm"]["reward"]
    assert [c["step"] for c in demo["series"]["checkpoints"]] == [10, 20, 30, 40]
    assert (tmp_path / "inflation_overlay.png").is_file()
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "figures" / "nft_maps.png").is_file()
    assert rows["awm"]["grid_score"] is not None and rows["awm"]["score_diff"] is not None  # --maps and --scorer ran
    table = run("demo", "--out", tmp_path / "again", "--no-report")
    assert table.exit_code == 0 and "awm-normguard" in table.stdout and "dpo-normguard" in table.stdout


def test_a_saved_pipeline_loads_from_any_folder(tmp_path):
    save_tiny(tiny_sd3_pipeline(seed=3), tmp_path / "p")
    result = run("compare", tmp_path / "p", tmp_path / "p", *PROBE, "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["inflation"] == 0.0
