"""Real-size runs on one device: prompts encoded once, offload that holds one transformer, LoRA sweeps that
never reload, and a device-memory check that refuses with the options that fit."""

from __future__ import annotations

import dataclasses
import json
import weakref

import pytest
import torch
from diffusers import SD3Transformer2DModel
from reporters import KeptNotes
from transformers import T5EncoderModel
from typer.testing import CliRunner

from normscope.cli import app
from normscope.commands.compare import compare
from normscope.commands.sweep import SweepConfig, sweep
from normscope.config import CompareConfig
from normscope.load import load_models, load_pipeline
from normscope.load.device_memory import DeviceMemoryError, footprint
from normscope.measure.prompt_cache import CACHE_DIR, prepare_prompts
from normscope.measure.prompts import make_samples
from normscope.measure.sampling import prompt_batches
from tests.lora_factory import save_peft_folder

runner = CliRunner()


# ---------------------------------------------------------------- prompts encoded once


@pytest.mark.parametrize("arch, mode", [("sd3", "both"), ("flux", "paired")])
def test_encoding_once_gives_bit_identical_norms(config_for, scaled, arch, mode):
    """The embeddings the cache passes are exactly what the pipeline computes inside its own call (SD3 with CFG)."""
    inside = compare(config_for(arch, scaled(arch, 1.1), mode=mode, batch_size=4, encode_once=False))
    cached = compare(config_for(arch, scaled(arch, 1.1), mode=mode, batch_size=4))
    assert cached.frame.equals(inside.frame)
    assert inside.inflation != 0.0


@pytest.mark.parametrize("key, probe", [("QwenImagePipeline", dict(guidance=4.0)), ("Flux2Pipeline", dict(guidance=4.0))])
def test_encoding_once_is_bit_identical_for_qwen_image_and_flux2(family_pipelines, key, probe):
    folder = str(family_pipelines(key))
    fields = dict(tuned=folder, pipeline=folder, prompts=("a red fox in snow", "two green apples"), seeds=(0,),
                  steps=2, height=16, width=16, device="cpu", dtype="float32", batch_size=2, mode="both", **probe)
    inside = compare(CompareConfig(encode_once=False, **fields))
    cached = compare(CompareConfig(**fields))
    assert cached.frame.equals(inside.frame)
    cache = prepare_prompts(folder, [list(fields["prompts"])], CompareConfig(**fields), torch.float32, "cpu")
    assert cache is not None and cache.encoded == 1  # the cached run really ran on embeddings


def test_sampling_pipeline_needs_no_text_encoder_and_the_disk_cache_is_reused(pipelines, scaled, config_for, tmp_path):
    source = str(pipelines["sd3"])
    denoiser = load_pipeline(source, torch.float32, "cpu", parts="denoiser")
    assert denoiser.text_encoder is None and denoiser.text_encoder_3 is None
    config = config_for("sd3", scaled("sd3", 1.1), batch_size=4, out=tmp_path / "run")
    result = compare(config, pipe=denoiser)
    reference = compare(config_for("sd3", scaled("sd3", 1.1), batch_size=4, encode_once=False))
    assert result.frame.equals(reference.frame)
    assert next(denoiser.transformer.parameters()).device.type == "cpu"  # handed back as it came

    samples = make_samples(list(config.prompts), config.seeds)
    batches = prompt_batches(samples, 4)  # 6 samples: batches of 4 and 2
    stored = sorted((tmp_path / "run" / CACHE_DIR).glob("*.safetensors"))
    assert len(stored) == len(batches) == 2
    again = prepare_prompts(source, batches, config, torch.float32, "cpu", tmp_path / "run" / CACHE_DIR)
    assert (again.encoded, again.from_disk) == (0, 2)
    shorter = dataclasses.replace(config, max_sequence_length=16)
    other = prepare_prompts(source, batches, shorter, torch.float32, "cpu", tmp_path / "run" / CACHE_DIR)
    assert other.encoded == 2  # another sequence length is another embedding


# ---------------------------------------------------------------- offload


def test_offload_keeps_at_most_one_transformer_on_the_device(config_for, scaled):
    """Parked weights are on ``meta``: before and after every transformer forward of a paired and a free run,
    count the transformers whose weights are anywhere else (on the execution device)."""
    seen: weakref.WeakSet = weakref.WeakSet()
    distinct: set[int] = set()
    before, after = [], []

    def resident():
        return [m for m in seen if any(p.device.type != "meta" for p in m.parameters())]

    def pre(module, args):
        if isinstance(module, SD3Transformer2DModel):
            seen.add(module)
            distinct.add(id(module))
            before.append(len(resident()))

    def post(module, args, output):
        if isinstance(module, SD3Transformer2DModel):
            after.append(resident() == [module])  # it computed on the device, alone

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post)]
    try:
        offloaded = compare(config_for("sd3", scaled("sd3", 1.1), mode="both", offload=True, steps=3))
    finally:
        for handle in handles:
            handle.remove()
    plain = compare(config_for("sd3", scaled("sd3", 1.1), mode="both", steps=3))
    assert len(distinct) == 2
    # paired: 2 forwards per step; free: 1 per step per model; one batch of 6 samples
    assert len(after) == 3 * 2 + 3 * 2
    assert all(after) and max(before) == 1
    assert offloaded.frame.equals(plain.frame)


def test_offload_copies_once_per_model_per_step_paired_and_per_batch_free(pipelines, scaled):
    from normscope.measure.sampling import SilentReporter, run_free, run_paired, sampling_kwargs
    from tests.conftest import PROBE, PROMPTS, make_config

    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(scaled("sd3", 1.1)), str(pipelines["sd3"]), offload_to="cpu")
    config = make_config(pipelines, "sd3", scaled("sd3", 1.1))
    kwargs = sampling_kwargs(pipe, config, make_samples(list(PROMPTS), (0,)))
    slot = loaded.base.slot
    start = slot.loads
    run_paired(pipe, loaded.tuned, loaded.base, kwargs, SilentReporter())
    paired = slot.loads - start
    slot.release()  # as a new batch finds it after the other model of the last step
    run_free(pipe, loaded.base, loaded.tuned, kwargs, SilentReporter())
    free = slot.loads - start - paired
    steps = PROBE["sd3"]["steps"]
    assert paired == 2 * steps  # the driver came back once per step, the other model went once per step
    assert free == 2


# ---------------------------------------------------------------- sweeps of LoRA checkpoints


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-run")
    for step in (100, 200, 300, 400):
        save_peft_folder(root / f"checkpoint-{step}" / "lora", extra=None, seed=step)
    return root


class Counted:
    """A pass-through wrapper that counts real calls (the loader and the model still do their work)."""

    def __init__(self, monkeypatch, owner, name: str, classmethod_: bool = False) -> None:
        self.calls = 0
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(lambda cls, *a, **k: counted(*a, **k)) if classmethod_ else counted)


SWEEP_PROBE = dict(prompts=("a red fox", "two apples", "a blue car"), seeds=(0,), steps=3, height=16, width=16,
                   max_sequence_length=24, guidance=4.5, device="cpu", dtype="float32")


@pytest.mark.parametrize("mode", ["free", "paired"])
def test_lora_sweep_loads_once_and_swaps_adapters_cleanly(lora_run, pipelines, config_for, tmp_path, monkeypatch, mode):
    transformer_loads = Counted(monkeypatch, SD3Transformer2DModel, "from_pretrained", classmethod_=True)
    encoder_loads = Counted(monkeypatch, T5EncoderModel, "from_pretrained", classmethod_=True)
    forwards = Counted(monkeypatch, SD3Transformer2DModel, "forward")
    config = SweepConfig(run_dir=lora_run, out=tmp_path / "sweep", pipeline=str(pipelines["sd3"]), mode=mode,
                         **SWEEP_PROBE)
    table = sweep(config)
    assert transformer_loads.calls == 1 and encoder_loads.calls == 1
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["pipeline_loads"] == 1
    sweep_forwards = forwards.calls

    # The last checkpoint, after three swaps, measures what a compare of it alone measures.
    last = lora_run / "checkpoint-400" / "lora"
    fields = {k: v for k, v in SWEEP_PROBE.items()}
    alone = compare(config_for("sd3", last, base=None, mode=mode, **fields))
    assert table["inflation"].iloc[-1] == pytest.approx(alone.inflation, abs=1e-12)
    one_compare = forwards.calls - sweep_forwards
    if mode == "free":  # the base runs once, each checkpoint once: (N + 1) / (2N) of N separate compares
        assert sweep_forwards / (4 * one_compare) == (4 + 1) / (2 * 4)
    else:  # paired: the base must follow each checkpoint's trajectory; only the loading is saved
        assert sweep_forwards == 4 * one_compare


# ---------------------------------------------------------------- device memory


def test_budget_check_refuses_with_the_options_that_fit(pipelines, scaled, config_for):
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu", parts="denoiser")
    args = dict(adapter_params=0, batch=8, guidance=4.5, height=16, width=16, max_sequence_length=24)
    two = footprint(pipe, transformers=2, offload_possible=True, **args)
    one = footprint(pipe, transformers=1, offload_possible=False, **args)
    between = (one.total + two.total) // 2
    with pytest.raises(DeviceMemoryError) as refused:
        compare(config_for("sd3", scaled("sd3", 1.1), max_device_memory=str(between)))
    message = str(refused.value)
    assert "--offload" in message and "\n" not in message and refused.value.exit_code == 3
    assert compare(config_for("sd3", scaled("sd3", 1.1), max_device_memory=str(between), offload=True)).inflation > 0


def test_cli_budget_too_small_and_bad_size(pipelines, scaled, tmp_path):
    base, tuned = str(pipelines["sd3"]), str(scaled("sd3", 1.1))
    probe = ["--steps", "2", "--height", "16", "--width", "16", "--device", "cpu", "--seeds", "0"]
    result = runner.invoke(app, ["compare", base, tuned, *probe, "--max-device-memory", "1KiB"])
    assert result.exit_code == 3, result.output
    assert "no option fits" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["compare", base, tuned, *probe, "--max-device-memory", "lots"])
    assert result.exit_code == 2 and "--max-device-memory" in result.output


def test_out_of_memory_during_a_run_is_one_line_and_keeps_finished_batches(config_for, scaled, tmp_path):
    """A real torch.OutOfMemoryError, raised from a forward hook on the second batch (a CPU cannot run out)."""
    calls = {"n": 0}

    def exhaust(module, args):
        if isinstance(module, SD3Transformer2DModel):
            calls["n"] += 1
            if calls["n"] > 4:  # batch 1: 2 steps x (driver + other); the fifth forward is batch 2
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    config = config_for("sd3", scaled("sd3", 1.1), batch_size=3, steps=2, out=tmp_path)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(exhaust)
    reporter = KeptNotes()  # keeps the notes (the kept-batches line among them)
    try:
        with pytest.raises(DeviceMemoryError) as failed:
            compare(config, reporter)
    finally:
        handle.remove()
    message = str(failed.value)
    assert failed.value.exit_code == 3 and "--batch-size 1" in message
    assert len(list((tmp_path / ".partial").glob("paired-*.safetensors"))) == 1
    assert f"1 finished batch(es) are kept in {tmp_path}: rerun the same command to resume" in reporter.notes


# The rows added after issue 12: each run on embeddings gives exactly the norms of the pipeline encoding inside its
# call (CFG on where the family has it; klein base encodes its "" negatives per batch, Z-Image passes lists).
MORE_ENCODINGS = {
    "ZImagePipeline": dict(guidance=4.0, height=16, width=16),
    "Flux2KleinPipeline": dict(guidance=1.0, height=16, width=16, max_sequence_length=64),
    "Flux2KleinPipeline-base": dict(guidance=4.0, height=16, width=16, max_sequence_length=64),
    "FluxKontextPipeline": dict(guidance=2.5, true_cfg_scale=2.0, height=16, width=16, max_sequence_length=24),
    "wan22-unipc": None,  # VIDEO_PROBE: two experts, guidance_scale_2
}


@pytest.mark.parametrize("key", sorted(MORE_ENCODINGS))
def test_encoding_once_is_bit_identical_for_wan_z_image_klein_and_kontext(family_pipelines, video_pipelines, key,
                                                                         tmp_path):
    from video_factory import VIDEO_PROBE

    probe = MORE_ENCODINGS[key]
    if key == "FluxKontextPipeline":  # Kontext edits an image: one is required (issue 19)
        from normscope.builders.tiny_families import tiny_reference_image

        tiny_reference_image(0).save(tmp_path / "ref.png")
        probe = {**probe, "image": tmp_path / "ref.png"}
    folder = str(video_pipelines[key] if probe is None else family_pipelines(key))
    fields = dict(tuned=folder, pipeline=folder, prompts=("a red fox in snow", "two green apples"), seeds=(0,),
                  device="cpu", dtype="float32", batch_size=2, mode="both",
                  **{**(probe if probe is not None else VIDEO_PROBE), "steps": 2})
    inside = compare(CompareConfig(encode_once=False, **fields))
    cached = compare(CompareConfig(**fields))
    assert cached.frame.equals(inside.frame)
    assert len(inside.frame) > 0
    cache = prepare_prompts(folder, [list(fields["prompts"])], CompareConfig(**fields), torch.float32, "cpu")
    assert cache is not None and cache.encoded == 1  # the cached run really ran on embeddings


def test_profile_stored_check_and_free_sweep_refuse_a_tiny_budget_in_one_line(pipelines, scaled, tmp_path):
    """The same estimate as compare's guards the one-transformer jobs: refused before anything runs, exit 3."""
    import shutil

    base, tuned = str(pipelines["sd3"]), str(scaled("sd3", 1.1))
    probe = ["--steps", "2", "--height", "16", "--width", "16", "--max-sequence-length", "24", "--device", "cpu",
             "--seeds", "0", "--prompt", "a red fox"]
    ref = tmp_path / "ref"
    jobs = {
        "profile": ["profile", base, "--out", str(ref), "--no-dtype-check", *probe],
        "check": ["check", tuned, "--reference", str(ref), "--device", "cpu"],
    }
    result = runner.invoke(app, [*jobs["profile"], "--max-device-memory", "1KiB"])
    assert result.exit_code == 3, result.output
    assert not (ref / "reference.json").exists()  # refused before the run
    assert runner.invoke(app, jobs["profile"]).exit_code == 0
    shutil.copytree(pipelines["sd3"] / "transformer", tmp_path / "run" / "checkpoint-10" / "transformer")
    jobs["sweep"] = ["sweep", str(tmp_path / "run"), "--out", str(tmp_path / "sweep"), "--pipeline", base, *probe]
    for name, args in jobs.items():
        result = runner.invoke(app, [*args, "--max-device-memory", "1KiB"])
        assert result.exit_code == 3, (name, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "0.00 GiB available" in lines[0] and "Traceback" not in result.output, result.output
        assert "larger device" in lines[0]
    assert runner.invoke(app, jobs["check"]).exit_code in (0, 1)  # the same command runs with no budget set
