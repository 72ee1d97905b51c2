"""Reporters for tests: one that keeps the notes a run says, and one that also stops the run like Ctrl-C."""

from __future__ import annotations


class KeptNotes:
    """A reporter that keeps every note (``notes``) and draws no bar."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def begin(self, total_steps) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        self.notes.append(message)


class StopAfter(KeptNotes):
    """Interrupts the run (KeyboardInterrupt, as Ctrl-C would) once ``steps`` denoising steps are done."""

    def __init__(self, steps: float) -> None:
        super().__init__()
        self.left = steps

    def advance(self, steps: int = 1) -> None:
        self.left -= steps
        if self.left < 0:
            raise KeyboardInterrupt
