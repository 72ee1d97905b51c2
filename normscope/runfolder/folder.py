"""A run folder for the length of one run: checked, locked, and published as one transaction."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from normscope.errors import InputError, RunError
from normscope.runfolder.failpoints import failpoint
from normscope.runfolder.lock import LOCK_FILE, FolderLock
from normscope.runfolder.manifest import MANIFEST, manifest, read_manifest, write_atomic

STAGING_DIR = ".staging"
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def check_out_folder(path: Path, what: str = "--out") -> Path:
    """Refuse (exit 2) a folder that cannot hold a run — a file, a symlink loop, read-only — before anything loads."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise InputError(f"{what} {path} is a file: pass a folder (it is created when missing)")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".normscope-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except InputError:
        raise
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"{what} {path} cannot be written ({reason}): pass a writable folder") from None
    return path


class RunFolder:
    """``with RunFolder(out) as folder:`` checks and locks ``out`` for one run; ``folder.publish`` commits outputs.

    Only the main process of a launched run locks and publishes (the others share its folder). When the block
    ends with an error and finished batches are stored, ``note`` says that the rerun resumes from them.
    """

    def __init__(self, path: Path, what: str = "--out", main: bool = True,
                 note: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.what = what
        self.main = main
        self.note = note
        self.store = None  # the BatchStore of the run, when it keeps one
        self._lock = FolderLock(self.path, what)

    def __enter__(self) -> RunFolder:
        if self.main:
            check_out_folder(self.path, self.what)
            try:
                self._lock.acquire()
            except OSError as exc:
                raise InputError(f"{self.what} {self.path} cannot be locked ({exc.strerror}): pass a writable folder") from None
            shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)  # an earlier run died while publishing
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if exc is not None and self.store is not None and self.note is not None and self.main:
                finished = self.store.finished()
                if finished:
                    self.note(f"{finished} finished batch(es) are kept in {self.path}: rerun the same command to resume")
        finally:
            self._lock.release()

    def publish(self, write: Callable[[Path], Iterable[Path]], fingerprint: str, kind: str,
                known: Iterable[str] = (), links: dict[str, Path] | None = None) -> list[Path]:
        return publish_outputs(self.path, write, fingerprint, kind, known, links)


def publish_outputs(folder: Path, write: Callable[[Path], Iterable[Path]], fingerprint: str, kind: str,
                    known: Iterable[str] = (), links: dict[str, Path] | None = None) -> list[Path]:
    """Write a run's outputs with ``write(staging)``, then swap them in for the folder's old ones.

    ``links`` names folders made while the run went (``images`` in ``.partial``): hard-linked (copied where
    links are not possible) into the staging folder, so a publish killed half-way leaves them where the resumed
    run finds them. Then: the old manifest goes (the folder holds no finished run), the old outputs go (those
    the old manifest lists, and ``known`` names for folders without one), the new ones are renamed into place,
    and the new manifest is written last. A failure while writing (a full disk) leaves the old run untouched.
    Returns the published top-level paths.
    """
    folder = Path(folder)
    staging = folder / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write(staging)
        for name, source in (links or {}).items():
            if source.is_dir() and any(source.iterdir()):
                shutil.copytree(source, staging / name, copy_function=_link_or_copy)
        entries = sorted(p.name for p in staging.iterdir())
        text = manifest(staging, entries, fingerprint, kind)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in NO_SPACE:
            raise RunError(f"could not write the outputs into {folder} ({exc.strerror}): the earlier files there are "
                           "untouched and finished batches are kept; free space and rerun to resume") from None
        raise
    failpoint("publish:staged")
    old = _old_entries(folder, known)
    (folder / MANIFEST).unlink(missing_ok=True)
    failpoint("publish:unlisted")
    for name in old:
        _remove(folder / name)
    failpoint("publish:cleared")
    for name in entries:
        os.replace(staging / name, folder / name)
        failpoint("publish:moving")
    write_atomic(folder / MANIFEST, text)
    shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in entries]


def _old_entries(folder: Path, known: Iterable[str]) -> list[str]:
    """The top-level outputs of the folder's earlier run: those its manifest lists, and every ``known`` name."""
    names = set(known)
    try:
        names.update(read_manifest(folder, "").get("entries", []))
    except InputError:
        pass
    hidden = {STAGING_DIR, LOCK_FILE, MANIFEST}
    return sorted(n for n in names if isinstance(n, str) and n not in hidden and not n.startswith(".")
                  and "/" not in n and n not in ("", ".", ".."))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
