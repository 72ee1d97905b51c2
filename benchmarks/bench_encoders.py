"""Peak host memory of a compare whose text encoders dwarf its transformer: encoders released vs kept.

    python benchmarks/bench_encoders.py [--t5-layers 12] [--t5-width 1024] [--layers 4] [--heads 8]

The pipeline is a tiny SD3 pipeline whose T5 encoder is made large (FLUX.1's T5-XXL is ~4.7B parameters
beside a 12B transformer; Qwen-Image's 7B encoder beside 20B) and whose transformer is mid-sized. Each
variant runs in its own process and reports its peak RSS (VmHWM, reset once torch, diffusers and normscope
are imported, because importing them peaks above what they keep) above the RSS right after those imports:

* kept     — what normscope did before: the whole pipeline loaded, encoders resident for the whole run, the
             prompts encoded inside every pipeline call (``CompareConfig(encode_once=False)``);
* released — today: the encoders are loaded alone, every batch is encoded once, the encoders are freed, and
             then a pipeline without text encoders runs the transformers.

TUNED is a full state dict (two transformers), the case where memory is tightest.
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
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, diffusers, transformers  # noqa: F401
from normscope.commands.compare import compare
from normscope.config import CompareConfig

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB

variant, root = sys.argv[1], sys.argv[2]
probe = dict(prompts=tuple(f"prompt number {i}" for i in range(4)), seeds=(0, 1), steps=4, height=32, width=32,
             max_sequence_length=64, guidance=4.5, device="cpu", dtype="float32", batch_size=4)
# Importing torch and diffusers peaks above what they keep: reset the peak (VmHWM) once they are in.
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
baseline = status("VmRSS")
compare(CompareConfig(tuned=root + "/full.safetensors", pipeline=root + "/pipe", encode_once=variant == "released",
                      **probe))
print(json.dumps({"variant": variant, "baseline_mib": baseline, "peak_mib": status("VmHWM")}))
"""


def build(root: Path, t5_layers: int, t5_width: int, layers: int, heads: int) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    from normscope.builders.tiny import save_tiny, tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline(seed=0, num_layers=layers, num_attention_heads=heads, attention_head_dim=64,
                             caption_projection_dim=heads * 64, joint_attention_dim=t5_width, sample_size=32)
    torch.manual_seed(3)
    config = T5Config(vocab_size=1000, d_model=t5_width, d_kv=64, d_ff=4 * t5_width, num_layers=t5_layers,
                      num_heads=t5_width // 64, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    pipe.text_encoder_3 = T5EncoderModel(config).eval()
    save_tiny(pipe, root / "pipe")
    state = {k: (v * 1.05 if k.startswith("proj_out") else v).contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(state, str(root / "full.safetensors"))
    encoders = sum(p.numel() for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                   for p in getattr(pipe, name).parameters())
    return sum(v.numel() for v in state.values()), encoders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5-layers", type=int, default=12)
    parser.add_argument("--t5-width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        transformer, encoders = build(root, args.t5_layers, args.t5_width, args.layers, args.heads)
        results = {}
        for variant in ("kept", "released"):
            out = subprocess.run([sys.executable, "-c", CHILD, variant, str(root)], capture_output=True, text=True,
                                 check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"text encoders {encoders / 1e6:.1f}M params ({encoders * 4 / 2**20:.0f} MiB float32), transformer "
          f"{transformer / 1e6:.1f}M ({transformer * 4 / 2**20:.0f} MiB; two of them for a full TUNED)")
    print(f"{'variant':<10}{'RSS after import':>18}{'peak RSS':>10}{'peak above import':>19}")
    above = {}
    for variant in ("kept", "released"):
        r = results[variant]
        above[variant] = r["peak_mib"] - r["baseline_mib"]
        print(f"{variant:<10}{r['baseline_mib']:>18.0f}{r['peak_mib']:>10.0f}{above[variant]:>19.0f}")
    print(f"released / kept (peak above import): {above['released'] / above['kept']:.3f}")


if __name__ == "__main__":
    main()
