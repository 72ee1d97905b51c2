"""Will the run fit on the device? An estimate before it starts, and a clear line if it still runs out.

What sits on the execution device while the transformers run (the text encoders are gone by then, see
``measure.prompt_cache``; the VAE comes only to decode):

* weights: one transformer (a LoRA: plus its adapter) or two (full checkpoints, not offloaded), at their
  parameter count times the bytes of the run's dtype;
* activations: a rough ``ACTIVATION_FACTOR`` x (batch, doubled for a CFG batch) x (image + text tokens)
  x width x dtype bytes — the order of magnitude of one DiT block's live tensors, not a bound.

The budget is the device's free memory (CUDA), or what ``--max-device-memory`` / the environment variable
``NORMSCOPE_MAX_DEVICE_MEMORY`` says (any device; the CPU has no check without it).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from normscope.errors import ConfigError, RunError

BUDGET_ENV = "NORMSCOPE_MAX_DEVICE_MEMORY"
ACTIVATION_FACTOR = 24  # live (token x width) tensors in one DiT block: q, k, v, attention out, 4x MLP, residuals
UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
         "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
GIB = float(1 << 30)


class DeviceMemoryError(RunError):
    """The run does not fit on the device (estimated before it starts, or an out-of-memory error during it)."""


def parse_size(text: str | int | None) -> int | None:
    """``24GiB``, ``500MB``, ``1.5g`` or a byte count -> bytes (binary units: 1 GB = 1 GiB here)."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS:
        raise ConfigError(f"--max-device-memory {text!r} is not a size: write e.g. 40GiB, 512MiB or a byte count")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def device_budget(device: str, explicit: str | int | None = None) -> int | None:
    """Bytes the run may use on ``device``: the explicit budget, else CUDA's free memory, else no check."""
    if explicit is None:
        explicit = os.environ.get(BUDGET_ENV) or None
    if explicit is not None:
        return parse_size(explicit)
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return None


@dataclass(frozen=True)
class Footprint:
    """What the run would put on the device; the fields are the options a user can change."""

    transformer_params: int
    adapter_params: int
    transformers: int  # transformers on the device at once: 2 for full checkpoints, 1 for a LoRA or --offload
    dtype_bytes: int
    batch: int  # samples per pipeline call
    cfg: bool
    tokens: int
    width: int
    offload_possible: bool  # full checkpoints not yet offloaded
    dtype_name: str

    @property
    def weights(self) -> int:
        return (self.transformers * self.transformer_params + self.adapter_params) * self.dtype_bytes

    @property
    def activations(self) -> int:
        return ACTIVATION_FACTOR * self.batch * (2 if self.cfg else 1) * self.tokens * self.width * self.dtype_bytes

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        return (f"~{self.total / GIB:.2f} GiB ({self.transformers} transformer(s) {self.weights / GIB:.2f} GiB in "
                f"{self.dtype_name}, activations of a batch of {self.batch} ~{self.activations / GIB:.2f} GiB)")

    def alternatives(self, budget: int) -> list[str]:
        """The option changes that would make the run fit, each with its estimate."""
        out = []
        if self.offload_possible and replace(self, transformers=1).total <= budget:
            out.append(f"--offload (~{replace(self, transformers=1).total / GIB:.2f} GiB)")
        if self.dtype_bytes > 2 and replace(self, dtype_bytes=2).total <= budget:
            out.append(f"--dtype bfloat16 (~{replace(self, dtype_bytes=2).total / GIB:.2f} GiB)")
        batch = self.batch
        while batch > 1:
            batch = max(1, batch // 2)
            if replace(self, batch=batch).total <= budget:
                out.append(f"--batch-size {batch} (~{replace(self, batch=batch).total / GIB:.2f} GiB)")
                break
        if not out:
            smallest = replace(self, transformers=1 if self.offload_possible else self.transformers,
                               dtype_bytes=min(self.dtype_bytes, 2), batch=1)
            if smallest.total <= budget:
                out.append(f"--offload --dtype bfloat16 --batch-size 1 together (~{smallest.total / GIB:.2f} GiB)")
        return out


def footprint(pipe, transformers: int, adapter_params: int, batch: int, guidance: float | None, height: int | None,
              width: int | None, max_sequence_length: int | None, offload_possible: bool) -> Footprint:
    """The device footprint of a run on ``pipe`` (read from its transformers' parameters and configs).

    Every expert counts (Wan2.2-A14B's ``transformer_2`` too). Video frames are not in the token count: for
    video the activation term is a floor, not an estimate.
    """
    transformer = pipe.transformer
    config = transformer.config
    experts = [m for m in (transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    params = sum(p.numel() for m in experts for p in m.parameters()) - adapter_params
    dtype = next(transformer.parameters()).dtype
    scale = int(getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None) or 8)
    size = int(getattr(pipe, "default_sample_size", None) or 128) * scale
    patch = config.get("patch_size", 1) or 1
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch)  # Wan: (frames, height, width)
    latent_h, latent_w = (height or size) // scale, (width or size) // scale
    tokens = max(1, latent_h // patch) * max(1, latent_w // patch)
    if type(transformer).__name__.startswith("Flux"):
        tokens = max(1, latent_h // 2) * max(1, latent_w // 2)  # FLUX packs 2x2 latent patches into one token
    tokens += max_sequence_length or 256
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    hidden = heads * head_dim if heads and head_dim else int(config.get("hidden_size", 3072))
    cfg = hasattr(pipe, "do_classifier_free_guidance") and (guidance is None or guidance > 1)
    return Footprint(params, adapter_params, transformers, dtype.itemsize, batch, cfg, tokens, hidden,
                     offload_possible, str(dtype).removeprefix("torch."))


def check_fits(fp: Footprint, budget: int | None, device: str) -> None:
    """Refuse in one line, naming the options that would fit, when the estimate exceeds the budget."""
    if budget is None or fp.total <= budget:
        return
    options = fp.alternatives(budget)
    advice = ("try " + ", or ".join(options)) if options else \
        "no option fits: use a larger device, or a stored reference (normscope profile, then check --reference)"
    raise DeviceMemoryError(f"the run needs {fp.describe()} on {device}, {budget / GIB:.2f} GiB available: {advice}")


def advice_for(fp: Footprint | None) -> str:
    """The options to try after an out-of-memory error (estimates cannot foresee every allocation)."""
    if fp is None:
        return "try --offload, --dtype bfloat16 or a smaller --batch-size"
    options = []
    if fp.offload_possible:
        options.append("--offload")
    if fp.dtype_bytes > 2:
        options.append("--dtype bfloat16")
    if fp.batch > 1:
        options.append(f"--batch-size {max(1, fp.batch // 2)}")
    return "try " + ", ".join(options) if options else "use a larger device"


@contextlib.contextmanager
def out_of_memory_as_error(device: str, fp: Footprint | None, kept: str = "") -> Iterator[None]:
    """An out-of-memory error inside the block becomes one line with advice (exit 3), not a traceback."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as exc:
        detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else "out of memory"
        raise DeviceMemoryError(f"{device} ran out of memory during the run ({detail}): {advice_for(fp)}{kept}") from None
