"""The compare job: the Python API behind ``normscope compare``.

    from normscope import CompareConfig, compare
    result = compare(CompareConfig(base="base/", tuned="tuned.safetensors", out="runs/x"))
    result.inflation, result.profile()

Stages run one way: load -> capture -> table -> stats -> outputs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from normscope.config import HEADLINE_ESTIMATE, CompareConfig
from normscope.errors import NoMeasurementError
from normscope.load import (
    LoadedModels,
    find_checkpoint,
    find_pipeline_source,
    load_models,
    load_pipeline,
    resolve_device,
    resolve_dtype,
)
from normscope.load.device_memory import check_run_fits, out_of_memory_as_error
from normscope.load.families import family_for
from normscope.load.models import check_fit_before_load
from normscope.load.pipeline import check_family_inputs, place_call_modules
from normscope.load.scheduler_shift import shifted_scheduler
from normscope.measure.capture import GUIDED, CallRecord
from normscope.measure.frames import VIDEO_LAYOUT, FrameNorms, free_frames, paired_frames, tidy_frames
from normscope.measure.image_signals import IMAGE_SIGNALS_CSV, PreClipImages, batch_signals, load_scorer, signal_table
from normscope.measure.maps import MAPS_FILE, Maps, latent_geometry, maps_observer
from normscope.measure.prompt_cache import CACHE_DIR, prepare_prompts
from normscope.measure.prompts import Sample, make_samples, prompt_images, resolve_prompts
from normscope.measure.sampling import (
    Reporter,
    SilentReporter,
    batches,
    default_settings_note,
    prompt_batches,
    resolved_sampling,
    run_free,
    run_paired,
    run_rescaled,
    sampled_settings_note,
    sampling_kwargs,
    versions,
)
from normscope.measure.sequential import batch_key, rule_for, run_until_decided, seed_major
from normscope.measure.stats import (
    DEFINITIONS,
    NONFINITE,
    ci_method,
    inflation_estimates,
    mode_summary,
    n_samples,
    select,
    step_profile,
)
from normscope.measure.table import (
    BRANCH,
    EXPERT,
    NORM_BASE,
    NORM_TUNED,
    RATIO,
    RESCALED,
    STEP,
    STREAM,
    free_frame,
    paired_frame,
    tidy,
)
from normscope.measure.truncation import report_truncation
from normscope.render.files import FRAMES_CSV, FRAMES_PNG, IMAGES_DIR, NORMS_CSV, PROFILE_PNG, SUMMARY_JSON
from normscope.runfolder import RunFolder
from normscope.runfolder.fingerprint import condition_images_identity, run_fingerprint
from normscope.runfolder.store import PARTIAL_DIR, BatchStore


@dataclass
class CompareResult:
    """The tidy per-row frame and the summary (the object written to summary.json).

    With ``compare --maps``: ``maps`` holds the spatial and spectral aggregates of paired mode, ``signals``
    one row per sample of free mode's image signals (and ``--scorer`` scores).
    """

    frame: pd.DataFrame
    summary: dict
    frames: pd.DataFrame | None = None  # video pipelines: one row per latent frame as well (frames.csv)
    maps: Maps | None = None
    signals: pd.DataFrame | None = None

    @property
    def inflation(self) -> float:
        """The headline inflation (a fraction; never None: a run with nothing finite raises NoMeasurementError)."""
        return self.summary["inflation"]

    @property
    def inflation_ci(self) -> list[float | None]:
        return self.summary["inflation_ci"]

    def profile(self, mode: str | None = None, branch: str = GUIDED, stream: str | None = None) -> pd.DataFrame:
        """The per-step profile of one mode (default: the headline mode) and branch (and stream: the headline's)."""
        frame = self.frame
        if STREAM in frame.columns:
            frame = frame[frame[STREAM] == (stream or self.summary["stream"])]
        return step_profile(select(frame, mode or self.summary["headline_mode"], branch))


# ---------------------------------------------------------------- the job


# Options that change only what is written or where, not the numbers; the prompts enter as resolved texts.
# ``save_images`` is in: the images wait with the finished batches, so a resume must not mix runs with and without them.
_NOT_IN_FINGERPRINT = ("out", "figure", "offload", "max_device_memory", "encode_once", "prompts_file", "prompts")
# --stream picks the headline of the summary only: the stored batches hold every stream (issue 19)
_NOT_IN_FINGERPRINT += ("stream",)


def _fingerprint(config: CompareConfig, prompts: list[str], source: str, checkpoints: list) -> str:
    """Resume key: settings, resolved prompts, the pipeline folder (its transformer too), checkpoints, versions."""
    import peft
    import transformers

    # A sequential run keys its batches by their samples and keeps them: a larger plan (more seeds) or another
    # stopping rule continues from them, so the plan and the rule stay out of its fingerprint.
    sequential = ("seeds", "until_decided", "precision") if rule_for(config) is not None else ()
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT + sequential}
    images = prompt_images(config.prompts_file, config.prompts)
    if images is not None:  # a pairs file's images are part of what is sampled
        settings["prompt_images"] = images
    contents = condition_images_identity(config)
    if any(contents):  # every condition image by its contents too (issue 19): one changed image recomputes
        settings["condition_images"] = contents
    library = {**versions(), "transformers": transformers.__version__, "peft": peft.__version__}
    return run_fingerprint(settings, prompts, source, checkpoints, library)


def _rows(mode: str, records: dict[str, CallRecord], samples: list[Sample], drive: str, paired, free) -> pd.DataFrame:
    """One mode's batch as rows; ``paired``/``free`` build them (the norm table, or the per-frame table)."""
    if mode == "free":
        return free(records["base"], records["tuned"], samples)
    if mode == RESCALED:  # the tuned model drives, rescaled to the base's norm
        return paired(records[RESCALED], samples, "tuned", mode=RESCALED)
    return paired(records["paired"], samples, drive)


def save_images(records: dict[str, CallRecord], samples: list[Sample], folder: Path) -> None:
    """<prompt_id>-<seed>-<base|tuned|rescaled>.png (a video: .webp, animated) in ``folder``, as each batch finishes.

    The run keeps them with its finished batches (``.partial/images``) until it publishes them as ``images/``.
    """
    from normscope.render.video import VIDEO_SUFFIX, save_video

    folder.mkdir(parents=True, exist_ok=True)
    for role, record in records.items():
        for sample, image in zip(samples, record.images or [], strict=True):
            stem = f"{sample.prompt_id:03d}-{sample.seed}-{role}"
            if isinstance(image, (list, tuple)):  # a video pipeline's frames
                save_video(list(image), folder / f"{stem}{VIDEO_SUFFIX}")
            else:
                image.save(folder / f"{stem}.png")


def expert_summary(frame: pd.DataFrame, mode: str) -> tuple[list[str], dict, int | None]:
    """Per step the expert that ran; per expert the inflation over its own steps (the headline's estimate and
    CI, and the other estimate); the step where the experts switch.

    Empty for one-transformer pipelines (every label "").
    """
    rows = select(frame, mode, GUIDED)
    labels = rows.groupby(STEP)[EXPERT].first().sort_index()
    if not any(labels):
        return [""] * len(labels), {}, None
    by_expert = {}
    for label in dict.fromkeys(labels):
        steps = [int(s) for s in labels.index[labels == label]]
        estimates = inflation_estimates(rows[rows[STEP].isin(steps)])
        value, lo, hi = (None if np.isnan(x) else float(x) for x in estimates[HEADLINE_ESTIMATE])
        by_expert[label] = {"steps": steps, "inflation": value, "inflation_ci": [lo, hi],
                            "estimates": {name: None if np.isnan(v[0]) else float(v[0]) for name, v in estimates.items()}}
    switches = [int(s) for prev, s in zip(labels.index[:-1], labels.index[1:], strict=True) if labels[s] != labels[prev]]
    return list(labels), by_expert, (switches[0] if switches else None)


def first_stream(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the headline stream (the first, e.g. LTX-2's video); the frame itself for one-stream families."""
    return stream_rows(frame, None)


def stream_rows(frame: pd.DataFrame, stream: str | None) -> pd.DataFrame:
    """The rows of one stream (``--stream``; None: the first, e.g. LTX-2's video); the frame itself for
    one-stream families (no ``stream`` column)."""
    if STREAM not in frame.columns:
        return frame
    return frame[frame[STREAM] == (stream or frame[STREAM].iloc[0])].reset_index(drop=True)


def stream_summary(frame: pd.DataFrame, config: CompareConfig, stream: str | None = None) -> dict:
    """summary.json's ``stream`` (the headline's: ``stream``, default the first) and ``by_stream``: each stream's
    headline estimate with its CI, both estimates and the per-step profile, on the guided velocity of the first
    mode run."""
    streams = list(dict.fromkeys(frame[STREAM]))
    mode = config.mode.runs()[0]
    by_stream = {}
    for name in streams:
        head = mode_summary(frame[frame[STREAM] == name], mode)[GUIDED]
        by_stream[name] = {key: head[key] for key in ("inflation", "inflation_ci", "estimates", "per_step")}
    return {"stream": stream or streams[0], "streams": streams, "by_stream": by_stream}


def summarize(frame: pd.DataFrame, config: CompareConfig, extra: dict) -> dict:
    """summary.json: headline (and both estimates), per-step profile, every mode and branch, config, versions.

    The headline is the sigma-integral estimate on the guided velocity of the first mode run (see
    ``HEADLINE_ESTIMATE``); ``estimates`` holds it and the step mean, each with its CI.
    """
    modes = {mode: mode_summary(frame, mode) for mode in _runs(config)}
    headline_mode = config.mode.runs()[0]
    head = modes[headline_mode][GUIDED]
    guided = frame[frame["branch"] == GUIDED]
    experts, by_expert, boundary = expert_summary(frame, headline_mode)
    return {
        "inflation": head["inflation"],
        "inflation_ci": head["inflation_ci"],
        "headline": HEADLINE_ESTIMATE,
        "definition": DEFINITIONS[HEADLINE_ESTIMATE] + ", on the guided velocity of the first mode run",
        "estimates": head["estimates"],
        "definitions": DEFINITIONS,
        "ci": ci_method(frame),
        "headline_mode": headline_mode,
        "drive": config.drive.value,
        "branch": GUIDED,
        "n_samples": n_samples(frame),
        NONFINITE: int(guided[RATIO].isna().sum()),
        "hinge_rate": head["hinge_rate"],
        "regions": head["regions"],
        "per_step": head["per_step"],
        "experts": experts,
        "by_expert": by_expert,
        "expert_boundary_step": boundary,
        "modes": modes,
        "config": {**config.to_dict(), **extra},
        "versions": versions(),
    }


def compare(config: CompareConfig, reporter: Reporter | None = None, pipe=None,
            cache_dir: Path | None = None) -> CompareResult | None:
    """Measure how much larger the tuned model's velocity is than the base's, step by step.

    Raises ``NoMeasurementError`` (exit code 3 on the CLI) when no finite ratio was measured, after writing
    the run folder; other bad input raises the ``normscope.errors`` classes with one-line messages.

    With ``config.out`` set, finished batches are kept there as the run goes, a rerun with the same
    options resumes, and norms.csv, summary.json and profile.png are written at the end.

    Launched on several processes (accelerate, torchrun), the batches are shared out and gathered: the main
    process gets the result (identical to a single-process run), the others ``None``.

    ``pipe``: a pipeline loaded from the same source to reuse (sweeps); it is handed back as it came (a LoRA
    adapter removed, offloaded weights back in host memory). The prompt embeddings are kept in
    ``OUT/.prompt-embeddings`` (or ``cache_dir``) for reruns.
    """
    from normscope.measure.distributed import processes

    reporter = reporter or SilentReporter()
    prompts = resolve_prompts(config.prompts_file, config.prompts)
    images = prompt_images(config.prompts_file, config.prompts)
    samples = (seed_major(prompts, config.seeds, images) if rule_for(config) is not None  # the first batches span the prompts
               else make_samples(prompts, config.seeds, images))
    device = resolve_device(config.device)
    procs = processes(cpu=device == "cpu")
    device = procs.device(device)
    dtype = resolve_dtype(config.dtype, device.split(":")[0])
    source = find_pipeline_source(config.base, config.tuned, config.pipeline)
    # Resolve both paths before the (slow) pipeline load, so bad input fails in a second.
    checkpoints = [find_checkpoint(config.tuned, "TUNED", config.adapter, config.allow_pickle)]
    if config.base:
        checkpoints.append(find_checkpoint(config.base, "BASE", allow_pickle=config.allow_pickle))

    check_family_inputs(source, [(config.tuned, "TUNED"), (config.base, "BASE")], config)
    for ckpt, role in zip(checkpoints, ("TUNED", "BASE"), strict=False):  # BASE only when given
        check_fit_before_load(source, ckpt, role)
    # A scorer that cannot be imported is bad input: refused now, before the folder is touched or anything loads.
    scorer = load_scorer(config.scorer) if config.scorer else None

    groups = list(batches(samples, config.batch_size))
    folder = (RunFolder(Path(config.out), main=procs.is_main, note=reporter.note) if config.out is not None
              else nullcontext())
    with folder:  # checked (a file, read-only, busy) and locked for the whole run; published at its end
        embeddings = None
        if config.encode_once:  # before any transformer is loaded: the encoders have the device (and the RAM) alone
            if cache_dir is None and config.out is not None:
                cache_dir = Path(config.out) / CACHE_DIR
            embeddings = prepare_prompts(source, prompt_batches(samples, config.batch_size), config, dtype, device,
                                         cache_dir, pipe=pipe, note=reporter.note)
        own_pipe = pipe is None
        if own_pipe:
            pipe = load_pipeline(source, dtype, device, parts="denoiser" if embeddings is not None else "all",
                                 place=False, image_input=config.image is not None or any(s.image for s in samples))
        family = family_for(type(pipe).__name__)
        offload_to = device if config.offload else None
        loaded = load_models(pipe, config.base, config.tuned, source, config.adapter, config.allow_pickle, offload_to)
        if config.offload and device == "cpu":
            reporter.note("--offload on the CPU saves nothing (host memory is the device): the transformers still take turns")
        for note in loaded.notes:
            reporter.note(note)
        if config.maps and len(family.streams) > 1:  # issue 19 (LTX-2): one line, not an error
            reporter.note(f"--maps: spatial maps are of the {family.streams[0]} stream; the "
                          f"{', '.join(family.streams[1:])} stream has no spatial layout (its inflation is in by_stream)")
        defaults_note = default_settings_note(pipe, config, family)
        if defaults_note:
            reporter.note(defaults_note)
        sampled_note = sampled_settings_note(pipe, config, family)
        if sampled_note:
            reporter.note(sampled_note)
        try:
            with shifted_scheduler(pipe, config.shift):  # --shift (issue 19): every mode samples with it
                return _measure(config, pipe, family, loaded, prompts, embeddings, samples, groups, source, checkpoints,
                                device, dtype, procs, reporter, folder if config.out is not None else None, scorer)
        finally:
            report_truncation(reporter)  # prompts longer than the encoders take: one note, however many batches
            if not own_pipe:  # a caller's pipeline gets its own transformer back: adapter removed, weights in place
                loaded.release()


def _measure(config: CompareConfig, pipe, family, loaded: LoadedModels, prompts: list[str], embeddings, samples,
             groups, source, checkpoints, device: str, dtype, procs, reporter: Reporter, folder: RunFolder | None,
             scorer) -> CompareResult | None:
    from normscope.render.files import write_run

    fp = check_run_fits(pipe, config, device, config.max_device_memory, embeddings,
                        transformers=1 if loaded.shared or config.offload else 2,
                        adapter_params=loaded.adapter_params, offload_possible=not loaded.shared and not config.offload)
    loaded.place(device)
    place_call_modules(pipe, device)  # LTX-2's connectors, an input image's VAE: where the call runs
    base, tuned = loaded.base, loaded.tuned
    driver, other = (tuned, base) if config.drive.value == "tuned" else (base, tuned)

    store = None
    fingerprint = _fingerprint(config, prompts, source, checkpoints)
    if folder is not None:
        store = BatchStore(folder.path / PARTIAL_DIR, fingerprint, procs, note=reporter.note)
        folder.store = store
        if store.reset:
            reporter.note(f"options, prompts, pipeline or checkpoints changed since the unfinished run in {config.out}: starting afresh")
        elif store.finished():
            reporter.note(f"resuming: {store.finished()} finished batch(es) in {config.out} are reused")

    runs = _runs(config)
    rule = rule_for(config)
    calls_per_batch = CALLS_PER_BATCH
    resolved = resolved_sampling(pipe, config, family)
    steps = resolved.get("steps_run", config.steps)  # video to video runs the last int(steps x strength) steps
    reporter.begin(sum(calls_per_batch[m] for m in runs) * len(groups) * steps)
    want_signals = config.maps or scorer is not None
    pixel_period = latent_geometry(pipe, family)[2] * int(getattr(pipe, "vae_scale_factor", 1) or 1)

    def measure(mode: str, index: int) -> tuple[dict[str, CallRecord], Maps | pd.DataFrame | None]:
        batch = groups[index]
        key = batch_key(mode, batch) if rule is not None else f"{mode}-{index:05d}"
        records = store.load(key) if store else None
        if records is not None:
            extra = _load_extra(store, key, mode, config, want_signals)
            if extra is not _MISSING:  # a batch whose extras were lost (damaged) is measured again, whole
                reporter.advance(calls_per_batch[mode] * config.steps)
                return records, extra
        kwargs = sampling_kwargs(pipe, config, batch, family, embeddings)
        extra = None
        if (mode in ("free", RESCALED) and config.save_images) or (mode == "free" and want_signals):
            kwargs["output_type"] = "pil"
        # one observer serves every call: its per-call results land in each CallRecord (record.observed)
        observers = [FrameNorms()] if family.latent_layout == VIDEO_LAYOUT else []
        if mode == "paired":
            spatial = (maps_observer(pipe, family, resolved["height"], resolved["width"], config.drive.value,
                                     resolved.get("num_frames")) if config.maps else None)
            records = run_paired(pipe, driver, other, kwargs, reporter, observers + ([spatial] if spatial else []),
                                 measure_steps=config.measure_steps)
            if spatial is not None:
                spatial.end_call()
                extra = spatial.result([s.prompt_id for s in batch])
        elif mode == RESCALED:
            records = run_rescaled(pipe, tuned, base, kwargs, reporter, observers)
        elif want_signals:
            with PreClipImages().attached(pipe) as decoded:
                records = run_free(pipe, base, tuned, kwargs, reporter, observers, device=device)
            base_images, tuned_images = decoded.take_all()
            extra = batch_signals(batch, base_images, tuned_images, pixel_period, scorer, config.scorer or "")
        else:
            records = run_free(pipe, base, tuned, kwargs, reporter, observers, device=device)
        if mode in ("free", RESCALED) and config.save_images:
            save_images(records, batch, store.images)
        for record in records.values():
            record.images = None
        if store:
            _save_extra(store, key, extra)  # first: a stored batch always has its extras
            store.save(key, records)
        return records, extra

    frames, per_frame, map_parts, signal_parts = [], [], [], []
    used = len(samples)
    with out_of_memory_as_error(device, fp):
        if rule is not None:  # seed-major rounds of gathered batches until the confidence sequence decides
            def keep(mode, index, records, extra):
                frames.append(_rows(mode, records, groups[index], config.drive.value, paired_frame, free_frame))
                per_frame.append(_rows(mode, records, groups[index], config.drive.value, paired_frames, free_frames))
                return stream_rows(frames[-1], config.stream)  # the rule decides on the headline stream

            used = run_until_decided(rule, runs[0], groups, measure, keep, procs, list(config.seeds), reporter)
        else:
            for mode in runs:
                for index, (records, extra) in enumerate(procs.map(len(groups), lambda i, mode=mode: measure(mode, i))):
                    frames.append(_rows(mode, records, groups[index], config.drive.value, paired_frame, free_frame))
                    per_frame.append(_rows(mode, records, groups[index], config.drive.value, paired_frames, free_frames))
                    if isinstance(extra, Maps):
                        map_parts.append(extra)
                    elif extra is not None:
                        signal_parts.append(extra)
    if not procs.is_main:
        return None

    frame = tidy(frames)
    headline_frame = stream_rows(frame, config.stream)  # multi-stream families (LTX-2): --stream, default the first
    video = tidy_frames(per_frame)
    extra = {
        "resolved": resolved,
        "pipeline_source": source,
        "models": loaded.describe(),
        "device": device,
        "processes": procs.count,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    images = prompt_images(config.prompts_file, config.prompts)
    if images is not None:  # the pairs file's condition images, per prompt (a list where a row gives several)
        extra["prompt_images"] = [list(i) if isinstance(i, tuple) else i for i in images]
    summary = summarize(headline_frame, config, extra)
    if headline_frame is not frame:
        summary.update(stream_summary(frame, config, config.stream))
    summary["notes"] = loaded.notes
    summary["samples_used"], summary["samples_planned"] = used, len(samples)
    if config.measure_steps is not None:
        measured = sorted(int(s) for s in frame["step"].unique())
        summary["measure_steps"] = {
            "k": config.measure_steps, "steps": measured, "of": config.steps,
            "estimate": "trapezoid sigma-integral over the measured steps only; its CI resamples prompts and does not "
                        "include the interpolation between them (docs/performance.md measures that error)"}
    if rule is not None:
        summary["sequential"] = rule.summary(used, len(samples))
    maps = Maps.merge(map_parts) if map_parts else None
    signals = pd.concat(signal_parts, ignore_index=True) if signal_parts else None
    if maps is not None:
        summary["maps"] = maps.summary()
        if family.streams:  # LTX-2: the maps are of the first stream; the audio stream has no spatial layout
            summary["maps"]["stream"] = family.streams[0]
    if signals is not None:
        summary["image_signals"] = {"pixel_period": pixel_period, "scorer": config.scorer, "signals": signal_table(signals)}
    result = CompareResult(frame, summary, video if len(video) else None, maps, signals)
    if folder is not None:
        def write(staging: Path) -> list[Path]:
            return write_run(result, staging, figure=config.figure) + write_where(result, staging)

        folder.publish(write, fingerprint, RUN_KIND, known=RUN_OUTPUTS, links={IMAGES_DIR: store.images})
        if rule is None:  # a sequential run keeps its batches: a larger plan or a tighter rule continues from them
            store.clear()
    # The API ends as the CLI does: the package's error, after the files (with the counts) are written.
    verdict = nonfinite_verdict(headline_frame)
    if verdict:
        raise NoMeasurementError(verdict, summary)
    if result.inflation is None:
        raise NoMeasurementError(no_measurement_message(summary), summary)
    return result


def write_where(result: CompareResult, out: Path) -> list[Path]:
    """maps.safetensors (aggregates, not every map) and image_signals.csv (one row per sample), when measured."""
    written = []
    if result.maps is not None:
        written.append(result.maps.save(out / MAPS_FILE))
    if result.signals is not None:
        written.append(out / IMAGE_SIGNALS_CSV)
        result.signals.to_csv(written[-1], index=False, lineterminator="\n")
    return written


def _save_extra(store: BatchStore, key: str, extra) -> None:
    import torch

    if isinstance(extra, Maps):
        store.save_extra(key, "maps", extra.tensors, extra.meta)
    elif extra is not None:
        store.save_extra(key, "signals", {c: torch.tensor(extra[c].to_numpy()) for c in extra.columns}, {"columns": list(extra.columns)})


_MISSING = object()  # a stored batch's extras could not be read: measure the batch again


def _load_extra(store: BatchStore, key: str, mode: str, config: CompareConfig, want_signals: bool):
    name = "maps" if mode == "paired" and config.maps else "signals" if mode == "free" and want_signals else None
    if name is None:
        return None
    entry = store.load_extra(key, name)
    if entry is None:
        return _MISSING
    tensors, meta = entry
    try:
        return Maps(tensors, meta) if name == "maps" else pd.DataFrame({c: tensors[c].numpy() for c in meta["columns"]})
    except (KeyError, TypeError, ValueError):
        return _MISSING


# What a compare run folder publishes; a rerun removes any of them that it does not write again.
RUN_KIND = "compare"
RUN_OUTPUTS = (NORMS_CSV, SUMMARY_JSON, PROFILE_PNG, FRAMES_CSV, FRAMES_PNG, IMAGES_DIR, MAPS_FILE, IMAGE_SIGNALS_CSV)

# Pipeline calls per batch of each mode (the progress bar advances once per denoising step of each call).
CALLS_PER_BATCH = {"paired": 1, "free": 2, RESCALED: 1}


def _runs(config: CompareConfig) -> tuple[str, ...]:
    """The modes measured: the configured ones, then the inference-rescale ablation when asked for."""
    return config.mode.runs() + ((RESCALED,) if config.rescale_to_base else ())


def no_measurement_message(summary: dict) -> str:
    """One line for a run with no finite ratio at all: what was counted, and what to check."""
    rows = sum(row["n"] + row["nonfinite"] for row in summary["per_step"])
    return (f"no finite ratio ||v_tuned|| / ||v_base|| was measured ({summary['nonfinite']} of {rows} guided "
            "velocity evaluations were NaN/Inf or zero): check the checkpoints for NaN weights, or use --dtype float32"
            + (" (summary.json holds the counts)" if summary["config"].get("out") else ""))


def nonfinite_verdict(frame: pd.DataFrame) -> str | None:
    """One line when a model's guided velocity was non-finite at every step of every sample, else None.

    The run's files (summary.json with the counts) are written first; this line ends the run (exit 3).
    """
    guided = frame[frame[BRANCH] == GUIDED]
    if guided.empty:
        return None
    bad = {role: ~np.isfinite(guided[column].to_numpy(dtype=float)) for role, column in (("TUNED", NORM_TUNED), ("BASE", NORM_BASE))}
    if not any(b.all() for b in bad.values()):
        return None
    # Blame the model that was non-finite where the other was not (the other then runs on its NaN latents).
    first = guided[STEP].min()
    at_first = (guided[STEP] == first).to_numpy()
    culprits = [role for role, b in bad.items() if b[at_first].any()] or [r for r, b in bad.items() if b.all()]
    who = " and ".join(culprits)
    return (f"{who} produced NaN/Inf velocities at every step of every sample ({int(max(b.sum() for b in bad.values()))} "
            f"of {len(guided)} guided rows): check the checkpoint (summary.json holds the counts)")
