"""Which modules go to the device the denoising call runs on (a GPU there; here the ``meta`` device stands in for
it, which a CPU machine can move modules to): the transformers, and every other module the call itself runs, such
as LTX-2's text connectors and the VAE of a pipeline that encodes an input image or video in the call. diffusers
runs the call on the transformer's accelerator, so a module the call uses left in host memory would meet its
inputs on the other device. Text encoders (absent: the prompts come encoded) and decode-only modules stay put."""

from __future__ import annotations

import pytest
import torch

from normscope.builders.tiny import save_tiny, tiny_sd3_pipeline
from normscope.builders.tiny_new_families import NEW_BUILDERS, tiny_ltx2_pipeline
from normscope.load import load_pipeline
from normscope.load.pipeline import place_denoiser

BUILDERS = {
    "ltx2": lambda: tiny_ltx2_pipeline(seed=0),
    "wan-v2v": lambda: NEW_BUILDERS["WanVideoToVideoPipeline"](seed=0),
    "sd3": lambda: tiny_sd3_pipeline(seed=0),
}
# family -> the modules on the call's device after place_denoiser (the others stay in host memory)
ON_DEVICE = {
    "ltx2": {"transformer", "connectors"},  # the connectors turn the prompt embeddings into the transformer's input
    "wan-v2v": {"transformer", "vae"},  # the VAE encodes the input video in the call
    "sd3": {"transformer"},  # text to image: the VAE only decodes, and only when images are asked for
}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_call_modules_go_where_the_transformer_runs(family, tmp_path):
    folder = save_tiny(BUILDERS[family](), tmp_path / family)
    pipe = load_pipeline(str(folder), torch.float32, "cpu", parts="denoiser", place=False)
    place_denoiser(pipe, "meta")
    where = {name: next(module.parameters()).device.type for name, module in pipe.components.items()
             if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters())}
    assert {name for name, device in where.items() if device == "meta"} == ON_DEVICE[family], where
    assert not any(name.startswith("text_encoder") for name in where)  # denoiser parts: no text encoders loaded
