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
    # the conditioning image of an edit / image-to-video sample (a pairs file's row); a tuple of paths, in order, where
    # the row lists several (issue 19: pipelines that take a list of condition images)
    image: str | tuple[str, ...] | None = None


def default_prompts() -> list[str]:
    """The shipped prompt set: people, animals, text in images, scenes, objects, counting and colour."""
    text = resources.files("normscope").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    """The file as text: UTF-8 (a leading BOM dropped); refused naming the byte offset where it is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # a symlink loop, a permission, a FIFO gone away
        raise InputError(f"prompt file {path} cannot be read ({exc.strerror or type(exc).__name__}): "
                         "pass a readable .txt, .jsonl or .csv file to --prompts") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file {path} is not UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r}): "
                         "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > prompts.txt)") from None


def _prompt_text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise InputError(f"{where}: \"{column}\" is {kind}, not text: write the prompt as a JSON string, "
                         f"e.g. {{\"{column}\": \"a red fox\"}}")
    return value.strip()


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a .txt (one per line), .jsonl or .csv (a ``prompt`` field) file.

    UTF-8 only (a byte-order mark is dropped). Empty prompts (blank lines, empty CSV cells, ``""`` in
    .jsonl) are skipped in every format; a .jsonl prompt that is not a string (null, a number, a list) is
    refused naming its line.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"prompt file {path} is a folder: pass a .txt, .jsonl or .csv file to --prompts")
    if not path.exists():
        problem = "is a broken or looping symlink" if path.is_symlink() else "does not exist"
        raise InputError(f"prompt file {path} {problem}: pass an existing .txt, .jsonl or .csv file to --prompts")
    if not path.is_file():
        raise InputError(f"prompt file {path} is not a regular file: pass a .txt, .jsonl or .csv file to --prompts")
    suffix = path.suffix.lower()
    text = _read_text(path)
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
            prompts.append(_prompt_text(record["prompt"], f"{path}:{number}", "prompt"))
    elif suffix == ".csv":
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as exc:
            raise InputError(f"{path} is not valid CSV ({exc}): write a header row with a prompt column") from None
        if rows and "prompt" not in rows[0]:
            raise InputError(f"{path} has no 'prompt' column (columns: {', '.join(map(str, rows[0]))}): add a header named prompt")
        prompts = [(row.get("prompt") or "").strip() for row in rows]  # a short row has no cell: empty, skipped
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


def make_samples(prompts: list[str], seeds: tuple[int, ...],
                 images: list[str | tuple[str, ...] | None] | None = None) -> list[Sample]:
    """Every prompt with every seed, prompt-major, in a fixed order; ``images``: one image path per prompt."""
    images = images or [None] * len(prompts)
    return [Sample(i, prompt, seed, images[i]) for i, prompt in enumerate(prompts) for seed in seeds]


IMAGE_FIELD = "image"


def prompt_images(prompts_file: Path | None,
                  prompts: tuple[str, ...] = ()) -> list[str | tuple[str, ...] | None] | None:
    """The ``image`` of each prompt of a (prompt, image) pairs file (.jsonl or .csv with an ``image`` field, as the
    trainers' edit evaluation sets), aligned with ``resolve_prompts``; None when the file has no images.

    A relative path is relative to the pairs file's folder. A row whose image is missing, or names no file, is
    refused in one line naming the row. Prompts given with ``--prompt`` have no image (None). A .jsonl row's
    ``image`` may be a list of paths: several condition images for that prompt, in order (a tuple; a list of one
    is that one path).
    """
    if prompts_file is None or Path(prompts_file).suffix.lower() not in (".jsonl", ".csv"):
        return None
    path = Path(prompts_file)
    read_prompt_file(path)  # the file's own problems first, in its own words
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        rows = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        rows = list(enumerate(csv.DictReader(text.splitlines()), start=2))
    rows = [(n, r) for n, r in rows if str(r["prompt"]).strip()]
    if not any(r.get(IMAGE_FIELD) for _, r in rows):
        return None
    images: list[str | tuple[str, ...] | None] = []
    for number, record in rows:
        value = record.get(IMAGE_FIELD)
        if not value:
            raise InputError(f"{path}:{number} has no \"image\": every row of a (prompt, image) pairs file needs one")
        if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
            raise InputError(f"{path}:{number}: \"image\" lists {value!r}: write the paths as strings, e.g. "
                             "\"image\": [\"a.png\", \"b.png\"]")
        found = []
        for item in value if isinstance(value, list) else [value]:
            image = Path(str(item))
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise InputError(f"{path}:{number}: image {image} does not exist: fix the path (relative paths are "
                                 "relative to the pairs file's folder)")
            found.append(str(image))
        images.append(found[0] if len(found) == 1 else tuple(found))
    return images + [None] * len([p for p in prompts if p.strip()])


def image_count(image) -> int:
    """How many condition images one entry holds: a path, a tuple of paths, or None."""
    return 0 if image is None else len(image) if isinstance(image, tuple) else 1
