"""Prompts encoded once: the pipeline's own ``encode_prompt`` runs once per batch of prompts, then never again.

The text encoders of real pipelines are large (T5-XXL is ~9 GB in bfloat16, Qwen-Image's encoder 7B
parameters) and are needed only to turn prompts into embeddings. normscope loads them alone, encodes
every batch a run (or a sweep, a rerun, a resume) will sample, and frees them before any transformer is
loaded: the embeddings are passed to the pipeline call (``prompt_embeds`` and friends) and the pipeline
never touches an encoder.

The unit of caching is the exact list of prompts of one pipeline call, not a single prompt: encoding a
prompt alone and in a batch of three differs in the last bit (CLIP's pooled projection is a matrix
product whose rounding depends on the batch), and the cache must give bit-identical velocities to a
pipeline that encodes inside its call. Batches are formed the same way by every job, so a run's
batches recur in its other mode, in both models, in reruns, in resumes and in every checkpoint of a sweep.

Entries live in memory for the run and, with a folder, on disk as safetensors named by a digest of the
text encoders' files, the pipeline class, the encoder settings and the prompts; an entry that is damaged or
was not written under its name's digest is encoded again (``normscope.runfolder.entries``), never read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from normscope.load.families import PromptEncoding, family_for
from normscope.measure.truncation import quiet_tokenizers
from normscope.runfolder.entries import read_entry, write_entry

CACHE_DIR = ".prompt-embeddings"
TEXT_ENCODER_PREFIX = "text_encoder"


def prompt_encoding(pipeline_class: str) -> PromptEncoding | None:
    """The family row's encoding for a pipeline class, or ``None`` when the pipeline encodes inside its call."""
    return family_for(pipeline_class).prompt_encoding


def encoder_settings(pipeline_cls, probe, dtype) -> dict:
    """What besides the prompt decides the embeddings; unset values are the pipeline call's own defaults."""
    from normscope.measure.sampling import negative_prompt_used

    defaults = {name: p.default for name, p in inspect.signature(pipeline_cls.__call__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    length = probe.max_sequence_length if probe.max_sequence_length is not None else defaults.get("max_sequence_length")
    negative = negative_prompt_used(pipeline_cls, probe)
    return {"negative_prompt": negative, "max_sequence_length": length, "dtype": str(dtype).removeprefix("torch.")}


def encoders_fingerprint(source: str | None) -> str | None:
    """Digest of the text encoders' and tokenizers' files (a hub id as is); ``None``: no disk cache."""
    if source is None:
        return None
    root = Path(source)
    if not root.is_dir():
        return f"hub:{source}"
    from normscope.runfolder.fingerprint import fingerprint_files

    files = [p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0].startswith(("text_encoder", "tokenizer", "processor"))]
    files.append(root / "model_index.json")
    return fingerprint_files(root, files)


class PromptCache:
    """Embeddings of batches of prompts for one pipeline class and one set of encoder settings."""

    def __init__(self, pipeline_class: str, encoding: PromptEncoding, settings: dict, device: str,
                 fingerprint: str | None = None, folder: Path | None = None, note=None) -> None:
        self.pipeline_class = pipeline_class
        self.encoding = encoding
        self.settings = settings
        self.device = device
        self.fingerprint = fingerprint
        self.folder = Path(folder) if folder is not None and fingerprint is not None else None
        self.note = note  # told about a damaged or foreign entry (recomputed)
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.encoded = 0  # batches encoded by this cache (not found in memory or on disk)
        self.from_disk = 0

    def key(self, prompts: Sequence[str]) -> str:
        text = json.dumps([self.fingerprint, self.pipeline_class, self.settings, list(prompts)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def _lookup(self, prompts: Sequence[str]) -> dict[str, torch.Tensor] | None:
        key = self.key(prompts)
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        entry = read_entry(path, key, self.note) if path is not None else None  # damaged or foreign: encoded again
        if entry is not None:
            self._memory[key] = entry[0]
            self.from_disk += 1
            return self._memory[key]
        return None

    def missing(self, batches: Sequence[Sequence[str]]) -> list[list[str]]:
        """The distinct batches neither in memory nor on disk."""
        out, seen = [], set()
        for prompts in batches:
            key = self.key(prompts)
            if key not in seen and self._lookup(prompts) is None:
                seen.add(key)
                out.append(list(prompts))
        return out

    def encode(self, pipe, batches: Sequence[Sequence[str]]) -> None:
        """Run the pipeline's own encode function for every missing batch (encoders wherever they are now)."""
        encode = getattr(pipe, self.encoding.method)
        length = self.settings["max_sequence_length"]
        negative = self.settings["negative_prompt"]
        common = dict(self.encoding.fixed)
        if length is not None:
            common["max_sequence_length"] = length
        encoder = next((m for n, m in pipe.components.items() if n.startswith(TEXT_ENCODER_PREFIX) and m is not None), None)
        device = encoder.device if encoder is not None else torch.device("cpu")
        for prompts in self.missing(batches):
            tensors: dict[str, torch.Tensor] = {}
            call = dict(common, prompt=list(prompts), device=device)
            if self.encoding.negative_keyword is not None:
                call[self.encoding.negative_keyword] = None if negative is None else [negative] * len(prompts)
            with torch.no_grad():
                tensors.update(_named(self.encoding.outputs, encode(**call)))
                text = self.encoding.fixed_negative if self.encoding.fixed_negative is not None else negative
                if self.encoding.negative_outputs and text is not None:
                    call = dict(common, prompt=[text] * len(prompts), device=device)
                    tensors.update(_named(self.encoding.negative_outputs, encode(**call)))
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            key = self.key(prompts)
            self._memory[key] = tensors
            self.encoded += 1
            path = self._path(key)
            if path is not None:
                write_entry(path, tensors, key)

    def kwargs(self, prompts: Sequence[str], dtype=None) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The pipeline-call keywords for this batch, on the execution device (in ``dtype`` when given)."""
        tensors = self._lookup(prompts)
        if tensors is None:
            raise RuntimeError(f"prompt batch {list(prompts)[:2]}... was not prepared: call prepare_prompts with every batch first")
        out: dict = {}
        for key, tensor in tensors.items():
            tensor = tensor.to(self.device, dtype=dtype or tensor.dtype)
            name, _, index = key.partition(LIST_MARK)
            if index:  # an item of a list output, stored in order: "name[0]", "name[1]", ...
                out.setdefault(name, []).append((int(index.rstrip("]")), tensor))
            else:
                out[key] = tensor
        return {k: [t for _, t in sorted(v, key=lambda item: item[0])] if isinstance(v, list) else v
                for k, v in out.items()}


LIST_MARK = "["  # safetensors holds flat tensors: a list output is stored as "name[0]", "name[1]", ...


def _named(names: tuple[str | None, ...], outputs) -> dict[str, torch.Tensor]:
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    named = {}
    for name, value in zip(names, outputs, strict=True):
        if name is None or value is None:
            continue
        if isinstance(value, list):
            named.update({f"{name}{LIST_MARK}{i}]": tensor for i, tensor in enumerate(value)})
        else:
            named[name] = value
    return named


def pipeline_class_name(source: str) -> str | None:
    """The pipeline class named in a pipeline's model_index.json (local folder or cached hub id); ``None`` when
    the index cannot be read (the pipeline loader then explains why in one line)."""
    from diffusers import DiffusionPipeline

    from normscope.load.pipeline import quiet_loading

    try:
        with quiet_loading():
            return DiffusionPipeline.load_config(source)["_class_name"]
    except Exception:  # diffusers raises several types for a missing, unreachable or broken index
        return None


def has_condition_images(probe) -> bool:
    """The run gives condition images: ``--image`` or a pairs file's rows."""
    from normscope.measure.prompts import prompt_images

    if getattr(probe, "image", None) is not None:
        return True
    rows = prompt_images(getattr(probe, "prompts_file", None), tuple(getattr(probe, "prompts", ()) or ()))
    return bool(rows) and any(rows)


def prepare_prompts(source: str, batches: Sequence[Sequence[str]], probe, dtype, device: str,
                    folder: Path | None = None, pipe=None, note=None) -> PromptCache | None:
    """Embeddings of every batch a run will sample, encoded with the text encoders alone on ``device``.

    ``probe`` gives the encoder settings (negative prompt, sequence length) as the pipeline call would use them.

    Batches already cached (in ``folder``) are not encoded again; when any is missing, only the text
    encoders and tokenizers of ``source`` are loaded, moved to ``device``, used, and freed, so they are never
    on the device with a transformer. Pass ``pipe`` (a pipeline that has its encoders) to encode with it in
    place instead. ``None`` when normscope has no encoding row for the pipeline class: the pipeline then
    encodes inside its own call, as before.
    """
    import diffusers

    name = type(pipe).__name__ if pipe is not None else pipeline_class_name(source)
    if name is None:
        return None
    encoding = prompt_encoding(name)
    pipeline_cls = getattr(diffusers, name, None)
    if encoding is None or pipeline_cls is None:
        return None
    if encoding.reads_images and has_condition_images(probe):  # Qwen-Image-2.1: embeddings of text AND images,
        return None  # which its call cannot take: the pipeline encodes inside every call
    settings = encoder_settings(pipeline_cls, probe, dtype)
    cache = PromptCache(name, encoding, settings, device, encoders_fingerprint(source), folder, note)
    todo = cache.missing(batches)
    if not todo:
        return cache
    if pipe is not None and any(n.startswith(TEXT_ENCODER_PREFIX) and m is not None for n, m in pipe.components.items()):
        with quiet_tokenizers(pipe, [p for batch in todo for p in batch]):
            cache.encode(pipe, todo)
        return cache
    from normscope.load.pipeline import load_pipeline

    encoders = load_pipeline(source, dtype, device, parts="text_encoders")
    try:
        with quiet_tokenizers(encoders, [p for batch in todo for p in batch]):  # one note, not megabytes of warnings
            cache.encode(encoders, todo)
    finally:
        del encoders  # the encoders' memory (host and device) is returned before any transformer loads
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return cache
