"""Known answers on tiny real Wan pipelines: 2.1 (one transformer) and 2.2 A14B (two experts), each with
FlowMatchEuler and with the UniPC multistep solver in flow mode, loaded from disk the way a user's are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from video_factory import VIDEO_ARCHS, VIDEO_PROBE, expert_state, flow_factory_checkpoint, fuse, save_two_expert_lora

from normscope.commands.compare import compare
from normscope.config import CompareConfig
from normscope.measure.table import BRANCH, EXPERT, MODE, RATIO, SEED, STEP
from tests.oracle import oracle_norms

PROMPTS = ("a red fox in snow", "two green apples")
SEEDS = (0, 1)
EXPERTS = {"wan21": ("transformer",), "wan22": ("transformer", "transformer_2")}


def config(video_pipelines, arch: str, tuned, **overrides) -> CompareConfig:
    pipe = video_pipelines[arch]
    fields = dict(tuned=str(tuned), pipeline=str(pipe), prompts=PROMPTS, seeds=SEEDS, device="cpu", dtype="float32",
                  batch_size=8, **VIDEO_PROBE)
    fields.update(overrides)
    return CompareConfig(**fields)


@pytest.fixture(scope="module")
def scaled_ckpt(video_pipelines, tmp_path_factory):
    """scaled_ckpt(arch, experts) -> a Flow-Factory checkpoint folder with those experts' proj_out x1.1."""
    root = tmp_path_factory.mktemp("video-ckpt")
    cache: dict = {}

    def make(arch: str, experts: tuple[str, ...]):
        key = (arch, experts)
        if key not in cache:
            folder = root / f"{arch}-{'-'.join(experts)}" / "checkpoint-10"
            cache[key] = flow_factory_checkpoint(video_pipelines[arch], folder, {e: 1.1 for e in experts})
        return cache[key]

    return make


@pytest.mark.parametrize("batch_size", [8, 1])
@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_base_against_itself_is_exactly_zero(arch, video_pipelines, batch_size):
    """Also with one sample per call, where CPU kernels are most sensitive to how the two copies of the weights sit
    in memory (the pipeline's transformer loaded by diffusers from a memory-mapped file, the other made by
    normscope): before ``load.pipeline.realign`` this was 1e-7 off on Wan."""
    result = compare(config(video_pipelines, arch, video_pipelines[arch], base=str(video_pipelines[arch]), mode="both",
                            batch_size=batch_size))
    assert result.inflation == 0.0
    assert (result.frame[RATIO] == 1.0).all()
    assert (result.frames[RATIO] == 1.0).all()
    experts = set(result.frame[EXPERT])
    assert experts == ({"high_noise", "low_noise"} if arch.startswith("wan22") else {""})


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_output_projection_x1_1_is_plus_ten_percent_everywhere(arch, video_pipelines, scaled_ckpt):
    result = compare(config(video_pipelines, arch, scaled_ckpt(arch, EXPERTS[arch.split("-")[0]]), mode="both"))
    frame = result.frame
    assert set(frame[BRANCH]) == {"guided", "cond", "uncond"}
    paired, free = frame[frame[MODE] == "paired"], frame[frame[MODE] == "free"]
    # paired: the velocity field itself is scaled, at every step, branch, sample and latent frame
    assert np.allclose(paired[RATIO], 1.1, rtol=1e-5, atol=0)
    assert result.inflation == pytest.approx(0.1, abs=1e-5)
    frames = result.frames
    assert set(frames["frame"]) == {0, 1}
    assert np.allclose(frames[frames[MODE] == "paired"][RATIO], 1.1, rtol=1e-5, atol=0)
    # free: same noise, so the first step sees the scaled field exactly, on every branch and frame; then each
    # model follows its own trajectory (the multistep solver and the expert switch included) and they part
    assert np.allclose(free[free[STEP] == 0][RATIO], 1.1, rtol=1e-5, atol=0)
    assert np.allclose(frames[(frames[MODE] == "free") & (frames[STEP] == 0)][RATIO], 1.1, rtol=1e-5, atol=0)
    assert not np.allclose(free[RATIO], 1.1, rtol=1e-5, atol=0)


def test_base_driving_sees_the_same_scaled_field(video_pipelines, scaled_ckpt):
    result = compare(config(video_pipelines, "wan22-unipc", scaled_ckpt("wan22-unipc", EXPERTS["wan22"]), drive="base"))
    assert np.allclose(result.frame[RATIO], 1.1, rtol=1e-5, atol=0)
    assert set(result.frame[EXPERT]) == {"high_noise", "low_noise"}


def test_per_frame_norms_combine_to_the_whole_norm(video_pipelines, scaled_ckpt):
    result = compare(config(video_pipelines, "wan22-unipc", scaled_ckpt("wan22-unipc", ("transformer",))))
    keys = [MODE, "prompt_id", SEED, STEP, BRANCH]
    for column in ("norm_base", "norm_tuned"):
        combined = result.frames.groupby(keys)[column].apply(lambda s: float(np.sqrt((s ** 2).sum())))
        whole = result.frame.set_index(keys)[column]
        assert np.allclose(combined.sort_index(), whole.sort_index().loc[combined.sort_index().index], rtol=1e-5)


@pytest.mark.parametrize("arch", ["wan22-euler", "wan22-unipc"])
def test_only_the_low_noise_expert_changed(arch, video_pipelines, scaled_ckpt):
    result = compare(config(video_pipelines, arch, scaled_ckpt(arch, ("transformer_2",)), mode="both"))
    frame = result.frame
    high, low = frame[frame[EXPERT] == "high_noise"], frame[frame[EXPERT] == "low_noise"]
    assert len(high) and len(low)
    # the high-noise expert is the base's own module: exactly 0, in both modes (free mode has not diverged yet)
    assert (high[RATIO] == 1.0).all()
    paired_low = low[low[MODE] == "paired"]
    assert np.allclose(paired_low[RATIO], 1.1, rtol=1e-5, atol=0)
    # steps are ordered noise -> data: every high-noise step comes before every low-noise step
    assert high[STEP].max() < low[STEP].min()
    assert any("does not change transformer:" in note for note in result.summary["notes"])
    by_expert = result.summary["by_expert"]
    assert by_expert["high_noise"]["inflation"] == 0.0
    assert by_expert["low_noise"]["inflation"] == pytest.approx(0.1, abs=1e-5)


def _oracle_call(pipe, batch_prompts, batch_seeds) -> dict:
    return dict(prompt=list(batch_prompts), num_inference_steps=VIDEO_PROBE["steps"], guidance_scale=VIDEO_PROBE["guidance"],
                height=VIDEO_PROBE["height"], width=VIDEO_PROBE["width"], num_frames=VIDEO_PROBE["num_frames"],
                max_sequence_length=VIDEO_PROBE["max_sequence_length"], output_type="latent",
                generator=[torch.Generator("cpu").manual_seed(s) for s in batch_seeds])


def _rows(steps: list[dict]) -> dict[str, np.ndarray]:
    """Oracle steps -> (samples, steps) arrays per branch; Wan calls cond first, then uncond."""
    return {
        "guided": np.array([s["scheduler"] for s in steps]).T,
        "cond": np.array([s["calls"][0] for s in steps]).T,
        "uncond": np.array([s["calls"][1] for s in steps]).T,
    }


def _matrix(frame, mode: str, branch: str, column: str) -> np.ndarray:
    rows = frame[(frame[MODE] == mode) & (frame[BRANCH] == branch)]
    return rows.pivot_table(index=["prompt_id", SEED], columns=STEP, values=column).to_numpy()


@pytest.mark.parametrize("arch", ["wan22-unipc"])
def test_random_two_expert_lora_matches_the_plain_pipeline_row_by_row(arch, video_pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    folder = video_pipelines[arch]
    base = DiffusionPipeline.from_pretrained(str(folder)).to("cpu")
    base.set_progress_bar_config(disable=True)
    lora_path, layers = save_two_expert_lora(base, tmp_path / "pytorch_lora_weights.safetensors")
    # The independent tuned model: the LoRA fused into the weights by hand, in a second plain pipeline.
    tuned = DiffusionPipeline.from_pretrained(str(folder)).to("cpu")
    tuned.set_progress_bar_config(disable=True)
    for expert in ("transformer", "transformer_2"):
        getattr(tuned, expert).load_state_dict(fuse(expert_state(folder, expert), layers[expert]))

    prompts = [p for p in PROMPTS for _ in SEEDS]
    seeds = [s for _ in PROMPTS for s in SEEDS]
    expected = {"base": _rows(oracle_norms(base, **_oracle_call(base, prompts, seeds))),
                "tuned": _rows(oracle_norms(tuned, **_oracle_call(tuned, prompts, seeds)))}

    # paired oracle: the tuned pipeline drives; the base experts are evaluated on each call's own inputs
    other_norms: list[torch.Tensor] = []

    def evaluate_base(expert):
        def hook(module, args, kwargs, output):
            with torch.no_grad():
                out = getattr(base, expert)(*args, **kwargs)[0]
            other_norms.append(out.float().flatten(1).norm(dim=1))
        return hook

    handles = [getattr(tuned, e).register_forward_hook(evaluate_base(e), with_kwargs=True) for e in ("transformer", "transformer_2")]
    try:
        driven = _rows(oracle_norms(tuned, keep_outputs=True, **_oracle_call(tuned, prompts, seeds)))
    finally:
        for handle in handles:
            handle.remove()
    other = torch.stack(other_norms).view(VIDEO_PROBE["steps"], 2, len(prompts))  # (steps, [cond, uncond], samples)

    result = compare(config(video_pipelines, arch, lora_path, mode="both", batch_size=3))
    frame = result.frame
    assert abs(result.inflation) > 0.01  # the LoRA does something
    for branch in ("guided", "cond", "uncond"):
        assert np.allclose(_matrix(frame, "free", branch, "norm_base"), expected["base"][branch], rtol=1e-4), branch
        assert np.allclose(_matrix(frame, "free", branch, "norm_tuned"), expected["tuned"][branch], rtol=1e-4), branch
        assert np.allclose(_matrix(frame, "paired", branch, "norm_tuned"), driven[branch], rtol=1e-4), branch
    assert np.allclose(_matrix(frame, "paired", "cond", "norm_base"), other[:, 0].T.numpy(), rtol=1e-4)
    assert np.allclose(_matrix(frame, "paired", "uncond", "norm_base"), other[:, 1].T.numpy(), rtol=1e-4)
    # both experts ran in the plain pipeline, and normscope labels the same steps
    modules = [s["modules"][0] for s in oracle_norms(base, **_oracle_call(base, prompts[:1], seeds[:1]))]
    labels = {"transformer": "high_noise", "transformer_2": "low_noise"}
    paired = frame[(frame[MODE] == "paired") & (frame[BRANCH] == "guided") & (frame["prompt_id"] == 0) & (frame[SEED] == 0)]
    assert list(paired.sort_values(STEP)[EXPERT]) == [labels[m] for m in modules]
    assert set(modules) == {"transformer", "transformer_2"}


@pytest.fixture(scope="module")
def more_video(tmp_path_factory):
    from video_factory import MORE_VIDEO, build_more, first_frame

    root = tmp_path_factory.mktemp("more-video")
    return {name: build_more(name, root / name) for name in MORE_VIDEO}, first_frame(root / "first.png")


@pytest.mark.parametrize("name", ["ti2v", "i2v21", "i2v22", "ti2v-image"])
def test_ti2v_and_image_to_video_pipelines(name, more_video, tmp_path):
    pipelines, image = more_video
    folder = pipelines[name]
    two = name == "i2v22"
    extra = {} if name == "ti2v" else {"image": image}
    fields = dict(pipeline=str(folder), prompts=PROMPTS, seeds=(0,), device="cpu", dtype="float32", **VIDEO_PROBE, **extra)
    same = compare(CompareConfig(tuned=str(folder), base=str(folder), mode="both", **fields))
    assert same.inflation == 0.0 and (same.frame[RATIO] == 1.0).all()
    experts = ("transformer", "transformer_2") if two else ("transformer",)
    tuned = flow_factory_checkpoint(folder, tmp_path / "checkpoint-10", {e: 1.1 for e in experts})
    result = compare(CompareConfig(tuned=str(tuned), **fields))
    assert np.allclose(result.frame[RATIO], 1.1, rtol=1e-5, atol=0)
    assert np.allclose(result.frames[RATIO], 1.1, rtol=1e-5, atol=0)
    assert set(result.frame[EXPERT]) == ({"high_noise", "low_noise"} if two else {""})
    assert set(result.frame[BRANCH]) == {"guided", "cond", "uncond"}
