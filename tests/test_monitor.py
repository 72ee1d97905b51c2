"""normscope.monitor: per-step JSONL, smoothing and the gate, sinks; and agreement with an offline sweep."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from normscope.errors import ConfigError, InputError
from normscope.monitor import MONITOR_JSON, Monitor, read_monitor_log

DIGITS_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"


def scaled_pair(factor: float, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    v_ref = torch.randn(batch, 4, 4, 4)
    return factor * v_ref, v_ref


def test_steps_pool_calls_and_smooth_and_cross_a_numeric_gate(tmp_path):
    with Monitor(tmp_path, gate=0.05, smoothing=2, tensorboard=False) as monitor:
        for step, factor in enumerate([1.0, 1.02, 1.10, 1.10]):
            monitor.log(step, *scaled_pair(factor), sigma=0.9)
            monitor.log(step, *scaled_pair(factor), sigma=torch.full((4, 1, 1, 1), 0.2))  # a second micro-batch
    entries, meta = read_monitor_log(tmp_path)
    assert [e["step"] for e in entries] == [0, 1, 2, 3] and all(e["n"] == 8 for e in entries)
    assert [e["ratio_mean"] for e in entries] == pytest.approx([1.0, 1.02, 1.10, 1.10], rel=1e-6)
    assert entries[2]["smoothed"] == pytest.approx(1.06, rel=1e-6)  # mean of the last two steps
    assert entries[2]["ratio/near_noise"] == pytest.approx(1.1) and entries[2]["n/near_data"] == 4
    assert entries[2]["ratio/middle"] is None
    assert [e["crosses_gate"] for e in entries] == [False, False, True, True]
    assert meta["first_crossing"]["step"] == 2 and monitor.crossing["step"] == 2


def test_gate_from_a_profile_reference_and_lazy_reference_forward(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "reference.json").write_text(json.dumps({"suggestions": {"gate": {"max_inflation": 0.03}}}))
    calls = []

    def v_ref():
        calls.append(1)
        return v_base

    v_base = torch.randn(2, 8)
    with Monitor(tmp_path / "run", gate=ref, every=3, tensorboard=False) as monitor:
        logged = [monitor.log(step, 1.05 * v_base, v_ref) for step in range(7)]
    assert logged == [True, False, False, True, False, False, True] and len(calls) == 3
    entries, meta = read_monitor_log(tmp_path / "run" / "monitor.jsonl")
    assert [e["step"] for e in entries] == [0, 3, 6] and meta["gate"] == 0.03
    assert monitor.crossing["step"] == 0


def test_bad_input_is_refused(tmp_path):
    monitor = Monitor(tmp_path, tensorboard=False)
    monitor.log(5, *scaled_pair(1.0))
    with pytest.raises(InputError, match="must not go back"):
        monitor.log(4, *scaled_pair(1.0))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        monitor.log(6, *scaled_pair(1.0), sigma=torch.full((4,), 700.0))
    with pytest.raises(ValueError, match="same shape"):
        monitor.log(6, torch.ones(4, 3), torch.ones(2, 3))
    with pytest.raises(ConfigError, match="fraction"):
        Monitor(tmp_path, gate=5)
    with pytest.raises(ConfigError, match="normscope\\[wandb\\]"):
        Monitor(tmp_path, wandb=True)
    with pytest.raises(InputError, match="profile"):
        Monitor(tmp_path, gate=tmp_path / "nothing")


def test_tensorboard_receives_the_same_numbers(tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Monitor(tmp_path, tensorboard=True) as monitor:
        for step, factor in enumerate([1.0, 1.1]):
            monitor.log(step, *scaled_pair(factor), sigma=0.5)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("normguard/ratio_mean")
    assert [s.step for s in scalars] == [0, 1]
    assert [s.value for s in scalars] == pytest.approx([1.0, 1.1], rel=1e-6)
    assert json.loads((tmp_path / MONITOR_JSON).read_text())["sinks"] == ["tensorboard"]


REGIONS = ("near_noise", "middle", "near_data")


@pytest.fixture(scope="module")
def digits_rl_run(tmp_path_factory):
    """A short AWM run on the bundled digits pipeline, at the sampler's sigmas, one update per iteration."""
    sys.path.insert(0, str(DIGITS_EXAMPLE))
    try:
        import rl
    finally:
        sys.path.remove(str(DIGITS_EXAMPLE))
    out = tmp_path_factory.mktemp("digits-rl")
    rl.train(rl.RLConfig(method="awm", out=out, seed=0, iterations=7, group=4, inner_steps=1, lr=4e-3,
                         checkpoint_every=3, sigma_grid=True, verbose=False))
    return out


@pytest.fixture(scope="module")
def digits_sweep(digits_rl_run, tmp_path_factory):
    """``normscope sweep --mode paired`` of the run's checkpoints on the digits probe (10 prompts x 2 seeds)."""
    from normscope.builders.digits import SAMPLING, assets_dir, digit_prompt
    from normscope.commands.sweep import SweepConfig, sweep

    out = tmp_path_factory.mktemp("digits-sweep")
    sweep(SweepConfig(
        run_dir=digits_rl_run, out=out, pipeline=str(assets_dir() / "pipeline"), mode="paired",
        prompts=tuple(digit_prompt(d) for d in range(10)), seeds=(0, 1), steps=SAMPLING["steps"],
        guidance=SAMPLING["guidance"], height=SAMPLING["height"], width=SAMPLING["width"],
        max_sequence_length=SAMPLING["max_sequence_length"], device="cpu", dtype="float32", batch_size=20))
    return out


def test_monitor_series_agrees_with_an_offline_sweep_of_the_saved_checkpoints(digits_rl_run, digits_sweep):
    """Monitor step N (the updates that start from checkpoint-N's weights, velocities the loss computed) against
    ``normscope sweep --mode paired`` of checkpoint-N on the cond branch (the trained one), same sigma grid."""
    entries, _ = read_monitor_log(digits_rl_run)
    monitor = {e["step"]: e for e in entries}
    compared = []
    for step in (3, 6):
        summary = json.loads((digits_sweep / f"checkpoint-{step}" / "summary.json").read_text())
        cond = summary["modes"]["paired"]["cond"]
        entry = monitor[step]
        for region in REGIONS:
            rows = [r for r in cond["per_step"] if _region(r["sigma"]) == region]
            swept = sum(r["ratio"] for r in rows) / len(rows)
            half = sum(r["ratio_ci"][1] - r["ratio_ci"][0] for r in rows) / len(rows) / 2
            se = entry[f"std/{region}"] / entry[f"n/{region}"] ** 0.5
            assert abs(entry[f"ratio/{region}"] - swept) <= half + 2 * se, (step, region, entry[f"ratio/{region}"], swept, half, se)
            compared.append((step, region, entry[f"ratio/{region}"] - 1, swept - 1))
        lo, hi = cond["estimates"]["step_mean"]["inflation_ci"]  # grid sigmas drawn uniformly: the step mean
        se = entry["ratio_std"] / entry["n"] ** 0.5
        assert lo - 2 * se <= entry["ratio_mean"] - 1 <= hi + 2 * se, (step, entry["ratio_mean"] - 1, lo, hi)
    # Not a vacuous agreement: the run moved the norms well beyond both sides' noise somewhere, and the
    # monitor's start (step 0, the base itself) is told apart from those checkpoints.
    moved = [c for c in compared if abs(c[3]) > 0.03]
    assert moved, compared
    for step, region, _, swept in moved:
        assert abs(monitor[0][f"ratio/{region}"] - 1 - swept) > 0.03, (step, region)


def _region(sigma: float) -> str:
    return "near_noise" if sigma > 2 / 3 else "middle" if sigma > 1 / 3 else "near_data"


def test_report_plots_the_monitor_log_next_to_the_sweep(digits_rl_run, digits_sweep, tmp_path):
    from typer.testing import CliRunner

    from normscope.cli import app

    runner = CliRunner()
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", "--monitor", str(digits_rl_run), "--sweep", str(digits_sweep), "--out", str(out)])
    assert result.exit_code == 0, result.output
    name = digits_rl_run.resolve().name
    assert (out / "figures" / f"{name}_monitor.png").stat().st_size > 10_000
    assert "norm ratio during training" in (out / "report.html").read_text()
    assert f"figures/{name}_monitor.png" in (out / "report.md").read_text()
    alone = runner.invoke(app, ["report", "--sweep", str(digits_sweep), "--out", str(out)])
    assert alone.exit_code == 2 and "--monitor" in alone.stderr
    wrong = runner.invoke(app, ["report", "--monitor", str(digits_rl_run), "--sweep", str(digits_rl_run), "--out", str(out)])
    assert wrong.exit_code == 2 and "sweep.csv" in wrong.stderr
