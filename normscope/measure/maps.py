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
        """Centres of the rings that hold the patch frequency and its harmonics (where a plot should mark them)."""
        n = min(self.meta["shape"][-2:])
        return sorted({round(f * n) / n for f in spectra.patch_frequencies(self.meta["period"])})

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

    @classmethod
    def merge(cls, parts: list[Maps]) -> Maps:
        """The maps of several batches (in sample order) as if they had been accumulated in one."""
        parts = [p for p in parts if p.tensors]
        if not parts:
            return cls({}, {})
        tensors: dict[str, torch.Tensor] = {}
        for key in (GRID_PEAK, GRID_NEIGHBOUR, PROMPT_IDS):
            if key in parts[0].tensors:
                tensors[key] = torch.cat([p.tensors[key] for p in parts])
        for part in parts:
            for key, value in part.tensors.items():
                if key not in (GRID_PEAK, GRID_NEIGHBOUR, PROMPT_IDS):
                    tensors[key] = tensors[key] + value if key in tensors else value.clone()
        meta = dict(parts[0].meta)
        meta["samples_steps"] = {r: sum(p.meta["samples_steps"][r] for p in parts) for r in REGION_NAMES}
        return cls(tensors, meta)

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


# ------------------------------------------------------------------ from captured velocities to (B, C, *spatial)


def to_spatial(v, layout: str, packed_patch: int = 2, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A velocity in the pipeline's latent layout -> ``(B, C, H, W)`` (video: ``(B, C, F, H, W)``).

    ``layout`` is the family table's ``latent_layout``: "bchw", "bcfhw", "list_c1hw" (a list of
    ``(C, 1, H, W)`` tensors) or "packed" (``(B, (H/p)(W/p), C p p)`` tokens, unpacked exactly as the
    pipelines' ``_unpack_latents`` do, so each latent position lands where the VAE will see it).
    ``grid`` is the latent (H, W) for packed tokens; without it a square grid is assumed.
    """
    if layout in ("bchw", "bcfhw"):
        return v
    if layout == PACKED_VIDEO:
        return unpack_video_tokens(v, grid, packed_patch)
    if layout == "list_c1hw":  # capture already stacks Z-Image's list; a raw list or (B, C, 1, H, W) is accepted too
        v = torch.stack(list(v)) if isinstance(v, (list, tuple)) else v
        return v[:, :, 0] if v.ndim == 5 else v
    if layout != "packed":
        raise ValueError(f"unknown latent layout {layout!r}")
    p = packed_patch
    batch, tokens, width = v.shape
    if grid is None or (grid[0] // p) * (grid[1] // p) != tokens:
        side = int(round(tokens**0.5))
        if side * side != tokens:
            from normscope.errors import RunError

            raise RunError(f"cannot lay out {tokens} packed tokens on a latent grid: pass --height and --width")
        grid = (side * p, side * p)
    h, w = grid[0] // p, grid[1] // p
    v = v.reshape(batch, h, w, width // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return v.reshape(batch, width // (p * p), h * p, w * p)


# ---- issue 19: LTX-2's video stream, packed tokens ordered (frame, row, column) with the channels last
PACKED_VIDEO = "packed_fhw"


def unpack_video_tokens(v: torch.Tensor, grid: tuple[int, int, int] | None, patch: int = 1,
                        patch_t: int = 1) -> torch.Tensor:
    """``(B, F' H' W', C p_t p p)`` tokens -> ``(B, C, F' p_t, H' p, W' p)``, exactly as LTX-2's
    ``_unpack_latents`` does; ``grid`` is the token grid (F', H', W') of the sampled size."""
    batch, tokens, width = v.shape
    if grid is None or grid[0] * grid[1] * grid[2] != tokens:
        from normscope.errors import RunError

        raise RunError(f"cannot lay out {tokens} video tokens on the latent grid {grid} (frames, height, width) of the "
                       "sampled size: pass --height, --width and --num-frames")
    f, h, w = grid
    v = v.reshape(batch, f, h, w, width // (patch_t * patch * patch), patch_t, patch, patch)
    return v.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def video_token_grid(pipe, height: int | None, width: int | None, num_frames: int | None) -> tuple[int, int, int] | None:
    """The token grid (F', H', W') of a sampled size as LTX pipelines compute it (their compression ratios and
    the transformer's patch sizes); None when something is unknown."""
    names = ("vae_spatial_compression_ratio", "vae_temporal_compression_ratio", "transformer_spatial_patch_size",
             "transformer_temporal_patch_size")
    spatial, temporal, patch, patch_t = (getattr(pipe, name, None) for name in names)
    if not (spatial and temporal and patch and patch_t and height and width and num_frames):
        return None
    frames = (int(num_frames) - 1) // temporal + 1
    return frames // patch_t, int(height) // spatial // patch, int(width) // spatial // patch


class MapsObserver:
    """A capture observer: feeds the guided velocity of paired mode into a ``MapAccumulator``.

    Called per step and branch with ``(step_index, sigma, branch, expert, v_driver, v_other, family)``;
    only the guided branch of paired mode (``v_other`` present) is used, the velocity that moves the
    latents. ``drive`` says which of the two is the tuned model.
    """

    def __init__(self, layout: str, period: int, drive: str = "tuned", packed_patch: int = 2,
                 grid: tuple[int, ...] | None = None) -> None:
        self.layout = layout
        self.packed_patch = packed_patch
        self.grid = grid
        self.drive = drive
        self.accumulator = MapAccumulator(period)

    def __call__(self, step_index, sigma, branch, expert, v_driver, v_other, family=None) -> None:
        if branch != "guided" or v_other is None:
            return
        driver = to_spatial(v_driver, self.layout, self.packed_patch, self.grid)
        other = to_spatial(v_other, self.layout, self.packed_patch, self.grid)
        tuned, base = (driver, other) if self.drive == "tuned" else (other, driver)
        self.accumulator.add(float(sigma), tuned, base)

    def end_call(self) -> None:
        self.accumulator.end_call()

    def result(self, prompt_ids: list[int]) -> Maps:
        return self.accumulator.result(prompt_ids)


def latent_geometry(pipe, family) -> tuple[str, int, int]:
    """(latent layout, packing patch, patch period in latent pixels) from the family row and the transformer.

    The period is the side of the square of latent positions that one transformer token covers: for
    packed latents (FLUX, Qwen-Image) the family's packing patch (2x2 positions per token; Qwen-Image's
    transformer config repeats it as ``patch_size``, it does not patchify again); otherwise the
    transformer's own ``patch_size`` (SD3.5: 2; Z-Image: ``all_patch_size``).
    """
    if family.latent_layout == "packed":
        return family.latent_layout, family.patch_size, family.patch_size
    if family.latent_layout == PACKED_VIDEO:  # LTX-2: the transformer's own patch (1: no patch lattice)
        patch = int(getattr(pipe, "transformer_spatial_patch_size", None) or family.patch_size)
        return family.latent_layout, patch, patch
    config = pipe.transformer.config
    patch = getattr(config, "patch_size", None) or getattr(config, "all_patch_size", None) or 1
    if isinstance(patch, (tuple, list)):
        patch = patch[-1]
    return family.latent_layout, 1, int(patch)


def latent_grid(pipe, height: int | None, width: int | None) -> tuple[int, int] | None:
    """The latent (H, W) for an image size, as the pipelines compute it (even sides for packed latents)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    if not (factor and height and width):
        return None
    return 2 * (int(height) // (factor * 2)), 2 * (int(width) // (factor * 2))


def maps_observer(pipe, family, height: int | None, width: int | None, drive: str,
                  num_frames: int | None = None) -> MapsObserver:
    """The observer ``compare --maps`` attaches for one pipeline call. Multi-stream families (LTX-2): the maps
    are of the first stream (video); the capture shows observers that stream only."""
    layout, packed_patch, period = latent_geometry(pipe, family)
    grid = (video_token_grid(pipe, height, width, num_frames) if layout == PACKED_VIDEO
            else latent_grid(pipe, height, width))
    return MapsObserver(layout, period, drive, packed_patch=packed_patch, grid=grid)


def where_columns(summary: dict) -> dict:
    """compare --maps numbers as sweep columns: grid score with CI, each image signal's tuned - base."""
    out = {}
    maps = summary.get("maps")
    if maps:
        ci = maps["grid_score_ci"] or [None, None]
        out.update({"grid_score": maps["grid_score"], "grid_lo": ci[0], "grid_hi": ci[1]})
    for row in (summary.get("image_signals") or {}).get("signals", []):
        name = "pixel_grid_score" if row["signal"] == "grid_score" else f"{row['signal']}_diff"
        out[name] = row["difference"]
    return out
