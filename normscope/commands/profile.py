"""The profile job (``normscope profile``): the base model alone, stored as a reference with thresholds.

A reference holds the exact sampling config, fingerprints of the prompts, pipeline and weights, the base's
per-(prompt, seed, step) norms, per-step statistics, and two suggestions:

* ``tau(sigma)``: a per-step reference norm for a NormGuard-style hinge when a trainer cannot afford a
  reference forward: the 95th percentile of the base's own norms at that step, so the penalty is ~0 on the
  base model and bites on inflation;
* a CI gate (maximum inflation) set above the noise floor measured for this base and probe:
  ``max(2 %, 3 x prompt-subset spread, 2 x |bfloat16 - float32|)``, rounded up to the next 0.5 %.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normscope.commands.reference_schema import (
    FORMAT_VERSION,
    REFERENCE_JSON,
    REFERENCE_TENSORS,
    read_meta,
    read_tensors,
)
from normscope.config import FAMILY_SETTINGS, Device, DType, ProbeConfig
from normscope.errors import InputError
from normscope.load import (
    find_checkpoint,
    find_pipeline_source,
    load_base,
    load_pipeline,
    resolve_dtype,
)
from normscope.load.device_memory import check_run_fits, parse_size
from normscope.load.families import family_for
from normscope.load.pipeline import check_family_inputs, place_denoiser, quiet_loading
from normscope.measure.capture import GUIDED, CallRecord
from normscope.measure.distributed import current_processes
from normscope.measure.prompt_cache import CACHE_DIR, prepare_prompts
from normscope.measure.prompts import Sample, make_samples, prompt_images, resolve_prompts
from normscope.measure.sampling import (
    Reporter,
    SilentReporter,
    default_settings_note,
    prompt_batches,
    resolve_run_device,
    resolved_sampling,
    run_model_batches,
    sampled_settings_note,
    versions,
)
from normscope.measure.stats import sigma_integral
from normscope.measure.truncation import report_truncation
from normscope.runfolder import MANIFEST, RunFolder, verified_files
from normscope.runfolder.fingerprint import fingerprint_files, pipeline_fingerprint, prompts_digest

THRESHOLDS_CSV = "thresholds.csv"
REFERENCE_PNG = "reference.png"
REFERENCE_KIND = "reference"
REFERENCE_OUTPUTS = (REFERENCE_JSON, REFERENCE_TENSORS, THRESHOLDS_CSV, REFERENCE_PNG)
GATE_MINIMUM = 0.02  # the paper's effect is 5-15 %: a gate below 2 % gates on noise, not on inflation
GATE_STEP = 0.005
SUBSET_SPLITS = 200
DTYPE_CHECK_SAMPLES = 4
MIN_SAMPLES = 16
TAU_PERCENTILE = 95
# Probe fields a check must not contradict; hardware fields (device, dtype, batch size) may differ.
PROBE_FIELDS = ("prompts_file", "prompts", "seeds", "steps", "guidance", "height", "width", "negative_prompt",
                "max_sequence_length", "true_cfg_scale", "num_frames", "image") + FAMILY_SETTINGS


@dataclass(kw_only=True)
class ProfileConfig(ProbeConfig):
    """``normscope profile BASE --out DIR``: ``dtype_check`` adds the bfloat16-vs-float32 noise floor."""

    base: str
    out: Path
    allow_pickle: bool = False
    dtype_check: bool = True
    figure: bool = True
    max_device_memory: str | None = None  # e.g. "40GiB"; default: the device's free memory (no check on the CPU)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.out = Path(self.out)
        parse_size(self.max_device_memory)  # a bad size fails here, before anything loads


def base_weights_fingerprint(source: str, base_ckpt=None) -> str | None:
    """Content fingerprint of the base's weights: BASE's own files, else the pipeline's transformer/ folder
    (what a LoRA is attached to in a stored-reference check). None for a hub id (nothing local to read)."""
    if base_ckpt is not None:
        files = list(base_ckpt.files)
    elif Path(source).is_dir():
        files = sorted((Path(source) / "transformer").glob("*"))
    else:
        return None
    files = [p for p in files if p.is_file()]
    return fingerprint_files(Path(source), files) if files else None


# ---------------------------------------------------------------- statistics


def _percentiles(matrix: np.ndarray) -> dict[str, np.ndarray]:
    finite = np.where(np.isfinite(matrix), matrix, np.nan)
    with np.errstate(invalid="ignore"):
        p5, p50, p95 = np.nanpercentile(finite, [5, 50, TAU_PERCENTILE], axis=0)
    return {"mean": np.nanmean(finite, axis=0), "std": np.nanstd(finite, axis=0), "p5": p5, "p50": p50, "p95": p95}


def subset_spread(norms: np.ndarray, sigma: np.ndarray, clusters: np.ndarray | None = None,
                  splits: int = SUBSET_SPLITS, seed: int = 0) -> float:
    """Std of the inflation you would read between two random halves of the probe (no model change at all).

    Halves are made of whole prompts (``clusters``: each sample's prompt id) when there are at least 4
    prompts, because seeds of one prompt are correlated; else of samples. The inflation between the halves
    is the headline's sigma-integral of the ratio of their per-step mean norms.
    """
    clusters = np.arange(norms.shape[0]) if clusters is None else np.asarray(clusters)
    ids = np.unique(clusters)
    if len(ids) < 4:
        clusters, ids = np.arange(norms.shape[0]), np.arange(norms.shape[0])
    if len(ids) < 4:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(splits):
        half = np.isin(clusters, rng.permutation(ids)[: len(ids) // 2])
        ratio = np.nanmean(norms[half], axis=0) / np.nanmean(norms[~half], axis=0)
        values.append(sigma_integral(ratio, sigma) - 1.0)
    return float(np.std(values))


def suggest_gate(spread: float, dtype_floor: float | None) -> dict:
    candidates = {"minimum": GATE_MINIMUM}
    if math.isfinite(spread):
        candidates["3 x prompt-subset spread"] = 3 * spread
    if dtype_floor is not None and math.isfinite(dtype_floor):
        candidates["2 x |bfloat16 - float32|"] = 2 * dtype_floor
    driver = max(candidates, key=candidates.get)
    value = math.ceil(candidates[driver] / GATE_STEP - 1e-9) * GATE_STEP
    return {"max_inflation": round(value, 4), "set_by": driver, "candidates": candidates,
            "rule": "max(2 %, 3 x prompt-subset spread, 2 x |bfloat16 - float32|), rounded up to 0.5 %"}


def _clean(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in values]


# ---------------------------------------------------------------- the job


@dataclass
class Reference:
    """A stored base profile: ``meta`` is reference.json; ``norms[branch]`` is (samples, steps) float32."""

    meta: dict
    norms: dict[str, np.ndarray]
    timesteps: np.ndarray
    sigmas: np.ndarray

    @property
    def probe(self) -> dict:
        return self.meta["config"]["probe"]

    @property
    def gate(self) -> float:
        return self.meta["suggestions"]["gate"]["max_inflation"]

    # ---- issue 19: the streams a reference holds (LTX-2: video, audio)
    @property
    def streams(self) -> list[str] | None:
        """The streams stored, headline first ([]: a one-stream family); None: a reference made before normscope
        stored streams, read as its headline stream only."""
        return self.meta.get("streams")

    def holds(self, stream: str | None) -> bool:
        """Whether ``stream`` (None: the headline) can be checked against this reference."""
        return stream is None or stream in (self.streams or [])

    def gate_for(self, stream: str | None) -> float:
        """The suggested gate of one stream (None or the headline: ``gate``)."""
        by_stream = self.meta["suggestions"].get("gate_by_stream") or {}
        return by_stream[stream]["max_inflation"] if stream in by_stream else self.gate

    def samples(self) -> list[Sample]:
        return [Sample(s["prompt_id"], s["prompt"], s["seed"]) for s in self.meta["samples"]]

    def record(self) -> CallRecord:
        """The stored norms as a capture record of one call holding every sample (free-mode rows)."""
        import torch

        from normscope.measure.capture import STREAM_SEP

        streams = self.streams or []
        # a reference without stream info is its headline stream only (whatever else an old profile stored)
        kept = {b: m for b, m in self.norms.items() if STREAM_SEP not in b or b.split(STREAM_SEP)[0] in streams[1:]}
        stats = {b: torch.from_numpy(np.ascontiguousarray(m.T))[:, None, :] for b, m in kept.items()}
        return CallRecord(stats, ("norm",), torch.from_numpy(self.timesteps), torch.from_numpy(self.sigmas),
                          stream=streams[0] if streams else "")

    def save(self, out: Path) -> list[Path]:
        import torch
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"norms/{b}": torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)) for b, m in self.norms.items()}
        tensors["timesteps"] = torch.from_numpy(self.timesteps.astype(np.float32))
        tensors["sigmas"] = torch.from_numpy(self.sigmas.astype(np.float32))
        # ``out`` is the run folder's staging folder: the files land together with the manifest (runfolder).
        save_file(tensors, str(out / REFERENCE_TENSORS))
        (out / REFERENCE_JSON).write_text(json.dumps(self.meta, indent=2) + "\n")
        rows = self.meta["per_step"][GUIDED]
        columns = ["step", "timestep", "sigma", "mean", "std", "p5", "p50", "p95", "tau", "tau_rms"]
        lines = [",".join(columns)] + [",".join("" if r.get(c) is None else repr(r[c]) for c in columns) for r in rows]
        (out / THRESHOLDS_CSV).write_text("\n".join(lines) + "\n")
        return [out / REFERENCE_JSON, out / REFERENCE_TENSORS, out / THRESHOLDS_CSV]


def load_reference(folder: str | Path) -> Reference:
    """Read a profile folder, validated against the schema (reference_schema): a damaged or edited reference
    is an InputError (exit 2) naming the file, the field and the fix, never a raw error or a NaN gate."""
    folder = Path(folder)
    meta_path = folder / REFERENCE_JSON
    if not meta_path.is_file() or not (folder / REFERENCE_TENSORS).is_file():
        raise InputError(f"--reference {folder} holds no {REFERENCE_JSON} and {REFERENCE_TENSORS}: make one with normscope profile BASE --out {folder}")
    meta = read_meta(meta_path, folder)
    norms, timesteps, sigmas = read_tensors(folder / REFERENCE_TENSORS, meta, folder)
    # Valid files, and the same profile's: a reference.json edited by hand or left by a half-finished rerun is refused.
    verified = verified_files(folder, f"rerun normscope profile BASE --out {folder}", kind=REFERENCE_KIND)
    missing = [name for name in (REFERENCE_JSON, REFERENCE_TENSORS) if name not in verified]
    if missing:
        raise InputError(f"{folder / MANIFEST} does not list {', '.join(missing)}: rerun normscope profile BASE --out {folder}")
    return Reference(meta, norms, timesteps, sigmas)


def _guided_keys(record: CallRecord) -> dict[str, str]:
    """Each stream's guided key in ``record.stats`` in stream order ({"": "guided"} for one-stream families)."""
    from normscope.measure.table import stream_keys

    return {stream: key for stream, branch, key in stream_keys(record) if branch == GUIDED}


def _norm_matrix(record: CallRecord, branch: str) -> np.ndarray:
    return record.stats[branch][:, 0, :].double().numpy().T  # (samples, steps)


def _run(pipe, model, config: ProbeConfig, samples: list[Sample], reporter: Reporter, prompts=None) -> CallRecord:
    try:
        return run_model_batches(pipe, model, config, samples, reporter, prompts)
    finally:
        report_truncation(reporter)  # prompts longer than the encoders take: one note


def profile(config: ProfileConfig, reporter: Reporter | None = None, pipe=None, cache_dir: Path | None = None) -> Reference:
    """Run BASE alone over the probe, write ``config.out``/reference.json (+ tensors, thresholds, figure).

    ``pipe`` reuses a pipeline loaded from the same source (sweeps); the prompt embeddings are kept in
    ``OUT/.prompt-embeddings`` (or ``cache_dir``).
    """
    reporter = reporter or SilentReporter()
    prompts = resolve_prompts(config.prompts_file, config.prompts)
    samples = make_samples(prompts, config.seeds, prompt_images(config.prompts_file, config.prompts))
    device, kind = resolve_run_device(config.device)
    dtype = resolve_dtype(config.dtype, kind)
    source = find_pipeline_source(config.base, None, config.pipeline)
    check_family_inputs(source, [(config.base, "BASE")], config)
    base_ckpt = None if Path(config.base).resolve() == Path(source).resolve() else find_checkpoint(config.base, "BASE", allow_pickle=config.allow_pickle)
    if base_ckpt is not None and base_ckpt.is_lora:
        raise InputError(f"BASE {config.base} is a LoRA: profile the model a LoRA was trained from (the pipeline)")
    main = current_processes().is_main
    with RunFolder(config.out, main=main, note=reporter.note) as folder:  # checked and locked before anything loads
        reference = _profile(config, reporter, pipe, cache_dir, prompts, samples, device, dtype, source, base_ckpt)
        if main:
            folder.publish(lambda staging: _write_reference(reference, config, staging), reference_fingerprint(reference),
                           REFERENCE_KIND, known=REFERENCE_OUTPUTS)
    return reference


def reference_fingerprint(reference: Reference) -> str:
    """What a reference's numbers depend on: its probe, pipeline, prompts and weights (its hashes)."""
    import hashlib

    text = json.dumps([reference.meta["config"]["probe"], reference.meta["hashes"]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_reference(reference: Reference, config: ProfileConfig, staging: Path) -> list[Path]:
    written = reference.save(staging)
    if config.figure:
        from normscope.render.figures import reference_figure, save_png

        written.append(save_png(reference_figure(reference.meta), staging / REFERENCE_PNG))
    return written


def _profile(config: ProfileConfig, reporter: Reporter, pipe, cache_dir: Path | None, prompts: list[str],
             samples: list[Sample], device: str, dtype, source: str, base_ckpt) -> Reference:
    check_samples = samples[: min(DTYPE_CHECK_SAMPLES, len(samples))] if config.dtype_check else []
    calls = -(-len(samples) // config.batch_size) + -(-len(check_samples) // config.batch_size)
    reporter.begin(calls * config.steps)

    batches = prompt_batches(samples, config.batch_size) + prompt_batches(check_samples, config.batch_size)
    embeddings = prepare_prompts(source, batches, config, dtype, device,
                                 cache_dir if cache_dir is not None else config.out / CACHE_DIR, pipe=pipe,
                                 note=reporter.note)
    if pipe is None:
        pipe = load_pipeline(source, dtype, device, parts="denoiser" if embeddings is not None else "all", place=False)
    check_run_fits(pipe, config, device, config.max_device_memory, embeddings)  # one transformer: the base
    place_denoiser(pipe, device)
    base, _ = load_base(pipe, config.base, source, config.allow_pickle)
    with _latent_size(base.module) as latent:
        record = _run(pipe, base, config, samples, reporter, embeddings)
    resolved = resolved_sampling(pipe, config)
    defaults_note = default_settings_note(pipe, config)
    if defaults_note:
        reporter.note(defaults_note)
    sampled_note = sampled_settings_note(pipe, config)
    if sampled_note:
        reporter.note(sampled_note)

    guided = _norm_matrix(record, GUIDED)
    sigmas = record.sigmas.double().numpy()
    dtype_floor = None
    if check_samples:
        # Only the transformers (every expert) are cast, on a few samples: the question is their precision, and
        # the embeddings (cast to their dtype by the prompt cache) are the same for both runs. A pipeline that
        # encodes its own prompts (no cache row for its class) is cast whole, so its encoders' output matches.
        alt = "bfloat16" if dtype != _torch_dtype("bfloat16") else "float32"
        # Every module the call runs besides the encoders: the transformers, and what runs on the cached embeddings
        # inside the call (LTX-2's text connectors: left in float32 they refuse the bfloat16 embeddings).
        import torch

        experts = [getattr(pipe, attr, None) for attr, _ in family_for(type(pipe).__name__).experts]
        others = [m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)
                  and not any(word in name for word in ("encoder", "vae", "vocoder"))]  # not run on the embeddings
        cast = list({id(m): m for m in [*experts, *others] if m is not None}.values()) if embeddings is not None else [pipe]
        with quiet_loading():  # diffusers warns about casting with .to(); the cast is the point here
            for part in cast:
                part.to(dtype=_torch_dtype(alt))
        try:
            alt_record = _run(pipe, base, config, check_samples, reporter, embeddings)
        finally:
            with quiet_loading():
                for part in cast:
                    part.to(dtype=dtype)
    # issue 19: every stream of a multi-stream family (LTX-2: video, audio) gets its own noise floor and gate;
    # suggestions.gate is the headline's (the first stream's), suggestions.gate_by_stream each stream's.
    gates = {}
    for stream, key in _guided_keys(record).items():
        matrix = _norm_matrix(record, key)
        floor = None
        if check_samples:
            ratio = _norm_matrix(alt_record, key) / matrix[: len(check_samples)]
            floor = float(abs(sigma_integral(np.nanmean(ratio, axis=0), sigmas) - 1.0))
        spread_s = subset_spread(matrix, sigmas, [s.prompt_id for s in samples])
        gates[stream] = {**suggest_gate(spread_s, floor), "noise_floor": {
            "prompt_subset_spread": None if not math.isfinite(spread_s) else spread_s, "dtype_difference": floor}}
    headline = next(iter(gates))
    spread = gates[headline]["noise_floor"]["prompt_subset_spread"]
    spread = float("nan") if spread is None else spread
    dtype_floor = gates[headline]["noise_floor"]["dtype_difference"]
    gate = {k: v for k, v in gates[headline].items() if k != "noise_floor"}

    warnings = []
    if len(samples) < MIN_SAMPLES:
        warnings.append(f"only {len(samples)} samples: percentiles, tau and the subset spread are unreliable below {MIN_SAMPLES}; add prompts or seeds")
    if len(prompts) < 8:
        warnings.append(f"only {len(prompts)} prompts: the reference describes these prompts, not the model's typical use")
    per_step = {}
    norms = {}
    for branch in record.stats:
        matrix = _norm_matrix(record, branch)
        norms[branch] = matrix.astype(np.float32)
        stats = _percentiles(matrix)
        rows = []
        for i in range(matrix.shape[1]):
            row = {"step": i, "timestep": float(record.timesteps[i]), "sigma": float(record.sigmas[i])}
            row.update({k: _clean([v[i]])[0] for k, v in stats.items()})
            row["tau"] = row["p95"]
            row["tau_rms"] = None if row["tau"] is None or not latent.elements else row["tau"] / math.sqrt(latent.elements)
            rows.append(row)
        per_step[branch] = rows
    meta = {
        "format": FORMAT_VERSION,
        "config": {"probe": {k: config.to_dict()[k] for k in PROBE_FIELDS}, "pipeline_source": source,
                   "base": config.base, "device": device, "torch_dtype": str(dtype).removeprefix("torch."),
                   "batch_size": config.batch_size, "resolved": resolved},
        "hashes": {"prompts": prompts_digest(prompts), "seeds": list(config.seeds),
                   "pipeline": pipeline_fingerprint(source),
                   "weights": base_weights_fingerprint(source, base_ckpt)},
        "n_samples": len(samples),
        "latent_elements": latent.elements,
        "nonfinite": int((~np.isfinite(guided)).sum()),
        "samples": [{"prompt_id": s.prompt_id, "prompt": s.prompt, "seed": s.seed} for s in samples],
        "per_step": per_step,
        "suggestions": {
            "tau": {"column": "tau", "rule": f"p{TAU_PERCENTILE} of the base's own norms at each step (thresholds.csv)",
                    "per_element": "tau_rms = tau / sqrt(latent_elements): the same threshold at any resolution",
                    "use": "static hinge relu(||v_theta|| - tau(sigma)) when no reference forward is affordable; "
                           "normscope.guard.load_tau(DIR, branch) reads it per branch"},
            "gate": {**gate, "noise_floor": {"prompt_subset_spread": None if not math.isfinite(spread) else spread,
                                             "dtype_difference": dtype_floor}},
            **({"gate_by_stream": gates} if len(gates) > 1 else {}),
        },
        "streams": [name for name in gates if name],  # issue 19: the streams this reference holds ([]: one)
        "warnings": warnings,
        "versions": versions(),
    }
    return Reference(meta, norms, record.timesteps.double().numpy(), record.sigmas.double().numpy())


class _LatentSize:
    elements: int | None = None


@contextlib.contextmanager
def _latent_size(module):
    """Record the latent elements per sample of the velocities ``module`` returns (for per-element thresholds)."""
    size = _LatentSize()

    def hook(_module, _args, output):
        v = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if isinstance(v, (tuple, list)):  # list-of-samples models (Z-Image)
            v = v[0][None]
        if size.elements is None and hasattr(v, "numel") and v.ndim > 0:
            size.elements = int(v[0].numel())

    handle = module.register_forward_hook(hook)
    try:
        yield size
    finally:
        handle.remove()


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def probe_from_reference(reference: Reference, device: Device, dtype: DType, batch_size: int) -> ProbeConfig:
    """The stored probe as a config, with this machine's hardware options."""
    stored = reference.probe
    return ProbeConfig(
        prompts=tuple(s["prompt"] for s in _unique_prompts(reference.meta["samples"])), seeds=tuple(stored["seeds"]),
        steps=stored["steps"], guidance=stored["guidance"], height=stored["height"], width=stored["width"],
        negative_prompt=stored["negative_prompt"], max_sequence_length=stored["max_sequence_length"],
        true_cfg_scale=stored.get("true_cfg_scale"), num_frames=stored.get("num_frames"), image=stored.get("image"),
        **{name: stored.get(name) for name in FAMILY_SETTINGS},  # issue 19: absent from older references: None
        device=device, dtype=dtype, batch_size=batch_size,
    )


def _unique_prompts(samples: list[dict]) -> list[dict]:
    seen, out = set(), []
    for s in samples:
        if s["prompt_id"] not in seen:
            seen.add(s["prompt_id"])
            out.append(s)
    return out
