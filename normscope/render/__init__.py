"""Render stage: what a result looks like in the terminal, in the run folder, in figures and in CI formats."""
