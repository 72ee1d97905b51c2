"""Sampling: run a pipeline over (prompt, seed) batches with capture attached, for every job.

The pipeline call is the user's own diffusers call; normscope only chooses its keyword arguments (one CPU
generator per sample) and attaches capture around it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Protocol

import torch

from normscope import __version__
from normscope.config import ProbeConfig
from normscope.errors import InputError
from normscope.load import VelocityModel
from normscope.measure.capture import CallRecord, capture
from normscope.measure.prompts import Sample


class Reporter(Protocol):
    """Where progress goes: the CLI draws a rich bar on stderr, notebooks may pass nothing."""

    def begin(self, total_steps: int) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def note(self, message: str) -> None: ...


class SilentReporter:
    def begin(self, total_steps: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start:start + size]


def _call_defaults(pipe) -> dict:
    return {
        name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def sampling_kwargs(pipe, probe: ProbeConfig, samples: list[Sample]) -> dict:
    """The keyword arguments of the pipeline call for one batch; unset options stay the pipeline's.

    Each sample gets its own CPU generator, so its initial noise is exactly what the pipeline draws
    for that prompt alone with ``generator=torch.Generator("cpu").manual_seed(seed)``, whatever the batch.
    """
    accepted = _call_defaults(pipe)
    kwargs = {
        "prompt": [s.prompt for s in samples],
        "num_inference_steps": probe.steps,
        "generator": [torch.Generator("cpu").manual_seed(s.seed) for s in samples],
        "output_type": "latent",
    }
    optional = {
        "guidance_scale": probe.guidance,
        "height": probe.height,
        "width": probe.width,
        "max_sequence_length": probe.max_sequence_length,
        "negative_prompt": None if probe.negative_prompt is None else [probe.negative_prompt] * len(samples),
    }
    for name, value in optional.items():
        if value is None:
            continue
        if name not in accepted:
            flag = {"guidance_scale": "guidance"}.get(name, name).replace("_", "-")
            raise InputError(f"{type(pipe).__name__} does not take {name}: drop --{flag}")
        kwargs[name] = value
    return kwargs


def resolved_sampling(pipe, probe: ProbeConfig) -> dict:
    """The sampler settings actually used, pipeline defaults filled in, for summary.json."""
    defaults = _call_defaults(pipe)
    size = None
    if hasattr(pipe, "default_sample_size") and hasattr(pipe, "vae_scale_factor"):
        size = int(pipe.default_sample_size * pipe.vae_scale_factor)
    return {
        "pipeline_class": type(pipe).__name__,
        "transformer_class": type(pipe.transformer).__name__,
        "scheduler_class": type(pipe.scheduler).__name__,
        "guidance": probe.guidance if probe.guidance is not None else defaults.get("guidance_scale"),
        "height": probe.height or defaults.get("height") or size,
        "width": probe.width or defaults.get("width") or size,
        "max_sequence_length": probe.max_sequence_length or defaults.get("max_sequence_length"),
        "negative_prompt": probe.negative_prompt if probe.negative_prompt is not None else defaults.get("negative_prompt"),
    }


def run_paired(pipe, driver: VelocityModel, other: VelocityModel, kwargs: dict, reporter: Reporter,
               observers=()) -> dict[str, CallRecord]:
    """One batch in paired mode: ``driver`` samples, ``other`` is evaluated on the same inputs."""
    with capture(pipe, driver, other, on_step=reporter.advance, observers=observers) as recorder:
        pipe(**kwargs)
        return {"paired": recorder.collect()}


def run_free(pipe, base: VelocityModel, tuned: VelocityModel, kwargs: dict, reporter: Reporter) -> dict[str, CallRecord]:
    """One batch in free mode: each model samples its own trajectory from the same noise."""
    return {model.role: run_model(pipe, model, kwargs, reporter) for model in (base, tuned)}


def fresh_generators(generators):
    """New generators in the state the given ones were created in (each model must draw the same noise)."""
    fresh = []
    for g in generators:
        clone = torch.Generator(g.device)
        clone.set_state(g.get_state())
        fresh.append(clone)
    return fresh


def run_model(pipe, model: VelocityModel, kwargs: dict, reporter: Reporter) -> CallRecord:
    """One batch with one model on its own trajectory (profile, and reference checks)."""
    call = dict(kwargs, generator=fresh_generators(kwargs["generator"]))
    with capture(pipe, model, on_step=reporter.advance) as recorder:
        output = pipe(**call)
        record = recorder.collect()
    if call["output_type"] != "latent":
        record.images = list(output.images)
    return record


def run_model_batches(pipe, model: VelocityModel, probe: ProbeConfig, samples: list[Sample], reporter: Reporter) -> CallRecord:
    """One model over all samples, batch by batch, the batches shared out when several processes run."""
    from normscope.measure.distributed import current_processes

    groups = list(batches(samples, probe.batch_size))
    procs = current_processes()
    return concat_records(procs.map(len(groups), lambda i: run_model(pipe, model, sampling_kwargs(pipe, probe, groups[i]), reporter)))


def resolve_run_device(device) -> tuple[str, object]:
    """The device string for this process (its own GPU when launched on several) and the torch dtype."""
    from normscope.load import resolve_device
    from normscope.measure.distributed import processes

    name = resolve_device(device)
    return processes(cpu=name == "cpu").device(name), name


def concat_records(records: list[CallRecord]) -> CallRecord:
    """Batches of the same run joined along the sample axis."""
    first = records[0]
    stats = {b: torch.cat([r.stats[b] for r in records], dim=-1) for b in first.stats}
    return CallRecord(stats, first.stat_names, first.timesteps, first.sigmas)


def versions() -> dict:
    import diffusers

    return {"normscope": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
