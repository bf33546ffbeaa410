"""Writing what a pipeline produced: one image, or a clip as a video file or a lossless strip of frames.

`write_frames` picks the format from the suffix: ``.png`` (the image, or for a clip a strip of all frames
left to right, frame 0 at the left), ``.mp4`` (H.264 through PyAV), ``.gif`` and ``.webp`` (animated,
through Pillow; WebP lossless).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

from PIL import Image

CLIP_SUFFIXES = (".mp4", ".gif", ".webp")
OUTPUT_SUFFIXES = (".png", *CLIP_SUFFIXES)


def strip(frames: Sequence[Image.Image]) -> Image.Image:
    """All frames side by side, frame 0 at the left (lossless when saved as PNG)."""
    width, height = frames[0].size
    canvas = Image.new("RGB", (width * len(frames), height))
    for index, frame in enumerate(frames):
        canvas.paste(frame.convert("RGB"), (index * width, 0))
    return canvas


def write_frames(frames: Sequence[Image.Image], path: Path, fps: float) -> Path:
    """Save `frames` at `path` in the format its suffix names (see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"{path}: unknown output format {suffix!r}; use one of {', '.join(OUTPUT_SUFFIXES)}")
    if not frames:
        raise ValueError("no frames to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        (frames[0] if len(frames) == 1 else strip(frames)).save(path)
    elif suffix == ".mp4":
        write_mp4(frames, path, fps)
    else:
        duration = max(1, round(1000.0 / fps))
        first, *rest = [frame.convert("RGB") for frame in frames]
        options = {"lossless": True} if suffix == ".webp" else {"disposal": 1}
        first.save(path, save_all=True, append_images=rest, duration=duration, loop=0, **options)
    return path


def write_mp4(frames: Sequence[Image.Image], path: Path, fps: float, crf: int = 12) -> None:
    """An H.264 MP4 (yuv420p, so odd sides are padded by one pixel; near-lossless at the default crf)."""
    from dittune.data.video import require_av

    av = require_av()
    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = even
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            image = frame.convert("RGB")
            if image.size != even:
                padded = Image.new("RGB", even)
                padded.paste(image, (0, 0))
                image = padded
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def load_image(path: Path) -> Image.Image:
    """An image file as RGB, EXIF orientation applied (conditioning and control images)."""
    from PIL import ImageOps

    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")
