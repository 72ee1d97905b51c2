"""Terminal rendering of ``normscope presets``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from normscope.render.safe import cells

# The keywords a preset may set besides steps, guidance and size (normscope.load.families.Preset.FIELDS).
OTHER_FIELDS = ("max_sequence_length", "num_frames", "guidance_2", "negative_prompt", "cfg_normalization",
                "cfg_truncation", "shift")


def size_text(row: dict) -> str:
    if row["size"] is not None:
        return f"{row['size']} px"
    if row.get("height") is not None or row.get("width") is not None:
        return f"{row.get('height')}x{row.get('width')} px"
    return "pipeline default"


def other_settings(row: dict) -> str:
    """The other keywords the preset hands to the pipeline call, e.g. ``max_sequence_length=128, negative_prompt=''``."""
    parts = []
    for name in OTHER_FIELDS:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            value = repr(value if len(value) <= 24 else value[:21] + "...")
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return ", ".join(parts) or "-"


def render_presets(rows: list[dict], console: Console) -> None:
    """One line per preset (what it sets), then each preset's source on its own line (they are long)."""
    table = Table(title="normscope presets (--preset NAME; explicit options override)")
    for column in ("name", "family", "steps", "guidance", "argument", "size"):
        table.add_column(column, no_wrap=True)  # names are typed back as --preset NAME: never split them
    table.add_column("also sets", overflow="fold")
    for row in rows:
        table.add_row(*cells(row["name"], row["family"], row["steps"], f"{row['guidance']:g}", row["argument"],
                             size_text(row), other_settings(row)))
    console.print(table)
    console.print("sources (repository@commit file:line):", highlight=False)
    for row in rows:
        console.print(f"  {row['name']}: {row['source']}", highlight=False, soft_wrap=True, markup=False)
