"""Prompt files and the statistics, on inputs whose answers are worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from normscope.errors import InputError
from normscope.measure.prompts import default_prompts, make_samples, read_prompt_file, resolve_prompts
from normscope.measure.stats import (
    BY_SAMPLE,
    STEP_MEAN,
    bootstrap_weights,
    inflation,
    inflation_estimates,
    region_inflation,
    sigma_integral,
    step_profile,
)
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


def frame_from(ratios: np.ndarray, sigmas=None, seeds_per_prompt: int = 1) -> pd.DataFrame:
    """A tidy frame whose base norms are 1, so tuned norms equal the given (samples, steps) ratios.

    Rows are samples: prompt ``s // seeds_per_prompt``, seed ``s % seeds_per_prompt``.
    """
    samples, steps = ratios.shape
    sigmas = np.linspace(1, 0, steps, endpoint=False) if sigmas is None else sigmas
    rows = []
    for s in range(samples):
        prompt, seed = divmod(s, seeds_per_prompt)
        for t in range(steps):
            r = ratios[s, t]
            ok = np.isfinite(r)
            rows.append(dict(mode="paired", drive="tuned", prompt_id=prompt, prompt=f"p{prompt}", seed=seed, step=t,
                             timestep=sigmas[t] * 1000, sigma=sigmas[t], branch="guided", norm_base=1.0,
                             norm_tuned=r, ratio=r if ok else np.nan, hinge=max(r - 1, 0) if ok else np.nan,
                             cosine=1.0, mse=0.0))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_step_mean_is_the_mean_over_steps_of_per_step_mean_ratios():
    ratios = np.array([[1.0, 1.2], [1.2, 1.4]])  # step means 1.1 and 1.3 -> 1.2 -> +20 %
    value, lo, hi = inflation(frame_from(ratios), STEP_MEAN)
    assert value == pytest.approx(0.2)
    assert lo <= value <= hi


def test_sigma_integral_by_hand_on_uneven_steps():
    # sigma gaps 0.1, 0.4, 0.5 over a span of 1.0 -> trapezoid weights 0.05, 0.25, 0.45, 0.25
    sigmas = np.array([1.0, 0.9, 0.5, 0.0])
    ratios = np.array([[1.4, 1.2, 1.1, 1.0], [1.4, 1.2, 1.1, 1.0]])
    estimates = inflation_estimates(frame_from(ratios, sigmas))
    assert estimates["sigma_integral"][0] == pytest.approx(0.05 * 0.4 + 0.25 * 0.2 + 0.45 * 0.1)  # 0.115
    assert estimates["step_mean"][0] == pytest.approx((0.4 + 0.2 + 0.1 + 0.0) / 4)  # 0.175
    assert inflation(frame_from(ratios, sigmas))[0] == estimates["sigma_integral"][0]  # the headline
    # a step with no finite sample is left out: the trapezoid joins its neighbours (weights .25 .5 .25)
    ratios[:, 1] = np.nan
    assert inflation(frame_from(ratios, sigmas))[0] == pytest.approx(0.25 * 0.4 + 0.5 * 0.1)
    # the span normalises: the same profile on half the sigma range gives the same number
    assert sigma_integral(np.array([0.4, 0.2, 0.1, 0.0]), sigmas / 2) == pytest.approx(0.115)


def test_sigma_integral_does_not_depend_on_how_steps_are_packed():
    # inflation linear in sigma: every trapezoid is exact, so packing steps near noise (as a shift does)
    # leaves the sigma-integral at the true mean over sigma (0.05) while the step mean moves with the packing
    uniform = np.linspace(1, 0, 11)
    shifted = 3 * uniform / (1 + 2 * uniform)  # SD3's shift 3
    for sigmas in (uniform, shifted):
        ratios = np.tile(1 + 0.1 * sigmas, (2, 1))
        assert inflation(frame_from(ratios, sigmas))[0] == pytest.approx(0.05)
    shifted_mean = inflation(frame_from(np.tile(1 + 0.1 * shifted, (2, 1)), shifted), STEP_MEAN)[0]
    assert shifted_mean > 0.06


def test_cluster_bootstrap_is_wider_when_seeds_of_a_prompt_agree():
    # 4 prompts x 12 seeds; a prompt's seeds agree closely, prompts differ: 4 independent units, not 48
    rng = np.random.default_rng(0)
    prompt_effect = np.repeat([0.0, 0.04, 0.08, 0.12], 12)[:, None]
    ratios = 1.05 + prompt_effect + 0.002 * rng.standard_normal((48, 3))
    frame = frame_from(ratios, seeds_per_prompt=12)
    value, lo_c, hi_c = inflation(frame)
    same, lo_s, hi_s = inflation(frame, by=BY_SAMPLE)
    assert value == same
    assert hi_c - lo_c > 1.5 * (hi_s - lo_s)
    assert lo_c <= value <= hi_c
    # per step as well
    cluster_step, sample_step = step_profile(frame), step_profile(frame, by=BY_SAMPLE)
    assert ((cluster_step["ratio_hi"] - cluster_step["ratio_lo"]) > (sample_step["ratio_hi"] - sample_step["ratio_lo"])).all()


def test_cluster_weights_move_whole_prompts():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    weights = bootstrap_weights(clusters, resamples=50)
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 4]).all()
    assert (weights[:, [0, 3, 5]].sum(axis=1) == 3).all()  # 3 prompts drawn per resample
    single = bootstrap_weights(np.zeros(5, dtype=int), resamples=50)  # one prompt: its seeds are resampled
    assert (single.sum(axis=1) == 5).all() and single.std() > 0


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
