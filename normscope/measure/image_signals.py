"""Image-quality signals on the decoded images of free mode, base and tuned from the same noise.

The failures users report after RL (grids, blur, colour cast, blown highlights, over-saturation) are
visible in simple statistics of the final images. Each is computed per image, then reported as
tuned - base with a confidence interval that resamples prompts:

* ``out_of_range``: fraction of decoded values outside [-1, 1] BEFORE the pipeline clips them (the
  pre-clip tensor is taken at the pipeline's own ``postprocess`` call, see ``PreClipImages``);
* ``saturation``: mean HSV saturation; ``colourfulness``: Hasler & Suesstrunk's M (2003);
* ``brightness``: mean luminance (scikit-image's ``rgb2gray``, ITU-R BT.709 weights);
* ``colour_entropy``: Shannon entropy (bits) of the colours quantised to 8 levels per channel;
* ``edge_density``: fraction of pixels on a Canny edge (scikit-image, sigma 1);
* ``high_freq_energy``: fraction of the luminance power above half the Nyquist frequency;
* ``grid_score`` (paired): the grid score of ``tuned - base`` in pixel space, at the patch period times the
  VAE's downscale factor.

Everything but ``out_of_range`` is measured on the displayable image (clipped to [0, 1]).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from normscope.errors import InputError
from normscope.measure import spectra
from normscope.measure.bootstrap import mean_ci

OUT_OF_RANGE = "out_of_range"
SATURATION = "saturation"
COLOURFULNESS = "colourfulness"
BRIGHTNESS = "brightness"
COLOUR_ENTROPY = "colour_entropy"
EDGE_DENSITY = "edge_density"
HIGH_FREQ = "high_freq_energy"
GRID_SCORE = "grid_score"
SCORE = "score"  # the user's --scorer
SIGNALS = (OUT_OF_RANGE, SATURATION, COLOURFULNESS, BRIGHTNESS, COLOUR_ENTROPY, EDGE_DENSITY, HIGH_FREQ)
COLOUR_LEVELS = 8
IMAGE_SIGNALS_CSV = "image_signals.csv"


def displayable(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) decoded in [-1, 1] -> (B, H, W, 3) float64 in [0, 1], clipped as the pipeline clips."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).double().numpy()


def _colourfulness(rgb: np.ndarray) -> float:
    r, g, b = (rgb[..., i] * 255 for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _colour_entropy(rgb: np.ndarray) -> float:
    from skimage.measure import shannon_entropy

    q = np.minimum((rgb * COLOUR_LEVELS).astype(np.int64), COLOUR_LEVELS - 1)
    return float(shannon_entropy(q[..., 0] * COLOUR_LEVELS**2 + q[..., 1] * COLOUR_LEVELS + q[..., 2]))


def _high_freq_energy(gray: np.ndarray) -> float:
    field = torch.from_numpy(gray - gray.mean())[None, None]
    power = spectra.power_2d(field)[0]
    index, _ = spectra.radial_bins(*gray.shape)
    high = index > min(gray.shape) / 4  # above half of Nyquist (0.25 cycles/pixel)
    total = float(power.sum())
    return float(power[high].sum()) / total if total > 0 else 0.0


def image_signals(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image signals of decoded, not yet clipped images ``(B, 3, H, W)`` in the VAE's [-1, 1] range."""
    from skimage.color import rgb2gray, rgb2hsv
    from skimage.feature import canny

    out = {name: np.zeros(images.shape[0]) for name in SIGNALS}
    out[OUT_OF_RANGE] = (images.detach().float().abs() > 1.0).flatten(1).float().mean(1).cpu().double().numpy()
    for i, rgb in enumerate(displayable(images)):
        gray = rgb2gray(rgb)
        out[SATURATION][i] = rgb2hsv(rgb)[..., 1].mean()
        out[COLOURFULNESS][i] = _colourfulness(rgb)
        out[BRIGHTNESS][i] = gray.mean()
        out[COLOUR_ENTROPY][i] = _colour_entropy(rgb)
        out[EDGE_DENSITY][i] = canny(gray, sigma=1.0).mean()
        out[HIGH_FREQ][i] = _high_freq_energy(gray)
    return out


def pixel_grid_score(base: torch.Tensor, tuned: torch.Tensor, period: int) -> np.ndarray:
    """(B,) grid score of ``tuned - base`` decoded images at ``period`` pixels; NaN without a patch period."""
    score = spectra.grid_score(tuned.float() - base.float(), period)
    return np.full(base.shape[0], np.nan) if score is None else score.cpu().double().numpy()


def paired_signals(base: torch.Tensor, tuned: torch.Tensor, period: int) -> dict[str, np.ndarray]:
    """Columns ``<signal>_base`` and ``<signal>_tuned`` for every signal, and the pixel-space grid score."""
    columns = {}
    for role, images in (("base", base), ("tuned", tuned)):
        for name, values in image_signals(images).items():
            columns[f"{name}_{role}"] = values
    columns[GRID_SCORE] = pixel_grid_score(base, tuned, period)
    return columns


def signal_table(frame: pd.DataFrame) -> list[dict]:
    """tuned - base per signal, with a 95 % CI that resamples prompts; from the per-image frame."""
    rows = []
    clusters = frame["prompt_id"].to_numpy()
    names = [n for n in (*SIGNALS, SCORE) if f"{n}_base" in frame]
    for name in names:
        base, tuned = frame[f"{name}_base"].to_numpy(float), frame[f"{name}_tuned"].to_numpy(float)
        diff, lo, hi = mean_ci(tuned - base, clusters)
        rows.append({"signal": name, "base": _clean(np.nanmean(base)), "tuned": _clean(np.nanmean(tuned)),
                     "difference": _clean(diff), "ci": [_clean(lo), _clean(hi)]})
    if GRID_SCORE in frame and np.isfinite(frame[GRID_SCORE].to_numpy(float)).any():
        point, lo, hi = mean_ci(frame[GRID_SCORE].to_numpy(float), clusters)
        rows.append({"signal": GRID_SCORE, "base": None, "tuned": None, "difference": _clean(point), "ci": [_clean(lo), _clean(hi)]})
    return rows


def _clean(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


# ------------------------------------------------------------------ getting the pre-clip images


class PreClipImages:
    """Keeps the decoded images a pipeline hands to its image (or video) processor, before any clipping.

    Every diffusers pipeline decodes with its VAE and then calls ``image_processor.postprocess`` (videos:
    ``video_processor.postprocess_video``), which denormalises and clips; the tensor it receives is the
    unclipped decoded image. Wrapping that one call avoids re-implementing each family's unpacking and
    latent de-normalisation.
    """

    def __init__(self) -> None:
        self.images: list[torch.Tensor] = []

    @contextlib.contextmanager
    def attached(self, pipe) -> Iterator[PreClipImages]:
        targets = [(getattr(pipe, "image_processor", None), "postprocess"),
                   (getattr(pipe, "video_processor", None), "postprocess_video")]
        wrapped = []
        for processor, method in targets:
            if processor is None or not hasattr(processor, method):
                continue
            original = getattr(processor, method)

            def keep(images, *args, _original=original, **kwargs):
                if isinstance(images, torch.Tensor):
                    self.images.append(images.detach().float().cpu())
                return _original(images, *args, **kwargs)

            setattr(processor, method, keep)
            wrapped.append((processor, method))
        try:
            yield self
        finally:
            for processor, method in wrapped:
                processor.__dict__.pop(method, None)

    def take_all(self) -> list[torch.Tensor]:
        """The images of every call made since the last take, in call order (video: (B, F, 3, H, W))."""
        taken, self.images = self.images, []
        return [images.transpose(1, 2) if images.ndim == 5 else images for images in taken]


def batch_signals(samples, base: torch.Tensor, tuned: torch.Tensor, period: int,
                  scorer: Callable | None = None, scorer_spec: str = "") -> pd.DataFrame:
    """One row per sample of a free-mode batch: every signal of base and tuned, pixel grid score, scores."""
    if base.ndim == 5:  # video (B, F, 3, H, W): signals per frame, averaged per sample
        frames = base.shape[1]
        flat = batch_signals([s for s in samples for _ in range(frames)],
                             base.flatten(0, 1), tuned.flatten(0, 1), period, scorer, scorer_spec)
        return flat.groupby(["prompt_id", "seed"], sort=False).mean(numeric_only=True).reset_index()
    columns = {"prompt_id": [s.prompt_id for s in samples], "seed": [s.seed for s in samples]}
    columns.update(paired_signals(base, tuned, period))
    if scorer is not None:
        prompts = [s.prompt for s in samples]
        columns[f"{SCORE}_base"] = run_scorer(scorer, base, prompts, scorer_spec)
        columns[f"{SCORE}_tuned"] = run_scorer(scorer, tuned, prompts, scorer_spec)
    return pd.DataFrame(columns)


# ------------------------------------------------------------------ the user's own scorer


def load_scorer(spec: str) -> Callable:
    """``module:function`` -> the callable; one clear error when it cannot be imported."""
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise InputError(f"--scorer {spec!r} is not module:function: use e.g. --scorer my_rewards:hps_score")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"--scorer {spec}: cannot import {module_name} ({exc}): put it on PYTHONPATH") from None
    except Exception as exc:  # the module itself is broken (SyntaxError, an error at import time): bad input too
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise InputError(f"--scorer {spec}: cannot import {module_name} ({detail}): fix the module") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise InputError(f"--scorer {spec}: {module_name} has no callable {attr}")
    return fn


def run_scorer(fn: Callable, images: torch.Tensor, prompts: list[str], spec: str) -> np.ndarray:
    """Call a scorer on PIL images (as a user's reward model sees them) and check it gave one number each."""
    from PIL import Image

    pil = [Image.fromarray(np.round(rgb * 255).astype(np.uint8)) for rgb in displayable(images)]
    try:
        values = np.asarray([float(x) for x in fn(pil, list(prompts))], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"--scorer {spec} must return one number per image ({exc})") from None
    if values.shape != (len(pil),):
        raise InputError(f"--scorer {spec} returned {values.size} numbers for {len(pil)} images: return one per image")
    return values
