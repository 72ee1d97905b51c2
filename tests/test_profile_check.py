"""normscope profile (reference + thresholds) and normscope check (the CI gate), through the CLI."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
from conftest import scaled_state_dict
from safetensors.torch import save_file
from typer.testing import CliRunner

from normscope.cli import app

runner = CliRunner()
PROBE = ["--steps", "3", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--guidance", "4.5",
         "--seeds", "0,1", "--prompt", "a red fox", "--prompt", "a blue car", "--prompt", "two apples",
         "--device", "cpu", "--dtype", "float32"]


def run(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def reference(pipelines, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    result = run("profile", pipelines["sd3"], "--out", out, *PROBE)
    assert result.exit_code == 0, result.output
    return out


def test_profile_writes_reference_thresholds_and_figure(reference):
    meta = json.loads((reference / "reference.json").read_text())
    for name in ("reference.safetensors", "thresholds.csv", "reference.png"):
        assert (reference / name).stat().st_size > 0
    assert meta["n_samples"] == 6 and meta["config"]["probe"]["steps"] == 3
    assert set(meta["hashes"]) == {"prompts", "seeds", "pipeline", "weights"}
    rows = meta["per_step"]["guided"]
    assert len(rows) == 3 and all(r["tau"] == r["p95"] and r["p5"] <= r["p50"] <= r["p95"] for r in rows)
    assert set(meta["per_step"]) == {"guided", "cond", "uncond"}
    gate = meta["suggestions"]["gate"]
    assert gate["max_inflation"] >= 0.02 and gate["noise_floor"]["dtype_difference"] is not None
    assert any("unreliable" in w for w in meta["warnings"])  # 6 samples is too few, and it says so
    lines = (reference / "thresholds.csv").read_text().splitlines()
    assert lines[0].startswith("step,timestep,sigma") and len(lines) == 4


@pytest.mark.parametrize("factor, code", [(1.1, 1), (1.02, 0), (0.9, 0)])
def test_live_check_exit_codes(pipelines, scaled, factor, code):
    result = run("check", pipelines["sd3"], scaled("sd3", factor), "--max-inflation", "0.05", *PROBE)
    assert result.exit_code == code, result.output
    assert ("FAIL" if code else "PASS") in result.stdout


def test_truncated_file_is_exit_2(pipelines, scaled, tmp_path):
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(scaled("sd3", 1.1).read_bytes()[:500])
    result = run("check", pipelines["sd3"], bad, "--max-inflation", "0.05", *PROBE)
    assert result.exit_code == 2 and "not a valid safetensors" in result.stderr


def test_stored_reference_check_agrees_with_a_live_free_check(pipelines, scaled, reference):
    for factor in (1.1, 1.02):
        stored = run("check", scaled("sd3", factor), "--reference", reference, "--max-inflation", "0.05",
                     "--device", "cpu", "--dtype", "float32", "--format", "json")
        live = run("check", pipelines["sd3"], scaled("sd3", factor), "--max-inflation", "0.05", "--mode", "free",
                   *PROBE, "--format", "json")
        assert stored.exit_code == live.exit_code, stored.output + live.output
        a, b = json.loads(stored.stdout), json.loads(live.stdout)
        assert a["checkpoints"][0]["inflation"] == pytest.approx(b["checkpoints"][0]["inflation"], abs=1e-6)


def test_reference_gate_is_used_and_named(scaled, reference):
    result = run("check", scaled("sd3", 1.0), "--reference", reference, "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "suggested gate" in result.stdout


def test_contradicting_options_are_refused(scaled, reference):
    result = run("check", scaled("sd3", 1.1), "--reference", reference, "--steps", "5", "--seeds", "0,1")
    assert result.exit_code == 2
    assert "--steps 5 (reference: 3)" in result.stderr and "--seeds" not in result.stderr
    result = run("check", scaled("sd3", 1.1), "--reference", reference, "--prompt", "something else")
    assert result.exit_code == 2 and "prompts" in result.stderr


def test_another_pipeline_is_refused(scaled, reference, pipelines):
    result = run("check", scaled("flux", 1.1), "--reference", reference, "--pipeline", pipelines["flux"])
    assert result.exit_code == 2 and "fingerprints differ" in result.stderr


def test_junit_github_summary_and_annotation(pipelines, scaled, tmp_path):
    junit = tmp_path / "report.xml"
    summary = tmp_path / "summary.md"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    result = run("check", pipelines["sd3"], scaled("sd3", 1.1), scaled("sd3", 1.02), "--max-inflation", "0.05",
                 *PROBE, "--junit", junit, env=env)
    assert result.exit_code == 1, result.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert cases[0].find("failure") is not None and cases[1].find("failure") is None
    assert "| checkpoint | inflation |" in summary.read_text()
    assert result.stdout.startswith("::error title=normscope check::")


def test_non_finite_run_is_exit_3(pipelines, tmp_path):
    state = scaled_state_dict(pipelines["sd3"], 1.0)
    state["proj_out.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    result = run("check", pipelines["sd3"], tmp_path / "nan.safetensors", "--max-inflation", "0.05", *PROBE)
    assert result.exit_code == 3, result.output


def test_live_check_needs_a_gate(pipelines, scaled):
    result = run("check", pipelines["sd3"], scaled("sd3", 1.1), *PROBE)
    assert result.exit_code == 2 and "--max-inflation" in result.stderr


def test_lora_attached_to_another_base_is_refused(pipelines, reference, tmp_path):
    from lora_factory import save_diffusers_lora

    other = tmp_path / "other-base"  # same pipeline files, other transformer weights
    shutil.copytree(pipelines["sd3"], other)
    save_file(scaled_state_dict(pipelines["sd3"], 1.05), str(other / "transformer" / "diffusion_pytorch_model.safetensors"))
    lora = save_diffusers_lora(tmp_path / "lora", with_metadata=True)
    result = run("check", lora, "--reference", reference, "--pipeline", other, "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 2, result.output
    assert "other base weights" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # the same LoRA on the base the reference was made with runs
    result = run("check", lora, "--reference", reference, "--device", "cpu", "--dtype", "float32", "--format", "json")
    assert result.exit_code in (0, 1), result.output
    assert json.loads(result.stdout)["checkpoints"][0]["inflation"] is not None
