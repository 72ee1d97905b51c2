"""Terminal rendering of ``normscope presets``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from normscope.render.safe import cells


def render_presets(rows: list[dict], console: Console) -> None:
    """One line per preset: what it sets and where the setting comes from."""
    table = Table(title="normscope presets (--preset NAME; explicit options override)")
    for column in ("name", "family", "steps", "guidance", "argument", "size"):
        table.add_column(column, no_wrap=True)  # names are typed back as --preset NAME: never split them
    table.add_column("source", overflow="fold")
    for row in rows:
        size = "pipeline default" if row["size"] is None else f"{row['size']} px"
        table.add_row(*cells(row["name"], row["family"], row["steps"], f"{row['guidance']:g}", row["argument"], size,
                             row["source"]))
    console.print(table)
