"""Cache entries: one safetensors file each, written atomically, tagged, and never trusted blindly.

An entry is valid for one *tag* (the fingerprint of what its numbers depend on). Reading returns ``None``
— recompute it — for a missing file, a file of another tag (a foreign run's batch) and a damaged file
(zero bytes, truncated, not safetensors, a tensor missing); a damaged or foreign file is deleted and the
caller is told why, so it can say so in one note. Nothing in a cache entry is ever fatal to a run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

TAG_KEY = "normscope.tag"
META_KEY = "normscope.meta"


def write_entry(path: Path, tensors: dict, tag: str, meta: dict | None = None) -> None:
    """Write ``tensors`` (+ JSON ``meta``) to ``path`` through a temporary name: a killed run never leaves half an entry."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes of one launch may write the same entry
    metadata = {TAG_KEY: tag, META_KEY: json.dumps(meta or {})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_entry(path: Path, tag: str, note: Callable[[str], None] | None = None) -> tuple[dict, dict] | None:
    """``(tensors, meta)`` of a valid entry of ``tag``; None (entry deleted, ``note`` told why) otherwise."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get(TAG_KEY) != tag:
                problem = "made by another run (its fingerprint differs)"
                tensors = meta = None
            else:
                meta = json.loads(metadata.get(META_KEY, "{}"))
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                problem = None
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        problem = f"damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else 'unreadable'})"
        tensors = meta = None
    if problem is None:
        return tensors, meta
    discard(path)
    if note is not None:
        note(f"cache entry {path} was {problem}: recomputed")
    return None


def discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
