"""The sweep job (``normscope sweep``): every checkpoint of a training run against the base, in training order.

The base's work is done once: in free mode (the default) the base's trajectories and norms are profiled once
into ``OUT/base/`` (a reference, as ``normscope profile`` writes it) and each checkpoint then runs alone,
so a sweep of N checkpoints costs about (N + 1) / (2N) of N separate compares. In paired mode the base must
be evaluated on each checkpoint's own trajectory, so nothing of the base can be reused (a LoRA still needs
only one transformer).

Results are written as each checkpoint finishes (``OUT/checkpoint-N/`` run folders, ``sweep.csv``); a rerun
skips finished checkpoints and says so, so a killed sweep loses at most the checkpoint in flight.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from normscope.commands.profile import (
    PROBE_FIELDS,
    REFERENCE_JSON,
    ProfileConfig,
    base_weights_fingerprint,
    load_reference,
    probe_from_reference,
    profile,
)
from normscope.config import CompareConfig, Mode, ProbeConfig, check_finite
from normscope.errors import ConfigError, InputError
from normscope.load import find_checkpoint, find_pipeline_source, load_pipeline, resolve_dtype
from normscope.load.device_memory import check_run_fits, parse_size
from normscope.load.pipeline import check_family_inputs, place_denoiser
from normscope.measure.distributed import current_processes
from normscope.measure.maps import where_columns
from normscope.measure.prompt_cache import CACHE_DIR, prepare_prompts
from normscope.measure.prompts import make_samples, prompt_images, resolve_prompts
from normscope.measure.sampling import Reporter, SilentReporter, prompt_batches, resolve_run_device
from normscope.measure.sanity import sanity
from normscope.render.files import write_run
from normscope.runfolder import RunFolder, publish_outputs
from normscope.runfolder.fingerprint import (
    checkpoint_identity,
    condition_images_identity,
    pipeline_fingerprint,
    pipeline_identity,
    prompts_digest,
)

CHECKPOINT_NAME = re.compile(r"^checkpoint[-_](\d+)$")
SWEEP_CSV = "sweep.csv"
SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
SWEEP_WHERE_PNG = "sweep_where.png"
SWEEP_KIND = "sweep"
BASE_DIR = "base"
COLUMNS = ("step", "checkpoint", "inflation", "ci_lo", "ci_hi", "hinge_rate", "near_noise", "middle", "near_data",
           "nonfinite", "crosses_gate", "sanity")


@dataclass(kw_only=True)
class SweepConfig(ProbeConfig):
    """``normscope sweep RUN_DIR --out DIR``; ``gate`` marks the first checkpoint whose inflation exceeds it."""

    run_dir: Path
    out: Path
    base: str | None = None
    adapter: str | None = None
    allow_pickle: bool = False
    mode: Mode = Mode.free
    gate: float | None = None
    max_device_memory: str | None = None  # e.g. "40GiB"; default: the device's free memory (no check on the CPU)
    maps: bool = False
    scorer: str | None = None
    until_decided: bool = False  # paired: each checkpoint stops once its anytime-valid interval is off the gate
    stream: str | None = None  # issue 19: multi-stream families (LTX-2): the stream of the table (default: the first)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_size(self.max_device_memory)  # a bad size fails here, before anything loads
        self.run_dir, self.out, self.mode = Path(self.run_dir), Path(self.out), Mode(self.mode)
        check_finite("gate", self.gate)
        if self.mode is Mode.both:
            raise ConfigError("--mode both is not offered for sweeps: pick free (reuses the base) or paired")
        if self.until_decided and (self.gate is None or self.maps or self.scorer):
            raise ConfigError("--until-decided stops each checkpoint once its anytime-valid interval lies wholly above or "
                              "below --gate: it needs --gate (and no --maps or --scorer)")
        if (self.maps or self.scorer) and self.mode is not Mode.paired:
            raise ConfigError("--maps and --scorer need the base's velocities and images next to each checkpoint's: add "
                              "--mode paired (each checkpoint then also samples free mode for the image signals)")

    @property
    def where(self) -> bool:
        """Each checkpoint also gets maps, grid score and image signals (compare --mode both --maps)."""
        return self.maps or self.scorer is not None


def find_training_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders in RUN_DIR or RUN_DIR/checkpoints, ordered by training step N."""
    if not run_dir.is_dir():
        raise InputError(f"RUN_DIR {run_dir} is not a folder: pass a training run's output folder")
    found = {}
    for parent in (run_dir, run_dir / "checkpoints"):
        if parent.is_dir():
            for child in parent.iterdir():
                match = CHECKPOINT_NAME.match(child.name)
                if match and child.is_dir():
                    found[int(match.group(1))] = child
    if not found:
        raise InputError(f"no checkpoint-N folders in {run_dir} or {run_dir / 'checkpoints'}: pass the run's output folder")
    return sorted(found.items())


def _run_identity(config: SweepConfig) -> tuple[dict, str, list]:
    """What every checkpoint's numbers depend on alike: the probe settings, the resolved prompt texts and every
    condition image by content. Computed once per sweep (the images are hashed once, not once per checkpoint)."""
    stable = {k: v for k, v in config.to_dict().items() if k in PROBE_FIELDS or k in ("mode", "adapter", "base", "maps", "scorer", "until_decided")}
    if config.stream is not None:  # only when set: sweeps made before --stream keep their fingerprints
        stable["stream"] = config.stream
    prompts = prompts_digest(resolve_prompts(config.prompts_file, config.prompts))
    return stable, prompts, condition_images_identity(config)  # every condition image by content (issue 19)


def _fingerprint(config: SweepConfig, path: Path, source: str, reference, run: tuple) -> str:
    """What a checkpoint's numbers depend on: the sweep's identity (``run``, from ``_run_identity``), the
    checkpoint's files, and the base (the stored profile's hashes in free mode; the pipeline folder itself in
    paired mode)."""
    stable, prompts, images = run
    ckpt = find_checkpoint(path, "TUNED", config.adapter, config.allow_pickle)
    base = reference.meta["hashes"] if reference is not None else pipeline_identity(source)
    text = json.dumps([stable, prompts, checkpoint_identity(ckpt), base] + ([images] if any(images) else []),
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _row(step: int, path: Path, summary: dict, gate: float | None) -> dict:
    regions = summary["regions"]
    value = summary["inflation"]
    row = {"step": step, "checkpoint": str(path), "inflation": value, "ci_lo": summary["inflation_ci"][0],
           "ci_hi": summary["inflation_ci"][1], "hinge_rate": summary["hinge_rate"], **regions,
           "nonfinite": summary["nonfinite"], "crosses_gate": bool(gate is not None and value is not None and value > gate),
           "sanity": sanity(value)}  # "collapsed" / "exploded": a broken checkpoint, not a point of the curve
    if "sequential" in summary:  # --until-decided: what each checkpoint cost, and whether it was decided early
        decision = summary["sequential"]["decision"]
        row.update(samples_used=summary["samples_used"], samples_planned=summary["samples_planned"], decision=decision)
        if decision in ("above", "below"):  # decided by the anytime-valid interval, not by the point estimate
            row["crosses_gate"] = decision == "above"
    return {**row, **stream_columns(summary), **where_columns(summary)}


def stream_columns(summary: dict) -> dict:
    """Multi-stream families (LTX-2): the stream the row's inflation is of, and each other stream's inflation
    with its CI as ``<stream>_inflation``, ``<stream>_ci_lo``, ``<stream>_ci_hi`` (reported, not gated)."""
    stream = summary.get("stream")
    if stream is None:
        return {}
    out = {"stream": stream}
    for name, part in (summary.get("by_stream") or {}).items():
        if name != stream:
            ci = part["inflation_ci"] or [None, None]
            out.update({f"{name}_inflation": part["inflation"], f"{name}_ci_lo": ci[0], f"{name}_ci_hi": ci[1]})
    return out


def _stored_base(config: SweepConfig, source: str):
    """(the stored base profile when this sweep can reuse it, else None; why it cannot, for a note, or None).

    Reusable: made with these probe settings, these prompt texts, this pipeline and these base weights (an edited
    prompts file or a rewritten transformer means profiling again), and valid (a damaged one is profiled again).
    """
    folder = config.out / BASE_DIR
    if not (folder / REFERENCE_JSON).is_file():
        return None, None
    try:
        stored = load_reference(folder)
    except InputError as exc:
        return None, f"the stored base profile cannot be used ({str(exc).split('; ')[0]}): profiling the base again"
    changed = (f"probe options, prompt texts, pipeline or base weights changed since {folder} was made: "
               "profiling the base again")
    wanted = {k: v for k, v in config.to_dict().items() if k in PROBE_FIELDS}
    if stored.probe != wanted:
        return None, changed
    if config.stream is not None and not stored.holds(config.stream):  # made before normscope stored every stream
        from normscope.load.pipeline import family_of_source, headline_stream

        if config.stream != headline_stream(family_of_source(source)):
            return None, f"the stored base profile in {folder} holds no {config.stream} stream: profiling the base again"
    hashes = stored.meta.get("hashes", {})
    base_ckpt = None
    if config.base is not None and Path(config.base).resolve() != Path(source).resolve():
        base_ckpt = find_checkpoint(config.base, "BASE", allow_pickle=config.allow_pickle)
    same = (hashes.get("prompts") == prompts_digest(resolve_prompts(config.prompts_file, config.prompts))
            and hashes.get("pipeline") == pipeline_fingerprint(source)
            and hashes.get("weights") == base_weights_fingerprint(source, base_ckpt))
    return (stored, None) if same else (None, changed)


def _base_reusable(config: SweepConfig, source: str) -> bool:
    return _stored_base(config, source)[0] is not None


def _finished_summary(run_dir: Path, fingerprint: str) -> dict | None:
    """The summary of a checkpoint folder that this very sweep published whole (its manifest verified), else None.

    A folder left half-published by a kill, or from an older normscope, is measured again, never skipped."""
    from normscope.commands.compare import RUN_KIND
    from normscope.runfolder import verified_files

    try:
        files = verified_files(run_dir, "", kind=RUN_KIND)
        summary = json.loads(files["summary.json"].read_text())
    except (InputError, KeyError, ValueError, OSError):
        return None
    return summary if summary.get("config", {}).get("sweep_fingerprint") == fingerprint else None


def _base_reference(config: SweepConfig, source: str, reporter: Reporter, stored, pipe=None,
                    cache_dir: Path | None = None):
    """The base profile: the stored one when ``stored`` (``_stored_base``) allows it, else a new one."""
    reusable, why = stored
    if reusable is not None:
        reporter.note(f"base profile reused from {config.out / BASE_DIR}")
        return reusable
    if why is not None:
        reporter.note(why)
    fields = {k: getattr(config, k) for k in PROBE_FIELDS}
    return profile(ProfileConfig(base=config.base or source, out=config.out / BASE_DIR, pipeline=source,
                                 dtype=config.dtype, device=config.device, batch_size=config.batch_size,
                                 allow_pickle=config.allow_pickle, dtype_check=False,
                                 max_device_memory=config.max_device_memory, **fields), reporter,
                   pipe=pipe, cache_dir=cache_dir)


def sweep(config: SweepConfig, reporter: Reporter | None = None) -> pd.DataFrame:
    """Compare every checkpoint of ``config.run_dir`` with the base; returns (and writes) the sweep table."""
    reporter = reporter or SilentReporter()
    checkpoints = find_training_checkpoints(config.run_dir)
    for _, path in checkpoints:  # bad checkpoints fail now, not after an hour
        find_checkpoint(path, "TUNED", config.adapter, config.allow_pickle)
    source = find_pipeline_source(config.base, str(config.run_dir), config.pipeline)
    check_family_inputs(source, [(config.base, "BASE")] + [(str(p), "TUNED") for _, p in checkpoints], config)
    device, kind = resolve_run_device(config.device)
    dtype = resolve_dtype(config.dtype, kind)
    main = current_processes().is_main
    with RunFolder(config.out, main=main, note=reporter.note):  # checked and locked before anything loads
        return _sweep(config, reporter, checkpoints, source, device, dtype, main)


def _sweep(config: SweepConfig, reporter: Reporter, checkpoints: list[tuple[int, Path]], source: str, device: str,
           dtype, main: bool) -> pd.DataFrame | None:
    from normscope.commands.check import measure_against_reference
    from normscope.commands.compare import CALLS_PER_BATCH, RUN_KIND, RUN_OUTPUTS, CompareResult, compare, write_where

    # One pipeline for the base profile and every checkpoint: full weights overwrite its transformer (or a copy
    # of it), a LoRA is attached for its checkpoint and removed again; the prompts are encoded once for all.
    cache_dir = config.out / CACHE_DIR
    stored = _stored_base(config, source) if config.mode is Mode.free else (None, None)  # read and hashed once
    needs_base = config.mode is Mode.free and stored[0] is None
    run = _run_identity(config)
    pending = [path for _, path in checkpoints  # free mode without a reusable base: every checkpoint runs again
               if needs_base or _finished_summary(config.out / path.name,
                                                  _fingerprint(config, path, source, stored[0], run)) is None]
    shared_pipe, loads = None, 0
    if pending or needs_base:
        samples = make_samples(resolve_prompts(config.prompts_file, config.prompts), config.seeds,
                               prompt_images(config.prompts_file, config.prompts))
        batches = prompt_batches(samples, config.batch_size)
        if config.until_decided and config.mode is Mode.free:  # the checkpoints' seed-major batches, encoded now too
            from normscope.measure.sequential import seed_major_order

            batches += prompt_batches(seed_major_order(samples), config.batch_size)
        prompts = prepare_prompts(source, batches, config, dtype, device, cache_dir)
        shared_pipe = load_pipeline(source, dtype, device, parts="denoiser" if prompts is not None else "all",
                                    place=False)
        loads += 1
        if config.mode is Mode.free:  # one transformer on the device (paired: each compare checks its own run)
            check_run_fits(shared_pipe, config, device, config.max_device_memory, prompts)
            place_denoiser(shared_pipe, device)
        # One bar for the whole sweep: the base profile and every pending checkpoint, one advance per step of each
        # pipeline call (free: the tuned model against the stored profile; paired: compare's calls, free mode's
        # two as well when maps or a scorer are asked for).
        per_checkpoint = 1 if config.mode is Mode.free else sum(CALLS_PER_BATCH[m] for m in _compare_mode(config).runs())
        groups = -(-len(samples) // config.batch_size)
        reporter.begin(groups * config.steps * (per_checkpoint * len(pending) + int(needs_base)))
    reporter = _OneBar(reporter)  # the profile and compares it runs are parts of this bar, not bars of their own
    reference = _base_reference(config, source, reporter, stored, shared_pipe, cache_dir) if config.mode is Mode.free else None
    base_in_place = config.base is None  # does the shared transformer hold the base's weights (what a LoRA needs)?
    rows = []
    for step, path in checkpoints:
        run_dir = config.out / path.name
        fingerprint = _fingerprint(config, path, source, reference, run)
        summary = _finished_summary(run_dir, fingerprint)
        if summary is not None:
            reporter.note(f"{path.name}: finished earlier, skipped")
            rows.append(_row(step, path, summary, config.gate))
            continue
        if reference is not None:
            probe = probe_from_reference(reference, config.device, config.dtype, config.batch_size)
            full = not find_checkpoint(path, "TUNED", config.adapter, config.allow_pickle).is_lora
            if not full and not base_in_place:  # a full checkpoint before it overwrote the base weights
                shared_pipe, reloaded = _restore_base(shared_pipe, config, source, dtype, device)
                loads += reloaded
            base_in_place = not full
            frame, summary = measure_against_reference(source, str(path), reference, probe, dtype, device, reporter,
                                                       config.adapter, config.allow_pickle, pipe=shared_pipe,
                                                       cache_dir=cache_dir, max_device_memory=config.max_device_memory,
                                                       stream=config.stream,
                                                       until_decided=config.gate if config.until_decided else None)
            summary["config"]["sweep_fingerprint"] = fingerprint
            if main:
                publish_outputs(run_dir, lambda staging, r=CompareResult(frame, summary): write_run(r, staging, figure=False),
                                fingerprint, RUN_KIND, known=RUN_OUTPUTS)
        else:
            fields = {k: getattr(config, k) for k in PROBE_FIELDS}
            result = compare(CompareConfig(base=config.base, tuned=str(path), pipeline=source, adapter=config.adapter,
                                           allow_pickle=config.allow_pickle,
                                           mode=_compare_mode(config), maps=config.maps,
                                           scorer=config.scorer, dtype=config.dtype,
                                           device=config.device, batch_size=config.batch_size,
                                           max_device_memory=config.max_device_memory,
                                           until_decided=config.gate if config.until_decided else None,
                                           stream=config.stream, **fields), reporter,
                             pipe=shared_pipe, cache_dir=cache_dir)
            if result is None:  # not the main process: compare gathered the numbers on the main one
                continue
            result.summary["config"]["sweep_fingerprint"] = fingerprint
            publish_outputs(run_dir, lambda staging, r=result: write_run(r, staging, figure=False) + write_where(r, staging),
                            fingerprint, RUN_KIND, known=RUN_OUTPUTS)
            summary = result.summary
        rows.append(_row(step, path, summary, config.gate))
        if main:
            _write_table(config, rows, loads)
    if not main:
        return None
    return _write_table(config, rows, loads)


def _compare_mode(config: SweepConfig) -> Mode:
    """The mode of a paired sweep's compares: both when maps or a scorer need free mode's images too."""
    return Mode.both if config.where else Mode.paired


class _OneBar:
    """The sweep's reporter as the runs it makes see it: their ``begin`` is ignored (the sweep set the total)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def begin(self, total_steps: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        self.reporter.advance(steps)

    def note(self, message: str) -> None:
        self.reporter.note(message)


def _restore_base(pipe, config: SweepConfig, source: str, dtype, device: str):
    """The base weights back in the shared transformer: from BASE, else the pipeline's transformer folder."""
    from normscope.load.models import load_weights

    path = Path(config.base) if config.base else Path(source) / "transformer"
    if not path.exists():  # a hub pipeline: its weights are only reachable by loading it again
        return load_pipeline(source, dtype, device, parts="denoiser"), 1
    load_weights(pipe.transformer, find_checkpoint(path, "BASE", allow_pickle=config.allow_pickle), "BASE")
    return pipe, 0


def _write_table(config: SweepConfig, rows: list[dict], pipeline_loads: int | None = None) -> pd.DataFrame:
    """sweep.csv, sweep.json and the figures, published together after every checkpoint (never half-written)."""
    extra = [c for row in rows for c in row if c not in COLUMNS]
    table = pd.DataFrame(rows, columns=list(dict.fromkeys([*COLUMNS, *extra]))).sort_values("step").reset_index(drop=True)
    digest = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:16]
    publish_outputs(config.out, lambda staging: _write_table_files(config, table, pipeline_loads, staging), digest,
                    SWEEP_KIND, known=(SWEEP_CSV, SWEEP_JSON, SWEEP_PNG, SWEEP_WHERE_PNG))
    return table


def _write_table_files(config: SweepConfig, table: pd.DataFrame, pipeline_loads: int | None, out: Path) -> list[Path]:
    table.to_csv(out / SWEEP_CSV, index=False, lineterminator="\n")
    crossing = table[table["crosses_gate"]]
    streams = [s for s in table.get("stream", pd.Series(dtype=object)).dropna().unique()]
    meta = {"run_dir": str(config.run_dir), "mode": config.mode.value, "gate": config.gate,
            **({"stream": streams[0]} if streams else {}),  # issue 19: the stream the inflation columns are of
            "first_crossing": None if crossing.empty else {"step": int(crossing.iloc[0]["step"]),
                                                          "checkpoint": crossing.iloc[0]["checkpoint"]},
            "checkpoints": json.loads(table.to_json(orient="records")),
            "pipeline_loads": pipeline_loads}
    (out / SWEEP_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    from normscope.render.figures import save_png, sweep_figure

    written = [out / SWEEP_CSV, out / SWEEP_JSON, save_png(sweep_figure(table, config.gate), out / SWEEP_PNG)]
    if "grid_score" in table or any(c.endswith("_diff") for c in table):
        from normscope.render.maps_figures import sweep_where

        written.append(save_png(sweep_where(table), out / SWEEP_WHERE_PNG))
    return written
