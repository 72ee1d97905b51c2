"""Maps, spectra, grid score and image signals end to end through tiny real pipelines (compare --maps)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from reporters import StopAfter
from safetensors.torch import save_file
from typer.testing import CliRunner

from normscope.cli import app
from normscope.commands.compare import compare
from normscope.load import VelocityModel, load_pipeline
from normscope.load.families import family_for
from normscope.measure.image_signals import IMAGE_SIGNALS_CSV, OUT_OF_RANGE
from normscope.measure.maps import MAPS_FILE, Maps, maps_observer
from normscope.measure.prompts import make_samples
from normscope.measure.sampling import SilentReporter, run_paired, sampling_kwargs


def checkerboard_bias(channels: int, amplitude: float) -> torch.Tensor:
    """+a / -a by the parity of (dy + dx) of packed channel c*4 + 2*dy + dx."""
    index = torch.arange(channels)
    dy, dx = (index % 4) // 2, index % 2
    return amplitude * (-1.0) ** (dy + dx)


@pytest.fixture(scope="module")
def flux_checkerboard(pipelines, tmp_path_factory):
    """FLUX with proj_out x1.1 and a checkerboard added to its bias: a real tuned model, saved as weights.

    FLUX packs 2x2 latent positions into one token, channel index c*4 + 2*dy + dx; a bias of
    +a / -a by the parity of dy + dx is a checkerboard on the unpacked latent, at the patch frequency.
    """
    from conftest import scaled_state_dict

    state = scaled_state_dict(pipelines["flux"], 1.1)
    state["proj_out.bias"] = (state["proj_out.bias"] + checkerboard_bias(state["proj_out.bias"].numel(), 0.1)).contiguous()
    path = tmp_path_factory.mktemp("grid") / "flux-checkerboard.safetensors"
    save_file(state, str(path))
    return path


def test_uniform_scale_gives_flat_maps_and_spectra(scaled, config_for):
    result = compare(config_for("flux", scaled("flux", 1.1), maps=True))
    maps = result.maps
    assert maps.regions  # 4 shifted FLUX steps never reach sigma <= 1/3; the others are there
    for region in maps.regions:
        assert torch.allclose(maps.ratio_map(region), torch.full((16, 16), 1.1), rtol=1e-4)
        assert torch.allclose(maps.channel_ratio(region), torch.full((4,), 1.1), rtol=1e-4)
        ratio = maps.spectrum_ratio(region)
        assert torch.allclose(ratio, torch.full_like(ratio, 1.21), rtol=1e-4)
    assert result.summary["maps"]["patch_period"] == 2


def test_checkerboard_at_the_patch_frequency_fires_the_grid_score(scaled, flux_checkerboard, config_for):
    flat = compare(config_for("flux", scaled("flux", 1.1), maps=True)).summary["maps"]
    grid = compare(config_for("flux", flux_checkerboard, maps=True)).summary["maps"]
    assert grid["grid_score"] > 10 * flat["grid_score"]
    assert grid["grid_score_ci"][0] > flat["grid_score_ci"][1]
    # The spectrum ratio jumps where a checkerboard lives, (0.5, 0.5) cycles per pixel: ring round(16 * 0.707) = 11.
    rings = grid["regions"]["middle"]["spectrum_ratio"]
    assert rings[11] > 1.5 * 1.21  # the ring also holds frequencies the pattern does not touch
    assert rings[1:11] == pytest.approx([1.21] * 10, rel=1e-4)


def test_half_scaled_latent_shows_that_half(pipelines, config_for):
    """SD3 with proj_out's output x1.1 on the first half of the tokens (the top half of the latent)."""
    config = config_for("sd3", pipelines["sd3"])
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    module = copy.deepcopy(pipe.transformer)

    def top_half(_, __, output):
        scale = torch.ones(output.shape[1], 1)
        scale[: output.shape[1] // 2] = 1.1
        return output * scale

    module.proj_out.register_forward_hook(top_half)
    base, tuned = VelocityModel("base", pipe.transformer, "base", "pipeline"), VelocityModel("tuned", module, "hook", "full")
    samples = make_samples(list(config.prompts), config.seeds)
    observer = maps_observer(pipe, family_for(type(pipe).__name__), 16, 16, "tuned")
    run_paired(pipe, tuned, base, sampling_kwargs(pipe, config, samples), SilentReporter(), observers=[observer])
    observer.end_call()
    maps = observer.result([s.prompt_id for s in samples])
    for region in maps.regions:
        ratio = maps.ratio_map(region)
        assert torch.allclose(ratio[:8], torch.full((8, 16), 1.1), rtol=1e-4)
        assert torch.allclose(ratio[8:], torch.ones(8, 16), rtol=1e-4)


def test_base_against_itself_has_unit_maps_and_no_signal_difference(pipelines, config_for, tmp_path):
    result = compare(config_for("sd3", pipelines["sd3"], mode="both", maps=True, out=tmp_path))
    for region in result.maps.regions:
        assert torch.equal(result.maps.ratio_map(region), torch.ones(16, 16))
    assert result.summary["maps"]["grid_score"] is None  # v_tuned - v_base is exactly zero: nothing to score
    for row in result.summary["image_signals"]["signals"]:
        if row["signal"] != "grid_score":
            assert row["difference"] == 0.0, row
    stored = Maps.load(tmp_path / MAPS_FILE)
    assert stored.summary() == result.maps.summary()
    assert (tmp_path / MAPS_FILE).stat().st_size < 50_000
    assert len(pd.read_csv(tmp_path / IMAGE_SIGNALS_CSV)) == 6  # 3 prompts x 2 seeds


def test_out_of_range_is_measured_before_the_pipeline_clips(pipelines, scaled, config_for):
    """Against an independent decode: the plain pipeline's latents through its own VAE, as the pipeline does."""
    config = config_for("sd3", scaled("sd3", 1.1), mode="free", maps=True)
    signals = compare(config).signals
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    samples = make_samples(list(config.prompts), config.seeds)
    latents = pipe(**sampling_kwargs(pipe, config, samples)).images
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    expected = (decoded.abs() > 1).flatten(1).float().mean(1).double().numpy()
    assert np.allclose(signals[f"{OUT_OF_RANGE}_base"].to_numpy(), expected, atol=0)
    assert expected.max() > 0  # the tiny random VAE does overshoot: the test can fail


def test_scorer_through_the_cli(pipelines, scaled, tmp_path, monkeypatch):
    (tmp_path / "my_judge.py").write_text(
        "import numpy as np\n"
        "def redness(images, prompts):\n"
        "    assert len(images) == len(prompts)\n"
        "    return [float(np.asarray(im)[..., 0].mean()) for im in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "compare", str(pipelines["sd3"]), str(scaled("sd3", 1.1)), "--steps", "2", "--height", "16", "--width", "16",
        "--max-sequence-length", "24", "--seeds", "0", "--prompt", "a red fox", "--prompt", "a blue car",
        "--device", "cpu", "--dtype", "float32", "--mode", "both", "--maps", "--scorer", "my_judge:redness",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / IMAGE_SIGNALS_CSV)
    assert {"score_base", "score_tuned", "grid_score"} <= set(frame.columns)
    assert "score" in result.output and "grid score" in result.output
    bad = CliRunner().invoke(app, ["compare", str(pipelines["sd3"]), str(scaled("sd3", 1.1)), "--scorer", "my_judge:redness"])
    assert bad.exit_code == 2 and "--mode free" in bad.output


def test_report_draws_maps_spectra_and_the_signal_table(pipelines, flux_checkerboard, config_for, tmp_path):
    from normscope.commands.report import ReportConfig, report

    run = tmp_path / "grid-run"
    compare(config_for("flux", flux_checkerboard, mode="both", maps=True, out=run))
    written = report(ReportConfig(runs=(run,), out=tmp_path / "report"))
    figures = {p.name for p in written["figures"].glob("*.png")}
    assert {"grid-run_maps.png", "grid-run_spectrum.png", "grid-run_channels.png"} <= figures
    markdown = written["markdown"].read_text()
    assert "grid score (latent" in markdown and "out of range (pre-clip)" in markdown
    assert "Grid score and image signals" in written["html"].read_text()


@pytest.mark.parametrize("key", ["QwenImagePipeline", "ZImagePipeline"])
def test_maps_unpack_packed_and_list_latents(key, family_pipelines):
    """Qwen-Image (packed tokens, per-token renormalised CFG) and Z-Image (lists, negated output): x1.1 is flat."""
    from diffusers import DiffusionPipeline

    from normscope.builders.tiny_families import OUTPUT_PROJECTION, TINY_CALL

    pipe = DiffusionPipeline.from_pretrained(str(family_pipelines(key)), local_files_only=True)
    module = copy.deepcopy(pipe.transformer)
    names = OUTPUT_PROJECTION[type(module).__name__]
    module.load_state_dict({k: v * 1.1 if k in names else v for k, v in module.state_dict().items()})
    base, tuned = VelocityModel("base", pipe.transformer, "base", "pipeline"), VelocityModel("tuned", module, "x1.1", "full")
    family = family_for(type(pipe).__name__)
    observer = maps_observer(pipe, family, 16, 16, "tuned")
    kwargs = dict(prompt=["a red fox", "two apples"], num_inference_steps=2, output_type="latent",
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **TINY_CALL[key])
    run_paired(pipe, tuned, base, kwargs, SilentReporter(), observers=[observer])
    observer.end_call()
    maps = observer.result([0, 1])
    assert maps.regions
    for region in maps.regions:
        ratio = maps.ratio_map(region)
        assert ratio.ndim == 2 and ratio.numel() > 1, ratio.shape
        assert maps.meta["period"] == 2
        assert torch.allclose(ratio, torch.full_like(ratio, 1.1), rtol=1e-4)
        assert torch.allclose(maps.spectrum_ratio(region), torch.full_like(maps.spectrum_ratio(region), 1.21), rtol=1e-4)


def test_check_gates_on_the_grid_score(pipelines, scaled, flux_checkerboard):
    probe = ["--steps", "4", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0,1",
             "--prompt", "a red fox", "--prompt", "two apples", "--device", "cpu", "--dtype", "float32"]
    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(pipelines["flux"]), str(scaled("flux", 1.1)), "--max-inflation", "0.5",
                             "--max-grid-score", "30", "--format", "json", *probe])
    assert ok.exit_code == 0, ok.output
    grid = runner.invoke(app, ["check", str(pipelines["flux"]), str(flux_checkerboard), "--max-inflation", "0.5",
                               "--max-grid-score", "30", *probe])
    assert grid.exit_code == 1, grid.output
    assert "grid score" in grid.output
    refused = runner.invoke(app, ["check", str(pipelines["flux"]), str(flux_checkerboard), "--max-inflation", "0.5",
                                  "--max-grid-score", "30", "--mode", "free", *probe])
    assert refused.exit_code == 2


def test_sweep_tracks_the_grid_score_and_image_signals(pipelines, tmp_path):
    """Checkpoints with a growing checkerboard in proj_out's bias: the grid score rises with it."""
    from normscope.builders.tiny import tiny_flux_pipeline
    from normscope.commands.sweep import SWEEP_WHERE_PNG, SweepConfig, sweep

    run = tmp_path / "run"
    for step, amplitude in ((10, 0.0), (20, 0.05), (30, 0.1)):
        pipe = tiny_flux_pipeline(seed=0)
        with torch.no_grad():
            pipe.transformer.proj_out.bias.add_(checkerboard_bias(pipe.transformer.proj_out.bias.numel(), amplitude))
        pipe.transformer.save_pretrained(run / f"checkpoint-{step}" / "transformer")
    config = SweepConfig(run_dir=run, out=tmp_path / "sweep", pipeline=str(pipelines["flux"]), mode="paired", maps=True,
                         prompts=("a red fox", "two apples"), seeds=(0,), steps=3, height=16, width=16,
                         max_sequence_length=24, device="cpu", dtype="float32")
    table = sweep(config)
    assert table["grid_score"].isna().tolist() == [True, False, False]  # checkpoint 10 is the base: nothing to score
    assert table["grid_score"].iloc[2] > table["grid_score"].iloc[1] > 10
    assert {"out_of_range_diff", "saturation_diff", "pixel_grid_score"} <= set(table.columns)
    assert (tmp_path / "sweep" / SWEEP_WHERE_PNG).is_file()
    assert (tmp_path / "sweep" / "checkpoint-30" / MAPS_FILE).is_file()
    with pytest.raises(Exception, match="--mode paired"):
        SweepConfig(run_dir=run, out=tmp_path / "x", maps=True)


def test_an_interrupted_maps_run_resumes_to_the_same_numbers(scaled, flux_checkerboard, config_for, tmp_path):
    config = config_for("flux", flux_checkerboard, mode="both", maps=True, batch_size=3, out=tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        compare(config, StopAfter(4 + 4 + 2))  # both paired batches finish, free mode is cut short
    watcher = StopAfter(float("inf"))
    resumed = compare(config, watcher)
    assert any(note.startswith("resuming: 2 finished") for note in watcher.notes), watcher.notes
    fresh = compare(config_for("flux", flux_checkerboard, mode="both", maps=True, batch_size=3, out=tmp_path / "fresh"))
    assert resumed.summary["maps"] == fresh.summary["maps"]
    # The free-mode images of the resumed run are decoded in another process state (its first pipeline call);
    # they agree with the uninterrupted run's to float32 round-off, not bit for bit.
    pd.testing.assert_frame_equal(resumed.signals, fresh.signals, rtol=1e-4)  # grid score: a ratio of small differences
    for a, b in zip(resumed.summary["image_signals"]["signals"], fresh.summary["image_signals"]["signals"], strict=True):
        assert a["signal"] == b["signal"] and a["difference"] == pytest.approx(b["difference"], rel=1e-4)


def test_pixel_grid_score_sees_the_checkerboard_through_the_vae(scaled, flux_checkerboard, config_for):
    """Free mode, final images: the latent checkerboard still shows at the pixel period (patch x VAE factor)."""
    def pixel_grid(tuned):
        signals = compare(config_for("flux", tuned, mode="free", maps=True)).summary["image_signals"]
        return next(row for row in signals["signals"] if row["signal"] == "grid_score"), signals["pixel_period"]

    (flat, period), (grid, _) = pixel_grid(scaled("flux", 1.1)), pixel_grid(flux_checkerboard)
    assert period == 2  # 2x2 packing, a VAE without downsampling
    assert grid["ci"][0] > flat["ci"][1]


def test_wan_video_maps_per_latent_frame_and_frame_signals(video_pipelines, tmp_path):
    """Wan 2.1 (5-D latents, Euler scheduler): x1.1 is 1.1 at every position of every latent frame;
    the decoded video's frames reach the image signals before clipping."""
    from video_factory import VIDEO_PROBE, flow_factory_checkpoint

    from normscope.config import CompareConfig

    tuned = flow_factory_checkpoint(video_pipelines["wan21-euler"], tmp_path / "checkpoint-10", {"transformer": 1.1})
    result = compare(CompareConfig(tuned=str(tuned), pipeline=str(video_pipelines["wan21-euler"]), prompts=("a red fox",),
                                   seeds=(0, 1), device="cpu", dtype="float32", mode="both", maps=True, **VIDEO_PROBE))
    for region in result.maps.regions:
        ratio = result.maps.ratio_map(region)
        assert ratio.ndim == 3 and ratio.shape[0] > 1  # (latent frames, H, W)
        assert torch.allclose(ratio, torch.full_like(ratio, 1.1), rtol=1e-4)
    assert len(result.signals) == 2 and np.isfinite(result.signals["out_of_range_base"]).all()
