"""Peak memory of a LoRA compare against a single-model run and a full-weights compare.

    python benchmarks/bench_memory.py [--layers 8] [--heads 8]

Each variant runs in its own process on the same saved pipeline (a tiny SD3 pipeline whose transformer is
made large enough for its weights to dominate), and reports its peak RSS above the RSS of a process that
has only imported torch and diffusers:

* single   — the plain diffusers pipeline with the base transformer, no normscope (the floor);
* lora     — normscope compare, paired, TUNED a peft LoRA: one transformer, adapter on and off;
* full     — normscope compare, paired, TUNED a full state dict: two transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = r"""
import json, os, resource, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, diffusers  # noqa: F401
variant, root = sys.argv[1], sys.argv[2]
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
probe = dict(prompts=("a red fox", "two apples"), seeds=(0, 1), steps=4, height=32, width=32,
             max_sequence_length=32, guidance=4.5, device="cpu", dtype="float32")
if variant == "import":
    pass
elif variant == "single":
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(root + "/pipe")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe(prompt=list(probe["prompts"]) * 2, num_inference_steps=4, height=32, width=32, guidance_scale=4.5,
             max_sequence_length=32, output_type="latent",
             generator=[torch.Generator().manual_seed(s) for s in (0, 1, 0, 1)])
else:
    from normscope.commands.compare import compare
    from normscope.config import CompareConfig
    tuned = root + ("/lora" if variant == "lora" else "/full.safetensors")
    compare(CompareConfig(tuned=tuned, pipeline=root + "/pipe", **probe))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"variant": variant, "peak_mib": peak / 1024, "baseline_mib": baseline / 1024}))
"""


def build(root: Path, layers: int, heads: int) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from normscope.builders.tiny import save_tiny, tiny_sd3_pipeline

    width = heads * 64
    pipe = tiny_sd3_pipeline(seed=0, num_layers=layers, num_attention_heads=heads, attention_head_dim=64,
                             caption_projection_dim=width, sample_size=32)
    save_tiny(pipe, root / "pipe")
    state = {k: (v * 1.05 if k.startswith("proj_out") else v).contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(state, str(root / "full.safetensors"))
    model = get_peft_model(pipe.transformer, LoraConfig(r=32, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.save_pretrained(str(root / "lora"))
    return sum(v.numel() for v in state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = build(root, args.layers, args.heads)
        results = {}
        for variant in ("import", "single", "lora", "full"):
            out = subprocess.run([sys.executable, "-c", CHILD, variant, str(root)], capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    floor = results["import"]["peak_mib"]
    print(f"transformer: {params / 1e6:.1f}M params = {params * 4 / 2**20:.0f} MiB float32; "
          f"import-only RSS {floor:.0f} MiB")
    single = results["single"]["peak_mib"] - floor
    print(f"{'variant':<8}{'peak RSS MiB':>14}{'above import':>14}{'vs single':>11}")
    for variant in ("single", "lora", "full"):
        above = results[variant]["peak_mib"] - floor
        print(f"{variant:<8}{results[variant]['peak_mib']:>14.0f}{above:>14.0f}{above / single:>11.3f}")


if __name__ == "__main__":
    main()
