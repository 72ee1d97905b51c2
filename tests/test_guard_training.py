"""normscope.guard inside a training step on real modules: reference velocity, CFG branches, tau from a profile."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig, get_peft_model

from normscope.builders.tiny import TINY_SD3
from normscope.errors import ConfigError
from normscope.guard import (
    adapter_layers,
    cfg_branch,
    frozen_copy,
    load_tau,
    normguard_penalty,
    per_element_rms,
    reference,
    static_normguard_penalty,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]


def transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TINY_SD3).eval()


def inputs(batch: int = 2, size: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, size, size, generator=g),
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g),
                timestep=torch.full((batch,), 700.0), return_dict=False)


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)  # random B: not a no-op


@pytest.fixture(scope="module")
def base_output():
    with torch.no_grad():
        return transformer()(**inputs())[0]


def test_peft_model_reference_is_the_base_and_state_is_restored(base_output):
    model = get_peft_model(transformer(), lora())
    x = inputs()
    with torch.no_grad():
        tuned = model(**x)[0]
        with reference(model) as ref:
            v_ref = ref(**x)[0]
        after = model(**x)[0]
    assert not torch.allclose(tuned, base_output, atol=1e-4)  # the adapter does change the velocity
    torch.testing.assert_close(v_ref, base_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, tuned, rtol=0, atol=0)  # adapter back on
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_diffusers_adapters_switch_without_a_context_manager(base_output):
    """diffusers' disable_adapters()/enable_adapters() are plain calls; the guard restores each layer's state."""
    model = transformer()
    model.add_adapter(lora())
    model.requires_grad_(False)  # a trainer that freezes everything but one adapter
    trained = [p for n, p in model.named_parameters() if "lora_B" in n][:2]
    for p in trained:
        p.requires_grad_(True)
    x = inputs()
    with torch.no_grad(), reference(model) as ref:
        torch.testing.assert_close(ref(**x)[0], base_output, rtol=0, atol=1e-6)
    assert all(not layer.disable_adapters for layer in adapter_layers(model))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, p in model.named_parameters() if any(p is t for t in trained)]
    model.disable_adapters()  # adapters the user had switched off stay off
    with torch.no_grad(), reference(model):
        pass
    assert all(layer.disable_adapters for layer in adapter_layers(model))


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_ddp_and_fsdp_wrapped_modules_are_unwrapped(base_output, tmp_path, wrapper):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = get_peft_model(transformer(), lora())
        if wrapper == "ddp":
            wrapped = DistributedDataParallel(model)
        else:  # world size 1 on the CPU: FSDP falls back to NO_SHARD, the wrapping is real
            wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        x = inputs()
        with torch.no_grad(), reference(wrapped) as ref:
            assert ref is wrapped  # the wrapper is called (FSDP must gather its shards)
            v_ref = ref(**x)[0]
        torch.testing.assert_close(v_ref, base_output, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_full_fine_tune_needs_a_frozen_copy(base_output):
    model = transformer()
    frozen = frozen_copy(model)
    with torch.no_grad():
        model.proj_out.weight.mul_(1.1)  # "training" moves the weights
    with pytest.raises(ConfigError, match="frozen_copy"):
        with reference(model):
            pass
    with torch.no_grad(), reference(model, frozen=frozen) as ref:
        torch.testing.assert_close(ref(**inputs())[0], base_output, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="requires_grad"):
        with reference(model, frozen=copy.deepcopy(model)):
            pass


def test_cfg_aware_penalty_touches_only_the_branch_asked_for():
    """An [uncond, cond] batch through a LoRA transformer: penalising cond leaves uncond without gradient."""
    model = get_peft_model(transformer(), lora())
    x = inputs(batch=4)
    v = model(**x)[0]
    v.retain_grad()
    with torch.no_grad(), reference(model) as ref:
        v_ref = ref(**x)[0]
    with torch.no_grad():  # inflate the uncond half only: a raw-batch penalty would see it, a cond one must not
        v_ref[:2] *= 0.5
    penalty = normguard_penalty(cfg_branch(v, "cond"), cfg_branch(v_ref, "cond"), form="relative")
    assert penalty.item() == pytest.approx(normguard_penalty(v[2:], v_ref[2:], form="relative").item(), rel=1e-6)
    assert normguard_penalty(v, v_ref, form="relative").item() > penalty.item() + 0.1
    (penalty + 1e-3 * v[2:].sum()).backward()  # a cond-only term so cond surely has a gradient
    assert torch.count_nonzero(v.grad[:2]) == 0 and torch.count_nonzero(v.grad[2:]) > 0
    guided = cfg_branch(v.detach(), "guided", guidance_scale=4.5)
    torch.testing.assert_close(guided, v.detach()[:2] + 4.5 * (v.detach()[2:] - v.detach()[:2]))


def test_relative_penalty_is_the_known_answer_at_two_resolutions():
    """A real transformer with proj_out x 1.1 against the original: +10 % at 8x8 and 16x16 latents alike."""
    base = transformer()
    tuned = transformer()
    with torch.no_grad():
        tuned.proj_out.weight.mul_(1.1)
        tuned.proj_out.bias.mul_(1.1)
    for size in (8, 16):
        x = inputs(size=size)
        with torch.no_grad():
            v, v_ref = tuned(**x)[0], base(**x)[0]
        assert normguard_penalty(v, v_ref, form="relative").item() == pytest.approx(0.1, abs=1e-5)
        assert normguard_penalty(v, v_ref, form="rms").item() == pytest.approx(0.1 * per_element_rms(v_ref).mean().item(), rel=1e-4)


def test_tau_from_a_profile_per_branch_and_per_element(pipelines, tmp_path):
    from normscope.commands.profile import ProfileConfig, profile

    out = tmp_path / "ref"
    profile(ProfileConfig(base=str(pipelines["sd3"]), out=out, prompts=("a red fox", "two apples"), seeds=(0, 1),
                          steps=2, guidance=4.5, height=16, width=16, max_sequence_length=24, device="cpu",
                          dtype="float32", dtype_check=False, figure=False))
    meta = json.loads((out / "reference.json").read_text())
    vae = json.loads((pipelines["sd3"] / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    elements = vae["latent_channels"] * (16 // factor) ** 2  # SD3 latents: (C, H/f, W/f)
    assert meta["latent_elements"] == elements
    guided, cond = load_tau(out, "guided"), load_tau(out, "cond")
    assert guided.guidance == 4.5 and guided.height == 16 and cond.branch == "cond"
    assert not torch.allclose(guided.tau, cond.tau)  # the branch matters
    row = meta["per_step"]["cond"][0]
    sigma = torch.tensor([row["sigma"]] * 2).view(2, 1, 1, 1)
    assert cond.rms_at(sigma).flatten().tolist() == pytest.approx([row["tau"] / elements**0.5] * 2)
    big = torch.zeros(2, 4 * elements)  # 4x the profiled latent size
    assert cond.norm_at(sigma, like=big).flatten().tolist() == pytest.approx([row["tau"] * 2] * 2, rel=1e-6)
    v = torch.full((2, 3, 5), 2 * row["tau_rms"])  # rms twice tau_rms: relative excess exactly 1
    assert static_normguard_penalty(v, cond.rms_at(sigma), form="relative").item() == pytest.approx(1.0, rel=1e-5)
    assert "tau_rms" in (out / "thresholds.csv").read_text().splitlines()[0]
