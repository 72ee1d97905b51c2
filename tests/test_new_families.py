"""The models the trainers tune now (issue 19), on tiny real pipelines saved with diffusers' own savers: base vs
itself exactly 0; the output projection x1.1 gives 1.1 at every step and branch in paired mode with CFG really
on (and at the first step of free mode); a random peft LoRA row by row (prompt, step, branch) against the
independent oracle (tests/oracle.py, the plain diffusers call); the prompt-encoding row bit-identical with and
without the cache. Everything runs through ``compare()``, the user's path.

Pipelines: Wan video-to-video (``--video``), HunyuanVideo (embedded guidance + true CFG), Qwen-Image-2.1 (last-N
token slice, per-model KV cache).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_families_oracle import _check, _plain, _save_peft_folder, _with_random_lora

from normscope.builders.tiny import save_tiny
from normscope.builders.tiny_new_families import NEW_BUILDERS, NEW_CALL, NEW_OUTPUT_PROJECTION, save_input_video, tiny_input_video
from normscope.commands.compare import compare
from normscope.config import CompareConfig
from normscope.errors import InputError
from normscope.measure.prompt_cache import prepare_prompts
from normscope.measure.table import BRANCH, MODE, NORM_BASE, NORM_TUNED, RATIO, STEP
from tests.oracle import oracle_norms

PROMPTS = ("a red fox in snow", "two green apples")
B = len(PROMPTS)
G, C, U = "guided", "cond", "uncond"
SEPARATE = [[(C, slice(0, B))], [(U, slice(0, B))]]  # cond call, then uncond call (written from the diffusers source)


def _video_inputs(root: Path) -> dict:
    return {"video": save_input_video(tiny_input_video(0), root / "input-video")}


# case -> pipeline key, compare options, oracle call arguments (besides prompt/generator/steps/output_type),
# the calls of one step, the branches reported, steps requested and steps the pipeline runs, input maker
CASES = {
    "wan-v2v": dict(
        key="WanVideoToVideoPipeline", steps=4, runs=3,  # strength 0.75 of 4 steps
        probe=dict(guidance=4.0, height=16, width=16, max_sequence_length=16),
        oracle=dict(guidance_scale=4.0, height=16, width=16, max_sequence_length=16),
        layout=SEPARATE, branches={G, C, U}, inputs=_video_inputs,
    ),
    "hunyuan-video": dict(
        key="HunyuanVideoPipeline", steps=2, runs=2,
        probe=dict(guidance=6.0, true_cfg_scale=4.0, height=16, width=16, num_frames=5, max_sequence_length=16),
        # normscope passes the negative prompt " " for true CFG > 1, as for FLUX.1 (written out here by hand)
        oracle=dict(guidance_scale=6.0, true_cfg_scale=4.0, negative_prompt=[" "] * B, height=16, width=16,
                    num_frames=5, max_sequence_length=16),
        layout=SEPARATE, branches={G, C, U}, inputs=lambda root: {},
    ),
    "qwen-image-2.1": dict(
        key="QwenImage21Pipeline", steps=3, runs=3, last_tokens=True,  # the pipeline keeps the LAST N tokens
        probe=dict(guidance=4.0, height=32, width=32),  # --guidance is true_cfg_scale; normscope adds " "
        oracle=dict(true_cfg_scale=4.0, negative_prompt=[" "] * B, height=32, width=32),
        layout=SEPARATE, branches={G, C, U}, inputs=lambda root: {},
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("new-families")
    cache: dict[str, tuple[Path, dict]] = {}

    def make(case: str) -> tuple[Path, dict]:
        if case not in cache:
            spec = CASES[case]
            folder = save_tiny(NEW_BUILDERS[spec["key"]](seed=0), root / case)
            cache[case] = folder, spec["inputs"](root / f"{case}-inputs")
        return cache[case]

    return make


def _scaled(folder: Path, target: Path) -> Path:
    cls = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
    keys = NEW_OUTPUT_PROJECTION[cls]
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(k in state for k in keys)
    save_file({k: (v * 1.1 if k in keys else v).contiguous() for k, v in state.items()}, str(target))
    return target


def run(case: str, built, tuned, **overrides):
    folder, inputs = built(case)
    spec = CASES[case]
    fields = dict(tuned=str(tuned), base=str(folder), pipeline=str(folder), prompts=PROMPTS, seeds=(0,), device="cpu",
                  dtype="float32", batch_size=B, steps=spec["steps"], mode="both", **spec["probe"],
                  **{k: v for k, v in inputs.items()})
    fields.update(overrides)
    return compare(CompareConfig(**fields))


def _oracle_call(case: str, inputs: dict) -> dict:
    spec = CASES[case]
    call = dict(prompt=list(PROMPTS), num_inference_steps=spec["steps"], output_type="latent",
                generator=[torch.Generator().manual_seed(0) for _ in PROMPTS], **spec["oracle"])
    if "video" in inputs:
        from normscope.measure.sampling import read_video  # reads the folder back as the user's run does

        call["video"] = [read_video(inputs["video"]) for _ in PROMPTS]
    return call


def _oracle_rows(pipe, case: str, inputs: dict) -> dict:
    """(branch, prompt_id, step) -> norm, from the plain call."""
    spec = CASES[case]
    steps = oracle_norms(pipe, keep_outputs=spec.get("last_tokens", False), **_oracle_call(case, inputs))
    assert len(steps) == spec["runs"]
    rows = {}
    for step, record in enumerate(steps):
        assert len(record["calls_latent"]) == len(spec["layout"]), record["modules"]
        per_call = record["calls_latent"]
        if spec.get("last_tokens"):  # output[:, -N:], N the scheduler's tokens (the prefill returns the text too)
            n = record["scheduler_input"].shape[1]
            per_call = [o[:, -n:].flatten(1).norm(dim=1).tolist() for o in record["outputs"]]
        for call_norms, roles in zip(per_call, spec["layout"], strict=True):
            for role, part in roles:
                for i, value in enumerate(call_norms[part]):
                    rows[(role, i, step)] = value
        for i, value in enumerate(record["scheduler"]):
            rows[(G, i, step)] = value
    return rows


@pytest.mark.parametrize("case", sorted(CASES))
def test_base_against_itself_is_exactly_zero(case, built):
    folder, _ = built(case)
    result = run(case, built, folder)
    assert set(result.frame[BRANCH]) == CASES[case]["branches"]
    assert (result.frame[RATIO] == 1.0).all()
    assert result.inflation == 0.0


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_projection_x1_1_is_exactly_1_1_on_every_step_and_branch(case, built, tmp_path):
    folder, _ = built(case)
    spec = CASES[case]
    frame = run(case, built, _scaled(folder, tmp_path / "x1.1.safetensors")).frame
    assert set(frame[BRANCH]) == spec["branches"]
    paired = frame[frame[MODE] == "paired"]
    assert len(paired) == len(spec["branches"]) * B * spec["runs"]  # CFG really on: cond and uncond every step
    assert np.allclose(paired[RATIO], 1.1, rtol=2e-6, atol=0), paired.groupby([BRANCH, STEP])[RATIO].agg(["min", "max"])
    first = frame[(frame[MODE] == "free") & (frame[STEP] == 0)]
    assert set(first[BRANCH]) == spec["branches"]
    assert np.allclose(first[RATIO], 1.1, rtol=2e-6, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_random_lora_row_by_row_against_the_plain_pipeline(case, built, tmp_path):
    folder, inputs = built(case)
    spec = CASES[case]
    tuned_pipe = _with_random_lora(folder, seed=7)
    lora = _save_peft_folder(tuned_pipe, tmp_path / "lora")
    frame = run(case, built, lora).frame
    base_rows = _oracle_rows(_plain(folder), case, inputs)
    tuned_rows = _oracle_rows(tuned_pipe, case, inputs)
    assert {b for b, _, _ in base_rows} == spec["branches"]
    free, paired = frame[frame[MODE] == "free"], frame[frame[MODE] == "paired"]
    n = len(spec["branches"]) * B * spec["runs"]
    assert _check(free, NORM_BASE, base_rows) == n
    assert _check(free, NORM_TUNED, tuned_rows) == n
    assert _check(paired, NORM_TUNED, tuned_rows) == n  # the tuned model drives: the oracle's own trajectory
    assert _check(paired, NORM_BASE, base_rows, steps={0}) == n // spec["runs"]  # same inputs at step 0
    ratios = (free[NORM_TUNED] / free[NORM_BASE]).to_numpy()
    assert np.ptp(ratios) > 1e-3  # a LoRA is not a uniform scale


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_encoding_row_is_bit_identical_with_and_without_the_cache(case, built, tmp_path):
    folder, inputs = built(case)
    tuned = _scaled(folder, tmp_path / "x1.1.safetensors")
    inside = run(case, built, tuned, encode_once=False)
    cached = run(case, built, tuned)
    assert cached.frame.equals(inside.frame)
    assert inside.inflation != 0.0
    config = CompareConfig(tuned=str(tuned), pipeline=str(folder), prompts=PROMPTS, seeds=(0,), device="cpu",
                           dtype="float32", batch_size=B, steps=CASES[case]["steps"], **CASES[case]["probe"], **inputs)
    cache = prepare_prompts(str(folder), [list(PROMPTS)], config, torch.float32, "cpu")
    assert cache is not None and cache.encoded == 1  # the cached run really ran on embeddings


# ---------------------------------------------------------------- Wan video to video


def test_wan_v2v_needs_a_video_before_loading_and_reports_the_steps_it_ran(built, tmp_path):
    folder, inputs = built("wan-v2v")
    with pytest.raises(InputError, match="--video"):
        run("wan-v2v", built, folder, video=None)
    frame = run("wan-v2v", built, folder).frame
    # strength 0.75 of 4 steps: the pipeline skips the first timestep; sigma is the scheduler's sigma of each step run
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler.set_timesteps(4)
    sigmas = pipe.scheduler.sigmas[1:4].double().numpy()
    got = frame[(frame[MODE] == "paired") & (frame[BRANCH] == G) & (frame["prompt_id"] == 0)].sort_values(STEP)
    assert np.allclose(got["sigma"].to_numpy(), sigmas, rtol=1e-6)
    # an animated file is read frame by frame like a folder of frames
    from normscope.measure.sampling import read_video

    webp = save_input_video(tiny_input_video(0), tmp_path / "input.webp")
    assert [np.asarray(f).tolist() for f in read_video(webp)] == [np.asarray(f).tolist() for f in read_video(inputs["video"])]


# ---------------------------------------------------------------- HunyuanVideo


def test_hunyuan_video_embedded_guidance_alone_is_one_call_and_reaches_the_transformer(built, tmp_path):
    """Without true CFG the step is one call (guided only); --guidance is the embedded guidance, a transformer input."""
    folder, _ = built("hunyuan-video")
    result = run("hunyuan-video", built, _scaled(folder, tmp_path / "x1.1.safetensors"), true_cfg_scale=None)
    assert set(result.frame[BRANCH]) == {G}
    paired = result.frame[result.frame[MODE] == "paired"]
    assert np.allclose(paired[RATIO], 1.1, rtol=2e-6, atol=0)
    summary = result.summary["config"]["resolved"]
    assert summary["family"] == "hunyuan-video" and summary["guidance"] == 6.0
    seen = []
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    handle = pipe.transformer.register_forward_hook(lambda m, a, k, o: seen.append(float(k["guidance"][0])), with_kwargs=True)
    try:
        oracle_norms(pipe, prompt=["a red fox"], num_inference_steps=1, output_type="latent", guidance_scale=6.0,
                     height=16, width=16, num_frames=5, max_sequence_length=16)
    finally:
        handle.remove()
    assert seen == [6000.0]  # the pipeline embeds guidance * 1000 (one call: no CFG batch)


def test_hunyuan_video_prompt_template_is_cropped_where_the_tiny_tokenizer_puts_it(built):
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    folder, _ = built("hunyuan-video")
    tokenizer = DiffusionPipeline.from_pretrained(str(folder)).tokenizer
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    # the real Llama-3 tokenizer: 95 (crop_start); the tiny one keeps one template token, reloaded the same
    assert len(tokenizer(prefix)["input_ids"]) == DEFAULT_PROMPT_TEMPLATE["crop_start"] + 1


# ---------------------------------------------------------------- Qwen-Image-2.1


def test_qwen_image21_paired_mode_gives_each_model_its_own_kv_cache(built, tmp_path):
    """With the KV cache on, the first step prefills the text prefix and later steps read it. In paired mode the
    base is evaluated on the tuned model's inputs: it must read ITS OWN prefix, and the tuned model must never read
    the base's. Independent paired oracle: the tuned plain pipeline drives; a hook evaluates the base plain
    pipeline's transformer on each call's inputs with its own caches (one per cache object the pipeline passes)."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    folder, inputs = built("qwen-image-2.1")
    tuned_pipe = _with_random_lora(folder, seed=7)
    lora = _save_peft_folder(tuned_pipe, tmp_path / "lora")
    base = _plain(folder)
    own: dict[int, QwenImage21KVCache] = {}
    other: list[list[float]] = []
    prefill: list[int] = []

    def evaluate_base(module, args, kwargs, output):
        kwargs = dict(kwargs)
        cache = kwargs.get("kv_cache")
        assert cache is not None  # the cache is really on
        kwargs["kv_cache"] = own.setdefault(id(cache), QwenImage21KVCache(len(base.transformer.transformer_blocks)))
        with torch.no_grad():
            out = base.transformer(*args, **kwargs)[0]
        prefill.append(out.shape[1])
        other.append(out[:, -4:].float().flatten(1).norm(dim=1).tolist())  # 32x32 px: 2x2 latent tokens

    handle = tuned_pipe.transformer.register_forward_hook(evaluate_base, with_kwargs=True)
    try:
        driven = oracle_norms(tuned_pipe, keep_outputs=True, **_oracle_call("qwen-image-2.1", inputs))
    finally:
        handle.remove()
    assert prefill[0] > 4 and prefill[-1] == 4  # step 0 returns the text tokens as well; later steps only the image's
    frame = run("qwen-image-2.1", built, lora, mode="paired").frame
    rows = frame.set_index([BRANCH, "prompt_id", STEP])
    for step, record in enumerate(driven):
        n = record["scheduler_input"].shape[1]
        cond, uncond = (o[:, -n:].flatten(1).norm(dim=1).tolist() for o in record["outputs"])
        for i in range(B):
            assert rows.loc[(C, i, step), NORM_TUNED] == pytest.approx(cond[i], rel=2e-5)
            assert rows.loc[(U, i, step), NORM_TUNED] == pytest.approx(uncond[i], rel=2e-5)
            assert rows.loc[(G, i, step), NORM_TUNED] == pytest.approx(record["scheduler"][i], rel=2e-5)
            assert rows.loc[(C, i, step), NORM_BASE] == pytest.approx(other[2 * step][i], rel=2e-5)
            assert rows.loc[(U, i, step), NORM_BASE] == pytest.approx(other[2 * step + 1][i], rel=2e-5)


def test_qwen_image21_guidance_is_true_cfg_without_renormalisation(built, tmp_path):
    """--guidance goes to true_cfg_scale with the negative prompt " "; guided = neg + w (cond - neg), no per-token
    renormalisation (so no ``combined`` branch), and without guidance one call per step."""
    folder, _ = built("qwen-image-2.1")
    result = run("qwen-image-2.1", built, folder, mode="paired")
    resolved = result.summary["config"]["resolved"]
    assert resolved["guidance_argument"] == "true_cfg_scale" and resolved["guidance"] == 4.0
    by = result.frame.set_index([BRANCH, "prompt_id", STEP])["norm_base"]
    assert not np.allclose(by[G].to_numpy(), by[C].to_numpy(), rtol=1e-3)  # not renormalised to ||cond||
    single = run("qwen-image-2.1", built, _scaled(folder, tmp_path / "x1.1.safetensors"), guidance=1.0, mode="paired")
    assert set(single.frame[BRANCH]) == {G}
    assert np.allclose(single.frame[RATIO], 1.1, rtol=2e-6, atol=0)
