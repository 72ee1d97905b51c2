"""Terminal rendering of ``normscope presets``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from normscope.load.families import Preset
from normscope.render.safe import cells

# The keywords a preset may set besides steps, guidance and size: read from the Preset row, so a new field shows.
OTHER_FIELDS = Preset.FIELDS


def size_text(row: dict, unset: str = "pipeline default") -> str:
    if row["size"] is not None:
        return f"{row['size']} px"
    if row.get("height") is not None or row.get("width") is not None:
        return f"{row.get('height')}x{row.get('width')} px"
    return unset


def other_settings(row: dict) -> str:
    """The other keywords the preset hands to the pipeline call, one per line (``max_sequence_length=128``)."""
    parts = []
    for name in OTHER_FIELDS:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            value = repr(value if len(value) <= 24 else value[:21] + "...")
        parts.append(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}")
    return "\n".join(parts) or "-"


def guidance_text(row: dict) -> str:
    """``4.5`` for ``guidance_scale``; ``4 (true CFG)`` for ``true_cfg_scale`` (Qwen-Image, FLUX.1 true CFG)."""
    text = f"{row['guidance']:g}"
    return text if row["argument"] == "guidance_scale" else f"{text} (true CFG)"


def render_presets(rows: list[dict], console: Console) -> None:
    """One row per preset (what it sets; the other keywords one per line), then each preset's source on its own
    line (they are long)."""
    table = Table(title="normscope presets (--preset NAME; explicit options override)")
    for column in ("name", "family", "steps", "guidance", "size"):
        table.add_column(column, no_wrap=True)  # names are typed back as --preset NAME: never split them
    table.add_column("also sets", overflow="fold")  # the only column that may wrap
    for row in rows:
        table.add_row(*cells(row["name"], row["family"], row["steps"], guidance_text(row), size_text(row, "default"),
                             other_settings(row)))
    console.print(table)
    console.print("sources (repository@commit file:line):", highlight=False)
    for row in rows:
        console.print(f"  {row['name']}: {row['source']}", highlight=False, soft_wrap=True, markup=False)


def markdown_table(rows: list[dict]) -> str:
    """The presets as the Markdown table of docs/presets.md (``make docs-presets`` writes it; a test compares)."""
    lines = ["| preset | family | steps | guidance | argument | size | also sets | source |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        also = other_settings(row).replace("\n", ", ")
        source = row["source"].replace("|", "/")
        lines.append(f"| `{row['name']}` | {row['family']} | {row['steps']} | {row['guidance']:g} | "
                     f"`{row['argument']}` | {size_text(row)} | {also} | {source} |")
    return "\n".join(lines) + "\n"


def write_docs_table(path) -> bool:
    """Replace the presets table of ``path`` (docs/presets.md) with ``markdown_table``; True when it changed."""
    from pathlib import Path

    from normscope.commands.presets import list_presets

    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("| preset |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    text = "".join(lines[:start]) + markdown_table(list_presets()) + "".join(lines[end:])
    changed = text != path.read_text()
    if changed:
        path.write_text(text)
    return changed


if __name__ == "__main__":  # make docs-presets
    import sys

    print("docs/presets.md " + ("rewritten" if write_docs_table(sys.argv[1]) else "already up to date"))
