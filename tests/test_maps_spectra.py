"""Known answers for maps, spectra and the grid score on synthetic velocity fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normscope.measure import spectra
from normscope.measure.bootstrap import cluster_weights, ratio_ci
from normscope.measure.maps import REGION_NAMES, MapAccumulator, Maps

SIGMAS = (0.9, 0.5, 0.1)  # one step in each region


def fields(batch=3, channels=4, size=8, seed=0) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def checkerboard(size=8, amplitude=0.1) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return amplitude * (-1.0) ** (y + x)  # period 2: the patch frequency of 2x2 patches, 0.5 cycles/pixel


def accumulate(pairs, period=2, prompt_ids=(0, 1, 2)) -> Maps:
    acc = MapAccumulator(period)
    for tuned, base in pairs:
        for sigma in SIGMAS:
            acc.add(sigma, tuned, base)
        acc.end_call()
    return acc.result(list(prompt_ids) * len(pairs))


def test_parseval_power_sums_to_the_squared_norm():
    v = fields()
    assert torch.allclose(spectra.power_2d(v).sum(dim=(1, 2)), v.square().sum(dim=(1, 2, 3)), rtol=1e-5)


def test_uniform_scale_is_flat_everywhere():
    base = fields()
    maps = accumulate([(1.1 * base, base)])
    for region in REGION_NAMES:
        assert torch.allclose(maps.ratio_map(region), torch.full((8, 8), 1.1), rtol=1e-6)
        assert torch.allclose(maps.channel_ratio(region), torch.full((4,), 1.1), rtol=1e-6)
        assert torch.allclose(maps.spectrum_ratio(region), torch.full_like(maps.spectrum_ratio(region), 1.21), rtol=1e-5)


def test_grid_score_is_scale_invariant_and_fires_on_a_checkerboard():
    base = fields()
    scaled = accumulate([(1.1 * base, base)]).grid_score()[0]
    # A uniform scale leaves v_tuned - v_base = 0.1 v_base: the score is the base field's own, at any scale.
    assert scaled == pytest.approx(accumulate([(1.5 * base, base)]).grid_score()[0], rel=1e-5)
    own = spectra.grid_energies(spectra.power_2d(base), 2).sum(0)
    assert scaled == pytest.approx(float(own[0] / own[1]), rel=1e-5)
    grid = accumulate([(1.1 * base + checkerboard(), base)]).grid_score()
    assert grid[0] > 10 * scaled
    assert grid[1] > 5 * scaled  # the whole CI, not just the point


def test_half_scaled_latent_shows_that_half_in_the_map():
    base = fields()
    tuned = base.clone()
    tuned[..., :4, :] *= 1.1  # top half of the latent
    maps = accumulate([(tuned, base)])
    for region in REGION_NAMES:
        ratio = maps.ratio_map(region)
        assert torch.allclose(ratio[:4], torch.full((4, 8), 1.1), rtol=1e-6)
        assert torch.allclose(ratio[4:], torch.ones(4, 8), rtol=1e-6)


def test_no_patch_no_grid_score():
    base = fields()
    assert accumulate([(1.1 * base, base)], period=1).grid_score() is None
    assert spectra.grid_score(base, 1) is None


def test_video_maps_have_one_map_per_frame():
    base = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    tuned = base.clone()
    tuned[:, :, 1] *= 1.2  # frame 1 only
    maps = accumulate([(tuned, base)], prompt_ids=(0, 1))
    ratio = maps.ratio_map("middle")
    assert ratio.shape == (3, 8, 8)
    assert torch.allclose(ratio[1], torch.full((8, 8), 1.2), rtol=1e-6)
    assert torch.allclose(ratio[[0, 2]], torch.ones(2, 8, 8), rtol=1e-6)


def test_regions_stay_apart_and_storage_round_trips(tmp_path):
    base = fields()
    acc = MapAccumulator(2)
    acc.add(0.9, 1.2 * base, base)  # near noise only
    acc.add(0.1, base, base)  # near data
    acc.end_call()
    maps = acc.result([0, 1, 2])
    assert maps.regions == ["near_noise", "near_data"]
    loaded = Maps.load(maps.save(tmp_path / "maps.safetensors"))
    assert torch.allclose(loaded.ratio_map("near_noise"), torch.full((8, 8), 1.2), rtol=1e-6)
    assert torch.equal(loaded.ratio_map("near_data"), torch.ones(8, 8))
    assert loaded.summary() == maps.summary()
    assert (tmp_path / "maps.safetensors").stat().st_size < 20_000


def test_cluster_bootstrap_draws_whole_prompts():
    weights = cluster_weights([0, 0, 1, 1, 2, 2])
    assert np.array_equal(weights[:, 0], weights[:, 1]) and np.array_equal(weights[:, 4], weights[:, 5])
    assert np.all(weights.sum(1) == 6)
    point, lo, hi = ratio_ci([2.0, 2.0, 4.0, 4.0], [1.0, 1.0, 2.0, 2.0], [0, 0, 1, 1])
    assert point == lo == hi == 2.0


def test_patch_frequencies_are_marked():
    assert spectra.patch_frequencies(2) == [0.5, round(2**0.5 / 2, 6)]
    assert spectra.patch_frequencies(1) == []
