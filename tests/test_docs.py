"""Every command has help text and a docs page that mentions each of its options."""

from __future__ import annotations

from pathlib import Path

import typer.main

from normscope.cli import app

DOCS = Path(__file__).resolve().parents[1] / "docs"


def commands():
    group = typer.main.get_command(app)
    return group.commands.items()


def test_every_command_has_help_and_a_page():
    for name, command in commands():
        assert command.help and command.help.strip(), name
        page = DOCS / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        text = page.read_text()
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("--"):
                    assert flag in text, f"docs/{name}.md does not mention {flag}"
            if not getattr(param, "opts", [""])[0].startswith("-"):
                continue
            assert param.help, f"{name} {param.name} has no help text"


def test_docs_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"({page.name})" in index, page.name
