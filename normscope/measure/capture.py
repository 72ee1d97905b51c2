"""Capture stage: hooks that record per-step, per-sample velocity statistics during a pipeline call.

Nothing here knows a pipeline class. Two hooks see everything that matters:

* a forward hook on the transformer records each model output of the step (and, in paired mode,
  evaluates the second model on exactly the same positional and keyword inputs);
* a wrapper on ``scheduler.step`` receives the velocity that the sampler actually applies
  ("guided"), which closes the step.

Classifier-free guidance is recognised from the shapes: one transformer call whose batch is twice
the scheduler's is the concatenated ``[uncond, cond]`` batch of SD3-style pipelines; the second
model's guided velocity is formed with the pipeline's own ``guidance_scale``, and the formula is
checked against the driver's guided velocity on the first step.

Statistics stay on the model's device in float32 until the call ends; one transfer per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from normscope.errors import RunError
from normscope.load import VelocityModel

GUIDED, COND, UNCOND = "guided", "cond", "uncond"
BRANCHES = (GUIDED, COND, UNCOND)
# Rows of the per-step statistics tensor.
FREE_STATS = ("norm",)
PAIRED_STATS = ("norm_driver", "norm_other", "cosine", "mse")


@dataclass
class CallRecord:
    """Everything captured from one pipeline call (one batch of samples), on the CPU.

    ``stats[branch]`` has shape (steps, len(stat_names), batch).
    """

    stats: dict[str, torch.Tensor]
    stat_names: tuple[str, ...]
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    images: list | None = None  # decoded final images, when the call asked for them (not stored for resume)

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def _sample(output):
    """The velocity tensor from whatever the transformer returned (tuple or output dataclass)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "sample", output)


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


class Recorder:
    """Collects the statistics of the steps of one pipeline call at a time."""

    def __init__(self, pipe, paired: bool, on_step: Callable[[], None] | None, observers=()) -> None:
        self.pipe = pipe
        self.observers = tuple(observers)
        self.paired = paired
        self.on_step = on_step
        self.stat_names = PAIRED_STATS if paired else FREE_STATS
        self._driver_outputs: list[torch.Tensor] = []
        self._other_outputs: list[torch.Tensor] = []
        self._steps: dict[str, list[torch.Tensor]] = {}
        self._checked = False

    # -- hooks -------------------------------------------------------------------------

    def record_forward(self, driver_output, other_output) -> None:
        self._driver_outputs.append(_sample(driver_output))
        if other_output is not None:
            self._other_outputs.append(_sample(other_output))

    def record_step(self, guided: torch.Tensor) -> None:
        driver = self._driver_outputs
        other = self._other_outputs
        self._driver_outputs, self._other_outputs = [], []
        if len(driver) != 1:
            raise RunError(
                f"{type(self.pipe).__name__} called the transformer {len(driver)} times in one step "
                "(true CFG or skip-layer guidance): normscope follows one call per step; turn that option off"
            )
        batch = guided.shape[0]
        out = driver[0]
        branches: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if out.shape[0] == batch:
            branches[GUIDED] = (guided, other[0] if self.paired else None)
        elif out.shape[0] == 2 * batch:
            scale = float(self.pipe.guidance_scale)
            uncond, cond = out.chunk(2)
            if not self._checked:
                self._check_guidance(uncond, cond, guided, scale)
            if self.paired:
                o_uncond, o_cond = other[0].chunk(2)
                o_guided = o_uncond + scale * (o_cond - o_uncond)
            else:
                o_uncond = o_cond = o_guided = None
            branches = {GUIDED: (guided, o_guided), COND: (cond, o_cond), UNCOND: (uncond, o_uncond)}
        else:
            raise RunError(
                f"the transformer returned a batch of {out.shape[0]} for a scheduler batch of {batch}: "
                "normscope recognises no CFG layout here"
            )
        step_index = len(self._steps.get(GUIDED, ()))
        for name, (d, o) in branches.items():
            stats = _paired_stats(d, o) if self.paired else _norms(d)[None]
            self._steps.setdefault(name, []).append(stats)
            for observer in self.observers:
                observer(step_index, float(self.pipe.scheduler.sigmas[step_index]), name, None, d, o, None)
        if self.on_step is not None:
            self.on_step()

    def _check_guidance(self, uncond, cond, guided, scale: float) -> None:
        # One host sync per capture: proves the CFG formula normscope applies to the second model is the
        # one the pipeline applied to the first.
        expected = uncond.float() + scale * (cond.float() - uncond.float())
        tol = 1e-4 if guided.dtype == torch.float32 else 2e-2
        err = (expected - guided.float()).abs().max() / guided.float().abs().max().clamp_min(1e-12)
        if not bool(err <= tol):
            raise RunError(
                f"{type(self.pipe).__name__} combines the CFG batch differently from uncond + "
                f"{scale} * (cond - uncond) (relative error {float(err):.2e}): normscope cannot follow this pipeline"
            )
        self._checked = True

    # -- results -----------------------------------------------------------------------

    def collect(self) -> CallRecord:
        """Close the pipeline call just made and bring its statistics to the CPU (one transfer)."""
        if not self._steps:
            raise RunError(f"{type(self.pipe).__name__} made no scheduler step: check --steps and the pipeline")
        stats = {name: torch.stack(items).cpu() for name, items in self._steps.items()}
        scheduler = self.pipe.scheduler
        steps = next(iter(stats.values())).shape[0]
        record = CallRecord(
            stats=stats,
            stat_names=self.stat_names,
            timesteps=scheduler.timesteps[:steps].detach().float().cpu(),
            sigmas=scheduler.sigmas[:steps].detach().float().cpu(),
        )
        self._steps = {}
        return record


@contextlib.contextmanager
def capture(
    pipe,
    driver: VelocityModel,
    other: VelocityModel | None = None,
    on_step: Callable[[], None] | None = None,
    observers=(),
) -> Iterator[Recorder]:
    """Make ``driver`` sample in ``pipe`` and record velocity statistics of every step.

    With ``other``, each of the driver's transformer calls is repeated with the other model on the
    same inputs (paired mode). Hooks and the scheduler wrapper are removed when the block exits,
    whatever happens inside it.
    """
    recorder = Recorder(pipe, paired=other is not None, on_step=on_step, observers=observers)
    scheduler = pipe.scheduler
    inside_other = False

    def forward_hook(module, args, kwargs, output):
        nonlocal inside_other
        if inside_other:  # the other model may be this very module (an adapter switched off)
            return None
        other_output = None
        if other is not None:
            inside_other = True
            try:
                other_output = other(*args, **kwargs)
            finally:
                inside_other = False
        recorder.record_forward(output, other_output)
        return None

    original_step = scheduler.step

    def step(model_output, *args, **kwargs):
        recorder.record_step(model_output)
        return original_step(model_output, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(driver.active(pipe))
        handle = pipe.transformer.register_forward_hook(forward_hook, with_kwargs=True)
        stack.callback(handle.remove)
        scheduler.step = step
        stack.callback(lambda: scheduler.__dict__.pop("step", None))
        yield recorder
