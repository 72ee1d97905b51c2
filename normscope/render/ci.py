"""What ``normscope check`` hands to CI systems: JUnit XML, a GitHub step summary, error annotations."""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree as ET

from normscope.commands.check import ERROR, FAIL, CheckResult
from normscope.measure.sanity import COLLAPSED, EXPLODED, sanity_line
from normscope.render.numbers import pct
from normscope.render.safe import md_text

SANITY_WORDS = {COLLAPSED: "error: collapsed, a broken checkpoint", EXPLODED: "fail: implausible, a broken checkpoint"}


def _grid(c, result: CheckResult) -> str:
    if result.max_grid_score is None:
        return ""
    return ", grid score " + ("n/a" if c.grid_score is None else f"{c.grid_score:.3g}")


def _word(c) -> str:
    return SANITY_WORDS[c.sanity] if c.sanity else c.verdict


def sanity_lines(result: CheckResult) -> list[str]:
    """One line per collapsed or exploded checkpoint: why its number is not a result."""
    return [f"{'error' if c.sanity == COLLAPSED else 'implausible'}: {sanity_line(c.path, c.inflation, c.sanity)}"
            for c in result.checkpoints if c.sanity]


def verdict_line(result: CheckResult) -> str:
    word = {0: "PASS", 1: "FAIL", 3: "ERROR"}[result.exit_code]
    parts = [f"{c.path}: {pct(c.inflation)}{_grid(c, result)} ({_word(c)}){_decided(c)}{_others(c)}" for c in result.checkpoints]
    grid = "" if result.max_grid_score is None else f", grid score gate {result.max_grid_score:g}"
    on = f" on the {result.stream} stream" if result.stream is not None else ""  # multi-stream families (LTX-2)
    return f"{word}: gate {result.max_inflation * 100:.2f} % from {result.gate_source}{grid}{on}; " + "; ".join(parts)


def _others(c) -> str:
    """", audio stream +10.00 % (not gated)" for the streams a multi-stream check reports besides its gate's."""
    return "".join(f", {name} stream {pct(part['inflation'])} (not gated)" for name, part in c.other_streams.items())


def _decided(c) -> str:
    """", decided after 12 of 64 samples" for a checkpoint checked with --until-decided."""
    from normscope.measure.sequential import decided_line

    return f", {decided_line(c.sequential)}" if c.sequential is not None else ""


def junit_xml(result: CheckResult) -> str:
    """One test case per checkpoint; a <failure> when inflated, an <error> when the run failed."""
    failures = sum(c.verdict == FAIL for c in result.checkpoints)
    errors = sum(c.verdict == ERROR for c in result.checkpoints)
    suites = ET.Element("testsuites")
    suite = ET.SubElement(suites, "testsuite", name="normscope check", tests=str(len(result.checkpoints)),
                          failures=str(failures), errors=str(errors),
                          time=f"{sum(c.seconds for c in result.checkpoints):.3f}")
    for c in result.checkpoints:
        case = ET.SubElement(suite, "testcase", classname="normscope.commands.check", name=c.path, time=f"{c.seconds:.3f}")
        message = f"inflation {pct(c.inflation)} vs gate {result.max_inflation * 100:.2f} % ({result.gate_source})"
        if result.max_grid_score is not None:
            message += f"; grid score {_grid(c, result).removeprefix(', grid score ')} vs gate {result.max_grid_score:g}"
        if c.sanity:
            line = sanity_line(c.path, c.inflation, c.sanity)
            ET.SubElement(case, "error" if c.verdict == ERROR else "failure", message=line,
                          type="Collapsed" if c.sanity == COLLAPSED else "Implausible").text = message
        elif c.verdict == FAIL:
            ET.SubElement(case, "failure", message=message, type="Inflated").text = (
                f"{message}; 95% CI [{pct(c.inflation_ci[0])}, {pct(c.inflation_ci[1])}]")
        elif c.verdict == ERROR:
            ET.SubElement(case, "error", message=f"{c.nonfinite} non-finite velocities", type="RunFailed").text = message
        else:
            ET.SubElement(case, "system-out").text = message
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def step_summary(result: CheckResult) -> str:
    """Markdown for $GITHUB_STEP_SUMMARY."""
    lines = [f"### normscope check: {verdict_line(result).split(':')[0]}", "",
             f"Gate: max inflation {result.max_inflation * 100:.2f} % ({result.gate_source}); mode: {result.mode}; "
             "inflation: the sigma-integral of the per-step mean ratio - 1, CI over prompts (normscope docs/compare.md).", "",
             "| checkpoint | inflation | 95% CI | verdict |", "|---|---|---|---|"]
    for c in result.checkpoints:
        lines.append(f"| {md_text(c.path)} | {pct(c.inflation)} | [{pct(c.inflation_ci[0])}, {pct(c.inflation_ci[1])}] | {_word(c)} |")
    return "\n".join(lines) + "\n"


def _command_data(text: str) -> str:
    """A workflow command's message as data: '%', CR and LF escaped, so a path cannot end or forge a command."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def annotations(result: CheckResult) -> list[str]:
    """GitHub workflow commands (read from stdout) for every checkpoint that did not pass."""
    out = []
    for c in result.checkpoints:
        if c.sanity:
            out.append(f"::error title=normscope check::{sanity_line(c.path, c.inflation, c.sanity)}")
        elif c.verdict == FAIL:
            if result.max_grid_score is None:
                out.append(f"{c.path} is inflated: {pct(c.inflation)} > gate {result.max_inflation * 100:.2f} %")
            else:
                out.append(f"{c.path} failed the gate: inflation {pct(c.inflation)} "
                           f"(gate {result.max_inflation * 100:.2f} %){_grid(c, result)}")
        elif c.verdict == ERROR:
            out.append(f"{c.path}: {c.nonfinite} non-finite velocities, no valid measurement")
    return ["::error title=normscope check::" + _command_data(message) for message in out]


def publish(result: CheckResult, junit: Path | None) -> list[str]:
    """Write the JUnit file and the GitHub step summary when asked for; return the lines to print before the
    verdict line: the GitHub annotations, then one per collapsed or exploded checkpoint."""
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(result))
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as handle:
            handle.write(step_summary(result))
    return (annotations(result) if os.environ.get("GITHUB_ACTIONS") == "true" else []) + sanity_lines(result)
