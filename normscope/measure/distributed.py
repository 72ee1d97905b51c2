"""Many processes (``accelerate launch`` or ``torchrun``): shard the (prompt, seed) batches, gather on all.

Batches are formed exactly as in a single process and dealt out round-robin, so every batch is computed
with the same composition and the gathered numbers are identical to a single-process run. Only the main
process writes files and prints.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    index: int = 0
    count: int = 1
    local_index: int = 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, device: str) -> str:
        """Each process takes its own GPU; CPU processes share the CPU."""
        return f"cuda:{self.local_index}" if device == "cuda" and self.count > 1 else device

    def barrier(self) -> None:
        """Wait until every process has got here (returns at once in a single process)."""
        if self.count > 1:
            from accelerate.utils import wait_for_everyone

            wait_for_everyone()

    def map(self, count: int, compute: Callable[[int], T]) -> list[T]:
        """``[compute(i) for i in range(count)]``, the i's dealt round-robin to the processes, gathered in order."""
        mine = [(i, compute(i)) for i in range(self.index, count, self.count)]
        if self.count == 1:
            return [result for _, result in mine]
        from accelerate.utils import gather_object

        gathered = gather_object(mine)
        return [result for _, result in sorted(gathered, key=lambda pair: pair[0])]


def launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Without starting anything: the launcher's RANK (0 when not launched)."""
    return int(os.environ.get("RANK", "0")) == 0


@functools.cache
def processes(cpu: bool) -> Processes:
    """The process group of this run; a single process unless a launcher started several."""
    if launched_processes() <= 1:
        return Processes()
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cpu)
    return Processes(accelerator.process_index, accelerator.num_processes, accelerator.local_process_index)


def current_processes() -> Processes:
    """The process group already set up by a job (a single process when none was launched)."""
    if launched_processes() <= 1:
        return Processes()
    import torch

    return processes(cpu=not torch.cuda.is_available())
