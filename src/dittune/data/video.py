"""Video sources: probe a file (size, frames, timestamps), choose a sample's frames, decode only those.

Decoding goes through PyAV (FFmpeg in its wheel; ``pip install dittune[video]``). Frames are chosen by
timestamp, so constant and variable frame rates go through the same code: a clip of N frames at rate r
starting at time s uses, for each target time s + j/r, the last source frame shown at or before it.

Sampling modes (`data.frame_sampling`): "start" begins at the first frame, "middle" centres the clip in
the source, "uniform" spreads the N frames evenly over the whole source (its rate is then whatever that
spacing gives). `data.fps` unset keeps the source's average rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from dittune.data.transforms import ImageLoadError, load_pixels, pixels_from_image
from dittune.data.types import Placement

if TYPE_CHECKING:  # torch is imported where pixels are made, so discovery (`dittune config check`) runs without it
    import torch

VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".gif", ".avi", ".m4v"})
"""Suffixes (lower case) read as clips by video families (".gif" is a still for image families)."""

FRAME_SAMPLING_MODES = ("start", "middle", "uniform")
DECODE_METHOD = "pyav-timestamps-v1"
"""Identifies the frame choice and decoding below (part of latent cache keys); bump when the output changes."""

_VFR_TOLERANCE = 0.05
"""Frame intervals that differ from their median by more than this fraction make a clip variable-rate."""


class VideoSupportMissing(ImportError):
    """PyAV is not installed."""


def require_av():
    try:
        import av
    except ImportError as error:
        raise VideoSupportMissing(
            "reading videos needs PyAV: pip install 'dittune[video]' (or pip install av)"
        ) from error
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What probing a video file found: displayed size, frame timestamps (seconds, sorted) and rate."""

    width: int
    height: int
    times: tuple[float, ...]
    fps: float
    variable_rate: bool

    @property
    def frames(self) -> int:
        return len(self.times)

    @property
    def duration(self) -> float:
        """Seconds from the first frame's start to the last frame's end."""
        return self.times[-1] - self.times[0] + 1.0 / self.fps


def probe_video(path: Path) -> VideoInfo | str:
    """The clip's geometry and frame times, or a human reason why it cannot be used.

    The packets are read (not decoded) for the timestamps; the first frame is decoded to check the codec.
    """
    av = require_av()
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        return f"cannot read file ({error})"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        return f"not a readable video file: unknown format, or truncated ({_ffmpeg_message(error)})"
    with container:
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams}) or ["no"]
            return f"no video stream (only {', '.join(kinds)} streams)"
        stream = container.streams.video[0]
        context = stream.codec_context
        codec = context.name if context is not None else None
        if codec is None:
            return "undecodable codec: this FFmpeg build has no decoder for the video stream"
        try:
            times = sorted(
                float(packet.pts * stream.time_base)
                for packet in container.demux(stream)
                if packet.pts is not None and packet.size > 0
            )
        except av.FFmpegError as error:
            return f"truncated or corrupt while reading ({_ffmpeg_message(error)})"
        try:
            container.seek(0)
            first = next(container.decode(stream), None)
        except av.error.DecoderNotFoundError:
            return f"undecodable codec {codec!r}: this FFmpeg build has no decoder for it"
        except av.FFmpegError as error:
            return f"the {codec} stream does not decode: truncated or corrupt ({_ffmpeg_message(error)})"
        width, height = stream.codec_context.width, stream.codec_context.height
    if first is None or not times:
        return f"no decodable frame (codec {codec}; the file may be truncated)"
    if width <= 0 or height <= 0:
        return f"video has no pixels ({width}×{height})"
    if len(times) == 1:
        return VideoInfo(width, height, tuple(times), 1.0, False)
    gaps = np.diff(np.asarray(times))
    median = float(np.median(gaps))
    if median <= 0:
        return "frame timestamps do not increase (broken container)"
    variable = bool(np.any(np.abs(gaps - median) > _VFR_TOLERANCE * median))
    fps = (len(times) - 1) / (times[-1] - times[0])
    return VideoInfo(width, height, tuple(times), fps, variable)


def _ffmpeg_message(error: BaseException) -> str:
    """FFmpeg's own words for an error, without the errno and the file name."""
    return getattr(error, "strerror", None) or str(error).strip() or type(error).__name__


def available_frames(info: VideoInfo, fps: float | None) -> int:
    """How many frames a clip at `fps` (None: the source rate) can take from the source."""
    if fps is None or info.frames == 1:
        return info.frames
    span = info.times[-1] - info.times[0]
    return math.floor(span * fps + 1e-6) + 1


def select_frames(info: VideoInfo, frames: int, fps: float | None, sampling: str) -> tuple[tuple[int, ...], float]:
    """Indices of the source frames a clip of `frames` frames uses, and the clip's rate.

    Raises ValueError when the source is too short (callers check `available_frames` first).
    """
    if sampling not in FRAME_SAMPLING_MODES:
        raise ValueError(f"frame_sampling must be one of {FRAME_SAMPLING_MODES}, got {sampling!r}")
    times = np.asarray(info.times)
    if frames == 1:
        if sampling == "middle":
            return (int(np.argmin(np.abs(times - (times[0] + times[-1]) / 2))),), fps or info.fps
        return (0,), fps or info.fps
    if sampling == "uniform":
        targets = np.linspace(times[0], times[-1], frames)
        rate = (frames - 1) / (times[-1] - times[0]) if times[-1] > times[0] else info.fps
    else:
        rate = fps or info.fps
        if available_frames(info, rate) < frames:
            raise ValueError(f"{info.frames} frames cannot give a clip of {frames} at {rate:g} fps")
        length = (frames - 1) / rate
        spare = (times[-1] - times[0]) - length
        start = times[0] + (spare / 2 if sampling == "middle" else 0.0)
        targets = start + np.arange(frames) / rate
    # The last frame shown at or before each target time (a tiny tolerance absorbs rounding of timestamps).
    indices = np.searchsorted(times, targets + 1e-6, side="right") - 1
    return tuple(int(i) for i in np.clip(indices, 0, len(times) - 1)), float(Fraction(rate).limit_denominator(1001))


def decode_frames(path: Path, indices: tuple[int, ...]) -> list[Image.Image]:
    """The frames at `indices` (positions in presentation order) as RGB images.

    Decoding stops after the last wanted frame; only the wanted ones are converted to RGB.
    """
    av = require_av()
    wanted = set(indices)
    last = max(indices)
    found: dict[int, Image.Image] = {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for position, frame in enumerate(container.decode(stream)):
                if position in wanted:
                    found[position] = frame.to_image().convert("RGB")
                if position >= last:
                    break
    except (av.FFmpegError, OSError, ValueError) as error:
        raise ImageLoadError(f"video is truncated or corrupt ({_ffmpeg_message(error)})", path) from error
    missing = sorted(wanted - found.keys())
    if missing:
        raise ImageLoadError(f"video ended before frame {missing[0]} (decoded {len(found)} of {len(wanted)})", path)
    return [found[i] for i in indices]


def load_clip(path: Path, placement: Placement, flip: bool) -> torch.Tensor:
    """A float32 (3, F, H, W) clip in [-1, 1]: each chosen frame resized and cropped as `load_pixels` does."""
    import torch

    frames = decode_frames(path, placement.frame_indices)
    return torch.stack([pixels_from_image(frame, placement, flip, path) for frame in frames], dim=1)


def load_sample(path: Path, placement: Placement, flip: bool) -> torch.Tensor:
    """A (3, F, H, W) sample: the clip's chosen frames, or a still image as one frame."""
    if placement.frame_indices:
        return load_clip(path, placement, flip)
    return load_pixels(path, placement, flip).unsqueeze(1)
