"""The digits world of the bundled demo model: prompts, the reward model, and quality measures.

A real diffusers StableDiffusion3Pipeline at toy scale, trained on scikit-learn's 1,797 real 8x8 handwritten
digits (upsampled to 16x16); see examples/digits/ for the scripts that trained it and RL-tuned it.

* reward: the tempered probability of the prompted digit under a small classifier trained on held-out
  digits, computed on the decoded image clipped to the displayable range and quantised to 8 bits, as a real
  reward model sees an image (otherwise RL "wins" by pushing pixels out of range);
* quality, which the reward does not see: a Frechet distance between classifier features of generated and
  real held-out digits, within-class diversity, and the fraction of out-of-range (saturated) pixels.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIZE = 16
FEATURES = 32
REWARD_TEMPERATURE = 4.0  # the plain probability saturates near 1 for the base model; tempered, RL has room
SAMPLING = dict(steps=10, guidance=3.0, height=IMAGE_SIZE, width=IMAGE_SIZE, max_sequence_length=8)


def digit_prompt(digit: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def assets_dir() -> Path:
    return Path(str(resources.files("normscope").joinpath("data/digits")))


class DigitClassifier(torch.nn.Module):
    """A 256 -> 32 -> 10 MLP on 16x16 grayscale images in [0, 1]; its hidden layer is the feature space."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(IMAGE_SIZE * IMAGE_SIZE, FEATURES)
        self.out = torch.nn.Linear(FEATURES, 10)

    def features(self, gray: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hidden(gray.flatten(1)))

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(gray))


def load_classifier(folder: Path | None = None) -> tuple[DigitClassifier, dict]:
    """The shipped classifier and the real held-out digits' feature statistics (mean, covariance)."""
    from safetensors.torch import load_file

    folder = folder or assets_dir()
    model = DigitClassifier()
    model.load_state_dict(load_file(str(folder / "classifier.safetensors")))
    stats = {k: v.double().numpy() for k, v in load_file(str(folder / "real_features.safetensors")).items()}
    return model.eval(), stats


def displayable(images: torch.Tensor) -> torch.Tensor:
    """Decoded images (B, 3, H, W) in [-1, 1] -> what a viewer sees: clipped, 8-bit, grayscale in [0, 1]."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0
    return pixels.mean(dim=1)


def real_to_images(digits_8x8: np.ndarray) -> torch.Tensor:
    """sklearn's 0..16 8x8 digits -> (B, 3, 16, 16) in [-1, 1], bilinear upsampling."""
    x = torch.from_numpy(digits_8x8.astype(np.float32) / 16.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).repeat(1, 3, 1, 1)


@torch.no_grad()
def reward(images: torch.Tensor, digits: torch.Tensor, classifier: DigitClassifier,
           temperature: float = REWARD_TEMPERATURE) -> torch.Tensor:
    """Tempered probability of the prompted digit, on the displayable image."""
    logits = classifier(displayable(images))
    return torch.softmax(logits / temperature, dim=1).gather(1, digits.long()[:, None])[:, 0]


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2), via the eigenvalues of sqrt(C1) C2 sqrt(C1)."""
    vals, vecs = np.linalg.eigh(cov1)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


@torch.no_grad()
def quality(images: torch.Tensor, digits: torch.Tensor, classifier: DigitClassifier, real: dict) -> dict:
    """Frechet distance to real digits, within-class diversity, out-of-range pixel fraction, accuracy."""
    gray = displayable(images)
    feats = classifier.features(gray).double().numpy()
    fd = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), real["mean"], real["cov"])
    diversity = []
    for d in digits.unique():
        group = gray[digits == d].flatten(1)
        if len(group) > 1:
            dist = torch.cdist(group, group)
            diversity.append(float(dist.sum() / (len(group) * (len(group) - 1))))
    return {
        "fd": fd,
        "diversity": float(np.mean(diversity)) if diversity else float("nan"),
        "out_of_range": float((images.float().abs() > 1.0).float().mean()),
        "accuracy": float((classifier(gray).argmax(1) == digits).float().mean()),
    }


@torch.no_grad()
def generate(pipe, digits: list[int], seeds: list[int], steps: int = SAMPLING["steps"],
             guidance: float = SAMPLING["guidance"]) -> torch.Tensor:
    """Decoded images (B, 3, 16, 16) in the VAE's range (not clipped), one per (digit, seed)."""
    latents = pipe(
        prompt=[digit_prompt(d) for d in digits], num_inference_steps=steps, guidance_scale=guidance,
        height=SAMPLING["height"], width=SAMPLING["width"], max_sequence_length=SAMPLING["max_sequence_length"],
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="latent",
    ).images
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()


@functools.cache
def _shipped_classifier() -> DigitClassifier:
    return load_classifier()[0]


def prompt_digit(prompt: str) -> int:
    """The digit a demo prompt asks for ("a handwritten digit seven" -> 7)."""
    return DIGIT_WORDS.index(prompt.rsplit(" ", 1)[-1])


def digit_reward(images, prompts) -> list[float]:
    """A ``--scorer`` (PIL images, prompts -> one number each): the RL reward of the demo, on the shown image.

    ``normscope demo`` scores its digits through ``compare --scorer normscope.builders.digits:digit_reward``,
    the door a user's own reward model uses.
    """
    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]))
    tensors = pixels.permute(0, 3, 1, 2) / 127.5 - 1  # 8-bit -> [-1, 1]; reward() re-quantises exactly
    digits = torch.tensor([prompt_digit(p) for p in prompts])
    return reward(tensors, digits, _shipped_classifier()).tolist()
