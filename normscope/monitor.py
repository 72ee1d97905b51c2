"""A live NormGuard monitor for any training loop: ratio statistics per training step, to a run folder.

A few lines in the loop::

    from normscope.monitor import Monitor

    monitor = Monitor("runs/exp1", gate="ref/")          # gate from a profile's reference, or a number
    for step, batch in enumerate(loader):
        ...                                              # the loss computes v_theta and v_ref already
        monitor.log(step, v_theta, v_ref, sigma=sigma)   # no extra forward
    monitor.close()

Each training step becomes one line of ``RUN_DIR/monitor.jsonl`` (several ``log`` calls with the same step,
e.g. one per timestep or micro-batch, are pooled into it): mean/std/max of ``||v_theta|| / ||v_ref||``, the
hinge rate, mean norms, the mean ratio per sigma bucket, and a smoothed ratio (mean of the last
``smoothing`` steps). The first step whose smoothed ratio exceeds ``1 + gate`` is flagged, in the line, in
``RUN_DIR/monitor.json`` and as a warning on the ``normscope.monitor`` logger. When v_ref is not at hand, pass
a zero-argument callable instead: it runs (under ``torch.no_grad()``) only every ``every`` steps.

Bad batches do not break the log: a sample whose ratio is NaN or infinite is left out of the statistics and
counted (``n_nonfinite``, and ``nonfinite_elements`` in v_theta and v_ref); a number with nothing finite
behind it is written as ``null``, so every line is strict JSON; a step with no finite sample neither decides
nor resets the smoothed ratio. ``log`` keeps everything on the tensors' device (a sigma on an accelerator is
range-checked at the flush): one host transfer per logged step, none per micro-batch.

TensorBoard (``pip install normscope[tensorboard]``) and Weights & Biases (``normscope[wandb]``, into the run
the trainer started with ``wandb.init``) receive the same numbers when installed; neither is required.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normscope.errors import ConfigError, InputError
from normscope.guard.checks import check_sigma, per_sample
from normscope.guard.penalty import per_sample_norm, per_sample_ratio
from normscope.guard.stats import REGIONS, Bucket, blank_empty, ratio_tensors, to_host

MONITOR_JSONL = "monitor.jsonl"
MONITOR_JSON = "monitor.json"
DEFAULT_SMOOTHING = 5
DEFAULT_PREFIX = "normguard"
log = logging.getLogger(__name__)


def _gate_value(gate: float | str | Path | None) -> tuple[float | None, str | None]:
    """A gate as a number (max inflation, 0.05 = 5 %), or read from a profile folder / reference.json."""
    if gate is None:
        return None, None
    if isinstance(gate, (int, float)):
        if not 0 <= gate < 1:
            raise ConfigError(f"gate {gate} is a fraction (0.05 = 5 %), not a percentage")
        return float(gate), "number"
    path = Path(gate)
    path = path / "reference.json" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"gate {gate} is neither a number nor a profile folder with reference.json: run normscope profile")
    from normscope.commands.reference_schema import read_gate

    return read_gate(path), str(path)  # checked like every reader of a reference: a NaN or 5000 % gate is refused


@dataclass(kw_only=True)
class MonitorConfig:
    """Where and how the monitor records; ``tensorboard``/``wandb`` None = use them when available."""

    run_dir: Path
    gate: float | str | Path | None = None
    smoothing: int = DEFAULT_SMOOTHING
    every: int = 1
    margin: float = 0.0
    buckets: tuple[Bucket, ...] = REGIONS
    tensorboard: bool | None = None
    wandb: bool | None = None
    prefix: str = DEFAULT_PREFIX
    gate_value: float | None = field(init=False, default=None)
    gate_source: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.buckets = tuple(tuple(b) for b in self.buckets)
        if self.smoothing < 1:
            raise ConfigError(f"smoothing must be at least 1 step, got {self.smoothing}")
        if self.every < 1:
            raise ConfigError(f"every must be at least 1 step, got {self.every}")
        self.gate_value, self.gate_source = _gate_value(self.gate)
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard=True but TensorBoard is not installed: pip install normscope[tensorboard]")
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError("wandb=True but wandb is not installed: pip install normscope[wandb]")


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def write(self, step: int, values: dict[str, float], prefix: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, required: bool) -> None:
        import wandb

        if wandb.run is None and required:
            raise ConfigError("wandb=True but no W&B run is active: call wandb.init(...) before creating the Monitor")
        self.wandb = wandb

    def write(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.wandb.run is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Batch:
    """One ``log`` call's per-sample tensors, kept on their device until the step is flushed."""

    ratio: torch.Tensor
    sigma: torch.Tensor | None
    deferred: torch.Tensor | None  # a sigma on an accelerator, range-checked at the flush
    norm: torch.Tensor
    norm_ref: torch.Tensor
    nonfinite: torch.Tensor  # 0-d count of NaN/inf elements in v_theta and v_ref


class Monitor:
    """Per-training-step ratio statistics to ``run_dir/monitor.jsonl`` (+ TensorBoard / W&B when present)."""

    def __init__(self, run_dir: str | Path | None = None, *, config: MonitorConfig | None = None, **options) -> None:
        if config is None:
            if run_dir is None:
                raise ConfigError("Monitor needs a run folder: Monitor('runs/exp1')")
            config = MonitorConfig(run_dir=Path(run_dir), **options)
        self.config = config
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = config.run_dir / MONITOR_JSONL
        self.crossing: dict | None = None
        self._history: list[float] = []
        self._pending_step: int | None = None
        self._pending: list[_Batch] = []
        self._last_step: int | None = None
        self._sinks = []
        if config.tensorboard is not False and importlib.util.find_spec("tensorboard") is not None:
            self._sinks.append(_TensorBoard(config.run_dir / "tensorboard"))
        if config.wandb is not False and importlib.util.find_spec("wandb") is not None:
            self._sinks.append(_WandB(required=bool(config.wandb)))
        self._write_meta()

    # -- recording ------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether an extra reference forward is wanted at this step (every ``every`` steps)."""
        return step % self.config.every == 0

    @torch.no_grad()
    def log(self, step: int, v_theta: torch.Tensor, v_ref: torch.Tensor | Callable[[], torch.Tensor],
            sigma: torch.Tensor | float | None = None) -> bool:
        """Record one batch of velocities of training step ``step``; False if skipped (callable, not due).

        ``v_theta`` and ``v_ref`` are the same CFG branch on the same inputs (``normscope.guard.cfg_branch``);
        ``sigma`` in [0, 1], one per sample or one for the batch, fills the sigma buckets.
        """
        step = int(step)
        if self._last_step is not None and step < self._last_step:
            raise InputError(f"monitor step {step} comes after step {self._last_step}: steps must not go back")
        if callable(v_ref):
            if not self.due(step):
                return False
            v_ref = v_ref()
        ratio = per_sample_ratio(v_theta, v_ref)
        s = deferred = None
        if sigma is not None:
            s = per_sample(sigma, ratio.shape[0], "sigma", ratio.device, torch.float64)
            if s.device.type == "cpu":
                check_sigma(s)  # free on the host: refuse now
            else:
                deferred = s  # on an accelerator: checked at the flush, in the step's one transfer
        if self._pending_step is not None and step != self._pending_step:
            self.flush()
        self._pending_step = step
        self._last_step = step
        v_theta, v_ref = v_theta.detach(), v_ref.detach()
        bad = (~torch.isfinite(v_theta)).sum() + (~torch.isfinite(v_ref)).sum()
        self._pending.append(_Batch(ratio.detach(), s, deferred, per_sample_norm(v_theta), per_sample_norm(v_ref), bad))
        return True

    def flush(self) -> dict | None:
        """Write the pending step's line (done automatically when the next step starts, and by ``close``)."""
        if self._pending_step is None:
            return None
        pending, step = self._pending, self._pending_step
        self._pending_step, self._pending = None, []
        has_sigma = all(b.sigma is not None for b in pending)
        sigma = torch.cat([b.sigma for b in pending]) if has_sigma else None
        values = ratio_tensors(torch.cat([b.ratio for b in pending]), sigma, torch.cat([b.norm for b in pending]),
                               torch.cat([b.norm_ref for b in pending]), self.config.margin, self.config.buckets)
        values["nonfinite_elements"] = torch.stack([b.nonfinite for b in pending]).sum().double()
        deferred = [b.deferred for b in pending if b.deferred is not None]
        if deferred:
            late = torch.cat(deferred)
            values["_sigma_ok"] = (torch.isfinite(late).all() & (late >= 0).all() & (late <= 1).all()).double()
            values["_sigma_min"], values["_sigma_max"] = late.min().double(), late.max().double()
        entry = to_host(values)  # the step's one host transfer
        if deferred and entry["_sigma_ok"] != 1.0:
            bounds = [float("nan") if entry[k] is None else entry[k] for k in ("_sigma_min", "_sigma_max")]
            check_sigma(torch.tensor(bounds), f"sigma of step {step}")
        for key in ("_sigma_ok", "_sigma_min", "_sigma_max"):
            entry.pop(key, None)
        blank_empty(entry, self.config.buckets if has_sigma else ())
        entry["n_nonfinite"], entry["nonfinite_elements"] = int(entry["n_nonfinite"]), int(entry["nonfinite_elements"])
        if entry["ratio_mean"] is not None:  # a step with nothing finite neither decides nor resets the mean
            self._history.append(entry["ratio_mean"])
        window = self._history[-self.config.smoothing:]
        smoothed = sum(window) / len(window) if entry["ratio_mean"] is not None else None
        entry = {"step": step, **entry, "smoothed": smoothed, "time": round(time.time(), 3)}
        gate = self.config.gate_value
        entry["crosses_gate"] = bool(gate is not None and smoothed is not None and smoothed - 1.0 > gate)
        if entry["n_nonfinite"]:
            log.warning("normscope monitor: step %d has %d sample(s) with a non-finite norm ratio (%d non-finite "
                        "elements), left out of its statistics", step, entry["n_nonfinite"], entry["nonfinite_elements"])
        if entry["crosses_gate"] and self.crossing is None:
            self.crossing = {"step": step, "smoothed": smoothed, "gate": gate}
            log.warning("normscope monitor: smoothed norm ratio %.4f exceeds 1 + gate %.4f first at step %d",
                        smoothed, gate, step)
            self._write_meta()
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry, allow_nan=False) + "\n")
        numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        for sink in self._sinks:
            sink.write(step, numbers, self.config.prefix)
        return entry

    def close(self) -> None:
        self.flush()
        self._write_meta()
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_meta(self) -> None:
        c = self.config
        meta = {"log": MONITOR_JSONL, "gate": c.gate_value, "gate_source": c.gate_source, "smoothing": c.smoothing,
                "every": c.every, "margin": c.margin, "buckets": [list(b) for b in c.buckets],
                "first_crossing": self.crossing, "sinks": [type(s).__name__.strip("_").lower() for s in self._sinks]}
        (c.run_dir / MONITOR_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def read_monitor_log(path: str | Path) -> tuple[list[dict], dict]:
    """The entries of a monitor log (a run folder or its monitor.jsonl) and its monitor.json settings."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    log_file = folder / MONITOR_JSONL if path.is_dir() else path
    if not log_file.is_file():
        raise InputError(f"{path} holds no {MONITOR_JSONL}: pass a run folder written by normscope.monitor.Monitor")
    entries = []
    for number, line in enumerate(log_file.read_text().splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{log_file} line {number} is not JSON: the log was cut mid-write; delete that line") from None
    meta_file = folder / MONITOR_JSON
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return entries, meta


def bucket_names(buckets: Sequence[Bucket]) -> list[str]:
    return [b[0] for b in buckets]
