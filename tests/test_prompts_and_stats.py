"""Prompt files and the statistics, on inputs whose answers are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from normscope.errors import InputError
from normscope.measure.prompts import default_prompts, make_samples, read_prompt_file, resolve_prompts
from normscope.measure.stats import inflation, region_inflation, step_profile
from normscope.measure.table import COLUMNS


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n")
    (tmp_path / "p.csv").write_text('id,prompt\n1,a cat\n2,"a dog, running"\n')
    assert read_prompt_file(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert read_prompt_file(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    assert read_prompt_file(tmp_path / "p.csv") == ["a cat", "a dog, running"]


def test_bad_prompt_files_name_the_fix(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "bad.csv").write_text("text\nx\n")
    with pytest.raises(InputError, match="prompt"):
        read_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="'prompt' column"):
        read_prompt_file(tmp_path / "bad.csv")


def test_default_prompt_set_covers_what_rewards_target():
    prompts = default_prompts()
    assert len(prompts) >= 32 and len(set(prompts)) == len(prompts)
    assert resolve_prompts(None, ()) == prompts
    assert resolve_prompts(None, ("x",)) == ["x"]
    assert [(s.prompt_id, s.seed) for s in make_samples(["a", "b"], (3, 4))] == [(0, 3), (0, 4), (1, 3), (1, 4)]


def frame_from(ratios: np.ndarray, sigmas=None) -> pd.DataFrame:
    """A tidy frame whose base norms are 1, so tuned norms equal the given (samples, steps) ratios."""
    samples, steps = ratios.shape
    sigmas = np.linspace(1, 0, steps, endpoint=False) if sigmas is None else sigmas
    rows = []
    for s in range(samples):
        for t in range(steps):
            r = ratios[s, t]
            ok = np.isfinite(r)
            rows.append(dict(mode="paired", drive="tuned", prompt_id=s, prompt=f"p{s}", seed=0, step=t,
                             timestep=sigmas[t] * 1000, sigma=sigmas[t], branch="guided", norm_base=1.0,
                             norm_tuned=r, ratio=r if ok else np.nan, hinge=max(r - 1, 0) if ok else np.nan,
                             cosine=1.0, mse=0.0))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_inflation_is_the_mean_over_steps_of_per_step_mean_ratios():
    ratios = np.array([[1.0, 1.2], [1.2, 1.4]])  # step means 1.1 and 1.3 -> 1.2 -> +20 %
    value, lo, hi = inflation(frame_from(ratios))
    assert value == pytest.approx(0.2)
    assert lo <= value <= hi


def test_ci_narrows_with_more_samples_and_covers_the_mean():
    rng = np.random.default_rng(1)
    small = 1.05 + 0.02 * rng.standard_normal((8, 5))
    large = 1.05 + 0.02 * rng.standard_normal((200, 5))
    _, lo_s, hi_s = inflation(frame_from(small))
    value, lo_l, hi_l = inflation(frame_from(large))
    assert hi_l - lo_l < hi_s - lo_s
    assert lo_l < 0.05 < hi_l


def test_non_finite_values_are_left_out_not_propagated():
    ratios = np.array([[1.1, np.nan], [1.1, 1.1], [np.inf, 1.1]])
    frame = frame_from(ratios)
    frame.loc[frame["norm_tuned"] == np.inf, "ratio"] = np.nan
    value, _, _ = inflation(frame)
    assert value == pytest.approx(0.1)
    profile = step_profile(frame)
    assert list(profile["nonfinite"]) == [1, 1]
    assert list(profile["n"]) == [2, 2]


def test_hinge_rate_and_regions():
    sigmas = np.array([0.9, 0.5, 0.1])
    ratios = np.array([[1.2, 1.0, 0.9], [1.2, 1.0, 1.1]])
    profile = step_profile(frame_from(ratios, sigmas))
    assert list(profile["hinge_rate"]) == [1.0, 0.0, 0.5]
    regions = region_inflation(profile)
    assert regions["near_noise"] == pytest.approx(0.2)
    assert regions["middle"] == pytest.approx(0.0)
    assert regions["near_data"] == pytest.approx(0.0)


def test_bootstrap_is_deterministic():
    ratios = 1 + np.random.default_rng(0).random((10, 4))
    assert inflation(frame_from(ratios)) == inflation(frame_from(ratios))
