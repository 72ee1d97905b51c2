"""The command line: parses options, calls the Python API once, renders what comes back.

Heavy libraries (torch, diffusers) are imported inside the commands, so ``--help`` is instant.
Results go to stdout; progress, notes and errors go to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from normscope.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    Device,
    Drive,
    DType,
    Mode,
    OutputFormat,
    parse_seeds,
)
from normscope.errors import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_RUN, ConfigError, NormscopeError
from normscope.measure.distributed import is_main_process
from normscope.render.safe import labelled, plain_console, stdout_console

# click's UsageError, whether typer vendors click (0.29+) or imports it
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineErrors(TyperGroup):
    """A command's option that cannot be parsed (``--height abc``, ``--guidance x``) is one line and exit 2 too."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # BadParameter, NoSuchOption, MissingParameter: before the command runs
            sub = exc.ctx is not None and exc.ctx.parent is not None and exc.ctx.info_name
            where = f"normscope {exc.ctx.info_name} --help" if sub else "normscope --help"
            err.print(labelled("error:", "red", f"{exc.format_message()} (options: {where})"), highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INPUT) from None


app = typer.Typer(
    cls=OneLineErrors,
    name="normscope",
    help="Measure velocity-norm inflation of RL-tuned flow-matching image and video generators (SD3, FLUX.1/2, Qwen-Image, Z-Image, Wan; normscope presets lists trainers' settings).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = plain_console(stderr=True, soft_wrap=True)  # user text is printed as it is, never as markup; one line each

# ---------------------------------------------------------------- shared options (one definition each)

PipelineOpt = Annotated[str | None, typer.Option("--pipeline", help="Diffusers pipeline folder (model_index.json) or hub id. Default: BASE if it is a pipeline folder, else the nearest enclosing pipeline folder.", rich_help_panel="Probe")]
PromptsFileOpt = Annotated[Path | None, typer.Option("--prompts", help="Prompt file: .txt (one per line), .jsonl or .csv with a 'prompt' field. Default: the shipped set of 40 prompts.", rich_help_panel="Probe")]
PromptOpt = Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeat for several (added to --prompts).", rich_help_panel="Probe")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Seeds, comma-separated or a range: 0,1,2,3 or 0-7.", rich_help_panel="Probe")]
StepsOpt = Annotated[int | None, typer.Option("--steps", help=f"Denoising steps. Default: the preset's, else {DEFAULT_STEPS}.", rich_help_panel="Probe")]
GuidanceOpt = Annotated[float | None, typer.Option("--guidance", help="Guidance scale, sent to the family's guidance argument: CFG scale (SD3, Z-Image, FLUX.2-klein base), guidance embedding (FLUX.1, Kontext, FLUX.2), true_cfg_scale (Qwen-Image). Default: the preset's, else the pipeline's.", rich_help_panel="Probe")]
TrueCfgOpt = Annotated[float | None, typer.Option("--true-cfg-scale", help="FLUX.1 / Kontext true CFG scale: above 1 it runs a negative-prompt call per step (negative prompt \" \" unless --negative-prompt). Default: off.", rich_help_panel="Probe")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="A trainer's evaluation setting (steps, guidance, size); explicit options override it. List: normscope presets.", rich_help_panel="Probe")]
HeightOpt = Annotated[int | None, typer.Option("--height", help="Image height in pixels. Default: the pipeline's.", rich_help_panel="Probe")]
WidthOpt = Annotated[int | None, typer.Option("--width", help="Image width in pixels. Default: the pipeline's.", rich_help_panel="Probe")]
NegativeOpt = Annotated[str | None, typer.Option("--negative-prompt", help="Negative prompt. Default: the pipeline's (\"\" for SD3).", rich_help_panel="Probe")]
MaxSeqOpt = Annotated[int | None, typer.Option("--max-sequence-length", help="T5 sequence length. Default: the pipeline's.", rich_help_panel="Probe")]
VideoOpt = Annotated[Path | None, typer.Option("--video", help="Video-to-video pipelines (Wan V2V): the input video (a folder of frames in name order, or an animated GIF/WebP), the same for every sample.", rich_help_panel="Probe")]
ImageOpt = Annotated[list[Path] | None, typer.Option("--image", help="The conditioning image, the same for every sample (edit and image-to-video pipelines: Kontext, Qwen-Image-Edit, Wan I2V's first frame). Repeat it to give several condition images per sample, in order, to the pipelines that take a list (Qwen-Image-2.1, Qwen-Image-Edit-Plus, FLUX.2, FLUX.2-klein).", rich_help_panel="Probe")]
NumFramesOpt = Annotated[int | None, typer.Option("--num-frames", help="Video pipelines (Wan): frames of the video, 4k + 1 (e.g. 81). Default: the pipeline's.", rich_help_panel="Probe")]
# Settings of one family's call (issue 19); each is refused before loading for a family whose pipeline lacks it.
Guidance2Opt = Annotated[float | None, typer.Option("--guidance-2", help="Wan2.2 A14B: guidance_scale_2, the CFG scale of the low-noise expert (transformer_2). Default: the preset's, else --guidance.", rich_help_panel="Probe")]
SkipLayersOpt = Annotated[str | None, typer.Option("--skip-layers", help="SD3 skip-layer guidance: transformer blocks skipped in the extra call, comma-separated (SD3.5-Medium: 7,8,9). Default: off.", rich_help_panel="Probe")]
SkipScaleOpt = Annotated[float | None, typer.Option("--skip-layer-scale", help="SD3 skip-layer guidance scale (needs --skip-layers). Default: the pipeline's 2.8.", rich_help_panel="Probe")]
SkipStartOpt = Annotated[float | None, typer.Option("--skip-layer-start", help="SD3 skip-layer guidance: first fraction of the steps it acts on (needs --skip-layers). Default: the pipeline's 0.01.", rich_help_panel="Probe")]
SkipStopOpt = Annotated[float | None, typer.Option("--skip-layer-stop", help="SD3 skip-layer guidance: last fraction of the steps it acts on (needs --skip-layers). Default: the pipeline's 0.2.", rich_help_panel="Probe")]
CfgNormOpt = Annotated[float | None, typer.Option("--cfg-normalization", help="Z-Image: cap the guided velocity's norm at K times the cond norm (0: off). Default: the preset's, else off.", rich_help_panel="Probe")]
# The scheduler's timestep shift (issue 19): refused before loading where the scheduler computes it per image size.
ShiftOpt = Annotated[float | None, typer.Option("--shift", help="The scheduler's timestep shift s (sigma -> s*sigma/(1+(s-1)*sigma); 1.0: no shift), for a trainer that evaluates with another than the model ships (Flow-Factory's Wan: 3.0). Refused where the scheduler computes it from the image size (FLUX, Qwen-Image, FLUX.2). Default: the preset's, else the scheduler's own.", rich_help_panel="Probe")]
CfgTruncOpt = Annotated[float | None, typer.Option("--cfg-truncation", help="Z-Image: CFG only while t/1000 <= T (1.0: every step). Default: the preset's, else 1.0.", rich_help_panel="Probe")]
# LTX-2's guidance and Wan V2V's strength (issue 19): each goes to one keyword of the call, refused before loading for
# a family whose pipeline lacks it.
FAMILY_PANEL = "Family settings"
StrengthOpt = Annotated[float | None, typer.Option("--strength", help="Wan V2V: strength, the fraction of the steps run on the noised input video (0 < s <= 1; the run makes int(steps x s) steps). Default: the preset's, else the pipeline's 0.8.", rich_help_panel=FAMILY_PANEL)]
StgScaleOpt = Annotated[float | None, typer.Option("--stg-scale", help="LTX-2: stg_scale, the video's spatio-temporal guidance scale (an extra transformer call per step with --stg-blocks perturbed). STG is off only with --stg-scale 0 --audio-stg-scale 0. Default: the preset's, else the pipeline's 1.0.", rich_help_panel=FAMILY_PANEL)]
StgBlocksOpt = Annotated[str | None, typer.Option("--stg-blocks", help="LTX-2: spatio_temporal_guidance_blocks, the transformer blocks STG perturbs, comma-separated (LTX-2.3: 28, LTX-2.0: 29); checked against the transformer's num_layers before loading. Default: the pipeline's 28.", rich_help_panel=FAMILY_PANEL)]
ModalityOpt = Annotated[float | None, typer.Option("--modality-scale", help="LTX-2: modality_scale, the video's modality-isolation guidance (an extra call with audio-video cross attention off; 1: off). Default: the preset's, else the pipeline's 3.0.", rich_help_panel=FAMILY_PANEL)]
RescaleOpt = Annotated[float | None, typer.Option("--guidance-rescale", help="LTX-2: guidance_rescale, 0..1, moves the video's guided x0 toward the cond one's std (0: off). Default: the preset's, else the pipeline's 0.7.", rich_help_panel=FAMILY_PANEL)]
AudioGuidanceOpt = Annotated[float | None, typer.Option("--audio-guidance", help="LTX-2: audio_guidance_scale, the audio stream's CFG scale (0: the video's --guidance; LTX2Pipeline reads 0 as unset). Default: the preset's, else the pipeline's 7.0 (not --guidance).", rich_help_panel=FAMILY_PANEL)]
AudioStgOpt = Annotated[float | None, typer.Option("--audio-stg-scale", help="LTX-2: audio_stg_scale, the audio stream's STG scale (0: the video's --stg-scale; LTX2Pipeline reads 0 as unset, so audio STG cannot be off while the video's is on). Default: the preset's, else the pipeline's 1.0.", rich_help_panel=FAMILY_PANEL)]
AudioModalityOpt = Annotated[float | None, typer.Option("--audio-modality-scale", help="LTX-2: audio_modality_scale, the audio stream's modality-isolation scale (0: the video's --modality-scale, read as unset). Default: the preset's, else the pipeline's 3.0.", rich_help_panel=FAMILY_PANEL)]
AudioRescaleOpt = Annotated[float | None, typer.Option("--audio-guidance-rescale", help="LTX-2: audio_guidance_rescale, 0..1, for the audio stream (0: the video's --guidance-rescale, read as unset). Default: the preset's, else the pipeline's 0.7.", rich_help_panel=FAMILY_PANEL)]
FrameRateOpt = Annotated[float | None, typer.Option("--frame-rate", help="LTX-2: frame_rate, frames per second (sets the audio length and the positional embeddings). Default: the preset's, else the pipeline's 24.", rich_help_panel=FAMILY_PANEL)]
CrossTimestepOpt = Annotated[bool | None, typer.Option("--cross-timestep/--no-cross-timestep", help="LTX-2: use_cross_timestep, the timestep the audio-video cross attention is modulated with (on: LTX-2.3's, the pipeline's default; off: LTX-2.0's, as Flow-Factory's evaluation samples). Default: the preset's, else the pipeline's (on).", rich_help_panel=FAMILY_PANEL)]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Model dtype (norms are always reduced in float32). auto: bfloat16 on CUDA, float32 on CPU.", rich_help_panel="Hardware")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto: cuda when available, else cpu.", rich_help_panel="Hardware")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="(prompt, seed) samples per pipeline call. Results do not depend on it.", rich_help_panel="Hardware")]
# issue 19: multi-stream families (LTX-2 returns a video and an audio velocity per call)
StreamOpt = Annotated[str | None, typer.Option("--stream", help="Multi-stream families (LTX-2: video, audio): the stream the headline (and any gate) is of; the others are reported too. Default: the family's first (video). Refused for one-stream families.", rich_help_panel="Measurement")]
MemoryOpt = Annotated[str | None, typer.Option("--max-device-memory", help="Device memory the run may use, e.g. 40GiB; refused before it starts if the estimate exceeds it. Default: the GPU's free memory (no check on the CPU); also NORMSCOPE_MAX_DEVICE_MEMORY.", rich_help_panel="Hardware")]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", help="stdout: a rich table, the summary JSON, or the per-step CSV.", rich_help_panel="Output")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="Which adapter of a folder holding several (lora_ema, lora_non_ema, old, ema, learner, ...). Default: the main one, named on stderr.", rich_help_panel="Checkpoints")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Read .bin/.pt/.pth/.ckpt weights with torch.load(weights_only=True). Off: pickles are refused.", rich_help_panel="Checkpoints")]
CheckSeedsOpt = Annotated[str | None, typer.Option("--seeds", help="Seeds (live default 0,1; with --reference: the stored ones, and others are refused).", rich_help_panel="Probe")]
CheckStepsOpt = Annotated[int | None, typer.Option("--steps", help="Denoising steps (live default: the preset's, else 28; with --reference: the stored value).", rich_help_panel="Probe")]
CheckPresetOpt = Annotated[str | None, typer.Option("--preset", help="Live check only: a trainer's evaluation setting (steps, guidance, size); explicit options override it. List: normscope presets.", rich_help_panel="Probe")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder for norms.csv, summary.json, profile.png; an interrupted run resumes from it.", rich_help_panel="Output")]


# The probe options compare, profile, check and sweep share: (parameter, annotation, default), declared once.
PROBE_OPTIONS = (
    ("prompts_file", PromptsFileOpt, None),
    ("prompt", PromptOpt, None),
    ("seeds", SeedsOpt, ",".join(map(str, DEFAULT_SEEDS))),
    ("preset", PresetOpt, None),
    ("steps", StepsOpt, None),
    ("guidance", GuidanceOpt, None),
    ("true_cfg_scale", TrueCfgOpt, None),
    ("height", HeightOpt, None),
    ("width", WidthOpt, None),
    ("negative_prompt", NegativeOpt, None),
    ("max_sequence_length", MaxSeqOpt, None),
    ("num_frames", NumFramesOpt, None),
    ("guidance_2", Guidance2Opt, None),
    ("skip_layers", SkipLayersOpt, None),
    ("skip_layer_scale", SkipScaleOpt, None),
    ("skip_layer_start", SkipStartOpt, None),
    ("skip_layer_stop", SkipStopOpt, None),
    ("cfg_normalization", CfgNormOpt, None),
    ("cfg_truncation", CfgTruncOpt, None),
    # LTX-2's guidance and Wan V2V's strength (issue 19)
    ("strength", StrengthOpt, None),
    ("stg_scale", StgScaleOpt, None),
    ("stg_blocks", StgBlocksOpt, None),
    ("modality_scale", ModalityOpt, None),
    ("guidance_rescale", RescaleOpt, None),
    ("audio_guidance", AudioGuidanceOpt, None),
    ("audio_stg_scale", AudioStgOpt, None),
    ("audio_modality_scale", AudioModalityOpt, None),
    ("audio_guidance_rescale", AudioRescaleOpt, None),
    ("frame_rate", FrameRateOpt, None),
    ("cross_timestep", CrossTimestepOpt, None),
    ("shift", ShiftOpt, None),  # issue 19: the scheduler's shift
)


def probe_options(**overrides):
    """Give a command the shared probe options; it receives them as one ``probe`` dict of ProbeConfig fields.

    Typer reads a command's parameters from its signature, so the decorator extends the signature with
    ``PROBE_OPTIONS`` (``overrides`` maps a name to another ``(annotation, default)`` for one command) and
    folds the values back into ``probe``. ``--help``, the docs test and CliRunner see ordinary options.
    """

    def decorate(command):
        declared = signature(command, eval_str=True)
        options = {name: (annotation, default) for name, annotation, default in PROBE_OPTIONS} | overrides
        added = [Parameter(name, Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                 for name, (annotation, default) in options.items()]
        own = [p for p in declared.parameters.values() if p.name != "probe"]

        @functools.wraps(command)
        def with_probe(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in options}
            with cli_errors():  # a bad --seeds is one line and exit 2, as inside the command
                probe = probe_fields(**values)
            return command(*args, probe=probe, **kwargs)

        with_probe.__signature__ = declared.replace(parameters=own + added)
        return with_probe

    return decorate


def probe_fields(prompts_file, prompt, seeds, steps, guidance, height, width, negative_prompt, max_sequence_length,
                 preset=None, true_cfg_scale=None, num_frames=None, **family_settings) -> dict:
    """The probe options as ProbeConfig fields (``seeds`` parsed; None stays None where a command allows it).

    ``family_settings``: the per-family call settings (``guidance_2``, ``skip_layers`` as "7,8,9", ...).
    """
    if family_settings.get("skip_layers") is not None:
        family_settings["skip_layers"] = parse_layers(family_settings["skip_layers"])
    if family_settings.get("stg_blocks") is not None:  # LTX-2 (issue 19)
        family_settings["stg_blocks"] = parse_layers(family_settings["stg_blocks"], "--stg-blocks", "28")
    return dict(prompts_file=prompts_file, prompts=tuple(prompt or ()), seeds=None if seeds is None else parse_seeds(seeds),
                steps=steps, guidance=guidance, height=height, width=width, negative_prompt=negative_prompt,
                max_sequence_length=max_sequence_length, preset=preset, true_cfg_scale=true_cfg_scale,
                num_frames=num_frames, **family_settings)


def parse_layers(text: str, flag: str = "--skip-layers", example: str = "7,8,9") -> tuple[int, ...]:
    """'7,8,9' -> (7, 8, 9); a clear error otherwise."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{flag} '{text}' is not a list of block indices: use e.g. {example}") from None


class RichReporter:
    """A progress bar on stderr, advanced once per denoising step (no host sync involved)."""

    def __init__(self, description: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=err, transient=False,
        )
        self.description = description
        self.task = None
        self.said: set[str] = set()  # a job that runs several models or modes repeats its notes: say each once

    def begin(self, total_steps: int) -> None:
        self.task = self.progress.add_task(self.description, total=total_steps)

    def advance(self, steps: int = 1) -> None:
        self.progress.advance(self.task, steps)

    def note(self, message: str) -> None:
        if message in self.said:
            return
        self.said.add(message)
        self.progress.console.print(labelled("note:", "cyan", message), highlight=False, soft_wrap=True)  # one line each

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


@contextmanager
def cli_errors() -> Iterator[None]:
    """normscope's own errors become one line on stderr and their exit code; nothing is lost."""
    try:
        yield
    except NormscopeError as exc:
        err.print(labelled("error:", "red", exc), highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:  # the run folder has said whether batches are kept (and where) before this line
        err.print("interrupted", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:
        if os.environ.get("NORMSCOPE_DEBUG"):
            raise
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, from a command without its own estimate
            err.print(labelled("error:", "red", "the device ran out of memory: try --offload (compare), --dtype bfloat16 or a "
                               "smaller --batch-size"), highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_RUN) from None
        err.print(labelled(
            "error:", "red", f"the run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(set NORMSCOPE_DEBUG=1 for the traceback)"),
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(EXIT_RUN) from None


def emit(result, fmt: OutputFormat) -> None:
    """Print a compare result on stdout in the chosen format; warnings to stderr."""
    from normscope.render.files import per_step_csv, summary_json
    from normscope.render.terminal import render_compare

    summary = result.summary
    if summary["nonfinite"]:
        err.print(labelled("warning:", "yellow", f"{summary['nonfinite']} velocity evaluation(s) were NaN/Inf and are left out of every mean"))
    if fmt is OutputFormat.json:
        sys.stdout.write(summary_json(summary))
    elif fmt is OutputFormat.csv:
        sys.stdout.write(per_step_csv(summary))
    else:
        from normscope.render.maps_text import render_where

        console = stdout_console()
        render_compare(summary, console)
        render_where(summary, console)


@app.command()
@probe_options()
def compare(
    base: Annotated[str, typer.Argument(help="Base (reference) checkpoint: pipeline folder, transformer folder or .safetensors state dict. With one path only, that path is TUNED and the base is the pipeline's own transformer.")],
    tuned: Annotated[str | None, typer.Argument(help="RL-tuned checkpoint: any of the same forms, a LoRA (peft folder, diffusers or kohya file) or a trainer's checkpoint-N/ folder.")] = None,
    pipeline: PipelineOpt = None,
    adapter: AdapterOpt = None,
    allow_pickle: PickleOpt = False,
    image: ImageOpt = None,
    video: VideoOpt = None,
    mode: Annotated[Mode, typer.Option("--mode", help="paired: one model drives, the other is evaluated on the same inputs; free: each on its own trajectory; both.", rich_help_panel="Measurement")] = Mode.paired,
    drive: Annotated[Drive, typer.Option("--drive", help="In paired mode, whose velocity moves the latents.", rich_help_panel="Measurement")] = Drive.tuned,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
    fmt: FormatOpt = OutputFormat.table,
    out: OutOpt = None,
    offload: Annotated[bool, typer.Option("--offload", help="Full checkpoints: at most one transformer's weights on the device at any moment; they take turns from host memory (slower; see docs/scale.md).", rich_help_panel="Hardware")] = False,
    max_device_memory: MemoryOpt = None,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also decode and save both models' final images of free mode in DIR/images/ (needs --mode free or both).", rich_help_panel="Output")] = False,
    rescale_to_base: Annotated[bool, typer.Option("--rescale-to-base", help="Also sample the tuned model with its velocity rescaled at every step to the base's norm on the same input (the inference-rescale ablation, mode 'rescaled'); with --save-images its images sit next to free mode's.", rich_help_panel="Measurement")] = False,
    maps: Annotated[bool, typer.Option("--maps", help="Where inflation lives: spatial ratio maps, spectra and the grid score (paired mode; DIR/maps.safetensors) and image signals of the final images (free mode; DIR/image_signals.csv). See docs/maps.md.", rich_help_panel="Measurement")] = False,
    scorer: Annotated[str | None, typer.Option("--scorer", help="module:function taking (PIL images, prompts) and returning one number per image; scores base and tuned final images of free mode (needs --mode free or both).", rich_help_panel="Measurement")] = None,
    precision: Annotated[float | None, typer.Option("--precision", help="Run the samples seed-major and stop once the anytime-valid 95% interval of the inflation has at most this half-width (0.01 = 1 point); see docs/compare.md.", rich_help_panel="Measurement")] = None,
    measure_steps: Annotated[int | None, typer.Option("--measure-steps", help="Paired mode: evaluate the other model at only K steps across sigma (first and last always); the sigma-integral is estimated from them. See docs/performance.md.", rich_help_panel="Measurement")] = None,
    stream: StreamOpt = None,
    probe: dict | None = None,  # the probe options, added by @probe_options
) -> None:
    """Per-step velocity norms of BASE and TUNED on the same prompts and seeds, with 95% CIs.

    Headline: inflation = integral over sigma of the per-step mean ratio ||v_tuned||/||v_base||, minus 1
    (the plain mean over steps is reported too); the 95% CIs resample prompts.
    """
    with cli_errors():
        from normscope.commands.compare import compare as run_compare
        from normscope.config import CompareConfig

        if tuned is None:
            base, tuned = None, base
        config = CompareConfig(
            base=base, tuned=tuned, adapter=adapter, allow_pickle=allow_pickle, pipeline=pipeline, mode=mode, drive=drive,
            dtype=dtype, device=device, batch_size=batch_size, out=out, save_images=save_images, offload=offload,
            image=tuple(image) if image else None, video=video, max_device_memory=max_device_memory, rescale_to_base=rescale_to_base, maps=maps, scorer=scorer,
            precision=precision, measure_steps=measure_steps, stream=stream, **probe,
        )
        if not is_main_process():  # launched on several processes: the main one reports
            run_compare(config)
            return
        with RichReporter("compare") as reporter:
            result = run_compare(config, reporter)
        emit(result, fmt)
        if "sequential" in result.summary:
            from normscope.measure.sequential import decided_line

            err.print(decided_line(result.summary["sequential"]))
        if "measure_steps" in result.summary:
            measured = result.summary["measure_steps"]
            err.print(f"--measure-steps: the base/tuned ratio was measured at {len(measured['steps'])} of "
                      f"{measured['of']} steps ({', '.join(map(str, measured['steps']))}); the inflation integrates "
                      "them over sigma, and its CI does not include the interpolation between them")
        if out is not None:
            video = ", frames.csv, frames.png" if result.frames is not None else ""
            where = "".join(f", {name}" for name, made in (("maps.safetensors", result.maps is not None),
                                                           ("image_signals.csv", result.signals is not None)) if made)
            err.print(f"wrote {out}/norms.csv, summary.json, profile.png{video}{where}")


@app.command()
@probe_options()
def profile(
    base: Annotated[str, typer.Argument(help="The base (reference) model: pipeline folder, transformer folder or .safetensors state dict.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for reference.json, reference.safetensors, thresholds.csv, reference.png.")],
    pipeline: PipelineOpt = None,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
    max_device_memory: MemoryOpt = None,
    allow_pickle: PickleOpt = False,
    dtype_check: Annotated[bool, typer.Option("--dtype-check/--no-dtype-check", help="Also run 4 samples in the other precision (bfloat16 vs float32) to measure that noise floor.")] = True,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table (default) or json (reference.json on stdout).")] = OutputFormat.table,
    probe: dict | None = None,  # the probe options, added by @probe_options
) -> None:
    """Profile BASE alone and store a reference: per-step norms, suggested tau(sigma) and a CI gate."""
    with cli_errors():
        from normscope.commands.profile import ProfileConfig
        from normscope.commands.profile import profile as run_profile
        from normscope.render.terminal import render_reference

        config = ProfileConfig(
            base=base, out=out, pipeline=pipeline, dtype=dtype, device=device, batch_size=batch_size,
            allow_pickle=allow_pickle, dtype_check=dtype_check, max_device_memory=max_device_memory,
            **probe,
        )
        if not is_main_process():  # launched on several processes: the main one reports
            run_profile(config)
            return
        with RichReporter("profile") as reporter:
            reference = run_profile(config, reporter)
        for warning in reference.meta["warnings"]:
            err.print(labelled("warning:", "yellow", warning))
        if fmt is OutputFormat.json:
            sys.stdout.write(json.dumps(reference.meta, indent=2) + "\n")
        else:
            render_reference(reference.meta, stdout_console())
        err.print(f"wrote {out}/reference.json, reference.safetensors, thresholds.csv, reference.png")


@app.command()
@probe_options(
    seeds=(CheckSeedsOpt, None),  # None: the live default or the reference's own
    steps=(CheckStepsOpt, None),
    preset=(CheckPresetOpt, None),
)
def check(
    paths: Annotated[list[str], typer.Argument(help="BASE TUNED [TUNED ...] for a live check, or TUNED [TUNED ...] with --reference.")],
    max_inflation: Annotated[float | None, typer.Option("--max-inflation", help="The gate, as a fraction: 0.05 fails a checkpoint whose inflation exceeds +5 %. Default with --reference: its suggested gate.")] = None,
    reference: Annotated[Path | None, typer.Option("--reference", help="A folder written by normscope profile: run only TUNED, with the stored config.")] = None,
    min_inflation: Annotated[float, typer.Option("--min-inflation", help="Floor, as a negative fraction: a checkpoint whose inflation is below it collapsed (-0.5: its velocity is under half the base's; a zeroed output reads -100 %) and is an error (exit 3), never a pass. -1 turns it off.")] = -0.5,
    pipeline: PipelineOpt = None,
    adapter: AdapterOpt = None,
    allow_pickle: PickleOpt = False,
    mode: Annotated[Mode, typer.Option("--mode", help="Live check only: paired (default), free or both (the gate applies to the first).", rich_help_panel="Measurement")] = Mode.paired,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
    max_device_memory: MemoryOpt = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table (verdict and a line per checkpoint) or json.")] = OutputFormat.table,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write JUnit XML here: one test case per checkpoint, a failure when inflated.")] = None,
    until_decided: Annotated[bool, typer.Option("--until-decided", help="Run the samples seed-major (live, or against --reference: its stored samples) and stop each checkpoint as soon as an anytime-valid 95% interval over prompts lies wholly above or below the gate (else the full plan and the fixed-design verdict). See docs/check.md.", rich_help_panel="Measurement")] = False,
    max_grid_score: Annotated[float | None, typer.Option("--max-grid-score", help="Also fail a checkpoint whose grid score (power of v_tuned - v_base at the patch frequency over its neighbours; see docs/maps.md) exceeds this. Live paired check only; turns on compare --maps.")] = None,
    stream: StreamOpt = None,
    probe: dict | None = None,  # the probe options, added by @probe_options
) -> None:
    """CI gate: exit 0 within --max-inflation, 1 inflated beyond it, 2 bad input, 3 the run failed."""
    with cli_errors():
        from normscope.commands.check import CheckConfig
        from normscope.commands.check import check as run_check
        from normscope.render.ci import publish, verdict_line

        config = CheckConfig(
            paths=tuple(paths), reference=reference, max_inflation=max_inflation, min_inflation=min_inflation,
            pipeline=pipeline, adapter=adapter,
            allow_pickle=allow_pickle, mode=mode, dtype=dtype, device=device, batch_size=batch_size,
            max_device_memory=max_device_memory, max_grid_score=max_grid_score, until_decided=until_decided,
            stream=stream, **probe,
        )
        if not is_main_process():  # launched on several processes: the main one reports
            run_check(config)
            return
        with RichReporter("check") as reporter:
            result = run_check(config, reporter)
        lines = publish(result, junit)
        if fmt is OutputFormat.json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        else:
            for line in lines:
                typer.echo(line)
            typer.echo(verdict_line(result))
        raise typer.Exit(result.exit_code)


@app.command()
@probe_options()
def sweep(
    run_dir: Annotated[Path, typer.Argument(help="A training run's output folder holding checkpoint-N/ folders (or checkpoints/checkpoint-N/).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for sweep.csv, sweep.json, sweep.png, base/ and one run folder per checkpoint; a rerun resumes.")],
    base: Annotated[str | None, typer.Option("--base", help="Base checkpoint. Default: the pipeline's own transformer.")] = None,
    pipeline: PipelineOpt = None,
    adapter: AdapterOpt = None,
    allow_pickle: PickleOpt = False,
    mode: Annotated[Mode, typer.Option("--mode", help="free (default): the base runs once for the whole sweep; paired: the base runs on every checkpoint's trajectory.", rich_help_panel="Measurement")] = Mode.free,
    gate: Annotated[float | None, typer.Option("--gate", help="Mark the first checkpoint whose inflation exceeds this fraction (0.05 = 5 %).")] = None,
    until_decided: Annotated[bool, typer.Option("--until-decided", help="Stop each checkpoint as soon as an anytime-valid 95% interval over prompts lies wholly above or below --gate (see docs/sweep.md).", rich_help_panel="Measurement")] = False,
    maps: Annotated[bool, typer.Option("--maps", help="Also track the grid score and image signals per checkpoint (each runs compare --mode both --maps; needs --mode paired); sweep_where.png.", rich_help_panel="Measurement")] = False,
    scorer: Annotated[str | None, typer.Option("--scorer", help="module:function scoring the final images (PIL images, prompts -> one number each) of base and every checkpoint; needs --mode paired.", rich_help_panel="Measurement")] = None,
    dtype: DTypeOpt = DType.auto,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = DEFAULT_BATCH_SIZE,
    max_device_memory: MemoryOpt = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table, json or csv (the sweep table on stdout).")] = OutputFormat.table,
    stream: StreamOpt = None,
    probe: dict | None = None,  # the probe options, added by @probe_options
) -> None:
    """Compare every checkpoint of a training run with the base, in training order; resumable."""
    with cli_errors():
        from normscope.commands.sweep import SweepConfig
        from normscope.commands.sweep import sweep as run_sweep
        from normscope.render.terminal import render_sweep

        config = SweepConfig(
            run_dir=run_dir, out=out, base=base, pipeline=pipeline, adapter=adapter, allow_pickle=allow_pickle,
            mode=mode, gate=gate, dtype=dtype, device=device, batch_size=batch_size, maps=maps, scorer=scorer,
            max_device_memory=max_device_memory, until_decided=until_decided, stream=stream, **probe,
        )
        if not is_main_process():  # launched on several processes: the main one reports
            run_sweep(config)
            return
        with RichReporter("sweep") as reporter:
            table = run_sweep(config, reporter)
        if fmt is OutputFormat.json:
            sys.stdout.write((out / "sweep.json").read_text())
        elif fmt is OutputFormat.csv:
            sys.stdout.write((out / "sweep.csv").read_text())
        else:
            from normscope.render.maps_text import render_sweep_where

            console = stdout_console()
            render_sweep(table, gate, console)
            render_sweep_where(table, console)
        err.print(f"wrote {out}/sweep.csv, sweep.json, sweep.png and one run folder per checkpoint")


@app.command()
def presets(
    family: Annotated[str | None, typer.Option("--family", help="Only the presets of this family (a family name of docs/models.md, e.g. sd3, flux, qwen-image, wan, ltx2); an unknown name is refused with the list.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table (default), json or csv.")] = OutputFormat.table,
) -> None:
    """List the --preset settings (trainers' evaluation steps, guidance, size) with their sources."""
    with cli_errors():
        from normscope.commands.presets import PresetsConfig, list_presets
        from normscope.render.presets import render_presets

        rows = list_presets(PresetsConfig(family=family))
        if fmt is OutputFormat.json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        elif fmt is OutputFormat.csv:
            import csv

            writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        else:
            render_presets(rows, stdout_console())


@app.command()
def report(
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html, report.md and figures/ (PNG + SVG).")],
    runs: Annotated[list[Path] | None, typer.Argument(help="Run folders written by normscope compare --out (several are overlaid).")] = None,
    gate: Annotated[float | None, typer.Option("--gate", help="Draw this maximum inflation (a fraction, 0.05 = 5 %) on the inflation figures.")] = None,
    title: Annotated[str, typer.Option("--title", help="Title of the report.")] = "normscope report",
    monitor: Annotated[list[Path] | None, typer.Option("--monitor", help="A training run folder (or its monitor.jsonl) written by normscope.monitor: plot its norm ratio per sigma bucket against training step. Repeatable.")] = None,
    sweep: Annotated[list[Path] | None, typer.Option("--sweep", help="A normscope sweep --out folder of the same run: its checkpoints are drawn on the monitor figure. Repeatable; needs --monitor.")] = None,
) -> None:
    """Figures, a self-contained report.html and a report.md from saved run folders; no model is loaded."""
    with cli_errors():
        from normscope.commands.report import ReportConfig
        from normscope.commands.report import report as run_report

        written = run_report(ReportConfig(runs=tuple(runs or ()), out=out, gate=gate, title=title,
                                          monitors=tuple(monitor or ()), sweeps=tuple(sweep or ())))
        typer.echo(str(written["html"]))
        err.print(f"wrote {written['html']}, {written['markdown']} and {written['figures']}/ (PNG + SVG)")


@app.command()
def inspect(
    path: Annotated[str, typer.Argument(help="A checkpoint: pipeline or transformer folder, state dict, LoRA, or a trainer's checkpoint-N/ folder.")],
    pipeline: Annotated[str | None, typer.Option("--pipeline", help="A local pipeline folder: also check whether PATH fits its transformer (built on the meta device, no weights loaded).")] = None,
    adapter: AdapterOpt = None,
    allow_pickle: PickleOpt = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table (default) or json.")] = OutputFormat.table,
) -> None:
    """Show what normscope sees in a checkpoint without running a model: kind, architecture, size, LoRA, fit."""
    with cli_errors():
        from normscope.commands.inspect import InspectConfig, inspect_checkpoint
        from normscope.render.terminal import render_inspection

        report = inspect_checkpoint(InspectConfig(path=path, pipeline=pipeline, adapter=adapter, allow_pickle=allow_pickle))
        if fmt is OutputFormat.json:
            sys.stdout.write(json.dumps(report, indent=2) + "\n")
        else:
            render_inspection(report, stdout_console())
        if report["fits"] is False:
            raise typer.Exit(EXIT_INPUT)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for one compare run folder per bundled RL checkpoint and the overlay figure.")] = Path("normscope-demo"),
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table (default) or json.")] = OutputFormat.table,
    with_report: Annotated[bool, typer.Option("--report/--no-report", help="Also write DIR/report/ (report.html: maps, spectra and image signals of every checkpoint).")] = True,
) -> None:
    """The bundled digits model against its RL checkpoints (AWM, DiffusionNFT; with and without NormGuard)."""
    with cli_errors():
        from normscope.commands.demo import DemoConfig, run_demo
        from normscope.render.terminal import render_demo

        with RichReporter("demo") as reporter:
            result = run_demo(DemoConfig(out=out, report=with_report), reporter)
        if fmt is OutputFormat.json:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            from normscope.render.maps_text import render_demo_where

            console = stdout_console()
            render_demo(result, console)
            render_demo_where(result, console)
        err.print(f"wrote one run folder per checkpoint under {out}/ and {result['overlay']}")


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)] = False,
) -> None:
    if version:
        from normscope import __version__

        typer.echo(__version__)
        raise typer.Exit()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="normscope")


if __name__ == "__main__":
    main()
