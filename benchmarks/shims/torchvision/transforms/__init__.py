"""The transforms diffusers' `train_dreambooth_lora_sd3.py` uses, on PIL images (tensors only after ToTensor)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch
from PIL import Image

from torchvision.transforms import functional

__all__ = [
    "CenterCrop",
    "Compose",
    "InterpolationMode",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "ToTensor",
    "functional",
]


class InterpolationMode(Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a (h, w) sequence, as torchvision reads crop sizes."""
    if isinstance(size, int):
        return size, size
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any) -> Any:
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """An int resizes the shorter side to it (aspect kept, longer side truncated); (h, w) resizes exactly."""

    def __init__(
        self, size: int | Sequence[int], interpolation: InterpolationMode = InterpolationMode.BILINEAR
    ) -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if isinstance(self.size, int) or len(self.size) == 1:
            short = self.size if isinstance(self.size, int) else int(self.size[0])
            if width <= height:
                new_w, new_h = short, int(short * height / width)
            else:
                new_w, new_h = int(short * width / height), short
        else:
            new_h, new_w = int(self.size[0]), int(self.size[1])
        if (new_w, new_h) == (width, height):
            return image
        return image.resize((new_w, new_h), _PIL_FILTERS[self.interpolation])


class CenterCrop:
    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        height, width = self.size
        top = round((image.height - height) / 2.0)
        left = round((image.width - width) / 2.0)
        return functional.crop(image, top, left, height, width)


class RandomCrop:
    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size)

    @staticmethod
    def get_params(image: Image.Image, output_size: Sequence[int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop of `output_size`, drawn from torch's global RNG."""
        height, width = int(output_size[0]), int(output_size[1])
        if image.height < height or image.width < width:
            raise ValueError(f"crop size {(height, width)} is larger than the image {(image.height, image.width)}")
        if (image.height, image.width) == (height, width):
            return 0, 0, height, width
        top = int(torch.randint(0, image.height - height + 1, size=(1,)).item())
        left = int(torch.randint(0, image.width - width + 1, size=(1,)).item())
        return top, left, height, width

    def __call__(self, image: Image.Image) -> Image.Image:
        return functional.crop(image, *self.get_params(image, self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


class ToTensor:
    """PIL image → float32 tensor (C, H, W) in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class Normalize:
    """(x − mean) / std per channel; a one-element mean/std applies to every channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean.to(tensor.dtype)) / self.std.to(tensor.dtype)
