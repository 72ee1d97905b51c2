"""``normscope demo``: the bundled digits model against its bundled RL checkpoints, with and without NormGuard.

Everything ships in the package (normscope/data/digits): a real StableDiffusion3Pipeline at toy scale
trained on scikit-learn's handwritten digits, and LoRA checkpoints of three RL methods (AWM, DiffusionNFT,
Diffusion-DPO), each with and without NormGuard, laid out as the trainers write them (``checkpoints/checkpoint-N/lora/``).
See examples/digits/ for how they were made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from normscope.builders.digits import SAMPLING, assets_dir, digit_prompt, generate, load_classifier, quality, reward
from normscope.config import CompareConfig
from normscope.errors import InputError
from normscope.measure.sampling import Reporter, SilentReporter

MODELS = ("awm", "awm-normguard", "nft", "nft-normguard", "dpo", "dpo-normguard")
# Checkpoints measured in both modes with --maps and --scorer, with the base driving too, and shown in the report.
# The DPO rows (issue 22) get reward, quality and paired inflation (tuned drives) only, which keeps the demo near a
# minute on 2 cores; their other drivers and 3 RL seeds: examples/digits/README.md.
MAPPED_MODELS = ("awm", "awm-normguard", "nft", "nft-normguard")
# The plain AWM run sampled with its velocity rescaled to the base's norm (NFT's row, and both over 3 RL seeds,
# are in examples/digits/README.md; one row keeps the demo quick).
RESCALED_MODELS = ("awm",)
RESCALE_SUFFIX = " + inference rescale"
FINAL_STEP = 40
SERIES = ("awm", (10, 20, 30, 40))
PROBE_SEEDS = (0, 1, 2, 3)
IMAGE_SEEDS = tuple(range(100, 108))
OVERLAY_PNG = "inflation_overlay.png"
REPORT_DIR = "report"
DEMO_SCORER = "normscope.builders.digits:digit_reward"  # the demo's reward, through compare --scorer


@dataclass(kw_only=True)
class DemoConfig:
    """``normscope demo --out DIR``: one compare run folder per bundled RL checkpoint, under DIR.

    ``report`` also writes DIR/report/ (report.html with the maps and spectra of every checkpoint).
    """

    out: Path = Path("normscope-demo")
    report: bool = True


def pipeline_dir() -> Path:
    folder = assets_dir() / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise InputError(f"the bundled digits model is missing from {folder}: reinstall normscope or run examples/digits/")
    return folder


def lora_path(name: str, step: int = FINAL_STEP) -> Path:
    return assets_dir() / "runs" / name / "checkpoints" / f"checkpoint-{step}" / "lora"


def probe(tuned: Path, **overrides) -> CompareConfig:
    fields = dict(
        tuned=str(tuned), pipeline=str(pipeline_dir()), prompts=tuple(digit_prompt(d) for d in range(10)),
        seeds=PROBE_SEEDS, steps=SAMPLING["steps"], guidance=SAMPLING["guidance"], height=SAMPLING["height"],
        width=SAMPLING["width"], max_sequence_length=SAMPLING["max_sequence_length"], device="cpu", dtype="float32",
        batch_size=40,
    )
    fields.update(overrides)
    return CompareConfig(**fields)


def _image_metrics(lora: Path | None, classifier, real, rescale: bool = False) -> dict:
    """Reward and quality of 80 images; ``rescale``: the tuned velocity rescaled to the base's norm at every step."""
    import contextlib

    import torch

    from normscope.load import load_models, load_pipeline, load_tuned_only
    from normscope.measure.capture import capture

    pipe = load_pipeline(str(pipeline_dir()), torch.float32, "cpu")
    sampling = contextlib.nullcontext()
    if lora is not None and rescale:
        loaded = load_models(pipe, None, str(lora), str(pipeline_dir()))
        sampling = capture(pipe, loaded.tuned, loaded.base, rescale_to_other=True)
    elif lora is not None:
        model, _, _ = load_tuned_only(pipe, str(lora))
        pipe.transformer = model.module
    digits = [d for d in range(10) for _ in IMAGE_SEEDS]
    with sampling:
        images = generate(pipe, digits, list(IMAGE_SEEDS) * 10)
    labels = torch.tensor(digits)
    return {"reward": float(reward(images, labels, classifier).mean()), **quality(images, labels, classifier, real)}


def run_demo(config: DemoConfig, reporter: Reporter | None = None) -> dict:
    """Compare the base with every bundled RL checkpoint; reward and quality next to inflation; the series."""
    from normscope.commands.compare import compare
    from normscope.commands.report import ReportConfig, Run, report
    from normscope.measure.maps import where_columns
    from normscope.render.figures import inflation, save

    reporter = reporter or SilentReporter()
    classifier, real = load_classifier()
    rows = [{"model": "base", **_image_metrics(None, classifier, real)}]
    for name in MODELS:
        lora = lora_path(name)
        rescale = name in RESCALED_MODELS
        if name not in MAPPED_MODELS:  # the DPO rows: reward, quality and paired inflation (tuned drives) only
            paired = compare(probe(lora, mode="paired", out=config.out / name), reporter).summary
            rows.append({
                "model": name, **_image_metrics(lora, classifier, real), "paired": paired["inflation"],
                "paired_ci": paired["inflation_ci"], "paired_base_drives": None, "free": None,
                "regions": paired["regions"], "folder": str(config.out / name),
            })
            continue
        both = compare(probe(lora, mode="both", out=config.out / name, rescale_to_base=rescale, maps=True,
                             scorer=DEMO_SCORER), reporter).summary
        base_drives = compare(probe(lora, mode="paired", drive="base"), reporter).summary
        rows.append({
            "model": name, **_image_metrics(lora, classifier, real),
            "paired": both["inflation"], "paired_ci": both["inflation_ci"],
            "paired_base_drives": base_drives["inflation"], "free": both["modes"]["free"]["guided"]["inflation"],
            "regions": both["regions"], "folder": str(config.out / name), **where_columns(both),
        })
        if rescale:  # the paper's ablation: same weights, the velocity's norm put back to the base's at inference
            rescaled = both["modes"]["rescaled"]["guided"]
            rows.append({
                "model": name + RESCALE_SUFFIX, **_image_metrics(lora, classifier, real, rescale=True),
                "paired": rescaled["inflation"], "paired_ci": rescaled["inflation_ci"], "applied": 0.0,
                "paired_base_drives": None, "free": None, "regions": rescaled["regions"],
                "folder": str(config.out / name),
            })
    series_name, steps = SERIES
    series = []
    final = next(row for row in rows if row["model"] == series_name)
    for step in steps:
        if step == FINAL_STEP:  # the same paired probe as the row's (tuned drives), already measured
            series.append({"step": step, "inflation": final["paired"], "ci": final["paired_ci"]})
            continue
        summary = compare(probe(lora_path(series_name, step)), reporter).summary
        series.append({"step": step, "inflation": summary["inflation"], "ci": summary["inflation_ci"]})
    fig = inflation([Run(config.out / name) for name in MODELS])  # headline (paired) curves of the six runs
    save(fig, config.out, OVERLAY_PNG.removesuffix(".png"))
    html = None
    if config.report:
        html = str(report(ReportConfig(runs=tuple(config.out / name for name in MAPPED_MODELS), out=config.out / REPORT_DIR,
                                       title="normscope demo: digits model vs its RL checkpoints"))["html"])
    return {"rows": rows, "series": {"model": series_name, "checkpoints": series}, "overlay": str(config.out / OVERLAY_PNG),
            "report": html}
