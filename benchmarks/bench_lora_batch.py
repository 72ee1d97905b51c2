"""A LoRA's base and tuned forwards as ONE call on a doubled batch (peft's mixed-adapter batches,
``adapter_names``) against two calls, on the same inputs, interleaved, after a warm-up; and the plain diffusers
pipeline call of the same size in the same run, as the yardstick.

    python benchmarks/bench_lora_batch.py                        # CPU, tiny SD3, batches 1, 4, 8
    python benchmarks/bench_lora_batch.py --device cuda --dtype bfloat16 --layers 8 --width 1536 --size 64

Prints per batch size: two calls (ms), one doubled call (ms), their ratio, the plain pipeline call's time per
step, and whether the outputs are bit-identical (max abs difference otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def lora_pipe(layers: int, width: int, dtype, device):
    from peft import LoraConfig

    from normscope.builders.tiny import tiny_sd3_pipeline

    heads = max(width // 32, 1)  # heads of 32 channels (the tiny default is 2 x 16)
    kwargs = {} if layers == 1 and width == 32 else {"num_layers": layers, "num_attention_heads": heads,
                                                     "attention_head_dim": width // heads,
                                                     "caption_projection_dim": width}
    pipe = tiny_sd3_pipeline(seed=0, **kwargs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"],
                        init_lora_weights="gaussian")
    pipe.transformer.add_adapter(config)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(pipe.transformer.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return pipe.to(device=device, dtype=dtype)


def mixed(module, names):
    """Pre-forward hooks giving every LoRA layer ``adapter_names`` (what peft's PeftModel does for its forward)."""
    from peft.tuners.lora import LoraLayer

    handles = []
    for layer in module.modules():
        if isinstance(layer, LoraLayer):
            def hook(mod, args, kwargs):
                kwargs["adapter_names"] = names
                return args, kwargs
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def inputs(pipe, batch: int, size: int, device, dtype):
    t = pipe.transformer
    g = torch.Generator().manual_seed(0)
    c = t.config
    latents = torch.randn(batch, c.in_channels, size, size, generator=g).to(device, dtype)
    text = torch.randn(batch, 24, c.joint_attention_dim, generator=g).to(device, dtype)
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g).to(device, dtype)
    step = torch.full((batch,), 500.0, device=device)
    return dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=step)


def cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    pipe = lora_pipe(args.layers, args.width, dtype, args.device)
    t = pipe.transformer
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"device {args.device}, {args.dtype}, transformer {args.layers} layer(s) width {args.width}, latent {args.size}^2, "
          f"CFG batch doubled by the pipeline (x2 below); torch {torch.__version__}")
    print("| batch (CFG rows) | two calls, ms | one doubled call, ms | doubled / two | plain pipeline step, ms | identical |")
    print("|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        x = inputs(pipe, 2 * batch, args.size, args.device, dtype)  # the CFG batch of `batch` samples

        @torch.no_grad()
        def two(x=x):
            with torch.no_grad():
                t.disable_adapters()
                base = t(**x, return_dict=False)[0]
                t.enable_adapters()
                tuned = t(**x, return_dict=False)[0]
            return base, tuned

        @torch.no_grad()
        def one(x=x):
            n = x["hidden_states"].shape[0]
            handles = mixed(t, ["__base__"] * n + ["default"] * n)
            try:
                out = t(**cat(x, x), return_dict=False)[0]
            finally:
                for h in handles:
                    h.remove()
            return out[:n], out[n:]

        @torch.no_grad()
        def plain_step(x=x):
            return t(**x, return_dict=False)[0]

        (b2, t2), (b1, t1) = two(), one()
        same = torch.equal(b1, b2) and torch.equal(t1, t2)
        diff = max((b1 - b2).abs().max().item(), (t1 - t2).abs().max().item())
        times = {"two": [], "one": [], "plain": []}
        for f in (two, one, plain_step):
            f()
        for _ in range(args.repeats):
            for name, f in (("two", two), ("one", one), ("plain", plain_step)):
                sync()
                start = time.perf_counter()
                f()
                sync()
                times[name].append((time.perf_counter() - start) * 1000)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {batch} ({2 * batch}) | {med['two']:.2f} | {med['one']:.2f} | {med['one'] / med['two']:.3f} | "
              f"{med['plain']:.2f} | {'yes' if same else f'no (max abs diff {diff:.1e})'} |", flush=True)


if __name__ == "__main__":
    main()
