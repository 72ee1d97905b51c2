"""One run per folder: an OS-level lock on ``OUT/.normscope.lock``, released when the process ends.

``filelock`` takes an ``fcntl.flock`` on the file: the kernel drops it when the process dies (kill -9 included),
so a stale lock never blocks a folder, and no pid file has to be judged alive or dead. The holder's pid and
command are written into the file for the refusal message only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from normscope.errors import InputError

LOCK_FILE = ".normscope.lock"


class FolderLock:
    """Hold ``folder``'s lock for a ``with`` block; refuse at once (InputError, exit 2) when another run holds it."""

    def __init__(self, folder: Path, what: str = "--out") -> None:
        from filelock import FileLock

        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self._lock = FileLock(str(self.path), timeout=0, thread_local=False)

    def _holder(self) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return ""
        return f" ({text})" if text else ""

    def acquire(self) -> FolderLock:
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            raise InputError(f"{self.what} {self.folder} is in use by another normscope run{self._holder()}: wait for it "
                             f"to finish, or pass another {self.what}") from None
        try:  # who holds it, for the message a second run prints (the lock itself is the flock, not this text)
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.write(f"pid {os.getpid()}: {' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]}")
        except OSError:
            pass
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            try:
                with open(self.path, "w", encoding="utf-8"):
                    pass
            except OSError:
                pass
            self._lock.release()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
