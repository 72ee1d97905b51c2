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
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.fftfreq(w, device=device)[None, :]
    index = torch.round(torch.sqrt(fy.square() + fx.square()) * min(h, w)).long()
    return index, int(index.max()) + 1


def ring_frequencies(h: int, w: int) -> list[float]:
    """The centre frequency of each ring, in cycles per (latent) pixel."""
    _, n = radial_bins(h, w)
    return [b / min(h, w) for b in range(n)]


def radial_power(power: torch.Tensor) -> torch.Tensor:
    """(B, H, W) power -> (B, rings) mean power per ring."""
    h, w = power.shape[-2:]
    index, n = radial_bins(h, w, power.device)
    flat = index.flatten()
    total = torch.zeros(power.shape[0], n, device=power.device, dtype=power.dtype)
    total.index_add_(1, flat, power.flatten(1))
    count = torch.bincount(flat, minlength=n).to(power.dtype)
    return total / count


def radial_spectrum(v: torch.Tensor) -> torch.Tensor:
    """(B, rings) radially averaged power spectrum of a field (see the module docstring)."""
    return radial_power(power_2d(v))


def grid_masks(h: int, w: int, period: int, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Boolean (H, W) masks of the patch-lattice frequencies (DC excluded) and of their neighbours.

    ``None`` when ``period`` < 2 (a 1x1 patch has no patch frequency) or the field is too small to hold one.
    """
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
    masks = grid_masks(*power.shape[-2:], period, power.device)
    if masks is None:
        return None
    peaks, neighbours = masks
    flat = power.flatten(1)
    return torch.stack([flat[:, peaks.flatten()].mean(dim=1), flat[:, neighbours.flatten()].mean(dim=1)], dim=1)


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
