"""Fingerprints of what the numbers depend on: prompts, pipeline folders, checkpoints, versions.

Two kinds, for two questions:

* *identity* (resume: "may the finished batches of an earlier run be reused?"): small files (configs,
  tokenizers, adapter configs) by their contents, weight files by size and modification time — cheap on
  20 GB of weights, and any rewrite of a weight file changes its mtime;
* *content* (references: "was this reference made with this pipeline / these weights?", across machines
  where mtimes differ): sha256 of the contents (of the size, first and last 8 MiB for files over 64 MiB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

SMALL_FILE = 1 << 20  # files up to 1 MiB are identified by their contents
CHUNK = 8 << 20


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path, chunk: int = CHUNK) -> str:
    """sha256 of a file; for files over 64 MiB, of its size, first and last 8 MiB (fast on 20 GB weights)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= 8 * chunk:
            digest.update(handle.read())
        else:
            digest.update(str(size).encode())
            digest.update(handle.read(chunk))
            handle.seek(size - chunk)
            digest.update(handle.read(chunk))
    return digest.hexdigest()


def fingerprint_files(root: Path, files: list[Path]) -> str:
    """Content fingerprint of files, named relative to ``root``."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root) if path.is_relative_to(root) else path.name).encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()[:32]


def pipeline_fingerprint(source: str) -> str:
    """Content fingerprint of every file of a pipeline folder except its transformer; a hub id as is."""
    root = Path(source)
    if not root.is_dir():
        return f"hub:{source}"
    files = [p for p in root.rglob("*") if p.is_file() and "transformer" not in p.relative_to(root).parts[:1]]
    return fingerprint_files(root, files)


def prompts_digest(prompts: list[str]) -> str:
    """The resolved prompt texts, in order."""
    return _sha("\n".join(prompts))[:32]


def file_identity(path: Path) -> list:
    """A small file's content hash, or a large file's size and mtime."""
    stat = path.stat()
    if stat.st_size <= SMALL_FILE:
        return [stat.st_size, file_digest(path)]
    return [stat.st_size, stat.st_mtime_ns]


def folder_identity(root: Path) -> list:
    """Identity of every file under a folder (hidden ones skipped), by relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [[str(p.relative_to(root)), *file_identity(p)] for p in files]


def pipeline_identity(source: str) -> list:
    """The pipeline folder the run loads — model_index, every component's config and weights, its transformer
    included (the base when BASE is omitted) — or a hub id as is."""
    root = Path(source)
    return folder_identity(root) if root.is_dir() else [f"hub:{source}"]


def checkpoint_identity(ckpt) -> list:
    """A resolved checkpoint (``normscope.load.formats.Checkpoint``): its kind, adapter, weight and config files."""
    files = list(ckpt.files)
    config = ckpt.path / "config.json" if ckpt.path.is_dir() else None
    if config is not None and config.is_file() and config not in files:
        files.append(config)
    return [ckpt.kind, ckpt.adapter, [[str(f), *file_identity(f)] for f in sorted(files)]]


def run_fingerprint(settings: dict, prompts: list[str], pipeline_source: str, checkpoints: list, versions: dict) -> str:
    """What a run's numbers depend on: its settings, the resolved prompt texts, the pipeline folder, the
    checkpoints and the library versions. Equal fingerprints mean finished batches can be reused."""
    text = json.dumps([settings, prompts, pipeline_identity(pipeline_source),
                       [checkpoint_identity(c) for c in checkpoints], versions], sort_keys=True, default=str)
    return _sha(text)[:16]


# ---- issue 19: several condition images per sample
def condition_images_identity(probe) -> list:
    """Every condition image a run reads (``--image``, once or repeated, and a pairs file's rows, in order) by its
    path and content hash: changing the pixels of one image changes the fingerprint (the batches are measured again)."""
    from normscope.measure.prompts import prompt_images

    entries = [getattr(probe, "image", None)]
    entries += prompt_images(getattr(probe, "prompts_file", None), tuple(getattr(probe, "prompts", ()) or ())) or []
    out = []
    for entry in entries:
        paths = entry if isinstance(entry, tuple) else () if entry is None else (entry,)
        out.append([[str(p), file_digest(Path(p))] for p in paths])
    return out
