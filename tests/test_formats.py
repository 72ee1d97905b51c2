"""Checkpoints as the trainers write them: LoRA (peft, diffusers, kohya), training folders, prefixes, pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import scaled_state_dict
from lora_factory import (
    fused_state_dict,
    kohya_flux_lora,
    save_diffusers_lora,
    save_peft_folder,
    save_training_checkpoint,
)
from safetensors.torch import save_file
from typer.testing import CliRunner

from normscope.cli import app
from normscope.commands.compare import compare
from normscope.errors import CheckpointError
from normscope.load import find_checkpoint, load_models, load_pipeline

runner = CliRunner()


@pytest.fixture(scope="module")
def formats(tmp_path_factory, pipelines):
    root = tmp_path_factory.mktemp("formats")
    made = {
        "peft": save_peft_folder(root / "peft"),
        "diffusers_meta": save_diffusers_lora(root / "diffusers_meta", with_metadata=True),
        "diffusers_plain": save_diffusers_lora(root / "diffusers_plain", with_metadata=False),
        "checkpoint": save_training_checkpoint(root / "checkpoint-100"),
        "kohya": kohya_flux_lora(root / "kohya_flux.safetensors"),
    }
    sidecar = root / "dancegrpo"
    sidecar.mkdir()
    (sidecar / "pytorch_lora_weights.safetensors").write_bytes(made["diffusers_plain"].read_bytes())
    (sidecar / "lora_config.json").write_text('{"rank": 4, "lora_alpha": 8}')
    made["sidecar"] = sidecar / "pytorch_lora_weights.safetensors"
    fused = root / "fused.safetensors"
    save_file(fused_state_dict(pipelines["sd3"], made["peft"]), str(fused))
    made["fused"] = fused
    return made


def paired(config_for, tuned, arch="sd3", **kw):
    return compare(config_for(arch, tuned, base=None, **kw))


def test_lora_compare_equals_the_fused_full_weights(formats, config_for):
    lora = paired(config_for, formats["peft"])
    full = paired(config_for, formats["fused"])
    assert abs(lora.inflation) > 0.01  # the LoRA does something
    for column in ("norm_base", "norm_tuned", "ratio", "cosine"):
        assert np.allclose(lora.frame[column], full.frame[column], rtol=1e-4, atol=1e-6), column


def test_lora_keeps_one_transformer(formats, pipelines):
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    loaded = load_models(pipe, None, str(formats["peft"]), str(pipelines["sd3"]))
    assert loaded.base.module is loaded.tuned.module is pipe.transformer


def test_diffusers_file_with_metadata_and_dancegrpo_sidecar_match_peft(formats, config_for):
    reference = paired(config_for, formats["peft"]).frame["ratio"]
    for name in ("diffusers_meta", "sidecar"):
        result = paired(config_for, formats[name])
        assert np.allclose(result.frame["ratio"], reference, rtol=1e-5), name
        assert not any("no alpha" in n for n in result.summary["notes"])


def test_lora_without_alpha_runs_at_scale_one_and_says_so(formats, config_for):
    result = paired(config_for, formats["diffusers_plain"])
    assert any("scale 1.0 assumed" in n for n in result.summary["notes"])
    half = paired(config_for, formats["peft"])
    assert abs(result.inflation) < abs(half.inflation)  # alpha 8 / rank 4 would be scale 2


def test_extra_named_adapter_is_listed_and_selectable(formats, config_for):
    ckpt = find_checkpoint(formats["peft"], "TUNED")
    assert ckpt.adapter == "default" and set(ckpt.adapters) == {"default", "old"}
    old = paired(config_for, formats["peft"], adapter="old")
    default = paired(config_for, formats["peft"])
    assert old.inflation != default.inflation
    assert old.summary["config"]["models"]["checkpoints"][0]["adapter"] == "old"


def test_training_checkpoint_folder_takes_ema_and_says_how_to_choose(formats, config_for):
    ckpt = find_checkpoint(formats["checkpoint"], "TUNED")
    assert ckpt.adapter == "lora_ema"
    assert set(ckpt.adapters) == {"lora_ema", "lora_ema/ema", "lora_non_ema", "lora_non_ema/ema"}
    assert any("--adapter" in n and "lora_non_ema" in n for n in ckpt.notes)
    other = find_checkpoint(formats["checkpoint"], "TUNED", adapter="lora_non_ema")
    assert other.path.name == "lora_non_ema"
    with pytest.raises(CheckpointError, match="ambiguous"):
        find_checkpoint(formats["checkpoint"], "TUNED", adapter="ema")
    result = paired(config_for, formats["checkpoint"], adapter="lora_non_ema/ema")
    assert result.summary["config"]["models"]["checkpoints"][0]["adapter"] == "lora_non_ema/ema"


def test_unknown_adapter_lists_the_ones_that_exist(formats):
    with pytest.raises(CheckpointError, match="holds default, old"):
        find_checkpoint(formats["peft"], "TUNED", adapter="learner")


def test_kohya_flux_lora_matches_diffusers_own_loader(formats, pipelines, config_for, tmp_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(pipelines["flux"]))
    pipe.load_lora_weights(str(formats["kohya"]))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(tmp_path / "fused.safetensors"))
    ours = paired(config_for, formats["kohya"], arch="flux")
    theirs = paired(config_for, tmp_path / "fused.safetensors", arch="flux")
    assert abs(ours.inflation) > 1e-4 and (ours.frame["cosine"] < 0.9999).any()
    assert np.allclose(ours.frame["ratio"], theirs.frame["ratio"], rtol=1e-5)


def test_lora_for_another_architecture_names_the_modules(formats, pipelines, tmp_path):
    pipe = load_pipeline(str(pipelines["sd3"]), torch.float32, "cpu")
    with pytest.raises(CheckpointError, match="does not fit StableDiffusion3Pipeline.*lora_unet_single_blocks_0_linear2"):
        load_models(pipe, None, str(formats["kohya"]), str(pipelines["sd3"]))
    # The same LoRA in diffusers form (as diffusers converts it) names the FLUX-only modules.
    from diffusers import FluxPipeline

    converted = FluxPipeline.lora_state_dict(str(formats["kohya"]))
    converted = converted[0] if isinstance(converted, tuple) else converted
    save_file({k: v.contiguous() for k, v in converted.items()}, str(tmp_path / "flux_lora.safetensors"))
    with pytest.raises(CheckpointError, match="lacks.*single_transformer_blocks.0.proj_out"):
        load_models(pipe, None, str(tmp_path / "flux_lora.safetensors"), str(pipelines["sd3"]))


def test_prefixed_bf16_state_dict(pipelines, config_for, tmp_path):
    state = {f"_orig_mod.module.{k}": v.to(torch.bfloat16) for k, v in scaled_state_dict(pipelines["sd3"], 1.1).items()}
    save_file(state, str(tmp_path / "compiled.safetensors"))
    result = compare(config_for("sd3", tmp_path / "compiled.safetensors"))
    assert result.inflation == pytest.approx(0.1, abs=1e-2)  # bf16 weights: 10 % to bf16 precision


class Payload:
    """Unpickling this creates a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickle_never_runs(pipelines, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"proj_out.weight": Payload(marker)}))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        find_checkpoint(evil, "TUNED")
    with pytest.raises(CheckpointError, match="weights_only"):
        find_checkpoint(evil, "TUNED", allow_pickle=True)
    torch.save({"w": Payload(marker)}, tmp_path / "evil2.bin")
    result = runner.invoke(app, ["compare", str(pipelines["sd3"]), str(tmp_path / "evil2.bin"), "--allow-pickle", "--steps", "2"])
    assert result.exit_code == 2 and "weights_only" in result.stderr
    assert not marker.exists()


def test_plain_pickled_state_dict_loads_with_the_flag(pipelines, config_for, tmp_path):
    torch.save(scaled_state_dict(pipelines["sd3"], 1.1), tmp_path / "model.pt")
    result = compare(config_for("sd3", tmp_path / "model.pt", allow_pickle=True))
    assert result.inflation == pytest.approx(0.1, abs=1e-4)


def test_empty_folder_says_what_was_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match="looked for model_index.json.*adapter_config.json.*lora_ema/"):
        find_checkpoint(tmp_path, "TUNED")


def test_lora_as_the_only_path_on_the_cli(formats, pipelines):
    result = runner.invoke(app, ["compare", str(formats["peft"]), "--pipeline", str(pipelines["sd3"]), "--steps", "2",
                                 "--height", "16", "--width", "16", "--max-sequence-length", "24", "--seeds", "0",
                                 "--prompt", "a fox", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert "took adapter 'default'" in " ".join(result.stderr.split())  # rich wraps long paths


def test_inspect_reports_kind_architecture_lora_and_fit(formats, pipelines):
    import json

    def inspect(*args):
        result = runner.invoke(app, ["inspect", *map(str, args), "--format", "json"])
        return result.exit_code, json.loads(result.stdout) if result.stdout.strip().startswith("{") else result

    code, report = inspect(formats["checkpoint"], "--pipeline", pipelines["sd3"])
    assert code == 0 and report["kind"] == "peft" and report["adapter"] == "lora_ema" and report["fits"] is True
    assert report["lora"]["rank"] == 4 and report["lora"]["alpha"] == 8 and report["lora"]["scale"] == 2
    assert "transformer_blocks.0.attn.to_q" in report["lora"]["target_modules"]
    code, report = inspect(formats["diffusers_plain"])
    assert report["kind"] == "diffusers_lora" and report["lora"]["alpha_known"] is False
    code, report = inspect(formats["kohya"], "--pipeline", pipelines["flux"])
    assert code == 0 and report["kind"] == "kohya" and report["architecture"] == "FLUX" and report["fits"] is True
    code, report = inspect(formats["kohya"], "--pipeline", pipelines["sd3"])
    assert code == 2 and report["fits"] is False
    code, report = inspect(pipelines["flux"], "--pipeline", pipelines["sd3"])
    assert code == 2 and report["architecture"] == "FLUX" and "missing keys" in report["problems"][0]
    code, report = inspect(pipelines["sd3"] / "transformer")
    assert report["architecture"] == "SD3" and report["parameters"] > 10_000 and report["dtypes"] == {"float32": report["tensors"]}
    table = runner.invoke(app, ["inspect", str(formats["peft"])])
    assert table.exit_code == 0 and "LoRA alpha" in table.stdout


def test_inspect_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 20)
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "Traceback" not in result.output
