"""Each integration patch's loss code path, trained on the bundled digits model.

Every path computes v_theta and v_ref the way its patch does (flow_grpo: guided CFG velocity with the uncond
branch detached and the reference under ``disable_adapter()``; DiffusionNFT: the default adapter next to the
``old`` one; AWM: all train timesteps stacked in one batch; Diffusion-DPO: a ``learner`` and a ``ref``
adapter on winners and losers with shared noise; DanceGRPO: a full fine-tune under FSDP with a frozen,
FSDP-sharded reference through ``normguard_loss``), and adds a reward-hacking drive that pushes
||v_theta|| / ||v_ref|| up. Known answer: without NormGuard the ratio climbs past +5 %; with it, it stays
within 2 % of the reference, on the same seeds, and the monitor logs every step as strict JSON.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from normscope.guard import frozen_copy, normguard_loss, normguard_penalty, per_sample_ratio
from normscope.monitor import Monitor

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_out"]
STEPS, LAM, DRIVE, GUIDANCE = 12, 4.0, 1.0, 3.0


@pytest.fixture(scope="module")
def digits():
    """The bundled digits pipeline's transformer, prompt embeddings, and base rollouts (x0) for 8 prompts."""
    from diffusers import StableDiffusion3Pipeline

    from normscope.builders.digits import SAMPLING, assets_dir, digit_prompt

    pipe = StableDiffusion3Pipeline.from_pretrained(str(assets_dir() / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                              max_sequence_length=SAMPLING["max_sequence_length"])
    embeds, pooled = embeds.detach(), pooled.detach()
    digits = torch.arange(8) % 10
    with torch.no_grad():
        x0 = pipe(prompt=[digit_prompt(int(d)) for d in digits], num_inference_steps=SAMPLING["steps"],
                  guidance_scale=SAMPLING["guidance"], height=SAMPLING["height"], width=SAMPLING["width"],
                  max_sequence_length=SAMPLING["max_sequence_length"], output_type="latent",
                  generator=[torch.Generator().manual_seed(int(s)) for s in range(len(digits))]).images
    return {"transformer": pipe.transformer, "embeds": embeds[digits], "pooled": pooled[digits],
            "uncond": embeds[10:].expand(len(digits), -1, -1), "uncond_pooled": pooled[10:].expand(len(digits), -1),
            "x0": x0}


def lora(init=False) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=init)


def noised(d, step: int, batch=None):
    g = torch.Generator().manual_seed(100 + step)
    x0 = d["x0"] if batch is None else d["x0"][:batch]
    sigma = torch.rand(len(x0), generator=g) * 0.9 + 0.05
    noise = torch.randn(x0.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma, noise


def sd3(model, x_t, sigma, embeds, pooled):
    return model(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds, pooled_projections=pooled,
                 return_dict=False)[0]


# --- the paths, as the patches compute v_theta and v_ref ------------------------------------------------------

def flow_grpo_velocities(model, d, x_t, sigma):
    """compute_log_prob with train.cfg: [uncond, cond] in one batch, uncond detached, guided velocity."""
    def guided(m):
        out = sd3(m, torch.cat([x_t] * 2), torch.cat([sigma] * 2), torch.cat([d["uncond"], d["embeds"]]),
                  torch.cat([d["uncond_pooled"], d["pooled"]]))
        uncond, cond = out.chunk(2)
        uncond = uncond.detach()
        return uncond + GUIDANCE * (cond - uncond)

    v_theta = guided(model)
    with torch.no_grad():
        with model.disable_adapter():  # the KL branch's reference forward the patch reuses
            v_ref = guided(model)
    return v_theta, v_ref


def nft_velocities(model, d, x_t, sigma):
    """train_nft_sd3: old adapter (no grad), default adapter (trained), reference with the adapters off."""
    model.set_adapter("old")
    with torch.no_grad():
        sd3(model, x_t, sigma, d["embeds"], d["pooled"])  # old_prediction: part of the step, not penalised
    model.set_adapter("default")
    forward_prediction = sd3(model, x_t, sigma, d["embeds"], d["pooled"])
    with torch.no_grad():
        with model.disable_adapter():
            ref_forward_prediction = sd3(model, x_t, sigma, d["embeds"], d["pooled"])
        model.set_adapter("default")
    return forward_prediction, ref_forward_prediction


def awm_velocities(model, d, x_t, sigma):
    """train_sd3_awm: the train timesteps stacked into one batch (T x B), flattened for the penalty."""
    g = torch.Generator().manual_seed(7)
    second = torch.rand(len(sigma), generator=g) * 0.9 + 0.05
    noise = torch.randn(d["x0"].shape, generator=g)
    x_t2 = (1 - second.view(-1, 1, 1, 1)) * d["x0"] + second.view(-1, 1, 1, 1) * noise
    stacked, sigmas = torch.cat([x_t, x_t2]), torch.cat([sigma, second])
    embeds, pooled = torch.cat([d["embeds"]] * 2), torch.cat([d["pooled"]] * 2)
    model_output = sd3(model, stacked, sigmas, embeds, pooled).double().reshape(2, len(sigma), *x_t.shape[1:])
    with torch.no_grad():
        with model.disable_adapter():
            model_output_ref = sd3(model, stacked, sigmas, embeds, pooled).double().reshape(model_output.shape)
    return model_output.flatten(0, 1), model_output_ref.flatten(0, 1)


PATHS = {"flow_grpo_sd3": flow_grpo_velocities, "diffusionnft_sd3": nft_velocities, "awm_sd3": awm_velocities}


def make_peft(d, path):
    model = get_peft_model(frozen_copy(d["transformer"]), lora())
    if path == "diffusionnft_sd3":
        model.add_adapter("old", lora())
        model.set_adapter("default")
    for name, p in model.named_parameters():
        p.requires_grad_(".default." in name and "lora_" in name)
    return model


def train_peft(d, path, lam, run_dir):
    """STEPS updates of the drive (+ lam x NormGuard); returns the mean ratio of the last three steps."""
    torch.manual_seed(0)
    model = make_peft(d, path)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    ratios = []
    with Monitor(run_dir, tensorboard=False, wandb=False) as monitor:
        for step in range(STEPS):
            x_t, sigma, _ = noised(d, step)
            v_theta, v_ref = PATHS[path](model, d, x_t, sigma)
            ratio = per_sample_ratio(v_theta, v_ref)
            loss = -DRIVE * ratio.mean() + lam * normguard_penalty(v_theta, v_ref)  # the patches' call
            sigma_log = sigma if len(v_theta) == len(sigma) else torch.cat([sigma, sigma])
            monitor.log(step, v_theta, v_ref, sigma=sigma_log if path != "awm_sd3" else None)
            optimizer.zero_grad()
            loss.backward()
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            optimizer.step()
            ratios.append(ratio.mean().item())
    return sum(ratios[-3:]) / 3


@pytest.mark.parametrize("path", list(PATHS))
def test_lora_paths_train_and_normguard_holds_the_norm(digits, path, tmp_path):
    free = train_peft(digits, path, 0.0, tmp_path / "free")
    guarded = train_peft(digits, path, LAM, tmp_path / "guard")
    assert free > 1.05, free  # the drive inflates the norm without the guard
    assert guarded < 1.02, guarded
    lines = (tmp_path / "guard" / "monitor.jsonl").read_text().splitlines()
    assert len(lines) == STEPS and all(json.loads(line)["n"] > 0 for line in lines)


def dpo_step(model, d, step):
    """train_sd3_dpo: winners and losers share noise and sigma; learner vs ref adapter, Diffusion-DPO loss."""
    x0 = d["x0"]
    half = len(x0) // 2
    g = torch.Generator().manual_seed(200 + step)
    noise = torch.randn((half, *x0.shape[1:]), generator=g)
    noise = torch.cat([noise, noise])
    sigma = torch.rand(half, generator=g) * 0.9 + 0.05
    sigma = torch.cat([sigma, sigma])
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    embeds = torch.cat([d["embeds"][:half]] * 2)  # the same prompt for a winner and its loser
    pooled = torch.cat([d["pooled"][:half]] * 2)
    model.set_adapter("learner")
    model_pred = sd3(model, x_t, sigma, embeds, pooled)
    with torch.no_grad():
        model.set_adapter("ref")
        model_pred_ref = sd3(model, x_t, sigma, embeds, pooled).detach()
        model.set_adapter("learner")
    for name, p in model.named_parameters():
        p.requires_grad_(".learner." in name)
    target = noise - x0
    theta_mse = ((model_pred.float() - target) ** 2).reshape(len(x0), -1).mean(dim=1)
    ref_mse = ((model_pred_ref.float() - target) ** 2).reshape(len(x0), -1).mean(dim=1)
    w_l_diff = (theta_mse[:half] - ref_mse[:half]) - (theta_mse[half:] - ref_mse[half:])
    loss = torch.mean(-F.logsigmoid(-0.5 * 100 * w_l_diff))
    return loss, model_pred, model_pred_ref, sigma


def train_dpo(d, lam, run_dir):
    torch.manual_seed(0)
    model = get_peft_model(frozen_copy(d["transformer"]), lora(init=True), adapter_name="learner")
    model.add_adapter("ref", lora(init=True))  # B = 0: the ref adapter is the base (offline DPO)
    model.set_adapter("learner")
    params = [p for n, p in model.named_parameters() if ".learner." in n]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    ratios, dpo = [], []
    with Monitor(run_dir, tensorboard=False, wandb=False) as monitor:
        for step in range(STEPS):
            loss, model_pred, model_pred_ref, sigma = dpo_step(model, d, step)
            ratio = per_sample_ratio(model_pred, model_pred_ref)
            total = loss - DRIVE * ratio.mean() + lam * normguard_penalty(model_pred, model_pred_ref)
            monitor.log(step, model_pred, model_pred_ref, sigma=sigma)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            ratios.append(ratio.mean().item())
            dpo.append(loss.item())
    return sum(ratios[-3:]) / 3, dpo


def test_dpo_path_trains_on_digits_and_normguard_holds_the_norm(digits, tmp_path):
    free, _ = train_dpo(digits, 0.0, tmp_path / "free")
    guarded, dpo = train_dpo(digits, LAM, tmp_path / "guard")
    assert dpo[0] == pytest.approx(-F.logsigmoid(torch.tensor(0.0)).item(), abs=1e-4)  # learner == ref at the start
    assert min(dpo[1:]) < dpo[0]  # the DPO loss trains
    assert free > 1.05 and guarded < 1.02, (free, guarded)


def test_dancegrpo_path_full_fine_tune_under_fsdp(digits, tmp_path):
    """Full fine-tune, FSDP on CPU (gloo, one process); the reference is the frozen copy sharded the same way."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ratios = {}
        for lam in (0.0, LAM):
            torch.manual_seed(0)
            base = frozen_copy(digits["transformer"]).requires_grad_(True).train()
            ref = FSDP(frozen_copy(base), device_id=torch.device("cpu"))  # copied before wrapping: the patch's order
            transformer = FSDP(base, device_id=torch.device("cpu"))
            optimizer = torch.optim.Adam(transformer.parameters(), lr=3e-4)
            history = []
            with Monitor(tmp_path / f"run{lam}", tensorboard=False, wandb=False) as monitor:
                for step in range(STEPS):
                    x_t, sigma, _ = noised(digits, step)
                    kwargs = dict(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=digits["embeds"],
                                  pooled_projections=digits["pooled"], return_dict=False)
                    pred = transformer(**kwargs)[0]
                    guard = normguard_loss(transformer, pred, frozen=ref, **kwargs)  # the patch's one call
                    monitor.log(step, pred, guard.v_ref, sigma=sigma)
                    loss = -DRIVE * per_sample_ratio(pred, guard.v_ref).mean() + lam * guard.penalty
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    history.append(guard.ratio.mean().item())
            ratios[lam] = sum(history[-3:]) / 3
        assert ratios[0.0] > 1.05 and ratios[LAM] < 1.02, ratios
    finally:
        dist.destroy_process_group()


def test_digits_rl_trains_diffusion_dpo_with_normguard(tmp_path):
    """examples/digits/rl.py --method dpo: pairs by reward, the frozen base as DPO reference and NormGuard's v_ref."""
    import sys
    from pathlib import Path

    digits_example = Path(__file__).resolve().parents[1] / "examples" / "digits"
    sys.path.insert(0, str(digits_example))
    try:
        import rl
    finally:
        sys.path.remove(str(digits_example))
    log = rl.train(rl.RLConfig(method="dpo", out=tmp_path, seed=0, iterations=2, group=2, inner_steps=2,
                               checkpoint_every=2, normguard=0.2, guard_form="relative", verbose=False))
    first = log["iterations"][0]
    assert first["penalty"] >= 0 and all(torch.isfinite(torch.tensor(e["loss"])) for e in log["iterations"])
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "lora" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "monitor.jsonl").read_text().splitlines()) == 2
    # the untrained LoRA is the base: policy and reference errors agree, the DPO loss is log 2
    err = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rl.dpo_loss(err, err, torch.tensor([0.1, 0.9, 0.5, 0.2]), 100.0).item() == pytest.approx(0.693147, abs=1e-6)
    # the winner (higher reward) fitting better than the reference lowers the loss; the loser doing so raises it
    better = torch.tensor([1.0, 1.9, 3.0, 4.0])  # sample 1 (the winner of pair 0) improves
    assert rl.dpo_loss(better, err, torch.tensor([0.1, 0.9, 0.5, 0.2]), 100.0).item() < 0.693
    assert rl.dpo_loss(better, err, torch.tensor([0.9, 0.1, 0.5, 0.2]), 100.0).item() > 0.694
    with pytest.raises(ValueError, match="group must be even"):
        rl.RLConfig(method="dpo", out=tmp_path, group=3)
