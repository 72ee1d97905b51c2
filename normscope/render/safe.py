"""User text on a rich console is text, never markup.

Paths, prompts, adapter names, titles and error messages can hold ``[v2]``, ``[/]`` or ``:b:``. A console
that reads them as markup drops them, turns them into emoji or raises ``MarkupError`` mid-run. Every
console normscope prints on is made here with markup and emoji codes off; normscope's own colours are
``rich.text.Text`` styles, and render functions hand table cells over as ``Text`` (safe on any console).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text


def plain_console(**kwargs) -> Console:
    """A console that prints strings as they are: no markup, no emoji codes."""
    return Console(markup=False, emoji=False, **kwargs)


def stdout_console() -> Console:
    """Results on stdout; when piped or captured (CI logs, files), wide enough that tables never wrap."""
    return plain_console(width=None if sys.stdout.isatty() else 120)


def labelled(label: str, style: str, message: object) -> Text:
    """``error: <message>`` with only the label coloured; the message is literal."""
    return Text.assemble((label, style), " ", str(message))


def cell(value: object, style: str | None = None) -> Text:
    """One table cell (or title) as literal text."""
    return value if isinstance(value, Text) else Text(str(value), style=style or "")


def cells(*values: object) -> list[Text]:
    return [cell(v) for v in values]


MD_SPECIAL = {"\\": "\\\\", "|": "\\|", "`": "\\`", "[": "\\[", "]": "\\]", "*": "\\*", "&": "&amp;", "<": "&lt;",
              ">": "&gt;"}


def md_text(value: object) -> str:
    """Text (a folder name, a title, a caption) as literal Markdown on one line: no table breaks, no HTML, no links."""
    text = " ".join(str(value).split())  # newlines would end a table row or a heading
    return "".join(MD_SPECIAL.get(c, c) for c in text)
