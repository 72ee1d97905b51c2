"""NormGuard safe by default: one call, the reference always without a graph, finite at zero norms, wrappers.

Real components: a tiny diffusers SD3 transformer with real peft adapters, torch FSDP on the CPU (gloo, one
process).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig, get_peft_model

import normscope.guard as guard_api
from normscope.builders.tiny import TINY_SD3
from normscope.errors import ConfigError
from normscope.guard import cfg_branch, frozen_copy, normguard_penalty, reference

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]


def transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_SD3).eval()


def inputs(batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g),
                timestep=torch.full((batch,), 700.0), return_dict=False)


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)


def test_reference_runs_without_a_graph_even_without_the_callers_no_grad():
    """diffusers' add_adapter leaves the base trainable: the old reference() returned a v_ref with a graph."""
    model = transformer()
    model.add_adapter(lora())
    assert torch.is_grad_enabled()
    with reference(model) as ref:
        assert not torch.is_grad_enabled()
        v_ref = ref(**inputs())[0]
    assert torch.is_grad_enabled()  # the caller's mode is back
    assert not v_ref.requires_grad and v_ref.grad_fn is None


def test_one_call_gives_the_penalty_against_the_base_and_trains_only_the_adapter():
    base = transformer()
    x = inputs()
    with torch.no_grad():
        base_v = base(**x)[0]
    model = get_peft_model(transformer(), lora())
    v_theta = model(**x)[0]
    guard = guard_api.normguard_loss(model, v_theta, **x)
    torch.testing.assert_close(guard.v_ref, base_v, rtol=0, atol=1e-6)  # adapters were off for the reference
    assert not guard.v_ref.requires_grad
    expected = normguard_penalty(v_theta.detach(), base_v, form="relative")
    assert guard.penalty.item() == pytest.approx(expected.item(), rel=1e-5)  # relative is the default form
    assert guard.ratio.shape == (2,) and not guard.ratio.requires_grad
    (guard.penalty + 1e-3 * v_theta.square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)  # the base got no gradient through the reference
    penalty, v_ref = guard_api.normguard_loss(model, v_theta.detach(), **x)  # unpacks like a pair
    assert v_ref.shape == v_theta.shape


def test_one_call_on_a_cfg_batch_penalises_the_branch_the_trainer_trains():
    model = get_peft_model(transformer(), lora())
    x = inputs(batch=4)  # [uncond, cond]
    raw = model(**x)[0]
    guided = cfg_branch(raw, "guided", 4.5)
    guard = guard_api.normguard_loss(model, guided, branch="guided", guidance_scale=4.5, **x)
    with torch.no_grad(), model.disable_adapter():
        expected = cfg_branch(model(**x)[0], "guided", 4.5)
    torch.testing.assert_close(guard.v_ref, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="branch="):
        guard_api.normguard_loss(model, guided, **x)


def test_one_call_with_a_frozen_copy_for_a_full_fine_tune():
    model = transformer()
    frozen = frozen_copy(model)
    x = inputs()
    with torch.no_grad():
        base_v = model(**x)[0]
        model.proj_out.weight.mul_(1.2)  # "training" moves the weights
    v_theta = model(**x)[0]
    guard = guard_api.normguard_loss(model, v_theta, frozen=frozen, **x)
    torch.testing.assert_close(guard.v_ref, base_v, rtol=0, atol=0)
    assert guard.penalty.item() > 0


def test_relative_penalty_is_finite_when_a_reference_norm_is_zero():
    v_ref = torch.randn(3, 4, 4)
    v_ref[1] = 0.0  # a zero reference velocity (a padded or degenerate sample)
    v = (1.5 * v_ref).requires_grad_()
    with torch.no_grad():
        v[1] = 1.0
    penalty = normguard_penalty(v, v_ref, form="relative", reduction="none")
    assert torch.isfinite(penalty).all() and penalty[1].item() == 0.0
    assert penalty[0].item() == pytest.approx(0.5, rel=1e-5)
    penalty.mean().backward()
    assert torch.isfinite(v.grad).all() and torch.count_nonzero(v.grad[1]) == 0
    zero = torch.zeros(2, 8, requires_grad=True)  # both zero: no excess, no NaN gradient
    normguard_penalty(zero, torch.zeros(2, 8)).backward()
    assert torch.isfinite(zero.grad).all()


class DeepSpeedEngine(torch.nn.Module):
    """What DeepSpeed's engine looks like to normscope: a module holding the model as ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_a_deepspeed_engine_is_unwrapped_like_ddp():
    x = inputs()
    with torch.no_grad():
        base_v = transformer()(**x)[0]
    engine = DeepSpeedEngine(get_peft_model(transformer(), lora()))
    with reference(engine) as ref:
        assert ref is engine
        torch.testing.assert_close(ref(**x)[0], base_v, rtol=0, atol=1e-6)
    frozen = frozen_copy(DeepSpeedEngine(transformer()))
    assert isinstance(frozen, SD3Transformer2DModel) and not any(p.requires_grad for p in frozen.parameters())


def test_frozen_copy_under_fsdp_refuses_in_normscope_words_and_the_sharded_copy_reproduces_the_model(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        x = inputs()
        model = transformer()
        with torch.no_grad():
            base_v = model(**x)[0]
        frozen = frozen_copy(model)  # before FSDP wraps the model: DanceGRPO's order in its patch
        wrapped = FSDP(model, device_id=torch.device("cpu"))
        with pytest.raises(ConfigError, match="before FSDP wraps it"):
            frozen_copy(wrapped)
        sharded_ref = FSDP(frozen, device_id=torch.device("cpu"))  # the copy sharded like the model
        assert not any(p.requires_grad for p in sharded_ref.parameters())
        with torch.no_grad():
            for p in wrapped.parameters():
                p.mul_(1.1)  # training moves the model, not the reference
        v_theta = wrapped(**x)[0]
        guard = guard_api.normguard_loss(wrapped, v_theta, frozen=sharded_ref, **x)
        torch.testing.assert_close(guard.v_ref, base_v, rtol=0, atol=1e-6)
        assert guard.penalty.item() > 0
    finally:
        dist.destroy_process_group()
