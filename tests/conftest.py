"""Shared fixtures: tiny real SD3 and FLUX pipelines saved to disk, and tuned variants of them."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from normscope.builders.tiny import save_tiny, tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from normscope.config import CompareConfig  # noqa: E402

PROMPTS = ("a red fox in snow", "two green apples", "a sign that says OPEN")
# Small but real: CFG on for SD3 (guidance 4.5), FLUX's distilled guidance embedding at 3.5.
PROBE = {
    "sd3": dict(steps=4, height=16, width=16, max_sequence_length=24, guidance=4.5),
    "flux": dict(steps=4, height=16, width=16, max_sequence_length=24, guidance=3.5),
}


def scaled_state_dict(pipe_dir: Path, scale: float, keys=("proj_out.weight", "proj_out.bias")) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(pipe_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    return {k: (v * scale if k in keys else v).contiguous() for k, v in state.items()}


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd3": save_tiny(tiny_sd3_pipeline(seed=0), root / "sd3"),
        "flux": save_tiny(tiny_flux_pipeline(seed=0), root / "flux"),
    }


@pytest.fixture(scope="session")
def scaled(pipelines, tmp_path_factory):
    """scaled(arch, factor) -> a .safetensors full state dict with proj_out times factor."""
    root = tmp_path_factory.mktemp("scaled")
    cache: dict = {}

    def make(arch: str, factor: float) -> Path:
        key = (arch, factor)
        if key not in cache:
            path = root / f"{arch}-proj_out-x{factor}.safetensors"
            save_file(scaled_state_dict(pipelines[arch], factor), str(path))
            cache[key] = path
        return cache[key]

    return make


def make_config(pipelines, arch: str, tuned, **overrides) -> CompareConfig:
    fields = dict(base=str(pipelines[arch]), tuned=str(tuned), pipeline=str(pipelines[arch]), prompts=PROMPTS, seeds=(0, 1),
                  device="cpu", dtype="float32", batch_size=8, **PROBE[arch])
    fields.update(overrides)
    return CompareConfig(**fields)


@pytest.fixture
def config_for(pipelines):
    def make(arch: str, tuned, **overrides) -> CompareConfig:
        return make_config(pipelines, arch, tuned, **overrides)

    return make


@pytest.fixture(scope="session")
def family_pipelines(tmp_path_factory):
    """family_pipelines(key) -> folder of a saved tiny pipeline of that family (keys: tiny_families.FAMILY_BUILDERS).

    Built and saved on first use only, once per session, so a test run pays only for the families it uses.
    """
    from normscope.builders.tiny_families import FAMILY_BUILDERS

    root = tmp_path_factory.mktemp("family_pipelines")
    cache: dict[str, Path] = {}

    def folder(key: str) -> Path:
        if key not in cache:
            cache[key] = save_tiny(FAMILY_BUILDERS[key](seed=0), root / key)
        return cache[key]

    return folder


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Fail the test if any pipeline or model weight is loaded: refusals must come before."""
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def video_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Tiny Wan 2.1 / 2.2 (two experts) pipelines on disk, each with FlowMatchEuler and with UniPC flow."""
    from video_factory import VIDEO_ARCHS, build_pipeline

    root = tmp_path_factory.mktemp("video")
    return {arch: build_pipeline(arch, root / arch) for arch in VIDEO_ARCHS}
