"""The run folder (``--out``) as one transaction: lock, fingerprinted caches, staged outputs, manifest.

A run folder holds what a user reads (norms.csv, summary.json, figures, images, ...) and what only normscope
reads (hidden: the finished batches of an unfinished run, the prompt-embedding cache, the lock). The rules:

* one run at a time: an OS-level lock (``fcntl.flock`` through ``filelock``) is held for the whole run and
  dies with the process; a second run on a busy folder is refused in one line (``lock``);
* caches are caches: every stored batch and prompt embedding carries the fingerprint of what it depends on,
  a foreign or damaged entry is recomputed with a note, never read and never fatal (``entries``, ``store``);
* outputs land together: they are written into a staging folder, and only once all are written are the old
  run's outputs removed and the new ones renamed into place; ``manifest.json`` (their digests) is written last
  and is the commit record — a folder without it is not a finished run, and ``report`` refuses files whose
  digests differ from it (``manifest``, ``folder``);
* after a run every visible file the folder's earlier runs wrote is gone or rewritten by this one.
"""

from normscope.runfolder.folder import RunFolder, publish_outputs
from normscope.runfolder.manifest import MANIFEST, read_manifest, verified_files

__all__ = ["MANIFEST", "RunFolder", "publish_outputs", "read_manifest", "verified_files"]
