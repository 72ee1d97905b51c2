"""Several condition images per sample (issue 19): Qwen-Image-2.1 takes a LIST of condition images (their tokens come
first, the output is sliced to its last N tokens). Repeated ``--image`` gives the list, in order, to every sample; a
pairs row may list images. On the tiny Qwen-Image-2.1 whose processor reads images (``tiny_qwen_image21_vision_pipeline``,
32x32 condition images, output_resolution 32): base vs itself 0 and the output projection x1.1 exactly 1.1 on every
step and branch with true CFG on, with one and with two images; a random peft LoRA row by row against the plain
diffusers call (tests/oracle.py) with two images; the prompt cache (which cannot hold image embeddings for this
family) bypassed without changing a bit; two images give other numbers than one; refusals exit 2 before loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_factory import randomize_lora
from PIL import Image
from safetensors.torch import load_file, save_file
from test_families_oracle import ALPHA, RANK, TARGETS, _check, _save_peft_folder
from test_families_refusals import one_line, run

from normscope.builders.tiny import save_tiny
from normscope.builders.tiny_families import load_qwen_edit_pipeline, tiny_reference_image
from normscope.builders.tiny_new_families import NEW_OUTPUT_PROJECTION, tiny_qwen_image21_vision_pipeline
from normscope.commands.compare import compare
from normscope.config import CompareConfig
from normscope.measure.prompt_cache import prepare_prompts
from normscope.measure.prompts import Sample
from normscope.measure.sampling import batches
from normscope.measure.table import BRANCH, MODE, NORM_BASE, NORM_TUNED, PROMPT_ID, RATIO, STEP
from tests.oracle import oracle_norms

PROMPTS = ("a red fox in snow", "two green apples")
B, STEPS, SIZE = len(PROMPTS), 3, 32
G, C, U = "guided", "cond", "uncond"
BRANCHES = {G, C, U}


@pytest.fixture(scope="module")
def qi21(tmp_path_factory):
    """The saved tiny Qwen-Image-2.1 (processor reading images) and three 32x32 condition images."""
    root = tmp_path_factory.mktemp("condition-images")
    folder = save_tiny(tiny_qwen_image21_vision_pipeline(seed=0), root / "qwen-image-2.1")
    images = []
    for i in range(3):
        images.append(root / f"ref{i}.png")
        tiny_reference_image(i + 3, size=SIZE).save(images[-1])
    return folder, images


def _scaled(folder: Path, target: Path) -> Path:
    keys = NEW_OUTPUT_PROJECTION["QwenImage21Transformer2DModel"]
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({k: (v * 1.1 if k in keys else v).contiguous() for k, v in state.items()}, str(target))
    return target


def _compare(qi21, tuned, images, **overrides):
    folder, _ = qi21
    fields = dict(tuned=str(tuned), base=str(folder), pipeline=str(folder), prompts=PROMPTS, seeds=(0,), device="cpu",
                  dtype="float32", batch_size=B, steps=STEPS, mode="both", guidance=4.0, height=SIZE, width=SIZE,
                  image=tuple(images))
    fields.update(overrides)
    return compare(CompareConfig(**fields))


def _plain(folder: Path):
    pipe = load_qwen_edit_pipeline(folder, local_files_only=True)  # the PIL processor without torchvision
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _oracle_rows(pipe, images: list[Path]) -> dict:
    """(branch, prompt_id, step) -> norm from the plain call, written from the diffusers source: true CFG 4 with the
    negative " " (normscope's), one list of condition images for the batch, resized to output_resolution^2 = 32^2,
    cond call then negative call, each output sliced to its LAST N tokens (N: the scheduler's tokens)."""

    call = dict(prompt=list(PROMPTS), image=[Image.open(p).convert("RGB") for p in images], true_cfg_scale=4.0,
                negative_prompt=[" "] * B, height=SIZE, width=SIZE, output_resolution=SIZE, num_inference_steps=STEPS,
                output_type="latent", generator=[torch.Generator().manual_seed(0) for _ in PROMPTS])
    steps = oracle_norms(pipe, keep_outputs=True, **call)
    assert len(steps) == STEPS
    rows = {}
    for step, record in enumerate(steps):
        assert len(record["outputs"]) == 2  # cond, then negative: CFG really on
        n = record["scheduler_input"].shape[1]
        for role, output in zip((C, U), record["outputs"], strict=True):
            for i, value in enumerate(output[:, -n:].flatten(1).norm(dim=1).tolist()):
                rows[(role, i, step)] = value
        for i, value in enumerate(record["scheduler"]):
            rows[(G, i, step)] = value
    return rows


@pytest.mark.parametrize("count", [1, 2])
def test_base_against_itself_is_exactly_zero(qi21, count):
    folder, images = qi21
    result = _compare(qi21, folder, images[:count])
    assert set(result.frame[BRANCH]) == BRANCHES
    assert (result.frame[RATIO] == 1.0).all()
    assert result.inflation == 0.0
    listed = result.summary["config"]["image"]
    assert listed == (str(images[0]) if count == 1 else [str(p) for p in images[:count]])  # summary.json lists them
    assert result.summary["config"]["resolved"]["output_resolution"] == SIZE


@pytest.mark.parametrize("count", [1, 2])
def test_output_projection_x1_1_is_exactly_1_1_on_every_step_and_branch(qi21, count, tmp_path):
    folder, images = qi21
    frame = _compare(qi21, _scaled(folder, tmp_path / "x1.1.safetensors"), images[:count]).frame
    paired = frame[frame[MODE] == "paired"]
    assert set(paired[BRANCH]) == BRANCHES
    assert len(paired) == len(BRANCHES) * B * STEPS  # cond and uncond every step: true CFG on
    assert np.allclose(paired[RATIO], 1.1, rtol=2e-6, atol=0), paired.groupby([BRANCH, STEP])[RATIO].agg(["min", "max"])
    first = frame[(frame[MODE] == "free") & (frame[STEP] == 0)]
    assert set(first[BRANCH]) == BRANCHES
    assert np.allclose(first[RATIO], 1.1, rtol=2e-6, atol=0)


def test_random_lora_with_two_images_row_by_row_against_the_plain_pipeline(qi21, tmp_path):
    folder, images = qi21
    tuned_pipe = _plain(folder)
    from peft import LoraConfig

    tuned_pipe.transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                  init_lora_weights="gaussian"))
    randomize_lora(tuned_pipe.transformer, 7, scale=0.3)
    lora = _save_peft_folder(tuned_pipe, tmp_path / "lora")
    frame = _compare(qi21, lora, images[:2]).frame
    base_rows, tuned_rows = _oracle_rows(_plain(folder), images[:2]), _oracle_rows(tuned_pipe, images[:2])
    free, paired = frame[frame[MODE] == "free"], frame[frame[MODE] == "paired"]
    n = len(BRANCHES) * B * STEPS
    assert _check(free, NORM_BASE, base_rows) == n
    assert _check(free, NORM_TUNED, tuned_rows) == n
    assert _check(paired, NORM_TUNED, tuned_rows) == n  # the tuned model drives: the oracle's own trajectory
    assert _check(paired, NORM_BASE, base_rows, steps={0}) == n // STEPS  # the same inputs at step 0
    assert np.ptp((free[NORM_TUNED] / free[NORM_BASE]).to_numpy()) > 1e-3  # a LoRA is not a uniform scale
    # the numbers change with the images: one image, or the two in the other order, is another computation
    one = _oracle_rows(_plain(folder), images[:1])
    swapped = _oracle_rows(_plain(folder), images[1::-1])
    for other in (one, swapped):
        assert max(abs(other[k] - base_rows[k]) / base_rows[k] for k in base_rows) > 1e-4


def test_two_images_measure_other_numbers_than_one(qi21):
    folder, images = qi21
    norms = []
    for count in (1, 2):
        frame = _compare(qi21, folder, images[:count], mode="free").frame
        norms.append(frame.sort_values([BRANCH, PROMPT_ID, STEP])[NORM_BASE].to_numpy())
    assert np.max(np.abs(norms[0] / norms[1] - 1)) > 1e-4


def test_prompt_cache_is_bypassed_with_images_and_every_bit_stays(qi21, tmp_path):
    """Qwen-Image-2.1 encodes the condition images WITH the prompt and its call takes no embeddings of them: with
    images the cache is not used (the pipeline encodes in every call), giving bit for bit the in-call run."""
    folder, images = qi21
    tuned = _scaled(folder, tmp_path / "x1.1.safetensors")
    inside = _compare(qi21, tuned, images[:2], encode_once=False, mode="paired")
    default = _compare(qi21, tuned, images[:2], mode="paired")
    assert default.frame.equals(inside.frame)
    config = CompareConfig(tuned=str(tuned), pipeline=str(folder), prompts=PROMPTS, seeds=(0,), device="cpu",
                           dtype="float32", batch_size=B, steps=STEPS, guidance=4.0, height=SIZE, width=SIZE,
                           image=tuple(images[:2]))
    assert prepare_prompts(str(folder), [list(PROMPTS)], config, torch.float32, "cpu") is None
    text_only = CompareConfig(**{**config.to_dict(), "image": None, "dtype": "float32", "device": "cpu"})
    assert prepare_prompts(str(folder), [list(PROMPTS)], text_only, torch.float32, "cpu") is not None


def test_pairs_rows_listing_images_sample_each_prompt_with_its_own_list(qi21, tmp_path):
    folder, images = qi21
    rows = [{"prompt": PROMPTS[0], "image": [str(images[0]), str(images[1])]},
            {"prompt": PROMPTS[1], "image": [str(images[2]), str(images[0])]}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _compare(qi21, folder, [], image=None, prompts=(), prompts_file=pairs, mode="free")
    assert result.summary["config"]["prompt_images"] == [r["image"] for r in rows]  # summary.json lists them
    got = {(r[PROMPT_ID], r[STEP]): r[NORM_BASE] for _, r in result.frame[result.frame[BRANCH] == G].iterrows()}

    pipe = _plain(folder)
    for i, row in enumerate(rows):  # the plain call for one prompt with its own list of images
        steps = oracle_norms(pipe, prompt=[row["prompt"]], image=[Image.open(p).convert("RGB") for p in row["image"]],
                             true_cfg_scale=4.0, negative_prompt=[" "], height=SIZE, width=SIZE, output_resolution=SIZE,
                             num_inference_steps=STEPS, output_type="latent", generator=[torch.Generator().manual_seed(0)])
        for step, record in enumerate(steps):
            assert got[(i, step)] == pytest.approx(record["scheduler"][0], rel=2e-5), (i, step)


def test_batches_never_mix_lists_of_condition_images():
    a, b = ("x.png", "y.png"), ("y.png", "x.png")  # the same images in another order are another conditioning
    samples = [Sample(0, "p", 0, a), Sample(0, "p", 1, a), Sample(1, "q", 0, b), Sample(2, "r", 0, b)]
    assert [[s.seed for s in batch] for batch in batches(samples, 8)] == [[0, 1], [0, 0]]
    assert [batch[0].image for batch in batches(samples, 8)] == [a, b]


def test_the_fingerprint_sees_the_contents_of_every_image(qi21, tmp_path):
    from normscope.commands.compare import _fingerprint
    from normscope.load import find_checkpoint

    folder, images = qi21
    copies = []
    for i, image in enumerate(images[:2]):
        copies.append(tmp_path / f"c{i}.png")
        copies[-1].write_bytes(image.read_bytes())
    config = CompareConfig(tuned=str(folder), pipeline=str(folder), prompts=PROMPTS, image=tuple(copies))
    checkpoints = [find_checkpoint(str(folder), "TUNED")]
    before = _fingerprint(config, list(PROMPTS), str(folder), checkpoints)
    assert _fingerprint(config, list(PROMPTS), str(folder), checkpoints) == before
    tiny_reference_image(99, size=SIZE).save(copies[1])  # the second image's pixels change, its path does not
    assert _fingerprint(config, list(PROMPTS), str(folder), checkpoints) != before


# ---------------------------------------------------------------- refusals: one line, exit 2, before any weight loads

PROBE = ["--steps", "2", "--height", "32", "--width", "32", "--seeds", "0", "--prompt", "a fox", "--device", "cpu"]


def test_two_images_for_a_family_that_takes_one_are_refused_before_loading(family_pipelines, qi21, tmp_path,
                                                                           no_weight_loads):
    _, images = qi21
    folder = family_pipelines("FluxKontextPipeline")
    one_line(run("compare", folder, folder, *PROBE, "--image", images[0], "--image", images[1]), 2,
             "--image is given 2 times", "FluxKontextPipeline (flux-kontext) takes one condition image per sample",
             "qwen-image-2.1 (QwenImage21Pipeline)")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a fox", "image": [str(images[0]), str(images[1])]}) + "\n")
    one_line(run("compare", folder, folder, *PROBE[:-4], "--device", "cpu", "--prompts", pairs), 2,
             "a row of --prompts lists 2 images", "takes one condition image per sample")


def test_images_for_a_text_to_image_family_are_refused_before_loading(pipelines, qi21, no_weight_loads):
    _, images = qi21
    one_line(run("compare", pipelines["sd3"], pipelines["sd3"], *PROBE, "--image", images[0], "--image", images[1]), 2,
             "StableDiffusion3Pipeline does not take an image: drop --image")


def test_missing_or_unreadable_images_are_refused_before_loading(qi21, tmp_path, no_weight_loads):
    folder, images = qi21
    one_line(run("compare", folder, folder, *PROBE, "--image", images[0], "--image", tmp_path / "gone.png"), 2,
             f"--image {tmp_path / 'gone.png'} does not exist")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    one_line(run("compare", folder, folder, *PROBE, "--image", images[0], "--image", broken), 2,
             f"--image {broken} is not an image Pillow can read")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a fox", "image": [str(images[0]), "broken.png"]}) + "\n")
    one_line(run("compare", folder, folder, *PROBE[:-4], "--device", "cpu", "--prompts", pairs), 2,
             f"--prompts image {broken} is not an image Pillow can read")
    pairs.write_text(json.dumps({"prompt": "a fox", "image": [str(images[0]), 3]}) + "\n")
    one_line(run("compare", folder, folder, *PROBE[:-4], "--device", "cpu", "--prompts", pairs), 2,
             "pairs.jsonl:1: \"image\" lists", "write the paths as strings")


# ---------------------------------------------------------------- FLUX.2: the same path, another family row


def test_flux2_takes_two_condition_images_as_the_plain_call_does(family_pipelines, tmp_path):
    """Flux2Pipeline's ``image`` is a list of reference images (each its own latent ids; at least 64 px a side):
    with two, the base's guided norms equal the plain call's with the same list, the x1.1 projection gives 1.1 at
    step 0, and one image gives other numbers."""
    from diffusers import DiffusionPipeline

    from tests.conftest import scaled_state_dict

    images = []
    for i in range(2):
        images.append(tmp_path / f"ref{i}.png")
        tiny_reference_image(i + 3, size=64).save(images[-1])
    folder = family_pipelines("Flux2Pipeline")
    tuned = tmp_path / "x1.1.safetensors"
    save_file(scaled_state_dict(folder, 1.1), str(tuned))
    result = compare(CompareConfig(tuned=str(tuned), base=str(folder), pipeline=str(folder), prompts=PROMPTS, seeds=(0,),
                                   device="cpu", dtype="float32", batch_size=B, steps=2, mode="free", guidance=4.0,
                                   height=16, width=16, image=tuple(images[:2])))
    frame = result.frame[result.frame[BRANCH] == G]
    assert np.allclose(frame[frame[STEP] == 0][RATIO], 1.1, rtol=2e-6, atol=0)
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def plain(paths):
        steps = oracle_norms(pipe, prompt=list(PROMPTS), image=[Image.open(p).convert("RGB") for p in paths],
                             guidance_scale=4.0, height=16, width=16, num_inference_steps=2, output_type="latent",
                             generator=[torch.Generator().manual_seed(0) for _ in PROMPTS])
        return {(i, step): value for step, record in enumerate(steps) for i, value in enumerate(record["scheduler"])}

    want = plain(images[:2])
    got = {(r[PROMPT_ID], r[STEP]): r[NORM_BASE] for _, r in frame.iterrows()}
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-5), key
    one = plain(images[:1])
    assert max(abs(one[k] - want[k]) / want[k] for k in want) > 1e-4


def test_flux2_condition_images_below_its_bounds_are_refused_before_loading(family_pipelines, qi21, no_weight_loads):
    _, images = qi21  # 32x32: Flux2ImageProcessor.check_image_input raises below 64 px a side
    folder = family_pipelines("Flux2Pipeline")
    one_line(run("compare", folder, folder, *PROBE, "--image", images[0], "--image", images[1]), 2,
             f"--image {images[0]} is 32x32", "Flux2Pipeline (flux2) takes condition images of at least 64 px a side")


def test_repeated_image_on_the_command_line_reaches_the_run_in_order(qi21, tmp_path):
    folder, images = qi21
    result = run("compare", folder, folder, "--steps", "2", "--height", "32", "--width", "32", "--seeds", "0",
                 "--prompt", "a fox", "--guidance", "4", "--device", "cpu", "--dtype", "float32", "--format", "json",
                 "--mode", "free", "--image", images[1], "--image", images[0], "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["image"] == [str(images[1]), str(images[0])]
    assert summary["config"]["resolved"]["output_resolution"] == SIZE and summary["inflation"] == 0.0


def test_edit_plus_gets_the_list_for_its_one_prompt_and_edit_one_image_per_prompt(qi21):
    """The call keywords only (the edit calls resize to ~1024^2 and are measured in tests/test_qwen_edit.py):
    Qwen-Image-Edit-Plus (batch 1) gets the two images as its list, in order; Qwen-Image-Edit keeps one image per
    prompt (its row takes one, so several are refused before loading, as for Kontext above)."""
    from normscope.builders.tiny_families import tiny_qwen_image_edit_pipeline
    from normscope.config import ProbeConfig
    from normscope.measure.sampling import sampling_kwargs

    _, images = qi21
    plus = tiny_qwen_image_edit_pipeline(seed=0, plus=True)
    probe = ProbeConfig(prompts=PROMPTS[:1], steps=2, guidance=4.0, height=SIZE, width=SIZE, image=tuple(images[:2]))
    got = sampling_kwargs(plus, probe, [Sample(0, PROMPTS[0], 0)])["image"]
    assert [np.asarray(i).tobytes() for i in got] == [np.asarray(Image.open(p).convert("RGB")).tobytes()
                                                      for p in images[:2]]
    edit = tiny_qwen_image_edit_pipeline(seed=0)
    one = ProbeConfig(prompts=PROMPTS, steps=2, guidance=4.0, height=SIZE, width=SIZE, image=images[0])
    got = sampling_kwargs(edit, one, [Sample(i, p, 0) for i, p in enumerate(PROMPTS)])["image"]
    assert len(got) == B and all(np.asarray(i).tobytes() == np.asarray(got[0]).tobytes() for i in got)
