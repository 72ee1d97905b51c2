"""Known answers on a tiny real pipeline of every family: base vs itself is exactly 0, and the transformer's
output projection scaled by 1.1 is +10.0 % on every branch (after Qwen-Image's renormalisation too, and
``combined``), at every step in paired mode and at the first step in free mode (afterwards each model
follows its own trajectory, so the answer is no longer known by hand).

Runs through ``compare()``, the user's path, wherever the options are compare options; the few settings
that are pipeline arguments without a normscope option (SD3 skip-layer guidance, Z-Image's
``cfg_normalization`` / ``cfg_truncation``, Kontext's reference image) run through the same sampling
functions compare uses, with the argument added to the call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from normscope.builders.tiny_families import OUTPUT_PROJECTION, TINY_CALL, tiny_reference_image
from normscope.commands.compare import compare
from normscope.config import CompareConfig, ProbeConfig
from normscope.load import load_models, load_pipeline
from normscope.measure.prompts import make_samples
from normscope.measure.sampling import SilentReporter, run_free, run_paired, sampling_kwargs
from normscope.measure.table import BRANCH, MODE, RATIO, STEP, free_frame, paired_frame, tidy

PROMPTS = ("a red fox in snow", "two green apples", "a sign that says OPEN")
SIZE = dict(height=16, width=16, steps=2)
G, C, U, COMB = "guided", "cond", "uncond", "combined"

# case -> (pipeline key, probe options, extra pipeline arguments or None, branches expected)
CASES = {
    "sd3": ("sd3", dict(guidance=4.5, max_sequence_length=24), None, {G, C, U}),
    "sd3-skip-layer": ("sd3", dict(guidance=4.5, max_sequence_length=24),
                       dict(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0),
                       {G, C, U}),
    "flux": ("flux", dict(guidance=3.5, max_sequence_length=24), None, {G}),
    "flux-true-cfg": ("flux", dict(guidance=3.5, true_cfg_scale=4.0, max_sequence_length=24), None, {G, C, U}),
    "flux-kontext": ("FluxKontextPipeline", dict(guidance=2.5, max_sequence_length=24),
                     dict(max_area=16 * 16, _auto_resize=False), {G}),
    "flux2": ("Flux2Pipeline", dict(guidance=4.0), None, {G}),
    "flux2-klein": ("Flux2KleinPipeline", dict(guidance=1.0), None, {G}),
    "flux2-klein-base": ("Flux2KleinPipeline-base", dict(guidance=4.0), None, {G, C, U}),
    "qwen-image": ("QwenImagePipeline", dict(guidance=4.0), None, {G, C, U, COMB}),
    "z-image": ("ZImagePipeline", dict(guidance=4.0), None, {G, C, U}),
    "z-image-capped": ("ZImagePipeline", dict(guidance=4.0), dict(cfg_normalization=0.9), {G, C, U, COMB}),
}


@pytest.fixture(scope="module")
def folders(pipelines, family_pipelines):
    def folder(key: str) -> Path:
        return pipelines[key] if key in pipelines else family_pipelines(key)

    return folder


@pytest.fixture(scope="module")
def scaled_family(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("family_scaled")
    cache: dict[str, Path] = {}

    def make(key: str) -> Path:
        if key not in cache:
            folder = folders(key)
            cls = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
            keys = OUTPUT_PROJECTION[cls]
            state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
            assert all(k in state for k in keys)
            path = root / f"{key}-x1.1.safetensors"
            save_file({k: (v * 1.1 if k in keys else v).contiguous() for k, v in state.items()}, str(path))
            cache[key] = path
        return cache[key]

    return make


def measure(folder: Path, tuned: Path, probe: dict, extra: dict | None, key: str) -> object:
    """The tidy frame of paired + free mode for BASE = the pipeline, TUNED = ``tuned``."""
    fields = dict(prompts=PROMPTS, seeds=(0,), device="cpu", dtype="float32", batch_size=3, **SIZE, **probe)
    if extra is None and key != "FluxKontextPipeline":
        return compare(CompareConfig(base=str(folder), tuned=str(tuned), pipeline=str(folder), mode="both",
                                     **fields)).frame
    pipe = load_pipeline(str(folder), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(tuned), str(folder))
    config = ProbeConfig(**fields)
    samples = make_samples(list(PROMPTS), (0,))

    def kwargs():
        call = {**sampling_kwargs(pipe, config, samples), **(extra or {})}
        if key == "FluxKontextPipeline":
            call["image"] = [tiny_reference_image(i) for i in range(len(samples))]
        return call

    paired = run_paired(pipe, loaded.tuned, loaded.base, kwargs(), SilentReporter())["paired"]
    free = run_free(pipe, loaded.base, loaded.tuned, kwargs(), SilentReporter())
    return tidy([paired_frame(paired, samples, "tuned"), free_frame(free["base"], free["tuned"], samples)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_projection_times_1_1_is_plus_10_percent_on_every_branch(case, folders, scaled_family):
    key, probe, extra, branches = CASES[case]
    frame = measure(folders(key), scaled_family(key), probe, extra, key)
    assert set(frame[BRANCH]) == branches
    paired = frame[frame[MODE] == "paired"]
    assert len(paired) == len(branches) * len(PROMPTS) * SIZE["steps"]
    assert np.allclose(paired[RATIO], 1.1, rtol=2e-6, atol=0), paired.groupby([BRANCH, STEP])[RATIO].agg(["min", "max"])
    first = frame[(frame[MODE] == "free") & (frame[STEP] == 0)]
    assert set(first[BRANCH]) == branches
    assert np.allclose(first[RATIO], 1.1, rtol=2e-6, atol=0), first


@pytest.mark.parametrize("case", ["sd3", "flux-true-cfg", "flux-kontext", "flux2", "flux2-klein-base", "qwen-image",
                                  "z-image-capped"])
def test_base_against_itself_is_exactly_zero(case, folders):
    key, probe, extra, _ = CASES[case]
    folder = folders(key)
    frame = measure(folder, folder, probe, extra, key)
    assert (frame[RATIO] == 1.0).all(), frame[frame[RATIO] != 1.0]


def test_qwen_renormalisation_hides_nothing_combined_shows(folders):
    """Qwen-Image's guided velocity has the cond norm token by token; ``combined`` is the CFG combination."""
    folder = folders("QwenImagePipeline")
    frame = compare(CompareConfig(base=str(folder), tuned=str(folder), pipeline=str(folder), prompts=PROMPTS,
                                  seeds=(0,), device="cpu", dtype="float32", guidance=4.0, **SIZE)).frame
    by = frame.set_index([BRANCH, "prompt_id", STEP])["norm_base"]
    assert np.allclose(by[G].to_numpy(), by[C].to_numpy(), rtol=1e-5)  # per-token renorm keeps ||cond|| overall
    assert (by[COMB].to_numpy() > by[C].to_numpy()).all()  # guidance 4 makes the combination larger


def test_z_image_cfg_truncation_turns_the_cfg_branches_off_late(folders, scaled_family):
    """Steps past cfg_truncation make one call: guided = cond there, uncond has no value (NaN)."""
    key = "ZImagePipeline"
    frame = measure(folders(key), scaled_family(key), dict(guidance=4.0), dict(cfg_truncation=0.1), key)
    paired = frame[frame[MODE] == "paired"]
    late = paired[paired[STEP] == 1]
    assert late[late[BRANCH] == U][RATIO].isna().all()
    assert np.allclose(late[late[BRANCH] == C][RATIO], 1.1, rtol=2e-6)
    assert np.allclose(paired[paired[BRANCH] == G][RATIO], 1.1, rtol=2e-6)
    early = paired[(paired[STEP] == 0) & (paired[BRANCH] == U)]
    assert np.allclose(early[RATIO], 1.1, rtol=2e-6)


def test_guidance_goes_to_the_familys_argument(folders):
    """--guidance is Qwen-Image's true_cfg_scale (with the negative prompt CFG needs); FLUX.1 keeps both."""
    qwen = load_pipeline(str(folders("QwenImagePipeline")), torch.float32, "cpu")
    samples = make_samples(list(PROMPTS[:2]), (0,))
    kwargs = sampling_kwargs(qwen, ProbeConfig(guidance=4.0, **SIZE), samples)
    assert kwargs["true_cfg_scale"] == 4.0 and "guidance_scale" not in kwargs
    assert kwargs["negative_prompt"] == [" ", " "]
    assert "negative_prompt" not in sampling_kwargs(qwen, ProbeConfig(guidance=1.0, **SIZE), samples)
    flux = load_pipeline(str(folders("flux")), torch.float32, "cpu")
    kwargs = sampling_kwargs(flux, ProbeConfig(guidance=3.5, true_cfg_scale=4.0, **SIZE), samples)
    assert kwargs["guidance_scale"] == 3.5 and kwargs["true_cfg_scale"] == 4.0 and kwargs["negative_prompt"] == [" ", " "]
    klein = load_pipeline(str(folders("Flux2KleinPipeline")), torch.float32, "cpu")
    assert sampling_kwargs(klein, ProbeConfig(**SIZE), samples)["prompt"] == list(PROMPTS[:2])  # by keyword
    assert TINY_CALL  # the builders' call table stays the reference for the tiny sizes


def test_summary_records_the_guidance_argument_and_the_preset(folders, scaled_family):
    folder = folders("QwenImagePipeline")
    result = compare(CompareConfig(base=str(folder), tuned=str(scaled_family("QwenImagePipeline")), pipeline=str(folder),
                                   prompts=PROMPTS[:1], seeds=(0,), device="cpu", dtype="float32",
                                   preset="flow_grpo-qwen-image", steps=2, height=16, width=16))
    resolved = result.summary["config"]["resolved"]
    assert resolved["family"] == "qwen-image" and resolved["guidance_argument"] == "true_cfg_scale"
    assert resolved["guidance"] == 4.0 and resolved["preset"] == "flow_grpo-qwen-image"
    assert result.summary["config"]["steps"] == 2  # explicit options override the preset's 50


@pytest.mark.parametrize("key", ["QwenImagePipeline", "ZImagePipeline"])
def test_batch_size_does_not_change_the_numbers(key, folders, scaled_family):
    """Same noise and inputs per sample whatever the batch (two calls per step; list inputs)."""
    folder = folders(key)

    def frame(batch_size):
        return compare(CompareConfig(base=str(folder), tuned=str(scaled_family(key)), pipeline=str(folder),
                                     prompts=PROMPTS, seeds=(0,), device="cpu", dtype="float32", guidance=4.0,
                                     batch_size=batch_size, mode="both", **SIZE)).frame

    one, three = frame(1), frame(3)
    assert one[[MODE, "prompt_id", STEP, BRANCH]].equals(three[[MODE, "prompt_id", STEP, BRANCH]])
    for column in ("norm_base", "norm_tuned", "cosine"):
        assert np.allclose(one[column], three[column], rtol=2e-5, atol=0, equal_nan=True), column
