"""Rendering: figures never touch a notebook's matplotlib backend; one formatter for percentages."""

from __future__ import annotations

import matplotlib
import pytest
from PIL import Image

from normscope.commands.compare import compare
from normscope.render.numbers import pct


@pytest.fixture
def pdf_backend():
    """A backend a notebook might have chosen; restored afterwards."""
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    yield "pdf"
    matplotlib.use(before)


def test_compare_with_figures_leaves_the_backend_and_pyplot_alone(pdf_backend, scaled, config_for, tmp_path):
    import matplotlib.pyplot as plt

    plt.figure()  # the user's own open figure
    open_before = plt.get_fignums()
    rc_before = dict(matplotlib.rcParams)
    compare(config_for("sd3", scaled("sd3", 1.1), out=tmp_path))
    assert matplotlib.get_backend() == pdf_backend
    assert plt.get_fignums() == open_before  # nothing registered with pyplot
    assert dict(matplotlib.rcParams) == rc_before  # the style is scoped to our own figures
    Image.open(tmp_path / "profile.png").verify()
    plt.close("all")


def test_percentages_read_the_same_everywhere():
    assert pct(0.1) == "+10.00 %" and pct(-0.00125) == "-0.12 %"
    assert pct(None) == pct(float("nan")) == pct(float("inf")) == "n/a"
