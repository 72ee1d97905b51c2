"""Bad input is refused in one line, exit 2, before any weight loads; user text is never read as markup.

Issue 18 (input part): markup in paths and messages, option values and prompt files checked before the
run, Markdown in report.md, one note for truncated prompts, and a property-based fuzz of the option parser.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from normscope.cli import app
from normscope.errors import ConfigError, InputError

runner = CliRunner()
PROBE = ["--steps", "2", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0",
         "--prompt", "a red fox", "--device", "cpu"]


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_line(result, *needles, code: int = 2) -> str:
    """Exactly one 'error:' line on stderr, the exit code, no traceback, no markup error; returns the line."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "MarkupError" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- user text is never markup


@pytest.mark.parametrize("name", ["ck[/]pt.safetensors", "ck[v2].safetensors", "ck[bold]x[/bold].safetensors",
                                  "a:b:c:smile:.safetensors"])
def test_a_missing_path_with_markup_is_one_literal_line(pipelines, tmp_path, name):
    # before: '[/]' raised MarkupError (exit 1, which `check` means 'inflated'); '[v2]' vanished; ':b:' was an emoji
    line = one_line(run("compare", pipelines["sd3"], tmp_path / name, *PROBE), "does not exist")
    assert name in line


def test_check_with_a_markup_path_is_exit_2_not_inflated(pipelines, tmp_path):
    line = one_line(run("check", pipelines["sd3"], tmp_path / "x[/]y.safetensors", "--max-inflation", "0.05", *PROBE))
    assert "x[/]y.safetensors" in line


def test_scorer_spec_is_printed_as_typed(pipelines, scaled):
    result = run("compare", pipelines["sd3"], scaled("sd3", 1.1), *PROBE, "--mode", "free", "--scorer", "a:b:c")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]  # the pipeline loaded first (the scorer is read at run time)
    assert line.startswith("error: --scorer") and "a:b:c" in line and "\U0001f171" not in result.output  # not 'a🅱c'


def test_a_markup_named_run_completes_and_prints_names_literally(pipelines, scaled, tmp_path):
    # before: the run finished, then crashed at the "wrote ..." line on '[/]' in --out
    tuned = tmp_path / "tuned[v2]:b:.safetensors"
    shutil.copy(scaled("sd3", 1.1), tuned)
    out = tmp_path / "o[/]x"
    result = run("compare", pipelines["sd3"], tuned, *PROBE, "--out", out)
    assert result.exit_code == 0, result.output
    assert "MarkupError" not in result.output
    assert f"wrote {out}/norms.csv" in result.stderr
    assert (out / "summary.json").is_file()
    assert json.loads((out / "summary.json").read_text())["config"]["tuned"] == str(tuned)
    inspected = run("inspect", tuned)
    assert inspected.exit_code == 0, inspected.output
    assert "[v2]" in inspected.stdout and ":b:" in inspected.stdout and "\U0001f171" not in inspected.stdout


def test_notes_and_tables_are_literal():
    from rich.console import Console

    from normscope.cli import RichReporter, err
    from normscope.render.terminal import render_inspection

    assert err._markup is False and err._emoji is False
    with err.capture() as captured:
        RichReporter("x").note("adapter [v2] in o[/]x :b:")
    assert "adapter [v2] in o[/]x :b:" in captured.get()
    console = Console(record=True, width=300)  # markup and emoji on: the cells must still be literal
    report = {"path": "p[/]q", "kind": "lora [v2]", "form": ":b:", "resolved": "r[/]", "architecture": "a",
              "transformer_class": None, "families": [], "parameters": 1, "tensors": 1, "dtypes": {},
              "adapters": ["ema[old]"], "adapter": "ema[old]", "lora": None, "pipeline_class": None, "pipeline": None,
              "fits": None, "problems": [], "notes": ["[red]x[/red]"]}
    render_inspection(report, console)
    text = console.export_text()
    for literal in ("p[/]q", "lora [v2]", ":b:", "r[/]", "ema[old]", "[red]x[/red]"):
        assert literal in text, text


# ---------------------------------------------------------------- option values, before any weight loads


def _sd3_folder_with_factor_16(pipelines, tmp_path):
    """The tiny SD3 pipeline with the configs of the released model's geometry: VAE factor 8, patch 2 (16 px)."""
    folder = shutil.copytree(pipelines["sd3"], tmp_path / "sd3-16")
    vae = json.loads((folder / "vae" / "config.json").read_text())
    vae["block_out_channels"] = [4, 4, 4, 4]
    (folder / "vae" / "config.json").write_text(json.dumps(vae))
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    transformer["patch_size"] = 2
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    return folder


@pytest.mark.parametrize(("flag", "value", "nearest"), [("--height", 63, "48 or 64"), ("--width", 100, "96 or 112"),
                                                        ("--height", 8, "use 16")])
def test_size_not_a_multiple_of_the_spatial_factor(pipelines, tmp_path, no_weight_loads, flag, value, nearest):
    folder = _sd3_folder_with_factor_16(pipelines, tmp_path)
    probe = [a for a in PROBE if a not in ("--height", "--width", "16")]
    one_line(run("compare", folder, *probe, flag, value), flag, "multiple of 16", nearest)


def test_tiny_pipeline_factor_is_read_from_its_configs(pipelines):
    from normscope.load.families import family_named, size_rule

    assert size_rule(family_named("sd3"), pipelines["sd3"]) == (1, None)  # tiny VAE (one block), patch 1
    assert size_rule(family_named("sd3"), None) == (16, None)  # a hub id: the released geometry
    assert size_rule(family_named("wan"), None) == (16, 4)


def _fake_wan(tmp_path, spatial=8, temporal=4):
    folder = tmp_path / "wan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                         "transformer": ["diffusers", "WanTransformer3DModel"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel",
                                                                    "patch_size": [1, 2, 2]}))
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "scale_factor_spatial": spatial,
                                                            "scale_factor_temporal": temporal}))
    return folder


def test_wan_frames_and_sizes_before_weights_load(tmp_path, no_weight_loads):
    from normscope.config import CompareConfig
    from normscope.load.pipeline import check_family_inputs

    folder = _fake_wan(tmp_path)
    # Wan rounds a frame count off 4k + 1 itself: sampled as rounded and said (test_sampled_settings), not refused
    check_family_inputs(str(folder), [], CompareConfig(tuned=str(folder), num_frames=80))
    with pytest.raises(InputError, match="--height 40 is not a multiple of 16"):
        check_family_inputs(str(folder), [], CompareConfig(tuned=str(folder), height=40))
    check_family_inputs(str(folder), [], CompareConfig(tuned=str(folder), num_frames=81, height=48, width=64))
    five_b = _fake_wan(tmp_path / "ti2v", spatial=16)  # Wan2.2 TI2V-5B: VAE factor 16 x patch 2
    with pytest.raises(InputError, match="--width 48 is not a multiple of 32.*use 32 or 64"):
        check_family_inputs(str(five_b), [], CompareConfig(tuned=str(five_b), width=48))


def test_num_frames_on_an_image_family(pipelines, no_weight_loads):
    one_line(run("compare", pipelines["sd3"], *PROBE, "--num-frames", "5"), "--num-frames", "images")


@pytest.mark.parametrize(("args", "needles"), [
    (["--seeds", "99999999999999999999"], ["--seeds", "out of range", "9223372036854775807"]),
    (["--seeds", "-1"], ["--seeds -1", "negative", "0 to"]),
    (["--seeds", "3,-1"], ["negative"]),
    (["--seeds", "0-99999999999"], ["at most"]),
    (["--seeds", "9" * 5000], ["out of range"]),
    (["--guidance", "nan"], ["--guidance", "finite", "nan"]),
    (["--guidance", "inf"], ["--guidance", "finite"]),
    (["--guidance", "1e309"], ["--guidance", "finite"]),
    (["--true-cfg-scale", "-inf"], ["--true-cfg-scale", "finite"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "-3"], ["--steps"]),
    (["--height", "abc"], ["--height"]),
])
def test_bad_option_values_are_one_line(pipelines, scaled, no_weight_loads, args, needles):
    one_line(run("compare", pipelines["sd3"], scaled("sd3", 1.1), *PROBE, *args), *needles)


@pytest.mark.parametrize("args", [
    ["check", "a", "b", "--max-inflation", "nan"],
    ["check", "a", "b", "--max-inflation", "0.05", "--max-grid-score", "inf"],
    ["sweep", "run", "--out", "o", "--gate", "nan"],
    ["report", "r", "--out", "o", "--gate", "inf"],
])
def test_every_float_option_is_finite(tmp_path, args, no_weight_loads):
    one_line(run(*args), "finite")


def test_python_api_refuses_the_same_values():
    from normscope.commands.check import CheckConfig
    from normscope.commands.report import ReportConfig
    from normscope.config import CompareConfig, ProbeConfig

    for bad in (dict(guidance=float("nan")), dict(true_cfg_scale=float("inf")), dict(seeds=(-1,)), dict(seeds=(2**64,)),
                dict(height=63.5), dict(steps=0), dict(seeds=("x",)), dict(prompts=(None,))):
        with pytest.raises(ConfigError):
            ProbeConfig(**bad)
        with pytest.raises(ConfigError):
            CompareConfig(tuned="t", **bad)
    with pytest.raises(ConfigError, match="finite"):
        CheckConfig(paths=("a", "b"), max_inflation=float("nan"))
    with pytest.raises(ConfigError, match="--seeds -2"):
        CheckConfig(paths=("a", "b"), max_inflation=0.05, seeds=(-2,))
    with pytest.raises(ConfigError, match="finite"):
        ReportConfig(runs=("r",), out="o", gate=float("inf"))
    assert ProbeConfig(seeds="0-2").seeds == (0, 1, 2) and ProbeConfig(prompts="one prompt").prompts == ("one prompt",)


# ---------------------------------------------------------------- prompt files


def test_prompt_file_not_utf8_names_the_byte(pipelines, tmp_path, no_weight_loads):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a fox\ncaf\xe9\n".encode("latin-1"))
    one_line(run("compare", pipelines["sd3"], *PROBE, "--prompts", bad), str(bad), "not UTF-8", "byte 9", "iconv")


def test_utf8_bom_is_dropped(tmp_path):
    from normscope.measure.prompts import read_prompt_file

    for suffix, text in ((".txt", "a fox\nb\n"), (".csv", "prompt\na fox\nb\n"), (".jsonl", '{"prompt": "a fox"}\n')):
        path = tmp_path / f"bom{suffix}"
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert read_prompt_file(path)[0] == "a fox"


@pytest.mark.parametrize(("line", "kind"), [('{"prompt": null}', "null"), ('{"prompt": 3}', "int"),
                                            ('{"prompt": ["a", "b"]}', "list"), ('{"prompt": {"t": 1}}', "dict")])
def test_jsonl_prompt_that_is_not_text(pipelines, tmp_path, no_weight_loads, line, kind):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    one_line(run("compare", pipelines["sd3"], *PROBE, "--prompts", path), f"{path}:2", kind)


def test_prompts_path_that_is_a_folder_or_a_loop(pipelines, tmp_path, no_weight_loads):
    one_line(run("compare", pipelines["sd3"], *PROBE, "--prompts", tmp_path), "is a folder")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    one_line(run("compare", pipelines["sd3"], *PROBE, "--prompts", tmp_path / "loop1"), "symlink")


def test_csv_empty_prompt_cells_are_skipped(tmp_path):
    from normscope.measure.prompts import read_prompt_file

    path = tmp_path / "p.csv"
    path.write_text("prompt,id\na fox,1\n,2\n  ,3\nshort row\n")
    assert read_prompt_file(path) == ["a fox", "short row"]
    (tmp_path / "blank.jsonl").write_text('{"prompt": ""}\n{"prompt": "b"}\n')
    assert read_prompt_file(tmp_path / "blank.jsonl") == ["b"]  # empty prompts are skipped in every format


# ---------------------------------------------------------------- report.md


def test_report_md_escapes_names_and_titles(pipelines, scaled, tmp_path):
    name = "r|<img src=x onerror=alert(1)>`[x](y)`"
    out = tmp_path / name
    prompt = r"a sign that says $\frac$ [/]"  # on the heatmap's axis: never mathtext (a parse error), never markup
    assert run("compare", pipelines["sd3"], scaled("sd3", 1.1), *PROBE, "--prompt", prompt, "--out", out,
               "--format", "json").exit_code == 0
    title = "T | <b>bold</b> & `code`\nline two"
    result = run("report", out, "--out", tmp_path / "report", "--title", title)
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "<img" not in markdown and "<b>" not in markdown and "[x](y)" not in markdown
    assert markdown.splitlines()[0] == "# T \\| &lt;b&gt;bold&lt;/b&gt; &amp; \\`code\\` line two"
    header, rule, row = [line for line in markdown.splitlines() if line.startswith("|")][:3]
    unescaped = [line.replace("\\|", "") .count("|") for line in (header, rule, row)]
    assert unescaped[0] == unescaped[1] == unescaped[2]  # the name's '|' does not add a column
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html  # still escaped


# ---------------------------------------------------------------- truncated prompts


def test_a_huge_prompt_is_one_note_not_megabytes(pipelines, scaled):
    huge = " ".join(["a red fox jumps over the lazy dog"] * 400)
    libraries = ("diffusers", "transformers")
    before = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level) for name in libraries}
    reached = []  # what the libraries' own handlers (stderr) would print

    class Record(logging.Handler):
        def emit(self, record):
            reached.append(record.getMessage())

    record = Record()
    for name in libraries:
        logging.getLogger(name).addHandler(record)
    try:
        result = run("compare", pipelines["sd3"], scaled("sd3", 1.1), *PROBE, "--prompt", huge)
    finally:
        for name in libraries:
            logging.getLogger(name).removeHandler(record)
    assert result.exit_code == 0, result.output
    for text in [result.stderr, *reached]:
        assert "The following part of your input was truncated" not in text
        assert "Token indices sequence length" not in text
    assert len(result.stderr) < 3000, len(result.stderr)
    notes = [line for line in result.stderr.splitlines() if "were truncated" in line]
    assert len(notes) == 1 and "1 prompt(s)" in notes[0] and "to 77 tokens (CLIP)" in notes[0], result.stderr
    after = {name: (list(logging.getLogger(name).handlers), logging.getLogger(name).level) for name in libraries}
    assert after == before  # the libraries' logging is restored


def test_other_library_warnings_still_pass():
    from normscope.measure.truncation import quiet_tokenizers, truncation_note

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("diffusers")
    keep = Keep()
    logger.addHandler(keep)
    try:
        with quiet_tokenizers():
            logging.getLogger("diffusers.x").warning("something else")
            logging.getLogger("diffusers.x").warning("The following part of your input was truncated because CLIP "
                                                     "can only handle sequences up to 77 tokens: ['x']")
    finally:
        logger.removeHandler(keep)
    assert seen == ["something else"] and truncation_note() is None  # no pipeline given: nothing counted


# ---------------------------------------------------------------- the option parser, fuzzed

MARKUP_BITS = st.sampled_from(["[", "]", "[/]", ":b:", "[v2]", "[bold]", ":smile:", "x", "é", "|", "<", "\\"])
FLOAT_TEXTS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "+inf", "1e309", "-1e309", "-0", "0", "-0.0", "4.5", "-1", "",
                     "garbage", "1,5", "0x10", "[/]", "1e-320"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
SEED_TEXTS = st.one_of(
    st.sampled_from(["0", "0,1", "0-7", "-1", "99999999999999999999", "7-0", "", ",", "1e3", "x", "0--1", "-1-3",
                     "0-99999999999", "18446744073709551615", "9223372036854775807", "[/]"]),
    st.lists(st.integers(min_value=-2**70, max_value=2**70), min_size=1, max_size=4).map(lambda xs: ",".join(map(str, xs))),
    st.text(alphabet="0123456789-, x[/]", max_size=12),
)
SIZE_TEXTS = st.one_of(st.integers(min_value=-2**40, max_value=2**40).map(str),
                       st.sampled_from(["63", "0", "-16", "16.0", "abc", "1e3", "[/]"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seeds=SEED_TEXTS, guidance=FLOAT_TEXTS, true_cfg=FLOAT_TEXTS, height=SIZE_TEXTS,
       name=st.lists(MARKUP_BITS, min_size=1, max_size=6).map("".join), which=st.integers(0, 3))
def test_option_parser_fuzz(pipelines, no_weight_loads, seeds, guidance, true_cfg, height, name, which):
    """Any option text: exit 2 with normscope's one error line, never a traceback, never exit 1/3, no MarkupError."""
    missing = f"{name}.safetensors"  # never exists: the run stops at the latest there, before any weight
    options = [["--seeds", seeds], ["--guidance", guidance], ["--true-cfg-scale", true_cfg], ["--height", height]][which]
    result = run("compare", pipelines["sd3"], missing, "--prompt", "a fox", "--device", "cpu", *options)
    assert result.exit_code == 2, (options, result.output)
    assert "Traceback" not in result.output and "MarkupError" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), (options, result.stderr)
    if "does not exist" in lines[0]:
        assert missing in lines[0]  # the name, markup characters and all, printed as typed
