"""Stage 1: the VAE, the reward classifier and the base flow model, all trained here on real digits.

    python examples/digits/train_base.py          # ~5 min on 2 CPU cores; writes normscope/data/digits/
"""

from __future__ import annotations

import math

import torch
from common import ASSETS, WORK, build_pipeline, prompt_embeddings, split_digits, timed, write_json
from safetensors.torch import save_file

from normscope.builders.digits import DigitClassifier, displayable, generate, load_classifier, quality, reward

SEED = 0
VAE_STEPS, BASE_STEPS, CLASSIFIER_STEPS = 1000, 3000, 1500
BATCH = 64
CFG_DROPOUT = 0.1


def train_vae(images: torch.Tensor):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(VAE_STEPS):
        x = images[torch.randint(0, len(images), (BATCH,))]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).square().mean() + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == VAE_STEPS - 1:
            print(f"vae {step} recon+kl {loss.item():.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    return vae


def train_classifier(images: torch.Tensor, labels: torch.Tensor) -> DigitClassifier:
    torch.manual_seed(SEED)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    gray = displayable(images)
    for _ in range(CLASSIFIER_STEPS):
        index = torch.randint(0, len(gray), (BATCH,))
        # small shifts and intensity jitter: the classifier should not be fooled by exact pixel positions
        x = gray[index] * (0.8 + 0.4 * torch.rand(BATCH, 1, 1))
        x = torch.roll(x, shifts=(int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ()))), dims=(1, 2)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(x), labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_base(pipe, latents: torch.Tensor, labels: torch.Tensor, log: dict) -> None:
    transformer = pipe.transformer
    transformer.train()
    embeds, pooled = prompt_embeddings(pipe)
    opt = torch.optim.AdamW(transformer.parameters(), lr=5e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / BASE_STEPS)))
    generator = torch.Generator().manual_seed(SEED)
    for step in range(BASE_STEPS):
        index = torch.randint(0, len(latents), (BATCH,), generator=generator)
        x0, c = latents[index], labels[index].clone()
        c[torch.rand(BATCH, generator=generator) < CFG_DROPOUT] = 10  # the empty prompt
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.rand(BATCH, generator=generator)
        x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        v = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds[c],
                        pooled_projections=pooled[c], return_dict=False)[0]
        loss = (v - (noise - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 500 == 0 or step == BASE_STEPS - 1:
            print(f"base {step} fm loss {loss.item():.4f}", flush=True)
            log.setdefault("base_loss", []).append([step, round(loss.item(), 4)])
    transformer.eval()


def main() -> None:
    log: dict = {}
    (gen_x, gen_y), (held_x, held_y) = split_digits(SEED)
    from diffusers import AutoencoderKL

    if (WORK / "vae").is_dir():  # stage resumes: the VAE is the slowest part to retrain
        vae = AutoencoderKL.from_pretrained(str(WORK / "vae")).eval()
        log["vae"] = "reused from work/vae"
    else:
        with timed("vae", log):
            vae = train_vae(gen_x)
        vae.save_pretrained(str(WORK / "vae"))
    with timed("classifier", log):
        classifier = train_classifier(held_x, held_y)
    with torch.no_grad():
        log["classifier_accuracy_on_generator_split"] = float((classifier(displayable(gen_x)).argmax(1) == gen_y).float().mean())
        feats = classifier.features(displayable(held_x)).double()
    ASSETS.mkdir(parents=True, exist_ok=True)
    save_file(classifier.state_dict(), str(ASSETS / "classifier.safetensors"))
    save_file({"mean": feats.mean(0).float(), "cov": torch.cov(feats.T).float()}, str(ASSETS / "real_features.safetensors"))
    pipe = build_pipeline(vae, SEED)
    with torch.no_grad():
        latents = vae.encode(gen_x).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    with timed("base", log):
        train_base(pipe, latents, gen_y, log)
    pipe.save_pretrained(ASSETS / "pipeline", safe_serialization=True)

    classifier, real = load_classifier(ASSETS)
    digits = [d for d in range(10) for _ in range(8)]
    seeds = [1000 + i for i in range(len(digits))]
    images = generate(pipe, digits, seeds)
    labels = torch.tensor(digits)
    log["base_eval"] = {"reward": float(reward(images, labels, classifier).mean()), **quality(images, labels, classifier, real)}
    real_q = quality(held_x[:80], held_y[:80], classifier, real)
    log["real_digits_eval"] = {"reward": float(reward(held_x[:80], held_y[:80], classifier).mean()), **real_q}
    print(log["base_eval"], log["real_digits_eval"], flush=True)
    write_json(WORK / "base_log.json", log)
    write_json(ASSETS / "base_log.json", log)


if __name__ == "__main__":
    main()
