"""Spectra of velocity fields (and images): radially averaged power, and the grid score.

All functions take fields laid out ``(B, C, H, W)`` or, for video, ``(B, C, F, H, W)``; the FFT runs over the
last two (spatial) axes, power is summed over channels and averaged over frames, in float32 on the tensor's
own device (no host sync).

* **Radially averaged power spectrum**: ``|FFT2(v)|^2 / (H W)`` (so that, by Parseval, the powers of a
  field sum to its squared norm), averaged over the frequencies of each ring; ring ``b`` holds the
  frequencies whose radius rounds to ``b / min(H, W)`` cycles per latent pixel.
* **Grid score**: a transformer with ``p x p`` patches that learns a per-patch pattern leaves energy on the
  lattice of frequencies ``(j/p, k/p)`` cycles per pixel (the patch frequency and its harmonics, DC
  excluded). The score is the mean power at those lattice frequencies divided by the mean power of their
  eight neighbouring frequencies, computed on ``v_tuned - v_base``: about 1 for a smooth difference (a
  uniform scale gives exactly the base velocity's own value, whatever the scale), far above 1 for a
  periodic pattern at the patch size.
"""

from __future__ import annotations

import functools
import math

import torch

NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def power_2d(v: torch.Tensor) -> torch.Tensor:
    """(B, H, W) spatial power spectrum, channels summed, frames averaged, ``|F|^2 / (H W)``, float32."""
    if v.ndim not in (4, 5):
        raise ValueError(f"expected a (B, C, H, W) or (B, C, F, H, W) field, got shape {tuple(v.shape)}")
    h, w = v.shape[-2:]
    spectrum = torch.fft.fft2(v.float(), dim=(-2, -1))
    power = (spectrum.real.square() + spectrum.imag.square()).sum(dim=1) / (h * w)
    return power.mean(dim=1) if v.ndim == 5 else power


def radial_bins(h: int, w: int, device=None) -> tuple[torch.Tensor, int]:
    """(H, W) ring index of each FFT frequency, and the number of rings (``round(radius * min(H, W))``)."""
    index, n, _ = _radial_bins(h, w, str(torch.device(device or "cpu")))
    return index, n


@functools.lru_cache(maxsize=32)
def _radial_bins(h: int, w: int, device: str) -> tuple[torch.Tensor, int, torch.Tensor]:
    # Cached per shape and device: built once per run, not per step (no per-step host work, copies or syncs).
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.fftfreq(w)[None, :]
    index = torch.round(torch.sqrt(fy.square() + fx.square()) * min(h, w)).long()
    n = int(index.max()) + 1
    count = torch.bincount(index.flatten(), minlength=n).float()
    return index.to(device), n, count.to(device)


def ring_frequencies(h: int, w: int) -> list[float]:
    """The centre frequency of each ring, in cycles per (latent) pixel."""
    _, n = radial_bins(h, w)
    return [b / min(h, w) for b in range(n)]


def radial_power(power: torch.Tensor) -> torch.Tensor:
    """(B, H, W) power -> (B, rings) mean power per ring."""
    h, w = power.shape[-2:]
    index, n, count = _radial_bins(h, w, str(power.device))
    total = torch.zeros(power.shape[0], n, device=power.device, dtype=power.dtype)
    total.index_add_(1, index.flatten(), power.flatten(1))
    return total / count.to(power.dtype)


def radial_spectrum(v: torch.Tensor) -> torch.Tensor:
    """(B, rings) radially averaged power spectrum of a field (see the module docstring)."""
    return radial_power(power_2d(v))


def grid_masks(h: int, w: int, period: int, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Boolean (H, W) masks of the patch-lattice frequencies (DC excluded) and of their neighbours.

    ``None`` when ``period`` < 2 (a 1x1 patch has no patch frequency) or the field is too small to hold one.
    """
    return _grid_masks(h, w, period, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=32)
def _grid_masks(h: int, w: int, period: int, device: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    if period < 2 or h < period or w < period:
        return None
    rows = sorted({round(j * h / period) % h for j in range(period)})
    cols = sorted({round(k * w / period) % w for k in range(period)})
    peaks = torch.zeros(h, w, dtype=torch.bool)
    for y in rows:
        for x in cols:
            peaks[y, x] = True
    peaks[0, 0] = False
    neighbours = torch.zeros(h, w, dtype=torch.bool)
    for y, x in peaks.nonzero().tolist():
        for dy, dx in NEIGHBOURS:
            neighbours[(y + dy) % h, (x + dx) % w] = True
    neighbours &= ~peaks
    neighbours[0, 0] = False
    if not neighbours.any():
        return None
    return peaks.to(device), neighbours.to(device)


def grid_energies(power: torch.Tensor, period: int) -> torch.Tensor | None:
    """(B, 2): mean power at the patch lattice and mean power of its neighbours, per sample."""
    index = _grid_index(*power.shape[-2:], period, str(power.device))
    if index is None:
        return None
    peaks, neighbours = index
    flat = power.flatten(1)
    # Integer indices, not boolean masks: masked indexing would sync the device at every step.
    return torch.stack([flat.index_select(1, peaks).mean(dim=1), flat.index_select(1, neighbours).mean(dim=1)], dim=1)


@functools.lru_cache(maxsize=32)
def _grid_index(h: int, w: int, period: int, device: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    masks = _grid_masks(h, w, period, "cpu")
    if masks is None:
        return None
    return tuple(m.flatten().nonzero()[:, 0].to(device) for m in masks)


def grid_score(field: torch.Tensor, period: int) -> torch.Tensor | None:
    """(B,) grid score of each sample of a field (usually ``v_tuned - v_base``); ``None`` without a patch."""
    energies = grid_energies(power_2d(field), period)
    if energies is None:
        return None
    return energies[:, 0] / energies[:, 1]


def patch_frequencies(period: int) -> list[float]:
    """The patch frequency and its radial harmonics up to Nyquist, cycles per pixel (for plots)."""
    if period < 2:
        return []
    out = set()
    for j in range(period // 2 + 1):
        for k in range(period // 2 + 1):
            if (j, k) != (0, 0):
                out.add(round(math.hypot(j, k) / period, 6))
    return sorted(out)
