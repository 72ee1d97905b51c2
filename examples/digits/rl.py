"""Stage 2: RL post-training of the digits base with a LoRA, as the public trainers do it — with or without NormGuard.

    python examples/digits/rl.py --method awm --seed 0 [--normguard 0.2] --out examples/digits/work/runs/awm-s0

Methods (velocity-local losses on the policy's own rollouts, group-normalised advantages per prompt):

* ``awm``: advantage-weighted matching (AWM): mean_i A_i * ||v_theta(x_t, t, c) - (eps - x0_i)||^2, plus a
  KL-like term beta * ||v_theta - v_ref||^2;
* ``nft``: DiffusionNFT-style negative-aware fine-tuning: with the "old" policy v_old (an ``old`` adapter
  holding the rollout policy), v+ = v_theta and v- = 2 v_old - v_theta, loss r ||v+ - u||^2 + (1 - r) ||v- - u||^2
  with r = 0.5 + 0.5 A / max|A| the optimality weight;

and ``--normguard LAMBDA`` adds LAMBDA * mean(relu(||v_theta|| - ||v_ref||)) (``normscope.guard``), v_ref from the
same transformer with the adapter switched off. Checkpoints are written the way the trainers write them:
``OUT/checkpoints/checkpoint-N/lora/`` (a peft adapter folder; NFT also keeps its ``old/`` adapter).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import ASSETS, prompt_embeddings, write_json

from normscope.builders.digits import SAMPLING, digit_prompt, load_classifier, reward
from normscope.guard import normguard_penalty, per_sample_norm

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2"]
DEFAULTS = dict(iterations=40, group=8, inner_steps=4, lr=1e-3, rank=8, alpha=16, kl=0.01, checkpoint_every=10)


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["awm", "nft"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normguard", type=float, default=0.0, help="NormGuard weight lambda (0: off)")
    parser.add_argument("--out", type=Path, required=True)
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()

    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(ASSETS / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    classifier, _ = load_classifier(ASSETS)
    embeds, pooled = prompt_embeddings(pipe)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=LORA_TARGETS, init_lora_weights=True)
    model = get_peft_model(pipe.transformer, config)
    if args.method == "nft":
        model.add_adapter("old", config)
        model.set_adapter("default")
    pipe.transformer = model
    params = [p for n, p in model.named_parameters() if "lora_" in n and ".default." in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=args.lr)
    generator = torch.Generator().manual_seed(10_000 + args.seed)
    digits = torch.arange(10).repeat_interleave(args.group)
    log = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "iterations": []}
    started = time.perf_counter()

    for iteration in range(1, args.iterations + 1):
        # --- rollouts with the current policy (the pipeline's own sampler, CFG as in evaluation)
        if args.method == "nft":  # the old adapter holds the rollout policy
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
        grouped = rewards.view(10, args.group)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

        # --- policy update on the rollouts (velocity-local losses, random noise levels)
        model.train()
        stats = {"loss": 0.0, "norm_ratio": 0.0, "penalty": 0.0}
        for _ in range(args.inner_steps):
            sigma = torch.rand(len(x0), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
            target = noise - x0
            inputs = dict(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds[digits],
                          pooled_projections=pooled[digits], return_dict=False)
            with torch.no_grad(), model.disable_adapter():
                v_ref = model(**inputs)[0]
            v = model(**inputs)[0]
            per_sample = lambda a, b: (a - b).square().flatten(1).mean(1)  # noqa: E731
            if args.method == "awm":
                loss = (advantages * per_sample(v, target)).mean()
            else:
                with torch.no_grad():
                    model.set_adapter("old")
                    v_old = model(**inputs)[0]
                    model.set_adapter("default")
                    for p in params:
                        p.requires_grad_(True)
                r = (0.5 + 0.5 * advantages / advantages.abs().max().clamp_min(1e-6)).clamp(0, 1)
                loss = (r * per_sample(v, target) + (1 - r) * per_sample(2 * v_old - v, target)).mean()
            loss = loss + args.kl * per_sample(v, v_ref).mean()
            penalty = normguard_penalty(v, v_ref)
            if args.normguard > 0:
                loss = loss + args.normguard * penalty
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            stats["loss"] += loss.item() / args.inner_steps
            stats["penalty"] += penalty.item() / args.inner_steps
            stats["norm_ratio"] += float((per_sample_norm(v.detach()) / per_sample_norm(v_ref)).mean()) / args.inner_steps
        entry = {"iteration": iteration, "reward": round(float(rewards.mean()), 4), **{k: round(v, 5) for k, v in stats.items()},
                 "seconds": round(time.perf_counter() - started, 1)}
        log["iterations"].append(entry)
        print(json.dumps(entry), flush=True)
        if iteration % args.checkpoint_every == 0 or iteration == args.iterations:
            model.eval()
            model.save_pretrained(str(args.out / "checkpoints" / f"checkpoint-{iteration}" / "lora"))
    log["seconds"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "train_log.json", log)


if __name__ == "__main__":
    main()
