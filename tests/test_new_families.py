"""The models the trainers tune now (issue 19), on tiny real pipelines saved with diffusers' own savers: base vs
itself exactly 0; the output projection x1.1 gives 1.1 at every step and branch in paired mode with CFG really
on (and at the first step of free mode); a random peft LoRA row by row (prompt, step, branch) against the
independent oracle (tests/oracle.py, the plain diffusers call); the prompt-encoding row bit-identical with and
without the cache. Everything runs through ``compare()``, the user's path.

Pipelines: Wan video-to-video (``--video``), HunyuanVideo (embedded guidance + true CFG), Qwen-Image-2.1 (last-N
token slice, per-model KV cache), LTX-2 (video and audio streams, CFG + STG + modality isolation in x0 space with
guidance rescale).
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
from normscope.builders.tiny_new_families import NEW_BUILDERS, NEW_OUTPUT_PROJECTION, save_input_video, tiny_input_video
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
    # the CLI: without --video the run stops before any weight loads (exit 2); with it, it runs
    from typer.testing import CliRunner

    from normscope.cli import app

    runner = CliRunner()
    common = [str(folder), str(folder), "--steps", "4", "--height", "16", "--width", "16", "--max-sequence-length", "16",
              "--seeds", "0", "--prompt", "a red fox", "--device", "cpu", "--format", "json", "--guidance", "4"]
    refused = runner.invoke(app, ["compare", *common])
    assert refused.exit_code == 2 and "--video" in refused.stderr
    ran = runner.invoke(app, ["compare", *common, "--video", str(inputs["video"])])
    assert ran.exit_code == 0, ran.output
    # every ratio is exactly 1 (the API tests above); the one-sample headline estimate rounds to ~1e-8
    assert abs(json.loads(ran.stdout)["inflation"]) < 1e-6
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


# ---------------------------------------------------------------- LTX-2
# Written from diffusers 0.42's LTX2Pipeline, independently of normscope: per step one call on the batch
# [negative, positive] (CFG), one STG call (spatio_temporal_guidance_blocks set) and one modality-isolation call
# (isolate_modalities=True), each returning (video, audio) velocities; each stream is stepped by its own scheduler
# (audio: a deep copy of pipe.scheduler made in the call). Guidance in x0 = x - sigma v, then rescale toward cond.

from normscope.measure.capture import STREAM_SEP  # noqa: E402
from normscope.measure.table import STREAM, free_frame, paired_frame, tidy  # noqa: E402

# stg_blocks: the tiny model has 2 blocks, so the pipeline's default STG block [28] is refused before loading (issue 19)
LTX2_PROBE = dict(guidance=3.0, height=32, width=32, num_frames=5, max_sequence_length=16, steps=2, stg_blocks=(1,))
# STG on block 1 of the tiny model's 2 (the default [28] perturbs nothing there); frame rate as diffusers' tests
LTX2_EXTRA = dict(spatio_temporal_guidance_blocks=[1], frame_rate=25.0)
NO_RESCALE = dict(guidance_rescale=0.0, audio_guidance_rescale=0.0)
STREAMS = ("video", "audio")


@pytest.fixture(scope="module")
def ltx2(tmp_path_factory):
    from normscope.builders.tiny_new_families import tiny_ltx2_pipeline

    return save_tiny(tiny_ltx2_pipeline(seed=0), tmp_path_factory.mktemp("ltx2") / "ltx2")


def ltx2_frame(folder: Path, tuned, extra: dict, modes=("paired", "free")):
    """The tidy frame through normscope's sampling path (the pipeline arguments normscope has no option for added)."""
    from normscope.config import ProbeConfig
    from normscope.load import load_models, load_pipeline
    from normscope.measure.prompts import make_samples
    from normscope.measure.sampling import SilentReporter, run_free, run_paired, sampling_kwargs

    pipe = load_pipeline(str(folder), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(tuned), str(folder))
    probe = ProbeConfig(prompts=PROMPTS, seeds=(0,), device="cpu", dtype="float32", **LTX2_PROBE)
    samples = make_samples(list(PROMPTS), (0,))
    parts = []
    if "paired" in modes:
        call = {**sampling_kwargs(pipe, probe, samples), **extra}
        parts.append(paired_frame(run_paired(pipe, loaded.tuned, loaded.base, call, SilentReporter())["paired"], samples, "tuned"))
    if "free" in modes:
        call = {**sampling_kwargs(pipe, probe, samples), **extra}
        free = run_free(pipe, loaded.base, loaded.tuned, call, SilentReporter())
        parts.append(free_frame(free["base"], free["tuned"], samples))
    return tidy(parts)


def _rescale(guided, cond, r):
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return r * rescaled + (1 - r) * guided


def ltx2_oracle(pipe, extra: dict, rescale=(0.7, 0.7), scales=((3.0, 1.0, 3.0), (7.0, 1.0, 3.0))) -> dict:
    """(stream, branch, prompt_id, step) -> norm from the plain call. Both streams' scheduler steps are recorded by
    patching the scheduler CLASS's ``step`` (the pipeline deep-copies its scheduler for audio: an instance wrapper
    would be copied with it and step the video scheduler twice); the stream is the stepping scheduler's identity."""
    from unittest import mock

    calls, steps = [], []
    cls = type(pipe.scheduler)
    original = cls.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        stream = 0 if self is pipe.scheduler else 1
        index = self.step_index if self.step_index is not None else self.begin_index
        steps.append((stream, model_output.detach().float().clone(), sample.detach().float().clone(),
                      self.sigmas[index].clone()))
        return original(self, model_output, timestep, sample, *args, **kwargs)

    def hook(module, args, kwargs, output):
        role = ("stg" if kwargs.get("spatio_temporal_guidance_blocks") is not None
                else "modality" if kwargs.get("isolate_modalities") else "cfg")
        calls.append((role, [o.detach().float().clone() for o in output]))

    call = dict(prompt=list(PROMPTS), num_inference_steps=LTX2_PROBE["steps"], guidance_scale=LTX2_PROBE["guidance"],
                height=32, width=32, num_frames=5, max_sequence_length=16, output_type="latent",
                generator=[torch.Generator().manual_seed(0) for _ in PROMPTS], **extra)
    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), mock.patch.object(cls, "step", step):
            pipe(**call)
    finally:
        handle.remove()
    assert [r for r, _ in calls] == ["cfg", "stg", "modality"] * LTX2_PROBE["steps"]
    assert [s for s, *_ in steps] == [0, 1] * LTX2_PROBE["steps"]
    rows = {}
    for i in range(LTX2_PROBE["steps"]):
        cfg, stg, mod = (outputs for _, outputs in calls[3 * i: 3 * i + 3])
        for k, stream in enumerate(STREAMS):
            _, applied, x, sigma = steps[2 * i + k]
            uncond, cond = cfg[k][:B], cfg[k][B:]
            w, s_stg, m = scales[k]
            def x0(v, x=x, sigma=sigma):
                return x - v * sigma

            g = x0(cond) + (w - 1) * (x0(cond) - x0(uncond)) + s_stg * (x0(cond) - x0(stg[k])) + (m - 1) * (x0(cond) - x0(mod[k]))
            combined = (x - g) / sigma
            final = (x - _rescale(g, x0(cond), rescale[k])) / sigma if rescale[k] > 0 else combined
            assert torch.allclose(final, applied, rtol=1e-4, atol=1e-5)  # the formula is the pipeline's
            for branch, v in (("guided", applied), ("cond", cond), ("uncond", uncond), ("combined", combined)):
                for p, value in enumerate(v.flatten(1).norm(dim=1).tolist()):
                    rows[(stream, branch, p, i)] = value
    return rows


def _ltx2_scaled(folder: Path, target: Path) -> Path:
    return _scaled(folder, target)


def test_ltx2_base_against_itself_is_exactly_zero_on_both_streams(ltx2):
    result = compare(CompareConfig(tuned=str(ltx2), base=str(ltx2), pipeline=str(ltx2), prompts=PROMPTS, seeds=(0,),
                                   device="cpu", dtype="float32", batch_size=B, mode="both", **LTX2_PROBE))
    frame = result.frame
    assert list(dict.fromkeys(frame[STREAM])) == list(STREAMS)
    assert (frame[RATIO] == 1.0).all()
    assert result.summary["stream"] == "video" and set(result.summary["by_stream"]) == set(STREAMS)
    assert all(v["inflation"] == 0.0 for v in result.summary["by_stream"].values())


def test_ltx2_x1_1_is_exact_on_every_branch_and_stream_with_both_rescales_off(ltx2, tmp_path):
    frame = ltx2_frame(ltx2, _ltx2_scaled(ltx2, tmp_path / "x1.1.safetensors"), {**LTX2_EXTRA, **NO_RESCALE})
    paired = frame[frame[MODE] == "paired"]
    assert set(zip(paired[STREAM], paired[BRANCH], strict=True)) == {(s, b) for s in STREAMS for b in (G, C, U)}
    assert len(paired) == 2 * 3 * B * LTX2_PROBE["steps"]
    assert np.allclose(paired[RATIO], 1.1, rtol=2e-6, atol=0), paired.groupby([STREAM, BRANCH, STEP])[RATIO].agg(["min", "max"])
    first = frame[(frame[MODE] == "free") & (frame[STEP] == 0)]
    assert np.allclose(first[RATIO], 1.1, rtol=2e-6, atol=0)


def test_ltx2_guidance_rescale_keeps_the_raw_branches_at_1_1_but_not_the_applied_velocity(ltx2, tmp_path):
    """With the default rescale (0.7, audio 0.7) every raw branch and the guidance before the rescale (combined)
    is exactly 1.1, the applied velocity is not; and it is what the pipeline applied (the oracle)."""
    frame = ltx2_frame(ltx2, _ltx2_scaled(ltx2, tmp_path / "x1.1.safetensors"), LTX2_EXTRA, modes=("paired",))
    raw = frame[frame[BRANCH] != G]
    assert set(raw[BRANCH]) == {C, U, "combined"}
    assert np.allclose(raw[RATIO], 1.1, rtol=2e-6, atol=0)
    guided = frame[frame[BRANCH] == G]
    assert (np.abs(guided[RATIO] - 1.1) > 1e-4).all()
    assert ((guided[RATIO] > 1.0) & (guided[RATIO] < 1.1)).all()


def check_stream_rows(rows, column, expected, steps=None) -> int:
    """Each row's ``column`` against the oracle's (stream, branch, prompt, step) value (rel 2e-5); how many rows."""
    n = 0
    for row in rows.itertuples(index=False):
        if steps is not None and getattr(row, STEP) not in steps:
            continue
        key = (getattr(row, STREAM), getattr(row, BRANCH), row.prompt_id, getattr(row, STEP))
        assert getattr(row, column) == pytest.approx(expected[key], rel=2e-5), (key, column)
        n += 1
    return n


def test_ltx2_random_lora_row_by_row_on_both_streams_against_the_plain_pipeline(ltx2, tmp_path):
    folder = ltx2
    tuned_pipe = _with_random_lora(folder, seed=7)
    lora = _save_peft_folder(tuned_pipe, tmp_path / "lora")
    frame = ltx2_frame(folder, lora, LTX2_EXTRA)
    base_rows = ltx2_oracle(_plain(folder), LTX2_EXTRA)
    tuned_rows = ltx2_oracle(tuned_pipe, LTX2_EXTRA)
    free, paired = frame[frame[MODE] == "free"], frame[frame[MODE] == "paired"]

    n = 2 * 4 * B * LTX2_PROBE["steps"]  # streams x (guided, cond, uncond, combined) x samples x steps
    assert check_stream_rows(free, NORM_BASE, base_rows) == n
    assert check_stream_rows(free, NORM_TUNED, tuned_rows) == n
    assert check_stream_rows(paired, NORM_TUNED, tuned_rows) == n  # the tuned model drives: the plain pipeline's trajectory
    assert check_stream_rows(paired, NORM_BASE, base_rows, steps={0}) == n // LTX2_PROBE["steps"]
    for stream in STREAMS:
        ratios = (free[free[STREAM] == stream][NORM_TUNED] / free[free[STREAM] == stream][NORM_BASE]).to_numpy()
        assert np.ptp(ratios) > 1e-3, stream


def test_ltx2_prompt_encoding_is_bit_identical_and_compare_reports_each_stream(ltx2, tmp_path):
    tuned = _ltx2_scaled(ltx2, tmp_path / "x1.1.safetensors")
    fields = dict(tuned=str(tuned), base=str(ltx2), pipeline=str(ltx2), prompts=PROMPTS, seeds=(0,), device="cpu",
                  dtype="float32", batch_size=B, mode="both", out=None, **LTX2_PROBE)
    inside = compare(CompareConfig(encode_once=False, **fields))
    cached = compare(CompareConfig(**fields))
    assert cached.frame.equals(inside.frame)
    cache = prepare_prompts(str(ltx2), [list(PROMPTS)], CompareConfig(**fields), torch.float32, "cpu")
    assert cache is not None and cache.encoded == 1
    summary = cached.summary
    video = cached.frame[(cached.frame[STREAM] == "video")]
    assert summary["stream"] == "video" and summary["streams"] == list(STREAMS)
    assert summary["inflation"] == summary["by_stream"]["video"]["inflation"]  # the video stream is the headline
    assert summary["by_stream"]["audio"]["inflation"] != summary["inflation"]
    assert len(cached.profile()) == LTX2_PROBE["steps"] and set(video[BRANCH]) == {G, C, U, "combined"}
    assert STREAM_SEP not in "".join(cached.frame[BRANCH])


def test_ltx2_run_folder_writes_the_stream_column_and_resumes_it(ltx2, tmp_path):
    import pandas as pd

    fields = dict(tuned=str(ltx2), base=str(ltx2), pipeline=str(ltx2), prompts=PROMPTS, seeds=(0,), device="cpu",
                  dtype="float32", batch_size=1, mode="paired", out=tmp_path / "run", **LTX2_PROBE)
    result = compare(CompareConfig(**fields))
    norms = pd.read_csv(tmp_path / "run" / "norms.csv", keep_default_na=False)
    assert list(norms.columns).index(STREAM) == list(norms.columns).index("expert") + 1
    assert set(norms[STREAM]) == set(STREAMS)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["by_stream"]) == set(STREAMS)
    again = compare(CompareConfig(**fields))  # the finished run is read back, streams included
    assert again.frame.equals(result.frame)
    from rich.console import Console

    from normscope.render.terminal import render_compare

    console = Console(record=True, width=200)
    render_compare(result.summary, console)
    text = console.export_text()
    assert "video stream: inflation +0.00 %" in text and "(headline)" in text and "audio stream:" in text
