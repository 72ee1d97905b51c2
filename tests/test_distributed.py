"""Real multi-process runs: accelerate launch with 2 CPU processes gives exactly the single-process numbers.

On this kind of machine `accelerate launch --cpu --num_processes 2` starts only ONE process; the form that
starts two is `--multi_gpu --num_processes 2 --num_machines 1` with the accelerator created with cpu=True.
accelerate gives each process one thread, so the single-process reference runs with one thread as well
(BLAS results depend on the thread count at float32 round-off).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "normscope"]
PROBE = ["--steps", "3", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--guidance", "4.5",
         "--seeds", "0,1,2", "--prompt", "a red fox", "--prompt", "two apples", "--prompt", "a blue car",
         "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--format", "json"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_PORT": "29517"}


def _single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normscope", *args], env=_env(), capture_output=True, text=True, timeout=600)


def _launched(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], env=_env(), capture_output=True, text=True, timeout=600)


def _stale_store(out: Path) -> None:
    """An unfinished run with other options: every batch key of the new run holds junk under a stale fingerprint."""
    partial = out / ".partial"
    partial.mkdir(parents=True)
    (partial / "meta.json").write_text('{"fingerprint": "stale"}')
    for mode in ("paired", "free"):
        for index in range(5):
            (partial / f"{mode}-{index:05d}.safetensors").write_bytes(b"not a batch of this run")


@pytest.mark.slow
def test_two_processes_compare_is_identical_to_one(pipelines, scaled, tmp_path):
    args = ["compare", str(pipelines["sd3"]), str(scaled("sd3", 1.1)), *PROBE, "--mode", "both"]
    one = _single([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    _stale_store(tmp_path / "two")  # rank 0 resets it, then the others open it; none reuses or deletes
    two = _launched([*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert '"processes": 2' in two.stdout
    assert " ".join(two.stderr.split()).count("starting afresh") == 1  # said once, by the main process
    assert (tmp_path / "one" / "norms.csv").read_bytes() == (tmp_path / "two" / "norms.csv").read_bytes()
    assert not (tmp_path / "two" / ".partial").exists()


@pytest.mark.slow
def test_two_processes_sweep_is_identical_to_one(pipelines, tmp_path):
    import torch

    from normscope.builders.tiny import tiny_sd3_pipeline

    run = tmp_path / "run"
    for step, factor in ((10, 1.0), (20, 1.1)):
        pipe = tiny_sd3_pipeline(seed=0)
        with torch.no_grad():
            pipe.transformer.proj_out.weight.mul_(factor)
        pipe.transformer.save_pretrained(run / f"checkpoint-{step}" / "transformer")
    args = ["sweep", str(run), "--pipeline", str(pipelines["sd3"]), *PROBE]
    one = _single([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launched([*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "one" / "sweep.csv").read_text().replace(str(tmp_path / "one"), "") == \
        (tmp_path / "two" / "sweep.csv").read_text().replace(str(tmp_path / "two"), "")
    for step in (10, 20):
        assert (tmp_path / "one" / f"checkpoint-{step}" / "norms.csv").read_bytes() == \
            (tmp_path / "two" / f"checkpoint-{step}" / "norms.csv").read_bytes()


@pytest.mark.slow
def test_two_processes_stop_a_sequential_run_at_the_same_batch(pipelines, scaled, tmp_path):
    """compare --precision: the decision is taken on the gathered batches, every rank stops after the same round,
    and the run holds what one process measures (the same samples, the same numbers)."""
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(16)))
    probe = [a for a in PROBE if a not in ("--prompt", "a red fox", "two apples", "a blue car")]
    args = ["compare", str(pipelines["sd3"]), str(scaled("sd3", 1.1)), *probe, "--prompts", str(prompts),
            "--precision", "0.01"]
    one = _single([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launched([*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]  # a rank that went on alone would hang at the next gather
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    # One process looks after every batch of 2 and decides at 10 prompts; two processes look after every
    # gathered round of 2 batches (4 samples), so they decide at the first round holding 10 prompts: 12.
    assert s1["samples_used"] == 10 and s2["samples_used"] == 12 and s1["samples_planned"] == s2["samples_planned"] == 48
    assert s2["config"]["processes"] == 2
    assert "decided after 12 of 48 samples" in two.stderr
    # the 12 samples hold exactly what one process measures for them (the first 12 of a plain seed-0 run)
    import pandas as pd

    plain_args = [a for a in args if a not in ("--precision", "0.01")]
    plain_args[plain_args.index("--seeds") + 1] = "0"
    plain = _single([*plain_args, "--out", str(tmp_path / "plain")])
    assert plain.returncode == 0, plain.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "two" / "norms.csv")
    full = pd.read_csv(tmp_path / "plain" / "norms.csv")
    full = full[full["prompt_id"] < 12].reset_index(drop=True)
    assert rows[["prompt_id", "seed", "step", "ratio"]].equals(full[["prompt_id", "seed", "step", "ratio"]])
