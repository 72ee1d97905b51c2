"""Finished batches of an unfinished run, kept in ``OUT/.partial`` so a rerun resumes.

Each batch is one safetensors file holding the raw captured statistics (not pickles); the tidy
table is rebuilt from them by the same code as for a fresh batch, so a resumed run writes the same
bytes as an uninterrupted one. A run with a different fingerprint (other options, prompts, pipeline,
checkpoints or versions: ``normscope.measure.fingerprint``) starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from normscope.measure.capture import CallRecord
from normscope.measure.distributed import Processes

META = "meta.json"


class BatchStore:
    """``OUT/.partial``: one safetensors file per finished batch, valid for one fingerprint.

    Under several processes only the main one (rank 0) checks the fingerprint and resets a stale store;
    the others wait at a barrier and open the store after that, so no rank can delete a batch that
    another has already saved. Every process must construct the store (the barrier needs them all).
    """

    def __init__(self, folder: Path, fingerprint: str, processes: Processes | None = None) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        processes = processes or Processes()
        self.reset = self._reset_if_stale() if processes.is_main else False
        processes.barrier()
        if not processes.is_main and self._stored_fingerprint() != fingerprint:
            raise RuntimeError(f"{self.folder}: the main process did not prepare the batch store (fingerprints differ)")

    def _stored_fingerprint(self) -> str | None:
        try:
            return json.loads((self.folder / META).read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None

    def _reset_if_stale(self) -> bool:
        """Delete a store made for another fingerprint; make the folder and record ours. True if reset."""
        stale = (self.folder / META).is_file() and self._stored_fingerprint() != self.fingerprint
        if stale:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / META).write_text(json.dumps({"fingerprint": self.fingerprint}))
        return stale

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def finished(self) -> int:
        return len(list(self.folder.glob("*.safetensors")))

    def save(self, key: str, records: dict[str, CallRecord]) -> None:
        from safetensors.torch import save_file

        tensors, meta = {}, {}
        for name, record in records.items():
            observed = {obs: list(items) for obs, items in record.observed.items()}
            meta[name] = json.dumps({"stat_names": list(record.stat_names), "branches": list(record.stats),
                                     "experts": list(record.experts), "observed": observed})
            tensors[f"{name}/timesteps"] = record.timesteps.contiguous()
            tensors[f"{name}/sigmas"] = record.sigmas.contiguous()
            for branch, stats in record.stats.items():
                tensors[f"{name}/{branch}"] = stats.contiguous()
            for obs, items in record.observed.items():
                for branch, values in items.items():
                    tensors[f"{name}/observed/{obs}/{branch}"] = values.contiguous()
        tmp = self._path(key).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self._path(key))  # atomic: a killed run never leaves half a batch

    def load(self, key: str) -> dict[str, CallRecord] | None:
        from safetensors import safe_open

        path = self._path(key)
        if not path.is_file():
            return None
        records = {}
        with safe_open(str(path), framework="pt") as handle:
            for name, text in handle.metadata().items():
                info = json.loads(text)
                records[name] = CallRecord(
                    stats={b: handle.get_tensor(f"{name}/{b}") for b in info["branches"]},
                    stat_names=tuple(info["stat_names"]),
                    timesteps=handle.get_tensor(f"{name}/timesteps"),
                    sigmas=handle.get_tensor(f"{name}/sigmas"),
                    experts=list(info.get("experts", [])),
                    observed={obs: {b: handle.get_tensor(f"{name}/observed/{obs}/{b}") for b in branches}
                              for obs, branches in info.get("observed", {}).items()},
                )
        return records

    def save_extra(self, key: str, name: str, tensors: dict, meta: dict) -> None:
        """Optional per-batch aggregates (maps, image signals) next to the batch, same atomic write."""
        from safetensors.torch import save_file

        path = self.folder / f"{key}.{name}.extra"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"meta": json.dumps(meta)})
        os.replace(tmp, path)

    def load_extra(self, key: str, name: str) -> tuple[dict, dict] | None:
        from safetensors import safe_open

        path = self.folder / f"{key}.{name}.extra"
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, json.loads(handle.metadata()["meta"])

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
