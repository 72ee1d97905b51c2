"""Image signals on synthetic images whose answer is known by hand."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from normscope.errors import InputError
from normscope.measure import image_signals as sig


def flat(value, size=16, batch=1) -> torch.Tensor:
    return torch.full((batch, 3, size, size), float(value))


def test_out_of_range_counts_values_before_clipping():
    images = flat(0.0)
    images[..., :8, :8] = 1.5  # a quarter of the pixels, every channel
    assert sig.image_signals(images)[sig.OUT_OF_RANGE][0] == 0.25


def test_saturation_brightness_and_colourfulness_of_flat_colours():
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 16, 16)
    out = sig.image_signals(torch.cat([flat(1.0), flat(-1.0), red]))
    assert out[sig.SATURATION].tolist() == [0.0, 0.0, 1.0]
    assert out[sig.BRIGHTNESS][:2].tolist() == pytest.approx([1.0, 0.0])
    assert out[sig.COLOURFULNESS][0] == 0.0 and out[sig.COLOURFULNESS][2] == pytest.approx(0.3 * math.hypot(255, 127.5))


def test_colour_entropy_in_bits():
    images = flat(-1.0)
    images[..., :, 8:] = 1.0  # half black, half white: two colours, one bit
    out = sig.image_signals(torch.cat([flat(0.2), images]))
    assert out[sig.COLOUR_ENTROPY].tolist() == pytest.approx([0.0, 1.0])


def test_edges_and_high_frequencies():
    step = flat(-1.0)
    step[..., :, 8:] = 1.0
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((-1.0) ** (y + x)).expand(1, 3, 16, 16)
    out = sig.image_signals(torch.cat([flat(0.3), step, checker]))
    assert out[sig.EDGE_DENSITY][0] == 0.0 and out[sig.EDGE_DENSITY][1] > 0
    assert out[sig.HIGH_FREQ][2] == pytest.approx(1.0)  # all its power sits at Nyquist
    assert out[sig.HIGH_FREQ][1] < 0.2  # a step is mostly low frequency


def test_pixel_grid_score_fires_on_a_pattern_at_the_pixel_period():
    base = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3
    y, x = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pattern = 0.1 * torch.cos(2 * math.pi * x / 4) * torch.cos(2 * math.pi * y / 4)  # period 4 px: 2x2 patches, VAE x2
    scaled = sig.pixel_grid_score(base, 1.1 * base, period=4)
    grid = sig.pixel_grid_score(base, 1.1 * base + pattern, period=4)
    assert np.all(grid > 10 * scaled)
    assert np.isnan(sig.pixel_grid_score(base, base * 1.1, period=1)).all()


def test_signal_table_is_tuned_minus_base_with_a_prompt_ci():
    base, tuned = flat(0.0, batch=4), flat(0.0, batch=4)
    tuned[..., :8, :] = 1.5  # half of each tuned image out of range
    frame = pd.DataFrame({"prompt_id": [0, 0, 1, 1], **sig.paired_signals(base, tuned, period=4)})
    rows = {row["signal"]: row for row in sig.signal_table(frame)}
    assert rows[sig.OUT_OF_RANGE]["difference"] == 0.5 and rows[sig.OUT_OF_RANGE]["ci"] == [0.5, 0.5]
    assert rows[sig.SATURATION]["difference"] == 0.0


def scorer_mean_red(images, prompts):
    return [np.asarray(im)[..., 0].mean() / 255 for im in images]


def test_user_scorer_gets_pil_images_and_prompts(monkeypatch):
    monkeypatch.setitem(sys.modules, "my_scorers", sys.modules[__name__])
    fn = sig.load_scorer("my_scorers:scorer_mean_red")
    values = sig.run_scorer(fn, torch.cat([flat(1.0), flat(-1.0)]), ["a", "b"], "my_scorers:scorer_mean_red")
    assert values.tolist() == [1.0, 0.0]
    with pytest.raises(InputError, match="module:function"):
        sig.load_scorer("no_colon")
    with pytest.raises(InputError, match="cannot import"):
        sig.load_scorer("surely_not_a_module_xyz:f")
    with pytest.raises(InputError, match="one per image"):
        sig.run_scorer(lambda im, p: [1.0], flat(0, batch=2), ["a", "b"], "x:y")


def test_video_frames_are_taken_before_clipping_and_averaged_per_sample():
    """diffusers' own VideoProcessor (what Wan pipelines call): frames per sample, pre-clip, one row per sample."""
    from types import SimpleNamespace

    from diffusers.video_processor import VideoProcessor

    from normscope.measure.prompts import Sample

    pipe = SimpleNamespace(video_processor=VideoProcessor(vae_scale_factor=8))
    video = torch.zeros(2, 3, 4, 8, 8)  # (B, C, F, H, W), as the VAE decodes it
    video[0, :, :2] = 1.5  # half of sample 0's frames out of range
    with sig.PreClipImages().attached(pipe) as decoded:
        frames = pipe.video_processor.postprocess_video(video, output_type="pil")
    assert len(frames) == 2 and len(frames[0]) == 4  # the pipeline's own output is untouched
    assert "postprocess_video" not in vars(pipe.video_processor)  # unwrapped on exit
    (taken,) = decoded.take_all()
    assert taken.shape == (2, 4, 3, 8, 8)
    samples = [Sample(prompt_id=0, prompt="a", seed=0), Sample(prompt_id=1, prompt="b", seed=0)]
    rows = sig.batch_signals(samples, torch.zeros_like(taken), taken, period=2)
    assert rows[f"{sig.OUT_OF_RANGE}_tuned"].tolist() == [0.5, 0.0]
