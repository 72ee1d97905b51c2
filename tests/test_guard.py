"""NormGuard's penalty: zero below the reference, the right gradient above it, float32 reductions."""

from __future__ import annotations

import pytest
import torch

from normscope.errors import GuardInputError
from normscope.guard import (
    grid_buckets,
    normguard_penalty,
    normguard_stats,
    per_element_rms,
    per_sample_norm,
    static_normguard_penalty,
    tau_at,
)


def test_zero_value_and_gradient_below_the_reference():
    v_ref = torch.randn(4, 3, 8, 8)
    v = (0.9 * v_ref).requires_grad_()
    penalty = normguard_penalty(v, v_ref)
    penalty.backward()
    assert penalty.item() == 0.0 and torch.count_nonzero(v.grad) == 0


def test_margin_tolerates_small_excess():
    v_ref = torch.randn(2, 16)
    assert normguard_penalty(1.01 * v_ref, v_ref, margin=0.02).item() == 0.0
    assert normguard_penalty(1.03 * v_ref, v_ref, margin=0.02).item() > 0.0


def test_value_matches_a_hand_computation():
    v_ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # norms 5 and 1
    v = torch.tensor([[6.0, 8.0], [0.5, 0.0]])      # norms 10 and 0.5
    assert normguard_penalty(v, v_ref, form="absolute").item() == pytest.approx((5.0 + 0.0) / 2)
    assert normguard_penalty(v, v_ref, squared=True, form="absolute").item() == pytest.approx(25.0 / 2)
    assert normguard_penalty(v, v_ref, reduction="none", form="absolute").tolist() == [5.0, 0.0]
    assert normguard_penalty(v, v_ref, reduction="none").tolist() == [1.0, 0.0]  # the default: relative
    assert static_normguard_penalty(v, torch.tensor([5.0, 1.0]), reduction="sum", form="absolute").item() == pytest.approx(5.0)


def test_gradient_points_to_a_smaller_norm_and_matches_finite_differences():
    torch.manual_seed(0)
    v_ref = torch.randn(3, 10, dtype=torch.float64)
    v = (1.2 * v_ref + 0.01 * torch.randn(3, 10, dtype=torch.float64)).requires_grad_()
    for squared in (False, True):
        v.grad = None
        normguard_penalty(v, v_ref, squared=squared).backward()
        grad = v.grad.clone()
        # The gradient is parallel to v (radial): a step against it shrinks every inflated norm.
        assert torch.all((grad * v).sum(dim=1) > 0)
        stepped = (v - 1e-3 * grad).detach()
        assert torch.all(per_sample_norm(stepped) < per_sample_norm(v.detach()))
        eps = 1e-6
        numeric = torch.zeros_like(v)
        flat = v.detach().clone().view(-1)
        for i in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            numeric.view(-1)[i] = (
                normguard_penalty(plus.view_as(v), v_ref, squared=squared)
                - normguard_penalty(minus.view_as(v), v_ref, squared=squared)
            ) / (2 * eps)
        assert torch.allclose(grad, numeric, atol=1e-5)


def test_reference_gets_no_gradient():
    v_ref = torch.randn(2, 8, requires_grad=True)
    v = (2 * v_ref.detach()).requires_grad_()
    normguard_penalty(v, v_ref).backward()
    assert v_ref.grad is None and v.grad is not None


def test_bfloat16_inputs_reduce_in_float32():
    torch.manual_seed(1)
    v_ref = torch.randn(4, 4096)
    v = 1.1 * v_ref
    exact = normguard_penalty(v.double(), v_ref.double()).item()
    low = normguard_penalty(v.bfloat16(), v_ref.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(exact, rel=1e-2)


def test_tau_interpolation_from_a_profile_table():
    sigmas = torch.tensor([1.0, 0.5, 0.1])
    taus = torch.tensor([10.0, 20.0, 40.0])
    got = tau_at(torch.tensor([1.0, 0.75, 0.25, 0.0]), sigmas, taus)
    assert got.tolist() == pytest.approx([10.0, 15.0, 32.5, 40.0])  # below the grid's last sigma: held


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        normguard_penalty(torch.zeros(2, 3), torch.zeros(2, 4))


def test_trainer_shaped_sigma_gives_the_per_sample_answer():
    """The broadcast bug: sigma (B,1,1,1) made tau (B,1,1,1), and ||v|| (B,) - tau became (B,1,1,B)."""
    sigmas, taus = torch.tensor([1.0, 0.0]), torch.tensor([10.0, 20.0])
    v = torch.zeros(3, 4, 2, 2)
    v[:, 0, 0, 0] = torch.tensor([30.0, 12.0, 5.0])  # per-sample norms 30, 12, 5
    sigma = torch.tensor([1.0, 0.5, 0.0]).view(3, 1, 1, 1)  # what trainers broadcast against latents
    tau = tau_at(sigma, sigmas, taus)  # 10, 15, 20
    expected = ((30 - 10) + 0 + 0) / 3
    assert static_normguard_penalty(v, tau, form="absolute").item() == pytest.approx(expected)
    assert static_normguard_penalty(v, tau, reduction="none").shape == (3,)
    with pytest.raises(ValueError, match="one value per sample"):
        static_normguard_penalty(v, tau.view(1, 1, 1, 3))  # would broadcast to (3, 1, 1, 3)
    with pytest.raises(ValueError, match="one value per sample"):
        normguard_penalty(v, v, margin=torch.zeros(6))


@pytest.mark.parametrize("bad", [torch.tensor([999.0, 500.0]), torch.tensor([-0.1, 0.5]), torch.tensor([float("nan"), 0.5])])
def test_sigma_outside_unit_interval_is_refused_not_clamped(bad):
    with pytest.raises(GuardInputError, match="sigma"):
        tau_at(bad, torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(GuardInputError, match="sigma"):
        normguard_stats(torch.ones(2, 4), torch.ones(2, 4), sigma=bad)


def test_timestep_hint_in_the_message():
    with pytest.raises(GuardInputError, match="divide by 1000"):
        tau_at(torch.tensor([800.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]))


def test_forms_by_hand():
    v_ref = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # norms 5, 1; rms 2.5, 0.5
    v = torch.tensor([[6.0, 8.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])      # norms 10, 0.5; rms 5, 0.25
    none = dict(reduction="none")
    assert normguard_penalty(v, v_ref, form="absolute", **none).tolist() == pytest.approx([5.0, 0.0])
    assert normguard_penalty(v, v_ref, form="relative", **none).tolist() == pytest.approx([1.0, 0.0])
    assert normguard_penalty(v, v_ref, form="rms", **none).tolist() == pytest.approx([2.5, 0.0])
    # a per-sample (per-sigma) margin
    assert normguard_penalty(v, v_ref, form="relative", margin=torch.tensor([0.5, 0.0]), **none).tolist() == pytest.approx([0.5, 0.0])
    assert static_normguard_penalty(v, torch.tensor([2.0, 1.0]), form="rms", **none).tolist() == pytest.approx([3.0, 0.0])
    assert static_normguard_penalty(v, torch.tensor([2.0, 1.0]), form="relative", **none).tolist() == pytest.approx([1.5, 0.0])


def test_relative_and_rms_forms_do_not_depend_on_resolution():
    """A per-pixel model on a 2x-upsampled latent: the norm doubles, ratio and RMS do not move."""
    torch.manual_seed(0)
    base = torch.nn.Conv2d(4, 4, 1)
    tuned = torch.nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        tuned.weight.copy_(base.weight * 1.1 + 0.01 * torch.randn_like(base.weight))
        tuned.bias.copy_(base.bias * 1.1)
    small = torch.randn(3, 4, 8, 8)
    large = small.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 4x the elements
    with torch.no_grad():
        pairs = {size: (tuned(x), base(x)) for size, x in (("small", small), ("large", large))}
    for form in ("relative", "rms"):
        low = normguard_penalty(*pairs["small"], form=form).item()
        high = normguard_penalty(*pairs["large"], form=form).item()
        assert low > 0.01 and high == pytest.approx(low, rel=1e-5), form
    absolute = [normguard_penalty(*pairs[s], form="absolute").item() for s in ("small", "large")]
    assert absolute[1] == pytest.approx(2 * absolute[0], rel=1e-5)  # sqrt(4): the unit that drifts
    rms_tau = per_element_rms(pairs["small"][1])
    assert static_normguard_penalty(pairs["small"][0], rms_tau, form="rms").item() == pytest.approx(
        static_normguard_penalty(pairs["large"][0], rms_tau, form="rms").item(), rel=1e-5)


def test_stats_by_hand():
    v_ref = torch.ones(4, 9)
    v = v_ref * torch.tensor([1.2, 0.9, 1.0, 1.1])[:, None]
    stats = normguard_stats(v, v_ref, sigma=torch.tensor([0.9, 0.5, 0.2, 0.1]).view(4, 1, 1))
    assert stats["ratio_mean"] == pytest.approx(1.05) and stats["ratio_max"] == pytest.approx(1.2)
    assert stats["hinge_rate"] == pytest.approx(0.5) and stats["n"] == 4
    assert stats["ratio/near_noise"] == pytest.approx(1.2) and stats["ratio/middle"] == pytest.approx(0.9)
    assert stats["ratio/near_data"] == pytest.approx(1.05) and stats["n/near_data"] == 2
    assert stats["norm_mean"] == pytest.approx(3 * 1.05) and stats["norm_ref_mean"] == pytest.approx(3.0)
    empty = normguard_stats(v, v_ref, sigma=0.9)
    assert empty["ratio/middle"] is None and empty["n/middle"] == 0
    grid = grid_buckets([1.0, 0.5, 0.001])
    assert [b[0] for b in grid] == ["sigma=1.000", "sigma=0.500", "sigma=0.001"]
    assert normguard_stats(v, v_ref, sigma=torch.tensor([1.0, 0.5, 0.001, 0.001]), buckets=grid)["ratio/sigma=0.001"] == pytest.approx(1.05)
