"""Broken checkpoints are refused in one line (exit 2), before the pipeline loads, instead of being measured.

Each fault is made from a well-formed checkpoint written by the real savers (peft, diffusers, safetensors), then
broken the way it happens in the wild: lora_B tensors lost, an int8 or float8 file, a shard index that is not
JSON, metadata with alpha "abc", a symlink loop, a truncated file. Without these checks the LoRA ran with
random weights (a different answer on every run), int8 weights were cast to float, and bad JSON was exit 3
after minutes of loading.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from lora_factory import kohya_flux_lora, save_diffusers_lora, save_peft_folder
from safetensors import safe_open
from safetensors.torch import save_file
from test_families_refusals import PROBE, one_line, run

from tests.test_formats_trainers import SD3_TARGETS, write_forms


def rewrite(src: Path, dst: Path, keep=lambda key: True, change=lambda key, tensor: tensor, metadata=None) -> Path:
    """A copy of a safetensors file with tensors dropped or changed (and its header metadata, or new metadata)."""
    with safe_open(str(src), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
        old = handle.metadata()
    dst.parent.mkdir(parents=True, exist_ok=True)
    state = {k: change(k, v).contiguous() for k, v in state.items() if keep(k)}
    save_file(state, str(dst), metadata=old if metadata is None else metadata)
    return dst


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def first(keys, part: str) -> str:
    return sorted(k for k in keys if part in k)[0]


@pytest.fixture(scope="module")
def good(pipelines, tmp_path_factory):
    """Well-formed LoRAs in every form normscope reads, each written by its trainer's saver."""
    from diffusers import SD3Transformer2DModel

    root = tmp_path_factory.mktemp("good")
    transformer = SD3Transformer2DModel.from_pretrained(str(pipelines["sd3"] / "transformer")).eval()
    made = write_forms(root / "trainers", transformer, SD3_TARGETS)
    made["diffusers"] = save_diffusers_lora(root / "diffusers", with_metadata=True)
    made["peft"] = save_peft_folder(root / "peft", extra=None)
    made["kohya"] = kohya_flux_lora(root / "kohya.safetensors")
    return made


# ---------------------------------------------------------------- LoRA tensors missing or mismatched


def test_diffusers_lora_without_its_lora_b_is_refused_before_loading(good, pipelines, tmp_path, no_weight_loads):
    broken = rewrite(good["diffusers"], tmp_path / "pytorch_lora_weights.safetensors", keep=lambda k: ".lora_B." not in k)
    one_line(run("compare", broken, "--pipeline", pipelines["sd3"], *PROBE), 2, "5 lora_A without its lora_B",
             "transformer.proj_out")
    one_line(run("check", pipelines["sd3"], broken, "--max-inflation", "0.05", *PROBE), 2, "lora_A without its lora_B")
    one_line(run("inspect", broken), 2, "lora_A without its lora_B")


def test_check_refuses_a_broken_last_checkpoint_before_measuring_the_first(good, pipelines, tmp_path, no_weight_loads):
    broken = rewrite(good["diffusers"], tmp_path / "broken.safetensors", keep=lambda k: ".lora_B." not in k)
    result = run("check", pipelines["sd3"], good["diffusers"], broken, "--max-inflation", "0.05", *PROBE)
    one_line(result, 2, "broken.safetensors", "lora_A without its lora_B")


def test_one_missing_lora_b_is_named(good, pipelines, tmp_path, no_weight_loads):
    with safe_open(str(good["diffusers"]), framework="pt") as handle:
        gone = first(handle.keys(), ".lora_B.")
    broken = rewrite(good["diffusers"], tmp_path / "one.safetensors", keep=lambda k: k != gone)
    one_line(run("compare", broken, "--pipeline", pipelines["sd3"], *PROBE), 2, gone.split(".lora_B")[0].removeprefix("transformer."))


def test_peft_folder_missing_lora_b_is_refused(good, pipelines, tmp_path, no_weight_loads):
    folder = copy_folder(good["peft"], tmp_path / "peft")
    rewrite(good["peft"] / "adapter_model.safetensors", folder / "adapter_model.safetensors",
            keep=lambda k: ".lora_B." not in k)
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "lora_A without its lora_B")


def test_lora_b_without_lora_a_is_refused(good, pipelines, tmp_path, no_weight_loads):
    folder = copy_folder(good["peft"], tmp_path / "peft")
    rewrite(good["peft"] / "adapter_model.safetensors", folder / "adapter_model.safetensors",
            keep=lambda k: "attn.to_k.lora_A" not in k)
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "lora_B without its lora_A", "to_k")


def test_bare_adapter_with_lora_config_missing_lora_b_is_refused(good, pipelines, tmp_path, no_weight_loads):
    folder = copy_folder(good["pref"], tmp_path / "pref")
    rewrite(good["pref"] / "adapter_model.safetensors", folder / "adapter_model.safetensors",
            keep=lambda k: "proj_out.lora_B" not in k)
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "lora_A without its lora_B", "proj_out")


def test_fsdp_wrapped_model_missing_lora_b_is_refused(good, pipelines, tmp_path, no_weight_loads):
    broken = rewrite(good["fsdp"] / "model.safetensors", tmp_path / "checkpoint-5" / "model.safetensors",
                     keep=lambda k: "proj_out.lora_B" not in k)
    one_line(run("compare", broken.parent, "--pipeline", pipelines["sd3"], *PROBE), 2, "lora_A without its lora_B", "proj_out")


def test_kohya_lora_missing_lora_up_is_refused(good, pipelines, tmp_path, no_weight_loads):
    broken = rewrite(good["kohya"], tmp_path / "kohya.safetensors", keep=lambda k: "single_blocks_0_linear2.lora_up" not in k)
    one_line(run("compare", broken, "--pipeline", pipelines["flux"], *PROBE), 2, "lora_down without its lora_up",
             "lora_unet_single_blocks_0_linear2")


def test_second_expert_keys_missing_lora_b_are_refused_by_inspect(good, tmp_path):
    """Wan2.2's ``transformer_2.`` keys are paired like the first expert's."""
    renamed = tmp_path / "wan2" / "pytorch_lora_weights.safetensors"
    with safe_open(str(good["diffusers"]), framework="pt") as handle:
        state = {k.replace("transformer.", "transformer_2.", 1): handle.get_tensor(k) for k in handle.keys()
                 if "to_v.lora_B" not in k}
    renamed.parent.mkdir()
    save_file(state, str(renamed))
    one_line(run("inspect", renamed), 2, "lora_A without its lora_B", "transformer_2.")


def test_rank_that_differs_between_lora_a_and_lora_b_is_refused(good, pipelines, tmp_path, no_weight_loads):
    def halve(key, tensor):
        return tensor[:, :2] if "proj_out.lora_B" in key else tensor

    broken = rewrite(good["diffusers"], tmp_path / "rank.safetensors", change=halve)
    one_line(run("compare", broken, "--pipeline", pipelines["sd3"], *PROBE), 2, "rank 4", "rank 2", "proj_out")


def test_adapter_config_rank_that_differs_from_the_tensors_is_refused(good, pipelines, tmp_path, no_weight_loads):
    folder = copy_folder(good["peft"], tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "adapter_config.json", "r 8", "rank 4")


def test_adapter_config_targets_a_module_the_weights_lack(good, pipelines, tmp_path):
    """Complete pairs, but adapter_config.json names proj_out, which the file lacks: peft would leave it at its
    random init. Only the load can see this (the targets are patterns); it is refused there."""
    folder = copy_folder(good["peft"], tmp_path / "peft")
    rewrite(good["peft"] / "adapter_model.safetensors", folder / "adapter_model.safetensors",
            keep=lambda k: "proj_out" not in k)
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "left at their random init", "proj_out")


def test_full_state_dict_with_missing_keys_is_refused(pipelines, tmp_path, no_weight_loads):
    """Checked against the pipeline's transformer built on the meta device: before any weight loads."""
    source = pipelines["sd3"] / "transformer" / "diffusion_pytorch_model.safetensors"
    broken = rewrite(source, tmp_path / "full.safetensors", keep=lambda k: not k.startswith("proj_out."))
    one_line(run("compare", pipelines["sd3"], broken, *PROBE), 2, "missing keys", "proj_out.bias")


# ---------------------------------------------------------------- dtypes


def test_int8_full_state_dict_is_refused_naming_the_tensor(pipelines, tmp_path, no_weight_loads):
    source = pipelines["sd3"] / "transformer" / "diffusion_pytorch_model.safetensors"
    broken = rewrite(source, tmp_path / "int8.safetensors",
                     change=lambda k, v: (v * 100).to(torch.int8) if k == "proj_out.weight" else v)
    one_line(run("compare", pipelines["sd3"], broken, *PROBE), 2, "proj_out.weight", "int8", "quantisation scale")
    one_line(run("inspect", broken), 2, "int8")


def test_float8_transformer_folder_is_refused(pipelines, tmp_path, no_weight_loads):
    folder = copy_folder(pipelines["sd3"] / "transformer", tmp_path / "transformer")
    name = "diffusion_pytorch_model.safetensors"
    rewrite(pipelines["sd3"] / "transformer" / name, folder / name,
            change=lambda k, v: v.to(torch.float8_e4m3fn) if k.endswith(".weight") else v)
    one_line(run("compare", pipelines["sd3"], folder, *PROBE), 2, "float8_e4m3fn")


def test_int8_lora_is_refused(good, pipelines, tmp_path, no_weight_loads):
    broken = rewrite(good["diffusers"], tmp_path / "int8.safetensors", change=lambda k, v: (v * 100).to(torch.int8))
    one_line(run("compare", broken, "--pipeline", pipelines["sd3"], *PROBE), 2, "int8")


def test_bf16_state_dict_is_cast_and_says_so(pipelines, tmp_path):
    source = pipelines["sd3"] / "transformer" / "diffusion_pytorch_model.safetensors"
    bf16 = rewrite(source, tmp_path / "bf16.safetensors", change=lambda k, v: v.to(torch.bfloat16))
    result = run("compare", pipelines["sd3"], bf16, *PROBE, "--format", "json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert any("bfloat16" in n and "cast to float32" in n for n in summary["notes"]), summary["notes"]
    assert "cast to float32" in " ".join(result.stderr.split())


def test_bf16_lora_is_cast_and_says_so(good, pipelines, tmp_path):
    bf16 = rewrite(good["diffusers"], tmp_path / "bf16.safetensors", change=lambda k, v: v.to(torch.bfloat16))
    result = run("compare", bf16, "--pipeline", pipelines["sd3"], *PROBE, "--format", "json")
    assert result.exit_code == 0, result.output
    assert any("bfloat16" in n and "cast to float32" in n for n in json.loads(result.stdout)["notes"])


# ---------------------------------------------------------------- bad files and bad JSON


@pytest.fixture
def sharded(pipelines, tmp_path):
    """The tiny SD3 transformer saved in two shards with an index, as Flow-Factory saves large transformers."""
    from diffusers import SD3Transformer2DModel

    folder = tmp_path / "sharded"
    SD3Transformer2DModel.from_pretrained(str(pipelines["sd3"] / "transformer")).save_pretrained(
        folder, max_shard_size="40KB")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    return folder


INDEX = "diffusion_pytorch_model.safetensors.index.json"


def test_shard_index_that_is_not_json_is_refused(sharded, pipelines, no_weight_loads):
    (sharded / INDEX).write_text('{"weight_map": {')
    one_line(run("compare", pipelines["sd3"], sharded, *PROBE), 2, INDEX, "not valid JSON")
    one_line(run("inspect", sharded), 2, "not valid JSON")


def test_shard_index_naming_a_missing_shard_is_refused(sharded, pipelines, no_weight_loads):
    index = json.loads((sharded / INDEX).read_text())
    index["weight_map"]["proj_out.weight"] = "diffusion_pytorch_model-00009-of-00009.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    one_line(run("compare", pipelines["sd3"], sharded, *PROBE), 2, "00009-of-00009", "missing")


def test_shard_index_key_in_a_shard_that_lacks_it_is_refused(sharded, pipelines, no_weight_loads):
    index = json.loads((sharded / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    (sharded / INDEX).write_text(json.dumps(index))
    one_line(run("compare", pipelines["sd3"], sharded, *PROBE), 2, key, shards[1])


def test_pipeline_folder_with_a_bad_shard_index_is_refused(sharded, pipelines, tmp_path, no_weight_loads):
    pipe = copy_folder(pipelines["sd3"], tmp_path / "pipe")
    shutil.rmtree(pipe / "transformer")
    shutil.copytree(sharded, pipe / "transformer")
    (pipe / "transformer" / INDEX).write_text("not json")
    one_line(run("compare", pipe, pipelines["sd3"], *PROBE), 2, INDEX, "not valid JSON")


def test_truncated_and_empty_safetensors_are_refused(sharded, pipelines, tmp_path, no_weight_loads):
    shard = sorted(sharded.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    one_line(run("compare", pipelines["sd3"], sharded, *PROBE), 2, shard.name, "not a valid safetensors file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    one_line(run("compare", pipelines["sd3"], empty, *PROBE), 2, "empty.safetensors", "re-save")


def test_lora_header_metadata_that_is_not_json_is_refused(good, pipelines, tmp_path, no_weight_loads):
    broken = rewrite(good["diffusers"], tmp_path / "meta.safetensors", metadata={"lora_adapter_metadata": "{not json"})
    one_line(run("compare", broken, "--pipeline", pipelines["sd3"], *PROBE), 2, "lora_adapter_metadata", "not valid JSON")
    one_line(run("inspect", broken), 2, "lora_adapter_metadata")


def test_adapter_config_that_is_not_json_is_refused(good, pipelines, tmp_path, no_weight_loads):
    folder = copy_folder(good["peft"], tmp_path / "peft")
    (folder / "adapter_config.json").write_text("{'r': 4}")
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "adapter_config.json", "not valid JSON")


def test_lora_config_sidecar_that_is_not_json_is_refused_before_loading(good, pipelines, tmp_path, no_weight_loads):
    folder = copy_folder(good["pref"], tmp_path / "pref")
    (folder / "lora_config.json").write_text("rank: 4")
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "lora_config.json", "not valid JSON")


@pytest.mark.parametrize("values, needle", [
    ({"lora_params": {"lora_rank": 4, "lora_alpha": "abc"}}, "alpha 'abc'"),
    ({"lora_params": {"lora_rank": -1, "lora_alpha": 8}}, "rank -1"),
])
def test_lora_config_sidecar_with_a_bad_alpha_or_rank_is_refused(good, pipelines, tmp_path, no_weight_loads, values, needle):
    folder = copy_folder(good["pref"], tmp_path / "pref")
    (folder / "lora_config.json").write_text(json.dumps(values))
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "lora_config.json", needle)


def test_header_metadata_with_a_bad_alpha_is_refused(good, pipelines, tmp_path, no_weight_loads):
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "abc", "transformer.r": 4})}
    broken = rewrite(good["diffusers"], tmp_path / "meta.safetensors", metadata=metadata)
    one_line(run("compare", broken, "--pipeline", pipelines["sd3"], *PROBE), 2, "alpha 'abc'")


@pytest.mark.parametrize("values, needle", [({"lora_alpha": "abc"}, "alpha 'abc'"), ({"r": -1}, "rank -1")])
def test_adapter_config_with_a_bad_alpha_or_rank_is_refused(good, pipelines, tmp_path, no_weight_loads, values, needle):
    folder = copy_folder(good["peft"], tmp_path / "peft")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **values}))
    one_line(run("compare", folder, "--pipeline", pipelines["sd3"], *PROBE), 2, "adapter_config.json", needle)


def test_symlink_loop_is_refused(pipelines, tmp_path, no_weight_loads):
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop, loop)
    one_line(run("compare", pipelines["sd3"], loop, *PROBE), 2, "loop.safetensors", "symlink")
    one_line(run("compare", loop, *PROBE), 2, "symlink")  # no --pipeline: the pipeline search meets it first
    one_line(run("inspect", loop), 2, "symlink")


# ---------------------------------------------------------------- well-formed forms still load


@pytest.mark.parametrize("form", ["diffusers", "peft", "pref", "fsdp"])
def test_well_formed_loras_pass_the_checks(good, form):
    from normscope.load import find_checkpoint

    assert find_checkpoint(good[form], "TUNED").is_lora


def test_well_formed_kohya_lora_passes_the_checks(good):
    from normscope.load import find_checkpoint

    assert find_checkpoint(good["kohya"], "TUNED").kind == "kohya"
