"""Finished batches of an unfinished run, kept in ``OUT/.partial`` so a rerun resumes.

Each batch is one safetensors entry (``normscope.runfolder.entries``) holding the raw captured statistics
(not pickles) and tagged with the run's fingerprint (options, prompts, pipeline, checkpoints, versions:
``normscope.runfolder.fingerprint``); the tidy table is rebuilt from them by the same code as for a fresh
batch, so a resumed run writes the same bytes as an uninterrupted one. A batch of another fingerprint, or a
damaged one, is never read: it is recomputed, with a note. Images saved while the run goes
(``--save-images``) wait in ``.partial/images`` and move into the run folder when it is published.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from normscope.measure.capture import CallRecord
from normscope.measure.distributed import Processes
from normscope.runfolder.entries import read_entry, write_entry

META = "meta.json"
PARTIAL_DIR = ".partial"
IMAGES_DIR = "images"


class BatchStore:
    """``OUT/.partial``: one safetensors entry per finished batch, valid for one fingerprint.

    Under several processes only the main one (rank 0) checks the fingerprint and resets a stale store;
    the others wait at a barrier and open the store after that, so no rank can delete a batch that
    another has already saved. Every process must construct the store (the barrier needs them all).
    ``note`` is told (one line) about every entry that had to be recomputed.
    """

    def __init__(self, folder: Path, fingerprint: str, processes: Processes | None = None,
                 note: Callable[[str], None] | None = None) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.note = note
        processes = processes or Processes()
        self.reset = self._reset_if_stale() if processes.is_main else False
        processes.barrier()
        if not processes.is_main and self._stored_fingerprint() != fingerprint:
            raise RuntimeError(f"{self.folder}: the main process did not prepare the batch store (fingerprints differ)")

    def _stored_fingerprint(self) -> str | None:
        try:
            return json.loads((self.folder / META).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def _reset_if_stale(self) -> bool:
        """Delete a store made for another fingerprint; make the folder and record ours. True if reset."""
        recorded = (self.folder / META).is_file()
        stale = self.folder.exists() and self._stored_fingerprint() != self.fingerprint
        if stale:  # another run's store, or one whose record is unreadable: nothing in it may be read
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / META).write_text(json.dumps({"fingerprint": self.fingerprint}))
        return stale and recorded

    @property
    def images(self) -> Path:
        """Where ``--save-images`` writes while the run goes; published with the run's other outputs."""
        return self.folder / IMAGES_DIR

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def finished(self) -> int:
        return len(list(self.folder.glob("*.safetensors")))

    def save(self, key: str, records: dict[str, CallRecord]) -> None:
        tensors, meta = {}, {}
        for name, record in records.items():
            observed = {obs: list(items) for obs, items in record.observed.items()}
            meta[name] = {"stat_names": list(record.stat_names), "branches": list(record.stats),
                          "experts": list(record.experts), "observed": observed, "stream": record.stream}
            tensors[f"{name}/timesteps"] = record.timesteps
            tensors[f"{name}/sigmas"] = record.sigmas
            if record.step_index is not None:  # --measure-steps: which pipeline steps the rows are
                tensors[f"{name}/step_index"] = record.step_index
            for branch, stats in record.stats.items():
                tensors[f"{name}/{branch}"] = stats
            for obs, items in record.observed.items():
                for branch, values in items.items():
                    tensors[f"{name}/observed/{obs}/{branch}"] = values
        write_entry(self._path(key), tensors, self.fingerprint, {"records": meta})

    def load(self, key: str) -> dict[str, CallRecord] | None:
        """The batch's records, or None when it must be computed (absent, foreign or damaged)."""
        entry = read_entry(self._path(key), self.fingerprint, self.note)
        if entry is None:
            return None
        tensors, meta = entry
        try:
            return {name: CallRecord(
                stats={b: tensors[f"{name}/{b}"] for b in info["branches"]},
                stat_names=tuple(info["stat_names"]),
                timesteps=tensors[f"{name}/timesteps"],
                sigmas=tensors[f"{name}/sigmas"],
                experts=list(info.get("experts", [])),
                stream=str(info.get("stream", "")),
                observed={obs: {b: tensors[f"{name}/observed/{obs}/{b}"] for b in branches}
                          for obs, branches in info.get("observed", {}).items()},
                step_index=tensors.get(f"{name}/step_index"),
            ) for name, info in meta["records"].items()}
        except (KeyError, TypeError, AttributeError):
            return self._damaged(self._path(key))

    def _damaged(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if self.note is not None:
            self.note(f"cache entry {path} was damaged (a tensor or its description is missing): recomputed")
        return None

    def save_extra(self, key: str, name: str, tensors: dict, meta: dict) -> None:
        """Optional per-batch aggregates (maps, image signals) next to the batch, same atomic, tagged write."""
        write_entry(self.folder / f"{key}.{name}.extra", tensors, self.fingerprint, meta)

    def load_extra(self, key: str, name: str) -> tuple[dict, dict] | None:
        return read_entry(self.folder / f"{key}.{name}.extra", self.fingerprint, self.note)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
