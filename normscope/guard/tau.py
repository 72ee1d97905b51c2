"""tau(sigma) from a ``normscope profile`` reference: a per-branch, per-element threshold for the static hinge.

A profile stores, per CFG branch (``guided``, and with CFG on also ``cond`` and ``uncond``) and per sampler
step, the 95th percentile of the base's norms (``tau``), and the latent elements per sample, so a threshold
can be normalised per element (``tau_rms = tau / sqrt(elements)``) and used at another resolution. Train on
the branch you penalise: DiffusionNFT and AWM train without CFG, so they want ``branch="cond"``; the guided
tau of a profile run at CFG 7 sits far above the cond norms and the hinge would never fire.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from normscope.commands.reference_schema import REFERENCE_JSON, read_meta
from normscope.errors import InputError
from normscope.guard.checks import check_sigma
from normscope.guard.penalty import COND, GUIDED


def tau_at(sigma: torch.Tensor, sigmas: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """tau(sigma) by linear interpolation in a (sigma, tau) table given in any order.

    ``sigma`` must lie in [0, 1] (a 0-1000 timestep is refused, never clamped). Between the table's last
    sigma and 0 (or its first and 1) tau is held at the end value: a sampler grid of N steps stops short of 0.
    """
    sigma = check_sigma(torch.as_tensor(sigma))
    order = torch.argsort(sigmas)
    xs, ys = sigmas[order].double(), taus[order].double()
    s = sigma.double().clamp(xs[0], xs[-1])  # inside [0, 1]: hold the ends of the profiled grid
    index = torch.searchsorted(xs, s).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    weight = torch.where(x1 > x0, (s - x0) / (x1 - x0), torch.zeros_like(s))
    return (y0 + weight * (y1 - y0)).float()


@dataclass(frozen=True)
class TauTable:
    """One branch's per-step thresholds from a profile, with the conditions it was measured under."""

    sigmas: torch.Tensor
    tau: torch.Tensor  # per-sample L2 norm units, at the profiled resolution
    elements: int | None  # latent elements per sample at the profiled resolution
    branch: str
    guidance: float | None
    height: int | None
    width: int | None
    gate: float | None  # the profile's suggested maximum inflation
    source: str

    @property
    def tau_rms(self) -> torch.Tensor:
        if not self.elements:
            raise InputError(f"{self.source} records no latent size: rerun normscope profile to get per-element thresholds")
        return self.tau / self.elements**0.5

    def rms_at(self, sigma) -> torch.Tensor:
        """Per-element RMS threshold at each sigma: for ``form="rms"`` or ``"relative"``, at any resolution."""
        sigma = torch.as_tensor(sigma)
        return tau_at(sigma, self.sigmas, self.tau_rms).reshape(sigma.shape)

    def norm_at(self, sigma, like: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample L2 threshold at each sigma for ``form="absolute"``, scaled to ``like``'s latent size."""
        sigma = torch.as_tensor(sigma)
        if like is None:
            return tau_at(sigma, self.sigmas, self.tau).reshape(sigma.shape)
        return self.rms_at(sigma) * float(like[0].numel()) ** 0.5


def load_tau(reference: str | Path, branch: str = GUIDED) -> TauTable:
    """Read ``branch``'s tau(sigma) from a profile folder (or its reference.json).

    A profile made without CFG (guidance <= 1) has one branch, which is the cond velocity: ``cond`` reads it.
    """
    path = Path(reference)
    path = path / REFERENCE_JSON if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{reference} holds no {REFERENCE_JSON}: make one with normscope profile BASE --out DIR")
    meta = read_meta(path)  # validated: a damaged or edited reference.json is an InputError naming the field
    per_step = meta["per_step"]
    resolved = meta["config"].get("resolved") or {}
    guidance = resolved.get("guidance")
    name = branch
    if branch not in per_step:
        if branch == COND and set(per_step) == {GUIDED} and (guidance is None or guidance <= 1):
            name = GUIDED  # no CFG batch: the guided velocity is the cond velocity
        else:
            raise InputError(
                f"{path} has no {branch!r} branch (it has {sorted(per_step)}): profile with CFG on to get cond and "
                "uncond, or ask for 'guided'"
            )
    rows = [r for r in per_step[name] if r.get("tau") is not None]
    if not rows:
        raise InputError(f"{path}: branch {branch!r} has no finite tau; rerun normscope profile")
    return TauTable(
        sigmas=torch.tensor([r["sigma"] for r in rows], dtype=torch.float64),
        tau=torch.tensor([r["tau"] for r in rows], dtype=torch.float64),
        elements=meta.get("latent_elements"), branch=branch, guidance=guidance,
        height=resolved.get("height"), width=resolved.get("width"),
        gate=meta["suggestions"]["gate"]["max_inflation"], source=str(path),
    )
