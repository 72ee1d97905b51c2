"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (issue 19): tiny offline pipelines (their Qwen2VLProcessor built from
transformers' PIL classes, no torchvision: normscope.load.qwen_processor) and the oracle tests every family row
has: base against itself exactly 0, the output projection x1.1 exactly +10 % at every step and branch, and a
random peft LoRA row by row against tests/oracle.py (the plain diffusers call with a norm-recording hook).

Both pipelines call the transformer twice per step (cond, then uncond), concatenate the condition image's tokens
after the latent tokens and slice them off, and renormalise the CFG combination to the cond norm token by token.
Edit-Plus samples one prompt per call (diffusers raises for more), so it runs with --batch-size 1.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_factory import randomize_lora
from safetensors.torch import load_file, save_file

from normscope.builders.tiny_families import load_qwen_edit_pipeline, tiny_reference_image
from normscope.commands.compare import compare
from normscope.config import CompareConfig
from normscope.measure.table import BRANCH, MODE, NORM_BASE, NORM_TUNED, PROMPT_ID, RATIO, STEP
from tests.oracle import oracle_norms

PROMPTS = ("a red fox in snow", "two green apples")
STEPS, PX, SCALE = 2, 32, 4.0
CLASSES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")
BRANCHES = {"guided", "cond", "uncond", "combined"}


@pytest.fixture(scope="module")
def family_pipelines(tmp_path_factory):
    """cls -> a saved tiny edit pipeline folder (built on first use, diffusers' own savers)."""
    from normscope.builders.tiny import save_tiny
    from normscope.builders.tiny_families import EDIT_BUILDERS

    root = tmp_path_factory.mktemp("edit_pipelines")
    cache = {}

    def folder(cls: str):
        if cls not in cache:
            cache[cls] = save_tiny(EDIT_BUILDERS[cls](seed=0), root / cls)
        return cache[cls]

    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("edit-image") / "ref.png"
    tiny_reference_image(5, size=24).save(path)
    return path


def _measure(folder, tuned, image, cls: str, mode: str = "both"):
    batch = 1 if cls == "QwenImageEditPlusPipeline" else 2
    return compare(CompareConfig(base=str(folder), tuned=str(tuned), pipeline=str(folder), prompts=PROMPTS, seeds=(0,),
                                 steps=STEPS, height=PX, width=PX, guidance=SCALE, image=image, device="cpu",
                                 dtype="float32", batch_size=batch, mode=mode))


@pytest.mark.parametrize("cls", CLASSES)
def test_the_tiny_edit_pipeline_loads_offline_without_torchvision(cls, family_pipelines):
    folder = family_pipelines(cls)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == cls and index["processor"] == ["transformers", "Qwen2VLProcessor"]
    pipe = load_qwen_edit_pipeline(folder, local_files_only=True)
    assert type(pipe.processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"


@pytest.mark.parametrize("cls", CLASSES)
def test_base_against_itself_is_exactly_zero_and_x1_1_is_plus_10_percent(cls, family_pipelines, image, tmp_path):
    folder = family_pipelines(cls)
    same = _measure(folder, folder, image, cls).frame
    assert (same[RATIO] == 1.0).all()
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    scaled = tmp_path / "x1.1.safetensors"
    save_file({k: (v * 1.1 if k.startswith("proj_out.") else v).contiguous() for k, v in state.items()}, str(scaled))
    frame = _measure(folder, scaled, image, cls).frame
    assert set(frame[BRANCH]) == BRANCHES
    paired = frame[frame[MODE] == "paired"]
    assert len(paired) == len(BRANCHES) * len(PROMPTS) * STEPS
    assert np.allclose(paired[RATIO], 1.1, rtol=2e-6, atol=0), paired.groupby([BRANCH, STEP])[RATIO].agg(["min", "max"])
    first = frame[(frame[MODE] == "free") & (frame[STEP] == 0)]
    assert np.allclose(first[RATIO], 1.1, rtol=2e-6, atol=0)


def _oracle_rows(pipe, image_path, cls: str) -> dict:
    """(branch, prompt_id, step) -> norm of the plain call: Edit with the batch normscope used (one image per
    prompt), Edit-Plus one prompt per call (it takes no more)."""
    from PIL import Image

    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
    groups = [[0, 1]] if cls == "QwenImageEditPipeline" else [[0], [1]]
    rows = {}
    for ids in groups:
        steps = oracle_norms(pipe, keep_outputs=True, image=[image] * len(ids), prompt=[PROMPTS[i] for i in ids],
                             negative_prompt=[" "] * len(ids), true_cfg_scale=SCALE, num_inference_steps=STEPS,
                             height=PX, width=PX, output_type="latent",
                             generator=[torch.Generator().manual_seed(0) for _ in ids])
        for step, record in enumerate(steps):
            cond, uncond = record["calls_latent"]  # cond first, then uncond; reference tokens sliced off
            n = record["scheduler_input"].shape[1]
            c, u = (o[:, :n] for o in record["outputs"])
            combined = (u + SCALE * (c - u)).flatten(1).norm(dim=1).tolist()
            for j, i in enumerate(ids):
                rows[("cond", i, step)], rows[("uncond", i, step)] = cond[j], uncond[j]
                rows[("guided", i, step)] = record["scheduler"][j]
                rows[("combined", i, step)] = combined[j]
    return rows


@pytest.mark.parametrize("cls", CLASSES)
def test_random_lora_row_by_row_against_the_plain_pipeline(cls, family_pipelines, image, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = family_pipelines(cls)
    tuned = load_qwen_edit_pipeline(folder, local_files_only=True)
    tuned.set_progress_bar_config(disable=True)
    tuned.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "proj_out"],
                                             init_lora_weights="gaussian"))
    randomize_lora(tuned.transformer, 9, scale=0.3)
    lora = tmp_path / "lora"
    lora.mkdir()
    state = get_peft_model_state_dict(tuned.transformer)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(lora / "adapter_model.safetensors"))
    tuned.transformer.peft_config["default"].save_pretrained(str(lora))

    frame = _measure(folder, lora, image, cls, mode="free").frame
    base = load_qwen_edit_pipeline(folder, local_files_only=True)
    base.set_progress_bar_config(disable=True)
    want_base, want_tuned = _oracle_rows(base, image, cls), _oracle_rows(tuned, image, cls)
    free = frame[frame[MODE] == "free"]
    assert len(free) == len(want_base)
    for row in free.itertuples(index=False):
        key = (getattr(row, BRANCH), getattr(row, PROMPT_ID), getattr(row, STEP))
        assert getattr(row, NORM_BASE) == pytest.approx(want_base[key], rel=2e-5), key
        assert getattr(row, NORM_TUNED) == pytest.approx(want_tuned[key], rel=2e-5), key
    ratios = (free[NORM_TUNED] / free[NORM_BASE]).to_numpy()
    assert np.ptp(ratios) > 1e-3  # a LoRA is not a uniform scale: this could catch a wrong row
