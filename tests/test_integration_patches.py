"""The integration patches in examples/integrations: real git diffs that apply on their named upstream commit.

Offline (always): the header names a full commit hash and the git blob of every patched file; every hunk
header counts its lines right; the lines each hunk replaces hash to the digest recorded from the upstream
file at that commit (examples/integrations/record.py); every config field the patch reads it also adds
(ml_collections raises on an unknown field; argparse on an unknown option); every normscope name it imports
exists. With the upstream repository at hand (a bare mirror under $NORMSCOPE_UPSTREAM, default
/work/.mirror/OWNER+NAME/repo): ``git apply --check`` against that commit's tree, in a throwaway index.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

INTEGRATIONS = Path(__file__).resolve().parents[1] / "examples" / "integrations"
PATCHES = sorted(INTEGRATIONS.glob("*.patch"))
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
EXPECTED = {"flow_grpo_sd3", "flow_grpo_dpo", "diffusionnft_sd3", "awm_sd3", "dancegrpo_flux"}


def parse(path: Path) -> dict:
    text = path.read_text()
    meta = {"files": {}, "hunks": [], "notes": []}
    for line in text.splitlines():
        if not line.startswith("# "):
            if line.startswith("diff --git"):
                break
            continue
        key, _, value = line[2:].partition(": ")
        if key == "file":
            name, blob = value.split(" blob=")
            meta["files"][name] = blob
        elif key == "hunk":
            name, rng, digest = value.split(" ")
            meta["hunks"].append((name, rng, digest.removeprefix("sha256=")))
        elif key == "note":
            meta["notes"].append(value)
        else:
            meta[key] = value
    meta["body"] = text[text.index("diff --git"):]
    return meta


def hunks(body: str):
    """(path, '-start,count', old lines, new lines, header counts) per hunk."""
    out, path, current = [], None, None
    for line in body.splitlines():
        if line.startswith("diff --git "):
            path, current = line.split(" b/", 1)[1], None
        elif (m := HUNK.match(line)) is not None:
            current = {"path": path, "range": f"-{m[1]},{m[2] or 1}", "old": [], "new": [],
                       "counts": (int(m[2] or 1), int(m[4] or 1))}
            out.append(current)
        elif current is not None and line[:1] in (" ", "-", "+"):
            if line[:1] in (" ", "-"):
                current["old"].append(line[1:])
            if line[:1] in (" ", "+"):
                current["new"].append(line[1:])
    return out


def test_every_trainer_has_a_patch():
    assert {p.stem for p in PATCHES} == EXPECTED


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_header_hunks_and_context_match_the_recorded_upstream(patch):
    meta = parse(patch)
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"]), meta.get("commit")
    assert meta["upstream"].startswith("https://github.com/")
    body = meta["body"]
    indexed = dict(re.findall(r"^diff --git a/(\S+) b/\S+\nindex ([0-9a-f]+)\.\.", body, flags=re.M))
    assert set(indexed) == set(meta["files"])
    for name, abbreviated in indexed.items():
        assert meta["files"][name].startswith(abbreviated), name  # the pre-image is the recorded upstream blob
    found = hunks(body)
    assert [(h["path"], h["range"]) for h in found] == [(n, r) for n, r, _ in meta["hunks"]]
    for hunk, (_, _, digest) in zip(found, meta["hunks"], strict=True):
        assert (len(hunk["old"]), len(hunk["new"])) == hunk["counts"], hunk["range"]
        assert hashlib.sha256("".join(f"{line}\n" for line in hunk["old"]).encode()).hexdigest() == digest, \
            f"{hunk['path']} {hunk['range']}: context lines differ from the upstream file"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_config_fields_read_are_added_and_normscope_names_exist(patch):
    body = parse(patch)["body"]
    added = "\n".join(line[1:] for line in body.splitlines() if line.startswith("+"))
    if patch.stem == "dancegrpo_flux":  # argparse
        read = set(re.findall(r"\bargs\.(normguard\w*)", added))
        defined = set(re.findall(r'add_argument\(\s*"--(normguard\w*)"', added))
    else:  # ml_collections: config.train.X must exist in the base config the trainer loads
        read = set(re.findall(r"\bconfig\.train\.(normguard\w*)", added))
        defined = set(re.findall(r"^\s*train\.(normguard\w*) = ", added, flags=re.M))
    assert read and read <= defined, (read, defined)
    assert {"normguard", "normguard_margin", "normguard_monitor", "normguard_gate"} <= defined
    imports = re.findall(r"^from (normscope[\w.]*) import ([\w, ]+)$", added, flags=re.M)
    assert imports
    for module, names in imports:
        loaded = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(loaded, name.strip()), f"{module}.{name.strip()}"


def _mirror(url: str) -> Path | None:
    owner, name = url.removeprefix("https://github.com/").split("/")[:2]
    root = Path(os.environ.get("NORMSCOPE_UPSTREAM", "/work/.mirror"))
    for candidate in (root / f"{owner}+{name}" / "repo", root / f"{owner}+{name}", root / name):
        if (candidate / "objects").is_dir() or (candidate / ".git").is_dir():
            return candidate
    return None


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.stem)
def test_git_apply_check_on_the_named_commit(patch):
    meta = parse(patch)
    repo = _mirror(meta["upstream"])
    if repo is None:
        pytest.skip(f"no local copy of {meta['upstream']} (set NORMSCOPE_UPSTREAM to a folder of mirrors)")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        subprocess.run(["git", "--git-dir", str(repo), "read-tree", meta["commit"]], check=True, env=env,
                       capture_output=True)
        for name, blob in meta["files"].items():
            listed = subprocess.run(["git", "--git-dir", str(repo), "ls-files", "-s", name], env=env, check=True,
                                    capture_output=True, text=True).stdout.split()
            assert listed[1] == blob, name
        result = subprocess.run(["git", "--git-dir", str(repo), "apply", "--cached", "--check", str(patch)],
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
