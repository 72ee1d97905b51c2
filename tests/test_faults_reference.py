"""Issue 18, "no confident wrong number": a damaged reference is refused (exit 2), and a broken model is never passed.

Every broken reference (a NaN or 5000 % gate, a truncated or edited reference.json, a damaged or mismatched
reference.safetensors) is exit 2 in one line naming the file, the field and the fix; a model whose output is
zero is an error verdict (exit 3), live and stored; the loader is fuzzed with hypothesis from a real profile.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from normscope.cli import app
from normscope.commands.profile import Reference, load_reference, probe_from_reference
from normscope.errors import InputError

runner = CliRunner()
PROBE = ["--steps", "2", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--guidance", "4.5",
         "--seeds", "0,1", "--prompt", "a red fox", "--prompt", "a blue car", "--device", "cpu", "--dtype", "float32"]
HARDWARE = ["--device", "cpu", "--dtype", "float32"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def reference(pipelines, tmp_path_factory) -> Path:
    """A real reference of the tiny SD3 pipeline, written by normscope profile (2 prompts x 2 seeds x 2 steps)."""
    out = tmp_path_factory.mktemp("reference")
    result = run("profile", pipelines["sd3"], "--out", out, *PROBE)
    assert result.exit_code == 0, result.output
    return out


def copy_reference(reference: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ref"
    shutil.copytree(reference, folder)
    return folder


def edit_json(folder: Path, change) -> None:
    meta = json.loads((folder / "reference.json").read_text())
    change(meta)
    (folder / "reference.json").write_text(json.dumps(meta))  # NaN is written as NaN, as json.dumps does


def _set_gate(value):
    def change(meta):
        meta["suggestions"]["gate"]["max_inflation"] = value
    return change


def _truncate_json(folder: Path) -> None:
    text = (folder / "reference.json").read_text()
    (folder / "reference.json").write_text(text[: len(text) // 2])


def _drop_key(folder: Path) -> None:
    edit_json(folder, lambda meta: meta["config"]["probe"].pop("steps"))


def _empty_samples(folder: Path) -> None:
    edit_json(folder, lambda meta: meta.update(samples=[]))


def _zero_bytes(folder: Path) -> None:
    (folder / "reference.safetensors").write_bytes(b"")


def _truncated_tensors(folder: Path) -> None:
    data = (folder / "reference.safetensors").read_bytes()
    (folder / "reference.safetensors").write_bytes(data[: len(data) - 40])


def _shape_mismatch(folder: Path) -> None:
    tensors = load_file(str(folder / "reference.safetensors"))
    tensors["norms/guided"] = np.ascontiguousarray(tensors["norms/guided"][:-1])  # one sample short
    save_file(tensors, str(folder / "reference.safetensors"))


def _sigmas_mismatch(folder: Path) -> None:
    tensors = load_file(str(folder / "reference.safetensors"))
    tensors["sigmas"] = np.ascontiguousarray(tensors["sigmas"][::-1])
    save_file(tensors, str(folder / "reference.safetensors"))


BROKEN = {  # case: (how to break a copy, the file named, words the one line must hold)
    "nan gate": (lambda f: edit_json(f, _set_gate(float("nan"))), "reference.json", "suggestions.gate.max_inflation is NaN"),
    "inf gate": (lambda f: edit_json(f, _set_gate(float("inf"))), "reference.json", "suggestions.gate.max_inflation"),
    "gate 50": (lambda f: edit_json(f, _set_gate(50)), "reference.json", "suggestions.gate.max_inflation is 50"),
    "negative gate": (lambda f: edit_json(f, _set_gate(-0.05)), "reference.json", "suggestions.gate.max_inflation"),
    "string gate": (lambda f: edit_json(f, _set_gate("0.05")), "reference.json", "suggestions.gate.max_inflation is '0.05'"),
    "truncated json": (_truncate_json, "reference.json", "is not valid JSON"),
    "missing key": (_drop_key, "reference.json", "config.probe.steps is missing"),
    "empty samples": (_empty_samples, "reference.json", "samples is an empty list"),
    "seed not an int": (lambda f: edit_json(f, lambda m: m["samples"][0].update(seed="0")), "reference.json",
                        "samples[0].seed"),
    "n_samples disagrees": (lambda f: edit_json(f, lambda m: m.update(n_samples=5)), "reference.json", "n_samples is 5"),
    "per_step rows != steps": (lambda f: edit_json(f, lambda m: m["per_step"]["guided"].pop()), "reference.json",
                               "per_step.guided has 1 rows"),
    "zero-byte safetensors": (_zero_bytes, "reference.safetensors", "not a readable safetensors file"),
    "truncated safetensors": (_truncated_tensors, "reference.safetensors", "not a readable safetensors file"),
    "shape mismatch": (_shape_mismatch, "reference.safetensors", "norms/guided has shape (3, 2)"),
    "sigmas of another profile": (_sigmas_mismatch, "reference.safetensors", "sigmas does not match"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_reference_is_exit_2_in_one_line(reference, scaled, tmp_path, case):
    breaker, name, words = BROKEN[case]
    folder = copy_reference(reference, tmp_path)
    breaker(folder)
    result = run("check", scaled("sd3", 1.1), "--reference", folder, *HARDWARE)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = " ".join(result.stderr.split())  # rich may wrap; the words are checked on the unwrapped text
    assert str(folder / name) in line and words in line and "rerun normscope profile" in line, line
    with pytest.raises(InputError):  # the Python API says the same
        load_reference(folder)


def test_damaged_reference_json_is_refused_by_load_tau_and_the_monitor(reference, tmp_path):
    from normscope.guard import load_tau
    from normscope.monitor import _gate_value

    folder = copy_reference(reference, tmp_path)
    edit_json(folder, _set_gate(float("nan")))
    with pytest.raises(InputError, match="max_inflation is NaN"):
        load_tau(folder, "guided")
    with pytest.raises(InputError, match="max_inflation is NaN"):
        _gate_value(folder)
    _truncate_json(folder)
    with pytest.raises(InputError, match="not valid JSON"):
        load_tau(folder / "reference.json")


def test_sweep_profiles_a_damaged_base_again(reference, tmp_path):
    from normscope.commands.sweep import BASE_DIR, SweepConfig, _base_reusable

    out = tmp_path / "sweep"
    shutil.copytree(reference, out / BASE_DIR)
    _truncate_json(out / BASE_DIR)
    config = SweepConfig(run_dir=tmp_path, out=out, prompts=("a red fox", "a blue car"), seeds=(0, 1), steps=2)
    assert _base_reusable(config, str(reference)) is False  # not a JSONDecodeError: the base is profiled again


def test_max_inflation_and_the_stored_gate_share_one_range():
    from normscope.commands.reference_schema import FIELDS, gate_in_range

    spec = next(f for f in FIELDS if f.path == "suggestions.gate.max_inflation")
    for value in (0.0, 0.05, 9.99):
        assert gate_in_range(value) and spec.problem(value) is None
    for value in (-0.01, 10, 50, float("nan"), float("inf")):
        assert not gate_in_range(value) and spec.problem(value) is not None
    result = run("check", "a", "--reference", "b", "--max-inflation", "50")
    assert result.exit_code == 2 and "--max-inflation 50" in result.stderr


# ---------------------------------------------------------------- the gate must not pass a broken model


def test_zero_output_model_is_not_passed_live(pipelines, scaled):
    result = run("check", pipelines["sd3"], scaled("sd3", 0.0), "--max-inflation", "0.05", *PROBE)
    assert result.exit_code == 3, result.output
    assert "the model collapsed (zero output?)" in " ".join(result.stdout.split())
    assert result.stdout.strip().splitlines()[-1].startswith("ERROR")


def test_zero_output_model_is_not_passed_stored(reference, scaled):
    result = run("check", scaled("sd3", 0.0), "--reference", reference, *HARDWARE, "--format", "json")
    assert result.exit_code == 3, result.output
    out = json.loads(result.stdout)
    checkpoint = out["checkpoints"][0]
    assert out["verdict"] == "error" and out["min_inflation"] == -0.5
    assert checkpoint["verdict"] == "error" and checkpoint["sanity"] == "collapsed"
    assert checkpoint["inflation"] == pytest.approx(-1.0)
    table = run("check", scaled("sd3", 0.0), "--reference", reference, *HARDWARE)
    text = " ".join(table.stdout.split())
    assert table.exit_code == 3 and "100 % below the base's: the model collapsed (zero output?)" in text
    assert "a broken checkpoint, not a pass" in text


def test_min_inflation_is_documented_and_checked(reference, scaled):
    result = run("check", scaled("sd3", 0.0), "--reference", reference, *HARDWARE, "--min-inflation", "0.2")
    assert result.exit_code == 2 and "--min-inflation 0.2" in result.stderr
    result = run("check", scaled("sd3", 0.0), "--reference", reference, *HARDWARE, "--min-inflation", "nan")
    assert result.exit_code == 2


def test_explosion_fails_as_implausible_whatever_the_gate(reference, scaled):
    result = run("check", scaled("sd3", 4.0), "--reference", reference, *HARDWARE, "--max-inflation", "9",
                 "--format", "json")
    assert result.exit_code == 1, result.output
    checkpoint = json.loads(result.stdout)["checkpoints"][0]
    assert checkpoint["sanity"] == "exploded" and checkpoint["inflation"] > 1.0
    table = run("check", scaled("sd3", 4.0), "--reference", reference, *HARDWARE)
    assert table.exit_code == 1 and "implausible" in " ".join(table.stdout.split())


@pytest.mark.parametrize("factor, code", [(1.1, 1), (1.0, 0)])
def test_normal_models_keep_their_verdicts(reference, scaled, factor, code):
    result = run("check", scaled("sd3", factor), "--reference", reference, *HARDWARE, "--max-inflation", "0.05",
                 "--format", "json")
    assert result.exit_code == code, result.output
    checkpoint = json.loads(result.stdout)["checkpoints"][0]
    assert checkpoint["sanity"] is None
    if factor == 1.1:
        assert 0.05 < checkpoint["inflation"] < 0.2


def test_compare_warns_on_a_collapse():
    from io import StringIO

    from rich.console import Console

    from normscope.render.terminal import sanity_warning

    assert sanity_warning({"inflation": 0.1, "config": {"tuned": "t"}}) is None
    line = sanity_warning({"inflation": -1.0, "config": {"tuned": "t.safetensors"}})
    assert line.startswith("t.safetensors's velocity is 100 % below the base's: the model collapsed")
    assert "implausible" in sanity_warning({"inflation": 2.5, "config": {"tuned": "t"}})
    console = Console(file=StringIO(), width=300)
    console.print(f"[yellow]warning:[/yellow] {line}")
    assert "collapsed" in console.file.getvalue()


# ---------------------------------------------------------------- fuzz: the loader returns a valid Reference or refuses

REPLACEMENTS = [None, float("nan"), float("inf"), -float("inf"), 1e308, 10**30, -1, 0, 50, 0.5, "", "x", [], {}, True,
                [None], ["x"], {"a": 1}]


def _paths(value, prefix=()):
    """Every (path of keys and indices) in a JSON tree."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):
            yield from _paths(child, (*prefix, index))


def _mutate(meta, path, action, replacement):
    if not path:
        return replacement
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "drop":
        del parent[key]
    elif action == "empty" and isinstance(parent[key], (list, dict, str)):
        parent[key] = type(parent[key])()
    else:
        parent[key] = replacement
    return meta


OUTCOMES: list[str] = []


def _reseal(folder: Path) -> None:
    """Rewrite the manifest for the edited files: the fuzz tests the schema, the line of defence behind the digests."""
    from normscope.runfolder.manifest import MANIFEST, manifest, write_atomic

    entries = [p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    old = json.loads((folder / MANIFEST).read_text())
    write_atomic(folder / MANIFEST, manifest(folder, entries, old["fingerprint"], old["kind"]))


def _assert_valid_or_refused(folder: Path) -> None:
    _reseal(folder)
    try:
        loaded = load_reference(folder)
    except InputError as exc:
        assert "\n" not in str(exc) and "normscope profile" in str(exc), str(exc)
        OUTCOMES.append("refused")
        return
    # What every reader then does with it must work: a usable Reference, never a crash later.
    assert isinstance(loaded, Reference)
    assert isinstance(loaded.gate, (int, float)) and 0 <= loaded.gate < 10  # the range --max-inflation accepts
    samples = loaded.samples()
    assert samples and len(samples) == loaded.meta["n_samples"]
    record = loaded.record()
    assert record.stats["guided"].shape[0] == loaded.probe["steps"]
    try:
        probe_from_reference(loaded, "cpu", "float32", 8)
    except InputError:  # e.g. a probe image that no longer exists on this machine
        pass
    from normscope.guard import load_tau

    for branch in ("guided", "cond"):
        try:
            table = load_tau(folder, branch)
        except InputError:  # a profile without CFG has no cond branch, and says so
            continue
        assert table.tau.isfinite().all() and table.gate == loaded.gate
    OUTCOMES.append("valid")


@pytest.fixture(scope="module")
def fuzz_dir(reference, tmp_path_factory) -> tuple[Path, dict, bytes, bytes]:
    folder = tmp_path_factory.mktemp("fuzz") / "ref"
    shutil.copytree(reference, folder)
    meta = json.loads((reference / "reference.json").read_text())
    return folder, meta, (reference / "reference.json").read_bytes(), (reference / "reference.safetensors").read_bytes()


FUZZ = settings(max_examples=200, deadline=None, database=None,  # no .hypothesis folder in the checkout
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_reference_json_edits(fuzz_dir, data):
    folder, meta, _, tensors = fuzz_dir
    (folder / "reference.safetensors").write_bytes(tensors)
    edited = json.loads(json.dumps(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(edited))
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["drop", "replace", "empty"])) if path else "replace"
        replacement = copy.deepcopy(data.draw(st.sampled_from(REPLACEMENTS)))  # never edit the shared list's items
        edited = _mutate(edited, path, action, replacement)
    (folder / "reference.json").write_text(json.dumps(edited))
    _assert_valid_or_refused(folder)


def test_fuzz_saw_both_outcomes():
    """The edits above reach both sides: some leave a usable reference (informational fields), most are refused."""
    if not OUTCOMES:
        pytest.skip("counts the outcomes of the fuzz tests above: run with them")
    assert {"valid", "refused"} <= set(OUTCOMES), OUTCOMES[:5]


@FUZZ
@given(cut=st.integers(0, 10**6), junk=st.binary(max_size=64), which=st.sampled_from(["json", "tensors"]),
       kind=st.sampled_from(["truncate", "random", "splice"]))
def test_fuzz_reference_bytes(fuzz_dir, cut, junk, which, kind):
    folder, _, text, tensors = fuzz_dir
    original = text if which == "json" else tensors
    if kind == "truncate":
        damaged = original[: cut % (len(original) + 1)]
    elif kind == "random":
        damaged = junk
    else:
        at = cut % (len(original) + 1)
        damaged = original[:at] + junk + original[at + len(junk):]
    (folder / "reference.json").write_bytes(damaged if which == "json" else text)
    (folder / "reference.safetensors").write_bytes(damaged if which == "tensors" else tensors)
    _assert_valid_or_refused(folder)


def test_ci_outputs_name_the_collapse_and_the_explosion():
    from normscope.commands.check import ERROR, FAIL, PASS, CheckedCheckpoint, CheckResult
    from normscope.render.ci import annotations, junit_xml, sanity_lines, step_summary, verdict_line

    def checked(path, verdict, inflation, sanity):
        return CheckedCheckpoint(path, verdict, inflation, [inflation, inflation], 0, 1.0, {}, sanity)

    result = CheckResult([checked("zero", ERROR, -1.0, "collapsed"), checked("x4", FAIL, 3.1, "exploded"),
                          checked("ok", PASS, 0.01, None)], 5.0, "--max-inflation", "paired")
    assert result.exit_code == 3 and result.to_dict()["checkpoints"][0]["sanity"] == "collapsed"
    lines = sanity_lines(result)
    assert lines[0].startswith("error: zero's velocity is 100 % below the base's: the model collapsed (zero output?)")
    assert lines[1].startswith("implausible: x4's velocity is 310 % above the base's") and len(lines) == 2
    line = verdict_line(result)
    assert "zero: -100.00 % (error: collapsed" in line and "x4: +310.00 % (fail: implausible" in line
    xml = junit_xml(result)
    assert 'type="Collapsed"' in xml and 'type="Implausible"' in xml and 'errors="1"' in xml
    assert "collapsed" in annotations(result)[0] and "implausible" in annotations(result)[1]
    assert "error: collapsed" in step_summary(result)


def test_a_hand_edited_reference_that_passes_the_schema_is_refused_by_its_manifest(reference, tmp_path):
    """A plausible edit (the gate raised from its suggestion to 50 %) is no longer the profile normscope wrote."""
    folder = tmp_path / "ref"
    shutil.copytree(reference, folder)
    meta = json.loads((folder / "reference.json").read_text())
    meta["suggestions"]["gate"]["max_inflation"] = 0.5
    (folder / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    with pytest.raises(InputError, match=r"reference.json does not belong to the run recorded in .*manifest.json"):
        load_reference(folder)
