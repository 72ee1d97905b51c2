"""normscope report from saved run folders only, and the HTML checked in a real browser."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image
from typer.testing import CliRunner

from normscope.cli import app

runner = CliRunner()
PROBE = ["--steps", "3", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0,1",
         "--prompt", "a red fox", "--prompt", "a blue car", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def runs(pipelines, scaled, tmp_path_factory):
    """Two run folders; the checkpoints they were made from are deleted before the report runs."""
    root = tmp_path_factory.mktemp("runs")
    made = []
    for name, factor in (("plain-rl", 1.1), ("normguard", 1.02)):
        tuned = root / f"{name}.safetensors"
        shutil.copy(scaled("sd3", factor), tuned)
        out = root / name
        result = runner.invoke(app, ["compare", str(pipelines["sd3"]), str(tuned), *PROBE, "--mode", "both",
                                     "--save-images", "--out", str(out)])
        assert result.exit_code == 0, result.output
        tuned.unlink()
        made.append(out)
    return made


def embedded_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def test_save_images_writes_both_models(runs):
    images = sorted((runs[0] / "images").glob("*.png"))
    assert len(images) == 8  # 2 prompts x 2 seeds x (base, tuned)
    assert Image.open(images[0]).size == (16, 16)


def test_report_from_run_folders_alone(runs, tmp_path):
    result = runner.invoke(app, ["report", str(runs[0]), "--out", str(tmp_path), "--gate", "0.05"])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "report.html").read_text()
    assert "http" not in html.split("<body>")[1].split("<details>")[0]  # nothing fetched from a network
    images = embedded_images(html)
    assert len(images) == 5  # profiles, inflation, heatmap, hinge/cosine, image grid
    for data in images:
        Image.open(io.BytesIO(data)).verify()
    for png in (tmp_path / "figures").glob("*.png"):
        Image.open(png).verify()
        assert png.with_suffix(".svg").read_text().lstrip().startswith("<?xml")
    markdown = (tmp_path / "report.md").read_text()
    assert "| run | mode | inflation |" in markdown and "](figures/plain-rl_inflation.png)" in markdown


def test_multi_run_overlay(runs, tmp_path):
    result = runner.invoke(app, ["report", *map(str, runs), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "figures" / "inflation_overlay.png").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "plain-rl" in html and "normguard" in html
    assert len(embedded_images(html)) == 11


def test_not_a_run_folder(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "not a normscope run folder" in result.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_a_real_browser_with_no_broken_image(runs, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed here (.ci/run installs it)")
    runner.invoke(app, ["report", *map(str, runs), "--out", str(tmp_path)])
    page = tmp_path / "report.html"
    probe = page.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load', () => { const imgs = [...document.images];"
        " document.body.setAttribute('data-images', imgs.length);"
        " document.body.setAttribute('data-broken', imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length); });"
        "</script></body>")
    checked = tmp_path / "probe.html"
    checked.write_text(probe)
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert 'data-broken="0"' in out.stdout, out.stderr[-2000:]
    assert 'data-images="11"' in out.stdout
