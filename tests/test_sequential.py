"""Sequential decisions (issue 20): the confidence sequence, its error rate by simulation, and
``check --until-decided`` / ``compare --precision`` on the real tiny SD3 pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROBE, scaled_state_dict
from reporters import KeptNotes
from safetensors.torch import save_file

from normscope.builders.tiny import save_tiny, tiny_sd3_pipeline
from normscope.commands.check import CheckConfig, check
from normscope.commands.compare import compare
from normscope.config import CompareConfig
from normscope.errors import ConfigError
from normscope.measure.prompts import default_prompts
from normscope.measure.sequential import (
    ABOVE,
    BELOW,
    MIN_CLUSTERS,
    UNDECIDED,
    Sequential,
    cs_interval,
    pass_alpha,
    seed_major,
)
from normscope.measure.simulate import error_rates

GATE = 0.05
PROMPTS16 = tuple(default_prompts()[:16])
SEEDS4 = (0, 1, 2, 3)


# ---------------------------------------------------------------- the confidence sequence


def test_seed_major_order_spans_prompts_first_and_a_larger_plan_appends():
    small = seed_major(["a", "b", "c"], (0, 1))
    assert [(s.prompt_id, s.seed) for s in small] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert seed_major(["a", "b", "c"], (0, 1, 2))[:6] == small


def test_pass_budgets_sum_to_alpha():
    assert math.isclose(sum(pass_alpha(k) for k in range(1, 200_000)), 0.05, rel_tol=1e-4)


def test_cs_is_wider_than_a_fixed_t_interval_and_shrinks():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 64)
    lo16, hi16 = cs_interval(x[:16], pass_alpha(1))
    lo64, hi64 = cs_interval(x, pass_alpha(1))
    assert (hi16 - lo16) / 2 > 2.13 * x[:16].std(ddof=1) / 4  # wider than the fixed-n t interval (t_15: 2.13)
    assert hi64 - lo64 < hi16 - lo16


def test_no_decision_before_min_clusters_and_decisions_by_side():
    rule = Sequential(gate=GATE)
    few = {(p, 0): 0.5 for p in range(MIN_CLUSTERS - 1)}
    assert rule.update(few, [0, 1]) == UNDECIDED
    above = {(p, 0): 0.10 + 0.001 * p for p in range(MIN_CLUSTERS)}
    assert Sequential(gate=GATE).update(above, [0, 1]) == ABOVE
    below = {(p, 0): 0.0 + 0.001 * p for p in range(MIN_CLUSTERS)}
    assert Sequential(gate=GATE).update(below, [0, 1]) == BELOW
    spread = {(p, 0): 0.05 + (0.2 if p % 2 else -0.2) for p in range(MIN_CLUSTERS)}
    assert Sequential(gate=GATE).update(spread, [0, 1]) == UNDECIDED


@pytest.mark.parametrize("kind", ["normal", "skewed", "heavy"])
@pytest.mark.parametrize("shift", [0.0, -0.005, 0.005])
def test_false_decision_rate_under_looking_after_every_batch(kind, shift):
    """1000 simulated runs of 16 prompts x 4 seeds, batches of 8, a look after every batch: the confidence
    sequence decides wrongly in at most 5 % of runs, at the gate and a little on either side."""
    rates = error_rates(1000, GATE + shift, GATE, seed=7, kind=kind, boot=200)
    assert rates["cs"]["false_rate"] <= 0.05, rates


def test_a_bootstrap_ci_reread_after_every_batch_exceeds_the_nominal_rate():
    rates = error_rates(1000, GATE, GATE, seed=7, kind="normal", boot=400)
    assert rates["bootstrap"]["false_rate"] > 0.10, rates  # measured: about 0.23
    assert rates["cs"]["false_rate"] <= 0.05, rates


# ---------------------------------------------------------------- the real pipeline


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    return save_tiny(tiny_sd3_pipeline(seed=0), tmp_path_factory.mktemp("seq") / "sd3")


def lora_37(pipe_dir: Path, folder: Path) -> Path:
    """A real peft LoRA on proj_out whose update is 0.37 x the weight (rank 4 = proj_out's output width)."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd3_pipeline(seed=0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["proj_out"], init_lora_weights="gaussian")
    pipe.transformer.add_adapter(config)
    proj = pipe.transformer.proj_out
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(proj.base_layer.weight)
        proj.lora_B["default"].weight.copy_(0.37 * torch.eye(4))
    layers = get_peft_model_state_dict(pipe.transformer)
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers,
                                               transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tuned(sd3, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tuned")
    out = {}
    for factor in (1.1, 1.02):
        out[f"x{factor}"] = root / f"x{factor}.safetensors"
        save_file(scaled_state_dict(sd3, factor), str(out[f"x{factor}"]))
    out["lora37"] = lora_37(sd3, root / "lora37")
    return out


def _check(sd3, tuned_path, until_decided):
    return check(CheckConfig(paths=(str(sd3), str(tuned_path)), pipeline=str(sd3), max_inflation=GATE,
                             prompts=PROMPTS16, seeds=SEEDS4, device="cpu", dtype="float32",
                             until_decided=until_decided, **PROBE["sd3"]))


@pytest.mark.parametrize("name", ["x1.1", "lora37", "x1.02"])
def test_until_decided_gives_the_fixed_verdict_within_16_of_64_samples(sd3, tuned, name):
    fixed = _check(sd3, tuned[name], until_decided=False).checkpoints[0]
    early = _check(sd3, tuned[name], until_decided=True).checkpoints[0]
    assert early.verdict == fixed.verdict == ("pass" if name == "x1.02" else "fail")
    assert early.summary["samples_planned"] == 64 and fixed.summary["samples_used"] == 64
    assert early.summary["samples_used"] <= 16, early.sequential["looks"]
    assert early.sequential["decided"] and not early.sequential["close"]
    lo, hi = early.sequential["cs"]
    assert lo <= fixed.inflation <= hi  # the anytime-valid interval holds the full design's number
    if name == "lora37":
        assert 0.3 < fixed.inflation < 0.45


def test_undecided_run_uses_the_plan_and_says_it_was_close(sd3, tuned):
    """A gate at the model's own inflation: never decided, the full plan and the fixed-design verdict."""
    fixed = _check(sd3, tuned["x1.1"], until_decided=False).checkpoints[0]
    config = CheckConfig(paths=(str(sd3), str(tuned["x1.1"])), pipeline=str(sd3), max_inflation=round(fixed.inflation, 7),
                         prompts=PROMPTS16[:4], seeds=(0, 1), device="cpu", dtype="float32", until_decided=True,
                         **PROBE["sd3"])
    c = check(config).checkpoints[0]
    assert c.summary["samples_used"] == c.summary["samples_planned"] == 8
    assert c.sequential["close"] and not c.sequential["decided"]


def test_cli_prints_decided_after_and_json_carries_the_counts(sd3, tuned, tmp_path):
    from typer.testing import CliRunner

    from normscope.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS16) + "\n")
    args = ["check", str(sd3), str(tuned["x1.1"]), "--pipeline", str(sd3), "--max-inflation", "0.05",
            "--prompts", str(prompts), "--seeds", "0-3", "--device", "cpu", "--dtype", "float32",
            "--steps", "4", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--guidance", "4.5",
            "--until-decided"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "decided after 16 of 64 samples" in result.output
    result = CliRunner().invoke(app, args + ["--format", "json"])
    data = json.loads(result.stdout)
    assert data["checkpoints"][0]["samples_used"] == 16 and data["checkpoints"][0]["samples_planned"] == 64


def test_until_decided_refused_with_the_grid_gate(tmp_path):
    with pytest.raises(ConfigError, match="--until-decided"):
        CheckConfig(paths=("b", "t"), max_inflation=GATE, max_grid_score=3.0, until_decided=True)


@pytest.fixture(scope="module")
def reference(sd3, tmp_path_factory) -> Path:
    from normscope.commands.profile import ProfileConfig, profile

    out = tmp_path_factory.mktemp("seq-ref") / "ref"
    profile(ProfileConfig(base=str(sd3), out=out, prompts=PROMPTS16, seeds=SEEDS4, device="cpu", dtype="float32",
                          dtype_check=False, **PROBE["sd3"]))
    return out


@pytest.mark.parametrize("name", ["x1.1", "x1.02"])
def test_until_decided_against_a_stored_reference_gives_the_fixed_verdict_early(reference, tuned, name):
    """The stored reference's 64 samples (16 prompts x 4 seeds): the tuned model runs seed-major against the stored
    base and stops once the interval is off the gate, with the full reference check's verdict, and its interval
    holds the full check's number."""
    def run(until_decided):
        return check(CheckConfig(paths=(str(tuned[name]),), reference=reference, max_inflation=GATE, device="cpu",
                                 dtype="float32", until_decided=until_decided)).checkpoints[0]

    fixed, early = run(False), run(True)
    assert early.verdict == fixed.verdict == ("pass" if name == "x1.02" else "fail")
    assert fixed.summary["samples_used"] == early.summary["samples_planned"] == 64
    assert early.summary["samples_used"] <= 16, early.sequential["looks"]
    assert early.sequential["decided"] and early.sequential["gate"] == GATE
    lo, hi = early.sequential["cs"]
    assert lo <= fixed.inflation <= hi
    if name == "x1.1":  # the first step of free mode is exact: the early run's rows are the full run's rows
        assert early.summary["per_step"][0]["ratio"] == pytest.approx(1.1, abs=2e-6)


def _compare(sd3, tuned_path, out, seeds, **kw):
    return compare(CompareConfig(base=str(sd3), tuned=str(tuned_path), pipeline=str(sd3), prompts=PROMPTS16, seeds=seeds,
                                 device="cpu", dtype="float32", out=out, figure=False, **PROBE["sd3"], **kw))


def test_a_stopped_run_resumed_with_a_larger_plan_continues(sd3, tuned, tmp_path):
    out = tmp_path / "run"
    first = _compare(sd3, tuned["x1.1"], out, (0,), precision=1e-12)  # never precise enough: the plan is used up
    assert first.summary["samples_used"] == 16 and first.summary["sequential"]["close"]
    assert (out / ".partial").is_dir()  # kept, so that a larger plan continues
    notes = KeptNotes()
    second = compare(CompareConfig(base=str(sd3), tuned=str(tuned["x1.1"]), pipeline=str(sd3), prompts=PROMPTS16,
                                   seeds=(0, 1), device="cpu", dtype="float32", out=out, figure=False,
                                   precision=1e-12, **PROBE["sd3"]), notes)
    assert any("resuming: 2 finished batch(es)" in line for line in notes.notes), notes.notes
    assert second.summary["samples_used"] == second.summary["samples_planned"] == 32
    fresh = _compare(sd3, tuned["x1.1"], tmp_path / "fresh", (0, 1), precision=1e-12)
    assert second.frame.equals(fresh.frame)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples_used"] == 32 and summary["sequential"]["samples_planned"] == 32


def test_precision_stops_once_the_interval_is_narrow(sd3, tuned, tmp_path):
    result = _compare(sd3, tuned["x1.1"], None, SEEDS4, precision=0.01)
    seq = result.summary["sequential"]
    assert seq["decision"] == "precise" and result.summary["samples_used"] == 16
    assert (seq["cs"][1] - seq["cs"][0]) / 2 <= 0.01


def test_sweep_until_decided_stops_each_checkpoint_and_keeps_the_verdicts(tmp_path):
    from normscope.commands.sweep import SweepConfig, sweep

    run = tmp_path / "run"
    for step, factor in ((10, 1.0), (20, 1.1)):
        pipe = tiny_sd3_pipeline(seed=0)
        with torch.no_grad():
            pipe.transformer.proj_out.weight.mul_(factor)
            pipe.transformer.proj_out.bias.mul_(factor)
        pipe.transformer.save_pretrained(run / "checkpoints" / f"checkpoint-{step}" / "transformer")
    pipeline = save_tiny(tiny_sd3_pipeline(seed=0), tmp_path / "sd3")
    probe = dict(prompts=PROMPTS16[:12], seeds=(0, 1), device="cpu", dtype="float32", batch_size=12, **PROBE["sd3"])
    fixed = sweep(SweepConfig(run_dir=run, out=tmp_path / "fixed", pipeline=str(pipeline), mode="paired", gate=GATE,
                              **probe))
    early = sweep(SweepConfig(run_dir=run, out=tmp_path / "early", pipeline=str(pipeline), mode="paired", gate=GATE,
                              until_decided=True, **probe))
    assert early["crosses_gate"].tolist() == fixed["crosses_gate"].tolist() == [False, True]
    assert early["samples_used"].tolist() == [12, 12] and early["samples_planned"].tolist() == [24, 24]
    assert early["decision"].tolist() == ["below", "above"]
    # free mode: the stored base profile, each checkpoint seed-major against it until decided
    free = sweep(SweepConfig(run_dir=run, out=tmp_path / "free", pipeline=str(pipeline), mode="free", gate=GATE,
                             until_decided=True, **probe))
    assert free["crosses_gate"].tolist() == [False, True] and free["decision"].tolist() == ["below", "above"]
    assert free["samples_used"].tolist() == [12, 12] and free["samples_planned"].tolist() == [24, 24]
    with pytest.raises(ConfigError, match="--until-decided"):
        SweepConfig(run_dir=run, out=tmp_path / "x", mode="free", until_decided=True)  # no --gate


def test_until_decided_in_free_mode(sd3, tuned):
    config = CheckConfig(paths=(str(sd3), str(tuned["x1.1"])), pipeline=str(sd3), max_inflation=GATE, mode="free",
                         prompts=PROMPTS16, seeds=(0, 1), device="cpu", dtype="float32", until_decided=True,
                         **PROBE["sd3"])
    c = check(config).checkpoints[0]
    assert c.verdict == "fail" and c.summary["samples_used"] == 16 and c.sequential["decision"] == ABOVE
    assert c.summary["headline_mode"] == "free"
