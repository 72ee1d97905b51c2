"""Presets: what they set, that explicit options win, and the `normscope presets` listing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from normscope.cli import app
from normscope.config import DEFAULT_STEPS, CompareConfig
from normscope.errors import ConfigError
from normscope.load.families import FAMILIES, PRESETS

runner = CliRunner()


def test_a_preset_fills_what_is_unset_and_explicit_options_win():
    config = CompareConfig(tuned="x", preset="flow_grpo-sd3.5m")
    assert (config.steps, config.guidance, config.height, config.width) == (40, 4.5, 512, 512)
    config = CompareConfig(tuned="x", preset="flow_grpo-sd3.5m", steps=10, guidance=1.0, height=256)
    assert (config.steps, config.guidance, config.height, config.width) == (10, 1.0, 256, 512)
    assert CompareConfig(tuned="x").steps == DEFAULT_STEPS
    qwen = CompareConfig(tuned="x", preset="flow_grpo-qwen-image")
    assert (qwen.steps, qwen.guidance, qwen.true_cfg_scale) == (50, 4.0, None)  # Qwen's --guidance is true CFG
    turbo = CompareConfig(tuned="x", preset="flow-factory-z-image-turbo")
    assert (turbo.steps, turbo.guidance) == (10, 0.0)
    with pytest.raises(ConfigError, match="unknown --preset 'x'.*normscope presets"):
        CompareConfig(tuned="x", preset="x")


def test_the_issue_settings_are_presets_with_a_source():
    want = {"flow_grpo-sd3.5m": (40, 4.5, 512), "diffusionnft-sd3.5m": (40, 1.0, 512), "awm-sd3.5m": (40, 1.0, 512),
            "flow_grpo-flux1-dev": (28, 3.5, 512), "flow_grpo-qwen-image": (50, 4.0, 512),
            "flow-factory-klein": (10, 1.0, 1024), "flow-factory-klein-base": (28, 4.0, 1024),
            "flow-factory-z-image": (40, 4.0, 1024), "flow-factory-z-image-turbo": (10, 0.0, 512),
            "flow_grpo-kontext": (28, 2.5, 512)}
    for name, (steps, guidance, size) in want.items():
        preset = PRESETS[name]
        assert (preset.steps, preset.guidance, preset.size) == (steps, guidance, size), name
        assert preset.source
    assert PRESETS["flow_grpo-qwen-image"].argument == "true_cfg_scale"
    assert {p.family for p in PRESETS.values()} <= {f.name for f in FAMILIES}


def test_presets_command_lists_them_with_sources():
    result = runner.invoke(app, ["presets", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows} == set(PRESETS)
    assert all(r["source"] for r in rows)
    result = runner.invoke(app, ["presets", "--family", "z-image", "--format", "csv"])
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("name,family,steps,guidance,argument,size,source") and len(lines) == 4
    table = runner.invoke(app, ["presets"])
    assert table.exit_code == 0 and "flow_grpo-sd3.5m" in table.stdout
    bad = runner.invoke(app, ["presets", "--family", "sdxl"])
    assert bad.exit_code == 2 and "unknown family 'sdxl'" in bad.stderr


def test_pipeline_defaults_are_named_on_stderr(pipelines, scaled):
    result = runner.invoke(app, ["compare", str(pipelines["sd3"]), str(scaled("sd3", 1.1)), "--steps", "2",
                                 "--max-sequence-length", "24", "--seeds", "0", "--prompt", "a red fox",
                                 "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "sd3: using the pipeline's defaults guidance_scale=7.0, 8x8 px" in " ".join(result.stderr.split())
    resolved = json.loads(result.stdout)["config"]["resolved"]
    assert (resolved["guidance_argument"], resolved["guidance"], resolved["family"]) == ("guidance_scale", 7.0, "sd3")
