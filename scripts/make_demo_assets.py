"""Write the demo assets shipped in normscope/data/demo (run once; the output is committed).

    python scripts/make_demo_assets.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from normscope.tiny import save_tiny, tiny_sd3_pipeline

OUT = Path(__file__).resolve().parents[1] / "normscope" / "data" / "demo"
PROJ_OUT_SCALE = 1.06
NOISE = 0.01


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    pipe = tiny_sd3_pipeline(seed=0)
    save_tiny(pipe, OUT / "pipeline")
    generator = torch.Generator().manual_seed(1)
    tuned = {}
    for key, value in pipe.transformer.state_dict().items():
        value = value.clone()
        if value.is_floating_point():
            value += NOISE * value.std().nan_to_num(0.0) * torch.randn(value.shape, generator=generator)
        if key.startswith("proj_out."):
            value *= PROJ_OUT_SCALE
        tuned[key] = value.contiguous()
    save_file(tuned, str(OUT / "tuned.safetensors"))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
