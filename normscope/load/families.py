"""The family table: what normscope must know about each diffusers pipeline it measures, as data.

A family is one row, keyed by the pipeline class named in ``model_index.json`` (``_class_name``). The row
says how the transformer is called per step, which rule combines the calls into the velocity the scheduler
receives, the sign of the output, whether reference tokens are sliced off, which argument carries guidance,
the input form, the experts (transformers) and the latent layout. Capture reads the row; it never branches
on a pipeline class. Adding a family is adding a row (and, for a new combination rule, one function in
``normscope.measure.capture.RULES``).

The table is checked from ``model_index.json`` before any weight is loaded (``family_of_folder``), and the
transformer class of every checkpoint config against the row (``check_transformer_class``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from normscope.errors import ConfigError, InputError

# How the transformer is called per step when CFG is on.
BATCHED = "batched"  # one call on the concatenated batch (order in Family.batch_order)
SEPARATE = "separate"  # one call per branch: cond first, then uncond
DISTILLED = "distilled"  # one call with a guidance embedding; no CFG batch (true CFG: SEPARATE calls)
CALLS = (BATCHED, SEPARATE, DISTILLED)

# Rules the pipelines use to combine cond and uncond (implemented in normscope.measure.capture.RULES).
LINEAR = "linear"  # uncond + w (cond - uncond)
QWEN_RENORM = "qwen_renorm"  # linear, then each token rescaled to ||cond|| (dim -1)
ZIMAGE = "zimage"  # cond + w (cond - uncond), optionally capped at cfg_normalization * ||cond||
# LTX-2: in x0 = x - sigma v: cond + (w-1)(cond - uncond) + s_stg (cond - stg) + (m-1)(cond - modality), then
# rescaled toward cond (guidance_rescale), back to a velocity
LTX2_X0 = "ltx2_x0"
COMBINES = (LINEAR, QWEN_RENORM, ZIMAGE, LTX2_X0)

INPUT_FORMS = ("tensor", "list")
LATENT_LAYOUTS = ("bchw", "packed", "list_c1hw", "bcfhw", "packed_fhw")  # packed_fhw: LTX-2's video tokens

# How a pipeline computes its VAE's spatial factor from vae/config.json (see Family.vae_factor).
VAE_FACTORS = ("block_out_channels", "temperal_downsample", "scale_factor_spatial", "spatial_compression_ratio")

GUIDANCE_SCALE = "guidance_scale"
TRUE_CFG_SCALE = "true_cfg_scale"


@dataclass(frozen=True)
class Preset:
    """A trainer's evaluation setting: ``normscope compare --preset NAME`` samples the way it evaluates.

    ``None`` leaves a setting at the pipeline's default. ``argument`` is the pipeline argument that
    ``guidance`` goes to (``guidance_scale`` or ``true_cfg_scale``). ``size`` is a square size; ``height`` and
    ``width`` a non-square one (Wan 480x832, Qwen-Image 16:9). Every other field is one more keyword the
    trainer's evaluation fixes and the preset hands to the pipeline call (through the ``ProbeConfig`` field of
    the same name): the text length, the video length, Wan2.2's second-expert guidance, the negative prompt,
    Z-Image's CFG norm cap and truncation. ``source`` names the repository, file, line and commit each value
    was read from (``normscope presets`` shows it).
    """

    name: str
    family: str
    steps: int
    guidance: float
    argument: str
    size: int | None
    source: str
    max_sequence_length: int | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    guidance_2: float | None = None
    negative_prompt: str | None = None
    cfg_normalization: float | None = None
    cfg_truncation: float | None = None
    # LTX-2's guidance and Wan V2V's strength (issue 19; an audio setting of 0 is the video's, as LTX2Pipeline reads it)
    strength: float | None = None
    frame_rate: float | None = None
    stg_scale: float | None = None
    modality_scale: float | None = None
    guidance_rescale: float | None = None
    audio_guidance: float | None = None
    audio_stg_scale: float | None = None
    audio_modality_scale: float | None = None
    audio_guidance_rescale: float | None = None
    cross_timestep: bool | None = None  # LTX-2's use_cross_timestep
    # The scheduler's timestep shift the trainer's evaluation samples with, where it overrides the shipped one
    # (issue 19; ProbeConfig.shift, applied by normscope.load.scheduler_shift): not a call keyword.
    shift: float | None = None

    def __post_init__(self) -> None:
        assert self.size is None or (self.height is None and self.width is None), self.name

    # The ProbeConfig fields a preset fills (each only where the user left it unset), in listing order.
    FIELDS = ("max_sequence_length", "num_frames", "guidance_2", "negative_prompt", "cfg_normalization",
              "cfg_truncation", "shift")
    FIELDS += ("strength", "frame_rate", "stg_scale", "modality_scale", "guidance_rescale", "audio_guidance",
               "audio_stg_scale", "audio_modality_scale", "audio_guidance_rescale", "cross_timestep")  # issue 19: LTX-2, Wan V2V


@dataclass(frozen=True)
class PromptEncoding:
    """How a family's pipeline encodes prompts, so normscope can encode them once (``measure.prompt_cache``).

    ``method`` is the pipeline's own encode function; ``outputs`` names the call keyword each returned
    tensor becomes (``None``: not passed). The negative prompt is either a keyword of the same call
    (``negative_keyword``, SD3) or encoded by a second call whose results become ``negative_outputs``
    (FLUX.1, whose encode function has no negative prompt). ``fixed``: constant keywords of the call.
    ``fixed_negative``: the text a pipeline always encodes as its negative prompt, whatever the user asks
    (FLUX.2-klein encodes ``""``); it is encoded by the second call for every batch. An output that is a
    list of tensors (Z-Image's per-prompt embeddings of unpadded length) is passed back as a list.
    """

    method: str
    outputs: tuple[str | None, ...]
    negative_keyword: str | None = None
    negative_outputs: tuple[str | None, ...] = ()
    fixed: tuple[tuple[str, object], ...] = ()
    fixed_negative: str | None = None
    # (component, attribute, value) the encode function sets on the pipeline and the call reads after it: set on
    # the sampling pipeline too when the prompts come from the cache (LTX-2's encoder sets tokenizer.padding_side
    # = "left", which its text connectors read in the call).
    sets: tuple[tuple[str, str, object], ...] = ()
    # issue 19, several condition images: the encode function reads the condition images too (Qwen-Image-2.1's VL
    # encoder), and the call cannot take embeddings of them (it has no image_pad_mask argument): with condition
    # images the prompts are encoded inside every call, without the cache.
    reads_images: bool = False


SD3_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    negative_keyword="negative_prompt",
    # prompt_2/3 None: the pipeline uses the prompt for every encoder; the negative is always encoded so the
    # same entry serves any guidance scale (without CFG the pipeline ignores it).
    fixed=(("prompt_2", None), ("prompt_3", None), ("do_classifier_free_guidance", True), ("num_images_per_prompt", 1)),
)
FLUX_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "pooled_prompt_embeds", None),  # text_ids: rebuilt by the call
    negative_outputs=("negative_prompt_embeds", "negative_pooled_prompt_embeds", None),
    fixed=(("prompt_2", None), ("num_images_per_prompt", 1)),
)
QWEN_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "prompt_embeds_mask"),
    negative_outputs=("negative_prompt_embeds", "negative_prompt_embeds_mask"),
    fixed=(("num_images_per_prompt", 1),),
)
FLUX2_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", None),  # text_ids: rebuilt by the call
    fixed=(("num_images_per_prompt", 1),),
)
# FLUX.2-klein's call encodes "" as the negative of every prompt when CFG is on (base models): given only
# prompt_embeds it would encode one "" for the whole batch, so the cache passes the batch's negatives too.
FLUX2_KLEIN_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", None),  # text_ids: rebuilt by the call
    negative_outputs=("negative_prompt_embeds", None),
    fixed=(("num_images_per_prompt", 1),),
    fixed_negative="",
)
# Wan (T2V) and Z-Image encode the negative in the same call ("" when none is given), as SD3 does.
WAN_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "negative_prompt_embeds"),
    negative_keyword="negative_prompt",
    fixed=(("do_classifier_free_guidance", True), ("num_videos_per_prompt", 1)),
)
Z_IMAGE_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "negative_prompt_embeds"),  # lists: one (tokens, dim) tensor per prompt
    negative_keyword="negative_prompt",
    fixed=(("do_classifier_free_guidance", True),),
)


@dataclass(frozen=True)
class Family:
    """One family of pipelines: how capture follows its denoising loop. Pure data.

    * ``calls``: how the transformer is called per step with CFG on (``batched``, ``separate``,
      ``distilled``); ``batch_order`` is the order of the branches in a batched call.
    * ``combine``: the pipeline's rule for the velocity the scheduler receives (``linear``,
      ``qwen_renorm``, ``zimage``). ``combined`` is reported where the rule renormalises or caps.
    * ``output_sign``: the scheduler receives ``output_sign * output`` (Z-Image negates).
    * ``reference_tokens``: the output carries reference-image tokens after the latent tokens; the
      pipeline slices ``[:, :latents.size(1)]``.
    * ``guidance_arg``: the pipeline argument ``--guidance`` maps to; ``true_cfg_arg``: the argument of
      ``--true-cfg-scale`` where the family has both (FLUX.1); ``needs_negative_prompt``: CFG runs only
      with a negative prompt (normscope passes " " when none is given).
    * ``input_form``: ``tensor`` or ``list`` (Z-Image passes lists of (C, 1, H, W) tensors).
    * ``experts``: (pipeline attribute, label) per transformer, in the order the pipeline uses them; a
      pipeline that holds only one of them (Wan2.1 in a Wan row) reports the label "" like
      one-transformer families. ``expert_guidance``: (label, pipeline argument) where an expert's steps
      are guided by another argument than ``guidance_arg`` (Wan2.2's ``guidance_scale_2``; the pipeline
      falls back to ``guidance_scale`` when it is unset).
    * ``latent_layout`` and ``patch_size``: how a velocity is laid out, so spatial maps can unpack it.
    * ``output_projection``: the transformer's last linear layer (tests scale it by 1.1).
    * ``extra_call_kwarg``: a transformer keyword that marks an extra guidance call of batch B (SD3's
      ``skip_layers``); ``extra_scale_arg`` the pipeline argument scaling it (``v += s (cond - extra)``).
    * ``cap_arg``: the pipeline argument of a norm cap applied after combining (Z-Image
      ``cfg_normalization``).
    * ``prompt_encoding``: how to encode prompts once outside the call; ``None``: the pipeline encodes
      them inside every call (the text encoders then stay loaded for the run).
    * ``area_arg``: the pipeline argument that really sets the sampled size, where the pipeline rescales
      ``height``/``width`` to that area (FLUX.1-Kontext's ``max_area``, 1024^2 by default, keeps only the
      aspect ratio of the size it is given); normscope passes ``height * width`` to it.
    * ``call_requires``: Python packages the pipeline's ``__call__`` imports unconditionally, checked before
      any weight loads (diffusers' Wan I2V pipeline calls ``ftfy`` whether or not it is installed).
    * ``vae_factor`` and ``size_patch``: ``--height``/``--width`` must be multiples of (the VAE's spatial factor
      x ``size_patch``), read from ``vae/config.json`` without loading weights: ``block_out_channels`` (2^(n-1)),
      ``temperal_downsample`` (2^n, Qwen-Image), ``scale_factor_spatial`` (Wan, Qwen-Image-2.1) or
      ``spatial_compression_ratio`` (HunyuanVideo, LTX-2); 8 when absent or null.
      ``size_patch`` None: the transformer config's spatial ``patch_size`` (SD3, Wan); the others pack 2x2.
      ``size_floor``: a multiple the pipeline demands whatever the VAE (Wan: 16).
    * ``frames_factor``: video families: ``--num-frames`` is k x factor + 1, the factor read from the VAE
      config's ``scale_factor_temporal`` or ``temporal_compression_ratio`` (this value when neither key is there;
      no check when the key is null, as LTX-2's VAE computes it at load); ``None``: the family makes images.
      Every video pipeline rounds ``num_frames`` itself: a count off the rule is sampled as the pipeline rounds it,
      and summary.json and one stderr line say what was sampled.
    * ``size_rounds``: the pipeline resizes a height or width off its multiple (FLUX.1, Kontext, FLUX.2,
      Qwen-Image, Qwen-Image-Edit) instead of raising: such a size is sampled as rounded and said, not refused.
    * ``video_arg``: the pipeline argument that takes an input video (``--video``, required before loading;
      Wan video-to-video's ``video``).
    * ``token_slice``: which end of the output the pipeline keeps when it carries more tokens than the
      latents (``reference_tokens``): ``first`` (``[:, :N]``, Kontext, FLUX.2, Qwen-Image-Edit) or ``last``
      (``[:, -N:]``, Qwen-Image-2.1, whose prefill step also returns the text tokens).
    * ``streams``: names of the velocities one transformer call returns, in its output order (LTX-2: video,
      audio); empty: one. Stream 0 is stepped by ``pipe.scheduler``, stream k by the k-th copy of it the pipeline
      makes in its call (LTX-2 deep-copies its scheduler for audio). The first stream is the headline.
      ``stream_prefix``: (stream, prefix) where a stream's guidance arguments are the first stream's with a
      prefix (``audio_guidance_scale``), falling back to the first stream's value when unset or 0, as LTX-2 does.
    * ``call_markers``: (transformer keyword, role) marking an extra guidance call of batch B by its keyword
      being set (LTX-2's STG call ``spatio_temporal_guidance_blocks``, modality isolation ``isolate_modalities``).
    * ``rule_args``: (setting, pipeline argument) the combination rule reads besides the guidance scale
      (LTX-2: ``stg_scale``, ``modality_scale``, ``guidance_rescale``).
    * ``private_state_kwargs``: transformer keywords that carry state the transformer WRITES (Qwen-Image-2.1's
      ``kv_cache``): in paired mode the other model gets its own copy, taken before the driver's first call with
      it, so neither model ever reads the other's cached prefix.
    * ``needs_image``: the family edits or animates an image (Kontext, Qwen-Image-Edit, Wan I2V): a run without
      ``--image`` or per-row images is refused before any weight loads (Kontext would silently measure
      text-to-image, Qwen-Image-Edit fails after loading). ``image_per_sample``: the call takes a list of one
      image per prompt (Qwen-Image-Edit's VL encoder reads one image per prompt; one image for a batch fails).
    * ``several_images``: the pipeline classes of the row whose ``image`` takes SEVERAL condition images per sample
      (a list, in order: Qwen-Image-2.1, Qwen-Image-Edit-Plus, FLUX.2, FLUX.2-klein); repeated ``--image`` or a pairs
      row listing images is refused before loading for the others. ``condition_size_arg``: the pipeline argument
      that sets the side of the area the condition images are resized to (Qwen-Image-2.1's ``output_resolution``,
      1024 by default); with ``--height`` and ``--width`` normscope passes ``round(sqrt(height x width))``, so the
      condition images are sampled at the output's area, as Kontext's are at its size. ``image_bounds``: (smallest
      side in pixels, largest aspect ratio) the pipeline accepts for a condition image, checked before loading
      (FLUX.2's ``Flux2ImageProcessor.check_image_input`` raises below 64 px a side or beyond 8:1).
    """

    name: str
    title: str
    pipeline_classes: tuple[str, ...]
    transformer_class: str
    calls: str
    combine: str
    guidance_arg: str
    output_sign: int = 1
    batch_order: tuple[str, ...] = ("uncond", "cond")
    reference_tokens: bool = False
    true_cfg_arg: str | None = None
    needs_negative_prompt: bool = False
    input_form: str = "tensor"
    experts: tuple[tuple[str, str], ...] = (("transformer", ""),)
    expert_guidance: tuple[tuple[str, str], ...] = ()
    latent_layout: str = "bchw"
    patch_size: int = 1
    output_projection: str = "proj_out"
    extra_call_kwarg: str | None = None
    extra_scale_arg: str | None = None
    cap_arg: str | None = None
    prompt_encoding: PromptEncoding | None = None
    area_arg: str | None = None
    call_requires: tuple[str, ...] = ()
    vae_factor: str = "block_out_channels"
    size_patch: int | None = 2
    size_floor: int = 1
    frames_factor: int | None = None
    size_rounds: bool = False  # the pipeline rounds a size off its multiple (FLUX, Qwen-Image) instead of raising
    # issue 19, the models the trainers tune now (Wan V2V, HunyuanVideo, Qwen-Image-2.1, LTX-2)
    video_arg: str | None = None
    token_slice: str = "first"
    private_state_kwargs: tuple[str, ...] = ()
    streams: tuple[str, ...] = ()
    stream_prefix: tuple[tuple[str, str], ...] = ()
    call_markers: tuple[tuple[str, str], ...] = ()
    rule_args: tuple[tuple[str, str], ...] = ()
    presets: tuple[Preset, ...] = field(default=())
    needs_image: bool = False
    image_per_sample: bool = False
    # issue 19, several condition images per sample
    several_images: tuple[str, ...] = ()
    condition_size_arg: str | None = None
    image_bounds: tuple[int, float] | None = None

    def __post_init__(self) -> None:
        # The table is data typed by hand: a typo must fail at import, not in a user's run.
        assert self.calls in CALLS, self.calls
        assert self.combine in COMBINES, self.combine
        assert self.output_sign in (1, -1), self.output_sign
        assert self.input_form in INPUT_FORMS, self.input_form
        assert self.latent_layout in LATENT_LAYOUTS, self.latent_layout
        assert self.token_slice in ("first", "last"), self.token_slice
        assert sorted(self.batch_order) == ["cond", "uncond"], self.batch_order
        assert self.vae_factor in VAE_FACTORS, self.vae_factor
        labels = self.expert_labels
        for label, _ in self.expert_guidance:
            assert label in labels, label
        for preset in self.presets:
            assert preset.family == self.name and preset.argument in self.guidance_arguments, preset
        assert set(self.several_images) <= set(self.pipeline_classes), self.several_images

    @property
    def guidance_arguments(self) -> tuple[str, ...]:
        """The pipeline arguments that carry a guidance scale for this family."""
        return (self.guidance_arg,) + ((self.true_cfg_arg,) if self.true_cfg_arg else ())

    @property
    def expert_labels(self) -> tuple[str, ...]:
        return tuple(label for _, label in self.experts)


def _p(name: str, family: str, steps: int, guidance: float, argument: str, size: int | None, source: str,
       **fields) -> Preset:
    return Preset(name=name, family=family, steps=steps, guidance=guidance, argument=argument, size=size,
                  source=source, **fields)


# ------------------------------------------------------------------------------------------------ presets
# Every value below was read in the trainer's own repository at the commit named; "file:line" points at it.
# A preset carries every keyword that evaluation passes to its sampler; what the trainer leaves unset stays the
# pipeline's default (None here). Where a source could not be read, the source says so.
FLOW_GRPO_COMMIT = "yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd"
FLOW_GRPO_INDEX_COMMIT = "yifan123/flow_grpo@31c71b9dc2c31e684cb547e464c941094140ac19"
FLOW_GRPO_KONTEXT_COMMIT = "yifan123/flow_grpo@74db69191de9a0a54869c9c3341ce4b54db7005f"
NFT_COMMIT = "NVlabs/DiffusionNFT@24af5554898d85e93efa492f42b5e9cdf4156e9b"
AWM_COMMIT = "scxue/advantage_weighted_matching@be5137232e33a21b449ed65a533211d0deb97ed8"
FLOW_FACTORY_COMMIT = "X-GenGroup/Flow-Factory@a0b2bc5a2b4fbf9125429b3fb70c0c5d7631047c"
PREF_GRPO_COMMIT = "CodeGoat24/Pref-GRPO@3e787f6dd5a3051b40d61f07e9578468ac26130a"
DANCEGRPO_COMMIT = "XueZeyue/DanceGRPO@15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344"
# TempFlow-GRPO's code is in the public code index (Shredded-Pork/TempFlow-GRPO; the fetched snapshot @afe6d33 holds
# a README and the paper only). Each file's commit is the index's; lines counted in the index's text (a function is
# named where they were not).
# Its eval calls its own pipeline_with_logprob(..., determistic=True): sd3_sde_with_logprob then steps
# prev = x + dt * v (no noise), the Euler update diffusers' FlowMatchEulerDiscreteScheduler makes.
TEMPFLOW = "Shredded-Pork/TempFlow-GRPO"
TEMPFLOW_CONFIG = f"{TEMPFLOW}@63e4def7159940ba7d60e4e6250eee868342388c config/dgx.py"
TEMPFLOW_SD3_FLUX = f"{TEMPFLOW}@e66824eca96d2b41cfd70fd1879650ae1ea5892e"
TEMPFLOW_STEP = (f"{TEMPFLOW_SD3_FLUX} flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:68-69 "
                 "(determistic=True: prev_sample = sample + dt * model_output, a deterministic Euler ODE step)")
# flow_grpo's SD3 evaluation encodes prompts, and the "" negative, with 128 T5 tokens.
FLOW_GRPO_SD3_TOKENS = f"{FLOW_GRPO_COMMIT} scripts/train_sd3.py:220,238 (max_sequence_length=128)"
# Pref-GRPO's Wan inference scripts pass Wan's own long negative prompt (its English version).
WAN_NEGATIVE_EN = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)
FF = FLOW_FACTORY_COMMIT
PG = PREF_GRPO_COMMIT

SD3_PRESETS = (
    _p("flow_grpo-sd3.5m", "sd3", 40, 4.5, GUIDANCE_SCALE, 512,
       f"{FLOW_GRPO_COMMIT} config/grpo.py:77-80 (geneval_sd3: eval_num_steps 40, guidance 4.5, 512 px); "
       + FLOW_GRPO_SD3_TOKENS, max_sequence_length=128, negative_prompt=""),
    _p("flow_grpo-sd3.5m-nocfg", "sd3", 40, 1.0, GUIDANCE_SCALE, 512,
       f"{FLOW_GRPO_INDEX_COMMIT} config/grpo.py geneval_sd3_fast_nocfg() (eval_num_steps 40, eval_guidance_scale 1, "
       "512 px; read from the code index, line not resolved); its train_sd3_fast.py eval encodes with "
       "max_sequence_length=128 (same index)", max_sequence_length=128, negative_prompt=""),
    _p("diffusionnft-sd3.5m", "sd3", 40, 1.0, GUIDANCE_SCALE, 512,
       f"{NFT_COMMIT} config/nft.py:21,23,64 (eval_num_steps 40, 512 px, guidance_scale 1.0); "
       "scripts/train_nft_sd3.py:226,255 (prompts and \"\" negative at max_sequence_length=128)",
       max_sequence_length=128, negative_prompt=""),
    _p("awm-sd3.5m", "sd3", 40, 1.0, GUIDANCE_SCALE, 512,
       f"{AWM_COMMIT} advantage_weighted_matching/config/dgx_awm.py:38-43 (geneval_sd3_no_cfg_1node: 40 steps, "
       "guidance 1.0, 512 px); advantage_weighted_matching/scripts/train_sd3_awm.py:287,305 "
       "(max_sequence_length=128)", max_sequence_length=128, negative_prompt=""),
    _p("flow-factory-sd3.5", "sd3", 40, 4.5, GUIDANCE_SCALE, 512,
       f"{FF} examples/grpo/lora/sd3_5/default.yaml:95-98 (eval 512 px, guidance 4.5, 40 steps); "
       "src/flow_factory/models/stable_diffusion/sd3_5.py:92,132,218 (prompts encoded with max_sequence_length "
       "512, negative \"\")", max_sequence_length=512, negative_prompt=""),
    _p("flow-factory-sd3.5-nocfg", "sd3", 40, 1.0, GUIDANCE_SCALE, 512,
       f"{FF} examples/grpo/lora/sd3_5/nocfg.yaml:95-98 (eval 512 px, guidance 1.0, 40 steps); "
       "src/flow_factory/models/stable_diffusion/sd3_5.py:92,218 (max_sequence_length 512)",
       max_sequence_length=512, negative_prompt=""),
    _p("tempflow-grpo-sd3.5m", "sd3", 40, 4.5, GUIDANCE_SCALE, 512,
       f"{TEMPFLOW_CONFIG}:93-94,97 geneval_sd3() and :135-136,139 geneval_sd3_pr() (eval_num_steps 40, guidance_scale "
       "4.5, resolution 512; "
       "scripts/multi_node/main.sh and train_sd3_pr.sh at e66824e select them); "
       f"{TEMPFLOW_SD3_FLUX} scripts/train_sd3.py:227,245,254-267 and scripts/train_sd3_pr.py:227,245,253-266 eval() "
       "(\"\" negative and prompts encoded with max_sequence_length=128, height=width=resolution, determistic=True); "
       f"{TEMPFLOW_STEP}. Its sd3_pipeline_with_logprob module is not in the code index, so its timestep "
       "schedule was NOT READ", max_sequence_length=128, negative_prompt=""),
)
FLUX_PRESETS = (
    _p("flow_grpo-flux1-dev", "flux", 28, 3.5, GUIDANCE_SCALE, 512,
       f"{FLOW_GRPO_INDEX_COMMIT} config/grpo.py pickscore_flux() (eval_num_steps 28, guidance_scale 3.5, "
       f"resolution 512; read from the code index, line not resolved); {FLOW_GRPO_KONTEXT_COMMIT} "
       "scripts/train_flux.py:193,198-208 eval() (prompt embeds only, encoded with max_sequence_length=128, "
       "height=width=resolution, noise_level=0). Its flux_pipeline_with_logprob module is not in the code index "
       "(its timestep schedule NOT READ); yifan123/flow_grpo@54809b5fcf4d3930d2a17fa553928704bd0b719e "
       "flow_grpo/diffusers_patch/sd3_sde_with_logprob.py sde_step_with_logprob() with noise_level 0 is the "
       "deterministic Euler step", max_sequence_length=128),
    _p("flow-factory-flux1-dev", "flux", 20, 3.5, GUIDANCE_SCALE, 512,
       f"{FF} examples/grpo/lora/flux1/default.yaml:91-94 (eval 512 px, guidance 3.5, 20 steps); "
       "src/flow_factory/models/flux/flux1.py:104 (pipeline's own encode_prompt: default text length)"),
    _p("pref-grpo-flux1-dev", "flux", 30, 3.5, GUIDANCE_SCALE, 1024,
       f"{PG} inference/py/flux_multi_node_inference.py:156-160 (1024x1024, guidance 3.5, 30 steps, "
       "max_sequence_length 512)", max_sequence_length=512),
    _p("tempflow-grpo-flux1-dev", "flux", 50, 3.5, GUIDANCE_SCALE, 1024,
       f"{TEMPFLOW_CONFIG}:269-270,273 flux() and :318-319,322 flux_pr() (eval_num_steps 50, guidance_scale 3.5, "
       "resolution 1024; "
       "scripts/multi_node/train_flux.sh and train_flux_pr.sh at e66824e select them); "
       f"{TEMPFLOW_SD3_FLUX} scripts/train_flux.py:231,236-246 eval() (prompt embeds only, max_sequence_length=128, "
       "height=width=resolution, determistic=True; "
       f"{TEMPFLOW}@28a9b9beb2a8536ece40909509fdf3f0fdfe839c scripts/train_flux_pr.py:232,237-247 the same); "
       f"{TEMPFLOW_SD3_FLUX} flow_grpo/diffusers_patch/flux_pipeline_with_logprob.py pipeline_with_logprob() (sigmas "
       f"linspace(1, 1/N, N) with the pipeline's mu shift, as FluxPipeline) and {TEMPFLOW_STEP}: the same "
       "deterministic sampler as the diffusers pipeline",
       max_sequence_length=128),
    _p("dancegrpo-flux1-dev", "flux", 50, 3.5, GUIDANCE_SCALE, 1024,
       f"{DANCEGRPO_COMMIT} scripts/visualization/vis_flux.py:59-65 (its FLUX sampling script: guidance 3.5, "
       "1024x1024, 50 steps, max_sequence_length 512)", max_sequence_length=512),
)
KONTEXT_PRESETS = (
    _p("flow_grpo-kontext", "flux-kontext", 28, 2.5, GUIDANCE_SCALE, 512,
       f"{FLOW_GRPO_INDEX_COMMIT} config/grpo.py counting_flux_kontext() (eval_num_steps 28, guidance_scale 2.5, "
       f"resolution 512; read from the code index, line not resolved); {FLOW_GRPO_KONTEXT_COMMIT} "
       "scripts/train_flux_kontext.py:186,191,196-208 eval(): reference image resized to resolution^2, "
       "max_sequence_length=128, height=width=resolution, max_area=resolution^2, noise_level=0 (its "
       "flux_kontext_pipeline_with_logprob module is not in the code index)",
       max_sequence_length=128),
    _p("flow-factory-kontext", "flux-kontext", 20, 2.5, GUIDANCE_SCALE, 512,
       f"{FF} examples/grpo/lora/flux1_kontext/default.yaml:92-96 (eval 512 px, condition image 512, guidance "
       "2.5, 20 steps); src/flow_factory/models/flux/flux1_kontext.py:348 (max_sequence_length 512)",
       max_sequence_length=512),
)
FLUX2_PRESETS = (
    _p("flow-factory-flux2", "flux2", 28, 4.0, GUIDANCE_SCALE, 1024,
       f"{FF} examples/grpo/lora/flux2/t2i.yaml:96-99 (eval 1024 px, guidance 4, 28 steps); "
       "src/flow_factory/models/flux/flux2.py:650 (max_sequence_length 512)", max_sequence_length=512),
)
KLEIN_PRESETS = (
    _p("flow-factory-klein", "flux2-klein", 10, 1.0, GUIDANCE_SCALE, 1024,
       f"{FF} examples/grpo/lora/flux2_klein/default.yaml:97-102 (eval 1024 px, guidance 1.0, 10 steps); "
       "src/flow_factory/models/flux/flux2_klein.py:595 (max_sequence_length 512)", max_sequence_length=512),
    _p("flow-factory-klein-base", "flux2-klein", 28, 4.0, GUIDANCE_SCALE, 1024,
       f"{FF} examples/grpo/lora/flux2_klein_base/default.yaml:97-101 (eval 1024 px, guidance 4.0, 28 steps); "
       "src/flow_factory/models/flux/flux2_klein.py:595 (max_sequence_length 512)", max_sequence_length=512),
    _p("pref-grpo-klein", "flux2-klein", 50, 4.0, GUIDANCE_SCALE, 1024,
       f"{PG} inference/flux2_klein_dist_infer.sh:21-22 (guidance 4.0, 50 steps); "
       "inference/py/flux2_klein_multi_node_inference.py:175-176,180 (1024x1024, max_sequence_length 512)",
       max_sequence_length=512),
)
QWEN_PRESETS = (
    _p("flow_grpo-qwen-image", "qwen-image", 50, 4.0, TRUE_CFG_SCALE, 512,
       f"{FLOW_GRPO_INDEX_COMMIT} config/grpo.py pickscore_qwenimage() (eval_num_steps 50, guidance_scale 4, "
       "resolution 512; read from the code index, line not resolved). Its scripts/train_qwenimage.py is NOT READ "
       "(not in the code index for yifan123/flow_grpo, nor in the fetched snapshot " + FLOW_GRPO_COMMIT + "): "
       "the guidance taken as true CFG (Qwen-Image has no guidance embedding), negative prompt and text length "
       "left at normscope's and the pipeline's"),
    _p("flow-factory-qwen-image", "qwen-image", 28, 4.0, TRUE_CFG_SCALE, 1024,
       f"{FF} examples/grpo/lora/qwen_image/default.yaml:92-95 (eval 1024 px, guidance 4 = true CFG, 28 steps); "
       "src/flow_factory/models/qwen_image/qwen_image.py:171,309 (negative \"\", max_sequence_length 1024)",
       max_sequence_length=1024, negative_prompt=""),
    _p("pref-grpo-qwen-image", "qwen-image", 50, 4.0, TRUE_CFG_SCALE, None,
       f"{PG} inference/py/qwen_image_multi_node_inference.py:137,148,159-163 (negative \" \", 16:9 = 1664x928, "
       "50 steps, true_cfg_scale 4.0)", height=928, width=1664, negative_prompt=" "),
    _p("tempflow-grpo-qwen-image", "qwen-image", 50, 4.0, TRUE_CFG_SCALE, 512,
       f"{TEMPFLOW_CONFIG}:365-366,368 pickscore_qwenimage() and :404-405,407 pickscore_qwenimage_pr() "
       "(eval_num_steps 50, guidance_scale 4, "
       "resolution 512; scripts/multi_node/train_qwenimage.sh and train_qwenimage_pr.sh at "
       "00124911e7e84aad8a40d8867d4b99803c6bd5c6 select them); "
       f"{TEMPFLOW}@354fd3887e26b33caedc2baf48bf680f278541fe scripts/train_qwenimage.py:258-268 and "
       "scripts/train_qwenimage_pr.py eval() (negative_prompt \" \", true_cfg_scale=guidance_scale, "
       "height=width=resolution, determistic=True, max_sequence_length not passed: 512 by default; the _pr line "
       f"not resolved); {TEMPFLOW}@140045e1fe8f8c906897fc830bb7a1e4b5dafdd0 flow_grpo/diffusers_patch/"
       "qwenimage_pipeline_with_logprob.py pipeline_with_logprob(): the same sigmas, shift, true-CFG combination "
       "and per-token rescale to ||cond|| as QwenImagePipeline and the deterministic Euler step "
       f"({TEMPFLOW_SD3_FLUX} sd3_sde_with_logprob.py), but NOT the same calls: prompt and negative are encoded in "
       "one encode_prompt call and run as one batched transformer call (the negative padded to the batch's "
       "longest prompt); diffusers encodes and runs them apart", negative_prompt=" "),
)
QWEN_EDIT_PRESETS = (
    _p("flow-factory-qwen-image-edit", "qwen-image-edit", 40, 4.0, TRUE_CFG_SCALE, 1024,
       f"{FF} examples/grpo/lora/qwen_image_edit_plus/default.yaml:101-106 (eval 1024 px, condition image "
       "1024x1024, guidance 4 = true CFG, 40 steps, batch 1); "
       "src/flow_factory/models/qwen_image/qwen_image_edit_plus.py:250,642 (negative \"\", max_sequence_length 1024)",
       max_sequence_length=1024, negative_prompt=""),
)
Z_IMAGE_PRESETS = (
    _p("flow-factory-z-image", "z-image", 40, 4.0, GUIDANCE_SCALE, 1024,
       f"{FF} examples/grpo/lora/z_image/default.yaml:87-90 (eval 1024 px, guidance 4.0, 40 steps); "
       "src/flow_factory/models/z_image/z_image.py:148,211-215 (negative \"\", cfg_normalization off, "
       "cfg_truncation 1.0, max_sequence_length 512)",
       max_sequence_length=512, negative_prompt="", cfg_normalization=0.0, cfg_truncation=1.0),
    _p("flow-factory-z-image-turbo", "z-image", 10, 0.0, GUIDANCE_SCALE, 512,
       f"{FF} examples/grpo/lora/z_image_turbo/default.yaml:87-90 (eval 512 px, guidance 0, 10 steps); "
       "src/flow_factory/models/z_image/z_image.py:148,211-215 (as flow-factory-z-image)",
       max_sequence_length=512, negative_prompt="", cfg_normalization=0.0, cfg_truncation=1.0),
    _p("pref-grpo-z-image", "z-image", 20, 3.0, GUIDANCE_SCALE, 1024,
       f"{PG} inference/py/z_image_multi_node_inference.py:186-193 (1024x1024, guidance 3.0, 20 steps, "
       "max_sequence_length 512, no negative prompt, cfg_normalization off, cfg_truncation 1.0)",
       max_sequence_length=512, cfg_normalization=0.0, cfg_truncation=1.0),
)
WAN_PRESETS = (
    _p("flow_grpo-wan2.1", "wan", 50, 4.5, GUIDANCE_SCALE, None,
       f"{FLOW_GRPO_INDEX_COMMIT} config/grpo.py:29-42 (general_ocr_wan2_1: eval_num_steps 50, guidance 4.5, "
       "240x416, 33 frames; read from the code index); its train_wan2_1.py eval was NOT READ (negative prompt "
       "and text length left at the pipeline's)", height=240, width=416, num_frames=33),
    _p("flow-factory-wan2.1", "wan", 28, 5.0, GUIDANCE_SCALE, 480,
       f"{FF} examples/grpo/lora/wan21/t2v.yaml:95-100 (eval resolution 480 = 480x480, 13 frames, guidance 5.0, "
       "28 steps); src/flow_factory/models/wan/wan2_t2v.py:189,255 (negative \"\", max_sequence_length 512); "
       "examples/grpo/lora/wan21/t2v.yaml:91 (scheduler flow_shift 3.0), src/flow_factory/scheduler/loader.py:54-57 "
       "and src/flow_factory/models/abc.py:120 (the shipped scheduler class rebuilt with that flow_shift, and used "
       "for evaluation too)",
       num_frames=13, max_sequence_length=512, negative_prompt="", shift=3.0),
    _p("flow-factory-wan2.2-t2v", "wan", 28, 4.0, GUIDANCE_SCALE, 720,
       f"{FF} examples/grpo/lora/wan22/t2v.yaml:103-108 (eval 720 px, 21 frames, guidance 4.0, guidance_scale_2 "
       "3.0, 28 steps); src/flow_factory/models/wan/wan2_t2v.py:189,255 (negative \"\", max_sequence_length 512)",
       num_frames=21, guidance_2=3.0, max_sequence_length=512, negative_prompt=""),
    _p("pref-grpo-wan2.1", "wan", 50, 5.0, GUIDANCE_SCALE, None,
       f"{PG} inference/py/wan21_multi_node_inference.py:128-131,152-159,215-223 (Wan's negative prompt, "
       "480x832, 81 frames, guidance 5.0; num_inference_steps not passed: WanPipeline's 50)",
       height=480, width=832, num_frames=81, negative_prompt=WAN_NEGATIVE_EN),
    _p("pref-grpo-wan2.2", "wan", 50, 4.0, GUIDANCE_SCALE, None,
       f"{PG} inference/wan22_dist_infer.sh:6-7 (guidance 4.0, guidance_scale_2 3.0); "
       "inference/py/wan22_multi_node_inference.py:181-191,276-300 (Wan's negative prompt, 480x832, 81 frames; "
       "num_inference_steps not passed: WanPipeline's 50)",
       height=480, width=832, num_frames=81, guidance_2=3.0, negative_prompt=WAN_NEGATIVE_EN),
)
WAN_I2V_PRESETS = (
    _p("flow-factory-wan2.1-i2v", "wan-i2v", 28, 5.0, GUIDANCE_SCALE, 480,
       f"{FF} examples/grpo/lora/wan21/i2v.yaml:94-98 (eval 480 px, 5 frames, guidance 5.0, 28 steps); "
       "src/flow_factory/models/wan/wan2_i2v.py:230,451 (negative \"\", max_sequence_length 512)",
       num_frames=5, max_sequence_length=512, negative_prompt=""),
    _p("flow-factory-wan2.2-i2v", "wan-i2v", 28, 3.5, GUIDANCE_SCALE, 720,
       f"{FF} examples/grpo/lora/wan22/i2v.yaml:103-107 (eval 720 px, 21 frames, guidance 3.5, 28 steps; "
       "guidance_scale_2 unset = guidance_scale, wan2_i2v.py:460-461); src/flow_factory/models/wan/wan2_i2v.py:"
       "230,451 (negative \"\", max_sequence_length 512)",
       num_frames=21, max_sequence_length=512, negative_prompt=""),
)

# Wan: cond then uncond calls (CFG on from guidance_scale alone), 5-D latents (B, C, F, H, W). The model repos
# ship UniPCMultistepScheduler (flow_prediction, use_flow_sigmas, flow_shift 3-5); capture reads only the
# scheduler's input, so the multistep update does not matter. Wan2.2-A14B runs `transformer` while
# t >= boundary_ratio * 1000 and `transformer_2` after, guided by guidance_scale_2; TI2V-5B is a WanPipeline
# with expand_timesteps (one timestep per latent token) and needs nothing more here.
WAN_EXPERTS = (("transformer", "high_noise"), ("transformer_2", "low_noise"))
FLUX2_IMAGE_BOUNDS = (64, 8.0)  # Flux2ImageProcessor.check_image_input: min_side_length 64, max_aspect_ratio 8
WAN_GUIDANCE = (("low_noise", "guidance_scale_2"),)
FAMILIES: tuple[Family, ...] = (
    Family(
        name="sd3", title="Stable Diffusion 3 / 3.5",
        pipeline_classes=("StableDiffusion3Pipeline",), transformer_class="SD3Transformer2DModel",
        calls=BATCHED, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, size_patch=None,
        extra_call_kwarg="skip_layers", extra_scale_arg="skip_layer_guidance_scale", prompt_encoding=SD3_PROMPTS,
        presets=SD3_PRESETS,
    ),
    Family(
        name="flux", title="FLUX.1-dev / FLUX.1-schnell",
        size_rounds=True,
        pipeline_classes=("FluxPipeline",), transformer_class="FluxTransformer2DModel",
        calls=DISTILLED, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, true_cfg_arg=TRUE_CFG_SCALE,
        needs_negative_prompt=True, latent_layout="packed", patch_size=2, prompt_encoding=FLUX_PROMPTS,
        presets=FLUX_PRESETS,
    ),
    Family(
        name="flux-kontext", title="FLUX.1-Kontext",
        size_rounds=True,
        pipeline_classes=("FluxKontextPipeline",), transformer_class="FluxTransformer2DModel",
        calls=DISTILLED, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, true_cfg_arg=TRUE_CFG_SCALE,
        needs_negative_prompt=True, reference_tokens=True, latent_layout="packed", patch_size=2,
        area_arg="max_area", prompt_encoding=FLUX_PROMPTS,
        presets=KONTEXT_PRESETS, needs_image=True,
    ),
    Family(
        name="flux2", title="FLUX.2-dev",
        size_rounds=True,
        pipeline_classes=("Flux2Pipeline",), transformer_class="Flux2Transformer2DModel",
        calls=DISTILLED, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, reference_tokens=True,
        latent_layout="packed", patch_size=2, prompt_encoding=FLUX2_PROMPTS,
        presets=FLUX2_PRESETS, several_images=("Flux2Pipeline",), image_bounds=FLUX2_IMAGE_BOUNDS,
    ),
    Family(
        name="flux2-klein", title="FLUX.2-klein (distilled and base)",
        size_rounds=True,
        pipeline_classes=("Flux2KleinPipeline",), transformer_class="Flux2Transformer2DModel",
        calls=SEPARATE, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, reference_tokens=True,
        latent_layout="packed", patch_size=2, prompt_encoding=FLUX2_KLEIN_PROMPTS,
        presets=KLEIN_PRESETS, several_images=("Flux2KleinPipeline",), image_bounds=FLUX2_IMAGE_BOUNDS,
    ),
    Family(
        name="qwen-image", title="Qwen-Image / Qwen-Image-2512",
        size_rounds=True,
        pipeline_classes=("QwenImagePipeline",), transformer_class="QwenImageTransformer2DModel",
        calls=SEPARATE, combine=QWEN_RENORM, guidance_arg=TRUE_CFG_SCALE, needs_negative_prompt=True,
        latent_layout="packed", patch_size=2, prompt_encoding=QWEN_PROMPTS, vae_factor="temperal_downsample",
        presets=QWEN_PRESETS,
    ),
    Family(
        name="qwen-image-edit", title="Qwen-Image-Edit / Edit-Plus (2509, 2511)",
        size_rounds=True,
        pipeline_classes=("QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
        transformer_class="QwenImageTransformer2DModel",
        calls=SEPARATE, combine=QWEN_RENORM, guidance_arg=TRUE_CFG_SCALE, needs_negative_prompt=True,
        reference_tokens=True, latent_layout="packed", patch_size=2, vae_factor="temperal_downsample",
        presets=QWEN_EDIT_PRESETS, needs_image=True, image_per_sample=True,
        several_images=("QwenImageEditPlusPipeline",),  # Edit reads one image per prompt; Edit-Plus a list (batch 1)
    ),
    Family(
        name="z-image", title="Z-Image / Z-Image-Turbo",
        pipeline_classes=("ZImagePipeline",), transformer_class="ZImageTransformer2DModel",
        calls=BATCHED, combine=ZIMAGE, guidance_arg=GUIDANCE_SCALE, output_sign=-1,
        batch_order=("cond", "uncond"), input_form="list", latent_layout="list_c1hw",
        output_projection="all_final_layer.2-1.linear", cap_arg="cfg_normalization",
        prompt_encoding=Z_IMAGE_PROMPTS,
        presets=Z_IMAGE_PRESETS,
    ),
    Family(
        name="wan", title="Wan2.1 T2V / Wan2.2 T2V-A14B (two experts) / Wan2.2 TI2V-5B",
        pipeline_classes=("WanPipeline",), transformer_class="WanTransformer3DModel",
        calls=SEPARATE, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, experts=WAN_EXPERTS,
        expert_guidance=WAN_GUIDANCE, latent_layout="bcfhw", patch_size=2, prompt_encoding=WAN_PROMPTS,
        vae_factor="scale_factor_spatial", size_patch=None, size_floor=16, frames_factor=4,
        presets=WAN_PRESETS,
    ),
    Family(
        name="wan-i2v", title="Wan2.1 I2V / Wan2.2 I2V-A14B (image to video)",
        pipeline_classes=("WanImageToVideoPipeline",), transformer_class="WanTransformer3DModel",
        calls=SEPARATE, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, experts=WAN_EXPERTS,
        expert_guidance=WAN_GUIDANCE, latent_layout="bcfhw", patch_size=2, call_requires=("ftfy",),
        vae_factor="scale_factor_spatial", size_patch=None, size_floor=16, frames_factor=4,
        presets=WAN_I2V_PRESETS, needs_image=True,
    ),
)

# ---- issue 19: the models the trainers tune now. Rows kept in their own block (appended to FAMILIES).
# Wan video-to-video (Flow-Factory's Wan2.1 V2V): the T2V loop (cond, then uncond; linear) on the noised latents
# of an input video; `strength` (0.8 by default) skips the first steps, so the run makes int(steps * strength).
# Presets of the issue-19 families (their trainers' evaluation; read at the commits named, as the presets above).
WAN_V2V_PRESETS = (
    _p("flow-factory-wan2.1-v2v", "wan-v2v", 28, 5.0, GUIDANCE_SCALE, 480,
       f"{FF} examples/grpo/lora/wan21/v2v.yaml:94-98 (eval resolution 480 = 480x480, guidance 5.0, 28 steps; no "
       "eval strength: train.strength 0.8 at :55 is the rollouts'); src/flow_factory/models/wan/wan2_v2v.py:289 "
       "(inference strength 0.8), :299 (max_sequence_length 512), :209 (negative \"\"). Frames: the input video's. "
       "examples/grpo/lora/wan21/v2v.yaml:91 (scheduler flow_shift 3.0; src/flow_factory/scheduler/loader.py:54-57 "
       "rebuilds the shipped scheduler with it, for evaluation too)",
       strength=0.8, max_sequence_length=512, negative_prompt="", shift=3.0),
)
NEW_FAMILIES: tuple[Family, ...] = (
    Family(
        name="wan-v2v", title="Wan2.1 video to video",
        pipeline_classes=("WanVideoToVideoPipeline",), transformer_class="WanTransformer3DModel",
        calls=SEPARATE, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, latent_layout="bcfhw", patch_size=2,
        prompt_encoding=WAN_PROMPTS, video_arg="video",
        vae_factor="scale_factor_spatial", size_patch=None, size_floor=16, frames_factor=4,
        presets=WAN_V2V_PRESETS,
    ),
)
# HunyuanVideo (DanceGRPO's video model): guidance-distilled like FLUX.1 (guidance_scale is a transformer input);
# true_cfg_scale > 1 with a negative prompt adds a second call (cond, then negative), neg + w (cond - neg).
HUNYUAN_VIDEO_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"),
    negative_outputs=("negative_prompt_embeds", "negative_pooled_prompt_embeds", "negative_prompt_attention_mask"),
    fixed=(("prompt_2", None), ("num_videos_per_prompt", 1)),
)
HUNYUAN_VIDEO_PRESETS = (
    _p("dancegrpo-hunyuan-video", "hunyuan-video", 20, 6.0, GUIDANCE_SCALE, 480,
       f"{DANCEGRPO_COMMIT} scripts/inference/inference_hunyuan_hf.sh:21-27 (its HunyuanVideo sampling script: "
       "480x480, 16 frames, 20 steps); fastvideo/sample/sample_t2v_hunyuan_hf.py:118-126 (no guidance, no true "
       "CFG passed); fastvideo/models/hunyuan_hf/pipeline_hunyuan.py:503,519 (its pipeline's embedded guidance 6.0, "
       "max_sequence_length 256). Not carried: the scheduler shift (this path sets none, the model folder's; "
       "sample_t2v_hunyuan_hf.py:175 sets flow_shift only when quantized) and its pre-encoded prompts "
       "(--prompt_embed_path, :77-85); training rollouts differ (finetune_hunyuan_grpo.sh: 16 steps, shift 5)",
       num_frames=16, max_sequence_length=256),
)
NEW_FAMILIES += (
    Family(
        name="hunyuan-video", title="HunyuanVideo (text to video)",
        pipeline_classes=("HunyuanVideoPipeline",), transformer_class="HunyuanVideoTransformer3DModel",
        calls=DISTILLED, combine=LINEAR, guidance_arg=GUIDANCE_SCALE, true_cfg_arg=TRUE_CFG_SCALE,
        needs_negative_prompt=True, latent_layout="bcfhw", patch_size=2, prompt_encoding=HUNYUAN_VIDEO_PROMPTS,
        vae_factor="spatial_compression_ratio", size_patch=None, size_floor=16, frames_factor=4,
        presets=HUNYUAN_VIDEO_PRESETS,
    ),
)
# Qwen-Image-2.1 (Flow-Factory): two calls (cond, then negative) with true_cfg_scale > 1 and a negative prompt,
# neg + w (cond - neg) with NO renormalisation; the output is sliced to its LAST N tokens (the prefill step returns
# the text tokens too, condition-image tokens come first); the per-model KV cache (kv_cache) is private state.
QWEN_IMAGE21_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "prompt_embeds_mask", None),  # image_pad_mask: rebuilt by the call (text only)
    negative_outputs=("negative_prompt_embeds", "negative_prompt_embeds_mask", None),
    fixed=(("num_images_per_prompt", 1),),
    reads_images=True,  # condition images are encoded with the prompt: no cache for a run with images
)
# Flow-Factory's Qwen-Image-2.1 recipe (read in the code index; the fetched snapshot has no Qwen-Image-2.1 adapter).
FF_QWEN21_CONFIG = "X-GenGroup/Flow-Factory@5f6cda1a3e6be3c971643beb8d1e92e7be4a9638"
FF_QWEN21_ADAPTER = "X-GenGroup/Flow-Factory@339884bffc47439140da3850ba68a17bb2fc1ee5"
QWEN_IMAGE21_PRESETS = (
    _p("flow-factory-qwen-image-2.1", "qwen-image-2.1", 40, 1.0, TRUE_CFG_SCALE, 1024,
       f"{FF_QWEN21_CONFIG} examples/grpo/lora/qwen_image_2_1/default.yaml:96-101 (eval resolution 1024, "
       "condition_image_size [1024, 1024], guidance_scale 1.0, 40 steps, batch 1; its eval set is an editing "
       "dataset: pass its (prompt, image) pairs); "
       f"{FF_QWEN21_ADAPTER} src/flow_factory/models/qwen_image_21/qwen_image_21.py inference() and encode_prompt() "
       "(guidance <= 1: one transformer call, no negative prompt encoded; one sample per call without the prefix "
       "KV cache, which QwenImage21Pipeline uses and Flow-Factory calls lossless; text length not set)"),
)
NEW_FAMILIES += (
    Family(
        name="qwen-image-2.1", title="Qwen-Image-2.1",
        pipeline_classes=("QwenImage21Pipeline",), transformer_class="QwenImage21Transformer2DModel",
        calls=SEPARATE, combine=LINEAR, guidance_arg=TRUE_CFG_SCALE, needs_negative_prompt=True,
        reference_tokens=True, token_slice="last", private_state_kwargs=("kv_cache",),
        latent_layout="packed", patch_size=1, prompt_encoding=QWEN_IMAGE21_PROMPTS,
        vae_factor="scale_factor_spatial", size_patch=2, size_floor=32,
        several_images=("QwenImage21Pipeline",), condition_size_arg="output_resolution",
        presets=QWEN_IMAGE21_PRESETS,
    ),
)
# LTX-2 (Flow-Factory's text-to-audio+video model): one transformer call returns a video AND an audio velocity,
# each stepped by its own scheduler (the audio one a copy made in the call). With defaults, three calls per step:
# CFG on the batch [negative, positive], STG (spatio_temporal_guidance_blocks set) and modality isolation
# (isolate_modalities=True); combined in x0 space and rescaled toward cond (guidance_rescale, audio_*).
LTX2_PROMPTS = PromptEncoding(
    method="encode_prompt",
    outputs=("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
    negative_keyword="negative_prompt",
    fixed=(("do_classifier_free_guidance", True), ("num_videos_per_prompt", 1)),
    sets=(("tokenizer", "padding_side", "left"),),
)
# Flow-Factory evaluates LTX-2 with its own loop written after LTX2Pipeline (x0-space CFG + STG + modality); its null
# audio settings take the video's value (ltx2_t2av.py:724-727), which LTX2Pipeline does for an audio setting of 0.
LTX2_PRESETS = (
    _p("flow-factory-ltx2", "ltx2", 50, 4.0, GUIDANCE_SCALE, None,
       f"{FF} examples/grpo/lora/ltx2/t2av.yaml:107-124 (eval 512x768, 121 frames, frame_rate 24.0, guidance 4.0, "
       "stg_scale 0.0, modality_scale 1.0, guidance_rescale 0.0, audio_* null, 50 steps); "
       "src/flow_factory/models/ltx2/ltx2_t2av.py:724-727 (a null audio setting is the video's: carried as 0, "
       "which LTX2Pipeline reads the same way), :1010 (max_sequence_length 1024), :428 (negative \"\"); STG off "
       "(stg 0, audio 0), so no blocks; :996 inference(use_cross_timestep=False; LTX2Pipeline's default True is "
       "LTX-2.3's). Its scheduler section (dynamics_type CPS, noise_level 0.8) is the training rollouts'",
       height=512, width=768, num_frames=121, frame_rate=24.0, max_sequence_length=1024, negative_prompt="", cross_timestep=False,
       stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0, audio_guidance=0.0, audio_stg_scale=0.0,
       audio_modality_scale=0.0, audio_guidance_rescale=0.0),
)
NEW_FAMILIES += (
    Family(
        name="ltx2", title="LTX-2 (text to video + audio)",
        pipeline_classes=("LTX2Pipeline",), transformer_class="LTX2VideoTransformer3DModel",
        calls=BATCHED, combine=LTX2_X0, guidance_arg=GUIDANCE_SCALE, batch_order=("uncond", "cond"),
        latent_layout="packed_fhw", patch_size=1, prompt_encoding=LTX2_PROMPTS,
        streams=("video", "audio"), stream_prefix=(("audio", "audio_"),),
        call_markers=(("spatio_temporal_guidance_blocks", "stg"), ("isolate_modalities", "modality")),
        rule_args=(("stg", "stg_scale"), ("modality", "modality_scale"), ("rescale", "guidance_rescale")),
        vae_factor="spatial_compression_ratio", size_patch=1, size_floor=32, frames_factor=8,
        presets=LTX2_PRESETS,
    ),
)
FAMILIES = FAMILIES + NEW_FAMILIES

_BY_CLASS = {cls: family for family in FAMILIES for cls in family.pipeline_classes}
_BY_NAME = {family.name: family for family in FAMILIES}
PRESETS: dict[str, Preset] = {preset.name: preset for family in FAMILIES for preset in family.presets}


def supported() -> str:
    """The supported families and their pipeline classes, for error messages."""
    return "; ".join(f"{f.name} ({', '.join(f.pipeline_classes)})" for f in FAMILIES)


def family_named(name: str) -> Family:
    if name not in _BY_NAME:
        raise InputError(f"unknown family {name!r}: the families are {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def family_for(pipeline_class: str) -> Family:
    """The row for a pipeline class name; unknown classes refused in one line listing the families."""
    family = _BY_CLASS.get(pipeline_class)
    if family is not None:
        return family
    import diffusers

    if not hasattr(diffusers, pipeline_class):
        raise InputError(
            f"pipeline class {pipeline_class} is not in the installed diffusers {diffusers.__version__} "
            f"(and normscope has no row for it): normscope measures {supported()}"
        )
    raise InputError(f"normscope has no family row for pipeline class {pipeline_class}: it measures {supported()}")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None


def family_of_folder(folder: str | Path) -> Family:
    """The family of a local pipeline folder, from its ``model_index.json`` alone (no weight is read)."""
    index = Path(folder) / "model_index.json"
    name = _read_json(index, "pipeline index").get("_class_name")
    if not isinstance(name, str):
        raise InputError(f"{index} names no pipeline class (_class_name): pass a diffusers pipeline folder")
    family = family_for(name)
    check_requirements(family)
    for attr, _ in family.experts:
        config = Path(folder) / attr / "config.json"
        if config.is_file():
            check_transformer_class(family, _read_json(config, "transformer config").get("_class_name"), str(config))
    return family


def _patch(value, default: int) -> int:
    """The spatial patch of a transformer config's ``patch_size``: an int (SD3) or (t, h, w) (Wan)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[-1], int) and value[-1] > 0:
        return value[-1]
    return default


def size_rule(family: Family, folder: str | Path | None) -> tuple[int, int | None]:
    """(the multiple ``--height``/``--width`` must be, the frame factor of ``--num-frames`` or None).

    Read from the pipeline folder's ``vae/config.json`` and ``transformer/config.json`` the way the pipeline
    computes them, without loading any weight; a hub id (no local folder) or a missing config takes the
    values of the released models (VAE factor 8, patch 2, frame factor 4).
    """
    root = Path(folder) if folder is not None and Path(folder).is_dir() else None

    def config(name: str) -> dict:
        path = root / name / "config.json" if root is not None else None
        if path is None or not path.is_file():
            return {}
        found = _read_json(path, f"{name} config")
        return found if isinstance(found, dict) else {}

    vae = config("vae")
    factor = 8
    value = vae.get(family.vae_factor)
    if family.vae_factor == "block_out_channels" and isinstance(value, list):
        factor = 2 ** max(len(value) - 1, 0)
    elif family.vae_factor == "temperal_downsample" and isinstance(value, list):
        factor = 2 ** len(value)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:  # scale_factor_spatial, spatial_compression_ratio
        factor = value
    patch = family.size_patch or _patch(config(family.experts[0][0]).get("patch_size"), 2)
    multiple = math.lcm(max(factor * patch, 1), family.size_floor)
    frames = None
    if family.frames_factor is not None:
        keys = [k for k in ("scale_factor_temporal", "temporal_compression_ratio") if k in vae]
        stated = [vae[k] for k in keys if isinstance(vae[k], int) and not isinstance(vae[k], bool) and vae[k] > 0]
        # 0: a video family whose VAE config leaves the factor to be computed at load (LTX-2's null): no check
        frames = stated[0] if stated else 0 if keys else family.frames_factor
    return multiple, frames


def nearest_multiples(value: int, multiple: int) -> str:
    """'48 or 64' for 63 and 16; '16' for 5 and 16."""
    low, high = value // multiple * multiple, (value // multiple + 1) * multiple
    return f"{low} or {high}" if low > 0 else str(high)


def check_requirements(family: Family) -> None:
    """Refuse, before loading, a pipeline whose call would fail on a missing package (one line with the fix)."""
    import importlib.util

    for package in family.call_requires:
        if importlib.util.find_spec(package) is None:
            raise InputError(
                f"{family.pipeline_classes[0]} ({family.name}) imports {package} when it runs and {package} is not "
                f"installed: pip install {package} (a dependency of normscope; the environment lacks it)"
            )


def check_transformer_class(family: Family, class_name: str | None, where: str) -> None:
    """Refuse, before loading, a transformer config of another family's class (``_class_name``)."""
    if class_name is None or class_name == family.transformer_class:
        return
    owners = sorted({f.name for f in FAMILIES if f.transformer_class == class_name})
    owner = f" (a {', '.join(owners)} transformer)" if owners else ""
    raise InputError(
        f"{where} is a {class_name}{owner}, but the pipeline is {family.name}, whose transformer is "
        f"{family.transformer_class}: pass a checkpoint of the same family or the --pipeline it was trained from"
    )


def check_checkpoint_config(family: Family, path: str | Path, role: str) -> None:
    """Check the ``config.json`` that sits with a full checkpoint (folder or file), if any, against the row."""
    path = Path(path)
    candidates = [path / "config.json"] if path.is_dir() else [path.parent / "config.json"]
    if path.is_dir():
        candidates += [path / attr / "config.json" for attr, _ in family.experts]
    for config in candidates:
        if config.is_file():
            data = _read_json(config, f"{role} config")
            if "_class_name" in data and "Pipeline" not in str(data["_class_name"]):
                check_transformer_class(family, data["_class_name"], f"{role} {config}")
    index = path / "model_index.json" if path.is_dir() else None
    if index is not None and index.is_file():
        other = family_of_folder(path)
        if other.name != family.name:
            raise InputError(
                f"{role} {path} is a {other.name} pipeline, but the pipeline is {family.name}: "
                "pass a checkpoint of the same family"
            )


def preset_named(name: str) -> Preset:
    """A preset by name; unknown names refused with the list of presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown --preset {name!r}: run `normscope presets` to list them ({', '.join(PRESETS)})")
    return PRESETS[name]


def check_preset(preset: Preset, family: Family) -> None:
    """A preset of another family is refused before any weight loads."""
    if preset.family != family.name:
        raise ConfigError(
            f"--preset {preset.name} is for {preset.family} pipelines, but the pipeline is {family.name}: "
            f"use one of {', '.join(p.name for p in family.presets) or '(none for this family)'} or set the options"
        )
