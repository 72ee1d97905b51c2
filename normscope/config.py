"""Typed configs, one per job, and every default in one place.

Field names equal the CLI flag names (``prompts_file`` is ``--prompts``; ``prompts`` is the
repeatable ``--prompt``), so a notebook and a shell user speak the same language.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from normscope.errors import ConfigError

DEFAULT_SEEDS: tuple[int, ...] = (0, 1)
DEFAULT_STEPS = 28  # diffusers' default for both SD3 and FLUX
DEFAULT_BATCH_SIZE = 8
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
# The headline estimate of inflation (see docs/compare.md): the sigma-integral does not depend on --steps or
# the scheduler's shift, the step mean does. Both are always in summary.json.
HEADLINE_ESTIMATE = "sigma_integral"


class Mode(str, Enum):
    """How the two models are put side by side."""

    paired = "paired"  # one model drives; the other is evaluated on exactly the same inputs
    free = "free"  # each model follows its own trajectory from the same noise
    both = "both"  # paired, then free

    def runs(self) -> tuple[str, ...]:
        return ("paired", "free") if self is Mode.both else (self.value,)


class Drive(str, Enum):
    """Which model's velocity moves the latents in paired mode."""

    tuned = "tuned"
    base = "base"


class DType(str, Enum):
    auto = "auto"  # bfloat16 on CUDA, float32 elsewhere
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


# torch's CPU generator takes seeds up to 2**64 - 1; normscope stores them as int64 (norms.csv, the batch store).
SEED_MAX = 2**63 - 1
SEED_RANGE = f"0 to {SEED_MAX} (2**63 - 1)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _positive(name: str, value: int | float | None, fix: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{_flag(name)} must be positive, got {value}: {fix}")


FLOAT_EXAMPLES = {"guidance": "4.5", "true_cfg_scale": "4.0", "max_inflation": "0.05", "min_inflation": "0.0",
                  "gate": "0.05", "max_grid_score": "3"}


def check_finite(name: str, value: float | None) -> None:
    """A float option must be a finite number: nan and inf (also 1e309) are refused, naming the option."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{_flag(name)} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{_flag(name)} must be a finite number, got {value}: "
                          f"pass e.g. {_flag(name)} {FLOAT_EXAMPLES.get(name, '1.0')}")


def check_whole(name: str, value: int | None) -> None:
    """An integer option given through the Python API must be an integer (not 63.5, not True)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ConfigError(f"{_flag(name)} must be an integer, got {value!r}")


def check_seeds(seeds) -> tuple[int, ...]:
    """Seeds as a tuple of ints in the generator's range, each once; refused otherwise, naming the seed."""
    checked = []
    for seed in seeds:
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seed = int(seed)
        else:
            if isinstance(seed, float) and seed.is_integer():
                seed = int(seed)
            elif isinstance(seed, str) and seed.strip().isdigit():
                seed = int(seed)
            else:
                raise ConfigError(f"--seeds holds {seed!r}, not an integer seed: use e.g. --seeds 0,1,2,3")
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(f"--seeds {seed} is out of range: seeds are {SEED_RANGE}")
        checked.append(seed)
    if not checked:
        raise ConfigError("--seeds is empty: give at least one seed, e.g. --seeds 0,1")
    if len(set(checked)) != len(checked):
        raise ConfigError(f"--seeds {checked} repeats a seed: each seed must appear once")
    return tuple(checked)


MAX_SEED_RANGE = 1_000_000  # one range of --seeds: more samples than any probe needs, and a bounded list


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' or '0-7' or a mix -> a tuple of ints; a clear error otherwise (negatives and out-of-range too)."""
    seeds: list[int] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-") if not part.startswith("-") else ("", "", "")
        if not (lo.isdecimal() and lo.isascii()) or (sep and not (hi.isdecimal() and hi.isascii())):
            if part.startswith("-") and part[1:].isdecimal():
                raise ConfigError(f"--seeds {part} is negative: seeds are {SEED_RANGE}")
            raise ConfigError(f"--seeds '{text}' is not a list of integer seeds: use e.g. 0,1,2,3 or 0-7")
        if max(len(lo), len(hi)) > len(str(SEED_MAX)):  # before int(): Python refuses to parse 4300+ digits
            shown = part if len(part) <= 40 else part[:40] + "..."
            raise ConfigError(f"--seeds {shown} is out of range: seeds are {SEED_RANGE}")
        first, last = int(lo), int(hi) if sep else int(lo)
        for seed in (first, last):
            if seed > SEED_MAX:
                raise ConfigError(f"--seeds {seed} is out of range: seeds are {SEED_RANGE}")
        if last < first:
            raise ConfigError(f"--seeds {part} is an empty range: write the low seed first, e.g. {last}-{first}")
        if last - first + 1 > MAX_SEED_RANGE:
            raise ConfigError(f"--seeds {part} is {last - first + 1} seeds: at most {MAX_SEED_RANGE} per range")
        seeds.extend(range(first, last + 1))
    return check_seeds(seeds)


def check_probe_values(config) -> None:
    """The value checks every job shares (ProbeConfig and CheckConfig): integers, finite floats, ranges.

    What depends on the pipeline (a size multiple, 4k + 1 frames) is checked by
    ``normscope.load.pipeline.check_family_inputs``, from the configs on disk, before any weight loads.
    """
    for name in ("steps", "height", "width", "max_sequence_length", "num_frames", "batch_size"):
        check_whole(name, getattr(config, name, None))
    for name in ("guidance", "true_cfg_scale"):
        check_finite(name, getattr(config, name, None))
    _positive("steps", config.steps, "use e.g. --steps 28")
    _positive("batch_size", getattr(config, "batch_size", None), "use e.g. --batch-size 8")
    _positive("height", config.height, "use a multiple of 16, e.g. --height 512")
    _positive("width", config.width, "use a multiple of 16, e.g. --width 512")
    _positive("max_sequence_length", config.max_sequence_length, "leave it unset for the pipeline's own")
    _positive("num_frames", config.num_frames, "use 4k + 1 frames, e.g. --num-frames 81 (Wan)")
    if config.guidance is not None and config.guidance < 0:
        raise ConfigError(f"--guidance must be >= 0, got {config.guidance}")
    if config.true_cfg_scale is not None and config.true_cfg_scale < 0:
        raise ConfigError(f"--true-cfg-scale must be >= 0, got {config.true_cfg_scale}")
    # --shift (issue 19): the scheduler's timestep shift, sigma' = s sigma / (1 + (s - 1) sigma); 1 is no shift.
    shift = getattr(config, "shift", None)
    if shift is not None:
        if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
            raise ConfigError(f"--shift must be a finite number > 0, got {shift!r}: e.g. --shift 3.0 (1.0 is no shift)")


# ---- LTX-2's guidance and Wan V2V's strength (issue 19): ProbeConfig fields, each a CALL_OPTIONS keyword.
VIDEO_CALL_SETTINGS = ("strength", "stg_scale", "stg_blocks", "modality_scale", "guidance_rescale", "audio_guidance",
                       "audio_stg_scale", "audio_modality_scale", "audio_guidance_rescale", "frame_rate", "cross_timestep")
# LTX2Pipeline reads an audio setting of 0 as unset (``audio_stg_scale or stg_scale``): 0 means "the video's value",
# which is also how Flow-Factory's LTX-2 evaluation reads its null audio settings (the presets carry 0 for them).


def check_video_settings(config) -> None:
    """LTX-2's and Wan V2V's call settings: finite, in range, one line with the fix (family checks come later,
    before loading: ``check_call_options`` and ``check_stg_blocks`` in normscope.load.pipeline)."""
    for name, low, high, fix in (
        ("stg_scale", 0, None, "0 with --audio-stg-scale 0 turns STG off, e.g. --stg-scale 1.0"),
        ("modality_scale", 0, None, "1 turns it off, e.g. --modality-scale 3.0"),
        ("guidance_rescale", 0, 1, "0 turns it off, e.g. --guidance-rescale 0.7"),
        ("audio_guidance", 0, None, "e.g. --audio-guidance 7.0"),
        ("audio_stg_scale", 0, None, "e.g. --audio-stg-scale 1.0"),
        ("audio_modality_scale", 0, None, "e.g. --audio-modality-scale 3.0"),
        ("audio_guidance_rescale", 0, 1, "e.g. --audio-guidance-rescale 0.7"),
    ):
        value = getattr(config, name, None)
        if value is None:
            continue
        check_finite(name, value)
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise ConfigError(f"{_flag(name)} must be {span}, got {value}: {fix}")
    strength = getattr(config, "strength", None)
    if strength is not None:
        check_finite("strength", strength)
        if not 0 < strength <= 1:
            raise ConfigError(f"--strength is the fraction of the steps run on the noised input video, got {strength}: "
                              "use 0 < s <= 1, e.g. --strength 0.8")
        steps = getattr(config, "steps", None)
        if steps is not None and int(steps * strength) < 1:
            raise ConfigError(f"--strength {strength} of --steps {steps} runs int({steps} x {strength}) = 0 steps: "
                              f"raise --strength to at least {1 / steps:g} or --steps to at least {math.ceil(1 / strength)}")
    cross = getattr(config, "cross_timestep", None)
    if cross is not None and not isinstance(cross, bool):
        raise ConfigError(f"--cross-timestep must be true or false, got {cross!r}: use --cross-timestep or --no-cross-timestep")
    frame_rate = getattr(config, "frame_rate", None)
    if frame_rate is not None:
        check_finite("frame_rate", frame_rate)
        if frame_rate <= 0:
            raise ConfigError(f"--frame-rate must be positive, got {frame_rate}: e.g. --frame-rate 24")
    blocks = getattr(config, "stg_blocks", None)
    if blocks is not None:
        if isinstance(blocks, (str, bytes)) or not all(isinstance(i, numbers.Integral) for i in blocks):
            raise ConfigError(f"--stg-blocks {blocks!r} must name transformer blocks by index, e.g. --stg-blocks 28")
        config.stg_blocks = tuple(int(i) for i in blocks)
        if not config.stg_blocks or any(i < 0 for i in config.stg_blocks):
            raise ConfigError(f"--stg-blocks {list(config.stg_blocks)} must name transformer blocks (indices >= 0), "
                              "e.g. --stg-blocks 28 (LTX-2.3's); STG is turned off with --stg-scale 0 --audio-stg-scale 0")


def normalize_images(value) -> Path | tuple[Path, ...] | None:
    """``--image``, given once or repeated: one ``Path``, a tuple of several (in order), or ``None``; every file must
    exist (issue 19: several condition images per sample)."""
    if value is None:
        return None
    paths = [Path(v) for v in value] if isinstance(value, (list, tuple)) else [Path(value)]
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"--image {path} does not exist: pass the conditioning image file (PNG, JPEG, ...)")
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else tuple(paths)


@dataclass(kw_only=True)
class FamilySettings:
    """Settings of one family's pipeline call (issue 19), shared by ProbeConfig and CheckConfig; each goes to one call
    keyword where the family's pipeline takes it (``measure.sampling.CALL_OPTIONS``), except ``shift``, which
    rebuilds the scheduler (``load.scheduler_shift``). ``None``: the preset's, else the pipeline's own.

    Wan2.2's second-expert guidance (guidance_scale_2); SD3's skip-layer guidance (skip_guidance_layers and its
    scale, start and stop); Z-Image's CFG norm cap (cfg_normalization: 0 off, k caps ||v|| at k ||cond||) and
    truncation (CFG off once t/1000 > cfg_truncation); Wan V2V's strength; LTX-2's guidance (VIDEO_CALL_SETTINGS);
    the scheduler's timestep shift.
    """

    guidance_2: float | None = None
    skip_layers: tuple[int, ...] | None = None
    skip_layer_scale: float | None = None
    skip_layer_start: float | None = None
    skip_layer_stop: float | None = None
    cfg_normalization: float | None = None
    cfg_truncation: float | None = None
    # LTX-2's guidance and Wan V2V's strength (issue 19, VIDEO_CALL_SETTINGS; checked by _check_video_settings).
    strength: float | None = None
    stg_scale: float | None = None
    stg_blocks: tuple[int, ...] | None = None
    modality_scale: float | None = None
    guidance_rescale: float | None = None
    audio_guidance: float | None = None
    audio_stg_scale: float | None = None
    audio_modality_scale: float | None = None
    audio_guidance_rescale: float | None = None
    frame_rate: float | None = None
    cross_timestep: bool | None = None  # LTX-2's use_cross_timestep (True: LTX-2.3's cross-attention timestep)
    # The scheduler's timestep shift (issue 19), None: the scheduler's own (see normscope/load/scheduler_shift.py).
    shift: float | None = None


# The FamilySettings field names, in order (what a reference stores and a stored check must agree on).
FAMILY_SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(FamilySettings))


@dataclass(kw_only=True)
class ProbeConfig(FamilySettings):
    """What is sampled: pipeline, prompts, seeds and sampler settings shared by every job.

    ``None`` means "the pipeline's own default" (guidance, size, sequence length, negative prompt).
    ``guidance`` goes to the family's guidance argument (``guidance_scale``, or ``true_cfg_scale`` for
    Qwen-Image); ``true_cfg_scale`` is FLUX.1's true CFG (with a negative prompt: two calls per step).
    ``preset`` fills every option left unset (``None``) from a trainer's evaluation setting
    (``normscope presets``); explicit options win. ``steps`` left unset becomes the preset's or 28.
    """

    pipeline: str | None = None
    prompts_file: Path | None = None
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    steps: int | None = None
    guidance: float | None = None
    true_cfg_scale: float | None = None
    preset: str | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None
    num_frames: int | None = None  # video pipelines (Wan): frames of the generated video
    # the conditioning image, for every sample (edit, image-to-video); several (a tuple, in order) for the pipelines that
    # take a list of condition images (Family.several_images: Qwen-Image-2.1, Qwen-Image-Edit-Plus, FLUX.2)
    image: Path | tuple[Path, ...] | None = None
    video: Path | None = None  # video-to-video pipelines (Wan V2V): the input video, for every sample
    dtype: DType = DType.auto
    device: Device = Device.auto
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):  # one prompt given as a string, not a tuple of its characters
            self.prompts = (self.prompts,)
        self.prompts = tuple(self.prompts)
        for prompt in self.prompts:
            if not isinstance(prompt, str):
                raise ConfigError(f"--prompt {prompt!r} is not text: pass each prompt as a string")
        self.seeds = parse_seeds(self.seeds) if isinstance(self.seeds, str) else check_seeds(self.seeds)
        self.dtype = DType(self.dtype)
        self.device = Device(self.device)
        check_finite("guidance", self.guidance)  # before the preset fills unset options
        check_finite("true_cfg_scale", self.true_cfg_scale)
        self._apply_preset()
        if self.prompts_file is not None:
            self.prompts_file = Path(self.prompts_file)
        self.image = normalize_images(self.image)
        if self.video is not None:
            self.video = Path(self.video)
            if not self.video.exists():
                raise ConfigError(f"--video {self.video} does not exist: pass a folder of frames or a video file")
        check_probe_values(self)
        self._check_family_settings()
        check_video_settings(self)

    def _check_family_settings(self) -> None:
        """The per-family call settings (issue 19): finite, in range, one line with the fix."""
        import math

        for name, fix in (("guidance_2", "e.g. --guidance-2 3.0"), ("skip_layer_scale", "e.g. --skip-layer-scale 2.8"),
                          ("cfg_normalization", "0 turns it off, e.g. --cfg-normalization 1.0"),
                          ("cfg_truncation", "1.0 keeps CFG on every step")):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}: {fix}")
        for name in ("skip_layer_start", "skip_layer_stop"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise ConfigError(f"--{name.replace('_', '-')} is a fraction of the steps, got {value}: use 0..1, "
                                  "e.g. --skip-layer-start 0.01 --skip-layer-stop 0.2")
        if self.skip_layers is not None:
            self.skip_layers = tuple(int(i) for i in self.skip_layers)
            if not self.skip_layers or any(i < 0 for i in self.skip_layers):
                raise ConfigError(f"--skip-layers {list(self.skip_layers)} must name transformer blocks (indices >= 0), "
                                  "e.g. --skip-layers 7,8,9 (SD3.5-Medium's)")
        if (self.skip_layers is None and any(getattr(self, n) is not None for n in
                                             ("skip_layer_scale", "skip_layer_start", "skip_layer_stop"))):
            raise ConfigError("--skip-layer-scale/--skip-layer-start/--skip-layer-stop set skip-layer guidance, "
                              "which runs only with --skip-layers (e.g. --skip-layers 7,8,9)")

    def _apply_preset(self) -> None:
        if self.preset is not None:
            from normscope.load.families import family_named, preset_named

            preset = preset_named(self.preset)
            family = family_named(preset.family)
            if self.steps is None:
                self.steps = preset.steps
            if preset.argument == family.guidance_arg:
                if self.guidance is None:
                    self.guidance = preset.guidance
            elif self.true_cfg_scale is None:
                self.true_cfg_scale = preset.guidance
            if preset.size is not None:
                self.height = self.height or preset.size
                self.width = self.width or preset.size
            self.height = self.height or preset.height
            self.width = self.width or preset.width
            for name in preset.FIELDS:  # every other keyword the trainer's evaluation fixes
                if getattr(preset, name) is not None and getattr(self, name) is None:
                    setattr(self, name, getattr(preset, name))
        if self.steps is None:
            self.steps = DEFAULT_STEPS

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field (enums as strings, paths as strings); the family settings after the
        job's own fields, as they read in summary.json."""
        out = {}
        fields = dataclasses.fields(self)
        for f in [f for f in fields if f.name not in FAMILY_SETTINGS] + [f for f in fields if f.name in FAMILY_SETTINGS]:
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[f.name] = value
        return out


@dataclass(kw_only=True)
class CompareConfig(ProbeConfig):
    """``normscope compare``: paired velocity-norm profiles of BASE and TUNED.

    ``base`` and ``tuned`` are checkpoint paths (pipeline folder, transformer folder, ``.safetensors``
    state dict, or for ``tuned`` also a LoRA or a trainer's checkpoint folder). ``base=None`` means the
    pipeline's own transformer. ``adapter`` picks one adapter of a folder holding several;
    ``allow_pickle`` lets ``.bin/.pt`` files load through ``torch.load(weights_only=True)``. ``out``, when set, receives norms.csv, summary.json and
    profile.png, and holds the finished batches of an interrupted run so a rerun resumes.
    ``rescale_to_base`` adds the inference-rescale ablation (mode ``rescaled``): the tuned model samples with its
    guided velocity rescaled at every step to the base's norm on the same input. ``maps`` adds spatial
    maps, spectra and the grid score (paired mode) and image signals (free mode); ``scorer`` is a
    ``module:function`` scoring the final images of free mode (see docs/maps.md).
    """

    tuned: str
    base: str | None = None
    adapter: str | None = None
    allow_pickle: bool = False
    mode: Mode = Mode.paired
    drive: Drive = Drive.tuned
    out: Path | None = None
    figure: bool = True
    save_images: bool = False
    offload: bool = False
    max_device_memory: str | None = None  # e.g. "40GiB"; default: the device's free memory (no check on the CPU)
    encode_once: bool = True  # False: the pipeline encodes the prompts inside every call (the old way; benchmarks)
    rescale_to_base: bool = False
    maps: bool = False
    scorer: str | None = None
    until_decided: float | None = None  # a gate: stop once the anytime-valid interval is wholly above or below it
    precision: float | None = None  # stop once the anytime-valid interval's half-width is at most this
    measure_steps: int | None = None  # paired mode: the other model only at K steps across sigma
    # issue 19: multi-stream families (LTX-2: video, audio): the stream of the headline (default: the first)
    stream: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from normscope.load.device_memory import parse_size
        from normscope.measure.sequential import check_sequential_options

        check_sequential_options(self)

        parse_size(self.max_device_memory)  # a bad size fails here, before anything loads
        self.mode = Mode(self.mode)
        if self.scorer is not None and "free" not in self.mode.runs():
            raise ConfigError("--scorer scores the final images of free-mode sampling: add --mode free or --mode both")
        self.drive = Drive(self.drive)
        if self.out is not None:
            self.out = Path(self.out)
        if self.save_images and "free" not in self.mode.runs():
            raise ConfigError("--save-images saves the final images of free-mode sampling: add --mode free or --mode both")
        if self.save_images and self.out is None:
            raise ConfigError("--save-images needs --out DIR to write the images to")


__all__ = [
    "BOOTSTRAP_RESAMPLES", "CI_LEVEL", "HEADLINE_ESTIMATE", "CompareConfig", "DType", "Device", "Drive", "Mode",
    "OutputFormat", "ProbeConfig", "SEED_MAX", "check_finite", "check_probe_values", "check_seeds",
    "parse_seeds",
]
