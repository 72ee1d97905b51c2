"""The scheduler's shift when a trainer overrides it (issue 19): ``--shift`` / ``ProbeConfig.shift``.

Trainers sometimes evaluate with another timestep shift than the model repo ships (Flow-Factory's Wan configs set
``flow_shift: 3.0`` in their scheduler section: its ``load_scheduler`` rebuilds the pipeline's own scheduler class
from the shipped config with that key updated). normscope does the same: before sampling, the pipeline's scheduler
is replaced by ``type(s).from_config(s.config, <attribute>=value)`` and put back afterwards.

What each diffusers 0.42 scheduler calls its static shift is data (``SHIFT_ATTRIBUTES``), not code. A scheduler
whose shift is computed from the image size (``use_dynamic_shifting``: FLUX, Qwen-Image, FLUX.2) ignores the
static value, and a multistep solver reads ``flow_shift`` only in flow mode (``use_flow_sigmas``): ``--shift`` is
refused there, and for a scheduler with no shift, from ``scheduler/scheduler_config.json`` before any weight loads.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from normscope.errors import InputError


@dataclass(frozen=True)
class ShiftRule:
    """``attribute``: the config key (and ``__init__`` argument) holding the static shift; ``needs``: a config flag
    that must be true for the scheduler to read it (None: always read)."""

    attribute: str
    needs: str | None = None


# scheduler class -> where its static shift lives (diffusers 0.42: each reads it in set_timesteps as
# sigma' = s * sigma / (1 + (s - 1) * sigma) unless use_dynamic_shifting is set).
SHIFT_ATTRIBUTES: dict[str, ShiftRule] = {
    "FlowMatchEulerDiscreteScheduler": ShiftRule("shift"),
    "FlowMatchHeunDiscreteScheduler": ShiftRule("shift"),
    "FlowMatchLCMScheduler": ShiftRule("shift"),
    "UniPCMultistepScheduler": ShiftRule("flow_shift", needs="use_flow_sigmas"),  # the Wan repos ship this one
    "DPMSolverMultistepScheduler": ShiftRule("flow_shift", needs="use_flow_sigmas"),
}
DYNAMIC = "use_dynamic_shifting"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def refusal(class_name: str, config: dict) -> str | None:
    """Why a static shift would not change what this scheduler samples, or None when it would."""
    rule = SHIFT_ATTRIBUTES.get(class_name)
    if rule is None:
        known = ", ".join(SHIFT_ATTRIBUTES)
        return f"its scheduler {class_name} has no static shift normscope knows ({known} do)"
    if config.get(DYNAMIC):
        return (f"its scheduler {class_name} computes the shift from the image size (use_dynamic_shifting), "
                f"so the pipeline ignores a static {rule.attribute}")
    if rule.needs is not None and not config.get(rule.needs):
        return f"its scheduler {class_name} reads {rule.attribute} only with {rule.needs}, which is off"
    return None


def _read_config(source: str) -> tuple[str, dict] | None:
    local = Path(source)
    if local.exists():
        path = local / SCHEDULER_CONFIG
        if not path.is_file():
            raise InputError(f"--shift needs the pipeline's {SCHEDULER_CONFIG}, which {source} lacks: pass a complete "
                             "pipeline folder, or drop --shift")
        config = json.loads(path.read_text())
    else:
        try:
            from diffusers import SchedulerMixin

            config = SchedulerMixin.load_config(source, subfolder="scheduler")
        except Exception:  # unreachable hub id: load_pipeline explains it in one line
            return None
    return str(config.get("_class_name")), dict(config)


def check_shift(source: str, shift: float | None) -> None:
    """Before any weight loads: ``--shift`` is refused where the pipeline's scheduler would not use it."""
    if shift is None:
        return
    found = _read_config(source)
    if found is None:
        return
    reason = refusal(*found)
    if reason is not None:
        raise InputError(f"--shift {shift:g} does not apply to {source}: {reason}; drop --shift (and a preset's shift: "
                         "pass --shift only where the scheduler has a static one)")


def shifted(scheduler, shift: float | None):
    """A new scheduler of the same class and config, its static shift set to ``shift`` (None: ``scheduler`` itself)."""
    if shift is None:
        return scheduler
    name = type(scheduler).__name__
    reason = refusal(name, dict(scheduler.config))
    if reason is not None:  # check_shift refuses this before loading; a caller's own pipeline lands here
        raise InputError(f"--shift {shift:g} does not apply: {reason}; drop --shift")
    return type(scheduler).from_config(scheduler.config, **{SHIFT_ATTRIBUTES[name].attribute: float(shift)})


@contextlib.contextmanager
def shifted_scheduler(pipe, shift: float | None) -> Iterator[None]:
    """The pipeline samples with its scheduler's shift set to ``shift`` (None: unchanged), restored afterwards.

    Replacing ``pipe.scheduler`` covers a pipeline that copies its scheduler inside the call (LTX-2 deep-copies it
    for the audio latents).
    """
    if shift is None:
        yield
        return
    original = pipe.scheduler
    pipe.scheduler = shifted(original, shift)
    try:
        yield
    finally:
        pipe.scheduler = original


def scheduler_shift(scheduler, requested: float | None = None) -> dict:
    """What summary.json records (``resolved.scheduler_shift``, next to ``resolved.scheduler_class``): the shift the
    scheduler samples with, the config key holding it, and whether ``--shift`` (or a preset) overrode the shipped one.

    ``shift`` is None where the scheduler computes it per image size (``dynamic``) or has none.
    """
    name = type(scheduler).__name__
    config = dict(scheduler.config)
    rule = SHIFT_ATTRIBUTES.get(name)
    dynamic = bool(config.get(DYNAMIC))
    used = rule is not None and not dynamic and (rule.needs is None or bool(config.get(rule.needs)))
    return {"attribute": rule.attribute if rule else None,
            "shift": float(config[rule.attribute]) if used and rule.attribute in config else None,
            "dynamic": dynamic, "overridden": requested is not None}


__all__ = ["SHIFT_ATTRIBUTES", "ShiftRule", "check_shift", "refusal", "scheduler_shift", "shifted", "shifted_scheduler"]
