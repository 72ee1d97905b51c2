"""The checkpoint forms the RL trainers of the newer families write, produced with the real savers.

flow_grpo's FSDP ``checkpoint-N/model.safetensors`` (the whole peft-wrapped model), Pref-GRPO's bare
``adapter_model.safetensors`` + ``lora_config.json``, DanceGRPO's single-file transformer folder and
Flow-Factory's sharded bf16 ``save_pretrained``. Known answer: the LoRA read from each form gives the same
velocity norms as the same LoRA read from a peft folder; the norms are taken by the independent oracle
(the plain pipeline call with a recording hook), with normscope doing only the loading.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, scaled_state_dict
from safetensors.torch import save_file
from typer.testing import CliRunner

from normscope.builders.tiny_families import OUTPUT_PROJECTION, TINY_CALL, tiny_qwen_image_pipeline
from normscope.cli import app
from normscope.commands.compare import compare
from normscope.config import CompareConfig
from normscope.errors import CheckpointError
from normscope.load import find_checkpoint, load_models, load_pipeline
from tests.oracle import oracle_norms

runner = CliRunner()
QWEN = "QwenImagePipeline"
RANK, ALPHA = 4, 8  # scale 2: a LoRA read without its alpha runs at half strength
QWEN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "img_mlp.net.2", "proj_out"]
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]


def lora_config(targets):
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="gaussian")


def randomize(module, seed: int, scale: float = 0.1) -> None:
    """peft starts lora_B at zero; seeded weights make the adapter do something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if "lora_" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))


def wrapped(transformer, targets, seed: int = 7):
    """get_peft_model, as flow_grpo does before FSDP-wrapping the transformer."""
    from peft import get_peft_model

    model = get_peft_model(transformer, lora_config(targets))
    randomize(model, seed)
    return model


def write_forms(root: Path, transformer, targets) -> dict[str, Path]:
    """The same LoRA in every form, each with the saver its trainer uses."""
    from peft.utils import get_peft_model_state_dict

    plain = copy.deepcopy(transformer)
    model = wrapped(transformer, targets)
    made = {"peft": root / "peft"}
    model.save_pretrained(str(made["peft"]))  # the reference: adapter_config.json + adapter_model.safetensors
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # flow_grpo FSDP: save_file(model.state_dict()) of the peft-wrapped model, no adapter_config.json
    fsdp = root / "checkpoint-100"
    fsdp.mkdir()
    save_file(state, str(fsdp / "model.safetensors"))
    (fsdp / "optimizer.pt").write_bytes(b"not read")
    made["fsdp"] = fsdp
    # ... and the same through FSDP/activation-checkpoint wrappers that left their infixes in the keys
    infixed = root / "infixed"
    infixed.mkdir()
    save_file({k.replace("transformer_blocks.0.", "transformer_blocks.0._fsdp_wrapped_module."): v
               for k, v in state.items()}, str(infixed / "model.safetensors"))
    made["fsdp_infixed"] = infixed / "model.safetensors"
    # the LoRA entries of the wrapped model's state_dict() alone ({k: v for k in state if "lora" in k}), seen in
    # hand-written trainer savers: adapter-named keys, no frozen weights
    save_file({k: v for k, v in state.items() if "lora_" in k}, str(root / "lora_only.safetensors"))
    made["lora_only"] = root / "lora_only.safetensors"
    # Pref-GRPO: save_file(get_peft_model_state_dict(...)) + its own lora_config.json, no adapter_config.json
    pref = root / "lora-checkpoint-100-1"
    pref.mkdir()
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
              str(pref / "adapter_model.safetensors"))
    (pref / "lora_config.json").write_text(json.dumps(
        {"step": 100, "lora_params": {"lora_rank": RANK, "lora_alpha": ALPHA, "target_modules": targets}}))
    made["pref"] = pref
    # Pref-GRPO's own FastVideo code adds the LoRA with transformer.add_adapter: keys without base_model.model.
    plain.add_adapter(lora_config(targets))
    randomize(plain, 7)  # same sorted order of LoRA parameters -> the very same weights as `model`
    fastvideo = root / "fastvideo-checkpoint"
    fastvideo.mkdir()
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(plain).items()},
              str(fastvideo / "adapter_model.safetensors"))
    (fastvideo / "lora_config.json").write_text(json.dumps(
        {"step": 100, "lora_params": {"lora_rank": RANK, "lora_alpha": ALPHA, "target_modules": None}}))
    made["pref_add_adapter"] = fastvideo
    bare = root / "bare"
    bare.mkdir()
    shutil.copy(pref / "adapter_model.safetensors", bare / "adapter_model.safetensors")
    made["bare"] = bare
    return made


@pytest.fixture(scope="module")
def qwen_forms(family_pipelines, tmp_path_factory):
    from diffusers import QwenImageTransformer2DModel

    folder = family_pipelines(QWEN)
    transformer = QwenImageTransformer2DModel.from_pretrained(str(folder / "transformer")).eval()
    return write_forms(tmp_path_factory.mktemp("qwen_forms"), transformer, QWEN_TARGETS)


def qwen_call(seeds=(0, 1, 2)) -> dict:
    return dict(prompt=list(PROMPTS[: len(seeds)]), num_inference_steps=2, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds], **TINY_CALL[QWEN])


def tuned_norms(folder: Path, tuned: Path, **load) -> tuple[list[dict], list[str]]:
    """Load TUNED with normscope, then run the plain pipeline with it on and record norms independently."""
    pipe = load_pipeline(str(folder), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(tuned), str(folder), **load)
    with loaded.tuned.active(pipe):
        return oracle_norms(pipe, **qwen_call()), loaded.notes


def flat(steps: list[dict]) -> torch.Tensor:
    return torch.tensor([v for step in steps for norms in step["calls"] + [step["scheduler"]] for v in norms])


def test_each_form_is_named(qwen_forms):
    expected = {
        "peft": ("peft", "peft adapter folder"),
        "fsdp": ("peft_wrapped", "flow_grpo FSDP"),
        "fsdp_infixed": ("peft_wrapped", "flow_grpo FSDP"),
        "pref": ("peft", "lora_config.json (Pref-GRPO)"),
        "bare": ("peft", "without adapter_config.json"),
        "pref_add_adapter": ("diffusers_lora", "bare adapter_model.safetensors + lora_config.json (Pref-GRPO)"),
        "lora_only": ("peft_wrapped", "no frozen weights"),
    }
    for name, (kind, words) in expected.items():
        ckpt = find_checkpoint(qwen_forms[name], "TUNED")
        assert ckpt.kind == kind and words in ckpt.form, (name, ckpt.kind, ckpt.form)
    assert find_checkpoint(qwen_forms["fsdp"], "TUNED").adapter == "model"  # the member taken in checkpoint-N/


def test_fsdp_and_pref_grpo_forms_give_the_peft_folders_norms(qwen_forms, family_pipelines):
    folder = family_pipelines(QWEN)
    reference, _ = tuned_norms(folder, qwen_forms["peft"])
    base = oracle_norms(load_pipeline(str(folder), torch.float32, "cpu"), **qwen_call())
    assert not torch.allclose(flat(reference), flat(base), rtol=1e-3)  # the LoRA does something
    for name in ("pref", "pref_add_adapter"):
        norms, notes = tuned_norms(folder, qwen_forms[name])
        assert torch.allclose(flat(norms), flat(reference), rtol=1e-5, atol=0), name
        assert any("alpha 8 from lora_config.json" in n for n in notes), notes
    # FSDP wrapper infixes in the keys, or the frozen weights left out, change nothing
    plain, infixed, lora_only = (flat(tuned_norms(folder, qwen_forms[name])[0])
                                 for name in ("fsdp", "fsdp_infixed", "lora_only"))
    assert torch.equal(plain, infixed) and torch.equal(plain, lora_only)


def test_fsdp_without_config_assumes_alpha_equal_rank_and_says_so(qwen_forms, family_pipelines, tmp_path):
    folder = family_pipelines(QWEN)
    norms, notes = tuned_norms(folder, qwen_forms["fsdp"])
    assert any("scale 1.0 assumed (alpha = rank 4)" in n for n in notes), notes
    # alpha = rank runs the LoRA at half its trained strength: the same as a peft folder saying alpha 4
    half = tmp_path / "half"
    shutil.copytree(qwen_forms["peft"], half)
    config = json.loads((half / "adapter_config.json").read_text())
    (half / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": RANK}))
    assert torch.allclose(flat(norms), flat(tuned_norms(folder, half)[0]), rtol=1e-5, atol=0)
    # with the trainer's adapter_config.json copied beside it, the trained alpha is used
    beside = tmp_path / "beside"
    beside.mkdir()
    shutil.copy(qwen_forms["fsdp"] / "model.safetensors", beside / "model.safetensors")
    shutil.copy(qwen_forms["peft"] / "adapter_config.json", beside / "adapter_config.json")
    full, notes = tuned_norms(folder, beside)
    assert any("from adapter_config.json beside it" in n for n in notes), notes
    assert torch.allclose(flat(full), flat(tuned_norms(folder, qwen_forms["peft"])[0]), rtol=1e-5, atol=0)


def test_pref_grpo_config_with_empty_or_wrong_values(qwen_forms, tmp_path):
    """Pref-GRPO writes getattr(transformer.config, "lora_alpha", None): often null. Null -> assumed, said;
    a rank that contradicts the tensors -> refused."""
    from normscope.load.lora import read_lora

    folder = tmp_path / "pref"
    shutil.copytree(qwen_forms["pref"], folder)
    sidecar = folder / "lora_config.json"
    sidecar.write_text(json.dumps({"step": 1, "lora_params": {"lora_rank": None, "lora_alpha": None}}))
    weights = read_lora(find_checkpoint(folder, "TUNED"), None)
    assert not weights.alpha_known and any("scale 1.0 assumed" in n for n in weights.notes)
    sidecar.write_text(json.dumps({"step": 1, "lora_params": {"lora_rank": 16, "lora_alpha": 32}}))
    with pytest.raises(CheckpointError, match="says rank 16 but the weights in adapter_model.safetensors have rank 4"):
        read_lora(find_checkpoint(folder, "TUNED"), None)


def test_fsdp_lora_from_another_base_is_refused(family_pipelines, tmp_path):
    folder = family_pipelines(QWEN)
    other = tiny_qwen_image_pipeline(seed=5).transformer  # same shapes, other weights
    model = wrapped(other, QWEN_TARGETS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    pipe = load_pipeline(str(folder), torch.float32, "cpu")
    with pytest.raises(CheckpointError, match=r"not trained on this pipeline's transformer: \d+ of \d+ frozen weights differ"):
        load_models(pipe, None, str(tmp_path / "model.safetensors"), str(folder))


def test_bf16_fsdp_checkpoint_of_a_float32_base_is_accepted(family_pipelines, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    folder = family_pipelines(QWEN)
    model = wrapped(QwenImageTransformer2DModel.from_pretrained(str(folder / "transformer")).eval(), QWEN_TARGETS)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    norms, _ = tuned_norms(folder, tmp_path / "model.safetensors")
    assert torch.isfinite(flat(norms)).all()


def test_fsdp_full_fine_tune_without_lora_keys_loads_as_full_weights(family_pipelines, tmp_path):
    """flow_grpo's model.safetensors of a full fine-tune: output projection x1.1 -> every output x1.1."""
    folder = family_pipelines(QWEN)
    run = tmp_path / "checkpoint-7"
    run.mkdir()
    save_file(scaled_state_dict(folder, 1.1, OUTPUT_PROJECTION["QwenImageTransformer2DModel"]),
              str(run / "model.safetensors"))
    ckpt = find_checkpoint(run, "TUNED")
    assert ckpt.kind == "state_dict" and "full fine-tune" in ckpt.form
    tuned, _ = tuned_norms(folder, run)
    base = oracle_norms(load_pipeline(str(folder), torch.float32, "cpu"), **qwen_call())
    ratio = torch.tensor(tuned[0]["calls"][0]) / torch.tensor(base[0]["calls"][0])
    assert torch.allclose(ratio, torch.full_like(ratio, 1.1), rtol=1e-5)


def test_dancegrpo_single_file_and_flow_factory_sharded_bf16_folders(family_pipelines, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    folder = family_pipelines(QWEN)
    transformer = QwenImageTransformer2DModel.from_pretrained(str(folder / "transformer")).eval()
    with torch.no_grad():
        transformer.proj_out.weight.mul_(1.1)
        transformer.proj_out.bias.mul_(1.1)
    transformer.save_pretrained(tmp_path / "dancegrpo")  # diffusion_pytorch_model.safetensors + config.json
    transformer.to(torch.bfloat16).save_pretrained(tmp_path / "flow_factory", max_shard_size="50KB")
    assert len(list((tmp_path / "flow_factory").glob("*.safetensors"))) > 1
    base = oracle_norms(load_pipeline(str(folder), torch.float32, "cpu"), **qwen_call())
    for name, rtol in (("dancegrpo", 1e-5), ("flow_factory", 2e-2)):  # bf16 weights: 1.1 to bf16 precision
        ckpt = find_checkpoint(tmp_path / name, "TUNED")
        assert ckpt.kind == "transformer"
        assert ("shards" in ckpt.form) == (name == "flow_factory")
        tuned, _ = tuned_norms(folder, tmp_path / name)
        ratio = torch.tensor(tuned[0]["calls"][0]) / torch.tensor(base[0]["calls"][0])
        assert torch.allclose(ratio, torch.full_like(ratio, 1.1), rtol=rtol), name


def test_compare_rows_for_the_pref_grpo_form_equal_the_oracle_with_the_peft_folder(qwen_forms, family_pipelines):
    """Row by row: compare (LoRA read from the Pref-GRPO form, normscope's capture) against the plain pipeline
    call with the LoRA read from the peft folder and norms recorded by the oracle: two loadings, two captures."""
    folder = family_pipelines(QWEN)
    prompts = list(PROMPTS)
    result = compare(CompareConfig(tuned=str(qwen_forms["pref"]), pipeline=str(folder), prompts=tuple(prompts),
                                   seeds=(0,), steps=2, height=16, width=16, guidance=4.0, device="cpu",
                                   dtype="float32", batch_size=3, drive="tuned"))
    pipe = load_pipeline(str(folder), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(qwen_forms["peft"]), str(folder))
    with loaded.tuned.active(pipe):
        steps = oracle_norms(pipe, prompt=prompts, negative_prompt=[" "] * 3, true_cfg_scale=4.0, height=16,
                             width=16, num_inference_steps=2, output_type="latent",
                             generator=[torch.Generator("cpu").manual_seed(0) for _ in prompts])
    frame = result.frame.set_index(["prompt_id", "step", "branch"])["norm_tuned"]
    for step, record in enumerate(steps):
        expected = {"cond": record["calls"][0], "uncond": record["calls"][1], "guided": record["scheduler"]}
        for branch, norms in expected.items():
            got = [frame[(p, step, branch)] for p in range(3)]
            assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64),
                                  rtol=1e-5, atol=0), (step, branch)


# ---------------------------------------------------------------- through compare (SD3)


@pytest.fixture(scope="module")
def sd3_forms(pipelines, tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(str(pipelines["sd3"] / "transformer")).eval()
    return write_forms(tmp_path_factory.mktemp("sd3_forms"), transformer, SD3_TARGETS)


def test_compare_says_the_form_and_the_assumed_alpha_in_summary_and_on_stderr(sd3_forms, pipelines):
    result = runner.invoke(app, ["compare", str(sd3_forms["fsdp"]), "--pipeline", str(pipelines["sd3"]), "--steps", "2",
                                 "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0",
                                 "--prompt", "a fox", "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert any("scale 1.0 assumed (alpha = rank 4)" in n for n in summary["notes"])
    assert "scale 1.0 assumed" in result.stderr
    assert summary["config"]["models"]["checkpoints"][0]["form"].startswith("whole peft-wrapped")
    assert abs(summary["inflation"]) > 1e-3  # the LoRA was attached


def test_cli_refuses_an_fsdp_lora_of_another_base_in_one_line(pipelines, tmp_path):
    from diffusers import SD3Transformer2DModel

    from normscope.builders.tiny import TINY_SD3

    torch.manual_seed(99)
    model = wrapped(SD3Transformer2DModel(**TINY_SD3).eval(), SD3_TARGETS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    result = runner.invoke(app, ["compare", str(pipelines["sd3"]), str(tmp_path / "model.safetensors"),
                                 "--steps", "2", "--height", "16", "--width", "16", "--seeds", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "not trained on this pipeline's transformer" in lines[0]


def test_inspect_names_the_form_and_the_transformer_class(qwen_forms, family_pipelines):
    def inspect(*args):
        result = runner.invoke(app, ["inspect", *map(str, args), "--format", "json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    report = inspect(qwen_forms["fsdp"], "--pipeline", family_pipelines(QWEN))
    assert report["kind"] == "peft_wrapped" and "flow_grpo FSDP" in report["form"]
    assert report["transformer_class"] == "QwenImageTransformer2DModel" and report["fits"] is True
    assert report["families"] == ["qwen-image", "qwen-image-edit"] and report["family"] == "qwen-image"
    assert report["lora"]["rank"] == RANK and report["lora"]["alpha_known"] is False
    report = inspect(qwen_forms["pref"])
    assert "Pref-GRPO" in report["form"] and report["lora"]["alpha"] == ALPHA
    for key, cls in (("ZImagePipeline", "ZImageTransformer2DModel"), ("Flux2Pipeline", "Flux2Transformer2DModel"),
                     ("FluxKontextPipeline", "FluxTransformer2DModel")):
        report = inspect(family_pipelines(key))
        assert report["transformer_class"] == cls and report["pipeline_class"] == key
        from_keys = inspect(family_pipelines(key) / "transformer" / "diffusion_pytorch_model.safetensors")
        assert from_keys["transformer_class"] == cls, key  # a bare file: told from its key names
    table = runner.invoke(app, ["inspect", str(qwen_forms["fsdp"])])
    assert table.exit_code == 0 and "form" in table.stdout and "QwenImageTransformer2DModel" in table.stdout
    # a transformer of another family does not fit, and the report says whose it is
    other = runner.invoke(app, ["inspect", str(family_pipelines("ZImagePipeline") / "transformer"), "--pipeline",
                                str(family_pipelines(QWEN)), "--format", "json"])
    report = json.loads(other.stdout)
    assert other.exit_code == 2 and report["fits"] is False and report["families"] == ["z-image"]
    assert report["problems"][-1] == ("it is a ZImageTransformer2DModel, the pipeline's transformer is a "
                                      "QwenImageTransformer2DModel (family qwen-image)")
