"""Where inflation lives: spatial maps, per-channel ratios and spectra of paired velocities, per sigma region.

Per sample and step, on the device, in float32:

* the **ratio map**: ``||v_tuned|| / ||v_base||`` at each latent position, the norm taken over channels
  (for video, one map per latent frame);
* the **channel ratio**: the same with the norm over positions, one number per latent channel;
* the **radial power spectra** of ``v_tuned``, ``v_base`` and ``v_tuned - v_base`` (see ``spectra``);
* the **grid energies** of ``v_tuned - v_base``: power at the patch lattice and at its neighbours.

They are summed into one slot per sigma region (the regions of ``stats.REGIONS``); per-sample numbers are
kept only for the grid energies, which the bootstrap needs. Only the aggregates are stored
(``maps.safetensors``), never every map: a few kilobytes per run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from normscope.measure import spectra
from normscope.measure.bootstrap import ratio_ci
from normscope.measure.stats import REGIONS

REGION_NAMES = tuple(name for name, _, _ in REGIONS)
MAPS_FILE = "maps.safetensors"
# Keys of the aggregates, per region: "<region>/<key>".
RATIO_MAP, NORM_TUNED_MAP, NORM_BASE_MAP = "ratio_map", "norm_tuned_map", "norm_base_map"
CHANNEL_RATIO = "channel_ratio"
POWER_TUNED, POWER_BASE, POWER_DIFF = "power_tuned", "power_base", "power_diff"
COUNT = "count"
GRID_PEAK, GRID_NEIGHBOUR, PROMPT_IDS = "grid/peak", "grid/neighbour", "grid/prompt_id"
SUM_KEYS = (RATIO_MAP, NORM_TUNED_MAP, NORM_BASE_MAP, CHANNEL_RATIO, POWER_TUNED, POWER_BASE, POWER_DIFF)


def region_of(sigma: float) -> int:
    """Index into ``REGION_NAMES`` of a step's sigma."""
    for index, (_, lo, hi) in enumerate(REGIONS):
        if lo < sigma <= hi:
            return index
    return len(REGIONS) - 1


def position_norms(v: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, *spatial): L2 over channels at each position, float32."""
    return torch.linalg.vector_norm(v.float(), dim=1)


def channel_norms(v: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C): L2 over positions of each channel, float32."""
    return torch.linalg.vector_norm(v.float().flatten(2), dim=2)


def _ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # A zero base norm gives inf/nan; those positions are left out of the sums (counted in ``count``).
    return torch.where(b > 0, a / b.clamp_min(torch.finfo(b.dtype).tiny), torch.nan)


class MapAccumulator:
    """Sums the maps, channel ratios and spectra of paired (tuned, base) velocities by sigma region.

    ``add`` is called once per step with the whole batch; ``end_call`` closes a pipeline call (one batch of
    samples) and keeps its per-sample grid energies. Nothing leaves the device until ``result``.
    """

    def __init__(self, period: int) -> None:
        self.period = period
        self.sums: dict[str, list[torch.Tensor | None]] = {key: [None] * len(REGIONS) for key in SUM_KEYS}
        self.counts = [0] * len(REGIONS)  # samples x steps added to each region
        self.finite = [None] * len(REGIONS)  # per-position count of finite ratios
        self._grid_call: torch.Tensor | None = None  # (B, regions, 2) of the call in progress
        self._grid: list[torch.Tensor] = []
        self.shape: tuple[int, ...] | None = None

    def add(self, sigma: float, v_tuned: torch.Tensor, v_base: torch.Tensor) -> None:
        """One step of one batch: both fields ``(B, C, *spatial)`` in the same layout."""
        r = region_of(sigma)
        self.shape = tuple(v_tuned.shape[1:])
        nt, nb = position_norms(v_tuned), position_norms(v_base)
        ratio = _ratio(nt, nb)
        finite = torch.isfinite(ratio)
        d = v_tuned.float() - v_base.float()
        p_tuned, p_base, p_diff = spectra.power_2d(v_tuned), spectra.power_2d(v_base), spectra.power_2d(d)
        parts = {
            RATIO_MAP: torch.where(finite, ratio, 0.0).sum(0),
            NORM_TUNED_MAP: nt.sum(0),
            NORM_BASE_MAP: nb.sum(0),
            CHANNEL_RATIO: torch.nan_to_num(_ratio(channel_norms(v_tuned), channel_norms(v_base)), nan=0.0).sum(0),
            POWER_TUNED: spectra.radial_power(p_tuned).sum(0),
            POWER_BASE: spectra.radial_power(p_base).sum(0),
            POWER_DIFF: spectra.radial_power(p_diff).sum(0),
        }
        for key, value in parts.items():
            slot = self.sums[key]
            slot[r] = value if slot[r] is None else slot[r] + value
        self.finite[r] = finite.sum(0) if self.finite[r] is None else self.finite[r] + finite.sum(0)
        self.counts[r] += v_tuned.shape[0]
        energies = spectra.grid_energies(p_diff, self.period)
        if energies is not None:
            if self._grid_call is None:
                self._grid_call = torch.zeros(v_tuned.shape[0], len(REGIONS), 2, device=energies.device)
            self._grid_call[:, r] += energies

    def end_call(self) -> None:
        """Close one pipeline call: its samples' grid energies are kept in sample order."""
        if self._grid_call is not None:
            self._grid.append(self._grid_call)
        self._grid_call = None

    def result(self, prompt_ids: list[int]) -> Maps:
        """Everything on the CPU, as the aggregates that ``maps.safetensors`` stores."""
        tensors: dict[str, torch.Tensor] = {}
        for r, name in enumerate(REGION_NAMES):
            if self.counts[r] == 0:
                continue
            for key in SUM_KEYS:
                tensors[f"{name}/{key}"] = self.sums[key][r].detach().float().cpu()
            tensors[f"{name}/{COUNT}"] = self.finite[r].detach().float().cpu()
        if self._grid:
            grid = torch.cat(self._grid).cpu()
            tensors[GRID_PEAK] = grid[..., 0].contiguous()
            tensors[GRID_NEIGHBOUR] = grid[..., 1].contiguous()
            tensors[PROMPT_IDS] = torch.tensor(prompt_ids, dtype=torch.int64)
        meta = {"period": self.period, "shape": list(self.shape or ()), "regions": list(REGION_NAMES),
                "samples_steps": dict(zip(REGION_NAMES, self.counts, strict=True))}
        return Maps(tensors, meta)


@dataclass
class Maps:
    """The stored aggregates of one run and the numbers derived from them (means, ratios, grid score)."""

    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def regions(self) -> list[str]:
        return [name for name in REGION_NAMES if f"{name}/{COUNT}" in self.tensors]

    def samples_steps(self, region: str) -> int:
        return int(self.meta["samples_steps"][region])

    def ratio_map(self, region: str) -> torch.Tensor:
        """Mean over samples and steps of the per-position ratio, ``(H, W)`` or ``(F, H, W)``."""
        return self.tensors[f"{region}/{RATIO_MAP}"] / self.tensors[f"{region}/{COUNT}"]

    def channel_ratio(self, region: str) -> torch.Tensor:
        return self.tensors[f"{region}/{CHANNEL_RATIO}"] / self.samples_steps(region)

    def spectrum(self, region: str, which: str = POWER_TUNED) -> torch.Tensor:
        return self.tensors[f"{region}/{which}"] / self.samples_steps(region)

    def spectrum_ratio(self, region: str) -> torch.Tensor:
        """Ring by ring: mean power of v_tuned over mean power of v_base (a uniform x s gives s^2 everywhere)."""
        return self.tensors[f"{region}/{POWER_TUNED}"] / self.tensors[f"{region}/{POWER_BASE}"]

    def frequencies(self) -> list[float]:
        h, w = self.meta["shape"][-2:]
        return spectra.ring_frequencies(h, w)

    def patch_frequencies(self) -> list[float]:
        return spectra.patch_frequencies(self.meta["period"])

    def grid_score(self, region: str | None = None) -> tuple[float, float, float] | None:
        """Grid score (lattice power / neighbour power of v_tuned - v_base) with a CI resampling prompts."""
        if GRID_PEAK not in self.tensors:
            return None
        peak, neighbour = self.tensors[GRID_PEAK].double(), self.tensors[GRID_NEIGHBOUR].double()
        if region is not None:
            r = REGION_NAMES.index(region)
            peak, neighbour = peak[:, r], neighbour[:, r]
        else:
            peak, neighbour = peak.sum(1), neighbour.sum(1)
        if float(neighbour.sum()) <= 0:
            return None
        return ratio_ci(peak.numpy(), neighbour.numpy(), self.tensors[PROMPT_IDS].numpy())

    def summary(self) -> dict:
        """The compact numbers for summary.json: grid score with CI, and per region the map and spectra extremes."""
        def clean(x):
            return None if x is None or not np.isfinite(x) else float(x)

        score = self.grid_score()
        out = {
            "file": MAPS_FILE,
            "patch_period": self.meta["period"],
            "patch_frequencies": self.patch_frequencies(),
            "grid_score": None if score is None else clean(score[0]),
            "grid_score_ci": None if score is None else [clean(score[1]), clean(score[2])],
            "regions": {},
        }
        for region in self.regions:
            ratio_map = self.ratio_map(region)
            spectrum = self.spectrum_ratio(region)
            rs = self.grid_score(region)
            out["regions"][region] = {
                "map_min": clean(float(torch.nan_to_num(ratio_map, nan=float("inf")).min())),
                "map_max": clean(float(torch.nan_to_num(ratio_map, nan=float("-inf")).max())),
                "map_mean": clean(float(ratio_map.nanmean())),
                "channel_ratio": [clean(float(x)) for x in self.channel_ratio(region)],
                "spectrum_ratio": [clean(float(x)) for x in spectrum],
                "grid_score": None if rs is None else clean(rs[0]),
                "grid_score_ci": None if rs is None else [clean(rs[1]), clean(rs[2])],
            }
        out["frequencies"] = self.frequencies()
        return out

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path), metadata={"normscope": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: Path) -> Maps:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["normscope"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return cls(tensors, meta)
