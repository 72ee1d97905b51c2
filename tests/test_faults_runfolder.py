"""Fault injection on the run folder: concurrent runs, kills at every stage, a full disk, damaged caches, stale files.

Every case ends in one of two states — the numbers of exactly one run, or a one-line refusal — never a mix.
Kills are real (SIGKILL / SIGSTOP on a `python -m normscope` process, or a named failpoint that kills the
process at an exact moment of the publish); the disk is really full (`ulimit -f`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from normscope.cli import app
from normscope.runfolder import MANIFEST

runner = CliRunner()
PROBE_ARGS = ["--steps", "4", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--guidance", "4.5",
              "--device", "cpu", "--dtype", "float32", "--prompt", "a red fox in snow", "--prompt", "two green apples"]


def compare_args(pipelines, tuned: Path, out: Path, *extra: str, seeds: str = "0,1") -> list[str]:
    return ["compare", str(pipelines["sd3"]), str(tuned), "--out", str(out), "--seeds", seeds, "--batch-size", "1",
            *PROBE_ARGS, *extra]


def cli(args: list[str], **env: str) -> subprocess.Popen:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", **env}
    return subprocess.Popen([sys.executable, "-m", "normscope", *args], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def ratios(out: Path) -> set[float]:
    return set(pd.read_csv(out / "norms.csv")["ratio"].round(5))


def digests(out: Path) -> dict[str, str]:
    """Every visible file of a folder with its sha256 (what a user, or report, would read)."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not any(s.startswith(".") for s in p.relative_to(out).parts)}


def same_run(out: Path, clean: Path) -> bool:
    """Two folders hold the same run: the same files, byte for byte, but for where each was written."""
    def summary(folder: Path) -> dict:
        data = json.loads((folder / "summary.json").read_text())
        data["config"].pop("out")
        return data

    skip = {"summary.json", MANIFEST}
    ours, theirs = digests(out), digests(clean)
    return (ours.keys() == theirs.keys() and summary(out) == summary(clean)
            and {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in theirs.items() if k not in skip})


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, finish(process).stderr[-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# ---------------------------------------------------------------- one run per folder


def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_is_exact(pipelines, scaled, tmp_path):
    """The issue's race: compare x1.1 --out R, then compare x0.9 --out R while the first runs."""
    out = tmp_path / "R"
    first = cli(compare_args(pipelines, scaled("sd3", 1.1), out, seeds="0-7"))
    wait_for(out / ".partial" / "meta.json", first)  # inside the run: the store is open, the lock held
    os.kill(first.pid, signal.SIGSTOP)  # keep it inside the run while the second one tries
    try:
        second = runner.invoke(app, compare_args(pipelines, scaled("sd3", 0.9), out))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.exit_code == 2, second.output
    assert "is in use by another normscope run (pid" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    done = finish(first)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ratios(out) == {1.1}  # not one row of the refused x0.9 run
    assert json.loads((out / "summary.json").read_text())["inflation"] == pytest.approx(0.1, abs=2e-6)


def test_the_lock_dies_with_a_killed_run_and_the_rerun_resumes_byte_identical(pipelines, scaled, tmp_path):
    clean = tmp_path / "clean"
    assert runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), clean, "--mode", "both")).exit_code == 0
    out = tmp_path / "killed"
    rng = random.Random(18)
    for _ in range(2):  # killed twice at random moments of the run (measuring, writing a batch, publishing)
        first = cli(compare_args(pipelines, scaled("sd3", 1.1), out, "--mode", "both"))
        wait_for(out / ".partial" / "meta.json", first)
        time.sleep(rng.uniform(0.0, 1.5))
        first.kill()  # kill -9: no handler runs, the flock goes with the process
        first.wait()
    kept = len(list((out / ".partial").glob("*.safetensors")))  # a kill may land before the first batch finished
    resumed = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out, "--mode", "both"))
    assert resumed.exit_code == 0, resumed.output
    assert (f"resuming: {kept} finished batch(es)" in resumed.stderr) == (kept > 0), (kept, resumed.stderr)
    assert same_run(out, clean)


def test_ctrl_c_keeps_the_finished_batches_says_so_and_the_rerun_resumes(pipelines, scaled, tmp_path):
    out = tmp_path / "R"
    process = cli(compare_args(pipelines, scaled("sd3", 1.1), out, seeds="0-3"))
    wait_for(out / ".partial" / "paired-00001.safetensors", process)
    process.send_signal(signal.SIGINT)
    done = finish(process)
    assert done.returncode == 130, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "kept" in line]
    assert len(lines) == 1 and f"are kept in {out}: rerun the same command to resume" in lines[0]
    kept = int(lines[0].split("note: ")[1].split(" ")[0])
    assert kept >= 2 and kept == len(list((out / ".partial").glob("*.safetensors")))
    rerun = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out, seeds="0-3"))
    assert rerun.exit_code == 0 and f"resuming: {kept} finished batch(es)" in rerun.stderr
    assert ratios(out) == {1.1}


# ---------------------------------------------------------------- caches: foreign and damaged entries


def interrupted(pipelines, scaled, factor: float, out: Path, batches: int) -> None:
    """A run of x``factor`` killed after ``batches`` finished batches (their entries stay in .partial)."""
    process = cli(compare_args(pipelines, scaled("sd3", factor), out))
    wait_for(out / ".partial" / f"paired-{batches - 1:05d}.safetensors", process)
    process.kill()
    process.wait()


def test_a_foreign_batch_is_never_read(pipelines, scaled, tmp_path):
    interrupted(pipelines, scaled, 1.1, tmp_path / "a", 2)
    interrupted(pipelines, scaled, 0.9, tmp_path / "b", 2)
    # another run's batch under this run's name (a copy, a shared folder, a race of older normscopes)
    shutil.copy(tmp_path / "a" / ".partial" / "paired-00000.safetensors", tmp_path / "b" / ".partial" / "paired-00000.safetensors")
    result = runner.invoke(app, compare_args(pipelines, scaled("sd3", 0.9), tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert "paired-00000.safetensors was made by another run (its fingerprint differs): recomputed" in result.stderr
    assert ratios(tmp_path / "b") == {0.9}


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_cache_entry_is_recomputed_not_fatal(pipelines, scaled, tmp_path, damage):
    clean = tmp_path / "clean"
    assert runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), clean)).exit_code == 0
    out = tmp_path / "run"
    interrupted(pipelines, scaled, 1.1, out, 2)
    entries = [out / ".partial" / "paired-00001.safetensors", *sorted((out / ".prompt-embeddings").glob("*.safetensors"))[:1]]
    assert len(entries) == 2
    for entry in entries:
        data = entry.read_bytes()
        entry.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(64)}[damage])
    result = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out))
    assert result.exit_code == 0, result.output
    for entry in entries:
        assert f"cache entry {entry} was damaged" in result.stderr
    assert same_run(out, clean)


# ---------------------------------------------------------------- outputs land together


def test_a_rerun_that_dies_of_a_full_disk_leaves_the_finished_run_whole(pipelines, scaled, tmp_path):
    out = tmp_path / "R"
    assert runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out)).exit_code == 0
    before = digests(out)
    # The rerun measures x0.9 (its batches are small), then cannot write its figure: 48 KiB per file at most.
    full = subprocess.run(["bash", "-c", f"ulimit -f 48; exec {sys.executable} -m normscope \"$@\"", "normscope",
                           *compare_args(pipelines, scaled("sd3", 0.9), out)],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert full.returncode == 3, full.stderr[-2000:]
    assert "could not write the outputs into" in full.stderr and "File too large" in full.stderr
    assert "Traceback" not in full.stderr
    assert digests(out) == before  # the old run, whole: not a truncated norms.csv next to the old summary
    report = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    rerun = runner.invoke(app, compare_args(pipelines, scaled("sd3", 0.9), out))  # space again: it resumes
    assert rerun.exit_code == 0 and "resuming: 4 finished batch(es)" in rerun.stderr
    assert ratios(out) == {0.9}


@pytest.mark.parametrize("point", ["publish:staged", "publish:unlisted", "publish:cleared", "publish:moving"])
def test_a_publish_killed_at_any_point_is_never_read_as_a_mix(pipelines, scaled, tmp_path, point):
    out = tmp_path / "R"
    assert runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out)).exit_code == 0
    old = digests(out)
    killed = finish(cli(compare_args(pipelines, scaled("sd3", 0.9), out), NORMSCOPE_FAILPOINT=point))
    assert killed.returncode == -signal.SIGKILL
    report = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    if point == "publish:staged":  # killed before it touched the old run: the old run is whole and readable
        assert digests(out) == old and report.exit_code == 0
    else:  # the old manifest is gone: report refuses the folder, whatever lies in it
        assert report.exit_code == 2 and f"no {MANIFEST}" in report.stderr
    rerun = runner.invoke(app, compare_args(pipelines, scaled("sd3", 0.9), out))
    assert rerun.exit_code == 0, rerun.output
    assert "resuming: 4 finished batch(es)" in rerun.stderr
    clean = tmp_path / "clean"
    assert runner.invoke(app, compare_args(pipelines, scaled("sd3", 0.9), clean)).exit_code == 0
    assert same_run(out, clean)


def test_every_visible_file_belongs_to_the_last_run(pipelines, scaled, tmp_path):
    out = tmp_path / "R"
    first = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out, "--mode", "both", "--maps",
                                            "--save-images", seeds="0-3"))
    assert first.exit_code == 0, first.output
    assert len(list((out / "images").glob("*.png"))) == 2 * 4 * 2 and (out / "maps.safetensors").is_file()
    second = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out, "--mode", "both", "--save-images",
                                             seeds="0"))
    assert second.exit_code == 0, second.output
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "000-0-base.png", "000-0-tuned.png", "001-0-base.png", "001-0-tuned.png"]
    assert not (out / "maps.safetensors").exists() and not (out / "image_signals.csv").exists()
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == set(digests(out)) - {MANIFEST}
    report = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    from normscope.commands.report import Run

    run = Run(out)
    assert [label for label, _, _ in run.image_pairs()] == ["p0 s0", "p1 s0"] and run.maps is None
    assert "spectrum" not in (tmp_path / "report" / "report.md").read_text()


def test_report_refuses_files_that_do_not_belong_to_the_run(pipelines, scaled, tmp_path):
    out = tmp_path / "R"
    assert runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out)).exit_code == 0
    with open(out / "norms.csv", "a") as handle:  # a later run's half-written file, a hand edit
        handle.write("paired,guided,0,0,x\n")
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 2
    assert "norms.csv does not belong to the run recorded in" in result.stderr
    (out / MANIFEST).unlink()
    result = runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 2 and f"has no {MANIFEST}" in result.stderr


# ---------------------------------------------------------------- refused before anything loads or is deleted


def test_an_out_that_cannot_hold_a_run_is_refused_first(pipelines, scaled, tmp_path, no_weight_loads):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    immutable = subprocess.run(["chattr", "+i", str(read_only)], capture_output=True).returncode == 0
    try:
        cases = [(a_file, "is a file: pass a folder"), (loop, "cannot be written"), (tmp_path / "a-file" / "below", "cannot be written")]
        if immutable:
            cases.append((read_only, "cannot be written"))
        for out, message in cases:
            result = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out))
            assert result.exit_code == 2, (out, result.output)
            assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(read_only)])


def test_a_bad_scorer_is_refused_before_an_interrupted_store_is_touched(pipelines, scaled, tmp_path, no_weight_loads, monkeypatch):
    out = tmp_path / "R"
    interrupted(pipelines, scaled, 1.1, out, 2)
    stored = digests(out / ".partial") | {p.name: p.read_bytes() for p in (out / ".partial").glob("*.safetensors")}
    broken = tmp_path / "broken_scorer.py"
    broken.write_text("def score(images, prompts)\n    return [0.0]\n")  # a SyntaxError
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, message in (("a:b:c", "is not module:function"), ("broken_scorer:score", "cannot import broken_scorer")):
        result = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), out, "--mode", "both", "--scorer", spec))
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert digests(out / ".partial") | {p.name: p.read_bytes() for p in (out / ".partial").glob("*.safetensors")} == stored


def test_the_kept_batches_line_appears_only_when_batches_were_kept(pipelines, scaled, tmp_path, monkeypatch):
    import normscope.commands.compare as compare_module

    def fail(*args, **kwargs):
        raise RuntimeError("the loader broke")

    monkeypatch.setattr(compare_module, "load_models", fail)
    result = runner.invoke(app, compare_args(pipelines, scaled("sd3", 1.1), tmp_path / "R"))
    assert result.exit_code == 3 and "the loader broke" in result.stderr
    assert "kept" not in result.stderr


def test_a_resume_never_mixes_runs_with_and_without_images(config_for, scaled, tmp_path):
    """Images wait with the finished batches: a run interrupted without --save-images, rerun with it, starts afresh
    and publishes an image for every sample (not only for the batches it happened to compute)."""
    from reporters import StopAfter

    from normscope.commands.compare import compare

    out = tmp_path / "R"
    with pytest.raises(KeyboardInterrupt):
        compare(config_for("sd3", scaled("sd3", 1.1), mode="free", batch_size=2, out=out), StopAfter(steps=9))
    assert len(list((out / ".partial").glob("*.safetensors"))) == 1
    notes = StopAfter(steps=10**6)
    compare(config_for("sd3", scaled("sd3", 1.1), mode="free", batch_size=2, out=out, save_images=True), notes)
    assert any("starting afresh" in n for n in notes.notes)
    assert len(list((out / "images").glob("*.png"))) == 3 * 2 * 2  # prompts x seeds x (base, tuned)
