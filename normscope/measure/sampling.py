"""Sampling: run a pipeline over (prompt, seed) batches with capture attached, for every job.

The pipeline call is the user's own diffusers call; normscope only chooses its keyword arguments (one CPU
generator per sample) and attaches capture around it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from normscope import __version__
from normscope.config import ProbeConfig
from normscope.errors import InputError
from normscope.load import VelocityModel
from normscope.load.families import TRUE_CFG_SCALE, Family, family_for
from normscope.load.scheduler_shift import scheduler_shift, shifted, shifted_scheduler
from normscope.measure.capture import CallRecord, StepObserver, capture, cfg_argument
from normscope.measure.prompt_cache import PromptCache
from normscope.measure.prompts import Sample
from normscope.measure.table import RESCALED
from normscope.measure.truncation import quiet_tokenizers


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
    """Consecutive samples, at most ``size`` per call; a call never mixes conditioning images (a pairs file's rows),
    because the image pipelines take one image, or one list of condition images (Qwen-Image-2.1, FLUX.2), per call
    and use it for the whole batch: a call's samples have the same image, or the same tuple of images in order."""
    batch: list[Sample] = []
    for sample in samples:
        if batch and (len(batch) == size or sample.image != batch[0].image):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


# Probe options that go to one keyword of the pipeline call, unchanged, where the family's pipeline takes it
# (issue 19): (call keyword, ProbeConfig field, CLI flag). Checked before loading (``check_call_options``).
CALL_OPTIONS = (
    ("guidance_scale_2", "guidance_2", "guidance-2"),
    ("skip_guidance_layers", "skip_layers", "skip-layers"),
    ("skip_layer_guidance_scale", "skip_layer_scale", "skip-layer-scale"),
    ("skip_layer_guidance_start", "skip_layer_start", "skip-layer-start"),
    ("skip_layer_guidance_stop", "skip_layer_stop", "skip-layer-stop"),
    ("cfg_normalization", "cfg_normalization", "cfg-normalization"),
    ("cfg_truncation", "cfg_truncation", "cfg-truncation"),
    # LTX-2's guidance and Wan V2V's strength (issue 19; config.VIDEO_CALL_SETTINGS)
    ("strength", "strength", "strength"),
    ("stg_scale", "stg_scale", "stg-scale"),
    ("spatio_temporal_guidance_blocks", "stg_blocks", "stg-blocks"),
    ("modality_scale", "modality_scale", "modality-scale"),
    ("guidance_rescale", "guidance_rescale", "guidance-rescale"),
    ("audio_guidance_scale", "audio_guidance", "audio-guidance"),
    ("audio_stg_scale", "audio_stg_scale", "audio-stg-scale"),
    ("audio_modality_scale", "audio_modality_scale", "audio-modality-scale"),
    ("audio_guidance_rescale", "audio_guidance_rescale", "audio-guidance-rescale"),
    ("frame_rate", "frame_rate", "frame-rate"),
    ("use_cross_timestep", "cross_timestep", "cross-timestep"),
)


def call_option_values(probe) -> dict:
    """The CALL_OPTIONS the probe sets, as call keywords (lists where the pipeline wants a list)."""
    out = {}
    for keyword, field_name, _ in CALL_OPTIONS:
        value = getattr(probe, field_name, None)
        if value is not None:
            out[keyword] = list(value) if isinstance(value, tuple) else value
    return out


def _call_defaults(pipe) -> dict:
    return {
        name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def negative_prompt_used(pipeline, probe: ProbeConfig, family: Family | None = None) -> str | None:
    """The negative prompt the run passes: ``--negative-prompt``, else " " for a family whose CFG runs only with
    a negative prompt when its CFG scale is above 1 (the trainers' evaluation does the same), else none.

    ``pipeline`` is a pipeline or its class: the prompt cache decides this before any pipeline is loaded.
    """
    family = family or family_for(pipeline.__name__ if isinstance(pipeline, type) else type(pipeline).__name__)
    if probe.negative_prompt is not None:
        return probe.negative_prompt
    accepted = _call_defaults(pipeline)
    if not family.needs_negative_prompt or "negative_prompt" not in accepted:
        return None
    argument = cfg_argument(family)
    scale = probe.guidance if argument == family.guidance_arg and probe.guidance is not None else None
    if argument == family.true_cfg_arg and argument != family.guidance_arg:
        scale = probe.true_cfg_scale
    scale = scale if scale is not None else accepted.get(argument)
    return " " if scale is not None and float(scale) > 1 else None


def sampling_kwargs(pipe, probe: ProbeConfig, samples: list[Sample], family: Family | None = None,
                    prompts: PromptCache | None = None) -> dict:
    """The keyword arguments of the pipeline call for one batch; unset options stay the pipeline's.

    The family row decides the names: ``--guidance`` goes to the family's guidance argument
    (``true_cfg_scale`` for Qwen-Image), ``--true-cfg-scale`` to FLUX.1's true CFG, and a family whose
    CFG runs only with a negative prompt gets " " when its CFG scale is above 1 and none was given (the
    trainers' evaluation does the same). The prompt always goes by keyword (FLUX.2-klein's first
    positional argument is ``image``).

    Each sample gets its own CPU generator, so its initial noise is exactly what the pipeline draws
    for that prompt alone with ``generator=torch.Generator("cpu").manual_seed(seed)``, whatever the batch.
    With ``prompts`` (a cache that holds this batch), the prompts go in as embeddings, in the
    transformer's dtype, and the pipeline never runs a text encoder.
    """
    family = family or family_for(type(pipe).__name__)
    accepted = _call_defaults(pipe)
    kwargs = {
        "prompt": [s.prompt for s in samples],
        "num_inference_steps": probe.steps,
        "generator": [torch.Generator("cpu").manual_seed(s.seed) for s in samples],
        "output_type": "latent",
    }
    if probe.true_cfg_scale is not None and family.true_cfg_arg is None and family.guidance_arg != TRUE_CFG_SCALE:
        raise InputError(f"{type(pipe).__name__} ({family.name}) has no true CFG: drop --true-cfg-scale")
    true_cfg = probe.true_cfg_scale if family.guidance_arg != TRUE_CFG_SCALE else None
    if probe.true_cfg_scale is not None and family.guidance_arg == TRUE_CFG_SCALE:
        raise InputError(f"{family.name} takes its true CFG scale from --guidance: use --guidance instead of --true-cfg-scale")
    optional = {
        family.guidance_arg: (probe.guidance, "guidance"),
        "height": (probe.height, "height"),
        "width": (probe.width, "width"),
        "max_sequence_length": (probe.max_sequence_length, "max-sequence-length"),
        "num_frames": (probe.num_frames, "num-frames"),
        "negative_prompt": (None if probe.negative_prompt is None else [probe.negative_prompt] * len(samples),
                            "negative-prompt"),
    }
    if family.true_cfg_arg:
        optional[family.true_cfg_arg] = (true_cfg, "true-cfg-scale")
    flags = {keyword: flag for keyword, _, flag in CALL_OPTIONS}
    optional.update({keyword: (value, flags[keyword]) for keyword, value in call_option_values(probe).items()})
    for name, (value, flag) in optional.items():
        if value is None:
            continue
        if name not in accepted:
            raise InputError(f"{type(pipe).__name__} does not take {name}: drop --{flag}")
        kwargs[name] = value
    if family.area_arg is not None and (probe.height is not None or probe.width is not None):
        if family.area_arg not in accepted:
            raise InputError(f"{type(pipe).__name__} does not take {family.area_arg}: drop --height/--width")
        height, width = _requested_size(pipe, probe)
        kwargs[family.area_arg] = height * width  # else the pipeline resizes to its default area
    kwargs.update(_conditioning_image(pipe, probe, samples))
    if family.image_per_sample and "image" in kwargs and not isinstance(kwargs["image"], list):
        kwargs["image"] = [kwargs["image"]] * len(samples)  # Qwen-Image-Edit: one image per prompt
    if family.area_arg is not None and "image" in kwargs and probe.height is not None and probe.width is not None:
        # Kontext with a size: the reference image is sampled at that size, as flow_grpo's Kontext evaluation
        # (ref_image.resize((res, res)), max_area=res^2) and Flow-Factory's condition_image_size do; the pipeline's
        # own _auto_resize would take it to one of its preferred ~1024^2 resolutions instead.
        images = kwargs["image"] if isinstance(kwargs["image"], list) else [kwargs["image"]]
        images = [image.resize((probe.width, probe.height)) for image in images]
        kwargs["image"] = images if isinstance(kwargs["image"], list) else images[0]
        if "_auto_resize" in accepted:
            kwargs["_auto_resize"] = False
    if family.condition_size_arg is not None and "image" in kwargs and probe.height and probe.width:
        # Qwen-Image-2.1 resizes every condition image to output_resolution^2 pixels (1024^2 by default) whatever the
        # output size: with a size, the condition images are sampled at the output's area (as Kontext's, above)
        kwargs[family.condition_size_arg] = round((probe.height * probe.width) ** 0.5)
    kwargs.update(_input_video(family, probe, len(samples)))
    negative = negative_prompt_used(pipe, probe, family)
    if negative is not None and "negative_prompt" not in kwargs:
        kwargs["negative_prompt"] = [negative] * len(samples)
    if prompts is not None:
        for name in ("prompt", "negative_prompt", "max_sequence_length"):  # the cache's encoder settings hold them
            kwargs.pop(name, None)
        kwargs.update(prompts.kwargs([s.prompt for s in samples], dtype=pipe.transformer.dtype))
        for component, attribute, value in prompts.encoding.sets:  # state the encoder would have left behind
            if getattr(pipe, component, None) is not None:
                setattr(getattr(pipe, component), attribute, value)
    return kwargs


def _open_image(path, flag: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{flag} {path} is not an image Pillow can read ({exc}): pass a PNG or JPEG") from None


def _open_images(entry, flag: str):
    """One PIL image for a path; a list of them, in order, for a tuple of paths (several condition images)."""
    if isinstance(entry, tuple):
        return [_open_image(path, flag) for path in entry]
    return _open_image(entry, flag)


def _conditioning_image(pipe, probe: ProbeConfig, samples: list[Sample] | None = None) -> dict:
    """``image=`` for edit and image-to-video pipelines.

    With per-sample images (a pairs file's rows) the call gets one image per sample, in sample order; a sample
    without one takes ``--image``. Else ``--image`` is the one image of the whole batch (the pipeline repeats it).
    Several condition images (a tuple: repeated ``--image`` or a row listing images) go as one list, in order,
    for the whole batch (``batches`` never mixes them); checked against the family row before loading.
    """
    parameters = inspect.signature(pipe.__call__).parameters
    takes = "image" in parameters
    per_sample = [s.image for s in samples or []]
    if any(per_sample):
        if not takes:
            raise InputError(f"{type(pipe).__name__} does not take an image: drop the image column of --prompts")
        if len(set(per_sample)) == 1 and isinstance(per_sample[0], tuple):
            return {"image": _open_images(per_sample[0], "--prompts image")}  # one list of images for the batch
        opened = [_open_image(path, "--prompts image") if path else _open_image(probe.image, "--image")
                  for path in per_sample]
        # ``batches`` keeps one image per call: the pipeline repeats it (Wan I2V takes no list of images)
        return {"image": opened[0] if len(set(per_sample)) == 1 else opened}
    if probe.image is None:
        if takes and parameters["image"].default is inspect.Parameter.empty:
            raise InputError(f"{type(pipe).__name__} generates from an image: pass --image FILE (the first frame)")
        return {}
    if not takes:
        raise InputError(f"{type(pipe).__name__} does not take an image: drop --image")
    return {"image": _open_images(probe.image, "--image")}


def _input_video(family: Family, probe: ProbeConfig, batch: int) -> dict:
    """``video=`` for video-to-video pipelines: the frames of ``--video``, one copy per sample."""
    video = getattr(probe, "video", None)
    if family.video_arg is None:
        if video is not None:
            raise InputError(f"the {family.name} family does not take an input video: drop --video")
        return {}
    if video is None:
        raise InputError(f"{family.pipeline_classes[0]} generates from a video: pass --video (a folder of frames or a video file)")
    frames = read_video(video)
    return {family.video_arg: [list(frames) for _ in range(batch)]}


def read_video(path) -> list:
    """The frames of ``--video`` as RGB PIL images: a folder of image files (in name order), a file Pillow reads
    (an animated GIF, WebP, PNG or TIFF: every frame), or another video file through diffusers' ``load_video``."""
    from pathlib import Path

    from PIL import Image, ImageSequence, UnidentifiedImageError

    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            frames = []
            for file in files:
                with Image.open(file) as image:
                    frames.append(image.convert("RGB"))
        else:
            try:
                with Image.open(path) as image:
                    frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
            except UnidentifiedImageError:
                from diffusers.utils import load_video

                frames = [frame.convert("RGB") for frame in load_video(str(path))]
    except Exception as exc:  # PIL, imageio and ffmpeg raise many types for an unreadable file
        raise InputError(f"--video {path} cannot be read as frames ({type(exc).__name__}: {exc}): pass a folder of "
                         "PNG/JPEG frames or an animated GIF/WebP") from None
    if not frames:
        raise InputError(f"--video {path} holds no frames: pass a folder of PNG/JPEG frames or an animated GIF/WebP")
    return frames


def guidance_used(pipe, probe: ProbeConfig, family: Family | None = None) -> dict:
    """Which guidance argument the run used and its value (pipeline default filled in), for summary.json."""
    family = family or family_for(type(pipe).__name__)
    defaults = _call_defaults(pipe)
    out = {
        "family": family.name,
        "guidance_argument": family.guidance_arg,
        "guidance": probe.guidance if probe.guidance is not None else defaults.get(family.guidance_arg),
    }
    if family.true_cfg_arg:
        out["true_cfg_scale"] = probe.true_cfg_scale if probe.true_cfg_scale is not None else defaults.get(family.true_cfg_arg)
    return out


def default_settings_note(pipe, probe: ProbeConfig, family: Family | None = None) -> str | None:
    """One line naming the pipeline defaults used when guidance and size were left unset, else None."""
    if probe.guidance is not None and probe.height is not None and probe.width is not None:
        return None
    resolved = resolved_sampling(pipe, probe, family)
    parts = []
    if probe.guidance is None:
        parts.append(f"{resolved['guidance_argument']}={resolved['guidance']}")
    if probe.height is None or probe.width is None:
        parts.append(f"{resolved['height']}x{resolved['width']} px")
    return (f"{resolved['family']}: using the pipeline's defaults {', '.join(parts)} "
            "(set --guidance/--height/--width, or --preset NAME; `normscope presets` lists them)")


def _requested_size(pipe, probe: ProbeConfig) -> tuple[int | None, int | None]:
    """``--height``/``--width``, each filled in from the pipeline's default when unset."""
    defaults = _call_defaults(pipe)
    size = None
    if hasattr(pipe, "default_sample_size") and hasattr(pipe, "vae_scale_factor"):
        size = int(pipe.default_sample_size * pipe.vae_scale_factor)
    return probe.height or defaults.get("height") or size, probe.width or defaults.get("width") or size


def _size_multiple(pipe, family: Family) -> int | None:
    """What each side of the image is rounded down to: one latent patch in pixels (16 for every diffusers model).

    Wan rounds to ``vae_scale_factor_spatial * patch_size`` (``WanPipeline.__call__``); the image pipelines to
    ``vae_scale_factor * 2`` (FLUX, Qwen-Image, Z-Image, FLUX.2 ``prepare_latents``; SD3 refuses other sizes).
    """
    if hasattr(pipe, "vae_scale_factor_spatial"):
        transformer = getattr(pipe, "transformer", None) or getattr(pipe, "transformer_2", None)
        patch = getattr(getattr(transformer, "config", None), "patch_size", None)
        spatial = patch[1] if isinstance(patch, (tuple, list)) else 2
        return int(pipe.vae_scale_factor_spatial) * int(spatial)
    factor = getattr(pipe, "vae_scale_factor", None)
    return None if factor is None else int(factor) * 2


def sampled_frames(pipe, frames: int | None) -> int | None:
    """The frames a video pipeline really samples: Wan rounds ``num_frames`` down to 4k + 1 (``WanPipeline.__call__``)."""
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    if frames is None or temporal is None:
        return frames
    if frames % int(temporal) != 1:
        frames = frames // int(temporal) * int(temporal) + 1
    return max(frames, 1)


def sampled_size(pipe, probe: ProbeConfig, family: Family | None = None) -> tuple[int | None, int | None]:
    """The size the pipeline really samples at.

    Every pipeline rounds each side down to a multiple of one latent patch (16 px for the diffusers models).
    For a family with an ``area_arg`` (FLUX.1-Kontext) the pipeline keeps the aspect ratio of the size it is
    given, rescales it to the area (``height * width`` when normscope passes a size, else the pipeline's
    default ``max_area``) and rounds each side down to a multiple of one latent patch, as
    ``FluxKontextPipeline.__call__`` does (diffusers 0.42).
    """
    family = family or family_for(type(pipe).__name__)
    height, width = _requested_size(pipe, probe)
    if height is None or width is None:
        return height, width
    if family.area_arg is None:
        multiple = _size_multiple(pipe, family)
        if multiple is None:
            return height, width
        return height // multiple * multiple, width // multiple * multiple
    given = probe.height is not None or probe.width is not None
    area = height * width if given else _call_defaults(pipe).get(family.area_arg, height * width)
    aspect = width / height
    multiple = int(pipe.vae_scale_factor) * family.patch_size
    return (round((area / aspect) ** 0.5) // multiple * multiple,
            round((area * aspect) ** 0.5) // multiple * multiple)


def sampled_settings_note(pipe, probe: ProbeConfig, family: Family | None = None) -> str | None:
    """One line when the pipeline samples another size or video length than was asked for, or runs its default
    STG blocks where the transformer has none of them (LTX-2, ``stg_note``), else None."""
    from normscope.load.pipeline import stg_note

    family = family or family_for(type(pipe).__name__)
    notes = [note for note in (_size_note(pipe, probe, family), stg_note(family, getattr(pipe, "transformer", None), probe))
             if note]
    return "; ".join(notes) or None


def _size_note(pipe, probe: ProbeConfig, family: Family) -> str | None:
    if family.area_arg is not None:
        return None  # Kontext's area rule is the documented behaviour of its size options (docs/models.md)
    asked_h, asked_w = probe.height, probe.width
    got_h, got_w = sampled_size(pipe, probe, family)
    asked_f = probe.num_frames
    got_f = sampled_frames(pipe, asked_f)
    parts, asked = [], []
    if (asked_h is not None and asked_h != got_h) or (asked_w is not None and asked_w != got_w):
        parts.append(f"{got_h}x{got_w} px")
        asked.append(f"{probe.height or got_h}x{probe.width or got_w} px")
    if asked_f is not None and asked_f != got_f:
        parts.append(f"{got_f} frames")
        asked.append(f"{asked_f} frames")
    if not parts:
        return None
    multiple = _size_multiple(pipe, family)
    return (f"{family.name}: the pipeline samples {', '.join(parts)}, not the {', '.join(asked)} asked for "
            f"(sides round down to multiples of {multiple} px, video frames to 4k + 1); summary.json records "
            "what was sampled")


def resolved_sampling(pipe, probe: ProbeConfig, family: Family | None = None) -> dict:
    """The sampler settings actually used, pipeline defaults filled in, for summary.json.

    ``height``/``width``/``num_frames`` are what the pipeline samples (rounded as it rounds them); where that
    differs from the request, ``requested`` holds what was asked for.
    """
    family = family or family_for(type(pipe).__name__)
    defaults = _call_defaults(pipe)
    height, width = sampled_size(pipe, probe, family)
    frames_asked = probe.num_frames or defaults.get("num_frames")
    frames = sampled_frames(pipe, frames_asked)
    out = {
        "pipeline_class": type(pipe).__name__,
        "transformer_class": type(pipe.transformer).__name__,
        "scheduler_class": type(pipe.scheduler).__name__,
        # the shift the scheduler samples with (issue 19): the shipped one, or --shift / the preset's
        "scheduler_shift": scheduler_shift(shifted(pipe.scheduler, getattr(probe, "shift", None)),
                                           getattr(probe, "shift", None)),
        **guidance_used(pipe, probe, family),
        "preset": probe.preset,
        "height": height,
        "width": width,
        "max_sequence_length": probe.max_sequence_length or defaults.get("max_sequence_length"),
        **({"num_frames": frames} if "num_frames" in defaults else {}),
        "negative_prompt": probe.negative_prompt if probe.negative_prompt is not None else defaults.get("negative_prompt"),
    }
    given = call_option_values(probe)
    for keyword, _, _ in CALL_OPTIONS:  # every family setting the pipeline takes: the value set, else its default
        if keyword in given or keyword in defaults:
            value = given.get(keyword, defaults.get(keyword))
            out[keyword] = list(value) if isinstance(value, tuple) else value
    if "strength" in defaults:  # video to video (issue 19): the pipeline runs only the last int(steps x strength) steps
        out["strength"] = probe.strength if probe.strength is not None else defaults["strength"]
        out["steps_run"] = min(int(probe.steps * out["strength"]), probe.steps)
    if family.condition_size_arg is not None and probe.height and probe.width:
        from normscope.measure.prompt_cache import has_condition_images

        if has_condition_images(probe):  # the side the condition images are resized to (see sampling_kwargs)
            out[family.condition_size_arg] = round((probe.height * probe.width) ** 0.5)
    requested = {name: value for name, value, got in (("height", probe.height, height), ("width", probe.width, width),
                                                      ("num_frames", probe.num_frames, frames))
                 if value is not None and value != got}
    if requested and family.area_arg is None:
        out["requested"] = requested
    return out


def run_paired(pipe, driver: VelocityModel, other: VelocityModel, kwargs: dict, reporter: Reporter,
               observers: Sequence[StepObserver] = (), measure_steps: int | None = None) -> dict[str, CallRecord]:
    """One batch in paired mode: ``driver`` samples, ``other`` is evaluated on the same inputs (at K steps
    across sigma only, with ``measure_steps``)."""
    call = fresh_call(kwargs)
    with capture(pipe, driver, other, on_step=reporter.advance, call_kwargs=call, observers=observers,
                 measure_steps=measure_steps) as recorder, \
            quiet_tokenizers(pipe, call.get("prompt") or ()):  # a pipeline that encodes in its call: warnings caught
        pipe(**call)
        return {"paired": recorder.collect()}


def run_rescaled(pipe, tuned: VelocityModel, base: VelocityModel, kwargs: dict, reporter: Reporter,
                 observers: Sequence[StepObserver] = ()) -> dict[str, CallRecord]:
    """One batch of the inference-rescale ablation: ``tuned`` samples with its guided velocity rescaled at every
    step to ``base``'s norm on the same inputs; the record holds the unscaled paired statistics (and images)."""
    call = dict(fresh_call(kwargs), generator=fresh_generators(kwargs["generator"]))
    with capture(pipe, tuned, base, on_step=reporter.advance, call_kwargs=call, observers=observers,
                 rescale_to_other=True) as recorder, quiet_tokenizers(pipe, call.get("prompt") or ()):
        output = pipe(**call)
        record = recorder.collect()
    if call["output_type"] != "latent":
        record.images = list(output.images if hasattr(output, "images") else output.frames)  # video: frames
    return {RESCALED: record}


def run_free(pipe, base: VelocityModel, tuned: VelocityModel, kwargs: dict, reporter: Reporter,
             observers: Sequence[StepObserver] = (), device: str | None = None) -> dict[str, CallRecord]:
    """One batch in free mode: each model samples its own trajectory from the same noise."""
    return {model.role: run_model(pipe, model, kwargs, reporter, observers, device) for model in (base, tuned)}


def fresh_call(kwargs: dict) -> dict:
    """The call's arguments with new list objects, so that no call sees another's edits.

    ZImagePipeline.encode_prompt writes the chat-templated prompt back into the caller's list
    (``prompt[i] = ...``, diffusers 0.42): a list shared between calls gets templated again on each
    call, and the second model of free mode would sample from different text.
    """
    return {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def fresh_generators(generators):
    """New generators in the state the given ones were created in (each model must draw the same noise)."""
    fresh = []
    for g in generators:
        clone = torch.Generator(g.device)
        clone.set_state(g.get_state())
        fresh.append(clone)
    return fresh


def run_model(pipe, model: VelocityModel, kwargs: dict, reporter: Reporter,
              observers: Sequence[StepObserver] = (), device: str | None = None) -> CallRecord:
    """One batch with one model on its own trajectory (profile, and reference checks).

    When images are asked for, the VAE visits ``device`` (if given) only to decode them.
    """
    from normscope.load.pipeline import decoding_on

    call = dict(fresh_call(kwargs), generator=fresh_generators(kwargs["generator"]))
    decoding = call["output_type"] != "latent" and device is not None
    with capture(pipe, model, on_step=reporter.advance, call_kwargs=call, observers=observers) as recorder, \
            (decoding_on(pipe, device) if decoding else contextlib.nullcontext()), \
            quiet_tokenizers(pipe, call.get("prompt") or ()):
        output = pipe(**call)
        record = recorder.collect()
    if call["output_type"] != "latent":
        # image pipelines return .images; video pipelines .frames, one list of frames per sample
        record.images = list(output.images if hasattr(output, "images") else output.frames)
    return record


def run_model_batches(pipe, model: VelocityModel, probe: ProbeConfig, samples: list[Sample], reporter: Reporter,
                      prompts: PromptCache | None = None) -> CallRecord:
    """One model over all samples, batch by batch, the batches shared out when several processes run."""
    from normscope.measure.distributed import current_processes

    groups = list(batches(samples, probe.batch_size))
    procs = current_processes()
    with shifted_scheduler(pipe, getattr(probe, "shift", None)):  # --shift (issue 19): profile, stored checks
        return concat_records(procs.map(len(groups), lambda i: run_model(
            pipe, model, sampling_kwargs(pipe, probe, groups[i], prompts=prompts), reporter)))


def prompt_batches(samples: list[Sample], batch_size: int) -> list[list[str]]:
    """The prompt lists of the pipeline calls a run over ``samples`` makes (what the prompt cache holds)."""
    return [[s.prompt for s in group] for group in batches(samples, batch_size)]


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
    # observer results keep the sample axis third: (steps, values, batch, ...)
    observed = {name: {b: torch.cat([r.observed[name][b] for r in records], dim=2) for b in items}
                for name, items in first.observed.items()}
    return CallRecord(stats, first.stat_names, first.timesteps, first.sigmas, experts=list(first.experts), observed=observed,
                      stream=first.stream)


def versions() -> dict:
    import diffusers

    return {"normscope": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}
