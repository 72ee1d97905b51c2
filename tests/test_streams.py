"""Every stream in profile, check and sweep, and LTX-2's maps (issue 19).

LTX-2 returns a video and an audio velocity per transformer call. Known answers, on the tiny LTX-2 pipeline:

* the reference stores both streams, each norm equal to the plain diffusers call's (its scheduler steps patched
  at the class, independently of normscope's capture);
* a checkpoint with the video output projection x1.1 and the audio one x1.2 checks at exactly +10 % on the video
  stream and +20 % on the audio stream (one step: free mode is exact at the first step), whichever is gated on;
* ``--stream`` is refused before anything loads when the family has no such stream, and a reference lacking the
  stream (one made before normscope stored streams) is exit 2;
* ``--maps`` maps LTX-2's video tokens to (frames, height, width) as diffusers' ``_unpack_latents`` does: x1.1 gives
  1.1 at every position, base vs itself 1.0, and the base's norm map equals the plain call's.

LTX-2's guidance is set through its options (``--stg-blocks 1`` of the tiny model's 2, both guidance rescales 0:
the guided velocity is then linear in the raw ones).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from reporters import KeptNotes
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from normscope.builders.tiny import save_tiny
from normscope.builders.tiny_new_families import tiny_ltx2_pipeline
from normscope.cli import app
from normscope.commands.check import CheckConfig, check
from normscope.commands.profile import ProfileConfig, load_reference, profile
from normscope.errors import InputError

PROMPTS = ("a red fox in snow", "two green apples")
# LTX-2's options: STG on block 1 of the tiny model's 2, both guidance rescales off (the guided velocity is then
# linear in the raw ones, so x1.1 is exact), 25 fps.
PROBE = dict(guidance=3.0, height=32, width=32, num_frames=5, max_sequence_length=16, stg_blocks=(1,),
             frame_rate=25.0, guidance_rescale=0.0, audio_guidance_rescale=0.0)
HARDWARE = dict(device="cpu", dtype="float32")
# The same settings as the plain diffusers call's own keywords (the independent computations below)
EXACT = dict(spatio_temporal_guidance_blocks=[1], frame_rate=25.0, guidance_rescale=0.0, audio_guidance_rescale=0.0)
VIDEO_OUT = ("proj_out.weight", "proj_out.bias")
AUDIO_OUT = ("audio_proj_out.weight", "audio_proj_out.bias")
runner = CliRunner()


@pytest.fixture(scope="module")
def ltx2(tmp_path_factory):
    return save_tiny(tiny_ltx2_pipeline(seed=0), tmp_path_factory.mktemp("ltx2") / "ltx2")


def scaled(folder: Path, target: Path, video: float, audio: float) -> Path:
    """The transformer's state dict with the video output projection x ``video`` and the audio one x ``audio``."""
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(k in state for k in VIDEO_OUT + AUDIO_OUT)
    factor = {**dict.fromkeys(VIDEO_OUT, video), **dict.fromkeys(AUDIO_OUT, audio)}
    save_file({k: (v * factor.get(k, 1.0)).contiguous() for k, v in state.items()}, str(target))
    return target


@pytest.fixture(scope="module")
def tuned(ltx2, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    return {"x1.1": scaled(ltx2, root / "x1.1.safetensors", 1.1, 1.1),
            "video x1.1, audio x1.2": scaled(ltx2, root / "mixed.safetensors", 1.1, 1.2)}


@pytest.fixture(scope="module")
def reference(ltx2, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ref"
    profile(ProfileConfig(base=str(ltx2), out=out, prompts=PROMPTS, seeds=(0,), steps=1, **PROBE, **HARDWARE))
    return out


def plain_norms(folder: Path, steps: int) -> dict[tuple[int, int], list[float]]:
    """(stream, step) -> the applied velocity's norm per prompt, from the plain diffusers call: the scheduler CLASS's
    step patched (the pipeline deep-copies its scheduler for audio); stream 0 is the pipeline's own scheduler."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cls, out, count = type(pipe.scheduler), {}, {}
    original = cls.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        stream = 0 if self is pipe.scheduler else 1
        out[(stream, count.get(stream, 0))] = model_output.flatten(1).float().norm(dim=1).tolist()
        count[stream] = count.get(stream, 0) + 1
        return original(self, model_output, timestep, sample, *args, **kwargs)

    with torch.no_grad(), mock.patch.object(cls, "step", step):
        pipe(prompt=list(PROMPTS), num_inference_steps=steps, guidance_scale=PROBE["guidance"], height=32, width=32,
             num_frames=5, max_sequence_length=16, output_type="latent",
             generator=[torch.Generator().manual_seed(0) for _ in PROMPTS], **EXACT)
    return out


# ---------------------------------------------------------------- refused before loading


def test_a_stream_the_family_lacks_is_refused_in_one_line_before_loading(ltx2, tmp_path):
    from normscope.load.families import family_named
    from normscope.load.pipeline import check_stream

    ltx = family_named("ltx2")
    assert check_stream(ltx, None) == "video" and check_stream(ltx, "audio") == "audio"
    with pytest.raises(InputError, match=r"--stream depth: ltx2 pipelines return the streams video, audio .*"
                                         r"use --stream video or --stream audio"):
        check_stream(ltx, "depth")
    assert check_stream(family_named("sd3"), None) is None
    with pytest.raises(InputError, match=r"--stream video: sd3 pipelines return one velocity.*drop --stream"):
        check_stream(family_named("sd3"), "video")
    # through the CLI, a live check: exit 2 with one line, and nothing was loaded (the family row decides)
    with mock.patch("normscope.commands.compare.load_pipeline", side_effect=AssertionError("loaded")):
        result = runner.invoke(app, ["check", str(ltx2), str(ltx2), "--max-inflation", "0.05", "--stream", "depth",
                                     "--prompt", "a fox", "--seeds", "0", "--steps", "1", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "--stream depth: ltx2 pipelines return the streams video, audio" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- profile and check


def test_profile_stores_every_stream_as_the_plain_call_computes_it(ltx2, reference):
    meta = json.loads((reference / "reference.json").read_text())
    assert meta["streams"] == ["video", "audio"]
    assert {"guided", "cond", "uncond", "audio:guided", "audio:cond", "audio:uncond"} <= set(meta["per_step"])
    gates = meta["suggestions"]["gate_by_stream"]
    assert set(gates) == {"video", "audio"} and gates["video"]["max_inflation"] == meta["suggestions"]["gate"]["max_inflation"]
    assert all(g["max_inflation"] >= 0.02 for g in gates.values())
    loaded = load_reference(reference)
    expected = plain_norms(ltx2, steps=1)
    np.testing.assert_allclose(loaded.norms["guided"][:, 0], expected[(0, 0)], rtol=2e-5)
    np.testing.assert_allclose(loaded.norms["audio:guided"][:, 0], expected[(1, 0)], rtol=2e-5)
    assert not np.allclose(expected[(0, 0)], expected[(1, 0)], rtol=1e-2)  # two different velocities


@pytest.mark.parametrize("name, video, audio", [("x1.1", 0.1, 0.1), ("video x1.1, audio x1.2", 0.1, 0.2)])
def test_stored_check_gates_on_the_chosen_stream_and_reports_the_other(reference, tuned, name, video, audio):
    on_audio = check(CheckConfig(paths=(str(tuned[name]),), reference=reference, stream="audio", **HARDWARE))
    default = check(CheckConfig(paths=(str(tuned[name]),), reference=reference, **HARDWARE))
    for result, gated, value, other, other_value in ((on_audio, "audio", audio, "video", video),
                                                     (default, "video", video, "audio", audio)):
        out = result.to_dict()
        assert out["stream"] == gated and result.stream == gated
        [checkpoint] = out["checkpoints"]
        assert checkpoint["stream"] == gated
        assert checkpoint["inflation"] == pytest.approx(value, abs=2e-6)
        assert set(checkpoint["other_streams"]) == {other}
        assert checkpoint["other_streams"][other]["inflation"] == pytest.approx(other_value, abs=2e-6)
        assert checkpoint["verdict"] == "fail" and result.exit_code == 1  # +10 % is above the suggested gates
    assert on_audio.max_inflation == load_reference(reference).gate_for("audio")
    from normscope.render.ci import verdict_line

    line = verdict_line(on_audio)
    assert "on the audio stream" in line and f"video stream +{video * 100:.2f} % (not gated)" in line


def test_live_check_passes_on_video_and_fails_on_audio_for_the_same_checkpoint(ltx2, tuned):
    """Paired mode, two steps: video x1.1 is +10 % and audio x1.2 is +20 % at every step; a 15 % gate passes the
    video stream and fails the audio one."""
    fields = dict(paths=(str(ltx2), str(tuned["video x1.1, audio x1.2"])), max_inflation=0.15, prompts=PROMPTS,
                  seeds=(0,), steps=2, **PROBE, **HARDWARE)
    video = check(CheckConfig(**fields))
    audio = check(CheckConfig(stream="audio", **fields))
    assert (video.stream, video.exit_code, audio.stream, audio.exit_code) == ("video", 0, "audio", 1)
    assert video.checkpoints[0].inflation == pytest.approx(0.1, abs=2e-6)
    assert audio.checkpoints[0].inflation == pytest.approx(0.2, abs=2e-6)
    assert audio.to_dict()["checkpoints"][0]["other_streams"]["video"]["inflation"] == pytest.approx(0.1, abs=2e-6)


def _sealed_copy(reference: Path, target: Path, change) -> Path:
    """A copy of the reference with reference.json changed and its manifest written again (as profile would)."""
    from normscope.runfolder.manifest import MANIFEST, manifest, write_atomic

    shutil.copytree(reference, target)
    meta = json.loads((target / "reference.json").read_text())
    change(meta)
    (target / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    entries = [p.name for p in target.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")]
    old = json.loads((target / MANIFEST).read_text())
    write_atomic(target / MANIFEST, manifest(target, entries, old["fingerprint"], old["kind"]))
    return target


def test_a_reference_without_stream_info_is_its_headline_stream_only(reference, tuned, tmp_path):
    def old(meta):  # what profile wrote before streams were stored
        meta.pop("streams")
        meta["suggestions"].pop("gate_by_stream")

    folder = _sealed_copy(reference, tmp_path / "old", old)
    args = ["check", str(tuned["x1.1"]), "--reference", str(folder), "--device", "cpu", "--dtype", "float32"]
    result = runner.invoke(app, [*args, "--stream", "audio"])
    assert result.exit_code == 2, result.output
    assert "--stream audio: the reference in" in result.stderr and "holds the video stream only" in result.stderr
    headline = check(CheckConfig(paths=(str(tuned["video x1.1, audio x1.2"]),), reference=folder, **HARDWARE))
    [checkpoint] = headline.to_dict()["checkpoints"]
    assert headline.stream == "video" and checkpoint["inflation"] == pytest.approx(0.1, abs=2e-6)
    assert "by_stream" not in headline.checkpoints[0].summary  # the audio rows an old profile kept are not read


def test_a_damaged_stream_list_is_refused_by_the_schema(reference, tmp_path):
    folder = _sealed_copy(reference, tmp_path / "bad", lambda meta: meta.__setitem__("streams", ["video", "depth"]))
    with pytest.raises(InputError, match=r"per_step has no 'depth:guided' rows but streams lists 'depth'"):
        load_reference(folder)


# ---------------------------------------------------------------- sweep


def test_sweep_names_the_stream_of_its_table(ltx2, tuned, tmp_path):
    from normscope.commands.sweep import SweepConfig, sweep

    run_dir = tmp_path / "run"
    target = run_dir / "checkpoint-10" / "transformer"
    shutil.copytree(ltx2 / "transformer", target)
    shutil.copyfile(tuned["video x1.1, audio x1.2"], target / "diffusion_pytorch_model.safetensors")
    table = sweep(SweepConfig(run_dir=run_dir, out=tmp_path / "out", pipeline=str(ltx2), stream="audio",
                              gate=0.15, prompts=PROMPTS, seeds=(0,), steps=1, **PROBE, **HARDWARE))
    row = table.iloc[0]
    assert row["stream"] == "audio" and row["inflation"] == pytest.approx(0.2, abs=2e-6)
    assert row["video_inflation"] == pytest.approx(0.1, abs=2e-6) and bool(row["crosses_gate"])
    meta = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert meta["stream"] == "audio"
    assert "stream" in (tmp_path / "out" / "sweep.csv").read_text().splitlines()[0].split(",")


# ---------------------------------------------------------------- maps


def _maps(ltx2, tuned_path, steps=2):
    from normscope.commands.compare import compare
    from normscope.config import CompareConfig

    reporter = KeptNotes()
    result = compare(CompareConfig(tuned=str(tuned_path), base=str(ltx2), pipeline=str(ltx2), prompts=PROMPTS[:1],
                                   seeds=(0,), steps=steps, maps=True, **PROBE, **HARDWARE), reporter)
    return result, reporter.notes


def test_ltx2_maps_of_the_video_stream_are_exact(ltx2, tuned):
    inflated, notes = _maps(ltx2, tuned["video x1.1, audio x1.2"])
    assert inflated.summary["maps"]["stream"] == "video"
    assert sum("the audio stream has no spatial layout" in n for n in notes) == 1
    regions = inflated.maps.regions
    assert regions and inflated.maps.meta["shape"] == [4, 3, 16, 16]  # (channels, latent frames, height, width)
    for region in regions:
        ratio = inflated.maps.ratio_map(region)
        assert ratio.shape == (3, 16, 16)
        torch.testing.assert_close(ratio, torch.full_like(ratio, 1.1), rtol=1e-5, atol=0)  # float32 per position; not 1.2
    same, _ = _maps(ltx2, ltx2, steps=1)
    [region] = same.maps.regions
    ratio = same.maps.ratio_map(region)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-5, atol=0)
    # where each position lands: the base's norm map against the plain call's video velocity unpacked by diffusers
    expected = _plain_norm_map(ltx2)
    torch.testing.assert_close(same.maps.tensors[f"{region}/norm_base_map"], expected, rtol=2e-5, atol=1e-6)


def _plain_norm_map(folder: Path) -> torch.Tensor:
    """The first step's applied video velocity of the plain call (one prompt), unpacked by the pipeline's own
    ``_unpack_latents`` to (B, C, F, H, W), its norm over channels at each position."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    cls, seen = type(pipe.scheduler), []
    original = cls.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self is pipe.scheduler:
            seen.append(model_output.float().clone())
        return original(self, model_output, timestep, sample, *args, **kwargs)

    with torch.no_grad(), mock.patch.object(cls, "step", step):
        pipe(prompt=[PROMPTS[0]], num_inference_steps=1, guidance_scale=PROBE["guidance"], height=32, width=32,
             num_frames=5, max_sequence_length=16, output_type="latent",
             generator=[torch.Generator().manual_seed(0)], **EXACT)
    frames = (5 - 1) // pipe.vae_temporal_compression_ratio + 1
    size = 32 // pipe.vae_spatial_compression_ratio
    video = pipe._unpack_latents(seen[0], frames, size, size, pipe.transformer_spatial_patch_size,
                                 pipe.transformer_temporal_patch_size)
    return torch.linalg.vector_norm(video, dim=1)[0]
