"""The diffusers pipeline the checkpoints run in: local folder or hub id, safetensors only, no remote code."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from normscope.config import Device, DType
from normscope.errors import InputError
from normscope.load.families import (
    TRUE_CFG_SCALE,
    Family,
    check_checkpoint_config,
    check_preset,
    check_transformer_class,
    family_for,
    family_of_folder,
    nearest_multiples,
    preset_named,
    size_rule,
    supported,
)
from normscope.load.formats import PIPELINE_INDEX, refuse_broken_link
from normscope.load.scheduler_shift import check_shift

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_device(device: Device) -> str:
    import torch

    if device is Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device is Device.cuda and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but torch sees no CUDA device: use --device cpu or auto")
    return device.value


def resolve_dtype(dtype: DType, device: str):
    import torch

    if dtype is DType.auto:
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype.value)


def find_pipeline_source(base: str | None, tuned: str | None, pipeline: str | None) -> str:
    """--pipeline if given; else BASE if it is a pipeline folder; else the nearest enclosing pipeline folder."""
    if pipeline:
        return pipeline
    candidates = [Path(p) for p in (base, tuned) if p]
    for candidate, role in zip((base, tuned), ("BASE", "TUNED"), strict=True):
        if candidate:
            refuse_broken_link(Path(candidate), role)  # before resolve(), which a symlink loop breaks
    for candidate in candidates:
        if (candidate / PIPELINE_INDEX).is_file():
            return str(candidate)
    for candidate in candidates:
        for parent in candidate.resolve().parents:
            if (parent / PIPELINE_INDEX).is_file():
                return str(parent)
    raise InputError(
        "no pipeline to run the checkpoints in: pass --pipeline with a diffusers pipeline folder "
        "(one holding model_index.json) or a hub id"
    )


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' own loading bars and notices; normscope shows its own progress."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), tlog.get_verbosity(), dlog.get_verbosity())
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()  # e.g. "requires torchvision" notices about image processors normscope never uses
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype -> dtype rename across diffusers versions
            yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()
        tlog.set_verbosity(was[2])
        dlog.set_verbosity(was[3])


PARTS = ("all", "denoiser", "text_encoders")


def _components(source: str) -> list[str]:
    from diffusers import DiffusionPipeline

    return [k for k in DiffusionPipeline.load_config(source) if not k.startswith("_")]


def load_pipeline(source: str, dtype, device: str, parts: str = "all", place: bool = True, image_input: bool = False):
    """A diffusers pipeline from a local folder or a hub id, safetensors only, no remote code.

    ``parts`` says what is loaded and where it goes:

    * ``all``: every component, the whole pipeline on ``device`` (it can encode prompts itself);
    * ``denoiser``: no text encoders (the prompts come encoded, see ``measure.prompt_cache``); the transformer
      and the other modules the call runs (``place_call_modules``) are put on ``device`` (not even those with
      ``place=False``: offload and the copies of full checkpoints place them later); a decode-only VAE waits in
      host memory until images are decoded;
    * ``text_encoders``: the text encoders and tokenizers alone, on ``device``, for encoding prompts.

    ``image_input``: the run conditions on an image; a Wan2.2 TI2V-5B folder (a ``WanPipeline`` with
    ``expand_timesteps``) then loads as diffusers' ``WanImageToVideoPipeline``, its image-to-video mode.
    """
    from diffusers import DiffusionPipeline

    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, got {parts!r}")
    local = Path(source)
    if not local.exists() and not HUB_ID.match(source):
        raise InputError(f"--pipeline {source} is neither a folder nor a hub id: pass a folder holding {PIPELINE_INDEX}")
    if local.exists() and not (local / PIPELINE_INDEX).is_file():
        raise InputError(f"--pipeline {source} has no {PIPELINE_INDEX}: pass the pipeline's top folder")
    family_of_source(source)  # an unknown pipeline class is refused before any weight loads
    skip: dict = {}
    try:
        with quiet_loading():
            if parts == "denoiser":
                skip = {name: None for name in _components(source) if name.startswith("text_encoder")}
            elif parts == "text_encoders":
                skip = {name: None for name in _components(source)
                        if not name.startswith(("text_encoder", "tokenizer", "scheduler", "processor"))}
            loader = DiffusionPipeline
            index = json.loads((local / PIPELINE_INDEX).read_text()) if local.exists() else {}
            if image_input and is_ti2v(index):
                from diffusers import WanImageToVideoPipeline as loader
            if parts != "denoiser" and local.exists():  # Qwen-Image-Edit's processor without torchvision
                from normscope.load.qwen_processor import processor_override

                skip = {**processor_override(local, index), **skip}
            pipe = loader.from_pretrained(source, torch_dtype=dtype, use_safetensors=True, **skip)
    except Exception as exc:  # diffusers raises many types; one line is what the user needs
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not local.exists():
            raise InputError(
                f"cannot fetch pipeline {source} from the hub ({reason[:160]}): download it where you are online "
                "and pass the folder with --pipeline"
            ) from None
        raise InputError(f"cannot load pipeline {source}: {reason[:200]}") from None
    pipe.set_progress_bar_config(disable=True)
    if parts == "text_encoders":
        for name, module in pipe.components.items():
            if name.startswith("text_encoder") and module is not None:
                module.eval().to(device)
        return pipe
    check_pipeline(pipe, source)
    if str(device) == "cpu":  # on an accelerator the weights are copied (aligned) when placed: no host copy needed
        for attr, _ in family_for(type(pipe).__name__).experts:
            if getattr(pipe, attr, None) is not None:
                realign(getattr(pipe, attr))
    if parts == "all":
        pipe.to(device)
    elif place:
        place_denoiser(pipe, device)
    return pipe


ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every fresh tensor


def realign(module) -> None:
    """Copy the parameters and buffers that a memory-mapped safetensors load left at unaligned addresses into fresh
    (aligned) memory. MKL's CPU kernels take another path for unaligned operands: the pipeline's transformer (loaded
    by diffusers, weights at 8-byte offsets in the file) and a copy of the same weights made by normscope gave
    velocities 1e-7 apart, so base vs itself was not exactly 0 with one sample per call. Aligned tensors are left
    as they are. Only for CPU runs (``load_pipeline``): the copy is anonymous host memory the size of the
    transformer, where a GPU run streams the mapped file to the device, whose copies are aligned anyway."""
    import torch

    with torch.no_grad():
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for name, tensor in store.items():
                    if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % ALIGNMENT:
                        if isinstance(tensor, torch.nn.Parameter):
                            tensor.data = tensor.data.clone()
                        else:
                            store[name] = tensor.clone()


def place_denoiser(pipe, device: str) -> None:
    """Every transformer of the pipeline (each expert of its family row) on ``device``, and every other module the
    denoising call runs (``place_call_modules``); text encoders and decode-only modules stay put."""
    for attr, _ in family_for(type(pipe).__name__).experts:
        module = getattr(pipe, attr, None)
        if module is not None:
            module.to(device)
    place_call_modules(pipe, device)


# Modules a call with output_type="latent" runs only to decode; the VAE also ENCODES an input image or video.
DECODE_ONLY = ("vae", "audio_vae", "vocoder")


def place_call_modules(pipe, device: str) -> None:
    """The modules other than the transformers that the denoising call itself runs, on ``device``: LTX-2's text
    connectors, Wan2.1 I2V's image encoder, and the VAE of a pipeline that takes an input image or video (it encodes
    it in the call). diffusers runs the call on the accelerator the transformer is on: a module left in host memory
    would meet its inputs on the other device. Text encoders (the prompts come encoded) and decode-only modules
    (``decoding_on`` moves the VAE when images are decoded) stay where they are."""
    import inspect

    import torch

    experts = {attr for attr, _ in family_for(type(pipe).__name__).experts}
    takes_inputs = {"image", "video"} & set(inspect.signature(pipe.__call__).parameters)
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module) or name in experts or name.startswith("text_encoder"):
            continue
        if name in DECODE_ONLY and not (name == "vae" and takes_inputs):
            continue
        module.to(device)


@contextlib.contextmanager
def decoding_on(pipe, device: str) -> Iterator[None]:
    """The VAE visits ``device`` only while it decodes (images were asked for), then returns to the host."""
    vae = getattr(pipe, "vae", None)
    if vae is None or str(device) == str(vae.device):
        yield
        return
    decode = vae.decode
    home = vae.device

    def decode_on_device(latents, *args, **kwargs):
        vae.to(device)
        try:
            return decode(latents.to(device), *args, **kwargs)
        finally:
            vae.to(home)

    vae.decode = decode_on_device
    try:
        yield
    finally:
        vae.__dict__.pop("decode", None)


def family_of_source(source: str) -> Family | None:
    """The family of a pipeline folder or hub id, from ``model_index.json`` alone: checked before any weight loads.

    A local folder's transformer config is checked against the row too. For a hub id the index is read
    through diffusers' config loader (a few hundred bytes, from the cache when offline).
    """
    local = Path(source)
    if local.exists():
        if not (local / PIPELINE_INDEX).is_file():
            raise InputError(f"--pipeline {source} has no {PIPELINE_INDEX}: pass the pipeline's top folder")
        return family_of_folder(local)
    from diffusers import DiffusionPipeline

    try:
        with quiet_loading():
            index = DiffusionPipeline.load_config(source)
    except Exception:  # unreachable hub id: load_pipeline explains it in one line
        return None
    return family_for(str(index.get("_class_name")))


def check_family_inputs(source: str, checkpoints: list[tuple[str | None, str]], probe=None) -> Family | None:
    """Before any weight loads: the pipeline's family, each checkpoint's transformer class, the probe options.

    ``probe`` (a ``ProbeConfig``): its preset must be of this family, and ``true_cfg_scale`` needs a family
    with a separate true-CFG argument (FLUX.1, Kontext); Qwen-Image's true CFG scale is ``--guidance``.
    """
    family = family_of_source(source)
    if family is None:
        return None
    for path, role in checkpoints:
        if path is not None and Path(path).exists() and Path(path).resolve() != Path(source).resolve():
            check_checkpoint_config(family, path, role)
    if probe is None:
        return family
    if getattr(probe, "preset", None) is not None:
        check_preset(preset_named(probe.preset), family)
    if family.video_arg is not None and getattr(probe, "video", None) is None:
        raise InputError(f"{family.pipeline_classes[0]} ({family.name}) generates from an input video: "
                         "pass --video (a folder of frames or a video file)")
    if family.video_arg is None and getattr(probe, "video", None) is not None:
        raise InputError(f"the {family.name} family does not take an input video: drop --video")
    check_sizes(family, source, probe)
    if getattr(probe, "true_cfg_scale", None) is not None and family.true_cfg_arg is None:
        fix = ("its true CFG scale is --guidance" if family.guidance_arg == TRUE_CFG_SCALE
               else "drop --true-cfg-scale")
        raise InputError(f"the {family.name} family has no separate true CFG option: {fix}")
    check_call_options(family, probe)
    check_stg_blocks(family, source, probe)
    check_shift(source, getattr(probe, "shift", None))  # issue 19: where the scheduler would ignore a static shift
    check_stream(family, getattr(probe, "stream", None))
    index = json.loads((Path(source) / PIPELINE_INDEX).read_text()) if Path(source).exists() else {}
    check_image_inputs(family, index, probe)
    if getattr(probe, "guidance_2", None) is not None and Path(source).exists():
        if index.get("boundary_ratio") is None:  # WanPipeline raises on guidance_scale_2 after loading
            raise InputError(f"--guidance-2 guides Wan2.2's second expert, but {source} has one transformer "
                             "(no boundary_ratio in model_index.json): drop --guidance-2 (Wan2.1 uses --guidance)")
    return family


def check_sizes(family: Family, source: str, probe) -> None:
    """``--height``/``--width`` a multiple of the pipeline's spatial factor where the pipeline would raise on it.

    Read from the pipeline folder's configs (``size_rule``), before any weight loads: SD3, Z-Image, Wan,
    HunyuanVideo, LTX-2 and Qwen-Image-2.1 raise mid-run (after minutes of loading) on a size off their multiple;
    FLUX and Qwen-Image round it (``size_rounds``) and Kontext keeps only the aspect ratio of the size it is
    given, so those sizes are sampled as the pipeline makes them and summary.json says what was sampled.
    ``--num-frames`` is refused only on an image family: video pipelines round it themselves (and it is said).
    """
    height, width, frames = (getattr(probe, name, None) for name in ("height", "width", "num_frames"))
    if height is None and width is None and frames is None:
        return
    multiple, frame_factor = size_rule(family, source)
    if family.area_arg is None and not family.size_rounds:
        for flag, value in (("--height", height), ("--width", width)):
            if value is not None and value % multiple:
                raise InputError(f"{flag} {value} is not a multiple of {multiple} (the {family.name} pipeline's VAE factor "
                                 f"x patch size; it raises on other sizes): use {nearest_multiples(value, multiple)}")
    if frames is not None and frame_factor is None:
        raise InputError(f"--num-frames applies to video pipelines; the {family.name} family makes images: "
                         "drop --num-frames")


def is_ti2v(index: dict) -> bool:
    """A Wan2.2 TI2V-5B folder: a ``WanPipeline`` with per-token timesteps, which also animates an image."""
    return index.get("_class_name") == "WanPipeline" and bool(index.get("expand_timesteps"))


def check_image_inputs(family: Family, index: dict, probe) -> None:
    """Before loading: the image a family needs, the image a family cannot take, Edit-Plus's batch of one.

    ``index`` is the pipeline's ``model_index.json`` (empty for a hub id).
    """
    import inspect

    import diffusers

    from normscope.measure.prompts import prompt_images

    images = prompt_images(getattr(probe, "prompts_file", None), tuple(getattr(probe, "prompts", ()) or ()))
    image = getattr(probe, "image", None)
    cls = index.get("_class_name") or family.pipeline_classes[0]
    if family.needs_image and image is None and not images:
        raise InputError(
            f"{cls} ({family.name}) edits or animates an image and none was given: pass --image FILE (one image for "
            "every sample) or --prompts pairs.jsonl with an \"image\" path per row")
    if family.needs_image and images and image is None and None in images:
        raise InputError(f"{cls} needs an image per sample and the --prompt prompts have none: put them in the pairs "
                         "file with an image, or pass --image FILE for them")
    if (image is not None or images) and not family.needs_image and not is_ti2v(index):
        if not any("image" in inspect.signature(getattr(diffusers, c).__call__).parameters
                   for c in family.pipeline_classes if hasattr(diffusers, c)):
            what = "--image" if image is not None else "the image column of --prompts"
            fix = (" (Wan2.2 TI2V-5B takes one: its folder's model_index.json has expand_timesteps)"
                   if family.name == "wan" else "")
            raise InputError(f"{cls} does not take an image: drop {what} ({family.name}){fix}")
    check_image_counts(family, cls, image, images)
    if cls == "QwenImageEditPlusPipeline" and getattr(probe, "batch_size", 1) > 1:
        raise InputError("QwenImageEditPlusPipeline samples one prompt per call (diffusers raises for a batch above 1; "
                         "results do not depend on the batch): pass --batch-size 1")


# ---- issue 19: several condition images per sample


def check_image_counts(family: Family, cls: str, image, images) -> None:
    """Before loading: several condition images (repeated ``--image``, a pairs row listing images) only for a pipeline
    class of the row's ``several_images``; every image a file Pillow can open, within the row's ``image_bounds``
    (one line naming it otherwise)."""
    from normscope.load.families import FAMILIES
    from normscope.measure.prompts import image_count

    takers = ", ".join(f"{row.name} ({', '.join(row.several_images)})" for row in FAMILIES if row.several_images)
    entries = [("--image", image)] + [("--prompts image", entry) for entry in images or []]
    for flag, entry in entries:
        if image_count(entry) > 1 and cls not in family.several_images:
            what = f"--image is given {image_count(entry)} times" if flag == "--image" else \
                f"a row of --prompts lists {image_count(entry)} images"
            raise InputError(f"{what}, but {cls} ({family.name}) takes one condition image per sample: give one "
                             f"(several are taken by {takers})")
    seen = set()
    for flag, entry in entries:
        for path in (entry if isinstance(entry, tuple) else (entry,)) if entry is not None else ():
            if path in seen:
                continue
            seen.add(path)
            width, height = _check_readable_image(path, flag)
            if family.image_bounds is not None:
                side, ratio = family.image_bounds
                if min(width, height) < side or max(width / height, height / width) > ratio:
                    raise InputError(f"{flag} {path} is {width}x{height}: {cls} ({family.name}) takes condition "
                                     f"images of at least {side} px a side and at most {ratio:g}:1 (it raises "
                                     "otherwise): pass a larger image")


def _check_readable_image(path, flag: str) -> tuple[int, int]:
    """The (width, height) of an image file Pillow can read; one line naming it otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            size = opened.size
            opened.verify()  # reads the header and checks the data without decoding the pixels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{flag} {path} is not an image Pillow can read ({exc}): pass a PNG or JPEG") from None
    return size


def check_call_options(family: Family, probe) -> None:
    """Before loading: a family-specific option (``--guidance-2``, ``--skip-layers``, ``--cfg-normalization``, ...)
    that no pipeline of the family's row takes is refused in one line, naming the families that take it."""
    import inspect

    import diffusers

    from normscope.load.families import FAMILIES
    from normscope.measure.sampling import CALL_OPTIONS

    def takes(row: Family, keyword: str) -> bool:
        return any(keyword in inspect.signature(getattr(diffusers, cls).__call__).parameters
                   for cls in row.pipeline_classes if hasattr(diffusers, cls))

    for keyword, field_name, flag in CALL_OPTIONS:
        if getattr(probe, field_name, None) is None or takes(family, keyword):
            continue
        owners = ", ".join(row.name for row in FAMILIES if takes(row, keyword)) or "none"
        raise InputError(f"--{flag} sets {keyword}, which {family.name} pipelines ({', '.join(family.pipeline_classes)}) "
                         f"do not take: drop --{flag} (it is for {owners})")


# ---- LTX-2's STG blocks (issue 19): checked against the transformer's config before any weight loads.
def stg_setting(family: Family, probe) -> tuple[bool, list[int] | None]:
    """Whether the LTX-2 call runs STG (its extra perturbed call) and on which blocks, pipeline defaults filled in.

    LTX2Pipeline runs STG when ``stg_scale > 0`` or ``audio_stg_scale > 0``, and reads an audio scale of 0 (or
    None) as the video one; its defaults are ``stg_scale=1.0``, ``audio_stg_scale=1.0``, blocks ``[28]``.
    """
    import inspect

    import diffusers

    cls = getattr(diffusers, family.pipeline_classes[0], None)
    parameters = inspect.signature(cls.__call__).parameters if cls is not None else {}
    if "spatio_temporal_guidance_blocks" not in parameters:
        return False, None

    def given(field, keyword):
        value = getattr(probe, field, None)
        return value if value is not None else parameters[keyword].default

    video = given("stg_scale", "stg_scale") or 0.0
    audio = given("audio_stg_scale", "audio_stg_scale") or video
    blocks = given("stg_blocks", "spatio_temporal_guidance_blocks")
    return (video > 0 or audio > 0), (list(blocks) if blocks else None)


def check_stg_blocks(family: Family, source: str, probe) -> None:
    """With STG on, ``--stg-blocks`` must exist in the transformer (``num_layers`` of transformer/config.json): a
    block past the last one perturbs nothing, so the STG call silently equals the cond call; no blocks at all and
    the pipeline raises after loading. The pipeline's own default (``[28]``) past the last block is how that
    pipeline samples: it is measured, with one note (``stg_note``)."""
    on, blocks = stg_setting(family, probe)
    if not on:
        return
    off = "or turn STG off with --stg-scale 0 --audio-stg-scale 0"
    if not blocks:
        raise InputError(f"STG is on (--stg-scale/--audio-stg-scale above 0) and names no block: pass --stg-blocks "
                         f"(e.g. 28 for LTX-2.3, 29 for LTX-2.0), {off}")
    config = Path(source) / "transformer" / "config.json"
    if not config.is_file():
        return  # a hub id: its config is not read before loading
    layers = json.loads(config.read_text()).get("num_layers")
    if layers is None:
        return
    outside = [b for b in blocks if b >= layers]
    if outside and getattr(probe, "stg_blocks", None) is not None:  # the pipeline's own default: a note, not a refusal
        raise InputError(f"--stg-blocks {blocks} name block {outside[0]}, but the transformer of {source} has {layers} "
                         f"blocks (0..{layers - 1}; STG there would perturb nothing): pass --stg-blocks with indices "
                         f"below {layers}, {off}")


def stg_note(family: Family, transformer, probe) -> str | None:
    """One line when STG runs on the pipeline's DEFAULT blocks and none of them is in ``transformer`` (LTX-2's
    ``[28]`` on a smaller model): the pipeline samples that way (its STG call equals the cond call), so normscope
    measures it as the pipeline runs and says so; ``--stg-blocks`` past the last block is refused before loading."""
    on, blocks = stg_setting(family, probe)
    layers = getattr(getattr(transformer, "config", None), "num_layers", None)
    if not on or not blocks or layers is None or getattr(probe, "stg_blocks", None) is not None:
        return None
    if all(b >= layers for b in blocks):
        return (f"{family.name}: the pipeline's default STG blocks {blocks} are past this transformer's {layers} "
                "blocks, so its STG call perturbs nothing and equals the cond call (as the pipeline samples it): "
                "pass --stg-blocks to perturb blocks, or --stg-scale 0 --audio-stg-scale 0 to drop the call")
    return None
# ---- issue 19: which velocity stream a command reads (LTX-2: video, audio), checked from the family row
def headline_stream(family: Family | None) -> str | None:
    """The stream a command reads by default: the family's first (LTX-2: video); None for one-stream families."""
    return family.streams[0] if family is not None and family.streams else None


def check_stream(family: Family | None, stream: str | None) -> str | None:
    """``--stream NAME`` against the family row, before any weight loads; returns the stream to read (the
    headline when unset). A one-stream family has no stream to pick: any ``--stream`` is refused there."""
    if stream is None or family is None:
        return headline_stream(family)
    if not family.streams:
        raise InputError(f"--stream {stream}: {family.name} pipelines return one velocity, there is no stream to "
                         "pick: drop --stream (it is for multi-stream families such as ltx2: video, audio)")
    if stream not in family.streams:
        choices = " or ".join(f"--stream {name}" for name in family.streams)
        raise InputError(f"--stream {stream}: {family.name} pipelines return the streams {', '.join(family.streams)} "
                         f"(the first is the default): use {choices}")
    return stream


def check_pipeline(pipe, source: str) -> Family:
    """The loaded pipeline's family row; its transformer checked against the row."""
    family = family_for(type(pipe).__name__)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise InputError(f"pipeline {source} ({type(pipe).__name__}) has no transformer: normscope measures {supported()}")
    check_transformer_class(family, type(transformer).__name__, f"the transformer of {source}")
    if getattr(pipe, "scheduler", None) is None:
        raise InputError(f"pipeline {source} ({type(pipe).__name__}) has no scheduler: pass a complete pipeline folder")
    for attr, _ in family.experts:
        module = getattr(pipe, attr, None)
        if module is not None:
            module.eval()
    return family
