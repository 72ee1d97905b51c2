"""Presets are the trainers' evaluation (issue 19): the FULL keyword set each preset hands to the pipeline call,
checked against a table written by hand from the trainers' sources (repository, file:line, commit in the
preset's ``source``), and every source names where it was read or says it was not.

The call is built by normscope's own ``sampling_kwargs`` for an instance of the real diffusers pipeline class
(its real ``__call__`` signature), so what is checked is exactly what the pipeline would receive.
"""

from __future__ import annotations

import re

import diffusers
import pytest
from PIL import Image

from normscope.config import ProbeConfig
from normscope.load.families import FAMILIES, PRESETS, family_named
from normscope.measure.prompts import Sample
from normscope.measure.sampling import sampling_kwargs

# The Wan negative prompt Pref-GRPO's inference scripts pass (inference/py/wan21_multi_node_inference.py:128).
WAN_NEG = ("Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
           "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
           "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
           "background, three legs, many people in the background, walking backwards")

# preset -> every keyword of the pipeline call besides prompt, generator and output_type (and image, checked apart).
# Written from the sources, not from normscope: a preset that loses or adds a keyword fails here.
CALLS = {
    # flow_grpo@ac4c86e config/grpo.py:77-80, scripts/train_sd3.py:220,238 (128 tokens, "" negative)
    "flow_grpo-sd3.5m": dict(num_inference_steps=40, guidance_scale=4.5, height=512, width=512,
                             max_sequence_length=128, negative_prompt=[""]),
    "flow_grpo-sd3.5m-nocfg": dict(num_inference_steps=40, guidance_scale=1.0, height=512, width=512,
                                   max_sequence_length=128, negative_prompt=[""]),
    # DiffusionNFT@24af555 config/nft.py:21,23,64; scripts/train_nft_sd3.py:226,255
    "diffusionnft-sd3.5m": dict(num_inference_steps=40, guidance_scale=1.0, height=512, width=512,
                                max_sequence_length=128, negative_prompt=[""]),
    # AWM@be51372 config/dgx_awm.py:38-43; scripts/train_sd3_awm.py:287,305
    "awm-sd3.5m": dict(num_inference_steps=40, guidance_scale=1.0, height=512, width=512,
                       max_sequence_length=128, negative_prompt=[""]),
    # Flow-Factory@a0b2bc5 examples/grpo/lora/sd3_5/{default,nocfg}.yaml eval; models/stable_diffusion/sd3_5.py:92
    "flow-factory-sd3.5": dict(num_inference_steps=40, guidance_scale=4.5, height=512, width=512,
                               max_sequence_length=512, negative_prompt=[""]),
    "flow-factory-sd3.5-nocfg": dict(num_inference_steps=40, guidance_scale=1.0, height=512, width=512,
                                     max_sequence_length=512, negative_prompt=[""]),
    # TempFlow-GRPO@63e4def config/dgx.py:93-97,135-139 (geneval_sd3{,_pr}); @e66824e scripts/train_sd3.py:227,245,
    # 254-267 and train_sd3_pr.py:227,245,253-266 (128 tokens, "" negative)
    "tempflow-grpo-sd3.5m": dict(num_inference_steps=40, guidance_scale=4.5, height=512, width=512,
                                 max_sequence_length=128, negative_prompt=[""]),
    # flow_grpo@31c71b9 config/grpo.py pickscore_flux(); @74db691 scripts/train_flux.py:193,198-208 (128 tokens)
    "flow_grpo-flux1-dev": dict(num_inference_steps=28, guidance_scale=3.5, height=512, width=512,
                                max_sequence_length=128),
    # Flow-Factory flux1/default.yaml:91-94
    "flow-factory-flux1-dev": dict(num_inference_steps=20, guidance_scale=3.5, height=512, width=512),
    # Pref-GRPO@3e787f6 inference/py/flux_multi_node_inference.py:156-160
    "pref-grpo-flux1-dev": dict(num_inference_steps=30, guidance_scale=3.5, height=1024, width=1024,
                                max_sequence_length=512),
    # TempFlow-GRPO@63e4def config/dgx.py:269-273,318-322 (flux{,_pr}); @e66824e scripts/train_flux.py:231,236-246
    # (128 tokens, prompt embeds only)
    "tempflow-grpo-flux1-dev": dict(num_inference_steps=50, guidance_scale=3.5, height=1024, width=1024,
                                    max_sequence_length=128),
    # DanceGRPO@15cc71d scripts/visualization/vis_flux.py:59-65
    "dancegrpo-flux1-dev": dict(num_inference_steps=50, guidance_scale=3.5, height=1024, width=1024,
                                max_sequence_length=512),
    # flow_grpo@31c71b9 config/grpo.py counting_flux_kontext(); @74db691 scripts/train_flux_kontext.py:186,191,196-208
    # (128 tokens, reference image resized to 512x512, max_area 512^2)
    "flow_grpo-kontext": dict(num_inference_steps=28, guidance_scale=2.5, height=512, width=512,
                              max_sequence_length=128, max_area=512 * 512, _auto_resize=False),
    # Flow-Factory flux1_kontext/default.yaml:92-96 (512 px: max_area 512^2), flux1_kontext.py:348
    "flow-factory-kontext": dict(num_inference_steps=20, guidance_scale=2.5, height=512, width=512,
                                 max_sequence_length=512, max_area=512 * 512, _auto_resize=False),
    # Flow-Factory flux2/t2i.yaml:96-99, flux2.py:650
    "flow-factory-flux2": dict(num_inference_steps=28, guidance_scale=4.0, height=1024, width=1024,
                               max_sequence_length=512),
    # Flow-Factory flux2_klein{,_base}/default.yaml; flux2_klein.py:595
    "flow-factory-klein": dict(num_inference_steps=10, guidance_scale=1.0, height=1024, width=1024,
                               max_sequence_length=512),
    "flow-factory-klein-base": dict(num_inference_steps=28, guidance_scale=4.0, height=1024, width=1024,
                                    max_sequence_length=512),
    # Pref-GRPO flux2_klein_dist_infer.sh:21-22, flux2_klein_multi_node_inference.py:175-180
    "pref-grpo-klein": dict(num_inference_steps=50, guidance_scale=4.0, height=1024, width=1024,
                            max_sequence_length=512),
    # Qwen: CFG is true_cfg_scale and runs only with a negative prompt (" " when the trainer gives none)
    # flow_grpo@31c71b9 config/grpo.py pickscore_qwenimage() (its train_qwenimage.py not in the code index)
    "flow_grpo-qwen-image": dict(num_inference_steps=50, true_cfg_scale=4.0, height=512, width=512,
                                 negative_prompt=[" "]),
    # Flow-Factory qwen_image/default.yaml:92-95, qwen_image.py:171,309
    "flow-factory-qwen-image": dict(num_inference_steps=28, true_cfg_scale=4.0, height=1024, width=1024,
                                    max_sequence_length=1024, negative_prompt=[""]),
    # Pref-GRPO qwen_image_multi_node_inference.py:137,148,159-163 (16:9 = width 1664, height 928)
    "pref-grpo-qwen-image": dict(num_inference_steps=50, true_cfg_scale=4.0, height=928, width=1664,
                                 negative_prompt=[" "]),
    # TempFlow-GRPO@63e4def config/dgx.py:365-368,404-407 (pickscore_qwenimage{,_pr}); @354fd38
    # scripts/train_qwenimage.py:258-268 (negative " ", true_cfg_scale, text length not passed)
    "tempflow-grpo-qwen-image": dict(num_inference_steps=50, true_cfg_scale=4.0, height=512, width=512,
                                     negative_prompt=[" "]),
    # Flow-Factory qwen_image_edit_plus/default.yaml:101-106, qwen_image_edit_plus.py:250,642
    "flow-factory-qwen-image-edit": dict(num_inference_steps=40, true_cfg_scale=4.0, height=1024, width=1024,
                                         max_sequence_length=1024, negative_prompt=[""]),
    # Flow-Factory z_image{,_turbo}/default.yaml, z_image.py:148,211-215
    "flow-factory-z-image": dict(num_inference_steps=40, guidance_scale=4.0, height=1024, width=1024,
                                 max_sequence_length=512, negative_prompt=[""], cfg_normalization=0.0,
                                 cfg_truncation=1.0),
    "flow-factory-z-image-turbo": dict(num_inference_steps=10, guidance_scale=0.0, height=512, width=512,
                                       max_sequence_length=512, negative_prompt=[""], cfg_normalization=0.0,
                                       cfg_truncation=1.0),
    # Pref-GRPO z_image_multi_node_inference.py:186-193
    "pref-grpo-z-image": dict(num_inference_steps=20, guidance_scale=3.0, height=1024, width=1024,
                              max_sequence_length=512, cfg_normalization=0.0, cfg_truncation=1.0),
    # flow_grpo@31c71b9 config/grpo.py:29-42 (general_ocr_wan2_1)
    "flow_grpo-wan2.1": dict(num_inference_steps=50, guidance_scale=4.5, height=240, width=416, num_frames=33),
    # Flow-Factory wan21/t2v.yaml:95-100 (480 = 480x480, 13 frames), wan2_t2v.py:189,255
    "flow-factory-wan2.1": dict(num_inference_steps=28, guidance_scale=5.0, height=480, width=480, num_frames=13,
                                max_sequence_length=512, negative_prompt=[""]),
    # Flow-Factory wan22/t2v.yaml:103-108
    "flow-factory-wan2.2-t2v": dict(num_inference_steps=28, guidance_scale=4.0, guidance_scale_2=3.0, height=720,
                                    width=720, num_frames=21, max_sequence_length=512, negative_prompt=[""]),
    # Pref-GRPO wan21_multi_node_inference.py:128-131,152-159,215-223 (steps not passed: Wan's 50)
    "pref-grpo-wan2.1": dict(num_inference_steps=50, guidance_scale=5.0, height=480, width=832, num_frames=81,
                             negative_prompt=[WAN_NEG]),
    # Pref-GRPO wan22_dist_infer.sh:6-7, wan22_multi_node_inference.py:181-191
    "pref-grpo-wan2.2": dict(num_inference_steps=50, guidance_scale=4.0, guidance_scale_2=3.0, height=480,
                             width=832, num_frames=81, negative_prompt=[WAN_NEG]),
    # Flow-Factory wan21/i2v.yaml:94-98, wan22/i2v.yaml:103-107, wan2_i2v.py:230,451
    "flow-factory-wan2.1-i2v": dict(num_inference_steps=28, guidance_scale=5.0, height=480, width=480, num_frames=5,
                                    max_sequence_length=512, negative_prompt=[""]),
    "flow-factory-wan2.2-i2v": dict(num_inference_steps=28, guidance_scale=3.5, height=720, width=720,
                                    num_frames=21, max_sequence_length=512, negative_prompt=[""]),
    # ---- issue 19 families
    # Flow-Factory ltx2/t2av.yaml:107-124 (eval), ltx2_t2av.py:428,724-727,1010: audio null = the video's value,
    # which LTX2Pipeline reads from an audio setting of 0 (audio_x or x); STG off (0, 0), modality off (1)
    "flow-factory-ltx2": dict(num_inference_steps=50, guidance_scale=4.0, height=512, width=768, num_frames=121,
                              frame_rate=24.0, max_sequence_length=1024, negative_prompt=[""], stg_scale=0.0,
                              modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=0.0, audio_stg_scale=0.0,
                              audio_modality_scale=0.0, audio_guidance_rescale=0.0, use_cross_timestep=False),
    # Flow-Factory@5f6cda1 qwen_image_2_1/default.yaml:96-101 (1024 px, guidance 1.0 = no CFG, 40 steps)
    "flow-factory-qwen-image-2.1": dict(num_inference_steps=40, true_cfg_scale=1.0, height=1024, width=1024),
    # Flow-Factory wan21/v2v.yaml:94-98 (480 = 480x480, guidance 5.0, 28 steps), wan2_v2v.py:209,289,299
    "flow-factory-wan2.1-v2v": dict(num_inference_steps=28, guidance_scale=5.0, height=480, width=480, strength=0.8,
                                    max_sequence_length=512, negative_prompt=[""]),
    # DanceGRPO inference_hunyuan_hf.sh:24-27 (16 frames, 480x480, 20 steps); its pipeline_hunyuan.py:503,519
    "dancegrpo-hunyuan-video": dict(num_inference_steps=20, guidance_scale=6.0, height=480, width=480, num_frames=16,
                                    max_sequence_length=256),
}
IMAGE_FAMILIES = {"flux-kontext", "qwen-image-edit", "wan-i2v"}
VIDEO_FAMILIES = {"wan-v2v"}  # the input video is checked apart, like the image

# preset -> the scheduler shift its trainer's evaluation samples with, where it overrides the shipped one (issue 19;
# not a call keyword: normscope rebuilds the scheduler with it). Every other preset: None (the shipped shift).
SHIFTS = {
    # Flow-Factory@a0b2bc5 examples/grpo/lora/wan21/t2v.yaml:91 (scheduler flow_shift 3.0), scheduler/loader.py:54-57
    "flow-factory-wan2.1": 3.0,
    # Flow-Factory@a0b2bc5 examples/grpo/lora/wan21/v2v.yaml:91 (scheduler flow_shift 3.0), the same loader
    "flow-factory-wan2.1-v2v": 3.0,
}


def stub_pipeline(family_name: str):
    """An instance of the family's real diffusers pipeline class, never initialised: only its call signature and
    the size attributes sampling_kwargs reads are used (nothing is loaded)."""
    cls = getattr(diffusers, family_named(family_name).pipeline_classes[0])
    pipe = object.__new__(cls)
    pipe.__dict__.update(vae_scale_factor=8, default_sample_size=128)
    return pipe


def test_every_preset_is_in_the_table():
    assert set(CALLS) == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_hands_the_pipeline_exactly_the_trainers_keywords(name, tmp_path):
    preset = PRESETS[name]
    image = None
    if preset.family in IMAGE_FAMILIES:
        image = tmp_path / "ref.png"
        Image.new("RGB", (32, 32), (10, 20, 30)).save(image)
    video = None
    if preset.family in VIDEO_FAMILIES:
        video = tmp_path / "video"
        video.mkdir()
        for i in range(5):
            Image.new("RGB", (32, 32), (i, 20, 30)).save(video / f"{i:02d}.png")
    probe = ProbeConfig(preset=name, prompts=("a fox",), seeds=(0,), image=image, video=video)
    call = sampling_kwargs(stub_pipeline(preset.family), probe, [Sample(0, "a fox", 0)])
    if video is not None:
        assert [len(frames) for frames in call.pop("video")] == [5]
    assert call.pop("prompt") == ["a fox"] and call.pop("output_type") == "latent"
    assert len(call.pop("generator")) == 1
    if image is not None:
        given = call.pop("image")
        if preset.family == "flux-kontext" and preset.size is not None:  # resized to the eval size (flow_grpo, FF)
            assert given.size == (preset.size, preset.size)
    assert call == CALLS[name]


def test_a_preset_carries_exactly_its_trainers_scheduler_shift():
    assert set(SHIFTS) <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.shift == SHIFTS.get(name), name
        assert ProbeConfig(preset=name).shift == SHIFTS.get(name), name


def test_every_source_names_repository_file_and_commit_or_says_it_was_not_read():
    full = re.compile(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}\b")
    for preset in PRESETS.values():
        unread = "NOT READ" in preset.source or "no code" in preset.source
        assert full.search(preset.source), preset.name  # repository@commit, even for what was not read
        if not unread:
            assert re.search(r"\.(py|yaml|sh)(:\d+|\s|$| eval| config)", preset.source) or "()" in preset.source, preset.name


def test_trainer_settings_flow_into_the_config_and_explicit_options_win():
    sd3 = ProbeConfig(preset="flow_grpo-sd3.5m")
    assert (sd3.max_sequence_length, sd3.negative_prompt) == (128, "")
    assert ProbeConfig(preset="flow_grpo-sd3.5m", max_sequence_length=256).max_sequence_length == 256
    wan = ProbeConfig(preset="flow-factory-wan2.2-t2v")
    assert (wan.num_frames, wan.guidance_2, wan.height, wan.width) == (21, 3.0, 720, 720)
    assert ProbeConfig(preset="flow-factory-wan2.2-t2v", guidance_2=2.0, num_frames=5).guidance_2 == 2.0
    qwen = ProbeConfig(preset="pref-grpo-qwen-image")
    assert (qwen.height, qwen.width, qwen.negative_prompt) == (928, 1664, " ")
    assert {p.family for p in PRESETS.values()} <= {f.name for f in FAMILIES}


def test_docs_list_every_preset_with_its_source():
    from pathlib import Path

    from normscope.render.presets import docs_tables

    docs = Path(__file__).resolve().parents[1] / "docs"
    for name, (_, table) in docs_tables().items():
        assert table in (docs / name).read_text(), f"docs/{name} is stale: run make docs-presets"
    text = (docs / "presets.md").read_text()
    for preset in PRESETS.values():
        assert f"`{preset.name}`" in text, preset.name
        assert preset.source.replace("|", "/") in text, preset.name
