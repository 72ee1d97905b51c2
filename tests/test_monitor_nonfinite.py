"""The monitor under bad batches: strict JSON, NaN never decides or hides a gate crossing, no per-call host sync."""

from __future__ import annotations

import json

import pytest
import torch

from normscope.guard import normguard_stats
from normscope.monitor import MONITOR_JSONL, Monitor, read_monitor_log


def strict_lines(folder) -> list[dict]:
    """Every line parsed as strict JSON: the NaN / Infinity tokens Python writes by default are refused."""
    def refuse(token):
        raise AssertionError(f"non-JSON token {token} in monitor.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (folder / MONITOR_JSONL).read_text().splitlines()]


def pair(factor: float, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    v_ref = torch.randn(batch, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    return factor * v_ref, v_ref


def test_log_is_strict_json_with_counts_under_nan_inf_and_zero_reference(tmp_path):
    with Monitor(tmp_path, tensorboard=False, wandb=False) as monitor:
        v, v_ref = pair(1.1)
        v[0, 0, 0, 0] = float("nan")
        v[1, 1, 1, 1] = float("inf")
        monitor.log(0, v, v_ref, sigma=torch.tensor([0.9, 0.9, 0.5, 0.1]))  # samples 0, 1 bad
        v, v_ref = pair(1.0)
        v_ref[2] = 0.0  # zero reference norm: an infinite ratio, no bad element
        monitor.log(1, v, v_ref, sigma=0.9)
        v, v_ref = pair(1.0)
        v_ref.fill_(float("nan"))
        monitor.log(2, v, v_ref, sigma=0.5)  # nothing finite at all
    entries = strict_lines(tmp_path)
    first, second, third = entries
    assert (first["n"], first["n_nonfinite"], first["nonfinite_elements"]) == (2, 2, 2)
    assert first["ratio_mean"] == pytest.approx(1.1, rel=1e-6) and first["ratio/near_noise"] is None
    assert first["ratio/middle"] == pytest.approx(1.1, rel=1e-6) and first["n/near_noise"] == 0
    assert (second["n"], second["n_nonfinite"], second["nonfinite_elements"]) == (3, 1, 0)
    assert second["ratio_max"] == pytest.approx(1.0, rel=1e-6)
    assert third["n"] == 0 and third["n_nonfinite"] == 4 and third["nonfinite_elements"] == 4 * 64
    assert third["ratio_mean"] is None and third["smoothed"] is None and third["crosses_gate"] is False
    assert read_monitor_log(tmp_path)[0] == entries


def test_a_plus_20_percent_step_with_one_nan_element_is_flagged_at_that_step(tmp_path):
    with Monitor(tmp_path / "one", gate=0.1, smoothing=1, tensorboard=False, wandb=False) as monitor:
        for step in range(3):
            monitor.log(step, *pair(1.0, seed=step), sigma=0.5)
        v, v_ref = pair(1.2, seed=3)
        v[2, 0, 1, 2] = float("nan")
        monitor.log(3, v, v_ref, sigma=0.5)
    assert monitor.crossing is not None and monitor.crossing["step"] == 3
    assert monitor.crossing["smoothed"] == pytest.approx(1.2, rel=1e-6)


def test_nan_neither_hides_nor_delays_a_crossing_of_the_smoothed_ratio(tmp_path):
    factors = [1.0, 1.0, 1.2, 1.2, 1.2, 1.2]

    def run(folder, nan_at):
        with Monitor(folder, gate=0.1, smoothing=3, tensorboard=False, wandb=False) as monitor:
            for step, factor in enumerate(factors):
                v, v_ref = pair(factor, seed=step)
                if step == nan_at:
                    v[0, 0, 0, 0] = float("nan")
                monitor.log(step, v, v_ref)
        return monitor.crossing["step"], [e["smoothed"] for e in strict_lines(folder)]

    clean_step, clean = run(tmp_path / "clean", None)
    step, smoothed = run(tmp_path / "nan", 2)
    assert clean_step == step == 3  # smoothed (1 + 1.2 + 1.2) / 3 > 1.1 first at step 3
    assert smoothed == pytest.approx(clean, rel=1e-6)


def test_a_step_with_nothing_finite_does_not_reset_the_smoothed_ratio(tmp_path):
    with Monitor(tmp_path, gate=0.1, smoothing=2, tensorboard=False, wandb=False) as monitor:
        monitor.log(0, *pair(1.2))
        v, v_ref = pair(1.2)
        monitor.log(1, torch.full_like(v, float("nan")), v_ref)
        monitor.log(2, *pair(1.2))
    assert [e["smoothed"] for e in strict_lines(tmp_path)] == [pytest.approx(1.2), None, pytest.approx(1.2)]
    assert monitor.crossing["step"] == 0


def test_log_forces_no_host_sync(tmp_path):
    """Meta tensors have no data: any float()/bool()/item() in ``log`` raises. The step is read at the flush."""
    monitor = Monitor(tmp_path, tensorboard=False, wandb=False)
    v = torch.empty(4, 4, 8, 8, device="meta")
    for _ in range(3):  # micro-batches of one step
        assert monitor.log(0, v, v, sigma=torch.empty(4, device="meta"))
    assert len(monitor._pending) == 3
    monitor._pending, monitor._pending_step = [], None  # meta tensors hold nothing to write


def test_stats_are_finite_summaries_with_counts():
    v, v_ref = pair(1.1)
    v[3] = float("nan")
    stats = normguard_stats(v, v_ref, sigma=0.5)
    assert stats["n"] == 3 and stats["n_nonfinite"] == 1
    assert stats["ratio_mean"] == pytest.approx(1.1, rel=1e-6) and stats["ratio/middle"] == pytest.approx(1.1, rel=1e-6)
