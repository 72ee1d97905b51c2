"""The bundled demo: a tiny SD3 pipeline and a synthetic "tuned" transformer that ship in the package.

The tuned weights are the base's with ``proj_out`` scaled by 1.06 and every weight perturbed by 1 %
Gaussian noise (``scripts/make_demo_assets.py``), so the demo shows a known, modest inflation on the
exact code path a user runs on SD3.5. It is a stand-in until a trained demo model ships.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from normscope.config import CompareConfig, Mode
from normscope.errors import InputError

DEMO_PROMPTS = (
    "a red fox standing in fresh snow",
    "a neon sign that says \"OPEN 24 HOURS\"",
    "three red apples and two green pears on a white plate",
    "a foggy pine forest at dawn",
)


def demo_dir() -> Path:
    folder = Path(str(resources.files("normscope").joinpath("data/demo")))
    if not (folder / "pipeline" / "model_index.json").is_file():
        raise InputError(f"the demo assets are missing from {folder}: reinstall normscope or run scripts/make_demo_assets.py")
    return folder


def demo_config(out: Path | None) -> CompareConfig:
    folder = demo_dir()
    return CompareConfig(
        base=str(folder / "pipeline"),
        tuned=str(folder / "tuned.safetensors"),
        prompts=DEMO_PROMPTS,
        seeds=(0, 1, 2, 3),
        steps=10,
        height=32,
        width=32,
        max_sequence_length=64,
        mode=Mode.both,
        device="cpu",
        dtype="float32",
        out=out,
    )
