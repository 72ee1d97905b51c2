"""What a ``normscope profile`` reference must hold before anything trusts it: reference.json and reference.safetensors.

Every reader of a reference goes through here (``load_reference`` for check and sweep, ``guard.load_tau``, the
monitor's gate): a file that is truncated, edited by hand or written by another tool is refused with an
``InputError`` (exit 2) in one line that names the file, the field and the fix, never a raw KeyError or a NaN
gate that passes everything.

The schema is a table of ``Field`` rows (a dotted path, the accepted kinds, null or not, a range), then the
lists (``samples``, ``per_step``) row by row, then the checks across fields and against the tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normscope.errors import InputError

REFERENCE_JSON = "reference.json"
REFERENCE_TENSORS = "reference.safetensors"
FORMAT_VERSION = 1
# What `normscope check --max-inflation` accepts, and so what a stored gate may be: a fraction in [0, 10).
MAX_INFLATION_LOW, MAX_INFLATION_HIGH = 0.0, 10.0
STATS = ("mean", "std", "p5", "p50", "p95", "tau", "tau_rms")  # per-step statistics: a norm, or null
GUIDED = "guided"


def gate_in_range(value: float) -> bool:
    """The single rule for a maximum inflation, from the command line or from a reference."""
    return MAX_INFLATION_LOW <= value < MAX_INFLATION_HIGH  # False for NaN


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


KINDS = {
    "int": _is_int,
    "number": _is_number,
    "str": lambda v: isinstance(v, str),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "int list": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
    "str list": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "bool": lambda v: isinstance(v, bool),
    # issue 19: one condition image (a path) or several (a list of paths)
    "str or str list": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


@dataclass(frozen=True)
class Field:
    """One field of reference.json: its dotted path, kind, whether null is allowed, and its range."""

    path: str
    kind: str
    nullable: bool = False
    required: bool = True
    low: float | None = None  # numbers: inclusive lower bound; lists: minimum length
    high: float | None = None  # numbers: exclusive upper bound
    doc: str = ""

    def problem(self, value) -> str | None:
        """Why ``value`` does not fit, or None."""
        if value is None:
            return None if self.nullable else f"is null, expected {self._expected()}"
        if not KINDS[self.kind](value):
            return f"is {_show(value)}, expected {self._expected()}"
        if self.kind in ("int", "number"):
            if not math.isfinite(value):
                return f"is {_show(value)}, expected {self._expected()}"
            if self.low is not None and value < self.low:
                return f"is {_show(value)}, expected {self._expected()}"
            if self.high is not None and value >= self.high:
                return f"is {_show(value)}, expected {self._expected()}"
        if self.kind.endswith("list") and self.low is not None and len(value) < self.low:
            return f"is an empty list, expected {self._expected()}"
        return None

    def _expected(self) -> str:
        text = {"int": "an integer", "number": "a finite number", "str": "a string", "dict": "an object", "list": "a list",
                "int list": "a list of integers", "str list": "a list of strings",
                "str or str list": "a string or a list of strings", "bool": "true or false"}[self.kind]
        if self.kind in ("int", "number"):
            if self.low is not None and self.high is not None:
                text += f" from {self.low:g} up to (not including) {self.high:g}"
            elif self.low is not None:
                text += f" >= {self.low:g}"
        elif self.low:
            text = "a non-empty " + text.removeprefix("a ")
        return text + (" or null" if self.nullable else "")


# The kind of each FamilySettings field, by its annotation (config.FamilySettings is the one list of them).
SETTING_KINDS = {"float | None": ("number", 0), "tuple[int, ...] | None": ("int list", None), "bool | None": ("bool", None)}


def family_settings_fields() -> tuple[Field, ...]:
    """The per-family call settings of ``config.FamilySettings`` as optional, nullable reference fields (a reference
    made before a setting existed does not hold it: read as None); numbers are >= 0."""
    import dataclasses

    from normscope.config import FamilySettings

    fields = []
    for f in dataclasses.fields(FamilySettings):
        kind, low = SETTING_KINDS[f.type]
        fields.append(Field(f"config.probe.{f.name}", kind, nullable=True, required=False, low=low))
    return tuple(fields)


FIELDS = (
    Field("format", "int", doc=f"{FORMAT_VERSION}: the layout version"),
    Field("config", "dict"),
    Field("config.probe", "dict", doc="the sampling options the reference was made with"),
    Field("config.probe.prompts_file", "str", nullable=True),
    Field("config.probe.prompts", "str list", nullable=True),
    Field("config.probe.seeds", "int list", low=1),
    Field("config.probe.steps", "int", low=1),
    Field("config.probe.guidance", "number", nullable=True, low=0),
    Field("config.probe.height", "int", nullable=True, low=1),
    Field("config.probe.width", "int", nullable=True, low=1),
    Field("config.probe.negative_prompt", "str", nullable=True),
    Field("config.probe.max_sequence_length", "int", nullable=True, low=1),
    Field("config.probe.true_cfg_scale", "number", nullable=True, required=False, low=0),
    Field("config.probe.num_frames", "int", nullable=True, required=False, low=1),
    Field("config.probe.image", "str or str list", nullable=True, required=False),
    Field("config.probe.video", "str", nullable=True, required=False),
    *family_settings_fields(),
    Field("config.pipeline_source", "str"),
    Field("config.torch_dtype", "str"),
    Field("config.resolved", "dict", required=False),
    Field("hashes", "dict"),
    Field("hashes.prompts", "str"),
    Field("hashes.pipeline", "str"),
    Field("hashes.weights", "str", nullable=True, required=False),
    Field("n_samples", "int", low=1),
    Field("latent_elements", "int", nullable=True, required=False, low=1),
    Field("nonfinite", "int", low=0),
    Field("samples", "list", low=1, doc="(prompt_id, prompt, seed) per sample, in order"),
    Field("per_step", "dict", doc="per branch, one row per step"),
    Field("suggestions", "dict"),
    Field("suggestions.gate", "dict"),
    Field("suggestions.gate.max_inflation", "number", low=MAX_INFLATION_LOW, high=MAX_INFLATION_HIGH,
          doc="the suggested gate, in the range --max-inflation accepts"),
    # issue 19: multi-stream families (LTX-2); absent in references made before (read as the headline only)
    Field("streams", "str list", required=False, doc="the streams held, headline first; [] for one-stream families"),
    Field("suggestions.gate_by_stream", "dict", required=False, doc="per stream, a gate as suggestions.gate"),
)
SAMPLE_FIELDS = (Field("prompt_id", "int", low=0), Field("prompt", "str"), Field("seed", "int"))
STEP_FIELDS = (Field("step", "int", low=0), Field("timestep", "number"), Field("sigma", "number", low=0),
               *(Field(name, "number", nullable=True, required=False, low=0) for name in STATS))
_MISSING = object()


def _show(value) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else repr(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Where:
    """The file being read, for one-line refusals that name it, the field and the fix."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path, self.folder = path, folder

    def refuse(self, field: str, problem: str):
        raise InputError(f"{self.path}: {field} {problem}; the reference is damaged or was edited: "
                         f"rerun normscope profile BASE --out {self.folder}")


def _lookup(meta: dict, dotted: str):
    value = meta
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _check_fields(obj: dict, fields, where: _Where, prefix: str = "") -> None:
    for spec in fields:
        value = _lookup(obj, spec.path)
        name = prefix + spec.path
        if value is _MISSING:
            if spec.required:
                where.refuse(name, "is missing")
            continue
        problem = spec.problem(value)
        if problem:
            where.refuse(name, problem)


def validate_meta(meta, where: _Where) -> dict:
    """``meta`` (parsed reference.json) against the schema; returns it unchanged, or refuses in one line."""
    if not isinstance(meta, dict):
        where.refuse("the top level", f"is {_show(meta)}, expected an object")
    if _is_int(meta.get("format")) and meta["format"] != FORMAT_VERSION:
        where.refuse("format", f"is {meta['format']}, this normscope reads {FORMAT_VERSION}")
    _check_fields(meta, FIELDS, where)
    probe = meta["config"]["probe"]
    seeds = probe["seeds"]
    if len(set(seeds)) != len(seeds):
        where.refuse("config.probe.seeds", f"repeats a seed ({seeds})")
    samples = meta["samples"]
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            where.refuse(f"samples[{index}]", f"is {_show(sample)}, expected an object")
        _check_fields(sample, SAMPLE_FIELDS, where, f"samples[{index}].")
        if sample["seed"] not in seeds:
            where.refuse(f"samples[{index}].seed", f"is {sample['seed']}, not one of config.probe.seeds {seeds}")
    if meta["n_samples"] != len(samples):
        where.refuse("n_samples", f"is {meta['n_samples']} but samples lists {len(samples)}")
    per_step = meta["per_step"]
    if GUIDED not in per_step:
        where.refuse("per_step", f"has no {GUIDED!r} branch (it has {sorted(per_step)})")
    steps = probe["steps"]
    for branch, rows in per_step.items():
        name = f"per_step.{branch}"
        if not isinstance(rows, list):
            where.refuse(name, f"is {_show(rows)}, expected a list of rows")
        if len(rows) != steps:
            where.refuse(name, f"has {len(rows)} rows but config.probe.steps is {steps}")
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                where.refuse(f"{name}[{index}]", f"is {_show(row)}, expected an object")
            _check_fields(row, STEP_FIELDS, where, f"{name}[{index}].")
            if row["step"] != index:
                where.refuse(f"{name}[{index}].step", f"is {row['step']}, expected {index}")
    _check_streams(meta, where)
    return meta


def _check_streams(meta: dict, where: _Where) -> None:
    """Each stored stream after the first has its rows (``<stream>:guided``); each per-stream gate is in range."""
    streams = meta.get("streams") or []
    if len(set(streams)) != len(streams):
        where.refuse("streams", f"repeats a stream ({streams})")
    for stream in streams[1:]:
        if f"{stream}:{GUIDED}" not in meta["per_step"]:
            where.refuse("per_step", f"has no '{stream}:{GUIDED}' rows but streams lists {stream!r}")
    spec = next(f for f in FIELDS if f.path == "suggestions.gate.max_inflation")
    for stream, gate in (meta["suggestions"].get("gate_by_stream") or {}).items():
        name = f"suggestions.gate_by_stream.{stream}"
        if stream not in streams:
            where.refuse(name, f"is a stream the reference does not hold (streams: {streams})")
        value = gate.get("max_inflation", _MISSING) if isinstance(gate, dict) else _MISSING
        problem = "is missing" if value is _MISSING else spec.problem(value)
        if problem:
            where.refuse(f"{name}.max_inflation", problem)


def read_meta(path: Path, folder: Path | None = None) -> dict:
    """Parse and validate a reference.json; every failure is an InputError naming the file."""
    where = _Where(path, folder if folder is not None else path.parent)
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        where.refuse("the file", f"is not valid JSON ({type(exc).__name__}: {reason})")
    return validate_meta(meta, where)


def read_tensors(path: Path, meta: dict, folder: Path | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Read reference.safetensors and check it against its (validated) reference.json.

    Returns ``(norms per branch, timesteps, sigmas)``: norms (n_samples, n_steps) for every branch of
    ``per_step``, timesteps and sigmas (n_steps,) agreeing with the per-step rows.
    """
    from safetensors import safe_open

    where = _Where(path, folder if folder is not None else path.parent)
    try:
        with safe_open(str(path), framework="np") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # SafetensorError, a truncated or zero-byte file, an unreadable dtype
        reason = str(exc).splitlines()[0][:80] if str(exc) else ""
        where.refuse("the file", f"is not a readable safetensors file ({type(exc).__name__}: {reason})")
    n_samples, n_steps = meta["n_samples"], meta["config"]["probe"]["steps"]
    norms = {}
    for branch in meta["per_step"]:
        key = f"norms/{branch}"
        if key not in tensors:
            where.refuse(key, f"is missing (reference.json has per_step.{branch})")
        matrix = tensors[key]
        if matrix.shape != (n_samples, n_steps):
            where.refuse(key, f"has shape {tuple(matrix.shape)}, expected (n_samples, steps) = ({n_samples}, {n_steps}) "
                              "from reference.json")
        if matrix.dtype.kind != "f":
            where.refuse(key, f"has dtype {matrix.dtype}, expected floating point")
        if (matrix[np.isfinite(matrix)] < 0).any():
            where.refuse(key, "holds a negative norm")
        norms[branch] = matrix
    nonfinite = int((~np.isfinite(norms[GUIDED])).sum())
    if nonfinite != meta["nonfinite"]:
        where.refuse(f"norms/{GUIDED}", f"has {nonfinite} non-finite values but reference.json's nonfinite is {meta['nonfinite']}")
    rows = meta["per_step"][GUIDED]
    axes = {}
    for key, column in (("timesteps", "timestep"), ("sigmas", "sigma")):
        if key not in tensors:
            where.refuse(key, "is missing")
        values = tensors[key]
        if values.shape != (n_steps,) or values.dtype.kind != "f":
            where.refuse(key, f"has shape {tuple(values.shape)} and dtype {values.dtype}, expected ({n_steps},) floating point")
        if not np.isfinite(values).all():
            where.refuse(key, "holds a non-finite value")
        stored = np.array([r[column] for r in rows], dtype=np.float64)
        if not np.allclose(values.astype(np.float64), stored, rtol=1e-5, atol=1e-6):
            where.refuse(key, f"does not match per_step.{GUIDED}[*].{column} in reference.json (files from two profiles?)")
        axes[key] = values
    return norms, axes["timesteps"], axes["sigmas"]


def read_gate(path: Path) -> float:
    """Only the suggested gate of a reference.json (the monitor needs nothing else), checked like the rest."""
    where = _Where(path, path.parent)
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError, OSError) as exc:
        where.refuse("the file", f"is not valid JSON ({type(exc).__name__})")
    spec = next(f for f in FIELDS if f.path == "suggestions.gate.max_inflation")
    value = _lookup(meta, spec.path) if isinstance(meta, dict) else _MISSING
    if value is _MISSING:
        where.refuse(spec.path, "is missing")
    problem = spec.problem(value)
    if problem:
        where.refuse(spec.path, problem)
    return float(value)


def field_list(fields=FIELDS) -> list[str]:
    """The dotted paths the schema checks (docs/profile.md lists them)."""
    return [f.path for f in fields]


__all__ = ["FIELDS", "Field", "FORMAT_VERSION", "gate_in_range", "read_gate", "read_meta", "read_tensors",
           "validate_meta"]
