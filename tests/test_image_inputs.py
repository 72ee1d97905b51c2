"""Image-conditioned families (issue 19): the image a family needs is required before any weight loads; Wan2.2
TI2V-5B (a WanPipeline folder) takes --image; a (prompt, image) pairs file gives one image per sample, as the
trainers' edit evaluation sets; Qwen-Image-Edit-Plus's batch of one is asked for before loading."""

from __future__ import annotations

import json

import pytest
import torch
from test_families_refusals import _copy_with_class, one_line, run
from typer.testing import CliRunner

from normscope.builders.tiny_families import tiny_reference_image
from normscope.cli import app
from normscope.measure.table import BRANCH, MODE, NORM_BASE, PROMPT_ID, RATIO, STEP
from tests.oracle import oracle_norms

runner = CliRunner()
PROBE = ["--steps", "2", "--height", "16", "--width", "16", "--seeds", "0", "--prompt", "a fox", "--device", "cpu"]
VIDEO = ["--num-frames", "5", "--max-sequence-length", "16", "--guidance", "4"]
PROMPTS = ("a red fox in snow", "two green apples")


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """A Wan2.2 TI2V-5B layout as its hub repo ships it: a WanPipeline folder with expand_timesteps."""
    from normscope.builders.tiny_video import save_tiny_video, tiny_wan_pipeline

    return save_tiny_video(tiny_wan_pipeline(seed=0, sampler="euler", expand_timesteps=True),
                           tmp_path_factory.mktemp("ti2v") / "ti2v")


@pytest.fixture
def pairs(tmp_path):
    """A (prompt, image) pairs file as flow_grpo's edit evaluation sets: relative image paths, one per row."""
    (tmp_path / "refs").mkdir()
    rows = []
    for i, prompt in enumerate(PROMPTS):
        tiny_reference_image(i + 3).save(tmp_path / "refs" / f"{i}.png")
        rows.append(json.dumps({"prompt": prompt, "image": f"refs/{i}.png"}))
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_kontext_without_an_image_is_refused_before_loading(family_pipelines, no_weight_loads):  # noqa: F811
    folder = family_pipelines("FluxKontextPipeline")
    one_line(run("compare", folder, folder, *PROBE), 2, "FluxKontextPipeline (flux-kontext) edits or animates an image",
             "pass --image FILE", "--prompts pairs.jsonl")


@pytest.mark.parametrize("cls", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline"])
def test_qwen_image_edit_without_an_image_is_refused_before_loading(cls, family_pipelines, tmp_path,
                                                                   no_weight_loads):  # noqa: F811
    folder = _copy_with_class(family_pipelines("QwenImagePipeline"), tmp_path / "edit", cls)
    one_line(run("compare", folder, folder, *PROBE, "--batch-size", "1"), 2, f"{cls} (qwen-image-edit) edits")


def test_qwen_image_edit_plus_batch_above_one_is_refused_before_loading(family_pipelines, tmp_path,
                                                                       no_weight_loads):  # noqa: F811
    folder = _copy_with_class(family_pipelines("QwenImagePipeline"), tmp_path / "plus", "QwenImageEditPlusPipeline")
    image = tmp_path / "ref.png"
    tiny_reference_image(0).save(image)
    one_line(run("compare", folder, folder, *PROBE, "--image", image), 2,
             "QwenImageEditPlusPipeline samples one prompt per call", "--batch-size 1")


def test_pairs_file_rows_are_checked_before_loading(family_pipelines, pairs, no_weight_loads):  # noqa: F811
    folder = family_pipelines("FluxKontextPipeline")
    (pairs.parent / "refs" / "1.png").unlink()
    one_line(run("compare", folder, folder, *PROBE[:-4], "--device", "cpu", "--prompts", pairs), 2,
             "pairs.jsonl:2: image", "does not exist")
    pairs.write_text(json.dumps({"prompt": "a", "image": "refs/0.png"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    one_line(run("compare", folder, folder, *PROBE[:-4], "--device", "cpu", "--prompts", pairs), 2,
             "pairs.jsonl:2 has no \"image\"")


def test_an_image_on_a_text_to_image_family_is_refused_before_loading(pipelines, pairs, no_weight_loads):  # noqa: F811
    one_line(run("compare", pipelines["sd3"], pipelines["sd3"], *PROBE, "--prompts", pairs), 2,
             "StableDiffusion3Pipeline does not take an image: drop the image column of --prompts")


def _plain_i2v(folder):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frame(out):
    import pandas as pd

    frame = pd.read_csv(out / "norms.csv")
    return frame[(frame[MODE] == "free") & (frame[BRANCH] == "guided")]


def test_ti2v_takes_an_image_per_sample_from_a_pairs_file(ti2v, pairs, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["compare", str(ti2v), str(ti2v), "--prompts", str(pairs), "--steps", "2", "--height",
                                 "16", "--width", "16", "--seeds", "0", "--mode", "free", "--device", "cpu", "--dtype",
                                 "float32", "--format", "json", "--out", str(out), *VIDEO])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["config"]["resolved"]["pipeline_class"] == "WanImageToVideoPipeline"  # its image-to-video mode
    frame = _frame(out)
    assert (frame[RATIO] == 1.0).all()
    from PIL import Image

    images = [Image.open(pairs.parent / "refs" / f"{i}.png").convert("RGB") for i in range(len(PROMPTS))]
    pipe = _plain_i2v(ti2v)

    def plain(prompt: str, image) -> list[float]:  # the plain call for one sample (Wan I2V takes one image per call)
        steps = oracle_norms(pipe, image=image, prompt=[prompt], num_inference_steps=2, height=16, width=16,
                             num_frames=5, guidance_scale=4.0, max_sequence_length=16, output_type="latent",
                             generator=[torch.Generator().manual_seed(0)])
        return [record["scheduler"][0] for record in steps]

    got = {(r[PROMPT_ID], r[STEP]): r[NORM_BASE] for _, r in frame.iterrows()}
    assert len(got) == 2 * len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        for step, value in enumerate(plain(prompt, images[i])):
            assert got[(i, step)] == pytest.approx(value, rel=2e-5), (i, step)
    # one image per sample, not the first for all: the second sample with the first image differs
    assert abs(plain(PROMPTS[1], images[0])[1] - got[(1, 1)]) > 1e-5


def test_ti2v_takes_one_image(ti2v, tmp_path):
    image = tmp_path / "first.png"
    tiny_reference_image(1).save(image)
    result = runner.invoke(app, ["compare", str(ti2v), str(ti2v), *PROBE, "--dtype", "float32", "--format", "json",
                                 "--image", str(image), *VIDEO])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["resolved"]["pipeline_class"] == "WanImageToVideoPipeline"


def test_kontext_pairs_file_samples_each_prompt_with_its_image_at_the_eval_size(family_pipelines, pairs, tmp_path):
    """flow_grpo's Kontext evaluation: each reference image resized to the eval size, max_area = size^2."""
    from diffusers import DiffusionPipeline
    from PIL import Image

    folder = family_pipelines("FluxKontextPipeline")
    out = tmp_path / "run"
    result = runner.invoke(app, ["compare", str(folder), str(folder), "--prompts", str(pairs), "--steps", "2",
                                 "--height", "16", "--width", "16", "--max-sequence-length", "24", "--guidance", "2.5",
                                 "--seeds", "0", "--mode", "free", "--device", "cpu", "--dtype", "float32",
                                 "--format", "json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    got = {(r[PROMPT_ID], r[STEP]): r[NORM_BASE] for _, r in _frame(out).iterrows()}
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(PROMPTS):
        image = Image.open(pairs.parent / "refs" / f"{i}.png").convert("RGB").resize((16, 16))
        steps = oracle_norms(pipe, image=image, prompt=[prompt], num_inference_steps=2, height=16, width=16,
                             guidance_scale=2.5, max_sequence_length=24, max_area=16 * 16, _auto_resize=False,
                             output_type="latent", generator=[torch.Generator().manual_seed(0)])
        for step, record in enumerate(steps):
            assert got[(i, step)] == pytest.approx(record["scheduler"][0], rel=2e-5), (i, step)
