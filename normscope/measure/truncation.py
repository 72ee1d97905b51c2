"""Prompts longer than a text encoder takes: silenced while they are encoded, and said once per run.

diffusers logs every truncated batch with the removed text ("The following part of your input was
truncated because CLIP can only handle sequences up to 77 tokens: [...]") and transformers' tokenizers add
"Token indices sequence length is longer than ...": one huge prompt floods stderr with megabytes. While
normscope encodes prompts (``quiet_tokenizers``), those records of the ``diffusers`` and ``transformers``
loggers are caught instead of printed (every other record goes on to their handlers as before); the
truncated prompts are counted per length, and ``truncation_note`` gives the one line the run reports.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

LIBRARIES = ("diffusers", "transformers")
TRUNCATED = re.compile(r"truncated because .*?(?:up to|is set to)\s+(\d+)\s+tokens", re.S)
TOO_LONG = "Token indices sequence length is longer than"

# limit (tokens) -> (encoder kind, prompts cut to it), for the run in progress; drained by truncation_note.
_found: dict[tuple[int, str], set[str]] = {}


class _Catch(logging.Handler):
    """Keeps the truncation records; passes every other record to the library's own handlers."""

    def __init__(self, forward: dict[str, tuple[list[logging.Handler], int]]) -> None:
        super().__init__(logging.DEBUG)
        self.forward = forward
        self.limits: set[tuple[int, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        match = TRUNCATED.search(message[:300])
        if match:
            self.limits.add((int(match.group(1)), "CLIP" if "CLIP" in message[:200] else "T5"))
            return
        if message.startswith(TOO_LONG):
            return
        handlers, level = self.forward.get(record.name.split(".")[0], ([], logging.WARNING))
        if record.levelno >= level:
            for handler in handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)


def _tokens(tokenizer, prompt: str) -> int:
    try:
        return len(tokenizer(prompt).input_ids)
    except Exception:  # a tokenizer that cannot count this way: not counted
        return 0


@contextmanager
def quiet_tokenizers(pipe=None, prompts: Sequence[str] = ()) -> Iterator[None]:
    """Catch truncation warnings while ``pipe`` encodes ``prompts``; count which prompts were cut, and to what.

    The loggers' handlers, levels and propagation are restored afterwards, whatever happens inside.
    """
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    catch = _Catch({lg.name: (handlers, lg.getEffectiveLevel()) for lg, handlers, _, _ in saved})
    for lg in loggers:
        lg.handlers = [catch]
        lg.propagate = False
        lg.setLevel(min(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate
    if catch.limits and pipe is not None:
        _count(pipe, prompts, catch.limits)


def _count(pipe, prompts: Sequence[str], limits: set[tuple[int, str]]) -> None:
    components = getattr(pipe, "components", {}) or {}
    tokenizers = [t for name, t in components.items() if name.startswith("tokenizer") and t is not None]
    for limit, kind in limits:
        chosen = [t for t in tokenizers if ("CLIP" in type(t).__name__) == (kind == "CLIP")] or tokenizers
        cut = {p for p in dict.fromkeys(prompts) if any(_tokens(t, p) > limit for t in chosen)}
        if cut:
            _found.setdefault((limit, kind), set()).update(cut)


def truncation_note() -> str | None:
    """The one line for the run's notes (how many prompts were cut to which length), then forget them."""
    if not _found:
        return None
    prompts = set().union(*_found.values())
    parts = ", ".join(f"{len(cut)} to {limit} tokens ({kind})" for (limit, kind), cut in sorted(_found.items()))
    _found.clear()
    return (f"{len(prompts)} prompt(s) longer than the text encoders take were truncated: {parts}; the model sees "
            "only their beginning (the encoders' warnings are silenced)")


def report_truncation(reporter) -> None:
    """Hand the run's truncation note (if any) to ``reporter``: once, however many batches were cut."""
    note = truncation_note()
    if note and reporter is not None:
        reporter.note(note)
