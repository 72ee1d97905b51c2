"""The check job (``normscope check``): a pass/fail gate on inflation for CI.

Two ways to get the base side:

* live: ``check BASE TUNED... --max-inflation X`` runs compare for each TUNED;
* stored: ``check TUNED... --reference DIR`` runs ONLY the tuned model with the reference's stored
  config (half the compute) and compares its free-mode norms with the stored base norms per
  (prompt, seed, step). Options that contradict the stored config are refused.

Verdict per checkpoint: ``error`` if any velocity was non-finite or the model collapsed (inflation below
``min_inflation``, default -50 %: a broken checkpoint, not a pass), ``fail`` if inflation > the gate or above
the plausible +100 % (an explosion, said to be implausible), else ``pass``. Exit code: 3 if any error, else 1 if
any fail, else 0 (2 for bad input, raised earlier: a damaged reference included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from normscope.commands.compare import CompareResult, compare, stream_rows, stream_summary, summarize
from normscope.commands.profile import (
    PROBE_FIELDS,
    Reference,
    base_weights_fingerprint,
    load_reference,
    probe_from_reference,
)
from normscope.commands.reference_schema import MAX_INFLATION_HIGH, MAX_INFLATION_LOW, gate_in_range
from normscope.config import (
    FAMILY_SETTINGS,
    HEADLINE_ESTIMATE,
    CompareConfig,
    Device,
    DType,
    FamilySettings,
    Mode,
    check_finite,
    check_probe_values,
    check_seeds,
    check_video_settings,
    parse_seeds,
)
from normscope.errors import EXIT_INFLATED, EXIT_OK, EXIT_RUN, ConfigError, InputError, NoMeasurementError
from normscope.load import AdapterModel, find_checkpoint, load_pipeline, load_tuned_only, resolve_dtype
from normscope.load.device_memory import check_run_fits, parse_size
from normscope.load.lora import detach_lora
from normscope.load.models import check_fit_before_load
from normscope.load.pipeline import place_denoiser
from normscope.measure.prompt_cache import prepare_prompts
from normscope.measure.sampling import (
    Reporter,
    SilentReporter,
    prompt_batches,
    resolve_run_device,
    resolved_sampling,
    run_model_batches,
)
from normscope.measure.sanity import COLLAPSED, EXPLODED, MAX_PLAUSIBLE_INFLATION, MIN_INFLATION, sanity
from normscope.measure.sequential import ABOVE, BELOW, Sequential, run_until_decided, seed_major_order
from normscope.measure.table import STREAM, free_frame, tidy
from normscope.measure.truncation import report_truncation
from normscope.runfolder.fingerprint import pipeline_fingerprint

PASS, FAIL, ERROR = "pass", "fail", "error"


@dataclass(kw_only=True)
class CheckConfig(FamilySettings):
    """``normscope check``. Without ``reference``, ``paths`` is BASE then one or more TUNED; with it, all TUNED.

    Probe fields left ``None`` take compare's defaults (live) or the reference's values (stored); set
    ones must agree with the reference.
    """

    paths: tuple[str, ...]
    reference: Path | None = None
    max_inflation: float | None = None
    min_inflation: float = MIN_INFLATION  # below it the model collapsed: an error verdict, never a pass
    pipeline: str | None = None
    adapter: str | None = None
    allow_pickle: bool = False
    prompts_file: Path | None = None
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    true_cfg_scale: float | None = None
    preset: str | None = None
    num_frames: int | None = None
    mode: Mode = Mode.paired
    dtype: DType = DType.auto
    device: Device = Device.auto
    batch_size: int = 8
    max_device_memory: str | None = None  # e.g. "40GiB"; default: the device's free memory (no check on the CPU)
    max_grid_score: float | None = None
    until_decided: bool = False  # stop each checkpoint once the anytime-valid interval is wholly above or below the gate
    stream: str | None = None  # issue 19: multi-stream families (LTX-2): the stream gated on (default: the first)

    def __post_init__(self) -> None:
        parse_size(self.max_device_memory)  # a bad size fails here, before anything loads
        self.paths = tuple(str(p) for p in self.paths)
        self.prompts = tuple(self.prompts)
        self.mode = Mode(self.mode)
        self.dtype, self.device = DType(self.dtype), Device(self.device)  # the API takes strings, like every config
        if self.seeds is not None:
            self.seeds = parse_seeds(self.seeds) if isinstance(self.seeds, str) else check_seeds(self.seeds)
        for name in ("max_inflation", "max_grid_score"):
            check_finite(name, getattr(self, name))
        check_probe_values(self)
        check_video_settings(self)
        if self.reference is None and len(self.paths) < 2:
            raise ConfigError("normscope check needs BASE and TUNED, or TUNED with --reference DIR")
        if self.reference is not None and not self.paths:
            raise ConfigError("normscope check --reference needs at least one TUNED checkpoint")
        if self.reference is None and self.max_inflation is None:
            raise ConfigError("a live check needs --max-inflation (e.g. 0.05), or --reference DIR to use its suggested gate")
        if self.max_inflation is not None and not gate_in_range(self.max_inflation):
            raise ConfigError(f"--max-inflation {self.max_inflation} is a fraction (0.05 = 5 %) from "
                              f"{MAX_INFLATION_LOW:g} up to {MAX_INFLATION_HIGH:g}, not a percentage")
        if not -1 <= self.min_inflation < 0:  # False for NaN
            raise ConfigError(f"--min-inflation {self.min_inflation} is a negative fraction from -1 up to 0 (-0.5 = the "
                              "tuned velocity at half the base's counts as a collapse; -1 turns the check off)")
        if self.reference is not None and self.preset is not None:
            raise ConfigError("--preset does not apply with --reference: the stored probe settings are used")
        if self.reference is not None and self.mode is not Mode.paired:
            raise ConfigError("--mode does not apply with --reference: a stored-reference check is free mode by construction")
        if self.until_decided and (self.max_grid_score is not None or self.mode is Mode.both):
            raise ConfigError("--until-decided decides on one mode and the inflation gate only: drop --max-grid-score "
                              "and --mode both")
        if self.max_grid_score is not None:
            if self.max_grid_score <= 0:
                raise ConfigError(f"--max-grid-score must be positive, got {self.max_grid_score}: 1 means no excess at the patch frequency, try e.g. 3")
            if self.reference is not None or self.mode is Mode.free:
                raise ConfigError("--max-grid-score needs both models' velocities on the same inputs: run a live check "
                                  "(BASE TUNED ...) in paired mode, without --reference")

    def set_probe(self) -> dict:
        """The probe options the user set explicitly."""
        values = {"prompts_file": self.prompts_file, "prompts": self.prompts or None, "seeds": self.seeds,
                  "steps": self.steps, "guidance": self.guidance, "height": self.height, "width": self.width,
                  "negative_prompt": self.negative_prompt, "max_sequence_length": self.max_sequence_length,
                  "true_cfg_scale": self.true_cfg_scale, "preset": self.preset, "num_frames": self.num_frames}
        values.update({name: getattr(self, name) for name in FAMILY_SETTINGS})
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class CheckedCheckpoint:
    path: str
    verdict: str
    inflation: float | None
    inflation_ci: list
    nonfinite: int
    seconds: float
    summary: dict = field(repr=False)
    sanity: str | None = None  # "collapsed" or "exploded": a broken checkpoint, whatever the gate says

    @property
    def grid_score(self) -> float | None:
        return (self.summary.get("maps") or {}).get("grid_score")

    @property
    def sequential(self) -> dict | None:
        return self.summary.get("sequential")

    @property
    def stream(self) -> str | None:
        """The stream gated on (multi-stream families, LTX-2); None for one-stream families."""
        return self.summary.get("stream")

    @property
    def other_streams(self) -> dict[str, dict]:
        """The streams not gated on: their inflation and CI, reported, never gated."""
        return {name: {"inflation": part["inflation"], "inflation_ci": part["inflation_ci"]}
                for name, part in (self.summary.get("by_stream") or {}).items() if name != self.stream}

    def to_dict(self) -> dict:
        out = {"path": self.path, "verdict": self.verdict, "inflation": self.inflation,
               "inflation_ci": self.inflation_ci, "nonfinite": self.nonfinite, "sanity": self.sanity,
               "seconds": round(self.seconds, 3), "samples_used": self.summary.get("samples_used"),
               "samples_planned": self.summary.get("samples_planned")}
        if self.stream is not None:  # issue 19: the stream gated on, and the others' numbers
            out["stream"] = self.stream
            out["other_streams"] = self.other_streams
        if self.sequential is not None:
            out["sequential"] = {k: self.sequential[k] for k in ("decision", "decided", "close", "cs", "alpha", "method")}
        if "maps" in self.summary:
            out["grid_score"] = self.grid_score
            out["grid_score_ci"] = self.summary["maps"]["grid_score_ci"]
        return out


@dataclass
class CheckResult:
    checkpoints: list[CheckedCheckpoint]
    max_inflation: float
    gate_source: str
    mode: str
    max_grid_score: float | None = None
    min_inflation: float = MIN_INFLATION
    stream: str | None = None  # the stream gated on (multi-stream families); None for one-stream families

    @property
    def exit_code(self) -> int:
        verdicts = {c.verdict for c in self.checkpoints}
        return EXIT_RUN if ERROR in verdicts else EXIT_INFLATED if FAIL in verdicts else EXIT_OK

    def to_dict(self) -> dict:
        return {"verdict": {EXIT_OK: PASS, EXIT_INFLATED: FAIL, EXIT_RUN: ERROR}[self.exit_code],
                "exit_code": self.exit_code, "max_inflation": self.max_inflation, "gate_source": self.gate_source,
                "min_inflation": self.min_inflation, "max_plausible_inflation": MAX_PLAUSIBLE_INFLATION,
                "estimate": HEADLINE_ESTIMATE, "max_grid_score": self.max_grid_score,
                "mode": self.mode, **({"stream": self.stream} if self.stream is not None else {}),
                "checkpoints": [c.to_dict() for c in self.checkpoints]}


def verdict(summary: dict, gate: float, max_grid_score: float | None = None, min_inflation: float = MIN_INFLATION) -> str:
    """error: non-finite velocities, or a collapse (inflation below ``min_inflation``); fail: an explosion (above
    +100 %), inflation above the gate, or the grid score above its gate; else pass."""
    if summary["nonfinite"] or summary["inflation"] is None:
        return ERROR
    status = sanity(summary["inflation"], min_inflation)
    if status == COLLAPSED:
        return ERROR
    if status == EXPLODED:
        return FAIL
    grid = (summary.get("maps") or {}).get("grid_score")
    if max_grid_score is not None and grid is not None and grid > max_grid_score:
        return FAIL
    decided = (summary.get("sequential") or {}).get("decision")
    if decided in (ABOVE, BELOW) and summary["sequential"].get("gate") == gate:  # the anytime-valid interval decided
        return FAIL if decided == ABOVE else PASS
    return FAIL if summary["inflation"] > gate else PASS


def _contradictions(reference: Reference, config: CheckConfig) -> list[str]:
    from normscope.measure.prompts import resolve_prompts

    stored = reference.probe
    problems = []
    for name, value in config.set_probe().items():
        if name in ("prompts_file", "prompts"):
            continue
        stored_value = stored.get(name)
        if isinstance(value, tuple):
            value = list(value)
        if value != stored_value:
            problems.append(f"--{name.replace('_', '-')} {value} (reference: {stored_value})")
    if config.prompts_file is not None or config.prompts:
        from normscope.runfolder.fingerprint import prompts_digest

        if prompts_digest(resolve_prompts(config.prompts_file, config.prompts)) != reference.meta["hashes"]["prompts"]:
            problems.append("the prompts (they differ from the reference's)")
    return problems


def _check_stored(config: CheckConfig, reporter: Reporter) -> tuple[list[CheckedCheckpoint], float, str]:
    reference = load_reference(config.reference)
    problems = _contradictions(reference, config)
    if problems:
        raise ConfigError(f"options contradict the reference in {config.reference}: {'; '.join(problems)} — drop them or make a new reference")
    source = config.pipeline or reference.meta["config"]["pipeline_source"]
    if pipeline_fingerprint(source) != reference.meta["hashes"]["pipeline"]:
        raise InputError(f"pipeline {source} is not the one the reference in {config.reference} was made with (fingerprints differ): pass that pipeline with --pipeline")
    stream = _stored_stream(reference, source, config)
    for path in config.paths:
        ckpt = find_checkpoint(path, "TUNED", config.adapter, config.allow_pickle)
        _refuse_other_base(ckpt, source, reference, config)
        check_fit_before_load(source, ckpt, "TUNED")
    gate, gate_source = (config.max_inflation, "--max-inflation") if config.max_inflation is not None else (
        reference.gate_for(stream), f"the reference's suggested gate ({config.reference})")
    device, kind = resolve_run_device(config.device)
    dtype = resolve_dtype(config.dtype, kind)
    probe = probe_from_reference(reference, config.device, config.dtype, config.batch_size)
    reporter.begin(len(config.paths) * -(-len(reference.samples()) // probe.batch_size) * probe.steps)
    if str(dtype).removeprefix("torch.") != reference.meta["config"]["torch_dtype"]:
        reporter.note(f"running in {dtype} but the reference was made in {reference.meta['config']['torch_dtype']}: "
                      "the difference is part of what is measured (see the reference's dtype noise floor)")
    results = []
    for path in config.paths:
        started = time.perf_counter()
        _, summary = measure_against_reference(source, path, reference, probe, dtype, device, reporter,
                                               config.adapter, config.allow_pickle,
                                               max_device_memory=config.max_device_memory, stream=stream,
                                               until_decided=gate if config.until_decided else None)
        results.append(_checked(path, summary, gate, started, min_inflation=config.min_inflation))
    return results, gate, gate_source, stream


def _stored_stream(reference: Reference, source: str, config: CheckConfig) -> str | None:
    """The stream to gate on (``--stream``, default the headline), checked against the family row and against
    the streams the reference holds (one made before normscope stored streams holds the headline only)."""
    from normscope.load.pipeline import check_stream, family_of_source, headline_stream

    family = family_of_source(source)
    stream = check_stream(family, config.stream)
    if stream is not None and stream != headline_stream(family) and not reference.holds(stream):
        held = ", ".join(reference.streams or [headline_stream(family)])
        raise InputError(f"--stream {stream}: the reference in {config.reference} holds the {held} stream only (made "
                         f"before normscope stored every stream): make a new one with normscope profile BASE --out DIR, "
                         f"or drop --stream")
    return stream


def _refuse_other_base(ckpt, source: str, reference: Reference, config: CheckConfig) -> None:
    """A LoRA is attached to the pipeline's own transformer: that must be the base the reference measured.

    Full checkpoints replace every weight of the transformer, so the pipeline's base does not enter.
    """
    recorded = reference.meta["hashes"].get("weights")
    if not ckpt.is_lora or recorded is None:
        return
    used = base_weights_fingerprint(source)
    if used != recorded:
        raise InputError(
            f"TUNED {ckpt.given} is a LoRA attached to the transformer of {source}, but the reference in "
            f"{config.reference} was made with other base weights (fingerprints differ): pass the base's pipeline "
            "with --pipeline, or make a reference of this base with normscope profile")


def measure_against_reference(source: str, tuned: str, reference: Reference, probe, dtype, device: str,
                              reporter: Reporter, adapter: str | None = None, allow_pickle: bool = False, pipe=None,
                              cache_dir: Path | None = None, max_device_memory: str | None = None,
                              stream: str | None = None, until_decided: float | None = None):
    """Run ONLY the tuned model with the reference's probe; free-mode frame and summary against the stored base.

    The prompts are encoded first (or found in ``cache_dir``), then a pipeline without text encoders runs the
    tuned transformer. ``stream`` (multi-stream families): the stream of the headline, default the first; every
    stream the reference holds is in the frame and in ``by_stream``. Pass ``pipe`` to reuse a pipeline across checkpoints (sweeps): full weights overwrite
    its transformer, a LoRA is attached for this call and removed again. Before the transformer goes on the
    device the run is checked against ``max_device_memory`` (one transformer: the base is not loaded).
    ``until_decided`` (a gate): the samples run seed-major, and the run stops at the first batch after which the
    anytime-valid interval of the gated stream is wholly above or below the gate (``measure.sequential``).
    """
    samples = reference.samples()
    rule = Sequential(gate=until_decided) if until_decided is not None else None
    order = seed_major_order(samples) if rule is not None else samples
    prompts = prepare_prompts(source, prompt_batches(order, probe.batch_size), probe, dtype, device, cache_dir,
                              pipe=pipe)
    if pipe is None:
        pipe = load_pipeline(source, dtype, device, parts="denoiser" if prompts is not None else "all", place=False)
    tuned_model, ckpt, notes = load_tuned_only(pipe, tuned, adapter, allow_pickle)
    try:
        check_run_fits(pipe, probe, device, max_device_memory, prompts)
        place_denoiser(pipe, device)
        for note in notes:
            reporter.note(note)
        if rule is None:
            record = run_model_batches(pipe, tuned_model, probe, samples, reporter, prompts)
            frame, used = tidy([free_frame(reference.record(), record, samples)]), len(samples)
        else:
            frame, used = _until_decided(pipe, tuned_model, probe, reference, samples, order, rule, reporter, prompts,
                                         stream)
        resolved = resolved_sampling(pipe, probe)  # what was sampled (the scheduler's shift too), as compare records
    finally:
        report_truncation(reporter)
        if isinstance(tuned_model, AdapterModel):
            detach_lora(tuned_model.module)
    compare_like = CompareConfig(tuned=tuned, mode=Mode.free, **{k: getattr(probe, k) for k in PROBE_FIELDS if k != "prompts_file"})
    summary = summarize(stream_rows(frame, stream), compare_like,
                        {"reference": reference.meta["hashes"], "checkpoint": ckpt.describe(), "notes": notes,
                         "resolved": resolved})
    if STREAM in frame.columns:  # LTX-2: every stream the reference holds, the headline the one gated on
        summary.update(stream_summary(frame, compare_like, stream))
    summary["samples_used"], summary["samples_planned"] = used, len(samples)  # fixed design: used == planned
    if rule is not None:
        summary["sequential"] = rule.summary(used, len(samples))
    return frame, summary


def _until_decided(pipe, tuned_model, probe, reference: Reference, samples: list, order: list, rule: Sequential,
                   reporter, prompts, stream: str | None):
    """The tuned model over ``order`` (``samples`` seed-major) batch by batch against the stored base, until ``rule``
    decides on ``stream``; (the frame of the batches run, the samples used)."""
    import torch

    from normscope.load.scheduler_shift import shifted_scheduler
    from normscope.measure.capture import CallRecord
    from normscope.measure.distributed import current_processes
    from normscope.measure.sampling import batches, run_model, sampling_kwargs

    base = reference.record()
    position = {(s.prompt_id, s.seed): i for i, s in enumerate(samples)}  # each sample's place in the stored base
    groups = list(batches(order, probe.batch_size))
    parts = []

    def measure(mode, index):
        return run_model(pipe, tuned_model, sampling_kwargs(pipe, probe, groups[index], prompts=prompts), reporter), None

    def keep(mode, index, record, extra):
        where = torch.tensor([position[(s.prompt_id, s.seed)] for s in groups[index]])
        stored = CallRecord({b: v[..., where] for b, v in base.stats.items()}, base.stat_names, base.timesteps,
                            base.sigmas, stream=base.stream)
        parts.append(free_frame(stored, record, groups[index]))
        return stream_rows(parts[-1], stream)  # the rule decides on the gated stream

    seeds = list(dict.fromkeys(s.seed for s in order))
    with shifted_scheduler(pipe, getattr(probe, "shift", None)):  # --shift, as run_model_batches applies it
        used = run_until_decided(rule, "free", groups, measure, keep, current_processes(), seeds, reporter)
    return tidy(parts), used


def _checked(path: str, summary: dict, gate: float, started: float, max_grid_score: float | None = None,
             min_inflation: float = MIN_INFLATION) -> CheckedCheckpoint:
    status = None if summary["nonfinite"] else sanity(summary["inflation"], min_inflation)
    return CheckedCheckpoint(path, verdict(summary, gate, max_grid_score, min_inflation), summary["inflation"],
                             summary["inflation_ci"], summary["nonfinite"], time.perf_counter() - started, summary, status)


def _check_live(config: CheckConfig, reporter: Reporter) -> list[CheckedCheckpoint]:
    base, tuned_paths = config.paths[0], config.paths[1:]
    for path in tuned_paths:  # every checkpoint before the first run: a broken last one fails in a second, not after the others
        find_checkpoint(path, "TUNED", config.adapter, config.allow_pickle)
    probe = {k: v for k, v in config.set_probe().items()}
    results = []
    for path in tuned_paths:
        started = time.perf_counter()
        try:
            result: CompareResult = compare(CompareConfig(
                base=base, tuned=path, pipeline=config.pipeline, adapter=config.adapter, allow_pickle=config.allow_pickle,
                mode=config.mode, dtype=config.dtype, device=config.device, batch_size=config.batch_size,
                max_device_memory=config.max_device_memory, maps=config.max_grid_score is not None,
                until_decided=config.max_inflation if config.until_decided else None, stream=config.stream, **probe,
            ), reporter)
        except NoMeasurementError as exc:  # one checkpoint measured nothing: an ERROR verdict, the others still run
            reporter.note(f"{path}: {exc}")
            results.append(_checked(path, exc.summary, config.max_inflation, started, config.max_grid_score,
                                    config.min_inflation))
            continue
        if result is None:  # not the main process of a launched run: the main one holds the numbers
            continue
        results.append(_checked(path, result.summary, config.max_inflation, started, config.max_grid_score,
                                config.min_inflation))
    return results


def check(config: CheckConfig, reporter: Reporter | None = None) -> CheckResult:
    """Gate one or more tuned checkpoints on inflation; the exit code is ``result.exit_code``."""
    reporter = reporter or SilentReporter()
    if config.reference is not None:
        checked, gate, source, stream = _check_stored(config, reporter)
        return CheckResult(checked, gate, source, "free (stored reference)", min_inflation=config.min_inflation,
                           stream=stream)
    checked = _check_live(config, reporter)
    stream = next((c.stream for c in checked if c.stream is not None), config.stream)
    return CheckResult(checked, config.max_inflation, "--max-inflation", config.mode.runs()[0], config.max_grid_score,
                       config.min_inflation, stream)


__all__ = ["CheckConfig", "CheckResult", "check", "measure_against_reference", "verdict"]
