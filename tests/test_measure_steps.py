"""``compare --measure-steps K``: the other model at K steps across sigma, the headline from them."""

from __future__ import annotations

import numpy as np
import pytest

from normscope.commands.compare import compare
from normscope.errors import ConfigError
from normscope.measure.stats import step_profile
from normscope.measure.subsample import plan_steps, subsampled_headline

SIX = dict(steps=6)


def test_plan_is_stratified_across_sigma_with_first_and_last():
    sigma = np.array([1.0, 0.97, 0.93, 0.88, 0.8, 0.7, 0.55, 0.35, 0.1])  # shifted: dense near noise
    assert plan_steps(sigma, 2) == [0, 8]
    steps = plan_steps(sigma, 4)
    assert steps[0] == 0 and steps[-1] == 8 and len(steps) == 4
    assert steps == [0, 5, 7, 8]  # targets 0.7 and 0.4: the steps nearest them, not evenly spaced indices
    assert plan_steps(sigma, 20) == list(range(9))


def test_measured_steps_hold_the_full_runs_numbers_and_the_headline_integrates_them(config_for, scaled):
    tuned = scaled("sd3", 1.1)
    full = compare(config_for("sd3", tuned, **SIX))
    part = compare(config_for("sd3", tuned, measure_steps=3, **SIX))
    steps = part.summary["measure_steps"]["steps"]
    assert len(steps) == 3 and steps[0] == 0 and steps[-1] == 5
    rows = full.frame[full.frame["step"].isin(steps)].reset_index(drop=True)
    assert np.array_equal(rows["ratio"].to_numpy(), part.frame["ratio"].to_numpy())
    assert np.array_equal(rows["sigma"].to_numpy(), part.frame["sigma"].to_numpy())
    profile = step_profile(full.frame[(full.frame["mode"] == "paired") & (full.frame["branch"] == "guided")])
    expected = subsampled_headline(profile["ratio"].to_numpy(), profile["sigma"].to_numpy(), 3)
    assert part.inflation == pytest.approx(expected, abs=1e-12)
    assert part.summary["nonfinite"] == 0  # the skipped steps are not counted as non-finite


def test_measure_steps_skips_the_other_models_forwards(config_for, scaled):
    from torch.nn.modules.module import register_module_forward_hook

    tuned = scaled("sd3", 1.1)
    counts = []
    for k in (None, 2):
        calls = []
        handle = register_module_forward_hook(
            lambda m, i, o, calls=calls: calls.append(1) if type(m).__name__ == "SD3Transformer2DModel" else None)
        try:
            compare(config_for("sd3", tuned, measure_steps=k, **SIX))
        finally:
            handle.remove()
        counts.append(len(calls))
    assert counts[0] == 2 * 6 and counts[1] == 6 + 2  # the driver every step; the other at 2 of the 6


def test_measure_steps_refused_outside_paired_mode(config_for, scaled):
    with pytest.raises(ConfigError, match="--measure-steps"):
        config_for("sd3", "x", measure_steps=3, mode="free")
    with pytest.raises(ConfigError, match="--measure-steps"):
        config_for("sd3", "x", measure_steps=1)


def test_a_measure_steps_run_resumes_with_its_step_numbers(config_for, scaled, tmp_path, monkeypatch):
    """A run killed after its first batch resumes from the stored batch: same rows, pipeline step numbers kept."""
    from normscope.commands import compare as compare_module

    tuned = scaled("sd3", 1.1)
    whole = compare(config_for("sd3", tuned, measure_steps=3, batch_size=2, **SIX))
    original, calls = compare_module.run_paired, []

    def dies_at_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(compare_module, "run_paired", dies_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        compare(config_for("sd3", tuned, measure_steps=3, out=tmp_path / "run", batch_size=2, **SIX))
    monkeypatch.setattr(compare_module, "run_paired", original)
    assert len(list((tmp_path / "run" / ".partial").glob("*.safetensors"))) == 1
    resumed = compare(config_for("sd3", tuned, measure_steps=3, out=tmp_path / "run", batch_size=2, **SIX))
    assert resumed.frame.equals(whole.frame)
    assert sorted(int(s) for s in resumed.frame["step"].unique()) == whole.summary["measure_steps"]["steps"]
