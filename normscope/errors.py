"""The few exceptions normscope raises on purpose, and the exit code each one maps to.

Every message names the bad value and the fix, in one line, so the CLI can print it as is.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INFLATED = 1  # `normscope check`: the checkpoint is beyond the gate
EXIT_INPUT = 2  # bad invocation or bad input (paths, files, options)
EXIT_RUN = 3  # the measurement itself failed (non-finite velocities, a pipeline normscope cannot follow)
EXIT_INTERRUPTED = 130


class NormscopeError(Exception):
    """Base class: a failure normscope understands and can explain in one line."""

    exit_code = EXIT_INPUT


class InputError(NormscopeError):
    """A path, file, option or prompt set that cannot be used as given."""


class ConfigError(InputError):
    """An option value out of range or contradicting another option."""


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable, unsafe, or does not fit the pipeline."""


class RunError(NormscopeError):
    """The run started but could not produce a valid measurement."""

    exit_code = EXIT_RUN


class NoMeasurementError(RunError):
    """The run finished, but nothing finite was measured; ``summary`` (also in summary.json) holds the counts."""

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class GuardInputError(InputError, ValueError):
    """A tensor handed to ``normscope.guard`` or ``normscope.monitor`` with the wrong shape, range or kind.

    It is also a ``ValueError``: a training loop that already catches those keeps working.
    """
