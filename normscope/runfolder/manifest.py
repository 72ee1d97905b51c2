"""``manifest.json``: which files one run published, with their digests. Written last, it is the commit record.

A folder whose manifest is missing holds no finished run (an interrupted publish, a run that never finished,
or a folder from a normscope without manifests); a file whose digest differs from its line was not written by
that run (a later run's half-written file, a hand edit). Readers (``normscope report``) take only listed,
verified files, so a stray file never enters a report.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from normscope.errors import InputError

MANIFEST = "manifest.json"
FORMAT = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def listed_files(root: Path) -> list[Path]:
    """Every file under ``root`` (recursively), hidden ones skipped, in a fixed order."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def manifest(staging: Path, entries: list[str], fingerprint: str, kind: str) -> str:
    """The manifest of the files under ``staging/<entry>`` for each top-level ``entries`` name (no timestamps:
    the same outputs give the same manifest)."""
    from normscope import __version__

    files = {}
    for name in sorted(entries):
        for path in listed_files(staging / name):
            files[path.relative_to(staging).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    body = {"format": FORMAT, "kind": kind, "fingerprint": fingerprint, "normscope": __version__,
            "entries": sorted(entries), "files": files}
    return json.dumps(body, indent=2, sort_keys=True) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path, fix: str) -> dict:
    """The folder's manifest, or InputError naming what is wrong and ``fix``."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(f"{folder} has no {MANIFEST}: it holds no finished normscope run (interrupted, still "
                         f"running, or written by an older normscope): {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError("unknown layout")
        for name, line in manifest["files"].items():
            if not isinstance(name, str) or not isinstance(line, dict) or not isinstance(line.get("sha256"), str):
                raise ValueError(f"bad line for {name!r}")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is damaged ({exc}): {fix}") from None
    return manifest


def verified_files(folder: Path, fix: str, kind: str | None = None) -> dict[str, Path]:
    """Every file the manifest lists, each checked against its digest: ``{relative name: path}``.

    Refuses (InputError) a missing manifest, a manifest of another kind, a listed file that is gone, and a file
    whose contents are not the ones the run published.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, fix)
    if kind is not None and manifest.get("kind") != kind:
        raise InputError(f"{folder} holds a normscope {manifest.get('kind')}, not a {kind}: {fix}")
    out = {}
    for name, line in manifest["files"].items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise InputError(f"{folder / MANIFEST} lists {name!r}, outside the folder: {fix}")
        if not path.is_file():
            raise InputError(f"{path} is listed in {folder / MANIFEST} but missing: the folder no longer holds one "
                             f"complete run; {fix}")
        if sha256_file(path) != line["sha256"]:
            raise InputError(f"{path} does not belong to the run recorded in {folder / MANIFEST} (its contents "
                             f"changed since that run published it): {fix}")
        out[name] = path
    return out
