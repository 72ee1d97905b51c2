"""NormGuard's penalty: zero below the reference, the right gradient above it, float32 reductions."""

from __future__ import annotations

import pytest
import torch

from normscope.guard import normguard_penalty, per_sample_norm, static_normguard_penalty, tau_at


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
    assert normguard_penalty(v, v_ref).item() == pytest.approx((5.0 + 0.0) / 2)
    assert normguard_penalty(v, v_ref, squared=True).item() == pytest.approx(25.0 / 2)
    assert normguard_penalty(v, v_ref, reduction="none").tolist() == [5.0, 0.0]
    assert static_normguard_penalty(v, torch.tensor([5.0, 1.0]), reduction="sum").item() == pytest.approx(5.0)


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
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    taus = torch.tensor([10.0, 20.0, 40.0])
    got = tau_at(torch.tensor([1.0, 0.75, 0.25, -1.0]), sigmas, taus)
    assert got.tolist() == pytest.approx([10.0, 15.0, 30.0, 40.0])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        normguard_penalty(torch.zeros(2, 3), torch.zeros(2, 4))
