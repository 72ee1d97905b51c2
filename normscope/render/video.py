"""Video outputs: each sample's decoded video as an animated WebP, and frame strips for the report.

Encoding goes through Pillow's own WebP writer (libwebp), never a hand-written encoder.
"""

from __future__ import annotations

from pathlib import Path

VIDEO_SUFFIX = ".webp"
FRAME_MS = 125  # 8 frames per second: slow enough to see a 5-frame probe video


def as_frames(item) -> list:
    """The PIL frames of one sample's video (a list of PIL images), or ``[image]`` for a still image."""
    return list(item) if isinstance(item, (list, tuple)) else [item]


def save_video(frames: list, path: Path) -> Path:
    """An animated, lossless WebP of ``frames`` (PIL images), looping."""
    first, *rest = frames
    first.save(path, format="WEBP", save_all=True, append_images=rest, duration=FRAME_MS, loop=0, lossless=True)
    return path


def read_video(path: Path) -> list:
    """Every frame of an animated image file, as RGB PIL images."""
    from PIL import Image, ImageSequence

    with Image.open(path) as image:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]


def frame_strip(path: Path, height: int = 96, gap: int = 2):
    """The frames of a saved video side by side (``gap`` px of white between them), each scaled to ``height`` px."""
    from PIL import Image

    frames = read_video(path)
    width = max(1, round(frames[0].width * height / frames[0].height))
    strip = Image.new("RGB", (width * len(frames) + gap * (len(frames) - 1), height), "white")
    for i, frame in enumerate(frames):
        strip.paste(frame.resize((width, height), Image.Resampling.NEAREST), (i * (width + gap), 0))
    return strip


def video_pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """(label, base video, tuned video) for every sample with both videos saved by ``--save-images``."""
    pairs = []
    for base in sorted(folder.glob(f"*-base{VIDEO_SUFFIX}")) if folder.is_dir() else []:
        tuned = base.with_name(base.name.replace(f"-base{VIDEO_SUFFIX}", f"-tuned{VIDEO_SUFFIX}"))
        if tuned.is_file():
            prompt_id, seed = base.name.split("-")[:2]
            pairs.append((f"p{int(prompt_id)} s{seed}", base, tuned))
    return pairs


def save_strips(folder: Path, path: Path, height: int = 96, gap: int = 6) -> Path | None:
    """One PNG with, per sample, the base video's frames above the tuned video's; None without videos."""
    from PIL import Image

    pairs = video_pairs(folder)
    if not pairs:
        return None
    rows = [frame_strip(p, height) for _, base, tuned in pairs for p in (base, tuned)]
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, len(rows) * height + (len(pairs) - 1) * gap), "white")
    y = 0
    for i, row in enumerate(rows):
        sheet.paste(row, (0, y))
        y += height + (gap if i % 2 else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
