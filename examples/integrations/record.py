"""Write an integration patch with the header its offline test checks: the commit, file blobs, hunk digests.

    python examples/integrations/record.py UPSTREAM_CHECKOUT COMMIT BODY.diff OUT.patch --title "..." [--note "..."]

BODY.diff is ``git diff`` of the edited upstream checkout against COMMIT. The header records, per file, the
git blob id of the file at COMMIT and, per hunk, the sha256 of the upstream lines the hunk replaces (its
context and removed lines): ``tests/test_integration_patches.py`` rebuilds those lines from the patch and
compares, so a hand edit of a context line is caught without the upstream repository at hand. Where the
upstream repository is at hand it also runs ``git apply --check`` on COMMIT.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
from pathlib import Path

HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def hunks(body: str):
    """(path, old_start, old_count, pre-image lines) for every hunk of a unified git diff."""
    path, out, current = None, [], None
    for line in body.splitlines():
        if line.startswith("diff --git "):
            path = line.split(" b/", 1)[1]
            current = None
        elif (m := HUNK.match(line)) is not None:
            current = [path, int(m[1]), int(m[2] or 1), []]
            out.append(current)
        elif current is not None and line[:1] in (" ", "-"):
            current[3].append(line[1:])
    return [tuple(h) for h in out]


def digest(lines: list[str]) -> str:
    return hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()


def _show(repo: Path, commit: str, path: str) -> list[str]:
    return subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], check=True, capture_output=True,
                          text=True).stdout.splitlines()


def header(repo: Path, commit: str, body: str, title: str, url: str, notes: list[str]) -> str:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", commit], check=True, capture_output=True, text=True).stdout.strip()
    lines = [f"# normscope integration: {title}", f"# upstream: {url}", f"# commit: {commit}"]
    lines += [f"# note: {n}" for n in notes]
    paths = list(dict.fromkeys(h[0] for h in hunks(body)))
    for path in paths:
        blob = subprocess.run(["git", "-C", str(repo), "rev-parse", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout.strip()
        lines.append(f"# file: {path} blob={blob}")
    for path, start, count, pre in hunks(body):
        upstream = _show(repo, commit, path)[start - 1:start - 1 + count]  # the real file's lines, not the patch's
        if upstream != pre:
            raise SystemExit(f"{path} -{start},{count}: the hunk's context does not match the file at {commit}")
        lines.append(f"# hunk: {path} -{start},{count} sha256={digest(upstream)}")
    lines.append("# apply: git -C UPSTREAM_CHECKOUT apply THIS.patch   (then pip install normscope)")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path)
    parser.add_argument("commit")
    parser.add_argument("body", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--title", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args()
    body = args.body.read_text()
    args.out.write_text(header(args.repo, args.commit, body, args.title, args.url, args.note) + body)


if __name__ == "__main__":
    main()
