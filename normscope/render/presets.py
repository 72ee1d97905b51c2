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


def replace_table(path, header: str, table: str) -> bool:
    """Replace the Markdown table of ``path`` whose first line starts with ``header``; True when it changed."""
    from pathlib import Path

    path = Path(path)
    before = path.read_text()
    lines = before.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    text = "".join(lines[:start]) + table + "".join(lines[end:])
    if text != before:
        path.write_text(text)
    return text != before


def docs_tables() -> dict[str, tuple[str, str]]:
    """The generated tables of the docs: file name -> (first line, table)."""
    from normscope.commands.presets import list_presets
    from normscope.load.families import FAMILIES

    rows = list_presets()
    return {"presets.md": ("| preset |", markdown_table(rows)),
            "models.md": ("| family | tuned by", tuned_by_table(rows, [f.name for f in FAMILIES]))}


def write_docs_tables(docs) -> list[str]:
    """Rewrite the generated tables under the ``docs`` folder; the files that changed."""
    from pathlib import Path

    return [name for name, (header, table) in docs_tables().items() if replace_table(Path(docs) / name, header, table)]


# The trainer of a preset, by the prefix of its name (docs/models.md's "tuned by" table).
TRAINERS = (("flow_grpo-", "flow_grpo"), ("diffusionnft-", "DiffusionNFT"), ("awm-", "AWM"),
            ("flow-factory-", "Flow-Factory"), ("tempflow-grpo-", "TempFlow-GRPO"), ("pref-grpo-", "Pref-GRPO"),
            ("dancegrpo-", "DanceGRPO"))


def trainer_of(name: str) -> str:
    return next((trainer for prefix, trainer in TRAINERS if name.startswith(prefix)), "other")


def tuned_by_table(rows: list[dict], families: list[str]) -> str:
    """docs/models.md's table: each family, the trainers whose presets sample it, and those presets."""
    lines = ["| family | tuned by (presets) |", "|---|---|"]
    for family in families:
        by_trainer: dict[str, list[str]] = {}
        for row in rows:
            if row["family"] == family:
                by_trainer.setdefault(trainer_of(row["name"]), []).append(f"`{row['name']}`")
        cell = "; ".join(f"{trainer}: {', '.join(names)}" for trainer, names in by_trainer.items()) or "no preset"
        lines.append(f"| `{family}` | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # make docs-presets
    import sys

    print("rewritten: " + (", ".join(write_docs_tables(sys.argv[1])) or "none (up to date)"))
