"""A non-uniform known answer for every family: a random LoRA, row by row (prompt, step, branch), against the
independent oracle (tests/oracle.py: the plain diffusers call with a norm-recording hook), batch size 3.

normscope reads the LoRA from a saved peft folder and switches it on and off on one transformer; the
oracle runs the plain pipeline twice, without the adapter and with it added in memory by peft. The call
arguments of the oracle are written out here by hand (guidance argument, negative prompt), so the test
also checks which pipeline argument normscope sends ``--guidance`` to.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_factory import randomize_lora
from test_families_known_answers import CASES, PROMPTS, SIZE, measure

from normscope.builders.tiny_families import tiny_reference_image
from normscope.measure.table import BRANCH, MODE, NORM_BASE, NORM_TUNED, PROMPT_ID, STEP
from tests.oracle import oracle_norms

RANK, ALPHA, TARGETS = 4, 8, ["to_q", "to_k", "to_v", "proj_out"]
B = len(PROMPTS)

# How each pipeline lays out its transformer calls, written from the diffusers source, not from normscope's
# table: a list per call of (role, batch slice). "extra" calls (SD3 skip-layer) are not reported.
BATCHED_UNCOND_COND = [[("uncond", slice(0, B)), ("cond", slice(B, 2 * B))], [("extra", slice(0, B))]]
BATCHED_COND_UNCOND = [[("cond", slice(0, B)), ("uncond", slice(B, 2 * B))]]
SEPARATE = [[("cond", slice(0, B))], [("uncond", slice(0, B))]]
ONE_CALL = [[("single", slice(0, B))]]
LAYOUT = {
    "sd3": BATCHED_UNCOND_COND, "sd3-skip-layer": BATCHED_UNCOND_COND, "flux": ONE_CALL, "flux-true-cfg": SEPARATE,
    "flux-kontext": ONE_CALL, "flux2": ONE_CALL, "flux2-klein": ONE_CALL, "flux2-klein-base": SEPARATE,
    "qwen-image": SEPARATE, "z-image": BATCHED_COND_UNCOND, "z-image-capped": BATCHED_COND_UNCOND,
}
# The plain call's arguments besides prompt/generator/steps/size, spelled as the pipelines take them.
ORACLE_CALL = {
    "sd3": dict(guidance_scale=4.5, max_sequence_length=24),
    "sd3-skip-layer": dict(guidance_scale=4.5, max_sequence_length=24, skip_guidance_layers=[0],
                           skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0),
    "flux": dict(guidance_scale=3.5, max_sequence_length=24),
    "flux-true-cfg": dict(guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt=[" "] * B, max_sequence_length=24),
    "flux-kontext": dict(guidance_scale=2.5, max_sequence_length=24, max_area=16 * 16, _auto_resize=False),
    "flux2": dict(guidance_scale=4.0),
    "flux2-klein": dict(guidance_scale=1.0),
    "flux2-klein-base": dict(guidance_scale=4.0),
    "qwen-image": dict(true_cfg_scale=4.0, negative_prompt=[" "] * B),
    "z-image": dict(guidance_scale=4.0),
    "z-image-capped": dict(guidance_scale=4.0, cfg_normalization=0.9),
}
QWEN_SCALE = ZIMAGE_SCALE = 4.0


@pytest.fixture(scope="module")
def folders(pipelines, family_pipelines):
    return lambda key: pipelines[key] if key in pipelines else family_pipelines(key)


def _plain(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_random_lora(folder, seed: int):
    from peft import LoraConfig

    pipe = _plain(folder)
    pipe.transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="gaussian"))
    randomize_lora(pipe.transformer, seed, scale=0.3)
    return pipe


def _save_peft_folder(pipe, folder):
    """What a trainer's peft save writes: adapter_model.safetensors (base_model.model. keys) + adapter_config.json."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = get_peft_model_state_dict(pipe.transformer)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"))
    pipe.transformer.peft_config["default"].save_pretrained(str(folder))
    return folder


def _oracle_rows(pipe, case: str, key: str) -> dict:
    """(branch, prompt_id, step) -> norm, from the plain call."""
    call = dict(prompt=list(PROMPTS), num_inference_steps=SIZE["steps"], height=SIZE["height"], width=SIZE["width"],
                output_type="latent", generator=[torch.Generator().manual_seed(0) for _ in PROMPTS],
                **{k: list(v) if isinstance(v, list) else v for k, v in ORACLE_CALL[case].items()})
    if key == "FluxKontextPipeline":
        call["image"] = [tiny_reference_image(i) for i in range(B)]
    steps = oracle_norms(pipe, keep_outputs=case in ("qwen-image", "z-image-capped"), **call)
    rows = {}
    for step, record in enumerate(steps):
        layout = LAYOUT[case][: len(record["calls_latent"])]
        assert len(record["calls_latent"]) == len(layout) or case == "sd3-skip-layer", record["modules"]
        for call_norms, roles in zip(record["calls_latent"], layout, strict=True):
            for role, part in roles:
                if role not in ("extra", "single"):
                    for i, value in enumerate(call_norms[part]):
                        rows[(role, i, step)] = value
        for i, value in enumerate(record["scheduler"]):
            rows[("guided", i, step)] = value
        if case == "qwen-image":
            cond, uncond = (o[:, : record["scheduler_input"].shape[1]] for o in record["outputs"])
            combined = uncond + QWEN_SCALE * (cond - uncond)
            for i, value in enumerate(combined.flatten(1).norm(dim=1).tolist()):
                rows[("combined", i, step)] = value
        if case == "z-image-capped":  # Z-Image's rule before its cap: cond + w (cond - uncond), per sample
            outputs = record["outputs"][0]
            for i in range(B):
                cond, uncond = outputs[i], outputs[B + i]
                rows[("combined", i, step)] = (cond + ZIMAGE_SCALE * (cond - uncond)).norm().item()
    if case == "sd3-skip-layer":  # the skip-layer call really happened at every step but the first
        assert [len(r["calls"]) for r in steps] == [1, 2]
    return rows


def _check(frame, column: str, expected: dict, steps=None) -> int:
    checked = 0
    for row in frame.itertuples(index=False):
        step = getattr(row, STEP)
        if steps is not None and step not in steps:
            continue
        want = expected[(getattr(row, BRANCH), getattr(row, PROMPT_ID), step)]
        got = getattr(row, column)
        assert got == pytest.approx(want, rel=2e-5), (getattr(row, BRANCH), getattr(row, PROMPT_ID), step, column)
        checked += 1
    return checked


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_lora_row_by_row_against_the_plain_pipeline(case, folders, tmp_path):
    key, probe, extra, branches = CASES[case]
    folder = folders(key)
    tuned_pipe = _with_random_lora(folder, seed=7)
    lora = _save_peft_folder(tuned_pipe, tmp_path / "lora")
    frame = measure(folder, lora, probe, extra, key)

    base_rows = _oracle_rows(_plain(folder), case, key)
    tuned_rows = _oracle_rows(tuned_pipe, case, key)
    assert {b for b, _, _ in base_rows} == branches
    if "combined" in branches:  # the renormalisation / cap changed the norm: combined is not guided
        assert all(abs(base_rows[("combined", i, s)] - base_rows[("guided", i, s)]) > 1e-3
                   for i in range(B) for s in range(SIZE["steps"]))
    free = frame[frame[MODE] == "free"]
    paired = frame[frame[MODE] == "paired"]
    n = len(branches) * B * SIZE["steps"]
    assert _check(free, NORM_BASE, base_rows) == n
    assert _check(free, NORM_TUNED, tuned_rows) == n
    assert _check(paired, NORM_TUNED, tuned_rows) == n  # the tuned model drives: the oracle's own trajectory
    assert _check(paired, NORM_BASE, base_rows, steps={0}) == n // SIZE["steps"]  # same inputs at step 0
    # A LoRA is not a uniform scale: the ratios differ across rows (this oracle could catch a wrong row).
    ratios = (free[NORM_TUNED] / free[NORM_BASE]).to_numpy()
    assert np.ptp(ratios) > 1e-3
