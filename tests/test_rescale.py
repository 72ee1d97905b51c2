"""The inference-rescale ablation: the tuned velocity rescaled at every step to the base's norm on the same input."""

from __future__ import annotations

import pytest
import torch
from conftest import PROBE, PROMPTS, make_config
from typer.testing import CliRunner

from normscope.cli import app
from normscope.commands.compare import compare
from normscope.config import ProbeConfig
from normscope.load import load_models, load_pipeline
from normscope.measure.capture import capture
from normscope.measure.prompts import make_samples
from normscope.measure.sampling import sampling_kwargs


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_rescaled_x1_1_model_follows_the_base_trajectory_exactly(pipelines, scaled, arch):
    """proj_out x 1.1: v_tuned = 1.1 v_base on every input, so rescaling to the base's norm gives back v_base
    and the rescaled tuned run must land on the plain diffusers base run's latents; its ratio is +10 % exactly."""
    source = str(pipelines[arch])
    pipe = load_pipeline(source, torch.float32, "cpu")
    loaded = load_models(pipe, None, str(scaled(arch, 1.1)), source)
    probe = ProbeConfig(prompts=PROMPTS[:2], seeds=(0,), device="cpu", dtype="float32", **PROBE[arch])
    kwargs = sampling_kwargs(pipe, probe, make_samples(list(PROMPTS[:2]), (0,)))
    fresh = lambda: dict(kwargs, generator=[torch.Generator().manual_seed(0) for _ in range(2)])  # noqa: E731
    with torch.no_grad():
        plain_base = pipe(**fresh()).images  # no normscope hook: the independent side
        with capture(pipe, loaded.tuned, loaded.base, rescale_to_other=True, call_kwargs=fresh()) as recorder:
            rescaled = pipe(**fresh()).images
            record = recorder.collect()
        with capture(pipe, loaded.tuned):
            plain_tuned = pipe(**fresh()).images
    torch.testing.assert_close(rescaled, plain_base, rtol=1e-4, atol=1e-5)
    assert (plain_tuned - plain_base).abs().max() > 1e-2  # without the rescale the tuned run goes elsewhere
    ratio = record.stats["guided"][:, 0] / record.stats["guided"][:, 1]  # unscaled tuned / base, same inputs
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.1), rtol=1e-4, atol=0)
    assert pipe.scheduler.step.__func__ is type(pipe.scheduler).step  # the wrapper is gone


def test_compare_reports_the_rescaled_run_and_saves_its_images(pipelines, scaled, tmp_path):
    out = tmp_path / "run"
    config = make_config(pipelines, "sd3", scaled("sd3", 1.1), mode="both", rescale_to_base=True, save_images=True, out=out,
                         prompts=PROMPTS[:1])
    summary = compare(config).summary
    rescaled = summary["modes"]["rescaled"]["guided"]
    assert rescaled["estimates"]["step_mean"]["inflation"] == pytest.approx(0.10, abs=1e-4)
    assert summary["headline_mode"] == "paired" and set(summary["modes"]) == {"paired", "free", "rescaled"}
    for role in ("base", "tuned", "rescaled"):
        assert len(list((out / "images").glob(f"*-{role}.png"))) == 2
    from normscope.commands.report import Run
    from normscope.render.figures import image_grid

    grid = image_grid(Run(out))  # the report shows the rescaled run next to base and tuned
    assert [ax.get_title() for ax in grid.axes if ax.images][1:3] == ["tuned", "tuned, rescaled"]
    assert sum(1 for ax in grid.axes if ax.images) == 6
    result = CliRunner().invoke(app, ["compare", str(scaled("sd3", 1.1)), "--pipeline", str(pipelines["sd3"]),
                                      "--rescale-to-base", "--prompt", "a red fox", "--seeds", "0", "--steps", "2",
                                      "--height", "16", "--width", "16", "--max-sequence-length", "24",
                                      "--device", "cpu", "--dtype", "float32", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"rescaled"' in result.stdout


def test_rescale_needs_the_other_model(pipelines):
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(pipelines["sd3"]), str(pipelines["sd3"]))
    with pytest.raises(ValueError, match="other"):
        with capture(pipe, loaded.tuned, rescale_to_other=True):
            pass
