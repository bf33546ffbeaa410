"""Plain records shared by the data layer and its users (no behaviour beyond derived sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Bucket = tuple[int, int, int]
"""(width, height, frames): every sample of a bucket has this pixel size and clip length (1 for stills)."""


@dataclass(frozen=True)
class ImageRecord:
    """One discovered image or video with its caption, pixel size (from the header) and, for a video, its
    decodable frame count and average frame rate. A still image has `frames == 1` and `fps is None`. For
    ControlNet training, a still also has its conditioning image (`control`)."""

    path: Path
    caption: str
    width: int
    height: int
    frames: int = 1
    fps: float | None = None
    variable_rate: bool = False
    """The clip's frame intervals vary (its frames are chosen by timestamp, like any clip's)."""
    timestamps: tuple[float, ...] = ()
    """Seconds at which each frame is shown, in presentation order (clips only)."""
    control: Path | None = None
    """The conditioning image of the sample (ControlNet training), placed exactly like the image itself."""
    control_size: tuple[int, int] | None = None
    """Displayed (width, height) of `control` (EXIF rotation applied), from its header."""

    @property
    def is_video(self) -> bool:
        return self.fps is not None


MediaRecord = ImageRecord
"""The same record under the name that says it may be a clip."""


@dataclass(frozen=True)
class Skipped:
    """An input that was left out, with the reason shown to the user."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Placement:
    """How a source becomes a bucket-sized sample: resize to `resized`, then crop at `crop_left_top`; for a
    clip, the source frames `frame_indices` (in decoding order) at `fps`.

    All sizes are (width, height) in pixels; `bucket` is the final crop size. A still has no frame indices.
    """

    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop_left_top: tuple[int, int]
    frame_indices: tuple[int, ...] = ()
    fps: float | None = None

    @property
    def frames(self) -> int:
        return max(1, len(self.frame_indices))

    @property
    def shape(self) -> Bucket:
        """The bucket this sample trains in: (width, height, frames)."""
        return (*self.bucket, self.frames)
