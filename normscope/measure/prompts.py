"""The probe set: prompts x seeds, and where the prompts come from."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from normscope.errors import InputError

DEFAULT_PROMPTS_NAME = "normscope/data/prompts.txt"


@dataclass(frozen=True)
class Sample:
    """One (prompt, seed) pair: the unit that the statistics resample."""

    prompt_id: int
    prompt: str
    seed: int


def default_prompts() -> list[str]:
    """The shipped prompt set: people, animals, text in images, scenes, objects, counting and colour."""
    text = resources.files("normscope").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl or .csv (a ``prompt`` field) file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {path} does not exist: pass an existing .txt, .jsonl or .csv file to --prompts")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number} is not valid JSON ({exc.msg}): write one JSON object per line") from None
            if not isinstance(record, dict) or "prompt" not in record:
                raise InputError(f"{path}:{number} has no \"prompt\" field: write {{\"prompt\": \"...\"}} per line")
            prompts.append(str(record["prompt"]).strip())
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "prompt" not in rows[0]:
            raise InputError(f"{path} has no 'prompt' column (columns: {', '.join(rows[0])}): add a header named prompt")
        prompts = [row["prompt"].strip() for row in rows]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts: put at least one non-empty prompt in it")
    return prompts


def resolve_prompts(prompts_file: Path | None, prompts: tuple[str, ...]) -> list[str]:
    """--prompts FILE and repeated --prompt TEXT together; the shipped set when neither is given."""
    found = read_prompt_file(prompts_file) if prompts_file is not None else []
    found += [p.strip() for p in prompts if p.strip()]
    if prompts and not found:
        raise InputError("every --prompt given is empty: pass a non-empty prompt text")
    return found or default_prompts()


def make_samples(prompts: list[str], seeds: tuple[int, ...]) -> list[Sample]:
    """Every prompt with every seed, prompt-major, in a fixed order."""
    return [Sample(i, prompt, seed) for i, prompt in enumerate(prompts) for seed in seeds]
