"""Every refusal of the family table and of capture: one line, the documented exit code, before weights load."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from normscope.cli import app
from normscope.errors import RunError
from normscope.load import VelocityModel, load_pipeline
from normscope.load.families import family_for
from normscope.measure.capture import capture

runner = CliRunner()
PROBE = ["--steps", "2", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0",
         "--prompt", "a red fox", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code: int, *needles) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    text = " ".join(lines)
    assert text.startswith("error:"), text
    for needle in needles:
        assert needle in text, text
    return text


def _copy_with_class(src, dst, pipeline_class=None, transformer_config=None):
    shutil.copytree(src, dst)
    if pipeline_class is not None:
        index = json.loads((dst / "model_index.json").read_text())
        index["_class_name"] = pipeline_class
        (dst / "model_index.json").write_text(json.dumps(index))
    if transformer_config is not None:
        shutil.copy(transformer_config, dst / "transformer" / "config.json")
    return dst


def test_unknown_pipeline_class_lists_the_families(pipelines, tmp_path, no_weight_loads):
    folder = _copy_with_class(pipelines["sd3"], tmp_path / "p", pipeline_class="StableDiffusionXLPipeline")
    text = one_line(run("compare", folder / "transformer", *PROBE, "--pipeline", folder), 2,
                    "no family row for pipeline class StableDiffusionXLPipeline", "sd3 (StableDiffusion3Pipeline)",
                    "qwen-image (QwenImagePipeline)", "z-image (ZImagePipeline)")
    assert "not in the installed diffusers" not in text


def test_class_absent_from_diffusers_is_named_as_such(pipelines, tmp_path, no_weight_loads):
    folder = _copy_with_class(pipelines["sd3"], tmp_path / "p", pipeline_class="HunyuanImage9Pipeline")
    one_line(run("compare", folder / "transformer", *PROBE, "--pipeline", folder), 2,
             "HunyuanImage9Pipeline is not in the installed diffusers", "flux2-klein (Flux2KleinPipeline)")


def test_transformer_of_another_family_is_refused_before_loading(pipelines, tmp_path, no_weight_loads):
    # TUNED: a FLUX transformer folder (config.json + weights) against the SD3 pipeline.
    tuned = tmp_path / "flux-transformer"
    shutil.copytree(pipelines["flux"] / "transformer", tuned)
    one_line(run("compare", pipelines["sd3"], tuned, *PROBE), 2,
             "TUNED", "FluxTransformer2DModel (a flux, flux-kontext transformer)", "the pipeline is sd3",
             "SD3Transformer2DModel")


def test_pipeline_folder_whose_transformer_is_of_another_family(pipelines, tmp_path, no_weight_loads):
    folder = _copy_with_class(pipelines["sd3"], tmp_path / "p",
                              transformer_config=pipelines["flux"] / "transformer" / "config.json")
    one_line(run("compare", folder / "transformer", *PROBE, "--pipeline", folder), 2,
             "FluxTransformer2DModel", "the pipeline is sd3")


@pytest.mark.parametrize("command", ["compare", "profile", "check"])
def test_preset_of_another_family_is_refused_before_loading(command, pipelines, scaled, tmp_path, no_weight_loads):
    args = {"compare": ["compare", pipelines["sd3"], scaled("sd3", 1.1)],
            "profile": ["profile", pipelines["sd3"], "--out", tmp_path / "ref"],
            "check": ["check", pipelines["sd3"], scaled("sd3", 1.1), "--max-inflation", "0.05"]}[command]
    one_line(run(*args, *PROBE, "--preset", "flow_grpo-qwen-image"), 2,
             "--preset flow_grpo-qwen-image is for qwen-image pipelines", "the pipeline is sd3", "flow_grpo-sd3.5m")


def test_unknown_preset_names_the_presets_command(pipelines, scaled):
    one_line(run("compare", pipelines["sd3"], scaled("sd3", 1.1), *PROBE, "--preset", "nope"), 2,
             "unknown --preset 'nope'", "normscope presets")


def test_true_cfg_scale_on_a_family_without_it(pipelines, scaled):
    one_line(run("compare", pipelines["sd3"], scaled("sd3", 1.1), *PROBE, "--true-cfg-scale", "4"), 2,
             "the sd3 family has no separate true CFG option: drop --true-cfg-scale")


# ---------------------------------------------------------------- capture refusals


def _sd3_call(pipe, **extra):
    return dict(prompt=["a red fox", "two green apples"], num_inference_steps=2, height=16, width=16,
                max_sequence_length=24, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **extra)


def test_a_wrong_cfg_rule_is_refused_at_the_first_step(pipelines):
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    model = VelocityModel("base", pipe.transformer, "p", "pipeline")
    wrong = dataclasses.replace(family_for("StableDiffusion3Pipeline"), combine="zimage")
    steps = []
    with pytest.raises(RunError, match=r"combines its transformer calls differently from the zimage rule .* at step 0"):
        with capture(pipe, model, model, on_step=lambda: steps.append(1), family=wrong) as _:
            pipe(**_sd3_call(pipe, guidance_scale=4.5))
    assert steps == []
    assert "step" not in vars(pipe.scheduler) and not pipe.transformer._forward_hooks


def test_a_wrong_sign_without_cfg_is_refused(pipelines):
    pipe = load_pipeline(str(pipelines["flux"]), torch.float32, "cpu")
    model = VelocityModel("base", pipe.transformer, "p", "pipeline")
    negated = dataclasses.replace(family_for("FluxPipeline"), output_sign=-1)
    call = dict(_sd3_call(pipe), guidance_scale=3.5)
    with pytest.raises(RunError, match=r"does not pass the negated transformer output to its scheduler"):
        with capture(pipe, model, family=negated):
            pipe(**call)


def test_an_unexpected_call_layout_is_refused(pipelines):
    """A second call of batch B that the row does not mark as an extra call: refused, not guessed."""
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    model = VelocityModel("base", pipe.transformer, "p", "pipeline")
    row = dataclasses.replace(family_for("StableDiffusion3Pipeline"), extra_call_kwarg=None)
    with pytest.raises(RunError, match=r"called the transformer 2 time\(s\) in one step with batches of 4, 2"):
        with capture(pipe, model, family=row):
            pipe(**_sd3_call(pipe, guidance_scale=4.5, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
                           skip_layer_guidance_stop=1.0))


def test_nan_is_found_before_the_rule_check(pipelines):
    """A NaN driver never reaches the formula check: the step is recorded, the check waits for finite values."""
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    with torch.no_grad():
        pipe.transformer.proj_out.bias[0] = float("nan")
    model = VelocityModel("base", pipe.transformer, "p", "pipeline")
    with capture(pipe, model) as recorder:
        pipe(**_sd3_call(pipe, guidance_scale=4.5))
        record = recorder.collect()
    assert torch.isnan(record.stats["guided"]).all()


# ---------------------------------------------------------------- the scheduler wrapper is restored exactly


def test_scheduler_step_is_restored_exactly(pipelines):
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    model = VelocityModel("base", pipe.transformer, "p", "pipeline")
    scheduler = pipe.scheduler
    with capture(pipe, model):
        assert scheduler.step.__wrapped__ == type(scheduler).step.__get__(scheduler)
        assert scheduler.step.__name__ == "step"
    assert "step" not in vars(scheduler)

    def own_step(*args, **kwargs):  # a user's (or another tool's) wrapper already on the instance
        return type(scheduler).step(scheduler, *args, **kwargs)

    scheduler.step = own_step
    with capture(pipe, model):
        assert scheduler.step.__wrapped__ is own_step
    assert vars(scheduler)["step"] is own_step


def test_torch_forward_hooks_compose_with_forward_wrappers_where_the_diffusers_registry_does_not():
    """Why capture uses register_forward_hook (see the capture module docstring)."""
    from accelerate.hooks import ModelHook as AccelerateHook
    from accelerate.hooks import add_hook_to_module
    from diffusers.hooks import HookRegistry, ModelHook

    seen: list[str] = []

    class Offload(AccelerateHook):  # stands in for enable_model_cpu_offload's hook (it replaces forward too)
        def post_forward(self, module, output):
            seen.append("offload")
            return output

    class Named(ModelHook):
        def post_forward(self, module, output):
            seen.append("normscope")
            return output

    module = torch.nn.Linear(2, 2)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(Named(), "normscope")
    add_hook_to_module(module, Offload())
    registry.remove_hook("normscope")
    module(torch.zeros(1, 2))
    assert seen == []  # removing the named hook silently dropped the offload wrapper installed after it

    module = torch.nn.Linear(2, 2)
    handle = module.register_forward_hook(lambda m, a, o: seen.append("normscope"))
    add_hook_to_module(module, Offload())
    module(torch.zeros(1, 2))
    handle.remove()
    module(torch.zeros(1, 2))
    assert seen == ["offload", "normscope", "offload"]


def test_capture_composes_with_diffusers_offloading(pipelines):
    """Group offloading and enable_model_cpu_offload wrap forward; capture's numbers do not change (CPU devices)."""
    def guided(pipe):
        model = VelocityModel("base", pipe.transformer, "p", "pipeline")
        with capture(pipe, model) as recorder:
            pipe(**_sd3_call(pipe, guidance_scale=4.5))
            return recorder.collect().stats["guided"]

    plain = guided(load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu"))
    grouped = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    grouped.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                             offload_type="block_level", num_blocks_per_group=1)
    assert torch.equal(guided(grouped), plain)
    offloaded = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    offloaded.enable_model_cpu_offload(device="cpu")
    assert torch.equal(guided(offloaded), plain)
    assert hasattr(offloaded.transformer, "_hf_hook") and not offloaded.transformer._forward_hooks
