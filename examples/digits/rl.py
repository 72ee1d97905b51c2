"""Stage 2: RL post-training of the digits base with a LoRA, as the public trainers do it — with or without NormGuard.

    python examples/digits/rl.py --method awm --seed 0 [--normguard 0.2] --out examples/digits/work/runs/awm-s0

Methods (velocity-local losses on the policy's own rollouts, group-normalised advantages per prompt):

* ``awm``: advantage-weighted matching (AWM): mean_i A_i * ||v_theta(x_t, t, c) - (eps - x0_i)||^2, plus a
  KL-like term beta * ||v_theta - v_ref||^2;
* ``nft``: DiffusionNFT-style negative-aware fine-tuning: with the "old" policy v_old (an ``old`` adapter
  holding the rollout policy), v+ = v_theta and v- = 2 v_old - v_theta, loss r ||v+ - u||^2 + (1 - r) ||v- - u||^2
  with r = 0.5 + 0.5 A / max|A| the optimality weight;
* ``dpo``: Diffusion-DPO (flow_grpo's ``train_sd3_dpo.py``): consecutive rollouts of a prompt form a pair, the
  higher reward is the winner, winner and loser share sigma and noise, and the loss is
  -log sigmoid(-beta/2 [(e_w - e_w^ref) - (e_l - e_l^ref)]) with e the per-sample flow-matching error of the
  policy and of the frozen base (the adapter switched off: the same v_ref NormGuard uses); no KL term;

and ``--normguard LAMBDA`` adds LAMBDA * normguard_penalty(v_theta, v_ref) (``normscope.guard``; the shipped runs
used the absolute form, ``--guard-form`` picks relative or rms), v_ref from the same transformer with the adapter
switched off (``normscope.guard.reference``). ``normscope.monitor`` records the norm ratio of every update into
``OUT/monitor.jsonl`` from the v_theta and v_ref the loss computes (no extra forward). The updates of iteration i
start from the weights saved as checkpoint i-1, so they are logged as monitor step i-1: monitor step N and
checkpoint-N describe the same policy. Checkpoints are written the way the trainers write them:
``OUT/checkpoints/checkpoint-N/lora/`` (a peft adapter folder; NFT also keeps its ``old/`` adapter).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from common import ASSETS, prompt_embeddings, write_json

from normscope.builders.digits import SAMPLING, digit_prompt, load_classifier, reward
from normscope.guard import normguard_penalty, per_sample_norm, reference
from normscope.monitor import Monitor

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2"]


@dataclass(kw_only=True)
class RLConfig:
    """One RL run; the defaults are the settings of the shipped runs."""

    method: str
    out: Path
    seed: int = 0
    normguard: float = 0.0  # NormGuard weight lambda (0: off)
    dpo_beta: float = 100.0  # flow_grpo's DPO beta, fixed before any DPO run
    guard_form: str = "absolute"  # the shipped results' form, named here: the library default is now "relative"
    margin: float = 0.0
    sigma_grid: bool = False  # train at the sampler's own sigmas (flow_grpo-style) instead of uniform sigma
    monitor: bool = True
    gate: float | None = None
    iterations: int = 40
    group: int = 8
    inner_steps: int = 4
    lr: float = 1e-3
    rank: int = 8
    alpha: int = 16
    kl: float = 0.01
    checkpoint_every: int = 10
    verbose: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.method not in ("awm", "nft", "dpo"):
            raise ValueError(f"method must be awm, nft or dpo, got {self.method!r}")
        if self.method == "dpo" and self.group % 2:
            raise ValueError(f"dpo pairs consecutive rollouts of a prompt: group must be even, got {self.group}")


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]


def dpo_loss(err: torch.Tensor, err_ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-DPO on consecutive pairs (same prompt, sigma and noise); the higher reward is the winner."""
    diff, pair_rewards = (err - err_ref).view(-1, 2), rewards.view(-1, 2)
    first_wins = pair_rewards[:, 0] >= pair_rewards[:, 1]
    w_diff = torch.where(first_wins, diff[:, 0], diff[:, 1])
    l_diff = torch.where(first_wins, diff[:, 1], diff[:, 0])
    return -torch.nn.functional.logsigmoid(-0.5 * beta * (w_diff - l_diff)).mean()


def train(config: RLConfig) -> dict:
    """Run RL on the bundled digits pipeline; writes checkpoints, train_log.json and monitor.jsonl into ``out``."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(ASSETS / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    classifier, _ = load_classifier(ASSETS)
    embeds, pooled = prompt_embeddings(pipe)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=LORA_TARGETS, init_lora_weights=True)
    model = get_peft_model(pipe.transformer, lora)
    if config.method == "nft":
        model.add_adapter("old", lora)
        model.set_adapter("default")
    pipe.transformer = model
    params = [p for n, p in model.named_parameters() if "lora_" in n and ".default." in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(10_000 + config.seed)
    digits = torch.arange(10).repeat_interleave(config.group)
    log = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}, "iterations": []}
    monitor = Monitor(config.out, gate=config.gate) if config.monitor else None
    started = time.perf_counter()

    for iteration in range(1, config.iterations + 1):
        # --- rollouts with the current policy (the pipeline's own sampler, CFG as in evaluation)
        if config.method == "nft":  # the old adapter holds the rollout policy
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".old." in name:
                        p.copy_(dict(model.named_parameters())[name.replace(".old.", ".default.")])
        seeds = torch.randint(0, 2**31 - 1, (len(digits),), generator=generator).tolist()
        model.eval()
        with torch.no_grad():
            x0 = pipe(prompt=[digit_prompt(int(d)) for d in digits], num_inference_steps=SAMPLING["steps"],
                      guidance_scale=SAMPLING["guidance"], height=SAMPLING["height"], width=SAMPLING["width"],
                      max_sequence_length=SAMPLING["max_sequence_length"], output_type="latent",
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
            rewards = reward(decode(pipe, x0), digits, classifier)
        grid = pipe.scheduler.sigmas[:-1].float()  # the sampler's sigmas (the last one, 0, is the end point)
        grouped = rewards.view(10, config.group)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

        # --- policy update on the rollouts (velocity-local losses, random noise levels)
        model.train()
        stats = {"loss": 0.0, "norm_ratio": 0.0, "penalty": 0.0}
        for _ in range(config.inner_steps):
            if config.sigma_grid:
                sigma = grid[torch.randint(len(grid), (len(x0),), generator=generator)]
            else:
                sigma = torch.rand(len(x0), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            if config.method == "dpo":  # a winner and its loser share sigma and noise (same draws as awm/nft)
                sigma, noise = sigma[0::2].repeat_interleave(2), noise[0::2].repeat_interleave(2, dim=0)
            x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
            target = noise - x0
            inputs = dict(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds[digits],
                          pooled_projections=pooled[digits], return_dict=False)
            with torch.no_grad(), reference(model) as ref:
                v_ref = ref(**inputs)[0]
            v = model(**inputs)[0]
            per_sample = lambda a, b: (a - b).square().flatten(1).mean(1)  # noqa: E731
            if config.method == "awm":
                loss = (advantages * per_sample(v, target)).mean()
            elif config.method == "dpo":
                loss = dpo_loss(per_sample(v, target), per_sample(v_ref, target), rewards, config.dpo_beta)
            else:
                with torch.no_grad():
                    model.set_adapter("old")
                    v_old = model(**inputs)[0]
                    model.set_adapter("default")
                    for p in params:
                        p.requires_grad_(True)
                r = (0.5 + 0.5 * advantages / advantages.abs().max().clamp_min(1e-6)).clamp(0, 1)
                loss = (r * per_sample(v, target) + (1 - r) * per_sample(2 * v_old - v, target)).mean()
            if config.method != "dpo":  # DPO's reference is inside its loss
                loss = loss + config.kl * per_sample(v, v_ref).mean()
            penalty = normguard_penalty(v, v_ref, margin=config.margin, form=config.guard_form)
            if config.normguard > 0:
                loss = loss + config.normguard * penalty
            if monitor is not None:
                monitor.log(iteration - 1, v, v_ref, sigma=sigma)  # the policy of checkpoint iteration-1
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            stats["loss"] += loss.item() / config.inner_steps
            stats["penalty"] += penalty.item() / config.inner_steps
            stats["norm_ratio"] += float((per_sample_norm(v.detach()) / per_sample_norm(v_ref)).mean()) / config.inner_steps
        entry = {"iteration": iteration, "reward": round(float(rewards.mean()), 4), **{k: round(v, 5) for k, v in stats.items()},
                 "seconds": round(time.perf_counter() - started, 1)}
        log["iterations"].append(entry)
        if config.verbose:
            print(json.dumps(entry), flush=True)
        if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
            model.eval()
            model.save_pretrained(str(config.out / "checkpoints" / f"checkpoint-{iteration}" / "lora"))
    if monitor is not None:
        monitor.close()
    log["seconds"] = round(time.perf_counter() - started, 1)
    write_json(config.out / "train_log.json", log)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["awm", "nft", "dpo"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--guard-form", choices=["absolute", "relative", "rms"], default="absolute")
    parser.add_argument("--sigma-grid", action="store_true", help="train at the sampler's sigmas (flow_grpo-style)")
    parser.add_argument("--no-monitor", dest="monitor", action="store_false", help="do not write OUT/monitor.jsonl")
    parser.add_argument("--gate", type=float, default=None, help="monitor gate: max inflation (0.05 = 5 %%)")
    defaults = RLConfig(method="awm", out=Path("."))
    for name in ("seed", "dpo_beta", "normguard", "margin", "iterations", "group", "inner_steps", "lr", "rank", "alpha", "kl",
                 "checkpoint_every"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    train(RLConfig(**vars(parser.parse_args())))


if __name__ == "__main__":
    main()
