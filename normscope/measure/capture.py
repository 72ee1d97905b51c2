"""Capture stage: hooks that record per-step, per-sample velocity statistics during a pipeline call.

One path serves every family; what differs between pipelines is a row of the family table
(``normscope.load.families``), never a branch here. Two hooks see everything that matters:

* a forward hook on each expert transformer records every call of the step (and, in paired mode,
  evaluates the other model on exactly the same positional and keyword inputs);
* a wrapper on ``scheduler.step`` receives the velocity the sampler actually applies ("guided") and
  closes the step. Only its first argument is read, so any scheduler works (Euler, UniPC, ...).

Pipelines with several experts (Wan2.2-A14B: ``transformer`` for high noise, ``transformer_2`` for low
noise) get one hook per expert; each step is labelled with the expert that ran it (no label when the pipeline
holds only one of the row's experts), in paired mode the other model is evaluated with its own module for
that expert, and the expert's own guidance argument (``guidance_scale_2``) is used and verified.

At the close of a step the calls are sliced to the latent tokens (reference tokens off), put in the
scheduler's convention (the family's ``output_sign``), split into ``cond`` / ``uncond`` (a batched call
by the family's ``batch_order``; separate calls cond first), and combined with the family's rule
(``RULES``) into ``guided`` (and ``combined`` where the pipeline renormalises or caps afterwards). The
driver's rule is verified against what the scheduler received, once per call layout; the other model's
guided velocity is formed with the same rule. Non-finite values are detected before that check, so a
NaN checkpoint is reported as such, not as a pipeline normscope cannot follow.

Rows with more (issue 19): the output keeps its LAST tokens where the row says so (``token_slice``, Qwen-Image-2.1);
state the transformer writes through a keyword (``private_state_kwargs``, Qwen-Image-2.1's KV cache) is given to the
other model as its own copy, so no model reads the other's cached prefix; extra guidance calls are recognised by a
marking keyword (``call_markers``, LTX-2's STG and modality-isolation calls); and a transformer that returns several
velocities (``streams``, LTX-2's video and audio) has each stream stepped by its own scheduler: the wrapper on
``scheduler.step`` follows a copy of the scheduler made in the call, steps the copy, and records the next stream
(statistics under "<stream>:<branch>"). LTX-2's rule works in x0 space, so the wrapper passes it the latents
the scheduler steps and the step's sigma.

Statistics stay on the model's device in float32 until the call ends; one transfer per call, plus one
host sync per verified layout.

Hook mechanism (decided by trying): plain ``torch.nn.Module.register_forward_hook`` rather than a named
hook in diffusers' ``HookRegistry``. The registry rewrites ``module.forward`` and, on removal, writes the
forward it wrapped back onto the module, so a wrapper installed after it (accelerate's
``enable_model_cpu_offload`` / ``cpu_offload`` hooks also replace ``forward``) is silently dropped when
normscope's hook is removed; torch's forward hooks live outside ``forward`` in the module's own hook
dict, run after whatever offload/group-offload/cache wrapper computed the output, and are removed by
their handle without touching any other wrapper (tests/test_families_refusals.py shows both, and that
capture gives identical numbers under ``enable_group_offload`` and ``enable_model_cpu_offload``). Caching
hooks (FirstBlockCache, MagCache) would see the second model's call in paired mode inside the same cache
context; run paired mode without them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from normscope.errors import RunError
from normscope.load import VelocityModel
from normscope.load.families import DISTILLED, LINEAR, LTX2_X0, QWEN_RENORM, ZIMAGE, Family, family_for

GUIDED, COND, UNCOND, COMBINED = "guided", "cond", "uncond", "combined"
BRANCHES = (GUIDED, COND, UNCOND, COMBINED)
EXTRA = "extra"  # the role of an extra guidance call (SD3 skip-layer); followed, not reported
STREAM_SEP = ":"  # record.stats key of a stream after the first: "audio:guided"
# Rows of the per-step statistics tensor.
FREE_STATS = ("norm",)
PAIRED_STATS = ("norm_driver", "norm_other", "cosine", "mse")


@dataclass
class CallRecord:
    """Everything captured from one pipeline call (one batch of samples), on the CPU.

    ``stats[branch]`` has shape (steps, len(stat_names), batch). On a step where a CFG run made one call
    (Z-Image past ``cfg_truncation``) ``cond`` is that call's velocity and ``uncond``/``combined`` are NaN. ``experts[i]`` is the label of the transformer that ran step
    ``i`` ("" for one-transformer families).
    """

    stats: dict[str, torch.Tensor]
    stat_names: tuple[str, ...]
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    images: list | None = None  # decoded final images, when the call asked for them (not stored for resume)
    experts: list[str] = field(default_factory=list)
    # What collecting observers gathered (``observer.name`` -> branch -> tensor), e.g. per-frame norms.
    observed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # Multi-stream families (LTX-2): the first stream's name; the other streams' statistics are in ``stats``
    # under "<stream>:<branch>" (the first stream's under the plain branch names, as for every family).
    stream: str = ""
    # The pipeline step of each recorded row when only some were measured (``--measure-steps``); None: 0..steps-1.
    step_index: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


class StepObserver(Protocol):
    """Sees every branch of every step while the call runs (spatial maps, spectra, ...).

    Called as ``observer(step, sigma, branch, expert, driver, other, family)``: ``driver`` and ``other``
    are the velocities (batch first, the pipeline's latent layout, see ``family.latent_layout``) in the
    scheduler's convention v = noise - x0, on the model's device, not synchronised; ``other`` is None in
    free mode. ``sigma`` is a float. Observers must not modify the tensors.
    """

    def __call__(self, step: int, sigma: float, branch: str, expert: str, driver: torch.Tensor,
                 other: torch.Tensor | None, family: Family) -> None: ...


class CollectingObserver(StepObserver, Protocol):
    """An observer whose per-call results belong in the ``CallRecord``: at the end of every pipeline call
    ``collect()`` returns them (branch -> tensor, on the CPU) and starts afresh; they are stored in
    ``record.observed[name]``. So one observer can serve the base's and the tuned model's calls of free mode.
    """

    name: str

    def collect(self) -> dict[str, torch.Tensor]: ...


@dataclass
class _Call:
    expert: str
    driver: list[torch.Tensor]  # one velocity per stream
    other: list[torch.Tensor] | None
    role: str | None  # a marked extra guidance call (SD3 skip-layer "extra", LTX-2 "stg" / "modality")


# ---------------------------------------------------------------- combination rules


def _linear(parts: dict[str, torch.Tensor], s: dict[str, float]) -> dict[str, torch.Tensor]:
    cond, uncond = parts[COND], parts[UNCOND]
    guided = uncond + s["scale"] * (cond - uncond)
    if EXTRA in parts:  # SD3 skip-layer guidance: v += s_slg (cond - v_skip)
        guided = guided + (cond - parts[EXTRA]) * s["extra_scale"]
    return {GUIDED: guided}


def _qwen_renorm(parts: dict[str, torch.Tensor], s: dict[str, float]) -> dict[str, torch.Tensor]:
    cond, uncond = parts[COND], parts[UNCOND]
    combined = uncond + s["scale"] * (cond - uncond)
    ratio = torch.linalg.vector_norm(cond, dim=-1, keepdim=True) / torch.linalg.vector_norm(combined, dim=-1, keepdim=True)
    return {GUIDED: combined * ratio, COMBINED: combined}


def _zimage(parts: dict[str, torch.Tensor], s: dict[str, float]) -> dict[str, torch.Tensor]:
    cond, uncond = parts[COND], parts[UNCOND]
    combined = cond + s["scale"] * (cond - uncond)
    cap = s.get("cap") or 0.0
    if cap <= 0:
        return {GUIDED: combined}
    # Per sample: ||pred|| capped at cap * ||cond|| (the sign convention does not change norms).
    n_cond = torch.linalg.vector_norm(cond.flatten(1), dim=1)
    n_comb = torch.linalg.vector_norm(combined.flatten(1), dim=1)
    limit = n_cond * cap
    factor = torch.where(n_comb > limit, limit / n_comb, torch.ones_like(n_comb))
    return {GUIDED: combined * factor.view(-1, *([1] * (combined.dim() - 1))), COMBINED: combined}


def _rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg``: ``guided`` moved toward cond's standard deviation by ``rescale``."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def _ltx2_x0(parts: dict[str, torch.Tensor], s: dict) -> dict[str, torch.Tensor]:
    """LTX-2: guidance in x0 = x - sigma v (x the latents the scheduler steps), each term a delta from cond, then
    the rescale toward cond, then back to a velocity. ``combined``: the guidance before the rescale."""
    x, sigma = s["sample"], s["sigma"]
    x0 = {name: x - v * sigma for name, v in parts.items()}
    cond = x0[COND]
    guided = cond
    if UNCOND in x0:
        guided = guided + (s["scale"] - 1) * (cond - x0[UNCOND])
    if "stg" in x0:
        guided = guided + s["stg"] * (cond - x0["stg"])
    if "modality" in x0:
        guided = guided + (s["modality"] - 1) * (cond - x0["modality"])
    combined = (x - guided) / sigma
    if s["rescale"] > 0:
        return {GUIDED: (x - _rescale_noise_cfg(guided, cond, s["rescale"])) / sigma, COMBINED: combined}
    return {GUIDED: combined}


RULES: dict[str, Callable[[dict[str, torch.Tensor], dict], dict[str, torch.Tensor]]] = {
    LINEAR: _linear, QWEN_RENORM: _qwen_renorm, ZIMAGE: _zimage, LTX2_X0: _ltx2_x0,
}


# ---------------------------------------------------------------- helpers


def _streams(output, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The velocity of each stream (one: ``_sample``). LTX-2 returns (video, audio), or with ``return_dict`` a
    dataclass with ``sample`` and ``audio_sample``: the first stream is ``sample``, stream NAME ``NAME_sample``."""
    if len(names) <= 1:
        return [_sample(output)]
    if isinstance(output, (tuple, list)):
        return list(output[: len(names)])
    return [output.sample, *(getattr(output, f"{name}_sample") for name in names[1:])]


def _sample(output):
    """The velocity from whatever the transformer returned (tuple, output dataclass, list of tensors)."""
    if isinstance(output, tuple):
        output = output[0]
    output = getattr(output, "sample", output)
    if isinstance(output, (list, tuple)):  # Z-Image: a list of (C, 1, H, W), one per sample
        output = torch.stack(list(output)).squeeze(2)
    return output


def _norms(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v.flatten(1), dim=1, dtype=torch.float32)


def _paired_stats(driver: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    a = driver.flatten(1).float()
    b = other.flatten(1).float()
    na = torch.linalg.vector_norm(a, dim=1)
    nb = torch.linalg.vector_norm(b, dim=1)
    cosine = (a * b).sum(dim=1) / (na * nb)
    mse = (a - b).square().mean(dim=1)
    return torch.stack([na, nb, cosine, mse])


def _rescaled(guided: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``guided`` with each sample's L2 norm set to ``target``'s (the other model's guided velocity on the same
    inputs, formed with the family's own rule); direction unchanged, in ``guided``'s dtype."""
    factor = _norms(target) / _norms(guided)
    return (guided.float() * factor.view(-1, *([1] * (guided.dim() - 1)))).to(guided.dtype)


def _finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.flatten(1)).all(dim=1)
    return ok


def _evaluate(model: VelocityModel, attr: str, args, kwargs):
    """The other model on one call's inputs, with its own module for the expert (pipeline attribute) that ran."""
    expert = getattr(model, "expert", None)
    if expert is not None:
        return expert(attr)(*args, **kwargs)
    return model(*args, **kwargs)


class _SchedulerStep:
    """The wrapper on ``scheduler.step``: hands the velocity the scheduler receives to the recorder, then steps.

    A pipeline that deep-copies its scheduler during the call (LTX-2 steps its audio latents with a copy) copies
    this wrapper with it: the copy's wrapper steps the COPY (never the original) and records the next stream."""

    def __init__(self, recorder: Recorder, scheduler, original, stream: int) -> None:
        self.recorder, self.scheduler, self.original, self.stream = recorder, scheduler, original, stream
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        recorder = self.recorder
        model_output = args[0] if args else kwargs.get("model_output")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        sample = args[2] if len(args) > 2 else kwargs.get("sample")
        x0_rule = recorder.family.combine == LTX2_X0  # needs the step's sigma (no host sync otherwise)
        first = self.stream == 0 and not recorder._steps
        index = _first_index(self.scheduler, timestep) if first or x0_rule else 0  # the scheduler's index of this step
        if first:
            recorder.first_index = index
        sigmas = getattr(self.scheduler, "sigmas", None) if x0_rule else None
        sigma = sigmas[index] if sigmas is not None and index < len(sigmas) else None
        applied = recorder.record_step(model_output, self.stream, sample, sigma)
        if applied is not model_output:  # rescale_to_other: the scheduler applies the rescaled velocity
            if args:
                args = (applied, *args[1:])
            else:
                kwargs["model_output"] = applied
        return self.original(*args, **kwargs)

    def __deepcopy__(self, memo):
        copied = memo.get(id(self.scheduler))
        if copied is None:  # the wrapper alone copied: it still steps its own scheduler
            return self
        self.recorder.scheduler_copies += 1
        return _SchedulerStep(self.recorder, copied, types.MethodType(type(copied).step, copied),
                              self.recorder.scheduler_copies)


def _first_index(scheduler, timestep) -> int:
    """The scheduler index of a call's first step: 0, unless the pipeline starts part-way (img2img, Wan
    video-to-video's ``strength``), found from the scheduler's own index or the timestep it is given."""
    for name in ("step_index", "begin_index"):
        index = getattr(scheduler, name, None)
        if index is not None:
            return int(index)
    timesteps = getattr(scheduler, "timesteps", None)
    if timestep is None or timesteps is None:
        return 0
    t = torch.as_tensor(timestep, device=timesteps.device).flatten()[0].to(timesteps.dtype)
    hits = (timesteps == t).nonzero()
    return int(hits[0]) if len(hits) else 0


def call_setting(pipe, call_kwargs: dict, name: str):
    """A pipeline argument's value in this call: passed, else stored by the pipeline, else its default."""
    if name in call_kwargs:
        return call_kwargs[name]
    stored = getattr(pipe, f"_{name}", inspect.Parameter.empty)
    if stored is not inspect.Parameter.empty:
        return stored
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def cfg_argument(family: Family) -> str:
    """The argument whose value scales the two-branch combination (true CFG for distilled FLUX.1)."""
    return family.true_cfg_arg if family.calls == DISTILLED and family.true_cfg_arg else family.guidance_arg


# ---------------------------------------------------------------- the recorder


class Recorder:
    """Collects the statistics of the steps of one pipeline call at a time."""

    def __init__(self, pipe, family: Family, paired: bool, on_step: Callable[[], None] | None,
                 observers: Sequence[StepObserver] = (), call_kwargs: dict | None = None,
                 rescale_to_other: bool = False, measure_steps: int | None = None) -> None:
        self.pipe = pipe
        self.rescale_to_other = rescale_to_other
        self.measure_steps = measure_steps
        self.family = family
        self.paired = paired
        self.on_step = on_step
        self.observers = tuple(observers)
        self.call_kwargs = dict(call_kwargs or {})
        self.stat_names = PAIRED_STATS if paired else FREE_STATS
        self._calls: list[_Call] = []
        self._reset_call()

    def _reset_call(self) -> None:
        self._steps: list[dict[str, torch.Tensor]] = []
        self._experts: list[str] = []
        self._verified: set[tuple[str, ...]] = set()
        self._settings: dict[tuple[str, int], dict[str, float]] = {}
        self._sigmas: torch.Tensor | None = None
        self.first_index = 0  # the scheduler index of the first step (img2img / video-to-video skip the first ones)
        self.scheduler_copies = 0  # copies of the scheduler the pipeline made in this call (LTX-2: audio's)
        self._step = 0  # the pipeline step under way
        self._recorded: list[int] = []  # the pipeline steps recorded (all of them unless measure_steps)
        self._plan: set[int] | None = None
        self._skip = False  # --measure-steps: the step under way is not measured (every stream of it)

    def measures_now(self) -> bool:
        """Is the other model evaluated at the step under way (``measure_steps``: K steps across sigma)?"""
        if self.measure_steps is None:
            return True
        if self._plan is None:
            from normscope.measure.subsample import plan_steps

            scheduler = self.pipe.scheduler
            timesteps = getattr(scheduler, "timesteps", None)
            n = len(timesteps) if timesteps is not None else 0
            sigmas = getattr(scheduler, "sigmas", None)
            sigmas = sigmas[:n].detach().float().cpu().numpy() if sigmas is not None else range(n)
            self._plan = set(plan_steps(sigmas, self.measure_steps))
        return self._step in self._plan

    # -- hooks -------------------------------------------------------------------------

    def record_forward(self, expert: str, driver_output, other_output, extra: bool = False, role: str | None = None) -> None:
        names = self.family.streams
        other = _streams(other_output, names) if other_output is not None else None
        self._calls.append(_Call(expert, _streams(driver_output, names), other, EXTRA if extra else role))

    def record_step(self, guided: torch.Tensor, stream: int = 0, sample: torch.Tensor | None = None,
                    sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Close one step of one stream; returns the velocity the scheduler is to apply (``guided``, or it
        rescaled). ``sample`` and ``sigma``: the latents the scheduler steps and its sigma (x0-space rules).

        Multi-stream families (LTX-2) step one scheduler per stream after the step's transformer calls: the calls
        are kept until the last stream has stepped; the first stream's step opens the step's statistics."""
        streams = self.family.streams or ("",)
        if stream >= len(streams):  # a scheduler copy the row does not know: step it, record nothing
            return guided
        calls = self._calls
        if stream == len(streams) - 1:
            self._calls = []
        if not calls or (stream and not self._step):
            raise RunError(f"{type(self.pipe).__name__} stepped its scheduler without calling the transformer: "
                           "normscope cannot follow this pipeline")
        if stream == 0:
            self._skip = self.paired and not self.measures_now()
            if self._skip:  # --measure-steps: the other model skipped this step; nothing of it is recorded
                self._step += 1
                if self.on_step is not None:
                    self.on_step()
        if self._skip:
            return guided
        step = self._step if stream == 0 else self._step - 1  # the pipeline step (its row: the last one opened)
        roles = self._roles(calls, guided.shape[0], stream)
        driver = self._parts(calls, roles, guided, "driver", stream)
        other = self._parts(calls, roles, guided, "other", stream) if self.paired else None
        expert = calls[0].expert
        settings = self._resolve_settings(expert, stream)
        if self.family.combine == LTX2_X0:
            settings = dict(settings, sample=sample.float(), sigma=sigma)
        branches_d = self._branches(driver, settings)
        branches_o = self._branches(other, settings) if other is not None else None
        layout = (expert, str(stream), *sorted(driver))  # each expert and stream has its own guidance: verify each
        if layout not in self._verified:
            self._verify(layout, driver, branches_d[GUIDED], guided, step)
        branches_d[GUIDED] = guided  # the scheduler's own input is what normscope reports for the driver
        stats = {}
        prefix = f"{streams[stream]}{STREAM_SEP}" if stream else ""
        for name, d in branches_d.items():
            o = branches_o[name] if branches_o is not None else None
            stats[prefix + name] = _paired_stats(d, o) if o is not None else _norms(d)[None]
        if stream:
            self._steps[-1].update(stats)
            return _rescaled(guided, branches_o[GUIDED]) if self.rescale_to_other else guided
        self._steps.append(stats)
        self._experts.append(expert)
        self._recorded.append(step)
        self._step += 1
        if self.observers:
            sigma = self._sigma(step)
            for name, d in branches_d.items():
                o = branches_o[name] if branches_o is not None else None
                for observer in self.observers:
                    observer(step, sigma, name, expert, d, o, self.family)
        if self.on_step is not None:
            self.on_step()
        if self.rescale_to_other:
            return _rescaled(guided, branches_o[GUIDED])
        return guided

    # -- one step ----------------------------------------------------------------------

    def _roles(self, calls: list[_Call], batch: int, stream: int = 0) -> list[list[str]]:
        """The branch of every batch slice of every call, read from the family row and the batch sizes."""
        order = self.family.batch_order
        roles, separate = [], [COND, UNCOND]
        for call in calls:
            n = call.driver[stream].shape[0]
            if call.role and n == batch:
                roles.append([call.role])
            elif n == len(order) * batch:
                roles.append(list(order))
            elif n == batch and separate:
                roles.append([separate.pop(0)])
            else:
                roles = None
                break
        flat = [r for rs in roles for r in rs] if roles is not None else []
        if roles is None or len(flat) != len(set(flat)) or COND not in flat:
            sizes = ", ".join(str(c.driver[stream].shape[0]) for c in calls)
            raise RunError(
                f"{type(self.pipe).__name__} called the transformer {len(calls)} time(s) in one step with batches of "
                f"{sizes} for a scheduler batch of {batch}: that is not how the {self.family.name} family calls it "
                f"({self.family.calls}); normscope cannot follow this pipeline"
            )
        return roles

    def _parts(self, calls, roles, guided: torch.Tensor, side: str, stream: int = 0) -> dict[str, torch.Tensor]:
        """Each role's velocity: reference tokens sliced off, in the scheduler's convention, float32."""
        parts = {}
        for call, names in zip(calls, roles, strict=True):
            v = call.driver[stream] if side == "driver" else call.other[stream]
            if self.family.reference_tokens and v.dim() > 2 and v.shape[1] > guided.shape[1]:
                n = guided.shape[1]
                v = v[:, -n:] if self.family.token_slice == "last" else v[:, :n]
            v = v.float()
            if self.family.output_sign < 0:
                v = -v
            for name, chunk in zip(names, v.chunk(len(names)), strict=True):
                parts[name] = chunk
        return parts

    def _branches(self, parts: dict[str, torch.Tensor], settings: dict[str, float]) -> dict[str, torch.Tensor]:
        if UNCOND not in parts and (len(parts) == 1 or self.family.combine != LTX2_X0):
            return {GUIDED: parts[COND]}  # one call, no CFG: the scheduler receives the (sign-corrected) output
        out = RULES[self.family.combine](parts, settings)
        # LTX-2 without CFG but with its STG / modality calls: guided and cond (the extra calls are followed only)
        return {GUIDED: out[GUIDED], COND: parts[COND], **({UNCOND: parts[UNCOND]} if UNCOND in parts else {}),
                **({COMBINED: out[COMBINED]} if COMBINED in out else {})}

    def _resolve_settings(self, expert: str, stream: int = 0) -> dict[str, float]:
        """The combination settings of one expert's (and stream's) steps (read once per call, expert and stream)."""
        if (expert, stream) not in self._settings:
            f = self.family
            prefix = dict(f.stream_prefix).get(f.streams[stream], "") if stream else ""

            def value(name):
                v = call_setting(self.pipe, self.call_kwargs, name) if name else None
                v = float(v) if v is not None else None
                if prefix and name:  # LTX-2: the audio stream's setting, the video's when unset or 0
                    own = call_setting(self.pipe, self.call_kwargs, prefix + name)
                    v = float(own) if own else v
                return v

            scale = value(dict(f.expert_guidance).get(expert)) if expert else None
            if scale is None:  # no per-expert argument, or left unset: the pipeline uses the main scale
                scale = value(cfg_argument(f))
            settings = {"scale": scale or 0.0, "extra_scale": value(f.extra_scale_arg) or 0.0, "cap": value(f.cap_arg) or 0.0}
            settings.update({key: value(argument) or 0.0 for key, argument in f.rule_args})
            self._settings[(expert, stream)] = settings
        return self._settings[(expert, stream)]

    def _verify(self, layout, parts, expected: torch.Tensor, guided: torch.Tensor, step: int) -> None:
        # One host sync per layout: the rule normscope applies to the other model is the one the pipeline
        # applied to the driver. Non-finite samples are left out first, so NaN is never blamed on the rule.
        float32 = guided.dtype == torch.float32
        guided = guided.float()
        ok = _finite_rows(guided, expected, *parts.values())
        if not bool(ok.any()):
            return  # nothing finite to check yet: try again at the next step
        exp, got = expected[ok], guided[ok]
        if exp.shape != got.shape:
            raise RunError(
                f"{type(self.pipe).__name__} passed the scheduler a velocity of shape {tuple(guided.shape)} but the "
                f"{self.family.name} row gives {tuple(expected.shape)}: normscope cannot follow this pipeline"
            )
        tol = 1e-4 if float32 and self._dtype_is_float32() else 2e-2  # bf16/fp16 models: the pipeline combined in low precision
        err = (exp - got).abs().max() / got.abs().max().clamp_min(1e-12)
        if not bool(err <= tol):
            if UNCOND in parts:
                rule = f"the {self.family.combine} rule (scale {self._settings[(layout[0], int(layout[1]))]['scale']})"
                what = "combines its transformer calls differently from " + rule
            else:
                sign = "the negated" if self.family.output_sign < 0 else "the"
                what = f"does not pass {sign} transformer output to its scheduler"
            raise RunError(
                f"{type(self.pipe).__name__} ({self.family.name} family) {what} (relative error {float(err):.2e} at step "
                f"{step}): normscope cannot follow this pipeline"
            )
        self._verified.add(layout)

    def _dtype_is_float32(self) -> bool:
        for attr, _ in self.family.experts:
            module = getattr(self.pipe, attr, None)
            if module is not None:
                return getattr(module, "dtype", torch.float32) == torch.float32
        return True

    def _sigma(self, step: int) -> float:
        if self._sigmas is None:
            sigmas = getattr(self.pipe.scheduler, "sigmas", None)
            self._sigmas = sigmas.detach().float().cpu() if sigmas is not None else torch.empty(0)
        step += self.first_index
        return float(self._sigmas[step]) if step < self._sigmas.numel() else float("nan")

    # -- results -----------------------------------------------------------------------

    def collect(self) -> CallRecord:
        """Close the pipeline call just made and bring its statistics to the CPU (one transfer)."""
        if not self._steps:
            raise RunError(f"{type(self.pipe).__name__} made no scheduler step: check --steps and the pipeline")
        streams = self.family.streams or ("",)
        prefixes = [""] + [f"{name}{STREAM_SEP}" for name in streams[1:]]
        names = [p + b for p in prefixes for b in BRANCHES if any(p + b in s for s in self._steps)]
        template = self._steps[0][GUIDED]
        stats = {}
        for name in names:
            # A step without CFG (Z-Image past cfg_truncation) made one call: its velocity is the cond one.
            p = name[: name.index(STREAM_SEP) + 1] if STREAM_SEP in name else ""
            items = [s.get(name, s[p + GUIDED] if name == p + COND and p + UNCOND not in s
                           else torch.full_like(template, float("nan"))) for s in self._steps]
            stats[name] = torch.stack(items).cpu()
        scheduler = self.pipe.scheduler
        recorded = torch.tensor(self._recorded, dtype=torch.long)
        index = recorded + self.first_index  # the scheduler's index of each recorded step
        timesteps = getattr(scheduler, "timesteps", None)
        sigmas = getattr(scheduler, "sigmas", None)
        record = CallRecord(
            stats=stats,
            stat_names=self.stat_names,
            timesteps=timesteps.detach().float().cpu()[index] if timesteps is not None else recorded.float(),
            sigmas=(sigmas.detach().float().cpu()[index] if sigmas is not None
                    else torch.full((len(index),), float("nan"))),
            experts=list(self._experts),
            stream=streams[0],
            step_index=recorded if self.measure_steps is not None else None,
        )
        for observer in self.observers:
            if hasattr(observer, "collect"):
                record.observed[observer.name] = observer.collect()
        self._reset_call()
        return record


@contextlib.contextmanager
def capture(
    pipe,
    driver: VelocityModel,
    other: VelocityModel | None = None,
    on_step: Callable[[], None] | None = None,
    *,
    family: Family | None = None,
    call_kwargs: dict | None = None,
    observers: Sequence[StepObserver] = (),
    rescale_to_other: bool = False,
    measure_steps: int | None = None,
) -> Iterator[Recorder]:
    """Make ``driver`` sample in ``pipe`` and record velocity statistics of every step.

    With ``other``, each of the driver's transformer calls is repeated with the other model on the
    same inputs (paired mode). ``family`` defaults to the row of the pipeline's class; ``call_kwargs``
    are the keyword arguments of the pipeline call (guidance values are read from them, else from the
    pipeline); ``observers`` see every branch of every step (``StepObserver``). Hooks and the scheduler
    wrapper are removed when the block exits, whatever happens inside it.

    ``rescale_to_other`` (paired mode; the inference-rescale ablation): before the scheduler applies the
    driver's guided velocity, each sample is rescaled to the norm of the other model's guided velocity on the
    same inputs. The statistics recorded are those of the unscaled velocities.
    """
    if rescale_to_other and other is None:
        raise ValueError("rescale_to_other needs the other model (paired mode): pass other=")
    family = family or family_for(type(pipe).__name__)
    recorder = Recorder(pipe, family, paired=other is not None, on_step=on_step, observers=observers,
                        call_kwargs=call_kwargs, rescale_to_other=rescale_to_other,
                        measure_steps=measure_steps)
    scheduler = pipe.scheduler
    inside_other = False

    # Keyword state the transformer writes (Qwen-Image-2.1's KV cache): the other model's own copy per object,
    # taken before the driver's first call with it (empty then), keyed by the driver's object.
    # The driver's object is kept with its copy, so its id cannot be reused by another object while capture runs.
    private: dict[int, tuple[object, object]] = {}

    def pre_hook(module, args, kwargs):
        if not inside_other:
            for name in family.private_state_kwargs:
                state = kwargs.get(name)
                if state is not None and id(state) not in private:
                    private[id(state)] = (state, copy.deepcopy(state))
        return None

    def own_state(kwargs):
        if not family.private_state_kwargs:
            return kwargs
        return {k: private[id(v)][1] if k in family.private_state_kwargs and id(v) in private else v
                for k, v in kwargs.items()}

    def hook_for(attr: str, expert: str):
        def forward_hook(module, args, kwargs, output):
            nonlocal inside_other
            if inside_other:  # the other model may be this very module (an adapter switched off)
                return None
            other_output = None
            if other is not None and recorder.measures_now():
                inside_other = True
                try:
                    other_output = _evaluate(other, attr, args, own_state(kwargs))
                finally:
                    inside_other = False
            extra = bool(family.extra_call_kwarg) and kwargs.get(family.extra_call_kwarg) is not None
            role = next((r for k, r in family.call_markers if kwargs.get(k) not in (None, False)), None)
            recorder.record_forward(expert, output, other_output, extra, role)
            return None
        return forward_hook

    original_step = scheduler.step
    had_own_step = "step" in vars(scheduler)
    own_step = vars(scheduler).get("step")
    step = _SchedulerStep(recorder, scheduler, original_step, 0)

    def restore_step() -> None:
        if had_own_step:
            scheduler.step = own_step
        elif "step" in vars(scheduler):
            del scheduler.step

    with contextlib.ExitStack() as stack:
        stack.enter_context(driver.active(pipe))
        hooked = set()
        present = [(attr, label) for attr, label in family.experts if getattr(pipe, attr, None) is not None]
        for attr, label in present:
            module = getattr(pipe, attr)
            if id(module) in hooked:
                continue
            hooked.add(id(module))
            # Labels say which of several transformers ran; with one present (Wan2.1 in the Wan row) there is none.
            handle = module.register_forward_hook(hook_for(attr, label if len(present) > 1 else ""), with_kwargs=True)
            stack.callback(handle.remove)
            if family.private_state_kwargs and other is not None:
                stack.callback(module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        scheduler.step = step
        stack.callback(restore_step)
        yield recorder
